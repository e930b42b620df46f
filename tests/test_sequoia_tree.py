"""Sequoia: the dynamic program against brute force, the hardware-aware size against a direct loop, trees on
random drafts, the ``sibling-rank`` surrogate's online rates and the policy's cache of the DP, one draft call
per depth on a draft model, greedy parity and exact sampling through the engine.

CPU only and small: tiny random models from ``conftest``, hand-made cost models, small hypothesis counts.
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TinyTokenizer, make_tiny_model, new_target, plain_greedy
from specframe import SpecGenerator
from specframe.components import Candidate, CostModel, Draft, ExpansionContext, MarginalDraft, SamplingParams, TrieDraft
from specframe.plugins.model_drafter import ModelDrafter
from specframe.plugins.sequoia_tree import Sequoia, SequoiaPlan, SiblingRank, default_rates
from specframe.plugins.surrogates import PathConfidence
from specframe.plugins.verifiers import SampleVerifier
from specframe.tree import Tree, validate_tree
from test_lossless import TargetFn, lossless_error

VOCAB = 64


# ------------------------------------------------------------------------------------------- brute force
def shapes(m: int, d: int, k: int):
    """Every ordered tree of exactly m nodes (its root included), depth ≤ d below the root, at most k
    children per node; a tree is the tuple of its children's trees (child i has rank i)."""
    if m == 1:
        yield ()
        return
    if d == 0:
        return
    for j in range(1, min(k, m - 1) + 1):
        for cut in itertools.combinations(range(1, m - 1), j - 1):  # compositions of m - 1 into j parts
            sizes = [b - a for a, b in zip((0,) + cut, cut + (m - 1,))]
            for kids in itertools.product(*(list(shapes(s, d - 1, k)) for s in sizes)):
                yield kids


def path_sum(shape, rates, p: float = 1.0) -> float:
    """Σ over the non-root nodes of the product of the rates of the ranks along the path to them."""
    return sum(p * rates[i] + path_sum(kid, rates, p * rates[i]) for i, kid in enumerate(shape))


def brute_force(rates, nodes: int, depth: int) -> float:
    best = 0.0
    for m in range(1, nodes + 2):
        for shape in shapes(m, depth, len(rates)):
            best = max(best, path_sum(shape, rates))
    return best


def topology_value(topology, rates) -> float:
    p = [1.0]
    for parent, rank in topology:
        p.append(p[parent] * rates[rank])
    return sum(p[1:])


def check_topology(topology, nodes: int, depth: int, width: int) -> None:
    assert len(topology) <= nodes
    depths, kids = [0], {}
    for i, (parent, rank) in enumerate(topology, start=1):
        assert 0 <= parent < i
        depths.append(depths[parent] + 1)
        kids.setdefault(parent, []).append(rank)
    assert max(depths) <= depth
    for ranks in kids.values():
        assert ranks == list(range(len(ranks))) and len(ranks) <= width  # contiguous ranks 0..j-1


rate_vectors = st.lists(st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]) | st.floats(0, 1),
                        min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(rates=rate_vectors, depth=st.integers(1, 4))
def test_the_dp_matches_brute_force_for_every_size(rates, depth):
    plan = SequoiaPlan(rates, 7, 4)
    for n in range(0, 8):
        want = brute_force(rates, n, depth)
        assert plan.expected(n, depth) == pytest.approx(want, abs=1e-12), (n, depth)
        top = plan.topology(n, depth)
        check_topology(top, n, depth, len(rates))
        assert topology_value(top, rates) == pytest.approx(want, abs=1e-12)


def test_the_dp_on_non_monotone_vectors_and_known_cases():
    assert SequoiaPlan([1.0], 5, 5).expected(5, 5) == 5.0  # a certain chain: every node counts
    assert SequoiaPlan([1.0], 5, 3).expected(5, 3) == 3.0  # ... up to the depth bound
    plan = SequoiaPlan([0.1, 0.9], 2, 2)  # a better second choice: the DP must still give rank 0 first
    assert plan.expected(1, 2) == pytest.approx(0.1)
    assert plan.expected(2, 2) == pytest.approx(1.0)  # ranks 0 and 1 beat 0 and its child (0.1 + 0.01)
    assert plan.topology(2, 2) == [(0, 0), (0, 1)]
    for rates in ([0.2, 0.6, 0.1], [0.5, 0.0, 0.4], [0.3, 0.3, 0.9]):
        plan = SequoiaPlan(rates, 6, 3)
        for n in range(7):
            assert plan.expected(n, 3) == pytest.approx(brute_force(rates, n, 3), abs=1e-12)
    # the value grows with n and depth (at most n nodes)
    plan = SequoiaPlan(default_rates(4), 40, 6)
    assert np.all(np.diff(plan.best, axis=1) >= 0) and np.all(np.diff(plan.best, axis=0) >= 0)


