"""The hub: one connection to a backend, and every session, writer and control loop that uses it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from ._control import Server, SessionControl
from ._util import IdFactory, RateBudget, now_ms, validate_session_id
from ._writer import SessionWriter
from .backend import Backend, backend_from_url
from .coalesce import Coalesce
from .errors import ConfigurationError, EventTooLarge, HubClosed
from .events import Event, encode
from .session import PresenceMember, Session
from .view import ViewBuilder

if TYPE_CHECKING:
    from .run import Run

__all__ = ["Hub", "connect"]

logger = logging.getLogger("durable_ai")

# Sessions whose folded view a hub keeps between snapshots (the most recently snapshotted ones).
_SNAPSHOT_VIEWS_KEPT = 256


class Hub:
    """A connection to one backend. Open it with ``async with``; everything it started stops on close.

    Args:
        backend: the broker to use.
        coalesce: how runs batch deltas into broker messages (default: 40 ms windows, 16 KiB).
        rate_limit: broker messages per second per session, shared by all runs of a session in this hub.
            ``None`` takes the backend's limit (Ably: 50); ``math.inf`` removes it.
        max_event_bytes: the largest event a run may write (:class:`EventTooLarge` above it). Events larger
            than one broker message are split and reassembled.
        max_control_bytes: the largest control a client may send; larger ones are rejected.
        publish_timeout: how long a write waits for the broker before :class:`PublishError` (the events stay
            buffered and are retried).
        reconnect_timeout: how long a reader keeps reconnecting to a broker that is gone.
        snapshots: save a snapshot of the session's view after each run, so late joiners read little. A hub
            always uses the snapshots it finds; this only decides whether it saves them.
        close_timeout: how long closing waits for buffered events to be published.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        coalesce: Coalesce | None = None,
        rate_limit: float | None = None,
        max_event_bytes: int = 1024 * 1024,
        max_control_bytes: int = 64 * 1024,
        publish_timeout: float = 30.0,
        reconnect_timeout: float = 300.0,
        snapshots: bool = True,
        close_timeout: float = 5.0,
    ) -> None:
        if max_event_bytes < 1024 or max_control_bytes < 256:
            raise ConfigurationError("max_event_bytes must be >= 1024 and max_control_bytes >= 256")
        self.backend = backend
        self.coalesce = coalesce if coalesce is not None else Coalesce()
        limit = rate_limit if rate_limit is not None else backend.limits.max_messages_per_second
        self.rate_limit = None if limit is None or math.isinf(limit) else float(limit)
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ConfigurationError("rate_limit must be positive")
        self.max_event_bytes = max_event_bytes
        self.max_control_bytes = max_control_bytes
        self.publish_timeout = publish_timeout
        self.reconnect_timeout = reconnect_timeout
        self.snapshots = snapshots
        self.close_timeout = close_timeout
        self._state: Literal["new", "open", "closing", "closed"] = "new"
        self._new_id = IdFactory()
        self._writers: dict[str, SessionWriter] = {}
        self._controls: dict[str, SessionControl] = {}
        self._control_starts: dict[str, asyncio.Task[SessionControl]] = {}
        self._servers: set[Server] = set()
        self._snapshot_tasks: dict[str, asyncio.Task[None]] = {}
        self._snapshot_dirty: set[str] = set()
        self._snapshot_views: OrderedDict[str, ViewBuilder] = OrderedDict()

    def __repr__(self) -> str:
        return f"<Hub {type(self.backend).__name__} {self._state}>"

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._state in ("closing", "closed")

    async def open(self) -> Hub:
        """Connect to the backend. Idempotent; ``async with`` calls it."""
        if self._state == "new":
            await self.backend.open()
            self._state = "open"
        elif self.closed:
            raise HubClosed("this hub was closed; call durable_ai.connect() again")
        return self

    async def close(self) -> None:
        """Stop serving, publish what is buffered (up to ``close_timeout``), stop every task, disconnect."""
        if self._state != "open":
            self._state = "closed"
            return
        self._state = "closing"
        for server in list(self._servers):
            await server.stop()
        for control in list(self._controls.values()):
            await control.stop()
        for start in list(self._control_starts.values()):
            start.cancel()
            # Its acquirer already got any error it raised; closing only needs it finished.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await start
        self._controls.clear()
        for task in self._snapshot_tasks.values():
            task.cancel()
        for task in list(self._snapshot_tasks.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(w.close(self.close_timeout) for w in list(self._writers.values())))
        self._writers.clear()
        self._snapshot_views.clear()
        self._state = "closed"
        await self.backend.close()

    async def __aenter__(self) -> Hub:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def flush(self) -> None:
        """Wait until every buffered event is stored by the broker and pending snapshots are saved.

        Call it before a short-lived process (a serverless function) returns.
        """
        for writer in list(self._writers.values()):
            await writer.wait(writer.last_seq)
        while self._snapshot_tasks:
            await asyncio.gather(*list(self._snapshot_tasks.values()), return_exceptions=True)

    def _check_open(self) -> None:
        if self._state != "open":
            raise HubClosed("the hub is not open; use 'async with durable_ai.connect(...) as hub'")

    # -- sessions --------------------------------------------------------------------------------------------

    def session(self, session_id: str) -> Session:
        """A handle on a session. Cheap and without I/O; the id is validated here."""
        return Session(self, validate_session_id(session_id))

    # -- writers ---------------------------------------------------------------------------------------------

    def _acquire_writer(self, session: str) -> SessionWriter:
        self._check_open()
        writer = self._writers.get(session)
        if writer is None:
            budget = RateBudget(self.rate_limit).acquire if self.rate_limit is not None else None
            writer = SessionWriter(
                backend=self.backend,
                session=session,
                policy=self.coalesce,
                budget=budget,
                publish_timeout=self.publish_timeout,
                max_pending_bytes=max(8 * 1024 * 1024, self.coalesce.max_bytes * 4),
            )
            writer.on_retired = lambda: self._retire_writer(session, writer)
            self._writers[session] = writer
        writer.users += 1
        writer.closing = False
        return writer

    def _release_writer(self, writer: SessionWriter) -> None:
        writer.users -= 1
        if writer.users == 0 and not self.closed:
            writer.closing = True
            if writer.running:
                writer.wake()  # it retires itself once everything buffered is published
            else:
                self._retire_writer(writer.session, writer)

    def _retire_writer(self, session: str, writer: SessionWriter) -> None:
        if writer.users == 0 and self._writers.get(session) is writer:
            del self._writers[session]

    async def _commit(self, session: str, event: Event, *, wait: bool = True) -> None:
        """Write one trusted event in a broker message of its own (deduplicated by its id across processes).

        With ``wait``, return once the broker has it. Without, the event is queued in the session's writer,
        which publishes in order: anything this hub writes to the session later lands after it.
        """
        data = encode(event)
        if len(data) > self.max_event_bytes:
            raise EventTooLarge(len(data), self.max_event_bytes)
        writer = self._acquire_writer(session)
        try:
            seq = writer.add_encoded(id=event.id, run_id=event.run_id, data=data, standalone=True)
            if wait:
                await writer.wait(seq)
        finally:
            self._release_writer(writer)

    # -- control loops ---------------------------------------------------------------------------------------

    async def _acquire_control(self, session: str) -> SessionControl:
        self._check_open()
        control = self._controls.get(session)
        if control is None:
            starting = self._control_starts.get(session)
            if starting is None:
                starting = asyncio.get_running_loop().create_task(self._start_control(session))
                self._control_starts[session] = starting
            control = await asyncio.shield(starting)
        control.users += 1
        return control

    async def _start_control(self, session: str) -> SessionControl:
        control = SessionControl(self, session)
        try:
            await control.start()
        finally:
            self._control_starts.pop(session, None)
        self._controls[session] = control
        return control

    async def _release_control(self, session: str) -> None:
        control = self._controls.get(session)
        if control is None:
            return
        control.users -= 1
        if control.users == 0 and not control.runs and control.server is None:
            del self._controls[session]
            await control.stop()

    # -- presence and snapshots ------------------------------------------------------------------------------

    async def _presence_enter(self, run: Run) -> None:
        member = PresenceMember(member_id=run.id, role="agent", agent=run.agent, run_id=run.id, since=now_ms())
        try:
            await self.backend.enter_presence(run.session.id, run.id, encode(member))
        except Exception as exc:
            logger.warning("could not enter presence for run %s: %s", run.id, exc)

    async def _presence_leave(self, run: Run) -> None:
        try:
            await self.backend.leave_presence(run.session.id, run.id)
        except Exception as exc:
            logger.warning("could not leave presence for run %s: %s", run.id, exc)

    def _schedule_snapshot(self, session: str) -> None:
        if not self.snapshots or self._state != "open":
            return
        if session in self._snapshot_tasks:
            self._snapshot_dirty.add(session)
            return
        task = asyncio.get_running_loop().create_task(self._snapshot(session), name=f"durable-ai snapshot {session}")
        self._snapshot_tasks[session] = task

    async def _snapshot(self, session: str) -> None:
        try:
            while True:
                self._snapshot_dirty.discard(session)
                # The view folded for the previous snapshot is kept, so each snapshot folds only the new tail.
                builder = self._snapshot_views.pop(session, None)
                try:
                    builder = await self.session(session)._fold(builder)
                    if builder.cursor is not None:
                        await self.backend.save_snapshot(session, builder.build().model_dump_json().encode())
                    self._snapshot_views[session] = builder
                    while len(self._snapshot_views) > _SNAPSHOT_VIEWS_KEPT:
                        self._snapshot_views.popitem(last=False)
                except Exception as exc:
                    logger.warning("could not save a snapshot of session %r: %s", session, exc)
                if session not in self._snapshot_dirty:
                    return
        finally:
            self._snapshot_tasks.pop(session, None)


def connect(
    url: str | Backend = "memory://",
    *,
    coalesce: Coalesce | None = None,
    rate_limit: float | None = None,
    max_event_bytes: int = 1024 * 1024,
    max_control_bytes: int = 64 * 1024,
    publish_timeout: float = 30.0,
    reconnect_timeout: float = 300.0,
    snapshots: bool = True,
    close_timeout: float = 5.0,
) -> Hub:
    """A hub on the backend at ``url`` (``memory://``, ``nats://...``, ``ably://...``) or a backend instance.

    No I/O happens until the hub is opened: ``async with durable_ai.connect(url) as hub: ...``.
    """
    if isinstance(url, str):
        backend = backend_from_url(url)
    elif isinstance(url, Backend):
        backend = url
    else:
        raise ConfigurationError(f"expected a backend URL such as 'memory://' or a Backend, got {url!r}")
    return Hub(
        backend,
        coalesce=coalesce,
        rate_limit=rate_limit,
        max_event_bytes=max_event_bytes,
        max_control_bytes=max_control_bytes,
        publish_timeout=publish_timeout,
        reconnect_timeout=reconnect_timeout,
        snapshots=snapshots,
        close_timeout=close_timeout,
    )
