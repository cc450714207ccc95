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

Backend authors find the contract and its helpers in :mod:`durable_ai.backend`, the embedded reference in
:mod:`durable_ai.backends.memory`, and the conformance suite in :mod:`durable_ai.testing`.
"""

from __future__ import annotations

from .coalesce import Coalesce
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
    PublishRefused,
    RunClosed,
    RunIdInUse,
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
from .inbox import Inbox, SteerMessage
from .options import HubOptions
from .presence import PresenceMember
from .run import Run
from .serve import Handler, Server
from .session import ControlHandle, EventStream, Session
from .view import DataPart, Message, Part, ReasoningPart, RunInfo, SessionView, TextPart, ToolPart

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "AckTimeout",
    "BackendError",
    "BackendUnavailable",
    "Cancel",
    "Coalesce",
    "ConfigurationError",
    "Control",
    "ControlAck",
    "ControlHandle",
    "ControlTooLarge",
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
    "HubOptions",
    "Inbox",
    "InvalidCursor",
    "InvalidSessionId",
    "LogReset",
    "Message",
    "Part",
    "PayloadTooLarge",
    "PermissionDenied",
    "PresenceMember",
    "Prompt",
    "ProtocolError",
    "PublishError",
    "PublishRefused",
    "ReasoningDelta",
    "ReasoningPart",
    "Reset",
    "Run",
    "RunClosed",
    "RunEnd",
    "RunIdInUse",
    "RunInfo",
    "RunStart",
    "Server",
    "Session",
    "SessionView",
    "Status",
    "Steer",
    "SteerMessage",
    "Strategy",
    "TextDelta",
    "TextPart",
    "ToolCall",
    "ToolPart",
    "ToolResult",
    "UnknownBackend",
    "UnknownEvent",
    "UserMessage",
    "connect",
]
