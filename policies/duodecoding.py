"""The ``duodecoding`` policy bundle: DuoDecoding (Lv et al., 2025) in specframe.

drafter: ``model-ahead`` (a draft model on its own thread, drafting the next tree while the target verifies;
for the embedded SmolLM2 its 4-bit GGUF on llama.cpp; ``top_k`` 8 so the k rule sees ranks 2–8) ·
expansion: ``multi-sequence`` (k sequences of γ/k tokens, γ from measured times) · surrogate:
``path-confidence`` · cost model: ``roofline`` (calibrated online: γ reads its verify times) · verifier:
greedy or exact sampling by temperature. ``duodecoding:8`` fixes γ = 8. See docs/policies/duodecoding.md.
"""

from __future__ import annotations

from specframe import hookimpl
from specframe.registry import PolicySpec

DUODECODING = PolicySpec(
    name="duodecoding",
    description="DuoDecoding: k draft sequences of γ/k tokens (k from the draft's doubt), drafted while the target verifies",
    drafter="model-ahead",
    surrogate="path-confidence",
    cost_model="roofline",
    expansion="multi-sequence",
    params={"drafter.top_k": 8},
    shorthand="expansion.gamma",
)


@hookimpl
def register_policies(register):
    register(DUODECODING)
