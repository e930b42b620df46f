"""BASTION's one budget across a batch (``adaptive-best-first``'s ``expand_batch``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specframe.components import CostModel, ExpansionContext, MarginalDraft, TrieDraft
from specframe.plugins.expansion import AdaptiveBestFirst
from specframe.plugins.surrogates import PathConfidence

RECORDED = Path(__file__).parent / "data" / "bastion_trees.json"


class Steps(CostModel):
    """a + b·n + a bump every ``every`` tokens, + a little per context token."""

    def __init__(self, a, b, bump, every, convex=None):
        self.a, self.b, self.bump, self.every = a, b, bump, every
        self.convex_from = convex

    def predict(self, n, context):
        return self.a + self.b * n + self.bump * ((n - 1) // self.every) + 1e-7 * context


def rebuild(case: dict):
    d = case["draft"]
    if d["kind"] == "marginal":
        draft = MarginalDraft(torch.tensor(d["tokens"]), torch.tensor(d["logq"]))
    else:
        draft = TrieDraft(d["tokens"], d["parents"], d["logq"])
    ctx = ExpansionContext(surrogate=PathConfidence(), cost_model=Steps(**case["cost"]), **case["ctx"])
    return draft, ctx


def test_one_request_gets_the_trees_single_request_bastion_built():
    """40 drafts (block-drafter marginals and tries) whose trees the single-request BASTION recorded before
    batch budgets existed (tests/data/bastion_trees.json): the batch code at batch 1 builds the same trees."""
    cases = json.loads(RECORDED.read_text())
    sizes = set()
    for case in cases:
        draft, ctx = rebuild(case)
        [built] = AdaptiveBestFirst(**case["params"]).expand_batch([draft], [ctx])
        assert built.tree.token_list == case["tree"]["tokens"]
        assert built.tree.parent_list == case["tree"]["parents"]
        assert [round(x, 12) for x in built.scores] == case["tree"]["scores"]
        sizes.add(built.tree.size)
    assert len(sizes) > 5  # the recorded cases size trees differently (the comparison is not vacuous)


def chain(length: int, p: float, token: int = 7) -> TrieDraft:
    return TrieDraft([1] + [token] * length, list(range(-1, length)), [0.0] + [math.log(p)] * length)


def ctx_for(cost: CostModel, past: int = 100, max_nodes: int = 64) -> ExpansionContext:
    return ExpansionContext(1, past, max_nodes, 8, PathConfidence(), cost, 0.001, 0.0)


def test_the_budget_goes_to_the_request_whose_guesses_are_likelier():
    """Two requests, one with confident guesses, one with weak ones: on a CPU-like linear cost the shared
    budget spends its nodes on the confident request; per-request sizing would give the weak one nodes too
    only if they paid alone — here they do not in the batch."""
    cost = Steps(0.004, 0.002, 0.0, 1)
    strong, weak = chain(6, 0.97), chain(6, 0.5)
    trees = AdaptiveBestFirst().expand_batch([strong, weak], [ctx_for(cost), ctx_for(cost)])
    assert trees[0].tree.size > 1 and trees[1].tree.size == 1


def test_batch_budget_is_the_rule_applied_to_the_union():
    """Every node kept raises the batch's tokens per second: for the kept trees the rate S / (D + C(N)) is
    at least that of the same trees less any request's last node."""
    cost = Steps(0.010, 0.0008, 0.0, 1)
    drafts = [chain(5, 0.9), chain(5, 0.8), chain(5, 0.99)]
    ctxs = [ctx_for(cost, past) for past in (50, 80, 120)]
    trees = AdaptiveBestFirst(patience=0).expand_batch(drafts, ctxs)
    c = sum(x.context_len for x in ctxs)

    def rate(sizes_scores):
        n = sum(len(sc) for sc in sizes_scores)
        return sum(sum(sc) for sc in sizes_scores) / (0.001 + cost.predict(n, c))

    scores = [list(t.scores) for t in trees]
    for r, sc in enumerate(scores):
        if len(sc) > 1:
            fewer = [x if i != r else x[:-1] for i, x in enumerate(scores)]
            assert rate(scores) >= rate(fewer)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.floats(0.05, 1.0)), min_size=1, max_size=5),
       st.sampled_from([(0.004, 0.002, 0.0, 1), (0.02, 0.00001, 0.004, 16), (0.01, 0.0002, 0.0, 1)]),
       st.integers(1, 40))
def test_every_request_keeps_a_valid_tree_within_its_own_bounds(requests, cost, max_nodes):
    """Hypothesis: any batch — each tree is a prefix of its own best-first order within its own bounds,
    and a batch's total never exceeds what the requests' own bounds allow."""
    drafts = [chain(length, p, token=9 + i) for i, (length, p) in enumerate(requests)]
    ctxs = [ctx_for(Steps(*cost), 10 * i, max_nodes=max_nodes) for i in range(len(requests))]
    trees = AdaptiveBestFirst().expand_batch(drafts, ctxs)
    assert len(trees) == len(requests)
    for (length, _), built in zip(requests, trees):
        assert built.tree.size - 1 <= min(max_nodes, length)
        assert built.tree.parent_list == list(range(-1, built.tree.size - 1))  # a chain's prefix
        assert all(a >= b for a, b in zip(built.scores, built.scores[1:]))
