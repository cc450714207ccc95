"""The durable-ai wire vocabulary, version 1.

A session has two logical channels. **events** is the committed, ordered log that trusted writers (agents, the
gateway) append to and every client reads. **control** carries requests from clients (``cancel``, ``steer``,
``prompt``); it is untrusted, and the agent side validates each control and answers with a ``control-ack``.

Every event is a JSON object with ``v`` (1), ``id`` (unique; the idempotency key), ``type`` (kebab-case),
``session``, ``run_id``, ``agent`` and ``ts`` (milliseconds since the Unix epoch). The backend assigns the cursor;
it is not part of the JSON. The vocabulary is a superset of the Vercel AI SDK UI-message-stream semantics.

One broker message holds one or more events as newline-delimited JSON (one event per line), so a batch of
coalesced deltas costs one message. An event too large for one broker message is split into ``fragment``
records that readers reassemble; fragments are never delivered to subscribers.

Unknown event types (from a newer writer) are delivered as :class:`UnknownEvent`, untouched. Unknown or malformed
controls are rejected with a ``control-ack``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError

from .errors import ControlTooLarge, ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "Cancel",
    "Control",
    "ControlAck",
    "Data",
    "ErrorEvent",
    "Event",
    "Prompt",
    "ReasoningDelta",
    "Reset",
    "RunEnd",
    "RunStart",
    "Status",
    "Steer",
    "Strategy",
    "TextDelta",
    "ToolCall",
    "ToolResult",
    "UnknownEvent",
    "UserMessage",
]

PROTOCOL_VERSION = 1

Strategy: TypeAlias = Literal["enqueue", "interrupt", "reject", "steer"]
"""What the agent side does with a follow-up prompt that arrives while a run is active."""

RunStatus: TypeAlias = Literal["completed", "cancelled", "failed"]
AckOutcome: TypeAlias = Literal["applied", "rejected", "ignored"]

_Id = Annotated[str, Field(min_length=1, max_length=128)]


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    v: Literal[1] = 1
    id: _Id
    type: str
    session: str
    run_id: str | None = None
    agent: str | None = None
    ts: int = Field(description="Milliseconds since the Unix epoch, set by the writer.")

    # The cursor is reader-side state, not wire data. It lives in ``__pydantic_private__`` without a declared
    # PrivateAttr: declaring one makes pydantic initialise private state on every validation, a third of the
    # cost of parsing an event during catch-up.

    @property
    def cursor(self) -> str | None:
        """Where this event sits in the session's log; pass it to ``events(after=...)`` to resume after it."""
        private = self.__pydantic_private__
        return private.get("cursor") if private else None

    def _set_cursor(self, cursor: str | None) -> None:
        object.__setattr__(self, "__pydantic_private__", {"cursor": cursor})


class RunStart(_Event):
    """A run (one response of one agent) began. ``message_id`` names the assistant message it produces."""

    type: Literal["run-start"] = "run-start"
    parent_run_id: str | None = None
    message_id: _Id


class TextDelta(_Event):
    """A piece of answer text; deltas with the same ``part_id`` concatenate into one text part."""

    type: Literal["text-delta"] = "text-delta"
    part_id: _Id
    delta: str


class ReasoningDelta(_Event):
    """A piece of reasoning text; deltas with the same ``part_id`` concatenate into one reasoning part."""

    type: Literal["reasoning-delta"] = "reasoning-delta"
    part_id: _Id
    delta: str


class ToolCall(_Event):
    """The agent called a tool."""

    type: Literal["tool-call"] = "tool-call"
    call_id: _Id
    name: str
    input: JsonValue = None


class ToolResult(_Event):
    """The result of a tool call: ``output`` on success, ``error`` on failure."""

    type: Literal["tool-result"] = "tool-result"
    call_id: _Id
    output: JsonValue = None
    error: str | None = None


class Status(_Event):
    """Progress for the UI ("reading 3 pages")."""

    type: Literal["status"] = "status"
    text: str


class Data(_Event):
    """Application-defined typed data (citations, UI state...)."""

    type: Literal["data"] = "data"
    name: str
    value: JsonValue = None


class ErrorEvent(_Event):
    """An error inside a run. A failed run writes one before its ``run-end``."""

    type: Literal["error"] = "error"
    message: str


class RunEnd(_Event):
    """A run finished: ``completed``, ``cancelled`` (with the cancel's reason) or ``failed``."""

    type: Literal["run-end"] = "run-end"
    status: RunStatus
    reason: str | None = None


class UserMessage(_Event):
    """A user message the agent side accepted (from a ``prompt`` or a ``steer``)."""

    type: Literal["user-message"] = "user-message"
    message_id: _Id
    content: str


class ControlAck(_Event):
    """The agent side's answer to a control: ``applied``, ``rejected`` or ``ignored``, with a reason."""

    type: Literal["control-ack"] = "control-ack"
    control_id: str | None
    control_type: str | None = None
    outcome: AckOutcome
    reason: str | None = None


class Reset(_Event):
    """The events after the requested cursor no longer exist (log recreated, retention); rebuild your state.

    Synthesised by the reader, never stored. The events that follow start at the earliest retained point.
    """

    type: Literal["reset"] = "reset"
    reason: str


class UnknownEvent(_Event):
    """An event of a type (or version) this library does not know; every field is kept as received."""

    id: str = ""
    session: str = ""
    ts: int = 0

    @property
    def raw(self) -> dict[str, Any]:
        """The event exactly as it was received, to forward or inspect."""
        return self.model_dump(exclude_unset=True)


