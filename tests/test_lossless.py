"""Exact losslessness of the verifiers, by enumerating every outcome.

A *target function* maps every prefix (tuple of tokens after the root) of a small vocabulary to a fixed
random float64 logits vector. A tree's logits row i is the target function at node i's path. The sampler
the verifier draws from is replaced by a replaying oracle, so a depth-first search visits every sequence
of choices, each weighted by the probability the verifier itself passed to ``categorical``.

A verifier's outcome (accepted tokens + bonus) has variable length; both it and the target are compared
as distributions over sequences of a fixed length ``m = max_depth + 1``: every outcome is extended with the
target's exact conditionals up to ``m`` tokens, and the result must equal the product of the target's
conditionals to 1e-9. The same checking function must *reject* deliberately wrong verifiers.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specframe.components import Sampler, SamplingParams, Verdict, Verifier, target_probs
from specframe.plugins.verifiers import GreedyVerifier, SampleVerifier
from specframe.tree import Tree

TOL = 1e-9


# ---------------------------------------------------------------------------------------------- the target
class TargetFn:
    """prefix (tuple of tokens) -> fixed random float64 logits (V,), derived from a seed."""

    def __init__(self, seed: int, vocab: int, scale: float = 2.0):
        self.seed, self.vocab, self.scale = seed, vocab, scale
        self._logits: dict[tuple[int, ...], torch.Tensor] = {}
        self._probs: dict[tuple, torch.Tensor] = {}

    def logits(self, prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in self._logits:
            rng = np.random.default_rng([self.seed, len(prefix), *prefix])
            self._logits[prefix] = torch.from_numpy(rng.standard_normal(self.vocab) * self.scale)
        return self._logits[prefix]

    def probs(self, prefix: tuple[int, ...], params: SamplingParams) -> list[float]:
        """The target's processed next-token distribution (what plain sampling draws from), float64."""
        key = (prefix, params)
        if key not in self._probs:
            p = target_probs(self.logits(prefix), params).double()
            self._probs[key] = (p / p.sum()).tolist()
        return self._probs[key]

    def tree_logits(self, tree: Tree) -> torch.Tensor:
        """(n, V): row i is the target's logits after node i (its path, root excluded)."""
        toks, parents = tree.tokens.tolist(), tree.parents.tolist()
        rows = []
        for i in range(tree.size):
            path = []
            j = i
            while j > 0:
                path.append(toks[j])
                j = parents[j]
            rows.append(self.logits(tuple(path[::-1])))
        return torch.stack(rows)


def _child_index(tree: Tree) -> list[dict[int, int]]:
    """kids[i] = {token: child index} (the test's own, not the library's)."""
    kids: list[dict[int, int]] = [{} for _ in range(tree.size)]
    for i in range(1, tree.size):
        kids[int(tree.parents[i])][int(tree.tokens[i])] = i
    return kids


# ---------------------------------------------------------------------------------------------- enumeration
class _NeedChoice(BaseException):
    """Raised by the oracle at the first unscripted draw (BaseException: a verifier can't swallow it)."""

    def __init__(self, probs: list[float]):
        self.probs = probs


class ReplaySampler(Sampler):
    """Replays a scripted sequence of choices; the next, unscripted draw raises :class:`_NeedChoice`."""

    def __init__(self, script: tuple[int, ...]):  # no super().__init__: no generator, no randomness
        self.script = script
        self.calls = 0

    def categorical(self, probs: torch.Tensor) -> int:
        assert isinstance(probs, torch.Tensor) and probs.dim() == 1, "categorical takes a 1-D tensor"
        p = probs.detach().double()
        assert bool(torch.isfinite(p).all()) and bool((p >= 0).all()) and float(p.sum()) > 0, p
        p = (p / p.sum()).tolist()  # torch.multinomial semantics: weights, normalised
        if self.calls < len(self.script):
            y = self.script[self.calls]
            assert p[y] > 0, "replay diverged: a scripted choice now has probability 0"
            self.calls += 1
            return y
        raise _NeedChoice(p)


def enumerate_verdicts(verifier: Verifier, tree: Tree, logits: torch.Tensor, max_draws: int = 64):
    """Every (verdict, probability) the verifier can produce, by DFS over the sampler's choices."""
    out = []
    stack: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
    while stack:
        script, weight = stack.pop()
        assert len(script) <= max_draws, "verifier drew too many times (infinite loop?)"
        sampler = ReplaySampler(script)
        try:
            verdict = verifier.verify(tree, logits.clone(), sampler)
        except _NeedChoice as need:
            for y, p in enumerate(need.probs):
                if p > 0:
                    stack.append((script + (y,), weight * p))
            continue
        assert sampler.calls == len(script), "verifier returned without using every scripted draw"
        out.append((verdict, weight))
    return out


