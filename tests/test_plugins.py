"""Plugin discovery and the component registry, through REAL entry points.

Each test writes fake installed distributions (``NAME-VERSION.dist-info`` with ``METADATA`` and an
``entry_points.txt`` in group ``specframe``, plus the plugin module) into a temporary directory and
puts it on ``sys.path``; :func:`specframe.make_plugin_set` must then find them exactly as it finds
pip-installed plugins.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import specframe
from specframe import Registry, RunStats, SpecGenerator, StepRecord, Target, hookimpl, make_plugin_set
from specframe.resolve import resolve_components
from specframe.errors import PluginError, SpecframeError
from specframe.registry import DEFAULT_PLUGINS, ENTRY_POINT_GROUP, PluginSet

from conftest import TinyTokenizer, pin_hf_backend

VOCAB = 64
PROMPT_IDS = [5, 9, 13, 5, 9, 13, 5, 9, 13, 5, 9]  # repetitive: the ngram drafter finds matches
N = 10


# ---------------------------------------------------------------------- tiny target
def char_tokenizer() -> TinyTokenizer:
    """One character per id: "@" is 0, "A" is 1, ... (so ``chr(ord("@") + t)`` spells token t)."""
    return TinyTokenizer(alphabet="".join(chr(ord("@") + i) for i in range(VOCAB)), unknown="@")


@pytest.fixture(scope="module")
def tiny_model():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=None, bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(config).double().eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture
def tiny(tiny_model):
    return Target(tiny_model, char_tokenizer(), "tiny")


@pytest.fixture(scope="module")
def ar_ids(tiny_model):
    target = Target(tiny_model, char_tokenizer(), "tiny")
    return SpecGenerator(target, "ar", registry=Registry(make_plugin_set(allow=set()))).generate(PROMPT_IDS, N).token_ids


# ---------------------------------------------------------------------- fake installed distributions
class Site:
    """A directory on sys.path holding fake installed distributions."""

    def __init__(self, root: Path):
        self.root = root
        self.modules: list[str] = []
        self.tag = uuid.uuid4().hex[:8]

    def module_name(self, base: str) -> str:
        return f"sf_{base}_{self.tag}"

    def add(self, dist: str, modules: dict[str, str], entry_points: dict[str, str], version: str = "0.1") -> None:
        """``modules``: base name -> source; ``entry_points``: name -> ``base`` or ``base:attr``."""
        info = self.root / f"{dist}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = [f"[{ENTRY_POINT_GROUP}]"]
        for ep_name, target in entry_points.items():
            base, colon, attr = target.partition(":")
            lines.append(f"{ep_name} = {self.module_name(base)}{colon}{attr}")
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for base, source in modules.items():
            name = self.module_name(base)
            (self.root / f"{name}.py").write_text(textwrap.dedent(source))
            self.modules.append(name)
        importlib.invalidate_caches()

    def module(self, base: str):
        return importlib.import_module(self.module_name(base))


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site-packages"
    root.mkdir()
    monkeypatch.delenv("SPECFRAME_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(root))
    s = Site(root)
    yield s
    for name in s.modules:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


COST_PLUGIN = """
    from specframe import hookimpl
    from specframe.components import CostModel


    class MyCost(CostModel):
        name = "mycost"

        def __init__(self, per_token: float = 0.001):
            self.per_token = per_token
            self.observed = 0

        def predict(self, n, context):
            return 0.01 + self.per_token * n

        def observe(self, n, context, seconds):
            self.observed += 1


    @hookimpl
    def register_cost_models(register):
        register("mycost", MyCost)
