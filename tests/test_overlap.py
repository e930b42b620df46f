"""Drafting while the target verifies (drafter ``model`` with ``overlap=true``), DuoDecoding and SpecBranch.

The look-ahead runs on a thread of its own, so its timing is arbitrary: the tests force each interleaving
(the look-ahead finishing before the verification starts, during it, after it) with events, and require the
output and every step record to be the serial drafter's. A draft whose logits are a pure function of
(token, position) makes "the same draft" exact whatever the cache layout. A look-ahead that raises or hangs
ends the generation with one line and leaves no thread. DuoDecoding's k rule is checked against hand-computed
cases; both new policies keep greedy parity on both runtimes and exact sampling by enumeration.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from conftest import TinyTokenizer, make_tiny_model, new_target
from specframe import Registry, SpecGenerator, SpecframeError
from specframe.components import ExpansionContext, SamplingParams, TrieDraft
from specframe.plugins.multi_sequence import MultiSequence, balanced_gamma, sequence_count
from specframe.plugins.model_drafter import ModelDrafter
from specframe.plugins.branch import Branch
from specframe.plugins.surrogates import PathConfidence
from specframe.plugins.verifiers import SampleVerifier
from specframe.target import ForwardOut
from test_lossless import TargetFn, lossless_error
from test_model_drafter import BACKENDS, PROMPT, reference

DEADLOCK_GUARD_S = 30.0  # events below never wait this long unless the code under test deadlocks
POLICIES = ("chain:5", "best-first:8", "duodecoding", "duodecoding:4", "specbranch", "static-tree")
TIMING = {"draft_s", "overhead_s", "verify_s", "predicted_verify_s", "expand_draft_s", "ahead_s", "ahead_wait_s"}


def frozen_clock() -> float:
    return 0.0


# ------------------------------------------------------------------------------------------- a pure draft
class PureDraft:
    """A draft model whose logits depend on the node's token only (a bigram model: the target's logits after
    that one token), so the same node gets the same children whatever else its cache holds (a real draft
    agrees up to float rounding). ``on_grow`` is called before every grow (tests hang or fail the look-ahead
    there)."""

    def __init__(self, inner, vocab: int):
        self.inner, self.vocab = inner, vocab
        with torch.no_grad():
            self.table = inner.model(input_ids=torch.arange(vocab)[:, None]).logits[:, -1].double()
        self.on_grow = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def start(self, feature_layers=()):
        return PureSession(self)


class PureSession:
    def __init__(self, draft: PureDraft):
        self.draft, self.past = draft, 0

    def _logits(self, tree, start):
        rows = [self.draft.table[t] for t in tree.token_list[start:]]
        return ForwardOut(torch.stack(rows).float(), None)

    def prefill(self, ids):
        self.past += len(ids)

    def grow(self, tree, start):
        if self.draft.on_grow is not None:
            self.draft.on_grow()
        return self._logits(tree, start)

    def verify(self, tree):
        return self._logits(tree, 0)

    def keep(self, path, tree_size):
        self.past += len(path)

    def rollback(self, n):
        pass

    def truncate(self, length):
        self.past = min(self.past, length)


def pure_pair(vocab: int = 96):
    """A tiny target and a pure draft that agrees with it often enough for predictions to hold."""
    target = new_target("llama", vocab=vocab, seed=0)
    return target, PureDraft(new_target("llama", vocab=vocab, seed=0), vocab)


# ------------------------------------------------------------------------------------------- interleavings
class Interleave:
    """Forces when each look-ahead job runs relative to the verification it overlaps: ``before`` (it finishes
    before the target starts verifying), ``during`` (it starts once the target has started and finishes
    before the target's verification returns) or ``after`` (it starts only once the verification returned)."""

    def __init__(self, mode: str, drafter: ModelDrafter, target):
        self.mode, self.pending, self.jobs = mode, None, 0
        start, self.drafter = drafter.ahead.start, drafter

        def start_job(job):
            verifying, verified, done = threading.Event(), threading.Event(), threading.Event()
            self.pending = (verifying, verified, done)
            self.jobs += 1

            def forced(cancelled):
                try:
                    if mode == "during":
                        assert verifying.wait(DEADLOCK_GUARD_S)
                    elif mode == "after":
                        assert verified.wait(DEADLOCK_GUARD_S)
                    job(cancelled)
                finally:
                    done.set()

            start(forced)

        drafter.ahead.start = start_job
        target_start = target.start

        def start_session(feature_layers=()):
            session = target_start(feature_layers)
            verify = session.verify

            def forced_verify(tree):
                events, self.pending = self.pending, None
                if events is None:  # no look-ahead this step (the first one)
                    return verify(tree)
                verifying, verified, done = events
                if mode == "before":
                    assert done.wait(DEADLOCK_GUARD_S)
                verifying.set()
                out = verify(tree)
                if mode == "during":
                    assert done.wait(DEADLOCK_GUARD_S)
                verified.set()
                return out

            session.verify = forced_verify
            return session

        target.start = start_session


def records(out, drop=frozenset()):
    return [{k: v for k, v in vars(r).items() if k not in drop} for r in out.stats.records]


def run(policy: str, overlap: bool, mode: str | None = None, n: int = 40, **kwargs):
    target, draft = pure_pair()
    drafter = ModelDrafter(target, model=draft, overlap=overlap, clock=frozen_clock, top_k=8, **kwargs)
    if mode:
        forced = Interleave(mode, drafter, target)
    gen = SpecGenerator(target, policy, drafter=drafter, clock=frozen_clock)
    out = [gen.generate(PROMPT, n), gen.generate(PROMPT[:4], n // 2)]
    if mode:
        assert forced.jobs > len(out), "the look-ahead never ran"
    return out, drafter


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", ["before", "during", "after"])
def test_drafting_ahead_gives_the_serial_drafters_output_and_records_in_every_interleaving(policy, mode):
    serial, _ = run(policy, overlap=False)
    ahead, drafter = run(policy, overlap=True, mode=mode)
    for s, a in zip(serial, ahead):
        assert a.token_ids == s.token_ids
        assert records(a, {"ahead_hit"}) == records(s, {"ahead_hit"})
    assert sum(r.ahead_hit for out in ahead for r in out.stats.records) > 0, "no prediction ever held"
    assert not [t for t in threading.enumerate() if t.name.startswith("specframe-ahead")]


def test_bastion_drafting_ahead_is_deterministic_whatever_the_interleaving():
    """BASTION prices a draft call by its measured time, so drafting ahead (calls already paid) may change its
    trees; what must not change is anything with the interleaving."""
    outs = [run("bastion", overlap=True, mode=mode)[0] for mode in ("before", "during", "after")]
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert a.token_ids == b.token_ids and records(a) == records(b)
    assert outs[0][0].token_ids == run("bastion", overlap=False)[0][0].token_ids


# ------------------------------------------------------------------------------------------- failures
def live_ahead_threads():
    return [t for t in threading.enumerate() if t.name.startswith("specframe-ahead") and t.is_alive()]


def test_a_look_ahead_that_raises_ends_the_generation_with_one_line_and_no_thread():
    target, draft = pure_pair()
    drafter = ModelDrafter(target, model=draft, overlap=True)

    def fail():
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the draft runtime crashed")

    draft.on_grow = fail
    with pytest.raises(SpecframeError) as err:
        SpecGenerator(target, "chain:4", drafter=drafter).generate(PROMPT, 30)
    line = str(err.value)
    assert "\n" not in line and "drafter 'model'" in line and "the draft runtime crashed" in line
    assert not live_ahead_threads()


def test_a_look_ahead_that_never_answers_ends_the_generation_with_one_line_and_no_thread():
    target, draft = pure_pair()
    drafter = ModelDrafter(target, model=draft, overlap=True, ahead_timeout=0.2)

    def hang():  # a draft call that blocks until the drafter gives up on it
        if threading.current_thread() is not threading.main_thread():
            drafter.ahead._cancelled.wait()

    draft.on_grow = hang
    with pytest.raises(SpecframeError) as err:
        SpecGenerator(target, "chain:4", drafter=drafter).generate(PROMPT, 30)
    line = str(err.value)
    assert "\n" not in line and "drafter 'model'" in line and "within 0.2 s" in line and "overlap=false" in line
    assert not live_ahead_threads()


def test_a_generation_that_fails_elsewhere_stops_the_look_ahead():
    target, draft = pure_pair()
    drafter = ModelDrafter(target, model=draft, overlap=True)
    gen = SpecGenerator(target, "chain:4", drafter=drafter)
    calls = []

    def stop(tokens):  # the caller fails on the second step, while a look-ahead may run
        calls.append(tokens)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gen.generate(PROMPT, 30, stream=stop)
    assert not live_ahead_threads()
    assert gen.generate(PROMPT, 12).token_ids == reference(target, PROMPT, 12)  # the drafter works on


def test_the_bundles_settings_reach_their_drafter():
    target, draft = pure_pair()
    duo = SpecGenerator(target, "duodecoding", params={"drafter.model": draft}).components.drafter
    assert duo.overlap and duo.top_k == 8 and duo.branches == 1
    branch = SpecGenerator(target, "specbranch", params={"drafter.model": draft}).components.drafter
    assert branch.overlap and branch.branches == 2
    serial = SpecGenerator(target, "duodecoding", drafter="model", params={"drafter.model": draft}).components.drafter
    assert not serial.overlap and serial.top_k == 8
    assert "overlap" in Registry().parameters("drafter", "model-ahead")


def test_overlap_needs_the_targets_tokenizer_and_positive_settings():
    target = new_target("llama", seed=0)
    with pytest.raises(SpecframeError, match="branches and draft_threads"):
        ModelDrafter(target, model=new_target("llama", seed=0), branches=0)
    with pytest.raises(SpecframeError, match="ahead_timeout"):
        ModelDrafter(target, model=new_target("llama", seed=0), ahead_timeout=0)


# ------------------------------------------------------------------------------------------- DuoDecoding's rule
@pytest.mark.parametrize("first, p2, gamma, k", [
    ([0.9, 0.05, 0.03], 0.8, 8, 1),  # sure of the greedy pair: one sequence
    ([0.4, 0.3, 0.2, 0.05], 0.5, 8, 2),  # bar 0.2: only 0.3 clears it (0.2 does not exceed it)
    ([0.3, 0.25, 0.2, 0.15, 0.1], 0.3, 8, 4),  # bar 0.09: 4 clear it, k = 5, rounded down to 4 (divides 8)
    ([0.3, 0.25, 0.2, 0.15, 0.1], 0.3, 6, 3),  # the same with γ = 6: its divisors below 5 are 1, 2, 3
    ([0.3, 0.25, 0.2, 0.15, 0.1], 0.3, 16, 4),
    ([0.1] * 10, 0.0, 16, 8),  # p2 = 0: every candidate clears the bar, but only ranks 2..8 count
    ([0.5, 0.4], 0.9, 3, 1),  # k = 2 does not divide γ = 3
    ([], 0.5, 8, 1),
])
def test_duodecoding_k_rule_against_hand_computed_cases(first, p2, gamma, k):
    assert sequence_count(first, p2, gamma) == k


def test_gamma_balances_drafting_against_verification():
    verify = lambda n: 0.05 + 0.005 * n  # noqa: E731
    assert balanced_gamma(0.01, verify, 16) == 8  # 8·0.01 ≤ 0.095; 12·0.01 > 0.115
    assert balanced_gamma(0.0, verify, 16) == 16  # a free draft: the largest γ allowed
    assert balanced_gamma(1.0, verify, 16) == 1  # a dear one: one token


def trie(first, second_best):
    """A root with children of probabilities ``first`` (tokens 10, 11, ...); every node below has children
    of probabilities ``second_best`` (tokens 1, 2, ...), to depth 6."""
    tokens, parents, logq = [0], [-1], [0.0]

    def grow(parent, depth, probs, base):
        for i, p in enumerate(probs):
            tokens.append(base + i)
            parents.append(parent)
            logq.append(math.log(p))
            if depth < 6:
                grow(len(tokens) - 1, depth + 1, second_best, 1)

    grow(0, 1, first, 10)
    return TrieDraft(tokens, parents, logq)


def test_multi_sequence_drafts_k_sequences_of_gamma_over_k_from_different_first_tokens():
    ctx = ExpansionContext(0, 5, 64, 16, PathConfidence(), None)
    built = MultiSequence(gamma=8).expand(trie([0.4, 0.3, 0.2, 0.05], [0.5, 0.3]), ctx)  # bar 0.2 -> k = 2
    tree = built.tree
    firsts = [i for i in range(tree.size) if tree.parent_list[i] == 0]
    assert [tree.token_list[i] for i in firsts] == [10, 11]
    assert tree.size - 1 == 8 and tree.max_depth == 4  # two sequences of 8 / 2 = 4 tokens
    sure = MultiSequence(gamma=6).expand(trie([0.9, 0.05], [0.9, 0.05]), ctx).tree
    assert sure.size - 1 == 6 and sure.max_depth == 6  # one sequence of 6


def test_branch_hedges_only_where_the_draft_is_unsure_and_stops_when_confidence_runs_out():
    ctx = ExpansionContext(0, 5, 64, 16, PathConfidence(), None)
    sure = Branch(branch=2, threshold=0.5, min_path=0.2).expand(trie([0.95, 0.04], [0.9, 0.05]), ctx).tree
    assert all(sum(1 for p in sure.parent_list if p == i) <= 1 for i in range(sure.size))  # a chain
    assert sure.size - 1 == 6  # 0.95·0.9^k stays above 0.2 to the trie's depth 6
    unsure = Branch(branch=2, threshold=0.5, min_path=0.3).expand(trie([0.45, 0.4], [0.9, 0.05]), ctx).tree
    assert sum(1 for p in unsure.parent_list if p == 0) == 2  # two branches at the first position
    assert unsure.max_depth == 4  # 0.45·0.9³ ≥ 0.3 > 0.45·0.9⁴: the path ends there


def test_branch_follows_the_drafts_length_classes():
    ctx = ExpansionContext(0, 5, 64, 16, PathConfidence(), None)
    draft = trie([0.95, 0.04], [0.99, 0.005])
    draft.length_classes = [0.1, 0.8, 0.1]  # H-RAD: 1-6 tokens
    assert Branch().expand(draft, ctx).tree.max_depth == 6
    draft.length_classes = [0.7, 0.2, 0.1]  # H-RAD: the first token is likely rejected
    hedged = Branch().expand(draft, ctx).tree
    assert hedged.max_depth == 1 and hedged.size == 3


# ------------------------------------------------------------------------------------------- parity and sampling
@pytest.mark.parametrize("pair", BACKENDS)
@pytest.mark.parametrize("policy", ["duodecoding", "specbranch", "duodecoding:4", "bastion"])
def test_duodecoding_and_specbranch_give_the_targets_greedy_output_on_both_runtimes(pair, policy):
    for kind in ("good", "random", "adversarial"):
        target, draft = pair(kind)
        want = reference(target, PROMPT, 24)
        for overlap in (False, True):
            drafter = ModelDrafter(target, model=draft, overlap=overlap, top_k=8, branches=2)
            gen = SpecGenerator(target, policy, drafter=drafter)
            assert gen.generate(PROMPT, 24).token_ids == want, (policy, kind, overlap)
            assert gen.generate(PROMPT[:3] + [11], 12).token_ids == reference(target, PROMPT[:3] + [11], 12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("policy", [MultiSequence(gamma=4), Branch(branch=2, threshold=0.9, min_path=0.05, max_len=2)])
def test_duodecoding_and_specbranch_trees_are_verified_exactly_at_temperature(seed, policy):
    vocab = 5
    model = make_tiny_model("llama", vocab=vocab, seed=seed)
    target = new_target("llama", vocab=vocab, seed=seed + 10)
    from specframe import Target

    drafter = ModelDrafter(target, model=Target(model, TinyTokenizer(), "draft"), top_k=3, max_depth=3)
    built = policy.expand(drafter.propose([1, 2, 3], 3), ExpansionContext(3, 2, 8, 3, PathConfidence(), None))
    assert built.tree.size > 2
    params = SamplingParams(temperature=0.9, top_p=0.95)
    assert lossless_error(SampleVerifier(params), built.tree, TargetFn(seed, vocab), params) < 1e-9


def test_sampling_with_a_seed_is_the_same_drafting_ahead_or_not():
    """At T > 0 the verifier draws from the same stream on the same trees: drafting ahead changes nothing."""
    outs = []
    for overlap in (False, True):
        target, draft = pure_pair()
        drafter = ModelDrafter(target, model=draft, overlap=overlap, clock=frozen_clock, top_k=8)
        gen = SpecGenerator(target, "duodecoding:4", drafter=drafter, clock=frozen_clock)
        outs.append(gen.generate(PROMPT, 30, temperature=0.8, seed=7).token_ids)
    assert outs[0] == outs[1]


# ------------------------------------------------------------------------------------------- cores
class Threads:
    def __init__(self, name: str, n: int):
        self.name, self.n, self.calls = name, n, []

    def set_threads(self, n: int) -> int:
        before, self.n = self.n, n
        self.calls.append(n)
        return before


def test_the_two_sides_share_the_cores_while_they_overlap_and_get_them_back(monkeypatch):
    import specframe.overlap as overlap

    monkeypatch.setattr(overlap.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    target, draft = Threads("t", 2), Threads("d", 2)
    split = overlap.CoreSplit(target, draft, draft_threads=1)
    split.enter()
    split.enter()  # entering twice changes nothing (and forgets nothing)
    assert (target.n, draft.n) == (1, 1)
    split.leave()
    assert (target.n, draft.n) == (2, 2) and target.calls == [1, 2] and draft.calls == [1, 2]
    monkeypatch.setattr(overlap.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert overlap.share_of_cores(1) == (15, 1) and overlap.share_of_cores(4) == (12, 4)
    blind = overlap.CoreSplit(target, object(), 1)
    assert blind.missing == ["?"] and len(blind.sides) == 1


def test_an_ahead_thread_runs_one_job_and_reports_its_failure_once():
    from specframe.errors import PluginError
    from specframe.overlap import AheadThread

    worker, seen = AheadThread("drafter 'x'", timeout=30), []
    worker.start(lambda cancelled: seen.append(cancelled.is_set()))
    worker.wait()
    assert seen == [False] and not worker.running
    worker.start(lambda cancelled: 1 / 0)
    with pytest.raises(PluginError, match="drafter 'x' failed while drafting ahead: ZeroDivisionError"):
        worker.wait()
    assert worker.wait() == 0.0  # nothing runs: nothing to report
