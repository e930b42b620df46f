"""Built-in expansion policy ``multi-sequence``: DuoDecoding's dynamic multi-sequence drafting.

DuoDecoding (Lv et al., 2025) drafts γ tokens per step. Where the draft is sure of the first token it drafts
one sequence of γ; where it is not, it drafts k sequences of γ/k tokens, each starting from a different
first token. The rule: with p₁ and p₂ the draft's probabilities of the greedy pair (its best first token and
the best token after it), every first-position candidate of rank 2–8 more probable than p₁·p₂ earns a
sequence of its own, so k = 1 + their number, rounded down to a divisor of γ; sequence i is the i-th first
token followed by the draft's greedy continuation. γ itself comes from measured times so that neither side
idles: the largest γ whose drafting (γ draft calls at the draft's measured time per call — per call made
while the target verifies, when the draft is drafted ahead) takes no longer than verifying γ + 1 tokens
(the cost model's prediction). The bundle ``duodecoding`` drafts it with a
draft model, ahead, while the target verifies (see :mod:`specframe.policies.duodecoding`).
"""

from __future__ import annotations

import math

from specframe import hookimpl
from specframe.components import BuiltTree, Candidate, Draft, ExpansionContext, ExpansionPolicy, TreeBuilder

GAMMAS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # γ values with many divisors, so k can follow its rule


def sequence_count(first: list[float], p2: float, gamma: int, ranks: int = 8) -> int:
    """DuoDecoding's k: 1 + the first-position candidates of rank 2..``ranks`` (``first``: probabilities, best
    first) more probable than p₁·p₂, rounded down to a divisor of ``gamma``."""
    if not first:
        return 1
    bar = first[0] * p2
    k = 1 + sum(1 for p in first[1:ranks] if p > bar)
    return max(d for d in range(1, min(k, gamma) + 1) if gamma % d == 0)


def balanced_gamma(draft_call_s: float, verify_s, most: int) -> int:
    """The largest γ (of :data:`GAMMAS`, at most ``most``) whose drafting, γ calls of ``draft_call_s``, takes no
    longer than ``verify_s(γ + 1)``; 1 when even one call does."""
    fits = [g for g in GAMMAS if g <= most and g * draft_call_s <= verify_s(g + 1)]
    return max(fits, default=1)


class MultiSequence(ExpansionPolicy):
    """DuoDecoding's k sequences of γ/k draft tokens (see the module). Parameters: ``gamma`` (fixed γ; default:
    chosen each step from measured times), ``max_gamma`` (the largest γ chosen, 16), ``ranks`` (the candidates
    the k rule looks at, 8: the drafter should offer that many children, e.g. ``drafter.top_k=8``)."""

    name = "multi-sequence"

    def __init__(self, gamma: int | None = None, max_gamma: int = 16, ranks: int = 8):
        for key, value in (("gamma", gamma), ("max_gamma", max_gamma), ("ranks", ranks)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        self.gamma, self.max_gamma, self.ranks = gamma, max_gamma, ranks

    def choose_gamma(self, draft: Draft, ctx: ExpansionContext) -> int:
        if self.gamma:
            return self.gamma
        call = draft.ahead_expansion_seconds(1)  # drafted while the target verifies: the ahead call's time
        call = draft.expansion_seconds(1) if call is None else call
        return balanced_gamma(call, lambda n: ctx.cost_model.predict(n, ctx.context_len), self.max_gamma)

    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        out = TreeBuilder(ctx.root_token)
        firsts = draft.children(draft.ROOT, 0)
        gamma = min(self.choose_gamma(draft, ctx), ctx.max_nodes)
        if not firsts or gamma <= 0 or ctx.max_depth <= 0:
            return out.build()
        seconds = draft.children(firsts[0].handle, 1) if min(ctx.max_depth, draft.max_depth) > 1 else []
        p2 = math.exp(seconds[0].logq) if seconds else 0.0
        k = sequence_count([math.exp(c.logq) for c in firsts], p2, gamma, self.ranks)
        k = min(k, len(firsts))
        length = min(gamma // k, ctx.max_depth, draft.max_depth)
        heads = []  # (tree node, draft handle, score) of each sequence's last node
        for rank, cand in enumerate(firsts[:k]):
            score = ctx.score(1.0, 1, cand._replace(rank=rank))
            heads.append((out.add(0, cand, score), cand.handle, score))
        for depth in range(1, length):
            if draft.lazy:  # one draft call extends every sequence
                draft.expand([h for _, h, _ in heads if not draft.expanded(h)], depth)
            grown = []
            for node, handle, p in heads:
                kids = draft.children(handle, depth)
                if kids:
                    best: Candidate = kids[0]._replace(rank=0)
                    score = ctx.score(p, depth + 1, best)
                    grown.append((out.add(node, best, score), best.handle, score))
            heads = grown
        return out.build()


@hookimpl
def register_expansion_policies(register):
    register("multi-sequence", MultiSequence)
