"""A session's log on an Ably channel whose messages may grow by appends: operations, positions and framing.

Without appends every message is one entry of the log, at its serial. With appends (message per part), a part's
message is created with its first batch and each later batch is appended to it; subscribers receive every
append as it happens, and history returns the message whole. The log is then the sequence of **operations**:
the create, at the message's serial, and each append, at its version serial.

An appended batch is framed as ``\\n{"~":"<previous version serial>"}\\n<batch>``: the first line links it to the
operation before it on the same message. The links let a reader split a message that history returns whole back
into its operations with their positions (the last append is at the message's ``version.serial``), and drop an
append a retry stored twice (both carry the same link). Event lines are JSON objects starting ``{"v":``, and JSON
strings never hold a raw newline, so the frame cannot occur inside a batch.

Messages that may still grow are named ``p`` (parts); the others ``e``. A part grows for at most
:data:`PART_WINDOW_SECONDS` after it is created, so an operation at time *t* can only belong to a message created
after *t* minus that window. A reader resuming inside that window must read history from the oldest part that may
still have grown: a position carries the serial of that part after a ``|`` (``<serial>|<oldest open part>``), so a
cursor alone is enough to resume exactly.

A read may also start from a **bound** ``~<milliseconds>`` (:func:`bound_position`): every operation whose serial
is from that time on, including appends to parts created within the window before it. It names no message, so
it never raises :class:`~durable_ai.errors.LogReset` for a missing one; it is how a control's sender finds the
agent's answer without first looking for the end of the log.
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from durable_ai.backend import LogPosition
from durable_ai.errors import LogReset

from ._common import DELETE_MARKER, serial_time

__all__ = [
    "APPENDABLE_NAME",
    "PLAIN_NAME",
    "HistoryPass",
    "NewestScan",
    "Op",
    "OpenParts",
    "Reorder",
    "append_frame",
    "bound_after",
    "bound_position",
    "format_position",
    "parse_position",
    "split_append",
    "split_message",
]

PLAIN_NAME = "e"
APPENDABLE_NAME = "p"
#: seconds a part message is appended to after its creation (the writer starts a new message after that)
PART_MAX_AGE_SECONDS = 30.0
#: seconds after a part's creation that appends to it can still land (retries included), as serial time
PART_WINDOW_SECONDS = 60.0

_FRAME = b'\n{"~":'


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of the log: a created message or an append, at its position (a serial)."""

    serial: str
    data: bytes


def append_frame(previous: str, batch: bytes) -> bytes:
    """The data of an append that follows the operation at ``previous`` on the same message."""
    return _FRAME + json.dumps(previous).encode() + b"}\n" + batch


def _unframe(chunk: bytes) -> tuple[str, bytes] | None:
    """``(previous, batch)`` of one framed append without its leading frame marker, or ``None``."""
    end = chunk.find(b"}\n")
    if end < 0:
        return None
    try:
        previous = json.loads(chunk[:end])
    except ValueError:
        return None
    return (previous, chunk[end + 2 :]) if isinstance(previous, str) else None


def split_append(data: bytes) -> tuple[str, bytes] | None:
    """The link and batch of an append as subscribers receive it; ``None`` if it is not framed."""
    if not data.startswith(_FRAME):
        return None
    return _unframe(data[len(_FRAME) :])


def split_message(serial: str, version_serial: str | None, data: bytes) -> list[Op]:
    """The operations of a message as history returns it (after its appends), oldest first.

    An append stored twice by a retry is dropped; the surviving copy is the one the next append links to.
    """
    if not version_serial or version_serial == serial or _FRAME not in data:
        return [Op(serial, data)]
    pieces = data.split(_FRAME)
    batches = [pieces[0]]
    links: list[str] = []
    for piece in pieces[1:]:
        framed = _unframe(piece)
        if framed is None:  # not ours: keep the text with the batch before it
            batches[-1] += _FRAME + piece
            continue
        previous, batch = framed
        if links and previous == links[-1]:
            # Two appends linked to the same operation: a retried append that had landed. The next append's
            # link names which copy the writer kept; with none, keep the later one.
            batches[-1] = batch
            continue
        links.append(previous)
        batches.append(batch)
    # The operation of batch k is named by the link of batch k + 1; the last is the message's latest version.
    positions = [serial, *links[1:], version_serial]
    return [Op(position, batch) for position, batch in zip(positions, batches, strict=True)]


def format_position(serial: str, oldest_open: str | None) -> str:
    """A position: the operation's serial, and the oldest part that may still grow when it is older."""
    return serial if oldest_open is None or oldest_open >= serial else f"{serial}|{oldest_open}"


