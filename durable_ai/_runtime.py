"""What a hub runs: one owner per session, and a supervisor that owns every background task.

A :class:`SessionRuntime` is the only object that acquires and releases a session's engines in one hub: its
writer, its control loop, its local runs and its server. So the promises at the edges of a run's life are kept in
one place:

- **a run that started ends**: once its ``run-start`` is queued, every way out of entering or leaving a run
  writes its ``run-end`` (:meth:`SessionRuntime.enter_run`, :meth:`SessionRuntime.exit_run`);
- **close drains**: :meth:`HubRuntime.close` cancels the runs in flight with a reason, lets each write its
  ``run-end``, stores buffered events and pending snapshots within ``close_timeout``, then stops every task and
  the backend;
- **controls get answers**: the control loop hands every parsed control to the owner, which applies it to the
  runs it holds and answers within the session's control budget.

The owner knows runs and servers only through the small interfaces below; it never reaches into them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from ._control import ControlLoop
from ._load import LoadGauge
from ._reader import ReadOptions, fold, fold_with_tail
from ._tail import Tail, join_snapshot
from ._util import IdFactory, RateBudget, derived_id, now_ms
from ._writer import SessionWriter
from .backends.base import Backend, Channel, OpensLogs, PublishesAhead, ReadsSince
from .backends.kit import cancel_and_wait
from .cursor import Cursor, LogPosition
from .errors import ConfigurationError, HubClosed, PublishError, RunIdInUse
from .events import (
    TOMBSTONE,
    BaseEvent,
    Cancel,
    ControlAck,
    ControlRejected,
    ErrorEvent,
    Prompt,
    RunEnd,
    RunStart,
    Steer,
    UserMessage,
    decode_records,
    encode,
    record,
)
from .inbox import Inbox, SteerMessage
from .options import Settings
from .presence import PresenceMember
from .view import ViewBuilder

__all__ = ["MAX_REASON", "SHUTDOWN_REASON", "HubRuntime", "LocalRun", "PromptSink", "SessionRuntime", "Supervisor"]

logger = logging.getLogger("durable_ai")

SHUTDOWN_REASON = "the agent process is shutting down"
"""The reason of the ``run-end`` of runs that a closing hub cancels."""
MAX_REASON = 4000
"""The longest reason (or error message) a failed run's events carry."""

Outcome = Literal["applied", "rejected", "ignored"]
E = TypeVar("E", bound=BaseEvent)
RunStatus = Literal["completed", "cancelled", "failed"]

# Sessions whose folded view a hub keeps between snapshots (the most recently snapshotted ones).
_SNAPSHOT_VIEWS_KEPT = 256
# Sessions a hub remembers as having their log-start record, and run ids it remembers as ended here.
_STARTED_KEPT = 10_000
_ENDED_KEPT = 1_000
# How often a session's dropped controls are reported.
_DROP_REPORT_SECONDS = 10.0


class LocalRun(Protocol):
    """What a session's owner needs of a run in its hub."""

    @property
    def id(self) -> str: ...
    @property
    def agent(self) -> str: ...
    @property
    def parent_run_id(self) -> str | None: ...
    @property
    def message_id(self) -> str: ...
    @property
    def input_message_id(self) -> str | None: ...
    @property
    def inbox(self) -> Inbox: ...
    @property
    def task(self) -> asyncio.Task[Any] | None:
        """The task running the run's block (once it is entered)."""
        ...

    @property
    def accepting(self) -> bool:
        """Starting or active: a cancel or a steer can still act on it."""
        ...

    def cancel(self, reason: str | None = None) -> bool:
        """Stop the run as a client's cancel would; ``False`` if it was stopping already."""
        ...


class PromptSink(Protocol):
    """What a session's owner needs of the server answering the session's prompts."""

    async def on_prompt(self, prompt: Prompt) -> None:
        """A validated prompt arrived."""

    def shutdown(self) -> None:
        """The hub is closing: start no run for a prompt still queued."""


