"""The Vercel AI SDK drop-in: chat routes that ``useChat`` (ai@6 and ai@7) talks to unchanged, over durable sessions.

Install with the ``starlette`` extra. The app writes only its agent::

    from starlette.applications import Starlette
    from durable_ai import Run
    from durable_ai.integrations.starlette import DurableAI
    from durable_ai.integrations.vercel import ChatTurn, chat_routes

    async def agent(run: Run, turn: ChatTurn) -> None:
        await run.text(f"You said: {turn.message.content}")

    durable = DurableAI("memory://")
    app = Starlette(routes=[*chat_routes(durable, agent), *durable.gateway_routes()], lifespan=durable.lifespan)

The chat id is the session id. The routes (``prefix`` defaults to ``/api/chat``):

- ``POST {prefix}``: the body ``DefaultChatTransport`` sends. The user's message (the last of ``messages``) is
  committed to the session, the agent is launched detached from the request (a client that goes away never stops
  it), and the new run streams back as a UI message stream.
- ``GET {prefix}/{id}/stream``: the active response replayed from its ``start`` chunk (same ``messageId``), then
  live; 204 when nothing is active.
- ``POST {prefix}/{id}/stop``: a typed cancel of the active response, answered once the agent acknowledged it (any
  body, or none, is accepted and ignored: the log, not the client's partial message, is the truth).
- ``GET {prefix}/{id}/messages``: the chat as ``UIMessage[]``.
- ``WS {prefix}/ws``: ai@7's ``WebSocketChatTransport`` protocol.

Events map to chunks as DESIGN.md section 10 says: ``run-start`` is ``start`` + ``start-step``, deltas are
``text-*`` / ``reasoning-*`` by part id, tools are ``tool-input-available`` and ``tool-output-available`` /
``tool-output-error``, ``data`` is ``data-<name>``, ``status`` a transient ``data-status``, and the run's end is
``finish-step`` + ``finish`` (completed), ``abort`` (cancelled) or ``error`` (failed). Sub-agent runs of the
response show as ``data-agent`` parts (one per sub-agent, updated as it starts, reports status and ends), or not at
all with ``sub_agents="omit"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .._util import IdFactory, derived_id, now_ms, validate_name
from ..backends.kit import cancel_and_wait
from ..cursor import Cursor
from ..errors import ConfigurationError, DurableAIError, HubClosed, PayloadTooLarge
from ..events import (
    AckOutcome,
    Data,
    ErrorEvent,
    Event,
    ReasoningDelta,
    Reset,
    RunEnd,
    RunStart,
    Status,
    TextDelta,
    ToolCall,
    ToolResult,
    UserMessage,
)
from ..run import Run
from ..session import Session
from ..view import DataPart, Message, ReasoningPart, RunInfo, SessionView, TextPart, ToolPart
from .starlette import DurableAI, event_source, http_status

__all__ = [
    "ChatAgent",
    "ChatBusy",
    "ChatTurn",
    "UIMessageEncoder",
    "chat_routes",
    "ui_messages",
]

logger = logging.getLogger("durable_ai")

Chunk: TypeAlias = dict[str, Any]
ChatStrategy: TypeAlias = Literal["enqueue", "interrupt", "reject"]
SubAgents: TypeAlias = Literal["data", "omit"]
ChunkSet: TypeAlias = Literal["common", "ai7"]

#: the headers of a UI message stream response
UI_MESSAGE_STREAM_HEADERS = {"x-vercel-ai-ui-message-stream": "v1", "Connection": "keep-alive"}
STOP_REASON = "the user pressed stop"
ABORT_REASON = "the client aborted the request"
_new_id = IdFactory()  # message ids for prompts that come without one
_EARLY_STOP_SECONDS = 30.0  # how long a stop waits for an answer it cancelled before it started to end
INTERRUPT_REASON = "a new message interrupted this answer"
MAX_BODY_BYTES = 1_000_000
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class ChatTurn:
    """What an agent answers: the user's message, and the chat before it, as the session's log holds them.

    ``session`` is the chat's session (its id is the chat id): start sub-agent runs on it with
    ``session.run(agent=..., parent=run)``. ``history`` comes from the log (trusted), never from the client's copy
    of the messages. ``body`` holds the extra fields of the client's request body (untrusted: validate what you
    use).
    """

    session: Session
    message: UserMessage
    history: list[Message] = field(default_factory=list)
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    body: dict[str, Any] = field(default_factory=dict)


ChatAgent = Callable[[Run, ChatTurn], Awaitable[None]]
"""An agent for the chat routes: it writes its answer to ``run`` for ``turn``."""


class ChatBusy(DurableAIError):
    """A message arrived while the chat's agent is answering, and the chat's strategy is ``reject`` (HTTP 409)."""


class ChatRequestInvalid(DurableAIError, ValueError):
    """The request body is not what the Vercel AI SDK sends (HTTP 400)."""


# -- events to UI message chunks -----------------------------------------------------------------------------


class UIMessageEncoder:
    """Maps the events of one response (a top-level run and its sub-agent runs) to UI message stream chunks.

    Feed it the session's events in order with :meth:`feed`; events of other runs give no chunks. ``done`` is set
    once the response's ``run-end`` (or a ``reset``) was mapped: nothing follows it.
    """

    def __init__(self, run_id: str, *, sub_agents: SubAgents = "data", chunks: ChunkSet = "common") -> None:
        self.run_id = run_id
        self.sub_agents = sub_agents
        self.chunks = chunks
        self.done = False
        self._family = {run_id}
        self._agents: dict[str, dict[str, Any]] = {}
        self._open: dict[str, str] = {}  # "text" / "reasoning" -> the part id open in the stream
        self._errored = False
        self._agent: str | None = None

    def feed(self, event: Event) -> list[Chunk]:
        """The chunks for ``event`` (none for events of other runs, acknowledgements and unknown types)."""
        if self.done:
            return []
        if isinstance(event, Reset):
            self.done = True
            return [*self._close_parts(), {"type": "error", "errorText": f"the chat was reset: {event.reason}"}]
        run_id = event.run_id
        if isinstance(event, RunStart) and event.parent_run_id in self._family and run_id is not None:
            self._family.add(run_id)
        if run_id is None or run_id not in self._family:
            return []
        if run_id != self.run_id:
            return self._sub_agent(event, run_id)
        return self._own(event)

    def _own(self, event: Event) -> list[Chunk]:
        if isinstance(event, RunStart):
            self._agent = event.agent
            return [
                {"type": "start", "messageId": event.message_id, "messageMetadata": self._metadata("streaming")},
                {"type": "start-step"},
            ]
        if isinstance(event, TextDelta):
            return [
                *self._part("text", event.part_id),
                {"type": "text-delta", "id": event.part_id, "delta": event.delta},
            ]
        if isinstance(event, ReasoningDelta):
            chunk = {"type": "reasoning-delta", "id": event.part_id, "delta": event.delta}
            return [*self._part("reasoning", event.part_id), chunk]
        if isinstance(event, ToolCall):
            return [
                {
                    "type": "tool-input-available",
                    "toolCallId": event.call_id,
                    "toolName": event.name,
                    "input": event.input,
                }
            ]
        if isinstance(event, ToolResult):
            if event.error is not None:
                return [{"type": "tool-output-error", "toolCallId": event.call_id, "errorText": event.error}]
            return [{"type": "tool-output-available", "toolCallId": event.call_id, "output": event.output}]
        if isinstance(event, Data):
            return [{"type": f"data-{event.name}", "data": event.value}]
        if isinstance(event, Status):
            return [{"type": "data-status", "data": {"text": event.text, "agent": event.agent}, "transient": True}]
        if isinstance(event, ErrorEvent):
            self._errored = True
            return [{"type": "error", "errorText": event.message}]
        if isinstance(event, UserMessage):
            if self.chunks != "ai7":
                return []
            parts = [{"type": "text", "text": event.content}]
            return [{"type": "steering-message", "id": event.message_id, "parts": parts}]
        if isinstance(event, RunEnd):
            self.done = True
            end = [*self._close_parts(), {"type": "message-metadata", "messageMetadata": self._metadata(event.status)}]
            if event.status == "completed":
                return [*end, {"type": "finish-step"}, {"type": "finish", "finishReason": "stop"}]
            if event.status == "cancelled":
                return [*end, {"type": "abort", **({"reason": event.reason} if event.reason else {})}]
            if self._errored:
                return end
            return [*end, {"type": "error", "errorText": event.reason or "the agent failed"}]
        return []  # control-acks, and event types this version does not know

    def _metadata(self, status: str) -> dict[str, Any]:
        return {"runId": self.run_id, "agent": self._agent, "status": status}

    def _part(self, kind: str, part_id: str) -> list[Chunk]:
        current = self._open.get(kind)
        if current == part_id:
            return []
        chunks: list[Chunk] = [] if current is None else [{"type": f"{kind}-end", "id": current}]
        self._open[kind] = part_id
        return [*chunks, {"type": f"{kind}-start", "id": part_id}]

    def _close_parts(self) -> list[Chunk]:
        chunks = [{"type": f"{kind}-end", "id": part_id} for kind, part_id in self._open.items()]
        self._open.clear()
        return chunks

    def _sub_agent(self, event: Event, run_id: str) -> list[Chunk]:
        if self.sub_agents == "omit":
            return []
        if isinstance(event, RunStart):
            self._agents[run_id] = {
                "runId": run_id,
                "agent": event.agent,
                "parentRunId": event.parent_run_id,
                "status": "streaming",
                "statusText": None,
                "text": "",
            }
            return [self._agent_part(run_id)]
        state = self._agents.get(run_id)
        if state is None:
            return []
        if isinstance(event, TextDelta):
            state["text"] += event.delta  # sent with the next status or the end, not per token
            return []
        if isinstance(event, Status):
            state["statusText"] = event.text
            return [self._agent_part(run_id)]
        if isinstance(event, RunEnd):
            state["status"] = event.status
            state["statusText"] = event.reason or state["statusText"]
            return [self._agent_part(run_id)]
        return []

    def _agent_part(self, run_id: str) -> Chunk:
        return {"type": "data-agent", "id": run_id, "data": dict(self._agents[run_id])}


def ui_messages(view: SessionView, *, sub_agents: SubAgents = "data", chunks: ChunkSet = "common") -> list[Chunk]:
    """The chat of ``view`` as Vercel ``UIMessage`` objects: what ``GET {prefix}/{id}/messages`` answers.

    Each top-level run is an assistant message (its id the run's ``message_id``, as in the stream's ``start``),
    with its status in ``metadata``; sub-agent runs are ``data-agent`` parts of the answer they belong to (or left
    out with ``sub_agents="omit"``). A regenerated answer replaces the earlier answer to the same user message.
    Steers sent into an answer are ``steering-message`` parts with ``chunks="ai7"``, user messages otherwise.
    """
    top: dict[str, Chunk] = {}
    owner: dict[str, str] = {}  # run id -> the run id of its top-level answer
    answer_of: dict[str, str] = {}  # input message id -> the run id of its latest answer
    out: list[Chunk] = []
    for message in view.messages:
        if message.role == "user":
            if chunks == "ai7" and message.run_id is not None and message.run_id in top:
                parts = [{"type": "text", "text": message.text}]
                top[message.run_id]["parts"].append({"type": "steering-message", "id": message.id, "parts": parts})
                continue
            out.append({"id": message.id, "role": "user", "parts": [{"type": "text", "text": message.text}]})
            continue
        run_id = message.run_id or message.id
        parent = message.parent_run_id
        if parent is not None and parent in owner:
            owner[run_id] = owner[parent]
            if sub_agents == "data":
                top[owner[run_id]]["parts"].append(_agent_data(message))
            continue
        owner[run_id] = run_id
        metadata: Chunk = {"runId": run_id, "agent": message.agent, "status": message.status}
        if message.error is not None and message.status == "failed":
            metadata["error"] = message.error
        ui: Chunk = {
            "id": message.id,
            "role": "assistant",
            "metadata": metadata,
            "parts": [{"type": "step-start"}, *(_ui_part(part) for part in message.parts)],
        }
        top[run_id] = ui
        earlier = answer_of.get(message.input_message_id) if message.input_message_id else None
        if earlier is not None:
            out.remove(top[earlier])
        if message.input_message_id:
            answer_of[message.input_message_id] = run_id
        out.append(ui)
    return out


def _ui_part(part: TextPart | ReasoningPart | ToolPart | DataPart) -> Chunk:
    if isinstance(part, TextPart | ReasoningPart):
        return {"type": part.type, "text": part.text, "state": "done"}
    if isinstance(part, DataPart):
        return {"type": f"data-{part.name}", "data": part.value}
    tool: Chunk = {"type": f"tool-{part.name}", "toolCallId": part.call_id, "input": part.input}
    if part.state == "completed":
        return {**tool, "state": "output-available", "output": part.output}
    if part.state == "failed":
        return {**tool, "state": "output-error", "errorText": part.error or "the tool failed"}
    return {**tool, "state": "input-available"}


def _agent_data(message: Message) -> Chunk:
    data = {
        "runId": message.run_id,
        "agent": message.agent,
        "parentRunId": message.parent_run_id,
        "status": message.status,
        "statusText": message.reason or message.status_text,
        "text": message.text,
    }
    return {"type": "data-agent", "id": message.run_id, "data": data}


# -- the responses' events -----------------------------------------------------------------------------------


class _Launch:
    """One response being answered: the run, and the task that waits its turn, then runs the agent."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.task: asyncio.Task[Any] | None = None
        self.entered = asyncio.Event()
        self.failure: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    def fail(self, exc: BaseException) -> None:
        if not self.failure.done():
            if isinstance(exc, asyncio.CancelledError):
                exc = HubClosed("the answer was not started: the server is shutting down")
            self.failure.set_result(exc)


