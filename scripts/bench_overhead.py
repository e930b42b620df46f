"""Fixed costs of specframe's loop, measured (a benchmark, not a test): run it alone on the machine.

1. a ``generate(ids, max_new_tokens=3, temperature=1)`` call on a 2-layer, 32-wide random Llama: the call's
   time beside its verification forwards (what is not the model's own work);
2. one tree forward of the embedded SmolLM2 (``TargetSession.verify``) at n = 1 and n = 16 tree tokens beside
   a bare ``model(input_ids)`` call on the same tokens with the same cache length;
3. the observer hooks' cost per step through pluggy's hook caller, beside a step's time.

    python scripts/bench_overhead.py [--repeats 30] [--skip-real]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def med_ms(values) -> float:
    return 1000 * statistics.median(values)


def tiny_generate(repeats: int) -> dict:
    from conftest import TinyTokenizer, make_tiny_model

    from specframe import SpecGenerator, Target

    model = make_tiny_model("llama")
    target = Target(model, TinyTokenizer(), name="tiny")
    ids = [3, 14, 15, 9, 2, 6, 5, 3]
    gen = SpecGenerator(target, "bastion")
    gen.generate(ids, max_new_tokens=3, temperature=1, seed=0)  # calibrates once per generator
    calls, forwards = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = gen.generate(ids, max_new_tokens=3, temperature=1, seed=0)
        calls.append(time.perf_counter() - t0)
        forwards.append(out.stats.prefill_s + sum(r.verify_s for r in out.stats.records))
    return {"generate_ms": med_ms(calls), "forwards_ms": med_ms(forwards),
            "fixed_ms": med_ms([c - f for c, f in zip(calls, forwards)])}


def real_forward(repeats: int, context: int = 256) -> dict:
    from specframe import Target
    from specframe.plugins.hf import quiet_transformers
    from specframe.tree import Tree

    quiet_transformers()
    target = Target.load(None)
    model = target.model
    out = {}
    for n in (1, 16):
        session = target.start()
        session.prefill(list(range(100, 100 + context)))
        tree = Tree.from_lists(list(range(200, 200 + n)), list(range(-1, n - 1)))  # a chain of n tokens
        cache = target.make_cache()
        with torch.inference_mode():
            model(input_ids=torch.tensor([list(range(100, 100 + context))]), use_cache=True,
                  **{target.cache_keyword: cache})
        ours, bare = [], []
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            session.verify(tree)
            t1 = time.perf_counter()
            session.rollback(n)
            with torch.inference_mode():
                t2 = time.perf_counter()
                model(input_ids=tree.tokens[None], use_cache=True, **{target.cache_keyword: cache})
                t3 = time.perf_counter()
            cache.crop(-n)
            ours.append(t1 - t0)
            bare.append(t3 - t2)
        ours, bare = ours[2:], bare[2:]
        out[n] = {"verify_ms": med_ms(ours), "bare_ms": med_ms(bare),
                  "overhead_ms": med_ms([a - b for a, b in zip(ours, bare)])}
    return out


def observer_cost(repeats: int) -> dict:
    import pluggy

    from specframe import hookimpl, make_plugin_set
    from specframe.components import StepRecord
    from specframe.engine import Observers

    class Watch:
        @hookimpl
        def on_step_end(self, record, step):
            pass

    record = StepRecord(4, 2, 3, 100, 0.0, 0.0, 0.0)
    res = {}
    for label, extra in (("no observer", []), ("one observer", [Watch()])):
        observers = Observers(make_plugin_set(allow=set(), extra=extra).pm)
        t0 = time.perf_counter()
        for i in range(repeats * 1000):
            observers.step_end(record, i)
        res[label] = 1e6 * (time.perf_counter() - t0) / (repeats * 1000)  # µs per step
    res["pluggy"] = pluggy.__version__
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip-real", action="store_true", help="skip the SmolLM2 part (loads the embedded model)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tiny = tiny_generate(args.repeats)
    print(f"tiny Llama generate(3 tokens, T=1): {tiny['generate_ms']:.2f} ms per call, of which forwards "
          f"{tiny['forwards_ms']:.2f} ms; fixed cost {tiny['fixed_ms']:.2f} ms")
    obs = observer_cost(args.repeats)
    print(f"observer hooks per step (pluggy {obs['pluggy']}): none {obs['no observer']:.2f} µs, "
          f"one observer {obs['one observer']:.2f} µs")
    if not args.skip_real:
        for n, r in real_forward(args.repeats).items():
            print(f"SmolLM2 tree forward n={n:>2} at context 256: verify {r['verify_ms']:.2f} ms, bare model() "
                  f"{r['bare_ms']:.2f} ms, host overhead {r['overhead_ms']:.2f} ms")


if __name__ == "__main__":
    main()
