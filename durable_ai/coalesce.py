"""How a run batches its events into broker messages."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigurationError

__all__ = ["Coalesce"]


@dataclass(frozen=True, slots=True)
class Coalesce:
    """The batching policy of a session's writer.

    Deltas are buffered and flushed as one broker message when ``max_delay`` seconds have passed since the first
    buffered event, when ``max_bytes`` (UTF-8) are buffered, or at once when a non-delta event (tool call,
    status, run end...) is written. Adjacent deltas of one part are concatenated. The first delta of every part
    (so the first token of every run) is flushed at once, because time to first token matters more than cost.

    The default (40 ms) is 25 messages per second for a steady stream, half of Ably's per-channel limit.
    ``Coalesce.off()`` writes every event as its own broker message.

    Under load (the event loop's thread wanted the CPU for 90% of the last 100 ms or more, running or waiting for
    a core), a window stays open past ``max_delay`` until it holds ``deltas_under_load`` deltas, and at most
    ``stretch_under_load`` times ``max_delay`` in all (160 ms by default). A busy machine then writes about as
    many tokens per broker message as an idle one, instead of more messages that each cost it more; the first
    delta of a part is still flushed at once. ``stretch_under_load=1`` keeps windows to ``max_delay`` always.
    While the thread waits for a core (other processes hold the CPUs), its runs write as much more slowly, and the
    stretch past ``max_delay`` grows by the inverse of the share of the CPU it got (up to 4 times: a window of
    520 ms by default).

    A loop that also runs late (a callback waits more than 20 ms to run, on average) has more work than it can do:
    while it does, the stretch widens by a quarter every tenth of a second, up to ``max_delay_under_load`` (1 s) for
    a whole window, and narrows again the same way once the loop is on time. Windows then settle near the width at
    which the loop keeps up with its messages; delivery is as late as the loop already is.
    """

    max_delay: float = 0.040
    max_bytes: int = 16 * 1024
    flush_first_delta: bool = True
    stretch_under_load: float = 4.0
    deltas_under_load: int = 128
    max_delay_under_load: float = 1.0

    def __post_init__(self) -> None:
        if self.max_delay < 0:
            raise ConfigurationError("max_delay cannot be negative")
        if self.max_bytes < 0:
            raise ConfigurationError("max_bytes cannot be negative")
        if not self.stretch_under_load >= 1:
            raise ConfigurationError("stretch_under_load must be at least 1 (1: windows never stretch)")
        if self.deltas_under_load < 1:
            raise ConfigurationError("deltas_under_load must be at least 1")
        if self.max_delay_under_load < 0:
            raise ConfigurationError("max_delay_under_load cannot be negative")

    @property
    def batching(self) -> bool:
        """Whether several events may share one broker message."""
        return self.max_delay > 0 and self.max_bytes > 0

    @classmethod
    def off(cls) -> Coalesce:
        """One broker message per event: no batching, no concatenation."""
        return cls(max_delay=0.0, max_bytes=0)
