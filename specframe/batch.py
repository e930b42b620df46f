"""Continuous batching: many requests advance together, and one target call verifies all their trees.

:class:`BatchGenerator` runs on one :class:`~specframe.engine.SpecGenerator`'s target and components (its
surrogate, cost model, draft gate and step costs learn from every request). Each request has a drafter of
its own (:meth:`~specframe.components.Drafter.fork`), a session in the target's *batch room* and its own
sampling parameters, seed and verifier. A step:

1. requests that joined get the next chunk of their prompt prefilled (``prefill_chunk`` tokens, so a long
   prompt does not stall the others); one whose prompt is in takes part in this very step;
2. every active request drafts (one gate decision for the batch);
3. the expansion policy sizes every tree — with one budget for the batch where the policy has
   ``expand_batch`` and its ``batch_budget`` is on (BASTION), else each request's tree on its own;
4. the room verifies all trees (one forward where the backend batches: ``room.batched``);
5. each request's own verifier commits its path and bonus; finished requests leave.

A backend offers batching with ``target.open_batch(max_batch, feature_layers)`` → a room with ``start()``,
``verify([(session, tree), ...])`` → ``[ForwardOut, ...]``, ``capacity``, ``batched``, ``note`` and
optionally ``release(session)``, ``max_tree_tokens``, ``admits(tokens)`` (whether its cache holds a
request of that many more tokens) and ``cost_context(pasts)`` (the context at which the cost model prices
one call over requests with these cached lengths; default their sum). A backend without one gets :class:`SequentialRoom`: its sessions, each
verified in its own call.

>>> batch = BatchGenerator(SpecGenerator(target, "bastion"), max_batch=8)        # doctest: +SKIP
>>> batch.submit(BatchRequest(prompt_ids, 64, on_step=print))                  # doctest: +SKIP
>>> while batch.busy: batch.step()                                               # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .backends import describe_backend
from .components import EmptyDraft, ExpansionContext, RunStats, Sampler, StepRecord, TokenLogprob, Verifying
from .engine import SpecGenerator, _Run
from .errors import SpecframeError

log = logging.getLogger("specframe")
DEFAULT_PREFILL_CHUNK = 256


class SequentialRoom:
    """The batch room of a backend that has none of its own: a session per request, each tree verified in
    its own call, one after another (outputs are exactly each request's solo output)."""

    batched = False
    max_tree_tokens = None

    def __init__(self, target, max_batch: int, feature_layers: tuple[int, ...] = (), note: str = ""):
        self.target, self.capacity, self.layers = target, int(max_batch), tuple(feature_layers)
        backend = describe_backend(target)["name"]
        self.note = note or (f"backend '{backend}' has no batched verification: each request's tree is verified "
                             "in its own call, one after another")

    def start(self):
        return self.target.start(self.layers)

    def verify(self, items):
        return [session.verify(tree) for session, tree in items]


def open_room(target, max_batch: int, feature_layers: tuple[int, ...] = ()):
    """The target's batch room for ``max_batch`` requests (:class:`SequentialRoom` where it has none)."""
    if not isinstance(max_batch, int) or max_batch <= 0:
        raise SpecframeError(f"max_batch must be a positive integer, got {max_batch!r}")
    opener = getattr(target, "open_batch", None)
    if opener is None:
        return SequentialRoom(target, max_batch, feature_layers)
    return opener(max_batch, tuple(feature_layers))


@dataclass
class BatchRequest:
    """One request of a batch. ``on_step(tokens, logprobs)`` gets each step's committed tokens (and their
    log-probs when ``logprobs`` is set, else ``[]``); returning True ends the request after that step (a stop
    string). :meth:`cancel` (any thread) ends it at the next step. When it is over, ``finish_reason`` is
    ``"eos"``, ``"length"``, ``"stop"`` (on_step asked), ``"cancelled"`` or ``"error"`` (then ``error``)."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    on_step: Callable[[list[int], list[TokenLogprob]], bool | None] | None = None
    token_ids: list[int] = field(default_factory=list)
    stats: RunStats = field(default_factory=RunStats)
    finish_reason: str | None = None
    error: BaseException | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class _Member(_Run):
    """A request's loop state inside a batch: a :class:`~specframe.engine._Run` with a session in the room,
    a drafter of its own, its context and its prefill progress."""

    def __init__(self, batch: "BatchGenerator", req: BatchRequest, ids, verifier_name, verifier, sampling):
        gen = batch.gen
        comps = replace(gen.components, drafter=gen.components.drafter.fork())
        super().__init__(gen, ids, req.max_new_tokens, verifier_name, verifier, Sampler(req.seed), None,
                         req.logprobs, components=comps)
        self.req, self.sampling = req, sampling
        # a room that holds every request in one cache reserves room for this one (its prompt and new tokens)
        room = batch.room
        self.session = room.start(len(ids) + req.max_new_tokens) if hasattr(room, "admits") else room.start()
        self.prefilled = 0  # prompt tokens (all but the last) in the cache so far
        self.feats: list[torch.Tensor] = []
        self.context: list[int] = list(ids)
        self.started = self.clock()

    @property
    def remaining(self) -> int:
        return self.max_new - len(self.req.token_ids)

    def prefill_chunk(self, chunk: int) -> bool:
        """Prefill the next ``chunk`` prompt tokens; True once the whole prompt (but its last token) is in and
        the drafter has started."""
        todo = self.ids[:-1]
        piece = todo[self.prefilled:self.prefilled + chunk]
        if piece:
            feats = self.session.prefill(piece)
            if feats is not None:
                self.feats.append(feats)
            self.prefilled += len(piece)
        if self.prefilled < len(todo):
            return False
        feats = torch.cat(self.feats) if self.feats else None
        self._call(f"drafter '{self.c.names['drafter']}'", self.c.drafter.start, list(self.ids), feats)
        self.feats = []
        self.stats.prefill_s = self.clock() - self.started
        return True


class BatchGenerator:
    """Continuous batching over one generator (see the module's docstring). Not thread-safe: one thread
    calls :meth:`submit` and :meth:`step`; :meth:`BatchRequest.cancel` may come from any thread."""

    def __init__(self, gen: SpecGenerator, max_batch: int = 8, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if not isinstance(prefill_chunk, int) or prefill_chunk <= 0:
            raise SpecframeError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        self.gen, self.prefill_chunk = gen, prefill_chunk
        self.room = open_room(gen.target, max_batch, gen.components.drafter.feature_layers)
        self.capacity = min(int(max_batch), int(getattr(self.room, "capacity", max_batch)))
        expansion = gen.components.expansion
        self.shared_budget = hasattr(expansion, "expand_batch") and bool(getattr(expansion, "batch_budget", False))
        self.joining: list[_Member] = []
        self.active: list[_Member] = []
        self.steps = 0
        self.calibration_s = 0.0  # the cost model's one-off calibration (not decoding time)

    # ------------------------------------------------------------------ requests
    @property
    def size(self) -> int:
        """Requests in the batch (joining or active)."""
        return len(self.joining) + len(self.active)

    @property
    def busy(self) -> bool:
        return bool(self.joining or self.active)

    def describe(self) -> str:
        budget = ("one budget across the batch" if self.shared_budget else "each request's tree sized on its own")
        return f"up to {self.capacity} requests; {self.room.note}; {budget}"

    def has_room(self, req: BatchRequest | None = None) -> bool:
        """Whether ``req`` (or any request) can join now: a free place, and room in the target's cache."""
        if self.size >= self.capacity:
            return False
        admits = getattr(self.room, "admits", None)
        return req is None or admits is None or admits(len(req.prompt_ids) + req.max_new_tokens)

    def submit(self, req: BatchRequest) -> None:
        """Add ``req``; it joins at the next step. Bad input raises :class:`SpecframeError` (nothing joins)."""
        if self.size >= self.capacity:
            raise SpecframeError(f"the batch is full ({self.capacity} requests); wait for one to finish")
        if not self.has_room(req):
            raise SpecframeError(f"the target's cache has no room now for a request of {len(req.prompt_ids)} prompt + "
                                 f"{req.max_new_tokens} new tokens; wait for one to finish (has_room says when)")
        ids, sampling, verifier_name, verifier = self.gen.check_request(
            req.prompt_ids, req.max_new_tokens, req.temperature, req.top_k, req.top_p, req.logprobs)
        self.joining.append(_Member(self, req, ids, verifier_name, verifier, sampling))

    # ------------------------------------------------------------------ the step
    def step(self) -> list[BatchRequest]:
        """One step of every request in the batch; returns the requests that finished in it."""
        finished = [self._leave(m, "cancelled") for m in self.joining + self.active if m.req.cancelled]
        self._admit(finished)
        members = self.active
        if not members:
            return finished
        try:
            committed = self._advance(members)
        except Exception as err:  # noqa: BLE001 - the batch's call failed: every request in it gets the error
            return finished + [self._leave(m, "error", err) for m in list(members)]
        for member, tokens in zip(list(members), committed):
            finished += self._deliver(member, tokens)
        return finished

    def _admit(self, finished: list[BatchRequest]) -> None:
        """Prefill a chunk of every joining request's prompt; a request whose prompt is in becomes active."""
        for member in list(self.joining):
            try:
                ready = member.prefill_chunk(self.prefill_chunk)
                if ready and not self.gen.learning.calibrated:  # once per generator, on a request of its own
                    self.gen.learning.calibrated = True
                    c, started = member.c, self.gen.clock()
                    member._call(f"cost model '{c.names['cost_model']}'", c.cost_model.calibrate,
                                 member._timer(member.session), member.session.past)
                    self.calibration_s += self.gen.clock() - started
            except Exception as err:  # noqa: BLE001 - this request's prompt failed; the others go on
                finished.append(self._leave(member, "error", err))
                continue
            if ready:
                self.joining.remove(member)
                self.active.append(member)

    def _advance(self, members: list[_Member]) -> list[list[int]]:
        """Draft, size, verify and commit every member's tree; each member's committed tokens."""
        gen, c, learning, clock = self.gen, self.gen.components, self.gen.learning, self.gen.clock
        drafting = learning.begin_step(len(members))
        t0 = clock()
        drafts, ctxs, draft_s = [], [], []
        pasts = [m.session.past for m in members]
        context = int(getattr(self.room, "cost_context", sum)(pasts))  # the context one call over them all costs
        cap = getattr(self.room, "max_tree_tokens", None)
        for m in members:
            past = m.session.past
            max_nodes, max_depth = m.bounds(past, m.remaining)
            if cap:
                max_nodes, max_depth = min(max_nodes, cap - 1), min(max_depth, cap - 1)
            started = clock()
            drafts.append(m.propose(m.context, max_depth) if drafting else EmptyDraft())
            draft_s.append(clock() - started)
            ctxs.append(ExpansionContext(m.context[-1], past, max_nodes, max_depth, c.surrogate, c.cost_model,
                                         learning.draft_seconds, learning.node_seconds, context))
        t1 = clock()
        if self.shared_budget and len(members) > 1:
            sized = members[0]._call(f"expansion policy '{c.names['expansion']}'", c.expansion.expand_batch, drafts, ctxs)
            built = [m.check_tree(b, d, x) for m, b, d, x in zip(members, sized, drafts, ctxs)]
        else:
            built = [m.expand(d, x) for m, d, x in zip(members, drafts, ctxs)]
        lazy = [d.spent_seconds for d in drafts]  # a draft model drafts inside the policy's call
        tokens = sum(b.tree.size for b in built)
        predicted = members[0].predict_cost(tokens, context)
        for m, b, x in zip(members, built, ctxs):
            m._call(f"drafter '{c.names['drafter']}'", m.c.drafter.speculate, Verifying(b, x, c.expansion, predicted))
        t2 = clock()
        outs = self.room.verify([(m.session, b.tree) for m, b in zip(members, built)])
        gen.target.synchronize()
        t3 = clock()
        committed, accepted = [], 0
        for m, b, x, fwd, ds, ls in zip(members, built, ctxs, outs, draft_s, lazy):
            path, tokens_r = m.settle(m.session, b, fwd, m.remaining)
            committed.append(tokens_r)
            accepted += len(path) - 1
            m.stats.records.append(StepRecord(
                tree_size=b.tree.size, accepted=len(path) - 1, committed=len(tokens_r), context_len=x.context_len,
                draft_s=ds + ls, overhead_s=0.0, verify_s=t3 - t2, tree_depth=b.tree.max_depth,
                expected_accepted=sum(b.scores[1:]), predicted_verify_s=predicted, drafted=drafting,
                expand_draft_s=ls, batch=len(members)))
            m.stats.steps += 1
        members[0]._call(f"cost model '{c.names['cost_model']}'", c.cost_model.observe, tokens, context, t3 - t2)
        t4 = clock()
        lazy_s = sum(lazy)
        for m in members:  # the step's host seconds, shared by its requests
            m.stats.records[-1].overhead_s = ((t2 - t1 - lazy_s) + (t4 - t3)) / len(members)
        learning.end_step(StepRecord(  # the batch's step: what the gate, D and the per-node host time learn from
            tree_size=tokens, accepted=accepted, committed=sum(map(len, committed)), context_len=context,
            draft_s=t1 - t0 + lazy_s, overhead_s=(t2 - t1 - lazy_s) + (t4 - t3), verify_s=t3 - t2,
            drafted=drafting, expand_draft_s=lazy_s, predicted_verify_s=predicted, batch=len(members)))
        self.steps += 1
        for m in members:
            if gen.observers.watching_steps:
                gen.observers.step_end(m.stats.records[-1], m.stats.steps - 1)
        return committed

    def _deliver(self, m: _Member, tokens: list[int]) -> list[BatchRequest]:
        """Hand a member its step's tokens; it leaves when it hit EOS, its length, or its caller's stop."""
        req = m.req
        req.token_ids += tokens
        m.context += tokens
        try:
            stop = bool(req.on_step(tokens, m.step_logprobs)) if req.on_step is not None else False
        except Exception as err:  # noqa: BLE001 - a caller's callback failed: this request ends with it
            return [self._leave(m, "error", err)]
        if tokens[-1] in m.eos:
            return [self._leave(m, "eos")]
        if stop:
            return [self._leave(m, "stop")]
        if m.remaining <= 0:
            return [self._leave(m, "length")]
        return []

    def _leave(self, m: _Member, reason: str, error: BaseException | None = None) -> BatchRequest:
        """``m`` leaves the batch: its drafter finishes, its session leaves the room."""
        for group in (self.joining, self.active):
            if m in group:
                group.remove(m)
        try:
            m.c.drafter.finish()
        finally:
            release = getattr(self.room, "release", None)
            if release is not None:
                release(m.session)
        req = m.req
        req.finish_reason, req.error = reason, error
        req.stats.records, req.stats.steps = m.stats.records, m.stats.steps
        req.stats.prefill_s, req.stats.new_tokens = m.stats.prefill_s, len(req.token_ids)
        req.stats.wall_s = self.gen.clock() - m.started
        if self.gen.observers.watching_runs:
            self.gen.observers.run_end(req.stats)
        return req
