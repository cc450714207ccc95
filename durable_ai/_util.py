"""Small internal helpers: ids, clocks, the rate budget and validation of names."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time

from .errors import ConfigurationError, InvalidSessionId

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_BAD_CHAR = re.compile(r"[^A-Za-z0-9_-]")


def validate_session_id(session_id: object) -> str:
    """Return the id if it can name a channel on every backend, else raise :class:`InvalidSessionId`."""
    if not isinstance(session_id, str):
        raise InvalidSessionId(session_id, "a session id is a string")
    if not session_id:
        raise InvalidSessionId(session_id, "a session id cannot be empty")
    if len(session_id) > 128:
        raise InvalidSessionId(session_id, f"{len(session_id)} characters, at most 128 are allowed")
    if not _SESSION_ID.fullmatch(session_id):
        bad = _BAD_CHAR.search(session_id)
        char = bad.group() if bad else "?"
        raise InvalidSessionId(session_id, f"character {char!r} is not allowed (use letters, digits, '_' and '-')")
    return session_id


def validate_name(kind: str, value: object) -> str:
    """Agent names, run, part and message ids: 1 to 128 printable characters (so valid UTF-8 too)."""
    if not isinstance(value, str) or not value or len(value) > 128 or not value.isprintable():
        raise ConfigurationError(f"{kind} must be 1 to 128 printable characters, got {value!r}")
    return value


def derived_id(kind: str, source: str) -> str:
    """An event id computed from what caused the event, so processes that write it independently agree."""
    return f"{kind}-{hashlib.sha256(source.encode()).hexdigest()[:32]}"


def now_ms() -> int:
    return int(time.time() * 1000)


class IdFactory:
    """Unique, unguessable ids: 96 random bits each, drawn from a pool so an id costs no system call.

    Ids become broker dedupe keys and appear in every event a client reads: knowing some must not tell anyone
    the next ones.
    """

    _BATCH = 512

    def __init__(self) -> None:
        self._pool = b""
        self._offset = 0

    def __call__(self) -> str:
        offset = self._offset
        if offset >= len(self._pool):
            self._pool, offset = os.urandom(12 * self._BATCH), 0
        self._offset = offset + 12
        return self._pool[offset : offset + 12].hex()


class RateBudget:
    """A token bucket that keeps any one-second window at or under ``per_second`` operations.

    By default 90% of the budget refills steadily and 10% is burst, so a quiet channel flushes at once and a busy
    one widens its batching window instead of being rejected by the broker. ``burst`` sets the bucket's size
    instead (the refill rate is then ``per_second``).
    """

    def __init__(self, per_second: float, *, burst: float | None = None) -> None:
        if not per_second > 0:
            raise ConfigurationError("a rate must be positive")
        if burst is None:
            self._capacity = max(1.0, per_second * 0.1)
            self._rate = max(per_second - self._capacity, per_second * 0.5)
        else:
            self._capacity = max(1.0, burst)
            self._rate = per_second
        self._tokens = self._capacity
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def take(self) -> bool:
        """Take one token if there is one; never waits."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    async def acquire(self) -> None:
        """Take one token, waiting for it if the bucket is empty."""
        while True:
            if self.take():
                return
            await asyncio.sleep((1.0 - self._tokens) / self._rate)
