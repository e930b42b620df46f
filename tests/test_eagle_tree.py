"""EAGLE-2's dynamic draft tree (expansion ``eagle2``) and the ``eagle2`` bundle.

* the rule against a reference written here, on random drafts (hypothesis), and against a small case
  computed by hand (the depth-by-depth top-k, and the rerank of all candidates);
* bounds (nodes, depth, the engine's max_nodes / max_depth, the draft's depth), validity and determinism;
* the rerank keeps every kept node's ancestors: under ties and with a surrogate that is not monotone;
* a lazy draft (a draft model) is drafted in one call per depth over exactly the chosen nodes;
* through the engine: greedy output equals ``ar``'s, with eager drafts and a draft model on both runtimes,
  and sampling is exact (by enumeration, and the same seeded sample as ``ar``).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TinyTokenizer, make_tiny_model, new_target, plain_greedy
from specframe import Registry, SpecGenerator
from specframe.components import (AcceptanceSurrogate, Candidate, Draft, ExpansionContext, MarginalDraft,
                                  SamplingParams, TrieDraft)
from specframe.plugins.eagle_tree import Eagle2Tree, Generated
from specframe.plugins.model_drafter import ModelDrafter
from specframe.plugins.surrogates import PathConfidence
from specframe.plugins.verifiers import SampleVerifier
from specframe.policies.eagle2 import EAGLE2
from specframe.tree import validate_tree
from test_lossless import TargetFn, lossless_error
from test_model_drafter import BACKENDS, PROMPT, hf_pair, reference
from test_parity import N_NEW, check_records, make_drafter
from test_parity import PROMPT as PARITY_PROMPT
from test_parity import reference as parity_reference

VOCAB = 96


def ctx_for(max_nodes: int = 512, max_depth: int = 64, surrogate: AcceptanceSurrogate | None = None):
    return ExpansionContext(root_token=1, context_len=10, max_nodes=max_nodes, max_depth=max_depth,
                            surrogate=surrogate or PathConfidence(), cost_model=None)


def paths(built) -> dict[tuple[int, ...], float]:
    """Every node of a built tree as its token path from the root (root excluded) -> its score."""
    tree = built.tree
    out, path = {}, {0: ()}
    for i in range(1, tree.size):
        path[i] = path[tree.parent_list[i]] + (tree.token_list[i],)
        out[path[i]] = built.scores[i]
    return out


# ------------------------------------------------------------------------------------------- a reference
def reference_pool(draft: Draft, nodes: int, depth: int, top_k: int, ctx: ExpansionContext):
    """EAGLE-2's rule, written out plainly: (path, parent path, score, generation order) of every candidate,
    and the handles expanded at each depth."""
    pool, expanded = [], []
    frontier = [((), draft.ROOT, 1.0)]
    for d in range(min(depth, ctx.max_depth, draft.max_depth, nodes, ctx.max_nodes)):
        expanded.append([h for _, h, _ in frontier])
        level = []
        for path, handle, p in frontier:
            for rank, cand in enumerate(draft.children(handle, d)[:top_k]):
                score = ctx.surrogate.score(p, d + 1, cand._replace(rank=rank))
                level.append((path + (cand.token,), path, score, len(pool) + len(level), cand.handle))
        if not level:
            break
        pool += level
        best = sorted(level, key=lambda e: (-e[2], e[3]))[:top_k]
        frontier = [(path, handle, score) for path, _, score, _, handle in best]
    return pool, expanded


def reference_tree(draft: Draft, nodes: int, depth: int, top_k: int, ctx: ExpansionContext) -> dict:
    """With a surrogate monotone along paths, the tree is the top-m of the pool by (score, generation order)."""
    pool, _ = reference_pool(draft, nodes, depth, top_k, ctx)
    best = sorted(pool, key=lambda e: (-e[2], e[3]))[: min(nodes, ctx.max_nodes)]
    return {path: score for path, _, score, _, _ in best}


def trie(children: dict[tuple[int, ...], list[tuple[int, float]]]) -> TrieDraft:
    """A TrieDraft from {parent path: [(token, probability), ...]} (the root's path is ())."""
    tokens, parents, logq, index = [0], [-1], [0.0], {(): 0}
    for path in sorted(children, key=len):
        for tok, q in children[path]:
            index[path + (tok,)] = len(tokens)
            tokens.append(tok)
            parents.append(index[path])
            logq.append(math.log(q))
    return TrieDraft(tokens, parents, logq)


@st.composite
def random_tries(draw, max_depth: int = 5, max_kids: int = 4):
    """A random explicit draft: every node up to ``max_depth`` has 0..max_kids children of random probability."""
    rng = random.Random(draw(st.integers(0, 2**31 - 1)))
    children, todo = {}, [()]
    while todo:
        path = todo.pop()
        if len(path) >= max_depth:
            continue
        toks = rng.sample(range(VOCAB), rng.randint(0 if path else 1, max_kids))
        probs = [rng.choice([rng.random(), rng.random() ** 4, 1.0]) or 1e-3 for _ in toks]
        children[path] = list(zip(toks, probs))
        todo += [path + (t,) for t in toks]
    return trie(children)


@st.composite
def random_marginals(draw):
    d, k = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tokens = torch.stack([torch.randperm(VOCAB, generator=g)[:k] for _ in range(d)])
    logq = torch.log_softmax(torch.randn(d, VOCAB, generator=g, dtype=torch.float64) * 3, -1)[:, :k]
    return MarginalDraft(tokens, logq)


settings_fast = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("kwargs", [{"nodes": 0}, {"depth": -1}, {"top_k": "3"}, {"nodes": 2.5}, {"top_k": True}])
def test_parameters_are_positive_integers(kwargs):
    with pytest.raises(ValueError, match="must be a positive integer") as err:
        Eagle2Tree(**kwargs)
    assert "\n" not in str(err.value)


def test_defaults_are_eagle2s():
    """EAGLE-2's release: total_token=59 tokens with the root, depth=5 forwards after the root's top-k, k=10."""
    policy = Eagle2Tree()
    assert (policy.nodes, policy.depth, policy.top_k) == (58, 6, 10)


def test_the_bundle_and_its_settings():
    registry = Registry()
    spec = registry.policy("eagle2")
    assert spec is EAGLE2
    assert spec.components() == {"drafter": "auto-hybrid", "surrogate": "path-confidence", "cost_model": "roofline",
                                 "expansion": "eagle2", "verifier": "auto"}
    target, draft = hf_pair("good")
    gen = SpecGenerator(target, "eagle2:12", drafter="model", params={"drafter.model": draft,
                                                                     "expansion.top_k": 4, "depth": 3})
    c = gen.components
    assert isinstance(c.expansion, Eagle2Tree)
    assert (c.expansion.nodes, c.expansion.depth, c.expansion.top_k) == (12, 3, 4)
    assert c.drafter.top_k == 10  # the bundle's k reaches a draft model
    assert c.names["surrogate"] == "path-confidence"


# ------------------------------------------------------------------------------------------- the rule by hand
# root -> A .6, B .35, C .05 ; A -> A1 .5, A2 .4, A3 .1 ; B -> B1 .9, B2 .1 ;
# A1 -> A1a .5, A1b .2 ; A2 -> A2a .99 ; B1 -> B1a .8, B1b .1
A, B, C, A1, A2, A3, B1, B2, A1a, A1b, A2a, B1a, B1b = 10, 11, 12, 20, 21, 22, 23, 24, 30, 31, 32, 33, 34
HAND = {
    (): [(A, .6), (B, .35), (C, .05)],
    (A,): [(A1, .5), (A2, .4), (A3, .1)],
    (B,): [(B1, .9), (B2, .1)],
    (A, A1): [(A1a, .5), (A1b, .2)],
    (A, A2): [(A2a, .99)],
    (B, B1): [(B1a, .8), (B1b, .1)],
}


def test_a_small_case_by_hand():
    """top_k 2. Depth 1: A .6, B .35 (C is not among the root's top 2). Depth 2 generates A1 .30, A2 .24,
    B1 .315, B2 .035; the top 2, B1 and A1, go on (A2 is not expanded: its child A2a .2376 would outrank A2
    itself, but it is never generated). Depth 3 generates B1a .252, B1b .0315, A1a .15, A1b .06. The rerank:
    A .6, B .35, B1 .315, A1 .30, B1a .252, A2 .24, A1a .15, A1b .06, B2 .035, B1b .0315."""
    ctx = ctx_for()
    by_score = [(A,), (B,), (B, B1), (A, A1), (B, B1, B1a), (A, A2), (A, A1, A1a), (A, A1, A1b), (B, B2), (B, B1, B1b)]
    want = {(A,): .6, (B,): .35, (B, B1): .315, (A, A1): .30, (B, B1, B1a): .252, (A, A2): .24,
            (A, A1, A1a): .15, (A, A1, A1b): .06, (B, B2): .035, (B, B1, B1b): .0315}
    for m in range(1, 12):
        built = Eagle2Tree(nodes=m, depth=3, top_k=2).expand(trie(HAND), ctx)
        got = paths(built)
        assert set(got) == set(by_score[:m]), m
        assert all(abs(got[p] - want[p]) < 1e-12 for p in got)
    full = Eagle2Tree(nodes=58, depth=3, top_k=2).expand(trie(HAND), ctx).tree
    # generation order: depth 1, then A's and B's children (A first: it ranks higher), then B1's and A1's
    assert full.token_list == [1, A, B, A1, A2, B1, B2, B1a, B1b, A1a, A1b]
    assert full.parent_list == [-1, 0, 0, 1, 1, 2, 2, 5, 5, 3, 3]
    shallow = paths(Eagle2Tree(nodes=58, depth=2, top_k=2).expand(trie(HAND), ctx))
    assert set(shallow) == {(A,), (B,), (A, A1), (A, A2), (B, B1), (B, B2)}
    wide = paths(Eagle2Tree(nodes=4, depth=3, top_k=3).expand(trie(HAND), ctx))
    assert set(wide) == {(A,), (B,), (B, B1), (A, A1)}


# ------------------------------------------------------------------------------------------- random drafts
@settings_fast
@given(draft=st.one_of(random_tries(), random_marginals()), nodes=st.integers(1, 40), depth=st.integers(1, 7),
       top_k=st.integers(1, 5), max_nodes=st.integers(0, 50), max_depth=st.integers(0, 8))
def test_trees_are_valid_bounded_and_the_rule_on_random_drafts(draft, nodes, depth, top_k, max_nodes, max_depth):
    ctx = ctx_for(max_nodes, max_depth)
    policy = Eagle2Tree(nodes=nodes, depth=depth, top_k=top_k)
    built = policy.expand(draft, ctx)
    tree = built.tree
    validate_tree(tree, VOCAB, "eagle2")
    assert tree.token_list[0] == ctx.root_token and built.scores[0] == 1.0 and len(built.scores) == tree.size
    assert tree.size - 1 <= min(nodes, max_nodes)
    assert tree.max_depth <= min(depth, max_depth, draft.max_depth)
    assert all(tree.parent_list.count(i) <= top_k for i in range(tree.size))
    assert paths(built) == pytest.approx(reference_tree(draft, nodes, depth, top_k, ctx), abs=1e-12)
    # every P(v) is the path confidence
    for i in range(1, tree.size):
        assert built.scores[i] == pytest.approx(built.scores[tree.parent_list[i]] * math.exp(tree.logq_list[i]))
    again = policy.expand(draft, ctx)
    assert again.tree.token_list == tree.token_list and again.tree.parent_list == tree.parent_list
    assert again.scores == built.scores


def test_the_tree_is_filled_to_the_budget_when_the_draft_has_enough():
    draft = MarginalDraft(torch.arange(60).view(6, 10), torch.log_softmax(torch.randn(6, 10, dtype=torch.float64), -1))
    assert Eagle2Tree().expand(draft, ctx_for()).tree.size == 59
    assert Eagle2Tree().expand(draft, ctx_for(max_nodes=20)).tree.size == 21
    assert Eagle2Tree().expand(draft, ctx_for(max_depth=2)).tree.max_depth == 2


# ------------------------------------------------------------------------------------------- ancestors
@st.composite
def pools(draw, monotone: bool):
    """A random pool of generated candidates (parents before children); scores tied often."""
    n = draw(st.integers(1, 30))
    pool = []
    for i in range(n):
        parent = draw(st.integers(-1, i - 1))
        depth = 1 if parent < 0 else pool[parent].depth + 1
        score = draw(st.sampled_from([0.1, 0.25, 0.5, 0.5, 1.0]))
        if monotone and parent >= 0:
            score = min(score, pool[parent].score)
        pool.append(Generated(score, parent, depth, Candidate(i, 0.0, i)))
    return pool


@settings(max_examples=200, deadline=None)
@given(pool=st.one_of(pools(monotone=True), pools(monotone=False)), limit=st.integers(1, 32))
def test_the_rerank_keeps_every_ancestor_and_fills_the_budget(pool, limit):
    kept = Eagle2Tree.rerank(pool, limit)
    assert kept == sorted(set(kept))
    assert len(kept) == min(limit, len(pool))
    assert all(pool[i].parent < 0 or pool[i].parent in kept for i in kept)


@settings(max_examples=200, deadline=None)
@given(pool=pools(monotone=True), limit=st.integers(1, 32))
def test_with_monotone_scores_the_rerank_is_the_top_m_ties_to_the_earlier_candidate(pool, limit):
    want = sorted(range(len(pool)), key=lambda i: (-pool[i].score, i))[:limit]
    assert Eagle2Tree.rerank(pool, limit) == sorted(want)


def test_ties_everywhere_keep_the_tree_valid():
    """q = 1 for every candidate: every score is 1, so every rank is a tie; the tree is the first m of the 10
    generated (2 + 4 + the 2·2 children of depth 2's first two), parents first."""
    kids = {(): [(1, 1.0), (2, 1.0)]}
    for a in (1, 2):
        kids[(a,)] = [(3, 1.0), (4, 1.0)]
        for b in (3, 4):
            kids[(a, b)] = [(5, 1.0), (6, 1.0)]
    for m in range(1, 15):
        built = Eagle2Tree(nodes=m, depth=3, top_k=2).expand(trie(kids), ctx_for())
        validate_tree(built.tree, VOCAB, "eagle2")
        assert built.tree.size - 1 == min(m, 10) and all(s == 1.0 for s in built.scores)


class DeepFirst(AcceptanceSurrogate):
    """Not monotone along a path: a deeper node scores higher than its parent (depth / 10)."""

    name = "deep-first"

    def score(self, parent_p, depth, cand):
        return min(depth / 10 + math.exp(cand.logq) / 100, 1.0)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13])
