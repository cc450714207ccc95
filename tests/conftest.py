"""Shared fixtures: a memory backend and hubs on it, one nats-server for the tests that only need a broker, and a
check that no test leaves a task running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

import durable_ai
from durable_ai import Hub
from durable_ai.backends.memory import MemoryBackend
from durable_ai_nats.testing import NatsServer


async def tasks_all_ended() -> AsyncIterator[None]:
    """The body of a fixture: every task started in the loop while the test ran must have ended when it ends
    (those still running are cancelled, and the test fails naming them)."""
    before = asyncio.all_tasks()
    yield
    leaked = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()]
    for task in leaked:
        task.cancel()
    assert not leaked, f"tasks left running: {[t.get_name() for t in leaked]}"


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Every background task a test started must be finished or cancelled when it ends."""
    async for _ in tasks_all_ended():
        yield


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
async def hub(backend: MemoryBackend) -> AsyncIterator[Hub]:
    async with durable_ai.connect(backend) as hub:
        yield hub


@pytest.fixture
async def client_hub(backend: MemoryBackend) -> AsyncIterator[Hub]:
    """A second hub on the same broker: a client in another process."""
    async with durable_ai.connect(backend) as hub:
        yield hub


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One JetStream server on loopback (started on first use), shared by the tests that only need a broker; each
    test takes a subject prefix of its own."""
    server = NatsServer()
    asyncio.run(server.start())
    try:
        yield server
    finally:
        asyncio.run(server.close())
