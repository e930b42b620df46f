"""Built-in target backend ``llama.cpp``: any GGUF file (the embedded SmolLM2-135M-Instruct straight from
its Q4_1 file) run by llama.cpp through llama-cpp-python's low-level API. This is the ONLY module of
specframe that calls into llama.cpp.

In fast mode a draft tree is verified in one ``llama_decode``:

* every leaf owns a sequence id (the first leaf uses sequence 0, the committed sequence); a node belongs
  to the sequences of all leaves below it, so llama.cpp's mask lets a node attend to the cached prefix
  and to its own ancestors only: a query token sees a cell when they share a sequence id and the cell's
  position is not after the token's; a token in several sequences is one query row;
* node i sits at position ``past + depth(i)``; the cached prefix is shared with every other leaf's
  sequence by ``llama_memory_seq_cp`` (no data is copied, the cells only gain sequence ids);
* coupled sequences need the unified KV cache (``kv_unified``) and ``n_seq_max`` ≥ leaves: a fast-mode
  context is created with both, and the engine caps trees at :attr:`LlamaCppTarget.max_tree_tokens`
  (exact mode decodes in sequence 0 only and creates a plain one-sequence context, which decodes faster);
* after verification, the accepted path stays in sequence 0 and every other node leaves the cache.

Modes (``mode=``):

``exact`` (default)
    The output is token for token what this backend's own plain one-token-at-a-time decoding produces
    (the ``ar`` policy, and llama-cpp-python's own generation loop with the same settings). llama.cpp's
    numbers depend on more than the tokens: the CPU kernels switch at 64-row micro-batches, and a token's
    KV cell index (masked cells between it and its ancestors included) changes the summation order of
    attention; and from a 512-cell KV view on (more than 256 tokens in the cache) a one-row decode takes a
    split-KV attention path that no multi-row call reproduces. So every root-to-leaf path is decoded in
    place in sequence 0, one after another, each reusing the cells it shares with the previous path and
    replacing the rest (every node is still decoded once), in calls of at most 16 rows while the cache
    holds at most 256 tokens and of one row beyond; the first-child chain, the drafter's likeliest, goes
    last and stays. Accepted tokens whose cells a later path replaced are decoded again, in place, at the
    front of the next verification.
``fast``
    512-row micro-batches and the accepted path kept wherever its cells are. The output is the greedy
    decoding of the logits the target computes in verification: a near-tie may resolve differently from
    plain decoding (see ``docs/reference/backends.md`` for the measured rate).

Hidden states of chosen layers (``l_out-N``) come through llama.cpp's eval callback, on a second context
that is only created when a drafter asks for features.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specframe import hookimpl
from specframe.backends import Capabilities, ModelShape
from specframe.errors import SpecframeError
from specframe.target import ForwardOut, known_gguf
from specframe.tree import Tree, common_prefix

MODES = ("exact", "fast")
EXACT_ROWS = 16  # rows per verification call in exact mode: below the CPU kernels' 64-row switch
# llama.cpp pads the KV view to 256 cells; from a 512-cell view on, a ONE-row decode takes the CPU's
# split-KV flash-attention path (ggml-cpu ops.cpp), which no multi-row call reproduces bit for bit: in
# exact mode, once a verification reaches past this many cells, every node is decoded in its own call
KV_PAD = 256
N_BATCH = 512  # also n_ubatch: a prompt is consumed as llama.cpp's own loop consumes it
MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: one sequence per leaf
# measured by scripts/llamacpp_costs.py (embedded Q4_1 GGUF, 2-core CPU, contexts 128-384; docs/how-to/llamacpp.md)
FEATURE_NOTE = "llama.cpp's eval callback: +9-13 % on a one-token forward on a 2-core CPU"


def _llama():
    try:
        import llama_cpp
    except ImportError as err:
        raise SpecframeError(
            "backend 'llama.cpp' needs llama-cpp-python: pip install llama-cpp-python diskcache "
            "(a source build of about 10 min on two cores; scripts/setup.sh does it once)"
        ) from err
    return llama_cpp


class _Runtime:
    """The llama.cpp library, initialised once per process: backend init, quiet logging, and the few
    ggml functions the eval callback needs (tensor name, byte size, copy-out)."""

    _instance = None

    def __init__(self):
        self.lib = lib = _llama()
        lib.llama_backend_init()
        self._log = lib.llama_log_callback(lambda level, text, data: None)  # keep a reference
        if not os.environ.get("SPECFRAME_LLAMA_LOG"):
            lib.llama_log_set(self._log, ctypes.c_void_p(0))
        ggml = ctypes.CDLL(str(Path(lib.__file__).parent / "lib" / "libggml-base.so"))
        ggml.ggml_get_name.restype, ggml.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        ggml.ggml_nbytes.restype, ggml.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        ggml.ggml_backend_tensor_get.restype = None
        ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.ggml = ggml

    @classmethod
    def get(cls) -> "_Runtime":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


def resolve_gguf(spec: str | None) -> Path:
    """The GGUF file ``spec`` names: ``None``/a known model's alias (the embedded SmolLM2, Gemma-3-270m), a
    ``.gguf`` path, or a directory holding one."""
    known = known_gguf(spec)
    if known is not None:
        return known
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if not found:
            raise SpecframeError(f"'{path}' holds no .gguf file; backend 'llama.cpp' runs GGUF files (use --backend hf for a model directory)")
        path = found[0]
    if not path.is_file():
        hint = " (a hub id needs --backend hf)" if not spec.endswith(".gguf") else ""
        raise SpecframeError(f"GGUF file not found: {path}{hint}")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise SpecframeError(f"'{path}' is not a GGUF file (no GGUF magic); give a .gguf model file")
    return path


@dataclass(frozen=True)
class _Layout:
    """How one verification's batch is laid out: batch order of the tree nodes, and each node's sequences."""

    order: list[int]  # batch row r holds tree node order[r]
    seqs: list[list[int]]  # seqs[node]: sequence ids of the leaves below node
    paths: list[list[int]]  # paths[k]: the nodes from the root to leaf k (sequence k), root first

    @property
    def leaves(self) -> int:
        return len(self.paths)


def layout_tree(parents: list[int]) -> _Layout:
    """Depth-first order along first children (the first-drafted chain gets consecutive cells); leaf k
    owns sequence k (leaf 0 = the first-child chain's leaf = sequence 0)."""
    n = len(parents)
    children: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
        children[parents[i]].append(i)
    order, stack = [], [0]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(children[node]))
    seqs: list[list[int]] = [[] for _ in range(n)]
    paths: list[list[int]] = []
    for node in order:
        if not children[node]:
            path, walk = [], node
            while walk >= 0:
                seqs[walk].append(len(paths))
                path.append(walk)
                walk = parents[walk]
            paths.append(path[::-1])
    return _Layout(order, seqs, paths)


