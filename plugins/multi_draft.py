"""Sampled drafts and the multi-draft verifiers ``multi-draft`` and ``multi-draft-wor`` (temperature > 0).

With ranked (top-k) candidates, the ``sample`` verifier's walk is already the best a lossless verifier can
do: it accepts a child with probability p(child). What it cannot do is use a good draft at a high
temperature: if the draft's q is close to the target's p and p is flat, a top-1 chain is accepted with
probability max p, while a child *drawn* from q and accepted with probability min(1, p(x)/q(x)) is
accepted with probability Σ min(p, q) ≈ 1.

So these verifiers draw the tree's children from the draft's distribution, in the shape the expansion
policy chose from the ranked candidates (SpecInfer, Miao et al. 2024): where the policy's tree gives a
node c children, c tokens are drawn from the node's q (the draft's candidates there, at the request's
temperature), and the policy's subtree of its rank-j child hangs under the j-th distinct drawn token. The
shape is fixed before anything is drawn and a node's draws never decide whether that node is verified,
which is what makes this exact for *any* policy (a policy that saw the drawn tokens could keep a node only
when its draws suit it, and bias the output).

Verification at a node with draws x₁ … x_c (multi-step speculative sampling): r = p; for each draw in
order, accept x_i with probability min(1, r(x_i)/q_i(x_i)) and descend to it; else r ← normalise(max(r − q_i,
0)). If every draw is rejected, the bonus is drawn from r. A node without draws (a leaf) draws its bonus
from p.

* ``multi-draft``: the c draws are i.i.d. from q, so q_i = q (SpecInfer). Duplicates are possible: they
  count as draws (the residual shrinks again) but make one child.
* ``multi-draft-wor``: the draws are without replacement, q_i = q without x₁ … x_{i−1}, renormalised
  (recursive rejection sampling, Jeon et al. 2024): no draw is wasted on a duplicate.

At temperature 0 both verify greedily (the target's argmax chain, as ``greedy``): drawing has no use there.
The engine refuses a drafter whose candidates' log-probs are not a distribution (``Drafter.sampling_q``:
prompt lookup's scores are not), in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specframe import hookimpl
from specframe.components import BuiltTree, Draft, SamplingParams, Sampler, Verdict, Verifier, target_probs
from specframe.tree import Tree

from .verifiers import GreedyVerifier, _child_index


@dataclass(frozen=True)
class Proposal:
    """What one node's children were drawn from: the draft's ``tokens`` with probabilities ``probs`` (q at
    the request's temperature, over the candidates the draft listed), and the ``draws`` in order."""

    tokens: tuple[int, ...]
    probs: tuple[float, ...]
    draws: tuple[int, ...]
    replacement: bool


def draft_distribution(logq: list[float], temperature: float) -> list[float]:
    """q at ``temperature`` over the listed candidates: softmax(logq / T), renormalised over them."""
    if not logq:
        return []
    scaled = [x / temperature for x in logq]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    total = sum(weights)
    return [w / total for w in weights]


def draw_tokens(tokens: list[int], probs: list[float], count: int, replacement: bool, rng: Sampler) -> list[int]:
    """``count`` draws from ``probs`` over ``tokens`` with ``rng`` (without replacement: at most len(tokens))."""
    out: list[int] = []
    weights = torch.tensor(probs, dtype=torch.float64)
    for _ in range(count if replacement else min(count, len(tokens))):
        i = rng.categorical(weights / weights.sum())
        out.append(tokens[i])
        if not replacement:
            weights = weights.clone()
            weights[i] = 0.0
            if weights.sum() <= 0:
                break
    return out


class MultiDraftVerifier(Verifier):
    """Multi-step speculative sampling over children drawn from the draft's q (see the module docstring)."""

    name = "multi-draft"
    replacement = True

    def __init__(self, sampling: SamplingParams | None = None):
        self.params = sampling or SamplingParams(temperature=1.0)
        self.draws_children = not self.params.greedy
        self._greedy = GreedyVerifier()

    def describe(self) -> str:
        how = "i.i.d. draws (SpecInfer)" if self.replacement else "draws without replacement (recursive rejection sampling)"
        return f"{self.name}: {how}" if self.draws_children else f"{self.name}: greedy at temperature 0"

    # ------------------------------------------------------------------ drawing the tree
    def draw(self, built: BuiltTree, draft: Draft, rng: Sampler) -> BuiltTree:
        """Draw each node's children from the draft's q in the shape of ``built`` (module docstring)."""
        if not self.draws_children:
            return built
        shape = built.tree
        logq = shape.logq_list
        ranked = [sorted(kids, key=lambda i: (-logq[i], i)) for kids in shape.children()]
        tokens, parents, node_logq, source, scores = [shape.token_list[0]], [-1], [0.0], [0], [1.0]
        proposals: list[Proposal | None] = [None]
        frontier = [(0, 0, draft.ROOT)]  # (node of the policy's tree, node of the drawn tree, draft handle)
        depth = 0
        while frontier:
            if getattr(draft, "lazy", False):  # a draft model: this depth's children in one draft call
                todo = [h for old, _, h in frontier if ranked[old] and not draft.expanded(h)]
                if todo:
                    draft.expand(todo, depth)
            nxt = []
            for old, new, handle in frontier:
                if not ranked[old]:
                    continue
                cands = draft.children(handle, depth)
                q = draft_distribution([c.logq for c in cands], self.params.temperature)
                toks = [c.token for c in cands]
                draws = draw_tokens(toks, q, len(ranked[old]), self.replacement, rng)
                proposals[new] = Proposal(tuple(toks), tuple(q), tuple(draws), self.replacement)
                distinct = list(dict.fromkeys(draws))
                for old_child, tok in zip(ranked[old], distinct):
                    i = toks.index(tok)
                    tokens.append(tok)
                    parents.append(new)
                    node_logq.append(cands[i].logq)  # the draft's own score, as ranked candidates carry it (a
                    # surrogate learning from drawn trees then reads q on the same scale it prices candidates by)
                    source.append(cands[i].source)
                    scores.append(built.scores[old_child])
                    proposals.append(None)
                    nxt.append((old_child, len(tokens) - 1, cands[i].handle))
            frontier, depth = nxt, depth + 1
        return BuiltTree(Tree.from_lists(tokens, parents, node_logq, source, proposals=proposals), scores)

    # ------------------------------------------------------------------ verifying it
    def verify(self, tree: Tree, logits: torch.Tensor, rng: Sampler) -> Verdict:
        if not self.draws_children:
            return self._greedy.verify(tree, logits, rng)
        kids = _child_index(tree)
        proposals = tree.proposals or (None,) * tree.size
        node, path = 0, [0]
        while True:
            residual = target_probs(logits[node], self.params).double()
            residual /= residual.sum()  # exactly normalised: the ratios p/q below are read from it
            proposal = proposals[node]
            accepted = None if proposal is None else self._walk(residual, proposal, rng)
            if accepted is None:  # every draw rejected (or none made): the bonus comes from what is left
                return Verdict(path, rng.categorical(residual))
            if accepted not in kids[node]:  # cannot happen for a tree from draw(); kept exact anyway
                return Verdict(path, accepted)
            node = kids[node][accepted]
            path.append(node)

    def _walk(self, residual: torch.Tensor, proposal: Proposal, rng: Sampler) -> int | None:
        """Try the draws in order against ``residual`` (updated in place when one is rejected); the
        accepted token, or None when all are rejected."""
        index = torch.tensor(proposal.tokens, dtype=torch.long)
        q_sparse = torch.tensor(proposal.probs, dtype=torch.float64)
        left = q_sparse.clone()
        for x in proposal.draws:
            j = proposal.tokens.index(x)
            q = left / left.sum()
            ratio = float(residual[x]) / float(q[j])
            if ratio >= 1.0 or rng.categorical(torch.tensor([1.0 - ratio, ratio], dtype=torch.float64)) == 1:
                return x
            full = torch.zeros_like(residual)
            full[index] = q
            rest = (residual - full).clamp_(min=0.0)
            total = float(rest.sum())
            if total > 0:  # (0 only when r = q, where every draw is accepted: unreachable up to rounding)
                residual.copy_(rest / total)
            if not self.replacement:
                left[j] = 0.0
                if float(left.sum()) <= 0:
                    break
        return None


class MultiDraftWithoutReplacement(MultiDraftVerifier):
    """``multi-draft`` with the draws made without replacement (recursive rejection sampling)."""

    name = "multi-draft-wor"
    replacement = False


@hookimpl
def register_verifiers(register):
    register("multi-draft", MultiDraftVerifier)
    register("multi-draft-wor", MultiDraftWithoutReplacement)
