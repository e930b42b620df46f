"""Built-in expansion policy ``eagle2``: EAGLE-2's dynamic draft tree (Li et al., 2024, *EAGLE-2: Faster
Inference of Language Models with Dynamic Draft Trees*).

EAGLE-2 grows the draft tree depth by depth and then reranks it:

* **Expansion.** Depth 1 is the root's top ``top_k`` children. At every further depth, of the candidates
  generated at the previous depth the ``top_k`` with the highest value (the path confidence: the product of
  the draft's probabilities from the root) are expanded, each with its own top ``top_k`` children — so a
  depth generates up to top_k² candidates, of which again the top ``top_k`` go on. ``depth`` depths in all.
* **Rerank.** Of *all* generated candidates, the ``nodes`` with the highest value form the tree. A kept
  node's missing ancestors are kept with it and count against ``nodes`` (with the path confidence a child
  never outranks its parent, and ties go to the earlier-generated candidate, so no ancestor is ever
  missing; a surrogate that is not monotone along a path may need them).

The value is the step's acceptance surrogate, ``ctx.score`` (the bundle ``eagle2`` uses ``path-confidence``,
which is exactly EAGLE-2's value). With a draft model (a lazy draft, whose children cost a draft call) the
``top_k`` nodes chosen at a depth are drafted together in ONE :meth:`~specframe.components.Draft.expand`
call, as EAGLE-2's draft head runs one forward per depth; a node already expanded is not drafted again.

Defaults are EAGLE-2's own (SafeAILab/EAGLE at the EAGLE-2 release, ``EaModel.from_pretrained(total_token=59,
depth=5, top_k=10)``): its tree holds ``total_token`` tokens *with* the root, so 58 drafted nodes; its
``depth=5`` counts the draft head's forwards after the one that gives the root's top-k, so the tree is 6
deep. Here ``nodes`` and ``depth`` count what specframe bounds: non-root nodes and tree depth.
"""

from __future__ import annotations

from typing import NamedTuple

from specframe import hookimpl
from specframe.components import BuiltTree, Candidate, Draft, ExpansionContext, ExpansionPolicy, TreeBuilder


class Generated(NamedTuple):
    """One candidate the expansion generated: its value, its parent's index in the pool (-1: the root), its
    depth and the draft's candidate (rank set)."""

    score: float
    parent: int
    depth: int
    cand: Candidate


class Eagle2Tree(ExpansionPolicy):
    """EAGLE-2's dynamic draft tree (see the module). Parameters: ``nodes`` (the tree's non-root nodes after
    the rerank, EAGLE-2's total_token − 1: 58), ``depth`` (the tree's depth, EAGLE-2's depth + 1: 6),
    ``top_k`` (children per expanded node, and nodes expanded per depth: 10)."""

    name = "eagle2"

    def __init__(self, nodes: int = 58, depth: int = 6, top_k: int = 10):
        for key, value in (("nodes", nodes), ("depth", depth), ("top_k", top_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        self.nodes, self.depth, self.top_k = nodes, depth, top_k

    def generate(self, draft: Draft, ctx: ExpansionContext, limit: int) -> list[Generated]:
        """Every candidate the depth-by-depth expansion generates, in generation order (depth by depth; a
        parent always comes before its children). No depth beyond ``limit``: a node deeper than the node
        budget could not be kept with its ancestors."""
        pool: list[Generated] = []
        frontier: list[tuple[int, object, float]] = [(-1, draft.ROOT, 1.0)]  # (pool index, handle, value)
        for depth in range(min(self.depth, ctx.max_depth, draft.max_depth, limit)):
            if draft.lazy:  # a draft model: the chosen nodes of this depth are drafted in one call
                todo = [handle for _, handle, _ in frontier if not draft.expanded(handle)]
                if todo:
                    draft.expand(todo, depth)
            generated = []
            for index, handle, p in frontier:
                for rank, cand in enumerate(draft.children(handle, depth)[: self.top_k]):
                    cand = cand._replace(rank=rank)
                    generated.append(len(pool))
                    pool.append(Generated(ctx.score(p, depth + 1, cand), index, depth + 1, cand))
            if not generated:
                break
            chosen = sorted(generated, key=lambda i: -pool[i].score)[: self.top_k]  # stable: ties by generation
            frontier = [(i, pool[i].cand.handle, pool[i].score) for i in chosen]
        return pool

    @staticmethod
    def rerank(pool: list[Generated], limit: int) -> list[int]:
        """The pool indices of the tree: candidates by value (ties: generation order), each taken with its
        missing ancestors while they all fit in ``limit`` nodes; returned in generation order (a valid
        topological order)."""
        kept: set[int] = set()
        for i in sorted(range(len(pool)), key=lambda i: -pool[i].score):
            if len(kept) >= limit:
                break
            chain, j = [], i
            while j >= 0 and j not in kept:
                chain.append(j)
                j = pool[j].parent
            if len(kept) + len(chain) <= limit:
                kept.update(chain)
        return sorted(kept)

    def expand(self, draft: Draft, ctx: ExpansionContext) -> BuiltTree:
        out = TreeBuilder(ctx.root_token)
        limit = min(self.nodes, ctx.max_nodes)
        if limit <= 0:
            return out.build()
        pool = self.generate(draft, ctx, limit)
        node = {-1: 0}
        for i in self.rerank(pool, limit):
            g = pool[i]
            node[i] = out.add(node[g.parent], g.cand, g.score)
        return out.build()


@hookimpl
def register_expansion_policies(register):
    register("eagle2", Eagle2Tree)
