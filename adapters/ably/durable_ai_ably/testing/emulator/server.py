"""`AblyEmulator`: the store, auth, REST and realtime sides on one loopback port, with its options and hooks."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute

from durable_ai_ably.testing.emulator.auth import TOKEN_TTL_MS, Authority, EmulatorKey, parse_capability
from durable_ai_ably.testing.emulator.cors import Cors
from durable_ai_ably.testing.emulator.faults import Faults
from durable_ai_ably.testing.emulator.meters import MessageStats, Meters
from durable_ai_ably.testing.emulator.protocol import AblyError
from durable_ai_ably.testing.emulator.realtime import Realtime
from durable_ai_ably.testing.emulator.rest import RestApi
from durable_ai_ably.testing.emulator.store import Store, StoredMessage


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
        retention_limit: int | None = None,
        retention_seconds: float | None = 24 * 60 * 60,
        idempotency_window: float = 120.0,
        max_message_size: int = 65536,
        connection_state_ttl_ms: int = 120_000,
        max_idle_interval_ms: int = 15_000,
        presence_leave_delay: float = 15.0,
        mutable_namespaces: Iterable[str] = (),
        enforce_rate_limits: bool = True,
        channel_rate_limit: int = 50,
        connection_rate_limit: int = 50,
        max_channels_per_connection: int = 200,
        honour_from_serial: bool = False,
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

        `max_channels_per_connection` is how many channels one realtime connection may have attached (200, as on
        Ably; one more is refused with 90010). With `honour_from_serial`, history also takes the camelCase
        ``fromSerial`` (not an Ably parameter) as the serial to page from, inclusive; otherwise it is ignored, as
        Ably ignores it. The package docstring lists every behaviour and the simplifications that remain.
        """
        self._authority = Authority(keys if keys is not None else {"emu.root:secret": None})
        self._instance = secrets.token_hex(4)
        self._meters = Meters(
            enforce=enforce_rate_limits, channel_limit=channel_rate_limit, connection_limit=connection_rate_limit
        )
        self._store = Store(
            instance=self._instance,
            meters=self._meters,
            retention_limit=retention_limit,
            retention_seconds=retention_seconds,
            idempotency_window=idempotency_window,
            max_message_size=max_message_size,
            mutable_namespaces=mutable_namespaces,
        )
        self._faults = Faults()
        self._realtime = Realtime(
            self._store,
            self._authority,
            self._faults,
            server_id=f"emulator-{self._instance}",
            connection_state_ttl_ms=connection_state_ttl_ms,
            max_idle_interval_ms=max_idle_interval_ms,
            presence_leave_delay=presence_leave_delay,
            max_channels_per_connection=max_channels_per_connection,
        )
        self._rest = RestApi(self._store, self._authority, self._faults, honour_from_serial=honour_from_serial)
        self._server: _Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.port = port

    @property
    def keys(self) -> dict[str, EmulatorKey]:
        """The app's API keys by name (``appId.keyId``)."""
        return self._authority.keys

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
            routes=[WebSocketRoute("/", self._realtime.websocket), *self._rest.routes()],
            middleware=[Middleware(Cors)],
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
        self._realtime.close()
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
            key = self._authority.default_key.key
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
        ttl_ms: int = TOKEN_TTL_MS,
    ) -> dict[str, Any]:
        """Issue a token directly, as TokenDetails JSON; an ``auth_callback`` may return it as it is."""
        key_name = (key or self._authority.default_key.key).partition(":")[0]
        emulator_key = self._authority.keys.get(key_name)
        if emulator_key is None:
            raise KeyError(f"no key named {key_name!r}")
        requested = parse_capability(capability) if capability is not None else emulator_key.capability
        return self._authority.issue(emulator_key, requested, client_id, ttl_ms).token_details()

    # ------------------------------------------------------------------------------------------------ fault hooks

    def drop_connections(self, connection_id: str | None = None, *, expire: bool = False) -> int:
        """Close every WebSocket (or only the one of `connection_id`) at once (close code 1011, no CLOSED).

        Clients see a dropped transport and resume. With `expire`, the connections are forgotten too, as when a
        client stays away longer than connectionStateTtl (2 minutes on Ably): its resume fails with 80008, it gets
        a new connection, and its channels attach again without continuity.
        """
        return self._realtime.drop(connection_id, expire=expire)

    def disconnect_connections(self, error: AblyError | None = None) -> int:
        """Send DISCONNECTED (with an error, which ably-python needs to act on it) and close every WebSocket."""
        return self._realtime.disconnect(error or AblyError("Connection disconnected by the emulator", 80003, 400))

    def refuse_connections(self, refuse: bool = True) -> None:
        """While refusing, WebSocket handshakes fail, as when Ably cannot be reached: clients stay disconnected
        (and become suspended after connectionStateTtl) until it stops. REST is not affected."""
        self._faults.refusing = refuse

    def fail_next_rest(self, status: int = 503, count: int = 1, *, path_prefix: str | None = None) -> None:
        """Answer the next `count` REST requests (whose path starts with `path_prefix`, if given) with `status`."""
        self._faults.fail_next_rest(status, count, path_prefix)

    @property
    def pending_rest_failures(self) -> int:
        """How many failures asked for with `fail_next_rest` no request has met yet."""
        return self._faults.pending_rest_failures

    def nack_next(self, count: int = 1, *, code: int = 50000, status: int = 500, message: str = "") -> None:
        """NACK the next `count` realtime publishes instead of storing them."""
        self._faults.nack_next(count, code, status, message)

    # ----------------------------------------------------------------------------------------------- inspection

    def messages(self, channel: str) -> list[StoredMessage]:
        """What is stored on a channel, oldest first (updated messages in their latest version)."""
        ch = self._store.get(channel)
        return list(ch.messages) if ch else []

    def presence_members(self, channel: str) -> list[tuple[str, str, Any]]:
        """The presence set of a channel as ``(clientId, connectionId, data)``, in the order members entered."""
        ch = self._store.get(channel)
        return [(m.client_id, m.connection_id, m.data) for m in ch.members.values()] if ch else []

    def is_mutable(self, channel: str) -> bool:
        """Whether the channel's namespace has mutable messages (updates, deletes, appends) enabled."""
        return self._store.is_mutable(channel)

    @property
    def connection_count(self) -> int:
        """How many WebSockets are open."""
        return self._realtime.connection_count

    # ------------------------------------------------------------------------------------------------ statistics

    def channel_stats(self, channel: str) -> MessageStats:
        """What `channel` stored since the emulator started (or `reset_stats`): creates and operations, peak rate."""
        return self._meters.channel_stats(channel)

    def connection_stats(self) -> dict[str, MessageStats]:
        """The messages each realtime connection published (its inbound messages), by connection id.

        Only connections that published are listed; REST publishes have no connection and count for the channel only.
        """
        return self._meters.connection_stats()

    def reset_stats(self) -> None:
        """Forget every count: `channel_stats` and `connection_stats` start from zero."""
        self._meters.reset()
