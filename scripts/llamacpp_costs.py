"""Verification cost on the llama.cpp backend (a benchmark, not a test: run it alone on the machine).

For tree sizes n and contexts c, the median time of one ``verify`` of an n-node random tree (depth ≤ 8)
after c cached tokens, in three settings of the embedded SmolLM2 Q4_1 GGUF, interleaved per repeat:

* ``exact``: exact mode (each root-to-leaf path in place; 16-row calls up to a 256-token cache, one row
  per call beyond);
* ``fast``: fast mode (one call of up to 512 rows);
* ``exact+features``: exact mode with the eval callback copying out the hidden states the shipped block
  drafter reads (what ``bastion``'s hybrid drafter costs the target's forward).

Each timing is verify + rollback, so every repeat starts from the same cache.

    python scripts/llamacpp_costs.py --contexts 128,384 --out docs/bench/cpu-llamacpp/verify_costs.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from specframe.backends import load_target
from specframe.tree import Tree


def random_tree(rng: random.Random, n: int, vocab: int) -> Tree:
    """n nodes, each a child of a random earlier node (depth ≤ 8), random tokens."""
    parents, depth = [-1], [0]
    while len(parents) < n:
        p = rng.randrange(len(parents))
        if depth[p] < 8:
            parents.append(p)
            depth.append(depth[p] + 1)
    return Tree.from_lists([rng.randrange(100, vocab) for _ in range(n)], parents)


def time_verify(session, tree: Tree) -> float:
    start = time.perf_counter()
    session.verify(tree)
    session.target.synchronize()
    elapsed = time.perf_counter() - start
    session.rollback(tree.size)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--contexts", default="128,384")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--layers", default="1,14,28", help="feature layers (the shipped drafter's)")
    ap.add_argument("--out", type=Path, default=Path("runs/llamacpp_costs.json"))
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    layers = tuple(int(x) for x in args.layers.split(","))
    exact, fast = (load_target(None, "llama.cpp", options={"mode": m}) for m in ("exact", "fast"))
    result = {"machine": exact.describe(), "repeats": args.repeats, "feature_layers": layers, "median_ms": {}}
    for context in (int(c) for c in args.contexts.split(",")):
        table = measure(exact, fast, layers, sizes, context, args.repeats)
        result["median_ms"][context] = table
        print(f"context {context}".ljust(22) + "".join(f"{n:>9}" for n in sizes))
        for name, row in table.items():
            print(f"  {name}".ljust(22) + "".join(f"{row[n]:9.1f}" for n in sizes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


def measure(exact, fast, layers, sizes, context: int, repeats: int) -> dict[str, dict[int, float]]:
    rng = random.Random(context)
    prefix = [rng.randrange(100, exact.vocab_size) for _ in range(context)]
    sessions = {"exact": exact.start(), "fast": fast.start(), "exact+features": exact.start(layers)}
    for s in sessions.values():
        s.prefill(prefix)
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in sizes} for k in sessions}
    for _ in range(repeats):
        for n in sizes:
            tree = random_tree(rng, n, exact.vocab_size)
            for name, session in sessions.items():
                times[name][n].append(time_verify(session, tree))
    return {name: {n: round(1000 * statistics.median(v), 2) for n, v in by_n.items()} for name, by_n in times.items()}


if __name__ == "__main__":
    main()
