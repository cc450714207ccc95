"""The materialised state of a session: messages with their parts, and the runs still working.

``Session.view()`` builds it from the latest snapshot plus the events after it, so opening a session with a long
history costs one read per message, not one per token. ``view.cursor`` is where to continue with
``session.events(after=view.cursor)``.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, Field, JsonValue

from .events import (
    Data,
    ErrorEvent,
    Event,
    ReasoningDelta,
    RunEnd,
    RunStart,
    Status,
    TextDelta,
    ToolCall,
    ToolResult,
    UserMessage,
)

__all__ = [
    "DataPart",
    "Message",
    "Part",
    "ReasoningPart",
    "RunInfo",
    "SessionView",
    "TextPart",
    "ToolPart",
]


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    id: str
    text: str


class ReasoningPart(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    text: str


class ToolPart(BaseModel):
    type: Literal["tool"] = "tool"
    call_id: str
    name: str
    input: JsonValue = None
    state: Literal["called", "completed", "failed"] = "called"
    output: JsonValue = None
    error: str | None = None


class DataPart(BaseModel):
    type: Literal["data"] = "data"
    name: str
    value: JsonValue = None


Part: TypeAlias = Annotated[TextPart | ReasoningPart | ToolPart | DataPart, Field(discriminator="type")]


class Message(BaseModel):
    """One user message, or the assistant message that one run produces.

    ``input_message_id`` is the id of the user message an assistant message answers, when its run named one.
    """

    id: str
    role: Literal["user", "assistant"]
    run_id: str | None = None
    agent: str | None = None
    parent_run_id: str | None = None
    input_message_id: str | None = None
    parts: list[Part] = Field(default_factory=list)
    status: Literal["streaming", "completed", "cancelled", "failed"] | None = None
    status_text: str | None = None
    reason: str | None = None
    error: str | None = None
    ts: int = 0

    @property
    def text(self) -> str:
        """The message's text parts, joined (reasoning, tools and data left out)."""
        return "".join(part.text for part in self.parts if isinstance(part, TextPart))


class RunInfo(BaseModel):
    """A run that has started and not ended.

    ``start_cursor`` is the cursor of its ``run-start``: ``session.stream(run_id)`` replays the run from there.
    """

    run_id: str
    agent: str | None
    parent_run_id: str | None
    message_id: str
    started_ts: int
    input_message_id: str | None = None
    start_cursor: str | None = None


class SessionView(BaseModel):
    """The state of a session at ``cursor``.

    ``truncated`` is true when retention dropped events that the view could not account for.
    """

    session: str
    cursor: str | None = None
    messages: list[Message] = Field(default_factory=list)
    active_runs: list[RunInfo] = Field(default_factory=list)
    truncated: bool = False


