"""LangChain and LangGraph, offline: what a client of the session sees when an agent runs with ``run.langchain()``.

Models are langchain-core's fakes (``GenericFakeChatModel``, ``FakeListChatModel``) and our
``FakeToolCallingChatModel``. The hubs write every event as its own broker message (``Coalesce.off()``), so the
deltas a client receives are the model's chunks, one for one: streaming shows as many deltas, not one at the end.
Waits are on events with timeouts; the models' ``sleep`` only paces their chunks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import secrets
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler, adispatch_custom_event
from langchain_core.language_models.fake_chat_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import ToolException, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.config import get_stream_writer
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.types import Command, interrupt

import durable_ai
from durable_ai import (
    Coalesce,
    ErrorEvent,
    Event,
    Hub,
    ReasoningDelta,
    Run,
    RunClosed,
    RunEnd,
    RunStart,
    Session,
    TextDelta,
    ToolCall,
    ToolResult,
)
from durable_ai.backends.memory import MemoryBackend
from durable_ai.events import ControlAck, Data, Status
from durable_ai.integrations.langchain import (
    DeliveryError,
    DurableCallbackHandler,
    FakeToolCallingChatModel,
    SteeringMiddleware,
    StepSteeringMiddleware,
    steerable,
)
from durable_ai.testing.scenarios import text_of, written_events
from durable_ai_nats.testing import NatsServer

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0
ANSWER = "Durable sessions outlive the connection, the tab and the device."
LONG = " ".join(f"word{i}" for i in range(400))


@pytest.fixture
async def agents(backend: MemoryBackend) -> AsyncIterator[Hub]:
    """The agent side: every event its own broker message, so deltas are the model's chunks."""
    async with durable_ai.connect(backend, coalesce=Coalesce.off()) as hub:
        yield hub


@pytest.fixture
async def clients(backend: MemoryBackend) -> AsyncIterator[Hub]:
    """A client in another process, on the same broker."""
    async with durable_ai.connect(backend) as hub:
        yield hub


async def stored(hub: Hub, session_id: str) -> list[Event]:
    """The session's log as written, one event per delta (a later catch-up read may merge them)."""
    return await written_events(hub, session_id)


async def in_run(hub: Hub, work: Callable[[Run], Awaitable[object]], *, session_id: str = "chat") -> Run:
    async with hub.session(session_id).run(agent="assistant") as run:
        await work(run)
    return run


def deltas(events: Sequence[Event], kind: type[TextDelta] | type[ReasoningDelta] = TextDelta) -> list[str]:
    return [e.delta for e in events if isinstance(e, kind)]


def tokens(text: str) -> list[str]:
    """How GenericFakeChatModel streams ``text``: words and the whitespace between them."""
    import re

    return [token for token in re.split(r"(\s)", text) if token]


class Counter(BaseCallbackHandler):
    """Counts the chunks a model produced (whoever else listens)."""

    run_inline = True

    def __init__(self) -> None:
        self.chunks = 0

    def on_llm_new_token(
        self, token: str, *, chunk: GenerationChunk | ChatGenerationChunk | None = None, **_: Any
    ) -> None:
        if token:
            self.chunks += 1


# -- streaming: ainvoke, astream and LangGraph nodes ---------------------------------------------------------


async def test_ainvoke_streams_token_by_token(agents: Hub, clients: Hub) -> None:
    """A plain ``ainvoke`` streams: the handler is one of LangChain's streaming handlers."""
    model = GenericFakeChatModel(messages=iter([ANSWER]))
    run = await in_run(agents, lambda run: model.ainvoke("hi", config={"callbacks": [run.langchain()]}))
    events = await stored(clients, "chat")
    assert deltas(events) == tokens(ANSWER)
    assert text_of(events, run.id) == ANSWER
    assert isinstance(events[-1], RunEnd) and events[-1].status == "completed"


async def test_astream_streams_and_yields_the_same_chunks(agents: Hub, clients: Hub) -> None:
    model = GenericFakeChatModel(messages=iter([ANSWER]))
    seen: list[str] = []

    async def work(run: Run) -> None:
        async for chunk in model.astream("hi", config={"callbacks": [run.langchain()]}):
            seen.append(chunk.text)

    run = await in_run(agents, work)
    events = await stored(clients, "chat")
    assert "".join(seen) == ANSWER
    assert deltas(events) == tokens(ANSWER)
    assert text_of(events, run.id) == ANSWER


async def test_a_langgraph_node_streams(agents: Hub, clients: Hub) -> None:
    """A node that calls ``ainvoke`` (no config passed on: LangGraph hands it down) streams its tokens."""
    model = GenericFakeChatModel(messages=iter([ANSWER]))

    async def respond(state: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState).add_node("respond", respond).add_edge(START, "respond").compile()
    result: dict[str, Any] = {}

    async def work(run: Run) -> None:
        result.update(await graph.ainvoke({"messages": [HumanMessage("hi")]}, config={"callbacks": [run.langchain()]}))

    run = await in_run(agents, work)
    events = await stored(clients, "chat")
    assert result["messages"][-1].text == ANSWER
    assert deltas(events) == tokens(ANSWER)
    assert text_of(events, run.id) == ANSWER


