"""What integrations stand on: head, active runs, one run's stream, a cancel's outcome, prompts paired with answers."""

from __future__ import annotations

import asyncio

import pytest

from durable_ai import ControlAck, Hub, Reset, Run, RunEnd, RunStart, TextDelta, UserMessage
from durable_ai.backends.memory import MemoryBackend
from durable_ai.testing import MemoryTarget, scenarios
from durable_ai.testing.scenarios import collect, text_of
from tests.core.doubles import StaleFeedBackend


async def _stalled(hub: Hub, agent: str, started: asyncio.Event, runs: list[Run], **options: str) -> None:
    async with hub.session("s").run(agent=agent, **options) as run:
        runs.append(run)
        await run.text(f"{agent} is working")
        started.set()
        await asyncio.Event().wait()


async def test_head_is_where_only_later_events_come_from(hub: Hub, client_hub: Hub) -> None:
    session = client_hub.session("s")
    assert await session.head() is None
    async with hub.session("s").run(agent="w") as run:
        await run.text("be")
        await run.text("fore")  # buffered: it goes out with the run-end, so the newest message holds two events
    head = await session.head()
    assert head is not None
    async with hub.session("s").run(agent="w") as later:
        await later.text("after")
    events = await collect(session.events(after=head, follow=False))
    assert [e.run_id for e in events] == [later.id] * 3 and text_of(events) == "after"


async def test_active_runs_lists_the_runs_that_started_and_did_not_end(hub: Hub, client_hub: Hub) -> None:
    started = [asyncio.Event(), asyncio.Event()]
    runs: list[Run] = []
    async with hub.session("s").run(agent="done") as finished:
        await finished.text("finished")
    tasks = [asyncio.create_task(_stalled(hub, f"agent-{i}", started[i], runs)) for i in range(2)]
    for event in started:
        await asyncio.wait_for(event.wait(), 5)
    active = await client_hub.session("s").active_runs()
    starts = {
        e.run_id: e.cursor for e in await collect(client_hub.session("s").events(follow=False)) if e.type == "run-start"
    }
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert sorted((info.run_id, info.agent) for info in active) == sorted((run.id, run.agent) for run in runs)
    assert all(info.start_cursor == starts[info.run_id] for info in active)
    assert await client_hub.session("s").active_runs() == []


async def test_stream_replays_an_active_run_from_its_start_then_follows_it_to_its_end(
    hub: Hub, client_hub: Hub
) -> None:
    session = hub.session("s")
    release = asyncio.Event()
    runs: list[Run] = []

    async def agent() -> None:
        async with session.run(agent="main") as run, session.run(agent="other") as other:
            runs.append(run)
            await run.text("one ")
            await other.text("not this run")
            await release.wait()
            await run.text("two")

    task = asyncio.create_task(agent())
    await collect(client_hub.session("s").events(), until=lambda e: isinstance(e, TextDelta) and e.agent == "other")
    stream = client_hub.session("s").stream(runs[0].id)
    first = await collect(stream, until=lambda e: isinstance(e, TextDelta))
    release.set()
    rest = await collect(client_hub.session("s").stream(runs[0].id))  # from the start again, to the end
    await asyncio.wait_for(task, 5)
    assert isinstance(first[0], RunStart) and text_of(first) == "one "
    assert isinstance(rest[0], RunStart) and isinstance(rest[-1], RunEnd)
    assert {e.run_id for e in rest} == {runs[0].id} and text_of(rest) == "one two"


@pytest.mark.parametrize("how", ["wait", "after head"])
async def test_stream_of_a_run_that_has_not_started_awaits_it(hub: Hub, client_hub: Hub, how: str) -> None:
    session = client_hub.session("s")
    async with hub.session("s").run(agent="w") as earlier:
        await earlier.text("earlier")
    assert [e async for e in session.stream("later")] == []  # not in the log: nothing, at once
    if how == "wait":
        follower = asyncio.create_task(collect(session.stream("later", wait=True)))
    else:
        follower = asyncio.create_task(collect(session.stream("later", after=await session.head())))
    async with hub.session("s").run(agent="w", run_id="later") as run:
        await run.text("the answer")
    events = await asyncio.wait_for(follower, 5)
    finished = await collect(session.stream(earlier.id))
    assert text_of(events) == "the answer" and isinstance(events[-1], RunEnd)
    assert text_of(finished) == "earlier" and isinstance(finished[0], RunStart) and isinstance(finished[-1], RunEnd)


