"""The REST backend against the Ably emulator: serverless agents, fault storms, batches, mixed transports."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import pytest

import durable_ai
from durable_ai import Event, RunEnd, RunStart, TextDelta
from durable_ai.backend import Channel
from durable_ai.errors import LogReset, PermissionDenied
from durable_ai.testing.scenarios import collect, eventually
from durable_ai_ably import AblyOptions, AblyRestBackend, issue_client_jwt, issue_client_token, options_from_url
from durable_ai_ably.testing import AblyEmulator

KEY = "app1.full:s3cret"


def url(emulator: AblyEmulator, **options: str) -> str:
    extra = "".join(f"&{k}={v}" for k, v in options.items())
    return f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false{extra}"


def rest(emulator: AblyEmulator, poll_interval: str = "0.05", **options: str) -> str:
    return url(emulator, transport="rest", poll_interval=poll_interval, **options)


def text_of(events: list[Event], run_id: str | None = None) -> str:
    return "".join(e.delta for e in events if isinstance(e, TextDelta) and (run_id is None or e.run_id == run_id))


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    async with AblyEmulator({KEY: None}) as emu:
        yield emu


async def test_the_rest_transport_never_imports_the_realtime_client(emulator: AblyEmulator) -> None:
    script = f"""
import asyncio, sys
import durable_ai, durable_ai_ably

async def main():
    async with durable_ai.connect({rest(emulator)!r}) as hub:
        assert type(hub.backend) is durable_ai_ably.AblyRestBackend
        session = hub.session("cold")
        async with session.run(agent="fn") as run:
            await run.text("hello")
        events = [e async for e in session.events(follow=False)]
    assert "hello" in [getattr(e, "delta", None) for e in events], events

