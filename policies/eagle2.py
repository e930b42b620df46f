"""The ``eagle2`` policy bundle: EAGLE-2's dynamic draft tree (Li et al., 2024) in specframe.

drafter: ``auto-hybrid`` (as BASTION: a draft model where a cheaper copy of the target is known — for the
embedded SmolLM2 in transformers its own 4-bit GGUF on llama.cpp, a lazy draft grown one draft call per depth
as EAGLE-2's draft head is —, else the target's block drafter with prompt lookup, else prompt lookup;
``top_k`` 10 children per drafted node, EAGLE-2's k) · expansion: ``eagle2`` (depth by depth the top-10 nodes
by path confidence are expanded, then all candidates are reranked and the 58 best kept, 6 deep) ·
surrogate: ``path-confidence`` (the product of the draft's probabilities: EAGLE-2's value) · cost model:
``roofline`` · verifier: greedy or exact sampling by temperature. ``eagle2:N`` keeps N nodes. See
docs/policies/eagle2.md.
"""

from __future__ import annotations

from specframe import hookimpl
from specframe.registry import PolicySpec

EAGLE2 = PolicySpec(
    name="eagle2",
    description="EAGLE-2: dynamic draft tree — the top-k nodes by path confidence expanded depth by depth, "
                "the m best of all candidates kept",
    drafter="auto-hybrid",
    surrogate="path-confidence",
    cost_model="roofline",
    expansion="eagle2",
    params={"drafter.top_k": 10},
    shorthand="expansion.nodes",
)


@hookimpl
def register_policies(register):
    register(EAGLE2)
