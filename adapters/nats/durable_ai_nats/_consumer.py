"""Ephemeral push consumers: the one way this backend reads a log.

Every read goes through a consumer created with the extended ``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``
subject, so that NATS permissions can confine a client to the subjects of its own session, and delivers to an
inbox of the connection's inbox prefix. Consumers are ``AckNone``, in memory, with idle heartbeats and flow
control. Delivery gaps (a consumer sequence that jumps, a heartbeat that reports more than was received, a
consumer that went silent or was deleted) end the read with :class:`~durable_ai.errors.BackendUnavailable`; the
caller reads again from its last position, so a gap is never silent.

:class:`Backlog` reads what a log holds, at the reader's pace (flow control is answered only when the reader has
consumed up to it). :class:`Feed` is the live tail of one subject, shared by every local reader of it: one
consumer per subject per connection, fanned out to bounded per-reader queues; a reader whose queue overflows
goes back to reading the backlog instead of slowing the feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.manager import JetStreamManager

from durable_ai.errors import BackendUnavailable

logger = logging.getLogger("durable_ai_nats")

_STATUS = "Status"
_DESCRIPTION = "Description"
_LAST_CONSUMER = "Nats-Last-Consumer"
_STALLED = "Nats-Consumer-Stalled"


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that something below swallowed.

    Before Python 3.12, ``asyncio.wait_for`` (which nats-py's requests use) can return a result and drop a
    ``cancel()`` that arrived in the same loop iteration; the task then goes on with ``cancelling() > 0``. Waiting
    loops call this so such a task still stops, instead of following a live tail forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@dataclass(frozen=True, slots=True)
class Delivered:
    """One stored message as a consumer delivered it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None


def parse_ack_subject(reply: str) -> tuple[int, int, int]:
    """``(stream sequence, consumer sequence, pending)`` from a JetStream delivery's reply subject."""
    tokens = reply.split(".")
    # v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    # v2: $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]
    base = 2 if len(tokens) == 9 else 4
    return int(tokens[base + 3]), int(tokens[base + 4]), int(tokens[base + 6])


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """What to consume: a subject of a stream, from where."""

    stream: str
    subject: str
    deliver: DeliverPolicy
    start_seq: int | None = None


