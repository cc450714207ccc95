"""The backends the web routes are tested on: ``backend_url`` is a fresh ``memory://`` hub, a subject prefix of
its own on the session's nats-server (tests/conftest.py), or an Ably emulator of its own (``ably://``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import pytest

from durable_ai_ably.testing import AblyEmulator
from durable_ai_nats.testing import NatsServer

ABLY_SECRET = "Zk3vQ9pX2mL7wR4tY8uI1oP6aS5dF0gHjKlMnBvCxZq"
ABLY_KEY = f"app1.root:{ABLY_SECRET}"


@pytest.fixture(params=["memory", "nats", "ably"])
def backend_name(request: pytest.FixtureRequest) -> str:
    """Which backend the test runs on (a sync fixture, so that the nats-server can start in it, outside the test's
    event loop)."""
    if request.param == "nats":
        request.getfixturevalue("nats_server")
    name: str = request.param
    return name


@pytest.fixture
async def backend_url(backend_name: str, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The URL of a fresh backend of kind ``backend_name``."""
    if backend_name == "memory":
        yield "memory://"
    elif backend_name == "nats":
        server: NatsServer = request.getfixturevalue("nats_server")
        yield f"{server.url}?prefix=t{uuid4().hex[:8]}"
    else:
        async with AblyEmulator({ABLY_KEY: None}, mutable_namespaces={"ai"}) as emu:
            yield f"ably://?key={ABLY_KEY}&endpoint={emu.endpoint}&tls=false"
