"""Live control as a client experiences it: every control gets an answer, and a disconnect is never a cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from durable_ai import AckTimeout, ControlAck, Event, Hub, PresenceMember, Run, RunEnd, Strategy, UserMessage
from durable_ai.backend import Channel
from durable_ai.backends.memory import MemoryBackend
from durable_ai.testing import stored_events
from durable_ai.testing.scenarios import collect, eventually, text_of
from tests.core.doubles import (
    GatedBackend,
    HeldStartBackend,
    SignallingBackend,
    SlowLiveBackend,
    StumblingControlBackend,
)


async def _stalled(hub: Hub, session: str, agent: str, runs: list[Run], started: asyncio.Event) -> None:
    async with hub.session(session).run(agent=agent) as run:
        runs.append(run)
        started.set()
        await asyncio.Event().wait()


async def _start_stalled(hub: Hub, agent: str = "w") -> tuple[asyncio.Task[None], Run]:
    """An agent task whose run waits forever (an LLM that never answers), once its run is active."""
    runs: list[Run] = []
    started = asyncio.Event()
    task = asyncio.create_task(_stalled(hub, "s", agent, runs, started))
    await asyncio.wait_for(started.wait(), 5)
    return task, runs[0]


async def test_cancel_without_run_id_stops_every_active_run_with_one_ack(hub: Hub, client_hub: Hub) -> None:
    stalled = [await _start_stalled(hub, f"agent-{i}") for i in range(2)]
    tasks, runs = [t for t, _ in stalled], [r for _, r in stalled]
    handle = await client_hub.session("s").cancel(reason="stop everything")
    ack = await handle.ack()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    events = await collect(client_hub.session("s").events(follow=False))
    assert ack.outcome == "applied" and ack.control_type == "cancel"
    assert all(run.cancelled and run.cancel_reason == "stop everything" for run in runs)
    assert sorted(e.status for e in events if isinstance(e, RunEnd)) == ["cancelled", "cancelled"]
    assert sum(e.type == "control-ack" for e in events) == 1


async def test_a_served_session_answers_controls_for_runs_it_does_not_have(hub: Hub, client_hub: Hub) -> None:
    async def never(run: Run, message: UserMessage) -> None:
        raise AssertionError("no prompt was sent")

    async with hub.session("s").serve(never):
        cancel = await (await client_hub.session("s").cancel("run-that-does-not-exist")).ack()
        steer = await (await client_hub.session("s").steer("hello?")).ack()
    assert (cancel.outcome, cancel.reason) == ("ignored", "run run-that-does-not-exist is not active")
    assert (steer.outcome, steer.reason) == ("ignored", "no run is active")


async def test_closing_a_subscriber_is_not_a_cancel(hub: Hub, client_hub: Hub) -> None:
    release = asyncio.Event()

    async def agent() -> Run:
        async with hub.session("s").run(agent="w") as run:
            await run.text("part one, ")
            await release.wait()
            await run.text("part two")
        return run

    task = asyncio.create_task(agent())
    stream = client_hub.session("s").events()
    first = await collect(stream, count=2)  # collect closes the stream: the tab goes away
    release.set()
    run = await asyncio.wait_for(task, 5)
    events = await collect(client_hub.session("s").events(after=first[-1].cursor, follow=False))
    assert not run.cancelled
    assert events[-1].status == "completed"  # type: ignore[union-attr]


async def test_an_external_cancellation_records_cancelled_and_propagates(hub: Hub, client_hub: Hub) -> None:
    task, run = await _start_stalled(hub)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    events = await collect(client_hub.session("s").events(follow=False))
    end = events[-1]
    assert isinstance(end, RunEnd) and end.status == "cancelled" and end.reason == "the agent task was cancelled"
    assert not run.cancelled  # not a client's cancel


async def test_a_cancel_after_the_run_ended_is_ignored(hub: Hub, client_hub: Hub) -> None:
    async with hub.session("s").run(agent="w") as run:
        await run.text("done")
        done = run
    async with hub.session("s").serve(_unused):
        ack = await (await client_hub.session("s").cancel(done.id)).ack()
    assert ack.outcome == "ignored"


async def _unused(run: Run, message: UserMessage) -> None:
    await run.text("unused")


async def test_a_repeated_prompt_is_answered_once(hub: Hub, client_hub: Hub) -> None:
    answered: list[str] = []

    async def agent(run: Run, message: UserMessage) -> None:
        answered.append(message.content)
        await run.text(f"re: {message.content}")

    async with hub.session("s").serve(agent):
        first = await (await client_hub.session("s").prompt("hi", message_id="m-1")).ack()
        again = await (await client_hub.session("s").prompt("hi", message_id="m-1")).ack()
        await hub.flush()
    assert (first.outcome, again.outcome) == ("applied", "ignored")
    events = await collect(client_hub.session("s").events(follow=False))
    assert [e.content for e in events if isinstance(e, UserMessage)] == ["hi"]


async def test_clients_may_only_ask_for_allowed_strategies(hub: Hub, client_hub: Hub) -> None:
    async with hub.session("s").serve(_unused, strategy="enqueue", client_strategies=["reject"]):
        refused = await (await client_hub.session("s").prompt("x", strategy="interrupt")).ack()
        allowed = await (await client_hub.session("s").prompt("y", strategy="reject")).ack()
    assert refused.outcome == "rejected" and "'interrupt' is not allowed" in (refused.reason or "")
    assert allowed.outcome == "applied"  # nothing was busy, so "reject" let it through


async def test_a_prompt_nobody_serves_times_out_with_a_typed_error(client_hub: Hub) -> None:
    handle = await client_hub.session("s").prompt("anyone there?")
    with pytest.raises(AckTimeout) as caught:
        await handle.ack(timeout=0.2)
    assert caught.value.control_id == handle.id


async def test_a_failing_agent_does_not_stop_the_server(hub: Hub, client_hub: Hub) -> None:
    async def flaky(run: Run, message: UserMessage) -> None:
        if message.content == "boom":
            raise RuntimeError("tool crashed")
        await run.text("fine")

    async with hub.session("s").serve(flaky):
        await (await client_hub.session("s").prompt("boom")).ack()
        await (await client_hub.session("s").prompt("ok")).ack()
        ends = await collect(
            client_hub.session("s").events(), until=lambda e: isinstance(e, RunEnd) and e.status == "completed"
        )
    statuses = [e.status for e in ends if isinstance(e, RunEnd)]
    assert statuses == ["failed", "completed"]


async def test_presence_members_carry_their_data(hub: Hub, client_hub: Hub) -> None:
    async with client_hub.session("s").present("phone", data={"app": "ios"}):
        members = await hub.session("s").presence()
    assert [(m.member_id, m.role, m.data) for m in members] == [("phone", "client", {"app": "ios"})]


async def test_presence_identity_comes_from_the_entry_not_the_data(hub: Hub, client_hub: Hub) -> None:
    """A client that writes an agent's presence payload under its own entry is still a client, under its own id."""
    forged = PresenceMember(member_id="run-real", role="agent", agent="writer", run_id="run-real", data="x")
    await client_hub.backend.enter_presence("s", "tab-1", forged.model_dump_json().encode(), role="client")
    async with hub.session("s").run(agent="writer") as run:
        members = await eventually(hub.session("s").presence, lambda m: len(m) == 2, "the agent's presence")
    assert [(m.member_id, m.role, m.agent, m.run_id) for m in members] == [
        (run.id, "agent", "writer", run.id),
        ("tab-1", "client", None, None),
    ]
    # The agent's entry, which the client cannot write, stays the agent's.
    assert next(m for m in members if m.role == "agent").member_id == run.id


