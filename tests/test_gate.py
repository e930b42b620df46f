"""Draft or not: the DraftGate on synthetic streams, in the engine (a slow useless drafter is skipped, a
slow good one is kept, output unchanged), per source inside ``hybrid``, in the simulator, and the
roofline's separate single-token path that the decision relies on.

Nothing here reads the wall clock: the engine, the hybrid drafter and the simulator are given a
:class:`~specframe.clock.ManualClock`; a slow drafter advances it by its "delay" and each target forward by a
modelled cost, so every decision below is deterministic whatever the machine is doing."""

from __future__ import annotations

import numpy as np

from specframe.errors import SpecframeError
import pytest
import torch

from specframe import Registry, SpecGenerator, hookimpl, make_plugin_set
from specframe.clock import ManualClock
from specframe.components import Drafter, EmptyDraft, MarginalDraft
from specframe.gate import DraftGate
from specframe.plugins.cost_models import Roofline
from specframe.plugins.hybrid import HybridDrafter

from conftest import make_tiny_model, plain_greedy

PROMPT = [3, 14, 15, 9, 2, 6, 5, 3, 14, 15, 9, 2]
VOCAB = 96


# ---------------------------------------------------------------------- 1. the gate alone
def _play(gate: DraftGate, steps: int, with_rate, without_rate, draft_share=0.4, rng=None) -> list[bool]:
    """Feed the gate steps whose tokens/s depend on its choice; returns its choices."""
    rng = rng or np.random.default_rng(0)
    choices = []
    for i in range(steps):
        ran = gate.want()
        rate = with_rate(i) if ran else without_rate(i)
        tokens = int(rng.integers(1, 5))
        seconds = tokens / rate * (1 + rng.normal(0, 0.05))
        gate.record(ran, tokens, seconds, draft_share * seconds if ran else 0.0)
        choices.append(ran)
    return choices


def test_gate_keeps_the_faster_arm_and_probes_rarely():
    gate = DraftGate()
    choices = _play(gate, 600, lambda i: 10.0, lambda i: 30.0)  # drafting loses: 1 token/step vs 3
    assert np.mean(choices[100:]) < 0.05, gate.summary()
    assert sum(choices) <= 3 + 6 + 600 // 64, "probes back off exponentially"
    gate = DraftGate()
    choices = _play(gate, 600, lambda i: 40.0, lambda i: 10.0)
    assert np.mean(choices[100:]) > 0.95, gate.summary()


def test_gate_follows_a_change_of_regime():
    gate = DraftGate()
    # drafting pays for 300 steps, then stops paying (the text stopped repeating, say), then pays again
    good = lambda i: 40.0 if i < 300 or i >= 600 else 5.0  # noqa: E731
    choices = _play(gate, 900, good, lambda i: 10.0)
    assert np.mean(choices[200:300]) > 0.9
    assert np.mean(choices[400:600]) < 0.1
    assert np.mean(choices[750:900]) > 0.9


def test_cheap_source_always_runs_where_asked_and_bad_records_are_ignored():
    gate = DraftGate(cheap_share=0.08)  # as the hybrid drafter's per-source gates are built
    choices = _play(gate, 200, lambda i: 10.0, lambda i: 12.0, draft_share=0.01)
    assert all(choices), "a source under cheap_share of the step is never skipped"
    gate.record(True, 3, float("nan"))
    gate.record(False, 1, 0.0)
    assert gate.trials[True] == 200 and gate.trials[False] == 0
    with pytest.raises(ValueError):
        DraftGate(probe_every=8, max_probe_every=4)


def test_a_cheap_source_that_never_grows_the_tree_is_stopped_whatever_its_price():
    """Prompt lookup on chat: 1 % of the step, and the tree stays the root alone. Each such step is also a
    measurement of the step without the source (its seconds less the draft's), so the gate stops it after
    a few steps although every single step's time is noisy, then probes it rarely."""
    rng = np.random.default_rng(3)
    gate = DraftGate()
    choices = []
    for _ in range(400):
        ran = gate.want()
        plain = 0.008 * (1 + rng.normal(0, 0.1))  # a plain step: 8 ms, ±10 %
        draft = 0.0001 if ran else 0.0
        gate.record(ran, 1, plain + draft, draft, plain if ran else None)
        choices.append(ran)
    assert sum(choices) <= gate.min_trials + 6 + 400 // 32, gate.summary()  # probes back off
    assert not any(choices[50:60]) and gate.rate(False) > gate.rate(True)


