"""The edges of a run's life: every run that started ends, close drains, and no bad message wedges a session."""

from __future__ import annotations

import asyncio
import logging

import pytest

from durable_ai import (
    Coalesce,
    ConfigurationError,
    Hub,
    HubClosed,
    PublishError,
    PublishRefused,
    Run,
    RunClosed,
    RunEnd,
    RunIdInUse,
    RunStart,
    SessionView,
    TextDelta,
)
from durable_ai._tail import split_snapshot
from durable_ai.backends.memory import MemoryBackend
from durable_ai.testing import RecordingBackend, stored_events
from durable_ai.testing.scenarios import collect, text_of
from tests.core.doubles import GatedBackend, RefusingBackend, SlowSnapshotBackend, StuckPresenceBackend

HOUR = Coalesce(max_delay=3600)
SHUTDOWN = "the agent process is shutting down"


def _tasks_named(prefix: str) -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(prefix) and not t.done()]


async def _settled(hub: Hub) -> None:
    """Until the hub lets go of every session it no longer uses."""
    await hub.flush()
    async with asyncio.timeout(5):
        while True:
            if not hub._runtime.owners:
                return
            await asyncio.sleep(0.01)


# -- 1. a run that started ends ---------------------------------------------------------------------------------


async def test_a_run_cancelled_while_its_run_start_is_published_still_ends() -> None:
    backend = GatedBackend()
    async with Hub(backend) as agent_hub, Hub(backend) as client_hub:
        backend.gate.clear()
        entered = False

        async def agent() -> None:
            nonlocal entered
            async with agent_hub.session("s").run(agent="w"):
                entered = True

        task = asyncio.create_task(agent())
        await asyncio.wait_for(backend.held.wait(), 5)  # run-start is queued and being published
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        backend.gate.set()
        await _settled(agent_hub)
        events = await collect(client_hub.session("s").events(follow=False))
        leftovers = _tasks_named("durable-ai control") + _tasks_named("durable-ai writer")
    assert not entered
    assert [e.type for e in events] == ["run-start", "run-end"]
    end = events[-1]
    assert isinstance(end, RunEnd) and (end.status, end.reason) == ("cancelled", "the agent task was cancelled")
    assert not leftovers  # no control loop or writer outlives the run that never entered


async def test_a_publish_timeout_while_entering_raises_and_still_ends_the_run() -> None:
    backend = GatedBackend()
    async with Hub(backend, publish_timeout=0.2) as agent_hub, Hub(backend) as client_hub:
        backend.gate.clear()
        with pytest.raises(PublishError):
            async with agent_hub.session("s").run(agent="w"):
                pass
        backend.gate.set()  # the broker is back: the run-start lands, then its run-end
        await _settled(agent_hub)
        events = await collect(client_hub.session("s").events(follow=False))
    assert [e.type for e in events] == ["run-start", "run-end"]
    end = events[-1]
    assert isinstance(end, RunEnd) and end.status == "failed" and "PublishError" in (end.reason or "")


async def test_presence_never_delays_the_first_token() -> None:
    backend = StuckPresenceBackend()
    async with Hub(backend, publish_timeout=60) as agent_hub, Hub(backend) as client_hub:
        live = client_hub.session("s").events()
        release = asyncio.Event()

        async def agent() -> None:
            async with agent_hub.session("s").run(agent="w") as run:
                await run.text("first token")
                await release.wait()

        task = asyncio.create_task(agent())
        got = await collect(live, until=lambda e: isinstance(e, TextDelta), seconds=5)
        assert backend.entering.is_set() and not task.done()  # presence is still entering
        release.set()
        await asyncio.wait_for(task, 5)
        events = await collect(client_hub.session("s").events(follow=False))
    assert text_of(got) == "first token"
    assert events[-1].status == "completed"  # type: ignore[union-attr]
    assert len(backend.left) == 1  # the stuck entry was given up and the run left presence