Event: TypeAlias = (
    RunStart
    | TextDelta
    | ReasoningDelta
    | ToolCall
    | ToolResult
    | Status
    | Data
    | ErrorEvent
    | RunEnd
    | UserMessage
    | ControlAck
    | Reset
    | UnknownEvent
)
"""Any event a subscriber can receive."""

KNOWN_EVENTS: dict[str, type[_Event]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        RunStart,
        TextDelta,
        ReasoningDelta,
        ToolCall,
        ToolResult,
        Status,
        Data,
        ErrorEvent,
        RunEnd,
        UserMessage,
        ControlAck,
        Reset,
    )
}


class _Control(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    id: _Id
    type: str
    ts: int = 0


class Cancel(_Control):
    """Stop a run (``run_id``) or every active run of the session (``run_id=None``)."""

    type: Literal["cancel"] = "cancel"
    run_id: str | None = None
    reason: str | None = Field(default=None, max_length=1000)


class Steer(_Control):
    """Guidance for a run that is working (``run_id``), or for every active run (``run_id=None``)."""

    type: Literal["steer"] = "steer"
    run_id: str | None = None
    text: str


class Prompt(_Control):
    """A follow-up user message. ``strategy`` asks for a multitask strategy; the agent side decides."""

    type: Literal["prompt"] = "prompt"
    message_id: _Id
    content: str
    strategy: Strategy | None = None


Control: TypeAlias = Annotated[Cancel | Steer | Prompt, Field(discriminator="type")]
"""Any control a client can send."""

_CONTROL_ADAPTER: TypeAdapter[Cancel | Steer | Prompt] = TypeAdapter(Control)
_KNOWN_CONTROLS = ("cancel", "steer", "prompt")


def parse_event(obj: dict[str, Any]) -> Event:
    """Build the typed event for one decoded JSON object; unknown or unreadable ones pass through untouched."""
    cls = KNOWN_EVENTS.get(obj.get("type"))  # type: ignore[arg-type]
    if cls is not None and obj.get("v") == PROTOCOL_VERSION:
        try:
            return cls.model_validate(obj)  # type: ignore[return-value]
        except ValidationError:
            pass
    return UnknownEvent.model_construct(**obj)


def encode(model: BaseModel) -> bytes:
    """The compact JSON of an event or control, as it goes on the wire."""
    return model.__pydantic_serializer__.to_json(model, exclude_none=False)


_DECODER = json.JSONDecoder()


def _record(line: bytes) -> dict[str, Any]:
    try:
        text = line.decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"a broker message line is not UTF-8: {line[:80]!r}") from exc
    try:
        # raw_decode skips json.loads' encoding detection and wrapping: half the cost of a catch-up's decoding.
        obj, end = _DECODER.raw_decode(text)
        if end != len(text) and text[end:].strip():
            raise ValueError("extra data after the JSON value")
    except ValueError:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ProtocolError(f"a broker message line is not JSON: {line[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"a broker message line is not a JSON object: {line[:80]!r}")
    return obj


def decode_records(data: bytes) -> list[dict[str, Any]]:
    """Split one broker message into its JSON records (one per line)."""
    if data and b"\n" not in data:  # the common case: one event per message
        return [_record(data)]
    return [_record(line) for line in data.split(b"\n") if line.strip()]


class ControlRejected(ProtocolError):
    """A control that fails validation; carries what could still be read of it for the ``control-ack``."""

    def __init__(self, reason: str, control_id: str | None, control_type: str | None) -> None:
        self.reason = reason
        self.control_id = control_id
        self.control_type = control_type
        super().__init__(reason)


def parse_control(data: bytes, *, max_bytes: int) -> Cancel | Steer | Prompt:
    """Validate one untrusted control. Raises :class:`ControlRejected` with the reason to acknowledge."""
    if len(data) > max_bytes:
        raise ControlRejected(str(ControlTooLarge(len(data), max_bytes)), None, None)
    try:
        obj = json.loads(data)
    except ValueError:
        raise ControlRejected("control is not JSON", None, None) from None
    if not isinstance(obj, dict):
        raise ControlRejected("control is not a JSON object", None, None)
    raw_id, raw_type = obj.get("id"), obj.get("type")
    control_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 128 else None
    control_type = raw_type if isinstance(raw_type, str) and len(raw_type) <= 64 else None
    if control_type not in _KNOWN_CONTROLS:
        raise ControlRejected(f"unknown control type {control_type!r}", control_id, control_type)
    try:
        return _CONTROL_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "control"
        raise ControlRejected(f"malformed {control_type}: {where}: {first['msg']}", control_id, control_type) from None


def event_schema() -> dict[str, Any]:
    """JSON Schema of every known event type (a discriminated union on ``type``)."""
    union = Annotated[
        RunStart
        | TextDelta
        | ReasoningDelta
        | ToolCall
        | ToolResult
        | Status
        | Data
        | ErrorEvent
        | RunEnd
        | UserMessage
        | ControlAck
        | Reset,
        Field(discriminator="type"),
    ]
    return TypeAdapter(union).json_schema(mode="serialization")


def control_schema() -> dict[str, Any]:
    """JSON Schema of every control type (a discriminated union on ``type``)."""
    return _CONTROL_ADAPTER.json_schema(mode="validation")
