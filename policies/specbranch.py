"""The ``specbranch`` policy bundle: SpecBranch (Shen et al., ICLR 2026) in specframe.

drafter: ``model-ahead`` (a draft model on its own thread, drafting while the target verifies for the two
likeliest outcomes of the verification, ``branches`` 2) · expansion: ``branch`` (top-2 branches at
low-confidence positions, each extended while the draft stays confident) · surrogate: ``path-confidence`` ·
cost model: ``roofline`` · verifier: greedy or exact sampling by temperature. ``specbranch:3`` branches
three ways. See docs/policies/specbranch.md.
"""

from __future__ import annotations

from specframe import hookimpl
from specframe.registry import PolicySpec

SPECBRANCH = PolicySpec(
    name="specbranch",
    description="SpecBranch: branches where the draft is unsure, rollback-aware lengths, drafted while the target verifies",
    drafter="model-ahead",
    surrogate="path-confidence",
    cost_model="roofline",
    expansion="branch",
    params={"drafter.branches": 2},
    shorthand="expansion.branch",
)


@hookimpl
def register_policies(register):
    register(SPECBRANCH)
