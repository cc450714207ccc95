"""Faults on a real nats-server: crashes of the server, severed connections, a cluster node lost.

In each test an agent writes a long answer while a client follows it live; something breaks several times in
the middle; the client's reassembled text must equal the agent's, with every event once and the run ending
``completed``. Waits are on events with timeouts, never on sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import durable_ai
from durable_ai.testing import stored_events
from durable_ai.testing.scenarios import collect
from durable_ai_nats import NatsBackend, names
from durable_ai_nats.testing import NatsCluster, NatsServer
from tests.faults import assert_stored_once, assert_whole, scenario
from tests.nats.proxy import TcpProxy


@pytest.fixture
async def server() -> AsyncIterator[NatsServer]:
    async with NatsServer() as server:
        yield server


async def test_server_killed_mid_run_several_times(server: NatsServer) -> None:
    """SIGKILL the server three times mid-run and restart it on the same store: nothing lost, nothing twice."""
    crashes = 0

    async def crash() -> None:
        nonlocal crashes
        await server.kill()
        crashes += 1
        await server.restart()

    async with durable_ai.connect(server.url) as agent, durable_ai.connect(server.url) as client:
        events, run_id, tokens = await scenario(agent, client, crash)
        assert_whole(events, run_id, tokens)
        # The stored log holds the same answer, once, for anyone reading it later.
        replay = await collect(client.session(events[0].session).events(follow=False))
        stored = await stored_events(client.backend, events[0].session)
    assert crashes == 3
    assert_whole(replay, run_id, tokens)
    assert_stored_once(stored, run_id, tokens)


async def test_subscriber_connection_severed(server: NatsServer) -> None:
    """Cut the subscriber's TCP connection three times mid-run: it resumes with no gap and no duplicate."""
    async with TcpProxy("127.0.0.1", server.port) as proxy:

        async def sever() -> None:
            proxy.sever()

        async with durable_ai.connect(server.url) as agent, durable_ai.connect(proxy.url) as client:
            events, run_id, tokens = await scenario(agent, client, sever)
    assert_whole(events, run_id, tokens)


async def test_writer_connection_severed(server: NatsServer) -> None:
    """Cut the agent's connection three times: publishes in flight are retried and stored once."""
    async with TcpProxy("127.0.0.1", server.port) as proxy:

        async def sever() -> None:
            proxy.sever()

        async with durable_ai.connect(proxy.url) as agent, durable_ai.connect(server.url) as client:
            events, run_id, tokens = await scenario(agent, client, sever)
            replay = await collect(client.session(events[0].session).events(follow=False))
            stored = await stored_events(client.backend, events[0].session)
    assert_whole(events, run_id, tokens)
    assert_whole(replay, run_id, tokens)
    assert_stored_once(stored, run_id, tokens)


async def test_cluster_node_killed_mid_run() -> None:
    """A 3-node cluster with R3 streams: killing the stream's leader mid-run loses nothing."""
    async with NatsCluster(3) as cluster:
        url = "nats://" + ",".join(u.removeprefix("nats://") for u in cluster.urls) + "?replicas=3"
        killed: list[str] = []

        async def kill_leader() -> None:
            # The leader is the node whose loss matters most: writes stop until a new one is elected.
            backend = agent.backend
            assert isinstance(backend, NatsBackend)
            info = await backend.connection.jsm().stream_info(names().stream)
            assert info.cluster is not None and info.cluster.leader is not None
            victim = next(s for s in cluster.servers if s.server_name == info.cluster.leader)
            killed.append(info.cluster.leader)
            await victim.kill()

        async with durable_ai.connect(url) as agent, durable_ai.connect(url) as client:
            events, run_id, tokens = await scenario(agent, client, kill_leader, faults=1)
            replay = await collect(client.session(events[0].session).events(follow=False))
            stored = await stored_events(client.backend, events[0].session)
    assert len(killed) == 1
    assert_whole(events, run_id, tokens)
    assert_whole(replay, run_id, tokens)
    assert_stored_once(stored, run_id, tokens)
