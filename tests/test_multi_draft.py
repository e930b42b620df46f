"""Sampled drafts and the multi-draft verifiers (``multi-draft``: SpecInfer's i.i.d. draws; ``multi-draft-wor``:
recursive rejection sampling without replacement).

Exactness is proven by enumeration over BOTH sources of randomness: the draws of the tree's children from
the draft's q and the verifier's own coins and bonus draws go through the same sampler, which a replaying
oracle turns into a depth-first search over every outcome. The output, as a distribution over sequences of
a fixed length, must equal the target's to 1e-9, for every tree shape up to a size, tiny vocabularies,
several temperatures and top-k / top-p filters, with drafts whose q is close to, far from, or disjoint
from the target's p.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import new_target
from test_lossless import ReplaySampler, TargetFn, _NeedChoice, distribution_error, verdict_tokens

from specframe import SpecGenerator
from specframe.components import (
    BuiltTree,
    Candidate,
    Draft,
    Drafter,
    ExpansionContext,
    SamplingParams,
    TreeBuilder,
)
from specframe.errors import SpecframeError
from specframe.plugins.expansion import StaticTree
from specframe.plugins.multi_draft import MultiDraftVerifier, MultiDraftWithoutReplacement, draw_tokens
from specframe.plugins.surrogates import PathConfidence
from specframe.plugins.verifiers import SampleVerifier

VERIFIERS = (MultiDraftVerifier, MultiDraftWithoutReplacement)


class PathDraft(Draft):
    """Every node lists ``width`` candidates with log-probs that depend on the node's token path (seeded),
    or, with ``like`` given, q = the target's own processed distribution at that path (q = p)."""

    ROOT = ()

    def __init__(self, vocab: int, seed: int, width: int | None = None, like: tuple | None = None,
                 max_depth: int = 4, lazy: bool = False):
        self.vocab, self.seed, self.width, self.like, self.max_depth = vocab, seed, width or vocab, like, max_depth
        self.lazy, self.expand_calls = lazy, []
        self._done: set = set()

    def children(self, handle, depth):
        if self.like is not None:
            fn, params = self.like
            q = fn.probs(handle, params)
            logq = [math.log(x) if x > 0 else -50.0 for x in q]
        else:
            rng = np.random.default_rng([self.seed, len(handle), *handle])
            logq = (rng.standard_normal(self.vocab) * 2.0).tolist()
            total = math.log(sum(math.exp(x) for x in logq))
            logq = [x - total for x in logq]
        order = sorted(range(self.vocab), key=lambda t: (-logq[t], t))[: self.width]
        return [Candidate(t, logq[t], handle + (t,)) for t in order]

    def expanded(self, handle):
        return not self.lazy or handle in self._done

    def expand(self, handles, depth):
        self.expand_calls.append((depth, list(handles)))
        self._done.update(handles)


def shaped(draft: Draft, topology: list[int], root: int = 0) -> BuiltTree:
    """The policy's tree for a parent list ``topology`` over ranked candidates (node i is the rank-k child
    of its parent, k = how many children the parent had before it)."""
    out = TreeBuilder(root)
    handles, seen = [draft.ROOT], [0] * (len(topology) + 1)
    depth = [0]
    for parent in topology:
        kids = draft.children(handles[parent], depth[parent])
        cand = kids[seen[parent]]
        seen[parent] += 1
        out.add(parent, cand, 0.5)
        handles.append(cand.handle)
        depth.append(depth[parent] + 1)
    return out.build()


def shapes(max_nodes: int, max_width: int):
    """Every tree shape with at most ``max_nodes`` non-root nodes and at most ``max_width`` children per node,
    as parent lists in topological order (children of a node are its ranks 0, 1, ...)."""
    found = {()}
    frontier = [()]
    for _ in range(max_nodes):
        nxt = []
        for shape in frontier:
            counts = [0] * (len(shape) + 1)
            for p in shape:
                counts[p] += 1
            for parent in range(len(shape) + 1):
                if counts[parent] < max_width and all(p <= parent for p in shape[-1:]):
                    new = shape + (parent,)
                    if new not in found:
                        found.add(new)
                        nxt.append(new)
        frontier = nxt
    return sorted(found, key=lambda s: (len(s), s))


