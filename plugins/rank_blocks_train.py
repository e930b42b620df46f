"""Train SpecBlock's rank head for the shipped block drafter (``dflash``) on ``../shared/data``.

Not a plugin (nothing registers here): ``python -m specframe.plugins.rank_blocks_train``.

What the head predicts
----------------------
For every MASK slot k = 1..B-1 of a block drafted after an anchor (the step's root), the class of the rank
of the target's actual next token ``tokens[a + k]`` in the drafter's distribution q_k at that slot:
``rank 1`` / ``2-4`` / ``5-10`` / ``>10`` (a token outside the drafter's draft vocabulary is ``>10``).

What it reads (the drafter's own features, :func:`specframe.plugins.rank_blocks.slot_features`)
-----------------------------------------------------------------------------------------------
the drafter's hidden state at the slot (after its final norm, before the LM head: H = 576), one-hot slot
index (B-1 = 7), q's top-1 probability, q's entropy (nats), q's ten largest log-probs and three gaps between
them -> 598 numbers, standardized (the paper's head reads the hidden state, the top-10 log-probs, gaps, the
top-1 probability and the entropy). Model: an MLP with 64 hidden units (ReLU) and 4 outputs, plain
cross-entropy (its probabilities stay calibrated; the tree's surrogate uses them), Adam. The class it
*decides* is ``argmax p / prior`` (the training class prior is stored): the decision that maximizes
balanced accuracy for calibrated probabilities.

Two variants are trained (:data:`VARIANTS`): one that reads the hidden state through its first 32
principal components, one without the hidden state. The one with the better balanced accuracy on a
validation fifth of the TRAINING rows is refit on all of them and written; both are scored on the held-out
rows. (With a few hundred rows the full 576-dim hidden state overfits; the projection folds back into the
first layer, so the file always takes the 598 inputs.) Positions come from cached hidden states (fp16): q is
recomputed through the drafter's read-out, so a change of features needs no new extraction.

Data
----
rows of ``smollm2_selfdistill.jsonl`` (the target's own greedy answers to ShareGPT prompts): that file holds
no row with ``sharegpt_index % 10 == 0`` (its held-out slice was left out of it), so, as H-RAD did
(:mod:`specframe.plugins.hrad`), the held-out rows here are those with ``sharegpt_index % 10 == 1``, never
trained on. (The shipped drafter itself was trained on nearly all rows of the data, these included; the head
split is only disjoint for the head.) Per row: the target's features at ``target_layer_ids`` by one
teacher-forced prefill on the hf backend (the same seam as ``dflash_train``), then up to ``--anchors``
blocks at random anchors in the answer, drafted in one masked forward (the same mask as training and as at
run time: the block sees context strictly before its anchor).

The baseline beside it: the confidence rule (:func:`specframe.plugins.rank_blocks.rule_class`): three
thresholds on the slot's top-1 probability, fitted on the same training positions for balanced accuracy.

    python -m specframe.plugins.rank_blocks_train --rows 200 --heldout-rows 50 --anchors 32 --threads 1 \\
        --out specframe/drafters/smollm2-135m-instruct --bench docs/bench/rank-head

(~20 min of extraction on a busy 2-core CPU, cached per row under ``--cache``; fitting: 1 min.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from specframe.plugins.hrad import DATA, load_rows
from specframe.plugins.rank_blocks import (CLASSES, RANKS, RankHead, rank_to_class, rule_classes_np, save_head,
                                          slot_features)


def extract_row(row: dict, tgt, model, embed, head, vocab, anchors: int, seed: int) -> dict:
    """Head inputs and labels of up to ``anchors`` blocks in one row's answer."""
    from specframe.plugins.dflash_train import block_batch

    cfg = model.cfg
    B = cfg.block_size
    prompt, resp = row["prompt_ids"], row["response_ids"]
    ids = prompt + resp
    T = len(ids)
    feats = tgt.start(tuple(cfg.target_layer_ids)).prefill(ids[:-1]).float()  # (T-1, L·H)
    P = len(prompt)
    cand = list(range(P - 1, T - 1))  # roots: the last prompt token .. the last-but-one answer token
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(cand), size=min(anchors, len(cand)), replace=False).tolist())
    anchor = [cand[i] for i in pick]
    tokens = np.asarray(ids)
    bid, pos, labels, mask = block_batch(tokens, P, anchor, B, cfg.mask_token_id)
    with torch.inference_mode():
        ctx = model.context(feats)
        ctx_kv = model.context_kv(ctx, torch.arange(ctx.shape[0]))
        h = model(F.embedding(bid, embed), pos, ctx_kv, mask)
        keep = labels >= 0
        slot = (torch.arange(len(bid)) % B)[keep] - 1  # 0-based slot of the MASK positions
        hk = h[keep]
        logq = F.log_softmax(F.linear(hk, head).float(), -1)
        lab = labels[keep]
        if vocab is None:
            rows_ = lab
        else:
            t2d = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
            t2d[vocab] = torch.arange(vocab.numel())
            rows_ = t2d[lab]
        inside = rows_ >= 0
        own = logq.gather(-1, rows_.clamp_min(0)[:, None])[:, 0]
        rank = 1 + (logq > own[:, None]).sum(-1)
        rank = torch.where(inside, rank, torch.full_like(rank, 10**6))
    return {"x": hk.float().numpy().astype(np.float16), "rank": rank.numpy().astype(np.int64), "slot": slot.numpy(),
            "tokens": T}


