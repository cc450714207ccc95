"""An offline emulator of the part of Ably's realtime (WebSocket) and REST protocols that ably-python 3.x uses.

It binds 127.0.0.1 on a free port and speaks protocol versions 2 to 6 in JSON or msgpack (ably-python 3.x asks for
5, ably-js 2.20 and later for 6, whose changes are all in LiveObjects, not emulated). Point a client at it with
`AblyEmulator.client_options()`: ably-python builds its WebSocket address as ``ws://{host}?...`` and ignores the
`port` option there, while its REST address is ``http://{host}:{port}{path}``; the endpoint ``127.0.0.1:PORT/`` serves
both (the REST base becomes ``http://127.0.0.1:PORT/:80`` and every REST path is absolute, so it replaces ``/:80``).
ably-python refuses basic (API key) auth over plain HTTP, so the options ask for token auth: the client signs a token
request with the key and posts it to ``/keys/{keyName}/requestToken``, which the emulator verifies and answers.

Auth as Ably does it: a signed TokenRequest needs the right mac, a timestamp within 2 minutes, a nonce of 16
characters or more not used before; its token gets the requested capability narrowed to the key's. Ably JWTs (HS256,
``kid`` the key's name, claims ``iat``, ``exp``, ``x-ably-capability`` and optionally ``x-ably-clientId``) are
accepted wherever tokens are: the ``access_token`` (ably-js) or ``accessToken`` (ably-python) query parameter of a
realtime connection, AUTH, and ``Authorization: Bearer`` (the token or its base64) over REST. They are checked
against the named key's secret and expiry, and get their capability narrowed to the key's and their clientId. JWTs
that embed an Ably token (``x-ably-token``) are not emulated.

What it does: API keys with capabilities, token requests and tokens (capability = key ∩ requested), CONNECTED with
connection details and resume of a known connection key, HEARTBEAT, ATTACH/ATTACHED with ``params.rewind`` and
channel-serial resume, DETACH, MESSAGE publish with ACK (``res`` serials) or NACK, delivery to every attached
connection, AUTH, CLOSE/CLOSED, server DISCONNECTED, idempotent publishing by message id, REST publish, history with
``Link`` pagination, batch publish (``POST /messages``, one ``BatchResult`` per spec), time and token requests,
capability checks everywhere. As on Ably, several messages published together either have no ids or ids
``<base>:<index>`` sharing one base (40031 otherwise). Fault hooks: `drop_connections`,
`disconnect_connections`, `fail_next_rest`, `nack_next`.

Presence: PRESENCE (enter/update/leave, ACKed, broadcast to every attached connection with ``subscribe``; entering
needs the ``presence`` capability and a clientId), the presence set in SYNC messages after an ATTACHED with the
HAS_PRESENCE flag (``channelSerial`` ``<syncId>:<cursor>``, the last with an empty cursor), ``GET
/channels/{name}/presence`` with ``Link`` pagination, and synthesized leaves when a connection closes, detaches or
drops (after ``presence_leave_delay`` seconds, default 0; Ably waits about 15 s for a resume).

Mutable messages, on channels whose namespace is in ``mutable_namespaces``: a MESSAGE (or ``PATCH
/channels/{name}/messages/{serial}``) whose message has ``action`` 1 (update), 2 (delete) or 5 (append) and the
``serial`` of a stored message changes it and gets the new version serial back (ACK ``res`` serials, or
``{"versionSerial"}``). Subscribers get the operation as a message with the original ``serial`` and a new
``version.serial``; an append carries only the appended fragment, while history and ``GET
/channels/{name}/messages/{serial}`` give the aggregate (action 1, update). Resumed attachments replay the operations
they missed. Elsewhere operations fail with 93002 (400), as on Ably without the "Message annotations, updates,
deletes and appends" channel rule; they need ``message-update-own``/``-any`` (``message-delete-...`` for deletes).

Statistics (not an Ably API; for tests and benchmarks): `channel_stats` counts the messages each channel stored, by
kind (creates, and update, delete and append operations, which Ably bills and rate-limits like messages), with the
peak over any 1-second sliding window; `connection_stats` does the same for the messages each realtime connection
published (its inbound rate). With ``enforce_rate_limits=True`` publishes beyond Ably's default limits (50 messages
per second per channel, 50 inbound per connection) are refused with 42913 or 42911 (429), as Ably refuses them.

Not emulated: presence history, annotations, message version history (``.../versions``), deltas, channel globs other
than ``*`` and a trailing ``*``, connection recovery (``recover``), Ably's stats API, push, batch presence.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import json
import re
import secrets
import socket
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import quote, urlencode

import jwt
import msgpack  # type: ignore[import-untyped]
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

__all__ = ["AblyEmulator", "EmulatorKey", "MessageStats", "StoredMessage"]

Capability = dict[str, list[str]]

# Protocol message actions (ably/transport/websockettransport.py ProtocolMessageAction).
HEARTBEAT, ACK, NACK, CONNECT, CONNECTED, DISCONNECT, DISCONNECTED = 0, 1, 2, 3, 4, 5, 6
CLOSE, CLOSED, ERROR, ATTACH, ATTACHED, DETACH, DETACHED, PRESENCE, MESSAGE = 7, 8, 9, 10, 11, 12, 13, 14, 15
SYNC, AUTH = 16, 17

# Message actions (ably/types/message.py MessageAction) and presence actions (ably/types/presence.py PresenceAction).
MESSAGE_CREATE, MESSAGE_UPDATE, MESSAGE_DELETE, MESSAGE_APPEND = 0, 1, 2, 5
PRESENCE_ABSENT, PRESENCE_PRESENT, PRESENCE_ENTER, PRESENCE_LEAVE, PRESENCE_UPDATE = 0, 1, 2, 3, 4

# Channel flags (ably/types/flags.py).
FLAG_HAS_PRESENCE = 1 << 0
FLAG_HAS_BACKLOG = 1 << 1
FLAG_RESUMED = 1 << 2
FLAG_PRESENCE = 1 << 16
FLAG_PUBLISH = 1 << 17
FLAG_SUBSCRIBE = 1 << 18
FLAG_PRESENCE_SUBSCRIBE = 1 << 19

_SYNC_PAGE = 100

# The `v` a realtime connection may ask for (none: the latest). ably-python 3.x sends 5, ably-js 2.20 and later 6;
# what 6 changed from 5 is all LiveObjects (object messages and their sync), which the emulator does not emulate.
_PROTOCOL_VERSIONS = (None, "2", "3", "4", "5", "6")

_ALL_OPS = "*"
_TOKEN_TTL_MS = 60 * 60 * 1000
_MAX_TOKEN_TTL_MS = 24 * 60 * 60 * 1000
_TOKEN_REQUEST_WINDOW_MS = 2 * 60 * 1000  # how far a TokenRequest's timestamp may be from the server's clock


class AblyError(Exception):
    """An error the way Ably reports it: an HTTP status, a 5-digit code and a message."""

    def __init__(self, message: str, code: int, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "code": self.code, "statusCode": self.status, "href": _href(self.code)}


def _append_data(
    current: Any, encoding: str | None, fragment: Any, fragment_encoding: str | None
) -> tuple[Any, str | None]:
    """The data of a message after an append: strings and binary concatenate; anything else is refused."""

    def plain(data: Any, enc: str | None) -> tuple[Any, str | None]:
        if enc in (None, "", "utf-8"):
            return data, None
        if enc == "base64" and isinstance(data, str):
            try:
                return base64.b64decode(data), None
            except (binascii.Error, ValueError):
                raise AblyError("Invalid base64 data", 40013, 400) from None
        raise AblyError(f"Unable to append to data with encoding {enc!r}", 40013, 400)

    base, base_enc = plain(current, encoding)
    extra, _ = plain(fragment, fragment_encoding)
    if base is None:
        base = b"" if isinstance(extra, bytes | bytearray) else ""
    if isinstance(base, str) and isinstance(extra, str):
        return base + extra, base_enc
    if isinstance(base, bytes | bytearray) and isinstance(extra, bytes | bytearray):
        return bytes(base) + bytes(extra), base_enc
    raise AblyError("Appended data must have the same type (string or binary) as the message's data", 40013, 400)


def _check_ids(messages: Sequence[Mapping[str, Any]]) -> None:
    """Several messages published together have no ids, or ids ``<base>:<index>`` with one base (Ably's rule)."""
    ids = [m.get("id") for m in messages]
    if len(ids) < 2 or all(i is None for i in ids):
        return
    if any(not isinstance(i, str) or not i for i in ids):
        raise AblyError("Client-specified message id cannot be empty", 40031, 400)
    base = str(ids[0]).rpartition(":")[0]
    if not base or any(i != f"{base}:{index}" for index, i in enumerate(ids)):
        raise AblyError(
            "Client-specified message ids do not match the required format for multi-message ProtocolMessages",
            40031,
            400,
        )


def _href(code: int) -> str:
    return f"https://help.ably.io/error/{code}"


def _query_token(params: Mapping[str, str]) -> str | None:
    """The token in a query string: ``access_token`` as ably-js sends it, or ``accessToken`` (ably-python)."""
    for name in ("access_token", "accessToken"):
        if name in params:
            return params[name]
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)


