"""What networked backends share, written once: live fan-out, the read loop, open counting, presence upkeep,
the snapshot codec and retries.

A broker adapter (NATS, Ably) has the same problems to solve around its own client library:

- **Live fan-out.** One live subscription per channel (or per group of channels) serves every local reader of it.
  Each reader has a :class:`Tap`, a queue bounded in messages *and* bytes; a reader that falls that far behind
  is told to go back to the backlog (:meth:`Tap.next` returns ``None``) instead of holding the messages or
  slowing the subscription. :class:`Fanout` routes deliveries to the taps of their channel.
- **The read loop.** :func:`follow_log` attaches to the live feed first, reads the backlog from a position, skips
  what was already yielded, goes live, and re-reads the backlog from its last position whenever its tap
  overflows. The adapter supplies the backlog (which raises :class:`~durable_ai.errors.LogReset` when the
  message at the start, or one removed while it reads, is gone) and the attach/detach of taps.
- **Shared connections.** :class:`OpenCount`: hubs may share one backend; the first ``open`` connects, the last
  ``close`` disconnects.
- **Presence upkeep.** :class:`PresenceKeeper` remembers what this process entered, refreshes entries that
  expire, and leaves them all (best effort, bounded) on close.
- **Snapshots larger than a message.** :func:`pack_snapshot` / :func:`unpack_snapshot`.
- **Retries.** :func:`retry_call`: the first attempt runs bare, retryable failures are retried with exponential
  backoff until a deadline.

The memory backend needs none of this and stays the reference implementation of the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from ..cursor import LogPosition
from .base import StoredMessage

__all__ = [
    "Fanout",
    "OpenCount",
    "PresenceKeeper",
    "Tap",
    "cancel_and_wait",
    "follow_log",
    "pack_snapshot",
    "raise_if_cancelling",
    "retry_call",
    "snapshot_chunk_count",
    "unpack_snapshot",
]

logger = logging.getLogger("durable_ai")
T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

#: what a reader may hold of live messages it has not consumed yet, by default
TAP_MESSAGES = 10_000
TAP_BYTES = 8 * 1024 * 1024


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that something below swallowed.

    Before Python 3.12, ``asyncio.wait_for`` (which client libraries use for requests) can return a result and
    drop a ``cancel()`` that arrived in the same loop iteration; the task then goes on with ``cancelling() > 0``.
    Waiting loops call this before they wait, so such a task still stops instead of following a live tail
    forever. Nothing else should: code that caught its own cancellation to clean up must be able to call the
    backend.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task this code owns and wait until it has ended; the caller's own cancellation still propagates.

    (``with suppress(CancelledError): await task`` would also swallow a cancel of the caller that arrives while
    it waits, and a task that keeps running would hold the caller for good.)
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception as exc:
        logger.debug("task %s failed while it was cancelled: %r", task.get_name(), exc)


class Tap:
    """One reader's queue of live messages, bounded in messages and in bytes.

    Args:
        max_messages: messages the reader may fall behind before it is sent back to the backlog.
        max_bytes: bytes of data the reader may fall behind (the message that crosses it overflows the tap).
        watchdog: called whenever the reader has waited ``interval`` seconds for a message; it may call
            :meth:`fail` (a subscription that went silent, say). Without one, the reader waits without a timer
            (cheaper per message), and whoever feeds the tap must :meth:`fail` it when its subscription is lost.
        interval: seconds between watchdog calls while waiting.
    """

    def __init__(
        self,
        *,
        max_messages: int = TAP_MESSAGES,
        max_bytes: int = TAP_BYTES,
        watchdog: Callable[[], None] | None = None,
        interval: float = 1.0,
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.watchdog = watchdog
        self.interval = interval
        self.items: deque[StoredMessage] = deque()
        self.queued_bytes = 0
        self.overflowed = False
        self.error: BaseException | None = None
        self._ready = asyncio.Event()

    def offer(self, message: StoredMessage) -> None:
        """Queue a live message; past either bound the tap overflows and drops what it held."""
        if self.overflowed or self.error is not None:
            return
        size = len(message.data)
        if len(self.items) >= self.max_messages or self.queued_bytes + size > self.max_bytes:
            self.overflowed = True
            self.items.clear()
            self.queued_bytes = 0
        else:
            self.items.append(message)
            self.queued_bytes += size
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        """End the live read with ``error`` (raised by :meth:`next` once the queued messages are consumed)."""
        if self.error is None:
            self.error = error
        self._ready.set()

    async def next(self) -> StoredMessage | None:
        """The next live message; ``None`` when this reader fell too far behind and must read the backlog."""
        while not self.items:
            if self.overflowed:
                return None
            if self.error is not None:
                raise self.error
            self._ready.clear()
            raise_if_cancelling()
            if self.watchdog is None:
                await self._ready.wait()  # whoever feeds the tap fails it when its subscription goes silent
                continue
            try:
                async with asyncio.timeout(self.interval):
                    await self._ready.wait()
            except TimeoutError:
                self.watchdog()
        if self.overflowed:
            return None
        message = self.items.popleft()
        self.queued_bytes -= len(message.data)
        return message


class Fanout(Generic[K]):
    """The taps of every channel one live subscription serves, by channel key."""

    def __init__(self) -> None:
        self.taps: dict[K, set[Tap]] = {}

    def add(self, key: K, tap: Tap) -> bool:
        """Add a reader of ``key``; ``True`` if it is the first one."""
        taps = self.taps.setdefault(key, set())
        taps.add(tap)
        return len(taps) == 1

    def remove(self, key: K, tap: Tap) -> bool:
        """Remove a reader of ``key``; ``True`` if it was the last one."""
        taps = self.taps.get(key)
        if taps is None:
            return False
        taps.discard(tap)
        if taps:
            return False
        del self.taps[key]
        return True

    def deliver(self, key: K, message: StoredMessage) -> None:
        for tap in self.taps.get(key, ()):
            tap.offer(message)

    def fail(self, key: K, error: BaseException) -> None:
        for tap in self.taps.get(key, ()):
            tap.fail(error)

    def fail_all(self, error: BaseException) -> None:
        for taps in self.taps.values():
            for tap in taps:
                tap.fail(error)

    def __len__(self) -> int:
        return len(self.taps)


async def follow_log(
    *,
    start: LogPosition | None,
    follow: bool,
    backlog: Callable[[LogPosition | None], AsyncIterator[StoredMessage]],
    attach: Callable[[], Awaitable[Tap]],
    detach: Callable[[Tap], None],
    order: Callable[[str], Any],
) -> AsyncIterator[StoredMessage]:
    """The read loop of :meth:`durable_ai.backend.Backend.read` for a backend with a backlog and a live feed.

    Args:
        start: where to read from, as ``Backend.read`` takes it.
        follow: go on with the live tail after the backlog.
        backlog: reads the log from a position (inclusive; ``None``: from the earliest), up to what it holds when
            called, and raises ``LogReset`` when the message at the position is gone or messages are removed while
            it reads. Called again from the last message yielded after a tap overflows.
        attach: a new tap on the channel's live feed (attached before the backlog is read, so nothing published
            in between is missed).
        detach: releases a tap.
        order: the sort key of a position (live and backlog deliveries overlap; older ones are skipped).
    """
    tap: Tap | None = None
    last: Any = None
    try:
        while True:
            if follow and tap is None:
                tap = await attach()
            backlog_messages = backlog(start)
            try:
                async for message in backlog_messages:
                    key = order(message.position)
                    if last is not None and key <= last:
                        continue
                    last = key
                    start = LogPosition(message.epoch, message.position)
                    yield message
            finally:
                with contextlib.suppress(Exception):
                    await backlog_messages.aclose()  # type: ignore[attr-defined]
            if tap is None:
                return
            while (live := await tap.next()) is not None:
                key = order(live.position)
                if last is not None and key <= last:
                    continue
                last = key
                start = LogPosition(live.epoch, live.position)
                yield live
            # Fell behind the feed: read the backlog again from the last message read (inclusive).
            detach(tap)
            tap = None
    finally:
        if tap is not None:
            detach(tap)


class OpenCount:
    """Open/close of a backend that several hubs share: the first ``open`` connects, the last ``close`` ends."""

    def __init__(self) -> None:
        self.users = 0
        self.connected = False
        self._lock = asyncio.Lock()

    async def open(self, connect: Callable[[], Awaitable[None]]) -> None:
        self.users += 1
        async with self._lock:  # hubs sharing the backend may open it concurrently: connect once
            if not self.connected:
                try:
                    await connect()
                except BaseException:
                    self.users -= 1
                    raise
                self.connected = True

    def release(self) -> bool:
        """One user fewer; ``True`` when that was the last one and the backend must disconnect now."""
        self.users -= 1
        if self.users > 0 or not self.connected:
            return False
        self.connected = False
        return True


class PresenceKeeper(Generic[K]):
    """The presence entries this process entered: refreshed before they expire, left on close.

    Args:
        refresh: writes one entry again (``None``: entries do not expire).
        interval: seconds between refreshes.
    """

    def __init__(self, refresh: Callable[[K, bytes], Awaitable[None]] | None = None, interval: float = 10.0) -> None:
        self.entries: dict[K, bytes] = {}
        self._refresh = refresh
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def entered(self, key: K, data: bytes) -> None:
        self.entries[key] = data
        if self._refresh is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep(), name="durable-ai presence refresh")

    def left(self, key: K) -> None:
        self.entries.pop(key, None)

    def forget(self, match: Callable[[K], bool]) -> None:
        """Drop the entries ``match`` selects (a deleted session's, say) without leaving them."""
        for key in [key for key in self.entries if match(key)]:
            del self.entries[key]

    async def _keep(self) -> None:
        assert self._refresh is not None
        while True:
            raise_if_cancelling()  # a close() whose cancel a client library swallowed must still end this loop
            await asyncio.sleep(self._interval)
            for key, data in list(self.entries.items()):
                try:
                    await self._refresh(key, data)
                except Exception as exc:
                    logger.info("could not refresh presence entry %r: %s", key, exc)
                raise_if_cancelling()

    async def close(self, leave: Callable[[K], Awaitable[None]] | None, *, within: float = 2.0) -> None:
        """Stop refreshing, and leave every entry still held (best effort, within ``within`` seconds)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        entries, self.entries = list(self.entries), {}
        if leave is None or not entries:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(within):
                for key in entries:
                    await leave(key)


# -- snapshots -------------------------------------------------------------------------------------------------


def pack_snapshot(data: bytes, room: int) -> tuple[list[bytes], bytes]:
    """The messages that store a snapshot in records of at most ``room`` bytes: chunks (maybe none), then a head.

    The head is ``z`` + zlib data, ``r`` + raw data, or ``c<count>`` when the compressed data is split over the
    ``count`` chunks written before it (write the chunks first and the head last, so a reader that finds a head
    finds its chunks).
    """
    packed = zlib.compress(data, 1)
    payload = b"z" + packed if len(packed) < len(data) else b"r" + data
    if len(payload) <= room:
        return [], payload
    chunks = [packed[i : i + room] for i in range(0, len(packed), room)]
    return chunks, b"c" + str(len(chunks)).encode()


def snapshot_chunk_count(head: bytes) -> int:
    """How many chunks precede this head (0 for a whole snapshot)."""
    return int(head[1:]) if head[:1] == b"c" else 0


def unpack_snapshot(head: bytes, chunks: list[bytes]) -> bytes:
    """The snapshot from its head and its chunks, in order."""
    kind, rest = head[:1], head[1:]
    if kind == b"c":
        kind, rest = b"z", b"".join(chunks)
    return zlib.decompress(rest) if kind == b"z" else rest


# -- retries ---------------------------------------------------------------------------------------------------


async def retry_call(
    attempt: Callable[[], Awaitable[T]],
    *,
    retryable: Callable[[BaseException], bool],
    within: float,
    first_delay: float = 0.05,
    max_delay: float = 1.0,
) -> T:
    """Run ``attempt``; retry failures ``retryable`` accepts, with exponential backoff, for up to ``within`` s.

    The first attempt runs bare (most requests succeed at once, and setting up a retry loop per request costs
    more than the request). The last failure is raised once the deadline passes.
    """
    deadline = time.monotonic() + within
    delay = first_delay
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not retryable(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, max_delay)
