"""Training a DFlash block-diffusion drafter by self-distillation (``specframe train-drafter``).

Three resumable stages, each writing under one work directory:

1. **data** – the target's own greedy answers to ShareGPT prompts (``data.jsonl``). For the embedded
   SmolLM2 a ready file exists (pass it with ``--data``); for any other target it is generated here.
   Evaluation prompts are never used: ShareGPT records with index % 10 == 0 are held out.
2. **features** – teacher-forced hidden states of the target at the drafter's ``target_layer_ids``,
   cached to disk in shards (``features/``); a restart continues after the last finished shard.
3. **training** – the published DFlash objective: random anchor positions per sequence, block
   ``[x_anchor, MASK × (B−1)]`` whose queries see the context strictly before the anchor plus their
   own block; cross-entropy of slot k ≥ 1 on x_{anchor+k}, weighted exp(−(k−1)/γ). Checkpoints
   (safetensors only, optimizer state included) every ``save_every`` steps; a restart resumes.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from specframe.errors import SpecframeError
from specframe.plugins.hf import Target

MAX_PROMPT_TOKENS = 384


# ---------------------------------------------------------------------- stage 1: data
def read_rows(paths: list[str], max_response: int, max_rows: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids[:max_response]) from self-distillation JSONL files, held-out rows skipped."""
    rows = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise SpecframeError(f"training data file not found: {p}")
        for line in p.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("sharegpt_index", 1) % 10 == 0:
                continue  # held-out evaluation slice: never train on it
            prompt, resp = row.get("prompt_ids") or [], (row.get("response_ids") or [])[:max_response]
            if prompt and len(resp) >= 2 and len(prompt) <= MAX_PROMPT_TOKENS:
                rows.append((prompt, resp))
    if not rows:
        raise SpecframeError(f"training data {', '.join(paths)} yields no usable sequences (prompt ≤ {MAX_PROMPT_TOKENS} tokens, ≥ 2 response tokens, not held out)")
    random.Random(0).shuffle(rows)
    # Short prompts first: on a slow machine feature extraction is the bottleneck, and the response tokens
    # (what the drafter learns to guess) are the useful part of each sequence.
    rows.sort(key=lambda r: len(r[0]) // 32)
    return rows[:max_rows] if max_rows else rows


def generate_data(target: Target, out: Path, num_prompts: int, max_new_tokens: int, log,
                  sources: tuple[str, ...] = ("sharegpt",), batch_size: int = 32,
                  deadline: float | None = None) -> Path:
    """Self-distillation data for any target: its greedy answers to training prompts from ``sources``
    (:func:`specframe.datasets.training_prompts`; never an evaluation prompt). Answers are made in
    length-sorted batches; a rerun appends to ``out`` and skips the prompts it already holds. Past
    ``deadline`` (a ``time.time()``) it stops after the batch in flight."""
    from specframe.datasets import encode, training_prompts

    done: set[str] = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done.add(row.get("id") or f"sharegpt-{row['sharegpt_index']}")
    todo = []
    for p in training_prompts(list(sources), limit=num_prompts):
        if len(done) + len(todo) >= num_prompts:
            break
        if p.id not in done:
            ids = encode(p, target)
            if len(ids) <= MAX_PROMPT_TOKENS:
                todo.append((p, ids))
    t0, made = time.perf_counter(), 0
    with open(out, "a") as fh:
        for s in range(0, len(todo), batch_size * 8):  # sort within windows: little padding, steady progress
            window = sorted(todo[s : s + batch_size * 8], key=lambda item: len(item[1]))
            for b in range(0, len(window), batch_size):
                if deadline is not None and time.time() > deadline:
                    log("data: deadline reached; rerun to continue")
                    return out
                chunk = window[b : b + batch_size]
                answers = greedy_batch(target, [ids for _, ids in chunk], max_new_tokens)
                for (p, ids), ans in zip(chunk, answers):
                    row = {"source": p.dataset, "id": p.id, "prompt_ids": ids, "response_ids": ans,
                           "finished": bool(ans and ans[-1] in target.eos_token_ids)}
                    if "index" in p.meta:
                        row["sharegpt_index"] = p.meta["index"]
                    fh.write(json.dumps(row) + "\n")
                    made += len(ans)
                fh.flush()
                done.update(p.id for p, _ in chunk)
                log(f"data: {len(done)}/{num_prompts} prompts ({made / (time.perf_counter() - t0):.0f} answer tok/s)")
    return out


@torch.inference_mode()
def greedy_batch(target: Target, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of several prompts by a transformers ``target`` in one left-padded batch, each
    cut after its first EOS.
    Fast for making training data; padding can flip a near-tie, so where exact greedy output matters
    use ``SpecGenerator`` instead."""
    pad = (target.eos_token_ids or (0,))[0]
    width, rows = max(len(p) for p in prompts), len(prompts)
    x = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=target.device)  # (R, W)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=target.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (R, W) each row's positions start at 0
    cache = target.make_cache()
    out = torch.empty(rows, 0, dtype=torch.long, device=target.device)
    done = torch.zeros(rows, dtype=torch.bool, device=target.device)
    eos = torch.tensor(target.eos_token_ids or (-1,), device=target.device)
    for _ in range(max_new_tokens):
        logits = target.model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True,
                            logits_to_keep=1, **{target.cache_keyword: cache}).logits[:, -1]  # (R, V)
        nxt = logits.argmax(-1).masked_fill(done, pad)  # (R,)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        x, pos = nxt[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=target.device)], dim=1)
    answers = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in target.eos_token_ids), len(row))
        answers.append(row[:cut])
    return answers


# ---------------------------------------------------------------------- stage 2: features
@torch.inference_mode()
def target_features(target, ids: list[int], layers: tuple[int, ...]) -> torch.Tensor:
    """Teacher-forced hidden states ``(len(ids), len(layers)·H)`` of ``ids`` at decoder ``layers``, through
    the backend seam (a prefill that asks for features)."""
    return target.start(tuple(layers)).prefill(ids)


class FeatureStore:
    """Sharded cache of (tokens, prompt length, fp16 features) per sequence, resumable."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta_file = self.root / "meta.json"
        self.meta = json.loads(self.meta_file.read_text()) if self.meta_file.is_file() else {"shards": [], "rows_done": 0}

    def extract(self, target: Target, rows, layers: tuple[int, ...], shard_rows: int = 64, log=print,
                deadline: float | None = None) -> None:
        if self.meta.get("layers") not in (None, list(layers)):
            raise SpecframeError(f"feature cache {self.root} holds layers {self.meta['layers']}, not {list(layers)}; use a new work dir")
        self.meta["layers"] = list(layers)
        start = self.meta["rows_done"]
        t0, tokens_done = time.perf_counter(), 0
        for s in range(start, len(rows), shard_rows):
            if deadline is not None and time.time() > deadline:
                log("features: deadline reached; rerun to continue")
                return
            chunk = rows[s : s + shard_rows]
            toks, feats, lens, plens = [], [], [], []
            for prompt, resp in chunk:
                ids = prompt + resp
                f = target_features(target, ids[:-1], layers)  # the last token's features are never context
                toks.append(np.asarray(ids, dtype=np.int32))
                feats.append(f.to(torch.float16).cpu().numpy())
                lens.append(len(ids))
                plens.append(len(prompt))
                tokens_done += len(ids)
            name = f"shard_{len(self.meta['shards']):05d}"
            np.save(self.root / f"{name}.tokens.npy", np.concatenate(toks))
            np.save(self.root / f"{name}.feats.npy", np.concatenate(feats))
            self.meta["shards"].append({"name": name, "lengths": lens, "prompt_lengths": plens})
            self.meta["rows_done"] = s + len(chunk)
            tmp = self.meta_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.meta))
            tmp.replace(self.meta_file)
            rate = tokens_done / (time.perf_counter() - t0)
            log(f"features: {self.meta['rows_done']}/{len(rows)} rows ({rate:.0f} tok/s)")

    def sequences(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """All cached (tokens (T,), features (T-1, F) fp16, prompt_len), memory-mapped."""
        out = []
        for shard in self.meta["shards"]:
            toks = np.load(self.root / f"{shard['name']}.tokens.npy", mmap_mode="r")
            feats = np.load(self.root / f"{shard['name']}.feats.npy", mmap_mode="r")
            t_off = f_off = 0
            for length, plen in zip(shard["lengths"], shard["prompt_lengths"]):
                out.append((toks[t_off : t_off + length], feats[f_off : f_off + length - 1], plen))
                t_off += length
                f_off += length - 1
        return out


# ---------------------------------------------------------------------- stage 3: training
@dataclass
class TrainConfig:
    block_size: int = 8
    num_layers: int = 2
    target_layer_ids: list[int] | None = None  # default: spread over the target's depth
    init_from_target: bool = True  # draft layers start as copies of the target's top layers
    mask_token_id: int | None = None
    steps: int = 2000
    batch_size: int = 8
    anchors_per_seq: int = 4
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.0
    gamma: float | None = None  # loss decay over block slots; default block_size / 2
    save_every: int = 200
    eval_every: int = 200
    eval_sequences: int = 64
    draft_vocab: int = 0  # > 0: read out only the K most frequent answer tokens (0: the whole vocabulary)
    init_from: str | None = None  # start from this drafter's weights (fresh optimizer and schedule)
    seed: int = 0
    extra: dict = field(default_factory=dict)


def default_layer_ids(num_layers: int, count: int = 3) -> list[int]:
    """``count`` target layers spread from near the bottom to near the top (DFlash-style)."""
    if num_layers <= count:
        return list(range(num_layers))
    return sorted({round(1 + i * (num_layers - 3) / (count - 1)) for i in range(count)})


def default_mask_token(target: Target) -> int:
    """A token id the target rarely emits, to stand for MASK (a spare special token where one exists)."""
    tok = target.tokenizer
    for name in ("<empty_output>", "<|MASK|>", "<mask>", "<unk>", "<pad>"):
        tid = tok.convert_tokens_to_ids(name) if hasattr(tok, "convert_tokens_to_ids") else None
        if isinstance(tid, int) and 0 <= tid < target.vocab_size and tid != getattr(tok, "unk_token_id", None):
            return tid
    return target.vocab_size - 1


def new_drafter(target: Target, cfg: TrainConfig):
    from specframe.plugins.dflash import DFlashConfig, DFlashModel, target_fingerprint

    tc = target.text_config
    layers = cfg.target_layer_ids or default_layer_ids(target.num_layers)
    dcfg = DFlashConfig(
        hidden_size=target.hidden_size,
        intermediate_size=int(tc.intermediate_size),
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=int(tc.num_attention_heads),
        num_key_value_heads=int(getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads),
        head_dim=int(getattr(tc, "head_dim", None) or target.hidden_size // tc.num_attention_heads),
        vocab_size=target.vocab_size,
        block_size=cfg.block_size,
        mask_token_id=cfg.mask_token_id if cfg.mask_token_id is not None else default_mask_token(target),
        target_layer_ids=list(layers),
        rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
        rope_theta=float((getattr(tc, "rope_parameters", None) or {}).get("rope_theta", getattr(tc, "rope_theta", 10000.0))),
        qk_norm=getattr(tc, "model_type", "") in ("qwen3",),
        model_type=getattr(tc, "model_type", "llama"),
        num_target_layers=target.num_layers,
        extra={"target_fingerprint": target_fingerprint(target)},
    )
    model = DFlashModel(dcfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.02)
        eye = torch.eye(target.hidden_size) / len(layers)
        model.fc.weight.copy_(torch.cat([eye] * len(layers), dim=1))
        if cfg.init_from_target:
            top = range(target.num_layers - cfg.num_layers, target.num_layers)
            for layer, src in zip(model.layers, top):
                state = {k: v for k, v in target.layer_weights(src).items() if k in layer.state_dict()}
                layer.load_state_dict(state, strict=False)
            norm = target.final_norm_weight()
            if norm is not None:
                model.norm.weight.copy_(norm)
    return model


def block_batch(tokens: np.ndarray, plen: int, anchors: list[int], block: int, mask_id: int):
    """Inputs of one sequence's blocks: ids (A·B,), positions (A·B,), labels (A·B,) with -100 where
    there is nothing to predict, and the attention mask (A·B, S + A·B) over [context ; blocks]."""
    T = len(tokens)
    S = T - 1
    nq = len(anchors) * block
    ids = torch.full((nq,), mask_id, dtype=torch.long)
    pos = torch.zeros(nq, dtype=torch.long)
    labels = torch.full((nq,), -100, dtype=torch.long)
    mask = torch.zeros(nq, S + nq, dtype=torch.bool)
    for j, a in enumerate(anchors):
        r = slice(j * block, (j + 1) * block)
        ids[j * block] = int(tokens[a])
        pos[r] = torch.arange(a, a + block)
        for k in range(1, block):
            if a + k < T:
                labels[j * block + k] = int(tokens[a + k])
        mask[r, :a] = True  # context strictly before the anchor
        mask[r, S + j * block : S + (j + 1) * block] = True  # its own block, bidirectionally
    return ids, pos, labels, mask


def sequence_loss(model, embed, head, seq, anchors, block, mask_id, weights, t2d=None):
    """Weighted block cross-entropy of one sequence; returns (loss sum, weight sum, per-slot hits, counts).

    ``head`` is the (possibly draft-vocabulary) read-out; ``t2d`` (V,) maps a target id to its row, -1
    where the draft vocabulary lacks it: such labels leave the loss and count as misses."""
    tokens, feats, plen = seq
    ids, pos, labels, mask = block_batch(tokens, plen, anchors, block, mask_id)
    ctx = model.context(torch.from_numpy(np.asarray(feats, dtype=np.float32)))
    ctx_kv = model.context_kv(ctx, torch.arange(ctx.shape[0]))
    h = model(F.embedding(ids, embed), pos, ctx_kv, mask)
    keep = labels >= 0
    slot = (torch.arange(len(ids)) % block)[keep]
    rows = labels[keep] if t2d is None else t2d[labels[keep]]
    inside = rows >= 0
    logits = F.linear(h[keep], head)
    ce = F.cross_entropy(logits[inside].float(), rows[inside], reduction="none")
    w = weights[slot]
    hits = ((logits.argmax(-1) == rows) & inside).float()
    per_hits = torch.zeros(block).index_add_(0, slot, hits)
    per_count = torch.zeros(block).index_add_(0, slot, torch.ones_like(hits))
    return (ce * w[inside]).sum(), w[inside].sum(), per_hits, per_count


def frequent_tokens(seqs, rows: list[int], k: int) -> torch.Tensor:
    """The ``k`` most frequent answer tokens of sequences ``rows`` (ids, most frequent first)."""
    counts = np.zeros(0, dtype=np.int64)
    for i in rows:
        tokens, _, plen = seqs[i]
        c = np.bincount(np.asarray(tokens[plen:], dtype=np.int64))
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[: len(c)] += c
    order = np.argsort(-counts, kind="stable")[: min(k, int((counts > 0).sum()))]
    return torch.from_numpy(order.copy())


def split_rows(n: int, cfg: TrainConfig, meta: dict | None) -> tuple[list[int], list[int]]:
    """(eval rows, train rows). The held-out rows are fixed by the first run and kept on resume,
    also when later runs see more extracted sequences (new rows only ever join training)."""
    if meta and "eval_rows" in meta:
        held = list(meta["eval_rows"])
    else:
        first = n if not meta else meta["train_sequences"] + meta["eval_sequences"]  # the first run's count
        order = list(range(first))
        random.Random(cfg.seed).shuffle(order)
        held = order[: meta["eval_sequences"] if meta else min(cfg.eval_sequences, max(1, first // 10))]
    held_set = set(held)
    rng = random.Random(cfg.seed)
    train_rows = [i for i in range(n) if i not in held_set]
    rng.shuffle(train_rows)
    return held, train_rows


def pick_anchors(rng: random.Random, seq, count: int) -> list[int]:
    tokens, _, plen = seq
    lo, hi = max(plen - 1, 1), len(tokens) - 2  # the anchor needs context before it and a token after it
    if hi < lo:
        return []
    return sorted(rng.sample(range(lo, hi + 1), min(count, hi - lo + 1)))


def save_checkpoint(model, opt, step: int, path: Path, extra: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    model.save(tmp, dtype=torch.float32, extra_config={"training": extra})
    state = {}
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                state[f"{i}.{key}"] = st[key].contiguous()
    save_file(state, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps({"step": step, **extra}))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)


def load_checkpoint(model_cls, path: Path, lr: float, weight_decay: float):
    from safetensors.torch import load_file

    model = model_cls.load(path, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    meta = json.loads((path / "trainer.json").read_text())
    state = load_file(str(path / "optimizer.safetensors"))
    for i, p in enumerate(model.parameters()):
        if f"{i}.exp_avg" in state:
            opt.state[p] = {"step": torch.tensor(float(meta["step"])), "exp_avg": state[f"{i}.exp_avg"],
                            "exp_avg_sq": state[f"{i}.exp_avg_sq"]}
    return model, opt, meta


def _training_record(path: Path) -> dict | None:
    """What a drafter directory says about its training run (``trainer.json`` of a checkpoint, or the
    ``training`` entry an exported drafter keeps in ``config.json``); None when it says nothing."""
    for f, key in ((path / "trainer.json", None), (path / "config.json", "training")):
        if f.is_file():
            raw = json.loads(f.read_text())
            rec = raw if key is None else raw.get(key)
            if rec and "train_sequences" in rec and "eval_sequences" in rec:
                return rec
    return None


def _start(target: Target, cfg: TrainConfig, ckpt: Path | None, log):
    """(model, optimizer, step, history): resumed from ``ckpt``, else a new run from ``cfg.init_from``'s
    weights or from the target's own layers."""
    from specframe.plugins.dflash import DFlashModel, check_fits

    if ckpt is not None:
        model, opt, meta = load_checkpoint(DFlashModel, ckpt, cfg.lr, cfg.weight_decay)
        return model, opt, meta["step"], meta.get("history", [])
    if cfg.init_from:
        model = DFlashModel.load(cfg.init_from, dtype=torch.float32).train()
        check_fits(model.cfg, target)
        log(f"train: starting from the weights of {cfg.init_from}")
    else:
        model = new_drafter(target, cfg).float().train()
    return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay), 0, []


def train(target: Target, stores: FeatureStore | list[FeatureStore], work: Path, cfg: TrainConfig, log=print,
          deadline: float | None = None, progress=None) -> Path:
    """Train (or resume) a drafter on the cached features of one or more stores (their sequences in
    order: a store added later only adds training rows); returns the checkpoint directory."""
    stores = [stores] if isinstance(stores, FeatureStore) else list(stores)
    seqs = [seq for store in stores for seq in store.sequences()]
    if len(seqs) < 2:
        where = ", ".join(str(store.root) for store in stores)
        raise SpecframeError(f"feature cache {where} holds {len(seqs)} sequences; extract features first")
    ckpt = work / "checkpoint"
    meta = json.loads((ckpt / "trainer.json").read_text()) if (ckpt / "trainer.json").is_file() else None
    prior = meta if meta is not None or not cfg.init_from else _training_record(Path(cfg.init_from))
    eval_ids, train_ids = split_rows(len(seqs), cfg, prior)  # an init drafter's held-out rows stay held out
    model, opt, step, history = _start(target, cfg, ckpt if meta is not None else None, log)
    if meta is not None:
        log(f"train: resumed at step {step} ({len(train_ids)} training sequences)")
    if cfg.draft_vocab and model.cfg.draft_vocab_size is None:
        model.set_draft_vocab(frequent_tokens(seqs, train_ids, cfg.draft_vocab))
        log(f"train: draft vocabulary of {model.cfg.draft_vocab_size} tokens")
    block, mask_id = model.cfg.block_size, model.cfg.mask_token_id
    gamma = cfg.gamma or block / 2
    weights = torch.tensor([0.0] + [math.exp(-(k - 1) / gamma) for k in range(1, block)])
    embed = target.embedding_weight().float()
    head = model.head_rows(target.lm_head_weight().float())
    t2d = None
    if model.cfg.draft_vocab_size is not None:
        t2d = torch.full((target.vocab_size,), -1, dtype=torch.long)
        t2d[model.draft_vocab] = torch.arange(model.cfg.draft_vocab_size)
    t0, seen_tokens = time.perf_counter(), 0
    rng = random.Random(cfg.seed + step)
    extra = {"config": asdict(cfg), "train_sequences": len(train_ids), "eval_sequences": len(eval_ids),
             "eval_rows": eval_ids}
    if cfg.init_from and prior:
        extra["init_history"] = (meta or {}).get("init_history") or prior.get("history", [])

    def evaluate() -> dict:
        model.eval()
        erng = random.Random(1234)
        tot, wsum = 0.0, 0.0
        hits, counts = torch.zeros(block), torch.zeros(block)
        with torch.no_grad():
            for i in eval_ids:
                anchors = pick_anchors(erng, seqs[i], cfg.anchors_per_seq)
                if anchors:
                    loss, w, h, c = sequence_loss(model, embed, head, seqs[i], anchors, block, mask_id, weights, t2d)
                    tot, wsum, hits, counts = tot + float(loss), wsum + float(w), hits + h, counts + c
        model.train()
        acc = (hits / counts.clamp(min=1)).tolist()
        return {"step": step, "eval_loss": tot / max(wsum, 1e-9), "slot_accuracy": [round(a, 4) for a in acc[1:]]}

    while step < cfg.steps:
        if deadline is not None and time.time() > deadline:
            log("train: deadline reached; saving")
            break
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(step / cfg.steps, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        tot, wsum = 0.0, 0.0
        for _ in range(cfg.batch_size):
            seq = seqs[train_ids[rng.randrange(len(train_ids))]]
            anchors = pick_anchors(rng, seq, cfg.anchors_per_seq)
            if not anchors:
                continue
            loss, w, _, _ = sequence_loss(model, embed, head, seq, anchors, block, mask_id, weights, t2d)
            (loss / (cfg.batch_size * cfg.anchors_per_seq)).backward()
            tot, wsum = tot + float(loss.detach()), wsum + float(w)
            seen_tokens += len(anchors) * (block - 1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if progress is not None:
            progress(step, cfg.steps)
        if step % 20 == 0:
            log(f"train: step {step}/{cfg.steps} loss {tot / max(wsum, 1e-9):.4f} lr {lr:.2e} "
                f"({seen_tokens / (time.perf_counter() - t0):.0f} predicted tokens/s)")
        if step % cfg.eval_every == 0:
            history.append(evaluate())
            log(f"eval: {json.dumps(history[-1])}")
        if step % cfg.save_every == 0:
            save_checkpoint(model, opt, step, ckpt, {**extra, "history": history})
    if not history or history[-1]["step"] != step:
        history.append(evaluate())
        log(f"eval: {json.dumps(history[-1])}")
    save_checkpoint(model, opt, step, ckpt, {**extra, "history": history})
    return ckpt


def export(ckpt: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write an inference-only copy (no optimizer state) in the published layout, with ``TRAINING.md``:
    the run's settings and its held-out loss and per-slot accuracy curve (a model card's measured part)."""
    from specframe.plugins.dflash import DFlashModel

    model = DFlashModel.load(ckpt, dtype=torch.float32)
    raw = json.loads((ckpt / "config.json").read_text())
    keep = {k: raw[k] for k in ("target_fingerprint", "training") if k in raw}
    model.save(out, dtype=dtype, extra_config=keep)
    if "training" in raw:
        (out / "TRAINING.md").write_text(training_card(raw["training"], model))
    return out


def training_card(rec: dict, model) -> str:
    """Markdown: settings and the held-out curve of a training record (earlier runs it started from first)."""
    cfg, c = rec.get("config", {}), model.cfg
    vocab = f"{c.draft_vocab_size} most frequent answer tokens" if c.draft_vocab_size else "the whole target vocabulary"
    lines = ["# Training record", "",
             f"- architecture: {c.num_hidden_layers} draft layers, block size {c.block_size}, mask token {c.mask_token_id}, "
             f"context from target layers {list(c.target_layer_ids)}, read-out over {vocab}",
             f"- data: {rec.get('train_sequences')} training / {rec.get('eval_sequences')} held-out sequences",
             f"- last run: batch {cfg.get('batch_size')} sequences × {cfg.get('anchors_per_seq')} anchors, lr {cfg.get('lr')} "
             f"(warm-up {cfg.get('warmup')}, cosine to step {cfg.get('steps')})"
             + (f", started from the weights of `{Path(cfg['init_from']).name}`" if cfg.get("init_from") else ""), "",
             "Held-out weighted block loss and top-1 accuracy per slot (slot k predicts the k-th token after the anchor):", ""]
    runs = [("earlier run", rec.get("init_history") or []), ("this run" if rec.get("init_history") else "", rec.get("history", []))]
    width = max((len(h["slot_accuracy"]) for _, hist in runs for h in hist), default=0)
    lines += ["| run | step | held-out loss | " + " | ".join(f"slot {k}" for k in range(1, width + 1)) + " |",
              "|---|---|---|" + "---|" * width]
    for name, hist in runs:
        for h in hist:
            accs = " | ".join(f"{a:.3f}" for a in h["slot_accuracy"])
            lines.append(f"| {name} | {h['step']} | {h['eval_loss']:.3f} | {accs} |")
    return "\n".join(lines) + "\n"
