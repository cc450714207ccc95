"""Whether the event loop's thread is short of CPU: what stretches coalescing windows under load.

A writer's window is time-based (``Coalesce.max_delay``), so on a machine that is busy the same runs write fewer
tokens per window and therefore more broker messages per token, and each message costs the busy machine more: the
SDK would slow down faster than the machine. The hub's :class:`LoadGauge` tells its writers when the loop's
thread wanted the CPU for most of the last tenth of a second (running, or runnable and waiting for a core, which
is how a machine loaded by other processes shows); they then keep a window open past ``max_delay`` until it
holds enough deltas to be worth a message (see :class:`~durable_ai.coalesce.Coalesce`).

Demand is read from ``/proc/thread-self/schedstat`` on Linux (CPU time plus run-queue wait of the calling
thread); elsewhere, from the thread's CPU time alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["LoadGauge", "thread_demand"]

_SCHEDSTAT = "/proc/thread-self/schedstat"


def thread_demand() -> float:
    """Seconds the calling thread has run or waited to run (CPU time alone where the kernel does not say)."""
    try:
        with open(_SCHEDSTAT, "rb") as stats:
            running, waiting = stats.read().split()[:2]
        return (int(running) + int(waiting)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


class LoadGauge:
    """Samples the loop thread's demand for CPU at most once a ``period`` and says whether it is under load.

    Under load from a share of ``enter`` of the wall time or more; no longer once it falls below ``leave``.
    Call it from the loop's thread only.
    """

    def __init__(
        self,
        *,
        period: float = 0.1,
        enter: float = 0.9,
        leave: float = 0.75,
        clock: Callable[[], float] = time.monotonic,
        demand: Callable[[], float] = thread_demand,
    ) -> None:
        self._period = period
        self._enter = enter
        self._leave = leave
        self._clock = clock
        self._demand = demand
        self._since: float | None = None  # the first call starts the first period (in the loop's thread)
        self._demand_since = 0.0
        self._loaded = False
        self._sampled = False
        self.share = 0.0
        """The share of the last sampled period the thread wanted the CPU."""

    def loaded(self) -> bool:
        """Whether the loop's thread is short of CPU (re-sampled when a period has passed since the last)."""
        now = self._clock()
        if self._since is None:
            self._since, self._demand_since = now, self._demand()
            return False
        elapsed = now - self._since
        # The first period is short, so that a loop that is busy from its start is known to be soon.
        if elapsed >= (self._period if self._sampled else self._period / 5):
            self._sampled = True
            demand = self._demand()
            self.share = (demand - self._demand_since) / elapsed
            self._loaded = self.share >= (self._leave if self._loaded else self._enter)
            self._since, self._demand_since = now, demand
        return self._loaded