# ------------------------------------------------------------------------------------------- helpers
class LinearCost(CostModel):
    name = "linear"

    def __init__(self, a: float, b: float):
        self.a, self.b = a, b

    def predict(self, n: int, context: int) -> float:
        return self.a + self.b * n


def marginal(depth: int = 10, k: int = 8, top: float = 0.8) -> MarginalDraft:
    probs = np.array([[top] + [(1 - top) / (k - 1)] * (k - 1)] * depth)
    tokens = np.array([[(row * 5 + j) % VOCAB for j in range(k)] for row in range(depth)])
    return MarginalDraft(torch.as_tensor(tokens), torch.as_tensor(np.log(probs)))


def ctx_for(surrogate=None, cost=None, max_nodes=10_000, max_depth=64, draft_s=0.0, node_s=0.0, context=50):
    return ExpansionContext(root_token=1, context_len=context, max_nodes=max_nodes, max_depth=max_depth,
                            surrogate=surrogate or SiblingRank(), cost_model=cost, draft_seconds=draft_s,
                            node_seconds=node_s)


class LazyDraft(Draft):
    """A draft model stand-in: every node has ``k`` children (tokens from its path), known only once expanded;
    records every expansion call as (depth, handles)."""

    lazy = True
    ROOT = ()

    def __init__(self, depth: int = 8, k: int = 4, call_s: float = 0.0, root_expanded: bool = False,
                 node_s: float = 0.0):
        self.max_depth, self.k, self.call_s, self.node_s = depth, k, call_s, node_s
        self.done: set = {()} if root_expanded else set()
        self.calls: list[tuple[int, list]] = []

    def expanded(self, handle) -> bool:
        return handle in self.done

    def expand(self, handles, depth):
        self.calls.append((depth, list(handles)))
        self.done.update(handles)

    def children(self, handle, depth):
        if depth >= self.max_depth:
            return []
        if handle not in self.done:
            self.expand([handle], depth)
        base = (sum(handle) * 7 + 3 * len(handle)) % VOCAB
        return [Candidate((base + j) % VOCAB, math.log(0.7 if j == 0 else 0.3 / (self.k - 1)), handle + (j,))
                for j in range(self.k)]

    def expansion_seconds(self, count: int = 1) -> float:
        return self.call_s + self.node_s * count


# ------------------------------------------------------------------------------------------- hardware-aware size
@pytest.mark.parametrize("a,b,d,h", [(0.02, 0.001, 0.0, 0.0), (0.02, 0.004, 0.005, 0.0002), (0.01, 0.0, 0.0, 0.0),
                                     (0.001, 0.01, 0.0, 0.0)])
def test_the_hardware_aware_size_is_the_argmax_of_tokens_per_second(a, b, d, h):
    cost = LinearCost(a, b)
    policy = Sequoia(max_nodes=64)
    ctx = ctx_for(cost=cost, draft_s=d, node_s=h)
    built = policy.expand(marginal(), ctx)
    plan = policy.plan
    rate = [(1 + plan.expected(n, 10)) / (d + cost.predict(n + 1, 50) + h * (n + 1)) for n in range(65)]
    n, depth = policy.last_choice
    assert n == int(np.argmax(rate)) and depth == (10 if n else 0)
    assert built.tree.size - 1 <= n  # the optimal tree of at most n nodes; the draft has every rank here
    assert built.tree.size - 1 == len(plan.topology(n, depth))
    if b == 0.0:
        assert n == 64  # a flat cost curve: the largest tree
    if b == 0.01 and a == 0.001:
        assert n <= 2  # a steep one: hardly any


