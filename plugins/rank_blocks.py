"""SpecBlock's rank-guided block tree: the expansion policy ``specblock`` and the surrogate ``rank-class``.

SpecBlock (Shi et al., 2026, *Block-Iterative Speculative Decoding with Dynamic Tree Drafting*) trains a
small rank head beside its block drafter. Per block slot it predicts the class of the rank that the
target's token will have in the draft distribution q at that slot: ``1`` / ``2-4`` / ``5-10`` / ``>10``
(:data:`CLASSES`). The tree is grown by block walks: a walk follows the draft's top-1 token slot after slot
(the block's greedy chain) and, at each slot, also adds the next candidates as alternatives, as many as the
slot's class allows (``widths``: top-k per class, the top-1 included; the released code's "slim" setting
is 2 / 4 / 6 / 4, i.e. one alternative at a slot predicted rank 1, three at ``2-4``, five at ``5-10`` and
three at ``>10``; a width of 0 ends the walk there, the released default's "give up" for ``>10``). The
``beam`` alternatives with the highest cumulative draft log-prob start walks of their own in the next
round (``blocks`` rounds in all), and the tree is then pruned to ``budget`` nodes by cumulative log-prob,
keeping every kept node's ancestors. Defaults are the released code's evaluation defaults
(``benchmarks_hf``: config ``1,2,10,90`` = 2 blocks, beam 10, 90 tree tokens; ``SLOT_TOPK_MODE=slim_r2``).

Where the class comes from:

* a draft that carries ``rank_classes`` (per depth, probabilities of the four classes; the shipped block
  drafter ``dflash`` sets them when run with ``rank_head="auto"`` or a path) -> the decided class is
  ``argmax p / prior`` (``draft.rank_prior``, the head's training class shares; plain argmax without it);
* any other draft (or depth beyond them) -> the confidence rule on the node's own top-1 probability:
  ``1`` if p1 >= t1, ``2-4`` if p1 >= t2, ``5-10`` if p1 >= t3, else ``>10`` (:data:`RULE_THRESHOLDS`,
  fitted for balanced accuracy on the same training positions as the head, see
  :mod:`specframe.plugins.rank_blocks_train` and ``docs/bench/rank-head/rank_head.json``).

The surrogate ``rank-class`` turns the class probabilities into acceptance probabilities:
P(child) = P(parent) · P(the target's token has the child's rank | class probabilities) =
P(parent) · Σ_c p_c · P(rank = r | c), with P(rank | class) measured on the training positions
(:data:`RANK_GIVEN_CLASS`). The policy attaches a node's class probabilities to the candidates it scores;
scored by another policy (no probabilities attached), the top-ranked child uses the confidence rule's
class probabilities (:data:`CLASS_GIVEN_RULE`) and other children the training class prior.

The head itself (:class:`RankHead`, file ``rank_head.safetensors`` beside the shipped drafter) is a
598 -> 64 -> 4 MLP on the drafter's own features at each MASK slot (:func:`slot_features`), trained by
:mod:`specframe.plugins.rank_blocks_train`; held-out numbers in ``docs/bench/rank-head/rank_head.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from specframe import hookimpl
from specframe.components import (AcceptanceSurrogate, BuiltTree, Candidate, Draft, ExpansionContext,
                                  ExpansionPolicy, TreeBuilder)
from specframe.errors import SpecframeError

CLASSES = ("1", "2-4", "5-10", ">10")
HEAD_FILE = "rank_head.safetensors"
RANKS = 16  # P(rank = r | class) is tabulated for r = 1..RANKS

# Fitted on the training positions of docs/bench/rank-head/rank_head.json (the shipped drafter on 200 rows of
# ../shared/data, 42,936 slots): t1 >= t2 >= t3 on the slot's top-1 draft probability, for balanced accuracy.
RULE_THRESHOLDS = (0.4507, 0.248, 0.1739)
# P(true class | the rule's class), rows: the rule's class (add-one smoothed counts on the same positions).
CLASS_GIVEN_RULE = (
    (0.6034, 0.2247, 0.0669, 0.1049),
    (0.2534, 0.2922, 0.1609, 0.2936),
    (0.1581, 0.2393, 0.1903, 0.4123),
    (0.0914, 0.1663, 0.1747, 0.5676),
)
# The training class shares.
CLASS_PRIOR = (0.249, 0.2156, 0.15, 0.3854)
# P(rank = r | class) for r = 1..RANKS, rows: class (class >10 continues beyond the table).
RANK_GIVEN_CLASS = (
    (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.4861, 0.2992, 0.2148, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.2486, 0.2057, 0.1648, 0.146, 0.1208, 0.1141, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0389, 0.0363, 0.0279, 0.026, 0.025, 0.0231),
)


# ------------------------------------------------------------------------------------------ classes
def rank_to_class(rank) -> np.ndarray:
    """1-based rank(s) of the target's token in q -> class index 0 (1), 1 (2-4), 2 (5-10), 3 (>10)."""
    r = np.asarray(rank)
    return np.where(r <= 1, 0, np.where(r <= 4, 1, np.where(r <= 10, 2, 3)))


