"""The llama.cpp backend's own promises beyond the shared conformance suite (tests/test_conformance.py):
how ``auto`` chooses it and its drafter, and one clear line for every bad input (a missing, foreign or
corrupt GGUF file, a dtype or mode it does not have, a batch llama.cpp would abort on)."""

from __future__ import annotations

import json

import importlib.util
import tempfile

import pytest
from click.testing import CliRunner

from specframe import Registry, SpecGenerator
from specframe.backends import Capabilities, choose_backend, load_target
from specframe.cli import cli
from specframe.errors import SpecframeError
from specframe.tree import Tree

from test_cli import assert_one_line_error
from tiny_gguf import tiny_gguf

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
PROMPT = [5, 17, 33, 5, 17, 33, 8, 9, 5, 17]


@pytest.fixture(scope="module")
def gguf_path():
    return tiny_gguf(tempfile.mkdtemp(prefix="specframe-llamacpp-"))


# ------------------------------------------------------------------------------------------- auto
@pytest.mark.parametrize("spec, device, dtype, want", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "cpu", "float32", "hf"),  # hub ids and directories: transformers
    ("./some/model-dir", "cpu", "float32", "hf"),
    ("model.gguf", "cuda", "float32", "hf"),  # measured on CPUs only
    ("model.gguf", "cpu", "bfloat16", "hf"),  # llama.cpp computes in the file's own types
    ("model.gguf", "cpu", "float32", "llama.cpp" if HAVE_LLAMA else "hf"),
    (None, "cpu", "float32", "llama.cpp" if HAVE_LLAMA else "hf"),  # the embedded default
])
def test_auto_runs_gguf_files_on_a_cpu_in_llamacpp_and_says_why(spec, device, dtype, want):
    name, why = choose_backend(spec, device, Registry(), dtype)
    assert name == want
    if want == "llama.cpp":
        assert why.startswith("a GGUF file on a CPU")
    elif spec is not None and (spec.endswith(".gguf")):
        assert why.startswith("not 'llama.cpp': "), why  # a refused claim is named, never silent
    else:
        assert why == ""  # transformers is simply the default for hub ids and directories


@needs_llama
@pytest.mark.parametrize("policy, drafter", [("bastion", "hybrid"), ("chain", "dflash")])
def test_auto_picks_no_block_drafter_where_features_cost_every_forward(policy, drafter):
    """The embedded model has a shipped block drafter, but llama.cpp prices its hidden states (an eval
    callback on every forward): ``auto`` takes prompt lookup and says why; by name the drafter runs."""
    target = load_target(None, "llama.cpp")
    assert not target.capabilities.free_features
    gen = SpecGenerator(target, policy)
    assert gen.components.names["drafter"] == "ngram"
    assert gen.auto_notes["drafter"].startswith(
        f"'{drafter}' is not available (backend 'llama.cpp' gives hidden states at a price on every forward "
        f"(llama.cpp's eval callback: +9-13 % on a one-token forward"), gen.auto_notes
    assert SpecGenerator(target, policy, drafter=drafter).components.names["drafter"] == drafter


# ------------------------------------------------------------------------------------------- bad input
def test_a_missing_gguf_file_is_one_line():
    with pytest.raises(SpecframeError, match=r"^GGUF file not found: /nonexistent/model\.gguf$"):
        load_target("/nonexistent/model.gguf", "llama.cpp")


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(SpecframeError, match=r"is not a GGUF file \(no GGUF magic\); give a \.gguf model file$"):
        load_target(str(bad), "llama.cpp")
    empty_dir = tmp_path / "dir"
    empty_dir.mkdir()
    with pytest.raises(SpecframeError, match=r"holds no \.gguf file; backend 'llama\.cpp' runs GGUF files"):
        load_target(str(empty_dir), "llama.cpp")


