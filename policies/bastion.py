"""The BASTION policy bundle: budget-aware trees sized by expected tokens per second.

drafter: ``hybrid`` (prompt lookup + the target's block-diffusion drafter in one candidate pool) when a
block drafter is known for the target, else ``ngram`` alone (so any model gets BASTION) · surrogate: ``calibrated`` (path confidence, corrected online by observed acceptance) ·
cost model: ``roofline`` (calibrated online on this machine) · expansion: ``adaptive-best-first`` ·
verifier: greedy or exact sampling by temperature.
"""

from __future__ import annotations

from specframe import hookimpl
from specframe.registry import PolicySpec

BASTION = PolicySpec(
    name="bastion",
    description="budget-aware best-first trees: grow while expected tokens/s rises (roofline cost, calibrated surrogate)",
    drafter="auto-hybrid",
    surrogate="calibrated",
    cost_model="roofline",
    expansion="adaptive-best-first",
    shorthand="expansion.max_nodes",
)


@hookimpl
def register_policies(register):
    register(BASTION)
