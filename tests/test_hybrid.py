"""The ``hybrid`` drafter: several draft sources merged into one candidate pool.

* merged trees are valid, prefix-closed, within bounds, and contain only paths some source proposed, each
  once (property test through the real :class:`HybridDrafter` with in-process source drafters);
* greedy parity / sampling determinism with ``ngram`` + a tiny ``dflash`` checkpoint on two architectures,
  for every registered policy;
* the ``calibrated`` surrogate learns per-source acceptance and BASTION's expansion then favours the
  reliable source.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specframe import Registry, SpecGenerator, hookimpl, make_plugin_set
from specframe.components import (
    CostModel,
    Drafter,
    EmptyDraft,
    ExpansionContext,
    MarginalDraft,
    SamplingParams,
    TrieDraft,
    target_probs,
)
from specframe.plugins.cost_models import ConstantCost
from specframe.plugins.expansion import AdaptiveBestFirst, BestFirst, Chain, StaticTree
from specframe.plugins.hybrid import HybridDrafter, MergedDraft
from specframe.plugins.surrogates import Calibrated, PathConfidence
from specframe.plugins.dflash_train import TrainConfig, new_drafter
from specframe.tree import Tree, validate_tree

from conftest import make_tiny_model, new_target, plain_greedy

VOCAB = 96  # the conftest targets' vocabulary
ALPHABET = 6  # draft tokens come from a tiny alphabet so that sources overlap often


# ---------------------------------------------------------------------- in-process source drafters
BOXES: dict[int, object] = {}  # slot -> the Draft that drafter "box<slot>" proposes next


def _box(slot: int):
    class Box(Drafter):
        name = f"box{slot}"
        max_depth = 8

        def propose(self, context_ids, max_depth):
            return BOXES[slot]

    return Box


class BoxPlugin:
    @hookimpl
    def register_drafters(self, register):
        for slot in range(3):
            register(f"box{slot}", _box(slot))


@pytest.fixture(scope="module")
def box_registry():
    return Registry(make_plugin_set(allow=set(), extra=[BoxPlugin()]))


class CurveCost(CostModel):
    name = "curve"

    def __init__(self, fn):
        self.fn = fn

    def predict(self, n, context):
        return float(self.fn(n))


# ---------------------------------------------------------------------- 1. merged trees are valid
@st.composite
def trie_source(draw):
    """(tokens, parents, logq) of a random trie with distinct sibling tokens, and its path -> logq map."""
    n = draw(st.integers(1, 12))
    tokens, parents, logq = [0], [-1], [0.0]
    node_path = [()]  # node -> its token path
    taken: set[tuple[int, int]] = set()
    for i in range(1, n + 1):
        parent = draw(st.integers(0, len(tokens) - 1))
        tok = draw(st.integers(0, ALPHABET - 1))
        p = draw(st.floats(0.01, 1.0))
        if (parent, tok) in taken:
            continue
        taken.add((parent, tok))
        tokens.append(tok), parents.append(parent), logq.append(math.log(p))
        node_path.append(node_path[parent] + (tok,))
    paths = {node_path[i]: logq[i] for i in range(1, len(tokens))}
    return ("trie", (tokens, parents, logq), paths)


@st.composite
def marginal_source(draw):
    depth, k = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    rows_tok, rows_p = [], []
    for _ in range(depth):
        perm = draw(st.permutations(list(range(ALPHABET))))
        rows_tok.append(perm[:k])
        rows_p.append(draw(st.lists(st.floats(0.01, 1.0), min_size=k, max_size=k)))
    logq32 = torch.tensor(np.log(np.array(rows_p))).float()
    return ("marginal", (rows_tok, logq32), depth)


def _make_draft(spec, source: int = 0):
    kind, data, _ = spec
    if kind == "trie":
        return TrieDraft(*data, source=source)
    rows_tok, logq32 = data
    return MarginalDraft(torch.tensor(rows_tok), logq32, source=source)


def _proposes(spec, path: tuple[int, ...]) -> float | None:
    """The source's log-prob for the last token of ``path`` if it proposes that whole path, else None."""
    kind, data, extra = spec
    if kind == "trie":
        return extra.get(path)
    rows_tok, logq32 = data
    if len(path) > extra:
        return None
    for d, tok in enumerate(path):
        if tok not in rows_tok[d]:
            return None
    d = len(path) - 1
    return float(logq32[d, rows_tok[d].index(path[-1])])


def _all_paths(spec, max_depth: int) -> set[tuple[int, ...]]:
    kind, data, extra = spec
    if kind == "trie":
        return {p for p in extra if len(p) <= max_depth}
    rows_tok = data[0]
    out, layer = set(), [()]
    for d in range(min(extra, max_depth)):
        layer = [p + (t,) for p in layer for t in rows_tok[d]]
        out.update(layer)
    return out