"""

ORACLE_DRAFTER_PLUGIN = """
    from specframe import hookimpl
    from specframe.components import Drafter, EmptyDraft, TrieDraft


    class OracleDrafter(Drafter):
        '''Proposes the target's own greedy continuation (so every draft token is accepted).'''

        name = "oracle"

        def __init__(self, target, depth: int = 3):
            self.target, self.depth, self.proposed = target, depth, 0

        def propose(self, context_ids, max_depth):
            d = min(self.depth, max_depth)
            if d <= 0:
                return EmptyDraft()
            seq = list(context_ids)
            for _ in range(d):
                seq.append(int(self.target.forward_plain(seq)[-1].argmax()))
            self.proposed += d
            return TrieDraft([context_ids[-1]] + seq[len(context_ids):], list(range(-1, d)), [0.0] + [-0.1] * d)


    @hookimpl
    def register_drafters(register):
        register("oracle", OracleDrafter)
"""


def install_mycost(site: Site) -> None:
    site.add("myplug", {"mycost": COST_PLUGIN}, {"mycostplug": "mycost"})


def plugin_named(plugin_set: PluginSet, name: str):
    return next((p for p in plugin_set.plugins if p.name == name), None)


def assert_builtins_work(registry: Registry) -> None:
    assert {"ar", "best-first", "chain", "static-tree"} <= set(registry.names("policy"))
    assert {"ngram", "none"} <= set(registry.names("drafter"))
    assert "constant" in registry.names("cost_model")
    assert {"greedy", "sample"} <= set(registry.names("verifier"))


# ---------------------------------------------------------------------- discovery
def test_entry_point_plugin_is_discovered(site):
    install_mycost(site)
    plugin_set = make_plugin_set()
    assert plugin_set.problems == []
    info = plugin_named(plugin_set, "mycostplug")
    assert info is not None, [p.name for p in plugin_set.plugins]
    assert (info.distribution, info.version, info.builtin, info.hooks) == ("myplug", "0.1", False, ["register_cost_models"])
    registry = Registry(plugin_set)
    assert "mycost" in registry.names("cost_model")
    assert registry.components["cost_model"]["mycost"].plugin == "mycostplug"
    assert list(registry.parameters("cost_model", "mycost")) == ["per_token"]
    assert_builtins_work(registry)


def test_builtins_are_marked_builtin(site):
    install_mycost(site)
    plugin_set = make_plugin_set()
    builtins = {p.name for p in plugin_set.plugins if p.builtin}
    assert {"verifiers", "drafters", "surrogates", "cost_models", "expansion", "baselines"} <= builtins
    assert all(p.distribution == "specframe" for p in plugin_set.plugins if p.builtin)
    assert "mycostplug" not in builtins


def test_third_party_cost_model_usable_by_name(site, tiny, ar_ids):
    install_mycost(site)
    MyCost = site.module("mycost").MyCost
    gen = SpecGenerator(tiny, "best-first", params={"cost_model": "mycost"})  # default Registry(): discovery
    assert isinstance(gen.components.cost_model, MyCost)
    assert gen.components.names["cost_model"] == "mycost"
    out = gen.generate(PROMPT_IDS, N)
    assert out.token_ids == ar_ids
    assert gen.components.cost_model.observed == out.stats.steps
    for record in out.stats.records:
        assert record.predicted_verify_s == pytest.approx(0.01 + 0.001 * record.tree_size)


@pytest.mark.parametrize(
    "overrides",
    [{"cost_model": "mycost", "per_token": 0.5}, {"cost_model": "mycost", "cost_model.per_token": 0.5}],
)
def test_third_party_cost_model_parameters_are_routed(site, tiny, overrides):
    install_mycost(site)
    components = resolve_components(Registry(), tiny, "best-first", overrides=overrides)
    assert components.cost_model.per_token == 0.5
    assert components.expansion.budget == 16  # the policy default still reaches best-first


def test_a_component_kind_has_one_spelling(site, tiny):
    """``cost_model`` everywhere (policy field, --set prefix, registry kind); another spelling is one clear error."""
    install_mycost(site)
    registry = Registry()
    assert "mycost" in registry.names("cost_model")
    with pytest.raises(SpecframeError, match="unknown component 'cost-model' in --set cost-model.per_token"):
        resolve_components(registry, tiny, "best-first", overrides={"cost-model.per_token": 0.5})
    with pytest.raises(SpecframeError, match="no component of this policy takes the parameter 'costmodel'"):
        resolve_components(registry, tiny, "best-first", overrides={"costmodel": "mycost"})
    with pytest.raises(SpecframeError, match="unknown component kind 'cost model'; the kinds are backend, drafter"):
        registry.names("cost model")


def test_third_party_cost_model_unknown_parameter(site, tiny):
    install_mycost(site)
    with pytest.raises(SpecframeError) as exc:
        resolve_components(Registry(), tiny, "best-first", overrides={"cost_model": "mycost", "per_tokn": 1})
    assert "'per_tokn'" in str(exc.value) and "cost_model.per_token" in str(exc.value)


def test_third_party_drafter_drives_speculation(site, tiny, ar_ids):
    site.add("oracleplug", {"oracle": ORACLE_DRAFTER_PLUGIN}, {"oracle": "oracle"}, version="2.3.4")
    gen = SpecGenerator(tiny, "chain", drafter="oracle", params={"depth": 4})
    drafter = gen.components.drafter
    assert type(drafter).__name__ == "OracleDrafter"
    assert drafter.target is tiny  # the injected target
    assert drafter.depth == 4
    out = gen.generate(PROMPT_IDS, N)
    assert out.token_ids == ar_ids
    assert drafter.proposed > 0
    assert out.stats.tau > 2  # an oracle's chain is accepted
    assert out.stats.steps < N


def test_third_party_drafter_through_cli(site, tiny, ar_ids, monkeypatch):
    site.add("oracleplug", {"oracle": ORACLE_DRAFTER_PLUGIN}, {"oracle": "oracle"})
    monkeypatch.setattr(Target, "load", classmethod(lambda cls, *a, **k: tiny))
    pin_hf_backend(monkeypatch)
    from specframe.cli import cli

    prompt = "".join(chr(ord("@") + t) for t in PROMPT_IDS)  # char_tokenizer maps these back to PROMPT_IDS
    assert tiny.encode(prompt) == PROMPT_IDS
    result = CliRunner().invoke(cli, ["run", "--json", "-p", "best-first:8", "--drafter", "oracle", "--prompt", prompt,
                                      "-n", str(N), "--set", "depth=5"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    out = json.loads(result.stdout)
    assert out["token_ids"] == ar_ids
    assert out["stats"]["tau"] > 2


# ---------------------------------------------------------------------- the SPECFRAME_PLUGINS allow-list
@pytest.mark.parametrize(
    "allow, included",
    [(None, True), ("", False), ("myplug", True), ("mycostplug", True), ("MyPlug", True),
     (" other , myplug ", True), ("other", False), ("mycost", False), (",", False)],
)
def test_allow_list_env(site, monkeypatch, allow, included):
    install_mycost(site)
    if allow is None:
        monkeypatch.delenv("SPECFRAME_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("SPECFRAME_PLUGINS", allow)
    plugin_set = make_plugin_set()
    registry = Registry(plugin_set)
    assert (plugin_named(plugin_set, "mycostplug") is not None) is included
    assert ("mycost" in registry.names("cost_model")) is included
    assert_builtins_work(registry)  # built-ins always load
    assert plugin_set.problems == []


@pytest.mark.parametrize("allow, included", [(None, True), (set(), False), ({"myplug"}, True), ({"zzz"}, False)])
def test_allow_argument_overrides_env(site, monkeypatch, allow, included):
    install_mycost(site)
    monkeypatch.setenv("SPECFRAME_PLUGINS", "")  # would exclude it; the argument wins
    plugin_set = make_plugin_set(allow=allow)
    assert (plugin_named(plugin_set, "mycostplug") is not None) is included
    assert_builtins_work(Registry(plugin_set))


def test_allow_list_excludes_broken_plugin_before_import(site, monkeypatch):
    site.add("brokenplug", {"broken": "raise ImportError('needs libfoo')\n"}, {"broken": "broken"})
    install_mycost(site)
    monkeypatch.setenv("SPECFRAME_PLUGINS", "myplug")
    plugin_set = make_plugin_set()
    assert plugin_set.problems == []  # not allowed, so never imported
    assert plugin_named(plugin_set, "mycostplug") is not None


# ---------------------------------------------------------------------- broken plugins are reported
TYPO_PLUGIN = """
    from specframe import hookimpl

    @hookimpl
    def register_drafter(register):
        register("typo-drafter", object)
