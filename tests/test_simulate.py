"""The simulator runs the real engine: given the same clock, every policy — BASTION with its draft gate and
learned step costs included, and a hybrid drafter gating its own sources — builds the same trees in
simulation as live, so τ, the step count, the tree sizes and even the tokens/s agree exactly.

The live runs here see a :class:`~specframe.clock.ManualClock` that each forward advances by the profile's
latency, each kept tree by a fixed host time and each proposal by a fixed draft time: exactly what the
simulated target and the trace drafter charge. Nothing reads the wall clock."""

from __future__ import annotations

import json

import pytest

from specframe import Registry, SpecGenerator, hookimpl, make_plugin_set
from specframe.clock import ManualClock
from specframe.components import Drafter
from specframe.datasets import Prompt
from specframe.errors import SpecframeError
from specframe.tools.simulate import simulate, traced_logits
from specframe.tools.trace import record_trace
from specframe.tree import Tree

PROMPTS = ["1 2 3 4 5 1 2 3 9 9 1 2", "7 7 8 1 2 3 7 7 8 1", "5 6 5 6 5 6 2", "3 14 15 9 2 6 5 3 14 15 9 2"]
POLICIES = ["chain", "best-first:8", "best-first:3", "static-tree", "bastion", "bastion:4"]
HOST_S = 0.0015  # host seconds per kept tree
NEW = 40


def profile_table(path):
    """A device whose forward costs 10 ms + 0.5 ms a token + 1 µs a cached token."""
    path.write_text(json.dumps({"points": [
        {"n": n, "c": c, "ms_median": 10.0 + 0.5 * n + 0.001 * c} for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        for c in (0, 1024)]}))
    return str(path)


class Delayed(Drafter):
    """``inner``, taking ``delay`` seconds of ``clock`` per proposal."""

    def __init__(self, inner: Drafter, delay: float, clock: ManualClock):
        self.inner, self.delay, self.clock = inner, delay, clock
        self.name, self.feature_layers, self.max_depth = "delayed", inner.feature_layers, inner.max_depth

    def start(self, prompt_ids, features):
        self.inner.start(prompt_ids, features)

    def commit(self, tokens, features):
        self.inner.commit(tokens, features)

    def propose(self, context_ids, max_depth):
        self.clock.advance(self.delay)
        return self.inner.propose(context_ids, max_depth)


class Sources:
    """Two prompt-lookup sources for a hybrid: a cheap one and a slow one."""

    @hookimpl
    def register_drafters(self, register):
        def lookup(target, clock):
            return Delayed(registry_ngram(target), 2.0 ** -11, clock)  # binary fractions: recorded exactly

        def slow(target, clock):
            return Delayed(registry_ngram(target, 4), 2.0 ** -5, clock)

        register("lookup", lookup)
        register("slow-lookup", slow)


def registry_ngram(target, max_depth: int | None = None):
    return Registry().build("drafter", "ngram", {} if max_depth is None else {"max_depth": max_depth}, target=target)


def live_on(target, clock: ManualClock, profile: str):
    """``target`` whose forwards advance ``clock`` by the profile and whose kept trees by HOST_S."""
    cost = Registry().build("cost_model", "profile", {"path": profile})
    start = target.start

    def start_timed(feature_layers=()):
        session = start(feature_layers)
        verify, keep = session.verify, session.keep

        def verify_timed(tree):
            clock.advance(cost.predict(tree.size, session.past))
            return verify(tree)

        def keep_timed(path, n):
            keep(path, n)
            clock.advance(HOST_S)

        session.verify, session.keep = verify_timed, keep_timed
        return session

    target.start = start_timed
    return target


def prompts(dataset="toy"):
    return [Prompt(str(i), dataset, text=p, chat=False) for i, p in enumerate(PROMPTS)]


def live_table(make_target, profile, label, drafter_for, registry=None) -> dict:
    """τ, steps, tree sizes and tokens/s of one live generator over every prompt, on a manual clock."""
    clock = ManualClock()
    target = live_on(make_target(), clock, profile)
    drafter = None if label == "ar" else drafter_for(target, clock)
    gen = SpecGenerator(target, label, drafter=drafter, registry=registry, clock=clock)
    runs = [gen.generate([int(w) for w in p.split()], NEW).stats for p in PROMPTS]
    records = [r for st in runs for r in st.records]
    return {"tau": sum(r.accepted + 1 for r in records) / len(records), "steps": len(records),
            "mean_tree_size": sum(r.tree_size for r in records) / len(records),
            "tokens_per_s": sum(st.new_tokens for st in runs) / sum(st.wall_s - st.prefill_s for st in runs),
            "drafted_share": sum(r.drafted for r in records) / len(records)}


