"""Publishes whose JetStream acknowledgements come back to one subscription, with no task, future or timer each.

nats-py's ``publish_async`` gives every publish a future, a random token and a semaphore slot, and an awaiting
task wakes for every acknowledgement; a per-publish expiry timer comes on top. Here a publish registers a
callback under a counter token, the acknowledgement subscription (one per connection) calls it, and a single timer
expires what was never answered, oldest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["Answer", "Replies"]

logger = logging.getLogger("durable_ai_nats")

Answer = Callable[[Msg | BaseException], Coroutine[Any, Any, object] | None]
"""Called once with the reply, or with ``TimeoutError`` (no reply in time) or the error that closed the sender."""


class Replies:
    """Publishes with a reply subject of this connection's, each answered by a callback (see the module docstring).

    An answer may return a coroutine (to send the next message, say): a reply's is awaited in the subscription's
    own task, in order with the replies after it; an expiry's is run by ``spawn``.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        timeout: float,
        limit: int,
        spawn: Callable[[Coroutine[Any, Any, object]], None],
    ) -> None:
        self._nc = nc
        self._timeout = timeout
        self._limit = limit
        self._spawn = spawn
        # token -> (deadline, answer): a tuple, not an object, per publish
        self._pending: dict[str, tuple[float, Answer]] = {}
        self._tokens = itertools.count(1)
        self._prefix = ""
        self._sub: Subscription | None = None
        self._timer: asyncio.TimerHandle | None = None
        # The connection's loop, looked up once: on Python 3.11 ``get_running_loop()`` makes a ``getpid()`` system
        # call each time (to notice a fork), which costs more than the rest of a publish on some machines.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._prefix = f"{self._nc.new_inbox()}."
        self._sub = await self._nc.subscribe(
            f"{self._prefix}*", cb=self._reply, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    def has_room(self) -> bool:
        return self._sub is not None and len(self._pending) < self._limit

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None, answer: Answer, *, answer_refusal: bool = False
    ) -> bool:
        """Publish; ``True`` if it went out (``answer`` is then called once), ``False`` if nats-py refused it.

        With ``answer_refusal``, ``answer`` is also called (with nats-py's error) when nats-py refused it: a caller
        that is itself an answer, sending the next message, has no one to return ``False`` to.
        """
        token = str(next(self._tokens))
        loop = self._loop
        assert loop is not None, "publish() before open()"
        deadline = loop.time() + self._timeout
        self._pending[token] = (deadline, answer)
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        except Exception as exc:
            logger.debug("could not send a publish ahead: %r", exc)
            pending = self._pending.pop(token, None)
            if answer_refusal and pending is not None:
                self._settle(pending, exc)
            return False
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return True

    async def request(self, subject: str, data: bytes, headers: dict[str, str] | None) -> Msg | None:
        """Publish and wait for the reply; ``None`` if there is no room for another or nats-py refused to send it.

        Raises ``TimeoutError`` when no reply comes in time, or the error that closed the sender.
        """
        if not self.has_room():
            return None
        assert self._loop is not None, "request() before open()"
        answered: asyncio.Future[Msg | BaseException] = self._loop.create_future()

        def answer(reply: Msg | BaseException) -> None:
            if not answered.done():
                answered.set_result(reply)

        if not await self.publish(subject, data, headers, answer):
            return None
        reply = await answered
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def _reply(self, msg: Msg) -> None:
        pending = self._pending.pop(msg.subject[len(self._prefix) :], None)
        if pending is not None:
            then = pending[1](msg)
            if then is not None:
                await then

    def _expire(self) -> None:
        """Answer every publish past its deadline with ``TimeoutError`` (they are in the order they were sent)."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._pending:
            token, pending = next(iter(self._pending.items()))
            if pending[0] > now:
                self._timer = loop.call_at(pending[0], self._expire)
                return
            del self._pending[token]
            self._settle(pending, TimeoutError("no acknowledgement from JetStream"))

    def _settle(self, pending: tuple[float, Answer], error: BaseException) -> None:
        then = pending[1](error)
        if then is not None:
            self._spawn(then)

    async def close(self, error: BaseException) -> None:
        """Answer everything still pending with ``error`` and stop listening."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for each in pending.values():
            self._settle(each, error)
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