async def test_a_cancel_that_arrives_while_the_run_starts_stops_it_cleanly() -> None:
    """Even when the block never suspends, the cancel ends the run without escaping the ``async with``."""
    backend = GatedBackend()
    async with Hub(backend) as agent_hub, Hub(backend) as client_hub:
        backend.gate.clear()
        outcome: list[str] = []

        async def agent() -> None:
            async with agent_hub.session("s").run(agent="w") as run:
                await run.text("never suspends")
            outcome.append("exited normally, cancelled" if run.cancelled else "exited normally")

        task = asyncio.create_task(agent())
        await asyncio.wait_for(backend.held.wait(), 5)  # run-start is being published: the run is starting
        await client_hub.session("s").cancel(reason="too early")
        ack_stream = client_hub.session("s").events()
        await asyncio.wait_for(_wait_for_control_loop(agent_hub), 5)
        backend.gate.set()
        await asyncio.wait_for(task, 5)
        events = await collect(ack_stream, until=lambda e: isinstance(e, RunEnd))
    assert outcome == ["exited normally, cancelled"]
    assert [e.status for e in events if isinstance(e, RunEnd)] == ["cancelled"]


async def _wait_for_control_loop(hub: Hub) -> None:
    """Until the agent side has applied the cancel to its starting run."""
    while True:
        runs = list(hub._runtime.owner("s")._runs.values())
        if runs and runs[0]._cancel_requested:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0)


