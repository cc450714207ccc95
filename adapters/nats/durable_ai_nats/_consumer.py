"""Ephemeral push consumers: the one way this backend reads a log.

Every consumer delivers to an inbox of the connection's inbox prefix and is ``AckNone``, in memory, with idle
heartbeats and flow control; it expires on the server once nobody listens (the stream's consumer limits set
how soon). A delivery is a stored message only if its reply subject is a JetStream ack subject
(``$JS.ACK.<stream>...``): a header a client wrote (``Status: 503``, say) never makes a stored message look
like a server status, since clients cannot choose the reply subject of what the server delivers. Delivery gaps
(a consumer sequence that jumps, a heartbeat that reports more than was received, a consumer that went silent
or was deleted) end the read with :class:`~durable_ai.errors.BackendUnavailable`; the caller reads again from
its last position, so a gap is never silent.

:class:`Backlog` reads what a log holds, at the reader's pace (flow control is answered only when the reader
has consumed up to it), with the extended ``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`` subject, so that
permissions can confine a client to its own session. :class:`FeedGroup` is the live tail of up to a fixed
number of subjects of one stream, for every local reader of them: one consumer whose filter subjects grow and
shrink as readers come and go, fanned out to bounded per-reader taps (see :mod:`durable_ai.backend`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.manager import JetStreamManager

from durable_ai.backend import Fanout, StoredMessage, Tap, cancel_and_wait, raise_if_cancelling
from durable_ai.errors import BackendError, BackendUnavailable, PermissionDenied

logger = logging.getLogger("durable_ai_nats")
Call = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]

_STATUS = "Status"
_DESCRIPTION = "Description"
_LAST_CONSUMER = "Nats-Last-Consumer"
_STALLED = "Nats-Consumer-Stalled"
_ACK_PREFIX = "$JS.ACK."


class ConsumerLimitReached(BackendError):
    """JetStream refused a consumer: the stream's ``max_consumers`` is reached. Not retried: someone must see it."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """One stored message as a consumer delivered it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None
    #: when the message was stored, nanoseconds since the epoch
    stored_ns: int = 0
    #: messages of the consumer's subjects after this one, when it was delivered
    pending: int = 0


def parse_ack_subject(reply: str) -> tuple[int, int, int, int]:
    """``(stream sequence, consumer sequence, timestamp ns, pending)`` from a JetStream delivery's reply subject."""
    tokens = reply.split(".")
    # v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    # v2: $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]
    base = 2 if len(tokens) == 9 else 4
    return int(tokens[base + 3]), int(tokens[base + 4]), int(tokens[base + 5]), int(tokens[base + 6])


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """What to consume: subjects of a stream, from where."""

    stream: str
    subjects: tuple[str, ...]
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

    def config(self, inbox: str) -> ConsumerConfig:
        subjects = self.spec.subjects
        return ConsumerConfig(
            name=self.name,
            deliver_subject=inbox,
            # One subject goes in the request subject too, where permissions can check it.
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=list(subjects) if len(subjects) > 1 else None,
            deliver_policy=self.spec.deliver,
            opt_start_seq=self.spec.start_seq,
            ack_policy=AckPolicy.NONE,
            flow_control=True,
            idle_heartbeat=self.heartbeat,
            mem_storage=True,
            num_replicas=1,
            # No inactive_threshold: the stream's consumer limits give it (and refuse a longer one).
        )

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
        info = await self.jsm.add_consumer(self.spec.stream, self.config(inbox))
        self.created = True
        self.last_activity = time.monotonic()
        return int(info.num_pending or 0)

    async def update(self, subjects: tuple[str, ...]) -> None:
        """Change the subjects of a created consumer (an idempotent request: safe to retry)."""
        assert self.sub is not None
        self.spec = ConsumerSpec(self.spec.stream, subjects, self.spec.deliver, self.spec.start_seq)
        await self.jsm.add_consumer(self.spec.stream, self.config(self.sub.subject))

    def check(self, msg: Msg) -> Delivered | str | None:
        """Classify one delivery: a message, a flow-control reply subject to answer (``str``), or ``None``."""
        self.last_activity = time.monotonic()
        reply = msg.reply
        if reply.startswith(_ACK_PREFIX):
            # A stored message, whatever headers its publisher gave it.
            seq, cseq, stored_ns, pending = parse_ack_subject(reply)
            if cseq != self.cseq + 1:
                self.fail(f"delivery gap: consumer sequence {cseq} after {self.cseq}")
            self.cseq = cseq
            return Delivered(seq, msg.subject, msg.data, msg.headers, stored_ns, pending)
        headers = msg.headers or {}
        status = headers.get(_STATUS)
        if status == "100":
            if reply:
                return reply  # flow control request
            last = headers.get(_LAST_CONSUMER)
            if last is not None and last.isdigit() and int(last) > self.cseq:
                self.fail(f"the consumer delivered {last} messages, {self.cseq} arrived")
            return headers.get(_STALLED)
        self.fail(f"the consumer ended: {status} {headers.get(_DESCRIPTION, '')}".strip())
        return None

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


