"""End to end on the real embedded SmolLM2-135M-Instruct (CPU, float32): greedy parity of every
registered policy with plain greedy decoding, and the CLI without any monkeypatching.

Slow (tens of seconds): run with ``-m slow`` or deselect with ``-m "not slow"``.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from click.testing import CliRunner

from specframe import Registry, SpecGenerator, Target

pytestmark = pytest.mark.slow

# A chat prompt whose greedy answer is long (no EOS within N tokens) and repetitive (the ngram drafter
# gets accepted drafts), with no near-tie between the top two logits along the way.
PROMPT = "List the days of the week, one per line, then list them again."
N = 32


@pytest.fixture(scope="module")
def smollm(embedded_model_dir):
    return Target.load(None)


@pytest.fixture(scope="module")
def prompt_ids(smollm):
    ids = smollm.encode(PROMPT)  # chat template: SmolLM2-Instruct has one
    assert smollm.has_chat_template
    assert len(ids) > 20
    return ids


def greedy_reference(target: Target, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Plain greedy decoding with the HF model itself and a transformers DynamicCache (what
    ``generate(do_sample=False)`` does). Stops after an EOS token, included. Also returns the gap between
    the top two logits at every step."""
    from transformers import DynamicCache

    model = target.model
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache()
    x = torch.tensor([ids])
    out, margins = [], []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=x, use_cache=True, **{cache_kw: cache}).logits[0, -1]
            top2 = logits.float().topk(2).values
            margins.append(float(top2[0] - top2[1]))
            token = int(logits.argmax())
            out.append(token)
            if token in target.eos_token_ids:
                break
            x = torch.tensor([[token]])
    return out, margins


@pytest.fixture(scope="module")
def reference(smollm, prompt_ids):
    tokens, margins = greedy_reference(smollm, prompt_ids, N)
    # cross-check the cached reference against a cache-free forward over the whole sequence
    full = smollm.forward_plain(prompt_ids + tokens[:-1])[len(prompt_ids) - 1:].argmax(-1).tolist()
    assert full == tokens
    return tokens, margins


def test_reference_is_a_meaningful_target(smollm, reference):
    tokens, margins = reference
    assert len(tokens) == N, "the prompt should not hit EOS within N tokens"
    assert not set(tokens) & set(smollm.eos_token_ids)
    # far above float32 noise between a tree forward and a one-token forward
    assert min(margins) > 1e-3, min(margins)


def test_every_policy_matches_plain_greedy(smollm, prompt_ids, reference):
    expected, margins = reference
    registry = Registry()
    policies = registry.names("policy")
    assert {"ar", "chain", "static-tree", "best-first"} <= set(policies)
    taus = {}
    for name in policies:
        gen = SpecGenerator(smollm, name, registry=registry)
        out = gen.generate(PROMPT, N)  # text prompt, chat template applied as for the reference
        assert out.prompt_ids == prompt_ids
        if out.token_ids != expected:
            first = next((i for i, (a, b) in enumerate(zip(out.token_ids, expected)) if a != b), None)
            pytest.fail(
                f"policy '{name}' diverged from greedy at new token {first}: "
                f"{smollm.decode(out.token_ids)!r} vs {smollm.decode(expected)!r} "
                f"(top-2 logit gap there: {margins[first] if first is not None else 'n/a'})"
            )
        assert out.text == smollm.decode(expected)
        assert out.stats.new_tokens == N
        assert sum(r.committed for r in out.stats.records) == N
        taus[name] = out.stats.tau
    assert taus["ar"] == 1.0
    # the drafting policies really speculated on this repetitive answer
    assert max(tau for name, tau in taus.items() if name != "ar") > 1.0, taus


def test_generator_is_reusable_and_accepts_token_ids(smollm, prompt_ids, reference):
    expected, _ = reference
    gen = SpecGenerator(smollm, "best-first")
    first = gen.generate(prompt_ids, N).token_ids
    again = gen.generate(prompt_ids, 8).token_ids
    assert first == expected
    assert again == expected[:8]


def test_cli_run_json_on_real_model_in_transformers(reference):
    """The default policy on the embedded target in transformers, nothing monkeypatched: bastion drafts
    with the target's own 4-bit GGUF on llama.cpp (``model``) and says so in one line per choice (without
    llama-cpp-python: the shipped block drafter beside prompt lookup, and no fallback is reported)."""
    import importlib.util

    from specframe.cli import cli

    expected, _ = reference
    result = CliRunner().invoke(cli, ["run", "--backend", "hf", "--json", "-n", "8", "--prompt", PROMPT])
    assert result.exit_code == 0, (result.stderr, result.exception)
    out = json.loads(result.stdout)
    assert set(out) == {"text", "token_ids", "stats", "components"}
    if importlib.util.find_spec("llama_cpp") is not None:
        assert out["components"]["names"]["drafter"] == "model"
        lines = result.stderr.splitlines()
        assert len(lines) == 2 and lines[0].startswith("specframe: drafter auto -> model: the draft is the target's own 4-bit GGUF")
        assert lines[1].startswith("specframe: draft SmolLM2-135M-Instruct (embedded, llama.cpp) on backend auto -> llama.cpp:")
    else:
        assert out["components"]["names"]["drafter"] == "hybrid"  # the shipped block drafter beside prompt lookup
        assert result.stderr == "", "no fallback on the embedded default"
    assert out["token_ids"] == expected[:8]
    assert out["stats"]["new_tokens"] == 8
    assert out["text"].strip()


def test_cli_run_on_the_embedded_default_says_which_backend_and_drafter_auto_chose():
    """No flags at all (what `make run` does): the runtime and the drafter ``auto`` chose are named, each
    with its reason, and the output is that runtime's own plain greedy decoding."""
    from specframe.backends import choose_backend, load_target
    from specframe.cli import cli

    backend, _ = choose_backend(None)
    result = CliRunner().invoke(cli, ["run", "--json", "-n", "8", "--prompt", PROMPT])
    assert result.exit_code == 0, (result.stderr, result.exception)
    out = json.loads(result.stdout)
    lines = result.stderr.splitlines()
    target = load_target(None, backend)
    assert out["token_ids"] == SpecGenerator(target, "ar").generate(target.encode(PROMPT), 8).token_ids
    if backend == "llama.cpp":
        assert lines[0] == ("specframe: backend auto -> llama.cpp: a GGUF file on a CPU: llama.cpp runs it natively, "
                            "several times faster than transformers fp32")
        assert lines[1].startswith("specframe: drafter auto -> ngram: 'hybrid' is not available (backend 'llama.cpp' "
                                   "gives hidden states at a price on every forward")
        assert len(lines) == 2 and out["components"]["names"]["drafter"] == "ngram"
    else:  # llama-cpp-python is not installed: transformers, and the reason is said
        assert lines[0].startswith("specframe: backend auto -> hf: not 'llama.cpp': llama-cpp-python is not installed")
        assert len(lines) == 1 and out["components"]["names"]["drafter"] == "hybrid"