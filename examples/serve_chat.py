"""An agent that serves a session's prompts, and a client that chats, steers and interrupts.

Run it with ``uv run python examples/serve_chat.py``.
"""

import asyncio
from collections.abc import Callable

import durable_ai
from durable_ai import Event, EventStream, Run, RunEnd, TextDelta, UserMessage
from durable_ai.backends.memory import MemoryBackend


async def assistant(run: Run, message: UserMessage) -> None:
    """Answers slowly, and takes guidance sent while it works."""
    await run.status("thinking")
    for i in range(200):
        for steer in run.inbox.drain():
            await run.text(f"[ok: {steer.text}] ")
        await run.text(f"{message.content}:{i} ")
        await asyncio.sleep(0.002)


async def wait_for(events: EventStream, predicate: Callable[[Event], bool]) -> None:
    async for event in events:
        if predicate(event):
            return


async def main() -> None:
    broker = MemoryBackend()
    async with durable_ai.connect(broker) as agents, durable_ai.connect(broker) as clients:
        async with agents.session("support-1").serve(assistant, strategy="steer", client_strategies=["interrupt"]):
            chat = clients.session("support-1")
            async with chat.events() as events:
                print("prompt:   ", (await (await chat.prompt("explain cursors")).ack()).outcome)
                await wait_for(events, lambda e: isinstance(e, TextDelta))  # the answer is streaming

                print("steer:    ", (await (await chat.prompt("shorter please")).ack()).reason)
                await wait_for(events, lambda e: isinstance(e, TextDelta) and "[ok:" in e.delta)

                ack = await (await chat.prompt("actually, explain cancel", strategy="interrupt")).ack()
                print("interrupt:", ack.reason)
                await wait_for(events, lambda e: isinstance(e, RunEnd) and e.status == "completed")
        for message in (await chat.view()).messages:
            text = "".join(getattr(p, "text", "") for p in message.parts)
            print(f"{message.role:>9} ({message.status or 'sent'}): {text[:60]}...")


if __name__ == "__main__":
    asyncio.run(main())
