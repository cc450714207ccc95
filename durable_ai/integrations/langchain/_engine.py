"""What LangChain reports, as events of a run: the mapping that the callback handler and the bridges share.

Everything here runs on the run's event loop (the handler hands calls from other threads and loops over), so the
state needs no locks. LangChain runs are keyed by their id as a string.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from pydantic_core import to_jsonable_python

from ..._util import now_ms
from ...errors import ConfigurationError, DurableAIError, RunClosed
from ...events import ErrorEvent
from ...run import Run
from ...session import Session

__all__ = ["DeliveryError", "SubAgentFailed"]

logger = logging.getLogger("durable_ai")

Kind = Literal["text", "reasoning"]
_KEPT_ERRORS = 256  # exceptions remembered per handler, so one that propagates through many runs is reported once


class DeliveryError(DurableAIError, RuntimeError):
    """LangChain called the handler from another thread or event loop, and the call could not be handed to the
    run's event loop (it is blocked, stopped or closed). The message says which; nothing was written."""


class SubAgentFailed(DurableAIError):
    """The reason a sub-agent's run failed: the error its LangChain run raised (``.error``)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        super().__init__(describe(error))


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def is_cancellation(error: BaseException) -> bool:
    """A stop, not a failure: cancellation, interpreter exit, our own stop of a call after its run ended."""
    if isinstance(error, asyncio.CancelledError | concurrent.futures.CancelledError | RunClosed | DeliveryError):
        return True
    if not isinstance(error, Exception):
        return True
    return _is_langgraph(error, "NodeCancelledError")


def is_graph_signal(error: BaseException) -> bool:
    """LangGraph's interrupts, parent commands and drains travel as exceptions; none is an error."""
    return _is_langgraph(error, "GraphBubbleUp")


def _is_langgraph(error: BaseException, name: str) -> bool:
    # Only LangGraph raises its own errors, so if it is not imported, the error is not one of them.
    errors = sys.modules.get("langgraph.errors")
    cls = getattr(errors, name, None) if errors is not None else None
    return isinstance(cls, type) and isinstance(error, cls)


