"""The callback handler bound to a run, the hand-off from other threads and loops, and the stream bridges."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, GenerationChunk, LLMResult

from ...errors import ConfigurationError, RunClosed
from ...run import Run
from ...session import Session
from ._engine import Agent, DeliveryError, Engine, Outcome, Stream, jsonable, part_key, pieces, tool_output

__all__ = ["DurableCallbackHandler", "call_on_loop"]

logger = logging.getLogger("durable_ai")


class _QuietStop(logging.Filter):
    """Drops LangChain's warning about the :class:`RunClosed` a sync callback raises to stop a call after its run
    ended (a cancel): that is the stop working, not an error. Every other callback error is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            isinstance(args, tuple)
            and len(args) == 3
            and args[0] == DurableCallbackHandler.__name__
            and str(args[2]).startswith(f"{RunClosed.__name__}(")
        )


logging.getLogger("langchain_core.callbacks.manager").addFilter(_QuietStop())

T = TypeVar("T")

# The callbacks that LangChain may call from another thread or event loop, and those of them that start or
# continue work: after the run has ended, those stop the LangChain call (in a thread, nothing else can).
_EVENTS = frozenset(
    {
        "on_chat_model_start",
        "on_llm_start",
        "on_llm_new_token",
        "on_llm_end",
        "on_llm_error",
        "on_chain_start",
        "on_chain_end",
        "on_chain_error",
        "on_tool_start",
        "on_tool_end",
        "on_tool_error",
        "on_retriever_error",
        "on_custom_event",
    }
)
_PROGRESS = frozenset({"on_chat_model_start", "on_llm_start", "on_llm_new_token", "on_chain_start", "on_tool_start"})


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def call_on_loop(loop: asyncio.AbstractEventLoop, call: Callable[[], Awaitable[T]], *, timeout: float) -> T:
    """Run ``call()`` on ``loop`` (from another thread) and wait for its result.

    Raises :class:`DeliveryError` at once if the loop is closed or stopped, and after ``timeout`` seconds if it
    does not start the call (it is blocked: by sync code on its thread, perhaps waiting for this very thread).
    Once started, the call takes as long as it takes (a write waits for the broker up to ``publish_timeout``).
    """
    if loop.is_closed() or not loop.is_running():
        state = "closed" if loop.is_closed() else "not running"
        raise DeliveryError(f"the run's event loop is {state}, so nothing can be written into the run")
    result: concurrent.futures.Future[T] = concurrent.futures.Future()
    started = threading.Event()

    def start() -> None:
        # The coroutine is created here, on the loop: a call that never starts leaves nothing unawaited behind.
        if not result.set_running_or_notify_cancel():
            return
        started.set()
        task = loop.create_task(_awaited(call))
        task.add_done_callback(functools.partial(_copy_outcome, result))

    try:
        loop.call_soon_threadsafe(start)
    except RuntimeError as exc:  # closed in the meantime
        raise DeliveryError("the run's event loop closed, so nothing can be written into the run") from exc
    if not started.wait(timeout) and result.cancel():
        raise DeliveryError(
            f"the run's event loop did not take the write within {timeout:g}s: it is blocked (is sync code "
            "on its thread waiting for this thread? run sync LangChain code with asyncio.to_thread and await it)"
        )
    while True:
        try:
            return result.result(timeout=1.0)
        except concurrent.futures.TimeoutError:
            if loop.is_closed() or not loop.is_running():
                raise DeliveryError("the run's event loop stopped before the write finished") from None


async def _awaited(call: Callable[[], Awaitable[T]]) -> T:
    return await call()


def _copy_outcome(result: concurrent.futures.Future[T], task: asyncio.Task[T]) -> None:
    if task.cancelled():
        result.set_exception(DeliveryError("the write was cancelled on the run's event loop (is it shutting down?)"))
    elif (error := task.exception()) is not None:
        result.set_exception(error)
    else:
        result.set_result(task.result())


