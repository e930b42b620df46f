"""Built-in acceptance surrogates: ``path-confidence`` and ``calibrated``.

``path-confidence``: P(v) = product of the drafter's probabilities along root→v, so E[L] = Σ_v P(v).

``calibrated``: the same product, but each factor q is replaced by how often nodes of that confidence
(binned: ``bins`` equal bins, the lowest one split further at ``low_edges`` so that the long tail of
unlikely candidates a big tree reaches is not priced like a q = 0.05 one), depth and draft source were
*really* accepted when their parent was — learned online from
every verification, monotone in q (isotonic), with a Beta prior centred on q itself so it starts out
equal to ``path-confidence``. A depth with no statistics yet borrows the nearest shallower depth's rates
(deep nodes are only ever observed once their parents get accepted).
"""

from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np

from specframe import hookimpl
from specframe.fit import isotonic
from specframe.components import AcceptanceSurrogate, Candidate
from specframe.tree import Tree


class PathConfidence(AcceptanceSurrogate):
    """P(child) = P(parent) · q(child). Expected accepted length E[L] = Σ_v P(v)."""

    name = "path-confidence"

    def score(self, parent_p: float, depth: int, cand: Candidate) -> float:
        return parent_p * math.exp(cand.logq)


class Calibrated(AcceptanceSurrogate):
    """P(child) = P(parent) · r(source, depth, first, bin(q)), r = online acceptance rate given the parent.

    ``first``: whether the node is its parent's best-ranked child. A drafter's first choice and its others
    are accepted at very different rates at the same q (a 4-bit copy of the target is right about its top
    token far more often than its probability says; its runners-up are rarely right), so each has its
    own table, and a candidate whose rank is not known uses the table of both.

    Tables are shrunk hierarchically: a depth's table starts from (its prior is) the table of every depth
    together, which starts from the bin centres (q itself). A depth that few trees reach thus borrows what
    the shallower ones measured instead of assuming q — a deep chain of a drafter that is right more often
    than its q says is not cut short for want of observations at that depth."""

    name = "calibrated"

    def __init__(self, bins: int = 10, max_depth_bucket: int = 8, prior: float = 2.0, decay: float = 0.999,
                 low_edges: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)):
        if bins <= 0 or max_depth_bucket <= 0 or prior <= 0 or not 0 < decay <= 1:
            raise ValueError("bins, max_depth_bucket and prior must be positive and decay in (0, 1]")
        if any(not 0 < e < 1 for e in low_edges):
            raise ValueError(f"low_edges must lie in (0, 1), got {low_edges}")
        linear = np.arange(bins + 1) / bins
        self.edges = np.unique(np.concatenate([[e for e in low_edges if e < linear[1]], linear]))
        self.bins, self.max_depth, self.prior, self.decay = len(self.edges) - 1, max_depth_bucket, prior, decay
        self.centres = (self.edges[:-1] + self.edges[1:]) / 2
        self._edges = self.edges.tolist()  # the hot loop bisects a plain list
        self.hits: dict[tuple[int, int], np.ndarray] = {}
        self.counts: dict[tuple[int, int], np.ndarray] = {}
        self.rates: dict[tuple[int, int], list[float]] = {}

    def _bin(self, q: float) -> int:
        return min(bisect_right(self._edges, q) - 1, self.bins - 1)

    def rate(self, source: int, depth: int, q: float, first: bool | None = None) -> float:
        """The calibrated conditional acceptance probability of a node with draft probability q (``first``:
        whether it is its parent's best-ranked child; None: not known)."""
        for d in range(min(depth, self.max_depth), 0, -1):  # unseen depth: borrow the nearest shallower one
            table = self.rates.get((source, d, first)) if first is not None else None
            table = table if table is not None else self.rates.get((source, d))
            if table is not None:
                return table[self._bin(q)]
        return q

    def score(self, parent_p: float, depth: int, cand: Candidate) -> float:
        rank = getattr(cand, "rank", -1)
        return parent_p * self.rate(cand.source, depth, math.exp(cand.logq), None if rank < 0 else rank == 0)

    def observe(self, tree: Tree, accepted: list[int], scores: list[float]) -> None:
        if tree.size <= 1:
            return  # the root alone: nothing was drafted
        on_path = set(accepted)
        parents = tree.parent_list
        depths = tree.depth_list
        q = [math.exp(x) for x in tree.logq_list]
        sources = tree.source_list or [0] * tree.size
        best: dict[int, int] = {}  # parent -> its child of highest q in the tree (its best-ranked child)
        for i in range(1, tree.size):
            if parents[i] in on_path and (parents[i] not in best or q[i] > q[best[parents[i]]]):
                best[parents[i]] = i
        touched = set()
        for i in range(1, tree.size):
            if parents[i] not in on_path:
                continue  # its parent was rejected: says nothing about this node
            d = min(depths[i], self.max_depth)
            b = self._bin(q[i])
            first = best[parents[i]] == i
            for key in ((sources[i], d), (sources[i], d, first), (sources[i], 0), (sources[i], 0, first)):
                if key not in self.counts:
                    self.counts[key] = np.zeros(self.bins)
                    self.hits[key] = np.zeros(self.bins)
                if key not in touched:
                    self.counts[key] *= self.decay
                    self.hits[key] *= self.decay
                    touched.add(key)
                self.counts[key][b] += 1.0
                self.hits[key][b] += 1.0 if i in on_path else 0.0
        pooled = {}
        for key in sorted(touched, key=lambda k: k[1] != 0):  # every depth together (depth 0) first
            base = self.centres if key[1] == 0 else pooled[(key[0], 0) + key[2:]]
            post = (self.hits[key] + self.prior * base) / (self.counts[key] + self.prior)
            fitted = np.clip(isotonic(post, self.counts[key] + self.prior), 0.0, 1.0)
            if key[1] == 0:
                pooled[key] = fitted
            else:
                self.rates[key] = fitted.tolist()


@hookimpl
def register_surrogates(register):
    register("path-confidence", PathConfidence)
    register("calibrated", Calibrated)
