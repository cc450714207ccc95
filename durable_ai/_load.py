"""Whether the event loop's thread is short of CPU, and how late the loop runs: what stretches coalescing windows.

A writer's window is time-based (``Coalesce.max_delay``), so on a machine that is busy the same runs write fewer
tokens per window and therefore more broker messages per token, and each message costs the busy machine more: the
SDK would slow down faster than the machine. The hub's :class:`LoadGauge` tells its writers when the loop's
thread wanted the CPU for most of the last tenth of a second (running, or runnable and waiting for a core, which
is how a machine loaded by other processes shows); they then keep a window open past ``max_delay`` until it
holds enough deltas to be worth a message (see :class:`~durable_ai.coalesce.Coalesce`).

A thread that waits for a core gets only part of the wall time, and its runs write their tokens as much more
slowly: a window under load is therefore stretched by the inverse of the share of the CPU the thread got of what
it wanted (:attr:`LoadGauge.got`, at least a quarter), so that it holds as many deltas as it would on an idle
machine. A loop that is short of CPU may still keep up; one that runs late (a callback it is given waits more than
:data:`LATE` to run) has more work than it can do. While it runs late, the gauge widens the stretch by a quarter
every period (up to 16 times), and narrows it again the same way once the loop is on time, so that the windows
settle where the loop keeps up with its messages; once the loop has CPU to spare, the stretch is back to usual.

Demand is read from ``/proc/thread-self/schedstat`` on Linux (CPU time and run-queue wait of the calling thread);
elsewhere, from the thread's CPU time alone (a thread there is never seen waiting for a core).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["LATE", "LoadGauge", "thread_demand"]

_SCHEDSTAT = "/proc/thread-self/schedstat"

LATE = 0.020
"""Seconds a callback waits to run, on average, from which the loop runs late."""
_WIDEN = 1.25
_MAX_WIDENING = 16.0
_LEAST_GOT = 0.25


def thread_demand() -> tuple[float, float]:
    """Seconds the calling thread has run, and seconds it has waited to run (0 where the kernel does not say)."""
    try:
        with open(_SCHEDSTAT, "rb") as stats:
            running, waiting = stats.read().split()[:2]
        return int(running) / 1e9, int(waiting) / 1e9
    except (OSError, ValueError):
        return time.thread_time(), 0.0


class LoadGauge:
    """Samples the loop thread's demand for CPU at most once a ``period`` and says whether it is under load.

    Under load from a share of ``enter`` of the wall time or more; no longer once it falls below ``leave``. Each
    sample also asks the running loop to run a callback, and keeps a moving average of how long that took
    (:attr:`delay`). Call it from the loop's thread only.
    """

    def __init__(
        self,
        *,
        period: float = 0.1,
        enter: float = 0.9,
        leave: float = 0.75,
        clock: Callable[[], float] = time.monotonic,
        demand: Callable[[], tuple[float, float]] = thread_demand,
    ) -> None:
        self._period = period
        self._enter = enter
        self._leave = leave
        self._clock = clock
        self._demand = demand
        self._since: float | None = None  # the first call starts the first period (in the loop's thread)
        self._ran_since = self._waited_since = 0.0
        self._loaded = False
        self._sampled = False
        self._probing = False
        self.share = 0.0
        """The share of the last sampled period the thread wanted the CPU."""
        self.got = 1.0
        """The share of the CPU it wanted that the thread got in the last sampled period (at least a quarter)."""
        self.delay = 0.0
        """Seconds the loop takes to run a callback it is given (a moving average over the sampled periods)."""
        self.widening = 1.0
        """How many times its usual stretch a window under load may stretch now (see :meth:`stretching`)."""

    def loaded(self) -> bool:
        """Whether the loop's thread is short of CPU (re-sampled when a period has passed since the last)."""
        now = self._clock()
        if self._since is None:
            self._since = now
            self._ran_since, self._waited_since = self._demand()
            return False
        elapsed = now - self._since
        # The first period is short, so that a loop that is busy from its start is known to be soon.
        if elapsed >= (self._period if self._sampled else self._period / 5):
            self._sampled = True
            ran, waited = self._demand()
            ran_now = ran - self._ran_since
            wanted = ran_now + waited - self._waited_since
            self.share = wanted / elapsed
            self.got = max(_LEAST_GOT, min(1.0, ran_now / wanted)) if wanted > 0 else 1.0
            self._loaded = self.share >= (self._leave if self._loaded else self._enter)
            self._since, self._ran_since, self._waited_since = now, ran, waited
            self._adjust()
            self._probe(now)
        return self._loaded

    def stretching(self) -> float:
        """How far a window may stretch past ``max_delay`` now, in multiples of the policy's stretch: 0 when the
        loop has CPU to spare, 1 under load, more while the thread waits for a core (1 / :attr:`got`) and while the
        loop also runs late (:attr:`widening`)."""
        return self.widening / self.got if self.loaded() else 0.0

    def note_delay(self, seconds: float) -> None:
        """Fold one measured callback delay into :attr:`delay`."""
        self.delay += 0.3 * (seconds - self.delay)

    def _adjust(self) -> None:
        if not self._loaded:
            self.widening = 1.0  # CPU to spare: windows do not stretch, and start from the usual stretch again
        elif self.delay > LATE:
            self.widening = min(_MAX_WIDENING, self.widening * _WIDEN)
        elif self.delay < LATE / 2:
            self.widening = max(1.0, self.widening / _WIDEN)

    def _probe(self, now: float) -> None:
        if self._probing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # sampled outside a loop (a test's clock): no delay to measure
        self._probing = True
        loop.call_soon(self._probed, now)

    def _probed(self, asked: float) -> None:
        self._probing = False
        self.note_delay(self._clock() - asked)