async def _response_events(
    session: Session, run_id: str, after: str | None, launch: _Launch | None
) -> AsyncGenerator[Event, None]:
    """The session's events from ``after`` until the response's ``run-end`` (the encoder picks its own); if the
    agent fails before its run started, that failure is raised instead of waiting for a run that never comes."""
    async with session.events(after) as stream:
        iterator = aiter(stream)
        started = launch is None
        while True:
            if started:
                try:
                    event = await anext(iterator)
                except StopAsyncIteration:
                    return
            else:
                assert launch is not None
                step: asyncio.Task[Event] = asyncio.ensure_future(anext(iterator))
                racing: list[asyncio.Future[Any]] = [step, launch.failure]
                await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    await cancel_and_wait(step)
                    raise launch.failure.result()
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return
                started = isinstance(event, RunStart) and event.run_id == run_id
            yield event
            if isinstance(event, Reset) or (isinstance(event, RunEnd) and event.run_id == run_id):
                return


async def _finished(session: Session, run_id: str) -> AsyncGenerator[Event, None]:
    """A finished run's events, from the log."""
    async with session.stream(run_id) as stream:
        async for event in stream:
            yield event


def _sse(encoder: UIMessageEncoder) -> Callable[[Event], bytes]:
    def frame(event: Event) -> bytes:
        chunks = encoder.feed(event)
        if not chunks:
            return b""
        prefix = f"id: {event.cursor}\n" if event.cursor is not None else ""
        return "".join(f"{prefix}data: {_json(chunk)}\n\n" for chunk in chunks).encode()

    return frame