def rule_classes_np(p1, thresholds=RULE_THRESHOLDS) -> np.ndarray:
    """The confidence rule on top-1 probabilities ``p1`` (vectorized)."""
    t1, t2, t3 = thresholds
    p = np.asarray(p1)
    return np.where(p >= t1, 0, np.where(p >= t2, 1, np.where(p >= t3, 2, 3)))


def rule_class(p1: float, thresholds=RULE_THRESHOLDS) -> int:
    """The confidence rule: class 0 if ``p1`` >= t1, 1 if >= t2, 2 if >= t3, else 3."""
    t1, t2, t3 = thresholds
    return 0 if p1 >= t1 else 1 if p1 >= t2 else 2 if p1 >= t3 else 3


def rank_probability(classes, rank: int) -> float:
    """P(the target's token has 1-based ``rank`` in q | class probabilities ``classes``)."""
    if rank < 1:
        return 0.0
    if rank > RANKS:
        return float(classes[3]) * RANK_GIVEN_CLASS[3][-1] * RANKS / rank
    return float(sum(float(classes[c]) * RANK_GIVEN_CLASS[c][rank - 1] for c in range(4)))


def decide(probs, prior=None) -> int:
    """The class a policy acts on: argmax p / prior (balanced-accuracy decision), argmax p without a prior."""
    if prior is None:
        return int(max(range(len(probs)), key=lambda c: probs[c]))
    return int(max(range(len(probs)), key=lambda c: probs[c] / max(prior[c], 1e-9)))


# --------------------------------------------------------------------------------------------- head
def slot_features(h: torch.Tensor, logq: torch.Tensor, slots: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Head inputs (N, H + n_slots + 15) per MASK slot: the drafter's hidden state there (after its final
    norm, before the LM head), one-hot slot index (0-based), q's top-1 probability, q's entropy (nats), q's
    ten largest log-probs (from -30) and three gaps between them (1st-2nd, 2nd-4th, 4th-10th): the inputs
    of the paper's rank head (hidden state, top-10 log-probs, gaps, top-1, entropy) plus the slot."""
    lq = logq.float()
    q = lq.exp()
    p1 = q.max(-1).values
    ent = -(q * lq.clamp_min(-1e4)).sum(-1)
    top = lq.topk(min(10, lq.shape[-1]), dim=-1).values.clamp_min(-30.0)
    if top.shape[-1] < 10:
        top = torch.cat([top, torch.full((top.shape[0], 10 - top.shape[-1]), -30.0)], -1)
    gaps = torch.stack([top[:, 0] - top[:, 1], top[:, 1] - top[:, 3], top[:, 3] - top[:, 9]], -1)
    return torch.cat([h.float(), F.one_hot(slots.long(), n_slots).float(), p1[:, None], ent[:, None], top, gaps], -1)


