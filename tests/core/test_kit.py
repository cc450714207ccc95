"""The adapter kit: bounded taps, the read loop's switch from backlog to live and back, snapshots, retries."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest

from durable_ai.backend import (
    Fanout,
    LogPosition,
    OpenCount,
    PresenceKeeper,
    StoredMessage,
    Tap,
    follow_log,
    pack_snapshot,
    retry_call,
    snapshot_chunk_count,
    unpack_snapshot,
)


def _message(n: int, size: int = 1) -> StoredMessage:
    return StoredMessage("e", str(n), b"x" * size)


async def test_a_tap_overflows_on_bytes_before_messages() -> None:
    tap = Tap(max_messages=1000, max_bytes=10_000)
    for n in range(1, 4):
        tap.offer(_message(n, 3000))
    assert tap.queued_bytes == 9000 and not tap.overflowed
    tap.offer(_message(4, 3000))  # would hold 12,000 bytes
    assert tap.overflowed and tap.queued_bytes == 0 and not tap.items
    assert await tap.next() is None  # back to the backlog


async def test_a_tap_overflows_on_messages() -> None:
    tap = Tap(max_messages=2, max_bytes=1 << 20)
    for n in range(1, 4):
        tap.offer(_message(n))
    assert await tap.next() is None


async def test_a_failed_tap_hands_over_what_it_holds_then_raises() -> None:
    tap = Tap()
    tap.offer(_message(1))
    tap.fail(ConnectionError("gone"))
    assert (await tap.next()) == _message(1)
    with pytest.raises(ConnectionError):
        await tap.next()


async def test_the_watchdog_runs_while_a_reader_waits() -> None:
    calls = 0
    tap: Tap

    def watchdog() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            tap.fail(TimeoutError("silent"))

    tap = Tap(watchdog=watchdog, interval=0.01)
    with pytest.raises(TimeoutError):
        await tap.next()
    assert calls == 3


async def test_fanout_routes_by_key_and_counts_readers() -> None:
    fanout: Fanout[str] = Fanout()
    a, b, c = Tap(), Tap(), Tap()
    assert fanout.add("s1", a) and not fanout.add("s1", b) and fanout.add("s2", c)
    fanout.deliver("s1", _message(1))
    assert len(a.items) == len(b.items) == 1 and not c.items
    assert not fanout.remove("s1", a) and fanout.remove("s1", b) and len(fanout) == 1


class _Log:
    """A log with a live feed whose taps can be made to overflow."""

    def __init__(self) -> None:
        self.messages: list[StoredMessage] = []
        self.fanout: Fanout[str] = Fanout()
        self.backlog_starts: list[str | None] = []
        self.detached = 0

    def publish(self, n: int) -> None:
        message = _message(n)
        self.messages.append(message)
        self.fanout.deliver("c", message)

    async def backlog(self, start: LogPosition | None) -> AsyncIterator[StoredMessage]:
        self.backlog_starts.append(start.position if start is not None else None)
        first = int(start.position) if start is not None and start.position is not None else 0
        for message in [m for m in self.messages if int(m.position) >= first]:
            yield message

    async def attach(self) -> Tap:
        tap = Tap(max_messages=3)
        self.fanout.add("c", tap)
        return tap

    def detach(self, tap: Tap) -> None:
        self.detached += 1
        self.fanout.remove("c", tap)


async def test_follow_log_skips_overlap_and_rereads_after_an_overflow() -> None:
    log = _Log()
    for n in range(1, 4):
        log.publish(n)
    reader = follow_log(
        start=LogPosition("e", "2"),
        follow=True,
        backlog=log.backlog,
        attach=log.attach,
        detach=log.detach,
        order=int,
    )
    got = [int((await anext(reader)).position) for _ in range(2)]  # 2, 3 from the backlog
    log.publish(4)
    got.append(int((await anext(reader)).position))  # live
    for n in range(5, 10):  # more than the tap holds: it overflows
        log.publish(n)
    got += [int((await anext(reader)).position) for _ in range(5)]
    await reader.aclose()  # type: ignore[attr-defined]
    assert got == [2, 3, 4, 5, 6, 7, 8, 9]  # nothing lost, nothing twice, in order
    assert log.backlog_starts == ["2", "4"]  # re-read from the last message yielded
    assert log.detached == 2 and not log.fanout.taps


async def test_open_count_connects_once_and_disconnects_with_the_last_user() -> None:
    count, connects = OpenCount(), 0

    async def connect() -> None:
        nonlocal connects
        connects += 1
        await asyncio.sleep(0)

    await asyncio.gather(count.open(connect), count.open(connect))
    assert connects == 1
    assert not count.release() and count.release()


async def test_presence_keeper_refreshes_and_leaves_on_close() -> None:
    refreshed: list[str] = []
    left: list[str] = []
    refreshing = asyncio.Event()

    async def refresh(key: str, data: bytes) -> None:
        refreshed.append(key)
        refreshing.set()

    async def leave(key: str) -> None:
        left.append(key)

    keeper = PresenceKeeper[str](refresh, interval=0.01)
    keeper.entered("a", b"1")
    keeper.entered("b", b"2")
    keeper.left("b")
    async with asyncio.timeout(5):
        await refreshing.wait()
    await keeper.close(leave)
    assert set(refreshed) == {"a"} and left == ["a"]


def test_snapshots_round_trip_whole_and_in_chunks() -> None:
    for data in (b"small", b"a" * 100_000, os.urandom(50_000)):
        chunks, head = pack_snapshot(data, 8192)
        assert snapshot_chunk_count(head) == len(chunks)
        assert all(len(chunk) <= 8192 for chunk in chunks)
        assert unpack_snapshot(head, chunks) == data
    assert pack_snapshot(os.urandom(50_000), 8192)[0], "incompressible data larger than a record is chunked"


async def test_retry_call_retries_what_is_retryable_until_the_deadline() -> None:
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError("later")
        return "ok"

    assert await retry_call(flaky, retryable=lambda e: isinstance(e, ConnectionError), within=5) == "ok"
    assert attempts == 3

    async def refused() -> str:
        raise PermissionError("no")

    with pytest.raises(PermissionError):
        await retry_call(refused, retryable=lambda e: isinstance(e, ConnectionError), within=5)

    async def down() -> str:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await retry_call(down, retryable=lambda e: True, within=0.05, first_delay=0.01)


async def test_presence_keeper_closes_when_a_refresh_swallows_the_cancel() -> None:
    """Client libraries can swallow a cancel (asyncio.wait_for before 3.12): close() must still end the refresher."""
    refreshing = asyncio.Event()

    async def refresh(key: str, data: bytes) -> None:
        refreshing.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)

    keeper = PresenceKeeper[str](refresh, interval=0.001)
    keeper.entered("a", b"1")
    async with asyncio.timeout(5):
        await refreshing.wait()
        await keeper.close(None)
