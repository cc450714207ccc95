"""Reading a session's events log: cursors, resets, reconnects, fragments and deduplication."""

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
from typing import TypeVar

from .backend import Backend, Channel, StoredMessage
from .cursor import Cursor, LogPosition
from .errors import BackendUnavailable, HubClosed, LogReset, ProtocolError
from .events import Event, Reset, decode_records, parse_event

logger = logging.getLogger("durable_ai")

_DEDUPE_WINDOW = 10_000
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReadOptions:
    reconnect_timeout: float
    is_closed: Callable[[], bool]
    new_id: Callable[[], str]
    now_ms: Callable[[], int]


def _reset(session: str, reason: str, cursor: Cursor | None, options: ReadOptions) -> Reset:
    event = Reset(id=options.new_id(), session=session, ts=options.now_ms(), reason=reason)
    event._set_cursor(str(cursor) if cursor is not None else None)
    return event


async def read_events(
    backend: Backend,
    session: str,
    *,
    after: Cursor | None,
    follow: bool,
    options: ReadOptions,
    skip_whole_message: bool = False,
) -> AsyncIterator[Event]:
    """Yield the events after ``after`` in order, each with its cursor; ``reset`` where positions were lost.

    ``skip_whole_message`` treats ``after`` as "after every event of that message" whatever its index.
    """
    channel = Channel(session, "events")
    start = after.log_position if after is not None else None
    skip_position = after.position if after is not None else None
    skip_index = (1 << 62) if skip_whole_message else (after.index if after is not None else -1)
    seen: OrderedDict[str, None] = OrderedDict()
    partial: dict[str, dict[int, bytes]] = {}
    pending_reset: str | None = None
    reset_unannounced = False
    down_since: float | None = None
    backoff = 0.05
    while True:
        try:
            if reset_unannounced:
                # An empty log has no first message to announce the reset with: announce it now.
                reset_unannounced = False
                if pending_reset is not None and await backend.head(channel) is None:
                    yield _reset(session, pending_reset, None, options)
                    pending_reset = None
            async with closing(backend.read(channel, start=start, follow=follow)) as messages:
                async for message in messages:
                    down_since, backoff = None, 0.05
                    if pending_reset is not None:
                        yield _reset(session, pending_reset, Cursor(message.epoch, message.position, -1), options)
                        pending_reset = None
                    skip = skip_index if message.position == skip_position else -1
                    for event in await _events_of(backend, channel, message, skip, partial):
                        if event.id:
                            if event.id in seen:
                                continue
                            seen[event.id] = None
                            if len(seen) > _DEDUPE_WINDOW:
                                seen.popitem(last=False)
                        yield event
                    start = LogPosition(message.epoch, message.position)
                    skip_position, skip_index = message.position, 1 << 62
            if pending_reset is not None:
                yield _reset(session, pending_reset, None, options)
            return
        except LogReset as exc:
            pending_reset, reset_unannounced = exc.reason, True
            start, skip_position, skip_index = None, None, -1
            partial.clear()
        except _LostFragments as exc:
            yield _reset(session, str(exc), exc.cursor, options)
            start = exc.cursor.log_position
            skip_position, skip_index = exc.cursor.position, 1 << 62
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


@contextlib.asynccontextmanager
async def closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close a backend's iterator when the reader stops, so subscriptions end at once, not at GC."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


async def _events_of(
    backend: Backend, channel: Channel, message: StoredMessage, skip: int, partial: dict[str, dict[int, bytes]]
) -> list[Event]:
    """The events of one broker message after line ``skip``, each with its cursor."""
    try:
        records = decode_records(message.data)
    except ProtocolError as exc:
        logger.warning("skipping a message of session %r that is not durable-ai data: %s", channel.session, exc)
        return []
    events: list[Event] = []
    for index, record in enumerate(records):
        if index <= skip:
            continue
        if record.get("type") == "fragment":
            event = await _fragment(backend, channel, message, record, partial)
            if event is None:
                continue
        else:
            event = parse_event(record)
        event._set_cursor(f"{message.epoch}:{message.position}:{index}")
        events.append(event)
    return events


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
