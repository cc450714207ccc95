"""The multi-agent pattern: an orchestrator delegates to three LangChain sub-agents, each in a run of its own.

Every sub-agent opens its own ``session.run(agent=..., parent=orchestrator)`` and attaches its own handler, so it
writes straight to the session: a client sees all four agents live with no relay code, and the orchestrator only
awaits their results. A client can stop one sub-agent (the others go on) or every run at once.

The models are scripted (``FakeToolCallingChatModel``), so it runs offline. The agents and the client use hubs of
their own, as separate processes would. Run it with ``uv run python examples/multi_agent.py``, or on a broker:
``uv run python examples/multi_agent.py nats://127.0.0.1:4222``.
"""

import asyncio
import sys
from dataclasses import dataclass

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool

import durable_ai
from durable_ai import Hub, Run, RunEnd, RunStart, Session, TextDelta
from durable_ai.backends.memory import MemoryBackend
from durable_ai.integrations.langchain import FakeToolCallingChatModel

TOPICS = {"tides": 40, "winds": 60, "currents": 400}  # how many words each researcher writes


def notes(topic: str) -> str:
    """What the researcher of ``topic`` writes (its scripted model's answer)."""
    words = " ".join(f"{topic}-fact-{i}" for i in range(TOPICS[topic]))
    return f"Notes on {topic}: {words}."


@tool
async def search(query: str) -> str:
    """Search the archive."""
    return f"3 sources about {query}"


async def research(session: Session, parent: Run, topic: str) -> str | None:
    """One sub-agent: a run of its own, child of the orchestrator's, with its own handler. ``None`` if stopped."""
    model = FakeToolCallingChatModel(
        responses=[
            AIMessage("", tool_calls=[{"name": "search", "args": {"query": topic}, "id": f"call-{topic}"}]),
            notes(topic),
        ],
        sleep=0.002,  # a model producing tokens
    )
    agent = create_agent(model, tools=[search], name=f"researcher-{topic}")
    async with session.run(agent=f"researcher-{topic}", parent=parent) as run:
        state = await agent.ainvoke(
            {"messages": [HumanMessage(f"Research {topic}")]}, config={"callbacks": [run.langchain()]}
        )
        return str(state["messages"][-1].text)
    return None  # a client stopped this sub-agent: its block ended without an exception


async def orchestrate(session: Session) -> Run:
    """Starts the three sub-agents and only awaits their results; then writes its summary."""
    async with session.run(agent="orchestrator") as run:
        await run.status("delegating to three researchers")
        results = await asyncio.gather(*(research(session, run, topic) for topic in TOPICS))
        finished = [topic for topic, result in zip(TOPICS, results, strict=True) if result is not None]
        writer = FakeToolCallingChatModel(responses=[f"Summary: {len(finished)} reports ({', '.join(finished)})."])
        await writer.ainvoke("Summarise the reports.", config={"callbacks": [run.langchain()]})
    return run


@dataclass
class Seen:
    """What the client saw of one agent's run."""

    agent: str
    parent_run_id: str | None
    text: str = ""
    status: str = "streaming"


async def watch(session: Session, after: str | None, stop: str | None) -> dict[str, Seen]:
    """Follow every agent live, from cursor ``after``, until the orchestrator's run ends. ``stop``: a topic whose
    researcher is stopped once it streams, or ``"all"`` to stop every run then."""
    seen: dict[str, Seen] = {}
    stopped = False
    async with session.events(after=after) as stream:
        async for event in stream:
            run_id = event.run_id or ""
            if isinstance(event, RunStart):
                seen[run_id] = Seen(event.agent or "", event.parent_run_id)
            elif isinstance(event, TextDelta) and run_id in seen:
                seen[run_id].text += event.delta
                agent = seen[run_id].agent
                if not stopped and stop == "all" and agent.startswith("researcher-"):
                    stopped = True
                    await session.cancel(reason="user pressed stop")
                elif not stopped and agent == f"researcher-{stop}":
                    stopped = True
                    await session.cancel(run_id, reason="not needed")
            elif isinstance(event, RunEnd) and run_id in seen:
                seen[run_id].status = event.status
                if seen[run_id].agent == "orchestrator":
                    return seen
    return seen


async def team(agents: Hub, clients: Hub, session_id: str, stop: str | None) -> tuple[Run, dict[str, Seen]]:
    """One round: the orchestrator and its sub-agents on ``agents``, a client watching on ``clients``."""
    client = clients.session(session_id)
    watching = asyncio.create_task(watch(client, await client.head(), stop))  # from now on: it misses nothing
    orchestrator = await orchestrate(agents.session(session_id))
    return orchestrator, await watching


def report(seen: dict[str, Seen]) -> None:
    for item in sorted(seen.values(), key=lambda s: s.agent):
        print(f"  {item.agent:<20} {item.status:<10} {len(item.text):>5} characters: {item.text[:40]}")


async def main(url: str | None = None) -> None:
    broker = url or MemoryBackend()  # a URL names a broker both hubs reach; the memory backend is shared in-process
    async with durable_ai.connect(broker) as agents, durable_ai.connect(broker) as clients:
        print("round 1: the client stops the currents researcher")
        _, seen = await team(agents, clients, "team-1", stop="currents")
        report(seen)
        print("round 2: the client stops everything")
        _, seen = await team(agents, clients, "team-2", stop="all")
        report(seen)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
