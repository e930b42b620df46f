"""Exactness of the target adapter and of greedy speculative decoding on tiny random models (fp64).

(a) one tree forward == separate plain forwards of every root-to-node path;
(b) the KV cache after ``keep(path)`` == the cache of the same tokens run plainly, and the next verify agrees;
(c) greedy speculative output == plain greedy decoding, token for token, for every registered policy and
    adversarial drafters (random marginals, random tries, always wrong, always right, built-in ngram),
    on several architectures; EOS and max_new_tokens handled exactly; broken drafters give clear errors.
"""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch

from conftest import SLIDING_ARCHS, TINY_ARCHS, make_tiny_model, new_target, plain_greedy
from specframe import Drafter, EmptyDraft, MarginalDraft, Registry, SpecGenerator, TrieDraft, hookimpl, make_plugin_set
from specframe.errors import InvalidTreeError, PluginError, SpecframeError, UnsupportedModelError
from specframe.tree import Tree

VOCAB = 96
PROMPT = [5, 17, 33, 5, 17, 33, 8, 9, 5, 17]
N_NEW = 24
ARCHS = list(TINY_ARCHS)
POLICIES = Registry().names("policy")


@functools.lru_cache(maxsize=None)
def reference(arch: str, prompt: tuple[int, ...] = tuple(PROMPT), n: int = N_NEW) -> tuple[int, ...]:
    return tuple(plain_greedy(make_tiny_model(arch, VOCAB), list(prompt), n))


def random_tree(rng: random.Random, root: int, vocab: int = VOCAB, max_nodes: int = 12, max_depth: int = 4) -> Tree:
    tokens, parents, depth, used = [root], [-1], [0], [set()]
    for _ in range(rng.randint(0, max_nodes - 1)):
        parent = rng.choice([j for j in range(len(tokens)) if depth[j] < max_depth])
        tok = rng.choice([t for t in range(vocab) if t not in used[parent]])
        used[parent].add(tok)
        used.append(set())
        tokens.append(tok)
        parents.append(parent)
        depth.append(depth[parent] + 1)
    return Tree.from_lists(tokens, parents, [0.0] + [-1.0] * (len(tokens) - 1))


def node_path(tree: Tree, i: int) -> list[int]:
    parents = tree.parents.tolist()
    path = [i]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


# ============================================================================================ (a) tree logits
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_forward_equals_plain_forward_of_every_path(arch):
    target = new_target(arch, VOCAB)
    rng = random.Random(arch)
    for _ in range(3):
        session = target.start()
        session.prefill(PROMPT[:-1])
        tree = random_tree(rng, PROMPT[-1])
        out = session.verify(tree)
        assert out.logits.shape == (tree.size, VOCAB)
        toks = tree.tokens.tolist()
        for i in range(tree.size):
            ids = PROMPT + [toks[j] for j in node_path(tree, i)[1:]]
            plain = target.forward_plain(ids)[-1]
            assert (out.logits[i] - plain).abs().max().item() < 1e-6, (arch, i)
        assert session.past == len(PROMPT) - 1


def test_tree_features_equal_plain_hidden_states(tiny_target, tiny_model):
    layers = (0, 1)
    session = tiny_target.start(feature_layers=layers)
    feats = session.prefill(PROMPT[:-1])
    with torch.inference_mode():
        hs = tiny_model(input_ids=torch.tensor([PROMPT[:-1]]), output_hidden_states=True, use_cache=False).hidden_states
    want = torch.cat([hs[layer + 1][0] for layer in layers], dim=-1)
    assert feats.shape == want.shape and torch.allclose(feats, want, atol=1e-9)
    tree = random_tree(random.Random(7), PROMPT[-1], max_nodes=8)
    out = session.verify(tree)
    toks = tree.tokens.tolist()
    for i in range(tree.size):
        ids = PROMPT + [toks[j] for j in node_path(tree, i)[1:]]
        with torch.inference_mode():
            hs = tiny_model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False).hidden_states
        want = torch.cat([hs[layer + 1][0, -1] for layer in layers], dim=-1)
        assert torch.allclose(out.features[i], want, atol=1e-9), i