async def test_two_processes_answering_one_control_leave_one_ack_and_one_user_message(backend: MemoryBackend) -> None:
    async with Hub(backend) as one, Hub(backend) as two, Hub(backend) as client:
        ready = [asyncio.Event(), asyncio.Event()]
        steered = [asyncio.Event(), asyncio.Event()]

        async def agent(hub: Hub, n: int) -> None:
            async with hub.session("s").run(agent=f"agent-{n}") as run:
                await run.text("buffered text ahead of the ack ")
                ready[n].set()
                async for _ in run.steering():
                    await run.text("steered ")
                    steered[n].set()
                    await asyncio.Event().wait()

        tasks = [asyncio.create_task(agent(hub, n)) for n, hub in enumerate((one, two))]
        for event in ready:
            await asyncio.wait_for(event.wait(), 5)
        steer_ack = await (await client.session("s").steer("be brief")).ack()
        for event in steered:
            await asyncio.wait_for(event.wait(), 5)
        cancel_ack = await (await client.session("s").cancel()).ack()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        await one.flush()
        await two.flush()
        events = await collect(client.session("s").events(follow=False))
        stored = await stored_events(backend, "s")  # raw: the reader would hide a second copy
    assert (steer_ack.outcome, cancel_ack.outcome) == ("applied", "applied")
    acks = [r for r in stored if r["type"] == "control-ack"]
    assert len(acks) == 2 and {a["id"] for a in acks} == {steer_ack.id, cancel_ack.id}
    assert [r["content"] for r in stored if r["type"] == "user-message"] == ["be brief"]
    assert sorted(e.status for e in events if isinstance(e, RunEnd)) == ["cancelled", "cancelled"]


async def test_controls_keep_working_after_the_broker_comes_back() -> None:
    backend = SignallingBackend()
    async with Hub(backend) as agent_hub, Hub(backend) as client_hub:
        task, run = await _start_stalled(agent_hub)
        backend.set_offline(True)
        await asyncio.wait_for(backend.control_read_failed.wait(), 5)  # the control loop met the outage
        backend.set_offline(False)
        ack = await (await client_hub.session("s").cancel(reason="after the outage")).ack()
        await asyncio.wait_for(task, 5)
    assert ack.outcome == "applied" and run.cancelled


async def test_the_control_loop_survives_a_reset_followed_by_a_failure() -> None:
    backend = StumblingControlBackend()
    async with Hub(backend) as agent_hub, Hub(backend) as client_hub:
        task, run = await _start_stalled(agent_hub)
        ack = await (await client_hub.session("s").cancel()).ack()
        await asyncio.wait_for(task, 5)
    assert backend.stumbles == 2
    assert ack.outcome == "applied" and run.cancelled


# -- a stop is answered, fast ---------------------------------------------------------------------------------


