"""The ``specblock`` policy bundle: SpecBlock's rank-guided block tree (Shi et al., 2026) in specframe.

drafter: ``dflash`` (the shipped block drafter) with its rank head (``rank_head="auto"``: per MASK slot,
the class 1 / 2-4 / 5-10 / >10 of the target token's rank in the draft distribution) · expansion:
``specblock`` (block walks that follow the top-1 and branch per class, a beam of alternatives that walk
again, pruned to ``budget`` nodes by cumulative log-prob) · surrogate: ``rank-class`` · cost model:
``roofline`` · verifier: greedy or exact sampling by temperature. ``specblock:32`` keeps 32 nodes. The
block drafter reads the target's hidden states: ``--backend hf``. See docs/policies/specblock.md.
"""

from __future__ import annotations

from specframe import hookimpl
from specframe.registry import PolicySpec

SPECBLOCK = PolicySpec(
    name="specblock",
    description="SpecBlock: a rank head per block slot sizes the branches of block walks, pruned by cumulative log-prob",
    drafter="dflash",
    surrogate="rank-class",
    cost_model="roofline",
    expansion="specblock",
    params={"drafter.rank_head": "auto"},
    shorthand="expansion.budget",
)


@hookimpl
def register_policies(register):
    register(SPECBLOCK)
