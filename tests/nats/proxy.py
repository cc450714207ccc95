"""A loopback TCP proxy for fault tests: reset every connection on demand, refuse new ones, or black-hole them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

HOST = "127.0.0.1"


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    swallowed: bool = False  # a black hole: both sockets stay open, every byte is dropped, no FIN, no reset
    aborted: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self) -> None:
        """Drop both sides at once with a TCP reset (SO_LINGER 0), not an orderly FIN."""
        self.aborted.set()
        for writer in (self.client, self.upstream):
            if writer is None or writer.transport.is_closing():
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class TcpProxy:
    """Forward connections accepted on a free 127.0.0.1 port to ``(target_host, target_port)``.

    The proxy owns one task per connection and cancels them all in ``close()``.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._port = 0
        self._server: asyncio.Server | None = None
        self._listening: asyncio.Task[None] | None = None
        self._links: dict[asyncio.Task[None], _Link] = {}
        self._blocked = False

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("proxy not started")
        return self._port

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections currently forwarded to the target."""
        return sum(1 for link in self._links.values() if link.upstream is not None)

    async def start(self) -> None:
        await self._listen(self._bind())

    def set_blocked(self, blocked: bool) -> None:
        """While blocked the proxy does not listen, so new connections are refused; current ones go on.

        (Accepting and then closing would be harsher on clients: nats-py 2.16 leaks the socket of every
        connection that fails during its handshake, which ``filterwarnings = error`` turns into failures.)
        """
        self._blocked = blocked
        if blocked and self._server is not None:
            self._server.close()  # stops listening at once
            self._server = None
        elif not blocked and self._server is None and self._port and (not self._listening or self._listening.done()):
            # Listen now, so connections queue in the backlog; they are accepted once the task has run.
            self._listening = asyncio.get_running_loop().create_task(self._listen(self._bind(self._port)))

    def sever(self) -> None:
        """Reset every current connection, on both sides; new connections are still accepted."""
        for link in self._links.values():
            link.abort()

    def swallow(self) -> None:
        """Black-hole every current connection: a half-open peer, as after a NAT or a host silently lost.

        From now on the proxy reads and drops every byte either side sends; both sockets stay open and neither
        side gets a FIN or a reset (an end of stream on one side is not passed on to the other either), so only
        a timeout at either end can tell. Connections accepted afterwards are forwarded normally. ``sever()``
        and ``close()`` still reset swallowed connections.
        """
        for link in self._links.values():
            link.swallowed = True

    @property
    def swallowed(self) -> int:
        """Current connections that are black-holed."""
        return sum(1 for link in self._links.values() if link.swallowed)

    async def close(self) -> None:
        """Stop listening, reset every connection and wait for the proxy's tasks to finish."""
        if self._listening is not None:
            await self._listening
        if self._server is not None:
            self._server.close()
        self.sever()
        tasks = list(self._links)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _bind(self, port: int = 0) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(100)
        self._port = sock.getsockname()[1]
        return sock

    async def _listen(self, sock: socket.socket) -> None:
        server = await asyncio.start_server(self._accept, sock=sock)
        if self._blocked:  # blocked again before the server started
            server.close()
        else:
            self._server = server

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: asyncio would run a coroutine in a task we do not own.
        link = _Link(writer)
        task = asyncio.get_running_loop().create_task(self._run(reader, link), name=f"tcp-proxy:{self._port}")
        self._links[task] = link
        task.add_done_callback(self._links.pop)

    async def _run(self, client_reader: asyncio.StreamReader, link: _Link) -> None:
        try:
            upstream_reader, link.upstream = await asyncio.open_connection(*self._target)
            async with asyncio.TaskGroup() as group:
                group.create_task(_pump(client_reader, link.upstream, link))
                group.create_task(_pump(upstream_reader, link.client, link))
        except OSError:
            pass  # target unreachable
        finally:
            link.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
    """Copy ``reader`` to ``writer``; when either side ends or fails, tear the whole link down.

    A swallowed link drops what it reads, and an end of stream from either side leaves it open, as a black hole
    would: it ends only when the proxy resets it (``sever()``, ``close()``).
    """
    try:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if link.swallowed:
                    continue
                writer.write(data)
                await writer.drain()
        if link.swallowed:
            await link.aborted.wait()
    finally:
        link.abort()