def _sse_error(exc: BaseException) -> bytes:
    return f"data: {_json({'type': 'error', 'errorText': str(exc) or type(exc).__name__})}\n\n".encode()


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _before(start_cursor: str | None) -> str | None:
    if start_cursor is None:
        return None
    cursor = Cursor.parse(start_cursor)
    return str(Cursor(cursor.epoch, cursor.position, cursor.index - 1))


def _answering(runs: Iterable[RunInfo]) -> list[RunInfo]:
    """The top-level runs among ``runs``, oldest first."""
    return sorted((info for info in runs if info.parent_run_id is None), key=lambda info: info.started_ts)


# -- the routes ----------------------------------------------------------------------------------------------


@dataclass
class _Request:
    chat_id: str
    message_id: str
    content: str
    trigger: Literal["submit-message", "regenerate-message"]
    body: dict[str, Any]


def _parse_request(payload: object, chat_id: str | None = None) -> _Request:
    if not isinstance(payload, dict):
        raise ChatRequestInvalid("the request body must be a JSON object")
    chat = payload.get("id", chat_id)
    if not isinstance(chat, str) or not chat:
        raise ChatRequestInvalid("the request has no chat id")
    trigger = payload.get("trigger", "submit-message")
    if trigger not in ("submit-message", "regenerate-message"):
        raise ChatRequestInvalid(f"unknown trigger {trigger!r}")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestInvalid("the request has no messages")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        raise ChatRequestInvalid("the last message must be the user's")
    message_id = last.get("id")
    if not isinstance(message_id, str):
        raise ChatRequestInvalid("the user's message has no id")
    try:
        validate_name("message id", message_id)
    except ConfigurationError as exc:
        raise ChatRequestInvalid(str(exc)) from None
    parts = last.get("parts")
    if not isinstance(parts, list):
        raise ChatRequestInvalid("the user's message has no parts")
    texts: list[str] = []
    for part in parts:
        if isinstance(part, dict) and part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatRequestInvalid("a text part has no text")
            texts.append(text)
    if not texts:
        raise ChatRequestInvalid("the user's message has no text")
    known = {"id", "messages", "trigger", "messageId", "requestId", "type", "headers", "metadata", "body"}
    extra = {key: value for key, value in payload.items() if key not in known}
    if isinstance(payload.get("body"), dict):
        extra |= payload["body"]
    return _Request(chat, message_id, "\n".join(texts), trigger, extra)


