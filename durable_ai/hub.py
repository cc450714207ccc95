"""The hub: one connection to a backend, and every session, run and server that uses it."""

from __future__ import annotations

from types import TracebackType
from typing import Unpack

from ._runtime import HubRuntime
from ._util import validate_session_id
from .backend import backend_from_url
from .backends.base import Backend
from .errors import ConfigurationError
from .options import HubOptions, Settings
from .session import Session

__all__ = ["Hub", "connect"]


class Hub:
    """A connection to one backend. Open it with ``async with``; everything it started stops on close.

    Args:
        backend: a backend URL (``memory://``, ``nats://...``, ``ably://...``) or a :class:`Backend` instance.
        **options: see :class:`~durable_ai.options.HubOptions` (``coalesce``, ``rate_limit``,
            ``publish_timeout``, ``close_timeout``...).

    Closing drains: runs still in flight are cancelled with the reason "the agent process is shutting down"
    and write their ``run-end``; buffered events and pending snapshots are stored, all within
    ``close_timeout``; then every background task stops and the backend disconnects.
    """

    def __init__(self, backend: str | Backend = "memory://", **options: Unpack[HubOptions]) -> None:
        if isinstance(backend, str):
            backend = backend_from_url(backend)
        elif not isinstance(backend, Backend):
            raise ConfigurationError(f"expected a backend URL such as 'memory://' or a Backend, got {backend!r}")
        self.backend = backend
        self.settings = Settings.resolve(options, backend.limits.max_messages_per_second)
        """The options this hub runs with."""
        self._runtime = HubRuntime(backend, self.settings)

    def __repr__(self) -> str:
        return f"<Hub {type(self.backend).__name__} {self._runtime.state}>"

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the hub is closing or closed."""
        return self._runtime.closed

    async def open(self) -> Hub:
        """Connect to the backend. Idempotent; ``async with`` calls it."""
        await self._runtime.open()
        return self

    async def close(self) -> None:
        """Cancel the runs in flight (each writes its ``run-end``), store buffered events and pending snapshots
        within ``close_timeout``, stop every task, disconnect."""
        await self._runtime.close()

    async def __aenter__(self) -> Hub:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def flush(self) -> None:
        """Wait until every buffered event is stored by the broker and pending snapshots are saved.

        Call it before a short-lived process (a serverless function) returns, if it keeps the hub open.
        """
        await self._runtime.flush()

    # -- sessions --------------------------------------------------------------------------------------------

    def session(self, session_id: str) -> Session:
        """A handle on a session. Cheap and without I/O; the id is validated here."""
        return Session(self._runtime, validate_session_id(session_id))


def connect(url: str | Backend = "memory://", **options: Unpack[HubOptions]) -> Hub:
    """A hub on the backend at ``url`` (``memory://``, ``nats://...``, ``ably://...``) or a backend instance.

    No I/O happens until the hub is opened: ``async with durable_ai.connect(url) as hub: ...``. The options are
    :class:`~durable_ai.options.HubOptions`.
    """
    return Hub(url, **options)
