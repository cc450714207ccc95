"""The conformance scenarios: what every backend must do for a durable session to be worth the name.

Each scenario is a plain async function taking a :class:`~durable_ai.testing.targets.Target`; it returns a short
description of what it checked and raises :class:`CheckFailed` with the difference a user would see. The pytest
suite (:class:`durable_ai.testing.ConformanceSuite`) and ``durable-ai check`` both run them. Agents and clients
use separate hubs, as they would be separate processes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .._reader import ReadOptions, closing, read_events
from .._util import IdFactory, now_ms
from ..backends.base import Backend, Channel
from ..coalesce import Coalesce
from ..errors import EventTooLarge, InvalidSessionId, RunIdInUse
from ..events import (
    ControlAck,
    Event,
    Reset,
    RunEnd,
    RunStart,
    Status,
    TextDelta,
    ToolResult,
    UserMessage,
)
from ..hub import Hub
from ..presence import PresenceMember
from ..run import Run
from ..session import EventStream
from .targets import RecordingBackend, Target

__all__ = [
    "CHECKS",
    "CheckFailed",
    "CheckSkipped",
    "cancel_from_another_client",
    "collect",
    "collect_open",
    "compacted",
    "delete_seen_everywhere",
    "eventually",
    "failed_run",
    "follow_from_head_beside_a_follower",
    "idempotent_publish",
    "invalid_session_ids",
    "join_mid_run",
    "large_events",
    "late_join_view",
    "malformed_controls",
    "no_loss_no_duplicate",
    "ordering_across_subagents",
    "presence",
    "rate_budget",
    "reset_on_recreate",
    "reset_on_retention",
    "resume_after_drop",
    "resume_from_every_cursor",
    "run_id_in_use",
    "slow_subscriber",
    "steer_into_run",
    "stop_answered_when_idle",
    "stored_events",
    "strategy_enqueue",
    "strategy_interrupt",
    "strategy_reject",
    "strategy_steer",
    "text_of",
    "truncated_from_the_start",
    "written_events",
]

TIMEOUT = 20.0
T = TypeVar("T")


class CheckFailed(AssertionError):
    """A conformance check found behaviour a user would see as broken."""


class CheckSkipped(Exception):
    """The target cannot run this check (say, its retention is not configurable)."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def new_session_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


async def within(awaitable: Awaitable[T], what: str, seconds: float = TIMEOUT) -> T:
    try:
        async with asyncio.timeout(seconds):
            # Shielded: a timeout must not cancel the agent task it is waiting for, or it could hide a hang.
            return await asyncio.shield(awaitable)
    except TimeoutError:
        raise CheckFailed(f"timed out after {seconds:g}s waiting for {what}") from None


async def collect(
    stream: EventStream,
    *,
    until: Callable[[Event], bool] | None = None,
    count: int | None = None,
    seconds: float = TIMEOUT,
) -> list[Event]:
    """Read events until ``until`` matches one (inclusive), ``count`` are read, or the stream ends."""
    events: list[Event] = []
    try:
        async with asyncio.timeout(seconds):
            async for event in stream:
                events.append(event)
                if (until is not None and until(event)) or (count is not None and len(events) >= count):
                    break
    except TimeoutError:
        raise CheckFailed(f"timed out after {seconds:g}s waiting for events; got {len(events)}") from None
    finally:
        await stream.aclose()
    return events


async def collect_open(stream: EventStream, *, until: Callable[[Event], bool], seconds: float = TIMEOUT) -> list[Event]:
    """Read events until ``until`` matches one (inclusive), and leave the stream open to read on."""
    events: list[Event] = []
    try:
        async with asyncio.timeout(seconds):
            async for event in stream:
                events.append(event)
                if until(event):
                    break
    except TimeoutError:
        raise CheckFailed(f"timed out after {seconds:g}s waiting for events; got {len(events)}") from None
    return events


def text_of(events: Sequence[Event], run_id: str | None = None) -> str:
    """The answer text a client reassembles from text deltas (of one run, or of all)."""
    return "".join(e.delta for e in events if isinstance(e, TextDelta) and (run_id is None or e.run_id == run_id))