class ViewBuilder:
    """Folds events into a :class:`SessionView`; text is kept in chunks until :meth:`build`.

    With ``runs_only`` it keeps only which runs exist and which are active (what ``session.active_runs()``
    needs), and skips the parts.
    """

    def __init__(self, session: str, base: SessionView | None = None, *, runs_only: bool = False) -> None:
        self.session = session
        self.runs_only = runs_only
        self.cursor: str | None = None
        self.truncated = False
        self._messages: list[Message] = []
        self._by_id: dict[str, Message] = {}
        self._by_run: dict[str, Message] = {}
        self._chunks: dict[tuple[str, str], list[str]] = {}
        self._tools: dict[tuple[str, str], ToolPart] = {}
        self._active: dict[str, RunInfo] = {}
        if base is not None:
            self._load(base)

    def _load(self, view: SessionView) -> None:
        self.cursor = view.cursor
        self.truncated = view.truncated
        # The builder takes the view over: it was just parsed from a snapshot and nobody else holds it.
        for message in view.messages:
            self._add(message)
            for part in message.parts:
                if isinstance(part, TextPart | ReasoningPart):
                    self._chunks[(message.id, part.id)] = [part.text]
                elif isinstance(part, ToolPart):
                    self._tools[(message.id, part.call_id)] = part
        self._active = {run.run_id: run for run in view.active_runs}

    def _add(self, message: Message) -> None:
        self._messages.append(message)
        self._by_id[message.id] = message
        if message.role == "assistant" and message.run_id is not None:
            self._by_run[message.run_id] = message

    def reset(self) -> None:
        self.__init__(self.session, runs_only=self.runs_only)  # type: ignore[misc]

    @property
    def active_runs(self) -> list[RunInfo]:
        """The runs started and not ended so far, in the order they started."""
        return list(self._active.values())

    def has_run(self, run_id: str) -> bool:
        """Whether a run with this id started in the log folded so far (active or ended)."""
        return run_id in self._by_run

    def apply(self, event: Event) -> None:
        if event.cursor is not None:
            self.cursor = event.cursor
        if isinstance(event, RunStart):
            if event.run_id is None or event.run_id in self._by_run:
                return
            self._add(
                Message(
                    id=event.message_id,
                    role="assistant",
                    run_id=event.run_id,
                    agent=event.agent,
                    parent_run_id=event.parent_run_id,
                    input_message_id=event.input_message_id,
                    status="streaming",
                    ts=event.ts,
                )
            )
            self._active[event.run_id] = RunInfo(
                run_id=event.run_id,
                agent=event.agent,
                parent_run_id=event.parent_run_id,
                message_id=event.message_id,
                started_ts=event.ts,
                input_message_id=event.input_message_id,
                start_cursor=event.cursor,
            )
        elif self.runs_only:
            if isinstance(event, RunEnd) and event.run_id is not None:
                self._active.pop(event.run_id, None)
        elif isinstance(event, UserMessage):
            if event.message_id not in self._by_id:
                message = Message(id=event.message_id, role="user", run_id=event.run_id, ts=event.ts)
                message.parts.append(TextPart(id=event.message_id, text=event.content))
                self._add(message)
        else:
            self._apply_to_run(event)

    def _apply_to_run(self, event: Event) -> None:
        message = self._by_run.get(event.run_id) if event.run_id is not None else None
        if message is None:
            return
        if isinstance(event, TextDelta | ReasoningDelta):
            key = (message.id, event.part_id)
            chunks = self._chunks.get(key)
            if chunks is None:
                part_type = TextPart if isinstance(event, TextDelta) else ReasoningPart
                message.parts.append(part_type(id=event.part_id, text=""))
                chunks = self._chunks[key] = []
            chunks.append(event.delta)
        elif isinstance(event, ToolCall):
            tool = ToolPart(call_id=event.call_id, name=event.name, input=event.input)
            self._tools[(message.id, event.call_id)] = tool
            message.parts.append(tool)
        elif isinstance(event, ToolResult):
            found = self._tools.get((message.id, event.call_id))
            if found is not None:
                found.output, found.error = event.output, event.error
                found.state = "failed" if event.error is not None else "completed"
        elif isinstance(event, Data):
            message.parts.append(DataPart(name=event.name, value=event.value))
        elif isinstance(event, Status):
            message.status_text = event.text
        elif isinstance(event, ErrorEvent):
            message.error = event.message
        elif isinstance(event, RunEnd):
            message.status, message.reason = event.status, event.reason
            self._active.pop(message.run_id or "", None)

    def build(self) -> SessionView:
        """The view so far. It shares its objects with the builder: serialise it or stop folding before reuse."""
        for message in self._messages:
            for part in message.parts:
                if isinstance(part, TextPart | ReasoningPart):
                    chunks = self._chunks.get((message.id, part.id))
                    if chunks is None:
                        continue
                    if len(chunks) > 1:
                        chunks[:] = ["".join(chunks)]
                    part.text = chunks[0] if chunks else ""
        return SessionView(
            session=self.session,
            cursor=self.cursor,
            messages=list(self._messages),
            active_runs=list(self._active.values()),
            truncated=self.truncated,
        )
