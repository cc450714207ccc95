"""Test doubles of the memory backend that let a test see or hold what the broker does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from durable_ai import BackendError, BackendUnavailable, LogReset
from durable_ai.backend import Channel, LogPosition, Outgoing, PresenceRole, StoredMessage
from durable_ai.backends.memory import MemoryBackend


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


class StuckPresenceBackend(MemoryBackend):
    """A broker whose presence never answers: entering presence hangs until the caller gives up."""

    def __init__(self) -> None:
        super().__init__()
        self.entering = asyncio.Event()
        self.left: list[str] = []

    async def enter_presence(self, session: str, member_id: str, data: bytes, *, role: PresenceRole) -> None:
        self.entering.set()
        await asyncio.Event().wait()

    async def leave_presence(self, session: str, member_id: str, *, role: PresenceRole) -> None:
        self.left.append(member_id)
        await super().leave_presence(session, member_id, role=role)


class RefusingBackend(MemoryBackend):
    """A broker that refuses, for good, every events message holding ``poison`` (a broker rule, say)."""

    def __init__(self, poison: bytes = b"poison") -> None:
        super().__init__()
        self.poison = poison
        self.refused = 0

    async def publish(self, channel: Channel, data: bytes, *, message_id: str) -> LogPosition:
        if channel.kind == "events" and self.poison in data:
            self.refused += 1
            raise BackendError(f"message {message_id} breaks a broker rule")
        return await super().publish(channel, data, message_id=message_id)


class HeldStartBackend(MemoryBackend):
    """Holds every ``run-start`` publish until the agent side has handled a control holding ``release_after``:
    the control arrives while a run is starting, whatever the scheduling."""

    def __init__(self, release_after: bytes) -> None:
        super().__init__()
        self.release_after = release_after
        self.gate = asyncio.Event()
        self.held = asyncio.Event()

    async def publish(self, channel: Channel, data: bytes, *, message_id: str) -> LogPosition:
        if channel.kind == "events" and b'"type":"run-start"' in data and not self.gate.is_set():
            self.held.set()
            await self.gate.wait()
        return await super().publish(channel, data, message_id=message_id)

    async def read(self, channel: Channel, *, start: LogPosition | None, follow: bool) -> AsyncIterator[StoredMessage]:
        async for message in super().read(channel, start=start, follow=follow):
            yield message
            # Resumed: the control loop has handled this message and asks for the next one.
            if channel.kind == "control" and self.release_after in message.data:
                self.gate.set()


class SlowSnapshotBackend(MemoryBackend):
    """Saving a snapshot takes a moment, as it does over a network."""

    async def save_snapshot(self, session: str, data: bytes) -> None:
        await asyncio.sleep(0.05)
        await super().save_snapshot(session, data)


class StaleFeedBackend(MemoryBackend):
    """A broker whose live readers are not told of a deletion (as an Ably subscription elsewhere is not)."""

    async def delete(self, session: str) -> None:
        self._check()
        for kind in ("events", "control"):
            self._logs.pop(Channel(session, kind), None)
        self._snapshots.pop(session, None)
        self._presence.pop(session, None)


class SlowLiveBackend(MemoryBackend):
    """A live read of the events log takes a moment to attach; catch-up reads do not."""

    async def read(self, channel: Channel, *, start: LogPosition | None, follow: bool) -> AsyncIterator[StoredMessage]:
        if follow and channel.kind == "events":
            await asyncio.sleep(0.5)
        async for message in super().read(channel, start=start, follow=follow):
            yield message


class AheadBackend(MemoryBackend):
    """A memory backend that publishes ahead (:class:`durable_ai.backend.PublishesAhead`), acknowledging each message
    a loop turn later as a broker's reader would, and stumbling on purpose: of every ``stumble`` messages one is
    stored but its acknowledgement lost, one is lost altogether, and one cannot be sent at all."""

    def __init__(self, stumble: int = 0) -> None:
        super().__init__()
        self.stumble = stumble
        self.sent = 0
        self.chained = 0
        self.publishes = 0
        self._chains: set[asyncio.Task[None]] = set()

    async def publish(self, channel: Channel, data: bytes, *, message_id: str) -> LogPosition:
        self.publishes += 1
        return await super().publish(channel, data, message_id=message_id)

    async def send(self, outgoing: Outgoing) -> bool:
        self.sent += 1
        turn = self.sent % self.stumble if self.stumble else -1
        if turn == 3:
            return False
        loop = asyncio.get_running_loop()
        if turn == 2:
            loop.call_soon(self._answer, outgoing, TimeoutError("lost with the message"))
            return True
        position = await MemoryBackend.publish(self, outgoing.channel, outgoing.data, message_id=outgoing.message_id)
        outcome: LogPosition | BaseException = TimeoutError("acknowledgement lost") if turn == 1 else position
        loop.call_soon(self._answer, outgoing, outcome)
        return True

    def _answer(self, outgoing: Outgoing, outcome: LogPosition | BaseException) -> None:
        then = outgoing.landed(outcome)
        if then is not None:
            self.chained += 1
            task = asyncio.get_running_loop().create_task(self._send_next(then))
            self._chains.add(task)
            task.add_done_callback(self._chains.discard)

    async def _send_next(self, outgoing: Outgoing) -> None:
        if not await self.send(outgoing):
            outgoing.landed(BackendUnavailable("not sent"))

    async def close(self) -> None:
        while self._chains:
            await asyncio.gather(*self._chains)
        await super().close()

    def stored(self, session: str) -> list[bytes]:
        """Every raw message of the session's events log, as the broker holds it."""
        log = self._logs.get(Channel(session, "events"))
        return [] if log is None else [entry.data for entry in log.entries]
