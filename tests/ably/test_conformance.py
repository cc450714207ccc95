"""The conformance suite, unchanged, over the Ably emulator: whole batches, and message per part with appends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from durable_ai.testing import ConformanceSuite, Target, UrlTarget
from durable_ai_ably.testing import AblyEmulator

KEY = "app1.full:s3cret"
RETENTION = 8  # what the retention scenario asks for


def ably_url(emulator: AblyEmulator, **options: str) -> str:
    extra = "".join(f"&{k}={v}" for k, v in options.items())
    return f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false{extra}"


def target(main: AblyEmulator, small: AblyEmulator, **options: str) -> Target:
    def retention(max_messages: int) -> str:
        assert max_messages == RETENTION, "the retention emulator keeps 8 messages per channel"
        return ably_url(small, **options)

    return UrlTarget(ably_url(main, **options), retention_url=retention)


@pytest.fixture
async def emulators() -> AsyncIterator[tuple[AblyEmulator, AblyEmulator]]:
    # Retention is a property of the Ably app (its channel rules), so a small one gets an emulator of its own.
    async with AblyEmulator({KEY: None}) as main, AblyEmulator({KEY: None}, retention_limit=RETENTION) as small:
        yield main, small


@pytest.fixture
async def mutable_emulators() -> AsyncIterator[tuple[AblyEmulator, AblyEmulator]]:
    # The "ai" namespace has the "Message annotations, updates, deletes and appends" rule.
    async with (
        AblyEmulator({KEY: None}, mutable_namespaces={"ai"}) as main,
        AblyEmulator({KEY: None}, mutable_namespaces={"ai"}, retention_limit=RETENTION) as small,
    ):
        yield main, small


class TestAbly(ConformanceSuite):
    """Appends left on ``auto`` on a namespace without the rule: one message per batch."""

    @pytest.fixture
    def target(self, emulators: tuple[AblyEmulator, AblyEmulator]) -> Target:
        return target(*emulators)


class TestAblyAppends(ConformanceSuite):
    """Message per part: deltas appended to their part's message."""

    @pytest.fixture
    def target(self, mutable_emulators: tuple[AblyEmulator, AblyEmulator]) -> Target:
        return target(*mutable_emulators, appends="on")
