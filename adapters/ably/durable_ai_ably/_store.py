"""Reading Ably over REST, written once for the realtime and the REST backends.

Both backends read the same way: a session's epoch and floor from its meta channel, history passes over a
channel (split into the log's operations by :mod:`._log`), the newest operation for ``head``, snapshots, and
presence. Only the live tail differs (a realtime subscription, or polling), so :class:`AblyStore` holds
everything else over one :class:`~durable_ai_ably._http.AblyHttp` client.

History is asked for with Ably's own parameters only (``start``, ``direction``, ``limit``, and ``from_serial`` for
a read that ends at a realtime attachment, as ably-js's ``untilAttach`` does it): a forwards pass from a serial asks
from the serial's time, with a margin, and skips what is older.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from contextlib import aclosing
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from durable_ai.backend import LogPosition, PresenceEntry, snapshot_chunk_count, unpack_snapshot
from durable_ai.errors import BackendError, PublishError

from ._common import (
    DELETE_MARKER,
    PAGE,
    PRESENCE_KIND,
    AblyOptions,
    PresenceLog,
    SessionState,
    all_of,
    decode_data,
    presence_entries,
    serial_time,
    text_field,
    version_serial,
)
from ._http import AblyHttp, json_of
from ._log import HistoryPass, NewestScan, format_position

__all__ = ["HISTORY_MARGIN_MS", "AblyStore", "history_params"]

A = TypeVar("A")
B = TypeVar("B")

#: milliseconds a forwards history read starts before the time of the serial it reads from (a message's
#: ``timestamp``, which ``start`` compares, and the time in its serial are set by Ably at about the same moment)
HISTORY_MARGIN_MS = 2_000


def history_params(
    *, backwards: bool, limit: int, since: str | None = None, until_attach: str | None = None
) -> dict[str, str]:
    """Query parameters for ``GET /channels/{name}/messages``.

    ``since``: a serial; history from its time (less :data:`HISTORY_MARGIN_MS`). ``until_attach``: the attach
    serial of a realtime attachment; history up to that point (``from_serial``, as ably-js sends it for
    ``untilAttach``; backwards only).
    """
    params = {"direction": "backwards" if backwards else "forwards", "limit": str(limit)}
    millis = serial_time(since) if since else None
    if millis is not None:
        params["start"] = str(max(0, millis - HISTORY_MARGIN_MS))
    if until_attach is not None:
        params["from_serial"] = until_attach
    return params


async def _both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Two requests at once; if either fails (or the caller is cancelled), the other is cancelled too."""
    one, two = asyncio.ensure_future(first), asyncio.ensure_future(second)
    await all_of([one, two])
    return one.result(), two.result()


def _items(response: httpx.Response) -> list[Mapping[str, Any]]:
    body = json_of(response)
    if not isinstance(body, list) or not all(isinstance(item, Mapping) for item in body):
        raise BackendError(f"Ably answered {response.request.url.path} with something that is not a list of items")
    return body