class DurableCallbackHandler(AsyncCallbackHandler):
    """A LangChain callback handler that writes what LangChain does into a run. Get one with ``run.langchain()``.

    Attach it in one line: ``await chain.ainvoke(input, config={"callbacks": [run.langchain()]})``. It writes:

    - the text and reasoning of every model call, token by token, from the chunks' standard content blocks
      (``reasoning`` blocks, Anthropic-style ``thinking`` and ``reasoning_content`` are reasoning), each model call
      in parts of its own. ``ainvoke``, ``astream`` and LangGraph nodes all stream: the handler is one of
      LangChain's streaming handlers (the pass-through taps), so models stream even when nobody asked for a stream;
    - ``tool-call`` and ``tool-result`` for each tool LangChain runs, under LangChain's tool call id, with the tool
      message unwrapped (``status="error"``, or an exception, is the result's error);
    - ``data`` for ``adispatch_custom_event(name, data)``;
    - ``error`` for an error that LangChain handled inside the call (a retry, a fallback); an error that leaves the
      call is the run's to report (it fails), so it is not written twice. Cancellation and LangGraph's interrupts,
      parent commands and drains are not errors;
    - with ``sub_agents`` (the default), the work of a nested agent with a name of its own (LangChain's
      ``lc_agent_name``, which ``create_agent(name=...)`` sets) into a sub-agent run of that name, child of this
      run, ended when the nested agent's work ends.

    It runs inline (``run_inline``), so it is called in the task that runs LangChain, under the run's cancel scope:
    a cancel stops the model call at its next chunk, and callbacks that come after the run ended are dropped. It
    raises its errors (``raise_error``) instead of letting LangChain log them away.

    LangChain may call it from sync code: ``.invoke()`` or ``.stream()`` in a worker thread, or another event loop.
    Each call is then handed to the run's event loop and waited for, so writes land in order and their errors
    reach the caller; a call the loop does not take within ``handoff_timeout`` seconds (it is blocked), or that it
    cannot take (it stopped), raises :class:`DeliveryError`. Once the run has ended, a callback that starts or
    continues work raises :class:`~durable_ai.RunClosed`, which stops the LangChain call in that thread.

    It also bridges code that streams instead of using callbacks: :meth:`relay_events` (``astream_events`` v2) and
    :meth:`relay_graph` (LangGraph's ``astream`` parts). Use either the callbacks or a bridge for one call, not both.
    """

    run_inline = True
    raise_error = True

    def __init__(self, run: Run, session: Session, *, sub_agents: bool = True, handoff_timeout: float = 5.0) -> None:
        if session.id != run.session_id:
            raise ConfigurationError(f"run {run.id} belongs to session {run.session_id!r}, not {session.id!r}")
        if handoff_timeout <= 0:
            raise ConfigurationError(f"handoff_timeout must be positive, got {handoff_timeout!r}")
        loop = run.task.get_loop() if run.task is not None else _running_loop()
        if loop is None:
            raise ConfigurationError("create the handler on the run's event loop: call run.langchain() in async code")
        self.run = run
        """The run it writes into."""
        self.handoff_timeout = handoff_timeout
        self._loop = loop
        self._engine = Engine(run, session, sub_agents=sub_agents)
        self._backlog: asyncio.Task[None] | None = None
        self._warned = False

    def __repr__(self) -> str:
        return f"<DurableCallbackHandler run={self.run.id}>"

    # -- where LangChain calls from --------------------------------------------------------------------------

    def __getattribute__(self, name: str) -> Any:
        # LangChain awaits a coroutine callback when it calls from async code on the run's loop. From anywhere else
        # it would run the coroutine in a throwaway loop and log its errors away, so a plain function that hands
        # the call over to the run's loop is given instead.
        if name in _EVENTS:
            loop = object.__getattribute__(self, "_loop")
            if _running_loop() is not loop:
                handoff = object.__getattribute__(self, "_handoff")
                return functools.partial(handoff, name, object.__getattribute__(self, name))
        return object.__getattribute__(self, name)

    def _handoff(self, event: str, callback: Callable[..., Awaitable[None]], /, *args: Any, **kwargs: Any) -> None:
        run = self.run
        if not run.accepting:
            if event in _PROGRESS:
                reason = f" ({run.cancel_reason})" if run.cancel_reason else ""
                raise RunClosed(f"run {run.id} has ended{reason}; the LangChain call that writes into it is stopped")
            return
        call_on_loop(self._loop, functools.partial(callback, *args, **kwargs), timeout=self.handoff_timeout)

    async def _dispatch(self, call: Callable[[], Awaitable[None]]) -> None:
        if _running_loop() is self._loop:
            await call()
            return
        # LangChain ran sync code on the run's own loop (a blocking .invoke() inside async code) and now runs this
        # in a throwaway loop while the run's loop waits for it: write when the loop is free again.
        if not self._warned:
            self._warned = True
            logger.warning(
                "LangChain was called synchronously on the event loop of run %s (a sync .invoke() or .stream() in "
                "async code): the loop is blocked, so the run's events are written when the call returns and a "
                "cancel cannot stop it; use ainvoke()/astream(), or run sync code with asyncio.to_thread",
                self.run.id,
            )
        self._loop.call_soon_threadsafe(self._queue, call)

    def _queue(self, call: Callable[[], Awaitable[None]]) -> None:
        self._backlog = self._loop.create_task(self._after(self._backlog, call))

    async def _after(self, previous: asyncio.Task[None] | None, call: Callable[[], Awaitable[None]]) -> None:
        if previous is not None:
            await asyncio.wait({previous})
        try:
            await call()
        except Exception as exc:
            logger.warning("a delayed write into run %s failed: %r", self.run.id, exc)

    # -- the streaming taps: LangChain streams models for a handler that has them ----------------------------

    def tap_output_aiter(self, run_id: UUID, output: AsyncIterator[T]) -> AsyncIterator[T]:
        return output

    def tap_output_iter(self, run_id: UUID, output: Iterator[T]) -> Iterator[T]:
        return output

    # -- callbacks -------------------------------------------------------------------------------------------

    async def on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._dispatch(functools.partial(self._engine.chain_start, str(run_id), _key(parent_run_id), metadata))

    async def on_chain_end(
        self,
        outputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._dispatch(functools.partial(self._engine.chain_end, str(run_id)))

    async def on_chain_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._dispatch(functools.partial(self._engine.chain_error, str(run_id), error))

    async def on_retriever_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._dispatch(functools.partial(self._engine.chain_error, str(run_id), error))

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        await self._dispatch(functools.partial(self._engine.model_start, str(run_id), _key(parent_run_id), metadata))

    async def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._dispatch(functools.partial(self._engine.model_start, str(run_id), _key(parent_run_id), metadata))

    async def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: GenerationChunk | ChatGenerationChunk | None = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        message = chunk.message if isinstance(chunk, ChatGenerationChunk) else None
        text = chunk.text if isinstance(chunk, GenerationChunk) else token if isinstance(token, str) else None
        await self._dispatch(functools.partial(self._engine.token, str(run_id), message, text))

    async def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        first = response.generations[0][0] if response.generations and response.generations[0] else None
        message = first.message if isinstance(first, ChatGeneration) else None
        text = first.text if first is not None and message is None else None
        await self._dispatch(functools.partial(self._engine.model_end, str(run_id), message, text))

    async def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._dispatch(functools.partial(self._engine.model_error, str(run_id), error))

    async def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = str(serialized.get("name") or kwargs.get("name") or "tool")
        call_id = kwargs.get("tool_call_id")
        args = inputs if inputs is not None else input_str
        start = self._engine.tool_start
        await self._dispatch(
            functools.partial(
                start, str(run_id), _key(parent_run_id), metadata, name, args, call_id if call_id else None
            )
        )

    async def on_tool_end(
        self,
        output: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._dispatch(functools.partial(self._engine.tool_end, str(run_id), output))

    async def on_tool_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._dispatch(functools.partial(self._engine.tool_error, str(run_id), error))

    async def on_custom_event(
        self,
        name: str,
        data: Any,
        *,
        run_id: UUID,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._dispatch(functools.partial(self._engine.custom, str(run_id), name, data))

    # -- bridges ---------------------------------------------------------------------------------------------

    async def relay_events(self, events: AsyncIterable[Mapping[str, Any]]) -> AsyncIterator[Mapping[str, Any]]:
        """Write an ``astream_events(version="v2")`` stream into the run, yielding each event on after it.

        The same mapping as the callbacks: model text and reasoning, tools (a tool's call id is the one its model
        asked for), custom events as ``data``, named nested agents as sub-agent runs::

            async for event in run.langchain().relay_events(agent.astream_events(input, version="v2")):
                ...  # the events, untouched, for the caller's own use
        """
        engine = self._check_loop("relay_events")
        failure: BaseException | None = None
        try:
            async for event in events:
                await self._relay_event(engine, event)
                yield event
        except BaseException as exc:
            failure = exc
            raise
        finally:
            await self._end_stream(engine.outcome_of(failure))

    async def _relay_event(self, engine: Engine, event: Mapping[str, Any]) -> None:
        kind = str(event.get("event", ""))
        key = str(event.get("run_id", ""))
        parents = event.get("parent_ids") or []
        parent = str(parents[-1]) if parents else None
        metadata = event.get("metadata")
        data = event.get("data") or {}
        if kind == "on_chain_start":
            await engine.chain_start(key, parent, metadata)
        elif kind == "on_chain_end":
            await engine.chain_end(key)
        elif kind in ("on_chat_model_start", "on_llm_start"):
            await engine.model_start(key, parent, metadata)
        elif kind in ("on_chat_model_stream", "on_llm_stream"):
            chunk = data.get("chunk")
            message = chunk if isinstance(chunk, BaseMessage) else getattr(chunk, "message", None)
            text = chunk if isinstance(chunk, str) else getattr(chunk, "text", None) if message is None else None
            await engine.token(key, message if isinstance(message, BaseMessage) else None, text)
        elif kind in ("on_chat_model_end", "on_llm_end"):
            output = data.get("output")
            message = output if isinstance(output, BaseMessage) else None
            if isinstance(output, LLMResult):
                first = output.generations[0][0] if output.generations and output.generations[0] else None
                message = first.message if isinstance(first, ChatGeneration) else None
            await engine.model_end(key, message, None)
        elif kind == "on_tool_start":
            await engine.tool_start(key, parent, metadata, str(event.get("name") or "tool"), data.get("input"), None)
        elif kind == "on_tool_end":
            await engine.tool_end(key, data.get("output"))
        elif kind == "on_tool_error":
            error = data.get("error")
            await engine.tool_error(key, error if isinstance(error, BaseException) else RuntimeError(str(error)))
        elif kind == "on_custom_event":
            await engine.custom(key, str(event.get("name") or "custom"), data)

    async def relay_graph(self, parts: AsyncIterable[Any]) -> AsyncIterator[Any]:
        """Write LangGraph's ``astream`` parts into the run, yielding each part on after it.

        Stream with a list of modes (``stream_mode=["messages", "updates", "custom"]``) or ``version="v2"``:

        - ``messages``: model text and reasoning as they stream, the tool calls of each finished message, tool
          messages as tool results;
        - ``updates``: the tool calls and tool results (and, if ``messages`` is not streamed, the answers) in what
          nodes return; an interrupt is ``data`` named ``interrupt``;
        - ``custom``: what ``get_stream_writer()`` writes: a string is a ``status``, anything else ``data`` named
          ``custom``.

        With ``subgraphs=True``, each subgraph's parts go to a sub-agent run named by the agent's
        ``lc_agent_name``, or else by its node, ended when its node's update arrives.
        """
        graph = _GraphRelay(self._check_loop("relay_graph"))
        failure: BaseException | None = None
        try:
            async for part in parts:
                await graph.relay(part)
                yield part
        except BaseException as exc:
            failure = exc
            raise
        finally:
            await self._end_stream(self._engine.outcome_of(failure))

    def _check_loop(self, what: str) -> Engine:
        if _running_loop() is not self._loop:
            raise ConfigurationError(f"{what}() must be iterated on the run's event loop")
        return self._engine

    async def _end_stream(self, outcome: Outcome) -> None:
        """The sub-agent runs a stream opened end with it (a failure to end them never hides the stream's own)."""
        try:
            await self._engine.close_all(outcome)
        except Exception as exc:
            logger.warning("the sub-agent runs of a stream into run %s did not end cleanly: %r", self.run.id, exc)


def _key(run_id: UUID | None) -> str | None:
    return str(run_id) if run_id is not None else None


_MODES = frozenset({"values", "updates", "messages", "custom", "checkpoints", "tasks", "debug"})


def _parse_part(part: Any) -> tuple[tuple[str, ...], str, Any]:
    """(namespace, mode, data) of a LangGraph stream part, in any of the shapes ``astream`` yields."""
    if isinstance(part, Mapping) and isinstance(part.get("type"), str) and "data" in part:
        return tuple(part.get("ns") or ()), part["type"], part["data"]
    if isinstance(part, tuple):
        if len(part) == 3 and isinstance(part[1], str) and part[1] in _MODES:
            return tuple(part[0]), part[1], part[2]
        if len(part) == 2 and isinstance(part[0], str) and part[0] in _MODES:
            return (), part[0], part[1]
        if len(part) == 2 and isinstance(part[0], BaseMessage):
            return (), "messages", part
    raise ConfigurationError(
        f"not a LangGraph stream part with its mode: {type(part).__name__}; stream with a list of modes "
        "(stream_mode=['messages', 'updates', 'custom']) or version='v2'"
    )


class _GraphRelay:
    """LangGraph stream parts, mapped: parts carry namespaces and message ids instead of run ids."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.agents: dict[tuple[str, ...], Agent] = {(): engine.root}
        self.streams: dict[tuple[tuple[str, ...], str], Stream] = {}
        self.answered: set[str] = set()  # ids of messages whose text was written
        self.called: dict[str, tuple[Agent, str]] = {}  # LangChain's tool call id: the agent and the id written
        self.results: set[str] = set()  # tool call ids whose result was written
        self.streaming = False  # a messages part was seen: answers come from it, not from updates

    async def agent(self, ns: tuple[str, ...], metadata: Mapping[str, Any] | None) -> Agent:
        found = self.agents.get(ns)
        if found is not None:
            return found
        parent = await self.agent(ns[:-1], None)
        name = metadata.get("lc_agent_name") if metadata else None
        if not isinstance(name, str) or not name or name == parent.name:
            name = ns[-1].split(":", 1)[0]
        agent = await self.engine.open(name, parent, None) if self.engine.sub_agents else parent
        self.agents[ns] = agent
        return agent

    async def relay(self, part: Any) -> None:
        ns, mode, data = _parse_part(part)
        await self.engine.sweep()
        if mode == "messages":
            message, metadata = data if isinstance(data, tuple) and len(data) == 2 else (data, None)
            if isinstance(message, BaseMessage):
                self.streaming = True
                await self.message(await self.agent(ns, metadata), ns, message)
        elif mode == "updates" and isinstance(data, Mapping):
            await self.updates(ns, data)
        elif mode == "custom":
            agent = await self.agent(ns, None)
            if isinstance(data, str):
                await self.engine.status(agent, data)
            else:
                await self.engine.data(agent, "custom", data)

    async def message(self, agent: Agent, ns: tuple[str, ...], message: BaseMessage) -> None:
        engine = self.engine
        if isinstance(message, ToolMessage):
            await self.result(message)
            return
        if not isinstance(message, AIMessage):
            return
        key = message.id or ""
        stream = self.streams.get((ns, key))
        if stream is None:
            stream = self.streams[(ns, key)] = Stream(agent=agent, key=part_key(key or "message"))
        if isinstance(message, AIMessageChunk):
            stream.chunks = message if stream.chunks is None else stream.chunks + message
            await engine.deltas(stream, pieces(message))
            if message.chunk_position == "last":
                self.answered.add(key)
                await self.calls(agent, stream.chunks.tool_calls)
                del self.streams[(ns, key)]
        elif key not in self.answered:  # a whole message (a model that does not stream, or a node's output)
            self.answered.add(key)
            await engine.deltas(stream, pieces(message))
            await self.calls(agent, message.tool_calls)
            del self.streams[(ns, key)]

    async def calls(self, agent: Agent, calls: Sequence[Any]) -> None:
        for call in calls:
            call_id = call.get("id")
            if call_id and call_id in self.called:
                continue  # a parent graph's update repeats what its subgraph streamed
            written = await self.engine.tool_call(agent, call.get("name", "tool"), call.get("args"), call_id)
            if written is not None:
                self.called[call_id or written] = (agent, written)

    async def result(self, message: ToolMessage) -> None:
        found = self.called.get(message.tool_call_id)
        if found is None or message.tool_call_id in self.results:
            return
        self.results.add(message.tool_call_id)
        agent, call_id = found
        output, error = tool_output(message, message.tool_call_id)
        await self.engine.tool_result(agent, call_id, output, error=error)

    async def updates(self, ns: tuple[str, ...], data: Mapping[str, Any]) -> None:
        agent = await self.agent(ns, None)
        for node, update in data.items():
            if node == "__interrupt__":
                values = [getattr(item, "value", item) for item in update] if isinstance(update, Sequence) else update
                await self.engine.data(agent, "interrupt", jsonable(values))
                continue
            # A subgraph hosted by this node has finished: its sub-agent run ends.
            for sub_ns, sub in list(self.agents.items()):
                if len(sub_ns) == len(ns) + 1 and sub_ns[:-1] == ns and sub_ns[-1].split(":", 1)[0] == node:
                    await self.engine.close(sub, None)
                    del self.agents[sub_ns]
            messages = update.get("messages") if isinstance(update, Mapping) else None
            for message in messages if isinstance(messages, Sequence) else ():
                if isinstance(message, AIMessage):
                    if not self.streaming and (message.id or "") not in self.answered:
                        self.answered.add(message.id or "")
                        stream = Stream(agent=agent, key=part_key(message.id or "message"))
                        await self.engine.deltas(stream, pieces(message))
                    await self.calls(agent, message.tool_calls)
                elif isinstance(message, ToolMessage):
                    await self.result(message)