@needs_llama
def test_a_corrupt_gguf_file_is_one_line(tmp_path, gguf_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(gguf_path.read_bytes()[:4096])  # the header survives, the tensors do not
    with pytest.raises(SpecframeError, match=r"^llama\.cpp could not load '.*truncated\.gguf' \(corrupt or unsupported GGUF file\)$"):
        load_target(str(bad), "llama.cpp")


@pytest.mark.parametrize("options, message", [
    ({"mode": "turbo"}, r"^unknown llama\.cpp mode 'turbo'; use one of exact, fast$"),
    ({"rows": 64}, r"^rows must be in 1\.\.16 in mode exact, got 64$"),
    ({"beam": 4}, r"^backend 'llama\.cpp' takes no option beam; its options: mode, threads, n_ctx, rows, flash_attn$"),
])
@needs_llama
def test_bad_backend_options_are_one_line(gguf_path, options, message):
    with pytest.raises(SpecframeError, match=message):
        load_target(str(gguf_path), "llama.cpp", options=options)


def test_a_dtype_llamacpp_does_not_have_is_one_line_through_the_cli(gguf_path):
    result = CliRunner().invoke(cli, ["run", "--backend", "llama.cpp", "--target", str(gguf_path), "--dtype",
                                      "bfloat16", "--prompt", "ab", "-n", "2"])
    assert_one_line_error(result, "backend 'llama.cpp' computes in the GGUF file's own types, so --dtype bfloat16 "
                                  "does not apply; drop --dtype, or use --backend hf")


@needs_llama
def test_a_batch_llamacpp_would_abort_on_is_refused_in_python(gguf_path):
    target = load_target(str(gguf_path), "llama.cpp")
    session = target.start()
    session.prefill(PROMPT[:-1])
    wide = Tree.from_lists([PROMPT[-1]] + [3] * 600, [-1] + [0] * 600)
    with pytest.raises(SpecframeError, match=r"^a tree of 601 nodes \(\+0 pending\) exceeds llama\.cpp's batch of 512$"):
        session.verify(wide)
    # the session is still usable afterwards
    assert session.verify(Tree.from_lists([PROMPT[-1]], [-1])).logits.shape == (1, target.vocab_size)


@needs_llama
def test_the_engine_caps_trees_at_llamacpps_sequences(gguf_path):
    """``n_seq_max`` is 256: a 400-node budget is capped, never failed, and the output stays exact."""
    target = load_target(str(gguf_path), "llama.cpp")
    assert target.capabilities.max_tree_tokens == 256
    truth = SpecGenerator(target, "ar").generate(PROMPT, 12).token_ids
    out = SpecGenerator(target, "best-first:400", drafter="ngram").generate(PROMPT, 12)
    assert out.token_ids == truth
    assert max(r.tree_size for r in out.stats.records) <= 256


@needs_llama
def test_run_on_llamacpp_names_the_backend_and_why_auto_left_the_block_drafter_out(gguf_path):
    """Through the CLI, on a tiny GGUF (no block drafter is shipped for it: auto says that instead)."""
    result = CliRunner().invoke(cli, ["run", "--target", str(gguf_path), "--no-chat", "--prompt", "abcabcab", "-n", "6"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert lines[0].startswith("specframe: backend auto -> llama.cpp: a GGUF file on a CPU"), lines
    assert lines[1].startswith("specframe: drafter auto -> ngram: "), lines
    assert lines[2].startswith("[bastion · backend llama.cpp · drafter ngram · 6 tokens in "), lines


@needs_llama
def test_run_json_names_the_backend_and_its_settings(gguf_path):
    result = CliRunner().invoke(cli, ["run", "--json", "--target", str(gguf_path), "--no-chat", "--prompt", "abcab",
                                      "-n", "3", "--backend-option", "mode=fast", "--backend-option", "threads=1",
                                      "--backend-option", "n_ctx=256"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    backend = json.loads(result.stdout)["components"]["backend"]
    assert backend["name"] == "llama.cpp" and backend["auto"].startswith("a GGUF file on a CPU"), backend
    assert backend["settings"] == {"model": f"{gguf_path.stem} (llama.cpp)", "file": str(gguf_path), "mode": "fast",
                                   "threads": 1, "n_ctx": 256, "rows": 512, "flash_attn": True}


@needs_llama
def test_from_pretrained_takes_a_backend(gguf_path):
    gen = SpecGenerator.from_pretrained(str(gguf_path), "chain", backend="llama.cpp", backend_options={"mode": "fast"})
    assert gen.target.backend == "llama.cpp" and gen.target.mode == "fast"
    assert gen.generate(PROMPT, 4).token_ids == SpecGenerator(gen.target, "ar").generate(PROMPT, 4).token_ids
    with pytest.raises(SpecframeError, match=r"^unknown backend 'vllm'\. Known backends: hf, llama\.cpp"):
        SpecGenerator.from_pretrained(str(gguf_path), backend="vllm")