def compacted(items: Sequence[Event] | Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Events (or raw records) as ``(type, id, text)`` with adjacent deltas of one part merged.

    A catch-up read of what a snapshot keeps yields such merged deltas (see ``docs/concepts.md``), so two reads of
    one log compare equal through this whatever each was served from: the same events, the same text, in order.
    A merged delta is an event of its own (one that starts inside a part has an id of its own), so deltas are
    compared by their text, every other event by its id too.
    """
    out: list[tuple[str, str, str]] = []
    last: tuple[object, ...] | None = None
    for item in items:
        get = item.get if isinstance(item, dict) else (lambda key, item=item: getattr(item, key, None))
        kind, event_id = str(get("type")), str(get("id"))
        if kind in ("text-delta", "reasoning-delta"):
            part = (kind, get("run_id"), get("part_id"), get("agent"))
            if part == last and out:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + str(get("delta")))
            else:
                out.append((kind, "", str(get("delta"))))
            last = part
        else:
            out.append((kind, event_id, ""))
            last = None
    return out


def run_end(run_id: str) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, RunEnd) and e.run_id == run_id


def ids_unique(events: Sequence[Event]) -> None:
    duplicates = [event_id for event_id, n in Counter(e.id for e in events).items() if n > 1]
    expect(not duplicates, f"duplicate events delivered: {duplicates[:5]}")


async def stored_events(backend: Backend, session: str) -> list[dict[str, Any]]:
    """Every event record the broker stores for a session, read raw: copies the reader would drop are counted.

    Count "stored once" here, not through ``session.events()`` (which deduplicates). A fragmented event counts
    once (its last fragment's record); ``log-start`` and ``tombstone`` records and append link lines are left out.
    """
    records: list[dict[str, Any]] = []
    async for message in backend.read(Channel(session, "events"), start=None, follow=False):
        for line in message.data.split(b"\n"):
            if not line.strip() or line.startswith(b'{"~":'):
                continue
            record = json.loads(line)
            kind = record.get("type")
            if kind in ("log-start", "tombstone"):
                continue
            if kind == "fragment" and record.get("index") != record.get("count", 0) - 1:
                continue
            records.append(record)
    return records


async def written_events(hub: Hub, session: str) -> list[Event]:
    """The session's events as its log holds them, one per event a writer flushed, with their cursors.

    A catch-up read (``events(follow=False)``) may serve finished runs from the snapshot, with the deltas of a part
    merged (see ``docs/concepts.md``); this reads the log itself, so tests can count the deltas that were written.
    """
    options = ReadOptions(reconnect_timeout=TIMEOUT, is_closed=lambda: hub.closed, new_id=IdFactory(), now_ms=now_ms)
    reader = read_events(hub.backend, session, after=None, follow=False, options=options)
    async with closing(reader) as events:
        return [event async for event in events]


def words(n: int, tag: str = "w") -> list[str]:
    return [f"{tag}{i} " for i in range(n)]


class _Hubs:
    """Opens an agent hub and a client hub on the same broker and closes both."""

    def __init__(self, target: Target, **options: Any) -> None:
        self.agent = target.hub(**options)
        self.client = target.hub(**options)

    async def __aenter__(self) -> _Hubs:
        await self.agent.open()
        await self.client.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self.agent.close()


async def _first(stream: EventStream, predicate: Callable[[Event], bool], what: str) -> Event:
    events = await collect(stream, until=predicate)
    expect(bool(events) and predicate(events[-1]), f"the stream ended before {what}")
    return events[-1]


# -- the three validations of a durable session ------------------------------------------------------------------


async def resume_after_drop(target: Target) -> str:
    """A subscriber drops mid-stream and resumes from its last cursor: no gap, no duplicate."""
    sid = new_session_id("resume")
    tokens = words(600)
    # Small batches, so that the drop falls between many broker messages.
    async with _Hubs(target, coalesce=Coalesce(max_bytes=256)) as hubs:
        half_written, dropped = asyncio.Event(), asyncio.Event()

        async def agent() -> str:
            async with hubs.agent.session(sid).run(agent="writer") as run:
                for i, token in enumerate(tokens):
                    await run.text(token)
                    if i == 299:
                        await run.flush()
                        half_written.set()
                        await dropped.wait()
                    elif i % 25 == 0:
                        await asyncio.sleep(0)
            return run.id

        task = asyncio.create_task(agent())
        client = hubs.client.session(sid)
        await within(half_written.wait(), "the agent's first half")
        seen_words = 0

        def enough(event: Event) -> bool:
            nonlocal seen_words
            seen_words += len(text_of([event]).split())
            return seen_words >= 100

        first = await collect(client.events(), until=enough)
        expect(not any(isinstance(e, RunEnd) for e in first), "the run ended before the drop")
        dropped.set()
        last = first[-1].cursor
        run_id = await within(task, "the agent")
        second = await collect(client.events(after=last), until=run_end(run_id))
    events = first + second
    ids_unique(events)
    expect(text_of(events, run_id) == "".join(tokens), "reassembled text differs from the agent's text")
    return f"{len(tokens)} tokens, dropped after {len(text_of(first).split())}, resumed gaplessly"


async def join_mid_run(target: Target) -> str:
    """A second subscriber joins mid-run: it sees the response so far, then the rest live."""
    sid = new_session_id("join")
    tokens = words(400)
    async with _Hubs(target) as hubs:
        half_written, joined = asyncio.Event(), asyncio.Event()
        live_client = hubs.client.session(sid)
        early = live_client.events()

        async def agent() -> str:
            async with hubs.agent.session(sid).run(agent="writer") as run:
                for i, token in enumerate(tokens):
                    await run.text(token)
                    if i == 199:
                        await run.flush()
                        half_written.set()
                        await joined.wait()
            return run.id

        task = asyncio.create_task(agent())
        await within(half_written.wait(), "the agent's first half")
        late_hub = hubs.client  # the late joiner uses its own stream on the client hub
        view = await late_hub.session(sid).view()
        expect(len(view.active_runs) == 1, f"view shows {len(view.active_runs)} active runs mid-run, expected 1")
        so_far = "".join(p.text for m in view.messages for p in m.parts if p.type == "text")
        expect(so_far == "".join(tokens[:200]), "the mid-run view does not hold the response so far")
        joined.set()
        run_id = await within(task, "the agent")
        rest = await collect(late_hub.session(sid).events(after=view.cursor), until=run_end(run_id))
        everything = await collect(early, until=run_end(run_id))
    ids_unique(rest)
    expect(so_far + text_of(rest, run_id) == "".join(tokens), "late joiner's view + live tail != the answer")
    expect(text_of(everything, run_id) == "".join(tokens), "the first subscriber's text differs")
    return "late joiner got the answer so far from view(), then the live tail"


async def follow_from_head_beside_a_follower(target: Target) -> str:
    """A reader that starts from ``head()`` while another reader of the same hub follows the session live gets
    exactly what was written after the head, whatever the first reader's live feed already holds."""
    sid = new_session_id("head")
    async with _Hubs(target) as hubs:
        client = hubs.client.session(sid)
        written: list[str] = []

        async def write(run: Run, token: str) -> None:
            await run.text(token)
            await run.flush()
            written.append(token)

        def holds(token: str) -> Callable[[Event], bool]:
            return lambda e: isinstance(e, TextDelta) and token in e.delta

        following = client.events()
        async with hubs.agent.session(sid).run(agent="writer") as run:
            await write(run, "before ")
            await collect_open(following, until=holds("before"))  # the follower is attached and reading live
            await write(run, "middle ")
            await collect_open(following, until=holds("middle"))
            head = await client.head()
            after_head = client.events(after=head)
            tail = asyncio.ensure_future(collect(after_head, until=run_end(run.id)))
            try:
                for token in ("after ", "the ", "head "):
                    await write(run, token)
            except BaseException:
                tail.cancel()
                raise
        rest = await within(tail, "the reader from the head")
        everything = await collect(following, until=run_end(run.id))
    ids_unique(rest)
    expect(text_of(rest, run.id) == "after the head ", f"the reader from the head read {text_of(rest, run.id)!r}")
    expect(text_of(everything) != "", "the follower read nothing")
    return "a reader from head() beside a live follower read exactly what came after it"


async def cancel_from_another_client(target: Target) -> str:
    """A cancel from another client stops an awaiting agent at once, is acknowledged, ends the run cancelled."""
    sid = new_session_id("cancel")
    async with _Hubs(target) as hubs:
        stalled = asyncio.Event()
        reached_after_stall = False
        runs: list[Run] = []

        async def agent() -> None:
            nonlocal reached_after_stall
            async with hubs.agent.session(sid).run(agent="writer") as run:
                runs.append(run)
                await run.text("thinking about it")
                stalled.set()
                await asyncio.Event().wait()  # an LLM stream that never yields again
                reached_after_stall = True

        task = asyncio.create_task(agent())
        client = hubs.client.session(sid)
        start = await _first(client.events(), lambda e: isinstance(e, RunStart), "run-start")
        await within(stalled.wait(), "the agent to stall")
        handle = await client.cancel(start.run_id, reason="user pressed stop")
        ack = await handle.ack(timeout=TIMEOUT)
        await within(task, "the cancelled agent to return")
        events = await collect(client.events(follow=False))
    expect(ack.outcome == "applied", f"cancel acknowledged as {ack.outcome!r} ({ack.reason})")
    expect(not reached_after_stall, "the agent kept running after the cancel")
    expect(runs[0].cancelled, "run.cancelled is false after a cancel")
    ends = [e for e in events if isinstance(e, RunEnd)]
    expect(len(ends) == 1 and ends[0].status == "cancelled", f"run-end is {ends}")
    expect(ends[0].reason == "user pressed stop", f"run-end reason is {ends[0].reason!r}")
    return "agent stopped mid-await; control-ack applied; run-end cancelled"


# -- ordering, loss, duplicates ----------------------------------------------------------------------------------


async def ordering_across_subagents(target: Target) -> str:
    """Sub-agents writing concurrently: every subscriber sees one order, each run's tokens in order."""
    sid = new_session_id("order")
    agents, per_agent = 5, 120
    async with _Hubs(target) as hubs:
        session = hubs.agent.session(sid)
        live = hubs.client.session(sid).events()
        children: list[str] = []

        async def sub_agent(parent: Run, n: int) -> None:
            async with session.run(agent=f"researcher-{n}", parent=parent) as run:
                children.append(run.id)
                for i in range(per_agent):
                    await run.text(f"{n}:{i} ")
                    if i % 7 == n:
                        await asyncio.sleep(0)
                await run.status(f"researcher {n} done")

        async with session.run(agent="orchestrator") as orchestrator:
            await orchestrator.status("delegating")
            await asyncio.gather(*(sub_agent(orchestrator, n) for n in range(agents)))
            await orchestrator.text("all done")
        first = await collect(live, until=run_end(orchestrator.id))
        second = await collect(hubs.client.session(sid).events(follow=False))
    expect(compacted(first) == compacted(second), "two subscribers saw different orders")
    ids_unique(first)
    by_run: dict[str | None, list[Event]] = defaultdict(list)
    for event in first:
        by_run[event.run_id].append(event)
    for run_id in children:
        run_events = by_run[run_id]
        expect(isinstance(run_events[0], RunStart), "a sub-agent's first event is not run-start")
        start = run_events[0]
        assert isinstance(start, RunStart)
        expect(start.parent_run_id == orchestrator.id, "a sub-agent's run-start lacks its parent")
        expect(isinstance(run_events[-1], RunEnd), "a sub-agent's last event is not run-end")
        n = int(start.agent.split("-")[1]) if start.agent else -1
        expected = "".join(f"{n}:{i} " for i in range(per_agent))
        expect(text_of(run_events) == expected, f"sub-agent {n}'s tokens are out of order or missing")
    return f"{agents} sub-agents x {per_agent} tokens, one order for every subscriber"


async def no_loss_no_duplicate(target: Target) -> str:
    """Thousands of events: a live and a catch-up subscriber each get every one exactly once, in order."""
    sid = new_session_id("exact")
    async with _Hubs(target) as hubs:
        live = hubs.client.session(sid).events()
        async with hubs.agent.session(sid).run(agent="writer") as run:
            for i in range(2000):
                await run.text(f"{i},")
                if i % 100 == 99:
                    await run.status(f"{i + 1} written")
        live_events = await collect(live, until=run_end(run.id))
        replay = await collect(hubs.client.session(sid).events(follow=False))
        stored = await stored_events(hubs.client.backend, sid)
    expected = "".join(f"{i}," for i in range(2000))
    stored_ids = [r["id"] for r in stored]
    expect(len(stored_ids) == len(set(stored_ids)), "the broker stored an event twice")
    expect(compacted(replay) == compacted(stored), "the catch-up reader does not give exactly what is stored")
    for name, events in (("live", live_events), ("catch-up", replay)):
        ids_unique(events)
        expect(text_of(events) == expected, f"the {name} subscriber's text has a gap or a duplicate")
        statuses = [e.text for e in events if isinstance(e, Status)]
        expect(statuses == [f"{n} written" for n in range(100, 2001, 100)], f"{name} statuses are wrong")
        cursors = [e.cursor for e in events]
        expect(len(set(cursors)) == len(cursors) and None not in cursors, f"{name} cursors are not unique")
    return f"2000 deltas + 20 statuses, {len(replay)} events, each once"


async def idempotent_publish(target: Target) -> str:
    """Publishing the same event id twice, from two hubs, stores it once (counted in what the broker stores)."""
    sid = new_session_id("dedupe")
    async with _Hubs(target) as hubs:
        event = UserMessage(id=f"evt-{secrets.token_hex(8)}", session=sid, ts=1, message_id="m1", content="hello, once")
        await hubs.agent.session(sid).publish(event)
        await hubs.agent.session(sid).publish(event)
        await hubs.client.session(sid).publish(event)
        await hubs.agent.session(sid).user_message("a second message")
        events = await collect(hubs.client.session(sid).events(follow=False))
        stored = await stored_events(hubs.client.backend, sid)
    copies = [r for r in stored if r["id"] == event.id]
    expect(len(copies) == 1, f"the re-published event was stored {len(copies)} times")
    expect(len(stored) == 2, f"the broker stores {len(stored)} events, expected 2")
    expect(compacted(events) == compacted(stored), "the reader does not give what is stored")
    return "3 publishes of one event id -> 1 stored event"


async def resume_from_every_cursor(target: Target, steps: Sequence[tuple[str, str]] | None = None) -> str:
    """Resuming after any event's cursor yields exactly the events that follow it."""
    sid = new_session_id("cursors")
    plan = list(steps) if steps else _DEFAULT_PLAN
    async with _Hubs(target) as hubs:
        await _play(hubs.agent, sid, plan)
        client = hubs.client.session(sid)
        everything = await collect(client.events(follow=False))
        for i, event in enumerate(everything):
            after = await collect(client.events(after=event.cursor, follow=False))
            expect(
                compacted(after) == compacted(everything[i + 1 :]),
                f"resuming after event {i} ({event.type}) did not yield exactly the rest",
            )
    return f"{len(everything)} cursors, each resumes exactly"


_DEFAULT_PLAN = [
    step
    for round_ in range(3)
    for step in (
        *[("text", f"t{round_}.{i} ") for i in range(10)],
        ("yield", ""),
        ("tool", "search"),
        *[("reasoning", f"r{i} ") for i in range(5)],
        ("status", f"round {round_}"),
        ("text", "and "),
        ("flush", ""),
    )
]


async def _play(hub: Hub, sid: str, steps: Sequence[tuple[str, str]]) -> None:
    """Write one run from a list of (kind, payload) steps, with awaits that let flushes interleave."""
    async with hub.session(sid).run(agent="writer") as run:
        for kind, payload in steps:
            if kind == "text":
                await run.text(payload)
            elif kind == "reasoning":
                await run.reasoning(payload)
            elif kind == "tool":
                call = await run.tool_call(payload, {"q": payload})
                await run.tool_result(call, {"ok": True})
            elif kind == "status":
                await run.status(payload)
            elif kind == "yield":
                await asyncio.sleep(0)
            elif kind == "flush":
                await run.flush()


# -- live control ------------------------------------------------------------------------------------------------


async def steer_into_run(target: Target) -> str:
    """A steer reaches the active run's inbox, is acknowledged and recorded as a user message."""
    sid = new_session_id("steer")
    async with _Hubs(target) as hubs:
        received: list[str] = []
        waiting = asyncio.Event()

        async def agent() -> str:
            async with hubs.agent.session(sid).run(agent="writer") as run:
                await run.text("working on it; ")
                waiting.set()
                async for steer in run.steering():
                    received.append(steer.text)
                    await run.text(f"ok, {steer.text}")
                    break
            return run.id

        task = asyncio.create_task(agent())
        client = hubs.client.session(sid)
        await within(waiting.wait(), "the agent")
        handle = await client.steer("use TypeScript")
        ack = await handle.ack(timeout=TIMEOUT)
        run_id = await within(task, "the agent")
        events = await collect(client.events(follow=False))
    expect(received == ["use TypeScript"], f"the run received {received}")
    expect(ack.outcome == "applied", f"steer acknowledged as {ack.outcome}")
    users = [e for e in events if isinstance(e, UserMessage)]
    expect([u.content for u in users] == ["use TypeScript"], "the steer was not recorded as a user message")
    expect(users[0].run_id == run_id, "the steer's user message does not name its run")
    expect(text_of(events, run_id) == "working on it; ok, use TypeScript", "the run's text is wrong")
    return "steer delivered into run.steering(), acked, recorded"


class _GatedAgent:
    """A served agent whose runs wait for the test to release them, reading steers meanwhile."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self.release = asyncio.Event()
        self.steers: list[str] = []

    async def __call__(self, run: Run, message: UserMessage) -> None:
        await run.text(f"answer to {message.content}")
        await self.started.put(message.content)
        while not self.release.is_set():
            steer_task = asyncio.ensure_future(anext(aiter(run.inbox), None))
            release_task = asyncio.ensure_future(self.release.wait())
            done, pending = await asyncio.wait({steer_task, release_task}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if steer_task in done and steer_task.result() is not None:
                steer = steer_task.result()
                assert steer is not None
                self.steers.append(steer.text)
                await run.text(f" (steered: {steer.text})")


async def _strategy(target: Target, strategy: str) -> tuple[list[Event], _GatedAgent, ControlAck]:
    sid = new_session_id(strategy)
    agent = _GatedAgent()
    async with _Hubs(target) as hubs:
        client = hubs.client.session(sid)
        async with hubs.agent.session(sid).serve(agent, strategy=strategy):  # type: ignore[arg-type]
            first = await client.prompt("first")
            expect((await first.ack(timeout=TIMEOUT)).outcome == "applied", "the first prompt was not applied")
            await within(agent.started.get(), "the first run")
            second = await client.prompt("second")
            ack = await second.ack(timeout=TIMEOUT)
            if strategy in ("enqueue", "interrupt") and ack.outcome == "applied":
                if strategy == "enqueue":
                    agent.release.set()
                expect(await within(agent.started.get(), "the second run") == "second", "wrong prompt answered")
            agent.release.set()
            ends = 2 if strategy in ("enqueue", "interrupt") and ack.outcome == "applied" else 1
            seen: list[Event] = []
            stream = client.events()
            async for event in stream:
                seen.append(event)
                if sum(isinstance(e, RunEnd) for e in seen) == ends:
                    break
            await stream.aclose()
        events = await collect(client.events(follow=False))
    return events, agent, ack


def _runs(events: Sequence[Event]) -> list[tuple[str, str]]:
    """(run_id, status) of every ended run, in order."""
    return [(e.run_id or "", e.status) for e in events if isinstance(e, RunEnd)]


async def strategy_enqueue(target: Target) -> str:
    """``enqueue``: a prompt during a run waits, then gets its own run."""
    events, _, ack = await _strategy(target, "enqueue")
    expect(ack.outcome == "applied" and ack.reason == "queued", f"second prompt ack: {ack.outcome} {ack.reason}")
    runs = _runs(events)
    expect([s for _, s in runs] == ["completed", "completed"], f"runs ended {runs}")
    expect(text_of(events, runs[1][0]) == "answer to second", "the queued prompt was not answered")
    users = [e.content for e in events if isinstance(e, UserMessage)]
    expect(users == ["first", "second"], f"user messages: {users}")
    return "second prompt queued, answered after the first"


async def strategy_interrupt(target: Target) -> str:
    """``interrupt``: a prompt during a run cancels it and is answered at once."""
    events, _, ack = await _strategy(target, "interrupt")
    expect(ack.outcome == "applied", f"interrupting prompt ack: {ack.outcome} {ack.reason}")
    runs = _runs(events)
    expect([s for _, s in runs] == ["cancelled", "completed"], f"runs ended {runs}")
    expect(text_of(events, runs[1][0]) == "answer to second", "the interrupting prompt was not answered")
    return "first run cancelled, second answered"


async def strategy_reject(target: Target) -> str:
    """``reject``: a prompt during a run is refused with a reason and not recorded."""
    events, _, ack = await _strategy(target, "reject")
    expect(ack.outcome == "rejected", f"prompt during a run was {ack.outcome}, expected rejected")
    users = [e.content for e in events if isinstance(e, UserMessage)]
    expect(users == ["first"], f"a rejected prompt was recorded: {users}")
    expect([s for _, s in _runs(events)] == ["completed"], "the active run did not complete")
    return "second prompt rejected, first run completed"


async def strategy_steer(target: Target) -> str:
    """``steer``: a prompt during a run is delivered into it."""
    events, agent, ack = await _strategy(target, "steer")
    expect(ack.outcome == "applied", f"steering prompt ack: {ack.outcome}")
    expect(agent.steers == ["second"], f"the run received {agent.steers}")
    runs = _runs(events)
    expect(len(runs) == 1, f"expected one run, got {runs}")
    expect(text_of(events) == "answer to first (steered: second)", "the run did not use the steer")
    return "second prompt steered into the active run"


async def malformed_controls(target: Target) -> str:
    """Malformed, unknown and oversized controls are rejected with an ack; the agent keeps running."""

    sid = new_session_id("malformed")
    async with _Hubs(target, max_control_bytes=4096) as hubs:
        release = asyncio.Event()

        async def agent() -> str:
            async with hubs.agent.session(sid).run(agent="writer") as run:
                await run.text("still ")
                await release.wait()
                await run.text("here")
            return run.id

        task = asyncio.create_task(agent())
        client = hubs.client.session(sid)
        await _first(client.events(), lambda e: isinstance(e, TextDelta), "the first delta")
        oversized = b'{"v":1,"id":"big","type":"steer","text":"' + b"x" * hubs.agent.settings.max_control_bytes + b'"}'
        bad = [
            b"not json at all",
            b"[1, 2, 3]",
            b'{"v":1,"id":"c-unknown","type":"explode"}',
            b'{"v":1,"id":"c-bad","type":"cancel","run_id":123}',
            b'{"v":1,"id":"c-missing","type":"steer"}',
            oversized,
        ]
        for i, data in enumerate(bad):
            await hubs.client.backend.publish(Channel(sid, "control"), data, message_id=f"bad-{sid}-{i}")
        acked = 0

        def all_acked(event: Event) -> bool:
            nonlocal acked
            acked += isinstance(event, ControlAck)
            return acked == len(bad)

        await collect(client.events(), until=all_acked)
        release.set()
        run_id = await within(task, "the agent")
        events = await collect(client.events(follow=False))
    rejected = [e for e in events if isinstance(e, ControlAck)]
    expect(len(rejected) == len(bad), f"expected {len(bad)} control-acks, got {len(rejected)}")
    expect(all(a.outcome == "rejected" and a.reason for a in rejected), "a bad control was not rejected")
    by_id = {a.control_id: a for a in rejected}
    expect("unknown control type" in (by_id["c-unknown"].reason or ""), "unknown type not named in the reason")
    expect("run_id" in (by_id["c-bad"].reason or ""), "the invalid field is not named in the reason")
    expect(any("over the limit" in (a.reason or "") for a in rejected), "the oversized control is not named")
    ends = [e for e in events if isinstance(e, RunEnd)]
    expect(ends[-1].status == "completed" and text_of(events, run_id) == "still here", "the agent was disturbed")
    return f"{len(bad)} bad controls rejected with reasons; the run completed"


# -- resets, late join, retention ---------------------------------------------------------------------------------


async def reset_on_retention(target: Target) -> str:
    """A cursor whose events retention dropped yields ``reset``, then the earliest retained events."""
    backend = target.retention_backend(8)
    if backend is None:
        raise CheckSkipped("the target cannot configure retention")
    sid = new_session_id("retention")
    async with Hub(backend) as hub:
        session = hub.session(sid)
        async with session.run(agent="writer") as run:
            await run.status("first")
            first = await collect(session.events(follow=False))
            for i in range(20):
                await run.status(f"status {i}")
        after = await collect(session.events(after=first[0].cursor, follow=False))
        retained = await collect(session.events(follow=False))
    expect(bool(after) and isinstance(after[0], Reset), "no reset for a cursor whose events were dropped")
    expect(compacted(after[1:]) == compacted(retained), "after the reset, not the earliest retained")
    expect(after[0].cursor is not None, "the reset carries no cursor to resume from")
    return f"reset, then {len(retained)} retained events"


async def reset_on_recreate(target: Target) -> str:
    """A cursor from a deleted (recreated) log yields ``reset``, then the new log."""
    sid = new_session_id("recreate")
    async with _Hubs(target) as hubs:
        session = hubs.agent.session(sid)
        async with session.run(agent="writer") as run:
            await run.text("old answer")
        old = await collect(hubs.client.session(sid).events(follow=False))
        await session.delete()
        async with session.run(agent="writer") as run:
            await run.text("new answer")
        after = await collect(hubs.client.session(sid).events(after=old[-1].cursor, follow=False))
    expect(bool(after) and isinstance(after[0], Reset), "no reset for a cursor of a recreated log")
    expect(text_of(after) == "new answer", "after the reset, not the new log")
    return "reset, then the new log"


async def delete_seen_everywhere(target: Target) -> str:
    """``delete()`` is seen by a live follower in another process: ``reset``, then only the new log."""
    sid = new_session_id("delete")
    async with _Hubs(target) as hubs:
        session = hubs.agent.session(sid)
        follower = hubs.client.session(sid).events()
        async with session.run(agent="writer") as old:
            await old.text("old answer")
        before = await collect_open(follower, until=run_end(old.id))
        await session.delete()
        async with session.run(agent="writer") as new:
            await new.text("new answer")
        after = await collect(follower, until=run_end(new.id))
        resumed = await collect(hubs.client.session(sid).events(after=after[-1].cursor, follow=False))
    expect(text_of(before) == "old answer", "the follower did not see the first answer")
    expect(bool(after) and isinstance(after[0], Reset), f"the follower did not get a reset first: {after[:1]}")
    expect(not any(e.run_id == old.id for e in after), "the follower saw the deleted log again after the reset")
    expect(text_of(after) == "new answer" and after[-1].run_id == new.id, "the follower did not follow the new log")
    expect(resumed == [], f"resuming from the new log's last cursor gave {[e.type for e in resumed]}")
    return "the follower got reset, then the new log only"


async def truncated_from_the_start(target: Target) -> str:
    """Without snapshots, ``view()`` reads the log from its start and says when retention dropped some of it."""
    backend = target.retention_backend(8)
    if backend is None:
        raise CheckSkipped("the target cannot configure retention")
    sid, short = new_session_id("truncated"), new_session_id("whole")
    async with Hub(backend, snapshots=False) as hub:
        async with hub.session(sid).run(agent="writer") as run:
            for i in range(20):
                await run.status(f"status {i}")
        async with hub.session(short).run(agent="writer") as run:
            await run.text("all of it")
        view = await hub.session(sid).view()
        whole = await hub.session(short).view()
    expect(view.truncated, "view() of a log whose start retention dropped is not marked truncated")
    expect(not whole.truncated, "view() of a whole log is marked truncated")
    expect(whole.messages[0].text == "all of it", "the whole log's view is wrong")
    return "truncated reported from the start of the log; a whole log is not"


async def stop_answered_when_idle(target: Target) -> str:
    """A cancel or steer for a run that is not active is answered ``ignored`` at once, with nobody serving."""
    sid = new_session_id("idle")
    async with _Hubs(target) as hubs:
        client = hubs.client.session(sid)
        async with hubs.agent.session(sid).run(agent="writer") as run:
            await run.text("done")
        answers = [
            await within((await client.cancel()).ack(timeout=TIMEOUT), "the answer to a cancel of nothing"),
            await within((await client.cancel(run.id)).ack(timeout=TIMEOUT), "the answer to a late cancel"),
            await within((await client.steer("hello?", run_id="nope")).ack(timeout=TIMEOUT), "a steer's answer"),
        ]
    outcomes = [a.outcome for a in answers]
    expect(outcomes == ["ignored"] * 3, f"controls for no active run were answered {outcomes}")
    return "cancel and steer of runs that are not active: ignored, at once"


async def run_id_in_use(target: Target) -> str:
    """Two writers in different processes cannot share a run id; nothing of the second is stored."""
    sid = new_session_id("runid")
    async with _Hubs(target) as hubs:
        errors = 0
        async with hubs.agent.session(sid).run(agent="first", run_id="answer-1") as first:
            await first.text("mine")
            try:
                async with hubs.client.session(sid).run(agent="second", run_id="answer-1") as second:
                    await second.text("intruder")
            except RunIdInUse:
                errors += 1
            await first.text(", all mine")

        async def racer(hub: Hub, name: str) -> str:
            async with hub.session(sid).run(agent=name, run_id="answer-2") as run:
                await run.text(name)
            return name

        raced = await asyncio.gather(racer(hubs.agent, "a"), racer(hubs.client, "b"), return_exceptions=True)
        await hubs.agent.flush()
        stored = await stored_events(hubs.client.backend, sid)
    expect(errors == 1, "a second writer entered an active run id")
    winners = [r for r in raced if isinstance(r, str)]
    expect(len(winners) == 1 and any(isinstance(r, RunIdInUse) for r in raced), f"two writers raced: {raced}")
    starts = [r["run_id"] for r in stored if r["type"] == "run-start"]
    expect(starts == ["answer-1", "answer-2"], f"the log holds run-starts for {starts}")
    agents = {r.get("agent") for r in stored if r.get("run_id") == "answer-1"}
    expect(agents == {"first"}, f"the second writer's events were mixed into the run: {agents}")
    return "a second writer of an active run id got RunIdInUse; a race left one run"


async def late_join_view(target: Target) -> str:
    """A late joiner's ``view()`` reads a snapshot, not every token; ``view.cursor`` continues exactly."""
    sid = new_session_id("view")
    runs, tokens = 12, 300
    async with target.hub() as agent_hub:
        session = agent_hub.session(sid)
        for r in range(runs):
            await session.user_message(f"question {r}")
            async with session.run(agent="writer") as run:
                for i in range(tokens):
                    await run.text(f"{r}.{i} ")
                    if i % 50 == 0:
                        await asyncio.sleep(0)
        await agent_hub.flush()
        recording = RecordingBackend(target.backend())
        async with Hub(recording) as client_hub:
            view = await client_hub.session(sid).view()
            view_reads = recording.messages_read
            tail = await collect(client_hub.session(sid).events(after=view.cursor, follow=False))
            everything = await collect(client_hub.session(sid).events(follow=False))
    assistant = [m for m in view.messages if m.role == "assistant"]
    expect(len(assistant) == runs, f"view has {len(assistant)} answers, expected {runs}")
    for r, message in enumerate(assistant):
        text = "".join(p.text for p in message.parts if p.type == "text")
        expect(text == "".join(f"{r}.{i} " for i in range(tokens)), f"answer {r} in the view is wrong")
        expect(message.status == "completed", f"answer {r} status is {message.status}")
    users = [m for m in view.messages if m.role == "user"]
    expect([m.parts[0].text for m in users] == [f"question {r}" for r in range(runs)], "user messages wrong")  # type: ignore[union-attr]
    expect(not tail, f"{len(tail)} events after view.cursor, expected none")
    expect(view.cursor == everything[-1].cursor, "view.cursor is not the last event's cursor")
    expect(
        view_reads <= 3,
        f"view() read {view_reads} broker messages for {runs * tokens} tokens: it replays instead of snapshotting",
    )
    return f"{runs} runs x {tokens} tokens -> view() read {view_reads} broker message(s)"


async def slow_subscriber(target: Target) -> str:
    """A subscriber that stops reading never slows the writer; it catches up afterwards, losing nothing."""
    sid = new_session_id("slow")
    async with _Hubs(target) as hubs:
        stream = hubs.client.session(sid).events()
        tokens = words(5000, "s")
        # The subscriber reads one event and then stalls while the agent writes everything.
        async with hubs.agent.session(sid).run(agent="writer") as run:
            await run.text(tokens[0])
            first = await within(anext(stream), "the first event")
            for token in tokens[1:]:
                await run.text(token)
                if len(token) % 3 == 0:
                    await asyncio.sleep(0)
        await within(hubs.agent.flush(), "the writer, while a subscriber stalls")
        rest = await collect(stream, until=run_end(run.id))
    events = [first, *rest]
    ids_unique(events)
    expect(text_of(events) == "".join(tokens), "the stalled subscriber lost or duplicated text")
    return "writer finished 5000 tokens while a subscriber stalled; it then caught up"


async def large_events(target: Target) -> str:
    """Events larger than a broker message are split and reassembled; over the hub limit they are refused."""
    sid = new_session_id("large")
    limit = target.backend().limits.max_message_bytes
    size = int(limit * 2.5)
    big = {"blob": "x" * size, "end": "é✓"}
    async with _Hubs(target, max_event_bytes=size * 2) as hubs:
        too_big_refused = False
        async with hubs.agent.session(sid).run(agent="writer") as run:
            call = await run.tool_call("download", {"url": "https://example.com"})
            await run.tool_result(call, big)
            try:
                await run.data("huge", "y" * size * 2)
            except EventTooLarge as exc:
                too_big_refused = exc.limit == size * 2
            await run.text("after")
        events = await collect(hubs.client.session(sid).events(follow=False))
        resumed = await collect(hubs.client.session(sid).events(after=events[1].cursor, follow=False))
    results = [e for e in events if isinstance(e, ToolResult)]
    expect(len(results) == 1 and results[0].output == big, "the large tool result did not arrive whole")
    expect(too_big_refused, "an event over max_event_bytes was not refused with EventTooLarge")
    expect(text_of(events) == "after", "the run did not continue after a refused event")
    expect(compacted(resumed) == compacted(events[2:]), "resuming before a fragmented event failed")
    return f"{size // 1024} KiB event across {limit // 1024} KiB messages; oversize refused"


async def failed_run(target: Target) -> str:
    """An exception in the agent ends the run ``failed`` with an ``error`` event, and propagates."""
    sid = new_session_id("failed")
    async with _Hubs(target) as hubs:
        propagated = False
        try:
            async with hubs.agent.session(sid).run(agent="writer") as run:
                await run.text("partial")
                raise RuntimeError("model overloaded")
        except RuntimeError:
            propagated = True
        events = await collect(hubs.client.session(sid).events(follow=False))
    types = [e.type for e in events]
    expect(propagated, "the agent's exception did not propagate")
    expect(types[-2:] == ["error", "run-end"], f"events end with {types[-2:]}")
    end = events[-1]
    expect(isinstance(end, RunEnd) and end.status == "failed", "run-end is not failed")
    expect("model overloaded" in getattr(events[-2], "message", ""), "the error event lacks the message")
    return "failed run: error event, run-end failed, exception propagated"


async def eventually(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str) -> T:
    """Ask ``probe`` until ``done`` holds for its answer (for state that settles in the background)."""
    answer = await probe()
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not done(answer):
        if asyncio.get_running_loop().time() > deadline:
            raise CheckFailed(f"timed out after {TIMEOUT:g}s waiting for {what}; last saw {answer!r}")
        await asyncio.sleep(0.01)
        answer = await probe()
    return answer


async def presence(target: Target) -> str:
    """Working agents and present clients appear in presence, and leave it; presence never delays a run."""
    sid = new_session_id("presence")
    async with _Hubs(target) as hubs:
        client = hubs.client.session(sid)

        def roles(members: Sequence[PresenceMember]) -> set[tuple[str, str]]:
            return {(m.member_id, m.role) for m in members}

        async with client.present("tab-1", data={"device": "phone"}):
            async with hubs.agent.session(sid).run(agent="writer") as run:
                during = await eventually(client.presence, lambda m: len(m) == 2, "the agent's presence")
            after_run = await eventually(client.presence, lambda m: len(m) == 1, "the agent to leave")
        after_all = await client.presence()
    expect(roles(during) == {("tab-1", "client"), (run.id, "agent")}, f"presence during the run: {roles(during)}")
    agent = next(m for m in during if m.role == "agent")
    expect((agent.agent, agent.run_id) == ("writer", run.id), f"the agent's presence says {agent}")
    expect([m.member_id for m in after_run] == ["tab-1"], f"presence after the run: {after_run}")
    expect(not after_all, f"presence after leaving: {after_all}")
    return "agent and client present, then gone"


async def invalid_session_ids(target: Target) -> str:
    """Ids that cannot name a channel everywhere raise InvalidSessionId before any I/O."""
    bad: list[Any] = ["", "a.b", "a*", "a>", "has space", "x" * 129, "a:b", "a/b", "ü", None, 42]
    async with target.hub() as hub:
        for value in bad:
            try:
                hub.session(value)
            except InvalidSessionId:
                continue
            raise CheckFailed(f"session id {value!r} was accepted")
        hub.session("chat_42-Ok")
    return f"{len(bad)} invalid ids refused"


async def rate_budget(target: Target) -> str:
    """Runs of one session share the rate budget: no one-second window exceeds it, nothing is lost."""
    sid = new_session_id("budget")
    per_second = 10
    recording = RecordingBackend(target.backend())
    # 5 ms windows would be ~200 messages/s; the budget must widen them instead.
    async with Hub(recording, rate_limit=per_second, coalesce=Coalesce(max_delay=0.005)) as hub:
        session = hub.session(sid)

        async def writer(n: int) -> str:
            async with session.run(agent=f"agent-{n}") as run:
                for i in range(60):
                    await run.text(f"{n}.{i} ")
                    await asyncio.sleep(0.01)  # an LLM producing ~100 tokens/s
            return run.id

        run_ids = await asyncio.gather(*(writer(n) for n in range(3)))
        events = await collect(session.events(follow=False))
    stamps = [r.at for r in recording.publishes if r.channel.kind == "events"]
    busiest = max(sum(1 for t in stamps if start <= t < start + 1.0) for start in stamps)
    expect(busiest <= per_second, f"{busiest} publishes in one second, budget is {per_second}")
    for n, run_id in enumerate(run_ids):
        expected = "".join(f"{n}.{i} " for i in range(60))
        expect(text_of(events, run_id) == expected, f"run {n} lost text under the budget")
    return f"3 runs, {len(stamps)} messages, busiest second {busiest}/{per_second}"


CHECKS: dict[str, Callable[[Target], Awaitable[str]]] = {
    "resume after drop": resume_after_drop,
    "join mid-run": join_mid_run,
    "cancel from another client": cancel_from_another_client,
    "ordering across sub-agents": ordering_across_subagents,
    "no loss, no duplicate": no_loss_no_duplicate,
    "idempotent publish": idempotent_publish,
    "resume from every cursor": resume_from_every_cursor,
    "delete seen everywhere": delete_seen_everywhere,
    "stop answered when idle": stop_answered_when_idle,
    "run id in use": run_id_in_use,
}
"""The checks ``durable-ai check URL`` runs, in order."""