class _Context:
    """One llama_context and its batch buffer; optionally with the eval callback that copies out the
    outputs of chosen layers."""

    def __init__(self, target: "LlamaCppTarget", layers: tuple[int, ...], shared: bool = False):
        rt, lib = target.runtime, target.runtime.lib
        params = lib.llama_context_default_params()
        params.n_ctx = target.max_context
        params.n_batch = N_BATCH
        params.n_ubatch = N_BATCH
        # a sequence per leaf needs them (fast mode); exact mode decodes every path in sequence 0, and 256
        # sequences in a unified cache made each of its decodes ≈ 2.5 % slower (8.66 vs 8.43 ms a token)
        shared = shared or target.mode == "fast"  # (a batch room's context holds every request's sequences)
        params.n_seq_max = MAX_SEQ if shared else 1
        params.n_threads = params.n_threads_batch = target.threads
        params.kv_unified = shared
        params.swa_full = True  # keep every cell so sequences can be removed and re-added freely
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if target.flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.layers = tuple(layers)
        self._wanted = {f"l_out-{layer}".encode(): layer for layer in self.layers}
        self._captured: dict[int, list[np.ndarray]] = {layer: [] for layer in self.layers}
        if self.layers:
            self._cb = lib.ggml_backend_sched_eval_callback(self._on_tensor)  # keep a reference
            params.cb_eval = self._cb
            params.cb_eval_user_data = None
        self.ctx = lib.llama_init_from_model(target.model, params)
        if not self.ctx:
            raise SpecframeError(f"llama.cpp could not create a context for '{target.name}' (n_ctx {target.max_context}); "
                                 f"lower the context with --backend-option n_ctx=N")
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(N_BATCH, 0, MAX_SEQ)
        self.lib, self.ggml, self.vocab_size = lib, rt.ggml, target.vocab_size
        self.owner = None  # the session using this context now

    def _on_tensor(self, tensor, ask, _data) -> bool:
        layer = self._wanted.get(self.ggml.ggml_get_name(tensor))
        if layer is None:
            return False
        if ask:
            return True
        ne = ctypes.cast(tensor + 16, ctypes.POINTER(ctypes.c_int64))  # ggml_tensor: type, buffer, ne[4]
        out = np.empty((ne[1], ne[0]), dtype=np.float32)
        if out.nbytes != self.ggml.ggml_nbytes(tensor):
            return True  # not the f32 activation we expect; leave it
        self.ggml.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
        self._captured[layer].append(out)
        return True

    def decode(self, tokens: list[int], positions: list[int], seqs: list[list[int]], logits: list[bool],
               rows: int = N_BATCH, out: np.ndarray | None = None, dest: list[int] | None = None):
        """``llama_decode`` in calls of at most ``rows`` tokens. The logits of the flagged rows are copied
        straight from llama.cpp's buffer into ``out`` (row ``dest[k]`` for the k-th flagged token; by
        default a new (k, V) array, in order). Returns (out, features (n, F) or None)."""
        n = len(tokens)
        if n > N_BATCH:  # llama.cpp aborts the process on an oversized batch: refuse here
            raise SpecframeError(f"llama.cpp batch of {n} tokens exceeds n_batch {N_BATCH}")
        for chunks in self._captured.values():
            chunks.clear()
        if out is None:
            out = np.empty((sum(logits), self.vocab_size), dtype=np.float32)
        base, row_bytes = out.ctypes.data, self.vocab_size * 4
        done = 0
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            self._fill(tokens, positions, seqs, logits, start, stop)
            rc = self.lib.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise SpecframeError(f"llama_decode failed with code {rc} on a batch of {stop - start} tokens "
                                     f"(1: no KV cell free; the context is full)")
            for i in range(start, stop):
                if logits[i]:
                    row = done if dest is None else dest[done]
                    ctypes.memmove(base + row * row_bytes, self.lib.llama_get_logits_ith(self.ctx, i - start), row_bytes)
                    done += 1
        feats = None
        if self.layers:
            feats = np.concatenate([np.concatenate(self._captured[layer]) for layer in self.layers], axis=1)
        return out, feats

    def _fill(self, tokens, positions, seqs, logits, start: int, stop: int) -> None:
        b = self.batch
        for j, i in enumerate(range(start, stop)):
            b.token[j], b.pos[j], b.logits[j] = tokens[i], positions[i], logits[i]
            row = seqs[i]
            b.n_seq_id[j] = len(row)
            ids = b.seq_id[j]
            for k, s in enumerate(row):
                ids[k] = s
        b.n_tokens = stop - start

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> None:
        self.lib.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        """Every cell outside ``seq`` leaves; cells in it keep ``seq`` alone (one walk over the cells)."""
        self.lib.llama_memory_seq_keep(self.mem, seq)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.mem, False)  # metadata only: zeroing a large cache costs milliseconds

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None

    __del__ = close