@pytest.mark.parametrize("root_expanded", [False, True])
@pytest.mark.parametrize("call_s,node_s", [(0.0, 0.0), (0.004, 0.0), (0.05, 0.0), (0.002, 0.001), (0.0, 0.003)])
def test_the_hardware_aware_choice_prices_a_draft_models_calls(call_s, node_s, root_expanded):
    cost = LinearCost(0.02, 0.0005)
    policy = Sequoia(max_nodes=48)
    draft = LazyDraft(depth=8, k=4, call_s=call_s, node_s=node_s, root_expanded=root_expanded)
    built = policy.expand(draft, ctx_for(cost=cost))
    plan = policy.plan
    best, pick = -1.0, None
    for dd in range(9):
        for n in range(49):
            top = plan.topology(n, dd) if dd else []
            expanded = {parent for parent, _ in top}  # nodes with children: what the draft expands
            price = dd * call_s + node_s * len(expanded)
            if root_expanded and top:
                price -= call_s + node_s
            r = (1 + (plan.expected(n, dd) if dd else 0.0)) / (cost.predict(n + 1, 50) + max(price, 0.0))
            if r > best:
                best, pick = r, (n, dd)
    want = pick if pick[1] else (0, 0)
    assert policy.last_choice == want
    n, dd = want
    assert plan.expansions(n, dd) == len({parent for parent, _ in plan.topology(n, dd)})
    assert built.tree.size - 1 == len(plan.topology(n, dd)) and built.tree.max_depth <= dd
    if call_s == node_s == 0.0:  # free drafting: as good as the deepest bound allows (the shallowest such depth)
        assert plan.expected(n, dd) == plan.expected(n, 8) > plan.expected(n, dd - 1)
    if call_s == 0.05 and not root_expanded:
        assert dd < 8


def test_a_fixed_budget_and_the_bounds():
    draft = marginal(depth=6, k=8, top=0.9)
    built = Sequoia(budget=20).expand(draft, ctx_for(cost=LinearCost(1.0, 10.0)))  # the cost does not matter
    assert built.tree.size - 1 == len(SequoiaPlan(default_rates(8), 20, 16).topology(20, 6)) == 20
    small = Sequoia(budget=20).expand(draft, ctx_for(max_nodes=5, max_depth=2))
    assert small.tree.size - 1 <= 5 and small.tree.max_depth <= 2
    assert Sequoia(max_nodes=30).expand(draft, ctx_for()).tree.size - 1 == 30  # no cost model: the cap
    assert Sequoia(max_depth=3).expand(draft, ctx_for()).tree.max_depth <= 3


@pytest.mark.parametrize("kwargs", [{"budget": 0}, {"budget": 2.5}, {"max_nodes": -1}, {"max_depth": 0},
                                    {"width": "4"}, {"gate": "yes"}])
def test_bad_parameters_are_one_line_value_errors(kwargs):
    with pytest.raises(ValueError) as err:
        Sequoia(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs", [{"ranks": 0}, {"decay": 0.0}, {"decay": 1.5}, {"prior_strength": 0},
                                    {"tol": -1}, {"prior": [1.5]}, {"prior": []}])
def test_bad_surrogate_parameters_are_one_line_value_errors(kwargs):
    with pytest.raises(ValueError) as err:
        SiblingRank(**kwargs)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- trees on random drafts
@st.composite
def tries(draw):
    n = draw(st.integers(1, 25))
    tokens, parents, logq, used = [0], [-1], [0.0], [set()]
    for i in range(1, n):
        parent = draw(st.integers(0, i - 1))
        free = sorted(set(range(VOCAB)) - used[parent])
        tok = draw(st.sampled_from(free))
        used[parent].add(tok)
        used.append(set())
        tokens.append(tok)
        parents.append(parent)
        logq.append(draw(st.floats(-6, 0)))
    return TrieDraft(tokens, parents, logq)