class _ChatApp:
    def __init__(
        self,
        durable: DurableAI,
        agent: ChatAgent,
        *,
        agent_name: str,
        strategy: ChatStrategy,
        abort: Literal["cancel", "detach"],
        sub_agents: SubAgents,
        chunks: ChunkSet,
        max_body_bytes: int,
    ) -> None:
        self.durable = durable
        self.agent = agent
        self.agent_name = validate_name("agent", agent_name)
        self.strategy = strategy
        self.abort = abort
        self.sub_agents = sub_agents
        self.chunks = chunks
        self.max_body_bytes = max_body_bytes
        self._last: dict[str, _Launch] = {}  # chat id -> the latest response launched here
        durable.answer_prompts(self.answer_prompt)

    def session(self, chat_id: str) -> Session:
        return self.durable.hub.session(chat_id)

    def encoder(self, run_id: str) -> UIMessageEncoder:
        return UIMessageEncoder(run_id, sub_agents=self.sub_agents, chunks=self.chunks)

    # -- starting a response ---------------------------------------------------------------------------------

    async def start(self, request: _Request) -> tuple[str, AsyncGenerator[Event, None]]:
        """Commit the user's message and launch its answer; returns the answer's run id and its events.

        A message the chat already answered (a client retrying its request) is not answered twice: its answer is
        replayed (from its start, then live if it is still streaming).
        """
        session = self.session(request.chat_id)
        view = await session.view()
        known = any(message.id == request.message_id for message in view.messages)
        if known and request.trigger == "submit-message":
            replay = self._replay(session, view, request.message_id)
            if replay is not None:
                return replay
        previous = self._last.get(request.chat_id)
        pending = previous is not None and not previous.failure.done() and not previous.entered.is_set()
        if self.strategy == "reject" and (_answering(view.active_runs) or pending):
            raise ChatBusy("the agent is still answering this chat; stop it or wait for the answer")
        if not known:
            if request.trigger == "regenerate-message":
                raise ChatRequestInvalid("the message to answer again is not in the chat")
            user = UserMessage(
                id=derived_id("user-message", request.message_id),
                session=session.id,
                ts=now_ms(),
                message_id=request.message_id,
                content=request.content,
            )
            await session.publish(user)
        after = await session.head()
        run = session.run(agent=self.agent_name, input_message_id=request.message_id)
        launch = _Launch(run)
        self._last[request.chat_id] = launch
        launch.task = self.durable.launch(self._answer(session, launch, request, previous), name=f"chat {run.id}")
        launch.task.add_done_callback(lambda _: self._forget(request.chat_id, launch))
        return run.id, _response_events(session, run.id, after, launch)

    async def answer_prompt(
        self, chat_id: str, content: str, message_id: str | None
    ) -> tuple[AckOutcome, str | None, str | None]:
        """A ``prompt`` sent over the gateway's WebSocket: a message of the chat, answered as a POST's would be
        (the chat's strategy applies: ``reject`` refuses it while an answer streams)."""
        request = _Request(chat_id, message_id or _new_id(), content, "submit-message", {})
        try:
            run_id, events = await self.start(request)
        except ChatBusy as exc:
            return "rejected", str(exc), None
        await events.aclose()  # the client follows the session over the gateway: nothing reads this response
        return "applied", None, run_id

    def _replay(
        self, session: Session, view: SessionView, message_id: str
    ) -> tuple[str, AsyncGenerator[Event, None]] | None:
        answers = [
            m
            for m in view.messages
            if m.role == "assistant" and m.parent_run_id is None and m.input_message_id == message_id
        ]
        if not answers or answers[-1].run_id is None:
            return None
        run_id = answers[-1].run_id
        active = {info.run_id: info for info in view.active_runs}
        if run_id in active:
            return run_id, _response_events(session, run_id, _before(active[run_id].start_cursor), None)
        return run_id, _finished(session, run_id)

    def _forget(self, chat_id: str, launch: _Launch) -> None:
        if self._last.get(chat_id) is launch:
            del self._last[chat_id]

    async def _answer(self, session: Session, launch: _Launch, request: _Request, previous: _Launch | None) -> None:
        run = launch.run
        try:
            await self._wait_turn(session, run, previous)
            view = await session.view()
            index = next((i for i, m in enumerate(view.messages) if m.id == request.message_id), None)
            if index is None:
                raise ChatRequestInvalid("the user's message is not in the chat")
            user = view.messages[index]
            message = UserMessage(
                id=derived_id("user-message", user.id),
                session=session.id,
                ts=user.ts,
                message_id=user.id,
                content=user.text,
            )
            turn = ChatTurn(session, message, view.messages[:index], request.trigger, request.body)
            async with run:
                launch.entered.set()
                await self.agent(run, turn)
        except BaseException as exc:
            launch.fail(exc)
            raise

    async def _wait_turn(self, session: Session, run: Run, previous: _Launch | None) -> None:
        """Enqueue: after the answers before this one end; interrupt: after they were cancelled."""
        if previous is not None and previous.task is not None:
            if self.strategy == "interrupt":
                if not previous.entered.is_set():
                    previous.task.cancel()
                else:
                    previous.run.cancel(INTERRUPT_REASON)
            await asyncio.wait([previous.task])
        view = await session.view()
        waiting = {info.run_id for info in _answering(view.active_runs) if info.run_id != run.id}
        if not waiting:
            return
        if self.strategy == "interrupt":
            handles = [await session.cancel(run_id, reason=INTERRUPT_REASON) for run_id in waiting]
            for handle in handles:
                await handle.done()
            return
        async with session.events(view.cursor) as stream:  # runs of other processes: wait for their ends
            async for event in stream:
                if isinstance(event, RunEnd) and event.run_id in waiting:
                    waiting.discard(event.run_id)
                    if not waiting:
                        return
                if isinstance(event, Reset):
                    return

    # -- HTTP ------------------------------------------------------------------------------------------------

    async def _body(self, request: Request) -> object:
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > self.max_body_bytes:
                raise PayloadTooLarge(len(data), self.max_body_bytes)
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise ChatRequestInvalid("the request body is not JSON") from None

    async def post(self, request: Request) -> Response:
        try:
            parsed = _parse_request(await self._body(request))
            await self.durable.check_access(request, parsed.chat_id, "prompt")
            run_id, events = await self.start(parsed)
        except DurableAIError as exc:
            return _error_response(exc)
        return self._ui_stream(events, run_id)

    def _ui_stream(self, events: AsyncIterator[Event], run_id: str) -> Response:
        return event_source(
            events, frame=_sse(self.encoder(run_id)), end=_DONE, error=_sse_error, headers=UI_MESSAGE_STREAM_HEADERS
        )

    async def resume(self, request: Request) -> Response:
        try:
            chat_id = request.path_params["chat_id"]
            await self.durable.check_access(request, chat_id, "read")
            session = self.session(chat_id)
            active = _answering(await session.active_runs())
        except DurableAIError as exc:
            return _error_response(exc)
        if not active:
            return Response(status_code=204)
        info = active[-1]
        return self._ui_stream(_response_events(session, info.run_id, _before(info.start_cursor), None), info.run_id)

    async def stop(self, request: Request) -> Response:
        try:
            chat_id = request.path_params["chat_id"]
            await self.durable.check_access(request, chat_id, "cancel")
            with contextlib.suppress(ChatRequestInvalid):
                await self._body(request)  # read (bounded) and ignored: the client's partial is never trusted
            outcomes = await self.cancel_active(self.session(chat_id), STOP_REASON)
        except DurableAIError as exc:
            return _error_response(exc)
        return JSONResponse({"stopped": outcomes})

    async def cancel_active(self, session: Session, reason: str, run_id: str | None = None) -> list[dict[str, Any]]:
        """Cancel the chat's active answers (or ``run_id``), each once its agent acknowledged it.

        An answer this app launched that has not started yet (a Stop right after the message was sent) is
        cancelled before it starts: it starts and ends at once, ``cancelled`` with ``reason``.
        """
        results = []
        early = self._last.get(session.id)
        if (
            early is None
            or early.task is None
            or early.entered.is_set()
            or early.failure.done()
            or run_id not in (None, early.run.id)
        ):
            early = None
        else:
            early.run.cancel(reason)  # it may be waiting for the answers before it: those are cancelled next
        run_ids = [run_id] if run_id is not None else [info.run_id for info in _answering(await session.active_runs())]
        for target in run_ids:
            if early is not None and target == early.run.id:
                continue
            ack = await (await session.cancel(target, reason=reason)).ack()
            results.append({"runId": target, "outcome": ack.outcome, "reason": ack.reason})
        if early is not None and early.task is not None:
            await asyncio.wait([early.task], timeout=_EARLY_STOP_SECONDS)
            outcome = "applied" if early.run.cancelled else "ignored"
            results.append({"runId": early.run.id, "outcome": outcome, "reason": reason})
        return results

    async def messages(self, request: Request) -> Response:
        try:
            chat_id = request.path_params["chat_id"]
            await self.durable.check_access(request, chat_id, "read")
            view = await self.session(chat_id).view()
        except DurableAIError as exc:
            return _error_response(exc)
        return JSONResponse(ui_messages(view, sub_agents=self.sub_agents, chunks=self.chunks))

    async def socket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await _ChatSocket(self, websocket).run()


