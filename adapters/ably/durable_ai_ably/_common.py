"""What the realtime and REST backends share: options, URL parsing, channel names, sessions, payload encoding.

This module does not import ably-python, so the REST backend starts without loading the realtime client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from durable_ai.backend import PresenceEntry, PresenceRole
from durable_ai.backend import pack_snapshot as kit_pack_snapshot
from durable_ai.errors import ConfigurationError

__all__ = ["AblyOptions", "options_from_url"]

logger = logging.getLogger("durable_ai_ably")
T = TypeVar("T")

API_VERSION = "5"
NO_EPOCH = "0"
PAGE = 1000

Appends = Literal["auto", "on", "off"]
Transport = Literal["realtime", "rest"]
#: ably-python's ``auth_callback``: token params in, a token or JWT string, a TokenRequest or TokenDetails dict out
AuthCallback = Callable[[dict[str, Any]], Awaitable[str | dict[str, Any]]]


def split_key(key: str) -> tuple[str, str]:
    """The name (``appId.keyId``) and secret of an Ably API key ``appId.keyId:secret``."""
    name, sep, secret = key.partition(":")
    app_id, dot, key_id = name.partition(".")
    if not (sep and dot and app_id and key_id and secret):
        raise ConfigurationError("an Ably key looks like appId.keyId:secret")
    return name, secret


_SIGNED_FIELDS = ("keyName", "ttl", "capability", "clientId", "timestamp", "nonce")


def sign_token_request(secret: str, request: dict[str, Any]) -> dict[str, Any]:
    """Add the ``mac`` of an Ably TokenRequest: HMAC-SHA256 of its fields in Ably's order, each as text followed by
    a newline (empty when absent), keyed by the key's secret."""
    text = "".join(f"{request.get(name, '')}\n" for name in _SIGNED_FIELDS)
    digest = hmac.new(secret.encode(), text.encode(), hashlib.sha256).digest()
    request["mac"] = base64.b64encode(digest).decode("ascii")
    return request


def validate_namespace(namespace: str) -> str:
    """Return the namespace if it can start a channel name (no ``:``, ``,``, glob characters or spaces)."""
    if not isinstance(namespace, str) or not namespace or any(c in namespace for c in ":,*[]? "):
        raise ConfigurationError(f"invalid namespace {namespace!r}")
    return namespace


def channel_name(namespace: str, session: str, kind: str = "events") -> str:
    """``<namespace>:<session>`` for events, ``<namespace>:<session>:<kind>`` for the others."""
    base = f"{namespace}:{session}"
    return base if kind == "events" else f"{base}:{kind}"


