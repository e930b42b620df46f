"""What the llama.cpp backend's ``fast`` mode costs in exactness, and what ``exact`` mode costs in speed
(a benchmark, not a test: run it alone on the machine).

For every prompt, the truth is the backend's own plain greedy decoding in ``exact`` mode (``ar``). Each
policy then runs in ``exact`` and in ``fast`` mode, interleaved per prompt. A run *diverges* at the first
token that differs from the truth (after that the continuations are different texts, so only the first
divergence of a prompt counts). The divergence rate is divergences per 10,000 tokens generated up to and
including each prompt's first divergence (tokens at risk). Exact mode must never diverge.

    python scripts/llamacpp_divergence.py --num-prompts 40 -n 128 --policies bastion,best-first:16@ngram \\
        --out docs/bench/cpu-llamacpp/divergence.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from specframe import SpecGenerator, datasets
from specframe.backends import load_target


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (a length difference counts at the shorter length), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def tally(rows: list[dict]) -> dict:
    at_risk = sum(r["at_risk"] for r in rows)
    diverged = sum(r["diverged_at"] is not None for r in rows)
    tokens = sum(r["new_tokens"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    return {"prompts": len(rows), "diverged_prompts": diverged, "tokens_at_risk": at_risk,
            "divergences_per_10k_tokens": round(1e4 * diverged / at_risk, 2) if at_risk else None,
            "tokens_per_s": round(tokens / wall, 2) if wall else None,
            "tau": round(sum(r["tau"] * r["steps"] for r in rows) / max(1, sum(r["steps"] for r in rows)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mt-bench,humaneval,sharegpt")
    ap.add_argument("--num-prompts", type=int, default=20, help="per dataset")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=128)
    ap.add_argument("--policies", default="bastion,best-first:16@ngram,best-first:32@ngram")
    ap.add_argument("--modes", default="exact,fast")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/llamacpp_divergence.json"))
    args = ap.parse_args()

    modes = [m.strip() for m in args.modes.split(",")]
    targets = {mode: load_target(None, "llama.cpp", options={"mode": mode, "threads": args.threads})
               for mode in dict.fromkeys(["exact", *modes])}  # exact mode's ar is the truth
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    gens = {(mode, p): SpecGenerator(targets[mode], p.partition("@")[0], drafter=p.partition("@")[2] or None)
            for mode in modes for p in policies}
    truth_gen = SpecGenerator(targets["exact"], "ar")
    prompts = [q for name in args.dataset.split(",") for q in datasets.load(name.strip(), args.num_prompts)]
    for gen in [truth_gen, *gens.values()]:  # warm-up
        gen.generate(datasets.encode(prompts[0], gen.target), 8)
    rows = []
    for k, prompt in enumerate(prompts):
        ids = datasets.encode(prompt, targets["exact"])
        truth = truth_gen.generate(ids, args.max_new_tokens)
        for (mode, policy), gen in gens.items():
            start = time.perf_counter()
            out = gen.generate(ids, args.max_new_tokens)
            wall = time.perf_counter() - start
            at = first_difference(out.token_ids, truth.token_ids)
            rows.append({"dataset": prompt.dataset, "prompt_id": prompt.id, "mode": mode, "policy": policy,
                         "new_tokens": len(out.token_ids), "wall_s": wall, "diverged_at": at,
                         "at_risk": len(out.token_ids) if at is None else at + 1,
                         "tau": out.stats.tau, "steps": out.stats.steps})
        rows.append({"dataset": prompt.dataset, "prompt_id": prompt.id, "mode": "exact", "policy": "ar",
                     "new_tokens": truth.stats.new_tokens, "wall_s": truth.stats.wall_s, "diverged_at": None,
                     "at_risk": truth.stats.new_tokens, "tau": 1.0, "steps": truth.stats.steps})
        print(f"{k + 1}/{len(prompts)} {prompt.dataset} {prompt.id}: "
              + " ".join(f"{r['mode']}:{r['policy']}={r['diverged_at']}" for r in rows[-len(gens) - 1:-1]), flush=True)
    summary = {"machine": f"{platform.processor() or platform.machine()} · {targets['exact'].describe()}",
               "settings": vars(args) | {"out": str(args.out)},
               "by_mode_policy": {f"{m}:{p}": tally([r for r in rows if (r["mode"], r["policy"]) == (m, p)])
                                  for m, p in dict.fromkeys((r["mode"], r["policy"]) for r in rows)},
               "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    for key, t in summary["by_mode_policy"].items():
        print(f"{key:32s} {t}")


if __name__ == "__main__":
    main()