"""


def test_hook_typo_is_reported_and_the_rest_works(site, tiny, ar_ids):
    site.add("typoplug", {"typo": TYPO_PLUGIN}, {"typo": "typo"})
    install_mycost(site)
    plugin_set = make_plugin_set()
    assert len(plugin_set.problems) == 1, plugin_set.problems
    problem = plugin_set.problems[0]
    assert "typoplug" in problem  # the distribution
    assert "'register_drafter'" in problem
    assert "did you mean 'register_drafters'" in problem
    assert plugin_named(plugin_set, "typo") is None
    registry = Registry(plugin_set)
    assert "typo-drafter" not in registry.names("drafter")
    assert "mycost" in registry.names("cost_model")
    assert_builtins_work(registry)
    gen = SpecGenerator(tiny, "best-first", params={"cost_model": "mycost"}, registry=registry)
    assert gen.generate(PROMPT_IDS, N).token_ids == ar_ids


def test_hook_typo_warned_by_main_and_listed_by_plugins(site, capsys):
    site.add("typoplug", {"typo": TYPO_PLUGIN}, {"typo": "typo"})
    from specframe.cli import cli, main

    with pytest.raises(SystemExit) as exc:
        main(["plugins"])
    assert exc.value.code == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("specframe: warning:")]
    assert len(warnings) == 1 and "register_drafter" in warnings[0] and "typoplug" in warnings[0]
    problems = [line for line in captured.out.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and "register_drafters" in problems[0]

    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert len(data["problems"]) == 1 and "typoplug" in data["problems"][0]
    assert "typo" not in {row["name"] for row in data["plugins"]}


WRONG_SIGNATURE_PLUGIN = """
    from specframe import hookimpl

    @hookimpl
    def register_cost_models(register):
        register("fine-cost", lambda: None)

    @hookimpl
    def register_drafters(register, extra):
        register("wrongsig-drafter", object)
