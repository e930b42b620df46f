"""Built-in expansion policies: ``root-only``, ``chain``, ``static-tree``, ``best-first`` and BASTION's
``adaptive-best-first``.

Each turns a :class:`~specframe.components.Draft` into the tree to verify, within the engine's hard
bounds (``ctx.max_nodes`` non-root nodes, ``ctx.max_depth`` depth).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from specframe import hookimpl
from specframe.components import BuiltTree, Candidate, Draft, ExpansionContext, ExpansionPolicy, Gating, TreeBuilder


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
            p = ctx.score(p, depth + 1, kids[0]._replace(rank=0))
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
            if draft.lazy:  # a draft model: this depth's nodes are drafted in one call
                draft.expand([h for _, h, _ in frontier if not draft.expanded(h)], depth)
            nxt = []
            for node, handle, p in frontier:
                for rank, cand in enumerate(draft.children(handle, depth)[:width]):
                    if len(out) > ctx.max_nodes:
                        return out.build()
                    score = ctx.score(p, depth + 1, cand._replace(rank=rank))
                    nxt.append((out.add(node, cand, score), cand.handle, score))
            frontier = nxt
        return out.build()


class Frontier:
    """Candidates not yet in the tree, best surrogate score first (the heap of best-first expansion).

    With an eager draft a node's children enter the heap when the node is taken. With a lazy one (a draft
    model: a node's children cost a draft forward) a taken node enters the heap as a *pending expansion*,
    ranked by the score its best child is expected to get; when one reaches the top the policy either
    pays for it (:meth:`expand_top`, one draft call over it and the other pending nodes of its depth that
    are worth it) or drops it (:meth:`drop_top`). So no forward is spent on a leaf of the final tree.
    """

    def __init__(self, draft: Draft, ctx: ExpansionContext, max_depth: int):
        self.draft, self.ctx, self.max_depth = draft, ctx, max_depth
        self.lazy = bool(getattr(draft, "lazy", False))
        self.heap: list = []
        self.tie = 0
        self.push_children(0, draft.ROOT, 0, 1.0, eager=True)

    def __bool__(self) -> bool:
        return bool(self.heap)

    def push_children(self, node: int, handle: object, depth: int, p: float, eager: bool = False) -> None:
        """Offer the children of tree node ``node`` (draft ``handle``, at ``depth``, with score ``p``); of a
        lazy draft's unexpanded node, its pending expansion instead (unless ``eager``)."""
        if depth >= self.max_depth:
            return
        if self.lazy and not eager and not self.draft.expanded(handle):
            guess = Candidate(-1, self.draft.expected_child_logq(handle, depth), None, rank=0)
            heapq.heappush(self.heap, (-self.ctx.score(p, depth + 1, guess), self.tie, node, depth, handle, p, True))
        else:
            for rank, cand in enumerate(self.draft.children(handle, depth)):
                cand = cand._replace(rank=rank)
                heapq.heappush(self.heap, (-self.ctx.score(p, depth + 1, cand), self.tie, node, depth + 1, cand, 0.0, False))
                self.tie += 1
        self.tie += 1

    def best_score(self) -> float:
        return -self.heap[0][0]

    def top_pending(self) -> bool:
        """Whether the best entry is a pending expansion (children not drafted yet) rather than a node."""
        return self.heap[0][-1]

    def take(self, out: TreeBuilder) -> float:
        """Move the best candidate into ``out`` (its children become candidates); returns its score."""
        neg, _, parent, depth, cand, _, _ = heapq.heappop(self.heap)
        node = out.add(parent, cand, -neg)
        self.push_children(node, cand.handle, depth, -neg)
        return -neg

    def drop_top(self) -> None:
        """Give up the best entry, a pending expansion: its node stays a leaf."""
        heapq.heappop(self.heap)

    def expand_top(self, worth=lambda score: True) -> int:
        """Draft the children of the pending expansion on top, together (one draft call) with every other
        pending expansion of the same depth whose expected score ``worth(score)`` accepts; their children
        enter the heap. Returns how many nodes the call expanded."""
        top = heapq.heappop(self.heap)
        depth = top[3]
        same = sorted(e for e in self.heap if e[-1] and e[3] == depth)  # best expected score first
        batch = [top] + [e for e in same if worth(-e[0])]
        if len(batch) > 1:
            chosen = {id(e) for e in batch}
            self.heap = [e for e in self.heap if id(e) not in chosen]
            heapq.heapify(self.heap)
        self.draft.expand([e[4] for e in batch], depth)
        for _, _, node, d, handle, p, _ in batch:
            self.push_children(node, handle, d, p, eager=True)
        return len(batch)