def test_tree_logits_check_detects_a_wrong_mask(tiny_target, monkeypatch):
    """Negative control: with a plain causal mask (siblings see each other) the parity check fails."""
    import specframe.plugins.hf as target_mod

    def causal_mask(tree, past, dtype):
        n = tree.size
        visible = torch.ones(n, past + n, dtype=torch.bool).tril(diagonal=past)
        mask = torch.zeros(n, past + n, dtype=dtype)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min)[None, None]

    monkeypatch.setattr(target_mod, "tree_attention_mask", causal_mask)
    session = tiny_target.start()
    session.prefill(PROMPT[:-1])
    tree = Tree.from_lists([PROMPT[-1], 10, 11, 12], [-1, 0, 0, 1])
    out = session.verify(tree)
    plain = tiny_target.forward_plain(PROMPT + [11])[-1]
    assert (out.logits[2] - plain).abs().max().item() > 1e-6


# ============================================================================================ (b) KV after keep
def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, read through transformers' own cache API (``layers`` in 5.x,
    ``key_cache`` / ``value_cache`` before), independently of specframe's adapter."""
    if getattr(cache, "layers", None) is not None:
        return [(layer.keys, layer.values) for layer in cache.layers if getattr(layer, "keys", None) is not None]
    return list(zip(cache.key_cache, cache.value_cache))


def _assert_same_cache(a, b, atol=1e-9):
    ka, kb = _cache_tensors(a.cache), _cache_tensors(b.cache)
    assert len(ka) == len(kb) > 0
    for layer, ((k1, v1), (k2, v2)) in enumerate(zip(ka, kb)):
        assert k1.shape == k2.shape and v1.shape == v2.shape, (layer, k1.shape, k2.shape)
        assert (k1 - k2).abs().max().item() < atol, f"keys differ in layer {layer}"
        assert (v1 - v2).abs().max().item() < atol, f"values differ in layer {layer}"


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_after_keep_equals_plain_cache(arch):
    target = new_target(arch, VOCAB)
    rng = random.Random(f"keep-{arch}")
    session = target.start()
    session.prefill(PROMPT[:-1])
    committed = list(PROMPT)  # the last one is the root: not in the cache yet
    moved = 0
    for step in range(6):
        tree = random_tree(rng, committed[-1], max_nodes=10)
        session.verify(tree)
        if step == 0:
            node = 0  # nothing accepted
        else:
            # odd steps: any node; even steps: one whose rows must move (path is not 0, 1, ..., m-1)
            scattered = [i for i in range(tree.size) if node_path(tree, i) != list(range(len(node_path(tree, i))))]
            node = rng.choice(scattered) if step % 2 == 0 and scattered else rng.randrange(tree.size)
        path = node_path(tree, node)
        moved += path != list(range(len(path)))
        session.keep(path, tree.size)
        committed += tree.tokens[path[1:]].tolist()
        committed.append(rng.randrange(VOCAB))  # the bonus: the next root
        assert session.past == len(committed) - 1
        plain = target.start()
        plain.prefill(committed[:-1])
        _assert_same_cache(session, plain)
        # the next verify on top of the compacted cache is exact as well
        probe = random_tree(rng, committed[-1], max_nodes=6)
        logits = session.verify(probe).logits
        assert torch.allclose(logits, plain.verify(probe).logits, atol=1e-6, rtol=0)
        toks = probe.tokens.tolist()
        for i in range(probe.size):
            ids = committed + [toks[j] for j in node_path(probe, i)[1:]]
            assert (logits[i] - target.forward_plain(ids)[-1]).abs().max().item() < 1e-6
        session.keep([0], probe.size)  # accept nothing from the probe: only its root enters the cache
        committed.append(rng.randrange(VOCAB))
    assert moved, "the random paths never exercised the row-moving branch of keep()"