def parse_position(position: str) -> tuple[str, str | None]:
    """``(serial, oldest open part)`` of a position made by :func:`format_position`."""
    serial, _, oldest = position.partition("|")
    return serial, oldest or None


_BOUND = "~"


def bound_position(millis: int) -> str:
    """A start for reading every operation from the time ``millis`` on (see the module docstring)."""
    return f"{_BOUND}{max(0, millis)}"


#: milliseconds before a control's serial from which its answer is looked for: serials of different channels are
#: compared by their time only, and Ably's servers' clocks agree to well within this
CONTROL_MARGIN_MS = 1_000


def bound_after(serial: str | None) -> str:
    """A bound from which every operation stored after the message ``serial`` (of another channel) is read."""
    millis = serial_time(serial) if serial else None
    if millis is None:
        millis = int(time.time() * 1000)
    return bound_position(millis - CONTROL_MARGIN_MS)


def _serial_prefix(millis: int) -> str:
    """A string that sorts before every serial of that millisecond and after every earlier one."""
    return f"{max(0, millis):014d}"


def parse_start(position: str) -> tuple[str, str | None, bool]:
    """``(first, oldest, exact)`` of a start position: a position of the log (``exact``), or a bound."""
    if position.startswith(_BOUND):
        text = position[len(_BOUND) :]
        if not text.isdigit():
            raise LogReset(f"not a position of this log: {position!r}")
        millis = int(text)
        return _serial_prefix(millis), _serial_prefix(millis - int(PART_WINDOW_SECONDS * 1000)), False
    first, oldest = parse_position(position)
    return first, oldest, True


class OpenParts:
    """The part messages a reader has seen that may still grow, to name the oldest in positions."""

    def __init__(self) -> None:
        self._heap: list[tuple[str, int]] = []

    def add(self, serial: str) -> None:
        created = serial_time(serial)
        if created is not None:
            heapq.heappush(self._heap, (serial, created))

    def oldest(self, now_serial: str) -> str | None:
        """The oldest part created within the window before the operation at ``now_serial``."""
        now = serial_time(now_serial)
        if now is None:
            return None
        horizon = now - int(PART_WINDOW_SECONDS * 1000)
        while self._heap and self._heap[0][1] < horizon:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None


