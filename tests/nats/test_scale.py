"""Scale on a real nats-server, with default settings: a stalled reader's memory, and a thousand live sessions.

- A subscriber that stops reading must not make its process hold everything written since: its live queue is
  bounded, it falls back to reading the backlog, and when it reads again it gets every event, in order.
- One process serves a thousand sessions, each followed live by a subscriber in the same process, and a stop
  button still works on the last one.

Waits are on events with timeouts, never on sleeps. Run just these with ``pytest tests/nats/test_scale.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import pytest

import durable_ai
from durable_ai import Event, Hub, Reset, RunEnd, RunStart, Status, TextDelta
from durable_ai_nats.testing import NatsServer

MiB = 1024 * 1024
T = TypeVar("T")


@pytest.fixture
async def server() -> AsyncIterator[NatsServer]:
    async with NatsServer() as server:
        yield server


def _url(server: NatsServer) -> str:
    """The server's URL with a subject prefix of this test's own (so its stream starts empty); nothing else."""
    return f"{server.url}?prefix=t{secrets.token_hex(4)}"


# -- a stalled reader ----------------------------------------------------------------------------------------

CHUNK = 256 * 1024  # characters (ASCII: bytes) per run.text(): broker messages of about 1 MiB, the largest
CHUNKS = 400  # 100 MiB in all
# What a stalled reader may add to its process's resident memory, over what the writer alone needs.
STALLED_READER_BOUND = 64 * MiB
_FILLER = "x" * CHUNK
_STATM = Path("/proc/self/statm")


def _rss() -> int:
    """The process's resident memory now, in bytes."""
    return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _chunk(run: int, index: int) -> str:
    """A distinct 256 KiB string, built when it is written (holding them all would cost the 100 MiB measured)."""
    head = f"{run}:{index:06d}|"
    return head + _FILLER[len(head) :]


class _Peak:
    """The highest resident memory sampled, over a baseline."""

    def __init__(self) -> None:
        self.base = _rss()
        self.peak = self.base

    def sample(self) -> None:
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.mark.skipif(not _STATM.exists(), reason="reads resident memory from /proc/self/statm (Linux)")
async def test_a_stalled_reader_does_not_hold_what_is_written_meanwhile(server: NatsServer) -> None:
    """100 MiB written while a local subscriber has stopped reading: memory stays bounded; it then gets it all.

    The writer first writes 100 MiB with no reader (what it needs alone), then 100 MiB into a session that a
    subscriber of the same process opened, read one event of, and stopped reading. A second subscriber of that
    session keeps reading, to know when the process has received everything. Both runs stay open until memory
    is measured (the snapshot saved after a run ends is the writer's cost, not the reader's).
    """
    url = _url(server)
    async with durable_ai.connect(url) as writer, durable_ai.connect(url) as readers:
        alone, stalled_session = f"alone-{secrets.token_hex(4)}", f"stalled-{secrets.token_hex(4)}"
        memory = _Peak()
        async with writer.session(alone).run(agent="writer") as first:
            for index in range(CHUNKS):
                await first.text(_chunk(1, index))
                memory.sample()
            await first.flush()
            memory.sample()
            writer_alone = memory.growth

            expected = hashlib.sha256()
            stalled = readers.session(stalled_session).events()
            try:
                async with asyncio.timeout(30), writer.session(stalled_session).run(agent="writer") as second:
                    opened = await anext(stalled)  # its first event; then it stops reading
                    assert isinstance(opened, RunStart) and opened.run_id == second.id
                    reading = asyncio.create_task(_read_until(readers, stalled_session, "the end"))
                    try:
                        for index in range(CHUNKS):
                            chunk = _chunk(2, index)
                            expected.update(chunk.encode())
                            await second.text(chunk)
                            memory.sample()
                        await second.status("the end")
                        memory.sample()
                        await asyncio.shield(reading)  # this process has received everything the writer wrote
                        memory.sample()
                    finally:
                        reading.cancel()
                        await asyncio.gather(reading, return_exceptions=True)
                    with_stalled_reader = memory.growth
                    run_id = second.id

                # The stalled reader reads again: every event after the one it read, in order, then the run-end.
                got = hashlib.sha256()
                length = 0
                events: list[Event] = [opened]
                async with asyncio.timeout(60):
                    async for event in stalled:
                        events.append(event)
                        if isinstance(event, TextDelta) and event.run_id == run_id:
                            got.update(event.delta.encode())
                            length += len(event.delta)
                        if isinstance(event, RunEnd):
                            break
            finally:
                await stalled.aclose()

    extra = with_stalled_reader - writer_alone
    assert extra < STALLED_READER_BOUND, (
        f"with a stalled reader the process grew by {with_stalled_reader / MiB:.0f} MiB while"
        f" {CHUNKS * CHUNK / MiB:.0f} MiB were written; the writer alone grew by {writer_alone / MiB:.0f} MiB:"
        f" {extra / MiB:.0f} MiB more (at most {STALLED_READER_BOUND / MiB:.0f} MiB more allowed)"
    )
    assert not [e for e in events if isinstance(e, Reset)], "the stalled reader got a reset: history is retained"
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), "the stalled reader got an event twice"
    assert length == CHUNKS * CHUNK and got.digest() == expected.digest(), "the stalled reader's text has a gap"
    end = events[-1]
    assert isinstance(end, RunEnd) and end.run_id == run_id and end.status == "completed"