def parse_capability(value: str | Mapping[str, Sequence[str]] | None) -> Capability:
    """A capability from its JSON text or mapping; None means every operation on every channel."""
    if value is None or value == "":
        return {"*": [_ALL_OPS]}
    raw: Any = json.loads(value) if isinstance(value, str) else value
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, list | tuple) and all(isinstance(op, str) for op in v)
        for k, v in raw.items()
    ):
        raise AblyError("Invalid capability: expected an object of channel names to lists of operations", 40000, 400)
    return {k: sorted(set(v)) for k, v in raw.items()}


def _covers(pattern: str, name: str) -> bool:
    """Whether a capability resource matches a channel name (or a narrower pattern): exact, ``*``, trailing ``*``."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return pattern == name


def _intersect_ops(a: Iterable[str], b: Iterable[str]) -> list[str]:
    sa, sb = set(a), set(b)
    if _ALL_OPS in sa:
        return sorted(sb)
    if _ALL_OPS in sb:
        return sorted(sa)
    return sorted(sa & sb)


def intersect_capabilities(key: Capability, requested: Capability) -> Capability:
    """The capability a token gets: what it asked for, narrowed to what its key allows."""
    result: dict[str, set[str]] = {}
    for req_res, req_ops in requested.items():
        for key_res, key_ops in key.items():
            if _covers(key_res, req_res):
                resource = req_res
            elif _covers(req_res, key_res):
                resource = key_res
            else:
                continue
            ops = _intersect_ops(req_ops, key_ops)
            if ops:
                result.setdefault(resource, set()).update(ops)
    return {res: sorted(ops) for res, ops in result.items()}


def _allows(capability: Capability, channel: str, op: str) -> bool:
    return any(_covers(res, channel) and (_ALL_OPS in ops or op in ops) for res, ops in capability.items())


def _any_op(capability: Capability, channel: str) -> bool:
    return any(_covers(res, channel) and ops for res, ops in capability.items())


def _denied(op: str, channel: str) -> AblyError:
    return AblyError(f"Unable to perform channel operation; {op} not permitted on channel {channel!r}", 40160, 401)


@dataclass(frozen=True)
class EmulatorKey:
    """An API key ``appId.keyId:secret`` and its capability."""

    app_id: str
    key_id: str
    secret: str
    capability: Capability = field(default_factory=lambda: {"*": [_ALL_OPS]})

    @property
    def name(self) -> str:
        return f"{self.app_id}.{self.key_id}"

    @property
    def key(self) -> str:
        """The full key string, as `AblyRest(key=...)` takes it."""
        return f"{self.name}:{self.secret}"

    @classmethod
    def parse(cls, key: str, capability: str | Mapping[str, Sequence[str]] | None = None) -> EmulatorKey:
        name, sep, secret = key.partition(":")
        app_id, dot, key_id = name.partition(".")
        if not (sep and dot and secret and app_id and key_id):
            raise ValueError(f"an Ably key looks like appId.keyId:secret, not {key!r}")
        return cls(app_id, key_id, secret, parse_capability(capability))


@dataclass
class _Credential:
    """Who a request or connection is: a key (basic auth) or a token issued from one."""

    key: EmulatorKey
    capability: Capability
    client_id: str | None
    token: str | None = None
    issued: int = 0
    expires: int | None = None

    def check(self) -> None:
        if self.expires is not None and _now_ms() >= self.expires:
            raise AblyError("Token expired", 40142, 401)

    def token_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "token": self.token,
            "keyName": self.key.name,
            "issued": self.issued,
            "expires": self.expires,
            "capability": json.dumps(self.capability, separators=(",", ":")),
        }
        if self.client_id is not None:
            details["clientId"] = self.client_id
        return details


def _wire_data(data: Any, encoding: str | None, binary: bool) -> tuple[Any, str | None]:
    """Data and encoding as sent to a JSON (``binary=False``) or msgpack client: bytes travel base64 in JSON."""
    if isinstance(data, bytes | bytearray) and not binary:
        return base64.b64encode(data).decode("ascii"), f"{encoding}/base64" if encoding else "base64"
    if binary and isinstance(data, str) and encoding and encoding.split("/")[-1] == "base64":
        with contextlib.suppress(binascii.Error, ValueError):
            return base64.b64decode(data), "/".join(encoding.split("/")[:-1]) or None
    return data, encoding


@dataclass
class StoredMessage:
    """A message as the emulator stored it on a channel (for an updated message: its latest version).

    The same type carries the channel's events (a create, update, delete or append as subscribers receive it); an
    event's `position` is its place in the channel (its version serial), while `serial` names the message it changes.
    """

    channel: str
    serial: str
    id: str
    timestamp: int
    name: str | None = None
    data: Any = None
    encoding: str | None = None
    client_id: str | None = None
    connection_id: str | None = None
    extras: Any = None
    action: int = MESSAGE_CREATE
    #: serial and time of the latest version; None means the message as created (``serial``, ``timestamp``)
    version_serial: str | None = None
    version_timestamp: int | None = None
    #: clientId, description and metadata of the operation that made the latest version
    version_details: dict[str, Any] = field(default_factory=dict)

    @property
    def position(self) -> str:
        """Where this message or event sits in the channel: the serial of its version."""
        return self.version_serial or self.serial

    def wire(self, binary: bool) -> dict[str, Any]:
        """The message as Ably sends it, for a JSON (``binary=False``) or msgpack client."""
        data, encoding = _wire_data(self.data, self.encoding, binary)
        version: dict[str, Any] = {
            "serial": self.position,
            "timestamp": self.version_timestamp if self.version_timestamp is not None else self.timestamp,
        }
        version.update(self.version_details)
        out: dict[str, Any] = {
            "id": self.id,
            "serial": self.serial,
            "timestamp": self.timestamp,
            "action": self.action,
            "version": version,
        }
        for key, value in (
            ("name", self.name),
            ("data", data),
            ("encoding", encoding),
            ("clientId", self.client_id),
            ("connectionId", self.connection_id),
            ("extras", self.extras),
        ):
            if value is not None:
                out[key] = value
        return out


@dataclass
class _Channel:
    name: str
    messages: deque[StoredMessage] = field(default_factory=deque)
    #: serial of the newest message dropped by retention; a resume from before it cannot be continuous
    evicted_upto: str = ""
    #: message id -> (serial, time stored in ms), for idempotent publishing
    ids: dict[str, tuple[str, int]] = field(default_factory=dict)
    sessions: set[_Session] = field(default_factory=set)
    #: every create/update/delete/append as delivered, in channel order (by `position`), for resuming attachments
    log: deque[StoredMessage] = field(default_factory=deque)
    #: current presence members by member key (``connectionId:clientId``)
    members: dict[str, _Member] = field(default_factory=dict)


@dataclass
class _Member:
    """A presence member of a channel: who entered, from which connection, with what data."""

    client_id: str
    connection_id: str
    id: str
    timestamp: int
    data: Any = None
    encoding: str | None = None
    extras: Any = None

    @property
    def key(self) -> str:
        return f"{self.connection_id}:{self.client_id}"

    def wire(self, action: int, binary: bool) -> dict[str, Any]:
        data, encoding = _wire_data(self.data, self.encoding, binary)
        out: dict[str, Any] = {
            "id": self.id,
            "action": action,
            "clientId": self.client_id,
            "connectionId": self.connection_id,
            "timestamp": self.timestamp,
        }
        for key, value in (("data", data), ("encoding", encoding), ("extras", self.extras)):
            if value is not None:
                out[key] = value
        return out


class _Transport:
    """One WebSocket: the writer side queue of protocol messages."""

    def __init__(self, websocket: WebSocket, binary: bool) -> None:
        self.websocket = websocket
        self.binary = binary
        self.outgoing: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        if not self.closed:
            self.outgoing.put_nowait(message)

    def close(self) -> None:
        """Ask the writer to stop (after what is queued) and close the socket normally."""
        if not self.closed:
            self.closed = True
            self.outgoing.put_nowait(None)


class _Session:
    """A realtime connection: it outlives its WebSocket for connectionStateTtl, so a client can resume it."""

    def __init__(self, connection_id: str, credential: _Credential, echo: bool) -> None:
        self.id = connection_id
        self.key = f"{connection_id}!{secrets.token_urlsafe(12)}"
        self.credential = credential
        self.echo = echo
        self.transport: _Transport | None = None
        self.attached: set[str] = set()
        #: msgSerial -> serials it was acknowledged with, so a resent message is acknowledged, not republished
        self.acked: dict[int, list[str | None]] = {}
        self.detached_at: float | None = None

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Session) and other.id == self.id


class _Server(uvicorn.Server):
    """Uvicorn without its signal handlers: the emulator lives inside someone else's program."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class AblyEmulator:
    """An Ably stand-in on 127.0.0.1 for offline tests of code that uses ably-python 3.x.

    Use it as an async context manager; `client_options()` gives the keyword arguments for `AblyRest` and
    `AblyRealtime`.
    """

    def __init__(
        self,
        keys: Mapping[str, str | Mapping[str, Sequence[str]] | None] | None = None,
        *,
        retention_limit: int = 10_000,
        retention_seconds: float | None = None,
        idempotency_window: float = 120.0,
        max_message_size: int = 65536,
        connection_state_ttl_ms: int = 120_000,
        max_idle_interval_ms: int = 15_000,
        presence_leave_delay: float = 0.0,
        mutable_namespaces: Iterable[str] = (),
        enforce_rate_limits: bool = False,
        channel_rate_limit: int = 50,
        connection_rate_limit: int = 50,
        port: int = 0,
    ) -> None:
        """`keys` maps ``appId.keyId:secret`` to its capability (JSON text, a mapping, or None for everything).

        Without keys there is one, ``emu.root:secret``, with every capability. `port` is the loopback port to serve
        on (0: a free one, read back from `port` once started).

        `presence_leave_delay` is how many seconds after a connection drops its presence members leave (Ably waits
        about 15 s for the client to resume; a resume within the delay keeps them). A clean CLOSE, or a DETACH of the
        channel, makes them leave at once. `mutable_namespaces` are the channel namespaces (the part of a channel name
        before its first ``:``, or the whole name if it has none) with the "Message annotations, updates, deletes and
        appends" rule: only there can messages be updated, deleted or appended to.

        With `enforce_rate_limits`, a publish that would take a channel past `channel_rate_limit` messages, or a
        connection past `connection_rate_limit` published messages, in any 1-second window is refused (42913 or 42911,
        429). Either way the counts are kept: see `channel_stats` and `connection_stats`.
        """
        if keys is None:
            keys = {"emu.root:secret": None}
        self.keys: dict[str, EmulatorKey] = {}
        for key_text, capability in keys.items():
            key = EmulatorKey.parse(key_text, capability)
            self.keys[key.name] = key
        self.retention_limit = retention_limit
        self.retention_seconds = retention_seconds
        self.idempotency_window = idempotency_window
        self.max_message_size = max_message_size
        self.connection_state_ttl_ms = connection_state_ttl_ms
        self.max_idle_interval_ms = max_idle_interval_ms
        self.presence_leave_delay = presence_leave_delay
        self.mutable_namespaces = frozenset(mutable_namespaces)

        self._channels: dict[str, _Channel] = {}
        self._tokens: dict[str, _Credential] = {}
        self._nonces: dict[tuple[str, str], int] = {}
        self._sessions: dict[str, _Session] = {}
        self._transports: set[_Transport] = set()
        self._serial_counter = itertools.count(1)
        self._last_ts = 0
        self._instance = secrets.token_hex(4)
        self._base_serial = self._serial_at(0, 0)
        self._fail_rest: list[tuple[int, str | None]] = []
        self._nack: list[tuple[int, int, str]] = []
        self._connection_counter = itertools.count(1)
        self._leave_timers: dict[str, asyncio.TimerHandle] = {}
        self._sync_counter = itertools.count(1)
        self._expire_on_drop: set[str] = set()
        self._refusing = False
        self._synthetic_counter = itertools.count(1)

        self._server: _Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.port = port

        self.enforce_rate_limits = enforce_rate_limits
        self.channel_rate_limit = channel_rate_limit
        self.connection_rate_limit = connection_rate_limit
        self._channel_meters: dict[str, _Meter] = {}
        self._connection_meters: dict[str, _Meter] = {}

    # ----------------------------------------------------------------------------------------------- life cycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind the loopback port (`port`, or a free one when 0) and serve until `close()`."""
        if self._serve_task is not None:
            raise RuntimeError("the emulator is already started")
        # IPPROTO_TCP, not 0: asyncio disables Nagle's algorithm only on accepted sockets whose proto says TCP, and
        # with it on, a frame written right after another (an echo, then its ACK) waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        app = Starlette(
            routes=[
                WebSocketRoute("/", self._websocket),
                Route("/time", self._time, methods=["GET"]),
                Route("/keys/{key_name}/requestToken", self._request_token, methods=["POST"]),
                Route("/messages", self._batch_publish, methods=["POST"]),
                Route("/channels/{channel}/messages", self._channel_messages, methods=["GET", "POST"]),
                Route("/channels/{channel}/messages/{serial}", self._channel_message, methods=["GET", "PATCH"]),
                Route("/channels/{channel}/presence", self._channel_presence, methods=["GET"]),
            ]
        )
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            ws="websockets-sansio",
            ws_ping_interval=None,
            ws_max_size=16 * 1024 * 1024,
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        self._serve_task = asyncio.create_task(self._server.serve(sockets=[sock]), name="ably-emulator")
        while not self._server.started:
            if self._serve_task.done():
                await self._serve_task
                raise RuntimeError("the emulator's server stopped while starting")
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        """Close every connection and stop serving; every task the emulator started is finished on return."""
        for timer in self._leave_timers.values():
            timer.cancel()
        self._leave_timers.clear()
        for transport in list(self._transports):
            transport.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._serve_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._serve_task), 5)
            except TimeoutError:
                if self._server is not None:
                    self._server.force_exit = True
                self._serve_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._serve_task
            self._serve_task = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # --------------------------------------------------------------------------------------------- client side

    @property
    def endpoint(self) -> str:
        """The ably-python ``endpoint`` option that reaches this emulator for both REST and realtime."""
        return f"127.0.0.1:{self.port}/"

    def client_options(self, key: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for `AblyRest`/`AblyRealtime`: token auth signed with `key` (default: the first key)."""
        if key is None:
            key = next(iter(self.keys.values())).key
        options: dict[str, Any] = {
            "key": key,
            "endpoint": self.endpoint,
            "tls": False,
            "use_token_auth": True,
            "use_binary_protocol": False,
            "fallback_hosts": [],
        }
        options.update(overrides)
        return options

    def issue_token(
        self,
        key: str | None = None,
        *,
        capability: str | Mapping[str, Sequence[str]] | None = None,
        client_id: str | None = None,
        ttl_ms: int = _TOKEN_TTL_MS,
    ) -> dict[str, Any]:
        """Issue a token directly, as TokenDetails JSON; an ``auth_callback`` may return it as it is."""
        key_name = (key or next(iter(self.keys.values())).key).partition(":")[0]
        emulator_key = self.keys.get(key_name)
        if emulator_key is None:
            raise KeyError(f"no key named {key_name!r}")
        requested = parse_capability(capability) if capability is not None else emulator_key.capability
        return self._issue(emulator_key, requested, client_id, ttl_ms).token_details()

    # ------------------------------------------------------------------------------------------------ fault hooks

    def drop_connections(self, connection_id: str | None = None, *, expire: bool = False) -> int:
        """Close every WebSocket (or only the one of `connection_id`) at once (close code 1011, no CLOSED).

        Clients see a dropped transport and resume. With `expire`, the connections are forgotten too, as when a
        client stays away longer than connectionStateTtl (2 minutes on Ably): its resume fails with 80008, it gets
        a new connection, and its channels attach again without continuity.
        """
        if expire:
            self._expire_on_drop.update(
                s.id for s in self._sessions.values() if connection_id is None or s.id == connection_id
            )
        count = 0
        only: _Transport | None = None
        if connection_id is not None:
            session = self._sessions.get(connection_id)
            only = session.transport if session is not None else None
            if only is None:
                return 0
        for transport in list(self._transports):
            if only is not None and transport is not only:
                continue
            if not transport.closed:
                transport.closed = True
                transport.outgoing.put_nowait({"__drop__": True})
                count += 1
        return count

    def disconnect_connections(self, error: AblyError | None = None) -> int:
        """Send DISCONNECTED (with an error, which ably-python needs to act on it) and close every WebSocket."""
        error = error or AblyError("Connection disconnected by the emulator", 80003, 400)
        count = 0
        for transport in list(self._transports):
            if not transport.closed:
                transport.send({"action": DISCONNECTED, "error": error.to_dict()})
                transport.close()
                count += 1
        return count

    def refuse_connections(self, refuse: bool = True) -> None:
        """While refusing, WebSocket handshakes fail, as when Ably cannot be reached: clients stay disconnected
        (and become suspended after connectionStateTtl) until it stops. REST is not affected."""
        self._refusing = refuse

    def fail_next_rest(self, status: int = 503, count: int = 1, *, path_prefix: str | None = None) -> None:
        """Answer the next `count` REST requests (whose path starts with `path_prefix`, if given) with `status`."""
        self._fail_rest.extend([(status, path_prefix)] * count)

    @property
    def pending_rest_failures(self) -> int:
        """How many failures asked for with `fail_next_rest` no request has met yet."""
        return len(self._fail_rest)

    def nack_next(self, count: int = 1, *, code: int = 50000, status: int = 500, message: str = "") -> None:
        """NACK the next `count` realtime publishes instead of storing them."""
        self._nack.extend([(code, status, message or "Message rejected by the emulator")] * count)

    # ----------------------------------------------------------------------------------------------- inspection

    def messages(self, channel: str) -> list[StoredMessage]:
        """What is stored on a channel, oldest first (updated messages in their latest version)."""
        ch = self._channels.get(channel)
        return list(ch.messages) if ch else []

    def presence_members(self, channel: str) -> list[tuple[str, str, Any]]:
        """The presence set of a channel as ``(clientId, connectionId, data)``, in the order members entered."""
        ch = self._channels.get(channel)
        return [(m.client_id, m.connection_id, m.data) for m in ch.members.values()] if ch else []

    def is_mutable(self, channel: str) -> bool:
        """Whether the channel's namespace has mutable messages (updates, deletes, appends) enabled."""
        return channel.split(":", 1)[0] in self.mutable_namespaces

    @property
    def connection_count(self) -> int:
        """How many WebSockets are open."""
        return sum(1 for t in self._transports if not t.closed)

    # ------------------------------------------------------------------------------------------------ auth

    def _issue(self, key: EmulatorKey, requested: Capability, client_id: str | None, ttl_ms: int | None) -> _Credential:
        capability = intersect_capabilities(key.capability, requested)
        if not capability:
            raise AblyError("Invalid capability: the intersection with the key's capability is empty", 40160, 401)
        ttl = _TOKEN_TTL_MS if not ttl_ms else int(ttl_ms)
        if ttl <= 0 or ttl > _MAX_TOKEN_TTL_MS:
            raise AblyError("Invalid ttl", 40003, 400)
        issued = _now_ms()
        token = f"{key.app_id}.{secrets.token_urlsafe(24)}"
        credential = _Credential(key, capability, client_id, token, issued, issued + ttl)
        self._tokens[token] = credential
        return credential

    def _token_request(self, key_name: str, body: Mapping[str, Any]) -> _Credential:
        key = self.keys.get(key_name)
        if key is None or body.get("keyName") not in (None, key_name):
            raise AblyError(f"No key found with name {key_name!r}", 40400, 404)
        ttl, capability = body.get("ttl"), body.get("capability")
        client_id, timestamp, nonce, mac = (
            body.get("clientId"),
            body.get("timestamp"),
            body.get("nonce"),
            body.get("mac"),
        )
        if not isinstance(nonce, str) or len(nonce) < 16 or not isinstance(mac, str) or timestamp is None:
            raise AblyError("Invalid token request: nonce, timestamp and mac are required", 40001, 400)
        sign_text = "\n".join(
            str(x) for x in (key_name, ttl or "", capability or "", client_id or "", timestamp or 0, nonce, "")
        )
        expected = base64.b64encode(hmac.new(key.secret.encode(), sign_text.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(expected, mac.encode()):
            raise AblyError("Invalid mac on token request", 40101, 401)
        now = _now_ms()
        if abs(now - int(timestamp)) > _TOKEN_REQUEST_WINDOW_MS:
            raise AblyError("Timestamp not current", 40104, 401)
        self._nonces = {k: t for k, t in self._nonces.items() if now - t < 2 * _TOKEN_REQUEST_WINDOW_MS}
        if (key_name, nonce) in self._nonces:
            raise AblyError("Nonce value replayed", 40105, 401)
        self._nonces[(key_name, nonce)] = now
        requested = parse_capability(capability) if capability else key.capability
        return self._issue(key, requested, client_id, int(ttl) if ttl else None)

    def _credential_for_key(self, key_text: str, client_id: str | None = None) -> _Credential:
        name, _, secret = key_text.partition(":")
        key = self.keys.get(name)
        if key is None or not hmac.compare_digest(key.secret, secret):
            raise AblyError("Invalid key in request", 40101, 401)
        return _Credential(key, key.capability, client_id)

    def _credential_for_token(self, token: str) -> _Credential:
        """The credential of a token or JWT, given as it is or (REST ``Bearer``) base64-encoded."""
        candidates = [token]
        with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
            candidates.append(base64.b64decode(token, validate=True).decode())
        for candidate in candidates:
            credential = self._tokens.get(candidate)
            if credential is None and candidate.count(".") == 2:
                credential = self._credential_for_jwt(candidate)
            if credential is not None:
                credential.check()
                return credential
        raise AblyError("Invalid token; token not found", 40140, 401)

    def _credential_for_jwt(self, token: str) -> _Credential:
        """Verify an Ably JWT: signed (HS256) with the secret of the key its ``kid`` names, not expired."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AblyError("Invalid JWT format", 40144, 401) from None
        key = self.keys.get(str(header.get("kid", "")))
        if key is None:
            raise AblyError(f"Invalid JWT: no key named {header.get('kid')!r}", 40101, 401)
        try:
            with warnings.catch_warnings():
                # Ably's secrets are long; the short ones tests give keys are fine here.
                warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                claims = jwt.decode(token, key.secret, algorithms=["HS256"], options={"require": ["iat", "exp"]})
        except jwt.ExpiredSignatureError:
            raise AblyError("Token expired", 40142, 401) from None
        except jwt.InvalidTokenError as exc:
            raise AblyError(f"Invalid JWT: {exc}", 40144, 401) from None
        capability_text = claims.get("x-ably-capability")
        if not isinstance(capability_text, str):
            raise AblyError("Invalid JWT: the x-ably-capability claim (a JSON string) is required", 40144, 401)
        try:
            requested = parse_capability(capability_text)
        except ValueError:
            raise AblyError("Invalid JWT: x-ably-capability is not JSON", 40144, 401) from None
        capability = intersect_capabilities(key.capability, requested)
        if not capability:
            raise AblyError("Invalid capability: the intersection with the key's capability is empty", 40160, 401)
        client_id = claims.get("x-ably-clientId")
        if client_id is not None and not (isinstance(client_id, str) and client_id):
            raise AblyError("Invalid JWT: x-ably-clientId must be a non-empty string", 40012, 400)
        return _Credential(key, capability, client_id, token, int(claims["iat"]) * 1000, int(claims["exp"]) * 1000)

    def _rest_credential(self, request: Request) -> _Credential:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value:
            return self._credential_for_token(value.strip())
        if scheme.lower() == "basic" and value:
            try:
                key_text = base64.b64decode(value.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise AblyError("Invalid basic credentials", 40101, 401) from None
            client_id = request.headers.get("x-ably-clientid")
            if client_id:
                client_id = base64.b64decode(client_id).decode()
            return self._credential_for_key(key_text, client_id)
        if "key" in request.query_params:
            return self._credential_for_key(request.query_params["key"])
        token = _query_token(request.query_params)
        if token is not None:
            return self._credential_for_token(token)
        raise AblyError("Authentication failed: no credentials", 40101, 401)

    # ------------------------------------------------------------------------------------------------ storage

    def _serial_at(self, ts: int, n: int) -> str:
        return f"{ts:014d}-{n:09d}@{self._instance}"

    def _next_serial(self) -> tuple[str, int]:
        ts = max(_now_ms(), self._last_ts)
        self._last_ts = ts
        return self._serial_at(ts, next(self._serial_counter)), ts

    def _channel(self, name: str) -> _Channel:
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = _Channel(name)
        return ch

    def _last_serial(self, ch: _Channel) -> str:
        if ch.log:
            return ch.log[-1].position
        return ch.evicted_upto or self._base_serial

    def _trim(self, ch: _Channel, now: int) -> None:
        horizon = now - self.retention_seconds * 1000 if self.retention_seconds is not None else None
        while ch.messages and (
            len(ch.messages) > self.retention_limit or (horizon is not None and ch.messages[0].timestamp < horizon)
        ):
            ch.evicted_upto = max(ch.evicted_upto, ch.messages.popleft().serial)
        oldest = ch.messages[0].serial if ch.messages else None
        while ch.log and (len(ch.log) > self.retention_limit or oldest is None or ch.log[0].position < oldest):
            ch.evicted_upto = max(ch.evicted_upto, ch.log.popleft().position)
        window = self.idempotency_window * 1000
        if ch.ids and next(iter(ch.ids.values()))[1] < now - window:
            ch.ids = {mid: v for mid, v in ch.ids.items() if v[1] >= now - window}

    def _publish(
        self,
        channel: str,
        raw_messages: Sequence[Mapping[str, Any]],
        *,
        credential: _Credential,
        id_prefix: str,
        connection_id: str | None = None,
        origin: _Session | None = None,
    ) -> list[str | None]:
        """Store messages (dropping ids already seen within the idempotency window), deliver them, return serials.

        A message whose ``action`` is update, delete or append changes the stored message named by its ``serial``;
        its serial in the result is the serial of the new version.
        """
        creates = {i for i, m in enumerate(raw_messages) if m.get("action") in (None, MESSAGE_CREATE)}
        if creates and not _allows(credential.capability, channel, "publish"):
            raise _denied("publish", channel)
        size = sum(len(json.dumps(m.get("data"), default=str)) + len(str(m.get("name") or "")) for m in raw_messages)
        if size > self.max_message_size:
            raise AblyError(f"Maximum message length exceeded (size {size}, max {self.max_message_size})", 40009, 400)
        _check_ids([raw_messages[i] for i in sorted(creates)])
        default_client = credential.client_id if credential.client_id not in (None, "*") else None
        for m in raw_messages:
            client_id = m.get("clientId")
            if client_id is not None and default_client is not None and client_id != default_client:
                raise AblyError(f"Mismatched clientId {client_id!r} for this connection", 40012, 400)
        ch = self._channel(channel)
        self._trim(ch, _now_ms())
        # Check every operation before changing anything: a protocol message is accepted or refused as a whole.
        for index, m in enumerate(raw_messages):
            if index not in creates:
                self._check_operation(ch, m, credential)
        self._check_rates(ch, raw_messages, creates, connection_id)
        serials: list[str | None] = []
        new: list[StoredMessage] = []
        for index, m in enumerate(raw_messages):
            if index not in creates:
                event = self._apply_operation(ch, m, credential, connection_id)
                new.append(event)
                serials.append(event.position)
                continue
            message_id = m.get("id")
            if isinstance(message_id, str) and message_id in ch.ids:
                serials.append(ch.ids[message_id][0])
                continue
            serial, ts = self._next_serial()
            stored = StoredMessage(
                channel=channel,
                serial=serial,
                id=message_id if isinstance(message_id, str) and message_id else f"{id_prefix}:{index}",
                timestamp=ts,
                name=m.get("name"),
                data=m.get("data"),
                encoding=m.get("encoding") or None,
                client_id=m.get("clientId") or default_client,
                connection_id=connection_id,
                extras=m.get("extras"),
            )
            ch.messages.append(stored)
            ch.log.append(dataclasses.replace(stored))
            if isinstance(message_id, str) and message_id:
                ch.ids[message_id] = (serial, ts)
            new.append(stored)
            serials.append(serial)
        self._trim(ch, _now_ms())
        self._count_published(ch.name, connection_id, new, duplicates=len(raw_messages) - len(new))
        if new:
            self._deliver(ch, new, origin, id_prefix, connection_id)
        return serials

    def _find(self, ch: _Channel, serial: Any) -> StoredMessage:
        if isinstance(serial, str) and serial:
            for stored in reversed(ch.messages):
                if stored.serial == serial:
                    return stored
        raise AblyError(f"Message not found: no message with serial {serial!r} on channel {ch.name!r}", 40400, 404)

    def _check_operation(self, ch: _Channel, m: Mapping[str, Any], credential: _Credential) -> None:
        """Refuse an update, delete or append the way Ably does: channel rule, then capability, then target."""
        action = m.get("action")
        if action not in (MESSAGE_UPDATE, MESSAGE_DELETE, MESSAGE_APPEND):
            raise AblyError(f"Invalid message action {action!r}", 40003, 400)
        if not self.is_mutable(ch.name):
            raise AblyError(
                "Can only update/delete/append messages on channels with mutableMessages enabled", 93002, 400
            )
        target = self._find(ch, m.get("serial"))
        kind = "delete" if action == MESSAGE_DELETE else "update"
        own = credential.client_id not in (None, "*") and credential.client_id == target.client_id
        if not (
            _allows(credential.capability, ch.name, f"message-{kind}-any")
            or (own and _allows(credential.capability, ch.name, f"message-{kind}-own"))
        ):
            raise _denied(f"message-{kind}-{'own' if own else 'any'}", ch.name)
        if action == MESSAGE_APPEND:
            _append_data(target.data, target.encoding, m.get("data"), m.get("encoding") or None)

    def _apply_operation(
        self, ch: _Channel, m: Mapping[str, Any], credential: _Credential, connection_id: str | None
    ) -> StoredMessage:
        """Change the stored message and return the event subscribers receive (for an append: just the fragment)."""
        action = int(m["action"])
        target = self._find(ch, m.get("serial"))
        version_serial, version_ts = self._next_serial()
        details: dict[str, Any] = {}
        raw_version = m.get("version")
        if isinstance(raw_version, Mapping):
            details = {k: raw_version[k] for k in ("clientId", "description", "metadata") if k in raw_version}
        default_client = credential.client_id if credential.client_id not in (None, "*") else None
        if "clientId" not in details and (m.get("clientId") or default_client):
            details["clientId"] = m.get("clientId") or default_client
        data, encoding = m.get("data"), m.get("encoding") or None
        if action == MESSAGE_APPEND:
            target.data, target.encoding = _append_data(target.data, target.encoding, data, encoding)
            # History shows the aggregate as the latest version of the message.
            target.action = MESSAGE_UPDATE
        else:
            if data is not None:
                target.data, target.encoding = data, encoding
            target.action = action
        if m.get("name") is not None:
            target.name = m["name"]
        if m.get("extras") is not None:
            target.extras = m["extras"]
        target.version_serial, target.version_timestamp, target.version_details = version_serial, version_ts, details
        event = dataclasses.replace(target, version_details=dict(details), connection_id=connection_id)
        if action == MESSAGE_APPEND:
            event.action, event.data, event.encoding = MESSAGE_APPEND, data, encoding
        ch.log.append(event)
        return event

    def _deliver(
        self,
        ch: _Channel,
        new: list[StoredMessage],
        origin: _Session | None,
        id_prefix: str,
        connection_id: str | None,
    ) -> None:
        for session in list(ch.sessions):
            transport = session.transport
            if transport is None or transport.closed:
                continue
            if session is origin and not session.echo:
                continue
            if not _allows(session.credential.capability, ch.name, "subscribe"):
                continue
            message: dict[str, Any] = {
                "action": MESSAGE,
                "channel": ch.name,
                "id": id_prefix,
                "channelSerial": new[-1].position,
                "timestamp": new[0].timestamp,
                "messages": [m.wire(transport.binary) for m in new],
            }
            if connection_id is not None:
                message["connectionId"] = connection_id
            transport.send(message)

    # ------------------------------------------------------------------------------------------------ REST

    def _rest_failure(self, path: str) -> Response | None:
        for index, (status, prefix) in enumerate(self._fail_rest):
            if prefix is None or path.startswith(prefix):
                del self._fail_rest[index]
                code = status * 100
                return self._error_response(AblyError(f"Injected failure ({status})", code, status), binary=False)
        return None

    @staticmethod
    def _wants_binary(request: Request) -> bool:
        return (
            "application/x-msgpack" in request.headers.get("accept", "")
            or request.query_params.get("format") == "msgpack"
        )

    @staticmethod
    def _encode(body: Any, binary: bool, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        if binary:
            return Response(msgpack.packb(body, use_bin_type=True), status, headers, media_type="application/x-msgpack")
        return Response(json.dumps(body, separators=(",", ":")), status, headers, media_type="application/json")

    def _error_response(self, error: AblyError, binary: bool) -> Response:
        headers = {"X-Ably-Errorcode": str(error.code), "X-Ably-Errormessage": error.message}
        return self._encode({"error": error.to_dict()}, binary, error.status, headers)

    @staticmethod
    async def _read_body(request: Request) -> Any:
        raw = await request.body()
        if not raw:
            return None
        content_type = request.headers.get("content-type", "application/json")
        try:
            if content_type.startswith("application/x-msgpack"):
                return msgpack.unpackb(raw, raw=False)
            return json.loads(raw)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise AblyError(f"Unable to parse request body: {exc}", 40000, 400) from None

    async def _time(self, request: Request) -> Response:
        failure = self._rest_failure(request.url.path)
        if failure is not None:
            return failure
        return self._encode([_now_ms()], self._wants_binary(request))

    async def _request_token(self, request: Request) -> Response:
        binary = self._wants_binary(request)
        failure = self._rest_failure(request.url.path)
        if failure is not None:
            return failure
        try:
            body = await self._read_body(request)
            if not isinstance(body, Mapping):
                raise AblyError("Invalid token request body", 40000, 400)
            credential = self._token_request(request.path_params["key_name"], body)
        except AblyError as error:
            return self._error_response(error, binary)
        return self._encode(credential.token_details(), binary)

    async def _channel_messages(self, request: Request) -> Response:
        binary = self._wants_binary(request)
        failure = self._rest_failure(request.url.path)
        if failure is not None:
            return failure
        channel = request.path_params["channel"]
        try:
            credential = self._rest_credential(request)
            if request.method == "POST":
                return await self._rest_publish(request, channel, credential, binary)
            return self._history(request, channel, credential, binary)
        except AblyError as error:
            return self._error_response(error, binary)

    async def _rest_publish(self, request: Request, channel: str, credential: _Credential, binary: bool) -> Response:
        body = await self._read_body(request)
        raw_messages = [body] if isinstance(body, Mapping) else body
        if not isinstance(raw_messages, list) or not all(isinstance(m, Mapping) for m in raw_messages):
            raise AblyError("Invalid message body: expected a message or a list of messages", 40000, 400)
        id_prefix = f"{secrets.token_urlsafe(9)}"
        serials = self._publish(channel, raw_messages, credential=credential, id_prefix=id_prefix)
        return self._encode({"channel": channel, "messageId": id_prefix, "serials": serials}, binary, 201)

    async def _batch_publish(self, request: Request) -> Response:
        """``POST /messages``: publish specs (``channels``, ``messages``), each channel's publish on its own."""
        binary = self._wants_binary(request)
        failure = self._rest_failure(request.url.path)
        if failure is not None:
            return failure
        try:
            credential = self._rest_credential(request)
            body = await self._read_body(request)
            specs = body if isinstance(body, list) else [body]
            if not specs or not all(isinstance(spec, Mapping) for spec in specs):
                raise AblyError("Invalid batch publish body: expected a spec or a list of specs", 40000, 400)
            parsed: list[tuple[list[str], list[Mapping[str, Any]]]] = []
            for spec in specs:
                channels, messages = spec.get("channels"), spec.get("messages")
                channels = [channels] if isinstance(channels, str) else channels
                messages = [messages] if isinstance(messages, Mapping) else messages
                if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
                    raise AblyError("Invalid batch spec: channels must name one or more channels", 40000, 400)
                if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) for m in messages):
                    raise AblyError("Invalid batch spec: messages must be one or more messages", 40000, 400)
                parsed.append((channels, messages))
            if sum(len(channels) for channels, _ in parsed) > 100:
                raise AblyError("A batch request may publish to at most 100 channels", 40000, 400)
            results: list[dict[str, Any]] = []
            for channels, messages in parsed:
                outcomes: list[dict[str, Any]] = []
                for channel in channels:
                    id_prefix = secrets.token_urlsafe(9)
                    try:
                        serials = self._publish(channel, messages, credential=credential, id_prefix=id_prefix)
                    except AblyError as error:
                        outcomes.append({"channel": channel, "error": error.to_dict()})
                    else:
                        outcomes.append({"channel": channel, "messageId": id_prefix, "serials": serials})
                failed = sum(1 for outcome in outcomes if "error" in outcome)
                results.append({"successCount": len(outcomes) - failed, "failureCount": failed, "results": outcomes})
        except AblyError as error:
            return self._error_response(error, binary)
        return self._encode(results if isinstance(body, list) else results[0], binary, 201)

    def _history(self, request: Request, channel: str, credential: _Credential, binary: bool) -> Response:
        if not _allows(credential.capability, channel, "history"):
            raise _denied("history", channel)
        q = request.query_params
        direction = q.get("direction", "backwards")
        if direction not in ("backwards", "forwards"):
            raise AblyError(f"Invalid direction {direction!r}", 40003, 400)
        try:
            limit = int(q.get("limit", "100"))
            start = int(q["start"]) if q.get("start") else None
            end = int(q["end"]) if q.get("end") else None
        except ValueError:
            raise AblyError("Invalid limit, start or end parameter", 40003, 400) from None
        if not 1 <= limit <= 1000:
            raise AblyError("limit must be between 1 and 1000", 40003, 400)
        if start is not None and end is not None and start > end:
            raise AblyError("start must be before end", 40003, 400)
        from_serial = q.get("fromSerial") or q.get("from_serial")
        cursor = q.get("cursor")
        ch = self._channels.get(channel)
        items = list(ch.messages) if ch else []
        if start is not None:
            items = [m for m in items if m.timestamp >= start]
        if end is not None:
            items = [m for m in items if m.timestamp <= end]
        backwards = direction == "backwards"
        if backwards:
            items.reverse()
            if from_serial:
                items = [m for m in items if m.serial <= from_serial]
            if cursor:
                items = [m for m in items if m.serial < cursor]
        else:
            if from_serial:
                items = [m for m in items if m.serial >= from_serial]
            if cursor:
                items = [m for m in items if m.serial > cursor]
        page, rest = items[:limit], items[limit:]
        base = {k: v for k, v in q.items() if k != "cursor"}
        base.setdefault("limit", str(limit))
        base.setdefault("direction", direction)
        links = [f'<./messages?{urlencode(base, quote_via=quote)}>; rel="first"']
        links.append(f'<./messages?{urlencode(dict(q.items()), quote_via=quote)}>; rel="current"')
        if rest and page:
            links.append(f'<./messages?{urlencode({**base, "cursor": page[-1].serial}, quote_via=quote)}>; rel="next"')
        return self._encode([m.wire(binary) for m in page], binary, 200, {"Link": ", ".join(links)})

    # ------------------------------------------------------------------------------------------------ realtime

    async def _websocket(self, websocket: WebSocket) -> None:
        if self._refusing:
            await websocket.close()  # before the handshake completes: the client cannot connect
            return
        params = websocket.query_params
        binary = params.get("format") == "msgpack"
        await websocket.accept()
        transport = _Transport(websocket, binary)
        self._transports.add(transport)
        try:
            async with asyncio.TaskGroup() as group:
                writer = group.create_task(self._write_loop(transport), name="ably-emulator-writer")
                session = self._open_session(transport, params)
                if session is not None:
                    reader = group.create_task(self._read_loop(transport, session), name="ably-emulator-reader")
                    writer.add_done_callback(lambda _: reader.cancel())
        except* (WebSocketDisconnect, OSError, RuntimeError):
            pass
        finally:
            transport.closed = True
            self._transports.discard(transport)
            for session in self._sessions.values():
                if session.transport is transport:
                    session.transport = None
                    session.detached_at = time.monotonic()
                    for name in session.attached:
                        self._channel(name).sessions.discard(session)
                    session.attached.clear()
                    self._schedule_leave(session.id)
            for sid in [sid for sid in self._expire_on_drop if sid in self._sessions]:
                if self._sessions[sid].transport is None:
                    self._expire_on_drop.discard(sid)
                    del self._sessions[sid]

    def _open_session(self, transport: _Transport, params: Mapping[str, str]) -> _Session | None:
        """Answer the connection request in the URL: CONNECTED, or ERROR and close."""
        try:
            if params.get("v") not in _PROTOCOL_VERSIONS:
                raise AblyError(f"Unsupported protocol version {params.get('v')!r}", 40000, 400)
            token = _query_token(params)
            if token is not None:
                credential = self._credential_for_token(token)
            elif "key" in params:
                credential = self._credential_for_key(params["key"], params.get("clientId"))
            else:
                raise AblyError("No authentication information provided", 40101, 401)
            client_id = params.get("clientId")
            if client_id and credential.client_id not in (None, "*", client_id):
                raise AblyError(f"Mismatched clientId {client_id!r}", 40102, 401)
        except AblyError as error:
            transport.send({"action": ERROR, "error": error.to_dict()})
            transport.close()
            return None
        self._expire_sessions()
        resume_error: AblyError | None = None
        session: _Session | None = None
        resume = params.get("resume")
        if resume:
            session = self._sessions.get(resume.partition("!")[0])
            if session is not None and session.id in self._expire_on_drop:
                self._expire_on_drop.discard(session.id)
                del self._sessions[session.id]
                session = None
            if session is None or session.key != resume or session.credential.key.name != credential.key.name:
                session = None
                resume_error = AblyError("Unable to resume connection: unknown or expired connection key", 80008, 400)
            elif session.transport is not None:
                old = session.transport
                session.transport = None
                old.close()
        if session is None:
            session = _Session(f"emu{next(self._connection_counter)}-{secrets.token_hex(4)}", credential, True)
            self._sessions[session.id] = session
        session.credential = credential
        session.echo = params.get("echo", "true") != "false"
        session.transport = transport
        session.detached_at = None
        timer = self._leave_timers.pop(session.id, None)
        if timer is not None:
            timer.cancel()
        for name in session.attached:
            self._channel(name).sessions.discard(session)
        session.attached.clear()
        transport.send(self._connected(session, resume_error))
        return session

    def _connected(self, session: _Session, error: AblyError | None = None) -> dict[str, Any]:
        details: dict[str, Any] = {
            "connectionKey": session.key,
            "maxMessageSize": self.max_message_size,
            "maxFrameSize": 524288,
            "maxInboundRate": 50,
            "connectionStateTtl": self.connection_state_ttl_ms,
            "maxIdleInterval": self.max_idle_interval_ms,
            "serverId": f"emulator-{self._instance}",
        }
        client_id = session.credential.client_id
        if client_id is not None:
            details["clientId"] = client_id
        message: dict[str, Any] = {
            "action": CONNECTED,
            "connectionId": session.id,
            "connectionKey": session.key,
            "connectionDetails": details,
        }
        if error is not None:
            message["error"] = error.to_dict()
        return message

    def _expire_sessions(self) -> None:
        horizon = time.monotonic() - self.connection_state_ttl_ms / 1000
        for sid, session in list(self._sessions.items()):
            if session.transport is None and session.detached_at is not None and session.detached_at < horizon:
                del self._sessions[sid]

    async def _write_loop(self, transport: _Transport) -> None:
        websocket = transport.websocket
        idle = max(self.max_idle_interval_ms / 1000 / 2, 0.05)
        while True:
            try:
                message = await asyncio.wait_for(transport.outgoing.get(), idle)
            except TimeoutError:
                message = {"action": HEARTBEAT}
            if message is None or message.get("__drop__"):
                open_ = WebSocketState.CONNECTED
                if websocket.application_state == open_ and websocket.client_state == open_:
                    if message is None:
                        await websocket.close(1000)
                    else:
                        await websocket.close(1011, "dropped by the emulator")
                return
            if transport.binary:
                await websocket.send_bytes(msgpack.packb(message, use_bin_type=True))
            else:
                await websocket.send_text(json.dumps(message, separators=(",", ":")))

    async def _read_loop(self, transport: _Transport, session: _Session) -> None:
        websocket = transport.websocket
        while not transport.closed:
            frame = await websocket.receive()
            if frame["type"] == "websocket.disconnect":
                transport.closed = True
                transport.outgoing.put_nowait(None)
                return
            raw = frame.get("bytes") if frame.get("bytes") is not None else frame.get("text")
            try:
                message = msgpack.unpackb(raw, raw=False) if isinstance(raw, bytes) else json.loads(raw or "")
            except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                transport.send({"action": ERROR, "error": AblyError("Malformed frame", 40000, 400).to_dict()})
                continue
            if isinstance(message, dict) and session.transport is transport:
                self._on_protocol_message(transport, session, message)

    def _on_protocol_message(self, transport: _Transport, session: _Session, message: dict[str, Any]) -> None:
        action = message.get("action")
        channel = message.get("channel")
        if action == HEARTBEAT:
            reply: dict[str, Any] = {"action": HEARTBEAT}
            if message.get("id") is not None:
                reply["id"] = message["id"]
            transport.send(reply)
        elif action == CLOSE:
            transport.send({"action": CLOSED})
            transport.close()
            session.transport = None
            for name in session.attached:
                self._channel(name).sessions.discard(session)
            self._sessions.pop(session.id, None)
            self._leave_connection(session.id)
        elif action == ATTACH and isinstance(channel, str):
            self._attach(transport, session, channel, message)
        elif action == DETACH and isinstance(channel, str):
            session.attached.discard(channel)
            self._channel(channel).sessions.discard(session)
            self._leave_connection(session.id, channel)
            transport.send({"action": DETACHED, "channel": channel})
        elif action == PRESENCE and isinstance(channel, str):
            self._realtime_presence(transport, session, channel, message)
        elif action == MESSAGE and isinstance(channel, str):
            self._realtime_publish(transport, session, channel, message)
        elif action == AUTH:
            auth = message.get("auth") or {}
            try:
                session.credential = self._credential_for_token(str(auth.get("accessToken", "")))
            except AblyError as error:
                transport.send({"action": ERROR, "error": error.to_dict()})
                transport.close()
                return
            transport.send(self._connected(session))
        elif action in (21, 19):
            serial = message.get("msgSerial")
            unsupported = AblyError("The emulator does not support this action", 40000, 400)
            if serial is not None:
                transport.send({"action": NACK, "msgSerial": serial, "count": 1, "error": unsupported.to_dict()})

    def _attach(self, transport: _Transport, session: _Session, channel: str, message: dict[str, Any]) -> None:
        capability = session.credential.capability
        if not _any_op(capability, channel):
            transport.send({"action": ERROR, "channel": channel, "error": _denied("attach", channel).to_dict()})
            return
        ch = self._channel(channel)
        self._trim(ch, _now_ms())
        params = message.get("params") or {}
        flags = 0
        if _allows(capability, channel, "publish"):
            flags |= FLAG_PUBLISH
        subscribe = _allows(capability, channel, "subscribe")
        if subscribe:
            flags |= FLAG_SUBSCRIBE | FLAG_PRESENCE_SUBSCRIBE
        if _allows(capability, channel, "presence"):
            flags |= FLAG_PRESENCE
        backlog: list[StoredMessage] = []
        since = message.get("channelSerial")
        if isinstance(since, str) and since:
            if since >= ch.evicted_upto:
                flags |= FLAG_RESUMED
                backlog = [m for m in ch.log if m.position > since]
        elif params.get("rewind"):
            backlog = self._rewind(ch, str(params["rewind"]))
        if backlog:
            flags |= FLAG_HAS_BACKLOG
        members = list(ch.members.values()) if subscribe else []
        if members:
            flags |= FLAG_HAS_PRESENCE
        attached: dict[str, Any] = {
            "action": ATTACHED,
            "channel": channel,
            "channelSerial": self._last_serial(ch) if not backlog else self._before(ch, backlog[0].position),
            "flags": flags,
        }
        if params:
            attached["params"] = params
        transport.send(attached)
        if members:
            # The presence set follows ATTACHED in SYNC messages whose channelSerial is "<syncId>:<cursor>"; an
            # empty cursor marks the last one (ably-python RealtimePresence.set_presence).
            sync_id = f"sync{next(self._sync_counter)}"
            pages = [members[i : i + _SYNC_PAGE] for i in range(0, len(members), _SYNC_PAGE)]
            for number, page in enumerate(pages, 1):
                transport.send(
                    {
                        "action": SYNC,
                        "channel": channel,
                        "channelSerial": f"{sync_id}:{page[-1].key if number < len(pages) else ''}",
                        "presence": [m.wire(PRESENCE_PRESENT, transport.binary) for m in page],
                    }
                )
        if subscribe:
            for stored in backlog:
                transport.send(
                    {
                        "action": MESSAGE,
                        "channel": channel,
                        "id": stored.id.rpartition(":")[0] or stored.id,
                        "channelSerial": stored.position,
                        "timestamp": stored.timestamp,
                        "messages": [stored.wire(transport.binary)],
                    }
                )
        session.attached.add(channel)
        ch.sessions.add(session)

    def _before(self, ch: _Channel, position: str) -> str:
        """The channel position just before `position`: where an attachment that continues with it stands."""
        previous = ch.evicted_upto or self._base_serial
        for event in ch.log:
            if event.position >= position:
                break
            previous = event.position
        return previous

    @staticmethod
    def _rewind(ch: _Channel, rewind: str) -> list[StoredMessage]:
        match = re.fullmatch(r"(\d+)\s*([smh]?)", rewind.strip())
        if match is None:
            return []
        amount, unit = int(match.group(1)), match.group(2)
        if not unit:
            return list(ch.messages)[-amount:] if amount else []
        seconds = amount * {"s": 1, "m": 60, "h": 3600}[unit]
        horizon = _now_ms() - seconds * 1000
        return [m for m in ch.messages if m.timestamp >= horizon][-100:]

    def _realtime_publish(
        self, transport: _Transport, session: _Session, channel: str, message: dict[str, Any]
    ) -> None:
        serial = message.get("msgSerial")
        raw_messages = message.get("messages") or []
        if not isinstance(serial, int):
            transport.send({"action": ERROR, "error": AblyError("MESSAGE without msgSerial", 40000, 400).to_dict()})
            return
        if serial in session.acked:
            transport.send(
                {"action": ACK, "msgSerial": serial, "count": 1, "res": [{"serials": session.acked[serial]}]}
            )
            return
        if self._nack:
            code, status, text = self._nack.pop(0)
            error = AblyError(text, code, status)
            transport.send({"action": NACK, "msgSerial": serial, "count": 1, "error": error.to_dict()})
            return
        try:
            serials = self._publish(
                channel,
                [m for m in raw_messages if isinstance(m, Mapping)],
                credential=session.credential,
                id_prefix=f"{session.id}:{serial}",
                connection_id=session.id,
                origin=session,
            )
        except AblyError as error:
            transport.send({"action": NACK, "msgSerial": serial, "count": 1, "error": error.to_dict()})
            return
        session.acked[serial] = serials
        if len(session.acked) > 1000:
            for old in sorted(session.acked)[:-1000]:
                del session.acked[old]
        transport.send({"action": ACK, "msgSerial": serial, "count": 1, "res": [{"serials": serials}]})

    # ------------------------------------------------------------------------------------------------ presence

    def _realtime_presence(
        self, transport: _Transport, session: _Session, channel: str, message: dict[str, Any]
    ) -> None:
        """Enter, update or leave members for this connection, ACK, and broadcast PRESENCE to the channel."""
        serial = message.get("msgSerial")
        if not isinstance(serial, int):
            transport.send({"action": ERROR, "error": AblyError("PRESENCE without msgSerial", 40000, 400).to_dict()})
            return
        if serial in session.acked:
            transport.send({"action": ACK, "msgSerial": serial, "count": 1})
            return
        raw = [p for p in message.get("presence") or [] if isinstance(p, Mapping)]
        try:
            events = self._apply_presence(session, channel, raw, serial)
        except AblyError as error:
            transport.send({"action": NACK, "msgSerial": serial, "count": 1, "error": error.to_dict()})
            return
        session.acked[serial] = []
        transport.send({"action": ACK, "msgSerial": serial, "count": 1})
        if events:
            self._broadcast_presence(self._channel(channel), events, session.id)

    def _apply_presence(
        self, session: _Session, channel: str, raw: Sequence[Mapping[str, Any]], msg_serial: int
    ) -> list[tuple[int, _Member]]:
        credential = session.credential
        if not _allows(credential.capability, channel, "presence"):
            raise _denied("presence", channel)
        own = credential.client_id
        changes: list[tuple[int, str, Mapping[str, Any]]] = []
        for p in raw:
            action = p.get("action")
            if action not in (PRESENCE_ENTER, PRESENCE_LEAVE, PRESENCE_UPDATE, PRESENCE_PRESENT):
                raise AblyError(f"Invalid presence action {action!r}", 40000, 400)
            client_id = p.get("clientId") or (own if own != "*" else None)
            if not isinstance(client_id, str) or not client_id:
                raise AblyError("Unable to enter presence channel without clientId", 40012, 400)
            if own != "*" and client_id != own:
                raise AblyError(f"Mismatched clientId {client_id!r} for this connection", 40012, 400)
            changes.append((int(action), client_id, p))
        ch = self._channel(channel)
        now = _now_ms()
        events: list[tuple[int, _Member]] = []
        for index, (action, client_id, p) in enumerate(changes):
            # A client re-entering after an attach (RTP17g) sends the id it was given; keep that one.
            given = p.get("id")
            if not (isinstance(given, str) and given.startswith(f"{session.id}:") and given.count(":") >= 2):
                given = f"{session.id}:{msg_serial}:{index}"
            member = _Member(
                client_id=client_id,
                connection_id=session.id,
                id=given,
                timestamp=now,
                data=p.get("data"),
                encoding=p.get("encoding") or None,
                extras=p.get("extras"),
            )
            current = ch.members.get(member.key)
            present = current is not None
            if current is not None and action != PRESENCE_LEAVE and current.id == member.id:
                continue  # the same presence message again: nothing changes
            if action == PRESENCE_LEAVE:
                if present:
                    del ch.members[member.key]
                    events.append((PRESENCE_LEAVE, member))
                continue
            ch.members[member.key] = member
            # Entering again is an update; updating before entering is an enter (as Ably broadcasts them).
            events.append((PRESENCE_UPDATE if present else PRESENCE_ENTER, member))
        return events

    def _broadcast_presence(self, ch: _Channel, events: list[tuple[int, _Member]], connection_id: str) -> None:
        for session in list(ch.sessions):
            transport = session.transport
            if transport is None or transport.closed:
                continue
            if not _allows(session.credential.capability, ch.name, "subscribe"):
                continue
            transport.send(
                {
                    "action": PRESENCE,
                    "channel": ch.name,
                    "connectionId": connection_id,
                    "timestamp": events[0][1].timestamp,
                    "presence": [member.wire(action, transport.binary) for action, member in events],
                }
            )

    def _schedule_leave(self, connection_id: str) -> None:
        """A connection's members leave `presence_leave_delay` seconds after it dropped, unless it resumes."""
        old = self._leave_timers.pop(connection_id, None)
        if old is not None:
            old.cancel()
        if self.presence_leave_delay <= 0:
            self._leave_connection(connection_id)
            return

        def fire() -> None:
            self._leave_timers.pop(connection_id, None)
            self._leave_connection(connection_id)

        loop = asyncio.get_running_loop()
        self._leave_timers[connection_id] = loop.call_later(self.presence_leave_delay, fire)

    def _leave_connection(self, connection_id: str, channel: str | None = None) -> None:
        """Make every member of a connection (on one channel, or all) leave, with synthesized LEAVE messages."""
        channels = [self._channels[channel]] if channel in self._channels else []
        if channel is None:
            channels = list(self._channels.values())
        for ch in channels:
            gone = [m for m in ch.members.values() if m.connection_id == connection_id]
            if not gone:
                continue
            now = _now_ms()
            events: list[tuple[int, _Member]] = []
            for member in gone:
                del ch.members[member.key]
                # An id that does not start with "<connectionId>:" marks a leave as synthesized (RTP2b1), so clients
                # compare it with the member's entry by timestamp.
                leave = dataclasses.replace(
                    member, id=f"synthesized-{next(self._synthetic_counter)}:0:0", timestamp=now
                )
                events.append((PRESENCE_LEAVE, leave))
            self._broadcast_presence(ch, events, connection_id)

    async def _channel_presence(self, request: Request) -> Response:
        """``GET /channels/{name}/presence``: the current members, paginated with ``limit`` and ``Link`` headers."""
        binary = self._wants_binary(request)
        failure = self._rest_failure(request.url.path)
        if failure is not None:
            return failure
        channel = request.path_params["channel"]
        try:
            credential = self._rest_credential(request)
            if not _allows(credential.capability, channel, "subscribe"):
                raise _denied("subscribe", channel)
            q = request.query_params
            try:
                limit = int(q.get("limit", "100"))
            except ValueError:
                raise AblyError("Invalid limit parameter", 40003, 400) from None
            if not 1 <= limit <= 1000:
                raise AblyError("limit must be between 1 and 1000", 40003, 400)
            ch = self._channels.get(channel)
            members = sorted(ch.members.values(), key=lambda m: m.key) if ch else []
            if q.get("clientId"):
                members = [m for m in members if m.client_id == q["clientId"]]
            if q.get("connectionId"):
                members = [m for m in members if m.connection_id == q["connectionId"]]
            if q.get("cursor"):
                members = [m for m in members if m.key > q["cursor"]]
            page, rest = members[:limit], members[limit:]
            base = {k: v for k, v in q.items() if k != "cursor"}
            base.setdefault("limit", str(limit))
            links = [f'<./presence?{urlencode(base, quote_via=quote)}>; rel="first"']
            links.append(f'<./presence?{urlencode(dict(q.items()), quote_via=quote)}>; rel="current"')
            if rest and page:
                next_q = urlencode({**base, "cursor": page[-1].key}, quote_via=quote)
                links.append(f'<./presence?{next_q}>; rel="next"')
            body = [m.wire(PRESENCE_PRESENT, binary) for m in page]
            return self._encode(body, binary, 200, {"Link": ", ".join(links)})
        except AblyError as error:
            return self._error_response(error, binary)

    # ------------------------------------------------------------------------------------------ message versions

    async def _channel_message(self, request: Request) -> Response:
        """``GET`` (latest version) or ``PATCH`` (update, delete or append) ``/channels/{name}/messages/{serial}``."""
        binary = self._wants_binary(request)
        failure = self._rest_failure(request.url.path)
        if failure is not None:
            return failure
        channel, serial = request.path_params["channel"], request.path_params["serial"]
        try:
            credential = self._rest_credential(request)
            if request.method == "GET":
                if not _allows(credential.capability, channel, "history"):
                    raise _denied("history", channel)
                ch = self._channels.get(channel)
                if ch is None:
                    raise AblyError(f"Message not found: no message with serial {serial!r}", 40400, 404)
                return self._encode(self._find(ch, serial).wire(binary), binary)
            body = await self._read_body(request)
            if not isinstance(body, Mapping):
                raise AblyError("Invalid message body: expected a message", 40000, 400)
            operation = {**body, "serial": serial}
            if operation.get("action") in (None, MESSAGE_CREATE):
                operation["action"] = MESSAGE_UPDATE
            [version] = self._publish(channel, [operation], credential=credential, id_prefix=secrets.token_urlsafe(9))
            return self._encode({"versionSerial": version}, binary)
        except AblyError as error:
            return self._error_response(error, binary)

    # ------------------------------------------------------------------------------------------------ statistics

    def channel_stats(self, channel: str) -> MessageStats:
        """What `channel` stored since the emulator started (or `reset_stats`): creates and operations, peak rate."""
        meter = self._channel_meters.get(channel)
        return meter.stats() if meter is not None else MessageStats()

    def connection_stats(self) -> dict[str, MessageStats]:
        """The messages each realtime connection published (its inbound messages), by connection id.

        Only connections that published are listed; REST publishes have no connection and count for the channel only.
        """
        return {connection_id: meter.stats() for connection_id, meter in self._connection_meters.items()}

    def reset_stats(self) -> None:
        """Forget every count: `channel_stats` and `connection_stats` start from zero."""
        self._channel_meters.clear()
        self._connection_meters.clear()

    def _meters(self, channel: str, connection_id: str | None) -> list[_Meter]:
        meters = [self._channel_meters.setdefault(channel, _Meter())]
        if connection_id is not None:
            meters.append(self._connection_meters.setdefault(connection_id, _Meter()))
        return meters

    def _check_rates(
        self,
        ch: _Channel,
        raw_messages: Sequence[Mapping[str, Any]],
        creates: set[int],
        connection_id: str | None,
    ) -> None:
        """With `enforce_rate_limits`, refuse a publish that would pass the channel's or the connection's limit."""
        if not self.enforce_rate_limits:
            return
        count = sum(
            1
            for index, m in enumerate(raw_messages)
            if index not in creates or not (isinstance(m.get("id"), str) and m["id"] in ch.ids)
        )
        if not count:
            return
        now = time.monotonic()
        channel_meter, *connection_meter = self._meters(ch.name, connection_id)
        if connection_meter and connection_meter[0].recent(now) + count > self.connection_rate_limit:
            channel_meter.refused += count
            connection_meter[0].refused += count
            raise AblyError(
                "Rate limit exceeded; request rejected (nonfatal); metric = connection.inboundRate; "
                f"permitted rate = {self.connection_rate_limit}",
                42911,
                429,
            )
        if channel_meter.recent(now) + count > self.channel_rate_limit:
            channel_meter.refused += count
            if connection_meter:
                connection_meter[0].refused += count
            raise AblyError(
                f"Rate limit exceeded; request rejected (nonfatal); per-channel publish rate exceeded on {ch.name!r}; "
                f"permitted rate = {self.channel_rate_limit}",
                42913,
                429,
            )

    def _count_published(
        self, channel: str, connection_id: str | None, new: Sequence[StoredMessage], *, duplicates: int
    ) -> None:
        now = time.monotonic()
        kinds = [_ACTION_NAMES.get(m.action, str(m.action)) for m in new]
        for meter in self._meters(channel, connection_id):
            meter.add(kinds, now)
            meter.duplicates += duplicates


# -- statistics ----------------------------------------------------------------------------------------------------

_ACTION_NAMES = {MESSAGE_CREATE: "create", MESSAGE_UPDATE: "update", MESSAGE_DELETE: "delete", MESSAGE_APPEND: "append"}


@dataclass(frozen=True)
class MessageStats:
    """Messages a channel stored, or a connection published, as `AblyEmulator.channel_stats` and `connection_stats`
    count them.
    """

    messages: int = 0
    """Every message counted: creates plus update, delete and append operations (Ably bills and rate-limits each)."""
    operations: Mapping[str, int] = field(default_factory=dict)
    """``messages`` by kind: ``create``, ``update``, ``delete``, ``append`` (kinds never seen are absent)."""
    peak_per_second: int = 0
    """The most messages counted within any 1-second window."""
    duplicates: int = 0
    """Publishes dropped because a message with their id was stored within the idempotency window (not counted)."""
    refused: int = 0
    """Messages refused by ``enforce_rate_limits`` (not counted)."""

    def count(self, kind: str) -> int:
        """How many messages of one kind (``create``, ``update``, ``delete``, ``append``)."""
        return self.operations.get(kind, 0)


class _Meter:
    """The counts behind one `MessageStats`: totals by kind and the times of the last second's messages."""

    __slots__ = ("duplicates", "operations", "peak", "refused", "window")

    def __init__(self) -> None:
        self.operations: dict[str, int] = {}
        self.window: deque[float] = deque()
        self.peak = 0
        self.duplicates = 0
        self.refused = 0

    def recent(self, now: float) -> int:
        """Messages counted in the second up to `now`."""
        window = self.window
        while window and window[0] <= now - 1.0:
            window.popleft()
        return len(window)

    def add(self, kinds: Sequence[str], now: float) -> None:
        for kind in kinds:
            self.operations[kind] = self.operations.get(kind, 0) + 1
        self.window.extend([now] * len(kinds))
        self.peak = max(self.peak, self.recent(now))

    def stats(self) -> MessageStats:
        return MessageStats(
            messages=sum(self.operations.values()),
            operations=dict(self.operations),
            peak_per_second=self.peak,
            duplicates=self.duplicates,
            refused=self.refused,
        )