def _token_paths(tree: Tree) -> list[tuple[int, ...]]:
    toks, parents = tree.tokens.tolist(), tree.parents.tolist()
    out: list[tuple[int, ...]] = [()]
    for i in range(1, tree.size):
        out.append(out[parents[i]] + (toks[i],))
    return out


POLICIES = st.one_of(
    st.builds(lambda b: ("best-first", BestFirst(budget=b)), st.integers(1, 60)),
    st.builds(lambda m, p, slope: ("adaptive", AdaptiveBestFirst(max_nodes=m, patience=p), slope),
              st.integers(1, 60), st.integers(0, 8), st.floats(0.0, 0.5)),
    st.builds(lambda t: ("static-tree", StaticTree(t)), st.lists(st.integers(1, 3), min_size=1, max_size=5)),
    st.just(("chain", Chain())),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sources=st.lists(st.one_of(trie_source(), marginal_source()), min_size=1, max_size=3), policy=POLICIES,
       max_nodes=st.one_of(st.just(500), st.integers(1, 40)), max_depth=st.one_of(st.just(16), st.integers(1, 4)))
def test_merged_trees_are_valid_and_only_hold_proposed_paths(box_registry, sources, policy, max_nodes, max_depth):
    target = new_target("llama")
    for slot, spec in enumerate(sources):
        BOXES[slot] = _make_draft(spec)
    hybrid = HybridDrafter(target=target, registry=box_registry,
                           sources=",".join(f"box{i}" for i in range(len(sources))))
    assert hybrid.feature_layers == ()
    draft = hybrid.propose([1, 2, 3], max_depth)
    assert isinstance(draft, MergedDraft)
    draft.validate(VOCAB)
    cost = CurveCost(lambda n, s=(policy[2] if policy[0] == "adaptive" else 0.0): 1.0 + s * n)
    ctx = ExpansionContext(root_token=3, context_len=10, max_nodes=max_nodes, max_depth=max_depth,
                           surrogate=PathConfidence(), cost_model=cost, draft_seconds=0.0)
    built = policy[1].expand(draft, ctx)
    tree = built.tree
    validate_tree(tree, VOCAB, f"hybrid + {policy[0]}")  # parents first, no duplicate siblings, ...
    assert int(tree.tokens[0]) == 3
    assert tree.size - 1 <= max_nodes
    assert tree.max_depth <= min(max_depth, max(s[2] if s[0] == "marginal" else
                                               max((len(p) for p in s[2]), default=0) for s in sources))
    assert len(built.scores) == tree.size and all(0 <= p <= 1 for p in built.scores)
    logq, src = tree.logq.tolist(), tree.source.tolist()
    for node, path in enumerate(_token_paths(tree)):
        if node == 0:
            continue
        offers = {i: _proposes(spec, path) for i, spec in enumerate(sources)}
        offers = {i: lq for i, lq in offers.items() if lq is not None}
        assert offers, f"path {path} was proposed by no source"
        best = max(offers.values())
        assert logq[node] == pytest.approx(best, rel=1e-6, abs=1e-6)  # the most confident source's log-prob
        assert src[node] in offers and offers[src[node]] >= best - 1e-6  # ... and its id
    # the pool itself: every place lists each token once, the union of what the sources offer there
    offered: dict[tuple[int, ...], set[int]] = {}
    for spec in sources:
        for p in _all_paths(spec, 3):
            offered.setdefault(p[:-1], set()).add(p[-1])
    for path, handle, depth in _walk(draft, max_depth=2):
        kids = draft.children(handle, depth)
        toks = [c.token for c in kids]
        assert len(toks) == len(set(toks))
        assert set(toks) == offered.get(path, set())
        assert [c.logq for c in kids] == sorted((c.logq for c in kids), reverse=True)


def _walk(draft, max_depth):
    stack = [((), draft.ROOT, 0)]
    while stack:
        path, handle, depth = stack.pop()
        yield path, handle, depth
        if depth < max_depth:
            for c in draft.children(handle, depth):
                stack.append((path + (c.token,), c.handle, depth + 1))


@settings(max_examples=40, deadline=None)
@given(sources=st.lists(st.one_of(trie_source(), marginal_source()), min_size=1, max_size=3))
def test_unbounded_best_first_on_merged_draft_is_the_union_of_sources(sources):
    drafts = [_make_draft(spec, source=i) for i, spec in enumerate(sources)]
    merged = MergedDraft(drafts)
    ctx = ExpansionContext(0, 5, 10_000, 64, PathConfidence(), ConstantCost(0.1))
    tree = BestFirst(budget=10_000).expand(merged, ctx).tree
    validate_tree(tree, VOCAB, "merged")
    paths = _token_paths(tree)[1:]
    assert len(paths) == len(set(paths))
    union = set().union(*(_all_paths(spec, 64) for spec in sources))
    assert set(paths) == union


