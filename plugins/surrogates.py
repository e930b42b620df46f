"""Built-in acceptance surrogate ``path-confidence``: P(v) = product of draft probabilities on root→v."""

from __future__ import annotations

import math

from specframe import hookimpl
from specframe.components import AcceptanceSurrogate, Candidate


class PathConfidence(AcceptanceSurrogate):
    """P(child) = P(parent) · q(child). Expected accepted length E[L] = Σ_v P(v)."""

    name = "path-confidence"

    def score(self, parent_p: float, depth: int, cand: Candidate) -> float:
        return parent_p * math.exp(cand.logq)


@hookimpl
def register_surrogates(register):
    register("path-confidence", PathConfidence)
