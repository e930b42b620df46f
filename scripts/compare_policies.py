"""Every tree policy on the same drafts: one comparison report (``docs/bench/compare-policies``).

Runs ``specframe bench`` once per drafter × temperature (the methods of one run interleaved per prompt, so
they share the machine's state) and ``specframe simulate`` on the H200 Qwen3-8B profile over the traces
recorded here, then writes ``report.md`` with one table per run and one plot per drafter.

    python scripts/compare_policies.py                      # everything (about 40 minutes on 2 cores)
    python scripts/compare_policies.py --only hf-dflash-t0  # one run
    python scripts/compare_policies.py --report-only        # the report from runs already made

Run it alone on the machine: any other CPU load stalls torch and llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TREE_POLICIES = ["bastion", "best-first:8", "best-first:16", "best-first:32", "eagle2", "sequoia", "specblock",
                 "static-tree", "chain"]
SIM_POLICIES = ["bastion", "best-first:16", "best-first:32", "best-first:64", "eagle2", "sequoia", "specblock",
                "static-tree", "chain", "bastion{cost_model.branch_fit=alternate}"]
SAMPLED = "multi-draft-wor"

OLD_FIT = "bastion{cost_model.branch_fit=alternate}"  # BASTION before the roofline's descent fit, side by side
# name -> (backend, drafter, temperature, methods)
RUNS = {
    "hf-ngram-t0": ("hf", "ngram", 0.0, TREE_POLICIES + [OLD_FIT]),
    "hf-dflash-t0": ("hf", "dflash", 0.0, TREE_POLICIES + [OLD_FIT]),
    "hf-model-t0": ("hf", "model", 0.0, TREE_POLICIES + [OLD_FIT]),
    "llamacpp-ngram-t0": ("llama.cpp", "ngram", 0.0, TREE_POLICIES + [OLD_FIT]),
    "hf-dflash-t1": ("hf", "dflash", 1.0, ["bastion"] + [f"{p}+{SAMPLED}" for p in TREE_POLICIES]),
    "hf-model-t1": ("hf", "model", 1.0, ["bastion"] + [f"{p}+{SAMPLED}" for p in TREE_POLICIES]),
    # the verifier alone: the same policies verifying ranked candidates (sample) and drawn ones
    "hf-model-t1-verifiers": ("hf", "model", 1.0, [f"{p}{v}" for p in ("chain", "best-first:16", "bastion")
                                                    for v in ("", "+multi-draft", f"+{SAMPLED}")]),
}
# name -> (trace, draft ms, overhead ms): the settings of the earlier H200 simulations (docs/bench/sim-h200-*)
SIMS = {
    "sim-h200-dflash": ("docs/bench/trace.jsonl", 5.2, 0.8478),
    "sim-h200-hybrid": ("docs/bench/trace-hybrid.jsonl", 5.5, 0.9578),
    "sim-h200-ngram": ("docs/bench/trace-ngram.jsonl", None, 0.8782),
}
NOISE = 0.03  # the allowance within which two speedups count as equal


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def bench(name: str, out: Path, prompts: int, tokens: int, repeats: int) -> None:
    backend, drafter, temperature, methods = RUNS[name]
    run([sys.executable, "-m", "specframe.cli", "bench", "--backend", backend, "--drafter", drafter,
         "--policies", ",".join(["ar"] + methods), "--dataset", "mt-bench,humaneval", "--num-prompts", str(prompts),
         "-n", str(tokens), "--repeats", str(repeats), "-t", str(temperature), "--out", str(out / name)])


def simulate(name: str, out: Path) -> None:
    trace, draft_ms, overhead_ms = SIMS[name]
    cmd = [sys.executable, "-m", "specframe.cli", "simulate", "--trace", trace,
           "--profile", str(SHARED / "profiles" / "verify_qwen3-8b.json"), "--policies", ",".join(["ar"] + SIM_POLICIES),
           "--overhead-ms", str(overhead_ms), "--host-ms-per-node", "0.027", "--out", str(out / name)]
    if draft_ms is not None:
        cmd += ["--draft-ms", str(draft_ms)]
    run(cmd)


def rows(summary: dict) -> dict[str, dict[str, dict]]:
    """method -> dataset -> {speedup, tau, size, host_ms}."""
    out: dict[str, dict[str, dict]] = {}
    for dataset, methods in summary["datasets"].items():
        for label, e in methods.items():
            host = e.get("overhead_ms_per_step")
            if host is None and "host_share" in e:
                host = e["host_share"] * e.get("step_ms", 0.0)
            out.setdefault(label, {})[dataset] = {"speedup": e["speedup_vs_ar"], "tau": e["tau"],
                                                  "size": e["mean_tree_size"], "host_ms": host}
    return out


def policy_of(label: str) -> str:
    return label.partition("{")[0].partition("+")[0].partition("@")[0].partition(":")[0]


def best_first_best(table: dict, dataset: str) -> str | None:
    """The best-first:N label with the highest speedup on ``dataset`` ("best N")."""
    labels = [m for m in table if policy_of(m) == "best-first" and dataset in table[m]]
    return max(labels, key=lambda m: table[m][dataset]["speedup"]) if labels else None


def verdicts(table: dict, datasets: list[str], bastion: str) -> list[str]:
    """Cells where ``bastion`` is below another policy by more than the noise allowance."""
    lines = []
    for ds in datasets:
        mine = table.get(bastion, {}).get(ds)
        if mine is None:
            continue
        for label, cells in table.items():
            if label in (bastion, "ar") or policy_of(label) == "bastion" or ds not in cells:
                continue
            if cells[ds]["speedup"] > mine["speedup"] * (1 + NOISE):
                lines.append(f"{ds}: `{label}` {cells[ds]['speedup']:.2f}× > `{bastion}` {mine['speedup']:.2f}×")
    return lines


def plot(name: str, table: dict, datasets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m for m in table if m != "ar"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 3.6))
    width = 0.8 / max(len(datasets), 1)
    for i, ds in enumerate(datasets):
        ax.bar([j + i * width for j in range(len(labels))], [table[m].get(ds, {}).get("speedup", 0) for m in labels],
               width, label=ds)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([j + width * (len(datasets) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs ar")
    ax.set_title(name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(name: str, summary: dict, out: Path, simulated: bool) -> list[str]:
    table = rows(summary)
    datasets = list(summary["datasets"])
    plot(name, table, datasets, out / f"{name}.png")
    head = ("| method | " + " | ".join(f"{ds} speedup" for ds in datasets) + " | τ | tree size | host ms / step |")
    lines = [head, "|" + "---|" * (len(datasets) + 4)]
    best = {ds: best_first_best(table, ds) for ds in datasets}
    for label, cells in table.items():
        speed = " | ".join(f"{cells[ds]['speedup']:.2f}×" + (" (best N)" if best[ds] == label else "")
                           if ds in cells else "–" for ds in datasets)
        pair = lambda key, fmt: " / ".join(fmt.format(cells[ds][key]) if ds in cells and cells[ds][key] is not None  # noqa: E731
                                           else "–" for ds in datasets)
        lines.append(f"| `{label}` | {speed} | {pair('tau', '{:.2f}')} | {pair('size', '{:.1f}')} | {pair('host_ms', '{:.1f}')} |")
    bastion = next((m for m in table if m.startswith("bastion+")), None) or "bastion"
    worse = verdicts(table, datasets, bastion)
    lines.append("")
    lines.append(f"`{bastion}` at or above every other policy (within {NOISE:.0%}): "
                 + ("**yes**." if not worse else "**no** — " + "; ".join(worse) + "."))
    kind = "simulated" if simulated else "measured"
    return [f"### {name} ({kind})", "", f"![{name}]({name}.png)", "", *lines, "",
            f"Full report: [{name}/report.md]({name}/report.md)", ""]


def overview(out: Path, names: list[str]) -> list[str]:
    """One row per run: each policy's speedup (MT-Bench / HumanEval), the best N for best-first."""
    cols = ["bastion", "best-first", "eagle2", "sequoia", "specblock", "static-tree", "chain"]
    lines = ["| run | " + " | ".join(f"`{c}`" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        f = out / name / "summary.json"
        if not f.is_file() or name.endswith("-verifiers"):
            continue
        summary = json.loads(f.read_text())
        table, datasets = rows(summary), list(summary["datasets"])
        cells = []
        for col in cols:
            labels = [m for m in table if policy_of(m) == col and "{" not in m
                      and ("+" in m or not any("+" in k for k in table if policy_of(k) == col))]
            best = []
            for ds in datasets:
                vals = [table[m][ds]["speedup"] for m in labels if ds in table[m]]
                best.append(f"{max(vals):.2f}" if vals else "–")
            cells.append(" / ".join(best))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report(out: Path, names: list[str]) -> None:
    parts = ["# Every tree policy on the same drafts", "",
             "Made by `python scripts/compare_policies.py` (see its docstring). Each measured table is one "
             "`specframe bench` run: the methods interleaved per prompt, alone on the machine, median of the "
             "repeats; speedups are against `ar` in the same run. τ and tree size are MT-Bench / HumanEval. "
             "`best-first:N` appears for several N; the best N per dataset is marked. At T = 1 every tree policy "
             f"verifies children drawn from the draft (`+{SAMPLED}`), and `bastion` with the default `sample` "
             "verifier is given for reference. Simulated tables replay a trace recorded on this machine on the "
             "H200 Qwen3-8B latency profile (0.027 ms host time per node): they are labelled as simulation.", "",
             "## Overview: speedup vs `ar`, MT-Bench / HumanEval (best N for `best-first`)", "",
             *overview(out, names), ""]
    for name in names:
        summary_file = out / name / "summary.json"
        if not summary_file.is_file():
            continue
        summary = json.loads(summary_file.read_text())
        if "machine" in summary:
            parts.append(f"Machine: {summary['machine']}; settings: {json.dumps(summary.get('settings', {}))}")
            parts.append("")
        parts += section(name, summary, out, simulated=name.startswith("sim-"))
    (out / "report.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {out / 'report.md'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/bench/compare-policies")
    ap.add_argument("--only", default=None, help="comma-separated run names (" + ", ".join([*RUNS, *SIMS]) + ")")
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    names = [*RUNS, *SIMS] if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in RUNS and n not in SIMS]
    if unknown:
        sys.exit(f"error: unknown run(s) {', '.join(unknown)}; choose from {', '.join([*RUNS, *SIMS])}")
    if not args.report_only:
        for name in names:
            if name in SIMS:
                simulate(name, out)
            else:
                bench(name, out, args.num_prompts, args.max_new_tokens, args.repeats)
    report(out, [*RUNS, *SIMS])


if __name__ == "__main__":
    main()