def load_models(state: dict) -> dict:
    """The embedded target (hf backend) and the shipped drafter, once."""
    if "tgt" not in state:
        from specframe.backends import load_target
        from specframe.plugins.dflash import DFlashModel, shipped_drafter

        tgt = load_target(None, "hf")
        model = DFlashModel.load(shipped_drafter(tgt), dtype=torch.float32)
        state.update(tgt=tgt, model=model, embed=tgt.embedding_weight().float(),
                     head=model.head_rows(tgt.lm_head_weight()).float(), vocab=getattr(model, "draft_vocab", None))
    return state


def featurize(h: np.ndarray, slot: np.ndarray, head: torch.Tensor, n_slots: int, chunk: int = 2048) -> np.ndarray:
    """Head inputs from cached hidden states (fp16): q recomputed through the drafter's read-out."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(h), chunk):
            hh = torch.from_numpy(np.asarray(h[s:s + chunk], np.float32))
            logq = F.log_softmax(F.linear(hh, head), -1)
            out.append(slot_features(hh, logq, torch.from_numpy(np.asarray(slot[s:s + chunk])), n_slots).numpy())
    return np.concatenate(out)


def extract(rows, cache: Path, anchors: int, state: dict, log=print, cached_only: bool = False) -> dict[str, np.ndarray]:
    """Head inputs and labels of ``rows`` (cached per row); ``cached_only``: skip rows not cached yet."""
    cache.mkdir(parents=True, exist_ok=True)
    xs, ranks, slots, rid = [], [], [], []
    t0, done = time.perf_counter(), 0
    for k, r in enumerate(rows):
        f = cache / f"{r['sharegpt_index']}_{anchors}.npz"
        if not f.is_file() and cached_only:
            continue
        if not f.is_file():
            load_models(state)
            d = extract_row(r, state["tgt"], state["model"], state["embed"], state["head"], state["vocab"], anchors,
                            seed=int(r["sharegpt_index"]))
            np.savez(f, **{k_: v for k_, v in d.items() if k_ != "tokens"})
            done += d["tokens"]
        d = np.load(f)
        xs.append(d["x"]), ranks.append(d["rank"]), slots.append(d["slot"])
        rid.append(np.full(len(d["rank"]), r["sharegpt_index"]))
        if k % 10 == 0:
            dt = time.perf_counter() - t0
            log(f"row {k + 1}/{len(rows)}: {done} new tokens in {dt:.0f} s", flush=True)
    return {"x": np.concatenate(xs).astype(np.float32), "rank": np.concatenate(ranks), "slot": np.concatenate(slots),
            "row": np.concatenate(rid)}


# ------------------------------------------------------------------------------------------- training
def train_head(x: np.ndarray, y: np.ndarray, *, hidden: int = 64, epochs: int = 8, lr: float = 2e-3,
               weight_decay: float = 1e-3, batch: int = 256, seed: int = 0, balanced: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y)
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-4)
    xs = (xt - mean) / std
    counts = torch.bincount(yt, minlength=4).float()
    weight = counts.sum() / (4 * counts.clamp_min(1)) if balanced else None
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=g)
        for s in range(0, len(xs), batch):
            idx = order[s:s + batch]
            opt.zero_grad()
            loss_fn(net(xs[idx]), yt[idx]).backward()
            opt.step()
    prior = (counts / counts.sum()).clamp_min(1e-6)
    return {"mean": mean, "std": std, "w1": net[0].weight.detach().T.contiguous(), "b1": net[0].bias.detach().clone(),
            "w2": net[2].weight.detach().T.contiguous(), "b2": net[2].bias.detach().clone(), "prior": prior}


HIDDEN = 64
PCA = 32
VARIANTS = {
    "hidden_pca32": f"the hidden state projected on its first {PCA} principal components (fitted on the training "
                    "positions), plus the slot, q's top-1, entropy, top-10 log-probs and gaps; 2 epochs, weight decay 1e-2",
    "no_hidden": "the slot, q's top-1, entropy, top-10 log-probs and gaps only; 8 epochs, weight decay 1e-3",
}


def fit_variant(name: str, x: np.ndarray, y: np.ndarray, H: int, seed: int = 0) -> RankHead:
    """Train one variant on the full inputs ``x`` (N, F) and fold it back into a head over all F inputs
    (a projection of the hidden state is linear, so it folds into the first layer)."""
    rest = x[:, H:]
    if name == "no_hidden":
        w = train_head(rest, y, epochs=8, weight_decay=1e-3, seed=seed)
        full = {"mean": torch.cat([torch.zeros(H), w["mean"]]), "std": torch.cat([torch.ones(H), w["std"]]),
                "w1": torch.cat([torch.zeros(H, w["w1"].shape[1]), w["w1"]]), "b1": w["b1"]}
    else:
        h = torch.from_numpy(np.asarray(x[:, :H], np.float32))
        mu = h.mean(0)
        sub = (h - mu)[:: max(1, len(h) // 20000)]
        _, _, vt = torch.linalg.svd(sub, full_matrices=False)
        proj = vt[:PCA].T.contiguous()  # (H, PCA)
        u = ((h - mu) @ proj).numpy()
        w = train_head(np.concatenate([u, rest], 1), y, epochs=2, weight_decay=1e-2, seed=seed)
        su, mu_u, w1u = w["std"][:PCA], w["mean"][:PCA], w["w1"][:PCA]
        full = {"mean": torch.cat([mu, w["mean"][PCA:]]), "std": torch.cat([torch.ones(H), w["std"][PCA:]]),
                "w1": torch.cat([proj @ (w1u / su[:, None]), w["w1"][PCA:]]),
                "b1": w["b1"] - (mu_u / su) @ w1u}
    full.update(w2=w["w2"], b2=w["b2"], prior=w["prior"])
    head = RankHead({k: v.float().contiguous() for k, v in full.items()})
    head.weights = {k: v.float().contiguous() for k, v in full.items()}
    return head


def fit_rule(p1: np.ndarray, y: np.ndarray, grid: int = 40) -> list[float]:
    """Thresholds t1 >= t2 >= t3 on the top-1 probability (class 0 at or above t1, 1 at or above t2, 2 at or
    above t3, else 3) that maximize balanced accuracy on (p1, y); a grid of ``grid`` quantiles."""
    cuts = np.unique(np.quantile(p1, np.linspace(0, 1, grid + 1)))
    cuts = np.concatenate([cuts, [1.01]])
    masks = [y == k for k in range(4)]
    counts = [max(int(m.sum()), 1) for m in masks]
    best, best_t = -1.0, [1.01, 1.01, 1.01]
    for i, t1 in enumerate(cuts):
        for j in range(i + 1):
            t2 = cuts[j]
            for t3 in cuts[: j + 1]:
                pred = rule_classes_np(p1, (t1, t2, t3))
                bal = np.mean([np.sum(pred[m] == k) / c for k, (m, c) in enumerate(zip(masks, counts))])
                if bal > best:
                    best, best_t = bal, [float(t1), float(t2), float(t3)]
    return best_t


def scores(pred: np.ndarray, y: np.ndarray, probs: np.ndarray | None = None) -> dict:
    recall = {c: (float(np.mean(pred[y == k] == k)) if np.any(y == k) else None) for k, c in enumerate(CLASSES)}
    rec = [v for v in recall.values() if v is not None]
    out = {"accuracy": round(float(np.mean(pred == y)), 4), "balanced_accuracy": round(float(np.mean(rec)), 4),
           "recall": {k: (None if v is None else round(v, 4)) for k, v in recall.items()}}
    if probs is not None:
        out["log_loss"] = round(float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-9, 1)))), 4)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m specframe.plugins.rank_blocks_train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for rank_head.safetensors and rank_head.json")
    ap.add_argument("--bench", type=Path, default=None, help="directory for the held-out numbers (rank_head.json)")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--heldout-rows", type=int, default=50)
    ap.add_argument("--anchors", type=int, default=32, help="blocks per row")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/specframe-rank-head"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cached-only", action="store_true",
                    help="use only the training rows already in --cache (e.g. after stopping a long extraction)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tr_rows, ho_rows = load_rows(args.data, args.rows, args.heldout_rows, args.seed)
    state: dict = {}
    ho = extract(ho_rows, args.cache, args.anchors, state)  # held-out first: a short run still evaluates
    tr = extract(tr_rows, args.cache, args.anchors, state, cached_only=args.cached_only)
    if args.cached_only:
        tr_rows = [r for r in tr_rows if r["sharegpt_index"] in set(tr["row"].tolist())]
    extraction = time.perf_counter() - t0
    load_models(state)
    H = state["model"].cfg.hidden_size
    n_slots = state["model"].cfg.block_size - 1
    xtr = featurize(tr["x"][:, :H], tr["slot"], state["head"], n_slots)
    xho = featurize(ho["x"][:, :H], ho["slot"], state["head"], n_slots)
    ytr, yho = rank_to_class(tr["rank"]), rank_to_class(ho["rank"])
    p1_tr, p1_ho = xtr[:, H + n_slots], xho[:, H + n_slots]

    # model selection on a validation split of the TRAINING rows (never the held-out ones)
    rng = np.random.default_rng(args.seed + 1)
    rows = np.unique(tr["row"])
    val = np.isin(tr["row"], rng.choice(rows, size=max(1, len(rows) // 5), replace=False))
    fits = {name: (lambda x, y, v=name: fit_variant(v, x, y, H, seed=args.seed)) for name in VARIANTS}
    validation = {}
    for name, fit in fits.items():
        head = fit(xtr[~val], ytr[~val])
        validation[name] = scores(head.decide(head.probs(xtr[val])), ytr[val], head.probs(xtr[val]))
    validation["confidence_rule"] = scores(rule_classes_np(p1_tr[val], fit_rule(p1_tr[~val], ytr[~val])), ytr[val])
    chosen = max(VARIANTS, key=lambda n: validation[n]["balanced_accuracy"])

    heads = {name: fit(xtr, ytr) for name, fit in fits.items()}  # refit on every training row
    head = heads[chosen]
    probs_ho = head.probs(xho)
    thresholds = fit_rule(p1_tr, ytr)
    rule_ho, rule_tr = rule_classes_np(p1_ho, thresholds), rule_classes_np(p1_tr, thresholds)
    counts = np.bincount(ytr, minlength=4)
    majority = int(counts.argmax())
    prior = counts / counts.sum()
    # what the rule's class says about the true class (the confidence fallback's class probabilities)
    class_given_rule = [(np.bincount(ytr[rule_tr == c], minlength=4) + 1) / (np.sum(rule_tr == c) + 4) for c in range(4)]
    rank_table = []  # P(rank = r | class) for r = 1..RANKS on the training positions
    for c in range(4):
        rk = tr["rank"][ytr == c]
        rank_table.append([float(np.mean(rk == r)) if len(rk) else 0.0 for r in range(1, RANKS + 1)])
    heldout = {"head": scores(head.decide(probs_ho), yho, probs_ho),
               "head_argmax": scores(probs_ho.argmax(1), yho, probs_ho)}
    for name, h in heads.items():
        p = h.probs(xho)
        heldout[f"variant_{name}"] = scores(h.decide(p), yho, p)
    heldout["confidence_rule"] = scores(rule_ho, yho, np.asarray(class_given_rule)[rule_ho])
    heldout["majority"] = scores(np.full(len(yho), majority), yho, np.tile(prior, (len(yho), 1)))
    per_slot = {}
    for s_ in range(n_slots):
        m = ho["slot"] == s_
        per_slot[str(s_ + 1)] = {"positions": int(m.sum()), "head": scores(head.decide(probs_ho[m]), yho[m])["balanced_accuracy"],
                                 "confidence_rule": scores(rule_ho[m], yho[m])["balanced_accuracy"],
                                 "rank1_share": round(float(np.mean(yho[m] == 0)), 4)}
    better = heldout["head"]["balanced_accuracy"] > heldout["confidence_rule"]["balanced_accuracy"]
    meta = {
        "what": "SpecBlock rank head for the shipped dflash drafter: per MASK slot, the class of the rank of the "
                "target's next token in the drafter's q (rank 1 / 2-4 / 5-10 / >10); see specframe/plugins/rank_blocks_train.py",
        "inputs": "drafter hidden state at the slot (after its final norm, before the LM head; 576), one-hot slot (7), "
                  "top-1 probability of q, entropy of q (nats), q's 10 largest log-probs, 3 gaps between them "
                  "(specframe.plugins.rank_blocks.slot_features)",
        "variants": VARIANTS, "chosen_variant": chosen, "validation": validation,
        "validation_split": "a fifth of the training rows (by row), for choosing the variant; then refit on all",
        "classes": list(CLASSES), "feature_dim": int(xtr.shape[1]), "hidden": HIDDEN,
        "decision": "argmax of p / prior (prior: training class shares)",
        "prior": [round(float(v), 6) for v in prior],
        "confidence_rule": {"thresholds": thresholds,
                            "rule": "class rank1 if p1 >= t1, 2-4 if p1 >= t2, 5-10 if p1 >= t3, else >10 "
                                    "(p1: the slot's top-1 draft probability); fitted for balanced accuracy on the training positions",
                            "class_given_rule": [[round(float(v), 6) for v in row] for row in class_given_rule]},
        "rank_given_class": [[round(v, 6) for v in row] for row in rank_table],
        "data": str(args.data), "heldout_rule": "sharegpt_index % 10 == 1 (the file has no % 10 == 0 rows)",
        "train": {"rows": len(tr_rows), "positions": int(len(ytr)), "class_counts": counts.tolist()},
        "heldout_sizes": {"rows": len(ho_rows), "positions": int(len(yho)),
                          "class_counts": np.bincount(yho, minlength=4).tolist()},
        "heldout": heldout, "heldout_per_slot_balanced_accuracy": per_slot,
        "train_scores": {"head": scores(head.decide(head.probs(xtr)), ytr),
                         "confidence_rule": scores(rule_tr, ytr)},
        "head_beats_rule_on_balanced_accuracy": bool(better),
        "seconds": round(time.perf_counter() - t0, 1), "extraction_seconds": round(extraction, 1),
        "command": f"python -m specframe.plugins.rank_blocks_train --out {args.out} --rows {args.rows} "
                   f"--heldout-rows {args.heldout_rows} --anchors {args.anchors}" + (" --cached-only" if args.cached_only else ""),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {args.threads}",
    }
    save_head(head.weights, meta, args.out)
    if args.bench is not None:
        args.bench.mkdir(parents=True, exist_ok=True)
        (args.bench / "rank_head.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({"validation": validation, "chosen": chosen, "heldout": heldout, "thresholds": thresholds,
                      "train": meta["train"], "heldout_sizes": meta["heldout_sizes"], "better": better}, indent=2))

if __name__ == "__main__":
    main()
