"""A run's inbox: the steer messages clients sent to it, bounded because clients are not trusted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

__all__ = ["Inbox", "SteerMessage"]

MAX_WAITING = 64
"""Steer messages an inbox holds before it refuses more (each refusal is acknowledged as ``rejected``)."""


@dataclass(frozen=True, slots=True)
class SteerMessage:
    """Guidance a client sent to a working run (a ``steer``, or a prompt under the ``steer`` strategy)."""

    text: str
    control_id: str
    message_id: str


class Inbox:
    """The steer messages addressed to a run, in arrival order. Iteration ends when the run ends.

    It holds at most ``maxsize`` messages that the agent has not taken yet; past that, new ones are refused.
    """

    def __init__(self, maxsize: int = MAX_WAITING) -> None:
        self.maxsize = maxsize
        self._queue: asyncio.Queue[SteerMessage | None] = asyncio.Queue()
        self._closed = False

    @property
    def full(self) -> bool:
        """Whether a new message would be refused."""
        return self._closed or self._queue.qsize() >= self.maxsize

    def put(self, message: SteerMessage) -> bool:
        """Add a message; ``False`` if the inbox is full or closed (nothing is added then)."""
        if self.full:
            return False
        self._queue.put_nowait(message)
        return True

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
