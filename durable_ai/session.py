"""A session: the durable, addressable channel between agents and clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Literal

from pydantic import JsonValue, ValidationError

from ._reader import END_OF_MESSAGE, fold, read_events
from ._runtime import HubRuntime
from ._util import derived_id, now_ms, validate_name
from .backends.base import Channel
from .cursor import Cursor
from .errors import AckTimeout, ConfigurationError, ControlTooLarge, EventTooLarge, PayloadTooLarge
from .events import (
    Cancel,
    ControlAck,
    Event,
    Prompt,
    Reset,
    RunEnd,
    RunStart,
    Steer,
    Strategy,
    UserMessage,
    encode,
)
from .presence import PresenceMember
from .run import Run
from .serve import Handler, Server
from .view import RunInfo, SessionView

__all__ = ["ControlHandle", "EventStream", "Session"]


class EventStream:
    """The events of a session, in order, each with its cursor. Iterate it; close it (or leave an
    ``async with``) to stop a following stream at once."""

    def __init__(self, iterator: AsyncIterator[Event]) -> None:
        self._iterator = iterator

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class ControlHandle:
    """A control that was sent.

    ``await handle.ack()`` gives the agent side's answer ("stopping…"); ``await handle.done()`` the ``run-end``
    it led to ("stopped"). A cancel or steer for a run that is not active is answered ``ignored`` at once.
    """

    def __init__(self, session: Session, control: Cancel | Steer | Prompt, after: Cursor | None) -> None:
        self.session = session
        self.control = control
        self._after = after
        self._ack: ControlAck | None = None

    @property
    def id(self) -> str:
        return self.control.id

    async def ack(self, timeout: float = 10.0) -> ControlAck:  # noqa: ASYNC109 (AckTimeout names the control)
        """The ``control-ack`` for this control; raises :class:`AckTimeout` if none comes in time.

        For a ``cancel`` or ``steer`` whose run is not active in the log (it ended, it never started, nothing
        runs), the answer is ``ignored`` without waiting for an agent: it has no cursor, as no agent wrote it.
        """
        if self._ack is not None:
            return self._ack
        try:
            async with asyncio.timeout(timeout):
                self._ack = await self._find_ack()
        except TimeoutError:
            raise AckTimeout(self.control.id, timeout) from None
        return self._ack

    async def _find_ack(self) -> ControlAck:
        # The agent's answer is awaited at once; meanwhile the log tells whether anything can answer at all.
        answer = asyncio.ensure_future(self._scan(follow=True))
        tasks: set[asyncio.Future[ControlAck | None]] = {answer}
        if isinstance(self.control, Cancel | Steer):
            tasks.add(asyncio.ensure_future(self._answer_if_idle()))
        try:
            while True:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    found = task.result()
                    if found is not None:
                        return found
                    tasks.discard(task)  # something is active: its agent answers
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _answer_if_idle(self) -> ControlAck | None:
        """``ignored`` if no run the control is for is active in the log (and no agent answered); else ``None``."""
        run_id = self.control.run_id if isinstance(self.control, Cancel | Steer) else None
        if any(run_id in (None, run.run_id) for run in await self.session.active_runs()):
            return None
        found = await self._scan(follow=False)  # an agent may have answered before its run ended
        if found is not None:
            return found
        return ControlAck(
            id=derived_id("ack-ignored", self.control.id),
            session=self.session.id,
            ts=now_ms(),
            control_id=self.control.id,
            control_type=self.control.type,
            outcome="ignored",
            reason="no run is active" if run_id is None else f"run {run_id} is not active",
        )

    def _events(self, *, follow: bool) -> EventStream:
        after = self._after
        return self.session.events(None if after is None else str(after), follow=follow)

    async def _scan(self, *, follow: bool) -> ControlAck | None:
        async with self._events(follow=follow) as stream:
            async for event in stream:
                if isinstance(event, ControlAck) and event.control_id == self.control.id:
                    return event
        return None

    async def done(self, timeout: float = 60.0) -> RunEnd | None:  # noqa: ASYNC109 (the timeout names the run)
        """The ``run-end`` this control led to: the stopped run's for a cancel (the last one, if it stopped
        several), the steered run's for a steer, the answering run's for a prompt. ``None`` when the control
        was not applied (ignored or rejected). Raises :class:`TimeoutError` if the run has not ended in time.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        ack = await self.ack(timeout=timeout)
        if ack.outcome != "applied":
            return None
        control = self.control
        try:
            async with asyncio.timeout_at(deadline):
                if isinstance(control, Prompt) and ack.run_id is None:
                    return await self._last_end(set(), answering=control.message_id)
                run_id = ack.run_id or (control.run_id if isinstance(control, Cancel | Steer) else None)
                if run_id is not None:
                    return await self._last_end({run_id})
                return await self._last_end({run.run_id for run in await self.session.active_runs()}, every=True)
        except TimeoutError:
            raise TimeoutError(f"what control {control.id!r} acted on did not end within {timeout:g}s") from None

    async def _last_end(self, waiting: set[str], *, answering: str | None = None, every: bool = False) -> RunEnd:
        """Follow the log from where the control was sent until every run in ``waiting`` has ended.

        ``answering``: also the run that answers this prompt. ``every``: also each run that was active when the
        control was sent (it ended before ``waiting`` was read: its ``run-end`` is in the log after the control).
        """
        started_after: set[str] = set()
        last: RunEnd | None = None
        if every and not waiting:
            async with self._events(follow=False) as stream:
                async for event in stream:
                    if isinstance(event, RunStart):
                        started_after.add(event.run_id or "")
                    elif isinstance(event, RunEnd) and event.run_id not in started_after:
                        last = event
            if last is not None:
                return last
        async with self._events(follow=True) as stream:
            async for event in stream:
                if isinstance(event, RunStart):
                    started_after.add(event.run_id or "")
                    if answering is not None and event.input_message_id == answering:
                        waiting.add(event.run_id or "")
                        answering = None
                elif isinstance(event, RunEnd):
                    if event.run_id in waiting:
                        waiting.discard(event.run_id)
                        last = event
                    elif every and event.run_id not in started_after:
                        last = event
                    if last is not None and not waiting and answering is None:
                        return last
        raise TimeoutError("the session's stream ended")