async def test_a_control_for_a_run_that_is_not_active_is_answered_ignored_at_once(hub: Hub, client_hub: Hub) -> None:
    session = client_hub.session("s")
    nothing = await (await session.cancel(reason="nothing runs")).ack(timeout=5)
    unknown = await (await session.cancel("no-such-run")).ack(timeout=5)
    async with hub.session("s").run(agent="w") as run:
        await run.text("done")
    ended = await (await session.cancel(run.id)).ack(timeout=5)
    steer = await (await session.steer("too late", run_id=run.id)).ack(timeout=5)
    assert [a.outcome for a in (nothing, unknown, ended, steer)] == ["ignored"] * 4
    assert (nothing.reason, unknown.reason) == ("no run is active", "run no-such-run is not active")


async def test_a_cancel_applied_just_before_its_run_ended_is_answered_applied() -> None:
    """The run is gone from the log by the time the client looks, but the agent's answer is there: it wins, even
    when the client's live read is slower than its look at the log."""
    backend = SlowLiveBackend()
    async with Hub(backend) as hub, Hub(backend) as client_hub:
        task, run = await _start_stalled(hub)
        handle = await client_hub.session("s").cancel()
        await asyncio.wait_for(task, 5)  # applied, and the run-end is stored, before the client asks
        await hub.flush()
        assert run.cancelled and (await handle.ack(timeout=5)).outcome == "applied"


# -- strategies hold while a run is starting --------------------------------------------------------------------


async def _second_prompt_while_the_first_run_starts(strategy: Strategy) -> tuple[ControlAck, list[str], list[Event]]:
    backend = HeldStartBackend(release_after=b'"second"')
    answered: list[str] = []
    release = asyncio.Event()

    async def agent(run: Run, message: UserMessage) -> None:
        answered.append(message.content)
        await run.text(f"re: {message.content}")
        if strategy == "steer":
            async for steer in run.steering():
                await run.text(f" (steered: {steer.text})")
                break
        else:
            await release.wait()

    async with Hub(backend) as agent_hub, Hub(backend) as client_hub:
        session = client_hub.session("s")
        async with agent_hub.session("s").serve(agent, strategy=strategy):
            await session.prompt("first")
            await asyncio.wait_for(backend.held.wait(), 5)  # the first run is starting
            second = await (await session.prompt("second")).ack(timeout=5)
            release.set()
            runs = 2 if strategy == "interrupt" else 1
            await collect(session.events(), until=_nth_run_end(runs))
        events = await collect(session.events(follow=False))
    return second, answered, events


def _nth_run_end(n: int) -> Callable[[Event], bool]:
    seen = 0

    def until(event: Event) -> bool:
        nonlocal seen
        seen += isinstance(event, RunEnd)
        return seen == n

    return until


async def test_reject_applies_to_a_run_that_is_still_starting() -> None:
    ack, answered, events = await _second_prompt_while_the_first_run_starts("reject")
    assert (ack.outcome, ack.reason) == ("rejected", "a run is active")
    assert answered == ["first"] and [e.status for e in events if isinstance(e, RunEnd)] == ["completed"]


async def test_interrupt_applies_to_a_run_that_is_still_starting() -> None:
    ack, answered, events = await _second_prompt_while_the_first_run_starts("interrupt")
    ends = [(e.status, e.reason) for e in events if isinstance(e, RunEnd)]
    assert ack.outcome == "applied" and (ack.reason or "").startswith("interrupted run")
    assert ends == [("cancelled", "interrupted by a new message"), ("completed", None)]
    assert answered[-1] == "second"


async def test_steer_applies_to_a_run_that_is_still_starting() -> None:
    ack, answered, events = await _second_prompt_while_the_first_run_starts("steer")
    assert ack.outcome == "applied" and (ack.reason or "").startswith("steered run")
    assert answered == ["first"]
    assert text_of(events) == "re: first (steered: second)"


# -- untrusted input is bounded ---------------------------------------------------------------------------------


