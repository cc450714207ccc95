"""The REST-only Ably backend, for serverless functions: plain HTTP requests, no WebSocket, no ably-python.

It keeps the layout of :class:`~durable_ai_ably.backend.AblyBackend` (``ai:<session>`` for events, ``:control``,
``:snapshot``, ``:meta`` for deletions; positions are message serials), so realtime and REST processes share
sessions: a REST agent streams to realtime clients, a REST client follows a realtime agent.

**Publishing.** ``POST /channels/{name}/messages`` with the message id set to ``message_id``, so a retry (after a
timeout, a 5xx or a 429, honouring ``Retry-After``) is deduplicated by Ably and never stores a message twice. The
REST writer never appends: every batch the hub hands it is one whole message (named ``e``); readers of either
transport read both kinds. Publishes to a channel that wait while a request to that channel is in flight go
together in the next request: Ably refuses several messages with ids of their own in one channel publish (it
wants ``<base>:<index>`` ids there, which would tie a message's dedupe key to the batch it happened to join), so
they go to the batch endpoint ``POST /messages`` as one publish spec each, and every message keeps its own id and
gets its own serial. ``rate_limit`` is kept per channel.

**Reading.** History, paged forwards from the start (inclusive), with the epoch and floors from the meta channel
and messages grown by appends (realtime writers) split into their operations: the same code as the realtime
backend's (:mod:`durable_ai_ably._store`).
A follower polls history every ``poll_interval`` seconds, and right after each publish this backend makes to the
session ("between flushes"): a REST agent's control listener sees a cancel after the run's next flush, or within
``poll_interval`` when the run is quiet. Polls resume from the last operation read, so nothing is read twice.

**Presence.** Ably has no REST operation to enter presence, so members are published to the session's presence
log (``ai:<session>:presence``): an ``enter`` with the member's data, refreshed every
``PRESENCE_TTL_SECONDS / 3`` while the member stays, and a ``leave``. A member whose latest record is an enter
younger than ``PRESENCE_TTL_SECONDS`` is present, so a function that dies without leaving drops out by itself.
``presence()`` returns the members of the log together with those entered over realtime connections (``GET
/channels/{name}/presence``), and the realtime backend reads the log too.

Options without meaning here: ``appends`` (the REST writer never appends), ``connection_rate_limit``,
``connect_timeout`` and ``tap_limit`` (there is no connection).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from durable_ai.backend import (
    BackendLimits,
    Channel,
    LogPosition,
    OpenCount,
    PresenceEntry,
    PresenceKeeper,
    PresenceRole,
    RateBudget,
    StoredMessage,
)
from durable_ai.errors import BackendError, BackendUnavailable, HubClosed, LogReset, PayloadTooLarge, PublishError

from ._common import (
    DELETE_MARKER,
    FLOOR_KINDS,
    PRESENCE_ENTER,
    PRESENCE_KIND,
    PRESENCE_LEAVE,
    PRESENCE_TTL_SECONDS,
    AblyOptions,
    all_of,
    delete_record,
    options_from_url,
    pack_snapshot,
    presence_client_id,
    presence_record,
    to_wire,
)
from ._http import AblyHttp, AblyHttpError, json_of
from ._log import PLAIN_NAME, HistoryPass, bound_after, read_start
from ._store import AblyStore
from .auth import issue_client_token

__all__ = ["AblyRestBackend", "from_url"]

logger = logging.getLogger("durable_ai_ably")

#: the most messages, and bytes of data, one batch request carries (Ably: 2 MiB per request)
MAX_BATCH = 100
MAX_BATCH_BYTES = 1024 * 1024


@dataclass(slots=True)
class _Outgoing:
    """A message waiting to be published, and the caller waiting for its serial."""

    message: dict[str, Any]
    size: int
    future: asyncio.Future[str]
    deadline: float


@dataclass(slots=True)
class _Outbox:
    """The messages of one channel waiting for the request in flight to end."""

    pending: deque[_Outgoing] = field(default_factory=deque)
    inflight: list[_Outgoing] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


@dataclass(slots=True, eq=False)
class _Follower:
    """A following reader of a session, woken to poll at once after a publish."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    reset: str | None = None


def _wire(message_id: str, name: str, data: bytes) -> dict[str, Any]:
    wire = to_wire(data)
    if isinstance(wire, str):
        return {"id": message_id, "name": name, "data": wire}
    return {"id": message_id, "name": name, "data": base64.b64encode(wire).decode("ascii"), "encoding": "base64"}


def _items(response: httpx.Response) -> list[Mapping[str, Any]]:
    body = json_of(response)
    if not isinstance(body, list) or not all(isinstance(item, Mapping) for item in body):
        raise BackendError(f"Ably answered {response.request.url.path} with something that is not a list of items")
    return body


