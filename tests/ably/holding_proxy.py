"""A loopback proxy in front of the Ably emulator that can hold a channel's REST history requests.

A client pointed at the proxy's port speaks to the emulator through it: WebSocket connections (the realtime
transport) and REST requests pass through untouched, except a ``GET /channels/{name}/messages`` (history) for a
channel in `hold`, which waits until the test calls `release()`. A test can so make history slow for real, for any
client (ably-js uses its own HTTP stack on Node), and know when the client asked for it (`history_requested`),
without sleeping: it publishes live messages while the request is held and lets it go when it chooses.

HTTP/1.1 keep-alive is honoured: every request on a connection is parsed (head, then a ``Content-Length`` body) so
each one can be held; an ``Upgrade`` request turns the connection into a byte pipe.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from types import TracebackType
from urllib.parse import unquote

__all__ = ["HoldingProxy"]

_HISTORY = re.compile(rb"^GET /channels/([^/?\s]+)/messages(?:\?\S*)? HTTP/1\.[01]$")


class HoldingProxy:
    """Forwards 127.0.0.1:`port` to the emulator on 127.0.0.1:`upstream_port`, holding history of `hold`."""

    def __init__(self, upstream_port: int, hold: Iterable[str] = ()) -> None:
        self.upstream_port = upstream_port
        self.hold = set(hold)
        self.history_requested = asyncio.Event()
        self.held: list[str] = []  # the channels of the history requests that were held, in order
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = False

    @property
    def port(self) -> int:
        assert self._server is not None, "the proxy is not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def release(self) -> None:
        """Let held history requests (and any later ones) through."""
        self._released.set()

    async def __aenter__(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self._closing = True
        self._released.set()
        for writer in list(self._writers):  # ends every pipe: their reads see the connections close
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._closing:
            client_writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._writers.add(upstream_writer)
            async with asyncio.TaskGroup() as group:
                group.create_task(_pipe(upstream_reader, client_writer))
                await self._requests(client_reader, upstream_writer)
        except* (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for writer in (upstream_writer, client_writer):
                if writer is not None:
                    writer.close()
                    self._writers.discard(writer)
            self._tasks.discard(task)

    async def _requests(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> None:
        """Forward the client's requests one by one, holding history; then, after an upgrade, every byte."""
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                upstream.write_eof()
                return
            request_line, *header_lines = head[:-4].split(b"\r\n")
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
            match = _HISTORY.match(request_line)
            if match is not None and unquote(match.group(1).decode()) in self.hold and not self._released.is_set():
                self.held.append(unquote(match.group(1).decode()))
                self.history_requested.set()
                await self._released.wait()
            upstream.write(head + body)
            await upstream.drain()
            if b"upgrade" in headers.get(b"connection", b"").lower():
                await _pipe(reader, upstream)
                return


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        pass
