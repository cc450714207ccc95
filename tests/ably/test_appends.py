"""Message per part over the emulator: parts grow by appends, history has them whole, every cursor resumes exactly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

import durable_ai
from durable_ai import Event, RunEnd, TextDelta
from durable_ai.backend import Channel
from durable_ai_ably import AblyBackend, options_from_url
from durable_ai_ably._log import append_frame
from durable_ai_ably.testing import AblyEmulator

KEY = "app1.full:s3cret"


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    async with AblyEmulator({KEY: None}, mutable_namespaces={"ai"}) as emu:
        yield emu


def url(emulator: AblyEmulator, appends: str = "on") -> str:
    return f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false&appends={appends}"


async def _stream(run: durable_ai.Run, words: list[str]) -> None:
    for word in words:
        await run.text(word)
        await run.flush()  # one broker operation per word


def _text(events: list[Event], run_id: str | None = None) -> str:
    return "".join(e.delta for e in events if isinstance(e, TextDelta) and (run_id is None or e.run_id == run_id))


async def test_a_part_is_one_message_in_history(emulator: AblyEmulator) -> None:
    words = [f"w{i} " for i in range(12)]
    async with durable_ai.connect(url(emulator)) as hub:
        session = hub.session("s1")
        async with session.run(agent="writer") as run:
            await _stream(run, words)
        events = [e async for e in session.events(follow=False)]
    assert _text(events) == "".join(words)
    stored = emulator.messages("ai:s1")
    parts = [m for m in stored if m.name == "p"]
    assert len(parts) == 1, [m.name for m in stored]
    # History holds the whole part in one message: every word, grown by appends.
    assert parts[0].version_serial is not None
    assert all(word.strip() in parts[0].data for word in words)
    # run-start, the part, run-end: a late joiner reads three messages, not one per word.
    assert len(stored) <= 3


async def test_every_cursor_resumes_exactly_with_interleaved_parts(emulator: AblyEmulator) -> None:
    async with durable_ai.connect(url(emulator)) as hub, durable_ai.connect(url(emulator)) as watcher:
        session = hub.session("s2")
        live: list[str] = []

        async def watch() -> None:
            async for event in watcher.session("s2").events():
                live.append(event.id)
                if isinstance(event, RunEnd) and event.agent == "lead":
                    return

        watching = asyncio.create_task(watch())
        async with session.run(agent="lead") as lead:

            async def sub(name: str) -> None:
                async with session.run(agent=name, parent=lead.id) as run:
                    for i in range(6):
                        await run.text(f"{name}{i} ")
                        await run.flush()
                        await asyncio.sleep(0)  # let the other agent write in between

            await asyncio.gather(sub("a"), sub("b"), sub("c"))
        everything = [e async for e in session.events(follow=False)]
        assert sum(isinstance(e, RunEnd) for e in everything) == 4
        ids = [e.id for e in everything]
        assert len(set(ids)) == len(ids)
        # History gives the events in the order they were written, as a live subscriber saw them.
        await asyncio.wait_for(watching, 10)
        assert ids == live
        # Appends to older messages interleave with newer ones: resuming from any cursor gives exactly the rest.
        for index, event in enumerate(everything):
            assert event.cursor is not None
            rest = [e.id async for e in session.events(after=event.cursor, follow=False)]
            assert rest == ids[index + 1 :], f"after event {index}"
    appended = [m for m in emulator.messages("ai:s2") if m.version_serial is not None]
    assert len(appended) >= 3  # each sub-agent's part grew by appends


async def test_a_live_follower_resumes_mid_part_after_losing_its_connection(emulator: AblyEmulator) -> None:
    async with durable_ai.connect(url(emulator)) as agent_hub, durable_ai.connect(url(emulator)) as client_hub:
        session = agent_hub.session("s3")
        seen: list[Event] = []
        halfway = asyncio.Event()
        go_on = asyncio.Event()

        async def follow(after: str | None) -> str | None:
            async for event in client_hub.session("s3").events(after=after):
                seen.append(event)
                if _text(seen).count(" ") == 5 and not halfway.is_set():
                    halfway.set()
                    return event.cursor
                if isinstance(event, RunEnd):
                    return None
            return None

        follower = asyncio.create_task(follow(None))
        async with session.run(agent="writer") as run:
            for i in range(10):
                if i == 5:
                    await halfway.wait()
                    await go_on.wait()
                await run.text(f"t{i} ")
                await run.flush()
                if i == 4:
                    cursor = await follower  # the follower stops with the part half read
                    go_on.set()
        assert cursor is not None
        await follow(cursor)
    assert _text(seen) == "".join(f"t{i} " for i in range(10))
    ids = [e.id for e in seen]
    assert len(set(ids)) == len(ids)


async def test_an_append_stored_twice_is_read_once(emulator: AblyEmulator) -> None:
    # A retried append that had landed: two copies carry the same link. Live and history readers keep one.
    backend = AblyBackend(options_from_url(url(emulator)))
    await backend.open()
    events = Channel("s4", "events")
    lines = [
        f'{{"v":1,"id":"e{i}","type":"text-delta","run_id":"r","part_id":"p","delta":"{c}"}}'.encode()
        for i, c in enumerate("abc")
    ]
    try:
        live: list[bytes] = []
        attached = asyncio.Event()

        async def follow() -> None:
            async for message in backend.read(events, start=None, follow=True):
                if not attached.is_set():  # the marker: the follower is attached
                    attached.set()
                    continue
                live.append(message.data)
                if len(live) == 3:
                    return

        follower = asyncio.create_task(follow())
        await backend._publish("ai:s4", "{}", "m0")
        await asyncio.wait_for(attached.wait(), 5)
        serial = await backend._publish("ai:s4", lines[0].decode(), "m1", "p")
        v2 = await backend._append("ai:s4", serial, append_frame(serial, lines[1]).decode())
        await backend._append("ai:s4", serial, append_frame(serial, lines[1]).decode())  # the duplicate
        await backend._append("ai:s4", serial, append_frame(v2, lines[2]).decode())
        await asyncio.wait_for(follower, 5)
        history = [m.data async for m in backend.read(events, start=None, follow=False)]
    finally:
        await backend.close()
    assert live == lines
    assert history == [b"{}", *lines]


async def test_without_the_channel_rule_auto_publishes_whole_batches(caplog: pytest.LogCaptureFixture) -> None:
    words = [f"w{i} " for i in range(6)]
    async with AblyEmulator({KEY: None}) as plain:  # no mutable namespaces
        with caplog.at_level(logging.INFO, logger="durable_ai_ably"):
            async with durable_ai.connect(url(plain, "auto")) as hub:
                session = hub.session("s5")
                async with session.run(agent="writer") as run:
                    await _stream(run, words)
                events = [e async for e in session.events(follow=False)]
        assert _text(events) == "".join(words)
        assert all(m.version_serial is None for m in plain.messages("ai:s5"))
        assert "appends are not enabled" in caplog.text

        async with durable_ai.connect(url(plain, "on"), publish_timeout=2) as hub:
            session = hub.session("s6")
            with pytest.raises(durable_ai.PublishRefused) as refused:  # refused for good, at once: no retrying
                async with session.run(agent="writer") as run:
                    await _stream(run, words[:3])
            assert isinstance(refused.value.__cause__, durable_ai.ConfigurationError)


TOKENS = 400


async def test_five_sub_agents_stay_within_ablys_rate_limits() -> None:
    """Five parts per flush become five appends: the budgets keep the channel and the connection at 50 msg/s or
    under, so an emulator that refuses what Ably would refuses nothing, and every token arrives."""
    async with AblyEmulator({KEY: None}, mutable_namespaces={"ai"}, enforce_rate_limits=True) as emulator:
        async with durable_ai.connect(url(emulator)) as hub:
            session = hub.session("s7")
            async with session.run(agent="lead") as lead:

                async def sub(name: str) -> None:
                    async with session.run(agent=name, parent=lead.id) as run:
                        for i in range(TOKENS):
                            await run.text(f"{name}{i} ")
                            await asyncio.sleep(0.005)  # a model's pace: each 40 ms batch holds every part

                names = [f"a{k}" for k in range(5)]
                await asyncio.gather(*(sub(name) for name in names))
            events = [e async for e in session.events(follow=False)]
        channel = emulator.channel_stats("ai:s7")
        connections = emulator.connection_stats()
    for name in names:
        runs = {e.run_id for e in events if e.agent == name}
        assert len(runs) == 1
        assert _text(events, runs.pop()) == "".join(f"{name}{i} " for i in range(TOKENS))
    assert channel.count("append") > 0
    assert channel.refused == 0 and channel.peak_per_second <= 50
    assert all(c.refused == 0 and c.peak_per_second <= 50 for c in connections.values())