class BestFirst(ExpansionPolicy):
    """Query-dependent tree of a fixed node budget: the ``budget`` prefixes of highest P(v) (DDTree-style).

    Pops candidates in decreasing surrogate score; children of a node enter the heap when it is taken
    (with a draft model: when its expansion reaches the top; pending expansions of one depth that rank
    within the remaining budget are drafted in the same call).
    """

    name = "best-first"

    def __init__(self, budget: int = 16):
        self.budget = _positive("budget", budget)

    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        out = TreeBuilder(ctx.root_token)
        limit = min(self.budget, ctx.max_nodes)
        frontier = Frontier(draft, ctx, min(ctx.max_depth, draft.max_depth))
        while frontier and out.drafted < limit:
            if frontier.top_pending():
                ranked = heapq.nsmallest(limit - out.drafted, frontier.heap)
                bar = -ranked[-1][0]
                frontier.expand_top(lambda score: score >= bar)
            else:
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

    With a draft model, a node's children cost a draft call of t seconds (the draft's measured time per
    depth), so drafting one depth further is a decision of the same rule: a pending expansion whose best
    child is expected at p is paid for iff  p·(D + C(n)) > S·(C(n+1) − C(n) + t), and D grows by t when
    it is; pending expansions of the same depth join that call while their own p covers the call's
    marginal cost. How deep and how wide the draft goes is thus sized by the same stopping rule.

    With ``gate=True`` (default) the size may also be zero before drafting: the engine's
    :class:`~specframe.gate.DraftGate` skips the drafter on steps where drafting has measurably not been
    paying for its own time (a costly drafter on a fast target, or a useless one). A drafter whose time stays
    under ``cheap_draft`` (3 %) of a step always runs — it cannot cost more than that, and the tree is the
    root alone where its guesses do not pay — so prompt lookup is not switched off where verification is
    nearly free and its rare good guesses pay (simulated H200, MT-Bench: 1.23× with the gate free to stop it,
    1.36× with it running). ``cheap_draft=0``: the gate may stop any drafter.

    Serving many requests at once (``specframe serve``), ``batch_budget=True`` (default) sizes all their trees
    together with :meth:`expand_batch`: one target call verifies them all, so a node is worth adding where it
    raises the whole call's tokens per second most. ``batch_budget=False``: each request's tree is sized as
    if it were verified alone.
    """

    name = "adaptive-best-first"

    def __init__(self, max_nodes: int = 256, patience: int = 16, min_nodes: int = 0, gate: bool = True,
                 cheap_draft: float = 0.03, batch_budget: bool = True):
        self.max_nodes = _positive("max_nodes", max_nodes)
        if not isinstance(batch_budget, bool):
            raise ValueError(f"batch_budget must be true or false, got {batch_budget!r}")
        self.batch_budget = batch_budget  # serving a batch: one budget across it (False: each request alone)
        self.gating = Gating.DRAFT if gate else Gating.NONE
        if not (isinstance(cheap_draft, (int, float)) and 0 <= cheap_draft < 1):
            raise ValueError(f"cheap_draft must be a share in [0, 1), got {cheap_draft!r}")
        self.cheap_draft = float(cheap_draft)
        if not isinstance(patience, int) or patience < 0 or not isinstance(min_nodes, int) or min_nodes < 0:
            raise ValueError("patience and min_nodes must be integers >= 0")
        self.patience, self.min_nodes = patience, min_nodes

    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        return self.expand_batch([draft], [ctx])[0]

    def expand_batch(self, drafts: Sequence[Draft], ctxs: Sequence[ExpansionContext]) -> list[BuiltTree]:
        """One budget for a batch of requests verified in ONE target call (continuous batching): the next
        node goes to whichever request's best remaining candidate raises the whole call's expected tokens
        per second most, under the cost of the whole call — S is the batch's Σ P (every root counts 1),
        C(N) the cost model's time for all N tokens of the call at the context the backend prices one call over
        them at (``batch_context``; without one, their summed context), D the
        step's draft and host seconds (``ctxs[0]``'s, which the engine learns per batch step). With one
        request this is exactly :meth:`expand`. Each request keeps its own bounds and a prefix of its own
        best-first order, so its tree is valid for its own verifier."""
        outs = [TreeBuilder(ctx.root_token) for ctx in ctxs]
        limits = [min(self.max_nodes, ctx.max_nodes) for ctx in ctxs]
        fronts = [Frontier(d, ctx, min(ctx.max_depth, d.max_depth)) for d, ctx in zip(drafts, ctxs)]
        lead = ctxs[0]
        c = lead.batch_context if lead.batch_context is not None else sum(ctx.context_len for ctx in ctxs)
        cost, d, h = lead.cost_model, lead.draft_seconds, lead.node_seconds
        convex_from = getattr(cost, "convex_from", None)
        roots = len(ctxs)
        s, tokens = float(roots), roots  # S (Σ P, roots included) and N (tokens in the call)
        c_now = cost.predict(tokens, c) + h * tokens
        best_rate, best_taken, since_best = s / (d + c_now), 0, 0
        sums = [(s, c_now)]  # (S, C(N)) of every prefix of the batch's best-first order, for a D that grows
        order: list[int] = []  # which request took each node, in order

        def best() -> int | None:  # the request whose best remaining candidate is the most likely
            open_ = [r for r, f in enumerate(fronts) if f and outs[r].drafted < limits[r]]
            return max(open_, key=lambda r: fronts[r].best_score(), default=None)

        while (r := best()) is not None:
            frontier, draft = fronts[r], drafts[r]
            p = frontier.best_score()
            c_next = cost.predict(tokens + 1, c) + h * (tokens + 1)
            if frontier.top_pending():  # the best next thing costs a draft call first
                if p * (d + c_now) > s * (c_next - c_now + draft.expansion_seconds(1)):
                    d += draft.expansion_seconds(frontier.expand_top(_joins(draft, s, d + c_now, c_next - c_now)))
                    # draft time spent counts for every prefix alike: the best prefix under the new D
                    best_taken = max(range(len(sums)), key=lambda i: sums[i][0] / (d + sums[i][1]))
                    best_rate = sums[best_taken][0] / (d + sums[best_taken][1])
                else:
                    frontier.drop_top()
                continue
            drafted = tokens - roots + 1  # (with one request: the tree's size so far)
            gain = p * (d + c_now) > s * (c_next - c_now)
            if not gain and drafted > self.min_nodes:
                since_best += 1
                if since_best > self.patience or (convex_from is not None and tokens >= convex_from):
                    break
            frontier.take(outs[r])
            order.append(r)
            s, c_now, tokens = s + p, c_next, tokens + 1
            sums.append((s, c_now))
            rate = s / (d + c_now)
            if rate > best_rate or drafted <= self.min_nodes:
                best_rate, best_taken, since_best = rate, len(order), 0
        kept = [1] * roots  # each request's nodes within the best prefix of the batch's order
        for r in order[:best_taken]:
            kept[r] += 1
        return [_prefix(out, size) for out, size in zip(outs, kept)]


def _joins(draft: Draft, s: float, base: float, step: float):
    """``worth(score)`` for :meth:`Frontier.expand_top`: another pending expansion joins the draft call
    while its expected score p pays for the call's marginal cost, p·(D + C(n)) > S·(C(n+1) − C(n) + Δt)."""
    count = [1]

    def worth(score: float) -> bool:
        extra = draft.expansion_seconds(count[0] + 1) - draft.expansion_seconds(count[0])
        ok = score * base > s * (step + extra)
        count[0] += ok
        return ok

    return worth


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