class _PushConsumer:
    """One ephemeral push consumer on an inbox of its own; :meth:`check` classifies each delivery and finds gaps."""

    def __init__(self, nc: NATS, jsm: JetStreamManager, spec: ConsumerSpec, heartbeat: float) -> None:
        self.nc = nc
        self.jsm = jsm
        self.spec = spec
        self.heartbeat = heartbeat
        self.name = secrets.token_hex(11)
        self.sub: Subscription | None = None
        self.cseq = 0
        self.last_activity = time.monotonic()
        self.broken: BaseException | None = None
        self.created = False

    async def create(self, cb: Callable[[Msg], Awaitable[None]] | None) -> int:
        """Subscribe to a new inbox and create the consumer; returns how many messages it has to deliver.

        Each call (a retry after a timeout, say) creates a consumer of a new name on a new inbox, dropping what a
        previous attempt may have created: a request that timed out may still have succeeded.
        """
        if self.sub is not None or self.created:
            self.created = True
            await self.close()
            self.name = secrets.token_hex(11)
            self.cseq = 0
        inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(inbox, cb=cb, pending_msgs_limit=-1, pending_bytes_limit=-1)
        config = ConsumerConfig(
            name=self.name,
            deliver_subject=inbox,
            filter_subject=self.spec.subject,
            deliver_policy=self.spec.deliver,
            opt_start_seq=self.spec.start_seq,
            ack_policy=AckPolicy.NONE,
            flow_control=True,
            idle_heartbeat=self.heartbeat,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=max(10.0, self.heartbeat * 5),
        )
        info = await self.jsm.add_consumer(self.spec.stream, config)
        self.created = True
        self.last_activity = time.monotonic()
        return int(info.num_pending or 0)

    def check(self, msg: Msg) -> Delivered | str | None:
        """Classify one delivery: a message, a flow-control reply subject to answer (``str``), or ``None``."""
        self.last_activity = time.monotonic()
        headers = msg.headers
        if headers is not None and _STATUS in headers:
            status = headers[_STATUS]
            if status == "100":
                if msg.reply:
                    return msg.reply  # flow control request
                last = headers.get(_LAST_CONSUMER)
                if last is not None and int(last) > self.cseq:
                    self.fail(f"the consumer delivered {last} messages, {self.cseq} arrived")
                return headers.get(_STALLED)
            self.fail(f"the consumer ended: {status} {headers.get(_DESCRIPTION, '')}".strip())
            return None
        seq, cseq, _ = parse_ack_subject(msg.reply)
        if cseq != self.cseq + 1:
            self.fail(f"delivery gap: consumer sequence {cseq} after {self.cseq}")
        self.cseq = cseq
        return Delivered(seq, msg.subject, msg.data, headers)

    def fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = BackendUnavailable(reason)

    def failed(self) -> bool:
        return self.broken is not None

    def stale(self) -> bool:
        return time.monotonic() - self.last_activity > self.heartbeat * 3

    async def close(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.created and self.nc.is_connected:
            self.created = False
            # Unsubscribing leaves the consumer on the server until its inactivity threshold: delete it now.
            try:
                async with asyncio.timeout(2):
                    await self.jsm.delete_consumer(self.spec.stream, self.name)
            except Exception as exc:
                logger.debug("could not delete consumer %s: %s", self.name, exc)


class Backlog:
    """Reads the messages a consumer had to deliver when it was created, then stops."""

    def __init__(self, nc: NATS, jsm: JetStreamManager, spec: ConsumerSpec, heartbeat: float) -> None:
        self._consumer = _PushConsumer(nc, jsm, spec, heartbeat)
        self.remaining = 0

    async def open(self) -> int:
        self.remaining = await self._consumer.create(None)
        return self.remaining

    async def next(self) -> Delivered | None:
        """The next message, or ``None`` when every message that existed at creation was read."""
        consumer = self._consumer
        if self.remaining <= 0:
            return None
        assert consumer.sub is not None
        # nats-py has no public read that neither blocks nor creates a task per message (next_msg does both).
        queue = consumer.sub._pending_queue  # noqa: SLF001
        while True:
            if consumer.broken is not None:
                raise consumer.broken
            if queue.empty():
                raise_if_cancelling()
                try:
                    async with asyncio.timeout(consumer.heartbeat):
                        msg = await queue.get()
                except TimeoutError:
                    if consumer.stale() or not consumer.nc.is_connected:
                        raise BackendUnavailable("the backlog consumer went silent") from None
                    continue
            else:
                msg = queue.get_nowait()
            got = consumer.check(msg)
            if isinstance(got, Delivered):
                if consumer.broken is not None:
                    raise consumer.broken
                self.remaining -= 1
                return got
            if got:
                # Answering flow control only once the reader got here is what paces the server.
                await consumer.nc.publish(got, b"")

    async def close(self) -> None:
        await self._consumer.close()


class Tap:
    """One local reader's view of a :class:`Feed`: a bounded queue of the feed's deliveries."""

    def __init__(self, feed: Feed, limit: int) -> None:
        self.feed = feed
        self.limit = limit
        self.items: deque[Delivered] = deque()
        self.ready = asyncio.Event()
        self.overflowed = False

    def offer(self, item: Delivered) -> None:
        if self.overflowed:
            return
        if len(self.items) >= self.limit:
            self.overflowed = True
            self.items.clear()
        else:
            self.items.append(item)
        self.ready.set()

    async def next(self) -> Delivered | None:
        """The next live message; ``None`` when this reader fell too far behind and must read the backlog."""
        consumer = self.feed.consumer
        while not self.items:
            if self.overflowed:
                return None
            if consumer.broken is not None:
                raise consumer.broken
            self.ready.clear()
            raise_if_cancelling()
            try:
                async with asyncio.timeout(consumer.heartbeat):
                    await self.ready.wait()
            except TimeoutError:
                if consumer.stale() or not consumer.nc.is_connected:
                    self.feed.fail("the live consumer went silent")
        if self.overflowed:
            return None
        return self.items.popleft()


class Feed:
    """The live tail of one subject for every local reader of it."""

    def __init__(self, nc: NATS, jsm: JetStreamManager, stream: str, subject: str, heartbeat: float) -> None:
        self.consumer = _PushConsumer(nc, jsm, ConsumerSpec(stream, subject, DeliverPolicy.NEW), heartbeat)
        self.taps: set[Tap] = set()
        self._ready: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Create the consumer once; concurrent callers wait for the same creation."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            try:
                await self.consumer.create(self._deliver)
            except BaseException as exc:
                self.consumer.fail(f"could not create the live consumer: {exc}")
                self._ready.set_exception(BackendUnavailable(str(exc)))
                self._ready.exception()  # mark retrieved: callers re-raise their own copy
                raise
            self._ready.set_result(None)
        else:
            await asyncio.shield(self._ready)

    async def _deliver(self, msg: Msg) -> None:
        consumer = self.consumer
        if consumer.failed():
            return  # after a gap nothing more may reach the readers: they read the backlog again
        got = consumer.check(msg)
        if consumer.failed():
            self._wake_all()
        elif isinstance(got, Delivered):
            for tap in self.taps:
                tap.offer(got)
        elif got:
            # The feed never waits for a reader: slow readers overflow to the backlog instead.
            with contextlib.suppress(Exception):
                await consumer.nc.publish(got, b"")

    def fail(self, reason: str) -> None:
        self.consumer.fail(reason)
        self._wake_all()

    def _wake_all(self) -> None:
        for tap in self.taps:
            tap.ready.set()

    @property
    def broken(self) -> bool:
        return self.consumer.failed()

    async def close(self) -> None:
        self.fail("the feed closed")
        await self.consumer.close()