def test_the_source_resumes_when_a_probe_pays():
    gate = DraftGate()
    for _ in range(100):  # it does not pay: stopped
        ran = gate.want()
        gate.record(ran, 1, 0.0081 if ran else 0.008, 0.0001 if ran else 0.0, 0.008 if ran else None)
    assert not gate.want() or not gate.want()
    resumed = []
    for _ in range(200):  # now the draft is accepted: 3 tokens a step
        ran = gate.want()
        gate.record(ran, 3 if ran else 1, 0.0101 if ran else 0.008, 0.0001 if ran else 0.0)
        resumed.append(ran)
    assert np.mean(resumed[100:]) > 0.95, gate.summary()


# ---------------------------------------------------------------------- 2. in the engine
def forward_cost(n: int) -> float:
    """Modelled seconds of verifying n tree tokens: 10 ms plus 0.5 ms a token."""
    return 0.010 + 0.0005 * n


def timed(target, clock: ManualClock):
    """``target`` whose every verification forward advances ``clock`` by :func:`forward_cost`."""
    start = target.start

    def start_timed(feature_layers=()):
        session = start(feature_layers)
        verify = session.verify

        def verify_timed(tree):
            out = verify(tree)
            clock.advance(forward_cost(tree.size))
            return out

        session.verify = verify_timed
        return session

    target.start = start_timed
    return target


class SlowDrafter(Drafter):
    """Takes ``delay`` seconds of ``clock`` per proposal, then proposes a confident chain: the true greedy
    continuation (``oracle``) or tokens that never occur in it."""

    name = "slow"

    def __init__(self, reference: list[int], delay: float, oracle: bool, depth: int = 12, clock=None):
        self.reference, self.delay, self.oracle, self.max_depth = reference, delay, oracle, depth
        self.clock = clock
        self.unused = [t for t in range(VOCAB) if t not in set(reference)]

    def propose(self, context_ids, max_depth):
        if self.delay:
            self.clock.advance(self.delay)
        depth = min(self.max_depth, max_depth)
        if depth <= 0:
            return EmptyDraft()
        pos = len(context_ids) - len(PROMPT)
        if self.oracle:
            chain = (self.reference[pos:] + self.unused)[:depth]
        else:
            chain = self.unused[:depth]
        other = [self.unused[-1 - d] if chain[d] != self.unused[-1 - d] else self.unused[-2 - d] for d in range(depth)]
        tokens = torch.tensor([[a, b] for a, b in zip(chain, other)], dtype=torch.long)
        logq = torch.tensor([[0.97, 0.03]] * depth, dtype=torch.float64).log()
        return MarginalDraft(tokens, logq)


@pytest.fixture(scope="module")
def reference():
    return plain_greedy(make_tiny_model("llama"), PROMPT, 200)


def drafted_flags(gen, reference, runs=4, n=40) -> list[bool]:
    """Generate ``runs`` times, checking each output against plain greedy; every step's ``drafted``."""
    flags = []
    for _ in range(runs):
        out = gen.generate(PROMPT, n)
        assert out.token_ids == reference[:n]
        flags += [r.drafted for r in out.stats.records]
    return flags


@pytest.fixture
def clock():
    return ManualClock()


@pytest.mark.parametrize("useless_s, good_s, most, least", [(0.02, 0.004, 0.25, 0.8), (0.0002, 0.0002, 0.15, 0.85)],
                         ids=["slow", "cheap"])
