"""The loopback nats-server helpers and the fault-injection proxy, against real servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from durable_ai_nats.testing import NatsCluster, NatsServer
from tests.nats.proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def server() -> AsyncIterator[NatsServer]:
    async with NatsServer() as server:
        yield server


async def _ignore(_: Exception) -> None:
    pass


async def _echo(msg: Msg) -> None:
    await msg.respond(msg.data)


async def _wait(event: asyncio.Event) -> None:
    async with asyncio.timeout(10):
        await event.wait()


async def _until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110 - polls a plain counter
            await asyncio.sleep(0.01)


async def test_server_keeps_jetstream_data_across_a_crash(server: NatsServer) -> None:
    assert server.url == f"nats://127.0.0.1:{server.port}"
    assert server.pid is not None
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        for i in range(5):
            await js.publish("keep.x", f"m{i}".encode())
    finally:
        await nc.close()

    pid, port, store = server.pid, server.port, server.store_dir
    await server.kill()
    assert server.pid is None
    await server.restart()
    assert server.pid not in (None, pid)
    assert (server.port, server.store_dir) == (port, store)

    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        assert (await js.stream_info("KEEP")).state.messages == 5
        assert (await js.get_msg("KEEP", 5)).data == b"m4"
    finally:
        await nc.close()


async def test_server_takes_extra_config_and_cleans_up() -> None:
    config = "authorization { users = [ { user: alice, password: secret } ] }"
    async with NatsServer(config=config, server_name="authy") as server:
        work_dir = server.log_file.parent
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            info = json.loads((await reader.readline()).removeprefix(b"INFO "))
        finally:
            writer.close()
            await writer.wait_closed()
        assert info["auth_required"] is True
        assert info["server_name"] == "authy"
        assert info["jetstream"] is True
        nc = await nats.connect(server.url, user="alice", password="secret")
        try:
            assert (await nc.jetstream().account_info()).streams == 0
        finally:
            await nc.close()
        assert work_dir.is_dir()
    assert server.pid is None
    assert not work_dir.exists()


async def _connect_counting(url: str) -> tuple[Client, asyncio.Event, asyncio.Event, list[Exception]]:
    """A client that reconnects quickly and reports its disconnects, reconnects and errors."""
    disconnected, reconnected, errors = asyncio.Event(), asyncio.Event(), list[Exception]()

    async def on_disconnect() -> None:
        reconnected.clear()
        disconnected.set()

    async def on_reconnect() -> None:
        disconnected.clear()
        reconnected.set()

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(
        url,
        reconnect_time_wait=0.05,
        max_reconnect_attempts=-1,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
    )
    return nc, disconnected, reconnected, errors


async def test_proxy_forwards_and_sever_forces_a_reconnect(server: NatsServer) -> None:
    async with TcpProxy("127.0.0.1", server.port) as proxy:
        assert proxy.url == f"nats://127.0.0.1:{proxy.port}"
        nc, disconnected, reconnected, errors = await _connect_counting(proxy.url)
        try:
            await nc.subscribe("echo", cb=_echo)
            assert (await nc.request("echo", b"one", timeout=5)).data == b"one"
            assert proxy.connections == 1

            proxy.sever()
            await _wait(disconnected)
            await _wait(reconnected)
            assert proxy.connections == 1
            assert (await nc.request("echo", b"two", timeout=5)).data == b"two"

            proxy.set_blocked(True)
            proxy.sever()
            await _wait(disconnected)
            refused = len([e for e in errors if isinstance(e, ConnectionRefusedError)])
            await _until(lambda: len([e for e in errors if isinstance(e, ConnectionRefusedError)]) >= refused + 2)
            assert not reconnected.is_set() and proxy.connections == 0

            proxy.set_blocked(False)
            await _wait(reconnected)
            assert proxy.connections == 1
            assert (await nc.request("echo", b"three", timeout=5)).data == b"three"
        finally:
            await nc.close()
        await _until(lambda: proxy.connections == 0)


async def _publish_eventually(js: JetStreamContext, subject: str, data: bytes) -> None:
    """Publish, retrying while the stream has no leader or no route to it (a failover takes seconds)."""
    async with asyncio.timeout(20):
        while True:
            try:
                await js.publish(subject, data, timeout=1)
                return
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.05)


async def test_cluster_keeps_an_r3_stream_writable_when_a_node_dies() -> None:
    async with NatsCluster(3) as cluster:
        assert len(set(cluster.urls)) == 3
        nc = await nats.connect(cluster.urls, reconnect_time_wait=0.1, error_cb=_ignore)
        try:
            js = nc.jetstream(timeout=5)
            info = await js.add_stream(name="R3", subjects=["r3.>"], num_replicas=3)
            # Right after creation the stream's interest may not have reached every server yet.
            await _publish_eventually(js, "r3.a", b"before")
            assert info.cluster is not None and info.cluster.leader is not None
            leader = cluster.servers[int(info.cluster.leader.removeprefix("n")) - 1]

            await leader.kill()  # the stream leader: the other two must elect a new one
            await _publish_eventually(js, "r3.a", b"after")
            assert (await js.stream_info("R3")).state.messages == 2

            await leader.restart()  # rejoins: healthy once it knows the leader, then its replica catches up
            assert leader.pid is not None
            counts: list[int] = []
            async with asyncio.timeout(20):
                while counts != [2]:
                    jsz = await leader.monitor("/jsz?streams=true")
                    counts = [s["state"]["messages"] for a in jsz["account_details"] for s in a["stream_detail"]]
                    await asyncio.sleep(0.05)
            assert counts == [2]
        finally:
            await nc.close()
