"""Reading a session's events log: cursors, resets, reconnects, fragments, deduplication, and folding a view.

Two records of the log are never delivered: ``log-start`` (a reader from the start of an epoch that does not find it
first knows retention dropped the start, and yields ``reset``) and ``tombstone`` (``session.delete()`` wrote it
before clearing the log: the reader yields ``reset`` and goes on with the new log).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from ._tail import SavedTail, Tail, split_snapshot
from .backends.base import Backend, Channel, StoredMessage
from .cursor import Cursor, LogPosition
from .errors import BackendUnavailable, HubClosed, LogReset, ProtocolError
from .events import LOG_START, TOMBSTONE, Event, Reset, decode_records, parse_event, set_cursor
from .view import SessionView, ViewBuilder

logger = logging.getLogger("durable_ai")

_DEDUPE_WINDOW = 10_000
T = TypeVar("T")

# The index of a cursor that stands after every event of its message (``session.head()``).
END_OF_MESSAGE = 1 << 30
_DELETED = "the session was deleted"
_TRUNCATED = "retention dropped the start of the session's log"


@dataclass(frozen=True, slots=True)
class ReadOptions:
    reconnect_timeout: float
    is_closed: Callable[[], bool]
    new_id: Callable[[], str]
    now_ms: Callable[[], int]


def _reset(session: str, reason: str, cursor: Cursor | None, options: ReadOptions) -> Reset:
    event = Reset(id=options.new_id(), session=session, ts=options.now_ms(), reason=reason)
    set_cursor(event, str(cursor) if cursor is not None else None)
    return event


async def read_events(
    backend: Backend,
    session: str,
    *,
    after: Cursor | None,
    follow: bool,
    options: ReadOptions,
    use_tail: bool = False,
) -> AsyncIterator[Event]:
    """Yield the events after ``after`` in order, each with its cursor; ``reset`` where positions were lost.

    A cursor without a position (``<epoch>::-1``) reads the epoch from its start, and yields ``reset`` first if
    the log's first message is not its ``log-start`` (retention dropped the start).

    With ``use_tail``, a catch-up read (not ``follow``) yields the events the session's snapshot keeps (see
    :mod:`durable_ai._tail`) when they cover ``after``, and reads the log only after the snapshot's cursor. A
    follower always reads the log: it must be reading it, not the snapshot, when a deletion comes (to report it as
    one).
    """
    channel = Channel(session, "events")
    seen: OrderedDict[str, None] = OrderedDict()
    opened: AsyncIterator[StoredMessage] | None = None  # the log's read the tail's check began, to go on with
    saved = await _covering_tail(backend, channel, after) if use_tail and not follow else None
    if saved is not None:
        events, end, opened = saved
        for event in events:
            if event.id:
                seen[event.id] = None
            yield event
        if end is None:
            return  # the log holds nothing after the snapshot, and the reader does not follow
        after = end
    try:
        async with closing(_read_log(backend, channel, session, after, follow, options, seen, opened)) as log:
            async for event in log:
                yield event
    finally:
        if opened is not None:
            await _close(opened)


async def _read_log(
    backend: Backend,
    channel: Channel,
    session: str,
    after: Cursor | None,
    follow: bool,
    options: ReadOptions,
    seen: OrderedDict[str, None],
    opened: AsyncIterator[StoredMessage] | None,
) -> AsyncIterator[Event]:
    """:func:`read_events` from the log (``opened``: a read of it from ``after`` already begun)."""
    start = after.log_position if after is not None else None
    skip_position = after.position if after is not None else None
    skip_index = after.index if after is not None else -1
    check_opening = after is not None and after.position is None
    partial: dict[str, dict[int, bytes]] = {}
    pending_reset: str | None = None
    reset_unannounced = False
    deleted = False  # a tombstone was delivered and nothing since: the log's removal is no news
    tombstone: LogPosition | None = None  # following: wait for the deletion it announced to be done
    down_since: float | None = None
    backoff = 0.05
    while True:
        try:
            if tombstone is not None:
                # A live feed may not notice a deletion made elsewhere (Ably keeps delivering under the old epoch):
                # once the log has changed, read again from the tombstone. Gone: the new log, from its start.
                # Still there (the deletion failed): what came after it.
                if await backend.head(channel) == tombstone:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                start, skip_position, skip_index, tombstone = tombstone, tombstone.position, END_OF_MESSAGE, None
                backoff = 0.05
            if reset_unannounced:
                # An empty log has no first message to announce the reset with: announce it now.
                reset_unannounced = False
                if pending_reset is not None and await backend.head(channel) is None:
                    yield _reset(session, pending_reset, None, options)
                    pending_reset = None
            source, opened = opened or backend.read(channel, start=start, follow=follow), None
            async with closing(source) as messages:
                async for message in messages:
                    down_since, backoff = None, 0.05
                    records = _records(channel, message)
                    if check_opening:
                        check_opening = False
                        if not records or records[0].get("type") != LOG_START:
                            pending_reset = pending_reset or _TRUNCATED
                    if pending_reset is not None:
                        yield _reset(session, pending_reset, Cursor(message.epoch, message.position, -1), options)
                        pending_reset = None
                    skip = skip_index if message.position == skip_position else -1
                    for index, item in enumerate(records):
                        if index <= skip:
                            continue
                        kind = item.get("type")
                        if kind == LOG_START:
                            continue
                        if kind == TOMBSTONE:
                            yield _reset(session, _DELETED, None, options)
                            deleted = True
                            seen.clear()
                            partial.clear()
                            if follow:
                                tombstone = LogPosition(message.epoch, message.position)
                                break
                            continue
                        if kind == "fragment":
                            whole = await _fragment(backend, channel, message, item, partial)
                            if whole is None:
                                continue
                            event = whole
                        else:
                            event = parse_event(item)
                        set_cursor(event, f"{message.epoch}:{message.position}:{index}")
                        deleted = False
                        if event.id:
                            if event.id in seen:
                                continue
                            seen[event.id] = None
                            if len(seen) > _DEDUPE_WINDOW:
                                seen.popitem(last=False)
                        yield event
                    if tombstone is not None:
                        break
                    start = LogPosition(message.epoch, message.position)
                    skip_position, skip_index = message.position, END_OF_MESSAGE
            if tombstone is not None:
                continue
            if pending_reset is not None:
                yield _reset(session, pending_reset, None, options)
            return
        except LogReset as exc:
            if deleted:
                # The log a tombstone announced is gone: read the new one, whose start was announced already.
                deleted, pending_reset, reset_unannounced = False, None, False
            else:
                pending_reset, reset_unannounced = exc.reason, True
            start, skip_position, skip_index, check_opening = None, None, -1, False
            partial.clear()
        except _LostFragments as exc:
            yield _reset(session, str(exc), exc.cursor, options)
            start = exc.cursor.log_position
            skip_position, skip_index = exc.cursor.position, END_OF_MESSAGE
        except BackendUnavailable as exc:
            if options.is_closed():
                raise HubClosed("the hub was closed while reading events") from exc
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > options.reconnect_timeout:
                raise
            logger.info("events of session %r unavailable (%s); reading again in %.2fs", session, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


async def _covering_tail(
    backend: Backend, channel: Channel, after: Cursor | None
) -> tuple[list[Event], Cursor | None, AsyncIterator[StoredMessage] | None] | None:
    """If the snapshot's tail covers ``after`` and the log is still the one it was saved from: the tail's events
    after ``after``, the cursor to read the log after (``None``: nothing after), and that read, begun."""
    try:
        raw = await backend.load_snapshot(channel.session)
    except BackendUnavailable:
        return None  # reading the log will say what is wrong
    if raw is None:
        return None
    _, data = split_snapshot(raw)
    saved = Tail.from_json(data) if data is not None else None
    if saved is None:
        return None
    events = saved.events_after(after)
    if events is None:
        return None  # not covered: read the log as usual
    # The log must still hold the message the snapshot ends at, in the same epoch (a read checks the epoch with
    # the broker, where a head() may answer from what this process knew): read from there, and see whether
    # anything follows it.
    end = Cursor.parse(saved.end)
    messages = backend.read(channel, start=end.log_position, follow=False)
    peeked: list[StoredMessage] = []
    handed_on = False
    try:
        async for message in messages:
            peeked.append(message)
            if len(peeked) > 1 or message.position != end.position:
                break
        if not peeked or peeked[0].position != end.position:
            return None
        if len(peeked) == 1:
            return events, None, None
        handed_on = True  # more follows: the caller reads on from here
        return events, end, _resumed(peeked, messages)
    except (LogReset, BackendUnavailable):
        return None  # the log was recreated or trimmed since (or cannot be read): reading it says which
    finally:
        if not handed_on:
            await _close(messages)


async def _resumed(peeked: list[StoredMessage], rest: AsyncIterator[StoredMessage]) -> AsyncIterator[StoredMessage]:
    """The messages already read from ``rest``, then the rest of it (closed with this)."""
    try:
        for message in peeked:
            yield message
        async for message in rest:
            yield message
    finally:
        await _close(rest)


async def _close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


@contextlib.asynccontextmanager
async def closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close a backend's iterator when the reader stops, so subscriptions end at once, not at GC."""
    try:
        yield iterator
    finally:
        await _close(iterator)