def same(sim: dict, live: dict) -> dict:
    return {k: (sim[k], live[k]) for k in live if sim[k] != live[k]}


@pytest.mark.parametrize("draft_s", [0.002, 0.05])
def test_every_policy_simulates_to_its_live_run_exactly(make_target, tmp_path, draft_s):
    """A cheap and a costly drafter: BASTION drafts on most steps of the first and its gate skips most
    steps of the second; either way the simulated run is the live run, number for number."""
    profile = profile_table(tmp_path / "profile.json")
    record_trace(make_target(), "ngram", prompts(), NEW, tmp_path / "trace.jsonl", log=lambda m: None,
                 clock=ManualClock())
    summary = simulate(tmp_path / "trace.jsonl", POLICIES, profile, tmp_path / "sim", make_target(),
                       overhead_s=HOST_S, draft_s=draft_s)["datasets"]["toy"]

    def ngram(target, clock):
        return Delayed(registry_ngram(target), draft_s, clock)

    for label in ["ar"] + POLICIES:
        live = live_table(make_target, profile, label, ngram)
        assert same(summary[label], live) == {}, label
    shares = summary["bastion"]["drafted_share"]
    assert (0.2 < shares < 1.0) if draft_s < 0.01 else (shares < 0.1), shares  # the gate decided both ways
    assert summary["best-first:8"]["drafted_share"] == 1.0


def test_a_hybrid_gating_its_sources_simulates_to_its_live_run_exactly(make_target, tmp_path):
    """The trace keeps each source's draft seconds; the simulation runs the very hybrid drafter over
    trace sources, so its per-source gates decide as they do live (here: the slow source is dropped)."""
    profile = profile_table(tmp_path / "profile.json")
    registry = Registry(make_plugin_set(allow=set(), extra=[Sources()]))
    clock = ManualClock()
    target = make_target()
    recording = registry.build("drafter", "hybrid", {"sources": "lookup,slow-lookup", "gate": False}, target=target,
                               registry=registry, clock=clock)
    record_trace(target, recording, prompts(), NEW, tmp_path / "trace.jsonl", registry=registry,
                 log=lambda m: None, clock=clock)
    summary = simulate(tmp_path / "trace.jsonl", ["best-first:8", "bastion"], profile, tmp_path / "sim", make_target(),
                       registry, overhead_s=HOST_S)["datasets"]["toy"]

    built = []

    def hybrid(target, clock):
        built.append(registry.build("drafter", "hybrid", {"sources": "lookup,slow-lookup"}, target=target,
                                    registry=registry, clock=clock))
        return built[-1]

    for label in ["ar", "best-first:8", "bastion"]:
        live = live_table(make_target, profile, label, hybrid, registry)
        assert same(summary[label], live) == {}, label
    cheap, slow = built[-1].gates
    assert slow.trials[False] > slow.trials[True], slow.summary()  # the slow source was mostly skipped


def test_traced_logits_lead_the_greedy_walk_along_the_trace():
    # root, then two children of the root (5 on the line, 6 off it), then 7 under 5 (on), 9 under 6
    tree = Tree.from_lists([4, 5, 6, 7, 9], [-1, 0, 0, 1, 2])
    logits = traced_logits(tree, [5, 7, 8])
    assert logits.argmax(-1).tolist()[:2] == [5, 7] and logits.argmax(-1)[3] == 8
    assert logits[2].sum() == 0 and logits[4].sum() == 0  # off the line: never walked
    assert logits.shape == (5, 9)


def test_simulate_needs_a_real_trace(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    profile = profile_table(tmp_path / "p.json")
    with pytest.raises(SpecframeError, match="is empty"):
        simulate(empty, ["chain"], profile, tmp_path / "sim")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"dataset": "x"}) + "\n")
    with pytest.raises(SpecframeError, match="not a `specframe trace` file"):
        simulate(bad, ["chain"], profile, tmp_path / "sim")


class UngatedBastion:
    """``bastion-ungated``: ``bastion`` with the engine's draft gate off (it drafts on every step)."""

    @hookimpl
    def register_policies(self, register):
        from dataclasses import replace

        from specframe.policies.bastion import BASTION

        register(replace(BASTION, name="bastion-ungated", params={**BASTION.params, "expansion.gate": False}))


