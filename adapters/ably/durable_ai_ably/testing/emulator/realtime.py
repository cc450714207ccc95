"""Ably's realtime protocol over WebSocket: connections and their resume, attach and detach, publish with ACK or
NACK, presence with SYNC, AUTH and heartbeats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack  # type: ignore[import-untyped]
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from durable_ai_ably.testing.emulator.auth import Authority, Credential, allows, any_op, denied, query_token
from durable_ai_ably.testing.emulator.faults import Faults
from durable_ai_ably.testing.emulator.protocol import (
    ACK,
    ATTACH,
    ATTACHED,
    AUTH,
    CLOSE,
    CLOSED,
    CONNECTED,
    DETACH,
    DETACHED,
    DISCONNECTED,
    ERROR,
    FLAG_HAS_BACKLOG,
    FLAG_HAS_PRESENCE,
    FLAG_PRESENCE,
    FLAG_PRESENCE_SUBSCRIBE,
    FLAG_PUBLISH,
    FLAG_RESUMED,
    FLAG_SUBSCRIBE,
    HEARTBEAT,
    MESSAGE,
    NACK,
    PRESENCE,
    PRESENCE_ENTER,
    PRESENCE_LEAVE,
    PRESENCE_PRESENT,
    PRESENCE_UPDATE,
    PROTOCOL_VERSIONS,
    SYNC,
    SYNC_PAGE,
    UNSUPPORTED_ACTIONS,
    AblyError,
    now_ms,
)
from durable_ai_ably.testing.emulator.store import Channel, Member, Store, StoredMessage


class Transport:
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

    def drop(self) -> bool:
        """Close the socket abnormally (1011) at once, dropping what is queued; False if it was closed already."""
        if self.closed:
            return False
        self.closed = True
        self.outgoing.put_nowait({"__drop__": True})
        return True


class Session:
    """A realtime connection: it outlives its WebSocket for connectionStateTtl, so a client can resume it."""

    def __init__(self, connection_id: str, credential: Credential, echo: bool) -> None:
        self.id = connection_id
        self.key = f"{connection_id}!{secrets.token_urlsafe(12)}"
        self.credential = credential
        self.echo = echo
        self.transport: Transport | None = None
        self.attached: set[str] = set()
        #: msgSerial -> serials it was acknowledged with, so a resent message is acknowledged, not republished
        self.acked: dict[int, list[str | None]] = {}
        self.detached_at: float | None = None
        #: fires when the credential's token expires
        self.expiry: asyncio.TimerHandle | None = None

    def stop_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Session) and other.id == self.id


class Realtime:
    """Every realtime connection of the emulator and the channels they are attached to."""

    def __init__(
        self,
        store: Store,
        authority: Authority,
        faults: Faults,
        *,
        server_id: str,
        connection_state_ttl_ms: int,
        max_idle_interval_ms: int,
        presence_leave_delay: float,
        max_channels_per_connection: int,
    ) -> None:
        self.store = store
        self.authority = authority
        self.faults = faults
        self.server_id = server_id
        self.connection_state_ttl_ms = connection_state_ttl_ms
        self.max_idle_interval_ms = max_idle_interval_ms
        self.presence_leave_delay = presence_leave_delay
        self.max_channels_per_connection = max_channels_per_connection
        self._sessions: dict[str, Session] = {}
        self._transports: set[Transport] = set()
        #: channel name -> the sessions attached to it
        self._attachments: dict[str, set[Session]] = {}
        self._connection_counter = itertools.count(1)
        self._leave_timers: dict[str, asyncio.TimerHandle] = {}
        self._sync_counter = itertools.count(1)
        self._expire_on_drop: set[str] = set()
        self._synthetic_counter = itertools.count(1)
        store.add_listener(self._deliver)

    # ------------------------------------------------------------------------------------------------ control

    @property
    def connection_count(self) -> int:
        """How many WebSockets are open."""
        return sum(1 for t in self._transports if not t.closed)

    def close(self) -> None:
        """Close every WebSocket normally and cancel pending presence leaves and token expiries."""
        for timer in self._leave_timers.values():
            timer.cancel()
        self._leave_timers.clear()
        for session in self._sessions.values():
            session.stop_expiry()
        for transport in list(self._transports):
            transport.close()

    def drop(self, connection_id: str | None = None, *, expire: bool = False) -> int:
        """Close every WebSocket (or that of `connection_id`) abnormally; with `expire`, forget their connections."""
        if expire:
            self._expire_on_drop.update(
                s.id for s in self._sessions.values() if connection_id is None or s.id == connection_id
            )
        only: Transport | None = None
        if connection_id is not None:
            session = self._sessions.get(connection_id)
            only = session.transport if session is not None else None
            if only is None:
                return 0
        return sum(
            1 for transport in list(self._transports) if (only is None or transport is only) and transport.drop()
        )

    def disconnect(self, error: AblyError) -> int:
        """Send DISCONNECTED with `error` and close every WebSocket."""
        count = 0
        for transport in list(self._transports):
            if not transport.closed:
                transport.send({"action": DISCONNECTED, "error": error.to_dict()})
                transport.close()
                count += 1
        return count

    def _attached(self, channel: str) -> set[Session]:
        return self._attachments.setdefault(channel, set())

    def _unattach_all(self, session: Session) -> None:
        for name in session.attached:
            self._attached(name).discard(session)
        session.attached.clear()

    # ------------------------------------------------------------------------------------------------ transport

    async def websocket(self, websocket: WebSocket) -> None:
        """Serve one WebSocket: the connection request in its URL, then its protocol messages until it closes."""
        if self.faults.refusing:
            await websocket.close()  # before the handshake completes: the client cannot connect
            return
        params = websocket.query_params
        binary = params.get("format") == "msgpack"
        await websocket.accept()
        transport = Transport(websocket, binary)
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
                    session.stop_expiry()
                    session.transport = None
                    session.detached_at = time.monotonic()
                    self._unattach_all(session)
                    self._schedule_leave(session.id)
            for sid in [sid for sid in self._expire_on_drop if sid in self._sessions]:
                if self._sessions[sid].transport is None:
                    self._expire_on_drop.discard(sid)
                    del self._sessions[sid]

    def _open_session(self, transport: Transport, params: Mapping[str, str]) -> Session | None:
        """Answer the connection request in the URL: CONNECTED, or ERROR and close."""
        try:
            if params.get("v") not in PROTOCOL_VERSIONS:
                raise AblyError(f"Unsupported protocol version {params.get('v')!r}", 40000, 400)
            token = query_token(params)
            if token is not None:
                credential = self.authority.for_token(token)
            elif "key" in params:
                credential = self.authority.for_key(params["key"], params.get("clientId"))
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
        session: Session | None = None
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
            session = Session(f"emu{next(self._connection_counter)}-{secrets.token_hex(4)}", credential, True)
            self._sessions[session.id] = session
        session.credential = credential
        session.echo = params.get("echo", "true") != "false"
        session.transport = transport
        session.detached_at = None
        timer = self._leave_timers.pop(session.id, None)
        if timer is not None:
            timer.cancel()
        self._unattach_all(session)
        transport.send(self._connected(session, resume_error))
        self._watch_expiry(session)
        return session

    def _watch_expiry(self, session: Session) -> None:
        """When the connection's token expires, Ably sends DISCONNECTED (40142) and closes the transport: the client
        renews its token and resumes the connection."""
        session.stop_expiry()
        expires, transport = session.credential.expires, session.transport
        if expires is None or transport is None:
            return

        def expire() -> None:
            session.expiry = None
            if session.transport is transport and not transport.closed:
                transport.send({"action": DISCONNECTED, "error": AblyError("Token expired", 40142, 401).to_dict()})
                transport.close()

        delay = max(0.0, (expires - now_ms()) / 1000)
        session.expiry = asyncio.get_running_loop().call_later(delay, expire)

    def _connected(self, session: Session, error: AblyError | None = None) -> dict[str, Any]:
        details: dict[str, Any] = {
            "connectionKey": session.key,
            "maxMessageSize": self.store.max_message_size,
            "maxFrameSize": 524288,
            "maxInboundRate": 50,
            "connectionStateTtl": self.connection_state_ttl_ms,
            "maxIdleInterval": self.max_idle_interval_ms,
            "serverId": self.server_id,
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

    async def _write_loop(self, transport: Transport) -> None:
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

    async def _read_loop(self, transport: Transport, session: Session) -> None:
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

    def _on_protocol_message(self, transport: Transport, session: Session, message: dict[str, Any]) -> None:
        action = message.get("action")
        channel = message.get("channel")
        if action == HEARTBEAT:
            reply: dict[str, Any] = {"action": HEARTBEAT}
            if message.get("id") is not None:
                reply["id"] = message["id"]
            transport.send(reply)
        elif action == CLOSE:
            session.stop_expiry()
            transport.send({"action": CLOSED})
            transport.close()
            session.transport = None
            for name in session.attached:
                self._attached(name).discard(session)
            self._sessions.pop(session.id, None)
            self._leave_connection(session.id)
        elif action == ATTACH and isinstance(channel, str):
            self._attach(transport, session, channel, message)
        elif action == DETACH and isinstance(channel, str):
            session.attached.discard(channel)
            self._attached(channel).discard(session)
            self._leave_connection(session.id, channel)
            transport.send({"action": DETACHED, "channel": channel})
        elif action == PRESENCE and isinstance(channel, str):
            self._realtime_presence(transport, session, channel, message)
        elif action == MESSAGE and isinstance(channel, str):
            self._realtime_publish(transport, session, channel, message)
        elif action == AUTH:
            self._reauthorize(transport, session, message)
        elif action in UNSUPPORTED_ACTIONS:
            serial = message.get("msgSerial")
            unsupported = AblyError("The emulator does not support this action", 40000, 400)
            if serial is not None:
                transport.send({"action": NACK, "msgSerial": serial, "count": 1, "error": unsupported.to_dict()})

    def _reauthorize(self, transport: Transport, session: Session, message: dict[str, Any]) -> None:
        """In-band AUTH (``auth.accessToken``, a token or JWT): the connection takes the new credential, with its
        capability and expiry, and is answered with CONNECTED; a bad token fails it, another clientId is 40102."""
        auth = message.get("auth")
        token = auth.get("accessToken") if isinstance(auth, Mapping) else None
        try:
            if not isinstance(token, str) or not token:
                raise AblyError("AUTH without auth.accessToken", 40101, 401)
            credential = self.authority.for_token(token)
            old = session.credential.client_id
            if old is not None and credential.client_id != old:
                raise AblyError(f"Mismatched clientId for existing connection: {credential.client_id!r}", 40102, 401)
        except AblyError as error:
            transport.send({"action": ERROR, "error": error.to_dict()})
            transport.close()
            return
        session.credential = credential
        transport.send(self._connected(session))
        self._watch_expiry(session)

    # ------------------------------------------------------------------------------------------------ channels

    def _attach(self, transport: Transport, session: Session, channel: str, message: dict[str, Any]) -> None:
        capability = session.credential.capability
        if not any_op(capability, channel):
            transport.send({"action": ERROR, "channel": channel, "error": denied("attach", channel).to_dict()})
            return
        if channel not in session.attached and len(session.attached) >= self.max_channels_per_connection:
            limit = self.max_channels_per_connection
            error = AblyError(f"Maximum number of channels per connection ({limit}) exceeded", 90010, 400)
            transport.send({"action": ERROR, "channel": channel, "error": error.to_dict()})
            return
        store = self.store
        ch = store.channel(channel)
        store.trim(ch)
        params = message.get("params") or {}
        flags = 0
        if allows(capability, channel, "publish"):
            flags |= FLAG_PUBLISH
        subscribe = allows(capability, channel, "subscribe")
        if subscribe:
            flags |= FLAG_SUBSCRIBE | FLAG_PRESENCE_SUBSCRIBE
        if allows(capability, channel, "presence"):
            flags |= FLAG_PRESENCE
        backlog: list[StoredMessage] = []
        since = message.get("channelSerial")
        if isinstance(since, str) and since:
            if since >= ch.evicted_upto:
                flags |= FLAG_RESUMED
                backlog = [m for m in ch.log if m.position > since]
        elif params.get("rewind"):
            backlog = store.rewind(ch, str(params["rewind"]))
        if backlog:
            flags |= FLAG_HAS_BACKLOG
        members = list(ch.members.values()) if subscribe else []
        if members:
            flags |= FLAG_HAS_PRESENCE
        attached: dict[str, Any] = {
            "action": ATTACHED,
            "channel": channel,
            "channelSerial": store.last_serial(ch) if not backlog else store.before(ch, backlog[0].position),
            "flags": flags,
        }
        if params:
            attached["params"] = params
        transport.send(attached)
        if members:
            # The presence set follows ATTACHED in SYNC messages whose channelSerial is "<syncId>:<cursor>"; an
            # empty cursor marks the last one (ably-python RealtimePresence.set_presence).
            sync_id = f"sync{next(self._sync_counter)}"
            pages = [members[i : i + SYNC_PAGE] for i in range(0, len(members), SYNC_PAGE)]
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
        self._attached(channel).add(session)

    def _realtime_publish(self, transport: Transport, session: Session, channel: str, message: dict[str, Any]) -> None:
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
        nack = self.faults.take_nack()
        if nack is not None:
            transport.send({"action": NACK, "msgSerial": serial, "count": 1, "error": nack.to_dict()})
            return
        try:
            serials = self.store.publish(
                channel,
                [m for m in raw_messages if isinstance(m, Mapping)],
                credential=session.credential,
                id_prefix=f"{session.id}:{serial}",
                connection_id=session.id,
            )
        except AblyError as error:
            transport.send({"action": NACK, "msgSerial": serial, "count": 1, "error": error.to_dict()})
            return
        session.acked[serial] = serials
        if len(session.acked) > 1000:
            for old in sorted(session.acked)[:-1000]:
                del session.acked[old]
        transport.send({"action": ACK, "msgSerial": serial, "count": 1, "res": [{"serials": serials}]})

    def _deliver(self, ch: Channel, new: list[StoredMessage], id_prefix: str, connection_id: str | None) -> None:
        """Send a publish's events to every connection attached to the channel that may subscribe."""
        for session in list(self._attached(ch.name)):
            transport = session.transport
            if transport is None or transport.closed:
                continue
            if session.id == connection_id and not session.echo:
                continue
            if not allows(session.credential.capability, ch.name, "subscribe"):
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

    # ------------------------------------------------------------------------------------------------ presence

    def _realtime_presence(self, transport: Transport, session: Session, channel: str, message: dict[str, Any]) -> None:
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
            self._broadcast_presence(self.store.channel(channel), events, session.id)

    def _apply_presence(
        self, session: Session, channel: str, raw: Sequence[Mapping[str, Any]], msg_serial: int
    ) -> list[tuple[int, Member]]:
        credential = session.credential
        if not allows(credential.capability, channel, "presence"):
            raise denied("presence", channel)
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
        ch = self.store.channel(channel)
        now = now_ms()
        events: list[tuple[int, Member]] = []
        for index, (action, client_id, p) in enumerate(changes):
            # A client re-entering after an attach (RTP17g) sends the id it was given; keep that one.
            given = p.get("id")
            if not (isinstance(given, str) and given.startswith(f"{session.id}:") and given.count(":") >= 2):
                given = f"{session.id}:{msg_serial}:{index}"
            member = Member(
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

    def _broadcast_presence(self, ch: Channel, events: list[tuple[int, Member]], connection_id: str) -> None:
        for session in list(self._attached(ch.name)):
            transport = session.transport
            if transport is None or transport.closed:
                continue
            if not allows(session.credential.capability, ch.name, "subscribe"):
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
        channels = self.store.channels
        chosen = [channels[channel]] if channel in channels else []
        if channel is None:
            chosen = list(channels.values())
        for ch in chosen:
            gone = [m for m in ch.members.values() if m.connection_id == connection_id]
            if not gone:
                continue
            now = now_ms()
            events: list[tuple[int, Member]] = []
            for member in gone:
                del ch.members[member.key]
                # An id that does not start with "<connectionId>:" marks a leave as synthesized (RTP2b1), so clients
                # compare it with the member's entry by timestamp.
                leave = dataclasses.replace(
                    member, id=f"synthesized-{next(self._synthetic_counter)}:0:0", timestamp=now
                )
                events.append((PRESENCE_LEAVE, leave))
            self._broadcast_presence(ch, events, connection_id)
