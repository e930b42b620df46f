"""The ``specframe`` command line, driven through click's CliRunner.

Commands that need a model get a tiny random Llama (fp64, CPU) through a monkeypatched
``Target.load``; nothing here loads real weights or touches the network. Every user mistake must end
in exit code 2 and ONE line on stderr that starts with ``error:`` and names the problem.
"""

from __future__ import annotations

import json
import re
import socket
import string

import click
import pytest
import torch
from click.testing import CliRunner

import specframe
from specframe import Registry, SpecGenerator, Target
from specframe.cli import cli

from conftest import TinyTokenizer, pin_hf_backend

VOCAB = 64
CONTEXT = 64  # max_position_embeddings of the tiny model
ALPHABET = string.ascii_letters + string.digits + " ."  # one character per token id
assert len(ALPHABET) == VOCAB
PROMPT = "abc abc abc abc"  # repetitive, so the ngram drafter finds matches
N = 8


@pytest.fixture(scope="module")
def tiny_model():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, eos_token_id=None, bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(config).double().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = None
    return model


@pytest.fixture
def tiny(tiny_model):
    return Target(tiny_model, TinyTokenizer(alphabet=ALPHABET), "tiny")  # one token per character, no EOS


@pytest.fixture
def loads(monkeypatch, tiny):
    """Make ``Target.load`` return the tiny target; the list records each call's arguments."""
    calls = []

    def fake_load(cls, spec=None, dtype="float32", device="cpu"):
        calls.append((spec, dtype, device))
        return tiny

    monkeypatch.setattr(Target, "load", classmethod(fake_load))
    pin_hf_backend(monkeypatch)
    return calls


@pytest.fixture
def no_load(monkeypatch):
    """For mistakes that must be caught before any model is loaded."""

    def fail(cls, *args, **kwargs):
        raise AssertionError("Target.load was called although the input was invalid")

    monkeypatch.setattr(Target, "load", classmethod(fail))
    pin_hf_backend(monkeypatch)


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.delenv("SPECFRAME_PLUGINS", raising=False)
    return CliRunner()


def reference(target: Target, policy: str, prompt: str = PROMPT, n: int = N):
    return SpecGenerator(target, policy).generate(prompt, n)


def assert_one_line_error(result, *needles: str) -> str:
    """Exit code 2, nothing on stdout, exactly one stderr line 'error: ...' containing every needle."""
    detail = f"exit {result.exit_code}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}\nexc: {result.exception!r}"
    assert result.exit_code == 2, detail
    assert isinstance(result.exception, SystemExit), detail
    lines = result.stderr.splitlines()
    assert len(lines) == 1, detail
    assert lines[0].startswith("error: "), detail
    assert "Traceback" not in result.output, detail
    assert result.stdout == "", detail
    for needle in needles:
        assert needle in lines[0], f"{needle!r} missing from {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------- run: success
