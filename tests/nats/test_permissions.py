"""Least privilege on a real nats-server that requires auth: a client credential is confined to its session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

import durable_ai
from durable_ai import Hub, Run
from durable_ai.backend import Channel
from durable_ai.errors import InvalidSessionId, PermissionDenied
from durable_ai.testing.scenarios import collect, run_end, text_of
from durable_ai_nats import client_inbox_prefix, client_permissions, from_url, names
from durable_ai_nats.testing import NatsServer
from tests.nats.auth import AGENT, authorization, user_url

SESSION = "chat-1"
OTHER = "chat-2"


@pytest.fixture(scope="module")
def auth_config() -> str:
    return authorization({("client", "client-secret"): client_permissions(SESSION, client_id="tab-1")})


@pytest.fixture
async def server(auth_config: str) -> AsyncIterator[NatsServer]:
    async with NatsServer(config=auth_config) as server:
        yield server


@pytest.fixture
async def agent(server: NatsServer) -> AsyncIterator[Hub]:
    async with durable_ai.connect(user_url(server, *AGENT)) as hub:
        # The agent side creates the stream and buckets, and writes to both sessions.
        for session in (SESSION, OTHER):
            async with hub.session(session).run(agent="writer") as run:
                await run.text(f"the answer of {session}")
        await hub.flush()
        yield hub


@pytest.fixture
def client_url(server: NatsServer) -> str:
    return user_url(server, "client", "client-secret", f"?inbox_prefix={client_inbox_prefix(SESSION)}")


async def test_client_reads_its_session_and_sends_controls(agent: Hub, client_url: str) -> None:
    async with durable_ai.connect(client_url) as client:
        session = client.session(SESSION)
        history = await collect(session.events(follow=False))
        assert text_of(history) == f"the answer of {SESSION}"
        view = await session.view()
        assert view.cursor == history[-1].cursor
        # Live: a new run streams to the client, and the client's cancel stops it.
        stream = session.events(after=history[-1].cursor)

        async def answer() -> Run:
            async with agent.session(SESSION).run(agent="writer") as run:
                await run.text("streaming")
                await asyncio.Event().wait()  # until the client's cancel stops it
            return run

        try:
            async with asyncio.timeout(20), asyncio.TaskGroup() as group:
                agent_task = group.create_task(answer())
                first = await anext(stream)
                ack = await (await session.cancel(first.run_id, reason="stop")).ack(timeout=10)
                run = await agent_task
                rest = await collect(stream, until=run_end(run.id))
        finally:
            await stream.aclose()
        async with session.present("tab-1"):
            members = {m.member_id for m in await session.presence()}
    assert text_of([first, *rest]) == "streaming"
    assert ack.outcome == "applied" and run.cancelled
    assert "tab-1" in members


async def test_client_cannot_write_events(agent: Hub, client_url: str) -> None:
    async with durable_ai.connect(client_url) as client:
        with pytest.raises(PermissionDenied):
            await client.session(SESSION).user_message("I am not the agent")
    backend = from_url(client_url)
    await backend.open()
    try:
        with pytest.raises(PermissionDenied):
            await backend.publish(Channel(SESSION, "events"), b'{"forged":true}', message_id="forged-1")
    finally:
        await backend.close()
    async with durable_ai.connect(client_url) as client:
        history = await collect(client.session(SESSION).events(follow=False))
    assert text_of(history) == f"the answer of {SESSION}", "a forged event reached the log"


async def test_client_cannot_read_another_session(agent: Hub, client_url: str) -> None:
    async with durable_ai.connect(client_url) as client:
        with pytest.raises(PermissionDenied):
            await collect(client.session(OTHER).events(follow=False))
        with pytest.raises(PermissionDenied):
            await client.session(OTHER).view()


async def test_raw_nats_client_is_confined(agent: Hub, server: NatsServer) -> None:
    """Below the SDK: the credential cannot subscribe to event subjects or create consumers on other sessions."""
    errors: asyncio.Queue[Exception] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        errors.put_nowait(exc)

    subjects = names()
    nc = await nats.connect(
        user_url(server, "client", "client-secret"), inbox_prefix=client_inbox_prefix(SESSION), error_cb=on_error
    )
    try:
        await nc.subscribe(subjects.subject(OTHER, "events"))
        violation = await asyncio.wait_for(errors.get(), 10)
        assert "permissions violation" in str(violation).lower()
        js = nc.jetstream(timeout=2)
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish(subjects.subject(SESSION, "events"), b"forged")
        violation = await asyncio.wait_for(errors.get(), 10)
        assert "permissions violation" in str(violation).lower()
    finally:
        await nc.close()


async def test_invalid_session_ids_never_reach_nats(agent: Hub) -> None:
    for bad in ("a.b", "a*", "a>", "has space", "a.>", ""):
        with pytest.raises(InvalidSessionId):
            agent.session(bad)
        with pytest.raises(InvalidSessionId):
            client_permissions(bad)
