"""Draft or not: a measured two-armed decision for a costly draft source.

A drafter that costs a sizeable share of a step only pays when the tokens it adds outrun its time. Before
a step, :meth:`DraftGate.want` says whether to run the source; after it, :meth:`DraftGate.record` adds
what the step committed and how long it took. The gate keeps, for steps *with* and *without* the source,
an exponentially weighted mean of committed tokens and of step seconds, runs the arm with the higher
tokens per second and re-tries the other now and then (every ``probe_every`` steps, doubling each time
the other arm loses again, up to ``max_probe_every``, and never spending more than ``explore_share`` of the
time on probes: a probe of a source that is off costs its extra seconds over a plain step, so a cheap
source is re-tried as often as the interval allows, a costly one more rarely),
so it follows the text and the machine as they change. The gate only changes which tree is verified,
never the output.

A drafted step whose tree is the root alone verified exactly what a step without the source verifies: it
committed what that step would have, and took its time plus the draft's. So it counts for the arm with
the source as the mean step without it plus its draft seconds (its seconds less the draft's count for the
arm without): however noisy single steps are, such a step never makes drafting look better than not, and
a source that drafts nothing worth verifying (prompt lookup on chat) is found out after a few steps and
stays found out, however cheap it is. With
``cheap_share`` > 0 a source whose draft time stays under that share of the step is always run (the
hybrid drafter's sources: ``hybrid`` sets 0.08; the engine's gate takes the policy's ``cheap_draft``, 3 % for
BASTION, 0 to stop a drafter that does not pay whatever its price).
"""

from __future__ import annotations

import math


class DraftGate:
    """Decides per step whether one draft source runs, from measured tokens/s with and without it."""

    def __init__(self, half_life: float = 24.0, min_trials: int = 3, probe_every: int = 4,
                 max_probe_every: int = 64, cheap_share: float = 0.0, explore_share: float = 0.03):
        if half_life <= 0 or min_trials < 1 or probe_every < 1 or max_probe_every < probe_every:
            raise ValueError("DraftGate needs half_life > 0, min_trials >= 1, 1 <= probe_every <= max_probe_every")
        self.decay = 0.5 ** (1.0 / half_life)
        self.min_trials, self.probe_every, self.max_probe_every = min_trials, probe_every, max_probe_every
        self.cheap_share, self.explore_share = cheap_share, explore_share
        self.step_s = {True: 0.0, False: 0.0}  # EWMA of one step's seconds per arm
        self.since_probe_s = 0.0
        self.tokens = {True: 0.0, False: 0.0}  # exponentially forgotten sums; their ratio is the rate
        self.seconds = {True: 0.0, False: 0.0}
        self.trials = {True: 0, False: 0}
        self.share = 0.0  # EWMA of draft seconds / step seconds on steps where the source ran
        self.leader = True
        self.interval, self.since_probe = probe_every, 0

    def rate(self, ran: bool) -> float:
        """Measured committed tokens per second of steps with (``True``) or without the source."""
        sec = self.seconds[ran]
        return self.tokens[ran] / sec if sec > 0 else math.inf

    @property
    def cheap(self) -> bool:
        return self.trials[True] >= self.min_trials and self.share < self.cheap_share

    def want(self) -> bool:
        """Whether to run the source this step."""
        if self.trials[True] < self.min_trials or self.cheap:
            return True
        if self.trials[False] < self.min_trials:
            return False
        leader = self.rate(True) >= self.rate(False)
        if leader != self.leader:
            self.leader, self.interval, self.since_probe, self.since_probe_s = leader, self.probe_every, 0, 0.0
        self.since_probe += 1
        if self.since_probe >= self.interval and self.since_probe_s * self.explore_share >= self.probe_cost(leader):
            self.since_probe, self.since_probe_s = 0, 0.0
            self.interval = min(2 * self.interval, self.max_probe_every)
            return not leader
        return leader

    def probe_cost(self, leader: bool) -> float:
        """What one step of the other arm costs beyond a step of the leader: a probe of a source that
        is not running costs its extra seconds (a cheap source is re-tried often); a probe of plain steps
        while the source runs costs a whole step (what it may lose)."""
        if leader:
            return self.step_s[False]
        return max(self.step_s[True] - self.step_s[False], 0.0)

    def record(self, ran: bool, tokens: int, step_seconds: float, draft_seconds: float = 0.0,
               plain_seconds: float | None = None) -> None:
        """One finished step: whether the source ran, tokens committed, the step's seconds (draft included).
        ``plain_seconds``: for a drafted step that verified the root alone, its seconds without the
        draft's, which also count for the arm without the source."""
        if not (step_seconds > 0 and math.isfinite(step_seconds)):
            return
        # forgetting counts all steps: a rarely played arm's estimate is dominated by its latest probe
        for arm in (True, False):
            self.tokens[arm] *= self.decay
            self.seconds[arm] *= self.decay
        if ran and plain_seconds is not None and 0 < plain_seconds <= step_seconds:
            self._add(False, tokens, plain_seconds)  # the plain step inside this one
            step_seconds = tokens / self.rate(False) + (step_seconds - plain_seconds)
        self._add(ran, tokens, step_seconds)
        self.since_probe_s += step_seconds
        if ran:
            share = min(max(draft_seconds / step_seconds, 0.0), 1.0)
            self.share = share if self.trials[True] == 1 else 0.8 * self.share + 0.2 * share

    def _add(self, arm: bool, tokens: int, seconds: float) -> None:
        self.tokens[arm] += tokens
        self.seconds[arm] += seconds
        self.step_s[arm] = seconds if not self.trials[arm] else 0.8 * self.step_s[arm] + 0.2 * seconds
        self.trials[arm] += 1

    def summary(self) -> dict:
        return {
            "rate_with": round(self.rate(True), 3) if self.seconds[True] else None,
            "rate_without": round(self.rate(False), 3) if self.seconds[False] else None,
            "steps_with": self.trials[True],
            "steps_without": self.trials[False],
            "draft_share": round(self.share, 4),
        }


class SourceGates:
    """One :class:`DraftGate` per source of a composite drafter (e.g. ``hybrid``): each source runs only
    while it pays for its own time. Each gate sees a finished step with the *other* sources' draft time
    replaced by their running means, so whether another source happened to run does not count for or
    against this one. Used by the hybrid drafter live and by the simulator's replay alike."""

    def __init__(self, count: int, **gate_args):
        gate_args.setdefault("cheap_share", 0.08)  # a source under 8 % of the step always runs (see DraftGate)
        self.gates = [DraftGate(**gate_args) for _ in range(count)]
        self._mean_s = [0.0] * count  # per source, mean draft seconds over all steps (0 when skipped)
        self._steps = 0

    def __iter__(self):
        return iter(self.gates)

    def __len__(self) -> int:
        return len(self.gates)

    def want(self) -> list[bool]:
        """Which sources run this step."""
        return [gate.want() for gate in self.gates]

    def record(self, ran: list[bool], draft_s: list[float], committed: int, step_s: float) -> None:
        """One finished step: which sources ran, each one's draft seconds (0 if it did not run), the
        tokens committed and the whole step's seconds."""
        for i, spent in enumerate(draft_s):
            self._mean_s[i] = spent if self._steps == 0 else 0.9 * self._mean_s[i] + 0.1 * spent
        self._steps += 1
        others_now, others_mean = sum(draft_s), sum(self._mean_s)
        for i, (gate, r, spent) in enumerate(zip(self.gates, ran, draft_s)):
            step_i = step_s - (others_now - spent) + (others_mean - self._mean_s[i])
            gate.record(r, committed, max(step_i, spent, 1e-9), spent)