def outcomes(verifier, built: BuiltTree, draft: Draft, fn: TargetFn, max_draws: int = 64):
    """Every (committed tokens, probability) of drawing the tree then verifying it, by DFS over all draws."""
    out = []
    stack = [((), 1.0)]
    while stack:
        script, weight = stack.pop()
        assert len(script) <= max_draws
        sampler = ReplaySampler(script)
        try:
            drawn = verifier.draw(built, draft, sampler)
            verdict = verifier.verify(drawn.tree, fn.tree_logits(drawn.tree), sampler)
        except _NeedChoice as need:
            stack.extend((script + (y,), weight * p) for y, p in enumerate(need.probs) if p > 0)
            continue
        assert sampler.calls == len(script)
        out.append((verdict_tokens(drawn.tree, verdict, fn.vocab), weight, drawn.tree, verdict))
    return out


def error(verifier, built, draft, fn, params) -> float:
    """Max |P_produced(s) − P_target(s)| over sequences of length max depth + 1."""
    produced = ((toks, w) for toks, w, _, _ in outcomes(verifier, built, draft, fn))
    return distribution_error(produced, fn, params, built.tree.max_depth + 1)


# ------------------------------------------------------------------------------------------- exactness
PARAMS = [SamplingParams(1.0), SamplingParams(0.6), SamplingParams(1.3, top_k=2), SamplingParams(0.9, top_p=0.7)]


@pytest.mark.parametrize("verifier_cls", VERIFIERS)
@pytest.mark.parametrize("shape", shapes(4, 3))
def test_every_tree_shape_is_exact_over_the_targets_outputs_and_the_drafting_randomness(verifier_cls, shape):
    vocab, seed = 3, sum(shape) + len(shape)
    params = PARAMS[seed % len(PARAMS)]
    fn = TargetFn(100 + seed, vocab, scale=2.0)
    draft = PathDraft(vocab, seed=seed)
    assert error(verifier_cls(params), shaped(draft, list(shape)), draft, fn, params) < 1e-9, (shape, params)


@pytest.mark.parametrize("verifier_cls", VERIFIERS)
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("kind", ["random", "close", "narrow"])
def test_exact_with_filters_and_with_q_close_to_far_from_or_narrower_than_p(verifier_cls, params, kind):
    vocab = 4
    fn = TargetFn(7, vocab, scale=1.5)
    draft = {"random": PathDraft(vocab, seed=3),
             "close": PathDraft(vocab, seed=0, like=(fn, SamplingParams(1.0))),
             "narrow": PathDraft(vocab, seed=5, width=2)}[kind]  # q's support misses half the vocabulary
    for shape in ([0, 0, 1, 3], [0, 0], [0, 1, 2]):
        assert error(verifier_cls(params), shaped(draft, shape), draft, fn, params) < 1e-9, (shape, kind)


def test_the_check_catches_a_verifier_that_ignores_the_residual():
    """Negative control: accepting a draw with min(1, p/q) but drawing the bonus from p (not the residual)
    is biased, and the enumeration says so."""

    class NoResidual(MultiDraftVerifier):
        def _walk(self, residual, proposal, rng):
            keep = residual.clone()
            out = super()._walk(residual, proposal, rng)
            residual.copy_(keep)
            return out

    fn, params = TargetFn(1, 3), SamplingParams(1.0)
    draft = PathDraft(3, seed=2)
    assert error(NoResidual(params), shaped(draft, [0, 0]), draft, fn, params) > 1e-3


def test_the_check_catches_a_policy_that_keeps_a_node_only_when_its_draws_suit_it():
    """Why the shape is fixed before drawing: a tree that keeps a node's children only when the first
    draw is the draft's favourite is biased, and the enumeration says so."""

    class Selective(MultiDraftVerifier):
        def draw(self, built, draft, rng):
            drawn = super().draw(built, draft, rng)
            tree = drawn.tree
            favourite = draft.children(draft.ROOT, 0)[0].token
            if tree.proposals[0].draws[0] != favourite:
                from specframe.tree import Tree

                return BuiltTree(Tree.from_lists(tree.token_list[:1], [-1], [0.0], proposals=[None]), [1.0])
            return drawn

    fn, params = TargetFn(4, 3), SamplingParams(1.0)
    draft = PathDraft(3, seed=4)
    assert error(Selective(params), shaped(draft, [0, 1]), draft, fn, params) > 1e-3


