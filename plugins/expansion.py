"""Built-in expansion policies: ``root-only``, ``chain``, ``static-tree``, ``best-first`` and BASTION's
``adaptive-best-first``.

Each turns a :class:`~specframe.components.Draft` into the tree to verify, within the engine's hard
bounds (``ctx.max_nodes`` non-root nodes, ``ctx.max_depth`` depth).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from specframe import hookimpl
from specframe.components import BuiltTree, Draft, ExpansionContext, ExpansionPolicy, Gating, TreeBuilder


def _positive(name: str, value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class RootOnly(ExpansionPolicy):
    """No draft tokens: the tree is the root alone (plain decoding through the same loop)."""

    name = "root-only"

    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        return TreeBuilder(ctx.root_token).build()


class Chain(ExpansionPolicy):
    """The single most likely path: the top child at every depth (DFlash-style argmax chain)."""

    name = "chain"

    def __init__(self, max_len: int | None = None):
        self.max_len = _positive("max_len", max_len)

    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        out = TreeBuilder(ctx.root_token)
        depth_cap = min(ctx.max_depth, ctx.max_nodes, draft.max_depth, self.max_len or draft.max_depth)
        node, handle, p = 0, draft.ROOT, 1.0
        for depth in range(depth_cap):
            kids = draft.children(handle, depth)
            if not kids:
                break
            p = ctx.score(p, depth + 1, kids[0])
            node, handle = out.add(node, kids[0], p), kids[0].handle
        return out.build()


class StaticTree(ExpansionPolicy):
    """A fixed topology, the same every step: ``topology[d]`` = how many ranked children each node at
    depth d gets (so ``(2, 2, 1)`` has 2 + 4 + 4 nodes)."""

    name = "static-tree"

    def __init__(self, topology: Sequence[int] = (2, 2, 1, 1, 1, 1)):
        if isinstance(topology, int):
            topology = (topology,)
        topology = tuple(topology)
        if not topology or any(not isinstance(k, int) or k <= 0 for k in topology):
            raise ValueError(f"topology must be a non-empty list of positive integers, got {topology!r}")
        self.topology = topology

    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        out = TreeBuilder(ctx.root_token)
        frontier = [(0, draft.ROOT, 1.0)]
        for depth, width in enumerate(self.topology[: min(ctx.max_depth, draft.max_depth)]):
            nxt = []
            for node, handle, p in frontier:
                for cand in draft.children(handle, depth)[:width]:
                    if len(out) > ctx.max_nodes:
                        return out.build()
                    score = ctx.score(p, depth + 1, cand)
                    nxt.append((out.add(node, cand, score), cand.handle, score))
            frontier = nxt
        return out.build()


class Frontier:
    """Candidates not yet in the tree, best surrogate score first (the heap of best-first expansion)."""

    def __init__(self, draft: Draft, ctx: ExpansionContext, max_depth: int):
        self.draft, self.ctx, self.max_depth = draft, ctx, max_depth
        self.heap: list = []
        self.tie = 0
        self.push_children(0, draft.ROOT, 0, 1.0)

    def __bool__(self) -> bool:
        return bool(self.heap)

    def push_children(self, node: int, handle: object, depth: int, p: float) -> None:
        """Offer the children of tree node ``node`` (draft ``handle``, at ``depth``, with score ``p``)."""
        if depth >= self.max_depth:
            return
        for cand in self.draft.children(handle, depth):
            heapq.heappush(self.heap, (-self.ctx.score(p, depth + 1, cand), self.tie, node, depth + 1, cand))
            self.tie += 1

    def best_score(self) -> float:
        return -self.heap[0][0]

    def take(self, out: TreeBuilder) -> float:
        """Move the best candidate into ``out`` (its children become candidates); returns its score."""
        neg, _, parent, depth, cand = heapq.heappop(self.heap)
        node = out.add(parent, cand, -neg)
        self.push_children(node, cand.handle, depth, -neg)
        return -neg


class BestFirst(ExpansionPolicy):
    """Query-dependent tree of a fixed node budget: the ``budget`` prefixes of highest P(v) (DDTree-style).

    Pops candidates in decreasing surrogate score; children of a node enter the heap when it is taken.
    """

    name = "best-first"

    def __init__(self, budget: int = 16):
        self.budget = _positive("budget", budget)

    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        out = TreeBuilder(ctx.root_token)
        limit = min(self.budget, ctx.max_nodes)
        frontier = Frontier(draft, ctx, min(ctx.max_depth, draft.max_depth))
        while frontier and out.drafted < limit:
            frontier.take(out)
        return out.build()


class AdaptiveBestFirst(ExpansionPolicy):
    """BASTION's expansion: best-first by P(v), sized to maximise expected tokens per second.

    With S = Σ P over the tree so far (root included, P(root) = 1), D = predicted draft + overhead
    seconds and C(n) the cost model's verify time for n tree tokens plus the host's time for n nodes
    (``ctx.node_seconds`` each, measured by the engine), adding the next node (P = p) raises
    (S) / (D + C(n)) iff  p·(D + C(n)) > S·(C(n+1) − C(n)).  The policy keeps popping while that holds and,
    to step over bumps in a measured cost curve, looks ``patience`` nodes further; it keeps the prefix of
    the best-first order with the highest S / (D + C(n)). Where the cost model declares its curve convex
    (``convex_from``; a roofline beyond its single-token path) the first stop is already optimal — S grows
    by ever smaller steps while D + C(n) grows by ever larger ones — so the look-ahead is skipped there.
    Hard bounds: ``max_nodes`` and the drafter's depth.

    With ``gate=True`` (default) the size may also be zero before drafting: the engine's
    :class:`~specframe.gate.DraftGate` skips the drafter on steps where drafting has measurably not been
    paying for its own time (a costly drafter on a fast target, or a useless one).
    """

    name = "adaptive-best-first"

    def __init__(self, max_nodes: int = 256, patience: int = 16, min_nodes: int = 0, gate: bool = True):
        self.max_nodes = _positive("max_nodes", max_nodes)
        self.gating = Gating.DRAFT if gate else Gating.NONE
        if not isinstance(patience, int) or patience < 0 or not isinstance(min_nodes, int) or min_nodes < 0:
            raise ValueError("patience and min_nodes must be integers >= 0")
        self.patience, self.min_nodes = patience, min_nodes

    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        out = TreeBuilder(ctx.root_token)
        limit = min(self.max_nodes, ctx.max_nodes)
        frontier = Frontier(draft, ctx, min(ctx.max_depth, draft.max_depth))
        if not frontier:  # nothing drafted (or the gate skipped the drafter): the root alone, as plain decoding
            return out.build()
        cost, c, d, h = ctx.cost_model, ctx.context_len, ctx.draft_seconds, ctx.node_seconds
        convex_from = getattr(cost, "convex_from", None)
        s, c_now = 1.0, cost.predict(1, c) + h
        best_rate, best_size, since_best = s / (d + c_now), 1, 0
        while frontier and out.drafted < limit:
            p = frontier.best_score()
            c_next = cost.predict(len(out) + 1, c) + h * (len(out) + 1)
            gain = p * (d + c_now) > s * (c_next - c_now)
            if not gain and len(out) > self.min_nodes:
                since_best += 1
                if since_best > self.patience or (convex_from is not None and len(out) >= convex_from):
                    break
            frontier.take(out)
            s, c_now = s + p, c_next
            rate = s / (d + c_now)
            if rate > best_rate or len(out) <= self.min_nodes + 1:
                best_rate, best_size, since_best = rate, len(out), 0
        return _prefix(out, best_size)


def _prefix(out: TreeBuilder, size: int) -> BuiltTree:
    """The first ``size`` nodes of a builder (a prefix of a best-first order is a valid tree)."""
    cut = TreeBuilder(out.tokens[0])
    cut.tokens, cut.parents, cut.logq = out.tokens[:size], out.parents[:size], out.logq[:size]
    cut.source, cut.scores = out.source[:size], out.scores[:size]
    return cut.build()


@hookimpl
def register_expansion_policies(register):
    register("root-only", RootOnly)
    register("chain", Chain)
    register("static-tree", StaticTree)
    register("best-first", BestFirst)
    register("adaptive-best-first", AdaptiveBestFirst)
