"""Backend conformance: every installed target backend, on a tiny model, keeps the engine's promises.

Parametrised over the installed backends (``hf``: a tiny random fp64 transformers Llama; ``llama.cpp``: a
tiny random Q8_0 GGUF written with the ``gguf`` package, exact mode). The reference is always the
backend's *own* plain decoding: one session, one token per verification.

(a) tree logits == the plain logits of every root-to-node path;
(b) after ``keep(path)`` the cache is that of the plain path: the next verification agrees;
(c) greedy output of every policy, with adversarial drafters, == the backend's plain greedy decoding;
(d) sampling is exactly lossless, by enumeration, on the backend's own tree logits.
"""

from __future__ import annotations

import functools
import importlib.util
import random

import pytest
import torch

from conftest import TinyTokenizer, make_tiny_model
from specframe import Registry, SpecGenerator, Target, TrieDraft, Drafter, EmptyDraft
from specframe.backends import load_target
from specframe.components import SamplingParams
from specframe.errors import SpecframeError
from specframe.plugins.verifiers import SampleVerifier
from specframe.tree import Tree
from test_lossless import lossless_error
from test_parity import AlwaysWrongDrafter, RandomMarginalDrafter, RandomTrieDrafter, random_tree
from tiny_gguf import tiny_gguf

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
BACKENDS = ["hf"] + (["llama.cpp"] if HAVE_LLAMA else [])
PROMPT = [5, 17, 33, 5, 17, 33, 8, 9, 5, 17]
N_NEW = 24
POLICIES = Registry().names("policy")


@functools.lru_cache(maxsize=None)
def _gguf_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="specframe-tiny-gguf-")


def make_backend_target(backend: str, **options):
    if backend == "hf":
        return Target(make_tiny_model("llama"), TinyTokenizer(), "tiny-llama")
    return load_target(str(tiny_gguf(_gguf_dir())), "llama.cpp", options=options)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def target(backend):
    return make_backend_target(backend)


def same(a: torch.Tensor, b: torch.Tensor, backend: str) -> bool:
    """Bit-identical on llama.cpp (exact mode promises that); fp64 rounding on transformers."""
    if backend == "llama.cpp":
        return torch.equal(a, b)
    return torch.allclose(a, b, atol=1e-9, rtol=0)


def plain_logits(target, ids: list[int], prompt_len: int = len(PROMPT)) -> torch.Tensor:
    """The backend's plain logits after ``ids``, as plain decoding computes them: the first
    ``prompt_len - 1`` tokens prefilled, every later token verified alone, one at a time."""
    session = target.start()
    start = min(prompt_len, len(ids)) - 1
    session.prefill(ids[:start])
    for tok in ids[start:-1]:
        session.verify(Tree.from_lists([tok], [-1]))
        session.keep([0], 1)
    return session.verify(Tree.from_lists([ids[-1]], [-1])).logits[0].clone()


def plain_greedy(target, prompt: list[int], n: int) -> list[int]:
    session = target.start()
    session.prefill(prompt[:-1])
    root, out, eos = prompt[-1], [], set(target.eos_token_ids)
    for _ in range(n):
        logits = session.verify(Tree.from_lists([root], [-1])).logits
        session.keep([0], 1)
        root = int(logits[0].argmax())
        out.append(root)
        if root in eos:
            break
    return out


def path_tokens(tree: Tree, i: int) -> list[int]:
    toks, parents, out = tree.tokens.tolist(), tree.parents.tolist(), []
    while i >= 0:
        out.append(toks[i])
        i = parents[i]
    return out[::-1]


# ============================================================================================ (a) tree logits
@pytest.mark.parametrize("seed", range(4))
def test_tree_logits_equal_the_plain_logits_of_every_path(target, backend, seed):
    tree = random_tree(random.Random(seed), PROMPT[-1], max_nodes=20, max_depth=5)
    session = target.start()
    session.prefill(PROMPT[:-1])
    logits = session.verify(tree).logits
    assert logits.shape == (tree.size, target.vocab_size)
    for i in range(tree.size):
        ref = plain_logits(target, PROMPT[:-1] + path_tokens(tree, i))
        assert same(logits[i], ref, backend), (backend, seed, i, float((logits[i] - ref).abs().max()))


