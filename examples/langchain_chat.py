"""A LangChain agent answering a durable chat: one line attaches it, a client steers it and stops it.

The agent is a ``create_agent`` agent with a tool, a checkpointer for its memory and the steering middleware; each
prompt the session gets is answered by a run, with ``config={"callbacks": [run.langchain()]}``. The client, on a
hub of its own as another process would be, asks three questions: it watches the first answer (a tool call, then
text), steers the second ("actually, use TypeScript") while it streams, and stops the third.

The model is scripted (``FakeToolCallingChatModel``), so it runs offline: ``uv run python examples/langchain_chat.py``.
"""

import asyncio
from collections.abc import Sequence

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

import durable_ai
from durable_ai import ControlHandle, Run, RunEnd, Session, TextDelta, TextPart, ToolCall, ToolResult, UserMessage
from durable_ai.backends.memory import MemoryBackend
from durable_ai.integrations.langchain import FakeToolCallingChatModel, SteeringMiddleware

LONG = " ".join(f"step-{i}" for i in range(300))


@tool
async def search(query: str) -> str:
    """Search the web."""
    return f"3 articles about {query}"


def reply(messages: Sequence[BaseMessage]) -> AIMessage | str:
    """The scripted model: it answers the latest user message, and follows a steer that came after it."""
    asked = [m.text for m in messages if isinstance(m, HumanMessage)]
    if "use TypeScript" in asked[-1]:
        return "In TypeScript: console.log('hello world');"
    if "language" in asked[-1]:
        if isinstance(messages[-1], ToolMessage):
            return "Both Python and TypeScript suit a small CLI; Python is quicker to start with."
        return AIMessage("", tool_calls=[{"name": "search", "args": {"query": "CLI languages"}, "id": None}])
    if "hello world" in asked[-1]:
        return f"In Python, print('hello world') does it; here is the long way round: {LONG}"
    return f"Everything, in detail: {LONG}"


model = FakeToolCallingChatModel(respond=reply, sleep=0.002)
agent = create_agent(model, tools=[search], middleware=[SteeringMiddleware()], checkpointer=InMemorySaver())


async def answer(run: Run, message: UserMessage) -> None:
    """The agent function the session is served with: one run per prompt."""
    await agent.ainvoke(
        {"messages": [HumanMessage(message.content, id=message.message_id)]},
        config={"callbacks": [run.langchain()], "configurable": {"thread_id": run.session_id}},
    )


async def ask(chat: Session, question: str, *, steer: str | None = None, stop: bool = False) -> None:
    """Ask, print the answer as a client renders it; steer or stop it once its text streams."""
    print(f"you: {question}")
    async with chat.events(after=await chat.head()) as stream:
        await chat.prompt(question)
        control: ControlHandle | None = None
        async for event in stream:
            if isinstance(event, ToolCall):
                print(f"  tool call {event.name}({event.input})")
            elif isinstance(event, ToolResult):
                print(f"  tool result: {event.output}")
            elif isinstance(event, TextDelta) and control is None and (steer or stop):
                control = await (chat.steer(steer, run_id=event.run_id) if steer else chat.cancel(event.run_id))
                print(f"  {'steer' if steer else 'stop'}: {(await control.ack()).outcome}")
            elif isinstance(event, RunEnd):
                message = next(m for m in (await chat.view()).messages if m.run_id == event.run_id)
                parts = [_short(part.text) for part in message.parts if isinstance(part, TextPart)]
                print(f"assistant ({message.status}): {' | '.join(parts)}")  # a steered answer has two parts
                return


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


async def main() -> None:
    broker = MemoryBackend()  # swap for "nats://..." and nothing else changes
    async with (
        durable_ai.connect(broker) as agents,
        durable_ai.connect(broker) as clients,
        agents.session("chat-1").serve(answer),
    ):
        chat = clients.session("chat-1")
        await ask(chat, "Which language should I use for a small CLI?")
        await ask(chat, "Show me hello world.", steer="actually, use TypeScript")
        await ask(chat, "Now explain everything.", stop=True)


if __name__ == "__main__":
    asyncio.run(main())
