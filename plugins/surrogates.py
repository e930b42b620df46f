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
    """P(child) = P(parent) · r(source, depth, bin(q)), r = online acceptance rate given the parent."""

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

    def rate(self, source: int, depth: int, q: float) -> float:
        """The calibrated conditional acceptance probability of a node with draft probability q."""
        for d in range(min(depth, self.max_depth), 0, -1):  # unseen depth: borrow the nearest shallower one
            table = self.rates.get((source, d))
            if table is not None:
                return table[self._bin(q)]
        return q

    def score(self, parent_p: float, depth: int, cand: Candidate) -> float:
        return parent_p * self.rate(cand.source, depth, math.exp(cand.logq))

    def observe(self, tree: Tree, accepted: list[int], scores: list[float]) -> None:
        if tree.size <= 1:
            return  # the root alone: nothing was drafted
        on_path = set(accepted)
        parents = tree.parent_list
        depths = tree.depth_list
        q = [math.exp(x) for x in tree.logq_list]
        sources = tree.source_list or [0] * tree.size
        touched = set()
        for i in range(1, tree.size):
            if parents[i] not in on_path:
                continue  # its parent was rejected: says nothing about this node
            key = (sources[i], min(depths[i], self.max_depth))
            if key not in self.counts:
                self.counts[key] = np.zeros(self.bins)
                self.hits[key] = np.zeros(self.bins)
            if key not in touched:
                self.counts[key] *= self.decay
                self.hits[key] *= self.decay
                touched.add(key)
            b = self._bin(q[i])
            self.counts[key][b] += 1.0
            self.hits[key][b] += 1.0 if i in on_path else 0.0
        for key in touched:
            post = (self.hits[key] + self.prior * self.centres) / (self.counts[key] + self.prior)
            self.rates[key] = np.clip(isotonic(post, self.counts[key] + self.prior), 0.0, 1.0).tolist()


@hookimpl
def register_surrogates(register):
    register("path-confidence", PathConfidence)
    register("calibrated", Calibrated)
