"""The ``sequoia`` policy bundle: Sequoia (Chen et al. 2024) in specframe.

drafter: ``auto-hybrid`` (as BASTION: prompt lookup + a block drafter when one is known for the target, else
``ngram``; a draft model where the target has a known cheaper copy) · surrogate: ``sibling-rank``
(acceptance by sibling rank, measured online) · cost model: ``roofline`` · expansion: ``sequoia`` (the DP's
optimal tree for the measured rates, sized for the hardware) · verifier: greedy or exact sampling by
temperature. ``sequoia:32`` fixes the tree at 32 nodes. See docs/policies/sequoia.md.
"""

from __future__ import annotations

from specframe import hookimpl
from specframe.registry import PolicySpec

SEQUOIA = PolicySpec(
    name="sequoia",
    description="Sequoia: the DP-optimal tree for acceptance-by-sibling-rank rates (measured online), sized for the hardware",
    drafter="auto-hybrid",
    surrogate="sibling-rank",
    cost_model="roofline",
    expansion="sequoia",
    shorthand="expansion.budget",
)


@hookimpl
def register_policies(register):
    register(SEQUOIA)
