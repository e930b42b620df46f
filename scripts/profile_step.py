"""Where a decoding step's time goes on the llama.cpp backend: llama.cpp's own work (``llama_decode``)
against everything else (tree building, bookkeeping, the binding's Python), per generated token, for
specframe's policies beside llama-cpp-python's own generation loop on the same GGUF.

    python scripts/profile_step.py [--policies ar,bastion,llama-cpp] [-n 96] [--repeats 3] [--profile bastion]

Every ``llama_decode`` call (specframe's and the peer's alike) is timed by wrapping the binding's function;
the rest of the wall time is the host's. With ``--profile METHOD`` a cProfile of that method's host side
follows (functions sorted by own time; llama_decode itself is excluded). Run it alone on the machine."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import llama_cpp

from specframe import SpecGenerator
from specframe.backends import load_target
from specframe.datasets import load as load_prompts, encode

DECODE = {"s": 0.0, "calls": 0, "batch_s": 0.0}  # batch_s: calls of more than one token (the prompt)
_real_decode = llama_cpp.llama_decode


def _timed_decode(ctx, batch):
    start = time.perf_counter()
    try:
        return _real_decode(ctx, batch)
    finally:
        spent = time.perf_counter() - start
        DECODE["s"] += spent
        DECODE["calls"] += 1
        if batch.n_tokens > 1:
            DECODE["batch_s"] += spent


# the backend calls it through the package, llama-cpp-python's own loop through its llama_cpp submodule
llama_cpp.llama_decode = llama_cpp.llama_cpp.llama_decode = _timed_decode


def runner(target, label):
    if label in getattr(target, "peer_names", ()):
        run = target.peer(label)
        return lambda ids, n: run(ids, n)
    gen = SpecGenerator(target, label)
    return lambda ids, n: gen.generate(ids, n).token_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="ar,bastion,llama-cpp")
    ap.add_argument("--datasets", default="mt-bench,humaneval")
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", default=None, help="cProfile this method's host side afterwards")
    ap.add_argument("--mode", default="exact")
    args = ap.parse_args()
    target = load_target(None, "llama.cpp", options={"mode": args.mode})
    labels = args.policies.split(",")
    runs = {lab: runner(target, lab) for lab in labels}
    prompts = [encode(p, target) for name in args.datasets.split(",") for p in load_prompts(name, args.num_prompts)]
    for run in runs.values():
        run(prompts[0], 8)  # warm-up
    per = {lab: {"wall": [], "decode": [], "calls": [], "tokens": [], "batch": []} for lab in labels}
    for _ in range(args.repeats):
        for ids in prompts:
            for lab, run in runs.items():  # interleaved
                DECODE.update(s=0.0, calls=0, batch_s=0.0)
                start = time.perf_counter()
                out = run(ids, args.max_new_tokens)
                wall = time.perf_counter() - start
                row = per[lab]
                row["wall"].append(wall), row["decode"].append(DECODE["s"])
                row["calls"].append(DECODE["calls"]), row["tokens"].append(len(out))
                row["batch"].append(DECODE["batch_s"])
    print("ms per generated token: all of it, in llama_decode (prompt batches apart) and on the host")
    print(f"{'method':<16} {'tok/s':>7} {'ms/token':>9} {'prompt':>7} {'decode':>8} {'host':>7} {'host %':>7} {'decodes/token':>14}")
    for lab, row in per.items():
        tokens = sum(row["tokens"])
        ms = lambda key: 1000 * sum(row[key]) / tokens  # noqa: E731
        wall_ratio = statistics.median(w / t for w, t in zip(row["wall"], row["tokens"]))
        host = ms("wall") - ms("decode")
        print(f"{lab:<16} {1 / wall_ratio:7.1f} {ms('wall'):9.3f} {ms('batch'):7.3f} {ms('decode') - ms('batch'):8.3f} {host:7.3f} "
              f"{100 * host / ms('wall'):6.1f}% {sum(row['calls']) / tokens:14.2f}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for ids in prompts:
            runs[args.profile](ids, args.max_new_tokens)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