def _error_response(exc: DurableAIError) -> Response:
    status = 409 if isinstance(exc, ChatBusy) else http_status(exc)
    if status >= 500:
        logger.warning("chat request failed: %s", exc)
    return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=status)


# -- the WebSocket transport ---------------------------------------------------------------------------------


def _valid_frame(frame: dict[str, Any]) -> str | None:
    """Why ``frame`` is not a request of ai@7's WebSocket chat protocol, or ``None``."""
    kind = frame.get("type")
    if kind == "abort":
        return None
    if kind not in ("send", "resume"):
        return f"unknown request type {kind!r}"
    headers, body = frame.get("headers", {}), frame.get("body", {})
    if not isinstance(frame.get("id"), str):
        return "the request has no chat id"
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return "headers must be an object of strings"
    if not isinstance(body, dict):
        return "body must be an object"
    return None


@dataclass
class _WsRequest:
    task: asyncio.Task[None] | None = None
    chat_id: str | None = None
    run_id: str | None = None


class _ChatSocket:
    """One ``WebSocketChatTransport`` connection: requests multiplexed by ``requestId``, frames sent by one task."""

    def __init__(self, app: _ChatApp, websocket: WebSocket) -> None:
        self.app = app
        self.websocket = websocket
        self.outgoing: asyncio.Queue[str] = asyncio.Queue(256)
        self.requests: dict[str, _WsRequest] = {}

    async def run(self) -> None:
        sender = asyncio.get_running_loop().create_task(self._send(), name="durable-ai chat ws sender")
        try:
            while True:
                text = await self.websocket.receive_text()
                await self._receive(text)
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away: a dropped socket is never a cancel
        finally:
            for request in list(self.requests.values()):
                if request.task is not None:
                    await cancel_and_wait(request.task)
            await cancel_and_wait(sender)

    async def _send(self) -> None:
        while True:
            await self.websocket.send_text(await self.outgoing.get())

    async def _put(self, frame: dict[str, Any]) -> None:
        await self.outgoing.put(_json(frame))

    async def _receive(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            frame = None
        request_id = frame.get("requestId") if isinstance(frame, dict) else None
        if not isinstance(frame, dict) or not isinstance(request_id, str):
            # Nothing can be answered without a request id (the client drops a connection on a frame without one).
            logger.info("chat websocket: a frame without a requestId was ignored")
            return
        problem = _valid_frame(frame)
        if problem is not None:
            await self._put({"type": "error", "requestId": request_id, "errorText": problem})
            return
        if frame["type"] == "abort":
            await self._abort(request_id)
            return
        if request_id in self.requests:
            await self._put({"type": "error", "requestId": request_id, "errorText": "the requestId is in use"})
            return
        state = _WsRequest()
        coroutine = self._serve(frame, request_id, state)
        state.task = asyncio.get_running_loop().create_task(coroutine, name=f"durable-ai chat ws {request_id}")
        self.requests[request_id] = state
        state.task.add_done_callback(lambda _: self._done(request_id, state))

    def _done(self, request_id: str, state: _WsRequest) -> None:
        if self.requests.get(request_id) is state:
            del self.requests[request_id]

    async def _abort(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        chat_id, run_id = state.chat_id, state.run_id
        if state.task is not None:
            await cancel_and_wait(state.task)
        if self.app.abort == "cancel" and run_id is not None and chat_id is not None:
            try:
                await self.app.durable.check_access(self.websocket, chat_id, "cancel")
                await self.app.cancel_active(self.app.session(chat_id), ABORT_REASON, run_id)
            except DurableAIError as exc:
                logger.info("chat websocket: the abort of request %s did not cancel: %s", request_id, exc)

    async def _serve(self, frame: dict[str, Any], request_id: str, state: _WsRequest) -> None:
        try:
            if frame["type"] == "send":
                parsed = _parse_request({**frame.get("body", {}), **frame})  # the request's own fields win
                state.chat_id = parsed.chat_id
                await self.app.durable.check_access(self.websocket, parsed.chat_id, "prompt")
                run_id, events = await self.app.start(parsed)
            else:
                chat_id = frame["id"]
                state.chat_id = chat_id
                await self.app.durable.check_access(self.websocket, chat_id, "read")
                session = self.app.session(chat_id)
                active = _answering(await session.active_runs())
                if not active:
                    await self._put({"type": "no-active", "requestId": request_id})
                    return
                info = active[-1]
                run_id, events = info.run_id, _response_events(session, info.run_id, _before(info.start_cursor), None)
            state.run_id = run_id
            await self._put({"type": "start", "requestId": request_id})
            encoder = self.app.encoder(run_id)
            sequence = 0
            async with contextlib.aclosing(events):
                async for event in events:
                    for chunk in encoder.feed(event):
                        await self._put(
                            {"type": "chunk", "requestId": request_id, "sequence": sequence, "chunk": chunk}
                        )
                        sequence += 1
            await self._put({"type": "end", "requestId": request_id})
        except DurableAIError as exc:
            await self._put({"type": "error", "requestId": request_id, "errorText": str(exc) or type(exc).__name__})


def chat_routes(
    durable: DurableAI,
    agent: ChatAgent,
    *,
    prefix: str = "/api/chat",
    agent_name: str = "assistant",
    strategy: ChatStrategy = "enqueue",
    abort: Literal["cancel", "detach"] = "cancel",
    sub_agents: SubAgents = "data",
    chunks: ChunkSet = "common",
    max_body_bytes: int = MAX_BODY_BYTES,
) -> list[BaseRoute]:
    """The Vercel AI SDK routes for ``agent`` (see the module docstring).

    Args:
        durable: the app's :class:`~durable_ai.integrations.starlette.DurableAI` (its hub, launcher and
            ``authorize`` hook).
        agent: writes the answer to each user message.
        prefix: where the routes live (``DefaultChatTransport``'s ``api``).
        agent_name: the agent name of the runs.
        strategy: a message that arrives while the chat is being answered is answered next (``enqueue``),
            interrupts the answer (``interrupt``: cancelled, then the new one starts) or is refused (``reject``: 409,
            or an ``error`` frame on the WebSocket).
        abort: what a WebSocket ``abort`` does: ``cancel`` the request's run (as Stop), or ``detach`` (the answer
            goes on; only the stop route cancels).
        sub_agents: show sub-agent runs as ``data-agent`` parts (``data``) or not at all (``omit``).
        chunks: ``common`` sends only chunks ai@6 and ai@7 both accept; ``ai7`` adds ``steering-message``.
        max_body_bytes: the largest request body accepted (413 above it).
    """
    if strategy not in ("enqueue", "interrupt", "reject"):
        raise ConfigurationError(f"unknown strategy {strategy!r}; use enqueue, interrupt or reject")
    if abort not in ("cancel", "detach"):
        raise ConfigurationError(f"unknown abort {abort!r}; use cancel or detach")
    if sub_agents not in ("data", "omit"):
        raise ConfigurationError(f"unknown sub_agents {sub_agents!r}; use data or omit")
    if chunks not in ("common", "ai7"):
        raise ConfigurationError(f"unknown chunks {chunks!r}; use common or ai7")
    app = _ChatApp(
        durable,
        agent,
        agent_name=agent_name,
        strategy=strategy,
        abort=abort,
        sub_agents=sub_agents,
        chunks=chunks,
        max_body_bytes=max_body_bytes,
    )
    return [
        Route(prefix, app.post, methods=["POST"]),
        WebSocketRoute(f"{prefix}/ws", app.socket),
        Route(f"{prefix}/{{chat_id}}/stream", app.resume, methods=["GET"]),
        Route(f"{prefix}/{{chat_id}}/stop", app.stop, methods=["POST"]),
        Route(f"{prefix}/{{chat_id}}/messages", app.messages, methods=["GET"]),
    ]
