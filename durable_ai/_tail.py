"""The recent events of a session, compacted, saved with its snapshot: catch-up without reading the log.

A reader that resumes a finished answer would read every broker message of it (a 10,000-token answer is 2,500
messages at 4 tokens a message). The hub that saves a session's snapshot also keeps the events it folded since a
bounded point, with adjacent deltas of one part merged into one, and saves them with the snapshot. A reader whose
cursor falls inside that range yields the events after its cursor from there, then reads the log after the
snapshot's cursor.

Resume stays exact: every delta merged into a bigger one leaves a mark (its cursor and where its text ends), so a
cursor inside a merged delta resumes with the rest of its text. The events a reader gets are the same text in the
same order with fewer, larger deltas; each carries the cursor of the last original event it holds, so resuming
from it is exact too. A delta that starts inside a merged one (or a merged one trimmed at the front) gets an id
derived from the first event's id and where it starts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ._util import derived_id
from .cursor import Cursor
from .errors import ProtocolError
from .events import Event, ReasoningDelta, TextDelta, encode, parse_event, set_cursor

logger = logging.getLogger("durable_ai")

__all__ = ["TAIL_BYTES", "Tail", "join_snapshot", "split_snapshot"]

TAIL_BYTES = 256 * 1024
"""About how much event data a snapshot keeps (the most recent, in whole events or whole deltas)."""

_VERSION = 1
# What a mark or an entry costs in the saved JSON beyond its text, roughly (for the size bound).
_MARK_COST = 16
_ENTRY_COST = 48
_DELTAS = ("text-delta", "reasoning-delta")


def split_snapshot(raw: bytes) -> tuple[bytes, bytes | None]:
    """A saved snapshot's view JSON and tail JSON (``None`` for a snapshot saved without one)."""
    view, newline, tail = raw.partition(b"\n")
    return view, (tail if newline and tail else None)


def join_snapshot(view: bytes, tail: bytes | None) -> bytes:
    """The bytes to save: the view's JSON (which holds no raw newline), then the tail's, on a line of its own."""
    return view if tail is None else view + b"\n" + tail


@dataclass(slots=True)
class _Entry:
    """One event, or adjacent deltas of one part merged.

    ``marks`` hold the (position, index) of each event merged in, and for a delta where its text ends in the
    entry's text (0 for other events); ``fields`` are the event's JSON fields (a delta's without its text).
    """

    fields: dict[str, Any]
    marks: list[tuple[str, int, int]]
    chunks: list[str] = field(default_factory=list)
    cost: int = 0
    saved: bytes | None = None  # its JSON, once written (an entry changes only while it is the last or the first)

    @property
    def merged(self) -> bool:
        return self.fields.get("type") in _DELTAS

    def text(self) -> str:
        return "".join(self.chunks)

    def to_json(self) -> bytes:
        if self.saved is None:
            fields = dict(self.fields)
            if self.merged:
                fields["delta"] = self.text()
                self.chunks = [fields["delta"]]
            item = {"e": fields, "m": [list(mark) for mark in self.marks]}
            self.saved = json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode()
        return self.saved


