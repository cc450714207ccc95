"""A run: one response of one agent, written into a session.

``async with session.run(agent=...) as run`` writes ``run-start``, gives the block a writer for text, reasoning,
tool calls, status and data, and writes ``run-end`` when the block exits:

- ``completed`` when it exits normally;
- ``failed`` with an ``error`` event when it raises (the exception propagates);
- ``cancelled`` when a client's ``cancel`` arrives (or ``run.cancel()`` is called, or the hub closes). The run is
  a **cancel scope**: the task inside the block is cancelled at its next ``await`` (an awaited LLM stream stops
  at once), the block exits without an exception and ``run.cancelled`` is true. If something else cancels the
  task, ``run-end`` says ``cancelled`` too and the cancellation propagates.

A run that started always ends: if entering it fails or is cancelled after its ``run-start`` was queued, its
``run-end`` follows; a ``run-end`` that cannot be written never replaces the block's own exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from ._runtime import MAX_REASON, HubRuntime, SessionRuntime
from ._util import now_ms, validate_name
from ._writer import SessionWriter
from .errors import ConfigurationError, EventTooLarge, RunClosed
from .events import BaseEvent, Data, Status, ToolCall, ToolResult, encode
from .inbox import Inbox, SteerMessage

if TYPE_CHECKING:
    from .integrations.langchain import DurableCallbackHandler

__all__ = ["Run"]

logger = logging.getLogger("durable_ai")

_State = Literal["new", "starting", "active", "ending", "ended"]


class Run:
    """One agent response in a session (see the module docstring). Create it with ``session.run()``.

    Attributes:
        id: the run's id (``run_id=`` or a generated one).
        session_id: the session it writes to.
        agent: the agent's name.
        parent_run_id: the run this one is a sub-agent of.
        message_id: the id of the assistant message it produces.
        input_message_id: the id of the user message it answers, if any.
        inbox: steer messages addressed to it (also :meth:`steering`).
    """

    def __init__(
        self,
        runtime: HubRuntime,
        session_id: str,
        *,
        agent: str,
        parent: Run | str | None,
        run_id: str | None,
        message_id: str | None,
        input_message_id: str | None,
    ) -> None:
        self._runtime = runtime
        self.session_id = session_id
        self.agent = validate_name("agent", agent)
        self._explicit_id = run_id is not None
        self.id: str = validate_name("run_id", run_id) if run_id is not None else runtime.new_id()
        parent_id = parent.id if isinstance(parent, Run) else parent
        self.parent_run_id = validate_name("parent", parent_id) if parent_id is not None else None
        self.message_id = validate_name("message_id", message_id) if message_id is not None else runtime.new_id()
        self.input_message_id = (
            validate_name("input_message_id", input_message_id) if input_message_id is not None else None
        )
        self.inbox = Inbox()
        self.cancelled = False
        """True once a cancel stopped the run."""
        self.cancel_reason: str | None = None
        self._state: _State = "new"
        self._cancel_requested = False
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._owner: SessionRuntime | None = None
        self._writer: SessionWriter | None = None
        self._last_seq = 0
        self._text_part: str | None = None
        self._reasoning_part: str | None = None
        self._parts: set[str] = set()
        self._max_event_bytes = runtime.settings.max_event_bytes

    def __repr__(self) -> str:
        return f"<Run {self.id} agent={self.agent!r} session={self.session_id!r} {self._state}>"

    @property
    def active(self) -> bool:
        """Whether the run's block is executing."""
        return self._state == "active"

    @property
    def task(self) -> asyncio.Task[object] | None:
        """The task running the run's block, once it is entered."""
        return self._task

    @property
    def accepting(self) -> bool:
        """Whether a cancel or a steer can still act on it: not entered yet, starting, or active."""
        return self._state in ("new", "starting", "active")

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Run:
        if self._state != "new":
            raise ConfigurationError("a run can be entered only once; call session.run() again for a new run")
        task = asyncio.current_task()
        if task is None:
            raise ConfigurationError("session.run() must be entered inside an asyncio task")
        self._task = task
        self._cancelling = task.cancelling()
        self._state = "starting"
        owner = self._runtime.owner(self.session_id)
        try:
            self._writer = await owner.enter_run(self, check_id=self._explicit_id)
        except BaseException:
            self._state = "ended"
            self.inbox.close()
            raise
        self._owner = owner
        self._state = "active"
        if self._cancel_requested:
            task.cancel(self.cancel_reason)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._state = "ending"
        self.inbox.close()
        task, owner = self._task, self._owner
        assert task is not None and owner is not None
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
            status, reason = "failed", f"{type(exc).__name__}: {exc}"[:MAX_REASON]
            error = reason
        else:
            status, reason = "completed", None
        try:
            await owner.exit_run(self, status, reason, error)
        except Exception as failure:
            if exc is not None and not swallow:
                # The block's own exception (or cancellation) is what the caller must see.
                logger.warning("the run-end of run %s was not confirmed: %s", self.id, failure)
            elif not external_cancel:
                raise
        finally:
            self._state = "ended"
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

    def cancel(self, reason: str | None = None) -> bool:
        """Stop the run as a client's ``cancel`` would: its task is cancelled at its next ``await``, the block
        exits normally and ``run-end`` records ``cancelled`` with ``reason``.

        Returns ``False`` if the run was already stopping or has ended.
        """
        if not self.accepting or self._cancel_requested:
            return False
        self._cancel_requested = True
        self.cancel_reason = reason
        if self._state == "active" and self._task is not None:
            self._task.cancel(reason)
        return True

    # -- writing ---------------------------------------------------------------------------------------------

    def _stamp(self, cls: type[BaseEvent], **fields: object) -> BaseEvent:
        try:
            return cls(
                id=self._runtime.new_id(),
                session=self.session_id,
                run_id=self.id,
                agent=self.agent,
                ts=now_ms(),
                **fields,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigurationError(f"invalid {cls.model_fields['type'].default}: {where}: {first['msg']}") from None

    def _check_open(self) -> SessionWriter:
        if self._state == "new":
            raise RunClosed(f"run {self.id} was never entered; write inside 'async with session.run(...) as run'")
        if self._state != "active" or self._writer is None:
            raise RunClosed(f"run {self.id} has ended; start a new run to write more")
        return self._writer

    async def _write(self, event: BaseEvent) -> None:
        writer = self._check_open()
        data = encode(event)
        if len(data) > self._max_event_bytes:
            raise EventTooLarge(len(data), self._max_event_bytes)
        seq = self._last_seq = writer.add_encoded(id=event.id, run_id=self.id, data=data)
        await writer.wait(seq)

    def _push(self, kind: Literal["text-delta", "reasoning-delta"], delta: str, part_id: str) -> SessionWriter | None:
        """Buffer a delta; returns the writer when the caller must await it (:meth:`_settle`), else ``None``.

        Synchronous, so a token the writer takes without waiting costs no coroutine of its own.
        """
        writer = self._writer
        if self._state != "active" or writer is None:
            self._check_open()
        assert writer is not None
        if not isinstance(delta, str):
            raise ConfigurationError(f"a delta is a string, got {type(delta).__name__}")
        if not delta:
            return None
        try:
            size = len(delta) if delta.isascii() else len(delta.encode())
        except UnicodeEncodeError:
            raise ConfigurationError("a delta must be valid Unicode text (it holds a lone surrogate)") from None
        if size > self._max_event_bytes - 512:
            raise EventTooLarge(size, self._max_event_bytes)
        first = part_id not in self._parts
        if first:
            self._parts.add(validate_name("part_id", part_id))
        self._last_seq = writer.add_delta(
            kind,
            self.id,
            self.agent,
            part_id,
            delta,
            size,
            # A part's first delta is flushed at once: time to first token matters more than cost.
            first and self._runtime.settings.coalesce.flush_first_delta,
        )
        return writer if writer.wants_caller else None

    async def _settle(self, writer: SessionWriter) -> None:
        """What the writer asks of a run that just buffered a delta: wait for room, or send what is due now."""
        if writer.overloaded:
            await writer.wait(self._last_seq)
        elif writer.flush_due:
            await writer.kick()  # send now (or let the flush loop run) even if the agent never awaits anything else

    async def text(self, delta: str, *, part_id: str | None = None) -> None:
        """Append answer text.

        Consecutive calls build one text part; a reasoning delta, a tool call or a tool result ends it, and the
        next text starts a new part (``status`` and ``data`` do not). Pass ``part_id`` (1 to 128 printable
        characters) to manage parts yourself. The first delta of each part is flushed at once.
        """
        if part_id is None:
            if self._text_part is None and delta:
                self._text_part = self._runtime.new_id()
            part_id = self._text_part or ""
        self._reasoning_part = None
        writer = self._push("text-delta", delta, part_id)
        if writer is not None:
            await self._settle(writer)

    async def reasoning(self, delta: str, *, part_id: str | None = None) -> None:
        """Append reasoning text, in a part of its own (the same rules as :meth:`text`)."""
        if part_id is None:
            if self._reasoning_part is None and delta:
                self._reasoning_part = self._runtime.new_id()
            part_id = self._reasoning_part or ""
        self._text_part = None
        writer = self._push("reasoning-delta", delta, part_id)
        if writer is not None:
            await self._settle(writer)

    async def tool_call(self, name: str, input: Any = None, *, call_id: str | None = None) -> str:
        """Record a tool call; returns its ``call_id`` for :meth:`tool_result`. Returns once it is stored.

        ``input`` must be JSON-compatible (validated: :class:`ConfigurationError` otherwise).
        """
        self._text_part = self._reasoning_part = None
        call_id = validate_name("call_id", call_id) if call_id is not None else self._runtime.new_id()
        await self._write(self._stamp(ToolCall, call_id=call_id, name=name, input=input))
        return call_id

    async def tool_result(self, call: str, output: Any = None, *, error: str | None = None) -> None:
        """Record the result (or the error) of a tool call."""
        self._text_part = self._reasoning_part = None
        await self._write(self._stamp(ToolResult, call_id=call, output=output, error=error))

    async def status(self, text: str) -> None:
        """Show progress in the UI ("reading 3 pages")."""
        await self._write(self._stamp(Status, text=text))

    async def data(self, name: str, value: Any = None) -> None:
        """Write application-defined data (citations, UI state...)."""
        await self._write(self._stamp(Data, name=name, value=value))

    async def flush(self) -> None:
        """Wait until everything this run wrote so far is stored by the broker."""
        writer = self._check_open()
        await writer.wait(self._last_seq)

    def steering(self) -> AsyncIterator[SteerMessage]:
        """Iterate over steer messages for this run as they arrive; ends when the run ends."""
        return aiter(self.inbox)

    def langchain(self, *, sub_agents: bool = True, handoff_timeout: float = 5.0) -> DurableCallbackHandler:
        """A LangChain callback handler that writes into this run, attached in one line:
        ``await chain.ainvoke(input, config={"callbacks": [run.langchain()]})``.

        Text and reasoning stream token by token (from ``ainvoke``, ``astream`` and LangGraph nodes alike), tools
        are written as tool calls and results under LangChain's ids, and a cancel of the run stops the chain. With
        ``sub_agents``, a named nested agent writes into a sub-agent run of its own. It works from sync code too
        (``.invoke()`` in a worker thread): a write the run's event loop does not take within ``handoff_timeout``
        seconds raises ``DeliveryError``. Needs the ``langchain`` extra (``durable-ai[langchain]``); see
        :class:`~durable_ai.integrations.langchain.DurableCallbackHandler`.
        """
        try:
            from .integrations.langchain import DurableCallbackHandler
        except ImportError as exc:
            raise ImportError(
                "run.langchain() needs langchain-core: install the extra, pip install 'durable-ai[langchain]'"
            ) from exc
        from .session import Session

        return DurableCallbackHandler(
            self, Session(self._runtime, self.session_id), sub_agents=sub_agents, handoff_timeout=handoff_timeout
        )