def jsonable(value: Any) -> Any:
    """``value`` if it is JSON already, else its JSON form (pydantic models, dataclasses...; ``repr`` at worst)."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return to_jsonable_python(value, fallback=repr)


def pieces(message: BaseMessage) -> list[tuple[Kind, str]]:
    """The text and reasoning of a message (or chunk), in order, from its standard content blocks.

    Standard ``reasoning`` blocks, Anthropic-style ``thinking`` blocks (also when the message does not say it comes
    from Anthropic) and ``additional_kwargs["reasoning_content"]`` are reasoning.
    """
    found: list[tuple[Kind, str]] = []
    try:
        blocks = [cast("Mapping[str, Any]", block) for block in message.content_blocks]
    except Exception:  # content no translator understands: keep its text
        return [("text", message.text)] if message.text else []
    for block in blocks:
        kind = block.get("type")
        if kind == "non_standard" and isinstance(block.get("value"), Mapping):
            block = block["value"]
            kind = block.get("type")
        if kind == "text":
            found.append(("text", block.get("text") or ""))
        elif kind == "reasoning":
            found.append(("reasoning", block.get("reasoning") or ""))
        elif kind == "thinking":
            found.append(("reasoning", block.get("thinking") or ""))
    return [(kind, text) for kind, text in found if isinstance(text, str) and text]


def tool_output(output: Any, call_id: str | None) -> tuple[Any, str | None]:
    """What a tool returned, as (output, error): a ``ToolMessage`` is unwrapped (``status="error"`` is an error),
    a ``Command`` gives the tool message it carries for the call."""
    if not isinstance(output, ToolMessage):
        update = getattr(output, "update", None)
        messages = update.get("messages") if isinstance(update, Mapping) else None
        for message in messages if isinstance(messages, Sequence) else ():
            if isinstance(message, ToolMessage) and message.tool_call_id == call_id:
                output = message
                break
    if isinstance(output, ToolMessage):
        if output.status == "error":
            return None, output.text or "the tool failed"
        return jsonable(output.content), None
    return jsonable(output), None


def part_key(source: str) -> str:
    """A part id stem from a LangChain id (kept short and printable whatever the provider's ids look like)."""
    if len(source) <= 96 and source.isprintable():
        return source
    return hashlib.sha256(source.encode()).hexdigest()[:32]


# -- the agents a handler writes for ---------------------------------------------------------------------------


Outcome = BaseException | str | None  # failed with it | cancelled with the reason | completed


@dataclass(eq=False)
class Agent:
    """The run events go to: the handler's run, or the run of a sub-agent it opened."""

    run: Run
    name: str | None = None
    parent: Agent | None = None
    opener: str | None = None  # the LangChain run that opened it (sub-agents)
    outcome: asyncio.Future[Outcome] | None = None
    holder: asyncio.Task[None] | None = None
    closing: bool = False
    call_ids: set[str] = field(default_factory=set)
    requested: list[tuple[str, Any, str]] = field(default_factory=list)  # tool calls a model asked for: name, args, id

    def descends_from(self, other: Agent) -> bool:
        agent = self.parent
        while agent is not None:
            if agent is other:
                return True
            agent = agent.parent
        return False


@dataclass(eq=False)
class Stream:
    """One model call's (or one message's) parts: a new part each time it switches between text and reasoning."""

    agent: Agent
    key: str
    streamed: bool = False
    kind: Kind | None = None
    part: str = ""
    parts: int = 0
    chunks: AIMessageChunk | None = None  # the message so far, for tool calls (bridges)


class Writer:
    """Writes into a run and the sub-agent runs it opens; ``sub_agents`` turns those off."""

    def __init__(self, run: Run, session: Session, *, sub_agents: bool) -> None:
        self.run = run
        self.session = session
        self.sub_agents = sub_agents
        self.root = Agent(run=run)
        self.open_agents: list[Agent] = []

    # -- writes (each dropped quietly once its run has ended) -----------------------------------------------

    def usable(self, agent: Agent) -> bool:
        """Whether ``agent``'s run takes writes; a run never entered raises, one that has ended is skipped."""
        if agent.run.active:
            return True
        if agent.run.accepting and agent is self.root:
            raise RunClosed(f"run {agent.run.id} was never entered; use the handler inside 'async with session.run()'")
        return False

    async def deltas(self, stream: Stream, found: Sequence[tuple[Kind, str]]) -> None:
        agent = stream.agent
        for kind, text in found:
            if not self.usable(agent):
                return
            if kind != stream.kind:
                stream.kind, stream.parts = kind, stream.parts + 1
                stream.part = f"{stream.key}:{stream.parts}"
            write = agent.run.text if kind == "text" else agent.run.reasoning
            with contextlib.suppress(RunClosed):
                await write(text, part_id=stream.part)
                stream.streamed = True

    async def tool_call(self, agent: Agent, name: str, args: Any, call_id: str | None) -> str | None:
        """Record a tool call under LangChain's id (a fresh one if it has none, or it was used in this run)."""
        if not self.usable(agent):
            return None
        wanted = call_id if call_id and call_id not in agent.call_ids else None
        try:
            written = await agent.run.tool_call(name or "tool", jsonable(args), call_id=wanted)
        except ConfigurationError:
            if wanted is None:
                raise
            written = await agent.run.tool_call(name or "tool", jsonable(args))  # an id the run cannot carry
        except RunClosed:
            return None
        agent.call_ids.add(written)
        return written

    async def tool_result(self, agent: Agent, call_id: str, output: Any = None, *, error: str | None = None) -> None:
        if self.usable(agent):
            with contextlib.suppress(RunClosed):
                await agent.run.tool_result(call_id, jsonable(output), error=error)

    async def data(self, agent: Agent, name: str, value: Any) -> None:
        if self.usable(agent):
            with contextlib.suppress(RunClosed):
                await agent.run.data(name, jsonable(value))

    async def status(self, agent: Agent, text: str) -> None:
        if self.usable(agent):
            with contextlib.suppress(RunClosed):
                await agent.run.status(text)

    async def error(self, agent: Agent, message: str) -> None:
        """An ``error`` event in ``agent``'s run, after what it wrote so far (the run goes on)."""
        if not self.usable(agent):
            return
        run = agent.run
        event = ErrorEvent(
            id=secrets.token_urlsafe(16), session=run.session_id, run_id=run.id, agent=run.agent, ts=now_ms(),
            message=message,
        )  # fmt: skip
        await self.session.publish(event)

    # -- sub-agents ------------------------------------------------------------------------------------------

    async def open(self, name: str, parent: Agent, opener: str | None) -> Agent:
        """A sub-agent run for ``name``, child of ``parent``'s run; ``parent`` itself if it cannot be opened.

        The sub-agent's run is held open by a task of its own, so a client's cancel of it does not cancel the
        task running LangChain; it cancels the handler's run instead (the LangChain call stops as a whole).
        """
        if not self.usable(parent):
            return parent
        try:
            run = self.session.run(agent=name, parent=parent.run)
        except ConfigurationError:  # a name that cannot name an agent
            return parent
        loop = asyncio.get_running_loop()
        agent = Agent(run=run, name=name, parent=parent, opener=opener, outcome=loop.create_future())
        entered: asyncio.Future[None] = loop.create_future()
        agent.holder = asyncio.create_task(self._hold(agent, entered), name=f"durable-ai sub-agent {name}")
        self.open_agents.append(agent)  # closed with the rest even if this task is cancelled while it waits
        await asyncio.wait({entered, agent.holder}, return_when=asyncio.FIRST_COMPLETED)
        if not entered.done():
            self.open_agents.remove(agent)
            error = None if agent.holder.cancelled() else agent.holder.exception()
            logger.warning("the sub-agent run of %r could not be started: %r", name, error)
            return parent
        return agent

    async def _hold(self, agent: Agent, entered: asyncio.Future[None]) -> None:
        run, outcome = agent.run, agent.outcome
        assert outcome is not None
        try:
            async with run:
                entered.set_result(None)
                result = await outcome
                if isinstance(result, BaseException):
                    raise SubAgentFailed(result)
                if isinstance(result, str):
                    run.cancel(result)
        except SubAgentFailed:
            pass
        if run.cancelled and not agent.closing:
            # A client stopped the sub-agent. It runs inside the parent's LangChain call, which stops as a whole.
            agent.closing = True
            reason = f": {run.cancel_reason}" if run.cancel_reason else ""
            self.run.cancel(f"sub-agent {agent.name} was cancelled{reason}")

    async def close(self, agent: Agent, outcome: Outcome) -> None:
        """End a sub-agent's run: completed (``None``), cancelled (a reason) or failed (an exception)."""
        for other in [a for a in self.open_agents if a.descends_from(agent)]:
            await self.close(other, f"{agent.name} ended first")
        if agent in self.open_agents:
            self.open_agents.remove(agent)
        if agent.outcome is None or agent.holder is None:
            return
        agent.closing = True
        if not agent.outcome.done():
            agent.outcome.set_result(outcome)
        try:
            await asyncio.shield(agent.holder)
        except asyncio.CancelledError:
            if not agent.holder.cancelled():
                raise  # this task is cancelled, not the sub-agent's: the sub-agent's run still ends by itself
        except Exception as exc:  # its run-end could not be written; the parent's work goes on
            logger.warning("the sub-agent run %s did not end cleanly: %r", agent.run.id, exc)

    async def close_all(self, outcome: Outcome) -> None:
        for agent in list(self.open_agents):
            await self.close(agent, outcome)

    async def sweep(self) -> None:
        """Once the handler's run has ended, its sub-agents end too."""
        if self.open_agents and not self.run.accepting:
            await self.close_all("the parent run ended")

    def outcome_of(self, error: BaseException | None) -> Outcome:
        if error is None or is_graph_signal(error):
            return None
        if is_cancellation(error):
            return self.run.cancel_reason or "cancelled"
        return error


# -- the LangChain run tree, for the callbacks and astream_events ----------------------------------------------


class Engine(Writer):
    """Maps LangChain's run events (callbacks, or ``astream_events`` v2) to events of a run."""

    def __init__(self, run: Run, session: Session, *, sub_agents: bool) -> None:
        super().__init__(run, session, sub_agents=sub_agents)
        self.parents: dict[str, str | None] = {}
        self.roots: dict[str, str] = {}
        self.agents: dict[str, Agent] = {}
        self.streams: dict[str, Stream] = {}
        self.tools: dict[str, tuple[Agent, str]] = {}
        self.pending: dict[int, tuple[BaseException, str, Agent]] = {}  # errors that may yet be handled
        self.seen: dict[int, BaseException] = {}  # errors reported (or pending), held so their ids stay theirs

    # -- the tree --------------------------------------------------------------------------------------------

    async def enter(self, key: str, parent: str | None, metadata: Mapping[str, Any] | None) -> Agent:
        """Register a LangChain run; returns the agent it writes for (a sub-agent's, when it starts one)."""
        await self.sweep()
        await self.report(self.pending)  # work goes on after those errors: they were handled
        self.parents[key] = parent
        above = self.agents.get(parent) if parent is not None else None
        self.roots[key] = self.roots[parent] if parent is not None and parent in self.roots else key
        name = metadata.get("lc_agent_name") if metadata else None
        if above is None:  # a call of its own: the handler's run is its agent
            agent = self.root
            if isinstance(name, str) and self.root.name is None:
                self.root.name = name
        elif self.sub_agents and isinstance(name, str) and name and name not in (above.name, above.run.agent):
            agent = await self.open(name, above, key)
        else:
            agent = above
        self.agents[key] = agent
        return agent

    def agent(self, key: str) -> Agent:
        return self.agents.get(key, self.root)

    def is_root(self, key: str) -> bool:
        return self.roots.get(key, key) == key

    def _under(self, key: str, ancestor: str) -> bool:
        while key != ancestor:
            parent = self.parents.get(key)
            if parent is None:
                return False
            key = parent
        return True

    async def finish(self, key: str, error: BaseException | None) -> None:
        """A LangChain run ended (``error``: how it failed). Ends the sub-agent it opened; a handled error inside
        it is reported; at the end of a call of its own, its bookkeeping is dropped."""
        agent = self.agents.get(key)
        if error is None:  # the errors inside it did not stop it: they were handled
            await self.report({i: p for i, p in self.pending.items() if self._under(p[1], key)})
        if agent is not None and agent.opener == key:
            await self.close(agent, self.outcome_of(error))
        if self.is_root(key):
            await self._forget(key, error)

    async def _forget(self, root: str, error: BaseException | None) -> None:
        for agent in [a for a in self.open_agents if a.opener is not None and self.roots.get(a.opener) == root]:
            await self.close(agent, self.outcome_of(error))
        for key in [k for k, r in self.roots.items() if r == root]:
            self.parents.pop(key, None)
            self.roots.pop(key, None)
            self.agents.pop(key, None)
            self.streams.pop(key, None)
            self.tools.pop(key, None)
        while len(self.seen) > _KEPT_ERRORS:
            self.pending.pop(id(self.seen.pop(next(iter(self.seen)))), None)

    def failed(self, key: str, error: BaseException) -> None:
        """Note an error of a LangChain run. It is shown once it turns out to be handled: when the run around it
        ends anyway, or work goes on. One that propagates out of the call is left to whoever called it (the run's
        block fails with it), so it is not shown twice."""
        if is_cancellation(error) or is_graph_signal(error) or id(error) in self.seen:
            return
        self.seen[id(error)] = error
        self.pending[id(error)] = (error, key, self.agent(key))

    async def report(self, errors: Mapping[int, tuple[BaseException, str, Agent]]) -> None:
        for exc_id, (error, _, agent) in list(errors.items()):
            if self.pending.pop(exc_id, None) is not None:
                await self.error(agent, describe(error))

    # -- chains ----------------------------------------------------------------------------------------------

    async def chain_start(self, key: str, parent: str | None, metadata: Mapping[str, Any] | None) -> None:
        await self.enter(key, parent, metadata)

    async def chain_end(self, key: str) -> None:
        await self.finish(key, None)

    async def chain_error(self, key: str, error: BaseException) -> None:
        self.failed(key, error)
        await self.finish(key, error)

    async def custom(self, key: str | None, name: str, data: Any) -> None:
        await self.data(self.agent(key) if key is not None else self.root, name, data)

    # -- models ----------------------------------------------------------------------------------------------

    async def model_start(self, key: str, parent: str | None, metadata: Mapping[str, Any] | None) -> None:
        agent = await self.enter(key, parent, metadata)
        self.streams[key] = Stream(agent=agent, key=part_key(key))

    def _stream(self, key: str) -> Stream:
        stream = self.streams.get(key)
        if stream is None:  # the handler was attached to the model call only after it started
            stream = self.streams[key] = Stream(agent=self.agent(key), key=part_key(key))
        return stream

    async def token(self, key: str, message: BaseMessage | None, text: str | None) -> None:
        stream = self._stream(key)
        found: list[tuple[Kind, str]] = pieces(message) if message is not None else [("text", text)] if text else []
        await self.deltas(stream, found)

    async def model_end(self, key: str, message: BaseMessage | None, text: str | None) -> None:
        stream = self._stream(key)
        if not stream.streamed:  # a model that does not stream: its whole answer at once
            await self.token(key, message, text)
        if isinstance(message, AIMessage):
            for call in message.tool_calls:
                if call["id"]:
                    stream.agent.requested.append((call["name"], call["args"], call["id"]))
        await self.finish(key, None)

    async def model_error(self, key: str, error: BaseException) -> None:
        self.failed(key, error)
        await self.finish(key, error)

    # -- tools -----------------------------------------------------------------------------------------------

    async def tool_start(
        self,
        key: str,
        parent: str | None,
        metadata: Mapping[str, Any] | None,
        name: str,
        args: Any,
        call_id: str | None,
    ) -> None:
        agent = await self.enter(key, parent, metadata)
        if call_id is None:  # astream_events does not say which call this is: the model's request with its args
            for i, (wanted, wanted_args, wanted_id) in enumerate(agent.requested):
                if wanted == name and (args is None or jsonable(wanted_args) == jsonable(args)):
                    call_id = wanted_id
                    del agent.requested[i]
                    break
        else:
            agent.requested = [request for request in agent.requested if request[2] != call_id]
        written = await self.tool_call(agent, name, args, call_id)
        if written is not None:
            self.tools[key] = (agent, written)

    async def tool_end(self, key: str, output: Any) -> None:
        found = self.tools.pop(key, None)
        if found is not None:
            agent, call_id = found
            result, error = tool_output(output, call_id)
            await self.tool_result(agent, call_id, result, error=error)
        await self.finish(key, None)

    async def tool_error(self, key: str, error: BaseException) -> None:
        found = self.tools.pop(key, None)
        if found is not None and not is_graph_signal(error):
            agent, call_id = found
            self.seen[id(error)] = error  # shown on the tool; not again as an error of the run
            await self.tool_result(agent, call_id, error="cancelled" if is_cancellation(error) else describe(error))
        await self.finish(key, error)
