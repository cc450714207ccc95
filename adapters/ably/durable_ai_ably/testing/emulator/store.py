"""Channels and what they hold: stored messages, serials, retention, idempotency and mutable-message operations."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from durable_ai_ably.testing.emulator.auth import Credential, allows, denied
from durable_ai_ably.testing.emulator.meters import Meters
from durable_ai_ably.testing.emulator.protocol import (
    ACTION_NAMES,
    MESSAGE_APPEND,
    MESSAGE_CREATE,
    MESSAGE_DELETE,
    MESSAGE_UPDATE,
    AblyError,
    now_ms,
    wire_data,
)


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
        data, encoding = wire_data(self.data, self.encoding, binary)
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
class Member:
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
        data, encoding = wire_data(self.data, self.encoding, binary)
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


@dataclass
class Channel:
    name: str
    messages: deque[StoredMessage] = field(default_factory=deque)
    #: serial of the newest message dropped by retention; a resume from before it cannot be continuous
    evicted_upto: str = ""
    #: message id -> (serial, time stored in ms), for idempotent publishing
    ids: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: every create/update/delete/append as delivered, in channel order (by `position`), for resuming attachments
    log: deque[StoredMessage] = field(default_factory=deque)
    #: current presence members by member key (``connectionId:clientId``)
    members: dict[str, Member] = field(default_factory=dict)
    #: the millisecond and the counter within it of the channel's latest serial
    serial_ts: int = 0
    serial_seq: int = -1


#: what is told of every publish: the channel, its new events, the protocol message id and the publishing connection
PublishListener = Callable[[Channel, list[StoredMessage], str, str | None], None]


def append_data(
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


def check_ids(messages: Sequence[Mapping[str, Any]]) -> None:
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


class Store:
    """Every channel of the app: publishing (creates and operations), retention and the serials that order them."""

    def __init__(
        self,
        *,
        instance: str,
        meters: Meters,
        retention_limit: int | None,
        retention_seconds: float | None,
        idempotency_window: float,
        max_message_size: int,
        mutable_namespaces: Iterable[str],
    ) -> None:
        self.instance = instance
        self.meters = meters
        #: messages a channel keeps at most (``None``: as many as its retention time allows, as on Ably)
        self.retention_limit = retention_limit if retention_limit is not None else sys.maxsize
        self.retention_seconds = retention_seconds
        self.idempotency_window = idempotency_window
        self.max_message_size = max_message_size
        self.mutable_namespaces = frozenset(mutable_namespaces)
        self.channels: dict[str, Channel] = {}
        self._listeners: list[PublishListener] = []
        self._base_serial = self._serial_at(0, 0, 0)

    def add_listener(self, listener: PublishListener) -> None:
        """Tell `listener` of every publish (realtime delivers to attached connections this way)."""
        self._listeners.append(listener)

    def is_mutable(self, channel: str) -> bool:
        """Whether the channel's namespace has mutable messages (updates, deletes, appends) enabled."""
        return channel.split(":", 1)[0] in self.mutable_namespaces

    def get(self, name: str) -> Channel | None:
        return self.channels.get(name)

    def channel(self, name: str) -> Channel:
        ch = self.channels.get(name)
        if ch is None:
            ch = self.channels[name] = Channel(name)
        return ch

    # ------------------------------------------------------------------------------------------------ serials

    def _serial_at(self, ts: int, seq: int, index: int) -> str:
        return f"{ts:014d}-{seq:03d}@{self.instance}:{index:03d}"

    def _next_serials(self, ch: Channel, count: int) -> list[tuple[str, int]]:
        """Serials (and their times) for `count` messages published together on `ch`, as Ably forms them.

        ``<ms>-<counter>@<server>:<index>``: the 14-digit time, a 3-digit counter of the publishes in that millisecond
        on this channel, and the message's index in its publish. Serials order a channel's messages and operations
        as strings. Counter and index keep 3 digits, so that order never breaks: the 1001st publish in a millisecond
        takes the next millisecond, and a publish of more than 1000 messages takes a new counter per 1000.
        """
        serials: list[tuple[str, int]] = []
        for number in range(count):
            index = number % 1000
            if index == 0:
                ts = max(now_ms(), ch.serial_ts)
                seq = ch.serial_seq + 1 if ts == ch.serial_ts else 0
                if seq > 999:
                    ts, seq = ts + 1, 0
                ch.serial_ts, ch.serial_seq = ts, seq
            serials.append((self._serial_at(ch.serial_ts, ch.serial_seq, index), ch.serial_ts))
        return serials

    def last_serial(self, ch: Channel) -> str:
        """The channel's position: the serial of its newest event (an attachment's ``channelSerial``)."""
        if ch.log:
            return ch.log[-1].position
        return ch.evicted_upto or self._base_serial

    def before(self, ch: Channel, position: str) -> str:
        """The channel position just before `position`: where an attachment that continues with it stands."""
        previous = ch.evicted_upto or self._base_serial
        for event in ch.log:
            if event.position >= position:
                break
            previous = event.position
        return previous

    # ------------------------------------------------------------------------------------------------ retention

    def trim(self, ch: Channel, now: int | None = None) -> None:
        """Drop what retention (count and age) and the idempotency window no longer keep."""
        now = now_ms() if now is None else now
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

    @staticmethod
    def rewind(ch: Channel, rewind: str) -> list[StoredMessage]:
        """The messages an attach with ``params.rewind`` (a count, or a time like ``30s``, ``2m``) replays."""
        match = re.fullmatch(r"(\d+)\s*([smh]?)", rewind.strip())
        if match is None:
            return []
        amount, unit = int(match.group(1)), match.group(2)
        if not unit:
            return list(ch.messages)[-amount:] if amount else []
        seconds = amount * {"s": 1, "m": 60, "h": 3600}[unit]
        horizon = now_ms() - seconds * 1000
        return [m for m in ch.messages if m.timestamp >= horizon][-100:]

    # ------------------------------------------------------------------------------------------------ publishing

    def publish(
        self,
        channel: str,
        raw_messages: Sequence[Mapping[str, Any]],
        *,
        credential: Credential,
        id_prefix: str,
        connection_id: str | None = None,
    ) -> list[str | None]:
        """Store messages (dropping ids already seen within the idempotency window), deliver them, return serials.

        A message whose ``action`` is update, delete or append changes the stored message named by its ``serial``;
        its serial in the result is the serial of the new version.
        """
        creates = {i for i, m in enumerate(raw_messages) if m.get("action") in (None, MESSAGE_CREATE)}
        if creates and not allows(credential.capability, channel, "publish"):
            raise denied("publish", channel)
        size = sum(len(json.dumps(m.get("data"), default=str)) + len(str(m.get("name") or "")) for m in raw_messages)
        if size > self.max_message_size:
            raise AblyError(f"Maximum message length exceeded (size {size}, max {self.max_message_size})", 40009, 400)
        check_ids([raw_messages[i] for i in sorted(creates)])
        default_client = credential.client_id if credential.client_id not in (None, "*") else None
        for m in raw_messages:
            client_id = m.get("clientId")
            if client_id is not None and default_client is not None and client_id != default_client:
                raise AblyError(f"Mismatched clientId {client_id!r} for this connection", 40012, 400)
        ch = self.channel(channel)
        self.trim(ch)
        # Check every operation before changing anything: a protocol message is accepted or refused as a whole.
        for index, m in enumerate(raw_messages):
            if index not in creates:
                self._check_operation(ch, m, credential)
        counted = sum(
            1
            for index, m in enumerate(raw_messages)
            if index not in creates or not (isinstance(m.get("id"), str) and m["id"] in ch.ids)
        )
        self.meters.check(ch.name, counted, connection_id)
        # One serial (counter) for the publish, an index for each message it stores: a duplicate gets none.
        fresh = iter(self._next_serials(ch, counted))
        serials: list[str | None] = []
        new: list[StoredMessage] = []
        for index, m in enumerate(raw_messages):
            if index not in creates:
                event = self._apply_operation(ch, m, credential, connection_id, next(fresh))
                new.append(event)
                serials.append(event.position)
                continue
            message_id = m.get("id")
            if isinstance(message_id, str) and message_id in ch.ids:
                serials.append(ch.ids[message_id][0])
                continue
            serial, ts = next(fresh)
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
        self.trim(ch)
        kinds = [ACTION_NAMES.get(m.action, str(m.action)) for m in new]
        self.meters.count(ch.name, connection_id, kinds, duplicates=len(raw_messages) - len(new))
        if new:
            for listener in self._listeners:
                listener(ch, new, id_prefix, connection_id)
        return serials

    def find(self, ch: Channel, serial: Any) -> StoredMessage:
        """The stored message (latest version) whose serial is `serial`, or 40400."""
        if isinstance(serial, str) and serial:
            for stored in reversed(ch.messages):
                if stored.serial == serial:
                    return stored
        raise AblyError(f"Message not found: no message with serial {serial!r} on channel {ch.name!r}", 40400, 404)

    def _check_operation(self, ch: Channel, m: Mapping[str, Any], credential: Credential) -> None:
        """Refuse an update, delete or append the way Ably does: channel rule, then capability, then target."""
        action = m.get("action")
        if action not in (MESSAGE_UPDATE, MESSAGE_DELETE, MESSAGE_APPEND):
            raise AblyError(f"Invalid message action {action!r}", 40003, 400)
        if not self.is_mutable(ch.name):
            raise AblyError(
                "Can only update/delete/append messages on channels with mutableMessages enabled", 93002, 400
            )
        target = self.find(ch, m.get("serial"))
        kind = "delete" if action == MESSAGE_DELETE else "update"
        own = credential.client_id not in (None, "*") and credential.client_id == target.client_id
        if not (
            allows(credential.capability, ch.name, f"message-{kind}-any")
            or (own and allows(credential.capability, ch.name, f"message-{kind}-own"))
        ):
            raise denied(f"message-{kind}-{'own' if own else 'any'}", ch.name)
        if action == MESSAGE_APPEND:
            append_data(target.data, target.encoding, m.get("data"), m.get("encoding") or None)

    def _apply_operation(
        self,
        ch: Channel,
        m: Mapping[str, Any],
        credential: Credential,
        connection_id: str | None,
        version: tuple[str, int],
    ) -> StoredMessage:
        """Change the stored message and return the event subscribers receive (for an append: just the fragment)."""
        action = int(m["action"])
        target = self.find(ch, m.get("serial"))
        version_serial, version_ts = version
        details: dict[str, Any] = {}
        raw_version = m.get("version")
        if isinstance(raw_version, Mapping):
            details = {k: raw_version[k] for k in ("clientId", "description", "metadata") if k in raw_version}
        default_client = credential.client_id if credential.client_id not in (None, "*") else None
        if "clientId" not in details and (m.get("clientId") or default_client):
            details["clientId"] = m.get("clientId") or default_client
        data, encoding = m.get("data"), m.get("encoding") or None
        if action == MESSAGE_APPEND:
            target.data, target.encoding = append_data(target.data, target.encoding, data, encoding)
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
