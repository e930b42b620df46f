"""Peer ``hf-assisted`` of the transformers backend: transformers' own assisted generation with a draft model
(``model.generate(..., assistant_model=A)``), the loop a transformers user runs for draft-model speculation,
so that ``specframe bench`` compares specframe's draft-model policies (``bastion@model``, ``chain@model``)
with it on the same target.

The draft (``draft=``, bench's ``--draft-model``) is a model spec as :meth:`Target.load` takes it (hub id,
local directory, ``.gguf`` file, alias) or a :class:`Target` already loaded:

* a model of the target's vocabulary size runs as ``assistant_model=A`` (greedy: candidates checked
  against the target's argmax; sampling: transformers' speculative sampling with the assistant's logits);
* a model of another vocabulary runs as universal assisted generation (``assistant_model=A,
  tokenizer=target_tok, assistant_tokenizer=A_tok``: the text is re-encoded between the two tokenizers);
  both models need a tokenizer. (transformers tells the two cases apart by the vocabulary size alone.)
* ``None``, or a spec naming the target's own model (for the embedded SmolLM2-135M-Instruct: its alias or
  its GGUF file, which transformers would only dequantize back into the target's own fp32 weights): an
  **int8 copy of the target's own weights** made by torch's dynamic quantization of every ``nn.Linear``
  (``torch.ao.quantization.quantize_dynamic``, ``qint8``: int8 weights, activations quantized per call),
  the closest thing transformers runs on a CPU to the 4-bit GGUF that specframe's drafter ``model`` uses
  as the embedded target's default draft. CPU only (quantized kernels of fbgemm/x86).

A quick check of that stand-in (not a benchmark; SmolLM2-135M-Instruct, torch 2.13 CPU, a 2-core machine
shared with other jobs): plain greedy ``generate`` with 1 thread, 5 interleaved rounds of 24 tokens, took a
median 28 ms a token for the int8 copy against 68 ms for fp32 (2.4× faster; with 2 threads on the loaded
machine single rounds scattered from 30 ms to over 1 s for both). But the int8 copy picks the fp32 model's
greedy token on only ≈ 73 % of positions (decoded one token at a time after the prompt; 4 prompts × 48
tokens): torch's dynamic quantization scales activations per tensor, which this model's activation
outliers punish (``down_proj`` alone in int8 drops it to 45 % on whole sequences; keeping ``down_proj`` in
fp32: 79 %, but ≈ 51 instead of 25 ms a token in one noisy check; SmoothQuant-style smoothing before
quantizing did not help). It is the closest stand-in transformers runs, and a weaker draft than the 4-bit
GGUF it stands in for.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from specframe.errors import SpecframeError
from specframe.target import DEFAULT_TARGET, EMBEDDED_ALIASES, embedded_gguf_path

NAME = "hf-assisted"
INT8_DRAFT = ("an int8 copy of the target's own weights (torch dynamic quantization of every nn.Linear, qint8), "
              "standing in for the 4-bit GGUF self-draft that transformers cannot run")


def assisted_peer(target, draft=None):
    """``run(ids, max_new_tokens, temperature, top_k, top_p, seed) -> new token ids`` for peer ``hf-assisted``,
    with ``run.description`` (what drafts, in words) and ``run.assistant`` (the draft model)."""
    assistant, tokenizers, what = make_assistant(target, draft)
    sampler = []  # across tokenizers: the private assistant that sampling prunes (made on first use)

    def run(ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=None):
        model, toks = assistant, tokenizers
        if tokenizers is not None and temperature > 0:
            if not sampler:
                sampler.append(_sampling_assistant(target, assistant, tokenizers))
            model, toks = sampler[0]
        return assisted_generate(target, model, ids, max_new_tokens, temperature, top_k, top_p, seed, toks)

    cross = " (universal assisted generation: tokenizer + assistant_tokenizer)" if tokenizers else ""
    run.description = f"transformers assisted generation (assistant_model){cross}; draft: {what}"
    run.assistant = assistant
    return run


def make_assistant(target, draft=None):
    """The assistant model, the (target, assistant) tokenizers when their vocabularies differ (else None), and
    what the draft is, in words."""
    if draft is None or (isinstance(draft, str) and same_model(target, draft)):
        said = f" (--draft-model {draft} names the target's own model)" if draft else ""
        return int8_copy(target), None, INT8_DRAFT + said
    if isinstance(draft, str):
        from specframe.plugins.hf import Target

        loaded = Target.load(draft, dtype=target.dtype, device=str(target.device))
        what = f"{loaded.name}" + (" (a GGUF file, dequantized by transformers)" if draft.endswith(".gguf") else "")
    elif hasattr(draft, "model") and hasattr(draft.model, "generate"):  # a Target already loaded
        loaded, what = draft, draft.name
    else:
        raise SpecframeError(f"peer '{NAME}': the draft must be a model spec or a loaded transformers Target, "
                             f"got {type(draft).__name__}")
    model = loaded.model
    if _vocab(model) == _vocab(target.model):
        return model, None, f"{what} (same vocabulary size as the target)"
    if target.tokenizer is None or loaded.tokenizer is None:
        raise SpecframeError(f"peer '{NAME}': the draft '{loaded.name}' has another vocabulary ({_vocab(model)} vs "
                             f"{_vocab(target.model)}): universal assisted generation needs both tokenizers")
    sizes = f"{_vocab(model)} vs {_vocab(target.model)} tokens"
    return model, (target.tokenizer, loaded.tokenizer), f"{what} (another tokenizer: {sizes})"


def _sampling_assistant(target, assistant, tokenizers):
    """A private copy of a cross-tokenizer assistant (and of its tokenizer) for sampling. transformers'
    universal speculative decoding prunes the assistant's LM head and remaps its input embeddings IN PLACE
    on its first sampling call, and caches that per tokenizer pair: the greedy path cannot use that model
    any more (a shape error), nor can anyone else who holds the draft. The copy's one-token warm-up does the
    pruning, so that every real call starts alike (transformers' first sampling call differs from later
    ones with the same seed)."""
    model, toks = copy.deepcopy(assistant), (tokenizers[0], copy.deepcopy(tokenizers[1]))
    prompt = list(toks[0]("The", add_special_tokens=False)["input_ids"]) or [0]
    try:
        assisted_generate(target, model, prompt, 1, 1.0, 0, 1.0, 0, toks)
    except Exception:  # noqa: BLE001 - only a warm-up: the real call prunes the copy if this could not
        pass
    return model, toks


def same_model(target, spec: str) -> bool:
    """Whether ``spec`` names the model ``target`` was loaded from: the same spec or path, or (for the
    embedded default) one of its aliases or its GGUF file."""
    alias = getattr(target, "model_alias", None)
    if alias is None and str(target.name).startswith("SmolLM2-135M-Instruct (embedded"):
        alias = DEFAULT_TARGET
    try:  # other known aliases, where this specframe knows them
        from specframe.target import known_model
    except ImportError:
        known_model = lambda s: DEFAULT_TARGET if str(s).lower() in EMBEDDED_ALIASES else None  # noqa: E731
    named = known_model(spec)
    if named is not None:
        return named == alias
    path = Path(spec).expanduser()
    if alias == DEFAULT_TARGET and path.is_file():
        try:
            if path.resolve() == embedded_gguf_path().resolve():
                return True
        except SpecframeError:
            pass
    sources = {str(target.name), str(getattr(target.config, "_name_or_path", "") or "")} - {""}
    if spec in sources:
        return True
    return path.exists() and any(Path(s).expanduser().exists() and Path(s).expanduser().resolve() == path.resolve()
                                 for s in sources)


def int8_copy(target):
    """A copy of ``target``'s model with every ``nn.Linear`` dynamically quantized to int8 (fp32 elsewhere)."""
    if target.device.type != "cpu":
        raise SpecframeError(f"peer '{NAME}': its default draft, an int8 dynamic-quantized copy of the target, runs on "
                             f"CPU only (target on {target.device}); give a draft model (--draft-model SPEC)")
    from torch.ao.quantization import quantize_dynamic

    model = copy.deepcopy(target.model).float().eval()
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _vocab(model) -> int:
    config = model.config
    return int(getattr(config, "get_text_config", lambda: config)().vocab_size)


def assisted_generate(target, assistant, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int | None = None, tokenizers=None) -> list[int]:
    """transformers' ``generate`` with ``assistant_model`` (and both tokenizers when given): the new token ids,
    stopping after an EOS exactly like specframe (:meth:`Target.hf_generate`, with the assistant)."""
    extra = {} if tokenizers is None else {"tokenizer": tokenizers[0], "assistant_tokenizer": tokenizers[1]}
    return target.hf_generate(ids, max_new_tokens, temperature, top_k, top_p, seed, assistant_model=assistant, **extra)
