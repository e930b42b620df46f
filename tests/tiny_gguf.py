"""Tiny random GGUF models for the llama.cpp backend's tests, written with the ``gguf`` package.

A Llama-architecture model (vocab 96, hidden 32, 2 layers, 4 heads, 2 KV heads) with a SentencePiece-style
vocabulary: ``<unk>``, ``<s>``, ``</s>``, then one piece per printable character. Linear weights are
stored quantised (Q8_0 by default, like the real runtime's quantised files), norms in F32.
"""

from __future__ import annotations

import functools
import string
from pathlib import Path

import numpy as np

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, CONTEXT = 96, 32, 2, 4, 2, 64, 512
EOS = 2


def _pieces(vocab: int) -> list[str]:
    chars = [c for c in string.ascii_letters + string.digits + string.punctuation if c not in "<>"]
    pieces = ["<unk>", "<s>", "</s>", "▁"] + chars
    pieces += [f"▁{c}" for c in chars]
    return pieces[:vocab]


def write_tiny_gguf(path: Path, seed: int = 0, qtype: str = "Q8_0", vocab: int = VOCAB, eos: int | None = EOS) -> Path:
    """Write a tiny random Llama GGUF to ``path`` (returns it)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-llama-{seed}")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    pieces = _pieces(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(len(pieces) - 3)])
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(pieces) - 3)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    if eos is not None:
        w.add_eos_token_id(eos)
    w.add_add_bos_token(False)

    quant = getattr(gguf.GGMLQuantizationType, qtype)

    def add(name: str, shape: tuple[int, ...], scale: float = 0.5, norm: bool = False) -> None:
        if norm:
            data = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            w.add_tensor(name, data)
            return
        data = (scale * rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if quant == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)

    head_dim = HIDDEN // HEADS
    add("token_embd.weight", (vocab, HIDDEN), scale=1.0 * np.sqrt(HIDDEN))
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), norm=True)
        add(f"blk.{i}.attn_q.weight", (HEADS * head_dim, HIDDEN), scale=2.0)
        add(f"blk.{i}.attn_k.weight", (KV_HEADS * head_dim, HIDDEN), scale=2.0)
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * head_dim, HIDDEN))
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HEADS * head_dim))
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), norm=True)
        add(f"blk.{i}.ffn_gate.weight", (INTER, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", (INTER, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, INTER))
    add("output_norm.weight", (HIDDEN,), norm=True)
    add("output.weight", (vocab, HIDDEN), scale=4.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@functools.lru_cache(maxsize=None)
def tiny_gguf(directory: str, seed: int = 0, qtype: str = "Q8_0") -> Path:
    """A cached tiny GGUF under ``directory`` (written once per arguments)."""
    path = Path(directory) / f"tiny-llama-{seed}-{qtype}.gguf"
    if not path.exists():
        write_tiny_gguf(path, seed, qtype)
    return path
