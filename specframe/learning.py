"""What a generator learns from its own steps about their cost, in one object.

The engine's adaptive decisions read measured step times: whether to draft at all (a
:class:`~specframe.gate.DraftGate`, when the policy gates drafting) and BASTION's stopping rule, whose D
(drafting plus the host's fixed seconds) and per-node host seconds come from :class:`~specframe.fit.StepCosts`.
:class:`StepLearning` holds both plus whether the cost model has been calibrated, and times every step
with the clock it was given — the real one by default, a :class:`~specframe.clock.ManualClock` in tests,
the simulated device's in ``specframe simulate`` — so live and simulated runs learn by the same code.
"""

from __future__ import annotations

from .clock import Clock, real_clock
from .components import Drafter, ExpansionPolicy, Gating, StepRecord
from .fit import StepCosts
from .gate import DraftGate


def engine_gates(expansion: ExpansionPolicy, drafter: Drafter) -> bool:
    """Whether the engine gates drafting: the policy asks for it and the drafter does not gate itself."""
    return expansion.gating is Gating.DRAFT and drafter.gating is not Gating.SOURCES


class StepLearning:
    """The draft gate (or None), the step costs and the calibration flag of one generator."""

    def __init__(self, gate: DraftGate | None = None, clock: Clock = real_clock):
        self.gate, self.clock = gate, clock
        # a batch of B requests (continuous batching) drafts B times for one forward: whether drafting pays
        # depends on B, so each batch size has a gate of its own (``gate`` is the one of a single request)
        self.gates: dict[int, DraftGate] = {} if gate is None else {1: gate}
        self.costs = StepCosts()  # a step's seconds besides the forward: D and the host's per-node part
        self.calibrated = False  # the cost model is calibrated once per generator, on its first prompt
        self._started = 0.0

    @classmethod
    def for_components(cls, expansion: ExpansionPolicy, drafter: Drafter, clock: Clock = real_clock) -> "StepLearning":
        if not engine_gates(expansion, drafter):
            return cls(None, clock)
        # a policy may let a drafter whose time stays under a share of the step always run: it cannot cost more
        return cls(DraftGate(cheap_share=float(getattr(expansion, "cheap_draft", 0.0))), clock)

    def begin_step(self, batch: int = 1) -> bool:
        """Start timing a step of ``batch`` requests; whether it drafts."""
        self._started = self.clock()
        return self.gate is None or self._gate(batch).want()

    def _gate(self, batch: int) -> DraftGate:
        if batch not in self.gates:
            g = self.gate
            self.gates[batch] = DraftGate(cheap_share=g.cheap_share, explore_share=g.explore_share)
        return self.gates[batch]

    @property
    def draft_seconds(self) -> float:
        """Predicted seconds of a drafted step besides the forward that do not grow with the tree (D)."""
        return self.costs.fixed_seconds

    @property
    def node_seconds(self) -> float:
        """Predicted host seconds per tree node."""
        return self.costs.per_node

    def end_step(self, record: StepRecord) -> None:
        """Learn from a finished step (begun by :meth:`begin_step`)."""
        if record.drafted:  # D excludes a lazy draft's expansions: the policy prices each of those itself
            self.costs.observe(record.tree_size, record.draft_s - record.expand_draft_s, record.overhead_s)
        if self.gate is not None:
            step_s = self.clock() - self._started
            # a drafted step that verified the root(s) alone did a plain step's work plus the draft's
            plain_s = step_s - record.draft_s if record.drafted and record.tree_size == record.batch else None
            self._gate(record.batch).record(record.drafted, record.committed, step_s, record.draft_s, plain_s)
