"""The Ably backend over a realtime connection, for long-lived agents and servers.

Layout, for the namespace ``ai`` (the default): a session's events go to the channel ``ai:<session>``, its controls
to ``ai:<session>:control``, its snapshot to ``ai:<session>:snapshot``, and its deletions to ``ai:<session>:meta``.
Presence members are entered on the events channel by one connection whose token has the wildcard clientId.

A position is the Ably message serial (ordered within a channel). Ably cannot drop a channel's history, so
``delete`` publishes a marker on each of the session's channels, then one on the meta channel that names their
serials: each channel's marker is its *floor* (messages with an older serial are hidden from then on), and a hash
of the meta marker's serial is the session's *epoch* (``0`` for a session never deleted), so cursors from before the
deletion get ``LogReset``.

**Publishing** goes over the realtime connection with the message id set (ably-python does not set ids itself), so a
retried publish inside Ably's idempotency window stores nothing new.

**Reading** is the kit's :func:`~durable_ai.backend.follow_log` with REST history as the backlog
(:class:`~durable_ai_ably._store.AblyStore`, shared with the REST backend). A following reader joins the way Ably
defines a gapless join: it attaches the channel, and reads history *up to the attachment* (``from_serial`` set to
the attach serial, what ably-js's ``untilAttach`` sends); everything after the attachment arrives on it. One
attachment per channel serves every local reader (a :class:`_Feed`); a reader that joins an attachment already
made gets the operations delivered since it was made, and reads history up to the attachment too. Live messages
are taken from the protocol messages as they arrive and decoded defensively: a message whose data does not decode
is passed on as it came, never raised (ably-python keeps the attach serial to itself, so the backend observes the
connection's channel messages through its public ``on_channel_message``).

**Channels are released**: each channel object is held while a reader, a presence member or a publish uses it; the
last user gone, it is detached (if attached) and released, so a long-lived agent stays within Ably's limit of
channels per connection however many sessions it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from ably import AblyRealtime  # type: ignore[import-untyped]
from ably.types.channelstate import ChannelState  # type: ignore[import-untyped]
from ably.types.connectionstate import ConnectionState  # type: ignore[import-untyped]
from ably.types.message import Message  # type: ignore[import-untyped]
from ably.util.exceptions import AblyException  # type: ignore[import-untyped]
from websockets.exceptions import ConnectionClosed

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
    Tap,
    follow_log,
    retry_call,
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
    DELETE_MARKER,
    FLOOR_KINDS,
    AblyOptions,
    SessionState,
    all_of,
    decode_data,
    delete_record,
    options_from_url,
    pack_snapshot,
    presence_client_id,
    text_field,
    to_wire,
    version_serial,
)
from ._http import AblyHttp
from ._log import (
    APPENDABLE_NAME,
    PLAIN_NAME,
    HistoryPass,
    OpenParts,
    bound_after,
    format_position,
    parse_position,
    read_start,
    split_append,
)
from ._parts import PartPlanner
from ._store import AblyStore
from .auth import issue_client_token

__all__ = ["AblyBackend", "AblyOptions", "from_url"]

logger = logging.getLogger("durable_ai_ably")
T = TypeVar("T")

# Protocol message actions (Ably's realtime protocol) and message actions the backend reads.
_ATTACHED, _DETACHED, _MESSAGE, _ERROR = 11, 13, 15, 9
_FLAG_RESUMED = 1 << 2
_CREATE, _APPEND = 0, 5
#: operations a feed keeps from its attachment on, for readers that join it later (beyond: they read history)
_RECENT_MESSAGES = 2_000
_RECENT_BYTES = 2 * 1024 * 1024


class _Timeout(Exception):
    """An attempt that got no answer in time (retryable)."""


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


class _FeedTap(Tap):
    """A reader's tap on a feed, with the attach serial its history pass reads up to (``None``: to the end)."""

    def __init__(self, feed: _Feed, *, max_messages: int) -> None:
        super().__init__(max_messages=max_messages)
        self.feed = feed
        self.until: str | None = None


