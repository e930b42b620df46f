"""``specframe trace``: record, at every position of the target's greedy output, what the drafter proposes.

Greedy acceptance does not depend on hardware: the target's greedy output is fixed, and a drafter's
proposal at a position depends only on the committed prefix. So one plain greedy pass per prompt, asking
the drafter at every position, records everything a greedy run of any policy can see; ``specframe
simulate`` replays it through the real engine (:mod:`specframe.tools.simulate`).

A trace is JSON lines, one per prompt: ``dataset``, ``prompt_id``, ``prompt_len``, ``output`` (the greedy
tokens), ``drafter``, ``steps`` (per output position: ``draft``, its ``draft_s``, and for a composite
drafter ``draft_s_parts``, each source's seconds) and the per-step ``overhead_s`` / ``ar_verify_s`` of
the recording run. A composite draft is recorded source by source (``{"kind": "merged", "parts": [...]}``),
so a replay can run the composite drafter with any subset of its sources. Log-probabilities are stored
unrounded (JSON keeps a float exactly), so a replayed draft scores exactly as the live one.
"""

from __future__ import annotations

import copy

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import datasets
from ..clock import Clock, ManualClock, real_clock
from ..components import Draft, Drafter, EmptyDraft, MarginalDraft, TrieDraft
from ..engine import SpecGenerator
from ..errors import SpecframeError
from ..registry import Registry
from ..resolve import resolve_components

MAX_MATERIALIZED = 4096


# ---------------------------------------------------------------------- draft (de)serialisation
def serialize_draft(draft: Draft) -> dict:
    """A JSON-able description that :func:`deserialize_draft` turns back into an equivalent draft."""
    if draft.parts():
        return {"kind": "merged", "parts": [serialize_draft(p) for p in draft.parts()]}
    if isinstance(draft, EmptyDraft) or draft.max_depth == 0:
        return {"kind": "empty"}
    if isinstance(draft, MarginalDraft):
        rows = [draft.children(None, d) for d in range(draft.max_depth)]
        return {"kind": "marginal", "tokens": [[c.token for c in r] for r in rows],
                "logq": [[c.logq for c in r] for r in rows], "source": rows[0][0].source if rows and rows[0] else 0}
    return _serialize_trie(draft)


def _serialize_trie(draft: Draft) -> dict:
    """Any other draft, explored breadth-first into an explicit trie (at most MAX_MATERIALIZED nodes)."""
    tokens, parents, logq, sources = [0], [-1], [0.0], [0]
    frontier = [(0, draft.ROOT, 0)]
    while frontier and len(tokens) < MAX_MATERIALIZED:
        node, handle, depth = frontier.pop(0)
        for cand in draft.children(handle, depth):
            if len(tokens) >= MAX_MATERIALIZED:
                break
            tokens.append(cand.token)
            parents.append(node)
            logq.append(cand.logq)
            sources.append(cand.source)
            frontier.append((len(tokens) - 1, cand.handle, depth + 1))
    return {"kind": "trie", "tokens": tokens, "parents": parents, "logq": logq, "sources": sources}


def deserialize_draft(data: dict) -> Draft:
    """The draft a record describes (one source's; a merged record's parts are read by :func:`part_of`)."""
    kind = data["kind"]
    if kind == "empty":
        return EmptyDraft()
    if kind == "relabel":  # a source's draft as older traces stored it inside a merged one
        return deserialize_draft(data["inner"])
    if kind == "marginal":
        return MarginalDraft(torch.tensor(data["tokens"]), torch.tensor(data["logq"]), source=data.get("source", 0))
    if kind == "trie":
        return _SourcedTrie(data["tokens"], data["parents"], data["logq"], data["sources"])
    raise SpecframeError(f"cannot replay a '{kind}' draft record as one source's draft")


def part_of(data: dict, index: int) -> Draft:
    """Source ``index``'s draft in a composite drafter's record (empty when no source proposed anything)."""
    if data["kind"] != "merged":
        return EmptyDraft()
    return deserialize_draft(data["parts"][index])


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
        if self.inner.source_seconds is not None:  # a composite drafter: each source's seconds
            step["draft_s_parts"] = list(self.inner.source_seconds)
        self.steps.append(step)
        return EmptyDraft()  # the recording run itself decodes plainly


