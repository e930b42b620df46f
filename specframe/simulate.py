"""``specframe trace`` / ``specframe simulate`` / ``specframe profile``: hardware what-ifs from one trace.

Greedy acceptance does not depend on hardware: the target's greedy output is fixed, and a drafter's
proposal at a position depends only on the committed prefix. So a trace records, for every position of
the greedy output, the drafter's proposal there (plus measured draft time). Replaying a policy against
that trace reproduces exactly the trees a live run would build (for policies whose choices do not depend
on measured time) and therefore exactly its τ; the latency of each step comes from a cost profile —
a measured table (``profile``) of any device, e.g. an H200 profile — so speedups can be predicted for
hardware you do not have. Results are labelled as simulation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import datasets
from .clock import Clock, real_clock
from .components import (
    Draft,
    Drafter,
    EmptyDraft,
    ExpansionContext,
    MarginalDraft,
    TrieDraft,
)
from .engine import SpecGenerator, resolve_components
from .errors import SpecframeError
from .fit import StepCosts
from .gate import DraftGate, SourceGates
from .registry import Registry
from .target import Target

MAX_MATERIALIZED = 4096


# ---------------------------------------------------------------------- draft (de)serialisation
def serialize_draft(draft: Draft) -> dict:
    """A JSON-able description that :func:`deserialize_draft` turns back into an equivalent draft."""
    from specframe.plugins.hybrid import MergedDraft, _Relabelled

    if isinstance(draft, EmptyDraft) or draft.max_depth == 0:
        return {"kind": "empty"}
    if isinstance(draft, _Relabelled):
        return {"kind": "relabel", "source": draft.source, "inner": serialize_draft(draft.inner)}
    if isinstance(draft, MergedDraft):
        return {"kind": "merged", "parts": [serialize_draft(d) for d in draft.drafts]}
    if isinstance(draft, MarginalDraft):
        rows = [draft.children(None, d) for d in range(draft.max_depth)]
        return {"kind": "marginal", "tokens": [[c.token for c in r] for r in rows],
                "logq": [[round(c.logq, 6) for c in r] for r in rows], "source": rows[0][0].source if rows and rows[0] else 0}
    # any other draft: explore it breadth-first into an explicit trie (bounded)
    tokens, parents, logq, sources = [0], [-1], [0.0], [0]
    frontier = [(0, draft.ROOT, 0)]
    while frontier and len(tokens) < MAX_MATERIALIZED:
        node, handle, depth = frontier.pop(0)
        for cand in draft.children(handle, depth):
            if len(tokens) >= MAX_MATERIALIZED:
                break
            tokens.append(cand.token)
            parents.append(node)
            logq.append(round(cand.logq, 6))
            sources.append(cand.source)
            frontier.append((len(tokens) - 1, cand.handle, depth + 1))
    return {"kind": "trie", "tokens": tokens, "parents": parents, "logq": logq, "sources": sources}


def deserialize_draft(data: dict) -> Draft:
    from specframe.plugins.hybrid import MergedDraft, _Relabelled

    kind = data["kind"]
    if kind == "empty":
        return EmptyDraft()
    if kind == "relabel":
        return _Relabelled(deserialize_draft(data["inner"]), data["source"])
    if kind == "merged":
        return MergedDraft([deserialize_draft(p) for p in data["parts"]])
    if kind == "marginal":
        return MarginalDraft(torch.tensor(data["tokens"]), torch.tensor(data["logq"]), source=data.get("source", 0))
    if kind == "trie":
        return _SourcedTrie(data["tokens"], data["parents"], data["logq"], data["sources"])
    raise SpecframeError(f"unknown draft kind '{kind}' in trace")


class _SourcedTrie(TrieDraft):
    def __init__(self, tokens, parents, logq, sources):
        super().__init__(tokens, parents, logq)
        for row in self._kids:
            row[:] = [c._replace(source=sources[c.handle]) for c in row]


# ---------------------------------------------------------------------- recording
class _Recorder(Drafter):
    """Wraps a drafter; records its proposal (and time) at every position."""

    def __init__(self, inner: Drafter, clock: Clock = real_clock):
        self.inner, self.name, self.clock = inner, getattr(inner, "name", "drafter"), clock
        self.feature_layers, self.max_depth = inner.feature_layers, inner.max_depth
        self.steps: list[dict] = []

    def start(self, prompt_ids, features):
        self.steps = []
        self.inner.start(prompt_ids, features)

    def commit(self, tokens, features):
        self.inner.commit(tokens, features)

    def propose(self, context_ids, max_depth):
        t0 = self.clock()
        draft = self.inner.propose(context_ids, max_depth)  # the same bound a live step at this position gets
        step = {"draft": serialize_draft(draft), "draft_s": self.clock() - t0}
        parts = getattr(self.inner, "source_seconds", None)  # a composite drafter: each source's seconds
        if parts is not None:
            step["draft_s_parts"] = parts
        self.steps.append(step)
        return EmptyDraft()  # the recording run itself decodes plainly


def record_trace(target: Target, drafter: str | None, prompts: list[datasets.Prompt], max_new_tokens: int,
                 out: Path, registry: Registry | None = None, log=print, clock: Clock = real_clock) -> Path:
    """One plain greedy pass per prompt, recording the drafter's proposal at every position."""
    registry = registry or Registry()
    # every source at every position: a composite drafter's draft gate would skip sources under "ar"
    comps = resolve_components(registry, target, "bastion", drafter, {"drafter.gate": False}, strict=False,
                               clock=clock)
    rec = _Recorder(comps.drafter, clock)
    gen = SpecGenerator(target, "ar", drafter=rec, registry=registry, clock=clock)
    with open(out, "w") as fh:
        for p in prompts:
            ids = datasets.encode(p, target)
            res = gen.generate(ids, max_new_tokens)
            verify = [r.verify_s for r in res.stats.records]
            fh.write(json.dumps({
                "dataset": p.dataset, "prompt_id": p.id, "prompt_len": len(ids), "output": res.token_ids,
                "drafter": comps.names["drafter"], "steps": rec.steps, "ar_verify_s": verify,
                "overhead_s": [r.overhead_s for r in res.stats.records],
            }) + "\n")
            log(f"trace: {p.dataset} {p.id}: {len(res.token_ids)} tokens")
    return out