async def test_a_served_session_rejects_prompts_past_its_queue(hub: Hub, client_hub: Hub) -> None:
    release = asyncio.Event()

    async def slow(run: Run, message: UserMessage) -> None:
        await release.wait()

    async with hub.session("s").serve(slow, max_queue=2):
        acks = [await (await client_hub.session("s").prompt(f"p{i}")).ack() for i in range(4)]
        release.set()
    assert [a.outcome for a in acks] == ["applied", "applied", "applied", "rejected"]
    assert "queue is full" in (acks[-1].reason or "")


async def test_a_runs_inbox_is_bounded(backend: MemoryBackend) -> None:
    async with Hub(backend, max_controls_per_second=1000) as agent_hub, Hub(backend) as client_hub:
        task, run = await _start_stalled(agent_hub)  # never reads its inbox
        acks = [await (await client_hub.session("s").steer(f"s{i}")).ack() for i in range(run.inbox.maxsize + 1)]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [a.outcome for a in acks[:-1]] == ["applied"] * run.inbox.maxsize
    assert (acks[-1].outcome, acks[-1].reason) == ("rejected", "the run's inbox is full")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"v":1,"id":"deep","type":"steer","text":"x","more":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
        (b'{"v":1,"id":"bad-text","type":"steer","text":"\\ud800"}', "not valid Unicode"),
        (b'{"v":1,"id":"bad-prompt","type":"prompt","message_id":"m","content":"a\\udfffb"}', "not valid Unicode"),
    ],
)
async def test_controls_that_cannot_be_answered_safely_are_rejected(
    backend: MemoryBackend, data: bytes, reason: str
) -> None:
    async with Hub(backend, max_control_bytes=512 * 1024) as agent_hub, Hub(backend) as client_hub:
        task, _ = await _start_stalled(agent_hub)
        stream = client_hub.session("s").events(after=await client_hub.session("s").head())
        await client_hub.backend.publish(Channel("s", "control"), data, message_id="hostile")
        acks = await collect(stream, until=lambda e: isinstance(e, ControlAck))
        ok = await (await client_hub.session("s").cancel()).ack()
        await asyncio.wait_for(task, 5)
    assert acks[-1].outcome == "rejected" and reason in (acks[-1].reason or "")  # type: ignore[union-attr]
    assert ok.outcome == "applied"  # the session goes on


async def test_a_flood_of_controls_cannot_fill_the_log_and_a_stop_still_stops(backend: MemoryBackend) -> None:
    async with Hub(backend, max_controls_per_second=5) as agent_hub, Hub(backend) as client_hub:
        task, run = await _start_stalled(agent_hub)
        flood = 500
        for i in range(flood):  # a hostile client with the issued credential, at full speed
            await client_hub.backend.publish(Channel("s", "control"), b"not json %d" % i, message_id=f"junk-{i}")
            await client_hub.backend.publish(
                Channel("s", "control"), b'{"v":1,"id":"st-%d","type":"steer","text":"spam"}' % i, message_id=f"s{i}"
            )
        await client_hub.backend.publish(
            Channel("s", "control"), b'{"v":1,"id":"stop","type":"cancel"}', message_id="stop"
        )
        await asyncio.wait_for(task, 10)  # past every budget, the cancel is still applied
        await agent_hub.flush()
        records = await stored_events(backend, "s")
    written = [r["type"] for r in records]
    assert run.cancelled
    answered = written.count("control-ack")
    assert answered <= 30  # of 1,001 controls: a burst of 20, then 5 per second
    assert written.count("user-message") <= answered
    assert written[-1] == "run-end"


async def test_a_server_that_is_shutting_down_rejects_new_prompts(hub: Hub, client_hub: Hub) -> None:
    async with hub.session("s").serve(_unused) as server:
        server.shutdown()  # what a closing hub does first
        ack = await (await client_hub.session("s").prompt("too late")).ack()
    assert (ack.outcome, ack.reason) == ("rejected", "the agent process is shutting down")
