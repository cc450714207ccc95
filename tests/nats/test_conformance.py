"""The conformance suite, unchanged, over a real nats-server."""

from __future__ import annotations

import secrets

import pytest

from durable_ai.testing import ConformanceSuite, Target, UrlTarget
from durable_ai_nats.testing import NatsServer


class TestNats(ConformanceSuite):
    @pytest.fixture
    def target(self, nats_server: NatsServer) -> Target:
        def retention(max_messages: int) -> str:
            # Retention is a property of the stream, so a small one gets a stream (prefix) of its own.
            return f"{nats_server.url}?prefix=r{secrets.token_hex(4)}&max_messages={max_messages}"

        return UrlTarget(nats_server.url, retention_url=retention)
