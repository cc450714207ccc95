"""The durable-ai wire vocabulary, version 1.

A session has two logical channels. **events** is the committed, ordered log that trusted writers (agents, the
gateway) append to and every client reads. **control** carries requests from clients (``cancel``, ``steer``,
``prompt``); it is untrusted, and the agent side validates each control and answers with a ``control-ack``.

Every event is a JSON object with ``v`` (1), ``id`` (unique; the idempotency key), ``type`` (kebab-case),
``session``, ``run_id``, ``agent`` and ``ts`` (milliseconds since the Unix epoch). The backend assigns the cursor;
it is not part of the JSON. The vocabulary is a superset of the Vercel AI SDK UI-message-stream semantics.

One broker message holds one or more events as newline-delimited JSON (one event per line), so a batch of
coalesced deltas costs one message. An event too large for one broker message is split into ``fragment``
records that readers reassemble. Two more records are never delivered as events: ``log-start``, the first record
of every log (a reader from the start of the log that does not find it knows retention dropped the start), and
``tombstone``, written by ``session.delete()`` before the log is cleared (every reader yields ``reset``).

Unknown event types (from a newer writer) are delivered as :class:`UnknownEvent`, untouched. Unknown or malformed
controls are rejected with a ``control-ack``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from .errors import ConfigurationError, ControlTooLarge, ProtocolError

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


class BaseEvent(BaseModel):
    """What every event has: ``v``, ``id``, ``type``, ``session``, ``run_id``, ``agent``, ``ts``, and a cursor."""

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


def set_cursor(event: BaseEvent, cursor: str | None) -> None:
    """Give a read event its cursor (readers do; the cursor is not part of the JSON)."""
    object.__setattr__(event, "__pydantic_private__", {"cursor": cursor})


class RunStart(BaseEvent):
    """A run (one response of one agent) began. ``message_id`` names the assistant message it produces, and
    ``input_message_id`` the user message it answers (when there is one)."""

    type: Literal["run-start"] = "run-start"
    parent_run_id: str | None = None
    message_id: _Id
    input_message_id: _Id | None = None


class TextDelta(BaseEvent):
    """A piece of answer text; deltas with the same ``part_id`` concatenate into one text part."""

    type: Literal["text-delta"] = "text-delta"
    part_id: _Id
    delta: str


class ReasoningDelta(BaseEvent):
    """A piece of reasoning text; deltas with the same ``part_id`` concatenate into one reasoning part."""

    type: Literal["reasoning-delta"] = "reasoning-delta"
    part_id: _Id
    delta: str


class ToolCall(BaseEvent):
    """The agent called a tool."""

    type: Literal["tool-call"] = "tool-call"
    call_id: _Id
    name: str
    input: JsonValue = None


class ToolResult(BaseEvent):
    """The result of a tool call: ``output`` on success, ``error`` on failure."""

    type: Literal["tool-result"] = "tool-result"
    call_id: _Id
    output: JsonValue = None
    error: str | None = None


class Status(BaseEvent):
    """Progress for the UI ("reading 3 pages")."""

    type: Literal["status"] = "status"
    text: str


class Data(BaseEvent):
    """Application-defined typed data (citations, UI state...)."""

    type: Literal["data"] = "data"
    name: str
    value: JsonValue = None


class ErrorEvent(BaseEvent):
    """An error inside a run. A failed run writes one before its ``run-end``."""

    type: Literal["error"] = "error"
    message: str


class RunEnd(BaseEvent):
    """A run finished: ``completed``, ``cancelled`` (with the cancel's reason) or ``failed``."""

    type: Literal["run-end"] = "run-end"
    status: RunStatus
    reason: str | None = None


class UserMessage(BaseEvent):
    """A user message the agent side accepted (from a ``prompt`` or a ``steer``)."""

    type: Literal["user-message"] = "user-message"
    message_id: _Id
    content: str


class ControlAck(BaseEvent):
    """The agent side's answer to a control: ``applied``, ``rejected`` or ``ignored``, with a reason."""

    type: Literal["control-ack"] = "control-ack"
    control_id: str | None
    control_type: str | None = None
    outcome: AckOutcome
    reason: str | None = None


class Reset(BaseEvent):
    """The events after the requested cursor no longer exist (log recreated, retention); rebuild your state.

    Synthesised by the reader, never stored. The events that follow start at the earliest retained point.
    """

    type: Literal["reset"] = "reset"
    reason: str


class UnknownEvent(BaseEvent):
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

KNOWN_EVENTS: dict[str, type[BaseEvent]] = {
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


class BaseControl(BaseModel):
    """What every control has: ``v``, ``id``, ``type``, ``ts``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    id: _Id
    type: str
    ts: int = 0


class Cancel(BaseControl):
    """Stop a run (``run_id``) or every active run of the session (``run_id=None``)."""

    type: Literal["cancel"] = "cancel"
    run_id: str | None = None
    reason: str | None = Field(default=None, max_length=1000)


class Steer(BaseControl):
    """Guidance for a run that is working (``run_id``), or for every active run (``run_id=None``)."""

    type: Literal["steer"] = "steer"
    run_id: str | None = None
    text: str


class Prompt(BaseControl):
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


LOG_START = "log-start"
"""The record type that opens every events log (see the module docstring)."""
TOMBSTONE = "tombstone"
"""The record type ``session.delete()`` writes before it clears the log."""


def encode(model: BaseModel) -> bytes:
    """The compact JSON of an event or control, as it goes on the wire.

    Raises :class:`ConfigurationError` for text that cannot be encoded as UTF-8 (a lone surrogate).
    """
    try:
        return model.__pydantic_serializer__.to_json(model, exclude_none=False)
    except PydanticSerializationError as exc:
        raise ConfigurationError(f"cannot encode {getattr(model, 'type', 'it')} as UTF-8 JSON: {exc}") from None


def record(kind: str, *, id: str, session: str, ts: int) -> bytes:
    """A ``log-start`` or ``tombstone`` record."""
    return json.dumps({"v": PROTOCOL_VERSION, "type": kind, "id": id, "session": session, "ts": ts}).encode()


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
    except RecursionError:
        raise ControlRejected("control is nested too deeply", None, None) from None
    except ValueError:
        raise ControlRejected("control is not JSON", None, None) from None
    if not isinstance(obj, dict):
        raise ControlRejected("control is not a JSON object", None, None)
    try:
        # JSON escapes can spell lone surrogates, which no answer to the control could be encoded with.
        json.dumps(obj, ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError):
        raise ControlRejected("control holds text that is not valid Unicode", None, None) from None
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