def test_keep_check_detects_a_stale_cache(tiny_target):
    """Negative control: cropping without moving the accepted rows leaves a different cache."""
    tree = Tree.from_lists([PROMPT[-1], 10, 11, 12], [-1, 0, 0, 2])
    plain = tiny_target.start()
    plain.prefill(PROMPT + [11, 12])
    good = tiny_target.start()
    good.prefill(PROMPT[:-1])
    good.verify(tree)
    good.keep([0, 2, 3], tree.size)
    _assert_same_cache(good, plain)
    stale = tiny_target.start()
    stale.prefill(PROMPT[:-1])
    stale.verify(tree)
    stale.cache.crop(-1)  # keeps the rows of nodes 0, 1, 2 instead of 0, 2, 3
    with pytest.raises(AssertionError):
        _assert_same_cache(stale, plain)


# ============================================================================================ (c) drafters
class _TruthDrafter(Drafter):
    """Base for test drafters that know the true greedy continuation (to aim hits and misses)."""

    def __init__(self, truth: list[int], seed: int = 0):
        self.truth, self.seed = list(truth), seed

    def start(self, prompt_ids, features):
        self.prompt_len = len(prompt_ids)
        self.rng = random.Random(self.seed)

    def true_next(self, context_ids, k: int) -> list[int]:
        pos = len(context_ids) - self.prompt_len
        return self.truth[pos : pos + k]


class RandomMarginalDrafter(_TruthDrafter):
    """Random (D, K) marginals; each row holds the true token at a random rank half of the time."""

    name = "random-marginal"

    def propose(self, context_ids, max_depth):
        if max_depth == 0 or self.rng.random() < 0.1:
            return EmptyDraft()
        rng = self.rng
        depth, k = rng.randint(1, max_depth), rng.randint(1, 4)
        true = self.true_next(context_ids, depth)
        rows = []
        for d in range(depth):
            row = rng.sample(range(VOCAB), k)
            if d < len(true) and rng.random() < 0.5 and true[d] not in row:
                row[rng.randrange(k)] = true[d]
            rows.append(row)
        logq = torch.tensor([[math.log(rng.uniform(0.01, 1.0)) for _ in range(k)] for _ in range(depth)])
        return MarginalDraft(torch.tensor(rows), logq)


class RandomTrieDrafter(_TruthDrafter):
    """Random tries that contain a random-length prefix of the true continuation, at random ranks."""

    name = "random-trie"

    def propose(self, context_ids, max_depth):
        rng = self.rng
        if max_depth == 0:
            return EmptyDraft()
        tokens, parents, logq, depth = [context_ids[-1]], [-1], [0.0], [0]
        kids: list[dict[int, int]] = [{}]

        def add(parent: int, tok: int) -> int:
            if tok in kids[parent]:
                return kids[parent][tok]
            tokens.append(tok)
            parents.append(parent)
            logq.append(math.log(rng.uniform(0.01, 1.0)))
            depth.append(depth[parent] + 1)
            kids.append({})
            kids[parent][tok] = len(tokens) - 1
            return len(tokens) - 1

        true = self.true_next(context_ids, max_depth)
        hit = rng.randint(0, len(true))
        node = 0
        for _ in range(rng.randint(0, 10)):  # random distractors first (lower indices)
            parent = rng.choice([j for j in range(len(tokens)) if depth[j] < max_depth])
            add(parent, rng.randrange(VOCAB))
        for tok in true[:hit]:
            node = add(node, tok)
            for _ in range(rng.randint(0, 2)):  # siblings of the true node
                if depth[parents[node]] + 1 <= max_depth:
                    add(parents[node], rng.randrange(VOCAB))
        return TrieDraft(tokens, parents, logq)


class AlwaysWrongDrafter(_TruthDrafter):
    """Never proposes the target's next token at depth 1 (so nothing can ever be accepted)."""

    name = "always-wrong"

    def propose(self, context_ids, max_depth):
        if max_depth == 0:
            return EmptyDraft()
        rng = self.rng
        true = self.true_next(context_ids, 1)
        depth, k = rng.randint(1, max_depth), rng.randint(1, 4)
        banned = set(true)
        rows = [rng.sample([t for t in range(VOCAB) if t not in banned], k)]
        rows += [rng.sample(range(VOCAB), k) for _ in range(depth - 1)]
        logq = torch.zeros(depth, k)  # maximally confident
        return MarginalDraft(torch.tensor(rows), logq)


