"""The NATS JetStream backend.

Layout (for the prefix ``durable_ai``): the stream ``DURABLE_AI`` holds every session's events
(``durable_ai.<session>.events``) and the stream ``DURABLE_AI_CONTROL`` every session's controls
(``durable_ai.<session>.control``). What clients write never shares a duplicate window, a message id space or
stream-wide header rules with what agents write. A position is the stream sequence, and a log's epoch is its
stream's creation time, which each stream records in a marker message (``durable_ai._epoch``,
``durable_ai._epoch_control``) that clients read without stream info; a recreated stream invalidates every
cursor. Snapshots live in the KV bucket ``durable_ai_snapshots``; presence in ``durable_ai_presence``, whose
entries expire unless refreshed: agents under ``<session>.a.<member>``, clients under ``<session>.c.<member>``,
so the key, which permissions confine, says who a member is.

Publishes carry ``<session>:<message id>`` as ``Nats-Msg-Id``, so a retry (after a timeout, a reconnect or a
server restart) inside the duplicate window stores nothing new, and an id can never collide across sessions.
Reads go through ephemeral push consumers (see :mod:`durable_ai_nats._consumer`): a process has one live
consumer per stream for up to ``feed_subjects`` followed sessions, whatever the number of readers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import DEFAULT_PENDING_SIZE
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, PubAck, StorageType, StreamConfig, StreamConsumerLimits, StreamInfo
from nats.js.kv import KeyValue
from nats.js.manager import JetStreamManager

from durable_ai.backend import (
    BackendLimits,
    Channel,
    ChannelKind,
    LogPosition,
    OpenCount,
    Outgoing,
    PresenceEntry,
    PresenceKeeper,
    PresenceRole,
    StoredMessage,
    Tap,
    cancel_and_wait,
    follow_log,
    pack_snapshot,
    retry_call,
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
)

from ._consumer import Backlog, ConsumerLimitReached, ConsumerSpec, Delivered, FeedGroup
from ._replies import Replies

__all__ = ["NatsBackend", "NatsOptions", "PendingBufferFull", "from_url", "names"]

logger = logging.getLogger("durable_ai_nats")
T = TypeVar("T")

_HEADER_ROOM = 1024
_MAX_PENDING_ACKS = 4000
_KV_OPERATION = "KV-Operation"
_MSG_ID = "Nats-Msg-Id"
# Sessions whose events subject a backend keeps made (a message sent ahead looks it up instead of formatting it).
_SUBJECTS_KEPT = 4096
_PLAIN_ACK = re.compile(rb'\{"stream":"[^"\\]*","seq":(\d{1,19})\}')
_ROLE_TOKEN: dict[PresenceRole, str] = {"agent": "a", "client": "c"}
_TOKEN_ROLE: dict[str, PresenceRole] = {"a": "agent", "c": "client"}
_MAX_CONSUMERS_CODE = 10026
_WRONG_LAST_SEQUENCE = 10071
_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"


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
_TIMEOUTS = (TimeoutError, nats.errors.TimeoutError)


class PendingBufferFull(BackendUnavailable):
    """The connection's outgoing buffer or the number of unacknowledged publishes is at its limit.

    Raised instead of dropping a message while the server is unreachable; the hub's writer keeps the events
    buffered and tries again.
    """


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """What the backend creates on first use, and how it talks to the server.

    Attributes:
        prefix: the first subject token; names the streams (upper-cased) and the KV buckets.
        replicas: replicas of the streams and buckets (3 in a 3-node cluster).
        storage: ``file`` or ``memory``.
        max_age: seconds a message is kept (``None``: forever).
        max_messages: messages kept per session log; older ones are dropped (``None``: no limit).
        max_bytes: bytes kept by each stream (``None``: no limit).
        max_message_bytes: the largest message written; larger events are fragmented by the hub.
        duplicate_window: seconds during which a re-published message id is recognised.
        control_ttl: seconds a control message is kept, with a per-message TTL (NATS 2.11+; ``None``: as events).
        presence_ttl: seconds a presence entry lives without a refresh (refreshed every third of it).
        publish_timeout: seconds one publish is retried before :class:`~durable_ai.errors.BackendUnavailable`.
        connect_timeout: seconds ``open`` tries to reach a server before ``BackendUnavailable``.
        heartbeat: idle heartbeat of consumers, seconds; a consumer silent for three is read again.
        ping_interval: seconds between the connection's pings; ``max_outstanding_pings`` unanswered ones
            mark it dead and reconnect (a request that times out checks the connection at once too).
        max_outstanding_pings: see ``ping_interval``.
        tap_limit: messages a live reader may fall behind before it goes back to reading the backlog.
        tap_bytes: bytes a live reader may fall behind before it goes back to reading the backlog.
        feed_subjects: sessions one live consumer follows (a process following more has more consumers).
        max_consumers: the consumer limit of each stream this backend creates.
        consumer_idle: seconds a consumer nobody listens to stays on the server (the streams' limit for every
            consumer, including any a client creates).
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
    ping_interval: float = 5.0
    max_outstanding_pings: int = 2
    tap_limit: int = 10_000
    tap_bytes: int = 8 * 1024 * 1024
    feed_subjects: int = 100
    max_consumers: int = 10_000
    consumer_idle: float = 30.0
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
        for name in _SECONDS_OPTIONS:
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be positive")
        for name in ("tap_limit", "tap_bytes", "feed_subjects", "max_consumers", "max_outstanding_pings"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1")
        if self.consumer_idle < self.heartbeat * 3:
            raise ConfigurationError("consumer_idle must be at least three heartbeats")


@dataclass(frozen=True, slots=True)
class Names:
    """The subjects, streams and buckets a prefix uses."""

    prefix: str

    @property
    def stream(self) -> str:
        """The stream of every session's events."""
        return self.prefix.upper().replace("-", "_")

    @property
    def control_stream(self) -> str:
        """The stream of every session's controls (what clients write)."""
        return f"{self.stream}_CONTROL"

    def stream_of(self, kind: ChannelKind) -> str:
        return self.stream if kind == "events" else self.control_stream

    def subject(self, session: str, kind: str) -> str:
        return f"{self.prefix}.{session}.{kind}"

    def epoch_subject(self, kind: ChannelKind) -> str:
        """The subject of a stream's epoch marker (two tokens: never a session's subject)."""
        return f"{self.prefix}._epoch" if kind == "events" else f"{self.prefix}._epoch_control"

    @property
    def snapshots(self) -> str:
        return f"{self.prefix}_snapshots"

    @property
    def presence(self) -> str:
        return f"{self.prefix}_presence"

    def presence_subject(self, session: str, member_id: str, role: PresenceRole) -> str:
        """The KV subject of a member's presence entry: the key says its role and who it is."""
        return f"$KV.{self.presence}.{session}.{_ROLE_TOKEN[role]}.{_member_token(member_id)}"


def _member_token(member_id: str) -> str:
    """A member id as one subject token (base64url without padding; ``_`` for the empty id)."""
    return base64.urlsafe_b64encode(member_id.encode()).decode().rstrip("=") or "_"


def _member_of(token: str) -> str | None:
    if token == "_":
        return ""
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, ValueError):
        return None