def test_merge_keeps_one_node_per_token_with_the_most_confident_source():
    a = TrieDraft([0, 5, 6, 7], [-1, 0, 0, 1], [0.0, math.log(0.5), math.log(0.2), math.log(0.9)])
    b = MarginalDraft(torch.tensor([[6, 5], [7, 8]]), torch.tensor([[math.log(0.7), math.log(0.1)],
                                                                     [math.log(0.3), math.log(0.6)]]), source=1)
    merged = MergedDraft([a, b])
    root = merged.children(merged.ROOT, 0)
    assert [(c.token, c.source) for c in root] == [(6, 1), (5, 0)]
    assert root[0].logq == pytest.approx(math.log(0.7)) and root[1].logq == pytest.approx(math.log(0.5))
    five = root[1]
    under5 = merged.children(five.handle, 1)
    # trie: 5 -> 7 (0.9); marginal: any depth-1 node -> 8 (0.6), 7 (0.3)
    assert [(c.token, c.source, round(math.exp(c.logq), 3)) for c in under5] == [(7, 0, 0.9), (8, 1, 0.6)]
    six = root[0]  # trie's 6 has no children, the marginal still proposes
    assert [(c.token, c.source) for c in merged.children(six.handle, 1)] == [(8, 1), (7, 1)]
    assert merged.children(under5[0].handle, 2) == []  # both sources end at depth 2
    assert MergedDraft([]).max_depth == 0


def test_hybrid_rejects_bad_source_lists(box_registry):
    from specframe.errors import SpecframeError

    target = new_target("llama")
    for bad in ("", " , ", "hybrid", "ngram,hybrid"):
        with pytest.raises(SpecframeError):
            HybridDrafter(target=target, registry=box_registry, sources=bad)
    with pytest.raises(SpecframeError, match="no-such-drafter"):
        HybridDrafter(target=target, registry=box_registry, sources="ngram,no-such-drafter")


def test_hybrid_of_empty_sources_expands_to_the_root_alone(box_registry):
    BOXES[0], BOXES[1] = EmptyDraft(), EmptyDraft()
    hybrid = HybridDrafter(target=new_target("llama"), registry=box_registry, sources="box0,box1")
    draft = hybrid.propose([1, 2], 4)
    ctx = ExpansionContext(2, 1, 64, 8, PathConfidence(), ConstantCost(0.1))
    for policy in (BestFirst(16), AdaptiveBestFirst(), StaticTree(), Chain()):
        assert policy.expand(draft, ctx).tree.size == 1


def test_hybrid_of_empty_sources_is_empty(box_registry):
    BOXES[0], BOXES[1] = EmptyDraft(), EmptyDraft()
    hybrid = HybridDrafter(target=new_target("llama"), registry=box_registry, sources="box0,box1")
    assert isinstance(hybrid.propose([1, 2], 4), EmptyDraft)


# ---------------------------------------------------------------------- 2. end to end with ngram + dflash
ARCHS = ("llama", "qwen3")
PROMPT = [3, 14, 15, 9, 2, 6, 5, 3, 14, 15, 9, 2, 6]
N_NEW = 24


@pytest.fixture(scope="module", params=ARCHS)
def hybrid_setup(request, tmp_path_factory):
    arch = request.param
    target = new_target(arch)
    assert target.num_layers == 2
    torch.manual_seed(1)
    model = new_drafter(target, TrainConfig(block_size=4, num_layers=1, target_layer_ids=[0, 1], mask_token_id=95))
    with torch.no_grad():  # not just a copy of the target's top layer
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(f"dflash-{arch}")
    model.save(path, dtype=torch.float32)
    ref = plain_greedy(make_tiny_model(arch), PROMPT, N_NEW)
    return arch, path, ref


def _hybrid(arch, path, policy, **params):
    target = new_target(arch)
    gen = SpecGenerator(target, policy, drafter="hybrid",
                        params={"drafter.sources": f"ngram,dflash:{path}", **params})
    assert isinstance(gen.components.drafter, HybridDrafter)
    assert gen.components.drafter.source_names == ["ngram", f"dflash:{path}"]
    return gen


@pytest.mark.parametrize("policy", sorted(Registry().policies))
def test_hybrid_greedy_parity_every_policy(hybrid_setup, policy):
    arch, path, ref = hybrid_setup
    gen = _hybrid(arch, path, policy)
    out = gen.generate(PROMPT, N_NEW)
    assert out.token_ids == ref
    if policy not in ("ar",):
        assert max(r.tree_size for r in out.stats.records) > 1  # the drafts were really used
    again = gen.generate(PROMPT, N_NEW)  # a second request on the same generator (drafter state reset)
    assert again.token_ids == ref


