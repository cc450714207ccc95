"""Faults over the emulator: connections lost beyond Ably's resume window, NACKs, 429 storms, Ably unreachable.

Each test runs the shared scenario (:mod:`tests.faults`): an agent writes a long answer while a client follows it
live, the fault strikes three times mid-run, and the client's text must equal the agent's, every event once, the
run ending ``completed``. A replay from the start afterwards must give the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from ably.types.connectionstate import ConnectionState  # type: ignore[import-untyped]

import durable_ai
from durable_ai.testing import stored_events
from durable_ai.testing.scenarios import collect
from durable_ai_ably import AblyBackend, AblyOptions
from durable_ai_ably.testing import AblyEmulator
from tests.faults import assert_stored_once, assert_whole, scenario

KEY = "app1.full:s3cret"


@pytest.fixture(params=["off", "on"], ids=["batches", "appends"])
async def emulator(request: pytest.FixtureRequest) -> AsyncIterator[AblyEmulator]:
    async with AblyEmulator({KEY: None}, mutable_namespaces={"ai"}) as emu:
        emu.appends = request.param  # type: ignore[attr-defined]
        yield emu


def _backend(emulator: AblyEmulator) -> AblyBackend:
    appends = emulator.appends  # type: ignore[attr-defined]
    return AblyBackend(
        AblyOptions(
            KEY,
            endpoint=emulator.endpoint,
            tls=False,
            appends=appends,
            client={"disconnected_retry_timeout": 100},
        )
    )


async def _run(emulator: AblyEmulator, fault: Callable[[AblyBackend, AblyBackend], Awaitable[None]]) -> None:
    agent_backend, client_backend = _backend(emulator), _backend(emulator)
    async with durable_ai.connect(agent_backend) as agent, durable_ai.connect(client_backend) as client:

        async def strike() -> None:
            await fault(agent_backend, client_backend)

        events, run_id, tokens = await scenario(agent, client, strike)
        session = events[0].session
        replay = await collect(client.session(session).events(follow=False))
        stored = await stored_events(client_backend, session)
    assert_whole(events, run_id, tokens)
    assert_whole(replay, run_id, tokens)
    assert_stored_once(stored, run_id, tokens)


async def _reconnected(backend: AblyBackend, old: str | None) -> None:
    """Wait until the backend is connected again on a new connection (the old one could not be resumed)."""
    assert backend._realtime is not None
    connection = backend._realtime.connection
    while backend.connection_id in (None, old) or connection.state != ConnectionState.CONNECTED:
        await connection.once_async()


async def test_subscriber_lost_beyond_the_resume_window(emulator: AblyEmulator) -> None:
    """The follower's connection is dropped and forgotten: it reconnects afresh and fills the gap from history."""

    async def fault(agent: AblyBackend, client: AblyBackend) -> None:
        old = client.connection_id
        assert emulator.drop_connections(old, expire=True) == 1
        await asyncio.wait_for(_reconnected(client, old), 10)

    await _run(emulator, fault)


async def test_agent_lost_beyond_the_resume_window(emulator: AblyEmulator) -> None:
    """The agent's connection is dropped and forgotten mid-publish: retried publishes store nothing twice."""

    async def fault(agent: AblyBackend, client: AblyBackend) -> None:
        assert emulator.drop_connections(agent.connection_id, expire=True) == 1

    await _run(emulator, fault)


async def test_publishes_nacked(emulator: AblyEmulator) -> None:
    """Ably refuses a few publishes with a 5xx NACK: they are retried under the same id."""

    async def fault(agent: AblyBackend, client: AblyBackend) -> None:
        emulator.nack_next(3, code=50000, status=500)

    await _run(emulator, fault)


async def test_history_answers_429_while_the_subscriber_resumes(emulator: AblyEmulator) -> None:
    """The follower must read history to resume, and history answers 429 several times: it waits and retries."""

    async def fault(agent: AblyBackend, client: AblyBackend) -> None:
        emulator.fail_next_rest(429, 5, path_prefix="/channels/")
        old = client.connection_id
        emulator.drop_connections(old, expire=True)
        await asyncio.wait_for(_reconnected(client, old), 10)

    await _run(emulator, fault)


async def test_ably_unreachable_for_a_while(emulator: AblyEmulator) -> None:
    """Both connections drop and new ones are refused until the agent has noticed; then Ably is back."""

    async def fault(agent: AblyBackend, client: AblyBackend) -> None:
        assert agent._realtime is not None
        emulator.refuse_connections()
        old = agent.connection_id
        emulator.drop_connections(expire=True)
        connection = agent._realtime.connection
        while connection.state == ConnectionState.CONNECTED:
            await connection.once_async()
        emulator.refuse_connections(False)
        await asyncio.wait_for(_reconnected(agent, old), 10)

    await _run(emulator, fault)