def test_a_surrogate_that_is_not_monotone_still_gets_a_valid_tree_with_its_best_nodes(m):
    draft = trie(HAND)
    ctx = ctx_for(surrogate=DeepFirst())
    built = Eagle2Tree(nodes=m, depth=3, top_k=2).expand(draft, ctx)
    validate_tree(built.tree, VOCAB, "eagle2")
    got = paths(built)
    assert len(got) == min(m, 10)
    assert all(p[:-1] in got or len(p) == 1 for p in got)  # ancestors kept
    if m >= 3:  # the best candidate is a depth-3 one: it comes with its two ancestors
        assert (B, B1, B1a) in got and (B, B1) in got and (B,) in got


# ------------------------------------------------------------------------------------------- lazy drafts
class LazyTrie(Draft):
    """A lazy view of a TrieDraft: children only once expanded; records every expand call."""

    lazy = True

    def __init__(self, inner: TrieDraft, pre_expanded=()):
        self.inner, self.ROOT, self.max_depth = inner, inner.ROOT, inner.max_depth
        self.done, self.calls = set(pre_expanded), []

    def expanded(self, handle):
        return handle in self.done

    def expand(self, handles, depth):
        assert handles and not set(handles) & self.done, "a node is drafted twice or an empty call is made"
        self.calls.append((list(handles), depth))
        self.done.update(handles)

    def children(self, handle, depth):
        assert handle in self.done, "children of a node not drafted in its depth's call"
        return self.inner.children(handle, depth)


