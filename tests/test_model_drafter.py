"""The drafter ``model``: a second model drafts trees, on every installed backend, across tokenizers.

Tiny random models stand in for real ones: a *good* draft (the target's own weights), a *random* one (other
weights) and an *adversarial* one (the target's logits negated: its top guess is the target's least likely
token). Whatever the draft, the output must be the target's own; the draft's KV cache must equal a fresh
prefill of the committed context after every kind of step; its trees must be valid.
"""

from __future__ import annotations

import importlib.util
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TinyTokenizer, make_tiny_model, new_target, plain_greedy
from specframe import Registry, SpecGenerator, SpecframeError
from specframe.components import ExpansionContext, SamplingParams
from specframe.plugins.expansion import BestFirst
from specframe.plugins.model_drafter import CallCosts, ModelDrafter, same_vocabulary
from specframe.plugins.surrogates import PathConfidence
from specframe.plugins.verifiers import SampleVerifier
from specframe.resolve import choose_drafter
from specframe.target import ForwardOut
from specframe.tree import Tree, validate_tree
from test_lossless import TargetFn, lossless_error

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
PROMPT = [5, 9, 13, 2, 7, 5, 9]
POLICIES = ("chain:5", "static-tree", "best-first:8", "bastion", "best-first:3")


class Negated:
    """An adversarial draft: a target whose sessions return the negated logits of the wrapped one (with
    ``factor`` > 0 instead: the same guesses, made more or less confident)."""

    def __init__(self, inner, factor: float = -1.0):
        self.inner, self.factor = inner, factor

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def start(self, feature_layers=()):
        return _NegatedSession(self.inner.start(feature_layers), self.factor)


class _NegatedSession:
    def __init__(self, inner, factor: float):
        self.inner, self.factor = inner, factor

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def grow(self, tree, start):
        return ForwardOut(self.factor * self.inner.grow(tree, start).logits, None)


def hf_pair(kind: str):
    target = new_target("llama", seed=0)
    draft = {"good": lambda: new_target("llama", seed=0), "random": lambda: new_target("qwen2", seed=3),
             "adversarial": lambda: Negated(new_target("llama", seed=0))}[kind]()
    return target, draft


def llama_pair(kind: str):
    from specframe.plugins.llamacpp import LlamaCppTarget
    from tiny_gguf import tiny_gguf

    d = tempfile.gettempdir()
    target = LlamaCppTarget(tiny_gguf(d, 0), mode="exact")
    seed = 1 if kind == "random" else 0
    draft = LlamaCppTarget(tiny_gguf(d, seed), mode="fast")
    return target, Negated(draft) if kind == "adversarial" else draft


def reference(target, prompt, n):
    """Plain greedy decoding of the target on its own backend (the ar policy)."""
    return SpecGenerator(target, "ar").generate(prompt, n).token_ids


BACKENDS = [pytest.param(hf_pair, id="hf"), pytest.param(llama_pair, id="llama.cpp", marks=needs_llama)]


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("pair", BACKENDS)
@pytest.mark.parametrize("kind", ["good", "random", "adversarial"])
def test_greedy_output_is_the_targets_own_for_every_policy(pair, kind):
    target, draft = pair(kind)
    want = reference(target, PROMPT, 24)
    if pair is hf_pair:
        assert want == plain_greedy(target.model, PROMPT, 24)
    for policy in POLICIES:
        drafter = ModelDrafter(target, model=draft)
        gen = SpecGenerator(target, policy, drafter=drafter)
        out = gen.generate(PROMPT, 24)
        assert out.token_ids == want, (policy, kind)
        if kind == "good" and policy.startswith("chain"):
            assert out.stats.tau > 3  # the target's own weights: nearly every drafted token is accepted
        # a second request after the first: the draft's cache is cut back to the shared prefix
        assert gen.generate(PROMPT[:3] + [11], 12).token_ids == reference(target, PROMPT[:3] + [11], 12)


def test_a_generation_that_stops_at_eos_or_early_leaves_the_draft_in_step():
    target, draft = new_target("llama", seed=0, eos=None), new_target("llama", seed=0)
    free = reference(target, PROMPT, 30)
    target.eos_token_ids = (free[9],)  # EOS in the middle of what the draft would accept
    drafter = ModelDrafter(target, model=draft)
    gen = SpecGenerator(target, "chain:6", drafter=drafter)
    out = gen.generate(PROMPT, 30)
    assert out.token_ids == free[: free.index(free[9]) + 1]
    stopped = gen.generate(PROMPT, 30, stream=lambda toks: True)  # the caller stops after the first step
    assert stopped.token_ids == free[: len(stopped.token_ids)]
    assert_cache_is_a_fresh_prefill(drafter, PROMPT + stopped.token_ids)