def check_built(built, draft: Draft, ctx: ExpansionContext, cap: int) -> None:
    tree = built.tree
    validate_tree(tree, VOCAB, "test")
    assert tree.token_list[0] == ctx.root_token
    assert tree.size - 1 <= min(ctx.max_nodes, cap) and tree.max_depth <= min(ctx.max_depth, draft.max_depth)
    assert len(built.scores) == tree.size and built.scores[0] == 1.0
    assert all(0 <= s <= 1 for s in built.scores)
    # every node's children in the tree are the draft's best ranks there, in order (handles followed by tokens)
    handles, kids = {0: draft.ROOT}, {}
    for i in range(1, tree.size):
        kids.setdefault(tree.parent_list[i], []).append(i)
    for node in range(tree.size):
        if node not in kids:
            continue
        cands = draft.children(handles[node], tree.depth_list[node])
        assert [tree.token_list[i] for i in kids[node]] == [c.token for c in cands[: len(kids[node])]]
        for i, c in zip(kids[node], cands):
            handles[i] = c.handle


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(draft=tries(), max_nodes=st.integers(1, 40), max_depth=st.integers(1, 8), budget=st.none() | st.integers(1, 30),
       slope=st.floats(0, 0.01))
def test_trees_are_valid_and_within_bounds_on_random_drafts(draft, max_nodes, max_depth, budget, slope):
    ctx = ctx_for(cost=LinearCost(0.01, slope), max_nodes=max_nodes, max_depth=max_depth)
    policy = Sequoia(budget=budget, max_nodes=32, max_depth=6, width=4)
    built = policy.expand(draft, ctx)
    check_built(built, draft, ctx, budget or 32)
    assert built.tree.max_depth <= 6
    again = Sequoia(budget=budget, max_nodes=32, max_depth=6, width=4).expand(draft, ctx)
    assert again.tree.token_list == built.tree.token_list and again.tree.parent_list == built.tree.parent_list


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 8), depth=st.integers(1, 8), max_nodes=st.integers(1, 64))
def test_trees_are_valid_on_random_marginal_drafts_and_deterministic(seed, k, depth, max_nodes):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k), size=depth)
    tokens = np.stack([rng.permutation(VOCAB)[:k] for _ in range(depth)])
    draft = MarginalDraft(torch.as_tensor(tokens), torch.as_tensor(np.log(probs)))
    ctx = ctx_for(cost=LinearCost(0.01, 0.0002), max_nodes=max_nodes)
    first = Sequoia().expand(draft, ctx)
    check_built(first, draft, ctx, 128)
    second = Sequoia().expand(draft, ctx)
    assert first.tree.token_list == second.tree.token_list and first.scores == second.scores


def test_missing_ranks_drop_their_subtrees():
    # the root has 3 children, the first one 1 child, the rest none
    draft = TrieDraft([0, 5, 6, 7, 8], [-1, 0, 0, 0, 1], [0.0, -0.1, -2.0, -3.0, -0.2])
    built = Sequoia(budget=20).expand(draft, ctx_for())
    assert sorted(built.tree.token_list[1:]) == [5, 6, 7, 8]
    check_built(built, draft, ctx_for(), 20)


# ------------------------------------------------------------------------------------------- the surrogate
def one_level(k: int, accepted_rank: int | None) -> tuple[Tree, list[int]]:
    """A root with k children, child i of rank i (log-probs falling); the accepted path through one of them."""
    tree = Tree.from_lists([0] + list(range(1, k + 1)), [-1] + [0] * k, [0.0] + [-0.1 * (i + 1) for i in range(k)])
    return tree, [0] if accepted_rank is None else [0, accepted_rank + 1]


def test_the_surrogate_starts_at_its_prior_and_scores_by_rank():
    s = SiblingRank(ranks=4)
    assert s.rates().tolist() == pytest.approx([0.6, 0.2, 0.1, 0.05]) and s.version == 0
    assert s.score(0.5, 1, Candidate(3, -0.1, None, rank=1)) == pytest.approx(0.1)
    assert s.score(1.0, 1, Candidate(3, -0.1, None, rank=9)) == pytest.approx(0.05)  # deeper ranks: the last
    assert s.score(0.5, 1, Candidate(3, math.log(0.3), None)) == pytest.approx(0.15)  # rank unknown: q


