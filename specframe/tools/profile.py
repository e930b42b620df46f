"""``specframe profile``: this machine's verification latency table, for ``specframe simulate``.

A profile is ``{"points": [{"n", "c", "ms_median", "ms_min", "ms_max", "host_ms_median"}, ...]}``: the
seconds of verifying an n-token tree on top of c cached tokens, and the host's bookkeeping after it. The
``profile`` cost model reads it; the simulator charges it per forward and per tree node.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..clock import Clock, real_clock
from ..errors import SpecframeError
from ..registry import Registry
from ..tree import Tree


def host_table(profile: Path):
    """n → seconds of the target-side bookkeeping of an n-node tree (median over the profile's contexts),
    or None when the profile has no ``host_ms_median`` column (e.g. a device profile)."""
    points = json.loads(Path(profile).read_text())["points"]
    if not all("host_ms_median" in q for q in points):
        return None
    ns = sorted({int(q["n"]) for q in points})
    med = [float(np.median([q["host_ms_median"] for q in points if int(q["n"]) == n])) / 1000 for n in ns]
    med = list(np.maximum.accumulate(med))  # non-decreasing in n
    return lambda n: float(np.interp(n, ns, med))



def measure_profile(target, ns: list[int], contexts: list[int], repeats: int, out: Path,
                    clock: Clock = real_clock, registry: Registry | None = None) -> Path:
    """Median verify latency of chain trees of n tokens at context c on this machine (profile JSON), and
    the host's bookkeeping after each forward (verifying the logits, keeping the path: ``host_ms_median``).

    Points are measured round-robin — every (c, n) once per round, ``repeats`` rounds after a discarded
    warm-up round — so a drift of the machine (another process, clock changes) spreads over all points
    instead of skewing the ones measured during it."""
    if max(contexts) + max(ns) > target.max_context:
        raise SpecframeError(f"context {max(contexts)} + n {max(ns)} exceeds the target's context ({target.max_context})")
    sessions = {}
    for c in contexts:
        sessions[c] = target.start()
        sessions[c].prefill([0] * c)
    trees = {n: Tree.from_lists([0] * n, list(range(-1, n - 1))) for n in ns}
    verifier = (registry or Registry()).build("verifier", "greedy", {})
    times: dict[tuple[int, int], list[float]] = {(n, c): [] for c in contexts for n in ns}
    host: dict[tuple[int, int], list[float]] = {(n, c): [] for c in contexts for n in ns}
    for rnd in range(repeats + 1):
        for c in contexts:
            for n in ns:
                target.synchronize()
                t0 = clock()
                fwd = sessions[c].verify(trees[n])
                target.synchronize()
                t1 = clock()
                # the engine's bookkeeping of an n-node tree after the forward: verify the logits, keep the path
                path = verifier.verify(trees[n], fwd.logits, None).path
                sessions[c].keep(path, n)
                t2 = clock()
                if rnd:  # round 0 warms every shape up
                    times[(n, c)].append(t1 - t0)
                    host[(n, c)].append(t2 - t1)
                sessions[c].truncate(c)
    points = []
    for (n, c), ts in times.items():
        ts, hs = sorted(ts), sorted(host[(n, c)])
        points.append({"n": n, "c": c, "ms_median": 1000 * ts[len(ts) // 2], "ms_min": 1000 * ts[0],
                       "ms_max": 1000 * ts[-1], "host_ms_median": 1000 * hs[len(hs) // 2]})
    out.write_text(json.dumps({"model": target.name, "dtype": str(target.dtype), "device": str(target.device),
                               "repeats": repeats, "points": points}, indent=2))
    return out