def test_engine_skips_a_useless_drafter_and_keeps_a_good_one(tiny_target, reference, clock, useless_s, good_s, most,
                                                              least):
    """Slow, or cheap (2 % of a step) with the policy's cheap exemption off (``cheap_draft=0``): what decides is
    whether the drafts pay."""
    target = timed(tiny_target, clock)
    useless = SpecGenerator(target, "bastion", drafter=SlowDrafter(reference, useless_s, oracle=False, clock=clock),
                            params={"expansion.cheap_draft": 0.0}, clock=clock)
    assert np.mean(drafted_flags(useless, reference)[40:]) < most, useless.gate.summary()
    good = SpecGenerator(target, "bastion", drafter=SlowDrafter(reference, good_s, oracle=True, clock=clock),
                         clock=clock)
    assert np.mean(drafted_flags(good, reference, runs=3, n=120)[4:]) > least, good.gate.summary()


def test_a_drafter_under_bastions_cheap_share_always_runs(tiny_target, reference, clock):
    """BASTION's default ``cheap_draft`` (3 %): a useless drafter taking 2 % of a step keeps running (it cannot
    cost more than that, and its trees stay at the root); one taking a third of a step is still stopped."""
    target = timed(tiny_target, clock)
    cheap = SpecGenerator(target, "bastion", drafter=SlowDrafter(reference, 0.0002, oracle=False, clock=clock),
                          clock=clock)
    assert cheap.learning.gate.cheap_share == 0.03
    assert all(drafted_flags(cheap, reference)[4:]), cheap.gate.summary()
    slow = SpecGenerator(target, "bastion", drafter=SlowDrafter(reference, 0.02, oracle=False, clock=clock),
                         clock=clock)
    assert np.mean(drafted_flags(slow, reference)[40:]) < 0.25, slow.gate.summary()
    with pytest.raises(SpecframeError, match="cheap_draft must be a share"):
        SpecGenerator(target, "bastion", params={"expansion.cheap_draft": 1.5})


def test_without_the_gate_every_step_drafts(tiny_target, reference, clock):
    ungated = SpecGenerator(timed(tiny_target, clock), "bastion",
                            drafter=SlowDrafter(reference, 0.02, oracle=False, clock=clock),
                            params={"expansion.gate": False}, clock=clock)
    assert ungated.gate is None
    assert all(drafted_flags(ungated, reference, runs=1))


def test_fixed_budget_policies_never_skip(tiny_target, reference, clock):
    gen = SpecGenerator(timed(tiny_target, clock), "best-first:8",
                        drafter=SlowDrafter(reference, 0.01, oracle=False, clock=clock), clock=clock)
    assert gen.gate is None
    out = gen.generate(PROMPT, 20)
    assert out.token_ids == reference[:20] and all(r.drafted for r in out.stats.records)


# ---------------------------------------------------------------------- 3. per source inside hybrid
class SourcesPlugin:
    def __init__(self, reference):
        self.reference = reference

    @hookimpl
    def register_drafters(self, register):
        ref = self.reference
        # factories that take ``clock`` get the one the generator (or the hybrid) was given
        register("slow-useless", lambda clock: SlowDrafter(ref, 0.02, oracle=False, clock=clock))
        register("fast-oracle", lambda clock: SlowDrafter(ref, 0.0, oracle=True, depth=4, clock=clock))


def test_hybrid_gates_the_source_that_does_not_pay(tiny_target, reference, clock):
    target = timed(tiny_target, clock)
    registry = Registry(make_plugin_set(allow=set(), extra=[SourcesPlugin(reference)]))
    hybrid = HybridDrafter(target=target, registry=registry, sources="fast-oracle,slow-useless", clock=clock)
    gen = SpecGenerator(target, "bastion", drafter=hybrid, registry=registry, params={"expansion.gate": False},
                        clock=clock)
    for _ in range(3):
        out = gen.generate(PROMPT, 60)
        assert out.token_ids == reference[:60]
    fast, slow = hybrid.gates
    assert fast.trials[False] <= fast.min_trials + 1, (fast.summary(), slow.summary())
    assert slow.trials[True] < 0.3 * (slow.trials[True] + slow.trials[False]), slow.summary()
    ungated = HybridDrafter(target=target, registry=registry, sources="fast-oracle,slow-useless", gate=False,
                            clock=clock)
    assert ungated.gates is None
    # one decision, one gate: the engine gates a hybrid only when the hybrid does not gate its sources
    assert SpecGenerator(target, "bastion", drafter=hybrid, registry=registry, clock=clock).gate is None
    assert SpecGenerator(target, "bastion", drafter=ungated, registry=registry, clock=clock).gate is not None