# ---------------------------------------------------------------------- replay
@dataclass
class SimResult:
    tokens: int = 0
    accepted_plus_bonus: int = 0
    steps: int = 0
    seconds: float = 0.0
    sizes: list[int] = field(default_factory=list)  # tree size of every step
    overhead_s: float = 0.0  # host overhead charged (part of ``seconds``)

    def add(self, other: "SimResult") -> None:
        self.tokens += other.tokens
        self.accepted_plus_bonus += other.accepted_plus_bonus
        self.steps += other.steps
        self.seconds += other.seconds
        self.sizes += other.sizes
        self.overhead_s += other.overhead_s

    @property
    def tau(self) -> float:
        return self.accepted_plus_bonus / self.steps if self.steps else 0.0


def replay(row: dict, comps, cost, overhead: Overhead, ar: bool = False, draft_s: float | None = None,
           gate: DraftGate | None = None, learned: StepCosts | None = None, clock: Clock = real_clock) -> SimResult:
    """Replay one traced prompt with a policy's expansion policy and surrogate; latency from ``cost``,
    host overhead from ``overhead`` (given the policy's own work, timed here). ``gate``: the policy's
    draft gate, fed the simulated step times as the engine feeds it real ones; ``learned``: the step costs
    learned so far (kept across the prompts of one method, as the engine keeps them per generator)."""
    out, plen = row["output"], row["prompt_len"]
    res = SimResult()
    pos = 0  # committed output tokens so far; the root is the last committed token
    learned = learned if learned is not None else StepCosts()
    while pos < len(out):
        context = plen + pos - 1  # tokens in the target cache (the root is not)
        remaining = len(out) - pos
        step = row["steps"][pos]
        if isinstance(gate, SourceGates):  # a composite drafter gating its sources, as it does live
            drafting = True
            ran = gate.want()
            draft, part_s = _gated_sources(step, ran, draft_s)
            drafted_s = sum(part_s)
        else:
            drafting = not ar and (gate is None or gate.want())
            draft = deserialize_draft(step["draft"]) if drafting else EmptyDraft()
            drafted_s = (step["draft_s"] if draft_s is None else draft_s) if drafting else 0.0
        root = out[pos - 1] if pos else 0  # the root's token never affects acceptance
        ctx = ExpansionContext(root, context, 512, remaining - 1, comps.surrogate, comps.cost_model,
                               learned.fixed_seconds, learned.per_node)
        t0 = clock()
        built = comps.expansion.expand(draft, ctx)
        host_s = clock() - t0
        tree = built.tree
        kids = tree.children()
        tokens = tree.tokens.tolist()
        node, path = 0, [0]
        while pos + len(path) - 1 < len(out):
            nxt = out[pos + len(path) - 1]
            child = next((k for k in kids[node] if tokens[k] == nxt), None)
            if child is None:
                break
            node = child
            path.append(node)
        committed = min(len(path), remaining)
        seconds = cost.predict(tree.size, context)
        t0 = clock()
        comps.surrogate.observe(tree, path, built.scores)
        comps.cost_model.observe(tree.size, context, seconds)
        host_s += clock() - t0
        spent = drafted_s + overhead.step(tree.size, host_s)
        res.overhead_s += spent - drafted_s
        if drafting:
            learned.observe(tree.size, drafted_s, spent - drafted_s)
        if isinstance(gate, SourceGates):
            gate.record(ran, part_s, committed, seconds + spent)
        elif gate is not None:
            gate.record(drafting, committed, seconds + spent, drafted_s)
        res.seconds += seconds + spent
        res.tokens += committed
        res.accepted_plus_bonus += len(path)
        res.steps += 1
        res.sizes.append(tree.size)
        pos += committed
    return res


