"""The agent side's reader of a session's control channel.

A ``ControlLoop`` reads one session's control log from the point where it started (so a cancel sent right after
``run-start`` is never missed), validates every control, and hands each one, parsed, to its sink: the session's
owner in this hub, which decides what to apply and what to answer. It knows only a backend.

It survives anything the broker does: a reset of its position makes it read every control still retained (all of
them came after the ones it handled), and any other failure is retried with backoff, so a stop button never
goes inert while a run is active.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from ._reader import closing
from .backends.base import Backend, Channel
from .cursor import LogPosition
from .errors import BackendUnavailable, LogReset
from .events import Cancel, ControlRejected, Prompt, Steer, parse_control

__all__ = ["ControlLoop", "ControlSink"]

logger = logging.getLogger("durable_ai")


class ControlSink(Protocol):
    """What a control loop hands its controls to."""

    async def on_control(self, control: Cancel | Steer | Prompt) -> None:
        """A control that passed validation."""

    async def on_rejected(self, rejected: ControlRejected, position: str) -> None:
        """A control that did not (``position``: where it is in the control log)."""


class ControlLoop:
    """Reads one session's control log and hands every control to ``sink`` (see the module docstring)."""

    def __init__(
        self,
        backend: Backend,
        session: str,
        *,
        sink: ControlSink,
        max_control_bytes: int,
        is_closed: Callable[[], bool],
    ) -> None:
        self._backend = backend
        self._session = session
        self._channel = Channel(session, "control")
        self._sink = sink
        self._max_control_bytes = max_control_bytes
        self._is_closed = is_closed

    async def start(self) -> Callable[[], Coroutine[Any, Any, None]]:
        """Find where the log ends now; returns the loop to run from there (until it is cancelled)."""
        head = await self._backend.head(self._channel)
        return lambda: self._loop(head)

    async def _loop(self, head: LogPosition | None) -> None:
        start, skip = head, head.position if head is not None else None
        backoff = 0.05
        while True:
            try:
                async with closing(self._backend.read(self._channel, start=start, follow=True)) as messages:
                    async for message in messages:
                        backoff = 0.05
                        if message.position == skip:
                            continue
                        start, skip = LogPosition(message.epoch, message.position), message.position
                        try:
                            await self._handle(message.data, message.position)
                        except Exception:
                            logger.exception("failed to apply a control in session %r", self._session)
            except LogReset:
                # Our position was dropped or the log was recreated: every control still retained came after
                # the ones handled here, so read from the earliest (never from the newest: that loses some).
                start, skip = None, None
            except Exception as exc:
                if self._is_closed():
                    return
                # Whatever failed, controls must keep flowing: a dead loop would make every stop button inert.
                if isinstance(exc, BackendUnavailable):
                    logger.info("control of session %r unavailable (%s); retrying", self._session, exc)
                else:
                    logger.exception("reading the control of session %r failed; retrying", self._session)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _handle(self, data: bytes, position: str) -> None:
        try:
            control = parse_control(data, max_bytes=self._max_control_bytes)
        except ControlRejected as exc:
            await self._sink.on_rejected(exc, position)
            return
        await self._sink.on_control(control)
