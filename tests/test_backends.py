"""The backend seam: targets come from backends registered through ``register_backends`` (the built-in
``hf`` the same way as a third party's); what a backend cannot do is declared, and the engine and the
components respect it with one clear error or a cap, never a wrong output."""

from __future__ import annotations

import pytest

from specframe import Registry, SpecGenerator, hookimpl, make_plugin_set
from specframe.backends import Capabilities, load_target
from specframe.errors import SpecframeError, UnknownComponentError
from specframe.target import Target

from conftest import TinyTokenizer, make_tiny_model, plain_greedy

PROMPT = [3, 14, 15, 9, 2, 6, 5, 3, 14, 15, 9, 2]


class SmallTarget(Target):
    """A transformers target that declares less: no hidden states, at most 4 tokens per verification."""

    backend = "small"
    capabilities = Capabilities(tree_attention=True, features=False, max_tree_tokens=4)


class SmallBackend:
    @hookimpl
    def register_backends(self, register):
        register("small", lambda spec, *, dtype, device: SmallTarget(make_tiny_model("llama"), TinyTokenizer(),
                                                                     name=f"small:{spec}"))
        register("broken", self.broken)

    @staticmethod
    def broken(spec, *, dtype, device):
        raise RuntimeError("no such runtime here")


@pytest.fixture
def registry():
    return Registry(make_plugin_set(allow=set(), extra=[SmallBackend()]))


def test_builtin_hf_backend_registers_like_a_plugin():
    registry = Registry(make_plugin_set(allow=set()))
    assert registry.names("backend") == ["hf", "llama.cpp"]
    assert {registry.get("backend", name).plugin for name in ("hf", "llama.cpp")} == {"backends"}


def test_a_third_party_backend_loads_targets(registry):
    target = load_target("toy", "small", registry=registry)
    assert isinstance(target, SmallTarget) and target.name == "small:toy" and target.backend == "small"
    assert sorted(registry.names("backend")) == ["broken", "hf", "llama.cpp", "small"]


def test_unknown_and_failing_backends_are_one_clear_error(registry):
    with pytest.raises(UnknownComponentError, match=r"^unknown backend 'vllm'\. Known backends: broken, hf, llama\.cpp, small"):
        load_target(None, "vllm", registry=registry)
    with pytest.raises(SpecframeError, match=r"^backend 'broken' \(plugin 'extra-0'\) failed to load target 'x': "
                                             r"RuntimeError: no such runtime here$"):
        load_target("x", "broken", registry=registry)


def test_a_drafter_that_needs_hidden_states_refuses_a_backend_without_them(registry):
    target = load_target("toy", "small", registry=registry)
    with pytest.raises(SpecframeError, match=r"^the dflash drafter needs the target's hidden states, which backend "
                                             r"'small' does not provide"):
        SpecGenerator(target, "chain", drafter="dflash:/nonexistent", registry=registry)


@pytest.mark.parametrize("policy", ["best-first:16", "bastion", "chain:8"])
def test_the_engine_caps_trees_at_the_backends_limit(registry, policy):
    target = load_target("toy", "small", registry=registry)
    out = SpecGenerator(target, policy, registry=registry).generate(PROMPT, 40)
    assert out.token_ids == plain_greedy(make_tiny_model("llama"), PROMPT, 40)
    assert max(r.tree_size for r in out.stats.records) <= 4
    assert max(r.tree_size for r in out.stats.records) == 4, "the prompt repeats: lookup fills the allowed tree"