@pytest.mark.parametrize(
    "policy_args",
    [[], ["-p", "ar"], ["-p", "chain"], ["-p", "static-tree"], ["-p", "best-first"], ["-p", "best-first:4"],
     ["-p", "chain:2"], ["-p", "static-tree", "--set", "topology=2,1"], ["-p", "best-first", "--set", "budget=3"],
     ["-p", "chain", "--drafter", "none"]],
    ids=lambda a: " ".join(a) or "default",
)
def test_run_json_matches_ar(runner, loads, tiny, policy_args):
    result = runner.invoke(cli, ["run", "--json", "--prompt", PROMPT, "-n", str(N), *policy_args])
    assert result.exit_code == 0, (result.stderr, result.exception)
    out = json.loads(result.stdout)
    assert set(out) == {"text", "token_ids", "stats", "components"}
    expected = reference(tiny, "ar")
    assert out["token_ids"] == expected.token_ids
    assert len(out["token_ids"]) == N
    assert out["text"] == expected.text == tiny.decode(expected.token_ids)
    stats = out["stats"]
    assert set(stats) == {"new_tokens", "steps", "tau", "tokens_per_s", "mean_tree_size", "wall_s", "prefill_s",
                          "draft_s", "overhead_s", "verify_s", "drafted_steps", "hidden_draft_s"}
    assert stats["new_tokens"] == N and 1 <= stats["steps"] <= N
    # τ·steps is the number of accepted + bonus tokens (an integer), at least the N committed
    committed = stats["tau"] * stats["steps"]
    assert abs(committed - round(committed)) <= 1e-4 * stats["steps"] and round(committed) >= N, stats
    assert 0 <= stats["drafted_steps"] <= stats["steps"] and stats["mean_tree_size"] >= 1.0
    if "ar" in policy_args or "none" in policy_args:  # nothing drafted: plain decoding, one token per step
        assert (stats["tau"], stats["steps"], stats["mean_tree_size"]) == (1.0, N, 1.0)
    # tokens/s over the decode time (wall − prefill; both rounded to 0.1 ms), and the parts fit in the wall
    decode = stats["wall_s"] - stats["prefill_s"]
    lo, hi = N / (decode + 2e-4), N / max(decode - 2e-4, 1e-9)
    assert lo - 1e-3 <= stats["tokens_per_s"] <= hi + 1e-3, stats
    parts = stats["prefill_s"] + stats["draft_s"] + stats["overhead_s"] + stats["verify_s"]
    assert parts <= stats["wall_s"] + 5e-4, stats
    assert loads == [(None, "float32", "cpu")]
    backend = out["components"]["backend"]  # which runtime ran, and with what
    assert backend["name"] == "hf" and "auto" not in backend, backend
    assert {k: backend["settings"][k] for k in ("model", "dtype", "device")} == {
        "model": tiny.name, "dtype": str(tiny.dtype).replace("torch.", ""), "device": "cpu"}


def test_run_json_every_registered_policy(runner, loads, tiny):
    expected = reference(tiny, "ar").token_ids
    registry = Registry()
    for name in registry.names("policy"):
        result = runner.invoke(cli, ["run", "--json", "--prompt", PROMPT, "-n", str(N), "-p", name])
        drafter = registry.policy(name).drafter
        if drafter.startswith("model"):  # a bundle drafting with a second model: none is known for 'tiny'
            assert result.exit_code == 2 and result.stderr.count("\n") == 1, (name, result.stderr)
            assert f"drafter '{drafter}' needs a draft model for target 'tiny': --drafter {drafter}:SPEC" in result.stderr
            continue
        if drafter == "dflash":  # a bundle made for a trained block drafter: none is shipped for 'tiny'
            assert result.exit_code == 2 and result.stderr.count("\n") == 1, (name, result.stderr)
            assert "no DFlash drafter is known for target 'tiny'" in result.stderr, (name, result.stderr)
            continue
        assert result.exit_code == 0, (name, result.stderr, result.exception)
        assert json.loads(result.stdout)["token_ids"] == expected, name


def test_run_refuses_drawing_children_from_prompt_lookup_in_one_line(runner, loads):
    result = runner.invoke(cli, ["run", "--prompt", PROMPT, "-n", "4", "-p", "chain", "--drafter", "ngram",
                                 "--set", "verifier=multi-draft", "-t", "1"])
    assert_one_line_error(result, "verifier 'multi-draft' draws children from the draft's distribution",
                          "drafter 'ngram'", "'sample' verifier")


