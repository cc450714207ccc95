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
    """

    max_delay: float = 0.040
    max_bytes: int = 16 * 1024
    flush_first_delta: bool = True

    def __post_init__(self) -> None:
        if self.max_delay < 0:
            raise ConfigurationError("max_delay cannot be negative")
        if self.max_bytes < 0:
            raise ConfigurationError("max_bytes cannot be negative")

    @property
    def batching(self) -> bool:
        """Whether several events may share one broker message."""
        return self.max_delay > 0 and self.max_bytes > 0

    @classmethod
    def off(cls) -> Coalesce:
        """One broker message per event: no batching, no concatenation."""
        return cls(max_delay=0.0, max_bytes=0)
