"""A session: the durable, addressable channel between agents and clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, JsonValue, ValidationError

from ._control import Handler, Server
from ._reader import ReadOptions, read_events
from ._util import now_ms, validate_name
from .backend import Channel
from .cursor import Cursor, LogPosition
from .errors import AckTimeout, ConfigurationError, ControlTooLarge, PayloadTooLarge
from .events import (
    Cancel,
    ControlAck,
    Event,
    Prompt,
    Reset,
    Steer,
    Strategy,
    UserMessage,
    encode,
)
from .run import Run
from .view import SessionView, ViewBuilder

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["ControlHandle", "EventStream", "PresenceMember", "Session"]

logger = logging.getLogger("durable_ai")


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
    """A control that was sent. ``await handle.ack()`` waits for the agent side's ``control-ack``."""

    def __init__(self, session: Session, control: Cancel | Steer | Prompt, events_head: LogPosition | None) -> None:
        self.session = session
        self.control = control
        self._events_head = events_head

    @property
    def id(self) -> str:
        return self.control.id

    async def ack(self, timeout: float = 10.0) -> ControlAck:  # noqa: ASYNC109 (AckTimeout names the control)
        """The ``control-ack`` for this control; raises :class:`AckTimeout` if none comes in time."""
        head = self._events_head
        after = Cursor(head.epoch, head.position, 0) if head is not None else None
        stream = self.session._read(after=after, follow=True, skip_whole_message=head is not None)
        try:
            async with asyncio.timeout(timeout):
                async for event in stream:
                    if isinstance(event, ControlAck) and event.control_id == self.control.id:
                        return event
        except TimeoutError:
            pass
        finally:
            await stream.aclose()
        raise AckTimeout(self.control.id, timeout)


class PresenceMember(BaseModel):
    """A participant present on a session: an agent run that is working, or a client that is watching."""

    member_id: str
    role: Literal["agent", "client"]
    agent: str | None = None
    run_id: str | None = None
    data: JsonValue = None
    since: int = 0


