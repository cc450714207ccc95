"""The Ably backend (first version).

Layout, for the namespace ``ai`` (the default): a session's events go to the channel ``ai:<session>``, its controls
to ``ai:<session>:control``, its snapshot to ``ai:<session>:snapshot``, and its deletions to ``ai:<session>:meta``.
Presence members are entered on the events channel by one connection whose token has the wildcard clientId.

A position is the Ably message serial (lexicographically ordered). Ably cannot drop a channel's history, so
``delete`` publishes a marker on the meta channel: the marker's serial is the session's *floor* (messages with an
older serial are hidden from then on) and a hash of it is the session's *epoch* (``0`` for a session never
deleted), so cursors from before the deletion get ``LogReset``.

Publishes go over the realtime connection with the message id set (ably-python does not set ids itself), so a
retried publish inside Ably's idempotency window stores nothing new. Reads page through REST history forwards from
the start serial (inclusive), then, when following, continue with a realtime subscription attached before the
history read, deduplicated by serial.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

from ably import AblyRealtime, AblyRest  # type: ignore[import-untyped]
from ably.types.connectionstate import ConnectionState  # type: ignore[import-untyped]
from ably.types.message import Message, MessageAction  # type: ignore[import-untyped]
from ably.util.exceptions import AblyException  # type: ignore[import-untyped]
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential
from websockets.exceptions import ConnectionClosed

from durable_ai.backend import (
    BackendLimits,
    Channel,
    LogPosition,
    PresenceEntry,
    PresenceRole,
    RateBudget,
    StoredMessage,
    snapshot_chunk_count,
    unpack_snapshot,
)
from durable_ai.errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    HubClosed,
    LogReset,
    PayloadTooLarge,
    PermissionDenied,
    PublishError,
)

from ._common import (
    API_VERSION,
    PAGE,
    PRESENCE_KIND,
    AblyOptions,
    PresenceLog,
    SessionState,
    decode_data,
    history_params,
    options_from_url,
    pack_snapshot,
    presence_client_id,
    presence_entries,
    text_field,
    to_bytes,
    to_wire,
    version_serial,
)
from ._log import (
    APPENDABLE_NAME,
    PLAIN_NAME,
    HistoryPass,
    NewestScan,
    format_position,
    read_bounds,
    split_append,
)
from ._parts import PartPlanner

__all__ = ["AblyBackend", "AblyOptions", "from_url"]

logger = logging.getLogger("durable_ai_ably")
T = TypeVar("T")


class _Timeout(Exception):
    """An attempt that got no answer in time (retryable)."""


@dataclass(frozen=True, slots=True)
class _Live:
    """An operation a subscription delivered: a created message or an append to the message ``serial``."""

    position: str
    serial: str
    data: bytes
    append: bool
    appendable: bool


class _Tap:
    """One live reader's queue of realtime operations."""

    def __init__(self, feed: _Feed, limit: int) -> None:
        self.feed = feed
        self.limit = limit
        self.queue: deque[_Live] = deque()
        self.error: BaseException | None = None
        self.overflow = False
        self.changed = asyncio.Event()

    def push(self, live: _Live) -> None:
        if self.overflow:
            return
        if len(self.queue) >= self.limit:
            self.overflow = True
            self.queue.clear()
        else:
            self.queue.append(live)
        self.changed.set()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.changed.set()

    async def next(self) -> _Live | None:
        """The next live operation; ``None`` once the reader fell behind (read history again)."""
        while True:
            if self.queue:
                return self.queue.popleft()
            if self.overflow:
                return None
            if self.error is not None:
                raise self.error
            self.changed.clear()
            await self.changed.wait()