class RankHead:
    """Standardize, F -> 64 -> 4 MLP (ReLU), softmax. ``prior``: the training class shares."""

    def __init__(self, weights: dict[str, torch.Tensor], meta: dict | None = None):
        self.meta = dict(meta or {})
        self.mean = weights["mean"].float().numpy()
        self.std = weights["std"].float().numpy()
        self.w1 = weights["w1"].float().numpy()
        self.b1 = weights["b1"].float().numpy()
        self.w2 = weights["w2"].float().numpy()
        self.b2 = weights["b2"].float().numpy()
        self.prior = weights["prior"].float().numpy()
        self.feature_dim = int(self.w1.shape[0])
        shapes = (self.mean.shape, self.std.shape, self.b1.shape, self.w2.shape, self.b2.shape, self.prior.shape)
        hidden = self.w1.shape[1]
        if shapes != ((self.feature_dim,), (self.feature_dim,), (hidden,), (hidden, 4), (4,), (4,)):
            raise ValueError(f"tensor shapes do not fit a {self.feature_dim} -> {hidden} -> 4 head")

    @classmethod
    def load(cls, path: str | Path) -> "RankHead":
        """Load a head file (or a directory holding ``rank_head.safetensors``); a missing or unreadable file
        is one :class:`SpecframeError` line naming it and the fix."""
        path = Path(path)
        if path.is_dir():
            path = path / HEAD_FILE
        fix = ("rebuild it with `python -m specframe.plugins.rank_blocks_train --out DIR` "
               "(or reinstall specframe for the shipped one), or run without it (rank_head=None)")
        if not path.is_file():
            raise SpecframeError(f"rank head not found at {path}; {fix}")
        try:
            from safetensors.torch import load_file

            weights = load_file(str(path))
            meta_path = path.with_suffix(".json")
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            return cls(weights, meta)
        except Exception as err:  # noqa: BLE001 - corrupt header, missing tensor, wrong shapes, bad json
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SpecframeError(f"rank head {path} is unreadable ({type(err).__name__}: {detail}); {fix}") from None

    def probs(self, x) -> np.ndarray:
        x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
        h = np.maximum(((x - self.mean) / self.std) @ self.w1 + self.b1, 0.0)
        z = h @ self.w2 + self.b2
        z = np.exp(z - z.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    def decide(self, probs) -> np.ndarray:
        return np.asarray(probs / self.prior).argmax(-1)


def save_head(weights: dict[str, torch.Tensor], meta: dict, out: Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(out / HEAD_FILE))
    (out / "rank_head.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out / HEAD_FILE


# ------------------------------------------------------------------------------------------- policy
class RankedCandidate(Candidate):
    """A candidate that carries its slot's class probabilities (``classes``) to the surrogate."""

    classes: tuple | None = None


def _with_classes(cand: Candidate, rank: int, classes) -> Candidate:
    out = RankedCandidate(*cand._replace(rank=rank))
    out.classes = classes
    return out


class SpecBlockTree(ExpansionPolicy):
    """SpecBlock's rank-guided block tree (see the module). Parameters: ``widths`` (top-k per class
    ``1`` / ``2-4`` / ``5-10`` / ``>10``, the top-1 included; 0 ends the walk; (2, 4, 6, 4)), ``beam``
    (alternatives that start walks of their own per round, 10), ``blocks`` (rounds of walks, 2), ``budget``
    (nodes kept, by cumulative log-prob, 90), ``block`` (slots per walk; None: as deep as the draft goes),
    ``thresholds`` (the confidence rule's t1 >= t2 >= t3)."""

    name = "specblock"

    def __init__(self, widths=(2, 4, 6, 4), beam: int = 10, blocks: int = 2, budget: int = 90,
                 block: int | None = None, thresholds=RULE_THRESHOLDS):
        widths = tuple(widths) if not isinstance(widths, int) else (widths,) * 4
        if len(widths) != 4 or any(not isinstance(w, int) or w < 0 for w in widths):
            raise ValueError(f"widths must be 4 integers >= 0 (classes 1, 2-4, 5-10, >10), got {widths!r}")
        for key, value in (("beam", beam), ("blocks", blocks), ("budget", budget)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if block is not None and (not isinstance(block, int) or block <= 0):
            raise ValueError(f"block must be a positive integer or None, got {block!r}")
        thresholds = tuple(float(t) for t in thresholds)
        if len(thresholds) != 3 or not thresholds[0] >= thresholds[1] >= thresholds[2]:
            raise ValueError(f"thresholds must be t1 >= t2 >= t3, got {thresholds!r}")
        self.widths, self.beam, self.blocks, self.budget, self.block = widths, beam, blocks, budget, block
        self.thresholds = thresholds

    def slot_class(self, draft: Draft, kids: list[Candidate], depth: int) -> tuple[int, tuple]:
        """(the class acted on, the class probabilities) of the children at ``depth`` of a node."""
        classes = getattr(draft, "rank_classes", None)
        if classes is not None and depth < len(classes):
            probs = tuple(float(p) for p in classes[depth])
            return decide(probs, getattr(draft, "rank_prior", None)), probs
        c = rule_class(math.exp(kids[0].logq), self.thresholds)
        return c, CLASS_GIVEN_RULE[c]

    def grow(self, draft: Draft, depth_cap: int) -> tuple[list, list, list, list]:
        """Every walk's nodes before pruning: (parents, depths, cumulative log-probs, candidates)."""
        parent, depth, cum, cand, handle, start = [-1], [0], [0.0], [None], [draft.ROOT], [0]
        starts = [0]
        for rnd in range(self.blocks):
            active: dict[int, list[int]] = {}
            for n in starts:
                active.setdefault(depth[n], []).append(n)
            pending: list[int] = []
            for d in range(min(active, default=depth_cap), depth_cap):
                here = active.pop(d, [])
                if not here:
                    continue
                if draft.lazy:  # one draft call per depth, over every walk's node there
                    todo = [handle[n] for n in here if not draft.expanded(handle[n])]
                    if todo:
                        draft.expand(todo, d)
                for n in here:
                    kids = draft.children(handle[n], d)
                    if not kids:
                        continue
                    cls, probs = self.slot_class(draft, kids, d)
                    for r, c in enumerate(kids[: self.widths[cls]]):
                        parent.append(n), depth.append(d + 1), cum.append(cum[n] + c.logq)
                        cand.append(_with_classes(c, r, probs)), handle.append(c.handle), start.append(start[n])
                        i = len(parent) - 1
                        if r == 0:
                            if d + 1 < depth_cap and (self.block is None or d + 1 - start[n] < self.block):
                                active.setdefault(d + 1, []).append(i)  # the walk follows its top-1
                        elif d + 1 < depth_cap:
                            pending.append(i)
                            start[i] = d + 1
            if rnd + 1 == self.blocks or not pending:
                break
            starts = sorted(pending, key=lambda i: (-cum[i], i))[: self.beam]
        return parent, depth, cum, cand

    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        out = TreeBuilder(ctx.root_token)
        depth_cap = min(ctx.max_depth, draft.max_depth)
        limit = min(self.budget, ctx.max_nodes)
        if depth_cap <= 0 or limit <= 0:
            return out.build()
        parent, depth, cum, cand = self.grow(draft, depth_cap)
        kept: set[int] = {0}
        for i in sorted(range(1, len(parent)), key=lambda i: (-cum[i], i)):
            if len(kept) - 1 >= limit:
                break
            chain = []
            j = i
            while j not in kept:
                chain.append(j)
                j = parent[j]
            if len(kept) - 1 + len(chain) <= limit:
                kept.update(chain)
        index, score = {0: 0}, {0: 1.0}
        for i in sorted(kept - {0}):  # creation order: a parent before its children
            p = ctx.score(score[parent[i]], depth[i], cand[i])
            index[i], score[i] = out.add(index[parent[i]], cand[i], p), p
        return out.build()


class RankClass(AcceptanceSurrogate):
    """P(child) = P(parent) · P(the target's token has the child's rank | the slot's class probabilities)."""

    name = "rank-class"

    def score(self, parent_p: float, depth: int, cand: Candidate) -> float:
        classes = getattr(cand, "classes", None)
        rank = cand.rank
        if classes is None:
            if rank <= 0:  # the best child (or one of unknown rank): the rule on its own q
                classes, rank = CLASS_GIVEN_RULE[rule_class(math.exp(cand.logq))], 0
            else:
                classes = CLASS_PRIOR
        return min(max(parent_p * rank_probability(classes, rank + 1), 0.0), 1.0)


@hookimpl
def register_expansion_policies(register):
    register("specblock", SpecBlockTree)


@hookimpl
def register_surrogates(register):
    register("rank-class", RankClass)