"""


def test_wrong_hook_signature_is_reported_and_plugin_skipped(site):
    site.add("sigplug", {"sig": WRONG_SIGNATURE_PLUGIN}, {"sig": "sig"})
    install_mycost(site)
    plugin_set = make_plugin_set()
    assert len(plugin_set.problems) == 1, plugin_set.problems
    problem = plugin_set.problems[0]
    assert "'sig'" in problem and "sigplug" in problem and "register_drafters" in problem
    assert "skipped" in problem
    assert plugin_named(plugin_set, "sig") is None
    assert not plugin_set.pm.has_plugin("sig")
    registry = Registry(plugin_set)
    # skipped means skipped entirely: its well-formed hook is not active either
    assert "fine-cost" not in registry.names("cost_model")
    assert "wrongsig-drafter" not in registry.names("drafter")
    assert "mycost" in registry.names("cost_model")
    assert_builtins_work(registry)


def test_wrong_hook_signature_problem_names_the_argument(site):
    site.add("sigplug", {"sig": WRONG_SIGNATURE_PLUGIN}, {"sig": "sig"})
    (problem,) = make_plugin_set().problems
    assert "extra" in problem


@pytest.mark.parametrize(
    "source, entry, needle",
    [
        ("raise ImportError('needs libfoo')\n", "bad", "ImportError: needs libfoo"),
        ("import sf_no_such_module_xyz\n", "bad", "ModuleNotFoundError"),
        ("def broken(:\n", "bad", "SyntaxError"),
        ("raise RuntimeError('kaput at import')\n", "bad", "RuntimeError: kaput at import"),
        ("x = 1\n", "bad:missing_attr", "AttributeError"),
    ],
    ids=["ImportError", "ModuleNotFoundError", "SyntaxError", "RuntimeError", "missing-attribute"],
)
def test_plugin_failing_to_import_is_reported(site, tiny, ar_ids, source, entry, needle):
    site.add("brokenplug", {"bad": source}, {"broken": entry})
    install_mycost(site)
    plugin_set = make_plugin_set()
    assert len(plugin_set.problems) == 1, plugin_set.problems
    problem = plugin_set.problems[0]
    assert "'broken'" in problem and "brokenplug" in problem and "failed to import" in problem
    assert needle in problem
    assert plugin_named(plugin_set, "broken") is None
    registry = Registry(plugin_set)
    assert "mycost" in registry.names("cost_model")
    assert_builtins_work(registry)
    gen = SpecGenerator(tiny, "best-first", params={"cost_model": "mycost"}, registry=registry)
    assert gen.generate(PROMPT_IDS, N).token_ids == ar_ids


RAISING_REGISTER_PLUGIN = """
    from specframe import hookimpl

    @hookimpl
    def register_drafters(register):
        raise RuntimeError("boom in register")