class AblyStore:
    """What both backends read over REST (see the module docstring)."""

    def __init__(self, options: AblyOptions, http: AblyHttp) -> None:
        self.options = options
        self.http = http
        self._sessions: dict[str, SessionState] = {}
        self._loading: dict[str, asyncio.Future[SessionState]] = {}

    def channel_name(self, session: str, kind: str = "events") -> str:
        return self.options.channel_name(session, kind)

    # -- requests ------------------------------------------------------------------------------------------

    async def get(self, name: str, params: Mapping[str, str], kind: str = "messages") -> httpx.Response:
        return await self.http.request("GET", f"/channels/{quote(name, safe='')}/{kind}", params=params)

    async def pages(
        self, name: str, params: Mapping[str, str], kind: str = "messages"
    ) -> AsyncGenerator[list[Mapping[str, Any]], None]:
        """The items of every page of a paginated answer, page by page (stop iterating to stop reading)."""
        response = await self.get(name, params, kind)
        while True:
            yield _items(response)
            next_path = self.http.next_page(response)
            if next_path is None:
                return
            response = await self.http.request("GET", next_path)

    async def latest(self, name: str) -> Mapping[str, Any] | None:
        """The channel's newest message as REST returns it."""
        items = _items(await self.get(name, history_params(backwards=True, limit=1)))
        return items[0] if items else None

    # -- sessions: epoch and floor -------------------------------------------------------------------------

    def known(self, session: str) -> SessionState | None:
        return self._sessions.get(session)

    def deleted(self, session: str, marker: str, floors: Mapping[str, str]) -> SessionState:
        """Record a deletion this process made (the meta marker's serial, each channel's floor)."""
        state = self._sessions[session] = SessionState(SessionState.from_marker(marker).epoch, marker, dict(floors))
        return state

    async def session(self, session: str, *, refresh: bool = False) -> SessionState:
        """The session's epoch and floor; ``refresh`` reads the meta channel again. Concurrent refreshes of one
        session share one request."""
        cached = self._sessions.get(session)
        if cached is not None and not refresh:
            return cached
        loading = self._loading.get(session)
        if loading is None:
            loading = asyncio.ensure_future(self._load_session(session))
            self._loading[session] = loading
            loading.add_done_callback(lambda _: self._loading.pop(session, None))
        return await asyncio.shield(loading)

    async def _load_session(self, session: str) -> SessionState:
        marker = await self.latest(self.channel_name(session, "meta"))
        if marker is None:
            state = SessionState.from_marker(None)
        else:
            state = SessionState.from_marker(text_field(marker, "serial"), decode_data(marker))
        self._sessions[session] = state
        return state

    # -- the log -------------------------------------------------------------------------------------------

    async def newest(self, name: str, floor: str, *, appendable: bool) -> tuple[str, str | None] | None:
        """The position of the channel's newest operation, and the oldest part that may still grow then.

        A channel without appendable messages (controls, snapshots) has its newest message as its newest
        operation: one message is read. Otherwise history goes back through the window parts grow in.
        """
        if not appendable:
            latest = await self.latest(name)
            serial = None if latest is None else text_field(latest, "serial")
            if latest is None or serial is None or serial < floor or text_field(latest, "name") == DELETE_MARKER:
                return None  # empty since the deletion (its marker is the newest message)
            return serial, None
        scan = NewestScan(floor)
        async with aclosing(self.pages(name, history_params(backwards=True, limit=PAGE))) as pages:
            async for items in pages:
                for raw in items:
                    if not scan.add(text_field(raw, "serial"), version_serial(raw), text_field(raw, "name")):
                        return scan.result
        return scan.result

    async def head(self, session: str, kind: str) -> LogPosition | None:
        # The session's state and the channel's newest messages are read at once, and the floor applied after.
        state, newest = await _both(
            self.session(session, refresh=True),
            self.newest(self.channel_name(session, kind), "", appendable=kind == "events"),
        )
        floor = state.floor_for(kind)
        if newest is None or newest[0] < floor:
            return None
        serial, oldest = newest
        return LogPosition(state.epoch, format_position(serial, oldest if oldest and oldest >= floor else None))

    async def history(
        self, name: str, scan: HistoryPass, *, until_attach: str | None = None
    ) -> AsyncIterator[tuple[str, bytes]]:
        """The operations one history pass yields, in order, as ``(position, data)``.

        Forwards from ``scan.fetch`` by default. With ``until_attach`` (a realtime attachment's serial), history up
        to that point, which Ably gives newest first: it is read back to ``scan.fetch`` and then passed on oldest
        first. Everything after the attachment comes from the attachment itself, so an operation at the start
        that history lacks is left to be found there (``scan.unmet``).
        """
        source = self._forwards(name, scan) if until_attach is None else self._up_to(name, scan, until_attach)
        async with aclosing(source) as messages:
            async for raw in messages:
                for op in _add(scan, raw):
                    yield op
                if scan.done:
                    return
        for op in scan.finish(live_after=until_attach is not None):
            yield op

    async def _forwards(self, name: str, scan: HistoryPass) -> AsyncGenerator[Mapping[str, Any], None]:
        async with aclosing(
            self.pages(name, history_params(backwards=False, limit=PAGE, since=scan.fetch or None))
        ) as pages:
            async for items in pages:
                for raw in items:
                    yield raw

    async def _up_to(self, name: str, scan: HistoryPass, attach_serial: str) -> AsyncGenerator[Mapping[str, Any], None]:
        """History up to the attachment, back to where the pass starts, oldest first."""
        lower = max(scan.fetch, scan.floor)
        earlier: list[Mapping[str, Any]] = []
        params = history_params(backwards=True, limit=PAGE, since=lower or None, until_attach=attach_serial)
        async with aclosing(self.pages(name, params)) as pages:
            async for items in pages:
                older = [i for i, raw in enumerate(items) if (text_field(raw, "serial") or lower) < lower]
                earlier.extend(items[: older[0]] if older else items)
                if older:
                    break
        for raw in reversed(earlier):
            yield raw

    async def find_serial(self, name: str, message_id: str) -> str:
        """The serial of a recent message by id, for an acknowledgement that left it out (``null``)."""
        for raw in _items(await self.get(name, history_params(backwards=True, limit=100))):
            if raw.get("id") == message_id and isinstance(raw.get("serial"), str):
                return str(raw["serial"])
        raise PublishError(f"Ably acknowledged a publish to {name!r} without a serial, and history lacks it")

    # -- snapshots -----------------------------------------------------------------------------------------

    async def load_snapshot(self, session: str) -> bytes | None:
        name = self.channel_name(session, "snapshot")
        # The head is the newest message; its chunks, if any, are the ones just before it.
        state, response = await _both(
            self.session(session, refresh=True), self.get(name, history_params(backwards=True, limit=1))
        )
        items = _items(response)
        head = items[0] if items else None
        serial = None if head is None else text_field(head, "serial")
        if head is None or serial is None or serial < state.floor_for("snapshot"):
            return None
        if text_field(head, "name") == DELETE_MARKER:
            return None  # nothing saved since the deletion
        body = decode_data(head)
        count = snapshot_chunk_count(body)
        chunks: list[bytes] = []
        if count:
            items = _items(await self.get(name, history_params(backwards=True, limit=count + 1)))
            if len(items) != count + 1 or text_field(items[0], "serial") != serial:
                return None
            chunks = [decode_data(raw) for raw in reversed(items[1:])]
        return unpack_snapshot(body, chunks)

    # -- presence ------------------------------------------------------------------------------------------

    async def presence(self, session: str) -> list[PresenceEntry]:
        """Members entered over realtime connections (Ably's presence set) and over REST (the presence log)."""
        state = await self.session(session, refresh=True)
        members: dict[str, bytes] = {}
        async with aclosing(self.pages(self.channel_name(session), {"limit": "1000"}, kind="presence")) as pages:
            async for items in pages:
                for raw in items:
                    client_id = text_field(raw, "clientId")
                    if client_id:
                        members[client_id] = decode_data(raw)
        members.update(await self._presence_log(session, state.floor_for(PRESENCE_KIND)))
        return presence_entries(members)

    async def _presence_log(self, session: str, floor: str) -> dict[str, bytes]:
        """Members entered by REST backends, which publish them to the session's presence log (see ``.rest``)."""
        log = PresenceLog(floor, int(time.time() * 1000))
        params = history_params(backwards=True, limit=PAGE)
        async with aclosing(self.pages(self.channel_name(session, PRESENCE_KIND), params)) as pages:
            async for items in pages:
                for raw in items:
                    stamp = raw.get("timestamp")
                    timestamp = stamp if isinstance(stamp, int) else None
                    if not log.add(text_field(raw, "name"), text_field(raw, "serial"), timestamp, decode_data(raw)):
                        return log.members
        return log.members


def _add(scan: HistoryPass, raw: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    return scan.add(text_field(raw, "serial"), version_serial(raw), text_field(raw, "name"), decode_data(raw))
