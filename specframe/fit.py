"""Small numeric helpers shared by plugins."""

from __future__ import annotations

import numpy as np


def isotonic(y, w=None) -> np.ndarray:
    """Weighted pool-adjacent-violators: the non-decreasing sequence closest to ``y`` in weighted L2."""
    y = np.asarray(y, dtype=float)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=float)
    blocks: list[list[float]] = []  # [mean, weight, length]
    for v, wt in zip(y.tolist(), w.tolist()):
        blocks.append([v, wt, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([[m] * n for m, _, n in blocks]) if blocks else y


class HostCost:
    """Host seconds of a step besides drafting and the forward — building, verifying and keeping the tree,
    the observers — as ``fixed + per_node · n``: an exponentially weighted least-squares line through the
    recent steps' measured seconds against their tree sizes. The slope is never negative, and while the
    recent sizes hardly vary (nothing to fit a slope on) the last identified slope is kept. Until a slope
    has been identified, big trees (``big`` nodes or more, whose fixed part is small beside the nodes')
    give the seconds per node directly — a policy that fills every tree to its budget while it believes
    nodes cost the host nothing would otherwise never vary its sizes, and never learn that they do."""

    def __init__(self, decay: float = 0.95, min_variance: float = 1.0, big: int = 32):
        self.decay, self.min_variance, self.big = decay, min_variance, big
        self.w = self.sn = self.sy = self.snn = self.sny = 0.0  # weighted sums of 1, n, y, n², n·y
        self._slope: float | None = None
        self._ratio = 0.0  # mean seconds per node of big trees, the stand-in until a slope is identified

    def observe(self, n: int, seconds: float) -> None:
        if not (seconds >= 0 and np.isfinite(seconds)):
            return
        d = self.decay
        self.w, self.sn, self.sy = d * self.w + 1.0, d * self.sn + n, d * self.sy + seconds
        self.snn, self.sny = d * self.snn + n * n, d * self.sny + n * seconds
        mean_n = self.sn / self.w
        var = self.snn / self.w - mean_n * mean_n
        if var >= self.min_variance:
            self._slope = max(0.0, (self.sny / self.w - mean_n * self.sy / self.w) / var)
        elif n >= self.big:
            self._ratio = seconds / n if not self._ratio else 0.8 * self._ratio + 0.2 * seconds / n

    @property
    def per_node(self) -> float:
        return self._slope if self._slope is not None else self._ratio

    @property
    def fixed(self) -> float:
        if not self.w:
            return 0.0
        return max(0.0, (self.sy - self.per_node * self.sn) / self.w)


class StepCosts:
    """What a generator learns across its steps about a step's seconds besides the forward, for BASTION's
    stopping rule: the drafting seconds of a drafted step (moving average) plus the host's fixed part
    (``fixed_seconds``, the rule's D) and the host's seconds per tree node (``per_node``). The engine
    keeps one per generator; the simulator keeps one per replayed method, so both learn alike."""

    def __init__(self):
        self.draft_ema = 0.0
        self.host = HostCost()

    def observe(self, n: int, draft_s: float, overhead_s: float) -> None:
        """A drafted step: its tree size, drafting seconds and other host seconds."""
        ema = self.draft_ema
        self.draft_ema = 0.8 * ema + 0.2 * draft_s if ema else draft_s
        self.host.observe(n, overhead_s)

    @property
    def fixed_seconds(self) -> float:
        return self.draft_ema + self.host.fixed

    @property
    def per_node(self) -> float:
        return self.host.per_node
