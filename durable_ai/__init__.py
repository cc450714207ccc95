"""durable-ai: durable sessions for AI chat and agent streams.

Agents write events (token deltas, tool calls, status) into a persistent, resumable session; any number of
clients subscribe, resume exactly where they left off, and send typed ``cancel``/``steer``/``prompt`` controls
upstream. Sessions live on a backend chosen by URL: ``memory://`` (embedded), ``nats://``, ``ably://``.

    async with durable_ai.connect("memory://") as hub:
        session = hub.session("chat-42")
        async with session.run(agent="writer") as run:
            await run.text("Hello")
        async for event in session.events(follow=False):
            print(event.type, event.cursor)
"""

from __future__ import annotations

from ._control import Handler, Server
from ._util import RateBudget, validate_session_id
from .backend import Backend, BackendLimits, Channel, ChannelKind, StoredMessage, backend_from_url
from .backends.memory import MemoryBackend
from .coalesce import Coalesce
from .cursor import Cursor, LogPosition
from .errors import (
    AckTimeout,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    ControlTooLarge,
    DurableAIError,
    EventTooLarge,
    HubClosed,
    InvalidCursor,
    InvalidSessionId,
    LogReset,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    PublishError,
    RunClosed,
    UnknownBackend,
)
from .events import (
    PROTOCOL_VERSION,
    Cancel,
    Control,
    ControlAck,
    Data,
    ErrorEvent,
    Event,
    Prompt,
    ReasoningDelta,
    Reset,
    RunEnd,
    RunStart,
    Status,
    Steer,
    Strategy,
    TextDelta,
    ToolCall,
    ToolResult,
    UnknownEvent,
    UserMessage,
)
from .hub import Hub, connect
from .run import Inbox, Run, SteerMessage
from .session import ControlHandle, EventStream, PresenceMember, Session
from .view import DataPart, Message, Part, ReasoningPart, RunInfo, SessionView, TextPart, ToolPart

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "AckTimeout",
    "Backend",
    "BackendError",
    "BackendLimits",
    "BackendUnavailable",
    "Cancel",
    "Channel",
    "ChannelKind",
    "Coalesce",
    "ConfigurationError",
    "Control",
    "ControlAck",
    "ControlHandle",
    "ControlTooLarge",
    "Cursor",
    "Data",
    "DataPart",
    "DurableAIError",
    "ErrorEvent",
    "Event",
    "EventStream",
    "EventTooLarge",
    "Handler",
    "Hub",
    "HubClosed",
    "Inbox",
    "InvalidCursor",
    "InvalidSessionId",
    "LogPosition",
    "LogReset",
    "MemoryBackend",
    "Message",
    "Part",
    "PayloadTooLarge",
    "PermissionDenied",
    "PresenceMember",
    "Prompt",
    "ProtocolError",
    "PublishError",
    "RateBudget",
    "ReasoningDelta",
    "ReasoningPart",
    "Reset",
    "Run",
    "RunClosed",
    "RunEnd",
    "RunInfo",
    "RunStart",
    "Server",
    "Session",
    "SessionView",
    "Status",
    "Steer",
    "SteerMessage",
    "StoredMessage",
    "Strategy",
    "TextDelta",
    "TextPart",
    "ToolCall",
    "ToolPart",
    "ToolResult",
    "UnknownBackend",
    "UnknownEvent",
    "UserMessage",
    "backend_from_url",
    "connect",
    "validate_session_id",
]
