"""Cursors: where an event sits in a session's log.

A cursor is an opaque, stable string a client stores and hands back to ``events(after=...)``. It names the log's
**epoch** (its identity: a recreated log has a new one), the backend's **position** of the broker message that
holds the event, and the event's **index** inside that message (a message can carry a batch of events).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidCursor

__all__ = ["Cursor", "LogPosition"]

_MAX_LEN = 512


@dataclass(frozen=True, slots=True)
class LogPosition:
    """A point in one backend log: ``position`` is the backend's id of a broker message (``None``: the start)."""

    epoch: str
    position: str | None


@dataclass(frozen=True, slots=True)
class Cursor:
    """The parsed form of a cursor string.

    ``index`` is the event's line in the broker message at ``position``; ``-1`` means "before that message",
    which is how a ``reset`` event points at the earliest retained point of the log.
    """

    epoch: str
    position: str | None
    index: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.position or ''}:{self.index}"

    @property
    def log_position(self) -> LogPosition:
        return LogPosition(self.epoch, self.position)

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """Parse a cursor string; raises :class:`InvalidCursor` for anything durable-ai did not produce."""
        if not isinstance(text, str):
            raise InvalidCursor(text, "a cursor is a string")
        if not text or len(text) > _MAX_LEN or any(c.isspace() for c in text):
            raise InvalidCursor(text, f"expected 1 to {_MAX_LEN} characters without spaces")
        epoch, sep, rest = text.partition(":")
        position, sep2, index_text = rest.rpartition(":")
        if not (sep and sep2 and epoch):
            raise InvalidCursor(text, "expected <epoch>:<position>:<index>")
        try:
            index = int(index_text)
        except ValueError:
            raise InvalidCursor(text, "the index is not an integer") from None
        if index < -1:
            raise InvalidCursor(text, "the index is negative")
        if not position and index != -1:
            raise InvalidCursor(text, "a cursor without a position must have index -1")
        return cls(epoch, position or None, index)
