"""Sequoia (Chen et al. 2024, *Sequoia: Scalable, Robust, and Hardware-aware Speculative Decoding*): the
expansion policy ``sequoia`` and the surrogate ``sibling-rank``.

Sequoia's *positional acceptance assumption*: whether a draft token is accepted, given that its parent was,
depends only on its rank among its siblings (by draft probability, best first): the rank-k child is accepted
with probability r_k. A node's acceptance probability is then the product of r over the ranks along its
path, and a tree's expected accepted length is F(T) = Σ_v Π_{u on root→v} r_rank(u). Sequoia finds the tree
of n nodes and depth ≤ d maximising F by a dynamic program, and picks n (and d) for the hardware: the size
whose expected tokens per second, (1 + F(n)) / (draft time + verify time of n tokens), is highest.

* ``sibling-rank`` measures r online, from every verification (the paper measures it offline, once per
  draft/target pair and dataset): for each node whose parent was on the accepted path, its rank among its
  siblings in the tree and whether it was accepted. Each rank's rate is a Beta-posterior mean around a prior
  vector, with exponentially decayed counts, fitted non-increasing in the rank (isotonic); the vector it
  publishes (:meth:`SiblingRank.rates`) changes, and :attr:`SiblingRank.version` counts up, only when some
  rate moved by more than ``tol``.
* ``sequoia`` solves the DP for every n up to its budget in one pass (numpy, max-plus convolutions over
  subtree sizes), caches it per published rate vector, picks n by expected tokens per second on this
  machine's cost model, and maps the optimal topology onto the draft: the rank-r child of a node is the
  draft's r-th best child there (a missing one drops its subtree). A draft model's nodes are expanded one
  depth at a time, each depth in one draft call.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from specframe import hookimpl
from specframe.components import (AcceptanceSurrogate, BuiltTree, Candidate, Draft, ExpansionContext, ExpansionPolicy,
                                  Gating, TreeBuilder)
from specframe.fit import isotonic
from specframe.tree import Tree

log = logging.getLogger("specframe")

NEG = -np.inf


def default_rates(count: int) -> np.ndarray:
    """The prior acceptance-by-rank vector: 0.6 for the best child, then 0.4·2^-k for rank k ≥ 1 (0.2, 0.1,
    0.05, ...; the whole vector sums to < 1 as a verifier accepts at most one child). A guess in the shape of
    Sequoia's measured vectors (most acceptances on the draft's first choice, a fast-falling tail), used
    until verifications say otherwise, and by ``sequoia`` when the surrogate measures no rates."""
    k = np.arange(count)
    return np.where(k == 0, 0.6, 0.4 * 0.5 ** k.astype(float))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------ the surrogate
class SiblingRank(AcceptanceSurrogate):
    """P(child) = P(parent) · r_rank(child), r measured online (see the module).

    Parameters: ``ranks`` (how many ranks get a rate of their own, 16; a deeper rank uses the last one),
    ``prior`` (the prior vector, default :func:`default_rates`), ``prior_strength`` (pseudo-observations per
    rank behind the prior, 4), ``decay`` (the counts' factor per verification, 0.99: a half-life of about 69
    verifications), ``tol`` (the change of some rate that publishes a new vector, 0.01).

    A candidate whose rank is not known (``rank`` −1: a policy that does not rank siblings) is scored with
    the draft's own confidence, P(parent) · q."""

    name = "sibling-rank"

    def __init__(self, ranks: int = 16, prior: list[float] | None = None, prior_strength: float = 4.0,
                 decay: float = 0.99, tol: float = 0.01):
        ranks = _positive_int("ranks", ranks)
        if prior is not None:
            prior = np.asarray(prior, dtype=float).ravel()
            if prior.size == 0 or not np.all((prior >= 0) & (prior <= 1)):
                raise ValueError(f"prior must be a non-empty list of rates in [0, 1], got {prior.tolist()!r}")
            prior = np.concatenate([prior, np.full(max(ranks - prior.size, 0), prior[-1])])[:ranks]
        if not (isinstance(prior_strength, (int, float)) and prior_strength > 0):
            raise ValueError(f"prior_strength must be > 0, got {prior_strength!r}")
        if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
            raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        self.ranks, self.strength, self.decay, self.tol = ranks, float(prior_strength), float(decay), float(tol)
        self.prior = default_rates(ranks) if prior is None else prior
        self.counts = np.zeros(ranks)  # decayed: parent accepted and the tree had a child of this rank
        self.hits = np.zeros(ranks)  # decayed: ... and that child was accepted
        self.version = 0  # counts up whenever rates() changes
        self._rates = self.prior.copy()
        self._list = self._rates.tolist()

    def rates(self) -> np.ndarray:
        """The published acceptance-by-rank vector r (index k: the rank-k child, 0 = the best), non-increasing
        where the data allow. A copy; :attr:`version` says when it changed."""
        return self._rates.copy()

    def rate(self, rank: int) -> float:
        return self._list[min(rank, self.ranks - 1)]

    def score(self, parent_p: float, depth: int, cand: Candidate) -> float:
        rank = getattr(cand, "rank", -1)
        if rank < 0:
            return parent_p * min(math.exp(cand.logq), 1.0)
        return parent_p * self._list[min(rank, self.ranks - 1)]

    def observe(self, tree: Tree, accepted: list[int], scores: list[float]) -> None:
        if tree.size <= 1:
            return
        on_path = set(accepted)
        parents, logq = tree.parent_list, tree.logq_list
        siblings: dict[int, list[int]] = {}
        for i in range(1, tree.size):
            if parents[i] in on_path:  # a child of a rejected node says nothing: it was never tried
                siblings.setdefault(parents[i], []).append(i)
        if not siblings:
            return
        self.counts *= self.decay
        self.hits *= self.decay
        for kids in siblings.values():
            kids.sort(key=lambda i: (-logq[i], i))  # rank among its siblings, best draft log-prob first
            for rank, i in enumerate(kids):
                r = min(rank, self.ranks - 1)
                self.counts[r] += 1.0
                self.hits[r] += 1.0 if i in on_path else 0.0
        weight = self.counts + self.strength
        posterior = (self.hits + self.strength * self.prior) / weight  # Beta(s·m, s·(1−m)) prior, posterior mean
        fitted = np.clip(-isotonic(-posterior, weight), 0.0, 1.0)  # non-increasing in the rank
        if float(np.max(np.abs(fitted - self._rates))) > self.tol:
            self._rates, self._list = fitted, fitted.tolist()
            self.version += 1


