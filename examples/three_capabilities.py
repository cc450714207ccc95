"""Resilient delivery, continuity across surfaces and live control, with an agent and two clients.

The agent and each client use their own hub on one broker, as separate processes would. Run it with
``uv run python examples/three_capabilities.py``.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

import durable_ai
from durable_ai import Event, Run, RunEnd, TextDelta
from durable_ai.backends.memory import MemoryBackend

T = TypeVar("T")


async def fake_llm(prompt: str) -> AsyncIterator[str]:
    """Stands in for a model: one token at a time, with the pauses a real stream has."""
    for i in range(1000):
        yield f"{prompt}-{i} "
        await asyncio.sleep(0.001)


async def agent(hub: durable_ai.Hub, halfway: asyncio.Event) -> Run:
    async with hub.session("chat-7").run(agent="writer") as run:
        async for i, token in aenumerate(fake_llm("token")):
            await run.text(token)
            if i == 100:
                halfway.set()
    return run


async def aenumerate(items: AsyncIterator[T]) -> AsyncIterator[tuple[int, T]]:
    i = 0
    async for item in items:
        yield i, item
        i += 1


async def main() -> None:
    broker = MemoryBackend()  # swap for "nats://..." or "ably://..." and nothing else changes
    async with (
        durable_ai.connect(broker) as agent_hub,
        durable_ai.connect(broker) as phone_hub,
        durable_ai.connect(broker) as laptop_hub,
    ):
        halfway = asyncio.Event()
        task = asyncio.create_task(agent(agent_hub, halfway))

        # 1. Resilient delivery: the phone reads a little, loses its network, and resumes from its cursor.
        phone = phone_hub.session("chat-7")
        seen: list[Event] = []
        async with phone.events() as stream:
            async for event in stream:
                seen.append(event)
                if len(seen) == 3:
                    break  # the connection drops here
        last_cursor = seen[-1].cursor

        # 2. Continuity across surfaces: the laptop opens the chat mid-answer.
        await halfway.wait()
        laptop = laptop_hub.session("chat-7")
        view = await laptop.view()
        print(f"laptop joined with {len(view.messages[0].text)} characters already written")

        # 3. Live control: the laptop presses stop; the agent stops at its next await.
        ack = await (await laptop.cancel(reason="user pressed stop")).ack()
        print("stop acknowledged:", ack.outcome)
        run = await task
        print("agent cancelled:", run.cancelled)

        # The phone comes back and gets exactly what it missed, up to the end of the run.
        end: RunEnd | None = None
        async with phone.events(after=last_cursor) as stream:
            async for event in stream:
                seen.append(event)
                if isinstance(event, RunEnd):
                    end = event
                    break
        text = "".join(e.delta for e in seen if isinstance(e, TextDelta))
        final = await laptop.view()
        assert end is not None and text == final.messages[0].text, "the phone's text differs from the session's"
        print(f"phone resumed: {len(text)} characters, identical to the session; run ended {end.status}")


if __name__ == "__main__":
    asyncio.run(main())
