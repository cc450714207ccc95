"""A half-open connection: the agent's TCP connection is black-holed mid-run, with no FIN and no reset.

The proxy (``TcpProxy.swallow()``) keeps the agent's socket open and drops every byte both ways, as when a NAT
entry or a load balancer forgets the flow, or the server's host vanishes. Nothing tells the client the
connection is dead: only its own liveness checks can. With the hub's default settings it must find out within
seconds, reconnect (new connections through the proxy are forwarded normally), and go on: the run's later writes
land, once each, and a cancel sent meanwhile from another connection is applied. Waits are on events with
timeouts, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import pytest

import durable_ai
from durable_ai import ControlAck, RunEnd
from durable_ai.testing import stored_events
from durable_ai.testing.scenarios import collect
from durable_ai_nats.testing import NatsServer
from tests.faults import assert_stored_once, assert_whole
from tests.nats.proxy import TcpProxy

# How long after the connection goes half-open the run's writes must land (or a cancel be applied).
RECOVERY = 20.0
TOKENS = 600
SWALLOW_AT = 300  # the token after which the connection goes half-open


@pytest.fixture
async def server() -> AsyncIterator[NatsServer]:
    async with NatsServer() as server:
        yield server


def _urls(proxy: TcpProxy, server: NatsServer) -> tuple[str, str]:
    """The agent's URL (through the proxy) and the client's (direct), with default detection settings."""
    query = f"?prefix=t{secrets.token_hex(4)}"
    return proxy.url + query, server.url + query


async def _end(task: asyncio.Task[object], proxy: TcpProxy) -> None:
    """Stop an agent task that is still running: reset its connection (so it can reconnect and write its
    ``run-end``), cancel it and wait for it."""
    if not task.done():
        proxy.sever()
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_writes_land_after_the_agent_connection_goes_half_open(server: NatsServer) -> None:
    """Black-hole the agent's connection mid-run: the rest of the run is stored, once, within seconds."""
    async with TcpProxy("127.0.0.1", server.port) as proxy:
        agent_url, client_url = _urls(proxy, server)
        async with durable_ai.connect(agent_url) as agent, durable_ai.connect(client_url) as client:
            session = f"half-open-{secrets.token_hex(4)}"
            tokens = [f"t{i} " for i in range(TOKENS)]
            halfway = asyncio.Event()
            swallowed = asyncio.Event()

            async def write() -> str:
                async with agent.session(session).run(agent="writer") as run:
                    for i, token in enumerate(tokens, start=1):
                        await run.text(token)
                        if i % 50 == 0:
                            await run.status(str(i))  # returns once the broker stored it
                        if i == SWALLOW_AT:
                            halfway.set()
                            await swallowed.wait()
                return run.id

            writer = asyncio.create_task(write())
            try:
                async with asyncio.timeout(RECOVERY):
                    await halfway.wait()  # the first half is stored: the connection worked until now
                assert proxy.swallowed == 0 and proxy.connections == 1
                proxy.swallow()
                assert proxy.swallowed == 1
                swallowed.set()
                # The run-end is stored when the block has exited.
                finished, _ = await asyncio.wait({writer}, timeout=RECOVERY)
                if not finished:
                    pytest.fail(
                        f"the run did not finish within {RECOVERY:g}s of its connection going half-open "
                        "(the hub did not notice the dead connection)"
                    )
                run_id = writer.result()
            finally:
                await _end(writer, proxy)
            stored = await stored_events(client.backend, session)
            replay = await collect(client.session(session).events(follow=False))
    assert_stored_once(stored, run_id, tokens)
    assert_whole(replay, run_id, tokens)
    statuses = [r["text"] for r in stored if r.get("type") == "status"]
    assert statuses == [str(i) for i in range(50, TOKENS + 1, 50)]


async def test_cancel_reaches_an_agent_whose_connection_went_half_open(server: NatsServer) -> None:
    """A cancel sent from another connection while the agent's connection is black-holed is applied in seconds."""
    async with TcpProxy("127.0.0.1", server.port) as proxy:
        agent_url, client_url = _urls(proxy, server)
        async with durable_ai.connect(agent_url) as agent, durable_ai.connect(client_url) as client:
            session = client.session(f"half-open-{secrets.token_hex(4)}")
            entered: asyncio.Future[str] = asyncio.get_running_loop().create_future()

            async def work() -> bool:
                async with agent.session(session.id).run(agent="writer") as run:
                    await run.text("Here is a long essay")
                    await run.status("thinking")  # stored: the run is live on the broker
                    entered.set_result(run.id)
                    await asyncio.Event().wait()  # a slow model call: the cancel interrupts this await
                return run.cancelled

            worker = asyncio.create_task(work())
            try:
                async with asyncio.timeout(RECOVERY):
                    run_id = await asyncio.shield(entered)
                proxy.swallow()
                handle = await session.cancel(run_id, reason="user pressed stop")  # on the client's own connection
                ack: ControlAck | None = None
                with contextlib.suppress(durable_ai.AckTimeout):
                    ack = await handle.ack(timeout=RECOVERY)
                if ack is None:
                    pytest.fail(
                        f"the cancel was not acknowledged within {RECOVERY:g}s of the agent's connection going "
                        "half-open (the agent did not notice the dead connection)"
                    )
                assert ack.outcome == "applied" and ack.run_id == run_id
                end = await handle.done(timeout=RECOVERY)
                async with asyncio.timeout(RECOVERY):
                    cancelled = await asyncio.shield(worker)
            finally:
                await _end(worker, proxy)
            stored = await stored_events(client.backend, session.id)
    assert isinstance(end, RunEnd) and end.run_id == run_id
    assert end.status == "cancelled" and end.reason == "user pressed stop"
    assert cancelled
    ends = [r for r in stored if r.get("type") == "run-end"]
    assert [(r["run_id"], r["status"]) for r in ends] == [(run_id, "cancelled")]
    ids = [r["id"] for r in stored]
    assert len(ids) == len(set(ids)), "the broker stored an event twice"
