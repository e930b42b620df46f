"""Built-in cost models: ``constant``, ``roofline`` (calibrated online) and ``profile`` (measured tables).

A cost model predicts the seconds of verifying ``n`` tree tokens on top of ``c`` cached tokens.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import numpy as np

from specframe import hookimpl
from specframe import fit
from specframe.fit import isotonic
from specframe.components import CostModel
from specframe.backends import ModelShape
from specframe.errors import SpecframeError


class ConstantCost(CostModel):
    """C(n; c) = ``seconds`` for every n and c. Useful as a baseline and for tests."""

    name = "constant"

    def __init__(self, seconds: float = 0.1):
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        self.seconds = float(seconds)

    def predict(self, n: int, context: int) -> float:
        return self.seconds


# ---------------------------------------------------------------------- roofline
# (peak dense FLOP/s at the model's dtype, memory bandwidth bytes/s); alpha absorbs what these miss.
DEVICES = {
    "cpu": (1.0e11, 2.0e10),
    "h200": (989e12, 4.8e12),
    "h100": (989e12, 3.35e12),
    "a100": (312e12, 2.0e12),
    "l40s": (362e12, 0.864e12),
    "a10g": (125e12, 0.6e12),
    "rtx4090": (165e12, 1.0e12),
    "gpu": (100e12, 1.0e12),
}


class Roofline(CostModel):
    """C(n; c) = max(α_c·FLOPs/peak + β_c, α_m·Bytes/BW + β_m), calibrated online.

    Seeded at start-up by a few timed forwards (``calibrate_sizes``), then refit from every measured
    verification: a robust (Huber, relative-error) non-negative fit of each branch on the points where it
    is the active one (:func:`specframe.fit.robust_line`), over a bounded window of recent observations
    with exponential forgetting, so it tracks the machine it runs on.

    Many runtimes run a single-token forward on a separate, faster path (matrix-vector kernels on a CPU,
    decode kernels on some GPUs), so the time of n = 1 is not on the lines fitted for n ≥ 2. With
    ``single_token=True`` (default) the n = 1 time is its own online estimate (a weighted median of the
    recent single-token timings) and the two lines are fitted on n ≥ 2 only; where the paths agree (a GPU
    in its memory-bound regime) the two estimates simply coincide.
    """

    name = "roofline"

    def __init__(self, target=None, device: str = "auto", peak_flops: float | None = None,
                 bandwidth: float | None = None, window: int = 256, half_life: float = 128.0,
                 refit_every: int = 4, calibrate_sizes: tuple[int, ...] = (1, 2, 4, 16, 64), config=None,
                 bytes_per_param: float | None = None, single_token: bool = True, branch_fit: str = "descent"):
        shape = getattr(target, "shape", None) if config is None else None
        config = config if config is not None else getattr(target, "config", None)
        if shape is None and config is None:
            raise ValueError("roofline needs the target's model shape (pass target= or config=)")
        if device == "auto":
            device = _device_kind(target)
        if device not in DEVICES and (peak_flops is None or bandwidth is None):
            raise ValueError(f"unknown device '{device}'; known: {', '.join(DEVICES)} (or give peak_flops and bandwidth)")
        peak, bw = DEVICES.get(device, (peak_flops, bandwidth))
        self.peak = float(peak_flops or peak)
        self.bandwidth = float(bandwidth or bw)
        if shape is not None:  # the backend's own FLOP/byte shape (e.g. a quantised GGUF's real bytes)
            self.shape = shape if bytes_per_param is None else shape.with_bytes(bytes_per_param)
        else:
            if bytes_per_param is None:
                dtype = getattr(target, "dtype", None)
                bytes_per_param = getattr(dtype, "itemsize", 2 if device != "cpu" else 4)
            self.shape = ModelShape.from_config(config, bytes_per_param)
        if window <= 0 or refit_every <= 0 or half_life <= 0:
            raise ValueError("window, refit_every and half_life must be positive")
        if branch_fit not in ("descent", "alternate"):
            raise ValueError(f"branch_fit must be 'descent' or 'alternate', got {branch_fit!r}")
        self.branch_fit = branch_fit
        self.alpha_c, self.beta_c, self.alpha_m, self.beta_m = 1.0, 0.0, 1.0, 0.0
        self.obs: deque = deque(maxlen=int(window))
        self.single_token = bool(single_token)
        # max of two lines in n is convex; a single-token path below them breaks that only at n = 1 → 2
        self.convex_from = 2 if self.single_token else 1
        self.single: deque = deque(maxlen=32)  # recent (seconds, context) timings at n = 1
        self.single_ratio: float | None = None
        self.refit_every, self.half_life = int(refit_every), float(half_life)
        self.calibrate_sizes = tuple(calibrate_sizes)
        self._pending = 0
        self._lines_stale = False  # observations of n >= 2 arrived since the last refit of the lines
        self._cache: dict[tuple[int, int], float] = {}

    def features(self, n: int, context: int) -> tuple[float, float]:
        return self.shape.flops(n, context) / self.peak, self.shape.bytes(n, context) / self.bandwidth

    def predict(self, n: int, context: int) -> float:
        key = (n, context)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._line(n, context)
            if n == 1 and self.single_ratio is not None:  # own path, never above the 2-token prediction
                hit = self.single_ratio * hit
                if self.obs:
                    hit = min(hit, self._line(2, context))
            self._cache[key] = hit
        return hit

    def _line(self, n: int, context: int) -> float:
        f, m = self.features(n, context)
        return max(self.alpha_c * f + self.beta_c, self.alpha_m * m + self.beta_m)

    def observe(self, n: int, context: int, seconds: float) -> None:
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        if n == 1 and self.single_token:
            self.single.append((float(seconds), context))
        else:
            self.obs.append((*self.features(n, context), float(seconds)))
            self._lines_stale = True
        self._pending += 1
        if self._pending >= self.refit_every:
            self.refit(lines=self._lines_stale)  # plain steps bring single-token timings only

    def calibrate(self, measure, context: int) -> None:
        for n in self.calibrate_sizes:
            self.observe(n, context, measure(n))
        self.refit()

    def refit(self, lines: bool = True) -> None:
        """Refit both branches on the observation window (alternating assignment, a few rounds), unless
        ``lines`` is false (their data did not change), then the single-token ratio."""
        self._pending, self._lines_stale = 0, False
        self._cache.clear()
        if not (self.obs and lines):
            self._refit_single()
            return
        arr = np.asarray(self.obs)
        f, m, t = arr[:, 0], arr[:, 1], arr[:, 2]
        age = np.arange(len(t))[::-1]
        w = 0.5 ** (age / self.half_life)
        params = (self.alpha_c, self.beta_c, self.alpha_m, self.beta_m)
        self.alpha_c, self.beta_c, self.alpha_m, self.beta_m = self.fit_branches(f, m, t, w, params)
        self._refit_single()

    def fit_branches(self, f: np.ndarray, m: np.ndarray, t: np.ndarray, w: np.ndarray,
                     params: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """(α_c, β_c, α_m, β_m) fitted to seconds ``t`` with weights ``w`` at compute features ``f`` and
        memory features ``m``, from ``params``: each point goes to the branch that is the larger under the
        current lines, each branch is fitted on its points (:func:`specframe.fit.robust_line`), and again
        until no point changes branch (at most 4 rounds).

        With ``branch_fit="descent"`` (default) a round keeps, of the new lines, the old ones and each new
        line beside the other old one, the pair of lowest loss on the whole window (the max of the two
        lines against ``t``), and stops when none is lower: the loss never rises. (An old line is kept beside a
        new one only once it has been fitted on data: the starting compute line predicts about nothing, and
        kept it would never take a point.) The plain alternation
        (``"alternate"``) can cycle between two poor pairs on a step-shaped curve — a flat curve with a
        step between n = 2 and n = 4, as GPU profiles have, left a compute line sloping up through sizes
        never observed (C(256) ≈ 1.6–2× C(16) where the device is flat), and returned whichever pair the
        fourth round reached."""
        if self.branch_fit == "alternate":
            assigned = None
            for _ in range(4):
                comp = params[0] * f + params[1] >= params[2] * m + params[3]
                if assigned is not None and np.array_equal(comp, assigned):
                    break  # the same points on each branch: the same fits again
                assigned = comp
                ac, bc = fit.robust_line(f[comp], t[comp], w[comp], params[:2])
                am, bm = fit.robust_line(m[~comp], t[~comp], w[~comp], params[2:])
                params = (ac, bc, am, bm)
            return params

        def loss(q: tuple[float, float, float, float]) -> float:
            pred = np.maximum(q[0] * f + q[1], q[2] * m + q[3])
            return fit.relative_huber_loss(1.0, 0.0, pred, t, w)

        best = loss(params)
        informed = getattr(self, "_informed", (False, False))  # has each line been fitted on data yet?
        for _ in range(4):
            comp = params[0] * f + params[1] >= params[2] * m + params[3]
            ac, bc = fit.robust_line(f[comp], t[comp], w[comp], params[:2])
            am, bm = fit.robust_line(m[~comp], t[~comp], w[~comp], params[2:])
            cands = [(ac, bc, am, bm)]
            # a new line beside the other old one, unless that old one is still the uninformed start (a
            # compute line never fitted predicts ~0, takes no point, and would then never be fitted)
            if informed[1]:
                cands.append((ac, bc, *params[2:]))
            if informed[0]:
                cands.append((*params[:2], am, bm))
            scored = min((loss(q), i, q) for i, q in enumerate(cands))
            if not scored[0] < best:
                break
            best, params = scored[0], scored[2]
            informed = (informed[0] or (scored[1] != 2 and int(comp.sum()) >= 2),
                        informed[1] or (scored[1] != 1 and int((~comp).sum()) >= 2))
        self._informed = informed
        return params

    def _refit_single(self) -> None:
        """n = 1: weighted median (recent first) of measured / line-predicted ratios, so the single-token
        estimate keeps the lines' dependence on the context."""
        if not self.single:
            self.single_ratio = None
            return
        ratios = np.array([t / max(self._line(1, c), 1e-12) for t, c in self.single])
        w = 0.5 ** (np.arange(len(ratios))[::-1] / 16.0)
        order = np.argsort(ratios)
        cum = np.cumsum(w[order])
        self.single_ratio = float(ratios[order][np.searchsorted(cum, cum[-1] / 2)])

    def parameters(self) -> dict:
        out = {"alpha_c": self.alpha_c, "beta_c": self.beta_c, "alpha_m": self.alpha_m, "beta_m": self.beta_m}
        if self.single_ratio is not None:
            out["single_token_ratio"] = self.single_ratio
        return out


