"""Built-in block-diffusion drafter ``dflash`` (the published DFlash architecture, in plain torch).

Architecture (facts from the DFlash paper and released configs):

* a few decoder layers of the target's family, and no embedding or LM head of their own: the block is
  embedded with the target's ``embed_tokens`` and read out with the target's ``lm_head``;
* context features = RMSNorm(W_fc · concat of the target's hidden states at ``target_layer_ids``);
* in every draft layer the keys/values are [projected context features ; block tokens], the queries
  come from the block tokens only; the block ``[last committed token, MASK × (B−1)]`` attends
  bidirectionally to itself and to all context; absolute RoPE positions;
* one forward yields the marginals q_1..q_{B−1} (the outputs at the MASK slots).

Checkpoints use the published layout: ``config.json`` (layer shapes plus ``dflash_config`` with
``block_size``, ``mask_token_id``, ``target_layer_ids``) and ``model.safetensors`` with tensors named
``fc.weight``, ``hidden_norm.weight``, ``norm.weight`` and ``layers.{i}.{self_attn,mlp,...}``.

One optional extension (in the spirit of EAGLE-3's draft vocabulary): ``dflash_config.draft_vocab_size``
K and a tensor ``draft_vocab`` (K target token ids). The drafter then reads out only those K rows of the
target's LM head — on a CPU the full 49 K-row head is most of a draft step — and proposes nothing
outside them (q = 0 there; the output is unchanged, only which guesses can be made). Without it the
whole vocabulary is used, as published.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specframe import hookimpl
from specframe.backends import capabilities, require_features
from specframe.components import Draft, Drafter, EmptyDraft, MarginalDraft
from specframe.errors import SpecframeError
from specframe.resources import shipped_drafters_dir


@dataclass
class DFlashConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qk_norm: bool = False
    model_type: str = "llama"
    num_target_layers: int | None = None
    draft_vocab_size: int | None = None  # None: the whole target vocabulary
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict) -> "DFlashConfig":
        dcfg = raw.get("dflash_config", {})
        get = lambda key, default=None: dcfg.get(key, raw.get(key, default))  # noqa: E731
        heads = int(raw["num_attention_heads"])
        rope = raw.get("rope_parameters") or {}
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        missing = [k for k in ("block_size", "mask_token_id", "target_layer_ids") if get(k) is None]
        if missing:
            raise SpecframeError(f"DFlash config lacks {', '.join(missing)} (expected under 'dflash_config')")
        return cls(
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            vocab_size=int(raw["vocab_size"]),
            block_size=int(get("block_size")),
            mask_token_id=int(get("mask_token_id")),
            target_layer_ids=[int(x) for x in get("target_layer_ids")],
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            qk_norm=bool(raw.get("qk_norm", raw.get("model_type") == "qwen3")),
            model_type=str(raw.get("model_type", "llama")),
            num_target_layers=raw.get("num_target_layers"),
            draft_vocab_size=None if get("draft_vocab_size") is None else int(get("draft_vocab_size")),
            extra={k: v for k, v in raw.items() if k in ("training", "target_fingerprint")},
        )

    def to_dict(self) -> dict:
        out = {
            "architectures": ["DFlashDraftModel"],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "qk_norm": self.qk_norm,
            "hidden_act": "silu",
            "attention_bias": False,
            "is_causal": False,
            "tie_word_embeddings": False,
            "num_target_layers": self.num_target_layers,
            "dflash_config": {
                "block_size": self.block_size,
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": list(self.target_layer_ids),
            },
        }
        if self.draft_vocab_size is not None:
            out["dflash_config"]["draft_vocab_size"] = self.draft_vocab_size
        out.update(self.extra)
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of ``x`` (heads, n, d) at positions ``pos`` (n,)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    ang = pos.float()[:, None] * inv[None]  # (n, d/2)
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.hd, self.theta = cfg.num_attention_heads, cfg.num_key_value_heads, hd, cfg.rope_theta
        self.q_proj = nn.Linear(h, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, h, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def kv(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (kv_heads, n, hd) of ``x`` (n, H) at positions ``pos``."""
        k = self.k_proj(x).view(-1, self.kv_heads, self.hd).transpose(0, 1)
        if self.k_norm is not None:
            k = self.k_norm(k)
        v = self.v_proj(x).view(-1, self.kv_heads, self.hd).transpose(0, 1)
        return rope(k, pos, self.theta), v

    def forward(self, x, pos, ctx_k, ctx_v, mask):
        """x (n, H) block tokens; ctx_k/ctx_v (kv_heads, S, hd); mask (n, S + n) bool or None."""
        q = self.q_proj(x).view(-1, self.heads, self.hd).transpose(0, 1)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = rope(q, pos, self.theta)
        k_blk, v_blk = self.kv(x, pos)
        k = torch.cat([ctx_k, k_blk], dim=1)
        v = torch.cat([ctx_v, v_blk], dim=1)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[None])
        return self.o_proj(out.transpose(0, 1).reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, pos, ctx_k, ctx_v, mask):
        x = x + self.self_attn(self.input_layernorm(x), pos, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashModel(nn.Module):
    """The draft network. Embedding and LM head weights are the target's, passed in by the caller."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.fc = nn.Linear(len(cfg.target_layer_ids) * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.draft_vocab_size is not None:
            self.register_buffer("draft_vocab", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        """Restrict the read-out to target token ``ids`` (K,), or lift the restriction with None."""
        if hasattr(self, "draft_vocab"):
            del self.draft_vocab
        self.cfg.draft_vocab_size = None if ids is None else int(ids.numel())
        if ids is not None:
            self.register_buffer("draft_vocab", ids.detach().to(torch.long).clone())

    def head_rows(self, head: torch.Tensor) -> torch.Tensor:
        """The target LM head (V, H) cut to the draft vocabulary (K, H); row i scores ``draft_vocab[i]``."""
        return head if self.cfg.draft_vocab_size is None else head[self.draft_vocab].contiguous()

    def context(self, feats: torch.Tensor) -> torch.Tensor:
        """(S, L·H) target features → (S, H) context hidden states."""
        return self.hidden_norm(self.fc(feats.to(self.fc.weight.dtype)))

    def context_kv(self, ctx: torch.Tensor, pos: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer keys/values of the context (independent of the block, so cacheable)."""
        return [layer.self_attn.kv(ctx, pos) for layer in self.layers]

    def forward(self, block_emb, pos, ctx_kv, mask=None):
        """block_emb (n, H), pos (n,), ctx_kv per layer; returns normed hidden states (n, H)."""
        x = block_emb
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x = layer(x, pos, k, v, mask)
        return self.norm(x)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, dtype: torch.dtype = torch.bfloat16, extra_config: dict | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg.to_dict()
        cfg["dtype"] = str(dtype).replace("torch.", "")
        cfg.update(extra_config or {})
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "DFlashModel":
        from safetensors.torch import load_file

        path = resolve_checkpoint(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        for f in (cfg_file, weights):
            if not f.is_file():
                raise SpecframeError(f"DFlash checkpoint is missing {f}")
        cfg = DFlashConfig.from_dict(json.loads(cfg_file.read_text()))
        state = load_file(str(weights))
        cfg.qk_norm = any(".q_norm." in k for k in state)
        model = cls(cfg)
        own = model.state_dict()
        unexpected = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        if unexpected or missing:
            raise SpecframeError(
                f"DFlash checkpoint {path} does not fit the DFlash architecture: "
                f"{'unexpected ' + unexpected[0] if unexpected else 'missing ' + missing[0]} "
                f"({len(unexpected)} unexpected, {len(missing)} missing tensors)"
            )
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise SpecframeError(f"DFlash checkpoint tensor {k} has shape {tuple(v.shape)}, config implies {tuple(own[k].shape)}")
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
        return model.to(dtype).eval()


def resolve_checkpoint(path: str | Path) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub (needs network access)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), allow_patterns=["config.json", "*.safetensors"]))
        except Exception as err:  # noqa: BLE001 - offline, unknown repo, ...
            raise SpecframeError(f"DFlash checkpoint '{path}' is not a local directory and could not be fetched: {type(err).__name__}") from err
    raise SpecframeError(f"DFlash checkpoint not found: {p}")


