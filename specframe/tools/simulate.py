"""``specframe simulate``: the real engine over a recorded trace, on a simulated device.

The simulator is a target backend plus a drafter, nothing more: :class:`SimTarget`'s sessions answer every
verification from the trace — row i of the logits is one-hot at the target's traced greedy token after
node i, for the nodes on the traced line (the greedy verifier never walks off it) — and advance a
:class:`~specframe.clock.ManualClock` by the device's measured latency table (``profile``: ``{n, c, ms}``)
per forward and by the traced host time per step; :class:`~specframe.tools.trace.TraceDrafter` proposes the
traced drafts and advances the clock by their traced draft seconds. :class:`~specframe.engine.SpecGenerator`
then runs every policy over them — the same draft → expand → verify → commit loop, learning and draft
gates as a live run, fed the simulated seconds. So a greedy policy builds exactly the trees it builds live
(for every policy, given the same clock) and a change to the engine cannot leave the simulator behind.
Results are labelled as simulation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..backends import Capabilities
from ..clock import ManualClock
from ..components import CostModel, RunStats
from ..engine import SpecGenerator
from ..errors import SpecframeError
from ..registry import Registry
from ..tree import Tree
from .profile import host_table
from .trace import TraceDrafter, TraceRow, read_trace, source_count


class SimTarget:
    """A target backend that replays one traced row at a time (:meth:`replay`) on a simulated device.

    Model facts (shape, hidden size, device, ...) are those of ``model``, the traced target (for the
    roofline cost model), when given. ``overhead_s``: host seconds of a one-node step besides drafting and
    the forward; ``host(n)``: the target-side bookkeeping of an n-node tree (the profile's column), whose
    growth beyond n = 1 each step adds."""

    backend = "sim"
    eos_token_ids: tuple[int, ...] = ()  # a replay ends where its traced output ends
    sliding_window = None
    has_chat_template = False

    def __init__(self, profile: CostModel, clock: ManualClock, overhead_s: float,
                 host: Callable[[int], float] | None = None, model=None, vocab_size: int | None = None):
        self.profile, self.clock, self.overhead_s, self.host = profile, clock, overhead_s, host
        self.capabilities = Capabilities(tree_attention=True, features=False,
                                         max_tree_tokens=getattr(profile, "max_tokens", None))
        self.name = f"simulated {getattr(model, 'name', 'target')}"
        self.vocab_size = vocab_size or model.vocab_size
        self.max_context = 1 << 30  # the profile's own range is checked where it is read
        for fact in ("shape", "config", "device", "dtype", "num_layers", "hidden_size"):
            setattr(self, fact, getattr(model, fact, None))
        self.hidden_size = self.hidden_size or 1
        self.row: TraceRow | None = None

    def replay(self, row: TraceRow) -> list[int]:
        """Sessions started from now on replay ``row``; its prompt (token ids carry nothing but length)."""
        self.row = row
        return [0] * row.prompt_len

    def start(self, feature_layers: tuple[int, ...] = ()) -> "SimSession":
        if self.row is None:
            raise SpecframeError("the simulated target has no traced row to replay")
        return SimSession(self, self.row)

    def open_batch(self, max_batch: int, feature_layers: tuple[int, ...] = ()) -> "SimRoom":
        return SimRoom(self, max_batch)

    def step_overhead(self, n: int) -> float:
        """Host seconds of a step with an n-node tree besides drafting and the forward."""
        grown = self.host(n) - self.host(1) if self.host is not None else 0.0
        return self.overhead_s + max(0.0, grown)

    def encode(self, text: str, chat: bool | None = None) -> list[int]:
        raise SpecframeError("the simulated target replays traced token ids; it has no tokenizer")

    def decode(self, ids: list[int]) -> str:
        return ""

    def synchronize(self) -> None:
        pass


class SimForward:
    def __init__(self, logits: torch.Tensor):
        self.logits, self.features = logits, None


class SimSession:
    """One traced row's cache: ``past`` tokens, of which the first ``prompt_len - 1`` are the prompt's."""

    def __init__(self, target: SimTarget, row: TraceRow):
        self.target, self.row, self.past = target, row, 0

    def prefill(self, ids: list[int]) -> None:
        self.past += len(ids)  # prefill is not part of the simulated decoding time

    def verify(self, tree: Tree) -> SimForward:
        self.target.clock.advance(self.target.profile.predict(tree.size, self.past))
        pos = self.past - (self.row.prompt_len - 1)  # output tokens committed so far; the root is the last
        return SimForward(traced_logits(tree, self.row.output[pos:]))

    def keep(self, path: list[int], tree_size: int) -> None:
        self.past += len(path)
        self.target.clock.advance(self.target.step_overhead(tree_size))

    def rollback(self, n: int) -> None:
        pass  # a verification adds nothing to ``past`` until keep()

    def truncate(self, length: int) -> None:
        self.past = min(self.past, length)


class SimRoom:
    """The simulated device's batch room: one forward verifies every request's tree. It costs the profile's
    time for all N tokens of the call at the requests' token-weighted mean context (weights are read once;
    each request's tokens attend over its own cache), as a GPU batch does."""

    batched = True
    max_tree_tokens = None

    def __init__(self, target: SimTarget, max_batch: int):
        self.target, self.capacity = target, int(max_batch)
        self.note = "simulated: one forward for the batch, priced by the profile at N tokens and the mean context"

    def start(self) -> SimSession:
        return self.target.start()

    def cost_context(self, pasts: list[int]) -> int:
        return round(sum(pasts) / len(pasts))

    def verify(self, items) -> list[SimForward]:
        n = sum(tree.size for _, tree in items)
        context = sum(s.past * tree.size for s, tree in items) / n
        self.target.clock.advance(self.target.profile.predict(n, round(context)))
        return [SimForward(traced_logits(tree, s.row.output[s.past - (s.row.prompt_len - 1):])) for s, tree in items]


def traced_logits(tree: Tree, line: list[int]) -> torch.Tensor:
    """``(n, V')`` logits whose argmax after each node on the traced greedy line (the root's path matching
    ``line``) is the traced next token ``line[depth]``; rows of other nodes, which a greedy walk never
    reaches, are zero. V' = the largest such token + 1."""
    tokens, parents, depths = tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist()
    on = [True] * tree.size
    for i in range(1, tree.size):
        d = depths[i]
        on[i] = on[parents[i]] and d <= len(line) and tokens[i] == line[d - 1]
    rows = [i for i in range(tree.size) if on[i] and depths[i] < len(line)]
    best = [line[depths[i]] for i in rows]
    logits = torch.zeros(tree.size, max(best, default=0) + 1, dtype=torch.uint8)
    logits[rows, best] = 1
    return logits


# ---------------------------------------------------------------------- running the engine over a trace
def simulate(trace: Path, labels: list[str], profile: str, out_dir: Path, model=None, registry: Registry | None = None,
             overhead_s: float | None = None, draft_s: float | None = None, compare: Path | None = None,
             node_s: float | None = None, batch: int = 1) -> dict:
    """Run every method over the trace on the device of ``profile``; write summary.json and report.md.

    ``model``: the traced target (its shape for the roofline cost model). ``overhead_s`` replaces the
    traced host seconds of a one-node step, ``draft_s`` the traced draft seconds per step — set it when
    the simulated device drafts at a different speed than the machine that recorded the trace.
    ``node_s``: the simulated host's seconds per tree node beyond one (building, verifying and keeping
    it), in place of the profile's ``host_ms_median`` column (a device profile may have none).
    ``compare``: a ``specframe bench`` directory measured on the profiled machine; the report then sets
    the simulated τ and speedup beside the measured ones on the traced prompts. ``batch`` > 1: the traced
    prompts of a dataset are served as ``batch`` concurrent requests (continuous batching: a finished one is
    replaced by the next), every step's trees verified in one simulated forward; tokens/s is the batch's."""
    registry = registry or Registry()
    rows = read_trace(trace)
    cost = registry.build("cost_model", "profile", {"path": str(profile)})
    if overhead_s is None:
        overhead_s = _median([o for r in rows for o in r.overhead_s])
    host = host_table(Path(profile)) if node_s is None else (lambda n: node_s * n)
    summary: dict = {"profile": str(profile), "trace": str(trace), "overhead_s": overhead_s, "draft_s": draft_s,
                     "host_per_node": host is not None, "node_s": node_s, "batch": batch, "datasets": {}}
    tables: dict[str, dict] = {r.dataset: {} for r in rows}
    for label in ["ar"] + [lab for lab in labels if lab != "ar"]:
        target = SimTarget(cost, ManualClock(), overhead_s, host, model, None if model else _vocab(rows))
        if batch > 1:
            for ds, row in run_batched(label, rows, target, registry, draft_s, batch).items():
                tables[ds][label] = row
            continue
        for ds, runs in run_method(label, rows, target, registry, draft_s).items():
            tables[ds][label] = method_row(runs)
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


def run_method(label: str, rows: list[TraceRow], target: SimTarget, registry: Registry,
               draft_s: float | None) -> dict[str, list[RunStats]]:
    """One generator for the method over every row, in the trace's order (as `bench` keeps one generator
    per method over all prompts, so what it learns carries across datasets alike); stats per dataset."""
    gen = replay_generator(label, rows, target, registry, draft_s)
    out: dict[str, list[RunStats]] = {}
    for row in rows:
        if row.output:
            out.setdefault(row.dataset, []).append(gen.generate(target.replay(row), len(row.output)).stats)
    return out


def run_batched(label: str, rows: list[TraceRow], target: SimTarget, registry: Registry, draft_s: float | None,
                batch: int) -> dict[str, dict]:
    """The method serving each dataset's traced prompts as ``batch`` concurrent requests (one generator for
    all, as a server keeps one): per dataset, its line of the report, tokens/s over the batch's clock."""
    from ..batch import BatchGenerator, BatchRequest

    runner = BatchGenerator(replay_generator(label, rows, target, registry, draft_s), batch)
    out: dict[str, dict] = {}
    for ds in dict.fromkeys(r.dataset for r in rows):
        todo = [r for r in rows if r.dataset == ds and r.output]
        done: list[BatchRequest] = []
        traced: dict[int, list[int]] = {}
        started = target.clock() + runner.calibration_s  # (a calibration during the run is not decoding time)
        while todo or runner.busy:
            while todo and runner.has_room():
                row = todo.pop(0)
                req = BatchRequest(target.replay(row), len(row.output))
                runner.submit(req)
                traced[id(req)] = row.output
            done += runner.step()
        if any(r.token_ids != traced[id(r)] for r in done):  # the engine's exactness, in a batch
            raise SpecframeError(f"method '{label}' did not replay the trace exactly in a batch of {batch}")
        runs = [r.stats for r in done]
        line = method_row(runs)
        line["tokens_per_s"] = sum(st.new_tokens for st in runs) / (target.clock() - started - runner.calibration_s)
        line["mean_batch"] = float(np.mean([r.batch for st in runs for r in st.records]))
        out[ds] = line
    return out


def replay_generator(label: str, rows: list[TraceRow], target: SimTarget, registry: Registry,
                     draft_s: float | None) -> SpecGenerator:
    """The method's generator on the simulated target, the trace's drafts standing in for any drafter the
    label names."""
    from .bench import parse_method

    spec = parse_method(label)
    drafter = None
    if registry.policy(spec.policy.partition(":")[0]).drafter != "none":
        drafter, registry = trace_drafter(registry, target, rows, draft_s)
    return SpecGenerator(target, spec.policy, drafter=drafter, registry=registry, clock=target.clock,
                         params=spec.settings, strict_params=False)


def trace_drafter(registry: Registry, target: SimTarget, rows: list[TraceRow], draft_s: float | None):
    """The drafter that replays the trace, and the registry to build the generator with. A composite
    drafter's trace (e.g. ``hybrid``) replays through that very drafter with each source a
    :class:`TraceDrafter` of its part, so it gates its sources as it does live (when the trace has each
    source's seconds; else it merges every source and the engine's gate, if any, gates the whole)."""
    sources = source_count(rows)
    if not sources:
        return TraceDrafter(target, target.clock, None, draft_s), registry

    def part(path: str = "0") -> TraceDrafter:  # "trace:I" builds source I
        return TraceDrafter(target, target.clock, int(path), draft_s)

    extended = registry.extended("drafter", "trace", part, "simulate")
    timed = any("draft_s_parts" in s for r in rows for s in r.steps)
    params = {"sources": ",".join(f"trace:{i}" for i in range(sources)), "gate": timed}
    drafter = extended.build("drafter", rows[0].drafter.partition(":")[0], params, target=target,
                             registry=extended, clock=target.clock)
    return drafter, extended


def method_row(runs: list[RunStats]) -> dict:
    """A method's line of the report from its generations' stats (decode time: prefill is not simulated)."""
    records = [r for st in runs for r in st.records]
    sizes = [r.tree_size for r in records]
    seconds = sum(st.wall_s - st.prefill_s for st in runs)
    return {"tau": sum(r.accepted + 1 for r in records) / len(records), "mean_tree_size": float(np.mean(sizes)),
            "median_tree_size": float(np.median(sizes)), "p90_tree_size": float(np.percentile(sizes, 90)),
            "max_tree_size": max(sizes), "tokens_per_s": sum(st.new_tokens for st in runs) / seconds,
            "steps": len(records), "overhead_ms_per_step": 1000 * sum(r.overhead_s for r in records) / len(records),
            "drafted_share": sum(r.drafted for r in records) / len(records)}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def _vocab(rows: list[TraceRow]) -> int:
    """A vocabulary that holds every traced token (when no model gives the real one)."""
    tokens = [t for r in rows for t in r.output] + [t for r in rows for s in r.steps for t in _draft_tokens(s["draft"])]
    return max(tokens, default=0) + 1


def _draft_tokens(data: dict) -> list[int]:
    kind = data["kind"]
    if kind == "merged":
        return [t for p in data["parts"] for t in _draft_tokens(p)]
    if kind == "relabel":
        return _draft_tokens(data["inner"])
    if kind == "marginal":
        return [t for row in data["tokens"] for t in row]
    return list(data.get("tokens", []))


# ---------------------------------------------------------------------- report
def validate_against(summary: dict, trace_rows: list[TraceRow], bench_dir: Path) -> dict:
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
    drafter = trace_rows[0].drafter
    traced = {(r.dataset, r.prompt_id) for r in trace_rows}
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


def _node_text(summary: dict) -> str:
    if summary.get("node_s") is not None:
        return f", plus {1000 * summary['node_s']:.3f} ms per tree node beyond one (given)"
    return ", plus the target-side bookkeeping per tree node beyond one (profile)" if summary.get("host_per_node") else ""


def render(summary: dict, rows: list[TraceRow]) -> str:
    lines = ["# specframe SIMULATION report", "",
             "**This is a simulation**, not a measurement: the greedy acceptance trace below was recorded on the real "
             "target and drafter, and each step's verification latency comes from the cost profile "
             f"`{Path(summary['profile']).name}`; draft time per step is "
             + ("the one measured while tracing" if summary.get("draft_s") is None else f"{1000 * summary['draft_s']:.1f} ms (given)")
             + f"; host overhead {1000 * summary['overhead_s']:.1f} ms per step at n = 1 (traced)"
             + _node_text(summary)
             + ". Every method runs the real engine (`SpecGenerator`) on this simulated clock."
             + (f" **Batch of {summary['batch']}**: each dataset's prompts are served as {summary['batch']} concurrent "
                "requests (continuous batching, `specframe.batch`), one simulated forward per step verifying all their "
                "trees, priced at the call's N tokens and the token-weighted mean context; tokens/s is the batch's."
                if summary.get("batch", 1) > 1 else ""), "",
             f"- trace: {len(rows)} prompts, drafter `{rows[0].drafter}`, {sum(len(r.output) for r in rows)} tokens", ""]
    for ds, table in summary["datasets"].items():
        lines += [f"## {ds}", "", "| method | τ | tree size: mean · median · p90 · max | host overhead ms/step "
                  "| simulated tokens/s | simulated speedup vs ar |", "|---|---|---|---|---|---|"]
        for lab, e in table.items():
            sizes = f"{e['mean_tree_size']:.1f} · {e['median_tree_size']:g} · {e['p90_tree_size']:g} · {e['max_tree_size']}"
            over = f"{e['overhead_ms_per_step']:.1f}" if "overhead_ms_per_step" in e else "–"
            lines.append(f"| {lab} | {e['tau']:.2f} | {sizes} | {over} | {e['tokens_per_s']:.1f} | {e['speedup_vs_ar']:.2f}× |"
                         + (f" mean batch {e['mean_batch']:.1f}" if "mean_batch" in e else ""))
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