class _Feed:
    """A realtime subscription to one channel, shared by the local live readers of that channel."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.taps: set[_Tap] = set()
        self.broken = False
        self.last = ""

    def on_message(self, message: Message) -> None:
        action = message.action
        if action is None or action == MessageAction.MESSAGE_CREATE:
            position = message.serial
        elif action == MessageAction.MESSAGE_APPEND:
            position = message.version.serial if message.version is not None else None
        else:
            return  # updates and deletes are not part of a session's log
        # A listener registered twice (a retried subscribe) sees an operation twice: keep the first.
        if not position or not message.serial or position <= self.last:
            return
        self.last = position
        live = _Live(
            position,
            message.serial,
            to_bytes(message.data),
            action == MessageAction.MESSAGE_APPEND,
            message.name == APPENDABLE_NAME,
        )
        for tap in list(self.taps):
            tap.push(live)

    def fail(self, reason: str) -> None:
        self.broken = True
        for tap in list(self.taps):
            tap.fail(BackendUnavailable(reason))


class _Links:
    """The link of the latest append seen per message, to drop an append a retry stored twice."""

    def __init__(self, size: int = 1024) -> None:
        self._links: OrderedDict[str, str] = OrderedDict()
        self._size = size

    def duplicate(self, serial: str, link: str) -> bool:
        if self._links.get(serial) == link:
            return True
        self._links[serial] = link
        self._links.move_to_end(serial)
        if len(self._links) > self._size:
            self._links.popitem(last=False)
        return False


def _appends_refused(exc: BaseException) -> bool:
    """Whether Ably refused an append because the namespace lacks the mutable-messages rule (93002)."""
    cause = exc.__cause__
    return isinstance(cause, AblyException) and cause.code == 93002


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, _Timeout | TimeoutError | ConnectionError | OSError | ConnectionClosed):
        return True  # ConnectionClosed: the WebSocket closed while ably-python was sending
    if isinstance(exc, AblyException):
        status = exc.status_code or 0
        code = exc.code or 0
        return status >= 500 or status == 429 or 80000 <= code <= 90001 or code == 40001
    return False


class AblyBackend:
    """Durable sessions on Ably channels (see the module docstring)."""

    def __init__(self, options: AblyOptions) -> None:
        self.options = options
        self._limits = BackendLimits(options.max_message_bytes, options.rate_limit)
        self._realtime: AblyRealtime | None = None
        self._rest: AblyRest | None = None
        self._users = 0
        self._closed = False
        self._open_lock = asyncio.Lock()
        self._sessions: dict[str, SessionState] = {}
        self._feeds: dict[str, _Feed] = {}
        self._detaching: dict[str, asyncio.Task[None]] = {}
        self._present: dict[tuple[str, str], bytes] = {}
        self._planner = PartPlanner(options.max_message_bytes)
        self._channel_budgets: dict[str, RateBudget] = {}
        rate = options.connection_rate_limit
        self._connection_budget = RateBudget(rate) if rate is not None else None

    # -- connection ----------------------------------------------------------------------------------------

    @property
    def limits(self) -> BackendLimits:
        return self._limits

    def channel_name(self, session: str, kind: str = "events") -> str:
        return self.options.channel_name(session, kind)

    @property
    def connection_id(self) -> str | None:
        """The realtime connection's id while connected (it changes when a connection cannot be resumed)."""
        if self._realtime is None:
            return None
        manager = self._realtime.connection.connection_manager
        return None if manager.connection_id is None else str(manager.connection_id)

    def _client_options(self) -> dict[str, Any]:
        o = self.options
        # ably-python 3.1 keeps the msgSerial of messages it queued or sent before a connection was lost, and
        # resets the counter when the connection cannot be resumed: acknowledgements on the new connection then
        # complete the wrong publishes (a publish can "succeed" with another message's serial and never be
        # stored). Without queueing it fails them instead, and they are retried here under the same message id.
        options: dict[str, Any] = {"tls": o.tls, "use_binary_protocol": False, "queue_messages": False}
        if o.key is not None:
            options["key"] = o.key
            if not o.tls:
                options["use_token_auth"] = True
        else:  # a client credential: its token, renewed by the callback if there is one
            if o.token is not None:
                options["token"] = o.token
            if o.auth_callback is not None:
                options["auth_callback"] = o.auth_callback
        if o.endpoint is not None:
            options["endpoint"] = o.endpoint
            options["fallback_hosts"] = []
        options.update(o.client)
        return options

    async def open(self) -> None:
        self._users += 1
        async with self._open_lock:
            if self._realtime is None:
                try:
                    await self._connect()
                except BaseException:
                    self._users -= 1
                    raise

    async def _connect(self) -> None:
        options = self._client_options()
        rest = AblyRest(**options)
        if self.options.key is not None:
            # With the key, one connection enters presence for any member: its tokens have the wildcard clientId.
            token_params = dict(options.pop("default_token_params", None) or {})
            token_params.setdefault("client_id", "*")
            options.update(client_id="*", default_token_params=token_params)
        realtime = AblyRealtime(**options)
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                await realtime.connection.once_async(ConnectionState.CONNECTED)
        except (TimeoutError, AblyException) as exc:
            with contextlib.suppress(Exception):
                await realtime.close()
            with contextlib.suppress(Exception):
                await rest.close()
            reason = realtime.connection.error_reason or exc
            raise BackendUnavailable(f"cannot connect to Ably: {reason}") from exc
        realtime.connection.on(self._on_connection_state)
        self._realtime, self._rest = realtime, rest
        self._closed = False

    def _on_connection_state(self, change: Any) -> None:
        if change.current in (
            ConnectionState.DISCONNECTED,
            ConnectionState.SUSPENDED,
            ConnectionState.FAILED,
            ConnectionState.CLOSING,
            ConnectionState.CLOSED,
        ):
            if not self._closed:
                logger.info("Ably connection %s: %s", change.current.value, change.reason)
            for feed in list(self._feeds.values()):
                feed.fail(f"the Ably connection is {change.current.value}")
            self._feeds.clear()

    async def close(self) -> None:
        self._users -= 1
        if self._users > 0 or self._realtime is None or self._closed:
            return
        realtime, rest = self._realtime, self._rest
        if self._present:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    for session, member in list(self._present):
                        await self.leave_presence(session, member)
        self._closed = True
        for feed in list(self._feeds.values()):
            feed.fail("the backend is closed")
        self._feeds.clear()
        if self._detaching:
            await asyncio.gather(*self._detaching.values(), return_exceptions=True)
        transport = getattr(realtime.connection.connection_manager, "transport", None)
        with contextlib.suppress(Exception):
            await realtime.close()
        # ably-python 3.1.4 re-arms a transport's idle timer when a message arrives after the transport was
        # disposed (on_activity does not check is_disposed), leaving a task that sleeps for maxIdleInterval: stop it.
        idle = getattr(transport, "idle_timer", None)
        if idle is not None:
            idle.cancel()
        # ably-python cancels its timers' tasks on close without awaiting them: let them finish.
        for _ in range(3):
            await asyncio.sleep(0)
        if rest is not None:
            with contextlib.suppress(Exception):
                await rest.close()
        self._realtime = self._rest = None

    def _parts(self) -> tuple[AblyRealtime, AblyRest]:
        if self._closed or self._realtime is None or self._rest is None:
            raise HubClosed("the Ably backend is not open")
        return self._realtime, self._rest

    # -- requests with retries -----------------------------------------------------------------------------

    async def _call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run one request, retrying timeouts, disconnections and 5xx for up to ``publish_timeout``."""

        async def bounded() -> T:
            try:
                async with asyncio.timeout(self.options.attempt_timeout):
                    return await attempt()
            except TimeoutError:
                raise _Timeout(f"no answer within {self.options.attempt_timeout} s") from None

        try:
            async for trying in AsyncRetrying(
                stop=stop_after_delay(self.options.publish_timeout),
                wait=wait_exponential(multiplier=0.05, max=1.0),
                retry=retry_if_exception(_retryable),
                reraise=True,
            ):
                with trying:
                    return await bounded()
        except AblyException as exc:
            raise self._error(exc) from exc
        except (_Timeout, OSError, ConnectionClosed) as exc:
            raise BackendUnavailable(f"Ably did not answer: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _error(exc: AblyException) -> BackendError:
        status, code = exc.status_code or 0, exc.code or 0
        if (status in (401, 403) and code not in (40140, 40142)) or code == 40012:
            return PermissionDenied(str(exc))  # 40012: a clientId the credential does not carry
        if _retryable(exc):
            return BackendUnavailable(f"Ably is unavailable: {exc}")
        return BackendError(f"Ably refused the request: {exc}")

    async def _get(self, path: str, params: Mapping[str, str]) -> Any:
        """One REST GET (the first page), with errors raised."""
        _, rest = self._parts()
        response = await rest.request("GET", path, API_VERSION, params=dict(params))
        self._check(response)
        return response

    @staticmethod
    def _check(response: Any) -> None:
        if not response.success:
            status = response.status_code
            code = int(response.error_code) if response.error_code else status * 100
            raise AblyException(response.error_message or f"HTTP {status}", status, code)

    async def _next(self, page: Any) -> Any:
        response = await page.next()
        self._check(response)
        return response

    async def _history(
        self, name: str, *, backwards: bool = False, limit: int = PAGE, from_serial: str | None = None
    ) -> Any:
        params = history_params(backwards=backwards, limit=limit, from_serial=from_serial)
        return await self._call(lambda: self._get(f"/channels/{quote(name, safe='')}/messages", params))

    async def _latest(self, name: str) -> Mapping[str, Any] | None:
        """The channel's newest message as REST returns it (decoded defensively by whoever reads its data)."""
        page = await self._history(name, backwards=True, limit=1)
        return page.items[0] if page.items else None

    # -- sessions: epoch and floor -------------------------------------------------------------------------

    async def _session(self, session: str, *, refresh: bool = False) -> SessionState:
        cached = self._sessions.get(session)
        if cached is not None and not refresh:
            return cached
        marker = await self._latest(self.channel_name(session, "meta"))
        state = SessionState.from_marker(None if marker is None else text_field(marker, "serial"))
        self._sessions[session] = state
        return state

    # -- publish -------------------------------------------------------------------------------------------

    async def _publish(self, name: str, data: str | bytes, message_id: str, event: str = PLAIN_NAME) -> str:
        realtime, _ = self._parts()
        channel = realtime.channels.get(name)

        async def attempt() -> Any:
            await self._throttle(name)
            return await channel.publish(Message(name=event, data=data, id=message_id))

        result = await self._call(attempt)
        serials = getattr(result, "serials", None) or []
        if not serials or not serials[0]:
            # The message may well be stored: PublishError makes the writer retry it under the same id.
            raise PublishError(f"Ably acknowledged a publish to {name!r} without a serial")
        return str(serials[0])

    async def _append(self, name: str, serial: str, data: str | bytes) -> str:
        realtime, _ = self._parts()
        channel = realtime.channels.get(name)

        async def attempt() -> Any:
            await self._throttle(name)
            return await channel.append_message(Message(data=data, serial=serial))

        result = await self._call(attempt)
        version = getattr(result, "version_serial", None)
        if not version:
            raise PublishError(f"Ably acknowledged an append on {name!r} without a version serial")
        return str(version)

    async def _throttle(self, name: str) -> None:
        """Wait for the channel's and the connection's message budgets (Ably: 50 msg/s each by default)."""
        if self.options.rate_limit is not None:
            budget = self._channel_budgets.get(name)
            if budget is None:
                if len(self._channel_budgets) > 4096:
                    self._channel_budgets.clear()
                budget = self._channel_budgets[name] = RateBudget(self.options.rate_limit)
            await budget.acquire()
        if self._connection_budget is not None:
            await self._connection_budget.acquire()

    async def publish(self, channel: Channel, data: bytes, *, message_id: str) -> LogPosition:
        self._parts()
        if len(data) > self._limits.max_message_bytes:
            raise PayloadTooLarge(len(data), self._limits.max_message_bytes)
        state = await self._session(channel.session)
        name = self.channel_name(channel.session, channel.kind)
        # Once the namespace refused appends, batches skip the planner (and its parsing of every line).
        if channel.kind == "events" and self.options.appends != "off" and self._planner.needed(message_id):
            serial = await self._publish_parts(name, data, message_id)
        else:
            serial = await self._publish(name, to_wire(data), message_id)
        return LogPosition(state.epoch, serial)

    async def _publish_parts(self, name: str, data: bytes, message_id: str) -> str:
        """Publish a batch as new messages and appends to its parts' messages (see :mod:`._parts`)."""
        planner = self._planner
        plan = planner.plan(name, data, message_id)
        for op in plan.ops:
            if op.position is not None:
                continue  # done in an earlier attempt
            payload = op.payload()
            if op.target is not None:
                try:
                    version = await self._append(name, op.target.serial, to_wire(payload))
                except BackendError as exc:
                    if not _appends_refused(exc):
                        raise
                    if self.options.appends == "on":
                        raise ConfigurationError(
                            f"Ably refused an append on {name!r}: enable the 'Message annotations, updates, "
                            f"deletes and appends' rule on the {self.options.namespace!r} namespace ({exc})"
                        ) from exc
                    logger.info(
                        "appends are not enabled on namespace %r: one message per batch", self.options.namespace
                    )
                    planner.disable()
                else:
                    planner.appended(op, version, len(payload))
                    continue
                payload = op.payload()
            event = APPENDABLE_NAME if op.part is not None and planner.enabled else PLAIN_NAME
            serial = await self._publish(name, to_wire(payload), op.message_id, event)
            planner.created(plan, op, serial, len(payload))
        planner.finished(plan, message_id)
        positions = [op.position for op in plan.ops if op.position is not None]
        if not positions:  # an empty batch (the hub never sends one): store it as it is
            return await self._publish(name, to_wire(data), message_id)
        return positions[-1]

    # -- read ----------------------------------------------------------------------------------------------

    async def read(self, channel: Channel, *, start: LogPosition | None, follow: bool) -> AsyncIterator[StoredMessage]:
        self._parts()
        name = self.channel_name(channel.session, channel.kind)
        state = await self._session(channel.session, refresh=True)
        epoch, floor = state.epoch, state.floor
        newest = None if follow else await self._newest(name, floor)
        bounds = read_bounds(start, epoch, floor, newest, follow=follow)
        if bounds is None:
            return
        first, oldest, until = bounds
        tap: _Tap | None = None
        last: str | None = None
        links = _Links()
        try:
            while True:
                if follow and tap is None:
                    tap = await self._attach(name)
                scan = HistoryPass(floor=floor, first=first, oldest=oldest, until=until, last=last)
                page = await self._history(name, from_serial=scan.fetch or None)
                while True:
                    for raw in page.items:
                        serial, name_ = text_field(raw, "serial"), text_field(raw, "name")
                        for position, data in scan.add(serial, version_serial(raw), name_, decode_data(raw)):
                            yield StoredMessage(epoch, position, data)
                        if scan.done:
                            break
                    if scan.done:
                        break
                    if not page.has_next():
                        for position, data in scan.finish():
                            yield StoredMessage(epoch, position, data)
                        break
                    page = await self._call(partial(self._next, page))
                last, parts = scan.last, scan.parts
                if tap is None:
                    return
                while (live := await tap.next()) is not None:
                    if live.serial < floor or (last is not None and live.position <= last):
                        continue
                    data = live.data
                    if live.append:
                        framed = split_append(data)
                        if framed is None:
                            logger.warning("skipping an append on %r that durable-ai did not write", name)
                            continue
                        link, data = framed
                        if links.duplicate(live.serial, link):
                            continue
                    elif live.appendable:
                        parts.add(live.serial)
                    last = live.position
                    yield StoredMessage(epoch, format_position(live.position, parts.oldest(live.position)), data)
                # Fell behind the live feed: read history again from the last operation read (inclusive).
                self._detach(tap)
                tap = None
                if last is not None:
                    first, oldest = last, parts.oldest(last)
        finally:
            if tap is not None:
                self._detach(tap)

    async def _newest(self, name: str, floor: str) -> tuple[str, str | None] | None:
        """The position of the channel's newest operation, and the oldest part that may still grow then."""
        scan = NewestScan(floor)
        page = await self._history(name, backwards=True, limit=100)
        while True:
            for raw in page.items:
                if not scan.add(text_field(raw, "serial"), version_serial(raw), text_field(raw, "name")):
                    return scan.result
            if not page.has_next():
                return scan.result
            page = await self._call(partial(self._next, page))

    async def _attach(self, name: str) -> _Tap:
        realtime, _ = self._parts()
        pending = self._detaching.get(name)
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        feed = self._feeds.get(name)
        if feed is None or feed.broken:
            feed = _Feed(realtime.channels.get(name))
            self._feeds[name] = feed
        tap = _Tap(feed, self.options.tap_limit)
        feed.taps.add(tap)
        try:
            if len(feed.taps) == 1:
                await self._call(lambda: feed.channel.subscribe(feed.on_message))
            else:
                await self._call(feed.channel.attach)
        except BaseException:
            self._detach(tap)
            raise
        if tap.error is not None:
            self._detach(tap)
            raise tap.error
        return tap

    def _detach(self, tap: _Tap) -> None:
        feed = tap.feed
        feed.taps.discard(tap)
        if feed.taps:
            return
        feed.channel.unsubscribe(feed.on_message)
        if self._feeds.get(feed.channel.name) is feed:
            del self._feeds[feed.channel.name]
        if self._closed or self._realtime is None:
            return
        name = feed.channel.name
        if any(key[0] and self.channel_name(key[0]) == name for key in self._present):
            return  # presence members of ours keep the channel attached
        task = asyncio.get_running_loop().create_task(self._quiet_detach(feed.channel), name="durable-ai-ably detach")
        self._detaching[name] = task
        task.add_done_callback(lambda _: self._detaching.pop(name, None) if self._detaching.get(name) is task else None)

    async def _quiet_detach(self, channel: Any) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.options.attempt_timeout):
                await channel.detach()

    async def head(self, channel: Channel) -> LogPosition | None:
        self._parts()
        state = await self._session(channel.session, refresh=True)
        newest = await self._newest(self.channel_name(channel.session, channel.kind), state.floor)
        if newest is None:
            return None
        return LogPosition(state.epoch, format_position(*newest))

    async def delete(self, session: str) -> None:
        self._parts()
        marker = await self._publish(self.channel_name(session, "meta"), "deleted", f"delete:{time.time_ns()}", "d")
        self._sessions[session] = SessionState.from_marker(marker)
        self._planner.forget(self.channel_name(session))
        for kind in ("events", "control"):
            feed = self._feeds.pop(self.channel_name(session, kind), None)
            if feed is not None:
                feed.broken = True
                for tap in list(feed.taps):
                    tap.fail(LogReset("the session was deleted"))
        for key in [k for k in self._present if k[0] == session]:
            with contextlib.suppress(BackendError):
                await self.leave_presence(*key)

    # -- snapshots -----------------------------------------------------------------------------------------

    async def load_snapshot(self, session: str) -> bytes | None:
        state = await self._session(session, refresh=True)
        name = self.channel_name(session, "snapshot")
        head = await self._latest(name)
        serial = None if head is None else text_field(head, "serial")
        if head is None or serial is None or serial < state.floor:
            return None
        body = decode_data(head)
        count = snapshot_chunk_count(body)
        chunks: list[bytes] = []
        if count:  # the chunks are the messages just before the head
            page = await self._history(name, backwards=True, limit=count + 1)
            items = list(page.items)
            if len(items) != count + 1 or text_field(items[0], "serial") != serial:
                return None
            chunks = [decode_data(raw) for raw in reversed(items[1:])]
        return unpack_snapshot(body, chunks)

    async def save_snapshot(self, session: str, data: bytes) -> None:
        self._parts()
        name = self.channel_name(session, "snapshot")
        chunks, head = pack_snapshot(data, self._limits.max_message_bytes)
        stamp = time.time_ns()
        for index, chunk in enumerate(chunks):
            await self._publish(name, chunk, f"snapshot:{stamp}:{index}", "s")
        await self._publish(name, head, f"snapshot:{stamp}", "s")

    # -- presence ------------------------------------------------------------------------------------------

    async def enter_presence(self, session: str, member_id: str, data: bytes, *, role: PresenceRole = "client") -> None:
        realtime, _ = self._parts()
        presence = realtime.channels.get(self.channel_name(session)).presence
        client_id = presence_client_id(member_id, role)
        await self._call(lambda: presence.enter_client(client_id, to_wire(data)))
        self._present[(session, client_id)] = data

    async def leave_presence(self, session: str, member_id: str, *, role: PresenceRole = "client") -> None:
        realtime, _ = self._parts()
        client_id = presence_client_id(member_id, role)
        if self._present.pop((session, client_id), None) is None:
            return
        presence = realtime.channels.get(self.channel_name(session)).presence
        await self._call(lambda: presence.leave_client(client_id))

    async def presence(self, session: str) -> list[PresenceEntry]:
        name = self.channel_name(session)
        page = await self._call(lambda: self._get(f"/channels/{quote(name, safe='')}/presence", {"limit": "1000"}))
        members: dict[str, bytes] = {}
        while True:
            for raw in page.items:
                client_id = raw.get("clientId")
                if client_id:
                    members[client_id] = decode_data(raw)
            if not page.has_next():
                break
            page = await self._call(partial(self._next, page))
        members.update(await self._presence_log(session))
        return presence_entries(members)

    async def _presence_log(self, session: str) -> dict[str, bytes]:
        """Members entered by REST backends, which publish them to the session's presence log (see ``.rest``)."""
        state = await self._session(session, refresh=True)
        log = PresenceLog(state.floor, int(time.time() * 1000))
        page = await self._history(self.channel_name(session, PRESENCE_KIND), backwards=True)
        while True:
            for raw in page.items:
                stamp = raw.get("timestamp")
                timestamp = stamp if isinstance(stamp, int) else None
                if not log.add(text_field(raw, "name"), text_field(raw, "serial"), timestamp, decode_data(raw)):
                    return log.members
            if not page.has_next():
                return log.members
            page = await self._call(partial(self._next, page))


def from_url(url: str) -> AblyBackend:
    """A realtime backend for an ``ably://`` URL (see :func:`durable_ai_ably.options_from_url` for the options)."""
    return AblyBackend(options_from_url(url))
