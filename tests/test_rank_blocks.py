"""SpecBlock's rank-guided block tree (``specblock`` expansion, ``rank-class`` surrogate, bundle ``specblock``)
and the rank head of the shipped block drafter.

Trees valid and within bounds on random drafts (hypothesis), deterministic, hand-computed block walks
(follow / branch per class / beam / prune by cumulative log-prob), the confidence-rule fallback, lazy drafts
expanded one depth per call, greedy parity through the engine, exact sampling by enumeration, the head from
package data on the shipped drafter, and a missing or corrupt head file as one clear line.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TinyTokenizer, make_tiny_model, new_target
from specframe import MarginalDraft, SpecGenerator, TrieDraft
from specframe.components import Draft, ExpansionContext, SamplingParams
from specframe.errors import SpecframeError
from specframe.plugins import rank_blocks as rb
from specframe.plugins.rank_blocks import (CLASS_GIVEN_RULE, RankClass, RankHead, SpecBlockTree, rank_probability,
                                           rule_class, save_head)
from specframe.plugins.surrogates import PathConfidence
from specframe.plugins.verifiers import SampleVerifier
from specframe.registry import Registry
from specframe.tree import validate_tree
from test_lossless import TargetFn, lossless_error
from test_parity import N_NEW, PROMPT, check_records, make_drafter
from test_parity import reference as parity_reference

VOCAB = 96


def ctx_for(max_nodes: int = 512, max_depth: int = 64, surrogate=None) -> ExpansionContext:
    return ExpansionContext(root_token=1, context_len=10, max_nodes=max_nodes, max_depth=max_depth,
                            surrogate=surrogate or RankClass(), cost_model=None)


def paths(built) -> dict[tuple[int, ...], float]:
    """Every non-root node as its token path from the root -> its score."""
    tree, out, path = built.tree, {}, {0: ()}
    for i in range(1, tree.size):
        path[i] = path[tree.parent_list[i]] + (tree.token_list[i],)
        out[path[i]] = built.scores[i]
    return out


def marginal(probs: list[list[float]], classes=None, prior=None) -> MarginalDraft:
    """A MarginalDraft whose row d has tokens 10·(d+1) + k with probability probs[d][k]."""
    toks = torch.tensor([[10 * (d + 1) + k for k in range(len(row))] for d, row in enumerate(probs)])
    draft = MarginalDraft(toks, torch.tensor(probs, dtype=torch.float64).log())
    if classes is not None:
        draft.rank_classes = classes
        draft.rank_prior = prior
    return draft


ONE = {0: [1.0, 0, 0, 0], 1: [0, 1.0, 0, 0], 2: [0, 0, 1.0, 0], 3: [0, 0, 0, 1.0]}  # a class for sure


# ------------------------------------------------------------------------------------------- random drafts
@st.composite
def drafts(draw):
    kind = draw(st.sampled_from(["marginal", "marginal+classes", "trie"]))
    seed = draw(st.integers(0, 10_000))
    rng = random.Random(seed)
    if kind == "trie":
        n = draw(st.integers(1, 30))
        tokens, parents, logq, used = [0], [-1], [0.0], [set()]
        for i in range(1, n):
            p = rng.randrange(i)
            tok = rng.choice([t for t in range(VOCAB) if t not in used[p]])
            used[p].add(tok), used.append(set())
            tokens.append(tok), parents.append(p), logq.append(math.log(rng.uniform(0.01, 1.0)))
        return TrieDraft(tokens, parents, logq)
    depth, k = draw(st.integers(1, 7)), draw(st.integers(1, 8))
    logits = torch.randn(depth, VOCAB, generator=torch.Generator().manual_seed(seed)) * draw(st.floats(0.5, 6.0))
    top = logits.log_softmax(-1).topk(k, dim=-1)
    draft = MarginalDraft(top.indices, top.values)
    if kind == "marginal+classes":
        raw = np.random.default_rng(seed).dirichlet([1, 1, 1, 1], size=depth)
        draft.rank_classes = raw.tolist()
        draft.rank_prior = [0.3, 0.2, 0.1, 0.4] if seed % 2 else None
    return draft


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(draft=drafts(), budget=st.integers(1, 120), nodes=st.integers(0, 64), depth=st.integers(0, 9),
       widths=st.tuples(*[st.integers(0, 7)] * 4), beam=st.integers(1, 12), blocks=st.integers(1, 3),
       surrogate=st.sampled_from([RankClass(), PathConfidence()]))
def test_trees_are_valid_and_within_bounds_on_random_drafts(draft, budget, nodes, depth, widths, beam, blocks, surrogate):
    policy = SpecBlockTree(widths=widths, beam=beam, blocks=blocks, budget=budget)
    built = policy.expand(draft, ctx_for(nodes, depth, surrogate))
    tree = built.tree
    validate_tree(tree, VOCAB, "specblock")
    assert tree.size - 1 <= min(budget, nodes) and tree.max_depth <= min(depth, draft.max_depth)
    assert len(built.scores) == tree.size and built.scores[0] == 1.0
    for i in range(1, tree.size):
        assert 0.0 <= built.scores[i] <= built.scores[tree.parent_list[i]] + 1e-12
    siblings = {}
    for i in range(1, tree.size):  # no token twice under one parent
        key = (tree.parent_list[i], tree.token_list[i])
        assert key not in siblings
        siblings[key] = i
    again = policy.expand(draft, ctx_for(nodes, depth, surrogate))  # deterministic for a fixed draft
    assert again.tree.token_list == tree.token_list and again.tree.parent_list == tree.parent_list
    assert again.scores == built.scores


# ------------------------------------------------------------------------------------------- hand-computed walks
def test_a_walk_follows_slots_predicted_rank_1():
    draft = marginal([[0.6, 0.3, 0.1]] * 4, classes=[ONE[0]] * 4)
    built = SpecBlockTree(widths=(1, 4, 6, 4)).expand(draft, ctx_for())
    assert list(paths(built)) == [(10,), (10, 20), (10, 20, 30), (10, 20, 30, 40)]
    # the surrogate: a class-"1" slot's top-1 is the target's token for sure
    assert built.scores == [1.0, 1.0, 1.0, 1.0, 1.0]


def test_a_walk_branches_by_class_and_alternatives_walk_again():
    probs = [[0.4, 0.3, 0.2, 0.05, 0.05], [0.5, 0.3, 0.1, 0.05, 0.05]]
    draft = marginal(probs, classes=[ONE[1], ONE[0]])
    one_round = SpecBlockTree(widths=(2, 4, 6, 4), blocks=1).expand(draft, ctx_for())
    # slot 1 is "2-4": top-4 there; the walk follows 10, where slot 2 ("1") gets top-2
    assert sorted(paths(one_round)) == [(10,), (10, 20), (10, 21), (11,), (12,), (13,)]
    two = SpecBlockTree(widths=(2, 4, 6, 4), blocks=2).expand(draft, ctx_for())
    # round 2: each alternative (11, 12, 13) starts a walk of its own: top-2 of slot 2 under each
    assert len(paths(two)) == 6 + 3 * 2
    assert {p for p in paths(two) if len(p) == 2} == {(a, b) for a in (10, 11, 12, 13) for b in (20, 21)}
    beam1 = SpecBlockTree(widths=(2, 4, 6, 4), blocks=2, beam=1).expand(draft, ctx_for())
    # beam 1: only the best alternative (11: log 0.3) walks again
    assert sorted(p for p in paths(beam1) if len(p) == 2) == [(10, 20), (10, 21), (11, 20), (11, 21)]
    # widths per class: ">10" gets 4 here, "5-10" 6 (capped by the 5 candidates), 0 ends the walk
    for cls, want in ((3, 4), (2, 5)):
        built = SpecBlockTree(widths=(2, 4, 6, 4), blocks=1).expand(marginal(probs[:1], classes=[ONE[cls]]), ctx_for())
        assert len(paths(built)) == want
    stop = SpecBlockTree(widths=(2, 4, 6, 0), blocks=1).expand(marginal(probs, classes=[ONE[0], ONE[3]]), ctx_for())
    assert sorted(paths(stop)) == [(10,), (11,)]


def test_the_tree_is_pruned_to_the_budget_by_cumulative_log_prob():
    probs = [[0.5, 0.3, 0.2], [0.9, 0.1, 0.0001]]
    draft = marginal(probs, classes=[ONE[1], ONE[1]])
    policy = SpecBlockTree(widths=(2, 3, 6, 4), blocks=2, beam=10, budget=4)
    # all nodes with cumulative q: 10 .5, 11 .3, 12 .2, 10-20 .45, 10-21 .05, 10-22 .00005,
    # 11-20 .27, 11-21 .03, ..., 12-20 .18, ...; the best 4 (ancestors come with them): 10, 10-20, 11, 11-20
    assert sorted(paths(policy.expand(draft, ctx_for()))) == [(10,), (10, 20), (11,), (11, 20)]
    # the engine's bound wins over the budget; a node whose ancestors do not fit is skipped
    assert sorted(paths(policy.expand(draft, ctx_for(max_nodes=3)))) == [(10,), (10, 20), (11,)]
    assert sorted(paths(SpecBlockTree(budget=1).expand(draft, ctx_for()))) == [(10,)]


def test_without_rank_classes_the_confidence_rule_decides_per_node():
    t1, t2, t3 = rb.RULE_THRESHOLDS
    assert [rule_class(p) for p in (t1, (t1 + t2) / 2, (t2 + t3) / 2, t3 / 2)] == [0, 1, 2, 3]
    policy = SpecBlockTree(widths=(1, 3, 5, 2), blocks=1)
    sure = min(0.99, t1 + 0.01)
    for p1, want in ((sure, 1), ((t1 + t2) / 2, 3), ((t2 + t3) / 2, 5), (t3 / 2, 2)):
        draft = marginal([[p1] + [p1 / (k + 2) for k in range(5)]])  # no rank_classes: the rule on the top-1 q
        built = policy.expand(draft, ctx_for())
        assert built.tree.size - 1 == want, p1
        got = built.scores[1]
        assert got == pytest.approx(rank_probability(CLASS_GIVEN_RULE[rule_class(p1)], 1))
    # per node in a trie: a sure node follows, an unsure one branches
    trie = TrieDraft([0, 5, 6, 7, 8, 9, 10], [-1, 0, 0, 1, 1, 1, 1],
                     [0.0, math.log(sure), math.log(sure / 3)] + [math.log(t3 / 2)] * 4)
    built = SpecBlockTree(widths=(1, 3, 5, 2), blocks=1).expand(trie, ctx_for())
    assert sorted(paths(built)) == [(5,), (5, 7), (5, 8)]  # the root follows 5; under 5 (class >10) top-2


def test_the_surrogate_uses_the_class_probabilities_and_falls_back_without_them():
    s = RankClass()
    cand = marginal([[0.5, 0.3, 0.2]]).children(0, 0)
    mixed = (0.5, 0.3, 0.2, 0.0)
    tagged = rb._with_classes(cand[1], 1, mixed)
    want = sum(mixed[c] * rb.RANK_GIVEN_CLASS[c][1] for c in range(4))  # P(rank 2 | the class probabilities)
    assert want > 0 and s.score(0.8, 1, tagged) == pytest.approx(0.8 * want)
    assert s.score(1.0, 1, rb._with_classes(cand[0], 0, mixed)) == pytest.approx(0.5)
    # no classes attached (another policy): the best child by the rule on its q, others by the prior
    assert s.score(1.0, 1, cand[0]._replace(rank=0)) == pytest.approx(CLASS_GIVEN_RULE[rule_class(math.exp(cand[0].logq))][0])
    assert s.score(1.0, 1, cand[2]._replace(rank=2)) == pytest.approx(rank_probability(rb.CLASS_PRIOR, 3))
    assert 0 <= s.score(1.0, 1, cand[2]._replace(rank=40)) <= 1
    for c in range(3):  # classes 1, 2-4, 5-10 lie inside the table; >10 reaches beyond it
        assert sum(rb.RANK_GIVEN_CLASS[c]) == pytest.approx(1.0, abs=1e-3)
    assert sum(rb.RANK_GIVEN_CLASS[3]) <= 1.0 and rb.RANK_GIVEN_CLASS[0][0] == 1.0


def test_parameters_are_checked():
    for bad in ({"widths": (1, 2, 3)}, {"widths": (1, 2, 3, -1)}, {"beam": 0}, {"blocks": 0}, {"budget": 0},
                {"block": 0}, {"thresholds": (0.1, 0.5, 0.9)}):
        with pytest.raises(ValueError):
            SpecBlockTree(**bad)


# ------------------------------------------------------------------------------------------- lazy drafts
class LazyMarginal(Draft):
    """A lazy draft over fixed marginals that records its expand calls."""

    lazy = True
    ROOT = ()

    def __init__(self, base: MarginalDraft):
        self.base, self.max_depth, self.done, self.calls = base, base.max_depth, set(), []

    def children(self, handle, depth):
        self.done.add(handle)
        return [c._replace(handle=handle + (c.token,)) for c in self.base.children(0, depth)]

    def expanded(self, handle):
        return handle in self.done

    def expand(self, handles, depth):
        assert all(len(h) == depth for h in handles)
        self.calls.append((len(handles), depth))
        self.done.update(handles)


def test_a_lazy_draft_is_expanded_one_depth_per_call():
    probs = [[0.4, 0.3, 0.2, 0.1]] * 3
    lazy = LazyMarginal(marginal(probs))
    policy = SpecBlockTree(widths=(2, 3, 3, 3), blocks=2, beam=3)
    built = policy.expand(lazy, ctx_for())
    eager = policy.expand(marginal(probs), ctx_for())
    assert paths(built) == paths(eager)
    assert len(lazy.calls) <= 2 * 3  # at most one call per depth and round
    assert any(n > 1 for n, _ in lazy.calls)  # a round's walks at one depth share a call


# ------------------------------------------------------------------------------------------- through the engine
@pytest.mark.parametrize("policy, params", [("specblock", {}), ("specblock:6", {}),
                                            ("specblock", {"expansion.widths": [1, 2, 3, 0], "expansion.beam": 2})])
@pytest.mark.parametrize("kind", ["random-marginal", "random-trie", "oracle", "ngram"])
def test_greedy_output_equals_ar(tiny_target, policy, params, kind):
    truth = list(parity_reference("llama"))
    assert SpecGenerator(tiny_target, "ar").generate(PROMPT, N_NEW).token_ids == truth
    gen = SpecGenerator(tiny_target, policy, drafter=make_drafter(kind, tiny_target, truth, seed=3), params=params)
    out = gen.generate(PROMPT, N_NEW)
    assert out.token_ids == truth
    check_records(out, kind, policy)
    assert gen.components.names["expansion"] == "specblock" and gen.components.names["surrogate"] == "rank-class"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_specblock_trees_are_verified_exactly_at_temperature(seed):
    """Exact sampling by enumeration on trees the policy builds from a tiny draft model (vocabulary 5)."""
    from specframe import Target
    from specframe.plugins.model_drafter import ModelDrafter

    vocab = 5
    target = new_target("llama", vocab=vocab, seed=seed + 10)
    drafter = ModelDrafter(target, model=Target(make_tiny_model("llama", vocab=vocab, seed=seed), TinyTokenizer(), "draft"),
                           top_k=3, max_depth=3)
    built = SpecBlockTree(widths=(2, 3, 3, 2), budget=9).expand(
        drafter.propose([1, 2, 3], 3), ExpansionContext(3, 2, 9, 3, RankClass(), None))
    assert built.tree.size >= 4 and built.tree.max_depth >= 2
    for params in (SamplingParams(temperature=0.9, top_p=0.95), SamplingParams(temperature=1.3, top_k=3)):
        assert lossless_error(SampleVerifier(params), built.tree, TargetFn(seed, vocab), params) < 1e-9


def test_a_seed_gives_ars_sample_through_the_engine(tiny_target):
    prompt = [5, 17, 3, 9, 44, 2, 5, 17, 3, 9]
    want = SpecGenerator(tiny_target, "ar").generate(prompt, 40, temperature=1.0, top_p=0.95, seed=7).token_ids
    gen = SpecGenerator(tiny_target, "specblock", drafter="ngram")
    assert gen.generate(prompt, 40, temperature=1.0, top_p=0.95, seed=7).token_ids == want


def test_the_bundle():
    spec = Registry().policy("specblock")
    assert (spec.drafter, spec.surrogate, spec.cost_model, spec.expansion) == ("dflash", "rank-class", "roofline", "specblock")
    assert spec.shorthand == "expansion.budget" and "drafter.rank_head" in spec.params


# ------------------------------------------------------------------------------------------- the head
def _tiny_dflash(tmp_path):
    from test_dflash import _drafter_dir, _target

    target = _target()
    model, path = _drafter_dir(target, tmp_path)
    return target, model, path


def _random_head(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"mean": torch.zeros(dim), "std": torch.ones(dim), "w1": torch.randn(dim, 8, generator=g),
            "b1": torch.zeros(8), "w2": torch.randn(8, 4, generator=g), "b2": torch.zeros(4),
            "prior": torch.tensor([0.4, 0.3, 0.2, 0.1])}


def test_a_dflash_drafter_with_a_head_gives_rank_classes_and_keeps_greedy_parity(tmp_path):
    from specframe.plugins.dflash import DFlashDrafter

    target, model, path = _tiny_dflash(tmp_path)
    cfg = model.cfg
    save_head(_random_head(cfg.hidden_size + cfg.block_size - 1 + 15), {}, tmp_path / "head")
    prompt = [3, 14, 15, 9, 2, 6, 5, 3]
    ref = SpecGenerator(target, "ar").generate(prompt, 24).token_ids
    plain = DFlashDrafter(target, path=str(path))
    assert plain.rank_head is None  # none asked for, none loaded
    assert DFlashDrafter(target, path=str(path), rank_head="auto").rank_head is None  # an own checkpoint without one
    drafter = DFlashDrafter(target, path=str(path), rank_head=str(tmp_path / "head"))
    gen = SpecGenerator(target, "specblock", drafter=drafter)
    out = gen.generate(prompt, 24)
    assert out.token_ids == ref
    drafter.start(prompt[:-1], target.start(drafter.feature_layers).prefill(prompt[:-1]))
    draft = drafter.propose(prompt, 3)
    assert np.asarray(draft.rank_classes).shape == (3, 4)
    assert np.allclose(np.asarray(draft.rank_classes).sum(1), 1.0) and draft.rank_prior == pytest.approx([0.4, 0.3, 0.2, 0.1])
    plain.start(prompt[:-1], target.start(plain.feature_layers).prefill(prompt[:-1]))
    same = plain.propose(prompt, 3)
    assert not hasattr(same, "rank_classes")
    assert [[c.token for c in same.children(0, d)] for d in range(3)] == [[c.token for c in draft.children(0, d)] for d in range(3)]
    wrong = tmp_path / "wrong"
    save_head(_random_head(7), {}, wrong)
    with pytest.raises(SpecframeError, match="reads 7 features"):
        DFlashDrafter(target, path=str(path), rank_head=str(wrong))


def test_a_missing_or_corrupt_head_is_one_clear_line(tmp_path):
    from specframe.plugins.dflash import DFlashDrafter

    target, _, path = _tiny_dflash(tmp_path)
    missing = tmp_path / "nowhere" / "rank_head.safetensors"
    corrupt = tmp_path / "bad" / "rank_head.safetensors"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x00\x01 not a safetensors file")
    half = tmp_path / "half"
    w = _random_head(10)
    del w["prior"]
    from safetensors.torch import save_file

    half.mkdir()
    save_file(w, str(half / "rank_head.safetensors"))
    for where, what in ((missing, "not found"), (corrupt, "unreadable"), (half / "rank_head.safetensors", "unreadable")):
        for load in (lambda: RankHead.load(where), lambda: DFlashDrafter(target, path=str(path), rank_head=str(where))):
            with pytest.raises(SpecframeError) as err:
                load()
            msg = str(err.value)
            assert "\n" not in msg and str(where) in msg and what in msg
            assert "python -m specframe.plugins.rank_blocks_train" in msg


def test_the_shipped_head_loads_from_package_data():
    from specframe.resources import shipped_drafters_dir

    head = RankHead.load(shipped_drafters_dir() / "smollm2-135m-instruct")
    assert head.feature_dim == 576 + 7 + 15 and head.prior.shape == (4,)
    probs = head.probs(np.zeros((7, head.feature_dim), np.float32))
    assert probs.shape == (7, 4) and np.allclose(probs.sum(1), 1.0)
    assert head.meta["heldout"]["head"]["balanced_accuracy"] > 0


@pytest.mark.slow
def test_the_shipped_drafter_gives_rank_classes_from_its_head(embedded_model_dir):
    from specframe.backends import load_target
    from specframe.plugins.dflash import DFlashDrafter

    target = load_target(None, "hf")
    drafter = DFlashDrafter(target, rank_head="auto")
    assert drafter.rank_head is not None
    ids = target.tokenizer("The capital of France is")["input_ids"]
    drafter.start(ids[:-1], target.start(drafter.feature_layers).prefill(ids[:-1]))
    draft = drafter.propose(ids, drafter.max_depth)
    classes = np.asarray(draft.rank_classes)
    assert classes.shape == (drafter.max_depth, 4) and np.allclose(classes.sum(1), 1.0)
    out = SpecGenerator(target, "specblock").generate("Name three rivers.", 12)
    assert out.token_ids == SpecGenerator(target, "ar").generate("Name three rivers.", 12).token_ids
