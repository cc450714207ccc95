"""The errors durable-ai raises.

Usage mistakes are ``ValueError``/``RuntimeError`` subclasses so plain ``except ValueError`` code keeps working;
failures of the broker are ``BackendError``. Every error is a ``DurableAIError``::

    DurableAIError
    ├── ConfigurationError (ValueError)      a bad argument: fix the calling code
    │   ├── InvalidSessionId                 .session_id, .reason
    │   ├── InvalidCursor                    .cursor, .reason
    │   └── UnknownBackend                   .scheme, .package (what to install)
    ├── PayloadTooLarge (ValueError)         .size, .limit
    │   ├── EventTooLarge                    an event over the hub's max_event_bytes
    │   └── ControlTooLarge                  a control over the hub's max_control_bytes
    ├── ProtocolError (ValueError)           bytes that are not valid durable-ai wire data
    ├── RunClosed (RuntimeError)             writing to a run that is not entered (never, or no longer)
    ├── RunIdInUse (RuntimeError)            entering a run id that another writer holds; .session, .run_id
    ├── HubClosed (RuntimeError)             using a hub that is not open
    ├── AckTimeout (TimeoutError)            no control-ack arrived in time; .control_id
    └── BackendError                         the broker failed
        ├── BackendUnavailable (ConnectionError)  the broker cannot be reached (gone mid-run, refused)
        ├── PublishError                     the broker did not confirm in time; the events stay buffered
        ├── PublishRefused                   the broker refused a message for good; .message_id
        ├── PermissionDenied                 the credentials do not allow the operation
        └── LogReset                         a position no longer exists in the log; .reason
"""

from __future__ import annotations

__all__ = [
    "AckTimeout",
    "BackendError",
    "BackendUnavailable",
    "ConfigurationError",
    "ControlTooLarge",
    "DurableAIError",
    "EventTooLarge",
    "HubClosed",
    "InvalidCursor",
    "InvalidSessionId",
    "LogReset",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolError",
    "PublishError",
    "PublishRefused",
    "RunClosed",
    "RunIdInUse",
    "UnknownBackend",
]


class DurableAIError(Exception):
    """Base class of every error raised by durable-ai."""


class ConfigurationError(DurableAIError, ValueError):
    """An argument or setting is invalid; the calling code must change."""


class InvalidSessionId(ConfigurationError):
    """A session id that cannot name a channel on every backend."""

    def __init__(self, session_id: object, reason: str) -> None:
        self.session_id = session_id
        self.reason = reason
        super().__init__(f"invalid session id {session_id!r}: {reason}")


class InvalidCursor(ConfigurationError):
    """A cursor string that durable-ai did not produce."""

    def __init__(self, cursor: object, reason: str) -> None:
        self.cursor = cursor
        self.reason = reason
        super().__init__(f"invalid cursor {cursor!r}: {reason}")


class UnknownBackend(ConfigurationError):
    """No installed backend handles the URL's scheme.

    Attributes:
        scheme: the URL's scheme.
        package: what to install for a first-party scheme (``None`` for others).
        installed: the schemes that are installed.
    """

    def __init__(self, scheme: str, package: str | None, installed: tuple[str, ...] = ()) -> None:
        self.scheme = scheme
        self.package = package
        self.installed = installed
        hint = f"; install it with: {package}" if package else ""
        known = f" (installed: {', '.join(f'{name}://' for name in installed)})" if installed else ""
        super().__init__(f"no durable-ai backend is installed for '{scheme}://'{known}{hint}")


class PayloadTooLarge(DurableAIError, ValueError):
    """A payload over a configured size limit. Nothing was written."""

    what = "payload"

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"{self.what} of {size} bytes is over the limit of {limit} bytes; nothing was written")


class EventTooLarge(PayloadTooLarge):
    """An event whose encoded size is over the hub's ``max_event_bytes``."""

    what = "event"


class ControlTooLarge(PayloadTooLarge):
    """A control whose encoded size is over the hub's ``max_control_bytes``."""

    what = "control"


class ProtocolError(DurableAIError, ValueError):
    """Bytes that do not decode as durable-ai wire data."""


class RunClosed(DurableAIError, RuntimeError):
    """A write to a run whose ``async with`` block has already exited."""


class RunIdInUse(DurableAIError, RuntimeError):
    """Another writer holds this run id (in this hub, another hub or another process); nothing was written."""

    def __init__(self, session: str, run_id: str, detail: str) -> None:
        self.session = session
        self.run_id = run_id
        super().__init__(f"run id {run_id!r} is already used in session {session!r}: {detail}")


class HubClosed(DurableAIError, RuntimeError):
    """The hub is not open (never entered, or already closed)."""


class AckTimeout(DurableAIError, TimeoutError):
    """No ``control-ack`` for a control arrived within the timeout."""

    def __init__(self, control_id: str, timeout: float) -> None:
        self.control_id = control_id
        self.timeout = timeout
        super().__init__(f"no control-ack for control {control_id!r} within {timeout:g}s")


class BackendError(DurableAIError):
    """The broker failed an operation."""


class BackendUnavailable(BackendError, ConnectionError):
    """The broker cannot be reached."""


class PublishError(BackendError):
    """The broker did not confirm a write within ``publish_timeout``.

    Nothing is dropped: the events stay buffered in the hub and are published (once, thanks to idempotent message
    ids) when the broker is back. Do not write them again; a new write would be a new event.
    """


class PublishRefused(BackendError):
    """The broker refused a message for good (not a timeout, not an outage): its events were not stored.

    Later messages of the session go on. ``__cause__`` holds the broker's error.
    """

    def __init__(self, message_id: str, cause: BaseException) -> None:
        self.message_id = message_id
        super().__init__(f"the broker refused message {message_id!r} for good: {type(cause).__name__}: {cause}")


class PermissionDenied(BackendError):
    """The credentials in use do not allow the operation."""


class LogReset(BackendError):
    """A log position no longer exists: the log was recreated or retention dropped it.

    Backends raise it from ``read``; ``Session.events`` turns it into a ``reset`` event, never a silent gap.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
