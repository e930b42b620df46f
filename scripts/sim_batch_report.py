"""The H200 continuous-batching comparison: ``specframe simulate --batch B`` over the recorded traces on the
Qwen3-8B verification profile, at 1, 4 and 8 concurrent requests, summarised in one table per trace.

    python scripts/sim_batch_report.py            # runs the simulations (seconds each) and writes the report

A simulation, not a measurement: see each run's report.md for what is simulated and how.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench" / "sim-h200-batch"
PROFILE = ROOT.parent / "shared" / "profiles" / "verify_qwen3-8b.json"
TRACES = {  # name -> (trace, draft ms or None: as traced, overhead ms): the earlier H200 simulations' settings
    "dflash": ("docs/bench/trace.jsonl", 5.2, 0.8478),
    "ngram": ("docs/bench/trace-ngram.jsonl", None, 0.8782),
}
POLICIES = ["ar", "chain", "best-first:16", "best-first:32", "best-first:64", "bastion", "bastion{batch_budget=false}",
            "bastion{gate=false}", "bastion{gate=false;batch_budget=false}"]
BATCHES = (1, 4, 8)


def run(name: str, batch: int) -> dict:
    trace, draft_ms, overhead_ms = TRACES[name]
    out = OUT / f"{name}-b{batch}"
    cmd = [sys.executable, "-m", "specframe.cli", "simulate", "--trace", trace, "--profile", str(PROFILE),
           "--policies", ",".join(POLICIES), "--overhead-ms", str(overhead_ms), "--host-ms-per-node", "0.027",
           "--batch", str(batch), "--out", str(out)]
    if draft_ms is not None:
        cmd += ["--draft-ms", str(draft_ms)]
    if "--no-run" not in sys.argv:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    lines = ["# Continuous batching on the simulated H200 (Qwen3-8B profile)", "",
             "**A simulation**, not a measurement: each trace's prompts are served as B concurrent requests through "
             "specframe's batch loop (`specframe simulate --batch B`); one simulated forward per step verifies every "
             "request's tree, priced by `verify_qwen3-8b.json` at the call's N tokens and the requests' mean context; "
             "each request's drafting is charged on its own (a drafter that drafted the whole batch in one call would "
             "cost less). Speedup = the batch's tokens/s over `ar`'s at the same B. `bastion` = one budget across the "
             "batch; `{batch_budget=false}` = each request's tree sized alone; `{gate=false}` = no draft gate.", ""]
    for name in TRACES:
        results = {b: run(name, b) for b in BATCHES}
        for ds in results[1]["datasets"]:
            lines += [f"## {name} drafts, {ds}", "", "| method | " + " | ".join(f"B = {b}: speedup (τ)" for b in BATCHES)
                      + " |", "|---|" + "---|" * len(BATCHES)]
            for lab in POLICIES:
                cells = []
                for b in BATCHES:
                    e = results[b]["datasets"][ds][lab]
                    cells.append(f"{e['speedup_vs_ar']:.2f}× ({e['tau']:.2f})")
                lines.append(f"| {lab} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += [f"Runs: " + ", ".join(f"[B = {b}]({name}-b{b}/report.md)" for b in BATCHES), ""]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print((OUT / "report.md").read_text())


if __name__ == "__main__":
    main()
