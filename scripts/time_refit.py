"""Time the roofline's online refit per decoding step: scipy's fit (specframe.fit.robust_line) against the
hand-written one it replaced (tests/test_fit.py: LegacyRoofline), on the recorded SmolLM2 CPU steps.

    python scripts/time_refit.py [--refits 1000] [--window 256]

Each roofline is streamed the recorded steps (cycled) as a generator would observe them; it refits every
``refit_every`` (4) observations. Reported (best of ``--repeat`` runs): the mean seconds per refit and
per observed step once the window is full (steady state, observe() included), and one cold refit of a
full window from the initial lines. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import cycle
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_fit import LegacyRoofline, recorded_steps, smollm2_roofline  # noqa: E402

from specframe.plugins.cost_models import Roofline  # noqa: E402


def per_step(cls, refits: int, window: int) -> tuple[float, float, float]:
    """(seconds per refit, seconds per observed step, seconds of a cold refit on a full window)."""
    roof = smollm2_roofline(cls)
    roof.obs = type(roof.obs)(maxlen=window)
    _, steps = recorded_steps()
    stream = cycle(steps)
    for _ in range(len(steps)):  # once through: the window is full (steady state from here on)
        roof.observe(*next(stream))
    assert len(roof.obs) == window
    cold = smollm2_roofline(cls)  # the initial lines, a full window: the worst case (happens once)
    cold.obs = type(roof.obs)(list(roof.obs), maxlen=window)
    t0 = time.perf_counter()
    cold.refit()
    cold_s = time.perf_counter() - t0
    batch = [next(stream) for _ in range(refits * roof.refit_every)]
    t0 = time.perf_counter()
    for n, c, s in batch:
        roof.observe(n, c, s)
    total = time.perf_counter() - t0
    return total / refits, total / len(batch), cold_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refits", type=int, default=1000)
    parser.add_argument("--window", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeat", type=int, default=5, help="best of this many runs (the machine is shared)")
    args = parser.parse_args()
    print(f"{'fit':<12} {'window':>6} {'per refit':>11} {'per step':>10} {'cold refit':>11}")
    for window in args.window:
        for name, cls in (("hand-written", LegacyRoofline), ("scipy", Roofline)):
            per_step(cls, 50, window)  # warm up imports and caches
            runs = [per_step(cls, args.refits, window) for _ in range(args.repeat)]
            refit, step, cold = (min(r[k] for r in runs) for k in range(3))
            print(f"{name:<12} {window:>6} {refit * 1e6:>8.0f} µs {step * 1e6:>7.0f} µs {cold * 1e6:>8.0f} µs")


if __name__ == "__main__":
    main()
