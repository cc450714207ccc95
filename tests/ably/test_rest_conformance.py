"""The conformance suite, unchanged, over Ably's REST API only (the emulator), following by polling history."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from durable_ai.testing import ConformanceSuite, Target, UrlTarget
from durable_ai_ably.testing import AblyEmulator

KEY = "app1.full:s3cret"
RETENTION = 8  # what the retention scenario asks for


def rest_url(emulator: AblyEmulator) -> str:
    return f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false&transport=rest&poll_interval=0.05"


@pytest.fixture
async def emulators() -> AsyncIterator[tuple[AblyEmulator, AblyEmulator]]:
    # Retention is a property of the Ably app (its channel rules), so a small one gets an emulator of its own.
    async with AblyEmulator({KEY: None}) as main, AblyEmulator({KEY: None}, retention_limit=RETENTION) as small:
        yield main, small


class TestAblyRest(ConformanceSuite):
    """Publishes, reads, follows (polling), snapshots and presence, all over HTTP requests."""

    @pytest.fixture
    def target(self, emulators: tuple[AblyEmulator, AblyEmulator]) -> Target:
        main, small = emulators

        def retention(max_messages: int) -> str:
            assert max_messages == RETENTION, "the retention emulator keeps 8 messages per channel"
            return rest_url(small)

        return UrlTarget(rest_url(main), retention_url=retention)