"""


def test_register_hook_raising_gives_plugin_error(site):
    site.add("boomplug", {"boom": RAISING_REGISTER_PLUGIN}, {"boom": "boom"})
    plugin_set = make_plugin_set()
    assert plugin_set.problems == []
    with pytest.raises(PluginError) as exc:
        Registry(plugin_set)
    message = str(exc.value)
    assert "plugin 'boom'" in message and "register_drafters" in message
    assert "RuntimeError: boom in register" in message
    assert "\n" not in message


def test_register_hook_raising_is_one_line_cli_error(site):
    site.add("boomplug", {"boom": RAISING_REGISTER_PLUGIN}, {"boom": "boom"})
    from specframe.cli import cli

    result = CliRunner().invoke(cli, ["policies"])
    assert result.exit_code == 2, (result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "plugin 'boom'" in lines[0]


def _registering(kind_hook: str, body: str) -> str:
    return f"""
    from specframe import hookimpl
    from specframe.registry import PolicySpec
    from specframe.components import Drafter

    @hookimpl
    def {kind_hook}(register):
        {body}
    """


@pytest.mark.parametrize(
    "hook, body, needles",
    [
        ("register_drafters", 'register("dup", Drafter)', ["drafter 'dup'", "plugin 'alpha'", "plugin 'beta'"]),
        ("register_cost_models", 'register("dupcost", lambda: None)', ["cost model 'dupcost'", "'alpha'", "'beta'"]),
        ("register_policies", 'register(PolicySpec(name="twin", description="x"))', ["policy 'twin'", "'alpha'", "'beta'"]),
    ],
    ids=["drafter", "cost-model", "policy"],
)
def test_two_plugins_registering_the_same_name(site, hook, body, needles):
    site.add("alpha-dist", {"alpha": _registering(hook, body)}, {"alpha": "alpha"})
    site.add("beta-dist", {"beta": _registering(hook, body)}, {"beta": "beta"})
    plugin_set = make_plugin_set()
    assert plugin_set.problems == []
    with pytest.raises(PluginError) as exc:
        Registry(plugin_set)
    for needle in needles:
        assert needle in str(exc.value)


@pytest.mark.parametrize(
    "hook, body, needles",
    [
        ("register_drafters", 'register("ngram", Drafter)', ["drafter 'ngram'", "'drafters'", "'shadow'"]),
        ("register_policies", 'register(PolicySpec(name="ar", description="x"))', ["policy 'ar'", "'baselines'", "'shadow'"]),
    ],
    ids=["drafter", "policy"],
)
def test_third_party_cannot_shadow_a_builtin(site, hook, body, needles):
    site.add("shadow-dist", {"shadow": _registering(hook, body)}, {"shadow": "shadow"})
    with pytest.raises(PluginError) as exc:
        Registry()
    for needle in needles:
        assert needle in str(exc.value)


@pytest.mark.parametrize(
    "hook, body, needle",
    [
        ("register_drafters", 'register("notcallable", 42)', "non-callable"),
        ("register_drafters", 'register(7, Drafter)', "bad name"),
        ("register_policies", 'register("not-a-spec")', "not a PolicySpec"),
    ],
    ids=["non-callable", "bad-name", "not-a-policyspec"],
)
def test_plugin_registering_garbage(site, hook, body, needle):
    site.add("garbage-dist", {"garbage": _registering(hook, body)}, {"garbage": "garbage"})
    with pytest.raises(PluginError) as exc:
        Registry()
    assert needle in str(exc.value) and "'garbage'" in str(exc.value)


def test_factory_failing_to_start_names_the_plugin(site, tiny):
    site.add("failplug", {"fail": _registering("register_cost_models", 'register("failcost", FailCost)') + """
    class FailCost:
        def __init__(self):
            raise RuntimeError("cannot start")
    """}, {"fail": "fail"})
    with pytest.raises(PluginError) as exc:
        SpecGenerator(tiny, "best-first", params={"cost_model": "failcost"})
    assert "failcost" in str(exc.value) and "'fail'" in str(exc.value) and "cannot start" in str(exc.value)


# ---------------------------------------------------------------------- observer hooks
class Observer:
    def __init__(self):
        self.steps: list[tuple[int, StepRecord]] = []
        self.runs: list[RunStats] = []

    @hookimpl
    def on_step_end(self, record, step):
        self.steps.append((step, record))

    @hookimpl
    def on_run_end(self, stats):
        self.runs.append(stats)


def test_observer_hooks_see_every_step_and_run(tiny, ar_ids, monkeypatch):
    monkeypatch.delenv("SPECFRAME_PLUGINS", raising=False)
    observer = Observer()
    plugin_set = make_plugin_set(extra=[observer])
    assert plugin_set.problems == []
    info = plugin_set.plugins[-1]
    assert (info.distribution, info.builtin, info.hooks) == ("(in-process)", False, ["on_run_end", "on_step_end"])
    gen = SpecGenerator(tiny, "best-first", registry=Registry(plugin_set))
    first = gen.generate(PROMPT_IDS, N)
    assert first.token_ids == ar_ids
    assert len(observer.runs) == 1 and observer.runs[0] is first.stats
    assert [step for step, _ in observer.steps] == list(range(first.stats.steps))
    assert all(isinstance(record, StepRecord) for _, record in observer.steps)
    assert [record for _, record in observer.steps] == first.stats.records
    assert sum(record.committed for _, record in observer.steps) == N

    second = gen.generate(PROMPT_IDS[:5], 4)  # step indices restart per run
    assert len(observer.runs) == 2 and isinstance(observer.runs[1], RunStats) and observer.runs[1] is second.stats
    assert [step for step, _ in observer.steps[first.stats.steps:]] == list(range(second.stats.steps))


def test_observer_module_through_entry_point(site, tiny):
    site.add("watchplug", {"watch": """
        from specframe import hookimpl
        RUNS = []

        @hookimpl
        def on_run_end(stats):
            RUNS.append(stats.new_tokens)
    """}, {"watch": "watch"})
    gen = SpecGenerator(tiny, "chain")
    gen.generate(PROMPT_IDS, 3)
    assert site.module("watch").RUNS == [3]


def test_observer_with_partial_arguments(tiny):
    seen = []

    class StepsOnly:
        @hookimpl
        def on_step_end(self, step):
            seen.append(step)

    gen = SpecGenerator(tiny, "ar", registry=Registry(make_plugin_set(allow=set(), extra=[StepsOnly()])))
    gen.generate(PROMPT_IDS, 3)
    assert seen == [0, 1, 2]


def test_no_observers_no_hook_calls(tiny):
    gen = SpecGenerator(tiny, "ar", registry=Registry(make_plugin_set(allow=set())))
    assert not gen.observers.watching_steps and not gen.observers.watching_runs
    calls = []
    gen.registry.pm.add_hookcall_monitoring(lambda name, impls, kw: calls.append(name), lambda *a: None)
    gen.generate(PROMPT_IDS, 3)
    assert "on_step_end" not in calls and "on_run_end" not in calls


def test_observer_raising_gives_plugin_error(tiny):
    class Fine:
        @hookimpl
        def on_step_end(self, record, step):
            pass

    class Broken:
        @hookimpl
        def on_step_end(self, record, step):
            raise RuntimeError("observer broke")

    def plugin(obj, name):
        obj.__name__ = name
        return obj

    registry = Registry(make_plugin_set(allow=set(), extra=[plugin(Fine(), "fine"), plugin(Broken(), "broken")]))
    gen = SpecGenerator(tiny, "ar", registry=registry)
    with pytest.raises(PluginError, match=r"^plugin 'broken' in on_step_end failed: RuntimeError: observer broke$"):
        gen.generate(PROMPT_IDS, 3)


def test_observers_follow_pluggys_calling_rules(tiny):
    """Observer hooks go through pluggy's hook caller: ``tryfirst``/``trylast`` order the calls, and both
    new-style (``wrapper=True``) and old-style (``hookwrapper=True``) wrappers run around them."""
    order = []

    class Early:
        @hookimpl(tryfirst=True)
        def on_run_end(self, stats):
            order.append("tryfirst")

    class Late:
        @hookimpl(trylast=True)
        def on_run_end(self, stats):
            order.append("trylast")

    class Plain:
        @hookimpl
        def on_run_end(self, stats):
            order.append("plain")

    class NewWrapper:
        @hookimpl(wrapper=True)
        def on_run_end(self, stats):
            order.append("wrapper:before")
            result = yield
            order.append("wrapper:after")
            return result

    class OldWrapper:
        @hookimpl(hookwrapper=True)
        def on_run_end(self, stats):
            order.append("hookwrapper:before")
            yield
            order.append("hookwrapper:after")

    # registered in an order that differs from the calling order pluggy defines
    extra = [Late(), Plain(), Early(), OldWrapper(), NewWrapper()]
    for i, obj in enumerate(extra):
        obj.__name__ = f"observer-{i}"
    gen = SpecGenerator(tiny, "ar", registry=Registry(make_plugin_set(allow=set(), extra=extra)))
    gen.generate(PROMPT_IDS, 2)
    # wrappers run outermost, the last registered first; then tryfirst, plain, trylast
    assert order == ["wrapper:before", "hookwrapper:before", "tryfirst", "plain", "trylast",
                     "hookwrapper:after", "wrapper:after"]


def test_in_process_plugin_with_typo_is_reported():
    class Typo:
        @hookimpl
        def on_run_ends(self, stats):
            pass

    plugin_set = make_plugin_set(allow=set(), extra=[Typo()])
    (problem,) = plugin_set.problems
    assert "on_run_ends" in problem and "did you mean 'on_run_end'" in problem
    assert not plugin_set.pm.has_plugin("extra-0")


# ---------------------------------------------------------------------- register_commands
COMMAND_PLUGIN = """
    import click
    from specframe import hookimpl

    @hookimpl
    def register_commands(cli):
        @cli.command(name="sf-hello-test")
        @click.option("--who", default="world")
        def hello(who):
            '''Say hello (added by a plugin).'''
            click.echo(f"hello {who} from a plugin")
