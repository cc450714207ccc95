"""Counts of what channels stored and connections published (not an Ably API), and Ably's default rate limits."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from durable_ai_ably.testing.emulator.protocol import AblyError


@dataclass(frozen=True)
class MessageStats:
    """Messages a channel stored, or a connection published, as `AblyEmulator.channel_stats` and `connection_stats`
    count them.
    """

    messages: int = 0
    """Every message counted: creates plus update, delete and append operations (Ably bills and rate-limits each)."""
    operations: Mapping[str, int] = field(default_factory=dict)
    """``messages`` by kind: ``create``, ``update``, ``delete``, ``append`` (kinds never seen are absent)."""
    peak_per_second: int = 0
    """The most messages counted within any 1-second window."""
    duplicates: int = 0
    """Publishes dropped because a message with their id was stored within the idempotency window (not counted)."""
    refused: int = 0
    """Messages refused by ``enforce_rate_limits`` (not counted)."""

    def count(self, kind: str) -> int:
        """How many messages of one kind (``create``, ``update``, ``delete``, ``append``)."""
        return self.operations.get(kind, 0)


class Meter:
    """The counts behind one `MessageStats`: totals by kind and the times of the last second's messages."""

    __slots__ = ("duplicates", "operations", "peak", "refused", "window")

    def __init__(self) -> None:
        self.operations: dict[str, int] = {}
        self.window: deque[float] = deque()
        self.peak = 0
        self.duplicates = 0
        self.refused = 0

    def recent(self, now: float) -> int:
        """Messages counted in the second up to `now`."""
        window = self.window
        while window and window[0] <= now - 1.0:
            window.popleft()
        return len(window)

    def add(self, kinds: Sequence[str], now: float) -> None:
        for kind in kinds:
            self.operations[kind] = self.operations.get(kind, 0) + 1
        self.window.extend([now] * len(kinds))
        self.peak = max(self.peak, self.recent(now))

    def stats(self) -> MessageStats:
        return MessageStats(
            messages=sum(self.operations.values()),
            operations=dict(self.operations),
            peak_per_second=self.peak,
            duplicates=self.duplicates,
            refused=self.refused,
        )


class Meters:
    """A meter per channel and per publishing connection; with `enforce`, Ably's inbound rate limits."""

    def __init__(self, *, enforce: bool, channel_limit: int, connection_limit: int) -> None:
        self.enforce = enforce
        self.channel_limit = channel_limit
        self.connection_limit = connection_limit
        self._channels: dict[str, Meter] = {}
        self._connections: dict[str, Meter] = {}

    def channel_stats(self, channel: str) -> MessageStats:
        meter = self._channels.get(channel)
        return meter.stats() if meter is not None else MessageStats()

    def connection_stats(self) -> dict[str, MessageStats]:
        return {connection_id: meter.stats() for connection_id, meter in self._connections.items()}

    def reset(self) -> None:
        self._channels.clear()
        self._connections.clear()

    def _meters(self, channel: str, connection_id: str | None) -> list[Meter]:
        meters = [self._channels.setdefault(channel, Meter())]
        if connection_id is not None:
            meters.append(self._connections.setdefault(connection_id, Meter()))
        return meters

    def check(self, channel: str, count: int, connection_id: str | None) -> None:
        """With `enforce`, refuse `count` more messages that would pass the channel's or the connection's limit."""
        if not self.enforce or not count:
            return
        now = time.monotonic()
        channel_meter, *connection_meter = self._meters(channel, connection_id)
        if connection_meter and connection_meter[0].recent(now) + count > self.connection_limit:
            channel_meter.refused += count
            connection_meter[0].refused += count
            raise AblyError(
                "Rate limit exceeded; request rejected (nonfatal); metric = connection.inboundRate; "
                f"permitted rate = {self.connection_limit}",
                42911,
                429,
            )
        if channel_meter.recent(now) + count > self.channel_limit:
            channel_meter.refused += count
            if connection_meter:
                connection_meter[0].refused += count
            raise AblyError(
                f"Rate limit exceeded; request rejected (nonfatal); per-channel publish rate exceeded on {channel!r}; "
                f"permitted rate = {self.channel_limit}",
                42913,
                429,
            )

    def count(self, channel: str, connection_id: str | None, kinds: Sequence[str], *, duplicates: int) -> None:
        """Count stored messages (by kind) and dropped duplicates for the channel and the publishing connection."""
        now = time.monotonic()
        for meter in self._meters(channel, connection_id):
            meter.add(kinds, now)
            meter.duplicates += duplicates