def _first_serial(result: object) -> tuple[bool, str | None]:
    """``(True, serial or None)`` for a publish result with serials; ``(False, None)`` when it has none."""
    serials = result.get("serials") if isinstance(result, Mapping) else None
    if not isinstance(serials, list) or len(serials) != 1 or not isinstance(serials[0], str | None):
        return False, None
    return True, serials[0]


def _batch_results(body: object, count: int) -> list[Mapping[str, Any]]:
    """One result per publish spec from a batch publish answer, whichever form Ably gives it in.

    Protocol 2 and later answer a list of ``BatchResult`` objects (``{"successCount", "failureCount",
    "results": [...]}``), one per spec; older versions a list of results, or a 40020 error with ``batchResponse``.
    """
    if isinstance(body, Mapping):
        error = body.get("error")
        body = body.get("batchResponse", error.get("batchResponse") if isinstance(error, Mapping) else None)
    if not isinstance(body, list) or len(body) != count:
        # Unreadable answers leave it open whether the messages landed: PublishError makes the writer retry them
        # under the same ids, which Ably deduplicates.
        raise PublishError("Ably answered a batch publish without one result per message")
    results: list[Mapping[str, Any]] = []
    for entry in body:
        if isinstance(entry, Mapping) and isinstance(entry.get("results"), list):
            entry = entry["results"][0] if len(entry["results"]) == 1 else None
        if not isinstance(entry, Mapping):
            raise PublishError("Ably answered a batch publish with a malformed result")
        results.append(entry)
    return results