class OracleDrafter(Drafter):
    """Always right: runs the target itself (plain forwards) to propose the true greedy chain."""

    name = "oracle"

    def __init__(self, target, depth: int = 5):
        self.target, self.depth = target, depth
        self.memo: dict[tuple[int, ...], int] = {}  # context -> argmax (saves forwards, not correctness)

    def next_token(self, ids: list[int]) -> int:
        key = tuple(ids)
        if key not in self.memo:
            self.memo[key] = int(self.target.forward_plain(ids)[-1].argmax())
        return self.memo[key]

    def propose(self, context_ids, max_depth):
        ids, chain = list(context_ids), []
        for _ in range(min(self.depth, max_depth)):
            chain.append(self.next_token(ids))
            ids.append(chain[-1])
        if not chain:
            return EmptyDraft()
        return TrieDraft([context_ids[-1]] + chain, list(range(-1, len(chain))), [0.0] * (len(chain) + 1))


DRAFTERS = ["random-marginal", "random-trie", "always-wrong", "oracle", "ngram"]


def make_drafter(kind: str, target, truth, seed: int = 0):
    if kind == "random-marginal":
        return RandomMarginalDrafter(truth, seed)
    if kind == "random-trie":
        return RandomTrieDrafter(truth, seed)
    if kind == "always-wrong":
        return AlwaysWrongDrafter(truth, seed)
    if kind == "oracle":
        return OracleDrafter(target)
    return kind  # a registered drafter name


def check_records(gen_out, kind: str, policy: str):
    records = gen_out.stats.records
    assert sum(r.committed for r in records) == len(gen_out.token_ids)
    assert gen_out.stats.new_tokens == len(gen_out.token_ids)
    for r in records:
        assert 0 <= r.accepted <= r.tree_size - 1
    if kind == "always-wrong":
        assert all(r.accepted == 0 for r in records)
    if kind == "oracle":
        # the truth is always accepted whole
        assert all(r.accepted == r.tree_size - 1 for r in records)
        if policy != "ar":
            assert gen_out.stats.steps < len(gen_out.token_ids), "the oracle's chains were never used"