# ------------------------------------------------------------------------------------------ the dynamic program
class SequoiaPlan:
    """Sequoia's DP for one rate vector ``r`` (index k: rank k, 0 = best), every size up to ``nodes`` and
    every depth bound up to ``depth`` at once.

    ``value[d, n]``: the largest Σ_v Π r over trees of exactly n non-root nodes, depth ≤ d, in which the
    children of every node are its ranks 0..j−1 (−inf where none exists); ``best[d, n]`` the same over at
    most n nodes (non-decreasing in n and d).

    Recurrence: a subtree of m nodes (its own node included) and depth ≤ d is its node plus a forest of its
    first j ranked children; with G_j(t) the best forest of the first j children with t nodes in all,
    G_j(t) = max_s G_{j−1}(t − s) + r_{j−1}·f_{d−1}(s), f_d(m) = 1 + max_j G_j(m − 1). Each (d, j) is one
    max-plus convolution over the sizes, vectorised as one (n+1) × n array."""

    def __init__(self, rates, nodes: int, depth: int):
        r = np.asarray(rates, dtype=float).ravel()
        self.rates, self.nodes, self.depth = r, int(nodes), int(depth)
        n, k = self.nodes, r.size
        t = np.arange(n + 1)
        s = np.arange(1, n + 1)
        gather = t[:, None] - s[None, :] + n  # index into [-inf]*n ++ G: G(t - s), -inf where t < s
        self.f = np.full((depth + 1, n + 2), NEG)  # f[d, m]: subtree of m nodes (its own included)
        self.f[:, 1] = 1.0
        self.split = np.zeros((depth + 1, k + 1, n + 1), dtype=np.int32)  # size of child j-1's subtree
        self.width = np.zeros((depth + 1, n + 1), dtype=np.int32)  # children of the best forest of t nodes
        self.value = np.full((depth + 1, n + 1), NEG)
        self.value[0, 0] = 0.0
        # inner[d, m]: nodes with children in that optimal subtree (its own node included): a draft model's
        # expansions; forest_inner[d, t] the same for the best forest of t nodes
        self.inner = np.zeros((depth + 1, n + 2), dtype=np.int64)
        self.forest_inner = np.zeros((depth + 1, n + 1), dtype=np.int64)
        pad, ipad = np.full(n, NEG), np.zeros(n, dtype=np.int64)
        for d in range(1, depth + 1):
            child = self.f[d - 1, 1 : n + 1]  # f_{d-1}(s), s = 1..n
            child_inner = self.inner[d - 1, 1 : n + 1]
            g = np.full(n + 1, NEG)
            g[0] = 0.0
            gi = np.zeros(n + 1, dtype=np.int64)
            forest, width, inner = g.copy(), np.zeros(n + 1, dtype=np.int32), gi.copy()
            for j in range(1, k + 1):
                with np.errstate(invalid="ignore"):
                    cand = np.concatenate([pad, g])[gather] + r[j - 1] * child[None, :]
                cand[np.isnan(cand)] = NEG
                pick = cand.argmax(axis=1)
                g = cand[t, pick]
                gi = np.concatenate([ipad, gi])[gather[t, pick]] + child_inner[pick]
                self.split[d, j] = pick + 1
                better = g > forest
                forest[better], width[better], inner[better] = g[better], j, gi[better]
                if not np.isfinite(g).any():
                    break
            self.width[d], self.value[d], self.forest_inner[d] = width, forest, inner
            self.f[d, 1:] = 1.0 + forest
            self.inner[d, 2:] = 1 + inner[1:]
        self.best = np.maximum.accumulate(self.value, axis=1)
        # the size of the best tree of at most n nodes: the first size reaching best[d, n]
        self.size = np.stack([np.searchsorted(row, row, side="left") for row in self.best])

    def expected(self, nodes: int, depth: int) -> float:
        """F: the expected accepted draft tokens of the best tree of at most ``nodes`` nodes, depth ≤ ``depth``."""
        return float(self.best[depth, nodes])

    def expansions(self, nodes: int, depth: int) -> int:
        """Nodes with children (the root included) in the best tree of at most ``nodes`` nodes, depth ≤ ``depth``:
        what a draft model must expand for it."""
        size = int(self.size[depth, nodes])
        return 1 + int(self.forest_inner[depth, size]) if size else 0

    def topology(self, nodes: int, depth: int) -> list[tuple[int, int]]:
        """The best tree of at most ``nodes`` non-root nodes and depth ≤ ``depth`` as (parent, rank) per node,
        breadth first (node 0 is the root; node i + 1 is entry i)."""
        size = int(self.size[depth, nodes])  # the smallest size reaching the best value
        out: list[tuple[int, int]] = []
        level = [(0, depth, size)]  # (tree node, depth bound below it, nodes below it)
        while level:
            nxt = []
            for node, d, t in level:
                if t <= 0:
                    continue
                kids = []
                for j in range(int(self.width[d, t]), 0, -1):
                    s = int(self.split[d, j, t])
                    kids.append((j - 1, s))
                    t -= s
                for rank, s in reversed(kids):  # ranks 0..j-1 in order
                    out.append((node, rank))
                    nxt.append((len(out), d - 1, s - 1))
            level = nxt
        return out


