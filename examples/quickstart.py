import asyncio

import durable_ai


async def main() -> None:
    async with durable_ai.connect("memory://") as hub:  # or "nats://...", "ably://..."
        session = hub.session("chat-42")
        tab = session.events()  # a browser tab, following live

        async with session.run(agent="writer") as run:  # the agent writes; no pipe to any client
            for token in ["Durable ", "sessions ", "survive ", "reconnects."]:
                await run.text(token)

        async for event in tab:  # every event carries a cursor to resume from
            print(event.cursor, event.type, getattr(event, "delta", ""))
            if event.type == "run-end":
                break
        print((await session.view()).messages[0].text)  # late join: the whole answer


asyncio.run(main())