@pytest.mark.parametrize("kind", DRAFTERS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_equals_plain_greedy(arch, policy, kind):
    target = new_target(arch, VOCAB)
    truth = list(reference(arch))
    gen = SpecGenerator(target, policy, drafter=make_drafter(kind, target, truth, seed=len(policy)))
    out = gen.generate(PROMPT, N_NEW)
    assert out.token_ids == truth, (arch, policy, kind)
    assert out.prompt_ids == PROMPT
    check_records(out, kind, policy)
    # a second request on the same generator is just as exact (state is per request)
    again = gen.generate(PROMPT[2:], 9)
    assert again.token_ids == list(reference(arch, tuple(PROMPT[2:]), 9))


@pytest.mark.parametrize(
    "policy, params",
    [
        ("best-first:1", {}),
        ("best-first:3", {}),
        ("best-first:64", {}),
        ("chain:1", {}),
        ("chain:2", {}),
        ("static-tree", {"expansion.topology": [4, 3, 2, 1]}),
        ("static-tree:3", {}),
    ],
)
@pytest.mark.parametrize("kind", ["random-marginal", "random-trie", "oracle"])
def test_greedy_parity_with_policy_variants(tiny_target, policy, params, kind):
    truth = list(reference("llama"))
    gen = SpecGenerator(tiny_target, policy, drafter=make_drafter(kind, tiny_target, truth, seed=3), params=params)
    out = gen.generate(PROMPT, N_NEW)
    assert out.token_ids == truth
    check_records(out, kind, policy)


@pytest.mark.parametrize("max_tree_nodes", [1, 2, 5])
@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_parity_with_small_node_bound(tiny_target, policy, max_tree_nodes):
    truth = list(reference("llama"))
    gen = SpecGenerator(tiny_target, policy, drafter=RandomTrieDrafter(truth, 11), max_tree_nodes=max_tree_nodes)
    out = gen.generate(PROMPT, N_NEW)
    assert out.token_ids == truth
    assert all(r.tree_size - 1 <= max_tree_nodes for r in out.stats.records)


def test_the_parity_check_detects_a_wrong_verifier(tiny_target, monkeypatch):
    """Negative control: a verifier that accepts every child's first token breaks parity, and the
    same comparison used above notices."""
    from specframe.components import Verdict
    from specframe.plugins import verifiers

    def accept_first_child(self, tree, logits, rng):
        kids = tree.children()
        node, path = 0, [0]
        while kids[node]:
            node = kids[node][0]
            path.append(node)
        return Verdict(path, int(logits[node].argmax()))

    monkeypatch.setattr(verifiers.GreedyVerifier, "verify", accept_first_child)
    truth = list(reference("llama"))
    out = SpecGenerator(tiny_target, "chain", drafter=AlwaysWrongDrafter(truth)).generate(PROMPT, N_NEW)
    assert out.token_ids != truth


def test_drafter_deeper_than_asked_is_still_exact(tiny_target):
    """A drafter that ignores max_depth: every built-in expansion must clamp the tree."""

    class Deep(Drafter):
        name = "too-deep"

        def propose(self, context_ids, max_depth):
            return MarginalDraft(torch.arange(30).reshape(10, 3) % VOCAB, torch.zeros(10, 3))

    for policy in POLICIES:
        for n in (1, 2, 4):
            out = SpecGenerator(tiny_target, policy, drafter=Deep()).generate(PROMPT, n)
            assert out.token_ids == list(reference("llama"))[:n]


# ============================================================================================ plugin components
class CountingPlugin:
    """An in-process plugin that adds one component of each kind through its ``register_*`` hook: thin
    subclasses of the built-ins that count their calls, so a test sees they were used, not just listed."""

    def __init__(self):
        self.calls = {"drafter": 0, "surrogate": 0, "cost model": 0, "expansion policy": 0, "verifier": 0}
        from specframe.plugins.cost_models import ConstantCost
        from specframe.plugins.drafters import NgramDrafter
        from specframe.plugins.expansion import BestFirst
        from specframe.plugins.surrogates import PathConfidence
        from specframe.plugins.verifiers import GreedyVerifier

        calls = self.calls

        class Ngram(NgramDrafter):
            def propose(self, *args, **kwargs):
                calls["drafter"] += 1
                return super().propose(*args, **kwargs)

        class Surrogate(PathConfidence):
            def score(self, *args, **kwargs):
                calls["surrogate"] += 1
                return super().score(*args, **kwargs)

        class Cost(ConstantCost):
            def predict(self, n, context):
                calls["cost model"] += 1
                return super().predict(n, context)

        class Expansion(BestFirst):
            def expand(self, draft, ctx):
                calls["expansion policy"] += 1
                return super().expand(draft, ctx)

        class Verifier(GreedyVerifier):
            def verify(self, *args, **kwargs):
                calls["verifier"] += 1
                return super().verify(*args, **kwargs)

        self.classes = {"drafter": Ngram, "surrogate": Surrogate, "cost model": Cost, "expansion policy": Expansion,
                        "verifier": Verifier}

    @hookimpl
    def register_drafters(self, register):
        register("counted-ngram", self.classes["drafter"])

    @hookimpl
    def register_surrogates(self, register):
        register("counted-confidence", self.classes["surrogate"])

    @hookimpl
    def register_cost_models(self, register):
        register("counted-constant", self.classes["cost model"])

    @hookimpl
    def register_expansion_policies(self, register):
        register("counted-best-first", self.classes["expansion policy"])

    @hookimpl
    def register_verifiers(self, register):
        register("counted-greedy", self.classes["verifier"])


def test_components_from_every_register_hook_are_built_used_and_exact(tiny_target, monkeypatch):
    monkeypatch.delenv("SPECFRAME_PLUGINS", raising=False)
    plugin = CountingPlugin()
    plugin_set = make_plugin_set(extra=[plugin])
    assert plugin_set.problems == []
    assert sorted(plugin_set.plugins[-1].hooks) == ["register_cost_models", "register_drafters",
                                                    "register_expansion_policies", "register_surrogates",
                                                    "register_verifiers"]
    names = {"drafter": "counted-ngram", "surrogate": "counted-confidence", "cost_model": "counted-constant",
             "expansion": "counted-best-first", "verifier": "counted-greedy"}
    gen = SpecGenerator(tiny_target, "best-first", registry=Registry(plugin_set), drafter="counted-ngram",
                        params={k: v for k, v in names.items() if k != "drafter"})
    assert {k: gen.components.names[k] for k in names} == names
    kinds = {"drafter": "drafter", "surrogate": "surrogate", "cost_model": "cost model", "expansion": "expansion policy"}
    for comp, kind in kinds.items():  # (the verifier is not kept on Components: its calls are counted below)
        assert type(getattr(gen.components, comp)) is plugin.classes[kind], comp
    out = gen.generate(PROMPT, N_NEW)
    assert out.token_ids == list(reference("llama"))
    steps = out.stats.steps
    assert plugin.calls["verifier"] == plugin.calls["expansion policy"] == steps, (plugin.calls, steps)
    assert plugin.calls["drafter"] >= 1 and plugin.calls["surrogate"] >= 1 and plugin.calls["cost model"] >= 1, plugin.calls


# ============================================================================================ sliding windows


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", sorted(SLIDING_ARCHS))
def test_sliding_window_models_inside_the_window(request, arch, policy):
    """10 prompt + 10 new tokens stay inside a window of 24: decoding must work and be exact."""
    target = new_target(arch, VOCAB)
    assert target.sliding_window == 24
    truth = plain_greedy(make_tiny_model(arch, VOCAB), PROMPT, 10)
    for kind in ("random-trie", "oracle"):
        gen = SpecGenerator(target, policy, drafter=make_drafter(kind, target, truth, seed=1))
        assert gen.generate(PROMPT, 10).token_ids == truth, kind


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", sorted(SLIDING_ARCHS))
def test_sliding_window_models_past_the_window_fail_loudly_before_any_token(arch, policy):
    """10 prompt + 30 new tokens do not fit a window of 24, and specframe cannot compact a sliding cache
    (it holds window − 1 = 23 tokens; the last committed token is never cached, so 24 − 10 = 14 new tokens
    fit): every policy refuses up front in one line naming the window, before streaming anything; 14 new
    tokens run, all equal to plain greedy — never a wrong token, never a silent stop."""
    target = new_target(arch, VOCAB)
    truth = plain_greedy(make_tiny_model(arch, VOCAB), PROMPT, 30)
    gen = SpecGenerator(target, policy, drafter=RandomTrieDrafter(truth, 4))
    streamed: list[int] = []
    with pytest.raises(SpecframeError, match=r"^prompt \(10 tokens\) \+ max_new_tokens \(30\) exceeds what specframe can "
                                             r"run of a model with sliding-window layers \(window 24\) of target .* \(24 tokens\)"):
        gen.generate(PROMPT, 30, stream=streamed.extend)
    assert streamed == []
    fits = 24 - len(PROMPT)
    assert gen.generate(PROMPT, fits, stream=streamed.extend).token_ids == truth[:fits] == streamed


# ============================================================================================ EOS / length
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["oracle", "random-trie", "ngram"])
def test_output_stops_right_after_the_first_eos(make_target, policy, kind):
    truth = list(reference("llama"))
    for eos_pos in (0, 3, 11):
        eos = truth[eos_pos]
        first = truth.index(eos)
        target = make_target("llama", VOCAB, eos=eos)  # EOS from the tokenizer stub
        assert target.eos_token_ids == (eos,)
        expected = plain_greedy(make_tiny_model("llama", VOCAB), PROMPT, N_NEW, eos={eos})
        assert expected == truth[: first + 1]
        out = SpecGenerator(target, policy, drafter=make_drafter(kind, target, truth, seed=eos_pos)).generate(PROMPT, N_NEW)
        assert out.token_ids == expected, (policy, kind, eos_pos)
        assert out.stats.new_tokens == len(expected)
        assert sum(r.committed for r in out.stats.records) == len(expected)