class FeedGroup:
    """The live tail of up to ``capacity`` subjects of one stream: one consumer, one tap per local reader.

    Readers :meth:`attach` to a subject; the consumer's filter subjects follow the set of subjects that have
    readers (one request per change, batched while a change is in flight), and the consumer is deleted when the
    last reader leaves. A delivery gap, a silent consumer or a lost connection fails every tap of the group:
    its readers read their backlogs again and attach to a new group.
    """

    def __init__(
        self,
        nc: NATS,
        jsm: JetStreamManager,
        stream: str,
        epoch: str,
        *,
        heartbeat: float,
        capacity: int,
        tap_messages: int,
        tap_bytes: int,
        call: Call,
        on_done: Callable[[FeedGroup], None],
        on_quiet: Callable[[], None],
    ) -> None:
        self.consumer = _PushConsumer(nc, jsm, ConsumerSpec(stream, (), DeliverPolicy.NEW), heartbeat)
        self.epoch = epoch
        self.capacity = capacity
        self.fanout: Fanout[str] = Fanout()
        self._tap_messages = tap_messages
        self._tap_bytes = tap_bytes
        self._call = call
        self._on_done = on_done
        self._on_quiet = on_quiet
        self._applied: frozenset[str] = frozenset()
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self._closed = False
        self._watching: asyncio.TimerHandle | None = None

    @property
    def broken(self) -> bool:
        return self.consumer.failed() or self._closed

    def has_room(self) -> bool:
        return not self.broken and len(self.fanout) < self.capacity

    async def attach(self, subject: str) -> Tap:
        """A tap on ``subject``, once the consumer delivers it."""
        tap = Tap(max_messages=self._tap_messages, max_bytes=self._tap_bytes)  # the group watches for them all
        self.fanout.add(subject, tap)
        try:
            while subject not in self._applied or not self.consumer.created:
                if self.consumer.broken is not None:
                    raise self.consumer.broken
                if self._closed:
                    raise BackendUnavailable("the live feed closed")
                self._kick()
                await self._synced.wait()
        except BaseException:
            self.detach(subject, tap)
            raise
        return tap

    def detach(self, subject: str, tap: Tap) -> None:
        if self.fanout.remove(subject, tap):
            self._kick()

    def _kick(self) -> None:
        self._synced.clear()
        self._changed.set()
        if self._sync_task is None and not self._closed:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync(), name="durable-ai-nats feed")

    async def _sync(self) -> None:
        """Bring the consumer's subjects to the subjects that have readers, until they agree."""
        try:
            while self._changed.is_set() and not self.broken:
                self._changed.clear()
                wanted = frozenset(self.fanout.taps)
                if not wanted:
                    break
                if wanted != self._applied or not self.consumer.created:
                    subjects = tuple(sorted(wanted))
                    if not self.consumer.created:
                        self.consumer.spec = ConsumerSpec(self.consumer.spec.stream, subjects, DeliverPolicy.NEW)
                        await self._call(partial(self.consumer.create, self._deliver))
                        if self._watching is None:
                            self._watch()
                    else:
                        await self._call(partial(self.consumer.update, subjects))
                    self._applied = wanted
                self._synced.set()  # waiters check whether their subject is in; if not, they kick again
        except Exception as exc:
            # Refusals that a retry cannot fix reach the readers as they are; anything else (a consumer deleted
            # under us, a timeout) makes them read again, on a new group.
            permanent = isinstance(exc, PermissionDenied | ConsumerLimitReached)
            self.fail(f"could not set up the live consumer: {exc}", exc if permanent else None)
        finally:
            self._sync_task = None
            self._synced.set()
            if not self.fanout.taps or self.broken:
                self._finish()

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            self._stop_watching()
            self._on_done(self)

    def _stop_watching(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None

    async def _deliver(self, msg: Msg) -> None:
        consumer = self.consumer
        if consumer.failed():
            return  # after a gap nothing more may reach the readers: they read the backlog again
        got = consumer.check(msg)
        if consumer.failed():
            self._fail_taps()
        elif isinstance(got, Delivered):
            self.fanout.deliver(got.subject, StoredMessage(self.epoch, str(got.seq), got.data))
        elif got:
            # The feed never waits for a reader: slow readers overflow to the backlog instead.
            with contextlib.suppress(Exception):
                await consumer.nc.publish(got, b"")

    def _watch(self) -> None:
        """Every half heartbeat while the group lives: a silent consumer fails the group's readers."""
        self._watching = None
        if self._closed or self.consumer.broken is not None:
            return
        consumer = self.consumer
        if consumer.created:
            if consumer.stale() or not consumer.nc.is_connected:
                self.fail("the live consumer went silent")
                return
            if time.monotonic() - consumer.last_activity > consumer.heartbeat * 1.5:
                self._on_quiet()  # a heartbeat is late: check the connection before the consumer counts as lost
        self._watching = asyncio.get_running_loop().call_later(consumer.heartbeat / 2, self._watch)

    def fail(self, reason: str, error: BaseException | None = None) -> None:
        """Fail every reader of the group (they read again, on a new group)."""
        if self.consumer.broken is None:
            self.consumer.broken = error if error is not None else BackendUnavailable(reason)
        self._fail_taps()
        if self._sync_task is None:
            self._finish()

    def fail_subject(self, subject: str, reason: str) -> None:
        self.fanout.fail(subject, BackendUnavailable(reason))

    def _fail_taps(self) -> None:
        assert self.consumer.broken is not None
        self.fanout.fail_all(self.consumer.broken)

    async def close(self) -> None:
        self._closed = True
        self._stop_watching()
        task, self._sync_task = self._sync_task, None
        if task is not None:
            await cancel_and_wait(task)
        if self.consumer.broken is None:
            self.consumer.broken = BackendUnavailable("the feed closed")
        self._fail_taps()
        await self.consumer.close()
