"""Catch-up from the snapshot's tail: a finished answer is read from the snapshot, not message by message.

"Read from the tail" is proven by counting the broker messages a reader reads (``RecordingBackend.messages_read``);
exactness by comparing with the events as a live follower received them, one by one.
"""

from __future__ import annotations

import asyncio

from durable_ai import Coalesce, Event, Hub, ReasoningDelta, RunEnd, TextDelta
from durable_ai._tail import Tail
from durable_ai.backends.memory import MemoryBackend
from durable_ai.testing import RecordingBackend
from durable_ai.testing.scenarios import collect, compacted


async def _write_answer(hub: Hub, session: str, tokens: int, *, size: int = 1) -> None:
    async with hub.session(session).run(agent="w") as run:
        await run.reasoning("thinking")
        for i in range(tokens):
            await run.text(f"{i:0{size}d},")
            if i == tokens // 3:
                await run.status("a third")
            if i == tokens // 2:
                call = await run.tool_call("look", {"at": i})
                await run.tool_result(call, {"seen": True})
        await run.reasoning(" more")


async def _as_written(backend: RecordingBackend, session: str, runs: int) -> list[Event]:
    """The session's events one by one, as a follower reads them (a follower never reads the tail)."""
    async with Hub(backend) as reader:
        events: list[Event] = []
        ended = 0
        async for event in reader.session(session).events():
            events.append(event)
            if isinstance(event, RunEnd):
                ended += 1
                if ended == runs:
                    return events
    raise AssertionError("the follower stopped")


async def test_a_finished_answer_is_caught_up_from_the_snapshot_exactly_from_every_cursor() -> None:
    backend = RecordingBackend(MemoryBackend())
    async with Hub(backend, coalesce=Coalesce.off()) as agent:
        await _write_answer(agent, "s", 120)
        await agent.flush()  # the snapshot (and its tail) is saved
        written = await _as_written(backend, "s", 1)
        assert len(written) > 120
        async with Hub(backend) as client:
            for k, cursor in enumerate([None, *(e.cursor for e in written)]):
                backend.messages_read = 0
                got = await collect(client.session("s").events(after=cursor, follow=False))
                # The same events, text and order after the cursor; adjacent deltas of a part come merged.
                assert compacted(got) == compacted(written[k:]), f"after cursor {k}: {cursor}"
                # Of the log it reads only the message the snapshot ends at: the proof the log is still that one.
                assert backend.messages_read <= 1, "the catch-up read the log"
                # Resuming from any cursor the catch-up gave is exact too.
                for event in got[:3]:
                    index = next(i for i, e in enumerate(written) if e.cursor == event.cursor)
                    again = await collect(client.session("s").events(after=event.cursor, follow=False))
                    assert compacted(again) == compacted(written[index + 1 :])
            merged = await collect(client.session("s").events(follow=False))
            # Merged between the events that separate them in the log: the status, the tool call and its result.
            assert sum(isinstance(e, TextDelta) for e in merged) == 3


async def test_what_came_after_the_snapshot_is_read_from_the_log() -> None:
    backend = RecordingBackend(MemoryBackend())
    async with Hub(backend, coalesce=Coalesce.off()) as agent:
        await _write_answer(agent, "s", 60)
        await agent.flush()
        async with Hub(backend, coalesce=Coalesce.off(), snapshots=False) as later:
            await _write_answer(later, "s", 10)  # no snapshot covers it
            await later.flush()
        written = await _as_written(backend, "s", 2)
        async with Hub(backend) as client:
            middle = next(i for i, e in enumerate(written) if isinstance(e, TextDelta) and e.delta == "30,")
            backend.messages_read = 0
            got = await collect(client.session("s").events(after=written[middle].cursor, follow=False))
            assert compacted(got) == compacted(written[middle + 1 :])
            second_run = len(written) - next(i for i, e in enumerate(written) if isinstance(e, RunEnd)) - 1
            assert 0 < backend.messages_read <= second_run + 1  # the second run's messages, not the first's


async def test_an_answer_longer_than_the_tail_keeps_its_end_and_reads_its_start_from_the_log() -> None:
    backend = RecordingBackend(MemoryBackend(max_messages=None))
    async with Hub(backend, coalesce=Coalesce.off()) as agent:
        # About 600 KB of text, the half after the tool call alone more than the tail keeps (its front is cut).
        await _write_answer(agent, "s", 5000, size=120)
        await agent.flush()
        written = await _as_written(backend, "s", 1)
        async with Hub(backend) as client:
            # From the start: the tail no longer starts there, so the log is read.
            assert compacted(await collect(client.session("s").events(follow=False))) == compacted(written)
            result = next(i for i, e in enumerate(written) if e.type == "tool-result")  # just before the tail
            for k in (1, 40, result, len(written) // 2, len(written) - 20, len(written) - 2):
                backend.messages_read = 0
                got = await collect(client.session("s").events(after=written[k].cursor, follow=False))
                assert compacted(got) == compacted(written[k + 1 :]), f"after event {k}"
                if k == len(written) - 20:
                    assert backend.messages_read <= 1  # near the end: from the tail (and the message it ends at)
                if k == 1:
                    assert backend.messages_read > 1000  # near the start: before the tail, from the log


async def test_a_deleted_session_is_not_caught_up_from_its_old_snapshot() -> None:
    backend = RecordingBackend(MemoryBackend())
    async with Hub(backend, coalesce=Coalesce.off()) as hub:
        await _write_answer(hub, "s", 30)
        await hub.flush()
        cursor = (await _as_written(backend, "s", 1))[5].cursor
        saved = await backend.load_snapshot("s")
        await hub.session("s").delete()
        assert saved is not None
        async with Hub(backend, snapshots=False) as other, other.session("s").run(agent="w") as run:
            await run.text("new")
        await backend.save_snapshot("s", saved)  # as if a slow process saved the old one again after the deletion
        got = await collect(hub.session("s").events(after=cursor, follow=False))
        assert [e.type for e in got] == ["reset", "run-start", "text-delta", "run-end"]


async def test_tail_marks_resume_inside_a_merged_delta() -> None:
    tail = Tail("e::-1")
    events: list[Event] = []
    for i, text in enumerate(["ab", "cd", "ef"]):
        delta = ReasoningDelta(id=f"d{i}", session="s", run_id="r", agent="a", ts=1, part_id="p", delta=text)
        object.__setattr__(delta, "__pydantic_private__", {"cursor": f"e:{i + 1}:0"})
        events.append(delta)
        tail.add(delta)
    data = tail.to_json("e:3:0")
    assert data is not None
    saved = Tail.from_json(data)
    assert saved is not None
    from durable_ai.cursor import Cursor

    whole = saved.events_after(None)
    assert whole is not None and [(e.delta, e.cursor) for e in whole if isinstance(e, ReasoningDelta)] == [
        ("abcdef", "e:3:0")
    ]
    rest = saved.events_after(Cursor.parse("e:1:0"))
    assert rest is not None and [(e.delta, e.cursor) for e in rest if isinstance(e, ReasoningDelta)] == [
        ("cdef", "e:3:0")
    ]
    assert rest[0].id != "d0"  # a part of a merged delta is an event of its own
    assert saved.events_after(Cursor.parse("e:3:0")) == []
    assert saved.events_after(Cursor.parse("e:9:0")) is None  # not covered
    assert saved.events_after(Cursor.parse("x:1:0")) is None  # another epoch
    await asyncio.sleep(0)
