"""A broker that goes away mid-run: writers keep their events, readers reconnect, nothing is lost or doubled."""

from __future__ import annotations

import asyncio

import pytest

from durable_ai import BackendUnavailable, Hub, HubClosed, PublishError, Run, RunClosed, RunEnd, TextDelta
from durable_ai.backends.memory import MemoryBackend
from durable_ai.testing import stored_events
from durable_ai.testing.scenarios import collect, ids_unique, text_of
from tests.core.doubles import SignallingBackend


async def test_writer_buffers_while_the_broker_is_gone_and_loses_nothing(backend: MemoryBackend) -> None:
    async with Hub(backend, publish_timeout=0.2) as agent, Hub(backend) as client:
        live = client.session("s").events()
        async with agent.session("s").run(agent="w") as run:
            await run.text("before ")
            await run.flush()
            backend.set_offline(True)
            await run.text("during ")  # buffered: a delta never blocks on the broker
            with pytest.raises(PublishError):
                await run.status("not confirmed yet")
            await run.text("still buffered ")
            backend.set_offline(False)
            await run.flush()
            await run.text("after")
        events = await collect(live, until=lambda e: isinstance(e, RunEnd))
        stored = await stored_events(backend, "s")
    ids_unique(events)
    assert text_of(events) == "before during still buffered after"
    statuses = [r["text"] for r in stored if r["type"] == "status"]
    assert statuses == ["not confirmed yet"]  # stored once, when the broker came back
    assert events[-1].status == "completed"  # type: ignore[union-attr]


async def test_reader_reconnects_after_an_outage_without_gap_or_duplicate() -> None:
    backend = SignallingBackend()
    async with Hub(backend) as agent, Hub(backend) as client:
        live = client.session("s").events()
        async with agent.session("s").run(agent="w") as run:
            await run.text("one ")
            first = await collect(live, count=2)
            live = client.session("s").events(after=first[-1].cursor)
            backend.set_offline(True)
            reader = asyncio.create_task(collect(live, until=lambda e: isinstance(e, RunEnd)))
            await asyncio.wait_for(backend.read_failed.wait(), 5)
            backend.set_offline(False)
            await run.text("two")
        rest = await reader
    assert text_of(first + rest) == "one two"
    ids_unique(first + rest)


async def test_reader_gives_up_after_reconnect_timeout(backend: MemoryBackend) -> None:
    async with Hub(backend, reconnect_timeout=0.2) as client:
        backend.set_offline(True)
        with pytest.raises(BackendUnavailable):
            await collect(client.session("s").events())
        backend.set_offline(False)


async def _run_with_broker_gone(backend: MemoryBackend) -> tuple[Hub, Run]:
    """An open hub and a run that has buffered text the broker, now gone, never received."""
    hub = Hub(backend, close_timeout=0.1, publish_timeout=0.1)
    await hub.open()
    run = hub.session("s").run(agent="w")
    await run.__aenter__()
    backend.set_offline(True)
    await run.text("lost with the process")
    return hub, run


async def test_closing_with_the_broker_gone_does_not_hang(backend: MemoryBackend) -> None:
    hub, run = await _run_with_broker_gone(backend)
    with pytest.raises(PublishError):
        await run.__aexit__(None, None, None)
    await hub.close()
    backend.set_offline(False)
    with pytest.raises(RunClosed):
        await run.text("x")
    with pytest.raises(HubClosed):
        await hub.session("s").run(agent="w").__aenter__()


async def test_a_subscriber_sees_the_hub_close(backend: MemoryBackend) -> None:
    hub = Hub(backend)
    await hub.open()
    stream = hub.session("s").events()
    reader = asyncio.create_task(collect(stream))
    await asyncio.sleep(0)
    await hub.close()
    with pytest.raises(HubClosed):
        await reader


async def test_text_deltas_before_and_after_an_outage_stay_in_order(backend: MemoryBackend) -> None:
    async with Hub(backend, publish_timeout=5) as hub:
        async with hub.session("s").run(agent="w") as run:
            for i in range(100):
                if i == 30:
                    backend.set_offline(True)
                if i == 60:
                    backend.set_offline(False)
                await run.text(f"{i},")
                await asyncio.sleep(0)
        events = await collect(hub.session("s").events(follow=False))
    assert text_of(events) == "".join(f"{i}," for i in range(100))
    assert all(isinstance(e, TextDelta) for e in events[1:-1])


async def test_nothing_restarts_after_the_hub_closed(backend: MemoryBackend) -> None:
    hub, run = await _run_with_broker_gone(backend)
    await hub.close()
    with pytest.raises(HubClosed):
        await run.flush()  # must not start a new flush task that nobody owns
    backend.set_offline(False)