class Supervisor:
    """Owns every background task of a hub: each is started here, and cancelled and awaited on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("background task %r failed", task.get_name(), exc_info=exc)

    async def close(self) -> None:
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class HubRuntime:
    """The state a hub runs with: the backend, settings, the session owners, the supervisor, snapshots."""

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        # The optional capabilities, checked once: a runtime protocol check costs more than a writer's set-up.
        self.sends_ahead = backend if isinstance(backend, PublishesAhead) else None
        self.opens_logs = backend if isinstance(backend, OpensLogs) else None
        self.reads_since = backend if isinstance(backend, ReadsSince) else None
        self.settings = settings
        self.new_id = IdFactory()
        self.supervisor = Supervisor()
        self.state: Literal["new", "open", "closing", "closed"] = "new"
        self._owners: dict[str, SessionRuntime] = {}
        self._started: OrderedDict[str, None] = OrderedDict()
        self._snapshot_tasks: dict[str, asyncio.Task[None]] = {}
        self._snapshot_dirty: set[str] = set()
        self._snapshot_views: OrderedDict[str, tuple[ViewBuilder, Tail]] = OrderedDict()
        self.load = LoadGauge()  # whether the loop is short of CPU: the writers' windows stretch then
        self.read_options = ReadOptions(
            reconnect_timeout=settings.reconnect_timeout,
            is_closed=lambda: self.closed,
            new_id=self.new_id,
            now_ms=now_ms,
        )

    @property
    def closed(self) -> bool:
        return self.state in ("closing", "closed")

    def check_open(self) -> None:
        if self.state != "open":
            raise HubClosed("the hub is not open; use 'async with durable_ai.connect(...) as hub'")

    # -- owners ----------------------------------------------------------------------------------------------

    def owner(self, session: str) -> SessionRuntime:
        """The owner of ``session`` in this hub (created on first use, dropped when nothing uses it)."""
        owner = self._owners.get(session)
        if owner is None:
            owner = self._owners[session] = SessionRuntime(self, session)
        return owner

    def drop(self, owner: SessionRuntime) -> None:
        if self._owners.get(owner.session) is owner:
            del self._owners[owner.session]

    @property
    def owners(self) -> list[SessionRuntime]:
        return list(self._owners.values())

    def log_started(self, session: str) -> bool:
        return session in self._started

    def mark_log_started(self, session: str) -> None:
        # Remembered so that a run start costs no head() when this hub wrote the session before. A deletion by
        # another process is not seen here: the new log's first message then lacks its log-start record, and a
        # view from the start of that log says truncated until the session's next snapshot.
        self._started[session] = None
        self._started.move_to_end(session)
        while len(self._started) > _STARTED_KEPT:
            self._started.popitem(last=False)

    def forget_session(self, session: str) -> None:
        """The session was deleted: what this hub knew of its log is void."""
        self._started.pop(session, None)
        self._snapshot_views.pop(session, None)
        owner = self._owners.get(session)
        if owner is not None:
            owner.log_deleted()

    # -- snapshots -------------------------------------------------------------------------------------------

    def schedule_snapshot(self, session: str) -> None:
        if not self.settings.snapshots or self.state == "closed":
            return
        if session in self._snapshot_tasks:
            self._snapshot_dirty.add(session)
            return
        self._snapshot_tasks[session] = self.supervisor.spawn(self._snapshot(session), f"durable-ai snapshot {session}")

    async def _snapshot(self, session: str) -> None:
        try:
            while True:
                self._snapshot_dirty.discard(session)
                # The view folded for the previous snapshot is kept, so each snapshot folds only the new tail.
                folded = self._snapshot_views.pop(session, None)
                try:
                    builder, tail = folded = await fold_with_tail(self.backend, session, folded, self.read_options)
                    if builder.cursor is not None:
                        view = builder.build().model_dump_json().encode()
                        await self.backend.save_snapshot(session, join_snapshot(view, tail.to_json(builder.cursor)))
                    self._snapshot_views[session] = folded
                    while len(self._snapshot_views) > _SNAPSHOT_VIEWS_KEPT:
                        self._snapshot_views.popitem(last=False)
                except Exception as exc:
                    logger.warning("could not save a snapshot of session %r: %s", session, exc)
                if session not in self._snapshot_dirty:
                    return
        finally:
            self._snapshot_tasks.pop(session, None)

    async def _snapshots_saved(self) -> None:
        while self._snapshot_tasks:
            await asyncio.gather(*list(self._snapshot_tasks.values()), return_exceptions=True)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        if self.state == "new":
            await self.backend.open()
            self.state = "open"
        elif self.closed:
            raise HubClosed("this hub was closed; call durable_ai.connect() again")

    async def flush(self) -> None:
        """Wait until every buffered event is stored (or refused) and pending snapshots are saved."""
        for owner in self.owners:
            await owner.flush()
        await self._snapshots_saved()

    async def close(self) -> None:
        """Cancel the runs in flight, let them end, store what is buffered, stop every task, disconnect."""
        if self.state != "open":
            self.state = "closed"
            return
        self.state = "closing"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.close_timeout
        try:
            for owner in self.owners:
                owner.shut_down()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.gather(*(owner.runs_ended() for owner in self.owners))
            for owner in self.owners:
                owner.stop_control()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._snapshots_saved()
                    await asyncio.gather(*(owner.presence_left() for owner in self.owners))
            remaining = max(0.0, deadline - loop.time())
            await asyncio.gather(*(owner.close_writer(remaining) for owner in self.owners))
        finally:
            self.state = "closed"
            await self.supervisor.close()
            self._owners.clear()
            self._snapshot_views.clear()
            await self.backend.close()


@dataclass(slots=True)
class _Presence:
    """A run's presence: entering, then waiting for the run to end, then leaving."""

    left: asyncio.Event = field(default_factory=asyncio.Event)
    entering: bool = True
    task: asyncio.Task[None] | None = None


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


