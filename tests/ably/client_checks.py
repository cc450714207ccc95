"""What a client credential may do through the SDK, checked against the emulator (test_auth) and real Ably (test_live).

The agent hub has written one run answering ``the answer of <session>`` to each session the checks use.
"""

from __future__ import annotations

import asyncio

import pytest

from durable_ai import Hub, Run
from durable_ai.backend import Channel
from durable_ai.errors import PermissionDenied
from durable_ai.testing.scenarios import collect, run_end, text_of
from durable_ai_ably import AblyBackend


async def write_answers(agent: Hub, *sessions: str) -> None:
    """What the checks expect in each session: one finished run."""
    for session in sessions:
        async with agent.session(session).run(agent="writer") as run:
            await run.text(f"the answer of {session}")
    await agent.flush()


async def check_client_reads_and_cancels(agent: Hub, client: Hub, session_id: str) -> None:
    """The client reads the session, follows a live run and cancels it; the agent applies the cancel."""
    session = client.session(session_id)
    history = await collect(session.events(follow=False))
    assert text_of(history) == f"the answer of {session_id}"
    view = await session.view()
    assert view.cursor == history[-1].cursor
    stream = session.events(after=history[-1].cursor)

    async def answer() -> Run:
        async with agent.session(session_id).run(agent="writer") as run:
            await run.text("streaming")
            await asyncio.Event().wait()  # until the client's cancel stops it
        return run

    try:
        async with asyncio.timeout(30), asyncio.TaskGroup() as group:
            agent_task = group.create_task(answer())
            first = await anext(stream)
            ack = await (await session.cancel(first.run_id, reason="stop")).ack(timeout=10)
            run = await agent_task
            rest = await collect(stream, until=run_end(run.id))
    finally:
        await stream.aclose()
    assert text_of([first, *rest]) == "streaming"
    assert ack.outcome == "applied"
    assert run.cancelled


async def check_client_cannot_write_events(client: Hub, backend: AblyBackend, session_id: str) -> None:
    """Neither the SDK nor the backend below it can put an event in the session's log."""
    with pytest.raises(PermissionDenied):
        await client.session(session_id).user_message("I am not the agent")
    with pytest.raises(PermissionDenied):
        await backend.publish(Channel(session_id, "events"), b'{"forged":true}', message_id="forged-1")
    with pytest.raises(PermissionDenied):
        await backend.save_snapshot(session_id, b"forged")
    with pytest.raises(PermissionDenied):
        await backend.delete(session_id)
    history = await collect(client.session(session_id).events(follow=False))
    assert text_of(history) == f"the answer of {session_id}", "a forged event reached the log"


async def check_client_cannot_use_another_session(client: Hub, other: str) -> None:
    session = client.session(other)
    with pytest.raises(PermissionDenied):
        await collect(session.events(follow=False))
    with pytest.raises(PermissionDenied):
        await collect(session.events(follow=True))
    with pytest.raises(PermissionDenied):
        await session.view()
    with pytest.raises(PermissionDenied):
        await session.cancel()