def _records(channel: Channel, message: StoredMessage) -> list[dict[str, object]]:
    try:
        return decode_records(message.data)
    except ProtocolError as exc:
        logger.warning("skipping a message of session %r that is not durable-ai data: %s", channel.session, exc)
        return []


class _LostFragments(Exception):
    def __init__(self, reason: str, cursor: Cursor) -> None:
        super().__init__(reason)
        self.cursor = cursor


async def _fragment(
    backend: Backend,
    channel: Channel,
    message: StoredMessage,
    record: dict[str, object],
    partial: dict[str, dict[int, bytes]],
) -> Event | None:
    """Collect one fragment; return the whole event when its last fragment arrives."""
    event_id, index, count, first = record.get("id"), record.get("index"), record.get("count"), record.get("first")
    chunk = record.get("chunk")
    if not (isinstance(event_id, str) and isinstance(index, int) and isinstance(count, int) and isinstance(chunk, str)):
        logger.warning("skipping a malformed fragment record in session %r", channel.session)
        return None
    pieces = partial.setdefault(event_id, {})
    pieces[index] = base64.b64decode(chunk)
    if index == count - 1 and len(pieces) < count:
        # Resumed in the middle of a fragmented event: fetch its first fragments from the log.
        if isinstance(first, str):
            try:
                async for earlier in backend.read(channel, start=LogPosition(message.epoch, first), follow=False):
                    for line in decode_records(earlier.data):
                        if line.get("type") == "fragment" and line.get("id") == event_id:
                            got = line.get("index")
                            if isinstance(got, int) and got not in pieces and isinstance(line.get("chunk"), str):
                                pieces[got] = base64.b64decode(str(line["chunk"]))
                    if len(pieces) == count:
                        break
            except LogReset:
                pass
        if len(pieces) < count:
            partial.pop(event_id, None)
            raise _LostFragments(
                "the first fragments of a large event are no longer retained",
                Cursor(message.epoch, message.position, 0),
            )
    if len(pieces) < count:
        return None
    del partial[event_id]
    data = b"".join(pieces[i] for i in range(count))
    return parse_event(json.loads(data))