# ------------------------------------------------------------------------------------------- what it gains
def expected_accepted(verifier, built, draft, fn) -> float:
    return sum(w * (len(toks) - 1) for toks, w, _, _ in outcomes(verifier, built, draft, fn))


def test_a_draft_close_to_a_flat_target_is_accepted_far_more_often_when_its_children_are_drawn():
    """q = p and p flat at T = 1: a top-1 chain verified by ``sample`` is accepted with probability max p
    per position; children drawn from q are accepted with probability Σ min(p, q) = 1."""
    vocab, depth = 6, 3
    fn = TargetFn(11, vocab, scale=0.3)  # nearly flat
    params = SamplingParams(1.0)
    draft = PathDraft(vocab, seed=0, like=(fn, params))
    chain = shaped(draft, [0, 1, 2])
    ranked = sum(w * (len(verdict_tokens(chain.tree, v, vocab)) - 1) for v, w in _sample_outcomes(chain, fn, params))
    for cls in VERIFIERS:
        drawn = expected_accepted(cls(params), chain, draft, fn)
        assert drawn == pytest.approx(depth, abs=1e-9), cls  # every draw accepted
    assert ranked < 1.0  # max p ≈ 0.2-0.3 per position


def _sample_outcomes(built, fn, params):
    from test_lossless import enumerate_verdicts

    return enumerate_verdicts(SampleVerifier(params), built.tree, fn.tree_logits(built.tree))


def test_without_replacement_accepts_at_least_as_often_as_iid_draws():
    vocab = 4
    params = SamplingParams(1.0)
    for seed in range(2):
        fn = TargetFn(seed, vocab, scale=2.0)
        draft = PathDraft(vocab, seed=seed + 50)
        built = shaped(draft, [0, 0, 0, 1])
        iid = expected_accepted(MultiDraftVerifier(params), built, draft, fn)
        wor = expected_accepted(MultiDraftWithoutReplacement(params), built, draft, fn)
        assert wor >= iid - 1e-12, (seed, iid, wor)


# ------------------------------------------------------------------------------------------- the drawn tree
def test_the_drawn_tree_keeps_the_policys_shape_and_records_its_draws():
    vocab = 5
    draft = PathDraft(vocab, seed=1)
    built = shaped(draft, [0, 0, 1, 1, 3])
    for cls in VERIFIERS:
        drawn = cls(SamplingParams(1.0)).draw(built, draft, _Seeded(0)).tree
        assert drawn.size <= built.tree.size and drawn.max_depth <= built.tree.max_depth
        props = drawn.proposals
        assert len(props) == drawn.size
        kids = drawn.children()
        for i, prop in enumerate(props):
            if prop is None:
                assert not kids[i]
                continue
            assert [drawn.token_list[k] for k in kids[i]] == list(dict.fromkeys(prop.draws))
            if not cls.replacement:
                assert len(set(prop.draws)) == len(prop.draws)
            assert math.isclose(sum(prop.probs), 1.0)


def test_a_lazy_draft_is_expanded_once_per_depth_over_the_drawn_nodes():
    draft = PathDraft(4, seed=2, lazy=True)
    built = shaped(PathDraft(4, seed=2), [0, 0, 1, 2])
    MultiDraftVerifier(SamplingParams(1.0)).draw(built, draft, _Seeded(3))
    depths = [d for d, _ in draft.expand_calls]
    assert depths == sorted(set(depths)) and depths[0] == 0


def test_draws_without_replacement_never_repeat_and_stop_at_the_support():
    toks = draw_tokens([7, 8, 9], [0.5, 0.3, 0.2], 5, False, _Seeded(1))
    assert sorted(toks) == [7, 8, 9]
    assert len(draw_tokens([7, 8], [0.5, 0.5], 6, True, _Seeded(1))) == 6


class _Seeded:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def categorical(self, probs):
        return int(torch.multinomial(probs.double(), 1, generator=self.g))


# ------------------------------------------------------------------------------------------- through the engine
class SampledModelDrafter(Drafter):
    """A drafter whose q is a real distribution: the tiny draft model's softmax, top-4 per node."""

    name = "tiny-q"
    sampling_q = True

    def __init__(self, model, width: int = 4):
        self.model, self.width = model, width

    def propose(self, context_ids, max_depth):
        return _ModelDraft(self.model, list(context_ids), self.width, min(max_depth, 4))