# ------------------------------------------------------------------------------------------- the draft's cache
def assert_cache_is_a_fresh_prefill(drafter: ModelDrafter, context: list[int], atol: float = 1e-9):
    """After syncing to ``context``, the draft session's next-token logits equal a fresh session's."""
    drafter._sync(context[:-1])
    assert drafter.cached == context[:-1]
    root = Tree.from_lists([context[-1]], [-1])
    live = drafter.session.grow(root, 0).logits
    drafter.session.rollback(1)
    fresh = drafter.draft.start(())
    fresh.prefill(context[:-1])
    want = fresh.verify(root).logits
    assert torch.allclose(live, want, atol=atol), (live - want).abs().max()


@pytest.mark.parametrize("pair", BACKENDS)
def test_the_draft_cache_equals_a_fresh_prefill_after_keep_rollback_and_a_new_request(pair):
    target, draft = pair("good")
    drafter = ModelDrafter(target, model=draft)
    gen = SpecGenerator(target, "best-first:6", drafter=drafter)
    atol = 1e-9 if pair is hf_pair else 1e-3
    out = gen.generate(PROMPT, 20)
    assert_cache_is_a_fresh_prefill(drafter, PROMPT + out.token_ids, atol)
    other = [3, 4, 5]
    out2 = gen.generate(other, 9)  # a new request: the old context leaves (truncate), the new one is read
    assert_cache_is_a_fresh_prefill(drafter, other + out2.token_ids, atol)
    random_target, random_draft = pair("random")
    drafter = ModelDrafter(random_target, model=random_draft)  # most of each tree is rejected (rollback)
    out3 = SpecGenerator(random_target, "static-tree", drafter=drafter).generate(PROMPT, 12)
    assert_cache_is_a_fresh_prefill(drafter, PROMPT + out3.token_ids, atol)


def test_growing_depth_by_depth_equals_one_verification_of_the_whole_tree(tiny_target):
    """hf: each depth's rows, verified on top of the rows before, equal one forward of the whole tree."""
    tree = Tree.from_lists([7, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 1, 3])
    a = tiny_target.start()
    a.prefill(PROMPT)
    rows = [a.grow(Tree.from_lists(tree.token_list[:k], tree.parent_list[:k]), s).logits
            for s, k in ((0, 1), (1, 3), (3, 5), (5, 6))]
    b = tiny_target.start()
    b.prefill(PROMPT)
    assert torch.allclose(torch.cat(rows), b.verify(tree).logits, atol=1e-10)


@needs_llama
def test_llamacpp_grows_trees_only_in_fast_mode():
    target, draft = llama_pair("good")
    with pytest.raises(SpecframeError, match="mode 'fast'"):
        target.start().grow(Tree.from_lists([1], [-1]), 0)


# ------------------------------------------------------------------------------------------- trees
@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 3)), min_size=1, max_size=8), st.integers(1, 5))
def test_draft_trees_are_valid_whatever_the_expansion_order(requests, top_k):
    """Any order of expansion requests gives a valid draft: children sorted by log-prob, one new node per
    child, rows in the session exactly the expanded nodes, and the built tree passes validation."""
    target, draft = new_target("llama", seed=0), new_target("qwen2", seed=3)
    drafter = ModelDrafter(target, model=draft, top_k=top_k, max_depth=4)
    d = drafter.propose(PROMPT, 4)
    for pick, width in requests:
        known = [h for h in range(len(d.token)) if not d.expanded(h)]
        if not known:
            break
        batch = [known[(pick + i) % len(known)] for i in range(width)]
        depth = d.depth[batch[0]]
        d.expand([h for h in batch if d.depth[h] == depth], depth)
    for h, kids in enumerate(d.kids):
        if kids is not None:
            assert [c.logq for c in kids] == sorted((c.logq for c in kids), reverse=True)
            assert all(d.parent[c.handle] == h and d.depth[c.handle] == d.depth[h] + 1 for c in kids)
            assert len(kids) == top_k
    assert sorted(d.rows) == sorted(h for h, k in enumerate(d.kids) if k is not None)
    assert all(d.depth[h] < 4 for h in d.rows)
    ctx = ExpansionContext(PROMPT[-1], len(PROMPT) - 1, 30, 4, PathConfidence(), None)
    built = BestFirst(12).expand(d, ctx)
    validate_tree(built.tree, target.vocab_size, "test")