def test_the_surrogate_counts_exactly_what_it_saw():
    s = SiblingRank(ranks=3, decay=1.0, prior_strength=2.0, tol=0.0)
    for _ in range(6):
        s.observe(*one_level(3, 0), [])
    for _ in range(2):
        s.observe(*one_level(3, None), [])  # every child rejected
    r = s.rates()
    assert r[0] == pytest.approx((6 + 2 * 0.6) / (8 + 2))
    assert r[1] == pytest.approx((0 + 2 * 0.2) / (8 + 2)) and r[2] == pytest.approx((0 + 2 * 0.1) / (8 + 2))
    # a child whose parent was rejected says nothing; a deeper one whose parent was accepted counts
    tree = Tree.from_lists([0, 1, 2, 3, 4], [-1, 0, 0, 1, 2], [0.0, -0.1, -0.5, -0.2, -0.1])
    before = s.counts.copy()
    s.observe(tree, [0, 1, 3], [])
    assert (s.counts - before).tolist() == [2.0, 1.0, 0.0]  # root's 2 children + node 1's one child


def test_the_surrogates_rates_follow_the_data_and_stay_non_increasing():
    s = SiblingRank(ranks=4, tol=0.0)
    for _ in range(200):
        s.observe(*one_level(4, 0), [])
    assert s.rates()[0] > 0.95 and s.rates()[1] < 0.05
    for _ in range(300):  # the draft's second choice is right now: decayed counts follow the change
        s.observe(*one_level(4, 1), [])
    r = s.rates()
    assert np.all(np.diff(r) <= 1e-12)  # non-increasing: the two first ranks pool
    assert r[0] == pytest.approx(r[1], abs=1e-9) and 0.4 < r[1] < 0.6 and r[2] < 0.05


def test_the_version_counts_published_changes_only():
    s = SiblingRank(ranks=4, tol=0.05)
    seen = [s.version]
    for _ in range(100):
        s.observe(*one_level(4, 0), [])
        seen.append(s.version)
    assert seen[-1] > 0 and seen == sorted(seen)
    assert len(set(seen)) < len(seen)  # small moves are not published
    big = SiblingRank(ranks=4, tol=10.0)
    big.observe(*one_level(4, 0), [])
    assert big.version == 0 and big.rates().tolist() == pytest.approx([0.6, 0.2, 0.1, 0.05])


def test_the_policy_resolves_the_dp_only_when_the_rates_change():
    s = SiblingRank(ranks=8, tol=0.05)
    policy, draft, ctx = Sequoia(max_nodes=32), marginal(), ctx_for(surrogate=s, cost=LinearCost(0.02, 0.0005))
    policy.expand(draft, ctx)
    policy.expand(draft, ctx)
    assert policy.plans == 1
    version, shapes_seen = s.version, {tuple(policy.plan.topology(32, 10))}
    for _ in range(60):
        s.observe(*one_level(8, 0), [])  # the draft's first choice is always right: deeper, thinner trees
        policy.expand(draft, ctx)
        shapes_seen.add(tuple(policy.plan.topology(32, 10)))
    assert s.version > version and policy.plans == 1 + s.version - version
    assert np.allclose(policy.plan.rates, s.rates())
    chain = policy.plan.topology(10, 10)
    assert all(rank == 0 for _, rank in chain)  # r_0 near 1: a chain is best
    assert len(shapes_seen) > 1


def test_a_surrogate_without_rates_uses_the_default_vector_and_says_so_once(caplog):
    policy = Sequoia(max_nodes=16)
    with caplog.at_level(logging.INFO, logger="specframe"):
        for _ in range(3):
            built = policy.expand(marginal(), ctx_for(surrogate=PathConfidence()))
    notes = [r for r in caplog.records if "sequoia" in r.getMessage()]
    assert len(notes) == 1 and "default vector" in notes[0].getMessage()
    assert np.allclose(policy.plan.rates, default_rates(8)) and built.tree.size == 17


# ------------------------------------------------------------------------------------------- draft models
@pytest.mark.parametrize("root_expanded", [False, True])
def test_a_draft_model_is_expanded_in_one_call_per_depth(root_expanded):
    draft = LazyDraft(depth=6, k=4, call_s=0.001, root_expanded=root_expanded)
    built = Sequoia(budget=24).expand(draft, ctx_for(cost=LinearCost(0.02, 0.001)))
    depths = [d for d, _ in draft.calls]
    assert len(depths) == len(set(depths)) and depths == sorted(depths)  # one call per depth, in order
    assert len(depths) == built.tree.max_depth - (1 if root_expanded else 0)
    # only nodes that get children are expanded
    parents = set(built.tree.parent_list[1:])
    assert sum(len(h) for _, h in draft.calls) == len(parents) - (1 if root_expanded else 0)
    check_built(built, draft, ctx_for(), 24)