class Session:
    """A handle on one session of a hub. Creating it does no I/O; see ``Hub.session``."""

    def __init__(self, hub: Hub, session_id: str) -> None:
        self.hub = hub
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
    ) -> Run:
        """A new run of ``agent`` (optionally a sub-agent of ``parent``); enter it with ``async with``."""
        return Run(self, agent=agent, parent=parent, run_id=run_id, message_id=message_id)

    def serve(
        self,
        handler: Handler,
        *,
        agent: str = "assistant",
        strategy: Strategy = "enqueue",
        client_strategies: Iterable[Strategy] = (),
    ) -> Server:
        """Answer this session's prompts with ``handler(run, message)`` while the ``async with`` lasts.

        ``strategy`` decides what happens to a prompt that arrives while a run is active: ``enqueue`` (answer it
        next), ``interrupt`` (cancel the active run, answer it now), ``reject`` (refuse it) or ``steer``
        (deliver it into the active run's inbox). A client may ask for one of ``client_strategies``.
        """
        validate_name("agent", agent)
        return Server(self, handler, agent=agent, strategy=strategy, client_strategies=frozenset(client_strategies))

    async def publish(self, event: Event) -> None:
        """Write an event as a trusted writer (a gateway, a human operator). Idempotent on ``event.id``."""
        if event.session != self.id:
            raise ConfigurationError(f"event belongs to session {event.session!r}, not {self.id!r}")
        await self.hub._commit(self.id, event)

    async def user_message(self, content: str, *, message_id: str | None = None) -> UserMessage:
        """Write a user message straight into the log as a trusted participant (no agent is triggered)."""
        event = UserMessage(
            id=self.hub._new_id(),
            session=self.id,
            ts=now_ms(),
            message_id=message_id or self.hub._new_id(),
            content=content,
        )
        await self.publish(event)
        return event

    # -- client side -----------------------------------------------------------------------------------------

    def events(self, after: str | None = None, *, follow: bool = True) -> EventStream:
        """The session's events after cursor ``after`` (``None``: from the start), then, if ``follow``, live.

        Exactly the events after the cursor are yielded, in order, with no gap and no duplicate, across any
        number of internal reconnects. If they no longer exist (log recreated, retention), a ``reset`` event
        comes first and the stream continues from the earliest retained event.
        """
        cursor = Cursor.parse(after) if after is not None else None
        return self._read(after=cursor, follow=follow)

    def _read(self, *, after: Cursor | None, follow: bool, skip_whole_message: bool = False) -> EventStream:
        hub = self.hub
        hub._check_open()
        options = ReadOptions(
            reconnect_timeout=hub.reconnect_timeout,
            is_closed=lambda: hub.closed,
            new_id=hub._new_id,
            now_ms=now_ms,
        )
        return EventStream(
            read_events(
                hub.backend,
                self.id,
                after=after,
                follow=follow,
                options=options,
                skip_whole_message=skip_whole_message,
            )
        )

    async def _send(self, control: Cancel | Steer | Prompt) -> ControlHandle:
        hub = self.hub
        hub._check_open()
        data = encode(control)
        if len(data) > hub.max_control_bytes:
            raise ControlTooLarge(len(data), hub.max_control_bytes)
        head = await hub.backend.head(Channel(self.id, "events"))
        await hub.backend.publish(Channel(self.id, "control"), data, message_id=control.id)
        return ControlHandle(self, control, head)

    async def cancel(self, run_id: str | None = None, *, reason: str | None = None) -> ControlHandle:
        """Ask the agent side to stop ``run_id`` (``None``: every active run). A disconnect is never a cancel."""
        return await self._send(Cancel(id=self.hub._new_id(), ts=now_ms(), run_id=run_id, reason=reason))

    async def steer(self, text: str, *, run_id: str | None = None) -> ControlHandle:
        """Send guidance into a working run (``None``: every active run); it arrives in ``run.steering()``."""
        return await self._send(Steer(id=self.hub._new_id(), ts=now_ms(), run_id=run_id, text=text))

    async def prompt(
        self, content: str, *, message_id: str | None = None, strategy: Strategy | None = None
    ) -> ControlHandle:
        """Send a follow-up user message to the agent serving this session."""
        try:
            control = Prompt(
                id=self.hub._new_id(),
                ts=now_ms(),
                message_id=message_id or self.hub._new_id(),
                content=content,
                strategy=strategy,
            )
        except ValidationError as exc:
            raise ConfigurationError(f"invalid prompt: {exc.errors()[0]['msg']}") from None
        return await self._send(control)

    async def view(self) -> SessionView:
        """The session's state now: messages with parts, active runs, and the cursor to continue from.

        Built from the latest snapshot plus the events after it, so its cost follows the number of broker
        messages since the snapshot, not the number of tokens in the session.
        """
        self.hub._check_open()
        return (await self._fold(None)).build()

    async def _fold(self, builder: ViewBuilder | None) -> ViewBuilder:
        """Bring a view up to date: a given builder from its cursor, or a new one from the saved snapshot."""
        hub = self.hub
        after: Cursor | None = None
        if builder is None:
            base = await self._load_snapshot()
            builder = ViewBuilder(self.id, base)
        if builder.cursor is not None:
            after = Cursor.parse(builder.cursor)
        else:
            head = await hub.backend.head(Channel(self.id, "events"))
            if head is not None:
                # From the start of the epoch, so that events lost to retention are reported, not skipped.
                after = Cursor(head.epoch, None, -1)
        async with self._read(after=after, follow=False) as stream:
            async for event in stream:
                if isinstance(event, Reset):
                    recreated = after is not None and (
                        event.cursor is None or Cursor.parse(event.cursor).epoch != after.epoch
                    )
                    if recreated:
                        builder.reset()
                    else:
                        builder.truncated = True
                    builder.cursor = event.cursor
                    continue
                builder.apply(event)
        return builder

    async def _load_snapshot(self) -> SessionView | None:
        raw = await self.hub.backend.load_snapshot(self.id)
        if raw is None:
            return None
        try:
            view = SessionView.model_validate_json(raw)
        except ValidationError:
            logger.warning("ignoring an unreadable snapshot of session %r", self.id)
            return None
        return view if view.cursor is not None else None

    async def delete(self) -> None:
        """Delete the session's history, snapshot and presence. Readers get a ``reset``."""
        self.hub._check_open()
        await self.hub.backend.delete(self.id)

    # -- presence --------------------------------------------------------------------------------------------

    async def presence(self) -> list[PresenceMember]:
        """Who is here now: agent runs that are working and clients that joined."""
        members = await self.hub.backend.presence(self.id)
        result: list[PresenceMember] = []
        for member_id, data in sorted(members.items()):
            try:
                result.append(PresenceMember.model_validate_json(data))
            except ValidationError:
                result.append(PresenceMember(member_id=member_id, role="client"))
        return result

    @contextlib.asynccontextmanager
    async def join(
        self, member_id: str, *, role: Literal["agent", "client"] = "client", data: JsonValue = None
    ) -> AsyncIterator[PresenceMember]:
        """Be present on the session (a watching client, say) for the duration of the ``async with``."""
        validate_name("member_id", member_id)
        member = PresenceMember(member_id=member_id, role=role, data=data, since=now_ms())
        payload = encode(member)
        if len(payload) > self.hub.max_control_bytes:
            raise PayloadTooLarge(len(payload), self.hub.max_control_bytes)
        await self.hub.backend.enter_presence(self.id, member_id, payload)
        try:
            yield member
        finally:
            with contextlib.suppress(Exception):
                await self.hub.backend.leave_presence(self.id, member_id)