def verdict_tokens(tree: Tree, verdict: Verdict, vocab: int) -> tuple[int, ...]:
    """Accepted draft tokens + bonus; also checks the verdict is a root-first parent chain."""
    path, bonus = list(verdict.path), int(verdict.bonus)
    parents = tree.parents.tolist()
    assert path and path[0] == 0, f"path must start at the root: {path}"
    for a, b in zip(path, path[1:]):
        assert 0 < b < tree.size and parents[b] == a, f"path {path} does not follow parents"
    assert 0 <= bonus < vocab
    return tuple(tree.tokens[path[1:]].tolist()) + (bonus,)


def lossless_error(verifier: Verifier, tree: Tree, fn: TargetFn, params: SamplingParams) -> float:
    """Max |P_verifier(s) - P_target(s)| over sequences s of length m = max_depth + 1."""
    outcomes = ((verdict_tokens(tree, verdict, fn.vocab), w)
                for verdict, w in enumerate_verdicts(verifier, tree, fn.tree_logits(tree)))
    return distribution_error(outcomes, fn, params, tree.max_depth + 1)


def distribution_error(outcomes, fn: TargetFn, params: SamplingParams, m: int) -> float:
    """Max |P_produced(s) - P_target(s)| over sequences s of length ``m``, from ``outcomes``: every
    (committed tokens, probability) a verification can produce, each extended by the target's conditionals."""

    def extend(dist: dict, seq: tuple[int, ...], w: float) -> None:
        if len(seq) == m:
            dist[seq] = dist.get(seq, 0.0) + w
            return
        for y, p in enumerate(fn.probs(seq, params)):
            if p > 0:
                extend(dist, seq + (y,), w * p)

    produced: dict[tuple[int, ...], float] = {}
    total = 0.0
    for toks, w in outcomes:
        assert len(toks) <= m
        total += w
        extend(produced, toks, w)
    assert abs(total - 1.0) < 1e-9, f"outcome probabilities sum to {total}"
    target: dict[tuple[int, ...], float] = {}
    extend(target, (), 1.0)  # the target's own distribution over length-m sequences
    return max(abs(target.get(k, 0.0) - produced.get(k, 0.0)) for k in set(target) | set(produced))


# ---------------------------------------------------------------------------------------------- strategies
@st.composite
def trees(draw, vocab: int, max_nodes: int = 10, max_depth: int = 3):
    """Random tree over ``vocab``: parents[i] < i, distinct sibling tokens, depth <= max_depth."""
    n = draw(st.integers(1, max_nodes))
    tokens, parents, depth = [draw(st.integers(0, vocab - 1))], [-1], [0]
    used: list[set[int]] = [set()]
    for i in range(1, n):
        open_nodes = [j for j in range(i) if depth[j] < max_depth and len(used[j]) < vocab]
        if not open_nodes:
            break
        parent = draw(st.sampled_from(open_nodes))
        tok = draw(st.sampled_from(sorted(set(range(vocab)) - used[parent])))
        used[parent].add(tok)
        used.append(set())
        tokens.append(tok)
        parents.append(parent)
        depth.append(depth[parent] + 1)
    logq = [0.0] + [draw(st.floats(-5, 0)) for _ in tokens[1:]]
    return Tree.from_lists(tokens, parents, logq)


@st.composite
def problems(draw):
    vocab = draw(st.integers(3, 6))
    tree = draw(trees(vocab))
    fn = TargetFn(draw(st.integers(0, 2**31 - 1)), vocab, draw(st.sampled_from([0.5, 2.0, 4.0])))
    return tree, fn


sampling_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.6]),
    top_k=st.sampled_from([0, 0, 1, 2, 3]),
    top_p=st.sampled_from([1.0, 1.0, 0.95, 0.7, 0.4, 0.1]),
)