class SessionRuntime:
    """The owner of one session in one hub: its writer, control loop, local runs and server (module docstring)."""

    def __init__(self, hub: HubRuntime, session: str) -> None:
        self.hub = hub
        self.session = session
        settings = hub.settings
        self._writer: SessionWriter | None = None
        self._runs: dict[str, LocalRun] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._presence: dict[str, _Presence] = {}
        self._leaving: list[_Presence] = []
        self._server: PromptSink | None = None
        self._control_task: asyncio.Task[None] | None = None
        self._control_start: asyncio.Task[None] | None = None
        self._no_runs = asyncio.Event()
        self._budget = RateBudget(settings.max_controls_per_second, burst=4 * settings.max_controls_per_second)
        self._dropped = 0
        self._dropped_reported = 0.0
        self._rate_budget = RateBudget(settings.rate_limit) if settings.rate_limit is not None else None

    # -- the writer ------------------------------------------------------------------------------------------

    def writer(self) -> SessionWriter:
        """The session's writer in this hub, kept until nothing uses it."""
        if self.hub.state == "closed":
            raise HubClosed("the hub was closed; nothing more can be written")
        writer = self._writer
        if writer is None:
            settings = self.hub.settings
            writer = self._writer = SessionWriter(
                backend=self.hub.backend,
                ahead=self.hub.sends_ahead,
                opens=self.hub.opens_logs,
                session=self.session,
                policy=settings.coalesce,
                budget=self._rate_budget.acquire if self._rate_budget is not None else None,
                publish_timeout=settings.publish_timeout,
                max_pending_bytes=max(8 * 1024 * 1024, settings.coalesce.max_bytes * 4),
                spawn=self.hub.supervisor.spawn,
                new_id=self.hub.new_id,
                log_started=self.hub.log_started(self.session),
                on_log_started=lambda: self.hub.mark_log_started(self.session),
                on_idle=lambda: self._writer_idle(writer),
                stretching=self.hub.load.stretching,
            )
        writer.keep()
        return writer

    def _writer_idle(self, writer: SessionWriter | None) -> None:
        if self._writer is writer and not self._in_use:
            self._writer = None
            self.hub.drop(self)

    @property
    def _in_use(self) -> bool:
        return bool(self._runs) or self._server is not None

    def _release(self) -> None:
        """Let go of what no run and no server needs any more."""
        if self._in_use:
            return
        self.stop_control()
        if self._writer is not None:
            self._writer.retire()
        else:
            self.hub.drop(self)

    def log_deleted(self) -> None:
        if self._writer is not None:
            self._writer.forget_log_start()

    async def commit(self, data: bytes, *, message_id: str, wait: bool = True) -> LogPosition | None:
        """Write one trusted event (or record) in a broker message of its own, deduplicated by its id across
        processes. With ``wait``, return where it landed once the broker has it; without, it is queued, and
        anything this hub writes to the session later lands after it."""
        writer = self.writer()
        try:
            landed = writer.add_standalone(id=message_id, data=data)
            if not wait:
                return None
            return await self._landed(landed)
        finally:
            self._release()

    async def _landed(self, landed: asyncio.Future[LogPosition]) -> LogPosition:
        try:
            async with asyncio.timeout(self.hub.settings.publish_timeout):
                return await asyncio.shield(landed)
        except TimeoutError:
            raise PublishError(
                f"an event of session {self.session!r} was not confirmed by the broker within "
                f"{self.hub.settings.publish_timeout:g}s; it stays buffered and is retried until the hub closes"
            ) from None

    async def flush(self) -> None:
        writer = self._writer
        if writer is not None:
            await writer.wait(writer.last_seq, own=False)

    async def close_writer(self, grace: float) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close(grace)

    # -- runs ------------------------------------------------------------------------------------------------

    async def enter_run(self, run: LocalRun, *, check_id: bool) -> SessionWriter:
        """Register a run and write its ``run-start``; returns the writer it writes through.

        With ``check_id`` (a run id the caller chose), the session's log is checked first and the ``run-start`` is
        deduplicated by the broker on the run id: a second writer gets :class:`RunIdInUse` and writes nothing.
        If entering fails or is cancelled once the ``run-start`` is queued, its ``run-end`` follows it.
        """
        self.hub.check_open()
        if run.id in self._runs:
            raise RunIdInUse(self.session, run.id, "a run with this id is active in this hub")
        self._runs[run.id] = run
        start: RunStart | None = None
        landed: asyncio.Future[LogPosition] | None = None
        try:
            writer = self.writer()
            if check_id:
                # The control log's end and the check of the run id are read at once (the run-start waits for both).
                control = asyncio.ensure_future(self._ensure_control())
                try:
                    epoch = await self._check_run_id(run.id)
                except BaseException:
                    await cancel_and_wait(control)
                    raise
                await control
                start = self._start_event(run, derived_id("run-start", f"{self.session}:{epoch}:{run.id}"))
                landed = writer.add_standalone(id=start.id, data=encode(start))
                position = await self._landed(landed)
                if not await self._stored_is(position, start):
                    start = None  # the broker kept another writer's run-start: nothing of ours is in the log
                    raise RunIdInUse(self.session, run.id, "another writer entered it at the same time")
            else:
                await self._ensure_control()
                start = self._start_event(run, self.hub.new_id())
                await writer.wait(writer.add_encoded(id=start.id, run_id=run.id, data=encode(start)))
        except BaseException as exc:
            if start is not None:
                self._end_after_failed_start(run, start, landed, exc)
            self._forget(run)
            raise
        self._enter_presence(run)
        return writer

    def _start_event(self, run: LocalRun, event_id: str) -> RunStart:
        return self._run_event(
            RunStart,
            run,
            event_id,
            parent_run_id=run.parent_run_id,
            message_id=run.message_id,
            input_message_id=run.input_message_id,
        )

    def _run_event(self, cls: type[E], run: LocalRun, event_id: str | None = None, **fields: Any) -> E:
        """An event of ``run``, stamped with its session, run, agent and the time."""
        event_id = event_id or self.hub.new_id()
        return cls(id=event_id, session=self.session, run_id=run.id, agent=run.agent, ts=now_ms(), **fields)

    async def _check_run_id(self, run_id: str) -> str:
        """Raise :class:`RunIdInUse` if the log already has a run with this id; return the log's epoch."""
        builder = await fold(self.hub.backend, self.session, None, self.hub.read_options, runs_only=True)
        if builder.has_run(run_id):
            active = any(info.run_id == run_id for info in builder.active_runs)
            detail = "a run with this id is active" if active else "a run with this id already ran in this session"
            raise RunIdInUse(self.session, run_id, detail)
        if builder.cursor is not None:
            return Cursor.parse(builder.cursor).epoch
        head = await self.hub.backend.head(Channel(self.session, "events"))
        return head.epoch if head is not None else ""

    async def _stored_is(self, position: LogPosition, start: RunStart) -> bool:
        """Whether the message at ``position`` holds this very ``run-start`` (not another writer's copy)."""
        reader = self.hub.backend.read(Channel(self.session, "events"), start=position, follow=False)
        mine = start.model_dump(mode="json")
        try:
            async for message in reader:
                return any(line == mine for line in decode_records(message.data))
        except Exception as exc:
            logger.warning("could not read back the run-start of run %r: %s", start.run_id, exc)
        finally:
            aclose = getattr(reader, "aclose", None)
            if aclose is not None:
                await aclose()
        return False

    def _end_after_failed_start(
        self, run: LocalRun, start: RunStart, landed: asyncio.Future[LogPosition] | None, exc: BaseException
    ) -> None:
        """A run whose ``run-start`` is queued failed to enter: make sure its ``run-end`` follows it."""
        if isinstance(exc, asyncio.CancelledError):
            status: RunStatus = "cancelled"
            reason = SHUTDOWN_REASON if self.hub.closed else "the agent task was cancelled"
        else:
            status, reason = "failed", f"{type(exc).__name__}: {exc}"[:MAX_REASON]
        end = self._end_event(run, status, reason)
        if landed is None:
            # Queued behind the run-start in the same writer: it lands after it, whenever that is.
            with contextlib.suppress(HubClosed):
                self.writer().add_encoded(id=end.id, run_id=run.id, data=encode(end))
            return

        async def end_once_ours() -> None:
            # Only a run-start that is ours may be ended: another writer's copy holds the same run id.
            try:
                position = await landed
            except Exception:
                return
            if await self._stored_is(position, start):
                with contextlib.suppress(HubClosed):
                    await self.hub.owner(self.session).commit(encode(end), message_id=end.id, wait=False)

        self.hub.supervisor.spawn(end_once_ours(), f"durable-ai end {run.id}")

    def _end_event(self, run: LocalRun, status: RunStatus, reason: str | None) -> RunEnd:
        return self._run_event(RunEnd, run, status=status, reason=reason)

    async def exit_run(self, run: LocalRun, status: RunStatus, reason: str | None, error: str | None) -> None:
        """Write a run's ``error`` (if it failed) and ``run-end``, let go of it, and leave its presence.

        Raises what kept the ``run-end`` from being confirmed (it stays queued); the run is let go either way.
        """
        presence = self._presence.get(run.id)
        try:
            writer = self.writer()
            if error is not None:
                event = self._run_event(ErrorEvent, run, message=error)
                writer.add_encoded(id=event.id, run_id=run.id, data=encode(event))
            end = self._end_event(run, status, reason)
            seq = writer.add_encoded(id=end.id, run_id=run.id, data=encode(end))
            # Shielded so the run-end lands even while the run's task is being cancelled.
            await asyncio.shield(writer.wait(seq))
        finally:
            self._forget(run)
            self.hub.schedule_snapshot(self.session)
        if presence is not None and presence.task is not None:
            # Left once the run-end is stored, so a client that sees the agent leave finds how its run ended.
            await asyncio.wait({presence.task}, timeout=self.hub.settings.publish_timeout)

    def _forget(self, run: LocalRun) -> None:
        if self._runs.get(run.id) is run:
            del self._runs[run.id]
            self._ended[run.id] = None
            while len(self._ended) > _ENDED_KEPT:
                self._ended.popitem(last=False)
        presence = self._presence.pop(run.id, None)
        if presence is not None:
            presence.left.set()
            if presence.entering and presence.task is not None:
                presence.task.cancel()
            self._leaving = [state for state in self._leaving if state.task is None or not state.task.done()]
            self._leaving.append(presence)
        self._no_runs.set()  # wakes runs_ended(), which checks what is left
        self._release()

    async def runs_ended(self) -> None:
        """Until every run has ended, but for one run by the task asking (it cannot end while it waits)."""
        current = asyncio.current_task()
        while self._runs and any(run.task is not current for run in self._runs.values()):
            self._no_runs.clear()
            await self._no_runs.wait()

    def shut_down(self) -> None:
        """The hub is closing: the server starts nothing new, and every run is cancelled with the reason."""
        if self._server is not None:
            self._server.shutdown()
        current = asyncio.current_task()
        for run in list(self._runs.values()):
            if run.task is not current:  # closing from inside a run must not cancel the close itself
                run.cancel(SHUTDOWN_REASON)

    # -- presence --------------------------------------------------------------------------------------------

    def _enter_presence(self, run: LocalRun) -> None:
        """Enter the run's presence in the background: it never delays the run's first token."""
        member = PresenceMember(member_id=run.id, role="agent", agent=run.agent, run_id=run.id, since=now_ms())
        state = _Presence()
        state.task = self.hub.supervisor.spawn(
            self._present(run.id, encode(member), state), f"durable-ai presence {run.id}"
        )
        self._presence[run.id] = state

    async def _present(self, member_id: str, data: bytes, state: _Presence) -> None:
        backend, settings = self.hub.backend, self.hub.settings
        try:
            try:
                async with asyncio.timeout(settings.publish_timeout):
                    await backend.enter_presence(self.session, member_id, data, role="agent")
            except asyncio.CancelledError:
                if not state.left.is_set():
                    raise
                _uncancel()  # the run ended while entering: leave at once
            except Exception as exc:
                logger.warning("could not enter presence for run %s: %s", member_id, exc)
            state.entering = False
            await state.left.wait()
        finally:
            timeout = settings.close_timeout if self.hub.closed else settings.publish_timeout
            try:
                async with asyncio.timeout(timeout):
                    await backend.leave_presence(self.session, member_id, role="agent")
            except Exception as exc:
                logger.warning("could not leave presence for run %s: %s", member_id, exc)

    async def presence_left(self) -> None:
        """Until every run that ended here has left presence."""
        tasks = [state.task for state in self._leaving if state.task is not None and not state.task.done()]
        if tasks:
            await asyncio.wait(tasks)

    # -- the control loop ------------------------------------------------------------------------------------

    async def _ensure_control(self) -> None:
        if self._control_task is not None and not self._control_task.done():
            return
        start = self._control_start
        if start is None or start.done():
            start = self._control_start = self.hub.supervisor.spawn(
                self._start_control(), f"durable-ai control start {self.session}"
            )
        await asyncio.shield(start)

    async def _start_control(self) -> None:
        settings = self.hub.settings
        loop = ControlLoop(
            self.hub.backend,
            self.session,
            sink=self,
            max_control_bytes=settings.max_control_bytes,
            is_closed=lambda: self.hub.closed,
        )
        run = await loop.start()
        if self._in_use and self.hub.state != "closed":
            self._control_task = self.hub.supervisor.spawn(run(), f"durable-ai control {self.session}")

    def stop_control(self) -> None:
        for task in (self._control_start, self._control_task):
            if task is not None:
                task.cancel()
        self._control_start = self._control_task = None

    # -- the server ------------------------------------------------------------------------------------------

    async def attach_server(self, server: PromptSink) -> None:
        """Make ``server`` answer this session's prompts in this hub."""
        self.hub.check_open()
        if self._server is not None:
            raise ConfigurationError(f"session {self.session!r} is already served by this hub")
        self._server = server
        try:
            await self._ensure_control()
        except BaseException:
            self.detach_server(server)
            raise

    def detach_server(self, server: PromptSink) -> None:
        if self._server is server:
            self._server = None
            self._release()

    # -- controls (the control loop's sink) ------------------------------------------------------------------

    async def on_control(self, control: Cancel | Steer | Prompt) -> None:
        answer = self._budget.take()
        if isinstance(control, Cancel):
            await self._cancel(control, answer)  # a stop is applied even past the budget, just not answered
        elif not answer:
            self._drop(control.type)
        elif isinstance(control, Steer):
            await self._steer(control)
        elif self._server is not None:
            await self._server.on_prompt(control)

    async def on_rejected(self, rejected: ControlRejected, position: str) -> None:
        if not self._budget.take():
            self._drop(rejected.control_type or "malformed")
            return
        await self.ack(rejected.control_id or f"@{position}", rejected.control_type, "rejected", rejected.reason)

    def _drop(self, kind: str) -> None:
        self._dropped += 1
        now = time.monotonic()
        if now - self._dropped_reported >= _DROP_REPORT_SECONDS:
            logger.warning(
                "session %r gets more controls than %g/s; dropped %d unanswered (latest: %s)",
                self.session,
                self.hub.settings.max_controls_per_second,
                self._dropped,
                kind,
            )
            self._dropped, self._dropped_reported = 0, now

    def _candidates(self, run_id: str | None) -> list[LocalRun]:
        if run_id is None:
            return list(self._runs.values())
        run = self._runs.get(run_id)
        return [run] if run is not None else []

    def _finished_here(self, run_id: str | None, candidates: list[LocalRun]) -> bool:
        return bool(candidates) or (run_id is not None and run_id in self._ended)

    async def _cancel(self, control: Cancel, answer: bool) -> None:
        candidates = self._candidates(control.run_id)
        targets = [run for run in candidates if run.accepting]
        if targets:
            fresh = [run.cancel(control.reason) for run in targets]
            reason = None if any(fresh) else "the run is already stopping"
            run_id = targets[0].id if len(targets) == 1 else None
            if answer:
                await self.ack(control.id, "cancel", "applied", reason, run_id=run_id)
        elif answer and self._finished_here(control.run_id, candidates):
            await self.ack(control.id, "cancel", "ignored", _nothing_to(control.run_id))

    async def _steer(self, control: Steer) -> None:
        candidates = self._candidates(control.run_id)
        targets = [run for run in candidates if run.accepting]
        if not targets:
            if self._finished_here(control.run_id, candidates):
                await self.ack(control.id, "steer", "ignored", _nothing_to(control.run_id))
            return
        open_targets = [run for run in targets if not run.inbox.full]
        if not open_targets:
            await self.ack(control.id, "steer", "rejected", "the run's inbox is full")
            return
        message_id = derived_id("steer", control.id)
        run_id = open_targets[0].id if len(open_targets) == 1 else None
        await self.commit_user_message(message_id, control.text, run_id)
        for run in open_targets:
            run.inbox.put(SteerMessage(control.text, control.id, message_id))
        await self.ack(control.id, "steer", "applied", None, run_id=run_id)

    async def commit_user_message(self, message_id: str, content: str, run_id: str | None) -> None:
        """Record a user message a client sent (queued; deduplicated across processes by its message id)."""
        event = UserMessage(
            id=derived_id("user-message", message_id),
            session=self.session,
            run_id=run_id,
            ts=now_ms(),
            message_id=message_id,
            content=content,
        )
        await self.commit(encode(event), message_id=event.id, wait=False)

    async def ack(
        self,
        control_id: str,
        control_type: str | None,
        outcome: Outcome,
        reason: str | None,
        *,
        run_id: str | None = None,
    ) -> None:
        """Answer a control with a ``control-ack`` (queued, so a slow broker never holds up the next control)."""
        event = ControlAck(
            id=derived_id(f"ack-{outcome}", control_id),
            session=self.session,
            run_id=run_id,
            ts=now_ms(),
            control_id=None if control_id.startswith("@") else control_id,
            control_type=control_type,
            outcome=outcome,
            reason=reason,
        )
        await self.commit(encode(event), message_id=event.id, wait=False)

    # -- deletion --------------------------------------------------------------------------------------------

    async def delete(self) -> None:
        """Write the tombstone after everything this hub wrote, then drop the session's logs and state."""
        tombstone_id = self.hub.new_id()
        tombstone = record(TOMBSTONE, id=tombstone_id, session=self.session, ts=now_ms())
        await self.commit(tombstone, message_id=tombstone_id)
        await self.hub.backend.delete(self.session)
        self.hub.forget_session(self.session)


def _nothing_to(run_id: str | None) -> str:
    return "no run is active" if run_id is None else f"run {run_id} is not active"