class Tail:
    """The events after ``start`` (a cursor string) up to the snapshot's cursor, compacted (see the module)."""

    def __init__(self, start: str | None, *, limit: int = TAIL_BYTES) -> None:
        self.start = start
        self.epoch = _epoch(start) if start is not None else None
        self.limit = limit
        self.entries: list[_Entry] = []
        self.size = 0

    def cursor_of(self, mark: tuple[str, int, int]) -> str:
        return f"{self.epoch}:{mark[0]}:{mark[1]}"

    # -- building (the snapshot's fold) -------------------------------------------------------------------------

    def restart(self, start: str | None) -> None:
        """Forget what was kept: from now on the tail covers the events after ``start`` (``None``: nothing)."""
        self.start = start
        self.epoch = _epoch(start) if start is not None else None
        self.entries = []
        self.size = 0

    def add(self, event: Event) -> None:
        """Keep one event the fold read (in order, with its cursor)."""
        cursor = event.cursor
        if self.start is None or cursor is None:
            return
        epoch, position, index = _parts(cursor)
        if epoch != self.epoch or position is None:
            self.restart(cursor if position is not None else None)
            return
        if isinstance(event, TextDelta | ReasoningDelta):
            last = self.entries[-1] if self.entries else None
            if last is not None and _same_part(last.fields, event):
                last.chunks.append(event.delta)
                last.saved = None
                last.marks.append((position, index, last.marks[-1][2] + len(event.delta)))
                grown = len(event.delta) + _MARK_COST
                last.cost += grown
                self.size += grown
                self._trim()
                return
            fields = event.model_dump(mode="json")
            fields.pop("delta", None)
            entry = _Entry(fields, [(position, index, len(event.delta))], [event.delta])
            entry.cost = _ENTRY_COST + _MARK_COST + len(event.delta)
        else:
            try:
                line = encode(event)
                fields = json.loads(line)
            except Exception:  # an event that does not re-encode is not kept: the tail starts after it
                self.restart(cursor)
                return
            entry = _Entry(fields, [(position, index, 0)], cost=_ENTRY_COST + _MARK_COST + len(line))
        self.entries.append(entry)
        self.size += entry.cost
        self._trim()

    def _trim(self) -> None:
        """Drop the oldest events, or the front of the oldest merged delta where that is enough."""
        while self.size > self.limit and self.entries:
            first = self.entries[0]
            excess = self.size - self.limit
            if not first.merged or len(first.marks) < 2 or first.cost <= excess + _ENTRY_COST:
                self.entries.pop(0)
                self.size -= first.cost
                self.start = self.cursor_of(first.marks[-1])
                continue
            drop = 0  # marks dropped from the front: the tail then starts after the last of them
            while drop < len(first.marks) - 2 and first.marks[drop][2] + _MARK_COST * (drop + 1) < excess:
                drop += 1
            cut = first.marks[drop]
            self.start = self.cursor_of(cut)
            first.saved = None
            first.fields["id"] = derived_id("tail", f"{first.fields.get('id')}:{cut[0]}:{cut[1]}")
            first.chunks = [first.text()[cut[2] :]]
            first.marks = [(p, i, e - cut[2]) for p, i, e in first.marks[drop + 1 :]]
            cost = _ENTRY_COST + _MARK_COST * len(first.marks) + first.marks[-1][2]
            self.size -= first.cost - cost
            first.cost = cost

    def to_json(self, end: str | None) -> bytes | None:
        """The tail as saved with a snapshot whose cursor is ``end``; ``None`` when there is nothing to save."""
        if self.start is None or end is None or _epoch(end) != self.epoch:
            return None
        head = {"v": _VERSION, "epoch": self.epoch, "start": self.start, "end": end}
        opening = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode()[:-1]
        return opening + b',"entries":[' + b",".join(entry.to_json() for entry in self.entries) + b"]}"

    @classmethod
    def from_json(cls, data: bytes, *, limit: int = TAIL_BYTES) -> SavedTail | None:
        """Read a saved tail; ``None`` (and a warning) if it does not decode."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("v") != _VERSION:
                raise ProtocolError("unknown tail version")
            epoch, start, end = doc["epoch"], doc["start"], doc["end"]
            if not (isinstance(epoch, str) and isinstance(start, str) and isinstance(end, str)):
                raise ProtocolError("a tail without its range")
            tail = cls(start, limit=limit)
            if tail.epoch != epoch or _epoch(end) != epoch:
                raise ProtocolError("a tail whose range is not in its epoch")
            for item in doc["entries"]:
                fields, marks = item["e"], item["m"]
                if not (isinstance(fields, dict) and isinstance(marks, list) and marks):
                    raise ProtocolError("a malformed tail entry")
                entry = _Entry(fields, [(str(p), int(i), int(e)) for p, i, e in marks])
                if entry.merged:
                    delta = fields.pop("delta")
                    if not isinstance(delta, str) or entry.marks[-1][2] != len(delta):
                        raise ProtocolError("a merged delta whose marks do not match its text")
                    entry.chunks = [delta]
                tail.entries.append(entry)
        except (ValueError, KeyError, TypeError, ProtocolError) as exc:
            logger.warning("ignoring an unreadable snapshot tail: %s", exc)
            return None
        return SavedTail(tail, end)


@dataclass(frozen=True, slots=True)
class SavedTail:
    """A tail read back from a snapshot, and the snapshot's cursor (where reading the log goes on)."""

    tail: Tail
    end: str

    def events_after(self, after: Cursor | None) -> list[Event] | None:
        """The events after ``after`` up to :attr:`end`, with their cursors; ``None`` if the tail does not cover
        ``after`` (the reader then reads the log). ``after=None`` (from the start) is covered only by a tail that
        starts at its epoch's start."""
        tail = self.tail
        if tail.start is None:
            return None
        if after is None:
            return self._from(0, 0) if tail.start == f"{tail.epoch}::-1" else None
        if str(after) == tail.start:
            return self._from(0, 0)
        if after.epoch != tail.epoch or after.position is None:
            return None
        first = Cursor.parse(tail.start)
        if first.position == after.position and after.index < first.index:
            return None  # before the start, in the message the tail starts in
        # The last mark at or before the cursor in its message; for a cursor before the message, its first mark.
        found: tuple[int, int] | None = None
        before: tuple[int, int] | None = None
        for k, entry in enumerate(tail.entries):
            for m, (position, index, _) in enumerate(entry.marks):
                if position != after.position:
                    continue
                if index <= after.index:
                    found = (k, m + 1)
                elif before is None:
                    before = (k, m)
        if found is not None:
            return self._from(*found)
        if before is not None:
            return self._from(*before)
        return [] if str(after) == self.end else None

    def _from(self, k: int, m: int) -> list[Event]:
        """The events from mark ``m`` of entry ``k`` on (``m`` past the entry's marks: from the next entry)."""
        tail = self.tail
        entries = tail.entries
        if k < len(entries) and m >= len(entries[k].marks):
            k, m = k + 1, 0
        out: list[Event] = []
        for offset, entry in enumerate(entries[k:]):
            fields = dict(entry.fields)
            if entry.merged:
                begin = 0
                if offset == 0 and m > 0:
                    previous = entry.marks[m - 1]
                    begin = previous[2]
                    fields["id"] = derived_id("tail", f"{fields.get('id')}:{previous[0]}:{previous[1]}")
                fields["delta"] = entry.text()[begin:]
            event = parse_event(fields)
            set_cursor(event, tail.cursor_of(entry.marks[-1]))
            out.append(event)
        return out


def _same_part(fields: dict[str, Any], event: TextDelta | ReasoningDelta) -> bool:
    return (
        fields.get("type") == event.type
        and fields.get("part_id") == event.part_id
        and fields.get("run_id") == event.run_id
        and fields.get("agent") == event.agent
        and fields.get("session") == event.session
    )


def _parts(cursor: str) -> tuple[str, str | None, int]:
    parsed = Cursor.parse(cursor)
    return parsed.epoch, parsed.position, parsed.index


def _epoch(cursor: str) -> str:
    return cursor.partition(":")[0]