def random_problem(seed: int, vocab: int | None = None, max_nodes: int = 10, max_depth: int = 3):
    """A deterministic (non-hypothesis) random problem, for the negative controls."""
    rnd = random.Random(seed)
    vocab = vocab or rnd.randint(3, 6)
    tokens, parents, depth, used = [rnd.randrange(vocab)], [-1], [0], [set()]
    for _ in range(rnd.randint(1, max_nodes - 1)):
        open_nodes = [j for j in range(len(tokens)) if depth[j] < max_depth and len(used[j]) < vocab]
        if not open_nodes:
            break
        parent = rnd.choice(open_nodes)
        tok = rnd.choice(sorted(set(range(vocab)) - used[parent]))
        used[parent].add(tok)
        used.append(set())
        tokens.append(tok)
        parents.append(parent)
        depth.append(depth[parent] + 1)
    tree = Tree.from_lists(tokens, parents, [0.0] + [-1.0] * (len(tokens) - 1))
    return tree, TargetFn(seed, vocab, rnd.choice([0.5, 2.0, 4.0]))


# ---------------------------------------------------------------------------------------------- the tests
@settings(max_examples=120, deadline=None)
@given(problems(), sampling_params)
def test_sample_verifier_is_exactly_lossless(problem, params):
    tree, fn = problem
    assert lossless_error(SampleVerifier(sampling=params), tree, fn, params) < TOL


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from([0.5, 1.0, 2.5]))
def test_sample_verifier_keyword_overrides_are_lossless(problem, temperature):
    tree, fn = problem
    params = SamplingParams(temperature=temperature, top_k=2, top_p=0.9)
    verifier = SampleVerifier(temperature=temperature, top_k=2, top_p=0.9)
    assert verifier.params == params
    assert lossless_error(verifier, tree, fn, params) < TOL


def test_sample_verifier_on_full_trees():
    """Every node has every token as a child: the verifier must descend to a leaf every time."""
    vocab, depth = 3, 3
    tokens, parents, frontier = [0], [-1], [0]
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for tok in range(vocab):
                tokens.append(tok)
                parents.append(node)
                nxt.append(len(tokens) - 1)
        frontier = nxt
    tree = Tree.from_lists(tokens, parents)
    for seed, params in [(1, SamplingParams(1.0)), (2, SamplingParams(0.6, top_k=2)), (3, SamplingParams(1.3, top_p=0.8))]:
        fn = TargetFn(seed, vocab)
        outcomes = enumerate_verdicts(SampleVerifier(sampling=params), tree, fn.tree_logits(tree))
        assert all(len(v.path) == depth + 1 for v, _ in outcomes)
        assert lossless_error(SampleVerifier(sampling=params), tree, fn, params) < TOL


def test_sample_verifier_rejects_temperature_zero():
    with pytest.raises(ValueError):
        SampleVerifier(sampling=SamplingParams(temperature=0.0))


@settings(max_examples=150, deadline=None)
@given(problems())
def test_greedy_verifier_follows_the_target_argmax_chain(problem):
    tree, fn = problem
    logits = fn.tree_logits(tree)

    class NoRandomness(Sampler):
        def __init__(self):
            pass

        def categorical(self, probs):
            raise AssertionError("the greedy verifier must not sample")

    verdict = GreedyVerifier().verify(tree, logits, NoRandomness())
    toks = verdict_tokens(tree, verdict, fn.vocab)
    # the target's own greedy continuation, long enough to cover any tree
    chain: list[int] = []
    for _ in range(tree.max_depth + 1):
        chain.append(int(fn.logits(tuple(chain)).argmax()))
    assert list(toks) == chain[: len(toks)]
    # accepted nodes are exactly the longest prefix of the chain that the tree contains
    kids = _child_index(tree)
    node, expect = 0, [0]
    for tok in chain:
        if tok not in kids[node]:
            break
        node = kids[node][tok]
        expect.append(node)
    assert list(verdict.path) == expect
    assert verdict.bonus == chain[len(expect) - 1]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 10), sampling_params)