@settings_fast
@given(draft=random_tries(max_depth=6, max_kids=4), top_k=st.integers(1, 4), depth=st.integers(1, 6),
       pre=st.booleans())
def test_a_lazy_draft_is_drafted_once_per_depth_over_exactly_the_chosen_nodes(draft, top_k, depth, pre):
    lazy = LazyTrie(draft, pre_expanded={draft.ROOT} if pre else ())
    ctx = ctx_for()
    built = Eagle2Tree(nodes=40, depth=depth, top_k=top_k).expand(lazy, ctx)
    _, expanded = reference_pool(draft, 40, depth, top_k, ctx)
    want = [(handles, d) for d, handles in enumerate(expanded) if not (pre and d == 0)]
    assert lazy.calls == want
    assert paths(built) == pytest.approx(reference_tree(draft, 40, depth, top_k, ctx), abs=1e-12)


def test_a_draft_model_is_drafted_once_per_depth_with_the_top_k_nodes():
    target, draft = hf_pair("random")
    drafter = ModelDrafter(target, model=draft, top_k=3)
    proposal = drafter.propose(PROMPT, 8)
    calls = []
    expand = proposal.expand
    proposal.expand = lambda handles, depth: (calls.append((list(handles), depth)), expand(handles, depth))[1]
    built = Eagle2Tree(nodes=20, depth=4, top_k=3).expand(proposal, ctx_for())
    assert [d for _, d in calls] == [1, 2, 3]  # the root's children came with the proposal
    assert all(len(handles) == 3 for handles, _ in calls)
    assert built.tree.size == 21 and built.tree.max_depth <= 4
    validate_tree(built.tree, VOCAB, "eagle2")