class _ModelDraft(Draft):
    ROOT = ()

    def __init__(self, model, context, width, max_depth):
        self.model, self.context, self.width, self.max_depth = model, context, width, max_depth

    def children(self, handle, depth):
        with torch.no_grad():
            logits = self.model(torch.tensor([self.context + list(handle)])).logits[0, -1].double()
        logq = logits.log_softmax(-1)
        top = logq.topk(self.width)
        return [Candidate(int(t), float(q), handle + (int(t),)) for q, t in zip(top.values, top.indices)]


def test_greedy_output_is_unchanged_and_sampling_is_reproducible_through_the_engine(tiny_target, tiny_model):
    prompt = [5, 17, 3, 9, 44, 2, 5, 17]
    want = SpecGenerator(tiny_target, "ar").generate(prompt, 24).token_ids
    for name in ("multi-draft", "multi-draft-wor"):
        for policy in ("chain:3", "best-first:8", "static-tree", "bastion"):
            def fresh():
                return SpecGenerator(tiny_target, policy, drafter=SampledModelDrafter(tiny_model),
                                     params={"verifier": name})

            gen = fresh()
            assert gen.generate(prompt, 24).token_ids == want, (name, policy)
            a = gen.generate(prompt, 24, temperature=1.0, seed=3)
            assert len(a.token_ids) == 24 and a.stats.tau >= 1.0
            if policy != "bastion":  # the draws follow the tree's shape: the same trees, the same sample. BASTION
                # sizes its trees from measured times and what it learned, so its sample is the seed's only
                # for the same trees
                assert fresh().generate(prompt, 24, temperature=1.0, seed=3).token_ids == a.token_ids, (name, policy)
                assert gen.generate(prompt, 24, temperature=1.0, seed=3).token_ids == a.token_ids, (name, policy)


def test_drawn_children_are_accepted_more_often_than_ranked_ones_when_the_draft_is_the_target(tiny_target, tiny_model):
    """The draft is the target itself (q = p): at T = 1 drawn children are accepted (nearly) always, ranked
    ones only when the target's sample happens to be the top-1."""
    prompt = [5, 17, 3, 9, 44, 2, 5, 17]
    tau = {}
    for name in ("sample", "multi-draft"):
        gen = SpecGenerator(tiny_target, "chain:3", drafter=SampledModelDrafter(tiny_model, width=96),
                            params={"verifier": name})
        tau[name] = gen.generate(prompt, 48, temperature=1.0, seed=0).stats.tau
    assert tau["multi-draft"] > 3.5 and tau["multi-draft"] > tau["sample"] + 1.0, tau


def test_a_drafter_without_a_real_q_is_refused_in_one_line(tiny_target):
    gen = SpecGenerator(tiny_target, "best-first:8", drafter="ngram", params={"verifier": "multi-draft"})
    with pytest.raises(SpecframeError) as err:
        gen.generate([5, 17, 3, 5, 17], 8, temperature=1.0)
    assert "\n" not in str(err.value) and "ngram" in str(err.value) and "'sample' verifier" in str(err.value)
    assert gen.generate([5, 17, 3, 5, 17], 8).token_ids  # greedy: nothing is drawn, nothing refused



def test_a_bench_method_can_name_its_own_verifier(tiny_target):
    from specframe.errors import UnknownComponentError
    from specframe.registry import Registry
    from specframe.tools.bench import build_methods, check_methods

    registry = Registry()
    labels = ["ar", "best-first:8", "best-first:8+multi-draft-wor", "chain@ngram+sample"]
    check_methods(labels, registry)
    methods = {m.label: m for m in build_methods(labels, tiny_target, registry)}
    assert methods["best-first:8+multi-draft-wor"].generator.components.names["verifier"] == "multi-draft-wor"
    assert methods["best-first:8"].generator.components.names["verifier"] == "auto"
    assert methods["chain@ngram+sample"].generator.components.names["drafter"] == "ngram"
    with pytest.raises(UnknownComponentError):
        check_methods(["bastion+multi-drift"], registry)