def test_target_probs_matches_an_independent_reference(seed, vocab, params):
    """target_probs (what every sample check above trusts) vs a float64 numpy reimplementation."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(vocab) * rng.choice([0.5, 2.0, 6.0])
    z = logits / params.temperature
    if params.top_k and params.top_k < vocab:
        kth = np.sort(z)[::-1][params.top_k - 1]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # mass strictly before each token in sorted order
        keep = np.zeros(vocab, dtype=bool)
        keep[order[before < params.top_p]] = True  # smallest prefix reaching top_p, crossing token included
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    got = target_probs(torch.from_numpy(logits), params).double().numpy()
    assert got.shape == (vocab,)
    np.testing.assert_allclose(got, p, atol=1e-6, rtol=0)
    assert ((got > 0) == (p > 0)).all()


# ---------------------------------------------------------------------------------------------- negative controls
class TopTwoVerifier(Verifier):
    """WRONG: accepts a child outright whenever it is among the target's top-2 tokens."""

    def __init__(self, params):
        self.params = params

    def verify(self, tree, logits, rng):
        kids = _child_index(tree)
        node, path = 0, [0]
        while True:
            p = target_probs(logits[node], self.params)
            top2 = set(p.topk(min(2, p.shape[-1])).indices.tolist())
            lucky = [t for t in kids[node] if t in top2 and p[t] > 0]
            if lucky:
                node = kids[node][lucky[0]]
                path.append(node)
                continue
            y = rng.categorical(p)
            if y not in kids[node]:
                return Verdict(path, y)
            node = kids[node][y]
            path.append(node)


class ChildrenFirstVerifier(Verifier):
    """WRONG: samples among the children (renormalised) whenever any has mass; bonus only at the end."""

    def __init__(self, params):
        self.params = params

    def verify(self, tree, logits, rng):
        kids = _child_index(tree)
        node, path = 0, [0]
        while True:
            p = target_probs(logits[node], self.params)
            mask = torch.zeros_like(p)
            mask[list(kids[node])] = 1.0
            q = p * mask
            if kids[node] and float(q.sum()) > 0:
                node = kids[node][rng.categorical(q / q.sum())]
                path.append(node)
                continue
            return Verdict(path, rng.categorical(p))


class FreshBonusVerifier(Verifier):
    """WRONG (subtle): when y is not a child, the bonus is a *second* draw from p (may be a child)."""

    def __init__(self, params):
        self.params = params

    def verify(self, tree, logits, rng):
        kids = _child_index(tree)
        node, path = 0, [0]
        while True:
            p = target_probs(logits[node], self.params)
            y = rng.categorical(p)
            if y not in kids[node]:
                return Verdict(path, rng.categorical(p))
            node = kids[node][y]
            path.append(node)


class IgnoresFiltersVerifier(Verifier):
    """WRONG when filters are on: samples from softmax(logits / T) without top-k / top-p."""

    def __init__(self, params):
        self.params = SamplingParams(temperature=params.temperature)

    def verify(self, tree, logits, rng):
        return SampleVerifier(sampling=self.params).verify(tree, logits, rng)


class ParentRowVerifier(Verifier):
    """WRONG (off by one): draws node i's continuation from its parent's logits row."""

    def __init__(self, params):
        self.params = params

    def verify(self, tree, logits, rng):
        kids = _child_index(tree)
        parents = tree.parents.tolist()
        node, path = 0, [0]
        while True:
            p = target_probs(logits[max(parents[node], 0)], self.params)
            y = rng.categorical(p)
            if y not in kids[node]:
                return Verdict(path, y)
            node = kids[node][y]
            path.append(node)


NEGATIVE_PARAMS = [SamplingParams(1.0), SamplingParams(0.7, top_k=3), SamplingParams(1.3, top_p=0.8)]


@pytest.mark.parametrize(
    "wrong",
    [TopTwoVerifier, ChildrenFirstVerifier, FreshBonusVerifier, IgnoresFiltersVerifier, ParentRowVerifier],
)
def test_the_check_rejects_wrong_verifiers(wrong):
    worst = 0.0
    for seed in range(12):
        tree, fn = random_problem(seed)
        for params in NEGATIVE_PARAMS:
            # the correct verifier passes on exactly these examples...
            assert lossless_error(SampleVerifier(sampling=params), tree, fn, params) < TOL
            # ...and the wrong one must fail on at least one of them
            worst = max(worst, lossless_error(wrong(params), tree, fn, params))
    assert worst > 1e-3, f"{wrong.__name__} was not detected (max error {worst:g})"


def test_the_check_rejects_a_biased_greedy_verifier_at_temperature():
    """The greedy verifier used at temperature > 0 is not lossless: the check must say so."""
    tree, fn = random_problem(5, vocab=4)
    params = SamplingParams(1.0)

    class GreedyAsSampler(Verifier):
        def verify(self, tree, logits, rng):
            return GreedyVerifier().verify(tree, logits, rng)

    assert lossless_error(GreedyAsSampler(), tree, fn, params) > 1e-3


