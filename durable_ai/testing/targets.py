"""What the conformance scenarios run against: a broker, reachable through fresh backend connections."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..backend import Backend, BackendLimits, Channel, PresenceEntry, PresenceRole, StoredMessage, backend_from_url
from ..backends.memory import MemoryBackend, from_url
from ..cursor import LogPosition
from ..hub import Hub

__all__ = ["MemoryTarget", "PublishRecord", "RecordingBackend", "Target", "UrlTarget", "target_for_url"]


class Target(Protocol):
    """A broker under test.

    ``backend()`` returns a new connection to the **same** broker each time, so that scenarios can put an agent
    and a client in different hubs, as they would be in different processes.
    """

    name: str

    def backend(self) -> Backend: ...

    def retention_backend(self, max_messages: int) -> Backend | None:
        """A connection to a broker that keeps at most ``max_messages`` per channel, or ``None`` to skip."""
        ...

    def hub(self, **options: Any) -> Hub:
        """A new hub (not yet open) on a new connection to the broker."""
        ...


class MemoryTarget:
    """The embedded backend: every hub shares one :class:`MemoryBackend` instance."""

    name = "memory"

    def __init__(self, backend: MemoryBackend | None = None) -> None:
        self.shared = backend if backend is not None else MemoryBackend()

    def backend(self) -> Backend:
        return self.shared

    def retention_backend(self, max_messages: int) -> Backend | None:
        return MemoryBackend(max_messages=max_messages)

    def hub(self, **options: Any) -> Hub:
        return Hub(self.backend(), **options)


class UrlTarget:
    """Any backend reachable by URL; each hub opens its own connection."""

    def __init__(self, url: str, retention_url: Callable[[int], str] | None = None) -> None:
        self.url = url
        self.name = url.split("://", 1)[0]
        self._retention_url = retention_url

    def backend(self) -> Backend:
        return backend_from_url(self.url)

    def retention_backend(self, max_messages: int) -> Backend | None:
        if self._retention_url is None:
            return None
        return backend_from_url(self._retention_url(max_messages))

    def hub(self, **options: Any) -> Hub:
        return Hub(self.backend(), **options)


def target_for_url(url: str) -> Target:
    """The target for a URL; ``memory://`` URLs share one in-process broker."""
    if url.startswith("memory:"):
        return MemoryTarget(from_url(url))
    return UrlTarget(url)


@dataclass(frozen=True, slots=True)
class PublishRecord:
    at: float
    channel: Channel
    size: int
    message_id: str


@dataclass
class RecordingBackend:
    """Wraps a backend and records every publish and every message read: what a metered broker would bill.

    Use it to assert message counts in your own tests: ``Hub(RecordingBackend(MemoryBackend()))``.
    """

    inner: Backend
    publishes: list[PublishRecord] = field(default_factory=list)
    messages_read: int = 0

    @property
    def limits(self) -> BackendLimits:
        return self.inner.limits

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def publish(self, channel: Channel, data: bytes, *, message_id: str) -> LogPosition:
        sent = time.monotonic()
        position = await self.inner.publish(channel, data, message_id=message_id)
        self.publishes.append(PublishRecord(sent, channel, len(data), message_id))
        return position

    async def read(self, channel: Channel, *, start: LogPosition | None, follow: bool) -> AsyncIterator[StoredMessage]:
        iterator = self.inner.read(channel, start=start, follow=follow)
        try:
            async for message in iterator:
                self.messages_read += 1
                yield message
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    async def head(self, channel: Channel) -> LogPosition | None:
        return await self.inner.head(channel)

    async def delete(self, session: str) -> None:
        await self.inner.delete(session)

    async def load_snapshot(self, session: str) -> bytes | None:
        return await self.inner.load_snapshot(session)

    async def save_snapshot(self, session: str, data: bytes) -> None:
        await self.inner.save_snapshot(session, data)

    async def enter_presence(self, session: str, member_id: str, data: bytes, *, role: PresenceRole) -> None:
        await self.inner.enter_presence(session, member_id, data, role=role)

    async def leave_presence(self, session: str, member_id: str, *, role: PresenceRole) -> None:
        await self.inner.leave_presence(session, member_id, role=role)

    async def presence(self, session: str) -> list[PresenceEntry]:
        return await self.inner.presence(session)

    def events_published(self, session: str | None = None) -> int:
        """Broker messages published to events channels (of one session, or all)."""
        return sum(
            1
            for record in self.publishes
            if record.channel.kind == "events" and (session is None or record.channel.session == session)
        )