def names(prefix: str = "durable_ai") -> Names:
    """The streams, subjects and buckets used for ``prefix``."""
    return Names(NatsOptions(prefix=prefix).prefix)


@dataclass(slots=True)
class _Log:
    """What this process knows of one stream."""

    kind: ChannelKind
    stream: str
    epoch: str | None = None
    msg_ttl: bool = False
    highest_seq: int = 0
    #: how many times the epoch was read from the server
    loads: int = 0
    #: the stream's configuration as its info gave it (``None``: not read; this backend's own options apply)
    limits: StreamConfig | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


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
        self._usage = OpenCount()
        self._closed = False
        self._logs: dict[ChannelKind, _Log] = {
            kind: _Log(kind, self.names.stream_of(kind)) for kind in ("events", "control")
        }
        self._kv: dict[str, KeyValue] = {}
        self._buckets: set[str] = set()
        self._kv_lock = asyncio.Lock()
        self._presence_seen = False
        self._groups: dict[ChannelKind, list[FeedGroup]] = {"events": [], "control": []}
        self._feed_of: dict[str, FeedGroup] = {}
        self._denied: tuple[float, str] | None = None
        self._presence = PresenceKeeper[tuple[str, str, PresenceRole]](
            self._refresh_presence, self.options.presence_ttl / 3
        )
        self._closing: set[asyncio.Task[object]] = set()
        self._probe: asyncio.Task[None] | None = None
        self._limits = BackendLimits(self.options.max_message_bytes, None)
        self._ack_timeout = min(2.0, self.options.publish_timeout)
        self._replies: Replies | None = None
        self._event_subjects: dict[str, str] = {}
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
        await self._usage.open(self._connect)

    async def _connect(self) -> None:
        options: dict[str, Any] = {
            "name": "durable-ai",
            "connect_timeout": 2,
            "reconnect_time_wait": 0.25,
            "max_reconnect_attempts": -1,
            "allow_reconnect": True,
            "ping_interval": self.options.ping_interval,
            "max_outstanding_pings": self.options.max_outstanding_pings,
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
        replies = Replies(nc, timeout=self._ack_timeout, limit=_MAX_PENDING_ACKS, spawn=self._spawn)
        try:
            await replies.open()
        except Exception as exc:  # a connection that may not subscribe to its inbox: publish() still works
            logger.info("publishing ahead is off: %r", exc)
        else:
            self._replies = replies

    async def close(self) -> None:
        if not self._usage.release() or self._nc is None or self._closed:
            return
        nc = self._nc
        # Leave at once rather than linger until presence_ttl: best effort, bounded.
        await self._presence.close(self._leave_entry if nc.is_connected else None)
        self._closed = True
        probe, self._probe = self._probe, None
        for groups in self._groups.values():
            for group in list(groups):
                await group.close()
            groups.clear()
        self._feed_of.clear()
        replies, self._replies = self._replies, None
        if replies is not None:
            await replies.close(HubClosed("the NATS backend closed"))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if probe is not None:
            await cancel_and_wait(probe)
        try:
            await nc.close()
        except OSError as exc:  # flushing what was buffered for a server that went away
            logger.info("NATS connection closed with unsent data: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            logger.info("disconnected from NATS; reconnecting")
        for groups in self._groups.values():
            for group in list(groups):
                group.fail("disconnected from the server")

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

    def _check_alive(self) -> None:
        """A request timed out on a connection that claims to be up: ping it now, and reconnect if it is dead.

        A peer that vanished without a reset (a half-open connection) is otherwise only noticed after
        ``max_outstanding_pings`` ping intervals.
        """
        nc = self._nc
        if nc is None or self._closed or not nc.is_connected or (self._probe is not None and not self._probe.done()):
            return
        self._probe = asyncio.get_running_loop().create_task(self._ping(nc), name="durable-ai-nats ping")

    async def _ping(self, nc: NATS) -> None:
        try:
            await nc.flush(timeout=1)
        except (nats.errors.TimeoutError, TimeoutError):
            if nc.is_connected and not self._closed:
                logger.warning("NATS connection to %s does not answer; reconnecting", nc.connected_url)
                await nc.force_reconnect()
        except Exception as exc:
            logger.debug("connection check failed: %s", exc)

    # -- the streams ---------------------------------------------------------------------------------------

    def stream_config(self, kind: ChannelKind = "events") -> StreamConfig:
        """The stream of a channel kind, as it is created on first use (the options decide its limits)."""
        o = self.options
        subject = "events" if kind == "events" else "control"
        config = StreamConfig(
            name=self.names.stream_of(kind),
            description=f"durable-ai session {subject}",
            subjects=[f"{o.prefix}.*.{subject}", self.names.epoch_subject(kind)],
            max_age=o.max_age,
            max_msgs_per_subject=o.max_messages or -1,
            max_bytes=o.max_bytes or -1,
            max_msg_size=o.max_message_bytes + _HEADER_ROOM,
            storage=StorageType.FILE if o.storage == "file" else StorageType.MEMORY,
            num_replicas=o.replicas,
            duplicate_window=o.duplicate_window,
            allow_direct=True,
            deny_delete=True,
            max_consumers=o.max_consumers,
            consumer_limits=StreamConsumerLimits(inactive_threshold=o.consumer_idle),
        )
        if self._server_at_least(2, 11):
            config = replace(config, allow_msg_ttl=True)  # control TTLs, and an epoch marker that never expires
        return config

    def _server_at_least(self, major: int, minor: int) -> bool:
        version = self._nc.connected_server_version if self._nc is not None else None
        return version is not None and (version.major, version.minor) >= (major, minor)

    async def _epoch(self, kind: ChannelKind, *, refresh: bool = False) -> str:
        """The epoch of a stream, from its marker; a trusted process creates the stream and marker if missing."""
        log = self._logs[kind]
        if log.epoch is not None and not refresh:
            return log.epoch
        asked = log.loads
        async with log.lock:
            if log.epoch is not None and (not refresh or log.loads > asked):
                # Another caller read the marker while this one waited: many readers starting at once (a
                # process following a thousand sessions) share one request.
                return log.epoch
            _, _, jsm = self._parts()
            marker = await self._call(partial(self._read_marker, jsm, kind))
            if marker is None:
                # No marker: a new stream (or none yet). Reading the stream's info needs a trusted credential.
                info = await self._call(partial(self._stream_info, jsm, kind))
                self._use(log, info)
                await self._call(partial(self._write_marker, kind))
            else:
                epoch, log.msg_ttl = marker
                if log.epoch is not None and epoch != log.epoch:
                    logger.warning("stream %s was recreated; cursors of the old one get a reset", log.stream)
                    log.highest_seq = 0
                log.epoch = epoch
            log.loads += 1
            assert log.epoch is not None
            return log.epoch

    async def _read_marker(self, jsm: JetStreamManager, kind: ChannelKind) -> tuple[str, bool] | None:
        try:
            message = await jsm.get_last_msg(self.names.stream_of(kind), self.names.epoch_subject(kind), direct=True)
        except (nats.js.errors.NotFoundError, nats.errors.NoRespondersError):
            return None  # no marker, or no stream (direct gets have no responder)
        try:
            marker = json.loads(message.data or b"")
            return str(marker["epoch"]), bool(marker.get("msg_ttl"))
        except (ValueError, KeyError, TypeError):
            return None

    async def _write_marker(self, kind: ChannelKind) -> None:
        _, js, _ = self._parts()
        log = self._logs[kind]
        assert log.epoch is not None
        data = json.dumps({"epoch": log.epoch, "msg_ttl": log.msg_ttl}).encode()
        headers = {_MSG_ID: f"epoch:{log.epoch}", _EXPECTED_LAST_SUBJECT_SEQ: "0"}
        if log.msg_ttl:
            headers["Nats-TTL"] = "never"  # kept past max_age
        try:
            await js.publish(self.names.epoch_subject(kind), data, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code != _WRONG_LAST_SEQUENCE:  # another process wrote the marker first
                raise

    async def _stream_info(self, jsm: JetStreamManager, kind: ChannelKind) -> StreamInfo:
        stream = self.names.stream_of(kind)
        if kind == "control":
            # The events stream first: one made before controls had a stream of their own still claims them.
            await self._stream_info(jsm, "events")
        try:
            info = await jsm.stream_info(stream)
        except nats.js.errors.NotFoundError:
            try:
                info = await jsm.add_stream(self.stream_config(kind))
                logger.info("created stream %s", stream)
                return info
            except nats.js.errors.BadRequestError:
                info = await jsm.stream_info(stream)  # created by another process meanwhile
        return await self._fit(jsm, info, self.stream_config(kind))

    async def _fit(self, jsm: JetStreamManager, info: StreamInfo, wanted: StreamConfig) -> StreamInfo:
        """Bring what the backend relies on in an existing stream to what it needs, and leave the rest alone.

        Subjects, direct gets, message TTLs, no rollups and the consumer limits are needed for correctness and
        for what clients may do; retention, replicas and storage are the operator's (a warning names any
        difference, see :meth:`_use`).
        """
        have = info.config
        changes: dict[str, Any] = {}
        if sorted(have.subjects or []) != sorted(wanted.subjects or []):
            changes["subjects"] = wanted.subjects
        if not have.allow_direct:
            changes["allow_direct"] = True
        if wanted.allow_msg_ttl and not have.allow_msg_ttl:
            changes["allow_msg_ttl"] = True
        if have.allow_rollup_hdrs:
            changes["allow_rollup_hdrs"] = False
        if have.max_consumers in (None, -1):
            changes["max_consumers"] = wanted.max_consumers
        if have.consumer_limits is None or not have.consumer_limits.inactive_threshold:
            changes["consumer_limits"] = wanted.consumer_limits
        if not changes:
            return info
        logger.warning("stream %s exists without what this backend needs; changing %s", have.name, changes)
        return await jsm.update_stream(replace(have, **changes))

    def _use(self, log: _Log, info: StreamInfo) -> None:
        created = info.created
        epoch = format(int(created.timestamp() * 1_000_000), "x") if created is not None else "0"
        if log.epoch is not None and epoch != log.epoch:
            logger.warning("stream %s was recreated; cursors of the old one get a reset", log.stream)
            log.highest_seq = 0
        log.epoch = epoch
        log.msg_ttl = bool(info.config.allow_msg_ttl)
        log.limits = info.config
        wanted = self.stream_config(log.kind)
        for attr in ("num_replicas", "max_msgs_per_subject", "max_age", "storage", "max_consumers"):
            have, want = getattr(info.config, attr), getattr(wanted, attr)
            if have != want and not (attr == "max_age" and not have and not want):
                logger.warning("stream %s exists with %s=%s, not %s; using it as it is", log.stream, attr, have, want)

    async def _call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run one request with retries on timeouts and disconnects, for up to ``publish_timeout``.

        A request the server refused for lack of permission is not retried: the server answers it with an
        asynchronous error and no reply, so the timeout that follows is turned into ``PermissionDenied``. A
        timeout on a connection that claims to be up checks the connection at once (see :meth:`_check_alive`).
        """
        started = time.monotonic()

        def retryable(exc: BaseException) -> bool:
            if not isinstance(exc, _RETRYABLE) or self._denied_since(started) is not None:
                return False
            if isinstance(exc, _TIMEOUTS):
                self._check_alive()
            return True

        try:
            return await retry_call(attempt, retryable=retryable, within=self.options.publish_timeout)
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
            if exc.err_code == _MAX_CONSUMERS_CODE:
                raise ConsumerLimitReached(
                    f"JetStream refused a consumer: {exc.description} (raise max_consumers of the streams, or "
                    "follow fewer sessions per process)"
                ) from exc
            raise BackendError(f"JetStream refused the request: {exc}") from exc

    # -- publish -------------------------------------------------------------------------------------------

    async def publish(self, channel: Channel, data: bytes, *, message_id: str) -> LogPosition:
        position = await self._publish(channel, data, message_id, if_empty=False)
        assert position is not None
        return position

    async def publish_opening(self, channel: Channel, opening: bytes, data: bytes, *, message_id: str) -> LogPosition:
        """See :class:`durable_ai.backend.OpensLogs`: the first attempt expects the subject to be empty
        (``Nats-Expected-Last-Subject-Sequence: 0``). JetStream checks that before its duplicate window, so a retry of
        a first message stored already is refused too; the publish of ``data`` alone that follows, under the same
        id, is then a duplicate of the stored message and answers where it is."""
        position = await self._publish(channel, opening + b"\n" + data, message_id, if_empty=True)
        if position is None:
            position = await self._publish(channel, data, message_id, if_empty=False)
            assert position is not None
        return position

    async def _publish(self, channel: Channel, data: bytes, message_id: str, *, if_empty: bool) -> LogPosition | None:
        """Publish (``None``: ``if_empty`` and the subject holds messages, so nothing was stored)."""
        nc, _, jsm = self._parts()
        if len(data) > self._limits.max_message_bytes:
            raise PayloadTooLarge(len(data), self._limits.max_message_bytes)
        log = self._logs[channel.kind]
        if log.epoch is None:
            await self._epoch(channel.kind)
        subject = self.names.subject(channel.session, channel.kind)
        # Scoped to the session: the same id in two sessions is two messages.
        headers = {_MSG_ID: f"{channel.session}:{message_id}"}
        if if_empty:
            headers[_EXPECTED_LAST_SUBJECT_SEQ] = "0"
        # The highest sequence seen when the message went out: acknowledgements of one stream arrive in order, so
        # only an answer lower than that means a recreated stream (later ones may have been handled meanwhile).
        floor = 0

        async def attempt() -> Any:
            nonlocal floor
            floor = log.highest_seq
            if log.epoch is None:
                # The stream went away (deleted by an operator): create it again, as on first use.
                await self._epoch(channel.kind)
            ttl = self.options.control_ttl if channel.kind == "control" and log.msg_ttl else None
            if not nc.is_connected and nc.pending_data_size + len(data) + _HEADER_ROOM > self._pending_limit:
                # nats-py would raise after registering the ack future, which then never resolves: refuse first,
                # and retry (for up to publish_timeout) in case the connection comes back.
                raise _BufferFull
            if self._replies is not None and not self._replies.has_room():
                raise PendingBufferFull(f"{_MAX_PENDING_ACKS} publishes are waiting for their acknowledgement")
            try:
                # Not publish_async: when JetStream refuses a message (over the stream's size limit, say), nats-py
                # raises in its acknowledgement handler and the future is never answered, so a refusal would look
                # like a broker that does not answer, and be retried for ever.
                return await self._js_publish(subject, data, headers, ttl=ttl)
            except nats.js.errors.NoStreamResponseError:
                log.epoch = None
                raise
            except nats.js.errors.APIError as exc:
                if if_empty and exc.err_code == _WRONG_LAST_SEQUENCE:
                    return None
                raise

        ack = await self._call(attempt)
        if ack is None:
            return None
        if ack.duplicate and channel.kind == "events":
            await self._check_duplicate(jsm, log.stream, ack.seq, subject, message_id)
        epoch = log.epoch
        if ack.seq < floor or epoch is None:
            epoch = await self._epoch(channel.kind, refresh=True)
        log.highest_seq = max(log.highest_seq, ack.seq)
        return LogPosition(epoch, str(ack.seq))

    async def send(self, outgoing: Outgoing) -> bool:
        """Publish an events message ahead (see :class:`durable_ai.backend.PublishesAhead`).

        Only the plain case goes this way: connected, the stream known, room for another acknowledgement. What the
        acknowledgement does not settle at once (a duplicate, a refusal, a sequence lower than one seen before, no
        answer within the acknowledgement timeout) is reported as an error, and the writer's full ``publish`` of
        the same message, under the same id, deals with it.
        """
        ahead = self._ahead(outgoing)
        return False if ahead is None else await ahead

    def _ahead(self, outgoing: Outgoing, *, answer_refusal: bool = False) -> Coroutine[Any, Any, bool] | None:
        """The publish that sends ``outgoing`` ahead, or ``None`` when it may not go that way now."""
        nc, replies, channel = self._nc, self._replies, outgoing.channel
        log = self._logs["events"]
        if (
            nc is None
            or replies is None
            or self._closed
            or channel.kind != "events"
            or log.epoch is None
            or not nc.is_connected
            or not replies.has_room()
            or len(outgoing.data) > self._limits.max_message_bytes
        ):
            return None
        subject = self._event_subjects.get(channel.session)
        if subject is None:
            if len(self._event_subjects) >= _SUBJECTS_KEPT:
                self._event_subjects.clear()
            subject = self._event_subjects[channel.session] = self.names.subject(channel.session, "events")
        headers = {_MSG_ID: f"{channel.session}:{outgoing.message_id}"}
        answer = partial(self._acknowledged, log, outgoing)
        return replies.publish(subject, outgoing.data, headers, answer, answer_refusal=answer_refusal)

    def _acknowledged(
        self, log: _Log, outgoing: Outgoing, reply: Msg | BaseException
    ) -> Coroutine[Any, Any, bool] | None:
        """Tell the writer where its message landed, or why that is not settled by the acknowledgement alone, and
        return the publish of the next message it hands back."""
        result: LogPosition | BaseException | None
        if isinstance(reply, BaseException):
            if isinstance(reply, TimeoutError):
                self._check_alive()
            result = reply
        elif reply.headers and reply.headers.get("Status") == "503":
            log.epoch = None  # no stream answered: create it again, as on first use
            result = BackendUnavailable("no JetStream stream answered")
        else:
            # The plain acknowledgement of the next sequence, without a JSON decoder; anything else (a duplicate, an
            # error) goes the long way.
            plain = _PLAIN_ACK.fullmatch(reply.data)
            seq = int(plain[1]) if plain is not None else -1
            epoch = log.epoch
            if seq < max(log.highest_seq, 1) or epoch is None:
                result = BackendError(f"JetStream answered {reply.data[:200]!r}")
            else:
                log.highest_seq = seq
                result = LogPosition(epoch, str(seq)) if outgoing.wants_position else None
        then = outgoing.landed(result)
        if then is None:
            return None
        # Sent from here, in the reply subscription's task: no writer task wakes per message.
        ahead = self._ahead(then, answer_refusal=True)
        if ahead is None:
            then.landed(BackendUnavailable("the next message could not be sent ahead"))
        return ahead

    async def _js_publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, *, ttl: float | None = None
    ) -> PubAck:
        """Publish to a stream and wait for the acknowledgement, raising what ``js.publish`` raises.

        The acknowledgement comes back through the connection's reply subscription (see :mod:`._replies`): no
        request with its own inbox token and timer each. A refusal is raised as nats-py's ``APIError``; no answer
        within the acknowledgement timeout is ``TimeoutError``.
        """
        _, js, _ = self._parts()
        if ttl is not None:
            headers = {**(headers or {}), "Nats-TTL": str(int(ttl))}
        reply = await self._ask(subject, data, headers)
        if reply is None:
            return await js.publish(subject, data, headers=headers)
        if reply.headers and reply.headers.get("Status") == "503":
            raise nats.js.errors.NoStreamResponseError
        plain = _PLAIN_ACK.fullmatch(reply.data)
        if plain is not None:
            return PubAck(stream="", seq=int(plain[1]))
        answer_json = json.loads(reply.data)
        if "error" in answer_json:
            nats.js.errors.APIError.from_error(answer_json["error"])
        return PubAck.from_response(answer_json)

    async def _ask(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Msg | None:
        """Send a request through the connection's reply subscription and wait for its answer (``None``: there is
        no room for another, or nats-py would not send it; make an ordinary request instead).

        Raises ``TimeoutError`` when no answer comes within the acknowledgement timeout. A request of nats-py's
        has an inbox token, a future and ``wait_for`` each; this has a callback under a counter token.
        """
        replies = self._replies
        return None if replies is None else await replies.request(subject, data, headers)

    async def _check_duplicate(self, jsm: JetStreamManager, stream: str, seq: int, subject: str, mid: str) -> None:
        """A duplicate ack names the message stored first under the id: it must be on the same subject."""
        try:
            stored = await self._call(lambda: jsm.get_msg(stream, seq, direct=True))
        except nats.js.errors.NotFoundError:
            return  # gone since (retention): nothing to compare with
        if stored.subject != subject:
            raise BackendError(f"message id {mid!r} is already used by another subject; the message was not stored")

    # -- read ----------------------------------------------------------------------------------------------

    async def read(self, channel: Channel, *, start: LogPosition | None, follow: bool) -> AsyncIterator[StoredMessage]:
        self._parts()
        kind = channel.kind
        subject = self.names.subject(channel.session, kind)
        if start is not None and start.position is not None and not start.position.isdigit():
            raise LogReset(f"{start.position!r} is not a position of this log")
        first = int(start.position) if start is not None and start.position is not None else None
        # One marker request per read, not per message: a stream recreated by another process since this one
        # last looked must reset old cursors, and only the server knows. A catch-up read from a position also
        # asks for the subject's last message at once: when that is the message at the position (a late joiner
        # after a snapshot saved at the end), it is the whole read, and no consumer is made.
        last: StoredMessage | None = None
        if first is not None and not follow:
            epoch, last = await asyncio.gather(self._epoch(kind, refresh=True), self._last_message(kind, subject))
        else:
            epoch = await self._epoch(kind, refresh=True)
        if start is not None and start.epoch != epoch:
            raise LogReset("the session's log was recreated (the NATS stream is a new one)")
        if last is not None and int(last.position) == first:
            yield StoredMessage(epoch, last.position, last.data)
            return
        groups: dict[Tap, FeedGroup] = {}

        async def attach() -> Tap:
            group = await self._group_for(kind, subject, epoch)
            tap = await group.attach(subject)
            groups[tap] = group
            return tap

        def detach(tap: Tap) -> None:
            group = groups.pop(tap, None)
            if group is not None:
                group.detach(subject, tap)

        messages = follow_log(
            start=start,
            follow=follow,
            backlog=partial(self._backlog, kind, subject, epoch, peek=follow),
            attach=attach,
            detach=detach,
            order=int,
        )
        try:
            async for message in messages:
                yield message
        finally:
            await messages.aclose()  # type: ignore[attr-defined]

    async def _backlog(
        self, kind: ChannelKind, subject: str, epoch: str, start: LogPosition | None, *, peek: bool = False
    ) -> AsyncIterator[StoredMessage]:
        """What the subject holds from ``start`` (inclusive), checking that nothing goes missing while it reads.

        With ``peek`` (a follower, whose live feed is attached already), the subject's last message is asked for
        first: when it is the message at ``start``, or there is none and the read is from the earliest, that is the
        whole backlog, and no consumer is made (a run's control loop, or a follower of a quiet session).
        """
        nc, _, jsm = self._parts()
        stream = self.names.stream_of(kind)
        first = int(start.position) if start is not None and start.position is not None else None
        if peek:
            last = await self._last_message(kind, subject)
            if last is None and first is None:
                return
            if last is not None and int(last.position) == first:
                yield StoredMessage(epoch, last.position, last.data)
                return
        spec = (
            ConsumerSpec(stream, (subject,), DeliverPolicy.BY_START_SEQUENCE, first)
            if first is not None
            else ConsumerSpec(stream, (subject,), DeliverPolicy.ALL)
        )
        backlog = Backlog(nc, jsm, spec, self.options.heartbeat)
        opening: Delivered | None = None
        count = 0
        try:
            total = await self._call(backlog.open)
            if first is not None and total == 0:
                raise LogReset("the message at the cursor is no longer retained")
            while (item := await backlog.next()) is not None:
                if opening is None:
                    if first is not None and item.seq != first:
                        raise LogReset("the message at the cursor is no longer retained")
                    opening = item
                count += 1
                if backlog.remaining == 0:
                    await backlog.close()  # before the last yield: a reader that stops here holds none
                    if (
                        count > 1
                        and self._retention_may_have_struck(kind, opening, count, item.pending)
                        and not await self._still_first(stream, subject, opening.seq)
                    ):
                        raise LogReset("retention removed messages of the session while they were read")
                yield StoredMessage(epoch, str(item.seq), item.data)
        finally:
            await backlog.close()

    def _retention_may_have_struck(self, kind: ChannelKind, opening: Delivered, count: int, pending: int) -> bool:
        """Whether the stream's limits could have removed a message of a backlog pass before it was read.

        Retention removes a subject's oldest messages first: to remove one after the pass's first message, the
        per-subject limit needs that many newer messages (read in the pass, or pending after it), and the age limit
        a first message near its age. A limit on the stream's bytes can strike at any time.
        """
        limits = self._logs[kind].limits or self.stream_config(kind)
        if limits.max_bytes not in (None, -1):
            return True
        per_subject = limits.max_msgs_per_subject
        if per_subject not in (None, -1) and count + pending >= per_subject - 1:
            return True
        if limits.max_age:
            age = time.time() - opening.stored_ns / 1e9
            return age > limits.max_age - 3 * self.options.publish_timeout
        return False

    async def _still_first(self, stream: str, subject: str, seq: int) -> bool:
        """Whether the message at ``seq`` is still retained (retention removes a subject's oldest messages first,
        so if it is, no message after it was removed while a read went from it to the end)."""
        nc, _, jsm = self._parts()
        spec = ConsumerSpec(stream, (subject,), DeliverPolicy.BY_START_SEQUENCE, seq)
        probe = Backlog(nc, jsm, spec, self.options.heartbeat)
        try:
            if await self._call(probe.open) == 0:
                return False
            item = await probe.next()
            return item is not None and item.seq == seq
        finally:
            self._spawn(probe.close())

    async def _group_for(self, kind: ChannelKind, subject: str, epoch: str) -> FeedGroup:
        """The live consumer group that serves ``subject`` (joining one with room, or starting one)."""
        group = self._feed_of.get(subject)
        if group is not None and not group.broken and group.epoch == epoch:
            return group
        nc, _, jsm = self._parts()
        groups = self._groups[kind]
        group = next((g for g in groups if g.has_room() and g.epoch == epoch), None)
        if group is None:
            group = FeedGroup(
                nc,
                jsm,
                self.names.stream_of(kind),
                epoch,
                heartbeat=self.options.heartbeat,
                capacity=self.options.feed_subjects,
                tap_messages=self.options.tap_limit,
                tap_bytes=self.options.tap_bytes,
                call=self._call,
                on_done=self._group_done,
                on_quiet=self._check_alive,
            )
            groups.append(group)
        self._feed_of[subject] = group
        return group

    def _group_done(self, group: FeedGroup) -> None:
        for groups in self._groups.values():
            if group in groups:
                groups.remove(group)
        for subject in [s for s, g in self._feed_of.items() if g is group]:
            del self._feed_of[subject]
        self._spawn(group.close())

    def _spawn(self, work: Coroutine[Any, Any, object]) -> None:
        """Clean-up that must not hold up the caller; close() waits for it."""
        task = asyncio.get_running_loop().create_task(work, name="durable-ai-nats cleanup")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def head(self, channel: Channel) -> LogPosition | None:
        kind = channel.kind
        epoch = await self._epoch(kind)
        message = await self._last_message(kind, self.names.subject(channel.session, kind))
        return None if message is None else LogPosition(self._logs[kind].epoch or epoch, message.position)

    async def _last_message(self, kind: ChannelKind, subject: str) -> StoredMessage | None:
        """The last message stored on ``subject`` (its ``epoch`` is left empty), or ``None``."""
        self._parts()
        log = self._logs[kind]

        async def last() -> StoredMessage | None:
            try:
                if kind == "events":
                    return await self._last_direct(log.stream, subject)
                # Controls are what clients write, headers included: read them through the stream API, whose
                # answer wraps the message, never by direct get, whose answer is the message's own headers (a
                # client's "Status: 503" would pass for the server's).
                return await self._last_wrapped(log.stream, subject)
            except nats.errors.NoRespondersError:
                # Nobody serves direct gets for the stream: JetStream is starting, or the stream was deleted.
                log.epoch = None
                await self._epoch(kind)
                raise

        return await self._call(last)

    async def _last_by_nats_py(self, stream: str, subject: str, *, direct: bool) -> StoredMessage | None:
        """The last message on ``subject`` by nats-py's own request (no reply subscription, or no room in it)."""
        _, _, jsm = self._parts()
        try:
            found = await jsm.get_last_msg(stream, subject, direct=direct)
        except nats.js.errors.NotFoundError:
            return None
        return StoredMessage("", str(found.seq), found.data or b"")

    async def _last_direct(self, stream: str, subject: str) -> StoredMessage | None:
        """The last message on ``subject`` by direct get, which answers with the message itself."""
        reply = await self._ask(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"")
        if reply is None:
            return await self._last_by_nats_py(stream, subject, direct=True)
        headers = reply.headers or {}
        status = headers.get("Status")
        if status == "404":
            return None
        if status == "503":
            raise nats.errors.NoRespondersError
        sequence = headers.get("Nats-Sequence", "")
        if status is not None or not sequence.isdigit():
            raise BackendError(f"JetStream answered a direct get with {status} {headers.get('Description', '')}")
        return StoredMessage("", sequence, reply.data)

    async def _last_wrapped(self, stream: str, subject: str) -> StoredMessage | None:
        """The last message on ``subject`` through the stream API, whose answer wraps the message in JSON (only its
        sequence and data are decoded: the stored headers are a client's business)."""
        request = json.dumps({"last_by_subj": subject}).encode()
        reply = await self._ask(f"$JS.API.STREAM.MSG.GET.{stream}", request)
        if reply is None:
            return await self._last_by_nats_py(stream, subject, direct=False)
        if reply.headers and reply.headers.get("Status") == "503":
            raise nats.js.errors.ServiceUnavailableError
        answer = json.loads(reply.data)
        if "error" in answer:
            if answer["error"].get("code") == 404:
                return None
            nats.js.errors.APIError.from_error(answer["error"])
        message = answer["message"]
        return StoredMessage("", str(int(message["seq"])), base64.b64decode(message.get("data") or ""))

    async def delete(self, session: str) -> None:
        _, _, jsm = self._parts()
        kinds: tuple[ChannelKind, ...] = ("events", "control")
        for kind in kinds:
            await self._epoch(kind)
            subject = self.names.subject(session, kind)
            await self._call(partial(jsm.purge_stream, self.names.stream_of(kind), subject=subject))
            group = self._feed_of.get(subject)
            if group is not None:
                group.fail_subject(subject, "the session was deleted")
        for bucket in (self.names.snapshots, self.names.presence):
            await self._bucket(bucket)
            await self._call(partial(self._purge_prefix, bucket, session))
        self._presence.forget(lambda key: key[0] == session)

    # -- KV: snapshots and presence ------------------------------------------------------------------------

    async def _bucket(self, name: str) -> None:
        """Make sure a bucket exists (trusted processes create it on first use)."""
        if name in self._buckets:
            return
        _, js, jsm = self._parts()
        async with self._kv_lock:
            if name not in self._buckets:
                if name == self.names.presence:
                    await self._call(partial(self._presence_stream, jsm))
                else:
                    self._kv[name] = await self._call(lambda: self._open_bucket(js, name))
                self._buckets.add(name)

    async def _open_bucket(self, js: JetStreamContext, name: str) -> KeyValue:
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            pass
        try:
            return await js.create_key_value(
                bucket=name,
                history=1,
                ttl=self.options.max_age,
                storage=StorageType.FILE if self.options.storage == "file" else StorageType.MEMORY,
                replicas=self.options.replicas,
                direct=True,
            )
        except nats.js.errors.BadRequestError:
            return await js.key_value(name)

    def presence_config(self) -> StreamConfig:
        """The presence bucket's stream: a KV bucket without rollups, so no client can wipe other entries."""
        o, bucket = self.options, self.names.presence
        return StreamConfig(
            name=f"KV_{bucket}",
            description="durable-ai presence",
            subjects=[f"$KV.{bucket}.>"],
            max_msgs_per_subject=1,
            max_age=o.presence_ttl,
            max_msg_size=16 * 1024,
            storage=StorageType.FILE if o.storage == "file" else StorageType.MEMORY,
            num_replicas=o.replicas,
            allow_rollup_hdrs=False,
            deny_delete=True,
            allow_direct=True,
            duplicate_window=min(o.duplicate_window, o.presence_ttl),
            max_consumers=o.max_consumers,
            consumer_limits=StreamConsumerLimits(inactive_threshold=o.consumer_idle),
        )

    async def _presence_stream(self, jsm: JetStreamManager) -> None:
        config = self.presence_config()
        try:
            info = await jsm.stream_info(config.name or "")
        except nats.js.errors.NotFoundError:
            try:
                await jsm.add_stream(config)
                return
            except nats.js.errors.BadRequestError:
                info = await jsm.stream_info(config.name or "")  # created by another process meanwhile
        # A bucket made as a plain KV bucket lets any writer roll up (wipe) the whole bucket: turn that off.
        await self._fit(jsm, info, config)

    async def _purge_prefix(self, bucket: str, session: str) -> None:
        _, _, jsm = self._parts()
        await jsm.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{session}")
        await jsm.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{session}.>")

    async def _latest(self, bucket: str, filter_subject: str) -> dict[str, Delivered]:
        """The newest value of every key under a subject filter, read through a consumer (not KV watch)."""
        nc, _, jsm = self._parts()
        spec = ConsumerSpec(f"KV_{bucket}", (filter_subject,), DeliverPolicy.LAST_PER_SUBJECT)
        backlog = Backlog(nc, jsm, spec, self.options.heartbeat)
        found: dict[str, Delivered] = {}

        async def open_backlog() -> bool:
            try:
                await backlog.open()
            except nats.js.errors.NotFoundError:
                return False  # no bucket yet: nobody was ever present
            return True

        try:
            if not await self._call(open_backlog):
                return found
            while (item := await backlog.next()) is not None:
                found[item.subject] = item
        finally:
            await backlog.close()
        return found

    async def _kv_get(self, bucket: str, key: str) -> bytes | None:
        """A key's value by direct get (what a client credential may read), ``None`` if absent or deleted.

        No responder means no bucket yet (or JetStream starting): a snapshot that cannot be read is only slower
        (the reader replays the log), never wrong.
        """
        _, _, jsm = self._parts()
        try:
            message = await jsm.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{key}", direct=True)
        except (nats.js.errors.NotFoundError, nats.errors.NoRespondersError):
            return None
        if message.headers and message.headers.get(_KV_OPERATION) in ("DEL", "PURGE"):
            return None
        return message.data or b""

    async def load_snapshot(self, session: str) -> bytes | None:
        bucket = self.names.snapshots
        head = await self._call(partial(self._kv_get, bucket, session))
        if head is None:
            return None
        chunks = []
        for index in range(snapshot_chunk_count(head)):
            chunk = await self._call(partial(self._kv_get, bucket, f"{session}.{index}"))
            if chunk is None:
                return None  # a newer snapshot is being written; the caller replays instead
            chunks.append(chunk)
        return unpack_snapshot(head, chunks)

    async def save_snapshot(self, session: str, data: bytes) -> None:
        await self._bucket(self.names.snapshots)
        kv = self._kv[self.names.snapshots]
        chunks, head = pack_snapshot(data, self._limits.max_message_bytes)
        for index, chunk in enumerate(chunks):
            await self._call(partial(kv.put, f"{session}.{index}", chunk))
        await self._call(lambda: kv.put(session, head))

    async def enter_presence(self, session: str, member_id: str, data: bytes, *, role: PresenceRole) -> None:
        await self._put_presence((session, member_id, role), data)
        self._presence.entered((session, member_id, role), data)

    async def _put_presence(self, key: tuple[str, str, PresenceRole], data: bytes) -> None:
        self._parts()
        subject = self.names.presence_subject(*key)
        bucket = self.names.presence

        async def attempt() -> None:
            try:
                await self._js_publish(subject, b"p" + data)
            except nats.js.errors.NoStreamResponseError:
                if bucket in self._buckets:
                    raise
                # No bucket yet: create it (a trusted credential; a client's attempt is PermissionDenied).
                await self._bucket(bucket)
                await self._js_publish(subject, b"p" + data)
            self._presence_seen = True  # a later leave that finds no stream is JetStream being away

        await self._call(attempt)

    async def _refresh_presence(self, key: tuple[str, str, PresenceRole], data: bytes) -> None:
        await self._put_presence(key, data)

    async def _leave_entry(self, key: tuple[str, str, PresenceRole]) -> None:
        self._parts()
        subject = self.names.presence_subject(*key)

        async def attempt() -> None:
            try:
                await self._js_publish(subject, b"", {_KV_OPERATION: "DEL"})
            except nats.js.errors.NoStreamResponseError:
                if self._presence_seen or self.names.presence in self._buckets:
                    raise  # the bucket exists: JetStream is away for now
                # No bucket was ever seen here: nothing to leave (entering failed before it was made).

        await self._call(attempt)

    async def leave_presence(self, session: str, member_id: str, *, role: PresenceRole) -> None:
        self._presence.left((session, member_id, role))
        await self._leave_entry((session, member_id, role))

    async def presence(self, session: str) -> list[PresenceEntry]:
        bucket = self.names.presence
        latest = await self._latest(bucket, f"$KV.{bucket}.{session}.>")
        entries: list[PresenceEntry] = []
        for subject, item in latest.items():
            if item.headers and item.headers.get(_KV_OPERATION) in ("DEL", "PURGE"):
                continue
            tokens = subject.split(".")
            if len(tokens) != 5 or not item.data.startswith(b"p"):
                continue  # not an entry this backend writes: skipped, never raised
            role = _TOKEN_ROLE.get(tokens[3])
            member = _member_of(tokens[4])
            if role is None or member is None:
                continue
            entries.append(PresenceEntry(member, role, item.data[1:]))
        return entries


def _float(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {value!r}") from None


_INT_OPTIONS = (
    "replicas",
    "max_messages",
    "max_bytes",
    "max_message_bytes",
    "tap_limit",
    "tap_bytes",
    "feed_subjects",
    "max_consumers",
    "max_outstanding_pings",
)
#: integer options where 0 means "no limit" (the others must be positive)
_UNLIMITED_AT_ZERO = ("max_messages", "max_bytes")
_SECONDS_OPTIONS = (
    "duplicate_window",
    "presence_ttl",
    "publish_timeout",
    "connect_timeout",
    "heartbeat",
    "ping_interval",
    "consumer_idle",
)


def from_url(url: str) -> NatsBackend:
    """A backend for ``nats://[user:password@]host:port[,host:port...][?option=value&...]``.

    Options: ``prefix``, ``replicas``, ``storage`` (file|memory), ``max_age`` (seconds, 0: forever),
    ``max_messages`` (per session log, 0: no limit), ``max_bytes``, ``max_message_bytes``, ``duplicate_window``,
    ``control_ttl`` (0: as events), ``presence_ttl``, ``publish_timeout``, ``connect_timeout``, ``heartbeat``,
    ``ping_interval``, ``max_outstanding_pings``, ``tap_limit``, ``tap_bytes``, ``feed_subjects``,
    ``max_consumers``, ``consumer_idle``, and for the connection ``name``, ``token``, ``creds`` (a credentials
    file), ``nkey_seed`` (a seed file), ``inbox_prefix``.
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
        elif key in _INT_OPTIONS:
            number = int(_float(value, key))
            kwargs[key] = None if number <= 0 and key in _UNLIMITED_AT_ZERO else number
        elif key in ("max_age", "control_ttl"):
            seconds = _float(value, key)
            kwargs[key] = seconds if seconds > 0 else None
        elif key in _SECONDS_OPTIONS:
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