# ------------------------------------------------------------------------------------------ the expansion policy
class Sequoia(ExpansionPolicy):
    """Sequoia's tree (see the module). Parameters: ``budget`` (fixes n, the non-root nodes; default None:
    hardware-aware), ``max_nodes`` (the largest n the hardware-aware choice considers, 128), ``max_depth``
    (16), ``width`` (the most children a node gets, 8; also capped by the widest sibling list a draft has
    shown), ``gate`` (let the engine skip drafting while it does not pay, as BASTION does; False: Sequoia
    drafts every step).

    Hardware-aware n and depth d maximise (1 + F(n, d)) / (D + t(d, n) + C(n + 1) + h·(n + 1)): D =
    ``ctx.draft_seconds``, C = ``ctx.cost_model.predict`` (tree tokens, the root included), h =
    ``ctx.node_seconds`` per tree token, t(d, n) = the draft calls a draft model needs for that tree: one per
    depth, each priced a + b·(nodes it expands) from ``draft.expansion_seconds`` (a + b = its price for one
    node, b = one more node's), the root's call free when the root is already expanded; 0 for an eager draft,
    whose depth bound is then the deepest allowed.
    Without a cost model, n = ``max_nodes``."""

    name = "sequoia"

    def __init__(self, budget: int | None = None, max_nodes: int = 128, max_depth: int = 16, width: int = 8,
                 gate: bool = False):
        self.budget = None if budget is None else _positive_int("budget", budget)
        self.max_nodes = _positive_int("max_nodes", max_nodes)
        self.max_depth = _positive_int("max_depth", max_depth)
        self.width = _positive_int("width", width)
        if not isinstance(gate, bool):
            raise ValueError(f"gate must be true or false, got {gate!r}")
        self.gating = Gating.DRAFT if gate else Gating.NONE
        self.plan: SequoiaPlan | None = None
        self.plans = 0  # DP solves so far (tests watch the cache)
        self._key: tuple | None = None
        self._seen_width = 0  # the widest sibling list a draft has shown this policy
        self._warned = False
        self.last_choice: tuple[int, int] = (0, 0)  # (n, depth) of the last step's tree

    # -- the rates and the cached DP
    def _rates(self, surrogate) -> tuple[np.ndarray, object]:
        fn = getattr(surrogate, "rates", None)
        if callable(fn):
            r = np.asarray(fn(), dtype=float).ravel()
            return np.clip(r, 0.0, 1.0), (id(surrogate), getattr(surrogate, "version", None), r.tobytes())
        if not self._warned:
            self._warned = True
            log.info("sequoia: surrogate '%s' measures no acceptance-by-rank rates (no rates()); the tree's shape "
                     "uses the fixed default vector %s", getattr(surrogate, "name", type(surrogate).__name__),
                     [round(x, 4) for x in default_rates(self.width).tolist()])
        return default_rates(self.width), ("default",)

    def solve(self, surrogate) -> SequoiaPlan:
        """The DP for the surrogate's current rates (re-solved only when they changed)."""
        rates, source = self._rates(surrogate)
        width = min(self.width, self._seen_width) if self._seen_width else self.width
        if rates.size < width:
            rates = np.concatenate([rates, np.full(width - rates.size, rates[-1] if rates.size else 0.0)])
        key = (source, width)
        if self.plan is None or key != self._key:
            self.plan = SequoiaPlan(rates[:width], self.budget or self.max_nodes, self.max_depth)
            self._key = key
            self.plans += 1
        return self.plan

    # -- the size
    def choose(self, plan: SequoiaPlan, draft: Draft, ctx: ExpansionContext, nodes: int, depth: int) -> tuple[int, int]:
        """(n, d): the fixed budget at the deepest depth, or the hardware-aware argmax of expected tokens/s."""
        if self.budget is not None or ctx.cost_model is None:
            return nodes, depth
        sizes = np.arange(nodes + 1)
        cost = np.array([ctx.cost_model.predict(int(m) + 1, ctx.context_len) for m in sizes], dtype=float)
        cost = cost + ctx.node_seconds * (sizes + 1) + ctx.draft_seconds
        gain = 1.0 + plan.best[: depth + 1, : nodes + 1]
        gain[0, :] = 1.0  # depth 0: the root alone, whatever n allows
        if getattr(draft, "lazy", False):  # draft calls: one per depth, each a + b·(nodes it expands)
            one, two = draft.expansion_seconds(1), draft.expansion_seconds(2)
            per_node = max(two - one, 0.0)
            per_call = max(one - per_node, 0.0)
            size = plan.size[: depth + 1, : nodes + 1]
            inner = np.where(size > 0, 1 + np.take_along_axis(plan.forest_inner[: depth + 1], size, axis=1), 0)
            calls = per_call * np.arange(depth + 1)[:, None] + per_node * inner
            if draft.expanded(draft.ROOT):  # the root's children are known already: its call is not paid
                calls = np.maximum(calls - one, 0.0)
            rate = gain / (cost[None, :] + calls)
        else:
            rate = gain[[0, depth]] / cost[None, :]  # an eager draft: depth costs nothing, the deepest bound wins
        d, n = np.unravel_index(int(np.argmax(rate)), rate.shape)
        d = int(d) if getattr(draft, "lazy", False) else (0 if d == 0 else depth)
        return (int(n), d) if d > 0 else (0, 0)

    # -- the tree
    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        out = TreeBuilder(ctx.root_token)
        depth = min(ctx.max_depth, draft.max_depth, self.max_depth)
        nodes = min(ctx.max_nodes, self.budget or self.max_nodes)
        if depth <= 0 or nodes <= 0:
            self.last_choice = (0, 0)
            return out.build()
        lazy = bool(getattr(draft, "lazy", False))
        if not lazy or draft.expanded(draft.ROOT):  # free to look at: how wide this draft's lists are
            self._seen_width = max(self._seen_width, len(draft.children(draft.ROOT, 0)))
        plan = self.solve(ctx.surrogate)
        n, d = self.choose(plan, draft, ctx, nodes, depth)
        self.last_choice = (n, d)
        if n <= 0 or d <= 0:
            return out.build()
        shape = plan.topology(n, d)
        kids: dict[int, list[tuple[int, int]]] = {}
        for i, (parent, rank) in enumerate(shape, start=1):
            kids.setdefault(parent, []).append((i, rank))
        level = [(0, 0, draft.ROOT, 1.0)]  # (shape node, tree node, draft handle, P)
        for depth_now in range(d):
            level = [e for e in level if e[0] in kids]
            if not level:
                break
            if lazy:  # a draft model: every node of this depth that gets children, in one draft call
                todo = [h for _, _, h, _ in level if not draft.expanded(h)]
                if todo:
                    draft.expand(todo, depth_now)
            nxt = []
            for shape_node, node, handle, p in level:
                cands = draft.children(handle, depth_now)
                self._seen_width = max(self._seen_width, len(cands))
                for child, rank in kids[shape_node]:
                    if rank >= len(cands):
                        continue  # the draft has no child of this rank here: its subtree is dropped
                    cand = cands[rank]._replace(rank=rank)
                    score = ctx.score(p, depth_now + 1, cand)
                    nxt.append((child, out.add(node, cand, score), cand.handle, score))
            level = nxt
        return out.build()


@hookimpl
def register_expansion_policies(register):
    register("sequoia", Sequoia)


@hookimpl
def register_surrogates(register):
    register("sibling-rank", SiblingRank)
