"""The one clock every timed decision reads.

A clock is any zero-argument callable returning seconds as a float (monotonic, arbitrary origin).
The engine, the draft gates, the hybrid drafter, the cost models' calibration and the simulator all read
the clock they were given — :func:`real_clock` by default — so a test can drive them with a
:class:`ManualClock` and assert exact behaviour without sleeping or depending on how busy the machine is.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds since an arbitrary fixed origin; never decreasing."""


real_clock: Clock = time.perf_counter


class ManualClock:
    """A clock that only moves when told to: ``clock.advance(0.02)``."""

    def __init__(self, start: float = 0.0):
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"a clock cannot go back ({seconds!r} s)")
        self.now += seconds