@dataclass(frozen=True, slots=True)
class AblyOptions:
    """How a backend talks to Ably.

    Attributes:
        key: the API key ``appId.keyId:secret`` (tokens are requested with it), for agents and other trusted
            processes. Give either a key, or a ``token`` and/or an ``auth_callback``.
        token: a client credential instead of a key: an Ably token or JWT string, such as
            :func:`durable_ai_ably.issue_client_jwt` makes. Its capability limits what the backend may do, and its
            clientId is the connection's.
        auth_callback: called (``await auth_callback(token_params)``) whenever a new token is needed; returns a
            token or JWT string, or a TokenRequest (:func:`durable_ai_ably.issue_client_token`) or TokenDetails
            dict. With a ``token`` too, it renews that token when it expires.
        endpoint: ably-python's ``endpoint`` option, e.g. ``127.0.0.1:8080/`` for the emulator (``None``: Ably's
            production endpoint).
        tls: use TLS; without it the key is never sent, tokens are requested instead (Ably refuses basic auth
            over plain HTTP).
        namespace: the first part of every channel name (channel rules and capabilities apply per namespace).
        transport: ``realtime`` (a WebSocket connection, for long-lived agents) or ``rest`` (HTTP only, for
            serverless functions: see :class:`durable_ai_ably.rest.AblyRestBackend`).
        appends: ``auto`` streams each text or reasoning part into one message with message appends when the
            namespace allows them, and falls back to one message per batch when it does not; ``on`` requires
            appends; ``off`` never appends.
        max_message_bytes: the largest message written; larger events are split by the hub and reassembled by
            readers. A message grown by appends is closed before it passes this size.
        rate_limit: messages per second per channel, shared by every run of a session (Ably's default limit
            is 50).
        connection_rate_limit: messages per second one connection publishes, over all its channels (Ably's
            default inbound limit is 50); publishes wait their turn, so batches grow instead of being rejected.
        publish_timeout: seconds a request is retried before :class:`~durable_ai.errors.BackendUnavailable`.
        attempt_timeout: seconds one attempt waits for its answer.
        connect_timeout: seconds ``open`` waits for the realtime connection.
        poll_interval: seconds between reads of history when following over REST.
        tap_limit: messages a live reader may fall behind before it goes back to reading history.
        client: extra keyword arguments for ``AblyRealtime``/``AblyRest``.
    """

    key: str | None = None
    token: str | None = None
    auth_callback: AuthCallback | None = None
    endpoint: str | None = None
    tls: bool = True
    namespace: str = "ai"
    transport: Transport = "realtime"
    appends: Appends = "auto"
    max_message_bytes: int = 65536 - 8192
    rate_limit: float | None = 50.0
    connection_rate_limit: float | None = 50.0
    publish_timeout: float = 10.0
    attempt_timeout: float = 3.0
    connect_timeout: float = 10.0
    poll_interval: float = 1.0
    tap_limit: int = 10_000
    client: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.key is not None:
            split_key(self.key)
            if self.token is not None or self.auth_callback is not None:
                raise ConfigurationError("give an Ably key, or a token and/or an auth_callback, not both")
        elif self.token is None and self.auth_callback is None:
            raise ConfigurationError("Ably needs a key (appId.keyId:secret), a token or an auth_callback")
        elif self.token is not None and not self.token.strip():
            raise ConfigurationError("an Ably token cannot be empty")
        validate_namespace(self.namespace)
        if self.transport not in ("realtime", "rest"):
            raise ConfigurationError(f"transport must be realtime or rest, got {self.transport!r}")
        if self.appends not in ("auto", "on", "off"):
            raise ConfigurationError(f"appends must be auto, on or off, got {self.appends!r}")
        if self.max_message_bytes < 4096:
            raise ConfigurationError("max_message_bytes must be at least 4096")
        for rate in ("rate_limit", "connection_rate_limit"):
            value = getattr(self, rate)
            if value is not None and value <= 0:
                raise ConfigurationError(f"{rate} must be positive or None")
        for name_ in ("publish_timeout", "attempt_timeout", "connect_timeout", "poll_interval"):
            if not getattr(self, name_) > 0:
                raise ConfigurationError(f"{name_} must be positive")
        if self.tap_limit < 1:
            raise ConfigurationError("tap_limit must be at least 1")

    @property
    def key_name(self) -> str | None:
        """The key's name ``appId.keyId`` (``None`` with a token)."""
        return None if self.key is None else self.key.partition(":")[0]

    def channel_name(self, session: str, kind: str = "events") -> str:
        """``<namespace>:<session>`` for events, ``<namespace>:<session>:<kind>`` for the others."""
        return channel_name(self.namespace, session, kind)


#: the name of the marker ``delete()`` publishes on each of a session's channels: the channel's floor
DELETE_MARKER = "d"
#: the channels of a session that get a floor of their own when it is deleted
FLOOR_KINDS = ("events", "control", "snapshot", "presence")