def test_run_passes_target_dtype_device_to_load(runner, loads):
    result = runner.invoke(cli, ["run", "--json", "--prompt", PROMPT, "-n", "2", "--target", "some/model",
                                 "--dtype", "float64", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert loads == [("some/model", "float64", "cpu")]


def test_run_streams_text_and_prints_stats_line(runner, loads, tiny):
    result = runner.invoke(cli, ["run", "--prompt", PROMPT, "-n", str(N), "-p", "best-first"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    expected = reference(tiny, "ar")
    assert result.stdout == expected.text + "\n"
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    # auto never falls back silently: the tiny model has no shipped block drafter
    assert lines[0].startswith("specframe: drafter auto -> ngram: 'dflash' is not available (no shipped block "
                               "drafter fits target 'tiny'"), lines[0]
    m = re.fullmatch(r"\[best-first · backend hf · drafter ngram · (\d+) tokens in (\d+\.\d\d) s · (\d+\.\d) tok/s · "
                     r"τ (\d+\.\d\d) · (\d+) steps · mean tree (\d+\.\d) nodes\]", lines[1])
    assert m, lines[1]
    tokens, wall, rate, tau, steps, tree = m.groups()
    # greedy: the same steps as the same policy in-process (only the timings differ)
    same = reference(tiny, "best-first").stats
    assert (int(tokens), tau, int(steps), tree) == (N, f"{same.tau:.2f}", same.steps, f"{same.mean_tree_size:.1f}")
    assert float(rate) >= N / (float(wall) + 0.005) - 0.05  # tokens/s over the decode time, within the wall


def test_run_stream_equals_json_text(runner, loads):
    streamed = runner.invoke(cli, ["run", "--prompt", PROMPT, "-n", str(N), "-p", "chain"])
    as_json = runner.invoke(cli, ["run", "--json", "--prompt", PROMPT, "-n", str(N), "-p", "chain"])
    assert streamed.exit_code == as_json.exit_code == 0
    assert streamed.stdout.rstrip("\n") == json.loads(as_json.stdout)["text"]


def test_run_prompt_file_and_stdin(runner, loads, tiny, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT)
    expected = reference(tiny, "ar").token_ids
    from_file = runner.invoke(cli, ["run", "--json", "--prompt-file", str(path), "-n", str(N)])
    assert from_file.exit_code == 0, from_file.stderr
    assert json.loads(from_file.stdout)["token_ids"] == expected
    from_stdin = runner.invoke(cli, ["run", "--json", "--prompt-file", "-", "-n", str(N)], input=PROMPT)
    assert from_stdin.exit_code == 0, from_stdin.stderr
    assert json.loads(from_stdin.stdout)["token_ids"] == expected


def test_run_sampling_is_reproducible_with_seed(runner, loads):
    args = ["run", "--json", "--prompt", PROMPT, "-n", str(N), "-t", "1.0", "--top-k", "20", "--top-p", "0.9",
            "--seed", "7"]
    first = runner.invoke(cli, args)
    second = runner.invoke(cli, args)
    assert first.exit_code == second.exit_code == 0, (first.stderr, second.stderr)
    ids = json.loads(first.stdout)["token_ids"]
    assert ids == json.loads(second.stdout)["token_ids"]
    assert len(ids) == N and all(0 <= t < VOCAB for t in ids)


def test_run_prompt_exactly_fitting_the_context(runner, loads):
    prompt = "a" * (CONTEXT - N)
    result = runner.invoke(cli, ["run", "--json", "--prompt", prompt, "-n", str(N), "-p", "best-first"])
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == N


# ---------------------------------------------------------------------- run: mistakes before loading
@pytest.mark.parametrize(
    "args, needles",
    [
        (["-p", "nope"], ["unknown policy 'nope'", "ar", "best-first", "chain", "static-tree"]),
        (["-p", "best-frist"], ["unknown policy 'best-frist'", "Did you mean 'best-first'?"]),
        (["-p", "nope:4"], ["unknown policy 'nope'"]),
        (["--drafter", "nope"], ["unknown drafter 'nope'", "ngram", "none"]),
        (["--drafter", "nope:/some/path"], ["unknown drafter 'nope'"]),
        (["-n", "0"], ["--max-new-tokens", "0"]),
        (["-n", "-3"], ["--max-new-tokens", "-3"]),
        (["--temperature", "-1"], ["temperature", "-1"]),
        (["--temperature", "nan"], ["temperature", "nan"]),
        (["--temperature", "inf"], ["temperature", "inf"]),
        (["--top-p", "0"], ["top-p", "(0, 1]"]),
        (["--top-p", "1.5"], ["top-p", "1.5"]),
        (["--top-k", "-1"], ["top-k", "-1"]),
        (["--set", "budget"], ["--set expects key=value", "'budget'"]),
        (["--set", "=3"], ["--set expects key=value", "'=3'"]),
        (["--prompt-file", "/nonexistent/prompt.txt"], ["prompt file", "/nonexistent/prompt.txt"]),
        (["--prompt", "hi", "--prompt-file", "PROMPT_FILE"], ["--prompt", "--prompt-file"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("-") else None,
)
def test_run_rejects_bad_input_before_loading(runner, no_load, tmp_path, args, needles):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("hello")
    args = [str(prompt_file) if a == "PROMPT_FILE" else a for a in args]
    assert_one_line_error(runner.invoke(cli, ["run", "-n", "4", *args] if "-n" not in args else ["run", *args]),
                          *needles)


def test_run_rejects_bad_dtype(runner):
    # the real Target.load: the dtype is checked before anything is loaded
    assert_one_line_error(runner.invoke(cli, ["run", "--dtype", "bogus", "-n", "2"]), "dtype", "bogus")


# ---------------------------------------------------------------------- run: mistakes found after loading
@pytest.mark.parametrize(
    "args, needles",
    [
        (["--set", "bogus=1"], ["bogus", "budget"]),
        (["--set", "expansion.bogus=1"], ["expansion.bogus"]),
        (["--set", "nosuchcomponent.budget=1"], ["nosuchcomponent"]),
        (["--set", "surrogate=nope"], ["unknown surrogate 'nope'", "path-confidence"]),
        (["--set", "cost_model=nope"], ["unknown cost model 'nope'", "constant"]),
        (["-p", "ar:4"], ["policy 'ar'", "shorthand"]),
        (["-p", "ar", "--set", "budget=4"], ["budget"]),
        (["--chat"], ["chat template", "--no-chat"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("-") else None,
)
def test_run_rejects_bad_input_after_loading(runner, loads, args, needles):
    policy = [] if "-p" in args else ["-p", "best-first"]
    assert_one_line_error(runner.invoke(cli, ["run", "--prompt", PROMPT, "-n", "4", *policy, *args]), *needles)


def test_run_rejects_prompt_longer_than_context(runner, loads):
    prompt = "a" * (CONTEXT + 10)
    line = assert_one_line_error(runner.invoke(cli, ["run", "--prompt", prompt, "-n", "4"]),
                                 f"prompt ({CONTEXT + 10} tokens)", f"({CONTEXT} tokens)", "tiny")
    assert "context" in line


def test_run_rejects_prompt_plus_new_tokens_over_context(runner, loads):
    prompt = "a" * (CONTEXT - N + 1)
    assert_one_line_error(runner.invoke(cli, ["run", "--prompt", prompt, "-n", str(N)]),
                          f"max_new_tokens ({N})", f"({CONTEXT} tokens)")


def test_run_default_prompt_and_length_exceed_tiny_context(runner, loads):
    # the defaults (demo prompt, 128 new tokens) do not fit a 64-token model: a clear error, not a crash
    assert_one_line_error(runner.invoke(cli, ["run"]), "exceeds the context", "max_new_tokens (128)")


# ---------------------------------------------------------------------- run: unloadable targets
@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) any attempt to resolve a host or open a connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:  # pragma: no cover
        pass
    return attempts


@pytest.mark.parametrize("path", ["/nonexistent/model", "/nonexistent/deeper/model/dir"])
def test_run_nonexistent_target_path(runner, no_network, path):
    line = assert_one_line_error(runner.invoke(cli, ["run", "--target", path, "-n", "2"]), path)
    assert "target path not found" in line or "could not load target" in line
    assert no_network == []


def test_run_nonexistent_target_path_says_not_found(runner, no_network):
    line = assert_one_line_error(runner.invoke(cli, ["run", "--target", "/nonexistent/model", "-n", "2"]))
    assert any(s in line.lower() for s in ("not found", "does not exist", "no such"))


def test_run_directory_without_model(runner, no_network, tmp_path):
    assert_one_line_error(runner.invoke(cli, ["run", "--target", str(tmp_path), "-n", "2"]),
                          str(tmp_path), "config.json", ".gguf")
    assert no_network == []


def test_run_missing_gguf_file(runner, no_network, tmp_path):
    missing = tmp_path / "model.gguf"
    assert_one_line_error(runner.invoke(cli, ["run", "--target", str(missing), "-n", "2"]), "GGUF", str(missing))
    assert no_network == []


# ---------------------------------------------------------------------- listing commands
BUILTIN_PLUGINS = {"verifiers", "drafters", "surrogates", "cost_models", "expansion", "baselines"}
BUILTIN_HOOKS = {
    "verifiers": "register_verifiers",
    "drafters": "register_drafters",
    "surrogates": "register_surrogates",
    "cost_models": "register_cost_models",
    "expansion": "register_expansion_policies",
    "baselines": "register_policies",
}


def test_plugins_text(runner):
    result = runner.invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for name, hook in BUILTIN_HOOKS.items():
        assert f"{name}  (built-in)" in out
        assert hook in out
    assert "drafter:ngram" in out and "policy:best-first" in out and "verifier:greedy" in out
    assert "problem:" not in out


def test_plugins_json(runner):
    result = runner.invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["problems"] == []
    rows = {row["name"]: row for row in data["plugins"]}
    assert BUILTIN_PLUGINS <= set(rows)
    for name, hook in BUILTIN_HOOKS.items():
        row = rows[name]
        assert row["builtin"] is True
        assert row["distribution"] == "specframe"
        assert hook in row["hooks"]
        assert set(row) == {"name", "distribution", "version", "builtin", "hooks", "provides"}
    assert {"drafter:ngram", "drafter:none"} <= set(rows["drafters"]["provides"])
    assert {"policy:ar", "policy:best-first", "policy:chain", "policy:static-tree"} <= set(rows["baselines"]["provides"])
    assert {"verifier:greedy", "verifier:sample"} <= set(rows["verifiers"]["provides"])
    # every registered component is attributed to exactly one listed plugin
    provided = [p for row in rows.values() for p in row["provides"]]
    assert len(provided) == len(set(provided))
    registry = Registry()
    n_components = sum(len(t) for t in registry.components.values()) + len(registry.policies)
    assert len(provided) == n_components


def test_plugins_json_unaffected_by_empty_allow_list(runner):
    default = json.loads(runner.invoke(cli, ["plugins", "--json"]).stdout)
    none_allowed = json.loads(runner.invoke(cli, ["plugins", "--json"], env={"SPECFRAME_PLUGINS": ""}).stdout)
    builtins = [p for p in default["plugins"] if p["builtin"]]
    assert none_allowed["plugins"] == builtins  # built-ins always load; nothing third-party does


def test_policies_text(runner):
    result = runner.invoke(cli, ["policies"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for name in ("ar", "chain", "static-tree", "best-first"):
        assert f"\n{name}: " in "\n" + out
    assert "best-first:VALUE sets expansion.budget" in out
    assert "defaults: expansion.budget=16" in out
    assert "drafter none" in out and "expansion root-only" in out  # the ar bundle


def test_policies_json(runner):
    result = runner.invoke(cli, ["policies", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    by_name = {row["name"]: row for row in rows}
    assert [row["name"] for row in rows] == sorted(by_name)
    assert set(by_name) == set(Registry().names("policy"))
    assert {"ar", "chain", "static-tree", "best-first"} <= set(by_name)
    ar = by_name["ar"]
    assert (ar["drafter"], ar["expansion"], ar["shorthand"], ar["plugin"]) == ("none", "root-only", None, "baselines")
    bf = by_name["best-first"]
    assert bf["shorthand"] == "expansion.budget" and bf["params"] == {"expansion.budget": 16}
    for row in rows:
        assert {"name", "plugin", "description", "drafter", "surrogate", "cost_model", "expansion", "verifier",
                "params", "shorthand"} <= set(row)
        assert row["description"]


def test_components_lists_every_kind(runner):
    result = runner.invoke(cli, ["components"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for header in ("drafters:", "surrogates:", "cost models:", "expansion policies:", "verifiers:"):
        assert header in out
    assert "ngram(max_ngram=3" in out
    assert "best-first(budget=16)  [expansion]" in out
    assert "target" not in out.split("ngram(")[1].split(")")[0]  # injected parameters are not settable


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert specframe.__version__ in result.stdout


BUILTIN_COMMANDS = ["bench", "components", "plugins", "policies", "profile", "run", "serve", "simulate", "trace",
                    "train-drafter"]


def test_help_lists_commands(runner):
    """`specframe --help` lists exactly the built-in commands (no third-party plugin allowed), in order,
    each with the start of its own help text."""
    result = runner.invoke(cli, ["--help"], env={"SPECFRAME_PLUGINS": ""})
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert out.startswith("Usage: ") and "\nOptions:\n" in out and "\nCommands:\n" in out
    rows = [line.split(None, 1) for line in out.split("\nCommands:\n", 1)[1].splitlines() if line.strip()]
    assert [row[0] for row in rows] == BUILTIN_COMMANDS
    ctx = click.Context(cli)
    for name, summary in rows:
        help_text = " ".join(cli.get_command(ctx, name).help.split())
        assert help_text.startswith(summary.strip().removesuffix("...").rstrip(". ")), (name, summary)