def test_eos_set_on_the_target_and_several_eos_ids(tiny_target):
    truth = list(reference("llama"))
    tiny_target.eos_token_ids = (truth[7], truth[4])
    expected = plain_greedy(make_tiny_model("llama", VOCAB), PROMPT, N_NEW, eos={truth[7], truth[4]})
    assert len(expected) <= 8
    for policy in POLICIES:
        out = SpecGenerator(tiny_target, policy, drafter=OracleDrafter(tiny_target)).generate(PROMPT, N_NEW)
        assert out.token_ids == expected, policy


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["oracle", "random-marginal", "ngram"])
def test_max_new_tokens_is_respected_exactly(tiny_target, policy, kind):
    truth = list(reference("llama"))
    for n in (1, 2, 3, 5, 8, 13):
        out = SpecGenerator(tiny_target, policy, drafter=make_drafter(kind, tiny_target, truth, seed=n)).generate(PROMPT, n)
        assert out.token_ids == truth[:n], (policy, kind, n)
        assert out.stats.new_tokens == n
        # no step verified more than it could commit (max depth = remaining - 1)
        assert all(r.committed == r.accepted + 1 for r in out.stats.records)


# ============================================================================================ sampling
@pytest.mark.parametrize("policy", POLICIES)
def test_sampling_with_top_k_1_equals_greedy(tiny_target, policy):
    """top_k = 1 makes the target one-hot: the sample verifier must reproduce greedy exactly."""
    truth = list(reference("llama"))
    for kind in ("random-trie", "oracle"):
        gen = SpecGenerator(tiny_target, policy, drafter=make_drafter(kind, tiny_target, truth, seed=5))
        out = gen.generate(PROMPT, N_NEW, temperature=0.8, top_k=1, seed=123)
        assert out.token_ids == truth, (policy, kind)