class LlamaCppTarget:
    """A GGUF model run by llama.cpp, with llama.cpp's own tokenizer and the GGUF's chat template."""

    backend = "llama.cpp"

    def __init__(self, path: str | Path, *, mode: str = "exact", threads: int | None = None, n_ctx: int | None = None,
                 flash_attn: bool = True, rows: int | None = None, device: str = "cpu", name: str | None = None):
        if mode not in MODES:
            raise SpecframeError(f"unknown llama.cpp mode '{mode}'; use one of {', '.join(MODES)}")
        self.path, self.mode = Path(path), mode
        self.runtime = rt = _Runtime.get()
        lib = rt.lib
        mparams = lib.llama_model_default_params()
        if device != "cpu":
            if not lib.llama_supports_gpu_offload():
                raise SpecframeError(f"this llama-cpp-python build has no GPU support; use --device cpu")
            mparams.n_gpu_layers = -1
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise SpecframeError(f"llama.cpp could not load '{self.path}' (corrupt or unsupported GGUF file)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.name = name or (f"{self.path.stem} (llama.cpp)")
        self.vocab_size = int(lib.llama_vocab_n_tokens(self.vocab))
        self.num_layers = int(lib.llama_model_n_layer(self.model))
        self.hidden_size = int(lib.llama_model_n_embd(self.model))
        train_ctx = int(lib.llama_model_n_ctx_train(self.model)) or 4096
        self.max_context = int(n_ctx or min(train_ctx, 8192))
        self.sliding_window = None  # llama.cpp keeps its own window (swa_full): nothing for the engine to cap
        self.threads = int(threads or len(os.sched_getaffinity(0)))
        self.flash_attn = bool(flash_attn)
        self.rows = int(rows or (EXACT_ROWS if mode == "exact" else N_BATCH))
        if not 1 <= self.rows <= (EXACT_ROWS if mode == "exact" else N_BATCH):
            raise SpecframeError(f"rows must be in 1..{EXACT_ROWS if mode == 'exact' else N_BATCH} in mode {mode}, got {self.rows}")
        self.capabilities = Capabilities(tree_attention=True, features=True, max_tree_tokens=MAX_SEQ,
                                         free_features=False, feature_note=FEATURE_NOTE)
        self.rows_note = ""
        if mode == "exact" and rows is None and not self._rows_are_exact():
            self.rows = 1
            self.rows_note = ("multi-row decodes of this model differ from one-row decodes in their last bits "
                              "(checked at load), so exact mode decodes one row per call")
        self.eos_token_ids = tuple(t for t in range(self.vocab_size) if lib.llama_vocab_is_eog(self.vocab, t))
        self.chat_template = self._meta("tokenizer.chat_template") or None
        self.shape = self._shape()
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # of the logits and features it returns
        self._contexts: dict[tuple[int, ...], list[_Context]] = {}  # feature layers -> contexts
        self._weights: dict[str, torch.Tensor] = {}

    def describe(self) -> str:
        why = f": {self.rows_note}" if self.rows_note else ""
        return f"llama.cpp:{self.path} (mode {self.mode}, {self.threads} threads, {self.rows} rows per verification call{why})"

    def _rows_are_exact(self) -> bool:
        """Whether a call of :data:`EXACT_ROWS` rows gives logits bit-identical to one-row calls for this
        model. It does for the embedded Q4_1 file; it does not for every quantisation (Gemma-3-270m's
        Q4_K_M: its multi-row matrix kernels round differently), and exact mode's promise rests on it."""
        ctx = _Context(self, ())
        try:
            toks = [(37 * i + 11) % self.vocab_size for i in range(EXACT_ROWS)]
            pos, seqs, flags = list(range(EXACT_ROWS)), [[0]] * EXACT_ROWS, [True] * EXACT_ROWS
            batched, _ = ctx.decode(toks, pos, seqs, flags, EXACT_ROWS)
            ctx.clear()
            single, _ = ctx.decode(toks, pos, seqs, flags, 1)
            return bool(np.array_equal(batched, single))
        finally:
            ctx.close()

    def settings(self) -> dict:
        """What this backend runs with, for ``--json`` (``components.backend.settings``)."""
        out = {"model": self.name, "file": str(self.path), "mode": self.mode, "threads": self.threads,
               "n_ctx": self.max_context, "rows": self.rows, "flash_attn": self.flash_attn}
        if self.rows_note:
            out["rows_note"] = self.rows_note
        return out

    # ------------------------------------------------------------------ model facts
    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.runtime.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    def _shape(self) -> ModelShape:
        lib, arch = self.runtime.lib, self._meta("general.architecture")
        heads = int(lib.llama_model_n_head(self.model))
        kv = int(lib.llama_model_n_head_kv(self.model))
        head_dim = int(self._meta(f"{arch}.attention.key_length") or self.hidden_size // heads)
        inter = int(self._meta(f"{arch}.feed_forward_length") or 4 * self.hidden_size)
        params = int(lib.llama_model_n_params(self.model))
        bytes_per_param = float(lib.llama_model_size(self.model)) / max(params, 1)
        return ModelShape(layers=self.num_layers, hidden=self.hidden_size, q_width=heads * head_dim,
                          kv_width=kv * head_dim, intermediate=inter, vocab=self.vocab_size,
                          bytes_per_param=bytes_per_param, cache_bytes=2.0)  # f16 KV cache

    # ------------------------------------------------------------------ text
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        lib, data = self.runtime.lib, text.encode("utf-8")
        cap = len(data) + 16
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, True)
        if n < 0:
            buf = (lib.llama_token * -n)()
            n = lib.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, True)
        return list(buf[:n])

    def encode(self, text: str, chat: bool | None = None, system: str | None = None) -> list[int]:
        if chat is None:
            chat = self.has_chat_template
        if chat:
            if not self.has_chat_template:
                raise SpecframeError(f"target '{self.name}' has no chat template; use --no-chat")
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            return self.encode_messages(messages)
        return self._tokenize(text, add_special=True)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as it is: no BOS added (special-token text is read as such)."""
        return self._tokenize(text, add_special=False)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        if not self.has_chat_template:
            raise SpecframeError(f"target '{self.name}' has no chat template; give a plain prompt")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        piece = lambda t: self._piece(t, special=True).decode("utf-8", "replace") if t >= 0 else ""  # noqa: E731
        lib = self.runtime.lib
        fmt = Jinja2ChatFormatter(self.chat_template, eos_token=piece(lib.llama_vocab_eos(self.vocab)),
                                  bos_token=piece(lib.llama_vocab_bos(self.vocab)))
        return self._tokenize(fmt(messages=messages).prompt, add_special=False)

    def _piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.runtime.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.runtime.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self._piece(int(t), not skip_special_tokens) for t in ids).decode("utf-8", "replace")

    # ------------------------------------------------------------------ sessions
    def start(self, feature_layers: tuple[int, ...] = ()) -> "LlamaCppSession":
        layers = tuple(feature_layers)
        bad = [layer for layer in layers if not 0 <= layer < self.num_layers]
        if bad:
            raise SpecframeError(f"feature layer(s) {bad} do not exist in target '{self.name}' ({self.num_layers} layers: 0..{self.num_layers - 1})")
        if layers and max(layers) == self.num_layers - 1:
            raise SpecframeError(f"backend 'llama.cpp' gives hidden states of layers 0..{self.num_layers - 2} only "
                                 f"(the last layer computes only the rows that return logits)")
        pool = self._contexts.setdefault(layers, [])
        ctx = next((c for c in pool if c.owner is None or c.owner() is None), None)  # one no live session holds
        if ctx is None:  # sessions that overlap each get a context (and a KV cache) of their own
            ctx = _Context(self, layers)
            pool.append(ctx)
        return LlamaCppSession(self, ctx)

    def open_batch(self, max_batch: int, feature_layers: tuple[int, ...] = ()):
        """A batch room for continuous batching (``specframe serve``): in mode ``fast`` every request's tree
        is verified in ONE ``llama_decode`` (:class:`LlamaCppBatchRoom`); in mode ``exact`` each request
        keeps a context of its own and is verified in its own calls, so each output stays exactly its solo
        output (plain decoding's, token for token)."""
        if self.mode == "exact":
            from specframe.batch import SequentialRoom

            return SequentialRoom(self, max_batch, feature_layers, note=(
                "llama.cpp mode exact: each request is verified in a context of its own, one after another, so "
                "each output is token for token its solo output (--backend-option mode=fast verifies the "
                "whole batch in one llama_decode)"))
        return LlamaCppBatchRoom(self, max_batch, feature_layers)

    def set_threads(self, n: int) -> int:
        """Decode on ``n`` threads from now on (every context of this model); returns the previous count."""
        before, self.threads = self.threads, int(n)
        if n != before:
            for ctx in (c for pool in self._contexts.values() for c in pool):
                if ctx.ctx:
                    self.runtime.lib.llama_set_n_threads(ctx.ctx, self.threads, self.threads)
        return before

    def synchronize(self) -> None:
        for ctx in (c for pool in self._contexts.values() for c in pool):
            if ctx.ctx:
                self.runtime.lib.llama_synchronize(ctx.ctx)

    # ------------------------------------------------------------------ peers for ``specframe bench``
    peer_names = ("llama-cpp", "llama-cpp-lookup", "llama-server", "llama-server-ngram", "llama-server-draft")
    baseline_peers = ("llama-cpp", "llama-server")  # plain decoding, the speedups' other baselines in bench
    draft_peers = ("llama-server-draft",)  # peers that take a draft model (bench's --draft-model)

    def peer(self, name: str, draft: str | None = None):
        """llama-cpp-python's own generation loop on the same GGUF file, threads and attention settings:
        ``llama-cpp`` (plain) or ``llama-cpp-lookup`` (its ``LlamaPromptLookupDecoding``, 10 tokens); or
        llama.cpp's own server: ``llama-server`` (plain), ``llama-server-ngram`` (its n-gram speculation) or
        ``llama-server-draft`` (its draft-model speculation with the GGUF that ``draft`` names; None: this
        target's own file, self-drafting; plugins/llama_server.py, whose ``run`` also has
        ``run.last_timings``, the server's timings).
        Returns ``run(ids, max_new_tokens, temperature, top_k, top_p, seed) -> new token ids``, stopping
        after an end-of-generation token like specframe."""
        if name not in self.peer_names:
            raise SpecframeError(f"unknown llama.cpp peer '{name}'; known: {', '.join(self.peer_names)}")
        if name.startswith("llama-server"):
            from specframe.plugins.llama_server import DRAFT_SPEC, NGRAM_SPEC, LlamaServerPeer

            spec = {"llama-server-ngram": NGRAM_SPEC, "llama-server-draft": DRAFT_SPEC}.get(name)
            draft_path, note = None, ""
            if name == "llama-server-draft":
                draft_path = self.path if draft is None else resolve_gguf(draft)
                if draft_path.resolve() == self.path.resolve():
                    note = ("self-drafting: the draft is the target's own GGUF file (legal, but a draft as slow as "
                            "the target cannot speed it up; give a smaller draft with --draft-model)")
            return LlamaServerPeer(self.path, self.threads, min(self.max_context, 4096), spec=spec,
                                   flash_attn=self.flash_attn, draft_model=draft_path, note=note).runner()
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if name == "llama-cpp-lookup" else None
        # logits_all (forced by a draft model) keeps n_ctx × vocab floats: a smaller context for peers
        n_ctx = min(self.max_context, 2048)
        llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=self.threads,
                    n_threads_batch=self.threads, flash_attn=self.flash_attn, draft_model=draft, verbose=False)
        eos = set(self.eos_token_ids)

        def run(ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=None):
            if len(ids) + max_new_tokens > n_ctx:
                raise SpecframeError(f"peer '{name}' runs with a context of {n_ctx} tokens; the prompt ({len(ids)}) + "
                                     f"{max_new_tokens} new tokens do not fit")
            llm.reset()
            if seed is not None:
                llm.set_seed(seed)
            # The prompt but its last token first, as specframe's prefill does; generate() then finds that
            # prefix in its cache and decodes from the last prompt token on.
            if len(ids) > 1:
                llm.eval(ids[:-1])
            out = []
            for tok in llm.generate(ids, temp=temperature, top_k=top_k or 0, top_p=top_p, min_p=0.0,
                                    repeat_penalty=1.0, reset=True):
                out.append(int(tok))
                if tok in eos or len(out) >= max_new_tokens:
                    break
            return out

        return run

    # ------------------------------------------------------------------ weights drafters reuse
    def _tensor(self, *names: str) -> torch.Tensor:
        for name in names:
            if name in self._weights:
                return self._weights[name]
        import gguf

        reader = gguf.GGUFReader(str(self.path))
        by_name = {t.name: t for t in reader.tensors}
        for name in names:
            if name in by_name:
                t = by_name[name]
                data = gguf.quants.dequantize(t.data, t.tensor_type)
                rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
                self._weights[name] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32).reshape(rows, -1))
                return self._weights[name]
        raise SpecframeError(f"'{self.path}' has none of the tensors {', '.join(names)}")

    def embedding_weight(self) -> torch.Tensor:
        """(V, H) input embeddings, de-quantised from the GGUF file."""
        return self._tensor("token_embd.weight")

    def lm_head_weight(self) -> torch.Tensor:
        """(V, H) output projection (tied models: the embeddings)."""
        return self._tensor("output.weight", "token_embd.weight")

    @property
    def text_config(self):
        from types import SimpleNamespace

        return SimpleNamespace(model_type=self._meta("general.architecture"))


