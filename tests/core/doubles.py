"""Test doubles of the memory backend that let a test see or hold what the broker does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from durable_ai import BackendUnavailable, Channel, LogPosition, LogReset, MemoryBackend, StoredMessage


class SignallingBackend(MemoryBackend):
    """Tells the test when a reader of a channel kind has met an outage."""

    def __init__(self) -> None:
        super().__init__()
        self.read_failed = asyncio.Event()
        self.control_read_failed = asyncio.Event()

    async def read(self, channel: Channel, *, start: LogPosition | None, follow: bool) -> AsyncIterator[StoredMessage]:
        try:
            async for message in super().read(channel, start=start, follow=follow):
                yield message
        except BackendUnavailable:
            (self.control_read_failed if channel.kind == "control" else self.read_failed).set()
            raise


class GatedBackend(MemoryBackend):
    """Holds publishes to the events log until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = asyncio.Event()

    async def publish(self, channel: Channel, data: bytes, *, message_id: str) -> LogPosition:
        if channel.kind == "events" and not self.gate.is_set():
            self.held.set()
            await self.gate.wait()
        return await super().publish(channel, data, message_id=message_id)


class StumblingControlBackend(MemoryBackend):
    """A broker in trouble: the control log is reset just as its first control arrives, then the next read
    loses its connection."""

    def __init__(self) -> None:
        super().__init__()
        self.stumbles = 0

    async def read(self, channel: Channel, *, start: LogPosition | None, follow: bool) -> AsyncIterator[StoredMessage]:
        if channel.kind == "control" and self.stumbles == 1:
            self.stumbles += 1
            raise BackendUnavailable("connection lost while recovering")
        async for message in super().read(channel, start=start, follow=follow):
            if channel.kind == "control" and self.stumbles == 0:
                self.stumbles += 1
                raise LogReset("retention dropped the reader's position")
            yield message
