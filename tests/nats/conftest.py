"""A nats-server for the NATS tests: one per test session for the conformance suite, fresh ones for fault tests."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import pytest

from durable_ai_nats.testing import NatsServer


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One JetStream server on loopback, shared by the tests that only need a broker."""
    server = NatsServer()
    asyncio.run(server.start())
    try:
        yield server
    finally:
        asyncio.run(server.close())


@pytest.fixture
def prefix() -> str:
    """A subject prefix of its own, so a test's stream and buckets start empty."""
    return f"t{secrets.token_hex(4)}"