class Reorder:
    """Puts the operations of messages read from history (in message order) into position order.

    An operation at position *p* belongs to a message created at or before *p*, so once history has reached
    a message created at *s*, every operation before *s* is known.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[str, int, Op]] = []
        self._count = 0

    def add(self, ops: Iterable[Op]) -> None:
        for op in ops:
            self._count += 1
            heapq.heappush(self._heap, (op.serial, self._count, op))

    def release(self, below: str | None = None) -> list[Op]:
        """The operations before ``below`` (``None``: all), in order."""
        out: list[Op] = []
        while self._heap and (below is None or self._heap[0][0] < below):
            out.append(heapq.heappop(self._heap)[2])
        return out


@dataclass(frozen=True, slots=True)
class Start:
    """Where a read starts: the serial to read from (``None``: the floor), the oldest part that may have grown
    after it, and whether it is an operation of the log (``exact``) or a bound (:func:`bound_position`)."""

    first: str | None = None
    oldest: str | None = None
    exact: bool = True


def read_start(start: LogPosition | None, epoch: str, floor: str) -> Start:
    """Where a read from ``start`` begins. Raises :class:`~durable_ai.errors.LogReset` for a start from another
    epoch, or from an operation older than the floor."""
    if start is not None and start.epoch != epoch:
        raise LogReset("the session's log was recreated (deleted since the cursor)")
    if start is None or not start.position:
        return Start()
    first, oldest, exact = parse_start(start.position)
    if first < floor:
        if exact:
            raise LogReset("the cursor is older than the session's deletion")
        return Start()
    return Start(first, oldest, exact)


class HistoryPass:
    """One forwards read of a channel's history from a position: the log's operations in order, with positions.

    Feed it the messages history returns (oldest first, from :attr:`fetch` on) with :meth:`add`, then call
    :meth:`finish` once history has no more pages (not needed once :attr:`done`). It splits messages grown by
    appends into their operations, puts them in position order, skips what is before the start or already read
    (``last``), stops after ``until``, and raises :class:`~durable_ai.errors.LogReset` when the operation at the
    start, or a part the start depends on, is no longer retained.

    Args:
        floor: the session's floor (messages with an older serial are hidden).
        first: the serial to read from, inclusive (``None``: from the floor).
        exact: ``first`` is an operation of the log (``False``: a bound, see :func:`parse_start`).
        oldest: the oldest part that may have grown after ``first`` (from its position), read from when older.
        until: the last operation to return (``None``: everything history has).
        last: the last operation already returned (later passes of a follower skip up to it).
    """

    def __init__(
        self,
        *,
        floor: str,
        first: str | None,
        oldest: str | None,
        until: str | None = None,
        last: str | None = None,
        exact: bool = True,
    ) -> None:
        self.floor = floor
        self.last = last
        self.parts = OpenParts()
        self.done = False
        self._lower = first or floor
        #: the serial to read history from (inclusive; empty: from the start)
        self.fetch = oldest if oldest is not None and oldest < self._lower else self._lower
        # A bound names no message: nothing is expected at it, and the window before it may hold no part.
        self._expected = first if exact else None
        self._oldest = oldest if exact else None
        self._until = until
        self._reorder = Reorder()
        self._seen_first = False

    def add(self, serial: str | None, version: str | None, name: str | None, data: bytes) -> list[tuple[str, bytes]]:
        """Take the next message of history; return the operations now known to be next, as (position, data)."""
        if self.done or not serial or serial < self.fetch or serial < self.floor or name == DELETE_MARKER:
            return []  # (a deletion's marker opens the channel's log after it: it is no operation of it)
        if not self._seen_first and self._oldest is not None and self.fetch == self._oldest and serial != self._oldest:
            raise LogReset("a part the cursor depends on is no longer retained")
        self._seen_first = True
        ready = self._reorder.release(serial)
        if name == APPENDABLE_NAME:
            self.parts.add(serial)
        self._reorder.add(split_message(serial, version, data))
        return self._emit(ready)

    def finish(self, *, live_after: bool = False) -> list[tuple[str, bytes]]:
        """History has no more messages: the operations still held back.

        With ``live_after`` (history was read up to a realtime attachment, whose messages come next), an operation
        at the start that history lacks may be one of those: it is left in :attr:`unmet` for the reader to find
        there, instead of a reset.
        """
        out = [] if self.done else self._emit(self._reorder.release())
        if self._expected is not None and not live_after:
            raise LogReset("the message at the cursor is no longer retained")
        return out

    @property
    def unmet(self) -> str | None:
        """The operation at the start, when history (read to its end) did not reach it."""
        return self._expected

    def oldest_open(self) -> str | None:
        """The oldest part that may still grow after the last operation returned (where the next pass starts)."""
        return self.parts.oldest(self.last) if self.last is not None else None

    def _emit(self, ops: list[Op]) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for op in ops:
            if op.serial < self._lower:
                continue
            if self._expected is not None:
                if op.serial != self._expected:
                    raise LogReset("the message at the cursor is no longer retained")
                self._expected = None
            if self._until is not None and op.serial > self._until:
                self.done = True
                break
            if self.last is not None and op.serial <= self.last:
                continue
            self.last = op.serial
            out.append((format_position(op.serial, self.parts.oldest(op.serial)), op.data))
        return out


class NewestScan:
    """The position of a channel's newest operation, from history read backwards.

    Appends change messages created earlier, so the scan goes back through the window in which parts grow. Feed
    it messages newest first with :meth:`add` until it returns ``False``; :attr:`result` is then the newest
    operation's serial and the oldest part that may still grow at that point (``None``: nothing above the floor).
    """

    MAX_MESSAGES = 1000

    def __init__(self, floor: str) -> None:
        self._floor = floor
        self._newest: str | None = None
        self._horizon: int | None = None
        self._parts: list[str] = []
        self._count = 0

    def add(self, serial: str | None, version: str | None, name: str | None) -> bool:
        """Take the next older message; ``False`` once older messages cannot change the result."""
        if not serial or serial < self._floor:
            return False
        if name == DELETE_MARKER:
            return False  # the deletion: nothing older is in the log
        created = serial_time(serial)
        if self._horizon is None and created is not None:
            self._horizon = created - int(PART_WINDOW_SECONDS * 1000)
        if self._horizon is not None and created is not None and created < self._horizon:
            return False
        position = max(serial, version or serial)
        self._newest = position if self._newest is None else max(self._newest, position)
        if name == APPENDABLE_NAME:
            self._parts.append(serial)
        self._count += 1
        return self._count < self.MAX_MESSAGES

    @property
    def result(self) -> tuple[str, str | None] | None:
        return (self._newest, min(self._parts, default=None)) if self._newest else None
