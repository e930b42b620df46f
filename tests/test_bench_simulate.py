"""`specframe bench` end to end on a tiny model, and the simulator's exact replay of a recorded trace."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from specframe import Registry, SpecGenerator, Target, make_plugin_set
from specframe.tools.bench import run_bench, split_methods
from specframe.cli import cli
from specframe.datasets import Prompt
from specframe.tools.profile import measure_profile
from specframe.tools.simulate import simulate
from specframe.tools.trace import record_trace

from conftest import TinyTokenizer, peer_backend

PROMPTS = ["1 2 3 4 5 1 2 3 9 9 1 2", "7 7 8 1 2 3 7 7 8 1", "5 6 5 6 5 6 2"]


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None, bos_token_id=None,
                      pad_token_id=None)
    return Target(LlamaForCausalLM(cfg).double(), TinyTokenizer(), "tiny")


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chat": False}) + "\n" for p in PROMPTS))
    return str(path)


def test_split_methods_keeps_topologies_together():
    assert split_methods("ar,static-tree:2,2,1,bastion, best-first:16") == ["ar", "static-tree:2,2,1", "bastion", "best-first:16"]


def test_bench_end_to_end(target, dataset, tmp_path):
    out = tmp_path / "bench"
    labels = ["ar", "chain", "best-first:8", "bastion", "hf", "hf-lookup"]
    summary = run_bench(target, labels, [dataset], out, num_prompts=3, max_new_tokens=12, repeats=2, progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * len(labels)  # prompt × repeat × method
    assert summary["failures"] == []
    # interleaved: each (prompt, repeat) block runs every method once, in order
    assert [r["method"] for r in rows[: len(labels)]] == labels
    for r in rows:
        assert r["matches_ar"] is True and r["new_tokens"] == 12
        if r["method"] not in ("hf", "hf-lookup"):
            assert sum(r["accept_lengths"]) >= r["new_tokens"] and len(r["tree_sizes"]) == r["decoding_steps"]
            assert len(r["drafted"]) == r["decoding_steps"]
            if r["method"] != "bastion":  # only BASTION's draft gate may skip drafting
                assert all(r["drafted"])
            assert all(size == 1 for size, d in zip(r["tree_sizes"], r["drafted"]) if not d)
    table = summary["datasets"]["toy"]
    assert table["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert table["ar"]["tau"] == pytest.approx(1.0)
    ar_ = table["ar"]  # plain decoding allows itself: T(1) is the mean of the very steps it is compared with
    assert ar_["step_limit"] == pytest.approx(ar_["verify_ms"] / (ar_["draft_ms"] + ar_["verify_ms"]), rel=1e-9)
    def rate(method, rep):  # tokens per second of one method over one repeat's prompts
        mine = [r for r in rows if r["method"] == method and r["repeat"] == rep]
        return sum(r["new_tokens"] for r in mine) / sum(r["wall_time"] for r in mine)

    for lab in labels:
        e = table[lab]
        mine = [r for r in rows if r["method"] == lab]
        wall = sum(r["wall_time"] for r in mine)
        assert e["prompts"] == 3 and e["new_tokens"] == 3 * 2 * 12 == sum(r["new_tokens"] for r in mine)
        assert e["tokens_per_s"] == pytest.approx(e["new_tokens"] / wall, rel=1e-12)
        assert e["tpot_ms"] == pytest.approx(1000 * wall / e["new_tokens"], rel=1e-12)
        for base in ("ar", "hf"):
            ratios = [rate(lab, rep) / rate(base, rep) for rep in (0, 1)]
            assert e[f"speedup_vs_{base}"] == pytest.approx(statistics.median(ratios), rel=1e-12), (lab, base)
            assert e[f"speedup_vs_{base}_spread"] == pytest.approx((max(ratios) - min(ratios)) / 2, abs=1e-12)
    chain_rows = [r for r in rows if r["method"] == "chain"]
    tau = sum(sum(r["accept_lengths"]) for r in chain_rows) / sum(r["decoding_steps"] for r in chain_rows)
    assert table["chain"]["tau"] == pytest.approx(tau)
    assert table["chain"]["drafted_share"] == 1.0
    bastion_rows = [r for r in rows if r["method"] == "bastion"]
    share = sum(sum(r["drafted"]) for r in bastion_rows) / sum(r["decoding_steps"] for r in bastion_rows)
    assert table["bastion"]["drafted_share"] == pytest.approx(share)
    assert set(summary["components"]) == {"ar", "chain", "best-first:8", "bastion"}  # what each label resolved to
    assert summary["components"]["chain"]["expansion"] == "chain" and "drafter" in summary["components"]["bastion"]
    report = (out / "report.md").read_text()
    assert "| chain |" in report and "machine:" in report
    for png in ("speedup.png", "trees.png", "cost_model.png"):
        assert (out / png).stat().st_size > 1000
        assert png in report


def test_bench_records_mismatches_as_failures(target, dataset, tmp_path, monkeypatch):
    """A method whose greedy output differs from ar's must be reported, not hidden."""
    import specframe.tools.bench as bench

    real = bench.run_one

    def corrupt(method, *args, **kwargs):
        row = real(method, *args, **kwargs)
        if method.label == "chain":
            row["token_ids"] = [t ^ 1 for t in row["token_ids"]]
        return row

    monkeypatch.setattr(bench, "run_one", corrupt)
    summary = run_bench(target, ["ar", "chain"], [dataset], tmp_path / "b", num_prompts=2, max_new_tokens=6,
                        progress=False, plots=False)
    assert len(summary["failures"]) == 2 and all(f["method"] == "chain" for f in summary["failures"])
    assert "2 failure(s)" in (tmp_path / "b" / "report.md").read_text()