asyncio.run(main())
loaded = sorted(m for m in sys.modules if m == "ably" or m.startswith("ably."))
assert not loaded, loaded
"""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()


async def test_a_rest_agent_sees_a_cancel_between_flushes(emulator: AblyEmulator) -> None:
    # A serverless agent streams over REST; a browser-side client on a realtime connection presses stop. The
    # agent polls only every 30 s on its own, so the cancel must be picked up right after one of its flushes.
    async with (
        durable_ai.connect(rest(emulator, poll_interval="30")) as agent_hub,
        durable_ai.connect(url(emulator)) as client_hub,
    ):
        client = client_hub.session("s1")

        async def agent() -> durable_ai.Run:
            async with agent_hub.session("s1").run(agent="writer") as run:
                i = 0
                while True:  # an LLM that would stream forever
                    await run.text(f"t{i} ")
                    i += 1
                    await asyncio.sleep(0.005)
            return run

        task = asyncio.create_task(agent())
        try:
            seen = await collect(client.events(), until=lambda e: isinstance(e, TextDelta), seconds=10)
            start = next(e for e in seen if isinstance(e, RunStart))
            handle = await client.cancel(start.run_id, reason="user pressed stop")
            ack = await handle.ack(timeout=10)
            run = await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
        events = await collect(client.events(follow=False))
    assert ack.outcome == "applied"
    assert run.cancelled
    ends = [e for e in events if isinstance(e, RunEnd)]
    assert [(e.status, e.reason) for e in ends] == [("cancelled", "user pressed stop")]


async def test_a_storm_of_429s_and_503s_loses_and_duplicates_nothing(emulator: AblyEmulator) -> None:
    words = [f"w{i} " for i in range(40)]
    async with (
        durable_ai.connect(rest(emulator)) as agent_hub,
        durable_ai.connect(url(emulator)) as client_hub,
    ):
        session = agent_hub.session("s2")
        following = asyncio.create_task(
            collect(client_hub.session("s2").events(), until=lambda e: isinstance(e, RunEnd))
        )
        async with session.run(agent="writer") as run:
            for i, word in enumerate(words):
                if i == 10:
                    emulator.fail_next_rest(503, count=4, path_prefix="/channels/ai:s2/")
                if i == 20:
                    emulator.fail_next_rest(429, count=3, path_prefix="/channels/ai:s2/")
                if i == 30:
                    emulator.fail_next_rest(503, count=3)  # batch publishes, control polls, anything
                await run.text(word)
                await run.flush()  # a publish per word, so the storms meet publishes
        live = await asyncio.wait_for(following, 20)
        stored = await collect(session.events(follow=False))
    assert emulator.pending_rest_failures == 0
    assert text_of(live, run.id) == "".join(words)
    assert [e.id for e in live] == [e.id for e in stored]
    assert len({e.id for e in stored}) == len(stored)
    ids = [m.id for m in emulator.messages("ai:s2")]
    assert len(set(ids)) == len(ids)


async def test_concurrent_publishes_are_stored_once_each_with_their_own_ids(emulator: AblyEmulator) -> None:
    backend = AblyRestBackend(options_from_url(rest(emulator)))
    await backend.open()
    events = Channel("s3", "events")
    try:
        ids = [f"m{i}" for i in range(20)]
        positions = await asyncio.gather(*(backend.publish(events, i.encode(), message_id=i) for i in ids))
        again = await asyncio.gather(*(backend.publish(events, i.encode(), message_id=i) for i in ids))
    finally:
        await backend.close()
    stored = emulator.messages("ai:s3")
    serials = {m.id: m.serial for m in stored}
    assert sorted(serials) == sorted(ids)
    assert len(stored) == len(ids)
    assert [p.position for p in positions] == [serials[i] for i in ids]
    assert again == positions


async def test_a_delete_resets_a_following_reader(emulator: AblyEmulator) -> None:
    backend = AblyRestBackend(options_from_url(rest(emulator, poll_interval="30")))
    await backend.open()
    events = Channel("s4", "events")
    try:
        await backend.publish(events, b"a", message_id="a")
        reader = backend.read(events, start=None, follow=True)
        assert (await anext(reader)).data == b"a"
        pending = asyncio.ensure_future(anext(reader))
        await backend.delete("s4")
        with pytest.raises(LogReset):
            await asyncio.wait_for(pending, 10)
        await reader.aclose()
    finally:
        await backend.close()


async def _members(session: durable_ai.Session, done: Callable[[set[str]], bool]) -> set[str]:
    probe = partial(_member_ids, session)
    return await eventually(probe, done, "presence to settle")


async def _member_ids(session: durable_ai.Session) -> set[str]:
    return {m.member_id for m in await session.presence()}


async def test_presence_crosses_transports(emulator: AblyEmulator) -> None:
    async with (
        durable_ai.connect(rest(emulator)) as rest_hub,
        durable_ai.connect(url(emulator)) as realtime_hub,
    ):
        over_rest, over_realtime = rest_hub.session("s5"), realtime_hub.session("s5")
        async with over_realtime.present("tab-1"), over_rest.run(agent="writer") as run:
            # A run enters presence in the background: it never delays the first token.
            seen_rest = await _members(over_rest, lambda ids: len(ids) == 2)
            seen_realtime = await _members(over_realtime, lambda ids: len(ids) == 2)
        after_realtime = await _members(over_realtime, lambda ids: not ids)
        after_rest = await _members(over_rest, lambda ids: not ids)
    assert seen_realtime == seen_rest == {"tab-1", run.id}
    assert after_realtime == after_rest == set()


async def test_a_rest_reader_follows_and_resumes_a_realtime_writer_that_appends() -> None:
    async with AblyEmulator({KEY: None}, mutable_namespaces={"ai"}) as emulator:
        async with (
            durable_ai.connect(url(emulator, appends="on")) as writer_hub,
            durable_ai.connect(rest(emulator)) as reader_hub,
        ):
            session = writer_hub.session("s6")
            reader = reader_hub.session("s6")
            watching = asyncio.create_task(
                collect(reader.events(), until=lambda e: isinstance(e, RunEnd) and e.agent == "lead")
            )
            async with session.run(agent="lead") as lead:

                async def sub(name: str) -> None:
                    async with session.run(agent=name, parent=lead.id) as run:
                        for i in range(6):
                            await run.text(f"{name}{i} ")
                            await run.flush()
                            await asyncio.sleep(0)  # let the other agents write in between

                await asyncio.gather(sub("a"), sub("b"), sub("c"))
            live = await asyncio.wait_for(watching, 20)
            everything = await collect(reader.events(follow=False))
            ids = [e.id for e in everything]
            assert len(set(ids)) == len(ids)
            assert [e.id for e in live] == ids
            for name in "abc":
                assert "".join(e.delta for e in everything if isinstance(e, TextDelta) and e.agent == name) == "".join(
                    f"{name}{i} " for i in range(6)
                )
            # Appends to older messages interleave with newer ones: resuming from any cursor gives exactly the rest.
            for index, event in enumerate(everything):
                assert event.cursor is not None
                rest_ids = [e.id for e in await collect(reader.events(after=event.cursor, follow=False))]
                assert rest_ids == ids[index + 1 :], f"after event {index}"
        assert any(m.version_serial is not None for m in emulator.messages("ai:s6"))


AGENT_KEY = "app1.agent:Zk3vQ9pX2mL7wR4tY8uI1oP6aS5dF0gHjKlMnBvCxZq"  # HS256 wants a secret of 32 bytes or more


@pytest.mark.parametrize("credential", ["jwt", "token-request"])
async def test_a_rest_client_with_a_client_credential_reads_its_session_and_cannot_write(credential: str) -> None:
    async with AblyEmulator({AGENT_KEY: None}) as emulator:
        agent_url = f"ably://?key={AGENT_KEY}&endpoint={emulator.endpoint}&tls=false"
        async with durable_ai.connect(agent_url) as agent, agent.session("mine").run(agent="writer") as run:
            await run.text("for your eyes")
        plain: dict[str, Any] = {
            "endpoint": emulator.endpoint,
            "tls": False,
            "transport": "rest",
            "publish_timeout": 2.0,
        }
        if credential == "jwt":
            options = AblyOptions(token=issue_client_jwt("mine", "user-7", key=AGENT_KEY), **plain)
        else:

            async def callback(_params: dict[str, object]) -> dict[str, object]:
                return issue_client_token("mine", "user-7", key=AGENT_KEY)

            options = AblyOptions(auth_callback=callback, **plain)
        backend = AblyRestBackend(options)
        async with durable_ai.connect(backend) as client:
            events = await collect(client.session("mine").events(follow=False))
            assert text_of(events) == "for your eyes"
            with pytest.raises(PermissionDenied):
                await backend.publish(Channel("mine", "events"), b'{"forged":true}', message_id="forged")
            with pytest.raises(PermissionDenied):
                await collect(client.session("theirs").events(follow=False))
        assert all(m.id != "forged" for m in emulator.messages("ai:mine"))
