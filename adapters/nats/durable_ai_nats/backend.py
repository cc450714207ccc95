"""The NATS JetStream backend.

Layout: one stream per prefix (default ``DURABLE_AI`` for the prefix ``durable_ai``) with the subjects
``<prefix>.<session>.events`` and ``<prefix>.<session>.control``; a position is the stream sequence, and the
epoch is the stream's creation time, so a recreated stream invalidates every cursor. Snapshots live in the KV
bucket ``<prefix>_snapshots``, presence in ``<prefix>_presence`` whose entries expire unless refreshed.

Publishes carry the message id as ``Nats-Msg-Id``, so a retry (after a timeout, a reconnect or a server
restart) inside the stream's duplicate window stores nothing new. Reads go through ephemeral push consumers
(see :mod:`durable_ai_nats._consumer`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import DEFAULT_PENDING_SIZE
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.kv import KeyValue
from nats.js.manager import JetStreamManager
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from durable_ai.backend import BackendLimits, Channel, LogPosition, StoredMessage
from durable_ai.errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    HubClosed,
    LogReset,
    PayloadTooLarge,
    PermissionDenied,
)

from ._consumer import Backlog, ConsumerSpec, Delivered, Feed, Tap, raise_if_cancelling

__all__ = ["NatsBackend", "NatsOptions", "PendingBufferFull", "from_url", "names"]

logger = logging.getLogger("durable_ai_nats")
T = TypeVar("T")

_HEADER_ROOM = 1024
_MAX_PENDING_ACKS = 4000
_KV_OPERATION = "KV-Operation"


class _BufferFull(Exception):
    """Retryable inside one request; surfaces as :class:`PendingBufferFull`."""


_RETRYABLE = (
    _BufferFull,
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.UnexpectedEOF,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.errors.NoRespondersError,
)


class PendingBufferFull(BackendUnavailable):
    """The connection's outgoing buffer or the number of unacknowledged publishes is at its limit.

    Raised instead of dropping a message while the server is unreachable; the hub's writer keeps the events
    buffered and tries again.
    """


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """What the backend creates on first use, and how it talks to the server.

    Attributes:
        prefix: the first subject token; names the stream (upper-cased) and the KV buckets.
        replicas: replicas of the stream and buckets (3 in a 3-node cluster).
        storage: ``file`` or ``memory``.
        max_age: seconds a message is kept (``None``: forever).
        max_messages: messages kept per session log; older ones are dropped (``None``: no limit).
        max_bytes: bytes kept by the whole stream (``None``: no limit).
        max_message_bytes: the largest message written; larger events are fragmented by the hub.
        duplicate_window: seconds during which a re-published message id is recognised.
        control_ttl: seconds a control message is kept, with a per-message TTL (NATS 2.11+; ``None``: as events).
        presence_ttl: seconds a presence entry lives without a refresh (refreshed every third of it).
        publish_timeout: seconds one publish is retried before :class:`~durable_ai.errors.BackendUnavailable`.
        connect_timeout: seconds ``open`` tries to reach a server before ``BackendUnavailable``.
        heartbeat: idle heartbeat of consumers, seconds; a consumer silent for three is read again.
        tap_limit: messages a live reader may fall behind before it goes back to reading the backlog.
        connect: extra keyword arguments for ``nats.connect`` (credentials, TLS, inbox prefix, ...).
    """

    prefix: str = "durable_ai"
    replicas: int = 1
    storage: Literal["file", "memory"] = "file"
    max_age: float | None = 30 * 86400.0
    max_messages: int | None = 100_000
    max_bytes: int | None = None
    max_message_bytes: int = 1024 * 1024
    duplicate_window: float = 120.0
    control_ttl: float | None = 86400.0
    presence_ttl: float = 30.0
    publish_timeout: float = 10.0
    connect_timeout: float = 5.0
    heartbeat: float = 2.0
    tap_limit: int = 10_000
    connect: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prefix or not all(c.isalnum() or c in "_-" for c in self.prefix):
            raise ConfigurationError(f"prefix must be letters, digits, '_' or '-', got {self.prefix!r}")
        if self.replicas < 1 or self.replicas > 5:
            raise ConfigurationError("replicas must be between 1 and 5")
        if self.storage not in ("file", "memory"):
            raise ConfigurationError("storage must be 'file' or 'memory'")
        for name in ("max_age", "max_messages", "max_bytes", "control_ttl"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigurationError(f"{name} must be positive or None")
        if self.max_message_bytes < 4096:
            raise ConfigurationError("max_message_bytes must be at least 4096")
        for name in ("duplicate_window", "presence_ttl", "publish_timeout", "connect_timeout", "heartbeat"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be positive")
        if self.tap_limit < 1:
            raise ConfigurationError("tap_limit must be at least 1")


@dataclass(frozen=True, slots=True)
class Names:
    """The subjects, stream and buckets a prefix uses."""

    prefix: str

    @property
    def stream(self) -> str:
        return self.prefix.upper().replace("-", "_")

    def subject(self, session: str, kind: str) -> str:
        return f"{self.prefix}.{session}.{kind}"

    @property
    def snapshots(self) -> str:
        return f"{self.prefix}_snapshots"

    @property
    def presence(self) -> str:
        return f"{self.prefix}_presence"


def names(prefix: str = "durable_ai") -> Names:
    """The stream, subjects and buckets used for ``prefix``."""
    return Names(NatsOptions(prefix=prefix).prefix)


class NatsBackend:
    """Durable sessions on NATS JetStream (see the module docstring).

    Args:
        servers: one or more ``nats://host:port`` URLs of one cluster (credentials may be in the URL).
        options: what to create and how to connect; see :class:`NatsOptions`.
    """

    def __init__(self, servers: str | Sequence[str] = "nats://127.0.0.1:4222", options: NatsOptions | None = None):
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        if not self.servers:
            raise ConfigurationError("at least one NATS server URL is needed")
        self.options = options or NatsOptions()
        self.names = Names(self.options.prefix)
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._jsm: JetStreamManager | None = None
        self._users = 0
        self._closed = False
        self._epoch: str | None = None
        self._highest_seq = 0
        self._msg_ttl = False
        self._stream_lock = asyncio.Lock()
        self._kv: dict[str, KeyValue] = {}
        self._kv_lock = asyncio.Lock()
        self._feeds: dict[str, Feed] = {}
        self._denied: tuple[float, str] | None = None
        self._present: dict[tuple[str, str], bytes] = {}
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._open_lock = asyncio.Lock()
        self._limits = BackendLimits(self.options.max_message_bytes, None)
        self._ack_timeout = min(2.0, self.options.publish_timeout)
        self._pending_limit = int(self.options.connect.get("pending_size", DEFAULT_PENDING_SIZE))

    # -- connection ----------------------------------------------------------------------------------------

    @property
    def limits(self) -> BackendLimits:
        return self._limits

    @property
    def connection(self) -> NATS:
        """The nats-py connection (open backends only)."""
        if self._nc is None or self._closed:
            raise HubClosed("the NATS backend is not open")
        return self._nc

    async def open(self) -> None:
        self._users += 1
        async with self._open_lock:  # hubs sharing this backend may open it concurrently: connect once
            if self._nc is None:
                try:
                    await self._connect()
                except BaseException:
                    self._users -= 1
                    raise

    async def _connect(self) -> None:
        options: dict[str, Any] = {
            "name": "durable-ai",
            "connect_timeout": 2,
            "reconnect_time_wait": 0.25,
            "max_reconnect_attempts": -1,
            "allow_reconnect": True,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "error_cb": self._on_error,
        }
        options.update(self.options.connect)
        nc = NATS()
        try:
            # nats-py retries the first connection forever when reconnects are unlimited: bound it.
            async with asyncio.timeout(self.options.connect_timeout):
                await nc.connect(self.servers, **options)
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            reason = nc.last_error or exc
            raise BackendUnavailable(f"cannot connect to NATS at {', '.join(self.servers)}: {reason}") from exc
        self._nc = nc
        # Requests time out quickly and are retried (see _call) for up to publish_timeout.
        request_timeout = min(2.0, self.options.publish_timeout)
        self._js = nc.jetstream(timeout=request_timeout, publish_async_max_pending=_MAX_PENDING_ACKS)
        self._jsm = nc.jsm(timeout=request_timeout)
        headroom = max(nc.max_payload - _HEADER_ROOM, 4096)
        self._limits = BackendLimits(min(self.options.max_message_bytes, headroom), None)

    async def close(self) -> None:
        self._users -= 1
        if self._users > 0 or self._nc is None or self._closed:
            return
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._present and self._nc.is_connected:
            # Leave at once rather than linger until presence_ttl: best effort, bounded.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    for session, member in list(self._present):
                        await self.leave_presence(session, member)
        self._closed = True
        for feed in list(self._feeds.values()):
            await feed.close()
        self._feeds.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self._nc.close()

    async def _on_disconnected(self) -> None:
        if not self._closed:
            logger.info("disconnected from NATS; reconnecting")
        for feed in list(self._feeds.values()):
            feed.fail("disconnected from the server")

    async def _on_reconnected(self) -> None:
        logger.info("reconnected to NATS at %s", self._nc.connected_url if self._nc else "?")

    async def _on_error(self, exc: Exception) -> None:
        text = str(exc)
        if "permissions violation" in text.lower():
            self._denied = (time.monotonic(), text.split("nats: ", 1)[-1])
        logger.warning("NATS error: %s", text)

    def _denied_since(self, started: float) -> str | None:
        """The permission violation the server reported since ``started``, if any."""
        if self._denied is not None and self._denied[0] >= started:
            return self._denied[1]
        return None

    def _parts(self) -> tuple[NATS, JetStreamContext, JetStreamManager]:
        if self._closed or self._nc is None or self._js is None or self._jsm is None:
            raise HubClosed("the NATS backend is not open")
        return self._nc, self._js, self._jsm

    # -- the stream ----------------------------------------------------------------------------------------

    def stream_config(self) -> StreamConfig:
        """The stream created on first use (the options decide its limits)."""
        o = self.options
        config = StreamConfig(
            name=self.names.stream,
            description="durable-ai sessions",
            subjects=[f"{o.prefix}.*.events", f"{o.prefix}.*.control"],
            max_age=o.max_age,
            max_msgs_per_subject=o.max_messages or -1,
            max_bytes=o.max_bytes or -1,
            max_msg_size=o.max_message_bytes + _HEADER_ROOM,
            storage=StorageType.FILE if o.storage == "file" else StorageType.MEMORY,
            num_replicas=o.replicas,
            duplicate_window=o.duplicate_window,
            allow_direct=True,
        )
        if o.control_ttl is not None and self._server_at_least(2, 11):
            config = replace(config, allow_msg_ttl=True)
        return config

    def _server_at_least(self, major: int, minor: int) -> bool:
        version = self._nc.connected_server_version if self._nc is not None else None
        return version is not None and (version.major, version.minor) >= (major, minor)

    async def _stream(self, *, refresh: bool = False) -> str:
        """Make sure the stream exists; return its epoch."""
        if self._epoch is not None and not refresh:
            return self._epoch
        _, _, jsm = self._parts()
        async with self._stream_lock:
            if self._epoch is not None and not refresh:
                return self._epoch
            info = await self._call(lambda: self._stream_info(jsm))
            self._use(info)
            assert self._epoch is not None
            return self._epoch

    async def _stream_info(self, jsm: JetStreamManager) -> StreamInfo:
        try:
            return await jsm.stream_info(self.names.stream)
        except nats.js.errors.NotFoundError:
            pass
        try:
            info = await jsm.add_stream(self.stream_config())
            logger.info("created stream %s", self.names.stream)
            return info
        except nats.js.errors.BadRequestError:
            return await jsm.stream_info(self.names.stream)  # created by another process meanwhile

    def _use(self, info: StreamInfo) -> None:
        created = info.created
        epoch = format(int(created.timestamp() * 1_000_000), "x") if created is not None else "0"
        if self._epoch is not None and epoch != self._epoch:
            logger.warning("stream %s was recreated; cursors of the old one get a reset", self.names.stream)
            self._highest_seq = 0
        self._epoch = epoch
        self._msg_ttl = bool(info.config.allow_msg_ttl)
        wanted = self.stream_config()
        for attr in ("num_replicas", "max_msgs_per_subject", "max_age", "storage"):
            have, want = getattr(info.config, attr), getattr(wanted, attr)
            if have != want and not (attr == "max_age" and not have and not want):
                logger.warning(
                    "stream %s exists with %s=%s, not %s; using it as it is", self.names.stream, attr, have, want
                )

    async def _call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run one request with retries on timeouts and disconnects, for up to ``publish_timeout``.

        The first attempt runs bare (most requests succeed at once, and a retry loop per publish costs more
        than the publish); a retryable failure hands over to tenacity. A request the server refused for lack of
        permission is not retried: the server answers it with an asynchronous error and no reply, so the timeout
        that follows is turned into ``PermissionDenied``.
        """
        started = time.monotonic()
        try:
            try:
                result = await attempt()
            except _RETRYABLE:
                if self._denied_since(started) is not None:
                    raise
                result = await self._retry(attempt, started)
            raise_if_cancelling()
            return result
        except _RETRYABLE as exc:
            if (denied := self._denied_since(started)) is not None:
                raise PermissionDenied(denied) from exc
            if isinstance(exc, _BufferFull):
                raise PendingBufferFull("the connection is down and its reconnect buffer is full") from exc
            raise BackendUnavailable(f"NATS did not answer: {exc!r}") from exc
        except nats.errors.ConnectionClosedError as exc:
            raise HubClosed("the NATS connection is closed") from exc
        except nats.errors.OutboundBufferLimitError as exc:
            raise PendingBufferFull("the NATS connection's outgoing buffer is full") from exc
        except nats.js.errors.APIError as exc:
            if exc.code == 403 or "permission" in str(exc).lower():
                raise PermissionDenied(str(exc)) from exc
            raise BackendError(f"JetStream refused the request: {exc}") from exc

    async def _retry(self, attempt: Callable[[], Awaitable[T]], started: float) -> T:
        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, _RETRYABLE) and self._denied_since(started) is None

        async for trying in AsyncRetrying(
            stop=stop_after_delay(max(0.0, self.options.publish_timeout - (time.monotonic() - started))),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(retryable),
            reraise=True,
        ):
            with trying:
                return await attempt()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- publish -------------------------------------------------------------------------------------------

    async def publish(self, channel: Channel, data: bytes, *, message_id: str) -> LogPosition:
        nc, js, jsm = self._parts()
        if len(data) > self._limits.max_message_bytes:
            raise PayloadTooLarge(len(data), self._limits.max_message_bytes)
        if self._epoch is None:
            await self._stream()
        subject = self.names.subject(channel.session, channel.kind)

        async def attempt() -> Any:
            if self._epoch is None:
                # The stream went away (deleted by an operator): create it again, as on first use.
                async with self._stream_lock:
                    if self._epoch is None:
                        self._use(await self._stream_info(jsm))
            ttl = self.options.control_ttl if channel.kind == "control" and self._msg_ttl else None
            if not nc.is_connected and nc.pending_data_size + len(data) + _HEADER_ROOM > self._pending_limit:
                # nats-py would raise after registering the ack future, which then never resolves: refuse first,
                # and retry (for up to publish_timeout) in case the connection comes back.
                raise _BufferFull
            if js.publish_async_pending() >= _MAX_PENDING_ACKS:
                # Checked here rather than with publish_async's wait_stall, which costs a task per publish.
                raise PendingBufferFull(f"{_MAX_PENDING_ACKS} publishes are waiting for their acknowledgement")
            future = await js.publish_async(subject, data, headers={"Nats-Msg-Id": message_id}, msg_ttl=ttl)
            # A lost ack would leave the future pending forever: expire it (cheaper than asyncio.timeout).
            expiry = asyncio.get_running_loop().call_later(self._ack_timeout, _expire, future)
            try:
                return await future
            except nats.js.errors.NoStreamResponseError:
                self._epoch = None
                raise
            finally:
                expiry.cancel()

        ack = await self._call(attempt)
        epoch = self._epoch
        if ack.seq < self._highest_seq or epoch is None:
            epoch = await self._stream(refresh=True)
        self._highest_seq = max(self._highest_seq, ack.seq)
        return LogPosition(epoch, str(ack.seq))

    # -- read ----------------------------------------------------------------------------------------------

    async def read(self, channel: Channel, *, start: LogPosition | None, follow: bool) -> AsyncIterator[StoredMessage]:
        nc, _, jsm = self._parts()
        subject = self.names.subject(channel.session, channel.kind)
        # One stream-info request per read, not per message: a stream recreated by another process since this
        # one last looked must reset old cursors, and only the server knows.
        epoch = await self._stream(refresh=True)
        if start is not None and start.epoch != epoch:
            raise LogReset("the session's log was recreated (the NATS stream is a new one)")
        first: int | None = None
        if start is not None and start.position is not None:
            try:
                first = int(start.position)
            except ValueError:
                raise LogReset(f"{start.position!r} is not a position of this log") from None
        tap: Tap | None = None
        last: int | None = None
        try:
            while True:
                if follow and tap is None:
                    tap = await self._attach(nc, jsm, subject)
                spec = (
                    ConsumerSpec(self.names.stream, subject, DeliverPolicy.BY_START_SEQUENCE, first)
                    if first is not None
                    else ConsumerSpec(self.names.stream, subject, DeliverPolicy.ALL)
                )
                backlog = Backlog(nc, jsm, spec, self.options.heartbeat)
                expected = first  # reading from a position: the message there must still be the first one
                try:
                    count = await self._call(backlog.open)
                    if expected is not None and count == 0:
                        raise LogReset("the message at the cursor is no longer retained")
                    while (item := await backlog.next()) is not None:
                        if expected is not None:
                            if item.seq != expected:
                                raise LogReset("the message at the cursor is no longer retained")
                            expected = None
                        if backlog.remaining == 0:
                            await backlog.close()  # before the last yield: a reader that stops here holds none
                        if last is not None and item.seq <= last:
                            continue
                        last = item.seq
                        yield StoredMessage(epoch, str(item.seq), item.data)
                finally:
                    await backlog.close()
                if tap is None:
                    return
                while (live := await tap.next()) is not None:
                    if last is not None and live.seq <= last:
                        continue
                    last = live.seq
                    yield StoredMessage(epoch, str(live.seq), live.data)
                # Fell behind the feed: read the backlog again from the last message read (inclusive).
                self._detach(tap)
                tap = None
                if last is not None:
                    first = last
        finally:
            if tap is not None:
                self._detach(tap)

    async def _attach(self, nc: NATS, jsm: JetStreamManager, subject: str) -> Tap:
        feed = self._feeds.get(subject)
        if feed is None or feed.broken:
            feed = Feed(nc, jsm, self.names.stream, subject, self.options.heartbeat)
            self._feeds[subject] = feed
        tap = Tap(feed, self.options.tap_limit)
        feed.taps.add(tap)
        try:
            await self._call(feed.start)
        except BaseException:
            self._detach(tap)
            raise
        return tap

    def _detach(self, tap: Tap) -> None:
        feed = tap.feed
        feed.taps.discard(tap)
        if not feed.taps:
            if self._feeds.get(feed.consumer.spec.subject) is feed:
                del self._feeds[feed.consumer.spec.subject]
            self._spawn_close(feed)

    def _spawn_close(self, feed: Feed) -> None:
        task = asyncio.get_running_loop().create_task(feed.close(), name="durable-ai-nats feed close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def head(self, channel: Channel) -> LogPosition | None:
        _, _, jsm = self._parts()
        epoch = await self._stream()
        subject = self.names.subject(channel.session, channel.kind)

        async def last() -> Any:
            try:
                return await jsm.get_last_msg(self.names.stream, subject, direct=True)
            except nats.js.errors.NotFoundError:
                return None
            except nats.errors.NoRespondersError:
                # Nobody serves direct gets for the stream: JetStream is starting, or the stream was deleted.
                self._use(await self._stream_info(jsm))
                raise

        message = await self._call(last)
        return None if message is None else LogPosition(self._epoch or epoch, str(message.seq))

    async def delete(self, session: str) -> None:
        _, _, jsm = self._parts()
        await self._stream()
        for kind in ("events", "control"):
            subject = self.names.subject(session, kind)
            await self._call(partial(jsm.purge_stream, self.names.stream, subject=subject))
            feed = self._feeds.get(subject)
            if feed is not None:
                feed.fail("the session was deleted")
        for bucket in (self.names.snapshots, self.names.presence):
            await self._bucket(bucket)
            await self._call(partial(self._purge_prefix, bucket, session))
        for key in [k for k in self._present if k[0] == session]:
            del self._present[key]

    # -- KV: snapshots and presence ------------------------------------------------------------------------

    async def _bucket(self, name: str) -> KeyValue:
        kv = self._kv.get(name)
        if kv is not None:
            return kv
        _, js, _ = self._parts()
        async with self._kv_lock:
            if name not in self._kv:
                self._kv[name] = await self._call(lambda: self._open_bucket(js, name))
            return self._kv[name]

    async def _open_bucket(self, js: JetStreamContext, name: str) -> KeyValue:
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            pass
        presence = name == self.names.presence
        try:
            return await js.create_key_value(
                bucket=name,
                history=1,
                ttl=self.options.presence_ttl if presence else self.options.max_age,
                storage=StorageType.FILE if self.options.storage == "file" else StorageType.MEMORY,
                replicas=self.options.replicas,
                direct=True,
            )
        except nats.js.errors.BadRequestError:
            return await js.key_value(name)

    async def _purge_prefix(self, bucket: str, session: str) -> None:
        _, _, jsm = self._parts()
        await jsm.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{session}")
        await jsm.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{session}.>")

    async def _latest(self, bucket: str, filter_subject: str) -> dict[str, Delivered]:
        """The newest value of every key under a subject filter, read through a consumer (not KV watch)."""
        nc, _, jsm = self._parts()
        await self._bucket(bucket)
        spec = ConsumerSpec(f"KV_{bucket}", filter_subject, DeliverPolicy.LAST_PER_SUBJECT)
        backlog = Backlog(nc, jsm, spec, self.options.heartbeat)
        found: dict[str, Delivered] = {}
        try:
            await self._call(backlog.open)
            while (item := await backlog.next()) is not None:
                found[item.subject] = item
        finally:
            await backlog.close()
        return found

    async def load_snapshot(self, session: str) -> bytes | None:
        kv = await self._bucket(self.names.snapshots)

        async def get(key: str) -> bytes | None:
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                return None
            return entry.value

        head = await self._call(lambda: get(session))
        if head is None:
            return None
        kind, body = head[:1], head[1:]
        if kind == b"c":  # chunked: "c<count>"
            chunks = []
            for index in range(int(body)):
                chunk = await self._call(partial(get, f"{session}.{index}"))
                if chunk is None:
                    return None  # a newer snapshot is being written; the caller replays instead
                chunks.append(chunk)
            kind, body = b"z", b"".join(chunks)
        return zlib.decompress(body) if kind == b"z" else body

    async def save_snapshot(self, session: str, data: bytes) -> None:
        kv = await self._bucket(self.names.snapshots)
        packed = zlib.compress(data, 1)
        payload = b"z" + packed if len(packed) < len(data) else b"r" + data
        room = self._limits.max_message_bytes
        if len(payload) <= room:
            await self._call(lambda: kv.put(session, payload))
            return
        chunks = [packed[i : i + room] for i in range(0, len(packed), room)]
        for index, chunk in enumerate(chunks):
            await self._call(partial(kv.put, f"{session}.{index}", chunk))
        await self._call(lambda: kv.put(session, b"c" + str(len(chunks)).encode()))

    @staticmethod
    def _member_key(session: str, member_id: str) -> str:
        return f"{session}.{base64.urlsafe_b64encode(member_id.encode()).decode().rstrip('=') or '_'}"

    async def enter_presence(self, session: str, member_id: str, data: bytes) -> None:
        kv = await self._bucket(self.names.presence)
        await self._call(lambda: kv.put(self._member_key(session, member_id), b"p" + data))
        self._present[(session, member_id)] = data
        if self._heartbeat_task is None:
            self._heartbeat_task = asyncio.get_running_loop().create_task(
                self._refresh_presence(), name="durable-ai-nats presence"
            )

    async def leave_presence(self, session: str, member_id: str) -> None:
        self._present.pop((session, member_id), None)
        kv = await self._bucket(self.names.presence)
        await self._call(lambda: kv.delete(self._member_key(session, member_id)))

    async def presence(self, session: str) -> dict[str, bytes]:
        bucket = self.names.presence
        latest = await self._latest(bucket, f"$KV.{bucket}.{session}.>")
        members: dict[str, bytes] = {}
        for subject, item in latest.items():
            if item.headers and item.headers.get(_KV_OPERATION) in ("DEL", "PURGE"):
                continue
            if not item.data.startswith(b"p"):
                continue
            token = subject.rsplit(".", 1)[-1]
            member = "" if token == "_" else base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            members[member] = item.data[1:]
        return members

    async def _refresh_presence(self) -> None:
        interval = self.options.presence_ttl / 3
        while True:
            await asyncio.sleep(interval)
            for (session, member), data in list(self._present.items()):
                try:
                    kv = await self._bucket(self.names.presence)
                    await kv.put(self._member_key(session, member), b"p" + data)
                except Exception as exc:
                    logger.info("could not refresh presence of %r in %r: %s", member, session, exc)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


def _float(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {value!r}") from None


def from_url(url: str) -> NatsBackend:
    """A backend for ``nats://[user:password@]host:port[,host:port...][?option=value&...]``.

    Options: ``prefix``, ``replicas``, ``storage`` (file|memory), ``max_age`` (seconds, 0: forever),
    ``max_messages`` (per session log, 0: no limit), ``max_bytes``, ``max_message_bytes``, ``duplicate_window``,
    ``control_ttl`` (0: as events), ``presence_ttl``, ``publish_timeout``, ``connect_timeout``, ``heartbeat``,
    ``tap_limit``,
    and for the connection ``name``, ``token``, ``creds`` (a credentials file), ``nkey_seed`` (a seed file),
    ``inbox_prefix``.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("nats", "tls"):
        raise ConfigurationError(f"not a NATS URL: {url!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if not hosts:
        hosts = "127.0.0.1:4222"
    servers = [f"{parts.scheme}://{userinfo + '@' if userinfo else ''}{host}" for host in hosts.split(",") if host]
    kwargs: dict[str, Any] = {}
    connect: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("prefix", "storage"):
            kwargs[key] = value
        elif key in ("replicas", "max_messages", "max_bytes", "max_message_bytes", "tap_limit"):
            number = int(_float(value, key))
            kwargs[key] = number if number > 0 or key in ("replicas", "max_message_bytes", "tap_limit") else None
        elif key in ("max_age", "control_ttl"):
            seconds = _float(value, key)
            kwargs[key] = seconds if seconds > 0 else None
        elif key in ("duplicate_window", "presence_ttl", "publish_timeout", "connect_timeout", "heartbeat"):
            kwargs[key] = _float(value, key)
        elif key in ("name", "token", "inbox_prefix"):
            connect[key] = unquote(value)
        elif key == "creds":
            connect["user_credentials"] = unquote(value)
        elif key == "nkey_seed":
            connect["nkeys_seed"] = unquote(value)
        else:
            raise ConfigurationError(f"unknown option {key!r} in NATS URL")
    return NatsBackend(servers, NatsOptions(**kwargs, connect=connect))