def _tree_features(feats: np.ndarray, lay: _Layout) -> np.ndarray:
    """A tree's feature rows (in layout order) back in tree-node order."""
    inverse = np.empty(len(lay.order), dtype=np.int64)
    inverse[lay.order] = np.arange(len(lay.order))  # tree node -> its row in the batch
    return feats[inverse]


class LlamaCppBatchRoom:
    """Continuous batching on llama.cpp: one context (one unified KV cache of the target's ``n_ctx`` cells)
    shared by up to ``capacity`` requests. Request k owns sequence ids ``k·span .. (k+1)·span − 1`` (span =
    256 // capacity, so its tree has at most ``span`` leaves) and its own positions; its tree's nodes sit in
    its sequences only, so llama.cpp's mask keeps the requests apart. :meth:`verify` puts every request's
    pending tokens and tree into ONE ``llama_decode`` (more only past 512 rows).

    Numerics are fast mode's: each output is the greedy decoding (or the sample) of the logits this batched
    call computes. Other requests' cells in the same KV view change the order of attention's sums, so a
    near-tie may resolve differently from the request's solo run (measured by ``scripts/bench_serve.py``)."""

    batched = True

    def __init__(self, target: LlamaCppTarget, max_batch: int, feature_layers: tuple[int, ...] = ()):
        if not 1 <= max_batch <= MAX_SEQ // 2:
            raise SpecframeError(f"llama.cpp batches at most {MAX_SEQ // 2} requests (sequence ids), got {max_batch}")
        self.target, self.capacity = target, int(max_batch)
        self.span = MAX_SEQ // self.capacity
        self.max_tree_tokens = self.span
        self.ctx = _Context(target, tuple(feature_layers), shared=True)
        self.cells = target.max_context
        self.slots: list[LlamaCppSession | None] = [None] * self.capacity
        self.reserved: dict[int, int] = {}  # slot -> cells its request may fill (prompt + new tokens + a tree)
        self.note = (f"llama.cpp: every request's tree verified in one llama_decode (one unified KV cache of "
                     f"{self.cells} cells, {self.span} sequences per request); fast-mode numerics: a near-tie may "
                     "resolve differently from the request's solo run")

    def cost_context(self, pasts: list[int]) -> int:
        """One call reads every request's cells (the unified KV view holds them all)."""
        return sum(pasts)

    def admits(self, tokens: int) -> bool:
        """Whether a request of ``tokens`` more cells (prompt + new tokens) fits beside those in the room."""
        return sum(self.reserved.values()) + tokens + self.span <= self.cells

    def start(self, reserve: int = 0) -> LlamaCppSession:
        free = next((k for k, s in enumerate(self.slots) if s is None), None)
        if free is None:
            raise SpecframeError(f"the llama.cpp batch room is full ({self.capacity} requests)")
        session = LlamaCppSession(self.target, self.ctx, room=self, seq=free * self.span)
        self.slots[free] = session
        self.reserved[free] = int(reserve) + self.span
        return session

    def release(self, session: LlamaCppSession) -> None:
        """The request left: its cells and its place are free."""
        slot = session.seq // self.span
        if self.slots[slot] is session:
            for s in range(session.seq, session.seq + session.used):
                self.ctx.seq_rm(s, -1)
            self.slots[slot] = None
            self.reserved.pop(slot, None)

    def verify(self, items: list[tuple[LlamaCppSession, Tree]]) -> list[ForwardOut]:
        """Every request's pending tokens and tree in one ``llama_decode`` (groups of at most 512 rows)."""
        outs: list[ForwardOut] = []
        for group in self._groups(items):
            outs += self._verify_group(group)
        return outs

    def _groups(self, items):
        group, rows = [], 0
        for session, tree in items:
            n = tree.size + len(session.pending)
            if group and rows + n > N_BATCH:
                yield group
                group, rows = [], 0
            group.append((session, tree))
            rows += n
        if group:
            yield group

    def _verify_group(self, group) -> list[ForwardOut]:
        toks, pos, seqs, flags, dest, plans = [], [], [], [], [], []
        total = 0
        for session, tree in group:
            if session.room is not self:
                raise SpecframeError("a session of another room (or none) was given to this llama.cpp batch room")
            session._check(tree.size, tree.max_depth)
            lay = layout_tree(tree.parent_list)
            t, p, q, f = session._tree_rows(lay, tree.token_list, tree.depth_list)
            toks += t
            pos += p
            seqs += q
            flags += f
            dest += [total + i for i in lay.order]
            plans.append((session, tree, lay, len(session.pending), len(t)))
            total += tree.size
        out = np.empty((total, self.target.vocab_size), dtype=np.float32)
        _, feats = self.ctx.decode(toks, pos, seqs, flags, N_BATCH, out=out, dest=dest)
        results, start, row = [], 0, 0
        for session, tree, lay, pending, width in plans:
            logits = torch.from_numpy(out[start:start + tree.size])
            f = None if feats is None else torch.from_numpy(_tree_features(feats[row + pending:row + width], lay))
            session.pending, session._last = [], (lay, tree.token_list)
            results.append(ForwardOut(logits, f))
            start, row = start + tree.size, row + width
        return results