async def test_cancelling_a_run_whose_presence_is_stuck_ends_it_cancelled() -> None:
    backend = StuckPresenceBackend()
    async with Hub(backend, publish_timeout=60) as agent_hub, Hub(backend) as client_hub:
        started = asyncio.Event()

        async def agent() -> None:
            async with agent_hub.session("s").run(agent="w"):
                started.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(agent())
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        events = await collect(client_hub.session("s").events(follow=False))
    assert events[-1].status == "cancelled"  # type: ignore[union-attr]


async def test_writing_to_a_run_that_was_never_entered_says_so(hub: Hub) -> None:
    run = hub.session("s").run(agent="w")
    with pytest.raises(RunClosed, match="never entered"):
        await run.text("too early")
    async with run:
        pass
    with pytest.raises(RunClosed, match="has ended"):
        await run.text("too late")


# -- 2. close drains --------------------------------------------------------------------------------------------


async def test_close_cancels_runs_in_flight_and_drains_their_events_and_snapshot(backend: MemoryBackend) -> None:
    hub = Hub(backend, coalesce=HOUR)
    await hub.open()
    started = asyncio.Event()
    runs: list[Run] = []

    async def agent() -> str:
        async with hub.session("s").run(agent="w") as run:
            runs.append(run)
            await run.text("buffered, never flushed by a timer")
            started.set()
            await asyncio.Event().wait()  # a model call in flight when the process shuts down
        return "the block exited" if run.cancelled else "not cancelled"

    task = asyncio.create_task(agent())
    await asyncio.wait_for(started.wait(), 5)
    await hub.close()
    assert await asyncio.wait_for(task, 5) == "the block exited"
    assert runs[0].cancel_reason == SHUTDOWN
    async with Hub(backend) as reader:
        events = await collect(reader.session("s").events(follow=False))
        snapshot = await backend.load_snapshot("s")
    end = events[-1]
    assert isinstance(end, RunEnd) and (end.status, end.reason) == ("cancelled", SHUTDOWN)
    assert text_of(events) == "buffered, never flushed by a timer"
    assert snapshot is not None
    message = SessionView.model_validate_json(split_snapshot(snapshot)[0]).messages[0]
    assert (message.status, message.text) == ("cancelled", "buffered, never flushed by a timer")


async def test_a_short_lived_hub_leaves_a_snapshot_of_what_it_wrote() -> None:
    backend = SlowSnapshotBackend()
    async with Hub(backend) as hub, hub.session("s").run(agent="w") as run:  # a serverless function
        await run.text("answer")
    async with Hub(backend):
        snapshot = await backend.load_snapshot("s")
    assert snapshot is not None
    view = SessionView.model_validate_json(split_snapshot(snapshot)[0])
    assert [(m.status, m.text) for m in view.messages] == [("completed", "answer")] and not view.active_runs


async def test_a_run_end_that_cannot_be_written_never_replaces_the_blocks_exception(backend: MemoryBackend) -> None:
    async with Hub(backend, publish_timeout=0.1, close_timeout=0.1) as hub:
        with pytest.raises(ValueError, match="the model failed"):
            async with hub.session("s").run(agent="w"):
                backend.set_offline(True)
                raise ValueError("the model failed")
        backend.set_offline(False)


async def test_closing_from_inside_a_run_does_not_cancel_the_close(backend: MemoryBackend) -> None:
    hub = Hub(backend, close_timeout=1)
    await hub.open()
    run = hub.session("s").run(agent="w")
    await run.__aenter__()
    await hub.close()  # returns: the run of this very task is not waited for
    with pytest.raises(HubClosed):
        await run.__aexit__(None, None, None)


# -- 3. a refused message does not wedge the session ------------------------------------------------------------


async def test_a_message_the_broker_refuses_fails_its_waiters_and_later_messages_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = RefusingBackend()
    async with Hub(backend, publish_timeout=30) as hub:
        async with hub.session("s").run(agent="w") as run:
            await run.text("before ")
            with pytest.raises(PublishRefused) as refused:
                await run.status("poison")
            await run.text("after")
            await run.status("still going")
        events = await collect(hub.session("s").events(follow=False))
    assert backend.refused == 1  # refused once: not retried
    assert text_of(events) == "before after"
    assert [e.text for e in events if e.type == "status"] == ["still going"]  # type: ignore[attr-defined]
    assert events[-1].status == "completed"  # type: ignore[union-attr]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "durable_ai"]
    assert len(errors) == 1 and refused.value.message_id in errors[0].getMessage()


