"""Serving a session: an agent function answers its prompts, one run per prompt, by a multitask strategy.

``async with session.serve(handler, strategy=...)`` makes this hub answer the session's ``prompt`` controls. Each
accepted prompt is recorded as a ``user-message`` and answered by a run whose ``run-start`` names it
(``input_message_id``). A prompt that arrives while a run is chosen (starting or active) follows the strategy:
``enqueue`` (answer it next), ``interrupt`` (cancel the run, answer it now), ``reject`` or ``steer`` (deliver it
into the run's inbox). Prompts are untrusted input: the queue is bounded (``max_queue``) and a message id seen
before is answered once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from types import TracebackType

from ._runtime import SHUTDOWN_REASON, HubRuntime, SessionRuntime
from ._util import derived_id, now_ms
from .errors import ConfigurationError
from .events import Prompt, Strategy, UserMessage, encode
from .inbox import SteerMessage
from .run import Run

__all__ = ["STRATEGIES", "Handler", "Server"]

logger = logging.getLogger("durable_ai")

Handler = Callable[[Run, UserMessage], Awaitable[None]]
"""An agent function for ``session.serve``: it writes its answer to ``run`` for the user's ``message``."""

STRATEGIES: tuple[Strategy, ...] = ("enqueue", "interrupt", "reject", "steer")
_SEEN_KEPT = 10_000


class Server:
    """Answers the prompts of one session with an agent function; see ``Session.serve``."""

    def __init__(
        self,
        runtime: HubRuntime,
        session_id: str,
        handler: Handler,
        *,
        agent: str,
        strategy: Strategy,
        client_strategies: frozenset[Strategy],
        max_queue: int,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ConfigurationError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        unknown = set(client_strategies) - set(STRATEGIES)
        if unknown:
            raise ConfigurationError(f"unknown client strategies {sorted(unknown)}")
        if max_queue < 1:
            raise ConfigurationError("max_queue must be at least 1")
        self._runtime = runtime
        self.session_id = session_id
        self.handler = handler
        self.agent = agent
        self.strategy = strategy
        self.client_strategies = client_strategies | {strategy}
        self.max_queue = max_queue
        self.current: Run | None = None
        """The run answering a prompt, from the moment it is chosen until it ends."""
        self._queue: deque[UserMessage] = deque()
        self._ready = asyncio.Event()
        self._owner: SessionRuntime | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._seen: OrderedDict[str, None] = OrderedDict()

    @property
    def busy(self) -> bool:
        """A run is chosen or a prompt is waiting."""
        return self._chosen is not None or bool(self._queue)

    @property
    def _chosen(self) -> Run | None:
        current = self.current
        return current if current is not None and current.accepting else None

    async def __aenter__(self) -> Server:
        owner = self._runtime.owner(self.session_id)
        await owner.attach_server(self)
        self._owner = owner
        self._worker = self._runtime.supervisor.spawn(self._work(), f"durable-ai serve {self.session_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop answering prompts; an active run is cancelled and records ``cancelled``."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.detach_server(self)

    def shutdown(self) -> None:
        """Start no run for a prompt still queued (the hub is closing)."""
        self._closing = True
        self._ready.set()

    def _first_sighting(self, message_id: str) -> bool:
        """False for a prompt whose message id was already handled (a client retrying)."""
        if message_id in self._seen:
            return False
        self._seen[message_id] = None
        if len(self._seen) > _SEEN_KEPT:
            self._seen.popitem(last=False)
        return True

    async def on_prompt(self, prompt: Prompt) -> None:
        owner = self._owner
        if owner is None:
            return
        if self._closing:
            await owner.ack(prompt.id, "prompt", "rejected", SHUTDOWN_REASON)
            return
        if not self._first_sighting(prompt.message_id):
            await owner.ack(prompt.id, "prompt", "ignored", "this message was already received")
            return
        strategy = prompt.strategy or self.strategy
        if strategy not in self.client_strategies:
            await owner.ack(prompt.id, "prompt", "rejected", f"strategy {strategy!r} is not allowed here")
            return
        chosen = self._chosen
        if strategy == "reject" and self.busy:
            await owner.ack(prompt.id, "prompt", "rejected", "a run is active")
            return
        if strategy == "steer" and chosen is not None:
            if chosen.inbox.full:
                await owner.ack(prompt.id, "prompt", "rejected", "the run's inbox is full")
                return
            await owner.commit_user_message(prompt.message_id, prompt.content, chosen.id)
            chosen.inbox.put(SteerMessage(prompt.content, prompt.id, prompt.message_id))
            await owner.ack(prompt.id, "prompt", "applied", f"steered run {chosen.id}", run_id=chosen.id)
            return
        if len(self._queue) >= self.max_queue:
            await owner.ack(prompt.id, "prompt", "rejected", f"the queue is full ({self.max_queue} prompts waiting)")
            return
        message = UserMessage(
            id=derived_id("user-message", prompt.message_id),
            session=self.session_id,
            ts=now_ms(),
            message_id=prompt.message_id,
            content=prompt.content,
        )
        # Queued in the writer before the run is, so the user-message always precedes the run that answers it.
        await owner.commit(encode(message), message_id=message.id, wait=False)
        reason = None
        if strategy == "interrupt" and chosen is not None:
            chosen.cancel("interrupted by a new message")
            self._queue.appendleft(message)
            reason = f"interrupted run {chosen.id}"
        else:
            if self.busy:
                reason = "queued"
            self._queue.append(message)
        self._ready.set()
        await owner.ack(prompt.id, "prompt", "applied", reason)

    async def _work(self) -> None:
        while not self._closing:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            message = self._queue.popleft()
            run = Run(
                self._runtime,
                self.session_id,
                agent=self.agent,
                parent=None,
                run_id=None,
                message_id=None,
                input_message_id=message.message_id,
            )
            self.current = run  # chosen: strategies apply to it from now on, while it starts too
            try:
                async with run:
                    await self.handler(run, message)
            except Exception:
                logger.exception("the agent serving session %r failed", self.session_id)
            finally:
                self.current = None
