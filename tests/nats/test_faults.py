"""Faults on a real nats-server: crashes of the server, severed connections, a cluster node lost.

In each test an agent writes a long answer while a client follows it live; something breaks several times in
the middle; the client's reassembled text must equal the agent's, with every event once and the run ending
``completed``. Waits are on events with timeouts, never on sleeps.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import durable_ai
from durable_ai import Event, Hub, RunEnd, Status
from durable_ai.testing.scenarios import collect, text_of
from durable_ai_nats import NatsBackend, names
from durable_ai_nats.testing import NatsCluster, NatsServer
from tests.nats.proxy import TcpProxy

TOKENS = 1500
TIMEOUT = 60.0


def _tokens(tag: str) -> list[str]:
    return [f"{tag}{i} " for i in range(TOKENS)]


async def _scenario(
    agent: Hub, client: Hub, fault: Callable[[], Awaitable[None]], *, faults: int = 3
) -> tuple[list[Event], str, list[str]]:
    """An agent writes while a client follows; ``fault`` strikes ``faults`` times, each mid-run.

    Before each fault the client must have seen the answer up to that point (so it is live, not catching up);
    the agent cannot finish before every fault has struck, and goes on writing while the broker is away.
    """
    session = f"fault-{secrets.token_hex(4)}"
    tokens = _tokens("t")
    marks = [TOKENS * (k + 1) // (faults + 1) for k in range(faults)]
    struck = [asyncio.Event() for _ in marks]
    seen: list[Event] = []
    progress: asyncio.Queue[int] = asyncio.Queue()

    async def write() -> str:
        async with agent.session(session).run(agent="writer") as run:
            for i, token in enumerate(tokens, start=1):
                await run.text(token)
                if i % 50 == 0:
                    await run.status(str(i))  # returns once the broker stored it
                for mark, event in zip(marks, struck, strict=True):
                    if i == mark + 25:
                        await event.wait()
        return run.id

    async def follow() -> None:
        async with client.session(session).events() as events:
            async for event in events:
                seen.append(event)
                if isinstance(event, Status) and event.text.isdigit():
                    progress.put_nowait(int(event.text))
                if isinstance(event, RunEnd):
                    return

    async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as group:
        follower = group.create_task(follow())
        writer = group.create_task(write())
        for mark, event in zip(marks, struck, strict=True):
            while await progress.get() < mark:
                pass
            await fault()
            event.set()
        run_id = await writer
        await follower
    return seen, run_id, tokens


def _assert_whole(events: list[Event], run_id: str, tokens: list[str]) -> None:
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), "an event arrived twice"
    assert text_of(events, run_id) == "".join(tokens), "the follower's text has a gap or a duplicate"
    end = events[-1]
    assert isinstance(end, RunEnd) and end.run_id == run_id and end.status == "completed"


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
        events, run_id, tokens = await _scenario(agent, client, crash)
        _assert_whole(events, run_id, tokens)
        # The stored log holds the same answer, once, for anyone reading it later.
        replay = await collect(client.session(events[0].session).events(follow=False))
    assert crashes == 3
    _assert_whole(replay, run_id, tokens)


async def test_subscriber_connection_severed(server: NatsServer) -> None:
    """Cut the subscriber's TCP connection three times mid-run: it resumes with no gap and no duplicate."""
    async with TcpProxy("127.0.0.1", server.port) as proxy:

        async def sever() -> None:
            proxy.sever()

        async with durable_ai.connect(server.url) as agent, durable_ai.connect(proxy.url) as client:
            events, run_id, tokens = await _scenario(agent, client, sever)
    _assert_whole(events, run_id, tokens)


async def test_writer_connection_severed(server: NatsServer) -> None:
    """Cut the agent's connection three times: publishes in flight are retried and stored once."""
    async with TcpProxy("127.0.0.1", server.port) as proxy:

        async def sever() -> None:
            proxy.sever()

        async with durable_ai.connect(proxy.url) as agent, durable_ai.connect(server.url) as client:
            events, run_id, tokens = await _scenario(agent, client, sever)
            replay = await collect(client.session(events[0].session).events(follow=False))
    _assert_whole(events, run_id, tokens)
    _assert_whole(replay, run_id, tokens)


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
            events, run_id, tokens = await _scenario(agent, client, kill_leader, faults=1)
            replay = await collect(client.session(events[0].session).events(follow=False))
    assert len(killed) == 1
    _assert_whole(events, run_id, tokens)
    _assert_whole(replay, run_id, tokens)