def test_bench_cli_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["bench", "--policies", "ar,nope", "--dataset", "mt-bench"])
    assert res.exit_code == 2 and "unknown policy 'nope'" in res.output
    res = runner.invoke(cli, ["bench", "--policies", "ar", "--dataset", "no-such-set"])
    assert res.exit_code == 2 and "unknown dataset 'no-such-set'" in res.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = runner.invoke(cli, ["bench", "--policies", "ar", "--dataset", str(empty)])
    assert res.exit_code == 2 and "has no prompts" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    res = runner.invoke(cli, ["bench", "--policies", "ar", "--dataset", str(bad)])
    assert res.exit_code == 2 and "neither a 'prompt'" in res.output


DETERMINISTIC = ["chain", "best-first:8", "best-first:3", "static-tree"]


def test_simulator_replays_the_trace_to_the_live_tau(target, tmp_path):
    prompts = [Prompt(str(i), "toy", text=p, chat=False) for i, p in enumerate(PROMPTS)]
    record_trace(target, "ngram", prompts, 30, tmp_path / "trace.jsonl", log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert all(len(r["steps"]) == len(r["output"]) == 30 for r in rows)
    measure_profile(target, [1, 2, 4, 8, 16, 32, 64], [8, 400], 1, tmp_path / "profile.json")
    summary = simulate(tmp_path / "trace.jsonl", DETERMINISTIC, str(tmp_path / "profile.json"), tmp_path / "sim", target)
    table = summary["datasets"]["toy"]
    for label in DETERMINISTIC:
        gen = SpecGenerator(target, label, drafter="ngram")
        acc = steps = 0
        for p in PROMPTS:
            st = gen.generate([int(w) for w in p.split()], 30).stats
            acc += sum(r.accepted + 1 for r in st.records)
            steps += st.steps
        assert table[label]["tau"] == pytest.approx(acc / steps, abs=1e-12), label
    assert table["ar"]["tau"] == 1.0 and table["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert table["ar"]["max_tree_size"] == 1 and 1 < table["best-first:8"]["max_tree_size"] <= 9
    assert table["best-first:3"]["median_tree_size"] <= table["best-first:8"]["median_tree_size"]
    assert "SIMULATION" in (tmp_path / "sim" / "report.md").read_text()


def test_profile_missing_range_is_a_clear_error(target, tmp_path):
    from specframe.errors import SpecframeError
    from specframe.plugins.cost_models import ProfileCost

    measure_profile(target, [1, 2, 4], [16], 1, tmp_path / "p.json")
    cost = ProfileCost(str(tmp_path / "p.json"))
    # below the table's context: its smallest context; between sizes: linear in n
    assert cost.predict(3, 8) == pytest.approx((cost.predict(2, 16) + cost.predict(4, 16)) / 2, rel=1e-12)
    with pytest.raises(SpecframeError, match=r"covers n ≤ 4"):
        cost.predict(5, 16)
    with pytest.raises(SpecframeError, match="not found"):
        ProfileCost(str(tmp_path / "nope.json"))


def test_simulated_draft_gate_falls_back_to_ar_when_drafting_is_too_slow(target, tmp_path):
    """With a simulated draft time far above a verification, bastion's draft gate stops drafting
    (speed ≈ ar) while a fixed budget keeps paying it every step."""
    prompts = [Prompt(str(i), "toy", text=p, chat=False) for i, p in enumerate(PROMPTS * 3)]
    record_trace(target, "ngram", prompts, 30, tmp_path / "trace.jsonl", log=lambda m: None)
    (tmp_path / "flat.json").write_text(json.dumps({"points": [
        {"n": n, "c": c, "ms_median": 10.0 + 0.01 * n} for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        for c in (0, 1024)]}))
    slow = simulate(tmp_path / "trace.jsonl", ["bastion", "best-first:8"], str(tmp_path / "flat.json"),
                    tmp_path / "slow", target, draft_s=0.05)["datasets"]["toy"]
    assert slow["best-first:8"]["speedup_vs_ar"] < 0.5
    assert slow["bastion"]["speedup_vs_ar"] > 0.85, slow
    fast = simulate(tmp_path / "trace.jsonl", ["bastion"], str(tmp_path / "flat.json"), tmp_path / "fast", target,
                    draft_s=0.0001)["datasets"]["toy"]
    assert fast["bastion"]["speedup_vs_ar"] > 1.2 and fast["bastion"]["tau"] > 1.3, fast


def test_simulate_compare_sets_measured_beside_simulated(target, dataset, tmp_path):
    """`simulate --compare BENCH` matches each simulated method to the bench method that ran the trace's
    drafter and reports both; greedy τ agrees exactly, on the same prompts."""
    from specframe.datasets import load

    bench = tmp_path / "bench"
    run_bench(target, ["ar", "chain@ngram", "best-first:8@ngram", "chain"], [dataset], bench, num_prompts=3,
              max_new_tokens=20, progress=False, plots=False)
    record_trace(target, "ngram", load(dataset, 2), 20, tmp_path / "trace.jsonl", log=lambda m: None)
    measure_profile(target, [1, 2, 4, 8, 16], [8, 64], 1, tmp_path / "profile.json")
    summary = simulate(tmp_path / "trace.jsonl", ["chain", "best-first:8", "static-tree"], str(tmp_path / "profile.json"),
                       tmp_path / "sim", target, compare=bench)
    rows = summary["validation"]["datasets"]["toy"]
    assert rows["chain"]["bench_method"] == "chain@ngram"  # not `chain`, which ran another drafter
    assert rows["best-first:8"]["bench_method"] == "best-first:8@ngram"
    assert "static-tree" not in rows  # not measured: left out, not guessed
    assert rows["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    for lab in ("chain", "best-first:8"):
        assert rows[lab]["prompts"] == 2
        assert rows[lab]["sim_tau"] == pytest.approx(rows[lab]["tau"], abs=1e-12)
        assert rows[lab]["speedup_error"] == pytest.approx(rows[lab]["sim_speedup_vs_ar"] / rows[lab]["speedup_vs_ar"] - 1)
    report = (tmp_path / "sim" / "report.md").read_text()
    assert "## Simulated vs measured" in report and "chain (chain@ngram)" in report
    res = CliRunner().invoke(cli, ["simulate", "--trace", str(tmp_path / "trace.jsonl"), "--profile",
                                   str(tmp_path / "profile.json"), "--compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "needs a `specframe bench` directory" in res.output


def test_simulator_carries_a_method_across_datasets_like_the_bench(target, tmp_path):
    """The bench keeps one generator per method over all prompts, so its learned surrogate carries from
    one dataset into the next; the replay builds each method's components once for the whole trace (in
    its order) and matches τ per dataset exactly."""
    from specframe import Registry

    built = []

    class Counting(Registry):  # records every expansion policy the replay builds
        def build(self, kind, name, params, **injected):
            if kind == "expansion":
                built.append(name)
            return super().build(kind, name, params, **injected)

    prompts = [Prompt(str(i), "first" if i < 2 else "second", text=p, chat=False) for i, p in enumerate(PROMPTS)]
    record_trace(target, "ngram", prompts, 30, tmp_path / "trace.jsonl", log=lambda m: None)
    measure_profile(target, [1, 2, 4, 8, 16, 32, 64], [8, 400], 1, tmp_path / "profile.json")
    summary = simulate(tmp_path / "trace.jsonl", ["best-first:8"], str(tmp_path / "profile.json"), tmp_path / "sim", target,
                       registry=Counting())
    gen = SpecGenerator(target, "best-first:8", drafter="ngram")
    live: dict[str, list[int]] = {"first": [0, 0], "second": [0, 0]}
    for p in prompts:
        st = gen.generate([int(w) for w in p.text.split()], 30).stats
        live[p.dataset][0] += sum(r.accepted + 1 for r in st.records)
        live[p.dataset][1] += st.steps
    for ds, (acc, steps) in live.items():
        assert summary["datasets"][ds]["best-first:8"]["tau"] == pytest.approx(acc / steps, abs=1e-12), ds
    assert built == ["root-only", "best-first"]  # ar's and best-first:8's: once per method, not per dataset


def test_profile_restores_the_cache_and_records_host_bookkeeping(target, tmp_path):
    """The profile's bookkeeping probe (verify the logits, keep the path) leaves every session as it
    found it: the same tree at the same context gives the same logits afterwards."""
    from specframe.tree import Tree

    # a scripted clock: per point and round, a gap, then the forward's seconds, then the bookkeeping's
    # (round 0 warms up and is discarded: its 1 s would otherwise be every point's maximum)
    forward = {1: [1.0, 0.007, 0.003, 0.005], 4: [1.0, 0.012, 0.010, 0.011]}
    host = {1: [1.0, 0.0002, 0.0004, 0.0003], 4: [1.0, 0.0015, 0.0009, 0.0012]}
    increments = [d for rnd in range(4) for n in (1, 4) for d in (0.5, forward[n][rnd], host[n][rnd])]
    times = iter(np.cumsum(increments).tolist())
    measure_profile(target, [1, 4], [8], 3, tmp_path / "p.json", clock=lambda: next(times))
    assert next(times, None) is None  # exactly three readings per point and round
    points = {q["n"]: q for q in json.loads((tmp_path / "p.json").read_text())["points"]}
    assert sorted(points) == [1, 4] and {q["c"] for q in points.values()} == {8}
    for n, (ms, lo, hi, host_ms) in {1: (5.0, 3.0, 7.0, 0.3), 4: (11.0, 10.0, 12.0, 1.2)}.items():
        q = points[n]
        assert (q["ms_median"], q["ms_min"], q["ms_max"], q["host_ms_median"]) == pytest.approx((ms, lo, hi, host_ms)), q
    tree = Tree.from_lists([5, 6, 7, 8], [-1, 0, 1, 2])
    session = target.start()
    session.prefill([3] * 8)
    before = session.verify(tree).logits
    session.keep([0, 1, 2], 4)
    assert session.past == 11
    session.truncate(8)
    assert session.past == 8
    assert torch.equal(session.verify(tree).logits, before)


def test_simulated_host_overhead_grows_with_the_tree(target, tmp_path):
    """A profile's per-node bookkeeping column is charged per step on top of the traced overhead: with
    1 ms per node, a method's overhead per step exceeds ar's by at least (mean tree size − 1) ms; a
    profile without the column charges only the policy's own extra work (small, never negative)."""
    prompts = [Prompt(str(i), "toy", text=p, chat=False) for i, p in enumerate(PROMPTS)]
    record_trace(target, "ngram", prompts, 30, tmp_path / "trace.jsonl", log=lambda m: None)
    grid = [(n, c) for n in (1, 2, 4, 8, 16, 32, 64) for c in (0, 1024)]
    (tmp_path / "plain.json").write_text(json.dumps({"points": [
        {"n": n, "c": c, "ms_median": 10.0 + 0.1 * n} for n, c in grid]}))
    (tmp_path / "host.json").write_text(json.dumps({"points": [
        {"n": n, "c": c, "ms_median": 10.0 + 0.1 * n, "host_ms_median": 1.0 * n} for n, c in grid]}))
    kw = dict(overhead_s=0.002)
    plain = simulate(tmp_path / "trace.jsonl", ["best-first:8"], str(tmp_path / "plain.json"), tmp_path / "a",
                     target, **kw)["datasets"]["toy"]
    host = simulate(tmp_path / "trace.jsonl", ["best-first:8"], str(tmp_path / "host.json"), tmp_path / "b",
                    target, **kw)["datasets"]["toy"]
    assert plain["ar"]["overhead_ms_per_step"] == pytest.approx(2.0)
    assert 2.0 <= plain["best-first:8"]["overhead_ms_per_step"] < 3.0
    grown = host["best-first:8"]["overhead_ms_per_step"] - host["ar"]["overhead_ms_per_step"]
    assert grown >= host["best-first:8"]["mean_tree_size"] - 1 - 1e-9
    assert host["best-first:8"]["speedup_vs_ar"] < plain["best-first:8"]["speedup_vs_ar"]
    assert host["best-first:8"]["tau"] == plain["best-first:8"]["tau"]


def _odd_peer_backend():
    """The peers ``odd`` (ar's output with its 4th token changed) and ``served`` (ar's output, with a
    server-style account of itself and a fresh start before each run)."""
    return peer_backend("odd-backend", "odd", "served")


def test_peer_divergences_are_reported_not_failures_and_server_timings_summarised(target, dataset, tmp_path):
    ar = SpecGenerator(target, "ar")
    prepared = []

    def peer(name):
        def run(ids, n, temperature=0.0, top_k=0, top_p=1.0, seed=None):
            out = ar.generate(ids, n).token_ids
            return out[:3] + [(out[3] + 1) % 64] + out[4:] if name == "odd" else out

        run.last_timings = {"predicted_per_second": 100.0, "draft_n": 10, "draft_n_accepted": 4}
        run.prepare = lambda: prepared.append(name)
        return run

    registry = Registry(make_plugin_set(extra=[_odd_peer_backend()]))
    odd = Target(target.model, target.tokenizer, "tiny")
    odd.peer_names, odd.peer, odd.baseline_peers = ("odd", "served"), peer, ("served",)
    summary = run_bench(odd, ["ar", "odd", "served"], [dataset], tmp_path / "b", num_prompts=2, max_new_tokens=8,
                        repeats=2, progress=False, plots=False, registry=registry)
    assert summary["failures"] == []
    assert summary["divergences"] == [{"dataset": "toy", "prompt_id": f"toy-{i}", "method": "odd", "repeat": r,
                                       "first_token": 3} for i in range(2) for r in range(2)]
    assert summary["baselines"] == ["ar", "served"]
    served = summary["datasets"]["toy"]["served"]
    assert served["server_decode_tokens_per_s"] == 100.0 and served["server_draft_acceptance"] == pytest.approx(0.4)
    assert prepared.count("served") == 2 * 2 + 1  # every run (and the warm-up) starts fresh, outside the clock
    report = (tmp_path / "b" / "report.md").read_text()
    assert "- odd: 4 run(s); first difference at token 3 (toy toy-0)" in report
    assert "served 100.0 tokens/s (its drafts accepted 40%)" in report


def test_a_peer_that_raises_is_its_rows_error_and_the_report_splits_draft_and_verify_time(target, dataset, tmp_path):
    """Another program failing (e.g. transformers' assisted generation on some prompts) is that peer's row
    error, named, and the run goes on; the report gives each method's draft and verify ms per step."""

    def peer(name):
        def run(ids, n, temperature=0.0, top_k=0, top_p=1.0, seed=None):
            raise RuntimeError("cannot reshape tensor of 0 elements\nmore lines")

        return run

    registry = Registry(make_plugin_set(extra=[_odd_peer_backend()]))
    odd = Target(target.model, target.tokenizer, "tiny")
    odd.peer_names, odd.peer = ("odd", "served"), peer
    summary = run_bench(odd, ["ar", "odd", "best-first:4@ngram"], [dataset], tmp_path / "b", num_prompts=2,
                        max_new_tokens=8, progress=False, plots=False, registry=registry)
    errors = {f["error"] for f in summary["failures"] if f["method"] == "odd"}
    assert errors == {"peer 'odd' failed: RuntimeError: cannot reshape tensor of 0 elements"}
    entry = summary["datasets"]["toy"]["best-first:4@ngram"]
    report = (tmp_path / "b" / "report.md").read_text()
    assert f"| {entry['draft_ms']:.1f} / {entry['verify_ms']:.1f} |" in report
    assert "| draft / verify ms per step |" in report


# ---------------------------------------------------------------------- a method's own settings
def test_method_labels_carry_their_own_drafter_verifier_and_settings(tiny_target):
    from specframe.errors import SpecframeError
    from specframe.registry import Registry
    from specframe.tools.bench import build_methods, check_methods, parse_method, split_methods

    labels = split_methods("ar,bastion{cost_model.branch_fit=alternate;max_nodes=8},static-tree{topology=2,2,1},"
                           "best-first:4@ngram+multi-draft-wor{budget=3}")
    assert labels == ["ar", "bastion{cost_model.branch_fit=alternate;max_nodes=8}", "static-tree{topology=2,2,1}",
                      "best-first:4@ngram+multi-draft-wor{budget=3}"]
    spec = parse_method(labels[3])
    assert (spec.policy, spec.drafter, spec.verifier, spec.settings) == ("best-first:4", "ngram", "multi-draft-wor",
                                                                         {"budget": 3})
    registry = Registry()
    check_methods(labels, registry)
    methods = {m.label: m.generator for m in build_methods(labels[:3], tiny_target, registry)}
    old = methods[labels[1]].components
    assert old.cost_model.branch_fit == "alternate" and old.expansion.max_nodes == 8
    assert methods[labels[2]].components.expansion.topology == (2, 2, 1)
    for bad, needle in (("bastion{max_nodez=8}", "takes the setting 'max_nodez'"),
                        ("bastion{cost_model.branch_fits=x}", "'cost_model.branch_fits'"),
                        ("bastion{}", "empty settings"), ("bastion{max_nodes=8", "unbalanced braces"),
                        ("bastion{max_nodes=8}@ngram", "settings go last")):
        with pytest.raises(SpecframeError) as err:
            check_methods(split_methods(bad), registry)
        assert needle in str(err.value) and "\n" not in str(err.value), (bad, str(err.value))