def _gated_sources(step: dict, ran: list[bool], draft_s: float | None) -> tuple[Draft, list[float]]:
    """A composite drafter's step with only the sources in ``ran``: their merged draft and each source's
    draft seconds (0 for one that did not run). ``draft_s`` (the simulated device's draft time of a step
    where every source runs) is split in the traced proportions."""
    parts_s = step.get("draft_s_parts")
    if parts_s is None or len(parts_s) != len(ran):
        raise SpecframeError("this trace has no per-source draft times; record it again with `specframe trace`")
    if draft_s is not None:
        total = sum(parts_s)
        parts_s = [draft_s * t / total if total > 0 else draft_s / len(parts_s) for t in parts_s]
    part_s = [t if r else 0.0 for t, r in zip(parts_s, ran)]
    data = step["draft"]
    if data["kind"] != "merged":  # no source had anything to propose
        return EmptyDraft(), part_s
    from specframe.plugins.hybrid import MergedDraft

    parts = [deserialize_draft(p) if r else EmptyDraft() for p, r in zip(data["parts"], ran)]
    if all(isinstance(p, EmptyDraft) for p in parts):
        return EmptyDraft(), part_s
    return MergedDraft(parts), part_s


def _gate_for(expansion, rows: list[dict]):
    """The draft gate a policy runs with: none; one for the whole drafter (the engine's); or, for a trace
    of a composite drafter with per-source draft times, one per source (as the hybrid drafter gates its
    own sources live)."""
    if not getattr(expansion, "gates_drafting", False):
        return None
    first = rows[0]["steps"][0] if rows and rows[0]["steps"] else {}
    if "draft_s_parts" in first:
        return SourceGates(len(first["draft_s_parts"]))
    return DraftGate()