def test_call_costs_fit_a_line_through_measured_calls():
    costs = CallCosts()
    for k, s in ((1, 0.010), (2, 0.016), (4, 0.028), (1, 0.010)):
        costs.observe(k, s)
    assert costs.predict(3) == pytest.approx(0.022, abs=1e-6)
    assert costs.predict(0) == 0.0


def test_bastion_drafts_deeper_when_the_draft_call_is_cheap_and_stops_when_it_is_dear(tiny_target):
    """The draft call's price enters the stopping rule: same draft, same target costs; a free draft call
    gives a deeper tree than one that costs as much as a verification."""
    from specframe.clock import ManualClock
    from specframe.components import CostModel

    class Linear(CostModel):
        def predict(self, n, context):
            return 0.010 + 0.001 * n

    sizes = {}
    for price in (0.0, 0.05):
        drafter = ModelDrafter(tiny_target, model=Negated(new_target("llama", seed=0), factor=30.0))  # confident
        drafter.costs.predict = lambda k, price=price: price * k
        gen = SpecGenerator(tiny_target, "bastion", drafter=drafter, clock=ManualClock(), cost_model=Linear(),
                            surrogate="path-confidence", params={"expansion.gate": False})
        out = gen.generate(PROMPT, 16)
        sizes[price] = out.stats.mean_tree_size
    assert sizes[0.0] > sizes[0.05] >= 1.0, sizes


# ------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trees_from_a_draft_model_are_verified_exactly_at_temperature(seed):
    """Exact sampling by enumeration: on trees a tiny draft model (vocabulary 5) builds, the sampling
    verifier's output distribution equals the target's to 1e-9."""
    vocab = 5
    model = make_tiny_model("llama", vocab=vocab, seed=seed)
    target = new_target("llama", vocab=vocab, seed=seed + 10)
    from specframe import Target

    drafter = ModelDrafter(target, model=Target(model, TinyTokenizer(), "draft"), top_k=2, max_depth=2)
    d = drafter.propose([1, 2, 3], 2)
    built = BestFirst(4).expand(d, ExpansionContext(3, 2, 4, 2, PathConfidence(), None))
    params = SamplingParams(temperature=0.9, top_p=0.95)
    assert lossless_error(SampleVerifier(params), built.tree, TargetFn(seed, vocab), params) < 1e-9


# ------------------------------------------------------------------------------------------- tokenizers
ALPHA = "abcdefghijklmnopqrstuvwxyz .,"


def char_target(alphabet: str, arch: str, seed: int):
    from specframe import Target

    return Target(make_tiny_model(arch, vocab=len(alphabet), seed=seed), TinyTokenizer(alphabet=alphabet), f"tiny-{arch}")


class PairTokenizer(TinyTokenizer):
    """Greedy longest match over single characters and a few two-character pieces (ids after the letters)."""

    def __init__(self, alphabet: str, pairs: tuple[str, ...]):
        super().__init__(alphabet=alphabet)
        self.pieces = list(alphabet) + list(pairs)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[int(i)] for i in ids)

    def __call__(self, text, add_special_tokens=True):
        out, i = [], 0
        while i < len(text):
            two = text[i:i + 2]
            if len(two) == 2 and two in self.pieces:
                out.append(self.pieces.index(two))
                i += 2
            else:
                out.append(self.pieces.index(text[i]) if text[i] in self.pieces else self.pieces.index(" "))
                i += 1
        return {"input_ids": out}


@pytest.mark.parametrize("draft_kind", ["reordered", "pairs"])
@pytest.mark.parametrize("policy", ["chain:4", "best-first:6", "bastion"])
def test_a_draft_with_another_tokenizer_drafts_through_text_and_changes_nothing(draft_kind, policy):
    from specframe import Target

    target = char_target(ALPHA, "llama", 0)
    if draft_kind == "reordered":
        draft = char_target(ALPHA[::-1], "qwen2", 1)  # the same characters, other ids
    else:
        tok = PairTokenizer(ALPHA, ("th", "he", "e ", "an"))
        draft = Target(make_tiny_model("qwen2", vocab=len(tok.pieces), seed=2), tok, "tiny-pairs")
    assert not same_vocabulary(target, draft)
    prompt = target.encode("the cat sat on the mat, then", chat=False)
    want = reference(target, prompt, 20)
    drafter = ModelDrafter(target, model=draft)
    assert drafter.bridge is not None and "other tokenizer" in drafter.describe()
    out = SpecGenerator(target, policy, drafter=drafter).generate(prompt, 20)
    assert out.token_ids == want


