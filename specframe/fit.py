"""Small numeric helpers shared by plugins."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import isotonic_regression, nnls


def isotonic(y, w=None) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in weighted L2 (weights ``w`` > 0, default 1):
    :func:`scipy.optimize.isotonic_regression` (pool adjacent violators)."""
    y = np.asarray(y, dtype=float)
    if y.size == 0:
        return y
    weights = None if w is None else np.asarray(w, dtype=float)
    return isotonic_regression(y, weights=weights, increasing=True).x


def relative_huber_loss(a: float, b: float, x, t, w, delta: float = 0.1) -> float:
    """Σ wᵢ·huber_δ(rᵢ) with rᵢ = (a·xᵢ + b − tᵢ) / tᵢ, the relative error of the line a·x + b, and
    huber_δ(r) = r²/2 for |r| ≤ δ, δ·(|r| − δ/2) beyond: what :func:`robust_line` minimises."""
    x, t, w = (np.asarray(v, dtype=float) for v in (x, t, w))
    r = np.abs((a * x + b - t) / t)
    return float(np.sum(w * np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))))


def robust_line(x, t, w, prior: tuple[float, float] = (1.0, 0.0), delta: float = 0.1, max_iter: int = 50,
                tol: float = 1e-6) -> tuple[float, float]:
    """The line t ≈ a·x + b with a, b ≥ 0 that minimises :func:`relative_huber_loss` (times ``t`` > 0,
    weights ``w`` > 0): iteratively reweighted least squares from ``prior``, each step an exact
    non-negative least-squares solve (:func:`scipy.optimize.nnls`), until no prediction moves by more
    than ``tol`` of its time. Huber's IRLS weights majorise the loss, so every step lowers it; a warm
    ``prior`` (the last fit) converges in a few steps.

    With fewer than two distinct ``x`` the slope is not identified: it stays ``prior[0]`` and only the
    intercept is fitted (a weighted mean, clipped at 0). No points: ``prior``."""
    x, t, w = (np.asarray(v, dtype=float) for v in (x, t, w))
    if len(x) == 0:
        return float(prior[0]), float(prior[1])
    if len(x) < 2 or np.ptp(x) <= 1e-12 * max(abs(x).max(), 1e-30):
        a = float(prior[0])
        return a, max(float(np.average(t - a * x, weights=w)), 0.0)
    design = np.column_stack([x / t, 1.0 / t])  # design @ (a, b) - 1 = relative residuals
    p = np.maximum(np.asarray(prior, dtype=float), 0.0)
    for _ in range(max_iter):
        rel = np.abs(design @ p - 1.0)
        s = np.sqrt(w * np.minimum(1.0, delta / np.maximum(rel, 1e-12)))
        new, _ = nnls(design * s[:, None], s)
        moved = float(np.abs(design @ (new - p)).max())  # change of the relative predictions
        p = new
        if moved <= tol:
            break
    return float(p[0]), float(p[1])


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
        if not (seconds >= 0 and math.isfinite(seconds)):
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