async def test_each_model_call_is_a_part_of_its_own(agents: Hub, clients: Hub) -> None:
    model = FakeListChatModel(responses=["first answer", "second answer"])

    async def work(run: Run) -> None:
        handler = run.langchain()
        await model.ainvoke("one", config={"callbacks": [handler]})
        await model.ainvoke("two", config={"callbacks": [handler]})

    await in_run(agents, work)
    view = await clients.session("chat").view()
    assert [part.text for part in view.messages[-1].parts] == ["first answer", "second answer"]  # type: ignore[union-attr]


async def test_a_model_that_does_not_stream_is_written_whole(agents: Hub, clients: Hub) -> None:
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel

    model = FakeMessagesListChatModel(responses=[AIMessage(ANSWER)])
    await in_run(agents, lambda run: model.ainvoke("hi", config={"callbacks": [run.langchain()]}))
    assert deltas(await stored(clients, "chat")) == [ANSWER]


# -- reasoning and tools -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            AIMessage([{"type": "reasoning", "reasoning": "The user wants tides."}, {"type": "text", "text": ANSWER}]),
            id="standard-reasoning-block",
        ),
        pytest.param(
            AIMessage([{"type": "thinking", "thinking": "The user wants tides."}, {"type": "text", "text": ANSWER}]),
            id="anthropic-thinking",
        ),
        pytest.param(AIMessage(ANSWER, additional_kwargs={"reasoning_content": "The user wants tides."}), id="kwargs"),
    ],
)
async def test_reasoning_arrives_as_reasoning(agents: Hub, clients: Hub, reply: AIMessage) -> None:
    model = FakeToolCallingChatModel(responses=[reply])
    run = await in_run(agents, lambda run: model.ainvoke("hi", config={"callbacks": [run.langchain()]}))
    events = await stored(clients, "chat")
    assert "".join(deltas(events, ReasoningDelta)) == "The user wants tides."
    assert len(deltas(events, ReasoningDelta)) > 1  # streamed
    assert text_of(events, run.id) == ANSWER
    view = await clients.session("chat").view()
    assert sorted(part.type for part in view.messages[-1].parts) == ["reasoning", "text"]


@tool
async def search(query: str) -> str:
    """Search the archive."""
    return f"3 hits for {query}"


@tool
def lookup(query: str) -> str:
    """A sync tool: LangChain runs it in a worker thread, with sync callbacks."""
    return f"entry for {query}"


@tool
def broken(query: str) -> str:
    """A tool that fails."""
    raise ToolException(f"no archive for {query}")


broken.handle_tool_error = True


async def test_tool_calls_arrive_typed_with_their_ids(agents: Hub, clients: Hub) -> None:
    model = FakeToolCallingChatModel(
        responses=[
            AIMessage(
                "Let me look.",
                tool_calls=[
                    {"name": "search", "args": {"query": "tides"}, "id": "call_search"},
                    {"name": "lookup", "args": {"query": "moon"}, "id": "call_lookup"},
                    {"name": "broken", "args": {"query": "sun"}, "id": "call_broken"},
                ],
            ),
            "The tides follow the moon.",
        ]
    )
    agent = create_agent(model, tools=[search, lookup, broken])
    run = await in_run(
        agents,
        lambda run: agent.ainvoke({"messages": [HumanMessage("tides?")]}, config={"callbacks": [run.langchain()]}),
    )
    events = await stored(clients, "chat")
    calls = {e.call_id: e for e in events if isinstance(e, ToolCall)}
    results = {e.call_id: e for e in events if isinstance(e, ToolResult)}
    assert {cid: (c.name, c.input) for cid, c in calls.items()} == {
        "call_search": ("search", {"query": "tides"}),
        "call_lookup": ("lookup", {"query": "moon"}),
        "call_broken": ("broken", {"query": "sun"}),
    }
    assert (results["call_search"].output, results["call_search"].error) == ("3 hits for tides", None)
    assert results["call_lookup"].output == "entry for moon"
    assert results["call_broken"].error == "no archive for sun"
    for call_id in calls:  # each result after its call
        assert events.index(calls[call_id]) < events.index(results[call_id])
    assert text_of(events, run.id) == "Let me look.The tides follow the moon."
    view = await clients.session("chat").view()
    states = {part.call_id: part.state for part in view.messages[-1].parts if part.type == "tool"}  # type: ignore[union-attr]
    assert states == {"call_search": "completed", "call_lookup": "completed", "call_broken": "failed"}


