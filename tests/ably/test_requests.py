"""What the Ably backend asks of Ably: requests before a control is sent and before a run starts, history asked
with Ably's own parameters, a follower's join ending at its attachment, and channels let go of.

Requests are recorded where they leave the process (every REST request of both backends goes through httpx, and
every realtime one through ably-python's connection manager), so the counts are what Ably would see.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from ably.realtime.connectionmanager import ConnectionManager  # type: ignore[import-untyped]

import durable_ai
from durable_ai import Hub
from durable_ai.testing.scenarios import collect, eventually, text_of
from durable_ai_ably import backend as ably_backend
from durable_ai_ably.testing import AblyEmulator

SECRET = "Zk3vQ9pX2mL7wR4tY8uI1oP6aS5dF0gHjKlMnBvCxZq"
KEY = f"app1.root:{SECRET}"
TIMEOUT = 20.0


@dataclass
class Request:
    kind: str  # "rest" or "realtime"
    at: float
    path: str = ""
    params: dict[str, str] = field(default_factory=dict)
    message: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recorder:
    requests: list[Request] = field(default_factory=list)

    def rest(self, channel: str | None = None) -> list[Request]:
        out = [r for r in self.requests if r.kind == "rest" and "requestToken" not in r.path]
        if channel is not None:
            out = [r for r in out if r.path.startswith(f"/channels/{channel}/")]
        return out

    def clear(self) -> None:
        self.requests.clear()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    record = Recorder()
    send = httpx.AsyncClient.send

    async def recording_send(self: httpx.AsyncClient, request: httpx.Request, *args: Any, **kwargs: Any) -> Any:
        path = request.url.path
        record.requests.append(Request("rest", time.monotonic(), path, dict(request.url.params)))
        return await send(self, request, *args, **kwargs)

    protocol = ConnectionManager.send_protocol_message

    async def recording_protocol(self: Any, message: dict[str, Any]) -> Any:
        record.requests.append(Request("realtime", time.monotonic(), message=dict(message)))
        return await protocol(self, message)

    monkeypatch.setattr(httpx.AsyncClient, "send", recording_send)
    monkeypatch.setattr(ConnectionManager, "send_protocol_message", recording_protocol)
    yield record


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    # The clients here run without rate budgets (a busy session written fast): rates are counted, not enforced.
    async with AblyEmulator({KEY: None}, mutable_namespaces={"ai"}, enforce_rate_limits=False) as emu:
        yield emu


def url(emulator: AblyEmulator, transport: str = "realtime", extra: str = "") -> str:
    return (
        f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false&transport={transport}"
        f"&rate_limit=0&connection_rate_limit=0{extra}"
    )


async def busy_session(agent: Hub, session: str, messages: int) -> None:
    """A session whose events channel holds ``messages`` messages written within the last minute."""
    async with agent.session(session).run(agent="writer") as run:
        for index in range(messages):
            await run.text(f"t{index} ")
            await agent.flush()


@pytest.mark.parametrize("transport", ["realtime", "rest"])
async def test_a_control_is_sent_without_reading_the_events_log(
    emulator: AblyEmulator, recorder: Recorder, transport: str
) -> None:
    """Before: every cancel first scanned up to 1,000 messages of the events channel for its head (6 requests here,
    11 on a busier channel). Now nothing of the events channel is read before the control is published, and the ack is
    still found."""
    async with durable_ai.connect(url(emulator, extra="&appends=off")) as agent:
        await busy_session(agent, "busy", 600)
        answered = asyncio.Event()

        async def serve() -> None:
            async with agent.session("busy").run(agent="writer") as run:
                answered.set()
                await asyncio.sleep(TIMEOUT)  # until cancelled
                raise AssertionError(f"run {run.id} was not cancelled")

        task = asyncio.create_task(serve())
        await asyncio.wait_for(answered.wait(), TIMEOUT)
        async with durable_ai.connect(url(emulator, transport)) as client:
            session = client.session("busy")
            await session.view()  # the client knows the session already
            recorder.clear()
            handle = await session.cancel(reason="stop")
            before = recorder.rest("ai:busy")
            assert before == [], [(r.path, r.params) for r in before]
            ack = await handle.ack(timeout=TIMEOUT)
            assert ack.outcome == "applied"
        await asyncio.wait_for(task, TIMEOUT)  # the run ended (cancelled) instead of sleeping on


async def test_entering_a_run_waits_for_one_round_of_requests(
    emulator: AblyEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a run's start waited for the session's state, then for the control log's end, one request after
    the other. Now both are asked at once: with every REST request held, both are in flight together, and the run
    starts once they are answered."""
    async with durable_ai.connect(url(emulator)) as agent:
        session = agent.session("entry")
        async with session.run(agent="a") as run:
            await run.text("warm")
        await agent.flush()
        held: list[str] = []
        two_held = asyncio.Event()
        gate = asyncio.Event()
        send = httpx.AsyncClient.send

        async def holding_send(self: httpx.AsyncClient, request: httpx.Request, *args: Any, **kwargs: Any) -> Any:
            held.append(request.url.path)
            if len(held) >= 2:
                two_held.set()
            await gate.wait()
            return await send(self, request, *args, **kwargs)

        monkeypatch.setattr(httpx.AsyncClient, "send", holding_send)
        started = asyncio.Event()

        async def enter() -> None:
            async with session.run(agent="a") as run:
                started.set()
                await run.text("first")

        task = asyncio.create_task(enter())
        try:
            await asyncio.wait_for(two_held.wait(), TIMEOUT)
            assert not started.is_set()
            assert sorted(held[:2]) == ["/channels/ai:entry:control/messages", "/channels/ai:entry:meta/messages"]
        finally:
            gate.set()
        await asyncio.wait_for(task, TIMEOUT)
        assert started.is_set()


