"""How runs turn events into broker messages: what a metered broker bills and a subscriber receives.

The policies use an hour-long ``max_delay`` so that an event can only reach a subscriber through the flush
trigger under test (first delta, non-delta event, ``max_bytes``, run end), never by a timer.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from durable_ai import Coalesce, Event, Hub, RunEnd, Status, TextDelta
from durable_ai.backends.memory import MemoryBackend
from durable_ai.testing import RecordingBackend
from durable_ai.testing.scenarios import collect, text_of

HOUR = Coalesce(max_delay=3600)


def _position(event: Event) -> str:
    assert event.cursor is not None
    return event.cursor.split(":")[1]


async def test_first_delta_is_flushed_at_once_and_later_ones_wait(backend: MemoryBackend) -> None:
    async with Hub(backend, coalesce=HOUR) as agent, Hub(backend) as client:
        live = client.session("s").events()
        async with agent.session("s").run(agent="w") as run:
            await run.text("Hel")
            first = await collect(live, until=lambda e: isinstance(e, TextDelta))
            await run.text("lo")
            await run.text(" world")
            await run.status("thinking")
        events = await collect(client.session("s").events(after=first[-1].cursor, follow=False))
    assert text_of(first) == "Hel"
    delta, status = events[0], events[1]
    assert isinstance(delta, TextDelta) and delta.delta == "lo world"  # held, then merged into one event
    assert isinstance(status, Status)
    assert _position(delta) == _position(status)  # flushed together by the status, in one broker message


async def test_max_bytes_triggers_a_flush(backend: MemoryBackend) -> None:
    policy = Coalesce(max_delay=3600, max_bytes=100)
    async with Hub(backend, coalesce=policy) as agent, Hub(backend) as client:
        live = client.session("s").events()
        async with agent.session("s").run(agent="w") as run:
            await run.text("0")
            for i in range(15):
                await run.text(f"{i:09d},")  # 10 bytes each: 150 bytes buffered
            received = ""

            def got_all(event: Event) -> bool:
                nonlocal received
                received += text_of([event])
                return len(received) >= 101

            await collect(live, until=got_all)
            await run.text("tail")
        events = await collect(client.session("s").events(follow=False))
    # Flushed as soon as 100 bytes were buffered; the last 50 waited for the run to end.
    assert received == "0" + "".join(f"{i:09d}," for i in range(10))
    assert text_of(events) == "0" + "".join(f"{i:09d}," for i in range(15)) + "tail"


async def test_coalescing_off_writes_one_message_per_event() -> None:
    recording = RecordingBackend(MemoryBackend())
    async with Hub(recording, coalesce=Coalesce.off()) as hub:
        live = hub.session("s").events()  # as written (a catch-up from the snapshot would merge the deltas)
        async with hub.session("s").run(agent="w") as run:
            for i in range(50):
                await run.text(f"{i} ")
            await run.status("done")
        events = await collect(live, until=lambda e: isinstance(e, RunEnd))
    assert recording.events_published("s") == 1 + 50 + 1 + 1
    assert sum(isinstance(e, TextDelta) for e in events) == 50
    assert len({_position(e) for e in events}) == len(events)


async def test_default_policy_batches_a_fast_stream() -> None:
    recording = RecordingBackend(MemoryBackend())
    async with Hub(recording, coalesce=HOUR) as hub:
        async with hub.session("s").run(agent="w") as run:
            for i in range(1000):
                await run.text(f"{i} ")
        events = await collect(hub.session("s").events(follow=False))
    # run-start, the first delta (at once), the other 999 deltas with the run-end.
    assert recording.events_published("s") == 3
    assert text_of(events) == "".join(f"{i} " for i in range(1000))


async def test_runs_of_a_session_share_messages_but_never_mix_their_deltas(backend: MemoryBackend) -> None:
    async with Hub(backend, coalesce=HOUR) as hub:
        session = hub.session("s")
        async with session.run(agent="a") as run_a, session.run(agent="b") as run_b:
            await run_a.text("a1 ")
            await run_b.text("b1 ")
            await run_a.flush()
            await run_b.flush()
            await run_a.text("a2 ")
            await run_b.text("b2 ")
            await run_a.text("a3 ")
            await run_a.status("a is done")
        events = await collect(session.events(follow=False))
    by_position: dict[str, set[str | None]] = defaultdict(set)
    for event in events:
        by_position[_position(event)].add(event.run_id)
    assert any(len(runs) == 2 for runs in by_position.values()), "no message carried both runs"
    assert text_of(events, run_a.id) == "a1 a2 a3 "
    assert text_of(events, run_b.id) == "b1 b2 "


async def test_a_new_part_starts_after_other_output(hub: Hub) -> None:
    async with hub.session("s").run(agent="w") as run:
        await run.text("before ")
        await run.reasoning("hmm")
        await run.text("after")
        call = await run.tool_call("search", {"q": "x"})
        await run.tool_result(call, {"hits": 1})
        await run.text("end")
    view = await hub.session("s").view()
    kinds = [(p.type, getattr(p, "text", None)) for p in view.messages[0].parts]
    assert kinds == [
        ("text", "before "),
        ("reasoning", "hmm"),
        ("text", "after"),
        ("tool", None),
        ("text", "end"),
    ]


async def test_writers_do_not_outlive_their_runs(hub: Hub) -> None:
    async with hub.session("s").run(agent="w") as run:
        await run.text("x")
    await hub.flush()
    await asyncio.sleep(0)
    assert not hub._runtime.owners


async def test_max_bytes_counts_utf8_bytes_not_characters(backend: MemoryBackend) -> None:
    policy = Coalesce(max_delay=3600, max_bytes=100)
    async with Hub(backend, coalesce=policy) as agent, Hub(backend) as client:
        live = client.session("s").events()
        async with agent.session("s").run(agent="w") as run:
            await run.text("·")
            for _ in range(20):
                await run.text("✓✓")  # 6 bytes, 2 characters: 120 bytes buffered, 40 characters
            got = await collect(live, until=lambda e: "✓" in text_of([e]))
        events = await collect(client.session("s").events(follow=False))
    # The item closes at 96 bytes (16 pairs); counted in characters, all 40 would have fit in it.
    assert text_of(got[-1:]) == "✓✓" * 16
    assert text_of(events) == "·" + "✓✓" * 20


async def test_the_first_delta_of_an_explicit_part_is_flushed_at_once(backend: MemoryBackend) -> None:
    async with Hub(backend, coalesce=HOUR) as agent, Hub(backend) as client:
        live = client.session("s").events()
        async with agent.session("s").run(agent="w") as run:
            await run.text("first", part_id="answer")
            got = await collect(live, until=lambda e: isinstance(e, TextDelta))
    assert text_of(got) == "first"


async def test_an_agent_that_never_awaits_still_gets_its_first_token_out(backend: MemoryBackend) -> None:
    """A synchronous token loop (a blocking model client, say) must not hold back the first token."""
    async with Hub(backend, coalesce=HOUR) as hub, hub.session("s").run(agent="w") as run:
        published_at_start = backend.published
        for i in range(1000):
            await run.text(f"{i} ")
            if i == 500:
                published_mid_loop = backend.published
    assert published_at_start == 1  # run-start
    assert published_mid_loop == 2  # and the first delta, while the loop was still running