@pytest.mark.parametrize("policy", POLICIES)
def test_sampling_is_reproducible_with_a_seed(tiny_target, policy):
    truth = list(reference("llama"))
    gen = SpecGenerator(tiny_target, policy, drafter=RandomTrieDrafter(truth, 2))
    a = gen.generate(PROMPT, 16, temperature=1.0, seed=7)
    b = gen.generate(PROMPT, 16, temperature=1.0, seed=7)
    assert a.token_ids == b.token_ids
    assert len(a.token_ids) == 16 and all(0 <= t < VOCAB for t in a.token_ids)


def test_generate_leaves_the_global_torch_rng_alone(tiny_target):
    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    SpecGenerator(tiny_target, "ar").generate(PROMPT, 3)
    assert torch.equal(torch.rand(4), want)


def test_generate_with_a_seed_leaves_the_global_torch_rng_alone(tiny_target):
    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    SpecGenerator(tiny_target, "ar").generate(PROMPT, 3, temperature=1.0, seed=5)
    assert torch.equal(torch.rand(4), want)


# ============================================================================================ prompt edges
@pytest.mark.parametrize("policy", POLICIES)
def test_one_token_prompt_and_a_completely_full_context(tiny_target, tiny_model, policy):
    truth = plain_greedy(tiny_model, [7], 12)
    out = SpecGenerator(tiny_target, policy, drafter=RandomTrieDrafter(truth, 9)).generate([7], 12)
    assert out.token_ids == truth
    rng = random.Random(0)
    long_prompt = [rng.randrange(VOCAB) for _ in range(tiny_target.max_context - 8)]
    truth = plain_greedy(tiny_model, long_prompt, 8)  # ends exactly at max_position_embeddings
    for kind in ("oracle", "random-trie"):
        gen = SpecGenerator(tiny_target, policy, drafter=make_drafter(kind, tiny_target, truth, seed=2))
        assert gen.generate(long_prompt, 8).token_ids == truth, kind
    with pytest.raises(SpecframeError):
        SpecGenerator(tiny_target, policy).generate(long_prompt, 9)


# ============================================================================================ broken drafters
class ScriptedDrafter(Drafter):
    """Returns whatever ``make(context_ids, max_depth)`` builds."""

    def __init__(self, name: str, make):
        self.name, self.make = name, make

    def propose(self, context_ids, max_depth):
        return self.make(context_ids, max_depth)