def test_the_tree_check_detects_a_wrong_path(target, backend):
    """Negative control: a sibling's row is not the node's row (the comparison can fail)."""
    tree = Tree.from_lists([PROMPT[-1], 3, 4], [-1, 0, 0])
    session = target.start()
    session.prefill(PROMPT[:-1])
    logits = session.verify(tree).logits
    assert not same(logits[1], plain_logits(target, PROMPT[:-1] + [PROMPT[-1], 4]), backend)


def test_tree_features_equal_plain_features(backend):
    target = make_backend_target(backend)
    tree = random_tree(random.Random(7), PROMPT[-1], max_nodes=12, max_depth=4)
    session = target.start((0,))
    session.prefill(PROMPT[:-1])
    feats = session.verify(tree).features
    assert feats.shape == (tree.size, target.hidden_size)
    for i in range(tree.size):
        ids = PROMPT[:-1] + path_tokens(tree, i)
        plain = target.start((0,))
        ref = plain.prefill(ids)[-1]
        assert torch.allclose(feats[i].double(), ref.double(), atol=1e-9 if backend == "hf" else 0, rtol=0), i


# ============================================================================================ (b) keep
@pytest.mark.parametrize("seed", range(6))
def test_the_cache_after_keep_is_the_plain_paths(target, backend, seed):
    rng = random.Random(seed)
    tree = random_tree(rng, PROMPT[-1], max_nodes=16, max_depth=5)
    leaf = rng.randrange(tree.size)
    path, j, parents = [], leaf, tree.parents.tolist()
    while j >= 0:
        path.append(j)
        j = parents[j]
    path = path[::-1]
    session = target.start()
    session.prefill(PROMPT[:-1])
    session.verify(tree)
    session.keep(path, tree.size)
    assert session.past == len(PROMPT) - 1 + len(path)
    kept = [int(tree.tokens[i]) for i in path]
    nxt = random_tree(rng, 11, max_nodes=6, max_depth=3)  # the next step's tree, rooted at a bonus token
    logits = session.verify(nxt).logits
    for i in range(nxt.size):
        ref = plain_logits(target, PROMPT[:-1] + kept + path_tokens(nxt, i))
        assert same(logits[i], ref, backend), (backend, seed, path, i)


def test_rollback_and_truncate_forget_exactly_what_they_say(target, backend):
    session = target.start()
    session.prefill(PROMPT[:-1])
    probe = Tree.from_lists([PROMPT[-1]] * 5, list(range(-1, 4)))
    session.verify(probe)
    session.rollback(5)
    assert session.past == len(PROMPT) - 1
    assert same(session.verify(Tree.from_lists([PROMPT[-1]], [-1])).logits[0], plain_logits(target, PROMPT), backend)
    session.keep([0], 1)
    session.truncate(4)
    assert session.past == 4
    assert same(session.verify(Tree.from_lists([PROMPT[4]], [-1])).logits[0], plain_logits(target, PROMPT[:5]), backend)


# ==================================================================== llama.cpp beyond a 256-token cache
LONG = [random.Random(1).randrange(3, 90) for _ in range(300)]  # the tiny GGUF's context is 512


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "hf"])  # the tiny HF model's context is 64
def test_tree_logits_stay_plain_beyond_a_256_token_cache(backend, seed):
    """Past 256 cached tokens llama.cpp decodes one row with another attention kernel (split KV) than
    several rows; exact mode still gives every node plain decoding's logits, and keeps them after a keep."""
    target = make_backend_target(backend)
    rng = random.Random(seed)
    tree = random_tree(rng, LONG[-1], max_nodes=20, max_depth=5)
    session = target.start()
    session.prefill(LONG[:-1])
    logits = session.verify(tree).logits.clone()
    for i in range(tree.size):
        ref = plain_logits(target, LONG[:-1] + path_tokens(tree, i), len(LONG))
        assert same(logits[i], ref, backend), (seed, i, float((logits[i] - ref).abs().max()))
    leaf = max(range(tree.size), key=lambda i: (int(tree.depths[i]), i))  # a deep node, rarely the first chain
    path, j, parents = [], leaf, tree.parents.tolist()
    while j >= 0:
        path.append(j)
        j = parents[j]
    path = path[::-1]
    session.keep(path, tree.size)
    kept = [int(tree.tokens[i]) for i in path]
    nxt = random_tree(rng, 11, max_nodes=6, max_depth=3)
    logits = session.verify(nxt).logits
    for i in range(nxt.size):
        ref = plain_logits(target, LONG[:-1] + kept + path_tokens(nxt, i), len(LONG))
        assert same(logits[i], ref, backend), (seed, "after keep", i)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "hf"])