def record_trace(target, drafter: str | Drafter | None, prompts: list[datasets.Prompt], max_new_tokens: int,
                 out: Path, registry: Registry | None = None, log=print, clock: Clock = real_clock) -> Path:
    """One plain greedy pass per prompt, recording the drafter's proposal at every position."""
    registry = registry or Registry()
    # every source at every position: a composite drafter's own gate would skip sources
    comps = resolve_components(registry, target, "bastion", drafter, {"drafter.gate": False}, strict=False,
                               clock=clock)
    rec = _Recorder(comps.drafter, clock)
    gen = SpecGenerator(target, "ar", drafter=rec, registry=registry, clock=clock)
    with open(out, "w") as fh:
        for p in prompts:
            ids = datasets.encode(p, target)
            res = gen.generate(ids, max_new_tokens)
            fh.write(json.dumps({
                "dataset": p.dataset, "prompt_id": p.id, "prompt_len": len(ids), "output": res.token_ids,
                "drafter": comps.names["drafter"], "steps": rec.steps,
                "ar_verify_s": [r.verify_s for r in res.stats.records],
                "overhead_s": [r.overhead_s for r in res.stats.records],
            }) + "\n")
            log(f"trace: {p.dataset} {p.id}: {len(res.token_ids)} tokens")
    return out


# ---------------------------------------------------------------------- reading
@dataclass
class TraceRow:
    """One traced prompt."""

    dataset: str
    prompt_id: object
    prompt_len: int
    output: list[int]
    drafter: str
    steps: list[dict]
    overhead_s: list[float]


def read_trace(path: Path) -> list[TraceRow]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise SpecframeError(f"trace {path} is empty")
    try:
        return [TraceRow(r["dataset"], r["prompt_id"], int(r["prompt_len"]), list(r["output"]), r["drafter"],
                         r["steps"], list(r.get("overhead_s", []))) for r in rows]
    except KeyError as err:
        raise SpecframeError(f"trace {path} is not a `specframe trace` file: no {err} in a row") from err


def source_count(rows: list[TraceRow]) -> int:
    """How many sources the traced drafter merged (0: not a composite drafter)."""
    for step in (s for r in rows for s in r.steps):
        if "draft_s_parts" in step:
            return len(step["draft_s_parts"])
        if step["draft"]["kind"] == "merged":
            return len(step["draft"]["parts"])
    return 0


# ---------------------------------------------------------------------- replaying
class _Pinned:
    """A cursor that stays on one row (a forked drafter's, in a simulated batch)."""

    def __init__(self, row):
        self.row = row


class TraceDrafter(Drafter):
    """Replays the traced proposals of the row its cursor is on: at output position ``pos`` it proposes
    the draft recorded there (``part``: only that source's, of a composite drafter's record) and advances
    the (manual) clock by the recorded draft seconds — or, with ``draft_s``, by that many seconds per
    step (split over the sources in the traced proportions)."""

    name = "trace"

    def __init__(self, cursor, clock: ManualClock, part: int | None = None, draft_s: float | None = None):
        self.cursor, self.clock, self.part, self.draft_s = cursor, clock, part, draft_s
        self.max_depth = 1 << 20

    def fork(self) -> "TraceDrafter":
        """For another request of a simulated batch: replays the row being started now."""
        twin = copy.copy(self)
        twin.cursor = _Pinned(self.cursor.row)
        return twin

    def propose(self, context_ids: list[int], max_depth: int) -> Draft:
        row = self.cursor.row
        step = row.steps[len(context_ids) - row.prompt_len]
        self.clock.advance(self.seconds(step))
        if self.part is None:
            return deserialize_draft(step["draft"])
        return part_of(step["draft"], self.part)

    def seconds(self, step: dict) -> float:
        """This drafter's share of the step's draft seconds."""
        parts = step.get("draft_s_parts")
        if self.part is None or parts is None:  # the whole draft's time (a composite without parts: on source 0)
            whole = step["draft_s"] if self.draft_s is None else self.draft_s
            return whole if self.part in (None, 0) else 0.0
        if self.draft_s is None:
            return parts[self.part]
        total = sum(parts)
        return self.draft_s * parts[self.part] / total if total > 0 else self.draft_s / len(parts)