def _nan_marginal(ctx, d):
    return MarginalDraft(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.full((2, 3), float("nan")))


def _inf_trie(ctx, d):
    return TrieDraft([ctx[-1], 1, 2], [-1, 0, 1], [0.0, float("inf"), -0.1])


def _nan_trie_partial(ctx, d):
    return TrieDraft([ctx[-1], 1, 2, 3], [-1, 0, 0, 1], [0.0, -0.1, float("nan"), -0.2])


def _out_of_vocab(ctx, d):
    return TrieDraft([ctx[-1], VOCAB + 3], [-1, 0], [0.0, -0.1])


def _negative_token(ctx, d):
    return MarginalDraft(torch.tensor([[-4]]), torch.tensor([[-0.1]]))


def _duplicate_siblings(ctx, d):
    return MarginalDraft(torch.tensor([[7, 7, 8]]), torch.tensor([[-0.1, -0.2, -0.3]]))


def _duplicate_trie_siblings(ctx, d):
    return TrieDraft([ctx[-1], 7, 7], [-1, 0, 0], [0.0, -0.1, -0.2])


BROKEN = {
    "nan-marginal": _nan_marginal,
    "inf-trie": _inf_trie,
    "nan-trie-partial": _nan_trie_partial,
    "out-of-vocab": _out_of_vocab,
    "negative-token": _negative_token,
    "dup-marginal": _duplicate_siblings,
    "dup-trie": _duplicate_trie_siblings,
}
DRAFTING_POLICIES = [p for p in POLICIES if p != "ar"]  # `ar` never looks at the draft


# NaN draft probabilities are only caught once a NaN node reaches the expanded tree. Policies that never
# put it there swallow the broken drafter silently (adaptive-best-first drops NaN-scored nodes; chain only
# looks at the first-sorted child), or crash blamed on the expansion policy (Calibrated._bin(nan)).


@pytest.mark.parametrize("policy", DRAFTING_POLICIES)
@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_invalid_drafts_raise_an_error_naming_the_drafter(request, tiny_target, policy, broken):
    name = f"evil-{broken}"
    gen = SpecGenerator(
        tiny_target, policy, drafter=ScriptedDrafter(name, BROKEN[broken]),
        params={"expansion.budget": 64} if policy.startswith("best-first") else None,
    )
    if policy.startswith("chain") and broken.startswith("dup"):
        # a chain takes one child per node: the duplicate sibling never reaches the tree, so the run is a
        # plain lossless one
        assert gen.generate(PROMPT, 8).token_ids == plain_greedy(tiny_target.model, PROMPT, 8)
        return
    if policy == "specbranch" and broken.startswith("dup"):
        # one child per node where the draft is sure: the duplicate reaches the tree only where it branches
        try:
            assert gen.generate(PROMPT, 8).token_ids == plain_greedy(tiny_target.model, PROMPT, 8)
        except (InvalidTreeError, PluginError) as err:
            assert name in str(err)
        return
    with pytest.raises(SpecframeError) as info:
        gen.generate(PROMPT, 8)
    assert isinstance(info.value, (InvalidTreeError, PluginError))
    assert name in str(info.value)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_drafter_that_raises_is_named(tiny_target, policy):
    def boom(ctx, d):
        raise RuntimeError("kaboom")

    with pytest.raises(PluginError) as info:
        SpecGenerator(tiny_target, policy, drafter=ScriptedDrafter("exploding", boom)).generate(PROMPT, 4)
    assert "exploding" in str(info.value) and "kaboom" in str(info.value)


@pytest.mark.parametrize("policy", DRAFTING_POLICIES)
def test_a_drafter_returning_garbage_is_named(tiny_target, policy):
    gen = SpecGenerator(tiny_target, policy, drafter=ScriptedDrafter("garbage-drafter", lambda c, d: None))
    with pytest.raises(SpecframeError) as info:
        gen.generate(PROMPT, 4)
    assert "garbage-drafter" in str(info.value)