@pytest.mark.parametrize("seed", [0, 1])
def test_trees_from_a_draft_model_are_verified_exactly_at_temperature(seed):
    vocab = 5
    model = make_tiny_model("llama", vocab=vocab, seed=seed)
    target = new_target("llama", vocab=vocab, seed=seed + 10)
    from specframe import Target

    drafter = ModelDrafter(target, model=Target(model, TinyTokenizer(), "draft"), top_k=3, max_depth=3)
    draft = drafter.propose([1, 2, 3], 3)
    built = Sequoia(budget=6, max_depth=3).expand(draft, ExpansionContext(3, 2, 6, 3, SiblingRank(), None))
    assert built.tree.size > 3
    params = SamplingParams(temperature=0.9, top_p=0.95)
    assert lossless_error(SampleVerifier(params), built.tree, TargetFn(seed, vocab), params) < 1e-9


# ------------------------------------------------------------------------------------------- through the engine
PROMPT = [3, 14, 15, 9, 2, 6, 5, 3, 14, 15, 9, 2]


@pytest.fixture(scope="module")
def reference():
    return plain_greedy(make_tiny_model("llama"), PROMPT, 40)


def test_the_bundle_resolves_its_components(tiny_target):
    gen = SpecGenerator(tiny_target, "sequoia")
    names = gen.components.names
    assert (names["surrogate"], names["cost_model"], names["expansion"]) == ("sibling-rank", "roofline", "sequoia")
    assert SpecGenerator(tiny_target, "sequoia:12").components.expansion.budget == 12


@pytest.mark.parametrize("policy,params", [("sequoia", {}), ("sequoia:8", {}), ("sequoia", {"expansion.width": 2}),
                                           ("sequoia", {"surrogate": "path-confidence"}),
                                           ("sequoia", {"expansion.gate": True})])
@pytest.mark.parametrize("drafter", ["ngram", "wrong"])
def test_greedy_output_is_the_targets(tiny_target, reference, policy, params, drafter):
    from test_bastion import wrong_drafter

    d = "ngram" if drafter == "ngram" else wrong_drafter(reference, depth=5, k=4)
    gen = SpecGenerator(tiny_target, policy, drafter=d, params=params)
    out = gen.generate(PROMPT, 40)
    assert out.token_ids == reference[:40] == SpecGenerator(tiny_target, "ar").generate(PROMPT, 40).token_ids
    if drafter == "wrong" and not params:
        assert gen.components.surrogate.rates()[0] < 0.3  # it learned that the first choice is never right


@pytest.mark.parametrize("kind", ["good", "random", "adversarial"])
def test_greedy_output_with_a_draft_model(kind):
    from test_model_drafter import PROMPT as P, hf_pair
    from test_model_drafter import reference as ar

    target, draft = hf_pair(kind)
    want = ar(target, P, 24)
    for policy, overlap in (("sequoia", False), ("sequoia:6", False), ("sequoia", True)):
        gen = SpecGenerator(target, policy, drafter=ModelDrafter(target, model=draft, overlap=overlap))
        out = gen.generate(P, 24)
        assert out.token_ids == want, (policy, kind, overlap)  # drafting ahead runs the policy on its thread too
        if kind == "good" and policy == "sequoia:6":
            assert out.stats.tau > 2  # the target's own weights: most drafted tokens are accepted


def test_a_seed_gives_the_same_sample_as_plain_sampling(tiny_target):
    prompt = [5, 17, 3, 9, 44, 2, 5, 17, 3, 9]
    want = SpecGenerator(tiny_target, "ar").generate(prompt, 40, temperature=1.0, top_p=0.95, seed=7).token_ids
    for policy in ("sequoia", "sequoia:16"):
        out = SpecGenerator(tiny_target, policy).generate(prompt, 40, temperature=1.0, top_p=0.95, seed=7)
        assert out.token_ids == want, policy
