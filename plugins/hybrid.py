"""Built-in composite drafter ``hybrid``: several draft sources in ONE candidate pool.

Each source is any registered drafter (default: ``ngram`` prompt lookup and the target's ``dflash`` block
drafter). Their candidates are merged node by node: children proposed by several sources at the same place
with the same token become one node (the tree stays prefix-closed with no duplicate siblings), carrying the
most confident source's log-prob and source id. The acceptance surrogate sees each node's source, so the
``calibrated`` surrogate learns per-source, per-depth acceptance and BASTION's best-first order and stopping
rule decide how many nodes of each source a step can afford. Adding a source needs no engine change.

A source also has to pay for its own draft time: with ``gate=True`` (default) each source has a
:class:`~specframe.gate.DraftGate` that compares measured tokens per second of steps with and without it
and skips it on steps where it has not been paying (re-trying it now and then). A cheap source (under 8 %
of a step, e.g. prompt lookup) always runs. Each gate sees the step with the other sources' draft time
replaced by its running mean, so a slow source's runs do not make another source look slow.
"""

from __future__ import annotations

import copy

import torch

from specframe import hookimpl
from specframe.clock import Clock, real_clock
from specframe.components import Candidate, Draft, Drafter, EmptyDraft, Gating
from specframe.errors import SpecframeError
from specframe.gate import SourceGates


class MergedDraft(Draft):
    """The union of several sources' drafts (source i's candidates carry source id i); a handle is a
    tuple with one handle (or None) per source."""

    def __init__(self, sources: list[Draft]):
        self.sources = sources
        self.drafts = [_relabel(d, i) for i, d in enumerate(sources)]
        self.max_depth = max((d.max_depth for d in sources), default=0)
        self.ROOT = tuple(d.ROOT for d in sources)

    def children(self, handle: tuple, depth: int) -> list[Candidate]:
        merged: dict[int, list] = {}  # token -> [best logq, best source, per-source handles]
        for src, (draft, h) in enumerate(zip(self.drafts, handle)):
            if h is None or depth >= draft.max_depth:
                continue
            for cand in draft.children(h, depth):
                slot = merged.get(cand.token)
                if slot is None:
                    slot = merged[cand.token] = [cand.logq, src, [None] * len(self.drafts)]
                elif cand.logq > slot[0]:
                    slot[0], slot[1] = cand.logq, src
                slot[2][src] = cand.handle
        out = [Candidate(tok, lq, tuple(hs), src) for tok, (lq, src, hs) in merged.items()]
        out.sort(key=lambda c: -c.logq)
        return out

    def validate(self, vocab_size: int) -> None:
        for draft in self.drafts:
            draft.validate(vocab_size)

    def parts(self) -> list[Draft]:
        return list(self.sources)


class HybridDrafter(Drafter):
    """Merges the candidates of ``sources`` (comma-separated drafter names; ``NAME:PATH`` allowed)."""

    name = "hybrid"
    auto_priority = 20
    composite = True

    def __init__(self, target=None, registry=None, sources: str | tuple = "ngram,dflash", gate: bool = True,
                 clock: Clock = real_clock):
        if target is None or registry is None:
            raise ValueError("the hybrid drafter needs the target and the registry")
        names = [s.strip() for s in (sources.split(",") if isinstance(sources, str) else sources) if s.strip()]
        if not names or "hybrid" in (n.partition(":")[0] for n in names):
            raise SpecframeError(f"hybrid drafter needs a list of other drafters as sources, got {sources!r}")
        self.sources = []
        for spec in names:
            base, _, arg = spec.partition(":")
            self.sources.append(registry.build("drafter", base, {"path": arg} if arg else {}, target=target,
                                               clock=clock))
        self.source_names = names
        layers: list[int] = []
        for src in self.sources:
            layers += [layer for layer in src.feature_layers if layer not in layers]
        self.feature_layers = tuple(layers)
        width = target.hidden_size
        self._index = [  # columns of each source's layers inside the concatenated features
            torch.tensor([layers.index(layer) * width + j for layer in src.feature_layers for j in range(width)],
                         dtype=torch.long)
            for src in self.sources
        ]
        self.max_depth = max(src.max_depth for src in self.sources)
        self.gates = SourceGates(len(self.sources)) if gate else None
        self._ran: list[bool] | None = None  # which sources ran for the step in flight, and their seconds
        self._draft_s: list[float] = []
        self.clock = clock
        self._mark = clock()

    @property
    def gating(self) -> Gating:
        """The hybrid gates its own sources (so the engine's draft gate leaves it alone)."""
        return Gating.SOURCES if self.gates is not None else Gating.NONE

    @classmethod
    def availability(cls, target) -> tuple[bool, str]:
        """``auto`` picks the hybrid where a block drafter is shipped for the target."""
        from specframe.plugins.dflash import shipped_availability

        ok, reason = shipped_availability(target)
        return ok, (f"prompt lookup + {reason}" if ok else reason)

    def describe(self) -> str:
        parts = [getattr(src, "describe", lambda n=name: n)() for src, name in zip(self.sources, self.source_names)]
        return f"hybrid({', '.join(parts)})"

    def _feats(self, i: int, features: torch.Tensor | None) -> torch.Tensor | None:
        if features is None or not self.sources[i].feature_layers:
            return None
        return features.index_select(-1, self._index[i].to(features.device))

    def fork(self) -> "HybridDrafter":
        """Each source forked for the other request; the per-source gates stay shared (what they learn holds
        for every request)."""
        twin = copy.copy(self)
        twin.sources = [src.fork() for src in self.sources]
        return twin

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        for i, src in enumerate(self.sources):
            src.start(prompt_ids, self._feats(i, features))
        self._ran, self._mark = None, self.clock()

    def commit(self, tokens: list[int], features: torch.Tensor | None) -> None:
        for i, src in enumerate(self.sources):
            src.commit(tokens, self._feats(i, features))
        now = self.clock()
        if self.gates is not None and self._ran is not None:  # a step's outcome: committed = root + accepted
            self.gates.record(self._ran, self._draft_s, len(tokens), now - self._mark)
        self._ran, self._mark = None, now

    @property
    def source_seconds(self) -> list[float]:
        """Draft seconds of each source in the last proposal (0 for a source its gate skipped)."""
        return list(self._draft_s)

    def propose(self, context_ids: list[int], max_depth: int) -> Draft:
        raw, self._draft_s = [], []
        self._ran = self.gates.want() if self.gates is not None else [True] * len(self.sources)
        for src, run in zip(self.sources, self._ran):
            t0 = self.clock()
            raw.append(src.propose(context_ids, max_depth) if run else EmptyDraft())
            self._draft_s.append(self.clock() - t0)
        if all(isinstance(d, EmptyDraft) for d in raw):
            return EmptyDraft()
        return MergedDraft(raw)


class _Relabelled(Draft):
    """A source's draft whose candidates carry the source index."""

    def __init__(self, inner: Draft, source: int):
        self.inner, self.source = inner, source
        self.max_depth, self.ROOT = inner.max_depth, inner.ROOT

    def children(self, handle, depth):
        return [c._replace(source=self.source) for c in self.inner.children(handle, depth)]

    def validate(self, vocab_size: int) -> None:
        self.inner.validate(vocab_size)


def _relabel(draft: Draft, source: int) -> Draft:
    return draft if source == 0 else _Relabelled(draft, source)


@hookimpl
def register_drafters(register):
    register("hybrid", HybridDrafter)