@pytest.mark.parametrize("transport", ["realtime", "rest"])
async def test_history_is_asked_with_ablys_parameters_only(
    emulator: AblyEmulator, recorder: Recorder, transport: str
) -> None:
    """``fromSerial`` is not an Ably history parameter (Ably ignores it): resuming from a cursor asks from the
    cursor's time (``start``) and still resumes exactly."""
    async with durable_ai.connect(url(emulator, transport)) as agent:
        session = agent.session("params")
        async with session.run(agent="a") as run:
            for word in ("one ", "two ", "three "):
                await run.text(word)
                await agent.flush()
        events = await collect(session.events(follow=False))
        middle = events[len(events) // 2]
        assert middle.cursor is not None
        recorder.clear()
        rest = await collect(session.events(after=middle.cursor, follow=False))
        assert [e.id for e in rest] == [e.id for e in events[len(events) // 2 + 1 :]]
        asked = recorder.rest("ai:params")
        assert asked
        allowed = {"start", "end", "direction", "limit", "cursor", "from_serial"}
        for request in asked:
            assert set(request.params) <= allowed, request.params
        assert any("start" in r.params for r in asked)


@pytest.mark.parametrize("who", ["another process", "the agent's own hub"])
async def test_a_follower_reads_history_up_to_its_attachment(
    emulator: AblyEmulator, recorder: Recorder, who: str
) -> None:
    """The join Ably documents (``untilAttach``): attach, then history up to the attach serial, then live. In the
    agent's own hub the channel is attached already (the run is present on it): history then ends at the latest
    message the connection received on it, and what follows reaches the reader live."""
    async with durable_ai.connect(url(emulator)) as agent, durable_ai.connect(url(emulator)) as other:
        reader = other if who == "another process" else agent
        session = agent.session("join")
        release = asyncio.Event()

        written = asyncio.Event()

        async def write() -> None:
            async with session.run(agent="a") as run:
                await run.text("before the join. ")
                await agent.flush()
                written.set()
                await release.wait()
                await run.text("after the join.")

        task = asyncio.create_task(write())
        await asyncio.wait_for(written.wait(), TIMEOUT)
        # The run is present: the agent's connection has the events channel attached before the reader joins.
        await eventually(session.presence, lambda members: any(m.role == "agent" for m in members), "the agent")
        recorder.clear()
        seen: list[Any] = []
        async with reader.session("join").events(follow=True) as stream:
            async for event in stream:
                seen.append(event)
                if event.type == "text-delta" and "before" in getattr(event, "delta", ""):
                    release.set()
                if event.type == "run-end":
                    break
        await asyncio.wait_for(task, TIMEOUT)
        assert text_of(seen) == "before the join. after the join."
        joins = [r for r in recorder.rest("ai:join") if r.params.get("from_serial")]
        assert joins, [(r.path, r.params) for r in recorder.rest("ai:join")]
        assert all(r.params["direction"] == "backwards" for r in joins)


async def test_channels_are_released_after_their_runs(emulator: AblyEmulator) -> None:
    """Before: every session left two ably-python channel objects, its events channel attached (300 sessions:
    600 objects, 300 attached). The emulator allows 200 attached channels per connection, as Ably does (90010
    beyond): serving 300 sessions one after the other now works, because a session's channels are detached and
    released when its run ends and its readers are gone."""
    async with durable_ai.connect(url(emulator)) as agent:
        backend: Any = agent.backend
        for index in range(300):
            async with agent.session(f"s{index}").run(agent="a") as run:
                await run.text("hello")
            if index % 50 == 0:
                await agent.flush()
        await agent.flush()
        await held_channels(backend, 4)


async def held_channels(backend: Any, at_most: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while backend.channel_objects() > at_most:
        assert time.monotonic() < deadline, f"{backend.channel_objects()} channel objects are still held"
        await asyncio.sleep(0.05)


async def test_readers_let_go_of_their_channels_after_a_dropped_connection_and_a_deletion(
    emulator: AblyEmulator,
) -> None:
    """Followers whose feed failed (the connection dropped beyond resume, the session deleted) still let go of
    their channels when they end."""
    async with durable_ai.connect(url(emulator)) as agent, durable_ai.connect(url(emulator)) as reader:
        backend: Any = reader.backend
        session = agent.session("gone")
        async with session.run(agent="a") as run:
            await run.text("one")
        await agent.flush()

        async def follow_until(count: int) -> None:
            async with reader.session("gone").events(follow=True) as stream:
                seen = 0
                async for event in stream:
                    seen += event.type == "run-end"
                    if seen >= count:
                        return

        async def objects() -> int:
            return int(backend.channel_objects())

        first = asyncio.create_task(follow_until(2))
        await eventually(objects, lambda n: n >= 1, "the reader's attachment")
        assert emulator.drop_connections(backend.connection_id, expire=True) == 1
        async with session.run(agent="a") as run:
            await run.text("two")
        await asyncio.wait_for(first, TIMEOUT)
        second = asyncio.create_task(follow_until(99))
        await eventually(objects, lambda n: n >= 1, "the reader's attachment")
        await session.delete()
        async with session.run(agent="a") as run:
            await run.text("three")
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        await held_channels(backend, 0)


async def test_a_reader_joining_a_busy_attachment_reads_up_to_what_it_keeps(
    emulator: AblyEmulator, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second reader of a channel this hub follows already joins its attachment: history up to the channel serial
    before the operations the attachment keeps (here 5), then those, then live; every event once, in order."""
    monkeypatch.setattr(ably_backend, "_RECENT_MESSAGES", 5)
    options = url(emulator, extra="&appends=off")
    async with durable_ai.connect(options) as agent, durable_ai.connect(options) as reader:
        session = agent.session("kept")
        first_seen: list[Any] = []
        release = asyncio.Event()
        written = asyncio.Event()

        async def write() -> None:
            async with session.run(agent="a") as run:
                for index in range(20):
                    await run.text(f"{index} ")
                    await agent.flush()
                written.set()
                await release.wait()
                await run.text("end")

        async def follow(into: list[Any]) -> None:
            async with reader.session("kept").events(follow=True) as stream:
                async for event in stream:
                    into.append(event)
                    if event.type == "run-end":
                        return

        first = asyncio.create_task(follow(first_seen))
        held: Any = reader.backend

        async def attached() -> int:
            return int(held.channel_objects())

        await eventually(attached, lambda n: n >= 1, "the first reader's attachment")
        writer = asyncio.create_task(write())
        await asyncio.wait_for(written.wait(), TIMEOUT)
        await eventually(lambda: _count(first_seen), lambda n: n >= 20, "the first reader's deltas")
        recorder.clear()
        second_seen: list[Any] = []
        second = asyncio.create_task(follow(second_seen))
        await eventually(lambda: _count(second_seen), lambda n: n >= 20, "the second reader's deltas")
        release.set()
        await asyncio.wait_for(asyncio.gather(writer, first, second), TIMEOUT)
        expected = "".join(f"{index} " for index in range(20)) + "end"
        assert text_of(first_seen) == text_of(second_seen) == expected
        assert [e.id for e in second_seen] == [e.id for e in first_seen][-len(second_seen) :]
        assert len({e.id for e in second_seen}) == len(second_seen)
        joins = [r for r in recorder.rest("ai:kept") if r.params.get("from_serial")]
        assert joins, [(r.path, r.params) for r in recorder.rest("ai:kept")]


async def _count(events: list[Any]) -> int:
    return sum(event.type == "text-delta" for event in events)