# ------------------------------------------------------------------------------------------- through the engine
@pytest.mark.parametrize("policy, params", [("eagle2", {}), ("eagle2:5", {"expansion.top_k": 2, "expansion.depth": 3}),
                                            ("eagle2:1", {})])
@pytest.mark.parametrize("kind", ["random-marginal", "random-trie", "oracle", "ngram"])
def test_greedy_output_equals_ar_with_eager_drafts(tiny_target, policy, params, kind):
    truth = list(parity_reference("llama"))
    gen = SpecGenerator(tiny_target, policy, drafter=make_drafter(kind, tiny_target, truth, seed=5), params=params)
    out = gen.generate(PARITY_PROMPT, N_NEW)
    assert out.token_ids == truth
    check_records(out, kind, policy)
    assert gen.components.names["expansion"] == "eagle2"


@pytest.mark.parametrize("pair", BACKENDS)
@pytest.mark.parametrize("kind", ["good", "random", "adversarial"])
def test_greedy_output_equals_ar_with_a_draft_model_on_both_runtimes(pair, kind):
    target, draft = pair(kind)
    want = reference(target, PROMPT, 24)
    for overlap in (False, True):
        drafter = ModelDrafter(target, model=draft, overlap=overlap, top_k=4)  # smaller than the defaults: time
        gen = SpecGenerator(target, "eagle2:20", drafter=drafter, params={"expansion.top_k": 4})
        out = gen.generate(PROMPT, 24)
        assert out.token_ids == want, (kind, overlap)
        assert all(r.tree_size - 1 <= 20 and r.tree_depth <= 6 for r in out.stats.records)
        if kind == "good":  # the target's own weights: the root's best child is always right (a tiny random
            assert out.stats.tau >= 2  # model's flat distributions make EAGLE-2's trees wide, not deep)
        assert gen.generate(PROMPT[:3] + [11], 12).token_ids == reference(target, PROMPT[:3] + [11], 12)