class _Feed:
    """One attachment of a channel, shared by the local live readers of it.

    It takes the channel's protocol messages as they arrive (:meth:`on_messages`), turns creates and appends into
    the log's operations, and offers them to every tap. It keeps the latest operations (bounded) and the channel
    serial just before the oldest of them (:attr:`since`, the attach serial at first): a reader that joins later
    reads history up to that serial and gets the kept operations, so it misses nothing in between.
    """

    def __init__(self, name: str, state: SessionState, kind: str, tap_limit: int) -> None:
        self.name = name
        self.epoch = state.epoch
        self.floor = state.floor_for(kind)
        self.tap_limit = tap_limit
        self.taps: set[_FeedTap] = set()
        self.attach_serial: str | None = None
        self.attached: asyncio.Future[None] | None = None
        self.held = False  # the feed holds its channel (see _Channels)
        self.broken = False
        self.recent: deque[tuple[StoredMessage, str | None]] = deque()  # (operation, its protocol message's serial)
        self.since: str | None = None  # history up to here, then ``recent``
        self._recent_bytes = 0
        self._last = ""
        self._parts = OpenParts()
        self._links = _Links()

    def tap(self) -> _FeedTap:
        tap = _FeedTap(self, max_messages=self.tap_limit)
        tap.until = self.since if self.since is not None else self.attach_serial
        for message, _ in self.recent:
            tap.offer(message)
        self.taps.add(tap)
        return tap

    def on_attached(self, serial: object, flags: object) -> None:
        if self.attach_serial is None and (self.attached is None or not self.attached.done()):
            self.attach_serial = serial if isinstance(serial, str) and serial else ""
            return
        if isinstance(flags, int) and flags & _FLAG_RESUMED:
            return
        # Attached again without continuity (Ably lost the attachment's place): readers read history again.
        self.fail(BackendUnavailable(f"the attachment of {self.name!r} lost continuity"))

    def on_messages(self, messages: object, channel_serial: object) -> None:
        if self.broken or not isinstance(messages, list):
            return
        serial = channel_serial if isinstance(channel_serial, str) and channel_serial else None
        for raw in messages:
            if isinstance(raw, Mapping):
                message = self._operation(raw)
                if message is not None:
                    self._offer(message, serial)

    def _operation(self, raw: Mapping[str, Any]) -> StoredMessage | None:
        action = raw.get("action")
        serial = text_field(raw, "serial")
        if action is None or action == _CREATE:
            position = serial
        elif action == _APPEND:
            position = version_serial(raw)
        else:
            return None  # updates and deletes are not part of a session's log
        # A protocol message delivered twice (a resumed attachment) repeats operations: keep the first.
        if not position or not serial or position <= self._last or serial < self.floor:
            return None
        if text_field(raw, "name") == DELETE_MARKER:
            return None  # another process deleted the session: its readers learn of it from the tombstone
        self._last = position
        data = decode_data(raw)
        if action == _APPEND:
            framed = split_append(data)
            if framed is None:
                logger.warning("skipping an append on %r that durable-ai did not write", self.name)
                return None
            link, data = framed
            if self._links.duplicate(serial, link):
                return None
        elif text_field(raw, "name") == APPENDABLE_NAME:
            self._parts.add(serial)
        return StoredMessage(self.epoch, format_position(position, self._parts.oldest(position)), data)

    def _offer(self, message: StoredMessage, serial: str | None) -> None:
        self.recent.append((message, serial))
        self._recent_bytes += len(message.data)
        while len(self.recent) > _RECENT_MESSAGES or self._recent_bytes > _RECENT_BYTES:
            dropped, at = self.recent.popleft()
            self._recent_bytes -= len(dropped.data)
            # A later reader's history now reaches the dropped operation's protocol message (those of its
            # operations still kept come twice, and readers skip them); without a serial, history to its end.
            self.since = at if at is not None else ""
        for tap in self.taps:
            tap.offer(message)

    def fail(self, error: BaseException) -> None:
        self.broken = True
        for tap in self.taps:
            tap.fail(error)


