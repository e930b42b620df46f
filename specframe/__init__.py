"""specframe: lossless tree speculative decoding for Hugging Face causal LMs, every decision a plugin.

Quick start::

    from specframe import SpecGenerator
    gen = SpecGenerator.from_pretrained(policy="best-first")   # the embedded SmolLM2-135M-Instruct
    out = gen.generate("Name three rivers.", max_new_tokens=64)
    print(out.text, out.stats.tau)
"""

from .hookspecs import hookimpl  # noqa: I001 - plugins import this first

from .components import (
    AcceptanceSurrogate,
    BuiltTree,
    Candidate,
    CostModel,
    Draft,
    Drafter,
    EmptyDraft,
    ExpansionContext,
    ExpansionPolicy,
    MarginalDraft,
    RunStats,
    Sampler,
    SamplingParams,
    StepRecord,
    TreeBuilder,
    TrieDraft,
    Verdict,
    Verifier,
)
from .engine import Generation, SpecGenerator
from .resolve import resolve_components
from .errors import SpecframeError
from .registry import PolicySpec, Registry, make_plugin_set
from .tree import Tree

__version__ = "0.1.0"


def __getattr__(name: str):
    """``specframe.Target``: the ``hf`` backend's target class (transformers), resolved through the backend
    registry on first use so that importing specframe loads no runtime."""
    if name == "Target":
        from . import target

        value = globals()[name] = target.Target  # resolved once (specframe.target resolves it the same way)
        return value
    raise AttributeError(f"module 'specframe' has no attribute '{name}'")

__all__ = [
    "AcceptanceSurrogate", "BuiltTree", "Candidate", "CostModel", "Draft", "Drafter", "EmptyDraft",
    "ExpansionContext", "ExpansionPolicy", "Generation", "MarginalDraft", "PolicySpec", "Registry",
    "RunStats", "Sampler", "SamplingParams", "SpecGenerator", "SpecframeError", "StepRecord", "Target",
    "Tree", "TreeBuilder", "TrieDraft", "Verdict", "Verifier", "hookimpl", "make_plugin_set",
    "resolve_components", "__version__",
]