async def test_done_gives_the_run_end_a_cancel_led_to(hub: Hub, client_hub: Hub) -> None:
    started = asyncio.Event()
    runs: list[Run] = []
    task = asyncio.create_task(_stalled(hub, "w", started, runs))
    await asyncio.wait_for(started.wait(), 5)
    handle = await client_hub.session("s").cancel(runs[0].id, reason="stop")
    end = await handle.done(timeout=5)
    await asyncio.wait_for(task, 5)
    assert (await handle.ack()).outcome == "applied"
    assert isinstance(end, RunEnd) and (end.run_id, end.status, end.reason) == (runs[0].id, "cancelled", "stop")
    again = await client_hub.session("s").cancel(runs[0].id)
    assert await again.done(timeout=5) is None  # nothing was stopped: the run had ended


async def test_done_of_a_cancel_of_every_run_waits_for_each(hub: Hub, client_hub: Hub) -> None:
    started = [asyncio.Event(), asyncio.Event()]
    runs: list[Run] = []
    tasks = [asyncio.create_task(_stalled(hub, f"a{i}", started[i], runs)) for i in range(2)]
    for event in started:
        await asyncio.wait_for(event.wait(), 5)
    end = await (await client_hub.session("s").cancel()).done(timeout=5)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    events = await collect(client_hub.session("s").events(follow=False))
    assert end is not None and end.id == [e for e in events if isinstance(e, RunEnd)][-1].id


async def test_a_served_run_names_the_prompt_it_answers(hub: Hub, client_hub: Hub) -> None:
    async def agent(run: Run, message: UserMessage) -> None:
        await run.text(f"re: {message.content}")

    async with hub.session("s").serve(agent):
        handle = await client_hub.session("s").prompt("hello", message_id="m-1")
        end = await handle.done(timeout=5)
        view = await client_hub.session("s").view()
    events = await collect(client_hub.session("s").events(follow=False))
    start = next(e for e in events if isinstance(e, RunStart))
    assert start.input_message_id == "m-1"
    assert end is not None and end.run_id == start.run_id and end.status == "completed"
    answer = view.messages[-1]
    assert (answer.role, answer.input_message_id, answer.text) == ("assistant", "m-1", "re: hello")


async def test_an_ack_synthesised_by_the_client_is_marked_so(client_hub: Hub) -> None:
    ack = await (await client_hub.session("s").cancel("nobody")).ack(timeout=5)
    assert isinstance(ack, ControlAck) and ack.outcome == "ignored" and ack.cursor is None


@pytest.mark.parametrize("told", [True, False], ids=["readers told of deletions", "readers not told"])
async def test_stream_passes_resets_through(told: bool) -> None:
    backend = MemoryBackend() if told else StaleFeedBackend()
    async with Hub(backend) as hub, Hub(backend) as client_hub:
        follower = asyncio.create_task(collect(client_hub.session("s").stream("x", wait=True)))  # a new session
        async with hub.session("s").run(agent="w", run_id="old") as run:
            await run.text("old")
        await hub.session("s").delete()
        async with hub.session("s").run(agent="w", run_id="x") as run:
            await run.text("new")
        events = await asyncio.wait_for(follower, 5)
    assert isinstance(events[0], Reset) and text_of(events) == "new"


async def test_a_deletion_is_seen_by_followers_that_the_broker_does_not_tell() -> None:
    """The tombstone, not the broker, tells a live follower in another process that the log was deleted."""
    await scenarios.delete_seen_everywhere(MemoryTarget(StaleFeedBackend()))


@pytest.mark.parametrize("bad", ["", "x" * 129, "tab\there"])
async def test_stream_checks_the_run_id(client_hub: Hub, bad: str) -> None:
    from durable_ai import ConfigurationError

    with pytest.raises(ConfigurationError):
        client_hub.session("s").stream(bad)