async def load_snapshot(backend: Backend, session: str) -> SessionView | None:
    """The session's latest readable snapshot, or ``None``."""
    raw = await backend.load_snapshot(session)
    return _view(session, split_snapshot(raw)[0]) if raw is not None else None


def _view(session: str, data: bytes) -> SessionView | None:
    try:
        view = SessionView.model_validate_json(data)
    except ValidationError:
        logger.warning("ignoring an unreadable snapshot of session %r", session)
        return None
    return view if view.cursor is not None else None


async def load_saved(backend: Backend, session: str) -> tuple[SessionView | None, SavedTail | None]:
    """The session's latest readable snapshot and the tail saved with it (each ``None`` if missing or unreadable)."""
    raw = await backend.load_snapshot(session)
    if raw is None:
        return None, None
    view_data, tail_data = split_snapshot(raw)
    view = _view(session, view_data)
    if view is None:
        return None, None
    saved = Tail.from_json(tail_data) if tail_data is not None else None
    if saved is not None and saved.end != view.cursor:
        saved = None
    return view, saved


async def fold(
    backend: Backend, session: str, builder: ViewBuilder | None, options: ReadOptions, *, runs_only: bool = False
) -> ViewBuilder:
    """Bring a view up to date: a given builder from its cursor, or a new one from the saved snapshot.

    A view that starts without a snapshot reads from the start of the log's epoch, so that events lost to
    retention are reported (``truncated``), not skipped.
    """
    if builder is None:
        builder = ViewBuilder(session, await load_snapshot(backend, session), runs_only=runs_only)
    await _fold(backend, session, builder, None, options)
    return builder


async def fold_with_tail(
    backend: Backend, session: str, folded: tuple[ViewBuilder, Tail] | None, options: ReadOptions
) -> tuple[ViewBuilder, Tail]:
    """:func:`fold` for a snapshot: the view and the tail saved with it (see :mod:`durable_ai._tail`), kept from
    the previous snapshot or loaded with the saved one."""
    if folded is None:
        view, saved = await load_saved(backend, session)
        builder = ViewBuilder(session, view)
        tail = saved.tail if saved is not None else Tail(builder.cursor)
    else:
        builder, tail = folded
    await _fold(backend, session, builder, tail, options)
    return builder, tail


async def _fold(backend: Backend, session: str, builder: ViewBuilder, tail: Tail | None, options: ReadOptions) -> None:
    after: Cursor | None = None
    if builder.cursor is not None:
        after = Cursor.parse(builder.cursor)
    else:
        head = await backend.head(Channel(session, "events"))
        if head is None:
            return
        after = Cursor(head.epoch, None, -1)
        if tail is not None and not tail.entries:
            tail.restart(str(after))
    async with closing(read_events(backend, session, after=after, follow=False, options=options)) as stream:
        async for event in stream:
            if isinstance(event, Reset):
                recreated = event.cursor is None or Cursor.parse(event.cursor).epoch != after.epoch
                if recreated:
                    builder.reset()
                else:
                    builder.truncated = True
                builder.cursor = event.cursor
                if tail is not None:
                    tail.restart(event.cursor)
                continue
            builder.apply(event)
            if tail is not None:
                tail.add(event)
