"""Drafting while the target verifies: one job at a time on a thread of the drafter's own.

A drafter that drafts ahead (:meth:`~specframe.components.Drafter.speculate`) hands its job to an
:class:`AheadThread` as the target starts a verification and collects it (:meth:`AheadThread.wait`) at its
next proposal. The job's *content* must not depend on when it runs or how long it takes — only its duration
may — so the output and every step record but the timings are the same whatever the interleaving.

* A job that raises ends the generation at the next :meth:`~AheadThread.wait` with one line naming the drafter.
* A job that does not answer within ``timeout`` seconds is told to stop (``cancelled`` is set: a job checks it
  between units of work) and the generation ends with one line; the thread is joined, so none is left behind.
* :class:`CoreSplit` gives the two sides a share of the cores each while they overlap (through the backends'
  ``set_threads``; on two cores one thread each: two torch threads beside a busy llama.cpp thread stall
  torch's thread barriers 2–5×, measured) and gives the cores back after.

The module imports no runtime.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from .clock import Clock, real_clock
from .errors import PluginError

log = logging.getLogger("specframe")
GRACE_S = 5.0  # how long a cancelled job may take to notice before it is declared stuck


class AheadThread:
    """Runs ``job(cancelled)`` on a fresh thread per job; :meth:`wait` joins it and re-raises its failure."""

    def __init__(self, who: str, timeout: float = 60.0, clock: Clock = real_clock):
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.who, self.timeout, self.clock = who, float(timeout), clock
        self._thread: threading.Thread | None = None
        self._cancelled = threading.Event()
        self._error: BaseException | None = None
        self.busy_s = 0.0  # seconds the last job ran

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, job: Callable[[threading.Event], None]) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.who}: a job is already running")
        self._cancelled = threading.Event()
        self._error, self.busy_s = None, 0.0
        self._thread = threading.Thread(target=self._run, args=(job, self._cancelled), daemon=True,
                                        name=f"specframe-ahead-{self.who}")
        self._thread.start()

    def _run(self, job, cancelled: threading.Event) -> None:
        start = self.clock()
        try:
            job(cancelled)
        except BaseException as err:  # noqa: BLE001 - handed to the caller of wait()
            self._error = err
        finally:
            self.busy_s = self.clock() - start

    def wait(self) -> float:
        """Join the running job (if any); returns the seconds it ran. Raises :class:`PluginError` (one line)
        if it failed or did not answer within the timeout."""
        thread = self._thread
        if thread is None:
            return 0.0
        thread.join(self.timeout)
        if thread.is_alive():
            self._cancelled.set()
            thread.join(GRACE_S)
            self._thread = None
            stuck = " and is still stuck (left as a daemon thread)" if thread.is_alive() else ""
            raise PluginError(f"{self.who} did not finish drafting ahead within {self.timeout:g} s{stuck}; "
                              f"the generation stopped (raise the drafter's ahead_timeout, or draft serially "
                              f"with overlap=false)")
        self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise PluginError(f"{self.who} failed while drafting ahead: {type(err).__name__}: {err}") from err
        return self.busy_s

    def cancel(self) -> None:
        """Tell the running job to stop and join it; a failure is logged, not raised (the request is over)."""
        if self._thread is None:
            return
        self._cancelled.set()
        try:
            self.wait()
        except PluginError as err:
            log.warning("%s", err)


class FrozenCost:
    """A cost model's predictions at one context, read once (on the caller's thread) for n = 1..``most``: what
    a look-ahead job prices with while the step goes on updating the live model. Beyond ``most`` it grows by
    the last step of the table."""

    def __init__(self, cost_model, context: int, most: int):
        self.table = [0.0] + [float(cost_model.predict(n, context)) for n in range(1, max(most, 2) + 1)]
        self.convex_from = getattr(cost_model, "convex_from", None)
        cap = getattr(cost_model, "max_tokens", None)
        if cap:
            self.max_tokens = cap
        self.name = f"frozen {getattr(cost_model, 'name', 'cost model')}"

    def predict(self, n: int, context: int) -> float:
        t = self.table
        return t[n] if n < len(t) else t[-1] + (n - len(t) + 1) * (t[-1] - t[-2])

    def observe(self, n: int, context: int, seconds: float) -> None:
        pass


def share_of_cores(draft_threads: int) -> tuple[int, int]:
    """(target threads, draft threads) while both run at once: the draft's share, the rest to the target."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    draft = max(1, min(draft_threads, cores - 1)) if cores > 1 else 1
    return max(1, cores - draft), draft


class CoreSplit:
    """Give the target and the draft their share of the cores while they overlap (``enter``) and give each
    its own back after (``leave``). A backend without ``set_threads`` is left alone (and ``missing`` names it)."""

    def __init__(self, target, draft, draft_threads: int = 1):
        self.sides = [x for x in (target, draft) if callable(getattr(x, "set_threads", None))]
        self.missing = [getattr(x, "name", "?") for x in (target, draft) if x not in self.sides]
        self.want = dict(zip(("target", "draft"), share_of_cores(draft_threads)))
        self._share = {id(target): self.want["target"], id(draft): self.want["draft"]}
        self._saved: list[tuple[object, int]] = []

    def enter(self) -> None:
        if not self._saved:
            self._saved = [(x, x.set_threads(self._share[id(x)])) for x in self.sides]

    def leave(self) -> None:
        for x, n in reversed(self._saved):
            x.set_threads(n)
        self._saved = []