def test_through_text_a_draft_that_continues_the_target_is_accepted():
    """The reordered-alphabet draft with the target's own weights permuted to its ids drafts exactly what the
    target would say: through text, every drafted token is accepted."""
    from specframe import Target

    target = char_target(ALPHA, "llama", 0)
    rev = ALPHA[::-1]
    model = make_tiny_model("llama", vocab=len(ALPHA), seed=0)
    import copy

    twin = copy.deepcopy(model)
    perm = torch.tensor([ALPHA.index(c) for c in rev])  # draft id i is target id perm[i]
    with torch.no_grad():
        twin.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight[perm])
        twin.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight[perm])
    draft = Target(twin, TinyTokenizer(alphabet=rev), "twin")
    prompt = target.encode("the cat sat", chat=False)
    out = SpecGenerator(target, "chain:4", drafter=ModelDrafter(target, model=draft)).generate(prompt, 16)
    assert out.token_ids == reference(target, prompt, 16)
    assert out.stats.tau > 3


# ------------------------------------------------------------------------------------------- bad input
def test_a_draft_that_cannot_map_to_the_target_is_one_line():
    from specframe import Target

    target = Target(make_tiny_model("llama", vocab=96), None, "no-tokenizer")
    draft = char_target(ALPHA, "qwen2", 1)
    with pytest.raises(SpecframeError, match="different vocabularies .* no tokenizer to translate through"):
        ModelDrafter(target, model=draft)


def test_a_draft_with_a_shorter_context_is_one_line(tiny_target):
    draft = new_target("llama", seed=0)
    draft.max_context = 64
    with pytest.raises(SpecframeError, match="context of 64 tokens, shorter than the target's 256"):
        ModelDrafter(tiny_target, model=draft)


def test_an_unknown_or_missing_draft_backend_is_one_line(tiny_target, monkeypatch):
    with pytest.raises(SpecframeError, match="unknown draft backend 'nope'; installed backends: .*hf"):
        ModelDrafter(tiny_target, path="x.gguf", backend="nope")
    import specframe.plugins.llamacpp as llamacpp

    def missing():
        raise SpecframeError("backend 'llama.cpp' needs llama-cpp-python: pip install llama-cpp-python diskcache")

    monkeypatch.setattr(llamacpp, "_llama", missing)
    monkeypatch.setattr(llamacpp._Runtime, "_instance", None)
    from tiny_gguf import tiny_gguf

    with pytest.raises(SpecframeError, match="needs llama-cpp-python"):
        ModelDrafter(tiny_target, path=str(tiny_gguf(tempfile.gettempdir(), 0)), backend="llama.cpp")


def test_model_without_a_spec_needs_a_known_target_and_says_so(tiny_target):
    with pytest.raises(SpecframeError, match=r"needs a draft model for target 'tiny-llama': --drafter model:SPEC"):
        ModelDrafter(tiny_target)


def test_auto_drafts_the_embedded_target_on_hf_with_its_gguf_on_llamacpp_and_says_why(tiny_target):
    tiny_target.model_alias = "smollm2-135m"  # what the hf backend sets on the embedded model
    name, why = choose_drafter(Registry(), tiny_target, composite=True)
    if HAVE_LLAMA:
        assert name == "model" and "4-bit GGUF" in why and "llama.cpp" in why
    else:
        assert name != "model" and "llama-cpp-python" in why
    tiny_target.model_alias = None
    assert choose_drafter(Registry(), tiny_target, composite=True)[0] != "model"


@needs_llama
def test_run_drafts_with_a_gguf_model_on_llamacpp_from_the_cli(tmp_path):
    """`specframe run --drafter model:FILE --set drafter.backend=llama.cpp` with a tiny GGUF pair, JSON out."""
    import json

    from click.testing import CliRunner

    from specframe.cli import cli
    from tiny_gguf import tiny_gguf

    target, draft = tiny_gguf(str(tmp_path), 0), tiny_gguf(str(tmp_path), 1)
    args = ["run", "-m", str(target), "--backend", "llama.cpp", "--drafter", f"model:{draft}", "--policy", "chain:4",
            "--no-chat", "--prompt", "abc abc abc", "-n", "12", "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["components"]["names"]["drafter"] == f"model:{draft}"
    assert "on llama.cpp (same tokenizer" in out["components"]["details"]["drafter"]
    plain = CliRunner().invoke(cli, args[:5] + ["--policy", "ar"] + args[9:])
    assert json.loads(plain.stdout)["token_ids"] == out["token_ids"]