class LlamaCppSession:
    """One request's KV cache in a llama.cpp context. ``past`` tokens are committed; the root is not.

    Accepted tokens whose cells are out of place (or gone) wait in ``pending`` and are decoded again, in
    place, at the front of the next verification (``past`` counts them already)."""

    def __init__(self, target: LlamaCppTarget, ctx: _Context, room: "LlamaCppBatchRoom | None" = None, seq: int = 0):
        self.target, self.ctx, self.room = target, ctx, room
        self.seq, self.span = seq, (room.span if room is not None else MAX_SEQ)  # its sequence ids: seq .. seq+span-1
        if room is None:
            ctx.owner = weakref.ref(self)
            ctx.clear()
        else:  # a request in a batch room: its own sequences of the shared context
            ctx.seq_rm(seq, -1)
        self.used = 1  # sequences this session's last tree used (seq .. seq+used-1)
        self.past = 0
        self.pending: list[int] = []  # tokens at positions past - len(pending) .. past - 1, not yet in the cache
        self._last: tuple[_Layout, list[int]] | None = None  # layout and tokens of the last verified tree
        self._in_place: list[int] = []  # exact mode: the tree nodes now in the cells after ``past``, root first
        self._grown = 0  # nodes of the tree that grow() has decoded (node i in sequence i), 0 when none
        self.exact = target.mode == "exact" and room is None

    def _check(self, n: int, depth: int) -> None:
        if self.room is None and self.ctx.owner() is not self:
            raise SpecframeError("this llama.cpp session was superseded by a newer one on the same target; "
                                 "start one session per request and finish it before the next")
        if self.past + depth + 1 > self.target.max_context:
            raise SpecframeError(f"sequence of {self.past + depth + 1} tokens exceeds the context of target "
                                 f"'{self.target.name}' ({self.target.max_context}); raise --backend-option n_ctx=N")

    def prefill(self, ids: list[int]) -> torch.Tensor | None:
        """Consume ``ids`` into sequence 0. Returns their features (len, F) or None."""
        if not ids:
            return None
        self._check(len(ids), len(ids) - 1)
        self._flush()
        feats = []
        for start in range(0, len(ids), N_BATCH):
            chunk = ids[start:start + N_BATCH]
            pos = list(range(self.past, self.past + len(chunk)))
            _, f = self.ctx.decode(chunk, pos, [[self.seq]] * len(chunk), [i == len(chunk) - 1 for i in range(len(chunk))])
            self.past += len(chunk)
            if f is not None:
                feats.append(f)
        return torch.from_numpy(np.concatenate(feats)) if feats else None

    def _flush(self) -> None:
        """Decode pending tokens on their own (before a prefill or a truncate)."""
        if self.pending:
            start = self.past - len(self.pending)
            toks, self.pending = self.pending, []
            self.ctx.decode(toks, list(range(start, start + len(toks))), [[self.seq]] * len(toks), [False] * len(toks))

    def verify(self, tree: Tree) -> ForwardOut:
        """Logits (and features) of every node of ``tree``, after any pending tokens."""
        parents, tokens, depths = tree.parent_list, tree.token_list, tree.depth_list
        self._check(len(tokens), max(depths))
        if len(tokens) + len(self.pending) > N_BATCH:
            raise SpecframeError(f"a tree of {len(tokens)} nodes (+{len(self.pending)} pending) exceeds llama.cpp's "
                                 f"batch of {N_BATCH}")
        lay = layout_tree(parents)
        decode = self._decode_paths if self.exact else self._decode_tree
        rows, feats = decode(lay, tokens, depths)  # (n, V), (n, F) or None; tree-node order
        self.pending = []
        self._last = (lay, tokens)
        return ForwardOut(torch.from_numpy(rows), None if feats is None else torch.from_numpy(feats))

    def _decode_paths(self, lay: _Layout, tokens: list[int], depths: list[int]):
        """Exact mode: each root-to-leaf path is decoded in place in sequence 0, one after another, the
        first-child chain (the drafter's likeliest) last so that it stays. A path keeps the cells it shares
        with the previous one and replaces the rest, so every node is decoded once, in the very cells a
        plain decode would give it: its logits are plain decoding's, bit for bit."""
        ctx, past, n = self.ctx, self.past, len(tokens)
        per_call = self.target.rows if past + max(depths) + 1 <= KV_PAD else 1  # see KV_PAD
        rows = np.empty((n, self.target.vocab_size), dtype=np.float32)
        feats = None
        front = self.pending  # decoded in place ahead of the first path
        prev: list[int] = []
        for path in reversed(lay.paths):
            shared = common_prefix(prev, path)
            if prev:
                ctx.seq_rm(0, past + shared)  # the previous path's own tail leaves; its cells are reused
            tail = path[shared:]
            toks = front + [tokens[i] for i in tail]
            pos = list(range(past - len(front), past)) + [past + depths[i] for i in tail]
            _, f = ctx.decode(toks, pos, [[0]] * len(toks), [False] * len(front) + [True] * len(tail), per_call,
                              out=rows, dest=tail)
            if f is not None:
                if feats is None:
                    feats = np.empty((n, f.shape[1]), dtype=np.float32)
                feats[tail] = f[len(front):]
            front, prev = [], path
        self._in_place = prev
        return rows, feats

    def _decode_tree(self, lay: _Layout, tokens: list[int], depths: list[int]):
        """Fast mode: the whole tree in one batch, a sequence per leaf; a node belongs to the sequences of
        the leaves below it (llama.cpp masks a row by its first sequence id: see docs/how-to/llamacpp.md)."""
        batch_tok, batch_pos, batch_seq, flags = self._tree_rows(lay, tokens, depths)
        rows = np.empty((len(tokens), self.target.vocab_size), dtype=np.float32)
        _, feats = self.ctx.decode(batch_tok, batch_pos, batch_seq, flags, self.target.rows, out=rows, dest=lay.order)
        return rows, None if feats is None else _tree_features(feats[len(self.pending):], lay)

    def _tree_rows(self, lay: _Layout, tokens: list[int], depths: list[int]):
        """The batch rows of a tree (pending tokens first, then the nodes in layout order), with every leaf
        sequence given the committed prefix: (tokens, positions, sequence ids, logit flags)."""
        ctx, past, k, base = self.ctx, self.past, len(self.pending), self.seq
        if lay.leaves > self.span:
            raise SpecframeError(f"a tree with {lay.leaves} leaves needs more than this session's {self.span} sequences")
        everyone = list(range(base, base + lay.leaves))
        for s in everyone[1:]:
            ctx.seq_cp(base, s)  # every leaf sequence shares the committed prefix
        self.used = max(self.used, lay.leaves)
        batch_tok = self.pending + [tokens[i] for i in lay.order]
        batch_pos = list(range(past - k, past)) + [past + depths[i] for i in lay.order]
        batch_seq = [everyone] * k + [[base + s for s in lay.seqs[i]] for i in lay.order]
        return batch_tok, batch_pos, batch_seq, [False] * k + [True] * len(tokens)

    def _drop_other_sequences(self) -> None:
        """Every sequence of this session but its first loses its cells (the committed prefix stays in ``seq``)."""
        if self.room is None:
            self.ctx.seq_keep(self.seq)  # one walk over the cells
        else:  # the context is shared: only this session's own sequences
            for s in range(self.seq + 1, self.seq + self.used):
                self.ctx.seq_rm(s, -1)
        self.used = 1

    def grow(self, tree: Tree, start: int) -> ForwardOut:
        """Logits of nodes ``start..`` of ``tree``, whose nodes before ``start`` are in the cache from the
        last :meth:`grow` of the same tree (a draft model drafting depth by depth; fast mode only). Node i
        decodes in sequence i (the root in 0, the committed sequence): a node's sequence is its parent's
        (the committed prefix and its ancestors, shared by ``seq_cp``, no data copied) plus itself."""
        if self.exact:
            raise SpecframeError("growing a tree call by call needs llama.cpp mode 'fast' (a draft model's mode); "
                                 "this session runs mode 'exact'")
        parents, tokens, depths = tree.parent_list, tree.token_list, tree.depth_list
        n = len(tokens)
        if n > self.span:
            raise SpecframeError(f"a grown tree of {n} nodes needs more than this session's {self.span} sequences")
        if start != self._grown:
            raise SpecframeError(f"grow(start={start}) after {self._grown} grown nodes: grow the same tree in order")
        self._check(n, max(depths))
        rows = np.empty((n - start, self.target.vocab_size), dtype=np.float32)
        done = start
        while done < n:  # a call per depth, so every parent's cell exists before its children join its sequence
            group = [i for i in range(done, n) if depths[i] == depths[done]]
            group = group[: next((k for k, i in enumerate(group) if i != done + k), len(group))]
            base = self.seq
            for i in group:
                if i:
                    self.ctx.seq_cp(base + parents[i], base + i)
            self.ctx.decode([tokens[i] for i in group], [self.past + depths[i] for i in group],
                            [[base + i] for i in group], [True] * len(group), self.target.rows, out=rows,
                            dest=[i - start for i in group])
            self.used = max(self.used, group[-1] + 1)
            done += len(group)
        self._grown = n
        return ForwardOut(torch.from_numpy(rows), None)

    def keep(self, path: list[int], tree_size: int) -> None:
        """Keep the accepted ``path`` (node indices, root first) in sequence 0; drop every other node."""
        if self._grown:
            if path[-1]:  # the path joins the committed sequence
                self.ctx.seq_cp(self.seq + path[-1], self.seq, self.past + 1, self.past + len(path))
            self._drop_other_sequences()
            self._grown = 0
        elif self.exact:
            self._keep_in_place(path)
        else:
            self._keep_leaf(path)
        self.past += len(path)
        self._last = None

    def _keep_in_place(self, path: list[int]) -> None:
        """Exact mode: the part of the path that is in place stays; the rest (its logits were exact, its
        cells are gone) waits in ``pending`` to be decoded again in place."""
        _, tokens = self._last
        kept = common_prefix(self._in_place, path)
        if kept < len(self._in_place):  # (a call that removes nothing still walks every KV cell)
            self.ctx.seq_rm(0, self.past + kept)
        self.pending = [tokens[i] for i in path[kept:]]

    def _keep_leaf(self, path: list[int]) -> None:
        """Fast mode: the path's cells stay wherever they are (copied from a leaf's sequence into 0)."""
        lay, past, base = self._last[0], self.past, self.seq
        leaf_seq = lay.seqs[path[-1]][0]  # a leaf below the last accepted node
        if leaf_seq != 0:
            self.ctx.seq_rm(base, past)
            self.ctx.seq_cp(base + leaf_seq, base, past, past + len(path))
        else:
            self.ctx.seq_rm(base, past + len(path))
        for s in range(1, lay.leaves):
            self.ctx.seq_rm(base + s, -1)
        self.used = 1

    def rollback(self, n: int) -> None:
        """Forget the last verification (e.g. a timing probe): every cell at or after ``past``."""
        if n:
            if self.room is None:
                self.ctx.seq_rm(-1, self.past)
            else:
                for s in range(self.seq, self.seq + self.used):
                    self.ctx.seq_rm(s, self.past)
            if self._grown or (self._last is not None and not self.exact):  # their sequences hold prefix copies
                self._drop_other_sequences()
                self._grown = 0
            self._last = None

    def truncate(self, length: int) -> None:
        """Forget committed tokens beyond the first ``length``."""
        if length < self.past:
            self._flush()
            self.ctx.seq_rm(-1 if self.room is None else self.seq, length)
            self.past = length