def test_fast_mode_is_not_plain_decoding_beyond_a_256_token_cache(backend):
    """Negative control for the test above: the one-batch fast mode does differ there (the comparison
    can fail), which is why it is not the default."""
    target = make_backend_target(backend, mode="fast")
    tree = random_tree(random.Random(0), LONG[-1], max_nodes=20, max_depth=5)
    session = target.start()
    session.prefill(LONG[:-1])
    logits = session.verify(tree).logits.clone()
    assert any(not same(logits[i], plain_logits(target, LONG[:-1] + path_tokens(tree, i), len(LONG)), backend)
               for i in range(tree.size))


# ============================================================================================ (c) greedy parity
class TruthChainDrafter(Drafter):
    """Always right: proposes the true greedy continuation as one chain (the backend's own truth)."""

    name = "truth-chain"

    def __init__(self, truth: list[int], depth: int = 6):
        self.truth, self.depth = truth, depth

    def start(self, prompt_ids, features):
        self.prompt_len = len(prompt_ids)

    def propose(self, context_ids, max_depth):
        pos = len(context_ids) - self.prompt_len
        chain = self.truth[pos : pos + min(self.depth, max_depth)]
        if not chain:
            return EmptyDraft()
        return TrieDraft([context_ids[-1]] + chain, list(range(-1, len(chain))), [0.0] * (len(chain) + 1))


def drafter_for(kind: str, truth: list[int], seed: int):
    return {"random-marginal": lambda: RandomMarginalDrafter(truth, seed),
            "random-trie": lambda: RandomTrieDrafter(truth, seed),
            "always-wrong": lambda: AlwaysWrongDrafter(truth, seed),
            "truth-chain": lambda: TruthChainDrafter(truth),
            "ngram": lambda: "ngram"}[kind]()


@functools.lru_cache(maxsize=None)
def backend_truth(backend: str) -> tuple[int, ...]:
    return tuple(plain_greedy(make_backend_target(backend), PROMPT, N_NEW))


@pytest.mark.parametrize("kind", ["random-marginal", "random-trie", "always-wrong", "truth-chain", "ngram"])
@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_output_equals_the_backends_plain_greedy(backend, policy, kind):
    truth = list(backend_truth(backend))
    assert len(truth) == N_NEW, "the reference must not stop early (pick another prompt)"
    target = make_backend_target(backend)
    out = SpecGenerator(target, policy, drafter=drafter_for(kind, truth, len(policy))).generate(PROMPT, N_NEW)
    assert out.token_ids == truth, (backend, policy, kind)
    if kind == "truth-chain" and policy != "ar":
        assert out.stats.steps < N_NEW, "the true chains were never used"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "hf"])  # hf: test_parity's negative controls
def test_the_keep_check_detects_a_dropped_cell(backend):
    """Negative control for (b): a cache that lost one kept cell no longer matches the plain path."""
    target = make_backend_target(backend)
    tree = Tree.from_lists([PROMPT[-1], 3, 4, 5], [-1, 0, 1, 2])
    session = target.start()
    session.prefill(PROMPT[:-1])
    session.verify(tree)
    session.keep([0, 1, 2], tree.size)
    session.ctx.seq_rm(0, session.past - 2, session.past - 1)  # forget one kept token's cell
    got = session.verify(Tree.from_lists([9], [-1])).logits[0]
    assert not same(got, plain_logits(target, PROMPT[:-1] + [PROMPT[-1], 3, 4, 9]), backend)