def test_the_engines_node_bound_is_kept(tiny_target):
    truth = list(parity_reference("llama"))
    for bound in (1, 2, 5):
        gen = SpecGenerator(tiny_target, "eagle2", drafter=make_drafter("random-trie", tiny_target, truth, seed=11),
                            max_tree_nodes=bound)
        out = gen.generate(PARITY_PROMPT, N_NEW)
        assert out.token_ids == truth
        assert all(r.tree_size - 1 <= bound for r in out.stats.records)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eagle2_trees_from_a_draft_model_are_verified_exactly_at_temperature(seed):
    """Exact sampling by enumeration on trees eagle2 builds from a tiny draft model (vocabulary 5)."""
    vocab = 5
    target = new_target("llama", vocab=vocab, seed=seed + 10)
    from specframe import Target

    draft = Target(make_tiny_model("llama", vocab=vocab, seed=seed), TinyTokenizer(), "draft")
    drafter = ModelDrafter(target, model=draft, top_k=3, max_depth=3)
    ctx = ExpansionContext(3, 2, 8, 3, PathConfidence(), None)
    built = Eagle2Tree(nodes=8, depth=3, top_k=2).expand(drafter.propose([1, 2, 3], 3), ctx)
    assert built.tree.size == 9 and built.tree.max_depth >= 2
    for params in (SamplingParams(temperature=0.9, top_p=0.95), SamplingParams(temperature=1.3, top_k=3)):
        assert lossless_error(SampleVerifier(params), built.tree, TargetFn(seed, vocab), params) < 1e-9


def test_a_seed_gives_ars_sample_through_the_engine(tiny_target):
    """The sample verifier draws once per committed position, in order: with a seed, eagle2's output is ar's."""
    prompt = [5, 17, 3, 9, 44, 2, 5, 17, 3, 9]
    want = SpecGenerator(tiny_target, "ar").generate(prompt, 40, temperature=1.0, top_p=0.95, seed=7).token_ids
    target, draft = hf_pair("good")
    for gen in (SpecGenerator(tiny_target, "eagle2"),
                SpecGenerator(target, "eagle2", drafter=ModelDrafter(target, model=draft, top_k=10))):
        assert gen.generate(prompt, 40, temperature=1.0, top_p=0.95, seed=7).token_ids == want
    greedy = SpecGenerator(tiny_target, "eagle2").generate(prompt, 5).token_ids
    assert greedy == plain_greedy(tiny_target.model, prompt, 5)