# -- 4. one bad item harms no other run -------------------------------------------------------------------------


async def test_text_that_cannot_be_encoded_is_refused_at_the_call_and_harms_no_other_run() -> None:
    async with Hub(MemoryBackend(), coalesce=HOUR) as hub:
        session = hub.session("s")
        async with session.run(agent="a") as a, session.run(agent="b") as b:
            await a.text("a's ")
            await a.text("buffered text")  # waits in the writer that b's writes go through too
            with pytest.raises(ConfigurationError, match="part_id"):
                await b.text("x", part_id="\ud800")
            with pytest.raises(ConfigurationError, match="surrogate"):
                await b.text("lone \ud800 surrogate")
            with pytest.raises(ConfigurationError, match="UTF-8"):
                await b.status("lone \udfff surrogate")
            await b.text("b's text")
        events = await collect(session.events(follow=False))
    assert text_of(events, a.id) == "a's buffered text"
    assert text_of(events, b.id) == "b's text"
    assert sorted(e.status for e in events if isinstance(e, RunEnd)) == ["completed", "completed"]


# -- 10. two writers cannot share a run id ----------------------------------------------------------------------


async def test_a_second_writer_of_an_active_run_id_gets_run_id_in_use(backend: MemoryBackend) -> None:
    async with Hub(backend) as one, Hub(backend) as two:
        async with one.session("s").run(agent="first", run_id="x") as first:
            await first.text("first's text")
            for hub, where in ((one, "in this hub"), (two, "is active")):
                with pytest.raises(RunIdInUse, match=where) as caught:
                    async with hub.session("s").run(agent="second", run_id="x") as second:
                        await second.text("second's text")
                assert (caught.value.session, caught.value.run_id) == ("s", "x")
            await first.text(", still mine")
        with pytest.raises(RunIdInUse, match="already ran"):
            async with two.session("s").run(agent="second", run_id="x"):
                pass
        events = await collect(one.session("s").events(follow=False))
        records = await stored_events(backend, "s")
    assert text_of(events) == "first's text, still mine"
    assert {e.agent for e in events} == {"first"}
    assert [r["type"] for r in records].count("run-start") == 1


async def test_two_writers_entering_one_run_id_at_once_leave_one_run(backend: MemoryBackend) -> None:
    async with Hub(backend) as one, Hub(backend) as two:

        async def writer(hub: Hub, name: str) -> str:
            async with hub.session("s").run(agent=name, run_id="x") as run:
                await run.text(f"{name} ")
            return name

        outcomes = await asyncio.gather(writer(one, "one"), writer(two, "two"), return_exceptions=True)
        events = await collect(one.session("s").events(follow=False))
        records = await stored_events(backend, "s")
    winners = [o for o in outcomes if isinstance(o, str)]
    assert len(winners) == 1 and sum(isinstance(o, RunIdInUse) for o in outcomes) == 1
    assert text_of(events) == f"{winners[0]} " and {e.agent for e in events} == {winners[0]}
    assert [r["type"] for r in records] == ["run-start", "text-delta", "run-end"]


async def test_only_a_chosen_run_id_costs_a_read_of_the_log() -> None:
    recording = RecordingBackend(MemoryBackend())
    async with Hub(recording, snapshots=False) as hub:
        session = hub.session("s")
        await session.user_message("hello")
        async with session.run(agent="w") as generated:
            pass
        generated_reads = recording.messages_read
        async with session.run(agent="w", run_id="chosen"):
            pass
        events = await collect(session.events(follow=False))
    assert generated_reads == 0  # a generated id cannot collide: nothing is read
    assert recording.messages_read > generated_reads
    assert [e.run_id for e in events if isinstance(e, RunStart)] == [generated.id, "chosen"]