def _device_kind(target) -> str:
    device = getattr(target, "device", None)
    if device is None or getattr(device, "type", "cpu") != "cuda":
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(device).lower()
    return next((k for k in DEVICES if k in name.replace(" ", "")), "gpu")


# ---------------------------------------------------------------------- measured profiles
class ProfileCost(CostModel):
    """Reads a measured table ``{"points": [{"n", "c", "ms_median"}, ...]}`` and interpolates linearly
    in n and c. Noise is smoothed by an isotonic (non-decreasing in n) fit per context. Contexts below the
    table use its smallest context; n or c above it are an error naming the covered range."""

    name = "profile"

    def __init__(self, path: str | None = None, scale: float = 1.0):
        if path is None:
            raise ValueError("the profile cost model needs a table: --set cost_model.path=FILE.json")
        p = Path(path)
        if not p.is_file():
            raise SpecframeError(f"profile file not found: {p}")
        try:
            points = json.loads(p.read_text())["points"]
            rows = [(int(q["n"]), int(q["c"]), float(q["ms_median"]) / 1000.0) for q in points]
        except (KeyError, TypeError, ValueError) as err:
            raise SpecframeError(f"profile {p} is not a table of {{n, c, ms_median}} points: {err}") from err
        self.path = p
        self.ns = sorted({r[0] for r in rows})
        self.cs = sorted({r[1] for r in rows})
        table = {(n, c): s * scale for n, c, s in rows}
        missing = [(n, c) for n in self.ns for c in self.cs if (n, c) not in table]
        if missing:
            raise SpecframeError(f"profile {p} has no point for n={missing[0][0]}, c={missing[0][1]}")
        self.grid = np.array([[table[(n, c)] for n in self.ns] for c in self.cs])  # (C, N)
        self.grid = np.stack([isotonic(row) for row in self.grid])
        self.max_tokens = self.ns[-1]  # the engine keeps trees within the table

    def predict(self, n: int, context: int) -> float:
        if n > self.ns[-1] or context > self.cs[-1]:
            raise SpecframeError(
                f"profile {self.path.name} covers n ≤ {self.ns[-1]} and c ≤ {self.cs[-1]}; asked for n={n}, c={context}"
            )
        per_c = [float(np.interp(n, self.ns, row)) for row in self.grid]
        return float(np.interp(context, self.cs, per_c))


@hookimpl
def register_cost_models(register):
    register("constant", ConstantCost)
    register("roofline", Roofline)
    register("profile", ProfileCost)
