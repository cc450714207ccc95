"""The agent side of a session's control channel.

One ``SessionControl`` per session per hub reads the control log from the point where it started (so a cancel
sent right after ``run-start`` is never missed), validates every control, applies it to the runs of this hub and
answers with a ``control-ack`` in the events log.

Acks, and the ``user-message`` recorded for a steer or a prompt, have ids derived from the control, and each is
published as a broker message of its own with that id: when several processes write the same answer, the
broker's deduplication keeps one (within its dedupe window).

Who answers: a cancel or steer is answered by the process that owns the targeted run; when no run matches here,
a process that is serving the session (``session.serve``) answers ``ignored``. Prompts are answered by the
serving process. Malformed and unknown controls are rejected by every listener (deduplicated by id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from ._reader import closing
from ._util import now_ms
from .backend import Channel
from .cursor import LogPosition
from .errors import BackendUnavailable, ConfigurationError, LogReset
from .events import Cancel, ControlAck, ControlRejected, Prompt, Steer, Strategy, UserMessage, parse_control
from .run import SteerMessage

if TYPE_CHECKING:
    from .hub import Hub
    from .run import Run
    from .session import Session

__all__ = ["Handler", "Server", "SessionControl"]

logger = logging.getLogger("durable_ai")

Handler = Callable[["Run", UserMessage], Awaitable[None]]
"""An agent function for ``session.serve``: it writes its answer to ``run`` for the user's ``message``."""

_Outcome = Literal["applied", "rejected", "ignored"]
_STRATEGIES: tuple[Strategy, ...] = ("enqueue", "interrupt", "reject", "steer")


def derived_id(kind: str, source: str) -> str:
    """An event id computed from what caused the event, so processes that write it independently agree."""
    return f"{kind}-{hashlib.sha256(source.encode()).hexdigest()[:32]}"