def test_a_given_host_time_per_node_is_charged_on_every_step(make_target, tmp_path):
    """``node_s`` (``--host-ms-per-node``) stands in for a profile without a per-node column: each step
    costs the traced one-token overhead plus node_s per node beyond one, and BASTION, which learns the
    host's per-node time, grows smaller trees for it (unlike a fixed budget, which keeps its trees)."""
    profile = profile_table(tmp_path / "profile.json")
    record_trace(make_target(), "ngram", prompts(), NEW, tmp_path / "trace.jsonl", log=lambda m: None,
                 clock=ManualClock())
    # drafts are never accepted on this toy trace, so BASTION's draft gate would soon stop drafting and
    # leave no tree to size: the trees are compared with the gate off
    registry = Registry(make_plugin_set(extra=[UngatedBastion()]))
    kw = dict(overhead_s=0.002, draft_s=0.0001, registry=registry)
    free = simulate(tmp_path / "trace.jsonl", ["best-first:8", "bastion-ungated"], profile, tmp_path / "a", make_target(),
                    **kw)["datasets"]["toy"]
    paid = simulate(tmp_path / "trace.jsonl", ["best-first:8", "bastion-ungated"], profile, tmp_path / "b", make_target(),
                    node_s=0.004, **kw)["datasets"]["toy"]
    for table in (free, paid):
        assert table["ar"]["overhead_ms_per_step"] == pytest.approx(2.0, abs=1e-9)
    grown = paid["best-first:8"]["overhead_ms_per_step"] - 2.0
    assert grown == pytest.approx(4.0 * (paid["best-first:8"]["mean_tree_size"] - 1), abs=1e-9)
    assert paid["best-first:8"]["mean_tree_size"] == free["best-first:8"]["mean_tree_size"]
    assert paid["bastion-ungated"]["mean_tree_size"] < free["bastion-ungated"]["mean_tree_size"], (paid["bastion-ungated"], free["bastion-ungated"])
    assert "0.004" not in (tmp_path / "a" / "report.md").read_text()
    assert "4.000 ms per tree node beyond one (given)" in (tmp_path / "b" / "report.md").read_text()


def test_simulate_cli_refuses_negative_times(tmp_path):
    from click.testing import CliRunner

    from specframe.cli import cli

    (tmp_path / "t.jsonl").write_text("{}\n")
    res = CliRunner().invoke(cli, ["simulate", "--trace", str(tmp_path / "t.jsonl"), "--profile",
                                   profile_table(tmp_path / "p.json"), "--host-ms-per-node", "-1"])
    assert res.exit_code == 2 and "must be >= 0" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("label", ["bastion", "best-first:8", "chain"])
def test_the_batch_loop_with_one_request_at_a_time_is_the_engine(make_target, tmp_path, label):
    """Continuous batching at batch 1 (``specframe.batch``) runs the same steps as ``SpecGenerator.generate``:
    the simulated numbers agree exactly; at batch 3 every request still replays its traced output exactly
    (the traced logits lead only the traced greedy line), with trees of several requests in each forward."""
    from specframe.tools.simulate import SimTarget, run_batched, run_method
    from specframe.tools.trace import read_trace

    profile = profile_table(tmp_path / "profile.json")
    record_trace(make_target(), "ngram", prompts(), NEW, tmp_path / "trace.jsonl", log=lambda m: None,
                 clock=ManualClock())
    rows = read_trace(tmp_path / "trace.jsonl")
    cost = Registry().build("cost_model", "profile", {"path": profile})

    def sim_target():
        return SimTarget(cost, ManualClock(), HOST_S, None, make_target())

    alone = run_batched(label, rows, sim_target(), Registry(), 0.002, 1)["toy"]
    solo_runs = run_method(label, rows, sim_target(), Registry(), 0.002)["toy"]
    from specframe.tools.simulate import method_row

    assert alone == {**method_row(solo_runs), "mean_batch": 1.0}
    batched = run_batched(label, rows, sim_target(), Registry(), 0.002, 3)["toy"]  # raises unless every output
    assert batched["mean_batch"] > 1.5  # replays its trace exactly
    assert batched["tokens_per_s"] > alone["tokens_per_s"]  # three requests' tokens for about one forward's time