class _Channels:
    """The channel objects in use, counted by user (a reader's feed, a presence member, a publish in flight).

    When the last user of a channel goes, it is detached if it was attached and released (ably-python keeps
    every channel object it made otherwise, and Ably limits the channels attached per connection).
    """

    def __init__(self, realtime: AblyRealtime, timeout: float) -> None:
        self.realtime = realtime
        self.timeout = timeout
        self.users: dict[str, int] = {}
        self.releasing: dict[str, asyncio.Task[None]] = {}

    async def acquire(self, name: str) -> Any:
        """Count a user of the channel (at once, so a release under way keeps the object), and return the channel
        once a detach under way has ended."""
        self.users[name] = self.users.get(name, 0) + 1
        pending = self.releasing.get(name)
        if pending is not None:
            try:
                await asyncio.shield(pending)
            except BaseException:
                self.release(name)
                raise
        return self.realtime.channels.get(name)

    def release(self, name: str) -> None:
        count = self.users.get(name, 0) - 1
        if count > 0:
            self.users[name] = count
            return
        self.users.pop(name, None)
        task = asyncio.get_running_loop().create_task(self._release(name), name=f"durable-ai-ably release {name}")
        self.releasing[name] = task
        task.add_done_callback(lambda _: self.releasing.pop(name, None) if self.releasing.get(name) is task else None)

    async def _release(self, name: str) -> None:
        channels = self.realtime.channels
        if name not in channels:
            return  # released already
        channel = channels.get(name)
        with contextlib.suppress(Exception):
            if channel.state.value not in ("initialized", "detached", "failed"):
                async with asyncio.timeout(self.timeout):
                    await channel.detach()
        if name not in self.users:  # nobody took it again meanwhile
            with contextlib.suppress(Exception):
                channels.release(name)

    async def drain(self) -> None:
        if self.releasing:
            await asyncio.gather(*self.releasing.values(), return_exceptions=True)

    def objects(self) -> int:
        """How many channel objects ably-python holds (for tests)."""
        return sum(1 for _ in self.realtime.channels)


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
        self._store: AblyStore | None = None
        self._channels: _Channels | None = None
        self._count = OpenCount()
        self._closed = False
        self._feeds: dict[str, _Feed] = {}
        # The channel serial of the latest protocol message of each attached channel (ATTACHED or MESSAGE): where
        # this connection stands on it, so a reader of a channel attached already (for presence) reads history up
        # to there, and everything after reaches its new feed.
        self._channel_serials: dict[str, str] = {}
        self._presence: PresenceKeeper[tuple[str, str]] = PresenceKeeper()
        self._planner = PartPlanner(options.max_message_bytes)
        self._channel_budgets: dict[str, RateBudget] = {}
        rate = options.connection_rate_limit
        self._connection_budget = RateBudget(rate) if rate is not None else None

    # -- connection ----------------------------------------------------------------------------------------

    @property
    def limits(self) -> BackendLimits:
        return self._limits

    def client_credential(self, session_id: str, client_id: str) -> dict[str, Any]:
        """A signed TokenRequest for one client of ``session_id`` (see :func:`~durable_ai_ably.issue_client_token`):
        what a web server's credential route hands to ably-js's ``authCallback``."""
        return issue_client_token(session_id, client_id, key=self.options)

    def channel_name(self, session: str, kind: str = "events") -> str:
        return self.options.channel_name(session, kind)

    @property
    def connection_id(self) -> str | None:
        """The realtime connection's id while connected (it changes when a connection cannot be resumed)."""
        if self._realtime is None:
            return None
        manager = self._realtime.connection.connection_manager
        return None if manager.connection_id is None else str(manager.connection_id)

    def channel_objects(self) -> int:
        """How many ably-python channel objects this backend holds now (each is released when unused)."""
        return 0 if self._channels is None else self._channels.objects()

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
            # With the key, one connection enters presence for any member: its tokens have the wildcard clientId.
            options.update(client_id="*", default_token_params={"client_id": "*"})
        else:  # a client credential: its token, renewed by the callback if there is one
            if o.token is not None:
                options["token"] = o.token
            if o.auth_callback is not None:
                options["auth_callback"] = o.auth_callback
        if o.endpoint is not None:
            options["endpoint"] = o.endpoint
            options["fallback_hosts"] = []
        client = dict(o.client)
        if "default_token_params" in client and o.key is not None:
            client["default_token_params"] = {"client_id": "*", **client["default_token_params"]}
        options.update(client)
        return options

    async def open(self) -> None:
        await self._count.open(self._connect)

    async def _connect(self) -> None:
        http = AblyHttp(self.options)
        await http.open()
        realtime = AblyRealtime(**self._client_options())
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                await realtime.connection.once_async(ConnectionState.CONNECTED)
        except (TimeoutError, AblyException) as exc:
            with contextlib.suppress(Exception):
                await realtime.close()
            await http.close()
            reason = realtime.connection.error_reason or exc
            raise BackendUnavailable(f"cannot connect to Ably: {reason}") from exc
        realtime.connection.on(self._on_connection_state)
        manager = realtime.connection.connection_manager
        manager.on_channel_message = self._observer(manager.on_channel_message)
        self._realtime, self._store = realtime, AblyStore(self.options, http)
        self._channels = _Channels(realtime, self.options.attempt_timeout)
        self._closed = False

    def _observer(self, deliver: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """Wrap the connection's channel-message dispatch: feeds see each protocol message before ably-python."""

        def observe(message: dict[str, Any]) -> None:
            name = message.get("channel")
            if not isinstance(name, str):
                deliver(message)
                return
            action = message.get("action")
            serial = message.get("channelSerial")
            if action in (_ATTACHED, _MESSAGE) and isinstance(serial, str) and serial:
                self._channel_serials[name] = serial
            elif action == _DETACHED:
                self._channel_serials.pop(name, None)
            feed = self._feeds.get(name)
            if feed is not None:
                if action == _MESSAGE:
                    feed.on_messages(message.get("messages"), serial)
                elif action == _ATTACHED:
                    feed.on_attached(message.get("channelSerial"), message.get("flags"))
                elif action in (_DETACHED, _ERROR) and feed.attached is not None and feed.attached.done():
                    feed.fail(BackendUnavailable(f"the channel {name!r} was detached by Ably"))
            deliver(message)

        return observe

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
                feed.fail(BackendUnavailable(f"the Ably connection is {change.current.value}"))
            self._feeds.clear()

    async def close(self) -> None:
        if not self._count.release() or self._realtime is None:
            return
        realtime, store, channels = self._realtime, self._store, self._channels
        await self._presence.close(self._leave, within=2.0)
        self._closed = True
        for feed in list(self._feeds.values()):
            feed.fail(HubClosed("the backend is closed"))
        self._feeds.clear()
        if channels is not None:
            await channels.drain()
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
        if store is not None:
            await store.http.close()
        self._realtime = self._store = self._channels = None

    def _parts(self) -> tuple[AblyRealtime, AblyStore, _Channels]:
        if self._closed or self._realtime is None or self._store is None or self._channels is None:
            raise HubClosed("the Ably backend is not open")
        return self._realtime, self._store, self._channels

    # -- requests with retries -----------------------------------------------------------------------------

    async def _call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run one realtime operation, retrying timeouts, disconnections and 5xx for up to ``publish_timeout``."""

        async def bounded() -> T:
            try:
                async with asyncio.timeout(self.options.attempt_timeout):
                    return await attempt()
            except TimeoutError:
                raise _Timeout(f"no answer within {self.options.attempt_timeout} s") from None

        try:
            return await retry_call(bounded, retryable=_retryable, within=self.options.publish_timeout)
        except AblyException as exc:
            raise self._error(exc) from exc
        except (_Timeout, OSError, ConnectionClosed) as exc:
            raise BackendUnavailable(f"Ably did not answer: {exc}") from exc

    @staticmethod
    def _error(exc: AblyException) -> BackendError:
        status, code = exc.status_code or 0, exc.code or 0
        if (status in (401, 403) and code not in (40140, 40142)) or code == 40012:
            return PermissionDenied(str(exc))  # 40012: a clientId the credential does not carry
        if _retryable(exc):
            return BackendUnavailable(f"Ably is unavailable: {exc}")
        return BackendError(f"Ably refused the request: {exc}")

    # -- publish -------------------------------------------------------------------------------------------

    async def _publish(self, name: str, data: str | bytes, message_id: str, event: str = PLAIN_NAME) -> str:
        _, _, channels = self._parts()
        channel = await channels.acquire(name)
        try:

            async def attempt() -> Any:
                await self._throttle(name)
                return await channel.publish(Message(name=event, data=data, id=message_id))

            result = await self._call(attempt)
        finally:
            channels.release(name)
        serials = getattr(result, "serials", None) or []
        if not serials or not serials[0]:
            # The message may well be stored: PublishError makes the writer retry it under the same id.
            raise PublishError(f"Ably acknowledged a publish to {name!r} without a serial")
        return str(serials[0])

    async def _append(self, name: str, serial: str, data: str | bytes) -> str:
        _, _, channels = self._parts()
        channel = await channels.acquire(name)
        try:

            async def attempt() -> Any:
                await self._throttle(name)
                return await channel.append_message(Message(data=data, serial=serial))

            result = await self._call(attempt)
        finally:
            channels.release(name)
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
        _, store, _ = self._parts()
        if len(data) > self._limits.max_message_bytes:
            raise PayloadTooLarge(len(data), self._limits.max_message_bytes)
        state = await store.session(channel.session)
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
        _, store, _ = self._parts()
        name = self.channel_name(channel.session, channel.kind)
        state = await store.session(channel.session, refresh=True)
        floor = state.floor_for(channel.kind)
        begin = read_start(start, state.epoch, floor)
        tap: _FeedTap | None = None
        # The parts the latest history pass saw: a live operation's position names the oldest part that may still
        # grow, which the feed alone cannot know of parts created before its attachment.
        seen = OpenParts()
        # The operation at the start, when history read up to the attachment did not reach it: the attachment's
        # first operation from there on must be it (what is before it was read before the cursor).
        unmet: str | None = None

        async def attach() -> Tap:
            nonlocal tap
            tap = await self._attach(name, state, channel.kind)
            return tap

        async def backlog(position: LogPosition | None) -> AsyncIterator[StoredMessage]:
            nonlocal seen, unmet
            here = begin if position is start else read_start(position, state.epoch, floor)
            scan = HistoryPass(floor=floor, first=here.first, oldest=here.oldest, exact=here.exact)
            seen = scan.parts
            if here.oldest is not None:
                seen.add(here.oldest)
            until = tap.until if tap is not None else None
            async for at, data in store.history(name, scan, until_attach=until or None):
                yield StoredMessage(state.epoch, at, data)
            unmet = scan.unmet

        def detach(old: Tap) -> None:
            nonlocal tap
            tap = None
            if isinstance(old, _FeedTap):
                self._detach(old)

        async for message in follow_log(
            start=start, follow=follow, backlog=backlog, attach=attach, detach=detach, order=_serial_of
        ):
            serial, oldest = parse_position(message.position)
            if unmet is not None:
                if serial < unmet:
                    continue  # delivered live, but before the cursor
                if serial != unmet:
                    raise LogReset("the message at the cursor is no longer retained")
                unmet = None
            earlier = seen.oldest(serial)
            if earlier is not None and (oldest is None or earlier < oldest):
                message = StoredMessage(message.epoch, format_position(serial, earlier), message.data)
            yield message

    async def _attach(self, name: str, state: SessionState, kind: str) -> _FeedTap:
        feed = self._feeds.get(name)
        if feed is not None and (feed.broken or feed.epoch != state.epoch):
            if not feed.broken:
                feed.fail(LogReset("the session was deleted"))
            del self._feeds[name]  # its readers let go of it as they end
            feed = None
        if feed is None:
            feed = self._feeds[name] = _Feed(name, state, kind, self.options.tap_limit)
        if feed.attached is None:
            feed.attached = asyncio.ensure_future(self._attach_channel(feed))
        try:
            await asyncio.shield(feed.attached)
        except BaseException:
            if not feed.taps:
                self._drop(feed)
            raise
        tap = feed.tap()
        if feed.broken:
            self._detach(tap)
            raise tap.error or BackendUnavailable(f"the attachment of {name!r} was lost")
        return tap

    async def _attach_channel(self, feed: _Feed) -> None:
        _, _, channels = self._parts()
        channel = await channels.acquire(feed.name)
        feed.held = True
        where = self._channel_serials.get(feed.name)
        if channel.state == ChannelState.ATTACHED and where is not None:
            # Attached already (presence): the feed gets every protocol message after the latest one seen, and
            # history is read up to that one.
            feed.attach_serial = where
            return
        await self._call(channel.attach)
        if feed.attach_serial is None:
            feed.attach_serial = ""

    def _detach(self, tap: _FeedTap) -> None:
        feed = tap.feed
        feed.taps.discard(tap)
        if not feed.taps:
            self._drop(feed)

    def _drop(self, feed: _Feed) -> None:
        """A feed without readers: it goes, and lets go of its channel."""
        if self._feeds.get(feed.name) is feed:
            del self._feeds[feed.name]
        if feed.held:
            feed.held = False
            if self._channels is not None and not self._closed:
                self._channels.release(feed.name)

    async def head(self, channel: Channel) -> LogPosition | None:
        _, store, _ = self._parts()
        return await store.head(channel.session, channel.kind)

    async def since(self, channel: Channel, published: LogPosition) -> LogPosition:
        """Where to read ``channel`` from to see everything stored after ``published`` (a message of another
        channel of the session, just acknowledged): a bound from the published serial's time, less a margin, so no
        request is made to find the end of the log first."""
        _, store, _ = self._parts()
        state = store.known(channel.session) or await store.session(channel.session)
        return LogPosition(state.epoch, bound_after(published.position))

    async def delete(self, session: str) -> None:
        _, store, _ = self._parts()
        stamp = time.time_ns()
        # A floor on each channel (Ably orders serials within a channel only), then the deletion that names them.
        serials = await all_of(
            self._publish(self.channel_name(session, kind), "deleted", f"delete:{stamp}:{kind}", DELETE_MARKER)
            for kind in FLOOR_KINDS
        )
        floors = dict(zip(FLOOR_KINDS, serials, strict=True))
        meta = self.channel_name(session, "meta")
        marker = await self._publish(meta, delete_record(floors), f"delete:{stamp}", DELETE_MARKER)
        store.deleted(session, marker, floors)
        self._planner.forget(self.channel_name(session))
        for kind in ("events", "control"):
            feed = self._feeds.get(self.channel_name(session, kind))
            if feed is not None:
                feed.fail(LogReset("the session was deleted"))
        for key in [k for k in self._presence.entries if k[0] == session]:
            self._presence.left(key)
            with contextlib.suppress(BackendError):
                await self._leave(key)

    # -- snapshots -----------------------------------------------------------------------------------------

    async def load_snapshot(self, session: str) -> bytes | None:
        _, store, _ = self._parts()
        return await store.load_snapshot(session)

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
        _, _, channels = self._parts()
        name = self.channel_name(session)
        key = (session, presence_client_id(member_id, role))
        channel = await channels.acquire(name)  # held while the member is present (entering attaches it)
        try:
            await self._call(lambda: channel.presence.enter_client(key[1], to_wire(data)))
        except BaseException:
            channels.release(name)
            raise
        if key in self._presence.entries:
            channels.release(name)  # an update: the member holds the channel once
        self._presence.entered(key, data)

    async def leave_presence(self, session: str, member_id: str, *, role: PresenceRole = "client") -> None:
        self._parts()
        key = (session, presence_client_id(member_id, role))
        if key in self._presence.entries:
            self._presence.left(key)
            await self._leave(key)

    async def _leave(self, key: tuple[str, str]) -> None:
        """Leave a member this backend entered (no longer in the keeper's entries) and let go of its channel."""
        realtime, channels = self._realtime, self._channels
        if realtime is None or channels is None:
            return
        session, client_id = key
        name = self.channel_name(session)
        try:
            presence = realtime.channels.get(name).presence
            await self._call(lambda: presence.leave_client(client_id))
        finally:
            channels.release(name)

    async def presence(self, session: str) -> list[PresenceEntry]:
        _, store, _ = self._parts()
        return await store.presence(session)


def _serial_of(position: str) -> str:
    return parse_position(position)[0]


def from_url(url: str) -> AblyBackend:
    """A realtime backend for an ``ably://`` URL (see :func:`durable_ai_ably.options_from_url` for the options)."""
    return AblyBackend(options_from_url(url))