async def all_of(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """The results of several requests made at once; if one fails (or the caller is cancelled), the others are
    cancelled and awaited before the error is raised."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return [await task for task in tasks]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def delete_record(floors: Mapping[str, str]) -> str:
    """The data of a deletion on the meta channel: the serial of the marker on each channel (its floor there)."""
    return json.dumps({"floors": dict(floors)}, separators=(",", ":"))


@dataclass(slots=True)
class SessionState:
    """What the meta channel says about a session: its epoch, and below which serial each channel's messages are
    hidden.

    Ably orders serials within a channel only, so each channel's floor is a serial of that channel: ``delete()``
    publishes a marker on every channel of the session, then records their serials on the meta channel. (A
    deletion recorded without them, as earlier versions did, hides by the meta marker's serial on every channel.)
    """

    epoch: str
    floor: str
    floors: dict[str, str] = field(default_factory=dict)

    def floor_for(self, kind: str) -> str:
        return self.floors.get(kind, self.floor)

    @classmethod
    def from_marker(cls, serial: str | None, data: bytes = b"") -> SessionState:
        """The state after the delete marker with this serial and data (``None``: never deleted)."""
        if serial is None:
            return cls(NO_EPOCH, "")
        floors: dict[str, str] = {}
        try:
            record = json.loads(data) if data[:1] == b"{" else None
        except ValueError:
            record = None
        found = record.get("floors") if isinstance(record, dict) else None
        if isinstance(found, dict):
            floors = {k: v for k, v in found.items() if k in FLOOR_KINDS and isinstance(v, str) and v}
        return cls(hashlib.sha256(serial.encode()).hexdigest()[:12], serial, floors)


def to_bytes(data: Any) -> bytes:
    if data is None:
        return b""
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    return json.dumps(data, separators=(",", ":")).encode()


def to_wire(data: bytes) -> str | bytes:
    """NDJSON payloads travel as strings (readable in Ably's dashboard); anything else as binary."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data


def decode_data(raw: Mapping[str, Any]) -> bytes:
    """The payload of a message or presence member as REST returns it (JSON), undoing its ``encoding``.

    Clients can publish any data with any ``encoding``: what does not decode is returned as it came (a control
    that does not parse is then rejected by the agent, with an ack), never raised out of a read.
    """
    data: Any = raw.get("data")
    encoding = raw.get("encoding") or ""
    if not isinstance(encoding, str):
        return to_bytes(data)
    decoded = data
    try:
        for step in reversed([s for s in encoding.split("/") if s]):
            if step == "base64" and isinstance(decoded, str):
                decoded = base64.b64decode(decoded, validate=True)
            elif step == "json" and isinstance(decoded, str | bytes):
                decoded = json.loads(decoded)
            elif step in ("utf-8", "utf8") and isinstance(decoded, bytes):
                decoded = decoded.decode()
            else:
                break
        return to_bytes(decoded)
    except (ValueError, TypeError, RecursionError):  # binascii.Error and JSON and Unicode errors are ValueErrors
        logger.info("a message with encoding %r did not decode; passing its data on as it came", encoding)
        return to_bytes(data)


def version_serial(raw: Mapping[str, Any]) -> str | None:
    """The serial of a message's latest version (after appends), as REST returns it."""
    version = raw.get("version")
    serial = version.get("serial") if isinstance(version, Mapping) else None
    return serial if isinstance(serial, str) else None


def text_field(raw: Mapping[str, Any], name: str) -> str | None:
    value = raw.get(name)
    return value if isinstance(value, str) else None


def serial_time(serial: str) -> int | None:
    """The millisecond timestamp an Ably serial starts with."""
    head = serial.split("-", 1)[0]
    return int(head) if head.isdigit() and len(head) >= 13 else None


# -- snapshots ---------------------------------------------------------------------------------------------------


def pack_snapshot(data: bytes, max_message_bytes: int) -> tuple[list[bytes], bytes]:
    """The messages that store a snapshot (the kit's codec), sized for binary data that travels base64 in JSON."""
    return kit_pack_snapshot(data, max_message_bytes * 3 // 4 - 64)


#: the clientId prefix of agents' presence members: client credentials can never carry it (see ``.auth``)
AGENT_CLIENT_PREFIX = "agent:"


def presence_client_id(member_id: str, role: PresenceRole) -> str:
    """The clientId a member is present under: who it is, as the broker will report it."""
    return AGENT_CLIENT_PREFIX + member_id if role == "agent" else member_id


def presence_entries(members: Mapping[str, bytes]) -> list[PresenceEntry]:
    """Presence entries from members by clientId. The role comes from the clientId, which Ably attests (a
    client's token fixes it, and tokens are never issued for an agent's prefix), never from the member's data."""
    entries = []
    for client_id, data in members.items():
        if client_id.startswith(AGENT_CLIENT_PREFIX):
            entries.append(PresenceEntry(client_id[len(AGENT_CLIENT_PREFIX) :], "agent", data))
        else:
            entries.append(PresenceEntry(client_id, "client", data))
    return entries


# -- presence published as messages (REST) ----------------------------------------------------------------------

#: the channel kind of a session's presence log: members entered by backends without a realtime connection
PRESENCE_KIND = "presence"
PRESENCE_ENTER = "enter"
PRESENCE_LEAVE = "leave"
#: seconds a member of the presence log stays present after its latest enter (writers refresh well before)
PRESENCE_TTL_SECONDS = 60.0


def presence_record(member_id: str, data: bytes | None = None) -> str:
    """The data of a presence-log message: the member, and for an enter its data (text, or base64)."""
    record: dict[str, str] = {"member": member_id}
    if data is not None:
        try:
            record["data"] = data.decode()
        except UnicodeDecodeError:
            record["data"] = base64.b64encode(data).decode("ascii")
            record["encoding"] = "base64"
    return json.dumps(record, separators=(",", ":"))


class PresenceLog:
    """The members of a session's presence log, from its messages read newest first.

    A member's latest record decides: an enter less than :data:`PRESENCE_TTL_SECONDS` old makes it present, a
    leave (or an older enter) absent. Older messages cannot change that, so reading stops at the first one.
    """

    def __init__(self, floor: str, now_ms: int) -> None:
        self._floor = floor
        self._horizon = now_ms - int(PRESENCE_TTL_SECONDS * 1000)
        self._decided: set[str] = set()
        self.members: dict[str, bytes] = {}

    def add(self, name: str | None, serial: str | None, timestamp: int | None, data: bytes) -> bool:
        """Take the next older message; ``False`` once older messages cannot change the members."""
        if not serial or serial < self._floor or timestamp is None or timestamp < self._horizon:
            return False
        try:
            record = json.loads(data)
        except ValueError:
            return True
        if not isinstance(record, dict) or not isinstance(member := record.get("member"), str):
            return True
        if member in self._decided:
            return True
        self._decided.add(member)
        if name == PRESENCE_ENTER:
            value = record.get("data")
            text = value if isinstance(value, str) else ""
            self.members[member] = base64.b64decode(text) if record.get("encoding") == "base64" else text.encode()
        return True


# -- URLs --------------------------------------------------------------------------------------------------------


def _float(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {value!r}") from None


def _bool(value: str, name: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigurationError(f"{name} must be true or false, got {value!r}")
    return value.lower() in ("true", "1")


def options_from_url(url: str) -> AblyOptions:
    """The options an ``ably://?key=appId.keyId:secret[&option=value...]`` URL gives.

    Options: ``key`` (or as ``ably://appId.keyId:secret@``) or, for a client, ``token`` (an Ably token or JWT
    string: one of the two is required), ``endpoint`` (e.g. ``127.0.0.1:8080/`` for
    the emulator), ``tls`` (true|false), ``namespace`` (default ``ai``), ``transport`` (realtime|rest),
    ``appends`` (auto|on|off), ``max_message_bytes``, ``rate_limit`` and ``connection_rate_limit`` (0: none),
    ``publish_timeout``, ``attempt_timeout``, ``connect_timeout``, ``poll_interval``, ``tap_limit``.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "ably":
        raise ConfigurationError(f"not an ably:// URL: {url!r}")
    kwargs: dict[str, Any] = {}
    userinfo, _, _host = parts.netloc.rpartition("@")
    if userinfo:
        kwargs["key"] = unquote(userinfo)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("key", "token", "endpoint", "namespace", "transport", "appends"):
            kwargs[key] = value
        elif key == "tls":
            kwargs[key] = _bool(value, key)
        elif key in ("max_message_bytes", "tap_limit"):
            kwargs[key] = int(_float(value, key))
        elif key in ("rate_limit", "connection_rate_limit"):
            rate = _float(value, key)
            kwargs[key] = rate if rate > 0 else None
        elif key in ("publish_timeout", "attempt_timeout", "connect_timeout", "poll_interval"):
            kwargs[key] = _float(value, key)
        else:
            raise ConfigurationError(f"unknown option {key!r} in ably:// URL")
    if "key" not in kwargs and "token" not in kwargs:
        raise ConfigurationError("an ably:// URL needs a key (ably://?key=appId.keyId:secret) or a token (?token=...)")
    return AblyOptions(**kwargs)