async def test_a_tool_that_raises_is_a_failed_tool_call(agents: Hub, clients: Hub) -> None:
    @tool
    async def exploding(query: str) -> str:
        """A tool that raises."""
        raise RuntimeError(f"the archive of {query} is on fire")

    async def work(run: Run) -> None:
        with pytest.raises(RuntimeError):
            await exploding.ainvoke({"query": "tides"}, config={"callbacks": [run.langchain()]})

    run = await in_run(agents, work)
    events = await stored(clients, "chat")
    [call] = [e for e in events if isinstance(e, ToolCall)]
    [result] = [e for e in events if isinstance(e, ToolResult)]
    assert (call.name, call.input) == ("exploding", {"query": "tides"})
    assert (result.call_id, result.error) == (call.call_id, "RuntimeError: the archive of tides is on fire")
    assert not [e for e in events if isinstance(e, ErrorEvent)]  # shown on the tool, not twice
    assert isinstance(events[-1], RunEnd) and events[-1].status == "completed" and run.id == events[-1].run_id


async def test_custom_events_are_data(agents: Hub, clients: Hub) -> None:
    async def step(text: str) -> str:
        await adispatch_custom_event("citation", {"url": "https://example.org/tides"})
        return text

    chain = RunnableLambda(step)
    await in_run(agents, lambda run: chain.ainvoke("x", config={"callbacks": [run.langchain()]}))
    data = [e for e in await stored(clients, "chat") if isinstance(e, Data)]
    assert [(d.name, d.value) for d in data] == [("citation", {"url": "https://example.org/tides"})]


# -- errors --------------------------------------------------------------------------------------------------


