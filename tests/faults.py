"""The fault scenario every backend's fault tests share.

An agent writes a long answer while a client follows it live; something breaks several times in the middle; the
client's reassembled text must equal the agent's, with every event once and the run ending ``completed``. Waits
are on events with timeouts, never on sleeps.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from durable_ai import Event, Hub, RunEnd, Status
from durable_ai.testing.scenarios import text_of

TOKENS = 1500
TIMEOUT = 60.0


def _tokens(tag: str) -> list[str]:
    return [f"{tag}{i} " for i in range(TOKENS)]


async def scenario(
    agent: Hub, client: Hub, fault: Callable[[], Awaitable[None]], *, faults: int = 3
) -> tuple[list[Event], str, list[str]]:
    """An agent writes while a client follows; ``fault`` strikes ``faults`` times, each mid-run.

    Before each fault the client must have seen the answer up to that point (so it is live, not catching up);
    the agent cannot finish before every fault has struck, and goes on writing while the broker is away.
    """
    session = f"fault-{secrets.token_hex(4)}"
    tokens = _tokens("t")
    marks = [TOKENS * (k + 1) // (faults + 1) for k in range(faults)]
    struck = [asyncio.Event() for _ in marks]
    seen: list[Event] = []
    progress: asyncio.Queue[int] = asyncio.Queue()

    async def write() -> str:
        async with agent.session(session).run(agent="writer") as run:
            for i, token in enumerate(tokens, start=1):
                await run.text(token)
                if i % 50 == 0:
                    await run.status(str(i))  # returns once the broker stored it
                for mark, event in zip(marks, struck, strict=True):
                    if i == mark + 25:
                        await event.wait()
        return run.id

    async def follow() -> None:
        async with client.session(session).events() as events:
            async for event in events:
                seen.append(event)
                if isinstance(event, Status) and event.text.isdigit():
                    progress.put_nowait(int(event.text))
                if isinstance(event, RunEnd):
                    return

    async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as group:
        follower = group.create_task(follow())
        writer = group.create_task(write())
        for mark, event in zip(marks, struck, strict=True):
            while await progress.get() < mark:
                pass
            await fault()
            event.set()
        run_id = await writer
        await follower
    return seen, run_id, tokens


def assert_stored_once(records: list[dict[str, Any]], run_id: str, tokens: list[str]) -> None:
    """What the broker stores, read raw (``durable_ai.testing.stored_events``): every event once, the text whole.

    The reader drops copies, so "once" is checked here, below it.
    """
    ids = [r["id"] for r in records]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"the broker stored events twice: {duplicates[:5]}"
    text = "".join(r["delta"] for r in records if r.get("type") == "text-delta" and r.get("run_id") == run_id)
    assert text == "".join(tokens), "the stored text has a gap or a duplicate"


def assert_whole(events: list[Event], run_id: str, tokens: list[str]) -> None:
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), "an event arrived twice"
    assert text_of(events, run_id) == "".join(tokens), "the follower's text has a gap or a duplicate"
    end = events[-1]
    assert isinstance(end, RunEnd) and end.run_id == run_id and end.status == "completed"