def check_fits(cfg: DFlashConfig, target, vocab: torch.Tensor | None = None) -> None:
    """One clear error if the drafter does not fit the target (naming both values)."""
    if cfg.hidden_size != target.hidden_size:
        raise SpecframeError(f"DFlash drafter hidden size {cfg.hidden_size} does not fit target '{target.name}' hidden size {target.hidden_size}")
    if cfg.vocab_size != target.vocab_size:
        raise SpecframeError(f"DFlash drafter vocabulary {cfg.vocab_size} does not fit target '{target.name}' vocabulary {target.vocab_size}")
    bad = [i for i in cfg.target_layer_ids if not 0 <= i < target.num_layers]
    if bad:
        raise SpecframeError(f"DFlash drafter reads target layers {cfg.target_layer_ids}, but target '{target.name}' has layers 0..{target.num_layers - 1}")
    if not 0 <= cfg.mask_token_id < target.vocab_size:
        raise SpecframeError(f"DFlash mask token id {cfg.mask_token_id} is outside the target vocabulary [0, {target.vocab_size})")
    if vocab is not None and vocab.numel() and not 0 <= int(vocab.min()) <= int(vocab.max()) < target.vocab_size:
        raise SpecframeError(f"DFlash draft vocabulary holds token id {int(vocab.max())}, outside target '{target.name}' vocabulary [0, {target.vocab_size})")


