"""Built-in target backend ``hf``: transformers models (hub id, local directory, ``.gguf`` file, or the
embedded default), driven by :class:`specframe.target.Target`."""

from __future__ import annotations

from specframe import hookimpl


def load_hf(spec: str | None = None, *, dtype="float32", device: str = "cpu"):
    """A transformers causal LM with its tokenizer (``None``: the embedded SmolLM2-135M-Instruct)."""
    from specframe.target import Target

    return Target.load(spec, dtype=dtype, device=device)


@hookimpl
def register_backends(register):
    register("hf", load_hf)