"""

RAISING_COMMAND_PLUGIN = """
    from specframe import hookimpl

    @hookimpl
    def register_commands(cli):
        raise RuntimeError("no commands today")
"""


@pytest.fixture
def clean_cli():
    from specframe.cli import cli

    before = set(cli.commands)
    yield cli
    for name in set(cli.commands) - before:
        cli.commands.pop(name)


def test_register_commands_adds_a_cli_command(site, clean_cli):
    site.add("cmdplug", {"cmd": COMMAND_PLUGIN}, {"cmd": "cmd"})
    from specframe.cli import build_cli

    plugin_set = make_plugin_set()
    assert plugin_named(plugin_set, "cmd").hooks == ["register_commands"]
    group = build_cli(plugin_set)
    assert group is clean_cli
    assert "sf-hello-test" in group.commands
    result = CliRunner().invoke(group, ["sf-hello-test", "--who", "tests"], obj={"plugin_set": plugin_set})
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout == "hello tests from a plugin\n"
    assert "sf-hello-test" in CliRunner().invoke(group, ["--help"]).stdout


def test_register_commands_through_main(site, clean_cli, capsys):
    site.add("cmdplug", {"cmd": COMMAND_PLUGIN}, {"cmd": "cmd"})
    from specframe.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["sf-hello-test"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == "hello world from a plugin\n"


def test_register_commands_raising_is_a_warning(site, clean_cli, capsys):
    site.add("badcmdplug", {"badcmd": RAISING_COMMAND_PLUGIN}, {"badcmd": "badcmd"})
    site.add("cmdplug", {"cmd": COMMAND_PLUGIN}, {"cmd": "cmd"})
    from specframe.cli import build_cli

    group = build_cli(make_plugin_set())
    err = capsys.readouterr().err
    assert "plugin 'badcmd'" in err and "register_commands" in err and "no commands today" in err
    assert "sf-hello-test" in group.commands  # the other plugin's command still arrives
    result = CliRunner().invoke(group, ["policies"])
    assert result.exit_code == 0


def test_plugins_command_lists_third_party(site):
    install_mycost(site)
    from specframe.cli import cli

    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["plugins"]}
    assert rows["mycostplug"] == {"name": "mycostplug", "distribution": "myplug", "version": "0.1", "builtin": False,
                                  "hooks": ["register_cost_models"], "provides": ["cost_model:mycost"]}
    text = CliRunner().invoke(cli, ["plugins"]).stdout
    assert "mycostplug  (myplug 0.1)" in text
    assert "cost_model:mycost" in text
    components = CliRunner().invoke(cli, ["components"]).stdout
    assert "mycost(per_token=0.001)  [mycostplug]" in components


def test_third_party_policy_bundle(site, tiny, ar_ids):
    site.add("polplug", {"pol": """
        from specframe import hookimpl
        from specframe.registry import PolicySpec

        @hookimpl
        def register_policies(register):
            register(PolicySpec(name="wide-tree", description="a wide static tree",
                                expansion="static-tree", params={"expansion.topology": (4, 2)},
                                shorthand="expansion.topology"))
    """}, {"pol": "pol"})
    registry = Registry()
    assert registry.policies["wide-tree"][1] == "pol"
    gen = SpecGenerator(tiny, "wide-tree")
    assert tuple(gen.components.expansion.topology) == (4, 2)
    assert gen.generate(PROMPT_IDS, N).token_ids == ar_ids
    short = SpecGenerator(tiny, "wide-tree:3,1")
    assert tuple(short.components.expansion.topology) == (3, 1)


# ---------------------------------------------------------------------- built-ins: installed vs source tree
def test_source_tree_fallback_loads_the_same_builtins(monkeypatch):
    monkeypatch.delenv("SPECFRAME_PLUGINS", raising=False)
    from_source = make_plugin_set(entry_points=[])
    assert from_source.problems == []
    assert {p.name for p in from_source.plugins} == {m.rsplit(".", 1)[-1] for m in DEFAULT_PLUGINS}
    assert all(p.builtin and p.distribution == "specframe" for p in from_source.plugins)
    source_registry, installed_registry = Registry(from_source), Registry()
    for kind in source_registry.components:
        assert source_registry.names(kind) == installed_registry.names(kind), kind
    assert source_registry.names("policy") == installed_registry.names("policy")


def test_builtin_entry_points_match_default_plugins():
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(specframe.__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not running from a source checkout")
    declared = tomllib.loads(pyproject.read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert sorted(declared.values()) == sorted(DEFAULT_PLUGINS)
    installed = {ep.name: ep.value for ep in md.entry_points(group=ENTRY_POINT_GROUP)
                 if ep.dist is not None and ep.dist.metadata["Name"] == "specframe"}
    if installed:
        assert installed == declared, "the installed specframe metadata is stale: run `pip install -e .` again"
