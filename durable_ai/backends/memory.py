"""The embedded in-process backend, and the reference implementation of :class:`durable_ai.backend.Backend`.

Each channel is a list of messages with a per-log epoch. Readers walk the list at their own pace, so a slow
reader never holds the writer up; one that falls behind retention gets ``LogReset``, never a silent gap.
Retention is bounded (``max_messages`` per channel, optional ``max_age``) and publishes are deduplicated by
message id within ``dedupe_window`` seconds, like JetStream's duplicate window.

Several hubs may share one :class:`MemoryBackend` instance (say, an agent hub and a client hub in one test); it
closes when the last of them closes. :meth:`MemoryBackend.set_offline` simulates a broker that goes away.

URL form: ``memory://?max_messages=50000&max_age=3600&max_message_bytes=1048576&rate_limit=50``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from ..cursor import LogPosition
from ..errors import BackendUnavailable, ConfigurationError, LogReset
from .base import BackendLimits, Channel, PresenceEntry, PresenceRole, StoredMessage

__all__ = ["MemoryBackend", "from_url"]


@dataclass(slots=True)
class _Entry:
    seq: int
    stored_at: float
    data: bytes


@dataclass(slots=True)
class _Log:
    epoch: str
    entries: deque[_Entry] = field(default_factory=deque)
    first_seq: int = 1
    next_seq: int = 1
    deleted: bool = False
    seen_ids: OrderedDict[str, tuple[int, float]] = field(default_factory=OrderedDict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class MemoryBackend:
    """An in-process broker with bounded retention, deduplication, snapshots and presence.

    Args:
        max_messages: messages kept per channel; older ones are dropped (``None``: unbounded).
        max_age: seconds a message is kept (``None``: no age limit).
        dedupe_window: seconds during which a repeated message id is recognised as a duplicate.
        max_message_bytes: the largest message accepted; the writer fragments larger events.
        rate_limit: publishes per second per channel the hub's writer keeps to (``None``: unlimited).
    """

    def __init__(
        self,
        *,
        max_messages: int | None = 50_000,
        max_age: float | None = None,
        dedupe_window: float = 120.0,
        max_message_bytes: int = 1024 * 1024,
        rate_limit: float | None = None,
    ) -> None:
        if max_messages is not None and max_messages < 1:
            raise ConfigurationError("max_messages must be at least 1")
        if max_age is not None and max_age <= 0:
            raise ConfigurationError("max_age must be positive")
        if max_message_bytes < 1024:
            raise ConfigurationError("max_message_bytes must be at least 1024")
        if not dedupe_window > 0:
            raise ConfigurationError("dedupe_window must be a positive number of seconds")
        self.max_messages = max_messages
        self.max_age = max_age
        self.dedupe_window = dedupe_window
        self._limits = BackendLimits(max_message_bytes=max_message_bytes, max_messages_per_second=rate_limit)
        self._logs: dict[Channel, _Log] = {}
        self._snapshots: dict[str, bytes] = {}
        self._presence: dict[str, dict[tuple[PresenceRole, str], bytes]] = {}
        self._users = 0
        self._offline = False
        self.published = 0
        """Messages stored so far (duplicates excluded): what a metered broker would bill."""

    @property
    def limits(self) -> BackendLimits:
        return self._limits

    async def open(self) -> None:
        self._users += 1

    async def close(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0:
            self._wake_all()

    def set_offline(self, offline: bool) -> None:
        """Simulate the broker going away (``True``) and coming back (``False``); stored data is kept."""
        self._offline = offline
        if offline:
            self._wake_all()

    def _wake_all(self) -> None:
        for log in self._logs.values():
            log.notify()

    def _check(self) -> None:
        if self._users == 0:
            raise BackendUnavailable("the memory backend is closed")
        if self._offline:
            raise BackendUnavailable("the memory backend is offline")

    def _log(self, channel: Channel) -> _Log:
        log = self._logs.get(channel)
        if log is None:
            log = self._logs[channel] = _Log(epoch=secrets.token_hex(6))
        self._expire(log)
        return log

    def _expire(self, log: _Log) -> None:
        if self.max_age is None or not log.entries:
            return
        horizon = time.monotonic() - self.max_age
        while log.entries and log.entries[0].stored_at < horizon:
            log.entries.popleft()
            log.first_seq += 1

    async def publish(self, channel: Channel, data: bytes, *, message_id: str) -> LogPosition:
        self._check()
        if len(data) > self._limits.max_message_bytes:
            raise ConfigurationError(
                f"message of {len(data)} bytes is over max_message_bytes={self._limits.max_message_bytes}"
            )
        log = self._log(channel)
        now = time.monotonic()
        seen = log.seen_ids
        while seen:
            oldest = next(iter(seen.values()))
            if oldest[1] >= now - self.dedupe_window:
                break
            seen.popitem(last=False)
        previous = seen.get(message_id)
        if previous is not None:
            return LogPosition(log.epoch, str(previous[0]))
        seq = log.next_seq
        log.next_seq += 1
        log.entries.append(_Entry(seq, now, data))
        seen[message_id] = (seq, now)
        if self.max_messages is not None and len(log.entries) > self.max_messages:
            log.entries.popleft()
            log.first_seq += 1
        self.published += 1
        log.notify()
        return LogPosition(log.epoch, str(seq))

    def _start_seq(self, log: _Log, start: LogPosition | None) -> int:
        if start is None:
            return log.first_seq
        if start.epoch != log.epoch:
            raise LogReset("the session's log was recreated")
        if start.position is None:
            if log.first_seq > 1:
                raise LogReset("retention dropped events after the cursor")
            return 1
        try:
            seq = int(start.position)
        except ValueError:
            raise LogReset(f"position {start.position!r} does not exist in this log") from None
        if seq < log.first_seq:
            raise LogReset("retention dropped events after the cursor")
        if seq >= log.next_seq:
            raise LogReset("the cursor is ahead of the log")
        return seq

    async def read(self, channel: Channel, *, start: LogPosition | None, follow: bool) -> AsyncIterator[StoredMessage]:
        self._check()
        log = self._log(channel)
        seq = self._start_seq(log, start)
        end = log.next_seq
        while True:
            changed = log.changed
            self._check()
            if log.deleted:
                raise LogReset("the session was deleted")
            self._expire(log)
            if seq < log.first_seq:
                raise LogReset("the reader fell behind retention")
            limit = log.next_seq if follow else end
            if seq < limit:
                entry = log.entries[seq - log.first_seq]
                seq += 1
                yield StoredMessage(log.epoch, str(entry.seq), entry.data)
                continue
            if not follow:
                return
            await changed.wait()

    async def head(self, channel: Channel) -> LogPosition | None:
        self._check()
        log = self._log(channel)
        if not log.entries:
            return None
        return LogPosition(log.epoch, str(log.entries[-1].seq))

    async def delete(self, session: str) -> None:
        self._check()
        for kind in ("events", "control"):
            log = self._logs.pop(Channel(session, kind), None)
            if log is not None:
                log.deleted = True
                log.notify()
        self._snapshots.pop(session, None)
        self._presence.pop(session, None)

    async def load_snapshot(self, session: str) -> bytes | None:
        self._check()
        return self._snapshots.get(session)

    async def save_snapshot(self, session: str, data: bytes) -> None:
        self._check()
        self._snapshots[session] = data

    async def enter_presence(self, session: str, member_id: str, data: bytes, *, role: PresenceRole) -> None:
        self._check()
        self._presence.setdefault(session, {})[(role, member_id)] = data

    async def leave_presence(self, session: str, member_id: str, *, role: PresenceRole) -> None:
        self._check()
        members = self._presence.get(session)
        if members is not None:
            members.pop((role, member_id), None)

    async def presence(self, session: str) -> list[PresenceEntry]:
        self._check()
        members = self._presence.get(session, {})
        return [PresenceEntry(member, role, data) for (role, member), data in members.items()]


def from_url(url: str) -> MemoryBackend:
    """Build a :class:`MemoryBackend` from ``memory://?option=value...``."""
    parts = urlsplit(url)
    if parts.scheme != "memory":
        raise ConfigurationError(f"not a memory:// URL: {url!r}")
    options: dict[str, float | int | None] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        unbounded = value in ("", "none")
        if key == "max_messages":
            options[key] = None if unbounded else _number(key, value, int)
        elif key in ("max_age", "rate_limit"):
            options[key] = None if unbounded else _number(key, value, float)
        elif key == "max_message_bytes":
            options[key] = _number(key, value, int)
        elif key == "dedupe_window":
            options[key] = _number(key, value, float)
        else:
            raise ConfigurationError(f"unknown memory:// option {key!r}")
    return MemoryBackend(**options)  # type: ignore[arg-type]


def _number(key: str, value: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(value)
    except ValueError:
        raise ConfigurationError(f"memory:// option {key} must be a number, got {value!r}") from None
