"""Built-in expansion policy ``branch``: SpecBranch's branches at low-confidence positions.

SpecBranch (Shen et al., ICLR 2026) hedges where the draft is unsure: at a position whose best candidate has
draft probability below ``threshold`` it branches into the top ``branch`` candidates, and it extends every
branch only while the draft stays confident — a path whose draft confidence (the product of q along it)
falls below ``min_path`` is more likely to be rolled back than accepted, so it ends there (rollback-aware
lengths). ``max_len`` and ``budget`` bound the depth and the nodes.

Where the draft carries a length prediction (``draft.length_classes``: probabilities of SpecBranch's H-RAD
classes 0 / 1–6 / 7+ accepted tokens, from the target's hidden states, see :mod:`specframe.plugins.hrad`),
the likeliest class caps the length: class 0 branches at the first position and stops there, class 1–6
stops at 6, class 7+ runs to ``max_len``. The bundle ``specbranch`` drafts with a draft model, ahead, while
the target verifies, for its two likeliest outcomes (see :mod:`specframe.policies.specbranch`).
"""

from __future__ import annotations

import math

from specframe import hookimpl
from specframe.components import BuiltTree, Draft, ExpansionContext, ExpansionPolicy, TreeBuilder

CLASS_LENGTH = (1, 6, None)  # H-RAD class -> the longest path it allows (None: max_len)


class Branch(ExpansionPolicy):
    """SpecBranch's tree (see the module). Parameters: ``branch`` (candidates at a low-confidence position,
    2), ``threshold`` (a position is low-confidence when its best candidate's q is below it, 0.5),
    ``min_path`` (a path ends once its draft confidence falls below it, 0.2), ``max_len`` (16), ``budget``
    (nodes, 32)."""

    name = "branch"

    def __init__(self, branch: int = 2, threshold: float = 0.5, min_path: float = 0.2, max_len: int = 16,
                 budget: int = 32):
        for key, value in (("branch", branch), ("max_len", max_len), ("budget", budget)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not 0 <= threshold <= 1 or not 0 <= min_path <= 1:
            raise ValueError(f"threshold and min_path must lie in [0, 1], got {threshold}, {min_path}")
        self.branch, self.threshold, self.min_path = branch, threshold, min_path
        self.max_len, self.budget = max_len, budget

    def length_cap(self, draft: Draft) -> tuple[int, bool]:
        """(the longest path, whether to branch at the first position) from the draft's H-RAD classes."""
        classes = getattr(draft, "length_classes", None)
        if not classes:
            return self.max_len, False
        best = max(range(len(classes)), key=lambda i: classes[i])
        return min(CLASS_LENGTH[best] or self.max_len, self.max_len), best == 0

    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        out = TreeBuilder(ctx.root_token)
        longest, hedge_first = self.length_cap(draft)
        depth_cap = min(longest, ctx.max_depth, draft.max_depth)
        limit = min(self.budget, ctx.max_nodes)
        heads = [(0, draft.ROOT, 1.0, 1.0)]  # (tree node, handle, draft path confidence, surrogate score)
        for depth in range(depth_cap):
            if draft.lazy:  # one draft call per depth, over every live branch
                draft.expand([h for _, h, _, _ in heads if not draft.expanded(h)], depth)
            grown = []
            for node, handle, conf, score in heads:
                kids = draft.children(handle, depth)
                if not kids:
                    continue
                unsure = math.exp(kids[0].logq) < self.threshold or (depth == 0 and hedge_first)
                for rank, cand in enumerate(kids[: self.branch if unsure else 1]):
                    path = conf * math.exp(cand.logq)
                    if out.drafted >= limit or (path < self.min_path and depth):
                        break  # first tokens are always offered: the hedge against the likeliest rollback
                    p = ctx.score(score, depth + 1, cand._replace(rank=rank))
                    grown.append((out.add(node, cand, p), cand.handle, path, p))
            heads = [h for h in grown if h[2] >= self.min_path]  # a child of a weaker path could only be weaker
            if not heads:
                break
        return out.build()


@hookimpl
def register_expansion_policies(register):
    register("branch", Branch)