# ============================================================================================ (d) sampling
class BackendFn:
    """The enumeration check's target function on a real backend: plain per-prefix logits after PROMPT."""

    def __init__(self, target, params: SamplingParams):
        from specframe.components import target_probs

        self.target, self.vocab, self._probs = target, target.vocab_size, {}
        self._target_probs = target_probs

    def probs(self, prefix: tuple[int, ...], params: SamplingParams) -> list[float]:
        if prefix not in self._probs:
            p = self._target_probs(plain_logits(self.target, PROMPT + list(prefix)), params).double()
            self._probs[prefix] = (p / p.sum()).tolist()
        return self._probs[prefix]

    def tree_logits(self, tree: Tree) -> torch.Tensor:
        session = self.target.start()
        session.prefill(PROMPT[:-1])
        return session.verify(tree).logits.double()


def likely_tree(target, params) -> Tree:
    """Root = the prompt's last token; children = the target's top-2 at the root and at its best child."""
    top = lambda ids, k: plain_logits(target, ids).topk(k).indices.tolist()  # noqa: E731
    a, b = top(PROMPT, 2)
    c, d = top(PROMPT + [a], 2)
    return Tree.from_lists([PROMPT[-1], a, b, c, d], [-1, 0, 0, 1, 1], [0.0, -0.5, -1.0, -0.5, -1.0])


@pytest.mark.parametrize("params", [SamplingParams(1.0, top_k=3), SamplingParams(0.7, top_k=2, top_p=0.9)])
def test_sampling_on_the_backends_tree_logits_is_exactly_lossless(target, params):
    fn = BackendFn(target, params)
    tree = likely_tree(target, params)
    assert lossless_error(SampleVerifier(sampling=params), tree, fn, params) < 1e-6


# ============================================================================================ the embedded GGUF
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
def test_the_embedded_q4_1_gguf_every_policy_and_the_peers_equal_plain_llamacpp():
    """SmolLM2-135M-Instruct straight from its Q4_1 file (no de-quantised copy): every policy, bastion with
    the hybrid drafter asked for by name (hidden states through the eval callback) included, and
    llama-cpp-python's own loops give the backend's plain greedy tokens. ``auto`` leaves the block drafter
    out on this backend and says why. The bundles that draft with a second model (which has no cheaper copy
    here) say so in one line, and draft with the same GGUF in fast mode, ahead, when given it."""
    target = load_target(None, "llama.cpp")
    draft = load_target(None, "llama.cpp", options={"mode": "fast"})
    registry = Registry()
    assert target.backend == "llama.cpp" and target.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    prompts = [target.encode("Write a Python function that returns the n-th Fibonacci number."),
               target.encode("Name three rivers in Europe.")]
    for ids in prompts:
        truth = SpecGenerator(target, "ar").generate(ids, 48).token_ids
        assert len(truth) == 48
        for policy in POLICIES:
            if registry.policy(policy).drafter.startswith("model"):
                with pytest.raises(SpecframeError, match="needs a draft model for target"):
                    SpecGenerator(target, policy)
                gen = SpecGenerator(target, policy, params={"drafter.model": draft})
            else:
                gen = SpecGenerator(target, policy)
            assert gen.generate(ids, 48).token_ids == truth, policy
        hybrid = SpecGenerator(target, "bastion", drafter="hybrid")
        assert hybrid.components.names["drafter"] == "hybrid"
        assert hybrid.generate(ids, 48).token_ids == truth
        auto = SpecGenerator(target, "bastion")
        assert auto.components.names["drafter"] == "ngram"
        assert "gives hidden states at a price on every forward (llama.cpp's eval callback" in auto.auto_notes["drafter"]
        for peer in target.peer_names:
            assert target.peer(peer)(ids, 48) == truth, peer