class SessionControl:
    """Reads one session's control log and applies controls to this hub's runs (see the module docstring)."""

    def __init__(self, hub: Hub, session: str) -> None:
        self.hub = hub
        self.session = session
        self.runs: dict[str, Run] = {}
        self.server: Server | None = None
        self.users = 0
        self._channel = Channel(session, "control")
        self._task: asyncio.Task[None] | None = None
        self._seen_messages: OrderedDict[str, None] = OrderedDict()

    async def start(self) -> None:
        head = await self.hub.backend.head(self._channel)
        self._task = asyncio.get_running_loop().create_task(self._loop(head), name=f"durable-ai control {self.session}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self, head: LogPosition | None) -> None:
        backend = self.hub.backend
        start, skip = head, head.position if head is not None else None
        backoff = 0.05
        while True:
            try:
                async with closing(backend.read(self._channel, start=start, follow=True)) as messages:
                    async for message in messages:
                        backoff = 0.05
                        if message.position == skip:
                            continue
                        start, skip = LogPosition(message.epoch, message.position), message.position
                        try:
                            await self._handle(message.data, message.position)
                        except Exception:
                            logger.exception("failed to apply a control in session %r", self.session)
            except LogReset:
                # Our position was dropped or the log was recreated: every control still retained came after
                # the ones handled here, so read from the earliest (never from the newest: that loses some).
                start, skip = None, None
            except Exception as exc:
                if self.hub.closed:
                    return
                # Whatever failed, controls must keep flowing: a dead loop would make every stop button inert.
                if isinstance(exc, BackendUnavailable):
                    logger.info("control of session %r unavailable (%s); retrying", self.session, exc)
                else:
                    logger.exception("reading the control of session %r failed; retrying", self.session)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _handle(self, data: bytes, position: str) -> None:
        try:
            control = parse_control(data, max_bytes=self.hub.max_control_bytes)
        except ControlRejected as exc:
            await self.ack(exc.control_id or f"@{position}", exc.control_type, "rejected", exc.reason)
            return
        if isinstance(control, Cancel):
            await self._cancel(control)
        elif isinstance(control, Steer):
            await self._steer(control)
        elif self.server is not None:
            await self.server.on_prompt(control)

    def _targets(self, run_id: str | None) -> list[Run]:
        if run_id is None:
            return [run for run in self.runs.values() if run._state in ("starting", "active")]
        run = self.runs.get(run_id)
        return [run] if run is not None else []

    async def _cancel(self, control: Cancel) -> None:
        targets = self._targets(control.run_id)
        if not targets:
            if self.server is not None or (control.run_id is None and self.runs):
                await self.ack(control.id, "cancel", "ignored", self._nothing_to(control.run_id))
            return
        outcomes = [run._request_cancel(control.reason) for run in targets]
        applied = [reason for outcome, reason in outcomes if outcome == "applied"]
        if applied:
            await self.ack(control.id, "cancel", "applied", applied[0])
        else:
            await self.ack(control.id, "cancel", "ignored", outcomes[0][1])

    async def _steer(self, control: Steer) -> None:
        targets = [run for run in self._targets(control.run_id) if run.active]
        if not targets:
            if self.server is not None:
                await self.ack(control.id, "steer", "ignored", self._nothing_to(control.run_id))
            return
        message_id = derived_id("steer", control.id)
        await self.commit_user_message(message_id, control.text, targets[0].id if len(targets) == 1 else None)
        for run in targets:
            run.inbox.put(SteerMessage(control.text, control.id, message_id))
        await self.ack(control.id, "steer", "applied", None)

    @staticmethod
    def _nothing_to(run_id: str | None) -> str:
        return "no run is active" if run_id is None else f"run {run_id} is not active"

    async def commit_user_message(self, message_id: str, content: str, run_id: str | None) -> None:
        event = UserMessage(
            id=derived_id("user-message", message_id),
            session=self.session,
            run_id=run_id,
            ts=now_ms(),
            message_id=message_id,
            content=content,
        )
        await self.hub._commit(self.session, event, wait=False)

    async def ack(self, control_id: str, control_type: str | None, outcome: _Outcome, reason: str | None) -> None:
        event = ControlAck(
            id=derived_id(f"ack-{outcome}", control_id),
            session=self.session,
            ts=now_ms(),
            control_id=None if control_id.startswith("@") else control_id,
            control_type=control_type,
            outcome=outcome,
            reason=reason,
        )
        # Queued, not awaited: a slow broker must not hold up the next control (which may be a cancel).
        await self.hub._commit(self.session, event, wait=False)

    def first_sighting(self, message_id: str) -> bool:
        """False for a prompt whose message id was already handled (a client retrying)."""
        if message_id in self._seen_messages:
            return False
        self._seen_messages[message_id] = None
        if len(self._seen_messages) > 10_000:
            self._seen_messages.popitem(last=False)
        return True


class Server:
    """Answers the prompts of one session with an agent function; see ``Session.serve``."""

    def __init__(
        self,
        session: Session,
        handler: Handler,
        *,
        agent: str,
        strategy: Strategy,
        client_strategies: frozenset[Strategy],
    ) -> None:
        if strategy not in _STRATEGIES:
            raise ConfigurationError(f"unknown strategy {strategy!r}; use one of {', '.join(_STRATEGIES)}")
        unknown = set(client_strategies) - set(_STRATEGIES)
        if unknown:
            raise ConfigurationError(f"unknown client strategies {sorted(unknown)}")
        self.session = session
        self.handler = handler
        self.agent = agent
        self.strategy = strategy
        self.client_strategies = client_strategies | {strategy}
        self.active: Run | None = None
        self._queue: deque[UserMessage] = deque()
        self._ready = asyncio.Event()
        self._control: SessionControl | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """A run is working or a prompt is waiting."""
        return self.active is not None or bool(self._queue)

    async def __aenter__(self) -> Server:
        hub = self.session.hub
        control = await hub._acquire_control(self.session.id)
        if control.server is not None:
            await hub._release_control(self.session.id)
            raise ConfigurationError(f"session {self.session.id!r} is already served by this hub")
        control.server = self
        self._control = control
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"durable-ai serve {self.session.id}")
        hub._servers.add(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop answering prompts; an active run is cancelled and records ``cancelled``."""
        hub = self.session.hub
        hub._servers.discard(self)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._control is not None:
            self._control.server = None
            self._control = None
            await hub._release_control(self.session.id)

    async def on_prompt(self, prompt: Prompt) -> None:
        control = self._control
        assert control is not None
        if not control.first_sighting(prompt.message_id):
            await control.ack(prompt.id, "prompt", "ignored", "this message was already received")
            return
        strategy = prompt.strategy or self.strategy
        if strategy not in self.client_strategies:
            await control.ack(prompt.id, "prompt", "rejected", f"strategy {strategy!r} is not allowed here")
            return
        active = self.active if self.active is not None and self.active.active else None
        if strategy == "reject" and self.busy:
            await control.ack(prompt.id, "prompt", "rejected", "a run is active")
            return
        if strategy == "steer" and active is not None:
            await control.commit_user_message(prompt.message_id, prompt.content, active.id)
            active.inbox.put(SteerMessage(prompt.content, prompt.id, prompt.message_id))
            await control.ack(prompt.id, "prompt", "applied", f"steered run {active.id}")
            return
        message = UserMessage(
            id=derived_id("user-message", prompt.message_id),
            session=self.session.id,
            ts=now_ms(),
            message_id=prompt.message_id,
            content=prompt.content,
        )
        # Queued in the writer before the run is, so the user-message always precedes the run that answers it.
        await self.session.hub._commit(self.session.id, message, wait=False)
        reason = None
        if strategy == "interrupt" and active is not None:
            active._request_cancel("interrupted by a new message")
            self._queue.appendleft(message)
            reason = f"interrupted run {active.id}"
        else:
            if self.busy:
                reason = "queued"
            self._queue.append(message)
        self._ready.set()
        await control.ack(prompt.id, "prompt", "applied", reason)

    async def _work(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            message = self._queue.popleft()
            try:
                async with self.session.run(agent=self.agent) as run:
                    self.active = run
                    await self.handler(run, message)
            except Exception:
                logger.exception("the agent serving session %r failed", self.session.id)
            finally:
                self.active = None