SAMPLING = SamplingParams(temperature=0.9, top_p=0.95)


@torch.inference_mode()
def plain_sample(model, prompt: list[int], n: int, seed: int, params: SamplingParams) -> list[int]:
    """Plain sampling, no cache: one draw per token from the target's own distribution, with the same
    generator discipline as :class:`specframe.components.Sampler` (one ``multinomial`` per token)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    ids = list(prompt)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(torch.multinomial(target_probs(logits, params), 1, generator=gen)))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def sample_reference(hybrid_setup):
    arch = hybrid_setup[0]
    return plain_sample(make_tiny_model(arch), PROMPT, N_NEW, 1234, SAMPLING)


@pytest.mark.parametrize("policy", sorted(Registry().policies))
def test_hybrid_sampling_is_exact_and_seed_reproduces(hybrid_setup, sample_reference, policy):
    """The sample verifier commits one fresh target draw per token, whatever the tree: with a fixed seed the
    output must be exactly plain sampling's with that seed (and so reproduce, even though BASTION's tree
    shapes depend on measured timings)."""
    arch, path, _ = hybrid_setup
    kw = dict(temperature=SAMPLING.temperature, top_p=SAMPLING.top_p, seed=1234)
    first = _hybrid(arch, path, policy).generate(PROMPT, N_NEW, **kw).token_ids
    second = _hybrid(arch, path, policy).generate(PROMPT, N_NEW, **kw).token_ids
    assert first == second
    assert first == sample_reference


@pytest.mark.parametrize("policy", sorted(Registry().policies))
def test_hybrid_top_k_one_sampling_is_greedy(hybrid_setup, policy):
    arch, path, ref = hybrid_setup
    out = _hybrid(arch, path, policy).generate(PROMPT, N_NEW, temperature=0.7, top_k=1, seed=5)
    assert out.token_ids == ref


# ---------------------------------------------------------------------- 3. per-source calibration
RELIABLE, UNRELIABLE = 0.9, 0.1


def _two_source_stream(rng, n_trees, cal, depths=3):
    """Every accepted node has a source-0 child (accepted w.p. 0.9) and a source-1 child (w.p. 0.1),
    mutually exclusive, with q's uniform: acceptance depends on the source, not on q."""
    for _ in range(n_trees):
        tokens, parents, logq, sources = [0], [-1], [0.0], [0]
        path, node = [0], 0
        for _d in range(depths):
            kids = []
            for src in (0, 1):
                tokens.append(1 + src), parents.append(node), logq.append(math.log(rng.uniform(0.001, 1.0)))
                sources.append(src)
                kids.append(len(tokens) - 1)
            node = kids[0] if rng.random() < RELIABLE else kids[1]
            path.append(node)
        tree = Tree.from_lists(tokens, parents, logq, sources)
        cal.observe(tree, path, [1.0] * tree.size)


def test_per_source_calibration_separates_sources_and_steers_expansion():
    rng = np.random.default_rng(0)
    cal = Calibrated()
    _two_source_stream(rng, 3000, cal)
    for depth in (1, 2, 3):
        for centre in cal.centres[cal.centres > 0.03]:  # the finer tail bins see under 3 % of uniform q
            assert cal.rate(0, depth, centre) == pytest.approx(RELIABLE, abs=0.08), (depth, centre)
            assert cal.rate(1, depth, centre) == pytest.approx(UNRELIABLE, abs=0.08), (depth, centre)

    # Source 1 is the *more confident* drafter; path confidence believes it, the calibrated surrogate not.
    depth = 6
    s0 = MarginalDraft(torch.tensor([[10, 11]] * depth), torch.tensor([[0.6, 0.3]] * depth).log(), source=0)
    s1 = MarginalDraft(torch.tensor([[20, 21]] * depth), torch.tensor([[0.95, 0.04]] * depth).log(), source=1)
    merged = MergedDraft([s0, s1])
    cost = CurveCost(lambda n: 1.0 + 0.02 * n)
    share = {}
    for name, sur in (("calibrated", cal), ("path-confidence", PathConfidence())):
        ctx = ExpansionContext(root_token=1, context_len=50, max_nodes=256, max_depth=depth, surrogate=sur,
                               cost_model=cost)
        built = AdaptiveBestFirst(max_nodes=64).expand(merged, ctx)
        validate_tree(built.tree, VOCAB, name)
        src = built.tree.source[1:]
        assert src.numel() >= 4, name
        share[name] = (int(src[0]), float((src == 0).float().mean()))
    assert share["path-confidence"][0] == 1 and share["calibrated"][0] == 0, share  # who goes first
    assert share["calibrated"][1] >= 0.8, share
    assert share["calibrated"][1] >= share["path-confidence"][1] + 0.3, share