class Failing(FakeToolCallingChatModel):
    """A model whose every call fails."""

    async def _astream(self, *args: Any, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        raise ConnectionError("the provider is down")
        yield  # pragma: no cover


async def test_a_handled_error_is_shown_and_the_run_goes_on(agents: Hub, clients: Hub) -> None:
    model = Failing(responses=["never"]).with_fallbacks([FakeListChatModel(responses=[ANSWER])])
    run = await in_run(agents, lambda run: model.ainvoke("hi", config={"callbacks": [run.langchain()]}))
    events = await stored(clients, "chat")
    assert [e.message for e in events if isinstance(e, ErrorEvent)] == ["ConnectionError: the provider is down"]
    assert text_of(events, run.id) == ANSWER
    assert isinstance(events[-1], RunEnd) and events[-1].status == "completed"


async def test_an_error_that_ends_the_run_is_reported_once(agents: Hub, clients: Hub) -> None:
    agent = create_agent(Failing(responses=["never"]), tools=[search])
    with pytest.raises(ConnectionError):
        await in_run(
            agents,
            lambda run: agent.ainvoke({"messages": [HumanMessage("hi")]}, config={"callbacks": [run.langchain()]}),
        )
    events = await stored(clients, "chat")
    assert [e.message for e in events if isinstance(e, ErrorEvent)] == ["ConnectionError: the provider is down"]
    assert isinstance(events[-1], RunEnd) and events[-1].status == "failed"


async def test_a_langgraph_interrupt_is_not_an_error(agents: Hub, clients: Hub) -> None:
    def approve(state: MessagesState) -> dict[str, list[BaseMessage]]:
        answer = interrupt("approve the plan?")
        return {"messages": [AIMessage(str(answer))]}

    graph = (StateGraph(MessagesState).add_node("approve", approve).add_edge(START, "approve")).compile(
        checkpointer=InMemorySaver()
    )
    config: Any = {"configurable": {"thread_id": "t1"}}
    result: dict[str, Any] = {}

    async def work(run: Run) -> None:
        result.update(await graph.ainvoke({"messages": []}, config={**config, "callbacks": [run.langchain()]}))

    await in_run(agents, work)
    events = await stored(clients, "chat")
    assert "__interrupt__" in result
    assert not [e for e in events if isinstance(e, ErrorEvent)]
    assert isinstance(events[-1], RunEnd) and events[-1].status == "completed"


async def test_a_langgraph_parent_command_is_not_an_error(agents: Hub, clients: Hub) -> None:
    """A subgraph node hands over to its parent graph with ``Command(graph=Command.PARENT)``: LangGraph raises
    it through the subgraph's runs, and none of that is an error."""

    def hand_over(state: MessagesState) -> Command[str]:
        return Command(graph=Command.PARENT, goto="finish", update={"messages": [AIMessage("over to you")]})

    inner = StateGraph(MessagesState).add_node("hand_over", hand_over).add_edge(START, "hand_over").compile()
    graph = (
        StateGraph(MessagesState)
        .add_node("inner", inner)
        .add_node("finish", lambda state: {"messages": [AIMessage("done")]})
        .add_edge(START, "inner")
        .compile()
    )
    await in_run(agents, lambda run: graph.ainvoke({"messages": []}, config={"callbacks": [run.langchain()]}))
    events = await stored(clients, "chat")
    assert not [e for e in events if isinstance(e, ErrorEvent)]
    assert isinstance(events[-1], RunEnd) and events[-1].status == "completed"


# -- cancel --------------------------------------------------------------------------------------------------


async def watch_and(
    session: Session, act: Callable[[TextDelta], Awaitable[None]], *, after_deltas: int = 3
) -> list[Event]:
    """Follow the session to the first run-end, acting once ``after_deltas`` text deltas arrived."""
    seen = 0
    acted = False
    events: list[Event] = []
    async with asyncio.timeout(TIMEOUT), session.events() as stream:
        async for event in stream:
            events.append(event)
            if isinstance(event, TextDelta):
                seen += 1
                if seen == after_deltas and not acted:
                    acted = True
                    await act(event)
            elif isinstance(event, RunEnd):
                break
    return events


async def test_a_cancel_from_another_client_stops_the_model_within_a_few_chunks(agents: Hub, clients: Hub) -> None:
    model = FakeListChatModel(responses=[LONG], sleep=0.001)
    counter = Counter()
    client = clients.session("chat")

    async def stop(delta: TextDelta) -> None:
        await (await client.cancel(delta.run_id, reason="user pressed stop")).ack()

    watching = asyncio.create_task(watch_and(client, stop))
    run = await in_run(agents, lambda run: model.ainvoke("go", config={"callbacks": [run.langchain(), counter]}))
    events = await watching
    end = events[-1]
    assert isinstance(end, RunEnd) and (end.status, end.reason) == ("cancelled", "user pressed stop")
    assert run.cancelled
    text = text_of(events, run.id)
    assert text and LONG.startswith(text) and len(text) < len(LONG)  # the partial answer is kept
    assert (await client.view()).messages[-1].text == text
    ack = next(e for e in events if isinstance(e, ControlAck))
    after_ack = [e for e in events[events.index(ack) :] if isinstance(e, TextDelta)]
    assert len(after_ack) <= 3, f"{len(after_ack)} chunks were written after the cancel was applied"
    assert counter.chunks <= len(deltas(events)) + 1, "the model went on after the run was cancelled"


async def test_callbacks_after_the_end_are_dropped_quietly(agents: Hub, clients: Hub) -> None:
    handlers: list[DurableCallbackHandler] = []

    async def work(run: Run) -> None:
        handlers.append(run.langchain())

    await in_run(agents, work)
    model = FakeListChatModel(responses=["too late"])
    assert (await model.ainvoke("hi", config={"callbacks": handlers})).text == "too late"
    assert not deltas(await stored(clients, "chat"))


async def test_a_handler_of_a_run_never_entered_says_so(agents: Hub) -> None:
    run = agents.session("chat").run(agent="assistant")
    model = FakeListChatModel(responses=["x"])
    with pytest.raises(RunClosed, match="never entered"):
        await model.ainvoke("hi", config={"callbacks": [run.langchain()]})


# -- sync code -----------------------------------------------------------------------------------------------


async def test_invoke_in_a_worker_thread_streams(agents: Hub, clients: Hub) -> None:
    model = GenericFakeChatModel(messages=iter([ANSWER]))

    async def work(run: Run) -> None:
        message = await asyncio.to_thread(model.invoke, "hi", config={"callbacks": [run.langchain()]})
        assert message.text == ANSWER

    run = await in_run(agents, work)
    events = await stored(clients, "chat")
    assert deltas(events) == tokens(ANSWER)
    assert text_of(events, run.id) == ANSWER


async def test_stream_in_a_worker_thread_streams(agents: Hub, clients: Hub) -> None:
    model = FakeListChatModel(responses=[ANSWER])

    def stream(config: Any) -> str:
        return "".join(chunk.text for chunk in model.stream("hi", config=config))

    async def work(run: Run) -> None:
        assert await asyncio.to_thread(stream, {"callbacks": [run.langchain()]}) == ANSWER

    run = await in_run(agents, work)
    events = await stored(clients, "chat")
    assert deltas(events) == list(ANSWER)
    assert text_of(events, run.id) == ANSWER


async def test_another_event_loop_streams(agents: Hub, clients: Hub) -> None:
    """``ainvoke`` on an event loop of its own, in another thread."""
    model = GenericFakeChatModel(messages=iter([ANSWER]))

    async def work(run: Run) -> None:
        handler = run.langchain()
        message = await asyncio.to_thread(asyncio.run, model.ainvoke("hi", config={"callbacks": [handler]}))
        assert message.text == ANSWER

    run = await in_run(agents, work)
    assert text_of(await stored(clients, "chat"), run.id) == ANSWER


async def test_sync_tools_in_an_async_agent_are_recorded(agents: Hub, clients: Hub) -> None:
    """LangChain runs a sync tool in a worker thread and calls the handler from there."""
    model = FakeToolCallingChatModel(
        responses=[AIMessage("", tool_calls=[{"name": "lookup", "args": {"query": "moon"}, "id": "c1"}]), "ok"]
    )
    agent = create_agent(model, tools=[lookup])
    await in_run(
        agents, lambda run: agent.ainvoke({"messages": [HumanMessage("x")]}, config={"callbacks": [run.langchain()]})
    )
    events = await stored(clients, "chat")
    assert [(e.call_id, e.output) for e in events if isinstance(e, ToolResult)] == [("c1", "entry for moon")]


async def test_a_cancel_stops_a_model_streaming_in_a_worker_thread(
    agents: Hub, clients: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    model = FakeListChatModel(responses=[LONG], sleep=0.001)
    counter = Counter()
    client = clients.session("chat")
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    thread: list[concurrent.futures.Future[str]] = []

    def stream(config: Any) -> str:
        return "".join(chunk.text for chunk in model.stream("go", config=config))

    async def work(run: Run) -> None:
        future = executor.submit(stream, {"callbacks": [run.langchain(), counter]})
        thread.append(future)
        await asyncio.wrap_future(future)

    async def stop(delta: TextDelta) -> None:
        await (await client.cancel(delta.run_id, reason="user pressed stop")).ack()

    try:
        watching = asyncio.create_task(watch_and(client, stop))
        run = await in_run(agents, work)
        events = await watching
        with pytest.raises(RunClosed, match="has ended"):  # the next chunk stopped the call in the thread
            await asyncio.wait_for(asyncio.wrap_future(thread[0]), TIMEOUT)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    assert run.cancelled
    end = events[-1]
    assert isinstance(end, RunEnd) and end.status == "cancelled"
    written = deltas(await stored(clients, "chat"))
    assert written and counter.chunks <= len(written) + 2, "the model in the thread went on after the cancel"
    assert LONG.startswith("".join(written))
    # The stop is quiet: LangChain logs no callback error for it.
    assert not [r.getMessage() for r in caplog.records if "callback" in r.getMessage()]


async def test_a_write_that_cannot_be_delivered_fails_fast(agents: Hub) -> None:
    """The run's event loop is blocked by sync code waiting for the thread that writes: an error says so."""
    model = FakeListChatModel(responses=[ANSWER])
    failure: list[BaseException] = []

    def invoke(handler: DurableCallbackHandler) -> None:
        try:
            model.invoke("hi", config={"callbacks": [handler]})
        except BaseException as exc:
            failure.append(exc)

    async def work(run: Run) -> None:
        thread = threading.Thread(target=invoke, args=(run.langchain(handoff_timeout=0.2),))
        thread.start()
        thread.join(TIMEOUT)  # sync code on the loop's thread, waiting for the worker: the loop is blocked

    await in_run(agents, work)
    assert len(failure) == 1 and isinstance(failure[0], DeliveryError)
    assert "did not take the write within 0.2s: it is blocked" in str(failure[0])


def test_a_write_to_a_stopped_loop_fails_at_once() -> None:
    """The run's loop is not running (a worker that stopped it): nothing hangs, the error names the loop."""
    loop = asyncio.new_event_loop()
    try:
        hub = durable_ai.connect("memory://")
        run = hub.session("chat").run(agent="assistant")

        async def enter() -> DurableCallbackHandler:
            await hub.open()
            await run.__aenter__()
            return run.langchain()

        handler = loop.run_until_complete(enter())
        model = FakeListChatModel(responses=["x"])
        with pytest.raises(DeliveryError, match="event loop is not running"):
            model.invoke("hi", config={"callbacks": [handler]})
        loop.run_until_complete(run.__aexit__(None, None, None))
        loop.run_until_complete(hub.close())
    finally:
        loop.close()


async def test_sync_invoke_on_the_run_loop_is_written_when_it_returns(
    agents: Hub, clients: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    """A blocking ``.invoke()`` inside async code: nothing is lost, and a warning says what to do instead."""
    model = GenericFakeChatModel(messages=iter([ANSWER]))
    client = clients.session("chat")
    text = ""

    async def work(run: Run) -> None:
        nonlocal text
        assert model.invoke("hi", config={"callbacks": [run.langchain()]}).text == ANSWER
        async with client.events() as stream:  # the writes come once the loop is free again
            async for event in stream:
                if isinstance(event, TextDelta):
                    text += event.delta
                    if text == ANSWER:
                        return

    async with asyncio.timeout(TIMEOUT):
        await in_run(agents, work)
    assert text == ANSWER
    assert "LangChain was called synchronously on the event loop" in caplog.text


# -- steering ------------------------------------------------------------------------------------------------


def coder(messages: Sequence[BaseMessage]) -> str:
    """A model that writes Python, unless the conversation asks for TypeScript."""
    if any("TypeScript" in m.text for m in messages if isinstance(m, HumanMessage)):
        return "In TypeScript: console.log('hi');"
    return f"In Python: print('hi') and then {LONG}"


async def test_a_steer_interrupts_the_model_and_changes_the_rest_of_the_answer(agents: Hub, clients: Hub) -> None:
    model = FakeToolCallingChatModel(respond=coder, sleep=0.001)
    agent = create_agent(model, tools=[search], middleware=[SteeringMiddleware()])
    client = clients.session("chat")
    acks: list[str] = []
    result: dict[str, Any] = {}

    async def steer(delta: TextDelta) -> None:
        acks.append((await (await client.steer("actually, use TypeScript", run_id=delta.run_id)).ack()).outcome)

    async def work(run: Run) -> None:
        result.update(
            await agent.ainvoke({"messages": [HumanMessage("hello world?")]}, config={"callbacks": [run.langchain()]})
        )

    watching = asyncio.create_task(watch_and(client, steer))
    run = await in_run(agents, work)
    events = await watching
    assert acks == ["applied"]
    text = text_of(events, run.id)
    assert text.endswith("In TypeScript: console.log('hi');")
    assert "word399" not in text  # the Python answer was cut short
    messages = result["messages"]
    assert [type(m).__name__ for m in messages] == ["HumanMessage", "HumanMessage", "AIMessage"]
    assert messages[1].text == "actually, use TypeScript" and messages[2].text == "In TypeScript: console.log('hi');"


async def test_steers_between_steps_change_the_next_model_call(agents: Hub, clients: Hub) -> None:
    """A steer sent while a tool runs reaches the model at its next call; no call is interrupted."""
    steered = asyncio.Event()

    @tool
    async def slow_search(query: str) -> str:
        """A search that takes until the user has steered."""
        await steered.wait()
        return "results"

    def reply(messages: Sequence[BaseMessage]) -> AIMessage | str:
        if not isinstance(messages[-1], ToolMessage) and len(messages) == 1:
            return AIMessage("Searching.", tool_calls=[{"name": "slow_search", "args": {"query": "x"}, "id": "s1"}])
        return coder(messages)

    model = FakeToolCallingChatModel(respond=reply)
    agent = create_agent(model, tools=[slow_search], middleware=[StepSteeringMiddleware()])
    client = clients.session("chat")

    async def steer_during_the_tool() -> None:
        async with client.events() as stream:
            async for event in stream:
                if isinstance(event, ToolCall):
                    await (await client.steer("use TypeScript", run_id=event.run_id)).ack()
                    steered.set()
                    return

    steering = asyncio.create_task(steer_during_the_tool())
    run = await in_run(
        agents,
        lambda run: agent.ainvoke({"messages": [HumanMessage("code?")]}, config={"callbacks": [run.langchain()]}),
    )
    await asyncio.wait_for(steering, TIMEOUT)
    assert text_of(await stored(clients, "chat"), run.id) == "Searching.In TypeScript: console.log('hi');"


async def test_steerable_interrupts_an_lcel_call(agents: Hub, clients: Hub) -> None:
    model = FakeToolCallingChatModel(respond=coder, sleep=0.001)
    client = clients.session("chat")
    answers: list[str] = []

    async def work(run: Run) -> None:
        config: Any = {"callbacks": [run.langchain()]}
        steered = await steerable(run, lambda messages: model.ainvoke(messages, config), [HumanMessage("code?")])
        answers.append(steered.result.text)
        assert [m.text for m in steered.steers] == ["actually, use TypeScript"]
        assert steered.messages[-1] is steered.steers[-1]

    async def steer(delta: TextDelta) -> None:
        await (await client.steer("actually, use TypeScript", run_id=delta.run_id)).ack()

    watching = asyncio.create_task(watch_and(client, steer))
    await in_run(agents, work)
    await watching
    assert answers == ["In TypeScript: console.log('hi');"]


async def test_a_steering_middleware_needs_a_run(agents: Hub) -> None:
    agent = create_agent(FakeToolCallingChatModel(responses=["x"]), tools=[], middleware=[SteeringMiddleware()])
    with pytest.raises(durable_ai.ConfigurationError, match="steers the run whose handler the call carries"):
        await agent.ainvoke({"messages": [HumanMessage("x")]})


# -- sub-agents ----------------------------------------------------------------------------------------------


def research_team() -> Any:
    researcher = create_agent(
        FakeToolCallingChatModel(responses=["Tides follow the moon."]), tools=[], name="researcher"
    )

    @tool
    async def research(question: str) -> str:
        """Ask the researcher."""
        state = await researcher.ainvoke({"messages": [HumanMessage(question)]})
        return str(state["messages"][-1].text)

    model = FakeToolCallingChatModel(
        responses=[
            AIMessage("", tool_calls=[{"name": "research", "args": {"question": "tides?"}, "id": "r1"}]),
            "The researcher says: tides follow the moon.",
        ]
    )
    return create_agent(model, tools=[research], name="orchestrator")


async def test_a_named_nested_agent_writes_into_a_sub_agent_run(agents: Hub, clients: Hub) -> None:
    team = research_team()
    run = await in_run(
        agents,
        lambda run: team.ainvoke({"messages": [HumanMessage("tides?")]}, config={"callbacks": [run.langchain()]}),
    )
    events = await stored(clients, "chat")
    starts = [e for e in events if isinstance(e, RunStart)]
    assert [(s.agent, s.parent_run_id) for s in starts] == [("assistant", None), ("researcher", run.id)]
    sub = starts[1].run_id
    assert text_of(events, sub) == "Tides follow the moon."
    assert text_of(events, run.id) == "The researcher says: tides follow the moon."
    ends = {e.run_id: e.status for e in events if isinstance(e, RunEnd)}
    assert ends == {run.id: "completed", sub: "completed"}
    result = next(e for e in events if isinstance(e, ToolResult))
    sub_end = next(e for e in events if isinstance(e, RunEnd) and e.run_id == sub)
    assert events.index(sub_end) < events.index(result)  # the sub-agent ended before its answer came back


async def test_sub_agents_can_be_kept_in_the_run(agents: Hub, clients: Hub) -> None:
    team = research_team()
    run = await in_run(
        agents,
        lambda run: team.ainvoke(
            {"messages": [HumanMessage("tides?")]}, config={"callbacks": [run.langchain(sub_agents=False)]}
        ),
    )
    events = await stored(clients, "chat")
    assert len([e for e in events if isinstance(e, RunStart)]) == 1
    assert text_of(events, run.id) == "Tides follow the moon.The researcher says: tides follow the moon."


# -- bridges -------------------------------------------------------------------------------------------------


async def test_astream_events_bridge(agents: Hub, clients: Hub) -> None:
    model = FakeToolCallingChatModel(
        responses=[
            AIMessage("Looking.", tool_calls=[{"name": "search", "args": {"query": "tides"}, "id": "call_1"}]),
            AIMessage([{"type": "reasoning", "reasoning": "Enough."}, {"type": "text", "text": ANSWER}]),
        ]
    )
    agent = create_agent(model, tools=[search])
    kinds: list[str] = []

    async def work(run: Run) -> None:
        async for event in run.langchain().relay_events(
            agent.astream_events({"messages": [HumanMessage("tides?")]}, version="v2")
        ):
            kinds.append(str(event["event"]))

    run = await in_run(agents, work)
    events = await stored(clients, "chat")
    assert "on_chat_model_stream" in kinds  # the caller still gets every event
    assert text_of(events, run.id) == "Looking." + ANSWER
    assert "".join(deltas(events, ReasoningDelta)) == "Enough."
    assert [(e.call_id, e.name, e.input) for e in events if isinstance(e, ToolCall)] == [
        ("call_1", "search", {"query": "tides"})
    ]
    assert [(e.call_id, e.output) for e in events if isinstance(e, ToolResult)] == [("call_1", "3 hits for tides")]


async def test_langgraph_stream_parts_bridge(agents: Hub, clients: Hub) -> None:
    """``messages``, ``updates`` and ``custom`` parts, with a subgraph as a sub-agent run named by its node."""
    model = FakeToolCallingChatModel(
        responses=[
            AIMessage("Looking.", tool_calls=[{"name": "search", "args": {"query": "tides"}, "id": "call_1"}]),
            ANSWER,
        ]
    )
    inner = create_agent(model, tools=[search])

    async def report(state: MessagesState) -> dict[str, list[BaseMessage]]:
        writer = get_stream_writer()
        writer("writing the report")
        writer({"progress": 1.0})
        return {"messages": [AIMessage("Report done.", id="report-1")]}

    graph = (
        StateGraph(MessagesState)
        .add_node("research", inner)
        .add_node("report", report)
        .add_edge(START, "research")
        .add_edge("research", "report")
        .compile()
    )

    async def work(run: Run) -> None:
        parts = graph.astream(
            {"messages": [HumanMessage("tides?")]}, stream_mode=["messages", "updates", "custom"], subgraphs=True
        )
        async for _ in run.langchain().relay_graph(parts):
            pass

    run = await in_run(agents, work)
    events = await stored(clients, "chat")
    starts = [e for e in events if isinstance(e, RunStart)]
    assert [(s.agent, s.parent_run_id) for s in starts] == [("assistant", None), ("research", run.id)]
    sub = starts[1].run_id
    assert text_of(events, sub) == "Looking." + ANSWER
    assert [(e.run_id, e.call_id, e.input) for e in events if isinstance(e, ToolCall)] == [
        (sub, "call_1", {"query": "tides"})
    ]
    assert [(e.call_id, e.output) for e in events if isinstance(e, ToolResult)] == [("call_1", "3 hits for tides")]
    assert text_of(events, run.id) == "Report done."
    assert [e.text for e in events if isinstance(e, Status)] == ["writing the report"]
    assert [(e.name, e.value) for e in events if isinstance(e, Data)] == [("custom", {"progress": 1.0})]
    sub_end = next(e for e in events if isinstance(e, RunEnd) and e.run_id == sub)
    assert sub_end.status == "completed"
    assert events.index(sub_end) < events.index(next(e for e in events if isinstance(e, Status)))


async def test_a_single_stream_mode_is_refused_with_what_to_do(agents: Hub) -> None:
    graph = StateGraph(MessagesState).add_node("n", lambda s: {"messages": []}).add_edge(START, "n").compile()

    async def work(run: Run) -> None:
        async for _ in run.langchain().relay_graph(graph.astream({"messages": []}, stream_mode="updates")):
            pass

    with pytest.raises(durable_ai.ConfigurationError, match="stream with a list of modes"):
        await in_run(agents, work)


# -- the fake model ------------------------------------------------------------------------------------------


async def test_the_fake_model_checks_its_script() -> None:
    model = FakeToolCallingChatModel(responses=[AIMessage("", tool_calls=[{"name": "serch", "args": {}, "id": "1"}])])
    with pytest.raises(ValueError, match="'serch', which is not bound"):
        await model.bind_tools([search]).ainvoke("x")
    empty = FakeToolCallingChatModel(responses=["only one"])
    assert (await empty.ainvoke("x")).text == "only one"
    with pytest.raises(ValueError, match="no reply left"):
        await empty.ainvoke("x")


async def test_the_fake_model_streams_tool_calls() -> None:
    call = {"name": "search", "args": {"query": "a long query that spans chunks"}, "id": "c9"}
    model = FakeToolCallingChatModel(responses=[AIMessage("", tool_calls=[call])])
    chunks = [chunk async for chunk in model.bind_tools([search]).astream("x")]
    assert sum(1 for chunk in chunks if chunk.tool_call_chunks) > 1
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [{k: c[k] for k in ("name", "args", "id")} for c in merged.tool_calls] == [call]  # type: ignore[literal-required]


# -- packaging and the examples ------------------------------------------------------------------------------


def test_the_core_imports_without_langchain() -> None:
    code = (
        "import sys; sys.modules['langchain_core'] = None\n"
        "import asyncio, durable_ai\n"
        "async def main():\n"
        "    async with durable_ai.connect('memory://') as hub, hub.session('s').run() as run:\n"
        "        try:\n"
        "            run.langchain()\n"
        "        except ImportError as exc:\n"
        "            print(exc)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "pip install 'durable-ai[langchain]'" in done.stdout


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["memory", "nats"])
def broker(request: pytest.FixtureRequest) -> MemoryBackend | str:
    """The embedded backend, or the session's nats-server on loopback under a subject prefix of this test's own."""
    if request.param == "memory":
        return MemoryBackend()
    server: NatsServer = request.getfixturevalue("nats_server")
    return f"{server.url}?prefix=t{secrets.token_hex(4)}"


def check_team(events: Sequence[Event], orchestrator: Run, stopped: str, example: ModuleType) -> None:
    """Per agent, the events of its run are whole and in order, whatever the interleaving between agents."""
    starts = {e.run_id: e for e in events if isinstance(e, RunStart)}
    assert sorted(s.agent or "" for s in starts.values()) == [
        "orchestrator",
        "researcher-currents",
        "researcher-tides",
        "researcher-winds",
    ]
    for run_id, start in starts.items():
        mine = [e for e in events if e.run_id == run_id and not isinstance(e, ControlAck)]
        assert mine[0] is start and isinstance(mine[-1], RunEnd), start.agent
        assert (start.parent_run_id is None) == (start.agent == "orchestrator")
        if start.agent != "orchestrator":
            assert start.parent_run_id == orchestrator.id
            topic = (start.agent or "").removeprefix("researcher-")
            kinds = [e.type for e in mine]
            assert kinds.index("tool-call") < kinds.index("tool-result") < kinds.index("text-delta")
            end = mine[-1]
            assert isinstance(end, RunEnd)
            if topic == stopped:
                assert end.status == "cancelled"
                assert example.notes(topic).startswith(text_of(mine))
            else:
                assert (end.status, text_of(mine)) == ("completed", example.notes(topic))


async def test_the_multi_agent_example_on_memory_and_nats(broker: MemoryBackend | str) -> None:
    example = load_example("multi_agent")
    async with durable_ai.connect(broker) as agents, durable_ai.connect(broker) as clients:
        orchestrator, seen = await asyncio.wait_for(example.team(agents, clients, "team", "currents"), TIMEOUT * 3)
        events = await stored(clients, "team")
    check_team(events, orchestrator, "currents", example)
    # The client saw all four live, with the same text as the log.
    assert {s.agent: s.status for s in seen.values()} == {
        "orchestrator": "completed",
        "researcher-currents": "cancelled",
        "researcher-tides": "completed",
        "researcher-winds": "completed",
    }
    for run_id, item in seen.items():
        assert item.text == text_of(events, run_id)
    assert text_of(events, orchestrator.id) == "Summary: 2 reports (tides, winds)."