class DFlashDrafter(Drafter):
    """Drafts a block of marginals per step; keeps its own cache of context keys/values."""

    name = "dflash"
    sampling_q = True  # its candidates' log-probs are the block's softmax marginals

    def __init__(self, target=None, path: str | None = None, top_k: int = 8, block_size: int | None = None,
                 rank_head: str | None = None):
        if target is None:
            raise ValueError("the dflash drafter needs the target")
        require_features(target, "the dflash drafter")
        if path is None:
            path = shipped_drafter(target)
            if path is None:
                raise SpecframeError(f"no DFlash drafter is known for target '{target.name}'; give one with --drafter dflash:PATH")
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        self.model = DFlashModel.load(path, dtype=target.dtype).to(target.device)
        self.cfg = self.model.cfg
        self.vocab = getattr(self.model, "draft_vocab", None)  # (K,) target ids, or None: all
        check_fits(self.cfg, target, self.vocab)
        self.embed, self.head = target.embedding_weight(), self.model.head_rows(target.lm_head_weight())
        self.feature_layers = tuple(self.cfg.target_layer_ids)
        self.block = min(block_size or self.cfg.block_size, self.cfg.block_size)
        self.max_depth = self.block - 1
        self.top_k = top_k
        self.path = str(path)
        self._kv: list[list[torch.Tensor]] = []
        self._pending: list[torch.Tensor] = []
        self._len = 0
        self.rank_head = self._load_rank_head(rank_head)

    def _load_rank_head(self, rank_head: str | None):
        """SpecBlock's rank head (see :mod:`specframe.plugins.rank_blocks`), loaded only when asked for:
        ``"auto"`` is the ``rank_head.safetensors`` beside the checkpoint (none for a checkpoint of one's own
        that has none; the shipped drafter's must be there), else a file or directory."""
        if rank_head is None or rank_head is False or str(rank_head).lower() in ("", "none", "off", "false"):
            return None
        from specframe.plugins.rank_blocks import HEAD_FILE, RankHead

        where = Path(rank_head)
        if str(rank_head).lower() in ("auto", "true", "on"):
            where = Path(self.path) / HEAD_FILE
            shipped = Path(self.path).resolve().parent == shipped_drafters_dir().resolve()
            if not where.exists() and not shipped:
                return None
        head = RankHead.load(where)
        want = self.cfg.hidden_size + self.cfg.block_size - 1 + 15  # see rank_blocks.slot_features
        if head.feature_dim != want:
            raise SpecframeError(f"rank head {where} reads {head.feature_dim} features, this drafter gives {want}; "
                                 f"train one for it with `python -m specframe.plugins.rank_blocks_train`")
        return head

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        self._kv = [[] for _ in self.model.layers]
        self._pending = [] if features is None else [features]
        self._len = 0

    def commit(self, tokens: list[int], features: torch.Tensor | None) -> None:
        if features is not None:
            self._pending.append(features)

    @torch.inference_mode()
    def _absorb(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Project newly committed features into the per-layer context cache."""
        if self._pending:
            feats = torch.cat(self._pending)
            self._pending = []
            pos = torch.arange(self._len, self._len + feats.shape[0], device=feats.device)
            for cache, (k, v) in zip(self._kv, self.model.context_kv(self.model.context(feats), pos)):
                cache[:] = [torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1)] if cache else [k, v]
            self._len += feats.shape[0]
        return [(c[0], c[1]) for c in self._kv]

    @torch.inference_mode()
    def marginals(self, root: int) -> torch.Tensor:
        """Log-probabilities (B−1, K) of the block after ``root``; column i is token ``vocab[i]``
        (K = V and column i is token i when the checkpoint has no draft vocabulary)."""
        ctx_kv = self._absorb()
        if not ctx_kv or ctx_kv[0][0].shape[1] == 0:
            raise SpecframeError("the dflash drafter needs at least one context token before the root")
        return self._block(root, ctx_kv)[1]

    def _block(self, root: int, ctx_kv) -> tuple[torch.Tensor, torch.Tensor]:
        """The MASK slots' hidden states (B−1, H) and log-probabilities (B−1, K) of the block after ``root``."""
        ids = torch.tensor([root] + [self.cfg.mask_token_id] * (self.block - 1), device=self.embed.device)
        pos = torch.arange(self._len, self._len + self.block, device=ids.device)
        h = self.model(F.embedding(ids, self.embed), pos, ctx_kv)
        return h[1:], F.log_softmax(F.linear(h[1:], self.head).float(), dim=-1)

    @classmethod
    def availability(cls, target) -> tuple[bool, str]:
        """``drafter=auto`` picks this drafter when specframe ships one for the target (and why not)."""
        return shipped_availability(target)

    auto_priority = 10

    @staticmethod
    def trainer():
        """The module that trains this drafter for a target by self-distillation (``specframe train-drafter``)."""
        from specframe.plugins import dflash_train

        return dflash_train

    def describe(self) -> str:
        return f"dflash:{self.path}"

    def propose(self, context_ids: list[int], max_depth: int) -> Draft:
        if max_depth <= 0:
            return EmptyDraft()
        if self.rank_head is None:
            logq = self.marginals(context_ids[-1])[:max_depth]
        else:
            with torch.inference_mode():
                ctx_kv = self._absorb()
                if not ctx_kv or ctx_kv[0][0].shape[1] == 0:
                    raise SpecframeError("the dflash drafter needs at least one context token before the root")
                h, logq = (t[:max_depth] for t in self._block(context_ids[-1], ctx_kv))
        top = logq.topk(min(self.top_k, logq.shape[-1]), dim=-1)
        ids = top.indices if self.vocab is None else self.vocab[top.indices]
        draft = MarginalDraft(ids, top.values)
        if self.rank_head is not None:  # SpecBlock's rank classes per slot (probabilities of 1 / 2-4 / 5-10 / >10)
            from specframe.plugins.rank_blocks import slot_features

            slots = torch.arange(h.shape[0], device=h.device)
            draft.rank_classes = self.rank_head.probs(slot_features(h, logq, slots, self.cfg.block_size - 1)).tolist()
            draft.rank_prior = self.rank_head.prior.tolist()
        return draft


def shipped_drafter(target) -> Path | None:
    """The drafter shipped with specframe for ``target``, matched by the target's shape."""
    return _find_shipped(target)[0]


def shipped_availability(target) -> tuple[bool, str]:
    """Whether ``auto`` should use a shipped drafter for ``target``, and why (or why not) in words: one
    must fit the target, and the backend must give hidden states without extra work on every forward
    (``Capabilities.free_features``); otherwise a block drafter is only used when asked for by name."""
    path, reason = _find_shipped(target)
    caps = capabilities(target)
    if path is not None and caps.features and not caps.free_features:
        backend = getattr(target, "backend", "?")
        return False, (f"backend '{backend}' gives hidden states at a price on every forward ({caps.feature_note or 'extra host work'}), "
                       f"which the shipped block drafter has not repaid on it; pass --drafter hybrid or "
                       f"--drafter dflash to run it anyway (the draft gate still decides per step)")
    return path is not None, reason


def _find_shipped(target) -> tuple[Path | None, str]:
    root = shipped_drafters_dir()
    configs = sorted(root.glob("*/config.json")) if root.is_dir() else []
    if not configs:
        return None, f"specframe's shipped drafters are missing from {root}; reinstall specframe"
    want = target_fingerprint(target)
    for cfg_file in configs:
        fp = json.loads(cfg_file.read_text()).get("target_fingerprint", {})
        if fp and fp == want:
            if not (cfg_file.parent / "model.safetensors").is_file():
                return None, f"shipped drafter {cfg_file.parent} has no model.safetensors; reinstall specframe"
            return cfg_file.parent, f"shipped block drafter {cfg_file.parent} fits target '{target.name}'"
    shape = ", ".join(f"{k} {v}" for k, v in want.items())
    return None, (f"no shipped block drafter fits target '{target.name}' ({shape}); train one with "
                  f"`specframe train-drafter` and pass it as --drafter dflash:PATH")


def target_fingerprint(target) -> dict:
    return {"hidden_size": target.hidden_size, "num_layers": target.num_layers, "vocab_size": target.vocab_size,
            "model_type": getattr(target.text_config, "model_type", "")}


@hookimpl
def register_drafters(register):
    register("dflash", DFlashDrafter)