MC_ALPHA = 1e-4  # false-alarm rate of the Monte-Carlo goodness-of-fit test (the seed is fixed, too)


def _pooled_chisquare(counts: dict, exact: dict, n: int):
    """Pearson's χ² of the observed outcome counts against n × the exact probabilities; outcomes expected
    fewer than 5 times are pooled into one cell (the χ² approximation needs ≥ 5 per cell)."""
    from scipy.stats import chisquare

    keys = sorted(exact, key=lambda k: -exact[k])
    big = [k for k in keys if n * exact[k] >= 5]
    small = [k for k in keys if n * exact[k] < 5]
    observed = [counts.get(k, 0) for k in big]
    expected = [n * exact[k] for k in big]
    if small:
        observed.append(sum(counts.get(k, 0) for k in small))
        expected.append(n * sum(exact[k] for k in small))
    expected = np.asarray(expected) * (n / sum(expected))  # remove float round-off in Σp = 1
    return chisquare(observed, expected), len(observed)


@pytest.mark.parametrize("seed", [3, 6])  # 3: one dominant outcome (5 cells); 6: 28 outcomes, each ≥ 5 expected
def test_outcome_probabilities_equal_an_independent_monte_carlo_estimate(seed):
    """The enumeration's weights are the real sampler's frequencies (guards the oracle itself): 4,000
    draws of the real verifier with the real sampler (seed 1234) pass a χ² goodness-of-fit test against
    the enumerated distribution at α = 1e-4, and never produce an outcome the enumeration lacks. The same
    test rejects the draws when they are compared with a wrong distribution."""
    tree, fn = random_problem(seed, vocab=4)
    params = SamplingParams(1.0)
    verifier = SampleVerifier(sampling=params)
    exact: dict[tuple[int, ...], float] = {}
    for verdict, w in enumerate_verdicts(verifier, tree, fn.tree_logits(tree)):
        key = verdict_tokens(tree, verdict, fn.vocab)
        exact[key] = exact.get(key, 0.0) + w
    sampler, logits, n = Sampler(1234), fn.tree_logits(tree), 4000
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(n):
        key = verdict_tokens(tree, verifier.verify(tree, logits, sampler), fn.vocab)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact)
    fit, cells = _pooled_chisquare(counts, exact, n)
    assert cells >= 4, cells  # enough distinct outcomes for the test to mean something
    assert fit.pvalue > MC_ALPHA, (fit, counts, exact)
    # power check: moving a quarter of the most likely outcome's mass to the second is detected
    first, second = sorted(exact, key=lambda k: -exact[k])[:2]
    shifted = dict(exact)
    shifted[first], shifted[second] = 0.75 * exact[first], exact[second] + 0.25 * exact[first]
    assert _pooled_chisquare(counts, shifted, n)[0].pvalue < MC_ALPHA


def test_a_stream_callback_that_returns_true_stops_after_that_step(tiny_target):
    """``stream`` returning True ends the generation after that step, with what was committed so far."""
    from specframe import SpecGenerator
    from conftest import plain_greedy

    prompt = [5, 17, 3, 9, 44, 2, 5, 17, 3, 9]
    seen: list[list[int]] = []

    def stop_after_two(ids):
        seen.append(list(ids))
        return len(seen) == 2

    out = SpecGenerator(tiny_target, "bastion").generate(prompt, 40, stream=stop_after_two)
    assert len(seen) == 2 and out.stats.steps == 2
    assert out.token_ids == seen[0] + seen[1] == plain_greedy(tiny_target.model, prompt, len(out.token_ids))
    assert out.stats.new_tokens == len(out.token_ids) < 40


def test_a_seed_gives_the_same_sample_under_every_policy(tiny_target):
    """The sample verifier draws exactly once per committed position, in order, so with a seed the output
    is the same under every policy and every tree (fp64: no floating-point near-ties)."""
    from specframe import SpecGenerator

    prompt = [5, 17, 3, 9, 44, 2, 5, 17, 3, 9]
    outs = {policy: SpecGenerator(tiny_target, policy).generate(prompt, 40, temperature=1.0, top_p=0.95, seed=7).token_ids
            for policy in ("ar", "chain", "best-first:16", "static-tree", "bastion")}
    assert len({tuple(v) for v in outs.values()}) == 1, outs
    other = SpecGenerator(tiny_target, "ar").generate(prompt, 40, temperature=1.0, top_p=0.95, seed=8).token_ids
    assert other != outs["ar"], "a different seed gives a different sample"