# ---------------------------------------------------------------------- 4. the single-token path
def _small_config():
    import transformers

    return transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=4)


@pytest.mark.parametrize("single_token", [True, False])
def test_roofline_models_a_fast_single_token_path(single_token):
    """A CPU-like machine: n = 1 runs a fast path (60 ms); n >= 2 costs 110 ms + a slope."""
    roof = Roofline(config=_small_config(), device="cpu", single_token=single_token)

    def machine(n, c):
        return 0.060 + 1e-6 * c if n == 1 else 0.110 + 0.002 * n + 2e-6 * c

    rng = np.random.default_rng(1)
    roof.calibrate(lambda n: machine(n, 300), 300)
    for _ in range(200):
        n = int(rng.choice([1, 1, 1, 2, 3, 5, 8, 13, 20]))
        c = int(rng.integers(100, 800))
        roof.observe(n, c, machine(n, c) * (1 + rng.normal(0, 0.03)))
    roof.refit()
    for c in (200, 600):
        if single_token:
            assert roof.predict(1, c) == pytest.approx(machine(1, c), rel=0.08)
            for n in (2, 4, 8, 16):
                assert roof.predict(n, c) == pytest.approx(machine(n, c), rel=0.12), (n, c)
        else:  # one roofline for every n cannot hold both the single-token time and the flat n >= 2 part
            worst = max(abs(roof.predict(n, c) / machine(n, c) - 1) for n in (1, 2, 4, 8, 16))
            assert worst > 0.2


# ---------------------------------------------------------------------- 5. per source in the simulator
def test_simulator_gates_each_source_of_a_hybrid_trace_as_the_hybrid_does_live(tiny_target, reference, tmp_path,
                                                                              clock):
    """A hybrid trace keeps each source's draft seconds; replaying BASTION over it skips only the slow
    useless source (keeping the fast good one), where one gate over the whole draft would fall back to ar."""
    import json

    from specframe.datasets import Prompt
    from specframe.tools.simulate import simulate
    from specframe.tools.trace import record_trace

    registry = Registry(make_plugin_set(allow=set(), extra=[SourcesPlugin(reference)]))
    hybrid = HybridDrafter(target=tiny_target, registry=registry, sources="fast-oracle,slow-useless", gate=False,
                           clock=clock)
    prompt = Prompt("p", "toy", text=" ".join(map(str, PROMPT)), chat=False)
    trace = tmp_path / "trace.jsonl"
    record_trace(tiny_target, hybrid, [prompt] * 2, 150, trace, registry=registry, log=lambda m: None, clock=clock)
    steps = [s for line in trace.read_text().splitlines() for s in json.loads(line)["steps"]]
    assert all(s["draft_s_parts"] == [0.0, pytest.approx(0.02)] for s in steps), steps[:2]
    (tmp_path / "flat.json").write_text(json.dumps({"points": [
        {"n": n, "c": c, "ms_median": 10.0 + 0.01 * n} for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) for c in (0, 1024)]}))
    res = simulate(trace, ["bastion", "best-first:8"], str(tmp_path / "flat.json"), tmp_path / "sim", tiny_target,
                   registry)["datasets"]["toy"]
    # a trace without per-source times gets one gate over the whole draft: keep both sources or neither
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    for r in rows:
        for s in r["steps"]:
            del s["draft_s_parts"]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = simulate(trace, ["bastion", "best-first:8"], str(tmp_path / "flat.json"), tmp_path / "sim2", tiny_target,
                     registry)["datasets"]["toy"]
    # ungated, best-first pays the 20 ms source on every step (a 10 ms forward); the hybrid's own gates
    # drop it and keep the oracle, under any policy, as the hybrid does live
    assert res["bastion"]["tau"] > 2.0 and res["bastion"]["speedup_vs_ar"] > 1.4 * whole["best-first:8"]["speedup_vs_ar"], res
    assert res["best-first:8"]["speedup_vs_ar"] > 1.4 * whole["best-first:8"]["speedup_vs_ar"]
    whole = whole["bastion"]
    assert whole["speedup_vs_ar"] < res["bastion"]["speedup_vs_ar"]