class Overhead:
    """Host time of a simulated step besides drafting and the forward: the traced per-step overhead
    (``base``, measured at n = 1 while tracing), plus what a bigger tree adds — the policy's own work
    (expansion and observers, timed while replaying, beyond what ``ar``'s took) and the target-side
    bookkeeping of its n nodes beyond one (the profile's ``host_ms_median`` column, when it has one)."""

    def __init__(self, base: float, host: Callable[[int], float] | None):
        self.base, self.host = base, host
        self.reference = None  # ar's median replay host time per step; None while replaying ar itself
        self._ar_host: list[float] = []

    def step(self, n: int, host_s: float) -> float:
        if self.reference is None:
            self._ar_host.append(host_s)
            policy = 0.0
        else:
            policy = max(0.0, host_s - self.reference)
        nodes = max(0.0, self.host(n) - self.host(1)) if self.host is not None else 0.0
        return self.base + policy + nodes

    def set_reference(self) -> None:
        """Called once ``ar`` has been replayed: later policies are charged their work beyond its."""
        ts = sorted(self._ar_host)
        self.reference = ts[len(ts) // 2] if ts else 0.0


def host_table(profile: Path):
    """n → seconds of the target-side bookkeeping of an n-node tree (median over the profile's contexts),
    or None when the profile has no ``host_ms_median`` column (e.g. a device profile)."""
    points = json.loads(Path(profile).read_text())["points"]
    if not all("host_ms_median" in q for q in points):
        return None
    ns = sorted({int(q["n"]) for q in points})
    med = [float(np.median([q["host_ms_median"] for q in points if int(q["n"]) == n])) / 1000 for n in ns]
    med = list(np.maximum.accumulate(med))  # non-decreasing in n
    return lambda n: float(np.interp(n, ns, med))


def simulate(trace: Path, labels: list[str], profile: str, out_dir: Path, target_config_target: Target | None = None,
             registry: Registry | None = None, overhead_s: float | None = None, draft_s: float | None = None,
             compare: Path | None = None, clock: Clock = real_clock) -> dict:
    """Replay every method over the trace with latencies from ``profile``; write summary.json and report.md.

    ``draft_s`` replaces the traced (measured here) draft time per step — set it when the simulated device
    drafts at a different speed than the machine that recorded the trace. ``compare``: a ``specframe
    bench`` directory measured on the profiled machine; the report then sets the simulated τ and speedup
    beside the measured ones on the traced prompts (the simulator's own validation)."""
    from specframe.plugins.cost_models import ProfileCost

    registry = registry or Registry()
    rows = [json.loads(line) for line in Path(trace).read_text().splitlines() if line.strip()]
    if not rows:
        raise SpecframeError(f"trace {trace} is empty")
    cost = ProfileCost(profile)
    if overhead_s is None:
        over = [o for r in rows for o in r.get("overhead_s", [])]
        overhead_s = sorted(over)[len(over) // 2] if over else 0.0
    overhead = Overhead(overhead_s, host_table(Path(profile)))
    summary: dict = {"profile": str(profile), "trace": str(trace), "overhead_s": overhead_s, "draft_s": draft_s,
                     "host_per_node": overhead.host is not None, "datasets": {}}
    datasets_in_order = list(dict.fromkeys(r["dataset"] for r in rows))
    tables: dict[str, dict] = {ds: {} for ds in datasets_in_order}
    for label in ["ar"] + [lab for lab in labels if lab != "ar"]:
        # one set of components per method over the whole trace, in its order — as `bench` keeps one
        # generator per method over all prompts — so the learned surrogate carries across datasets alike
        comps = _sim_components(registry, target_config_target, label, cost, rows[0])
        gate = _gate_for(comps.expansion, rows)
        learned = StepCosts()
        totals = {ds: SimResult() for ds in datasets_in_order}
        for r in rows:
            totals[r["dataset"]].add(replay(r, comps, cost, overhead, ar=label == "ar", draft_s=draft_s, gate=gate,
                                                learned=learned, clock=clock))
        if label == "ar":
            overhead.set_reference()
        for ds, total in totals.items():
            tables[ds][label] = {"tau": total.tau, "mean_tree_size": float(np.mean(total.sizes)),
                                 "median_tree_size": float(np.median(total.sizes)),
                                 "p90_tree_size": float(np.percentile(total.sizes, 90)),
                                 "max_tree_size": max(total.sizes), "tokens_per_s": total.tokens / total.seconds,
                                 "steps": total.steps, "overhead_ms_per_step": 1000 * total.overhead_s / total.steps}
    for ds, table in tables.items():
        for label in table:
            table[label]["speedup_vs_ar"] = table[label]["tokens_per_s"] / table["ar"]["tokens_per_s"]
        summary["datasets"][ds] = table
    if compare is not None:
        summary["validation"] = validate_against(summary, rows, Path(compare))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "report.md").write_text(render(summary, rows))
    return summary


def validate_against(summary: dict, trace_rows: list[dict], bench_dir: Path) -> dict:
    """Measured τ and speedup vs ar (decode time, prefill excluded, as simulated) of the bench run in
    ``bench_dir`` on the traced prompts, beside the simulated ones, per dataset and method. A simulated
    method is matched to the bench method that ran the trace's drafter: ``LABEL@DRAFTER``, or ``LABEL``
    when the bench resolved that label to the same drafter."""
    results, meta = bench_dir / "results.jsonl", bench_dir / "summary.json"
    for f in (results, meta):
        if not f.is_file():
            raise SpecframeError(f"--compare needs a `specframe bench` directory; {f} is missing")
    live = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    components = json.loads(meta.read_text()).get("components", {})
    drafter = trace_rows[0]["drafter"]
    traced = {(r["dataset"], r["prompt_id"]) for r in trace_rows}
    out: dict = {"bench": str(bench_dir), "datasets": {}}
    for ds, table in summary["datasets"].items():
        agg: dict[str, list[float]] = {}
        for r in live:
            if r["dataset"] == ds and (ds, r["prompt_id"]) in traced and not r.get("error") and r.get("decoding_steps"):
                a = agg.setdefault(r["method"], [0, 0.0, 0, 0, set()])
                a[0] += r["new_tokens"]
                a[1] += r["wall_time"] - r.get("prefill_time", 0.0)
                a[2] += sum(r["accept_lengths"])
                a[3] += r["decoding_steps"]
                a[4].add(r["prompt_id"])
        if "ar" not in agg:
            continue
        ar_rate = agg["ar"][0] / agg["ar"][1]
        rows = {}
        for lab, sim in table.items():
            key = next((k for k in (f"{lab}@{drafter}", lab) if k in agg
                        and (k == "ar" or components.get(k, {}).get("drafter", drafter) == drafter)), None)
            if key is None:
                continue
            tokens, secs, acc, steps, prompts = agg[key]
            speed = tokens / secs / ar_rate
            rows[lab] = {"bench_method": key, "prompts": len(prompts), "tau": acc / steps, "speedup_vs_ar": speed,
                         "sim_tau": sim["tau"], "sim_speedup_vs_ar": sim["speedup_vs_ar"],
                         "speedup_error": sim["speedup_vs_ar"] / speed - 1}
        out["datasets"][ds] = rows
    return out


def _sim_components(registry, target, label, cost, row):
    """The policy's expansion and surrogate; its cost model sees the simulated device: a roofline is
    calibrated on the profile (as it would calibrate online there), other cost models are kept."""
    comps = resolve_components(registry, target, "ar" if label == "ar" else label, drafter="none")
    name = comps.names["cost_model"]
    if name == "roofline":
        comps.cost_model.calibrate(lambda n: cost.predict(n, max(row["prompt_len"], 1)), max(row["prompt_len"], 1))
    return comps


def render(summary: dict, rows: list[dict]) -> str:
    lines = ["# specframe SIMULATION report", "",
             "**This is a simulation**, not a measurement: the greedy acceptance trace below was recorded on the real "
             "target and drafter, and each step's verification latency comes from the cost profile "
             f"`{Path(summary['profile']).name}`; draft time per step is "
             + ("the one measured while tracing" if summary.get("draft_s") is None else f"{1000 * summary['draft_s']:.1f} ms (given)")
             + f"; host overhead {1000 * summary['overhead_s']:.1f} ms per step at n = 1 (traced), plus the policy's "
             "own expansion work beyond `ar`'s (timed while replaying, on the machine that ran the simulation)"
             + (" and the target-side bookkeeping per tree node (profile)" if summary.get("host_per_node") else "")
             + ".", "",
             f"- trace: {len(rows)} prompts, drafter `{rows[0]['drafter']}`, {sum(len(r['output']) for r in rows)} tokens", ""]
    for ds, table in summary["datasets"].items():
        lines += [f"## {ds}", "", "| method | τ | tree size: mean · median · p90 · max | host overhead ms/step "
                  "| simulated tokens/s | simulated speedup vs ar |", "|---|---|---|---|---|---|"]
        for lab, e in table.items():
            sizes = f"{e['mean_tree_size']:.1f} · {e['median_tree_size']:g} · {e['p90_tree_size']:g} · {e['max_tree_size']}"
            over = f"{e['overhead_ms_per_step']:.1f}" if "overhead_ms_per_step" in e else "–"
            lines.append(f"| {lab} | {e['tau']:.2f} | {sizes} | {over} | {e['tokens_per_s']:.1f} | {e['speedup_vs_ar']:.2f}× |")
        lines.append("")
    val = summary.get("validation")
    if val:
        lines += ["## Simulated vs measured", "",
                  f"Measured: `{val['bench']}` on the traced prompts (decode time; prefill excluded as in the simulation).", ""]
        for ds, rows in val["datasets"].items():
            lines += [f"### {ds}", "", "| method (bench) | prompts | τ sim / measured | speedup sim / measured | speedup error |",
                      "|---|---|---|---|---|"]
            for lab, e in rows.items():
                lines.append(f"| {lab} ({e['bench_method']}) | {e['prompts']} | {e['sim_tau']:.3f} / {e['tau']:.3f} | "
                             f"{e['sim_speedup_vs_ar']:.2f}× / {e['speedup_vs_ar']:.2f}× | {100 * e['speedup_error']:+.1f} % |")
            lines.append("")
        errs = [(abs(e["speedup_error"]), lab, ds) for ds, rows in val["datasets"].items() for lab, e in rows.items() if lab != "ar"]
        if errs:
            worst = max(errs)
            lines += [f"Largest speedup error: {100 * worst[0]:.1f} % ({worst[1]}, {worst[2]}). Fixed-budget policies "
                      "replay to the measured τ exactly with a deterministic drafter (prompt lookup); a neural "
                      "drafter reads features from a tree forward live and from a one-token forward in the trace, "
                      "which differ in the last bits and can swap near-tied candidates. BASTION's trees and draft "
                      "gate follow the (simulated or measured) step times, so its τ agrees only approximately.", ""]
    return "\n".join(lines) + "\n"


def measure_profile(target: Target, ns: list[int], contexts: list[int], repeats: int, out: Path,
                    clock: Clock = real_clock) -> Path:
    """Median verify latency of chain trees of n tokens at context c on this machine (profile JSON), and
    the host's bookkeeping after each forward (verifying the logits, keeping the path: ``host_ms_median``).

    Points are measured round-robin — every (c, n) once per round, ``repeats`` rounds after a discarded
    warm-up round — so a drift of the machine (another process, clock changes) spreads over all points
    instead of skewing the ones measured during it."""
    from specframe.plugins.verifiers import GreedyVerifier

    from .tree import Tree

    if max(contexts) + max(ns) > target.max_context:
        raise SpecframeError(f"context {max(contexts)} + n {max(ns)} exceeds the target's context ({target.max_context})")
    sessions = {}
    for c in contexts:
        sessions[c] = target.start()
        sessions[c].prefill([0] * c)
    trees = {n: Tree.from_lists([0] * n, list(range(-1, n - 1))) for n in ns}
    verifier = GreedyVerifier()
    times: dict[tuple[int, int], list[float]] = {(n, c): [] for c in contexts for n in ns}
    host: dict[tuple[int, int], list[float]] = {(n, c): [] for c in contexts for n in ns}
    for rnd in range(repeats + 1):
        for c in contexts:
            for n in ns:
                target.synchronize()
                t0 = clock()
                fwd = sessions[c].verify(trees[n])
                target.synchronize()
                t1 = clock()
                # the engine's bookkeeping of an n-node tree after the forward: verify the logits, keep the path
                path = verifier.verify(trees[n], fwd.logits, None).path
                sessions[c].keep(path, n)
                t2 = clock()
                if rnd:  # round 0 warms every shape up
                    times[(n, c)].append(t1 - t0)
                    host[(n, c)].append(t2 - t1)
                sessions[c].truncate(c)
    points = []
    for (n, c), ts in times.items():
        ts, hs = sorted(ts), sorted(host[(n, c)])
        points.append({"n": n, "c": c, "ms_median": 1000 * ts[len(ts) // 2], "ms_min": 1000 * ts[0],
                       "ms_max": 1000 * ts[-1], "host_ms_median": 1000 * hs[len(hs) // 2]})
    out.write_text(json.dumps({"model": target.name, "dtype": str(target.dtype), "device": str(target.device),
                               "repeats": repeats, "points": points}, indent=2))
    return out