async def _read_until(hub: Hub, session: str, status: str) -> None:
    """Follow a session from its start until a status event with ``status`` arrives."""
    async with hub.session(session).events() as stream:
        async for event in stream:
            if isinstance(event, Status) and event.text == status:
                return
    raise AssertionError("the stream ended before the status")


# -- a thousand sessions ---------------------------------------------------------------------------------------

SESSIONS = 1000
PHASE = 30.0  # seconds each step (entering the runs, opening the subscribers, ending the runs) may take


@pytest.mark.timeout(180)
async def test_a_thousand_live_sessions_in_one_process(server: NatsServer) -> None:
    """1,000 runs in one hub, each session followed live by a subscriber of another hub of the same process.

    With all 1,000 followers live, a cancel of the last session's run is acknowledged ``applied`` and that run
    ends ``cancelled``; the other 999 then complete, and every follower gets its run's ``run-end``.
    """
    url = _url(server)
    loop = asyncio.get_running_loop()
    ids = [f"scale-{index:04d}-{secrets.token_hex(3)}" for index in range(SESSIONS)]
    entered: list[asyncio.Future[str]] = [loop.create_future() for _ in ids]
    first: list[asyncio.Future[Event]] = [loop.create_future() for _ in ids]
    release = asyncio.Event()

    async with durable_ai.connect(url) as agent, durable_ai.connect(url) as client:

        async def work(index: int) -> bool:
            async with agent.session(ids[index]).run(agent="worker") as run:
                await run.text("working on it")
                entered[index].set_result(run.id)
                await release.wait()  # a slow model call; the cancel interrupts it
            return run.cancelled

        async def follow(index: int) -> RunEnd:
            async with client.session(ids[index]).events() as stream:
                async for event in stream:
                    if not first[index].done():
                        first[index].set_result(event)
                    if isinstance(event, RunEnd):
                        return event
            raise AssertionError(f"the stream of {ids[index]} ended before its run-end")

        workers = [asyncio.create_task(work(index)) for index in range(SESSIONS)]
        followers: list[asyncio.Task[RunEnd]] = []
        try:
            run_ids = await _all(entered, "runs entered")
            followers = [asyncio.create_task(follow(index)) for index in range(SESSIONS)]
            firsts = await _all(first, "followers got their run's first event")
            assert all(isinstance(e, RunStart) and e.run_id == r for e, r in zip(firsts, run_ids, strict=True))

            last = client.session(ids[-1])
            handle = await last.cancel(run_ids[-1], reason="user pressed stop")
            ack = await handle.ack(timeout=20)
            assert ack.outcome == "applied" and ack.run_id == run_ids[-1]
            end = await handle.done(timeout=20)
            assert end is not None and end.status == "cancelled" and end.reason == "user pressed stop"
            async with asyncio.timeout(20):
                assert await asyncio.shield(workers[-1]) is True  # the agent's block saw the cancel
                assert (await asyncio.shield(followers[-1])).status == "cancelled"

            release.set()
            cancelled = await _all(workers, "runs ended")
            ends = await _all(followers, "followers got their run-end")
        finally:
            release.set()  # the runs end, so the followers can
            await _finish(workers)
            await _finish(followers)
    assert cancelled == [False] * (SESSIONS - 1) + [True]
    assert [e.status for e in ends] == ["completed"] * (SESSIONS - 1) + ["cancelled"]
    assert [e.run_id for e in ends] == run_ids


async def _all(futures: list[asyncio.Future[T]] | list[asyncio.Task[T]], what: str) -> list[T]:
    """Wait for every one of ``futures`` (shielded) for up to ``PHASE`` seconds; fail saying how many did."""
    waiting = [asyncio.ensure_future(f) for f in futures]
    done, _ = await asyncio.wait(waiting, timeout=PHASE)
    if len(done) < len(waiting):
        failed = [f for f in done if f.exception() is not None]
        detail = f"; {len(failed)} failed, first with {failed[0].exception()!r}" if failed else ""
        pytest.fail(f"only {len(done) - len(failed)} of {len(waiting)} {what} within {PHASE:g}s{detail}")
    return [f.result() for f in waiting]


async def _finish(tasks: list[asyncio.Task[bool]] | list[asyncio.Task[RunEnd]]) -> None:
    """Give the tasks ``PHASE`` seconds to end, cancel what is still running, and wait for every task."""
    if tasks:
        await asyncio.wait(tasks, timeout=PHASE)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