class Session:
    """A handle on one session of a hub. Creating it does no I/O; see ``Hub.session``."""

    def __init__(self, runtime: HubRuntime, session_id: str) -> None:
        self._runtime = runtime
        self.id = session_id

    def __repr__(self) -> str:
        return f"<Session {self.id!r}>"

    # -- agent side ------------------------------------------------------------------------------------------

    def run(
        self,
        *,
        agent: str = "agent",
        parent: Run | str | None = None,
        run_id: str | None = None,
        message_id: str | None = None,
        input_message_id: str | None = None,
    ) -> Run:
        """A new run of ``agent`` (optionally a sub-agent of ``parent``); enter it with ``async with``.

        ``run_id`` chooses the run's id (a second writer entering the same id, anywhere, gets
        :class:`RunIdInUse`; checking costs a read of the session's log); ``message_id`` the id of the
        assistant message it produces; ``input_message_id`` the user message it answers.
        """
        return Run(
            self._runtime,
            self.id,
            agent=agent,
            parent=parent,
            run_id=run_id,
            message_id=message_id,
            input_message_id=input_message_id,
        )

    def serve(
        self,
        handler: Handler,
        *,
        agent: str = "assistant",
        strategy: Strategy = "enqueue",
        client_strategies: Iterable[Strategy] = (),
        max_queue: int = 100,
    ) -> Server:
        """Answer this session's prompts with ``handler(run, message)`` while the ``async with`` lasts.

        ``strategy`` decides what happens to a prompt that arrives while a run is chosen (starting or active):
        ``enqueue`` (answer it next), ``interrupt`` (cancel the run, answer it now), ``reject`` (refuse it) or
        ``steer`` (deliver it into the run's inbox). A client may ask for one of ``client_strategies``. At most
        ``max_queue`` prompts wait; more are rejected.
        """
        validate_name("agent", agent)
        return Server(
            self._runtime,
            self.id,
            handler,
            agent=agent,
            strategy=strategy,
            client_strategies=frozenset(client_strategies),
            max_queue=max_queue,
        )

    async def publish(self, event: Event) -> None:
        """Write an event as a trusted writer (a gateway, a human operator). Idempotent on ``event.id``."""
        self._runtime.check_open()
        if event.session != self.id:
            raise ConfigurationError(f"event belongs to session {event.session!r}, not {self.id!r}")
        data = encode(event)
        if len(data) > self._runtime.settings.max_event_bytes:
            raise EventTooLarge(len(data), self._runtime.settings.max_event_bytes)
        await self._runtime.owner(self.id).commit(data, message_id=event.id)

    async def user_message(self, content: str, *, message_id: str | None = None) -> UserMessage:
        """Write a user message straight into the log as a trusted participant (no agent is triggered)."""
        new_id = self._runtime.new_id
        event = UserMessage(
            id=new_id(), session=self.id, ts=now_ms(), message_id=message_id or new_id(), content=content
        )
        await self.publish(event)
        return event

    # -- client side -----------------------------------------------------------------------------------------

    def events(self, after: str | None = None, *, follow: bool = True) -> EventStream:
        """The session's events after cursor ``after`` (``None``: from the start), then, if ``follow``, live.

        Exactly the events after the cursor are yielded, in order, with no gap and no duplicate, across any
        number of internal reconnects. If they no longer exist (log recreated or deleted, retention), a ``reset``
        event comes first and the stream continues from the earliest retained event.
        """
        cursor = Cursor.parse(after) if after is not None else None
        return self._read(cursor, follow=follow)

    def _read(self, after: Cursor | None, *, follow: bool) -> EventStream:
        runtime = self._runtime
        runtime.check_open()
        return EventStream(
            read_events(
                runtime.backend,
                self.id,
                after=after,
                follow=follow,
                options=runtime.read_options,
                use_tail=True,  # a catch-up read is served from the snapshot's tail where it covers the cursor
            )
        )

    async def head(self) -> str | None:
        """The cursor of the end of the log now: ``events(after=head)`` yields only what is written later.

        ``None`` when the log is empty (``events(after=None)`` then yields only later events too).
        """
        self._runtime.check_open()
        head = await self._runtime.backend.head(Channel(self.id, "events"))
        return None if head is None else str(Cursor(head.epoch, head.position, END_OF_MESSAGE))

    async def active_runs(self) -> list[RunInfo]:
        """The runs that have started and not ended, each with ``run_id``, ``agent`` and ``start_cursor``.

        Cheaper than :meth:`view`: it reads the same snapshot and tail but builds no messages.
        """
        runtime = self._runtime
        runtime.check_open()
        builder = await fold(runtime.backend, self.id, None, runtime.read_options, runs_only=True)
        return builder.active_runs

    def stream(self, run_id: str, after: str | None = None, *, wait: bool = False) -> EventStream:
        """One run's events, from its ``run-start`` (or after cursor ``after``), ending after its ``run-end``.

        What a resume route replays: an active run from its start, then live; a finished run from the log. A run
        the log does not hold gives an empty stream, unless ``wait``: then it is awaited (for a run that is about
        to start). ``reset`` events pass through.
        """
        validate_name("run_id", run_id)
        cursor = Cursor.parse(after) if after is not None else None
        self._runtime.check_open()
        return EventStream(self._stream(run_id, cursor, wait=wait))

    async def _stream(self, run_id: str, after: Cursor | None, *, wait: bool) -> AsyncIterator[Event]:
        if after is None:
            found, after = await self._run_start(run_id)
            if not found and not wait:
                return
        async with self._read(after, follow=True) as stream:
            async for event in stream:
                if isinstance(event, Reset) or (event.run_id == run_id and not isinstance(event, ControlAck)):
                    yield event
                    if isinstance(event, RunEnd):
                        return

    async def _run_start(self, run_id: str) -> tuple[bool, Cursor | None]:
        """Whether the log has the run, and the cursor just before its ``run-start`` (if it has it) or of the
        end of the log (if not)."""
        start: str | None = None
        last: str | None = None
        for info in await self.active_runs():
            if info.run_id == run_id:
                start = info.start_cursor
        if start is None:
            async with self._read(None, follow=False) as stream:
                async for event in stream:
                    last = event.cursor or last
                    if isinstance(event, RunStart) and event.run_id == run_id:
                        start = event.cursor
                        break
        if start is None:
            return False, Cursor.parse(last) if last is not None else None
        cursor = Cursor.parse(start)
        return True, Cursor(cursor.epoch, cursor.position, cursor.index - 1)

    async def _send(self, control: Cancel | Steer | Prompt) -> ControlHandle:
        runtime = self._runtime
        runtime.check_open()
        data = encode(control)
        limit = runtime.settings.max_control_bytes
        if len(data) > limit:
            raise ControlTooLarge(len(data), limit)
        backend = runtime.backend
        events = Channel(self.id, "events")
        if (reads_since := runtime.reads_since) is not None:
            # The answer is looked for from the control's own position: nothing is read before it is sent.
            sent = await backend.publish(Channel(self.id, "control"), data, message_id=control.id)
            start = await reads_since.since(events, sent)
            return ControlHandle(self, control, Cursor(start.epoch, start.position, -1))
        head = await backend.head(events)
        await backend.publish(Channel(self.id, "control"), data, message_id=control.id)
        after = Cursor(head.epoch, head.position, END_OF_MESSAGE) if head is not None else None
        return ControlHandle(self, control, after)

    async def cancel(self, run_id: str | None = None, *, reason: str | None = None) -> ControlHandle:
        """Ask the agent side to stop ``run_id`` (``None``: every active run). A disconnect is never a cancel."""
        return await self._send(self._control(Cancel, run_id=run_id, reason=reason))

    async def steer(self, text: str, *, run_id: str | None = None) -> ControlHandle:
        """Send guidance into a working run (``None``: every active run); it arrives in ``run.steering()``."""
        return await self._send(self._control(Steer, run_id=run_id, text=text))

    async def prompt(
        self, content: str, *, message_id: str | None = None, strategy: Strategy | None = None
    ) -> ControlHandle:
        """Send a follow-up user message to the agent serving this session."""
        new_id = self._runtime.new_id
        return await self._send(
            self._control(Prompt, message_id=message_id or new_id(), content=content, strategy=strategy)
        )

    def _control(self, cls: type[Cancel] | type[Steer] | type[Prompt], **fields: object) -> Cancel | Steer | Prompt:
        try:
            return cls(id=self._runtime.new_id(), ts=now_ms(), **fields)
        except ValidationError as exc:
            raise ConfigurationError(f"invalid {cls.model_fields['type'].default}: {exc.errors()[0]['msg']}") from None

    async def view(self) -> SessionView:
        """The session's state now: messages with parts, active runs, and the cursor to continue from.

        Built from the latest snapshot plus the events after it, so its cost follows the number of broker
        messages since the snapshot, not the number of tokens in the session.
        """
        runtime = self._runtime
        runtime.check_open()
        return (await fold(runtime.backend, self.id, None, runtime.read_options)).build()

    async def delete(self) -> None:
        """Delete the session's history, snapshot and presence.

        A tombstone is written into the log first, so every live reader, in any process, yields ``reset`` and
        then follows the new log.
        """
        self._runtime.check_open()
        await self._runtime.owner(self.id).delete()

    # -- presence --------------------------------------------------------------------------------------------

    async def presence(self) -> list[PresenceMember]:
        """Who is here now: agent runs that are working and clients that are present."""
        self._runtime.check_open()
        entries = await self._runtime.backend.presence(self.id)
        result: list[PresenceMember] = []
        for entry in sorted(entries, key=lambda e: (e.role, e.member_id)):
            # Who and what a member is comes from the broker (the entry), never from the data it wrote.
            try:
                member = PresenceMember.model_validate_json(entry.data)
            except ValidationError:
                member = PresenceMember(member_id=entry.member_id, role=entry.role)
            identity: dict[str, object] = {"member_id": entry.member_id, "role": entry.role}
            if entry.role == "client":
                identity |= {"agent": None, "run_id": None}  # a client cannot speak for a run
            result.append(member.model_copy(update=identity))
        return result

    @contextlib.asynccontextmanager
    async def present(
        self, member_id: str, *, role: Literal["agent", "client"] = "client", data: JsonValue = None
    ) -> AsyncIterator[PresenceMember]:
        """Be present on the session (a watching client, say) for the duration of the ``async with``."""
        runtime = self._runtime
        runtime.check_open()
        validate_name("member_id", member_id)
        member = PresenceMember(member_id=member_id, role=role, data=data, since=now_ms())
        payload = encode(member)
        if len(payload) > runtime.settings.max_control_bytes:
            raise PayloadTooLarge(len(payload), runtime.settings.max_control_bytes)
        await runtime.backend.enter_presence(self.id, member_id, payload, role=role)
        try:
            yield member
        finally:
            with contextlib.suppress(Exception):
                await runtime.backend.leave_presence(self.id, member_id, role=role)
