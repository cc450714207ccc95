"""A run: one response of one agent, written into a session.

``async with session.run(agent=...) as run`` writes ``run-start``, gives the block a writer for text, reasoning,
tool calls, status and data, and writes ``run-end`` when the block exits:

- ``completed`` when it exits normally;
- ``failed`` with an ``error`` event when it raises (the exception propagates);
- ``cancelled`` when a client's ``cancel`` arrives. The run is a **cancel scope**: the task inside the block is
  cancelled at its next ``await`` (an awaited LLM stream stops at once), the block exits without an exception
  and ``run.cancelled`` is true. If something else cancels the task, ``run-end`` says ``cancelled`` too and the
  cancellation propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from ._util import now_ms, validate_name
from .errors import ConfigurationError, EventTooLarge, RunClosed
from .events import Data, ErrorEvent, RunEnd, RunStart, Status, ToolCall, ToolResult, encode

if TYPE_CHECKING:
    from ._writer import SessionWriter
    from .events import _Event
    from .session import Session

__all__ = ["Inbox", "Run", "SteerMessage"]

logger = logging.getLogger("durable_ai")

_State = Literal["new", "starting", "active", "ending", "ended"]
_MAX_ERROR_CHARS = 4000


@dataclass(frozen=True, slots=True)
class SteerMessage:
    """Guidance a client sent to a working run (a ``steer``, or a prompt under the ``steer`` strategy)."""

    text: str
    control_id: str
    message_id: str


class Inbox:
    """The steer messages addressed to a run, in arrival order. Iteration ends when the run ends."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[SteerMessage | None] = asyncio.Queue()
        self._closed = False

    def put(self, message: SteerMessage) -> None:
        if not self._closed:
            self._queue.put_nowait(message)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    def get_nowait(self) -> SteerMessage | None:
        """The next waiting message, or ``None`` (check between LLM calls without blocking)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
            if item is not None:
                return item
            self._queue.put_nowait(None)
            return None

    def drain(self) -> list[SteerMessage]:
        """Every waiting message, without blocking."""
        items: list[SteerMessage] = []
        while (item := self.get_nowait()) is not None:
            items.append(item)
        return items

    def __aiter__(self) -> AsyncIterator[SteerMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[SteerMessage]:
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)
                return
            yield item


class Run:
    """One agent response in a session (see the module docstring). Create it with ``session.run()``."""

    def __init__(
        self,
        session: Session,
        *,
        agent: str,
        parent: Run | str | None,
        run_id: str | None,
        message_id: str | None,
    ) -> None:
        hub = session.hub
        self.session = session
        self.agent = validate_name("agent", agent)
        self.id: str = validate_name("run_id", run_id) if run_id is not None else hub._new_id()
        self.parent_run_id: str | None = parent.id if isinstance(parent, Run) else parent
        self.message_id = validate_name("message_id", message_id) if message_id is not None else hub._new_id()
        self.inbox = Inbox()
        self.cancelled = False
        """True once a cancel stopped the run."""
        self.cancel_reason: str | None = None
        self._state: _State = "new"
        self._cancel_requested = False
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._writer: SessionWriter | None = None
        self._text_part: str | None = None
        self._reasoning_part: str | None = None
        self._parts: set[str] = set()
        self._max_event_bytes = hub.max_event_bytes

    def __repr__(self) -> str:
        return f"<Run {self.id} agent={self.agent!r} session={self.session.id!r} {self._state}>"

    @property
    def active(self) -> bool:
        """Whether the run's block is executing."""
        return self._state == "active"

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Run:
        if self._state != "new":
            raise ConfigurationError("a run can be entered only once; call session.run() again for a new run")
        task = asyncio.current_task()
        if task is None:
            raise ConfigurationError("session.run() must be entered inside an asyncio task")
        hub = self.session.hub
        self._task = task
        self._cancelling = task.cancelling()
        self._state = "starting"
        self._writer = hub._acquire_writer(self.session.id)
        control = None
        try:
            control = await hub._acquire_control(self.session.id)
            control.runs[self.id] = self
            await self._write(
                RunStart(
                    id=hub._new_id(),
                    session=self.session.id,
                    run_id=self.id,
                    agent=self.agent,
                    ts=now_ms(),
                    parent_run_id=self.parent_run_id,
                    message_id=self.message_id,
                ),
                wait=True,
            )
        except BaseException:
            self._state = "ended"
            if control is not None:
                control.runs.pop(self.id, None)
                await hub._release_control(self.session.id)
            hub._release_writer(self._writer)
            raise
        await hub._presence_enter(self)
        self._state = "active"
        if self._cancel_requested:
            task.cancel(self.cancel_reason)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._state = "ending"
        self.inbox.close()
        task = self._task
        assert task is not None
        swallow = False
        error: str | None = None
        cancelled_by_exc = exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
        external_cancel = False
        if self._cancel_requested and not cancelled_by_exc:
            # The block ended before our cancel was delivered (or it swallowed it). Before Python 3.13 the
            # pending cancel survives uncancel() and would fire at the next await: take it here.
            external_cancel = await self._absorb_own_cancel(task)
        if self._cancel_requested and (exc_type is None or cancelled_by_exc):
            self.cancelled = True
            status: Literal["completed", "cancelled", "failed"] = "cancelled"
            reason = self.cancel_reason
            if cancelled_by_exc:
                swallow = task.uncancel() <= self._cancelling
        elif cancelled_by_exc:
            status, reason = "cancelled", "the agent task was cancelled"
        elif exc is not None:
            status, reason = "failed", f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
            error = reason
        else:
            status, reason = "completed", None
        hub = self.session.hub
        try:
            if error is not None:
                await self._write(self._stamp(ErrorEvent, message=error), wait=False)
            end = self._stamp(RunEnd, status=status, reason=reason)
            # Shielded so the run-end lands even while this task is being cancelled.
            await asyncio.shield(self._write(end, wait=True))
        finally:
            self._state = "ended"
            control = hub._controls.get(self.session.id)
            if control is not None:
                control.runs.pop(self.id, None)
                await hub._release_control(self.session.id)
            assert self._writer is not None
            hub._release_writer(self._writer)
            await hub._presence_leave(self)
            hub._schedule_snapshot(self.session.id)
        if external_cancel:
            raise asyncio.CancelledError
        return swallow

    async def _absorb_own_cancel(self, task: asyncio.Task[object]) -> bool:
        """Take our pending cancel; returns whether someone else cancelled the task too."""
        if task.cancelling() <= self._cancelling:
            return False
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
        return task.uncancel() > self._cancelling

    def _request_cancel(self, reason: str | None) -> tuple[Literal["applied", "ignored"], str | None]:
        """Called by the session's control loop when a cancel for this run arrives."""
        if self._state in ("ending", "ended"):
            return "ignored", "the run already finished"
        if self._cancel_requested:
            return "applied", "the run is already stopping"
        self._cancel_requested = True
        self.cancel_reason = reason
        if self._state == "active" and self._task is not None:
            self._task.cancel(reason)
        return "applied", None

    # -- writing ---------------------------------------------------------------------------------------------

    def _stamp(self, cls: type[_Event], **fields: object) -> _Event:
        hub = self.session.hub
        try:
            return cls(
                id=hub._new_id(), session=self.session.id, run_id=self.id, agent=self.agent, ts=now_ms(), **fields
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigurationError(f"invalid {cls.model_fields['type'].default}: {where}: {first['msg']}") from None

    def _check_open(self) -> SessionWriter:
        if self._state not in ("starting", "active") or self._writer is None:
            raise RunClosed(f"run {self.id} has ended; start a new run to write more")
        return self._writer

    async def _write(self, event: _Event, *, wait: bool) -> None:
        writer = self._check_open() if self._state != "ending" else self._writer
        assert writer is not None
        data = encode(event)
        if len(data) > self._max_event_bytes:
            raise EventTooLarge(len(data), self._max_event_bytes)
        seq = writer.add_encoded(id=event.id, run_id=self.id, data=data)
        if wait:
            await writer.wait(seq)

    async def _delta(self, kind: Literal["text-delta", "reasoning-delta"], delta: str, part_id: str) -> None:
        writer = self._check_open()
        if not isinstance(delta, str):
            raise ConfigurationError(f"a delta is a string, got {type(delta).__name__}")
        if not delta:
            return
        size = len(delta) if delta.isascii() else len(delta.encode())
        if size > self._max_event_bytes - 512:
            raise EventTooLarge(size, self._max_event_bytes)
        first = part_id not in self._parts
        if first:
            self._parts.add(part_id)
        writer.add_delta(
            type=kind,
            run_id=self.id,
            agent=self.agent,
            part_id=part_id,
            delta=delta,
            size=size,
            # A part's first delta is flushed at once: time to first token matters more than cost.
            urgent=first and self.session.hub.coalesce.flush_first_delta,
            new_id=self.session.hub._new_id,
        )
        if writer.overloaded:
            await writer.wait(writer.last_seq)
        elif writer.flush_due:
            await asyncio.sleep(0)  # let the flush loop run even if the agent never awaits anything else

    async def text(self, delta: str, *, part_id: str | None = None) -> None:
        """Append answer text.

        Consecutive calls build one text part; a reasoning delta, a tool call or a tool result ends it, and the
        next text starts a new part (``status`` and ``data`` do not). Pass ``part_id`` to manage parts yourself.
        The first delta of each part is flushed at once.
        """
        if part_id is None:
            if self._text_part is None and delta:
                self._text_part = self.session.hub._new_id()
            part_id = self._text_part or ""
        self._reasoning_part = None
        await self._delta("text-delta", delta, part_id)

    async def reasoning(self, delta: str, *, part_id: str | None = None) -> None:
        """Append reasoning text, in a part of its own (the same rules as :meth:`text`)."""
        if part_id is None:
            if self._reasoning_part is None and delta:
                self._reasoning_part = self.session.hub._new_id()
            part_id = self._reasoning_part or ""
        self._text_part = None
        await self._delta("reasoning-delta", delta, part_id)

    async def tool_call(self, name: str, input: Any = None, *, call_id: str | None = None) -> str:
        """Record a tool call; returns its ``call_id`` for :meth:`tool_result`. Returns once it is stored.

        ``input`` must be JSON-compatible (validated: :class:`ConfigurationError` otherwise).
        """
        self._text_part = self._reasoning_part = None
        call_id = call_id or self.session.hub._new_id()
        await self._write(self._stamp(ToolCall, call_id=call_id, name=name, input=input), wait=True)
        return call_id

    async def tool_result(self, call: str, output: Any = None, *, error: str | None = None) -> None:
        """Record the result (or the error) of a tool call."""
        self._text_part = self._reasoning_part = None
        await self._write(self._stamp(ToolResult, call_id=call, output=output, error=error), wait=True)

    async def status(self, text: str) -> None:
        """Show progress in the UI ("reading 3 pages")."""
        await self._write(self._stamp(Status, text=text), wait=True)

    async def data(self, name: str, value: Any = None) -> None:
        """Write application-defined data (citations, UI state...)."""
        await self._write(self._stamp(Data, name=name, value=value), wait=True)

    async def flush(self) -> None:
        """Wait until everything written so far is stored by the broker."""
        writer = self._check_open()
        await writer.wait(writer.last_seq)

    def steering(self) -> AsyncIterator[SteerMessage]:
        """Iterate over steer messages for this run as they arrive; ends when the run ends."""
        return aiter(self.inbox)