class AblyRestBackend:
    """Durable sessions on Ably over its REST API only (see the module docstring)."""

    def __init__(self, options: AblyOptions) -> None:
        self.options = options
        self._limits = BackendLimits(options.max_message_bytes, options.rate_limit)
        self._store: AblyStore | None = None
        self._count = OpenCount()
        self._closed = False
        self._outboxes: dict[str, _Outbox] = {}
        self._budgets: dict[str, RateBudget] = {}
        self._followers: dict[str, set[_Follower]] = {}
        self._presence: PresenceKeeper[tuple[str, str]] = PresenceKeeper(self._refresh, PRESENCE_TTL_SECONDS / 3)

    # -- life cycle ----------------------------------------------------------------------------------------

    @property
    def limits(self) -> BackendLimits:
        return self._limits

    @property
    def _api(self) -> AblyHttp:
        return self._reader.http

    def _check_open(self) -> None:
        self._reader  # noqa: B018 - raises HubClosed when the backend is not open

    def client_credential(self, session_id: str, client_id: str) -> dict[str, Any]:
        """A signed TokenRequest for one client of ``session_id`` (as :meth:`AblyBackend.client_credential`)."""
        return issue_client_token(session_id, client_id, key=self.options)

    def channel_name(self, session: str, kind: str = "events") -> str:
        return self.options.channel_name(session, kind)

    async def open(self) -> None:
        """Make the HTTP client; no request is made until the first operation (a fast cold start)."""
        await self._count.open(self._connect)

    async def _connect(self) -> None:
        http = AblyHttp(self.options)
        await http.open()
        self._store = AblyStore(self.options, http)
        self._closed = False

    async def close(self) -> None:
        if not self._count.release() or self._store is None:
            return
        await self._presence.close(self._leave, within=2.0)
        self._closed = True
        for followers in self._followers.values():
            for follower in followers:
                follower.wake.set()
        tasks = [outbox.task for outbox in self._outboxes.values() if outbox.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for outbox in self._outboxes.values():
            for item in [*outbox.inflight, *outbox.pending]:
                if not item.future.done():
                    item.future.set_exception(HubClosed("the Ably REST backend closed before the message was sent"))
        self._outboxes.clear()
        store, self._store = self._store, None
        await store.http.close()

    # -- publish -------------------------------------------------------------------------------------------

    async def publish(self, channel: Channel, data: bytes, *, message_id: str) -> LogPosition:
        self._check_open()
        if len(data) > self._limits.max_message_bytes:
            raise PayloadTooLarge(len(data), self._limits.max_message_bytes)
        state = await self._reader.session(channel.session)
        serial = await self._publish(self.channel_name(channel.session, channel.kind), data, message_id)
        self._poke(channel.session)
        return LogPosition(state.epoch, serial)

    async def _publish(self, name: str, data: bytes, message_id: str, event: str = PLAIN_NAME) -> str:
        """Queue one message for the channel and wait for its serial (see the module docstring on batches)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        item = _Outgoing(
            _wire(message_id, event, data), len(data), loop.create_future(), time.monotonic() + self._timeout
        )
        outbox = self._outboxes.get(name)
        if outbox is None:
            outbox = self._outboxes[name] = _Outbox()
        outbox.pending.append(item)
        if outbox.task is None:
            outbox.task = loop.create_task(self._drain(name, outbox), name=f"durable-ai-ably publish {name}")
        return await item.future

    @property
    def _timeout(self) -> float:
        return self.options.publish_timeout

    async def _drain(self, name: str, outbox: _Outbox) -> None:
        """Send the channel's waiting messages, as many per request as are waiting, until none is left."""
        backoff = 0.05
        try:
            while outbox.pending:
                batch = self._take(outbox)
                if not batch:
                    continue
                outbox.inflight = batch
                await self._throttle(name, len(batch))
                batch = [item for item in batch if not item.future.done()]
                again = await self._send(name, batch) if batch else []
                outbox.inflight = []
                if again:  # some messages of a batch failed in a way worth retrying
                    outbox.pending.extendleft(reversed(again))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                else:
                    backoff = 0.05
        finally:
            outbox.task = None
            if not outbox.pending and self._outboxes.get(name) is outbox:
                del self._outboxes[name]

    @staticmethod
    def _take(outbox: _Outbox) -> list[_Outgoing]:
        batch: list[_Outgoing] = []
        size = 0
        while outbox.pending and len(batch) < MAX_BATCH:
            item = outbox.pending[0]
            if item.future.done():  # its caller gave up before it was sent
                outbox.pending.popleft()
                continue
            if batch and size + item.size > MAX_BATCH_BYTES:
                break
            batch.append(outbox.pending.popleft())
            size += item.size
        return batch

    async def _throttle(self, name: str, count: int) -> None:
        """Wait for the channel's message budget (Ably: 50 messages per second by default)."""
        if self.options.rate_limit is None:
            return
        budget = self._budgets.get(name)
        if budget is None:
            if len(self._budgets) > 4096:
                self._budgets.clear()
            budget = self._budgets[name] = RateBudget(self.options.rate_limit)
        for _ in range(count):
            await budget.acquire()

    async def _send(self, name: str, batch: list[_Outgoing]) -> list[_Outgoing]:
        """Publish a batch; settle each message's future; return the messages to send again."""
        http = self._api
        deadline = min(item.deadline for item in batch)
        try:
            if len(batch) == 1:
                path = f"/channels/{quote(name, safe='')}/messages"
                response = await http.request("POST", path, body=batch[0].message, deadline=deadline)
                results: list[Mapping[str, Any]] = [json_of(response)]
            else:
                specs = [{"channels": name, "messages": item.message} for item in batch]
                response = await http.request("POST", "/messages", body=specs, deadline=deadline, partial=True)
                results = _batch_results(json_of(response), len(batch))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            for item in batch:
                _settle(item, exc)
            return []
        again: list[_Outgoing] = []
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, Mapping) and result.get("error") is not None:
                error = AblyHttpError.from_error(result["error"])
                if error.retryable and time.monotonic() < item.deadline:
                    again.append(item)
                else:
                    _settle(item, http.typed(error, item.size))
                continue
            found, serial = _first_serial(result)
            if not found:
                _settle(item, BackendError(f"Ably acknowledged a publish to {name!r} without its serial"))
            elif serial is not None:
                _settle(item, serial)
            else:
                try:
                    _settle(item, await self._reader.find_serial(name, str(item.message["id"])))
                except Exception as exc:
                    _settle(item, exc)
        return again

    def _poke(self, session: str) -> None:
        """A publish to the session: its followers poll at once (so a cancel is seen between flushes)."""
        for follower in self._followers.get(session, ()):
            follower.wake.set()

    # -- reading -------------------------------------------------------------------------------------------

    @property
    def _reader(self) -> AblyStore:
        if self._closed or self._store is None:
            raise HubClosed("the Ably REST backend is not open")
        return self._store

    async def read(self, channel: Channel, *, start: LogPosition | None, follow: bool) -> AsyncIterator[StoredMessage]:
        store = self._reader
        name = self.channel_name(channel.session, channel.kind)
        state = await store.session(channel.session, refresh=True)
        floor = state.floor_for(channel.kind)
        begin = read_start(start, state.epoch, floor)
        first, oldest, exact = begin.first, begin.oldest, begin.exact
        follower: _Follower | None = None
        if follow:
            follower = _Follower()
            self._followers.setdefault(channel.session, set()).add(follower)
        last: str | None = None
        try:
            while True:
                if follower is not None:
                    follower.wake.clear()
                scan = HistoryPass(floor=floor, first=first, oldest=oldest, last=last, exact=exact)
                async for position, data in store.history(name, scan):
                    yield StoredMessage(state.epoch, position, data)
                if follower is None:
                    return
                if scan.last is not None:  # the next poll starts at the last operation read (inclusive)
                    last = first = scan.last
                    oldest, exact = scan.oldest_open(), True
                await self._wait_for_poll(follower)
        finally:
            if follower is not None:
                followers = self._followers.get(channel.session)
                if followers is not None:
                    followers.discard(follower)
                    if not followers:
                        del self._followers[channel.session]

    async def _wait_for_poll(self, follower: _Follower) -> None:
        """Until the next poll: ``poll_interval`` seconds, or less when this backend publishes to the session."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.poll_interval):
                await follower.wake.wait()
        if self._closed:
            raise BackendUnavailable("the Ably REST backend is closed")
        if follower.reset is not None:
            raise LogReset(follower.reset)

    async def head(self, channel: Channel) -> LogPosition | None:
        return await self._reader.head(channel.session, channel.kind)

    async def since(self, channel: Channel, published: LogPosition) -> LogPosition:
        """A bound from the time of ``published`` (see :meth:`durable_ai_ably.AblyBackend.since`)."""
        store = self._reader
        state = store.known(channel.session) or await store.session(channel.session)
        return LogPosition(state.epoch, bound_after(published.position))

    async def delete(self, session: str) -> None:
        store = self._reader
        stamp = time.time_ns()
        # A floor on each channel (Ably orders serials within a channel only), then the deletion that names them.
        serials = await all_of(
            self._publish(self.channel_name(session, kind), b"deleted", f"delete:{stamp}:{kind}", DELETE_MARKER)
            for kind in FLOOR_KINDS
        )
        floors = dict(zip(FLOOR_KINDS, serials, strict=True))
        meta = self.channel_name(session, "meta")
        marker = await self._publish(meta, delete_record(floors).encode(), f"delete:{stamp}", DELETE_MARKER)
        store.deleted(session, marker, floors)
        for follower in self._followers.get(session, ()):
            follower.reset = "the session was deleted"
            follower.wake.set()
        # The deletion hides the presence log too; members of ours stop refreshing it.
        self._presence.forget(lambda key: key[0] == session)

    # -- snapshots -----------------------------------------------------------------------------------------

    async def load_snapshot(self, session: str) -> bytes | None:
        return await self._reader.load_snapshot(session)

    async def save_snapshot(self, session: str, data: bytes) -> None:
        self._check_open()
        name = self.channel_name(session, "snapshot")
        chunks, head = pack_snapshot(data, self._limits.max_message_bytes)
        stamp = time.time_ns()
        for index, chunk in enumerate(chunks):
            await self._publish(name, chunk, f"snapshot:{stamp}:{index}", "s")
        await self._publish(name, head, f"snapshot:{stamp}", "s")

    # -- presence ------------------------------------------------------------------------------------------

    async def _publish_presence(self, session: str, action: str, member_id: str, data: bytes | None) -> None:
        record = presence_record(member_id, data).encode()
        await self._publish(
            self.channel_name(session, PRESENCE_KIND), record, f"presence:{secrets.token_hex(12)}", action
        )

    async def _refresh(self, key: tuple[str, str], data: bytes) -> None:
        await self._publish_presence(key[0], PRESENCE_ENTER, key[1], data)

    async def _leave(self, key: tuple[str, str]) -> None:
        await self._publish_presence(key[0], PRESENCE_LEAVE, key[1], None)

    async def enter_presence(self, session: str, member_id: str, data: bytes, *, role: PresenceRole = "client") -> None:
        """Publish an enter to the session's presence log, refreshed until the member leaves (see the module)."""
        key = (session, presence_client_id(member_id, role))
        await self._refresh(key, data)
        self._presence.entered(key, data)

    async def leave_presence(self, session: str, member_id: str, *, role: PresenceRole = "client") -> None:
        self._check_open()
        key = (session, presence_client_id(member_id, role))
        if key not in self._presence.entries:
            return
        self._presence.left(key)
        await self._leave(key)

    async def presence(self, session: str) -> list[PresenceEntry]:
        return await self._reader.presence(session)


def _settle(item: _Outgoing, outcome: str | BaseException) -> None:
    if item.future.done():
        return
    if isinstance(outcome, BaseException):
        item.future.set_exception(outcome)
    else:
        item.future.set_result(outcome)


def from_url(url: str) -> AblyRestBackend:
    """A REST backend for an ``ably://`` URL (see :func:`durable_ai_ably.options_from_url` for the options)."""
    return AblyRestBackend(options_from_url(url))
