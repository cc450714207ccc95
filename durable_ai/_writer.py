"""The per-session writer: coalescing, the rate budget, idempotent retries and fragmentation.

Every run of a session in one hub writes through one ``SessionWriter``. Events wait in ``_items`` (deltas are
concatenated there) until a flush seals them into broker messages in ``_outbox``. A sealed message never changes:
its id is the id of its first event, so a retry after a timeout or a reconnect is deduplicated by the broker.

One message per session is in flight at a time (see docs/performance.md for why). On a backend that
:class:`~durable_ai.backend.PublishesAhead`, the message goes out from whoever made it due (the writing run, or
the flush loop when a window closes) and the next one from the backend's acknowledgement handler, so a stream of
messages does not wake the flush loop once per message; anything unusual falls back to a full ``publish``.

Retries are explicit: a publish that times out or finds the broker unreachable stays at the head of the outbox
and is retried with backoff, under the same id, until it lands or the hub closes (waiters get
:class:`PublishError` after ``publish_timeout``, but nothing is dropped). Any other failure is a refusal: that
message's waiters get the error, it is logged at ERROR with the message id, and later messages go on. An item that
cannot even be encoded fails alone, the same way.

The first message this writer publishes to a log that is empty starts with a ``log-start`` record, so a reader from
the start of the log can tell whether retention dropped anything (see :mod:`durable_ai.events`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import json.encoder
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._util import now_ms
from .backends.base import Backend, Channel, OpensLogs, Outgoing, PublishesAhead
from .coalesce import Coalesce
from .cursor import LogPosition
from .errors import BackendUnavailable, HubClosed, PermissionDenied, PublishError, PublishRefused
from .events import LOG_START, record

logger = logging.getLogger("durable_ai")

__all__ = ["SessionWriter", "Spawn"]

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]
"""Starts an owned background task (the hub's supervisor)."""

# A JSON string literal, as json.dumps writes it with ensure_ascii=False (the C implementation).
_quote = json.encoder.encode_basestring
# Room left in a broker message for the fragment record around a chunk.
_FRAGMENT_OVERHEAD = 512
# Failed items remembered for waiters that ask later (a run's flush()).
_FAILURES_KEPT = 10_000
# What a retry can fix: the broker was unreachable or did not answer in time.
_RETRYABLE = (BackendUnavailable, PublishError, TimeoutError, OSError)


@dataclass(slots=True)
class _Delta:
    seq: int
    id: str
    type: str
    run_id: str
    agent: str
    ts: int
    part_id: str
    text: str
    size: int
    # The deltas concatenated to the first one, with it (a list only once there is a second one: a buffered delta
    # is then one object the garbage collector tracks, not two, which matters when a fast writer buffers many).
    chunks: list[str] | None = None

    def append(self, delta: str, size: int) -> None:
        if self.chunks is None:
            self.chunks = [self.text, delta]
        else:
            self.chunks.append(delta)
        self.size += size

    def encode(self, session: str) -> bytes:
        text = self.text if self.chunks is None else "".join(self.chunks)
        return _delta_line(self.id, self.type, session, self.run_id, self.agent, self.ts, self.part_id, text)


def _delta_line(id: str, type: str, session: str, run_id: str, agent: str, ts: int, part_id: str, text: str) -> bytes:
    """A delta event's line, byte for byte what ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))``
    gives for the same fields in the same order (``type`` is one of two fixed names), four times faster."""
    q = _quote
    return (
        f'{{"v":1,"id":{q(id)},"type":"{type}","session":{q(session)},"run_id":{q(run_id)},'
        f'"agent":{q(agent)},"ts":{ts},"part_id":{q(part_id)},"delta":{q(text)}}}'
    ).encode()


class _Encoded(NamedTuple):
    """An event encoded already. A tuple: the garbage collector stops tracking one that holds no future, so a
    writer that buffers many events (one message each, far ahead of the broker) does not make collections costly."""

    seq: int
    id: str
    data: bytes
    standalone: bool = False
    landed: asyncio.Future[LogPosition] | None = None


@dataclass(slots=True)
class _Message:
    """A sealed broker message: one or more event lines, or one event split into fragments."""

    message_id: str
    first_seq: int
    last_seq: int
    data: bytes = b""
    fragments: list[bytes] | None = None
    next_fragment: int = 0
    first_position: str | None = None
    landed: asyncio.Future[LogPosition] | None = None


@dataclass(slots=True)
class _Waiter:
    seq: int
    own: bool
    future: asyncio.Future[None] = field(repr=False)


class SessionWriter:
    """Buffers, batches and publishes the events of one session (see the module docstring).

    Args:
        ahead: the backend, if it :class:`~durable_ai.backend.PublishesAhead` (checked once by the hub, not per
            writer: a runtime protocol check is slow).
        opens: the backend, if it :class:`~durable_ai.backend.OpensLogs` (the first message of a log whose start
            is not known then costs one request, not a ``head()`` and a publish).
        spawn: starts the flush loop as an owned task.
        log_started: whether the session's log is known to have its ``log-start`` record already.
        on_log_started: called once the writer knows the log has it.
        on_idle: called when the writer is retiring and everything it was given is published.
        stretching: how far a window may stretch past ``max_delay`` now, in multiples of the policy's stretch
            (0: not at all; see :class:`Coalesce` and :class:`~durable_ai._load.LoadGauge`).
    """

    def __init__(
        self,
        *,
        backend: Backend,
        ahead: PublishesAhead | None,
        opens: OpensLogs | None,
        session: str,
        policy: Coalesce,
        budget: Callable[[], Awaitable[None]] | None,
        publish_timeout: float,
        max_pending_bytes: int,
        spawn: Spawn,
        new_id: Callable[[], str],
        log_started: bool,
        on_log_started: Callable[[], None],
        on_idle: Callable[[], None],
        stretching: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._backend = backend
        self._session = session
        self._channel = Channel(session, "events")
        self._policy = policy
        self._budget = budget
        self._publish_timeout = publish_timeout
        self._max_pending_bytes = max_pending_bytes
        self._max_message = backend.limits.max_message_bytes
        self._spawn = spawn
        self._new_id = new_id
        self._log_started = log_started
        self._on_log_started = on_log_started
        self._on_idle = on_idle
        self._items: deque[_Delta | _Encoded] = deque()
        self._pending_bytes = 0
        self._open_delta: dict[str, _Delta] = {}
        # Sealed messages; without batching, an encoded event that is a message of its own stays as it is.
        self._outbox: deque[_Message | _Encoded] = deque()
        self._seq = 0
        self._done = 0
        self._failed: OrderedDict[int, BaseException] = OrderedDict()
        self._waiters: deque[_Waiter] = deque()
        self._urgent = False
        self._deadline: float | None = None
        # Under load a window stays open past its deadline until it holds this many deltas, or for the stretch
        # (times the stretching asked for when the deadline passed, up to the longest); then _stretched is set.
        self._stretching = stretching
        self._stretched = False
        self._deltas = 0
        self._enough = policy.deltas_under_load
        self._stretch = policy.max_delay * (policy.stretch_under_load - 1)
        self._longest = max(self._stretch, policy.max_delay_under_load - policy.max_delay) if self._stretch else 0.0
        self._batching = policy.batching
        self._max_bytes = policy.max_bytes
        self._wake = asyncio.Event()
        self._failure: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._retiring = False
        self._stopped = False
        self._finished = False
        # Sending ahead: the backend's capability (only without a rate budget, which paces every message).
        self._ahead = ahead if budget is None else None
        self._opens = opens
        # A message is in flight (sent ahead, or being published by the flush loop).
        self._sending = False
        # The head of the outbox must go through a full publish (sending it ahead failed).
        self._redo = False
        self._on_landed = self._landed  # bound once, not per message

    # -- adding events -------------------------------------------------------------------------------------

    def add_delta(self, type: str, run_id: str, agent: str, part_id: str, delta: str, size: int, urgent: bool) -> int:
        """Buffer a delta (``size``: its UTF-8 bytes), concatenating it to the run's open delta of the same part
        when the policy allows. Returns the sequence to ``wait`` on."""
        self._check()
        if not self._batching:
            # One message per event: encoded now, and kept as the line alone until it is sent.
            self._seq += 1
            event_id = self._new_id()
            line = _delta_line(event_id, type, self._session, run_id, agent, now_ms(), part_id, delta)
            self._items.append(_Encoded(self._seq, event_id, line))
            self._pending_bytes += len(line)
            if not self._urgent or self._task is None or self._task.done():
                self._schedule(True)
            return self._seq
        open_delta = self._open_delta.get(run_id)
        if (
            open_delta is not None
            and open_delta.part_id == part_id
            and open_delta.type == type
            and open_delta.size + size <= self._max_bytes
        ):
            open_delta.append(delta, size)
            self._deltas += 1
            self._pending_bytes += size
            if self._deltas == self._enough and self._stretched:
                urgent = True  # a window kept open for want of deltas has enough now
            elif not urgent and self._deadline is not None and self._pending_bytes < self._max_bytes:
                # The common case: a window is open, and its flush loop was started when it opened.
                if self._task is None or self._task.done():
                    self._start()
                return open_delta.seq
        else:
            self._seq += 1
            open_delta = _Delta(self._seq, self._new_id(), type, run_id, agent, now_ms(), part_id, delta, size)
            self._items.append(open_delta)
            self._open_delta[run_id] = open_delta
            self._deltas += 1
            self._pending_bytes += size
        self._schedule(urgent or self._pending_bytes >= self._max_bytes)
        return open_delta.seq

    def add_encoded(self, *, id: str, run_id: str | None, data: bytes) -> int:
        """Queue an encoded non-delta event for an immediate flush; returns the sequence to ``wait`` on."""
        self._check()
        self._seq += 1
        self._items.append(_Encoded(self._seq, id, data))
        if run_id is not None:
            self._open_delta.pop(run_id, None)
        self._pending_bytes += len(data)
        self._schedule(True)
        return self._seq

    def add_standalone(self, *, id: str, data: bytes) -> asyncio.Future[LogPosition]:
        """Queue an event in a broker message of its own, whose id is the event's id, so that the broker
        deduplicates it against the same event written by another process. Returns a future of the position it
        landed at (the first copy's, if the broker had it already)."""
        self._check()
        self._seq += 1
        landed: asyncio.Future[LogPosition] = asyncio.get_running_loop().create_future()
        landed.add_done_callback(_retrieve)
        self._items.append(_Encoded(self._seq, id, data, standalone=True, landed=landed))
        self._pending_bytes += len(data)
        self._schedule(True)
        return landed

    def _check(self) -> None:
        if self._stopped:
            raise HubClosed("the hub was closed; nothing more can be written")

    def _schedule(self, urgent: bool) -> None:
        # Wake the flush loop only when a window opens or a flush becomes urgent, not for every token.
        if urgent:
            if not self._urgent:
                self._urgent = True
                if not (self._sending and self._ahead is not None):  # else the acknowledgement sends it
                    self._wake.set()
        elif self._deadline is None:
            self._deadline = time.monotonic() + self._policy.max_delay
            self._wake.set()
        self._start()

    @property
    def wants_caller(self) -> bool:
        """The run that just added an event must act (see :attr:`overloaded` and :attr:`flush_due`)."""
        return self._pending_bytes > self._max_pending_bytes or (not self._sending and self._due())

    @property
    def flush_due(self) -> bool:
        """A flush can happen now: a writer that never awaits anything else must yield (or :meth:`kick`) to let it.

        Not while a message is in flight: the next one waits for its acknowledgement whatever the caller does.
        """
        return not self._sending and self._due()

    def _due(self) -> bool:
        if self._urgent:
            return True
        deadline = self._deadline
        if deadline is None:
            return False
        now = time.monotonic()
        if now < deadline:
            return False
        if self._stretched or not self._longest or self._deltas >= self._enough:
            return True
        # Past max_delay: due, unless the loop is short of CPU and the window is worth stretching; then it stays
        # open for the stretch (or until it holds enough deltas), once.
        stretching = self._stretching()
        if stretching <= 0:
            return True
        self._stretched = True
        self._deadline = deadline + min(self._longest, self._stretch * stretching)
        return now >= self._deadline

    def _until_due(self) -> float:
        """Seconds until the open window is due (0 or less: now). Call only with a window open."""
        if self._due():
            return 0.0
        assert self._deadline is not None
        return self._deadline - time.monotonic()

    async def kick(self) -> None:
        """Send what is due now, from the caller's task, if the backend can send ahead; else let the loop run."""
        outgoing = self._next_ahead()
        if outgoing is None:
            await asyncio.sleep(0)
        else:
            await self._send_ahead(outgoing)

    @property
    def overloaded(self) -> bool:
        """More is buffered than ``max_pending_bytes``: writers should wait for a flush."""
        return self._pending_bytes > self._max_pending_bytes

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def idle(self) -> bool:
        return not self._items and not self._outbox

    # -- waiting -------------------------------------------------------------------------------------------

    async def wait(self, seq: int, *, own: bool = True) -> None:
        """Wait until the events up to ``seq`` are published (or refused).

        With ``own`` (``seq`` is the caller's own item), raise the error that refused item ``seq``. Raises
        :class:`PublishError` after ``publish_timeout`` (the events stay buffered and are retried).
        """
        self._check()
        failed = self._failed.get(seq) if own else None
        if failed is not None:
            raise failed
        if self._done >= seq:
            return
        if (outgoing := self._next_ahead()) is not None:
            await self._send_ahead(outgoing)
            if self._done >= seq:
                return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)  # a waiter that timed out no longer awaits its future
        self._waiters.append(_Waiter(seq, own, future))
        self._start()
        try:
            async with asyncio.timeout(self._publish_timeout):
                await asyncio.shield(future)
        except TimeoutError:
            raise PublishError(
                f"events of session {self._session!r} were not confirmed by the broker within "
                f"{self._publish_timeout:g}s; they stay buffered and are retried until the hub closes"
            ) from self._failure

    def _release_waiters(self) -> None:
        while self._waiters and self._waiters[0].seq <= self._done:
            waiter = self._waiters.popleft()
            if waiter.future.done():
                continue
            failed = self._failed.get(waiter.seq) if waiter.own else None
            if failed is not None:
                waiter.future.set_exception(failed)
            else:
                waiter.future.set_result(None)

    def _fail(self, first: int, last: int, error: BaseException) -> None:
        for seq in range(first, last + 1):
            self._failed[seq] = error
        while len(self._failed) > _FAILURES_KEPT:
            self._failed.popitem(last=False)

    # -- the flush loop ------------------------------------------------------------------------------------

    def _start(self) -> None:
        if (self._task is None or self._task.done()) and not self._stopped:
            self._task = self._spawn(self._run(), f"durable-ai writer {self._session}")

    def retire(self) -> None:
        """Stop once everything buffered is published, then call ``on_idle`` (unless used again first)."""
        self._retiring = True
        if self._task is None or self._task.done():
            if self.idle:
                self._on_idle()
        else:
            self._wake.set()

    def keep(self) -> None:
        """Undo :meth:`retire`: the writer is in use again."""
        self._retiring = False

    def forget_log_start(self) -> None:
        """The log was deleted: the next message opens a new one."""
        self._log_started = False

    # -- sending ahead -----------------------------------------------------------------------------------------

    def _next_ahead(self) -> Outgoing | None:
        """Seal what is due and claim the head of the outbox for sending ahead, if it may go that way now."""
        if (
            self._ahead is None
            or self._sending
            or self._redo
            or self._finished
            or self._failure is not None
            or not self._log_started
        ):
            return None
        if not self._outbox:
            if not self._items or not (self._urgent or self._due()):
                return None
            self._seal()  # without batching, the first encoded event goes to the outbox as it is (_seal_encoded)
            if not self._outbox:
                return None
        message = self._outbox[0]
        if isinstance(message, _Encoded):
            data, message_id = message.data, message.id
        elif message.fragments is None:
            data, message_id = message.data, message.message_id
        else:
            return None
        self._sending = True
        return Outgoing(self._channel, data, message_id, self._on_landed, message.landed is not None)

    async def _send_ahead(self, outgoing: Outgoing) -> None:
        assert self._ahead is not None
        try:
            sent = await self._ahead.send(outgoing)
        except BaseException:
            self._landed(BackendUnavailable("the message could not be sent"))
            raise
        if not sent:
            self._landed(BackendUnavailable("the backend could not send the message ahead"))

    def _landed(self, result: LogPosition | BaseException | None) -> Outgoing | None:
        """The outcome of the message sent ahead (the head of the outbox); returns the next one to send, if any."""
        if self._finished:
            return None
        self._sending = False
        if isinstance(result, BaseException):
            # A full publish of the same message (same id: the broker deduplicates) decides what happened.
            self._redo = True
            self._wake.set()
            return None
        message = self._outbox.popleft()
        self._done = message.seq if isinstance(message, _Encoded) else message.last_seq
        landed = message.landed
        if landed is not None and not landed.done():
            assert result is not None, "the message's Outgoing asked for its position"
            landed.set_result(result)
        if self._waiters and self._waiters[0].seq <= self._done:
            self._release_waiters()
        outgoing = self._next_ahead()
        if outgoing is None and (self._items or self._outbox or self._retiring):
            self._wake.set()  # a window to wait for, a message that needs the loop, or the loop's own retirement
        return outgoing

    # -- the flush loop ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if self._sending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.idle:
                if self._retiring:
                    self._on_idle()
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._outbox and not self._urgent and self._deadline is not None:
                delay = self._until_due()
                if delay > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
                    continue
            if self._budget is not None:
                await self._budget()
            if not self._outbox:
                self._seal()
                if not self._outbox:
                    continue
            if (outgoing := self._next_ahead()) is not None:
                await self._send_ahead(outgoing)
                continue
            head = self._outbox[0]
            if isinstance(head, _Encoded):
                head = self._outbox[0] = _as_message(head)
            message = head
            self._redo = False
            self._sending = True
            try:
                await self._publish(message)
            except _RETRYABLE as exc:
                if self._failure is None:
                    logger.warning("publishing to session %r failed, retrying: %s", self._session, exc)
                self._failure = exc
                self._sending = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception as exc:
                # A refusal (permissions, a broker rule, a bug): retrying cannot help, and later messages go on.
                logger.error(
                    "the broker refused message %r of session %r; its events are dropped: %s",
                    message.message_id,
                    self._session,
                    exc,
                )
                error = exc if isinstance(exc, PermissionDenied) else PublishRefused(message.message_id, exc)
                if error is not exc:
                    error.__cause__ = exc
                self._sending = False
                self._outbox.popleft()
                self._fail(message.first_seq, message.last_seq, error)
                if message.landed is not None and not message.landed.done():
                    message.landed.set_exception(error)
                self._done = max(self._done, message.last_seq)
                self._release_waiters()
                continue
            if self._failure is not None:
                logger.info("publishing to session %r recovered", self._session)
            self._failure = None
            self._sending = False
            backoff = 0.05
            self._outbox.popleft()
            self._done = message.last_seq
            self._release_waiters()

    def _seal(self) -> None:
        """Turn the buffered items into broker messages that fit the broker's size limit.

        Without batching (one message per event) only the first item is sealed: a writer far ahead of the broker
        then keeps each waiting event as one object, not as a sealed message too (fewer objects for the garbage
        collector to go through while they wait).
        """
        if self._seal_encoded():
            return
        items: deque[_Delta | _Encoded] | tuple[_Delta | _Encoded]
        if self._batching or len(self._items) <= 1:
            items, self._items = self._items, deque()
            self._close_window()
        else:
            first = self._items.popleft()
            items = (first,)
            self._pending_bytes -= first.size if isinstance(first, _Delta) else len(first.data)
        limit = self._max_message
        lines: list[bytes] = []
        size = 0
        first_id = ""
        first_seq = last_seq = 0

        def close_batch() -> None:
            nonlocal lines, size
            if lines:
                self._outbox.append(_Message(first_id, first_seq, last_seq, data=b"\n".join(lines)))
                lines, size = [], 0

        for item in items:
            try:
                line = item.encode(self._session) if isinstance(item, _Delta) else item.data
            except Exception as exc:  # the run checks what it buffers; this keeps one bad item from harming others
                logger.error("cannot encode event %r of session %r; it is dropped: %s", item.id, self._session, exc)
                self._fail(item.seq, item.seq, PublishRefused(item.id, exc))
                # Its waiters are answered when the message before it lands (or now, if there is none).
                if lines:
                    last_seq = item.seq
                elif self._outbox:
                    tail = self._outbox[-1]
                    if isinstance(tail, _Encoded):
                        tail = self._outbox[-1] = _as_message(tail)
                    tail.last_seq = item.seq
                else:
                    self._done = max(self._done, item.seq)
                    self._release_waiters()
                continue
            if len(line) > limit:
                close_batch()
                message = _Message(item.id, item.seq, item.seq, fragments=self._fragment(line))
                message.landed = item.landed if isinstance(item, _Encoded) else None
                self._outbox.append(message)
                continue
            if isinstance(item, _Encoded) and item.standalone:
                close_batch()
                self._outbox.append(_Message(item.id, item.seq, item.seq, data=line, landed=item.landed))
                continue
            if lines and (not self._policy.batching or size + 1 + len(line) > limit):
                close_batch()
            if not lines:
                first_id, first_seq = item.id, item.seq
            lines.append(line)
            size += len(line) + 1
            last_seq = item.seq
        close_batch()

    def _seal_encoded(self) -> bool:
        """The common case without batching, kept short: when the first item is one encoded event that fits a
        message, it goes to the outbox as it is, and is that message (``True``)."""
        items = self._items
        if self._batching or not items:
            return False
        first = items[0]
        if type(first) is not _Encoded or len(first.data) > self._max_message:
            return False
        items.popleft()
        if items:
            self._pending_bytes -= len(first.data)
        else:
            self._close_window()
        self._outbox.append(first)
        return True

    def _close_window(self) -> None:
        """Everything buffered was sealed: no window is open."""
        self._open_delta.clear()
        self._pending_bytes = 0
        self._urgent = False
        self._deadline = None
        self._stretched = False
        self._deltas = 0

    def _fragment(self, line: bytes) -> list[bytes]:
        chunk = (self._max_message - _FRAGMENT_OVERHEAD) // 4 * 3
        return [line[i : i + chunk] for i in range(0, len(line), chunk)]

    async def _opening(self) -> bytes | None:
        """The ``log-start`` record to put before the next message, if the log is empty; else ``None``."""
        if await self._backend.head(self._channel) is not None:
            self._log_started = True
            self._on_log_started()
            return None
        return record(LOG_START, id=self._new_id(), session=self._session, ts=now_ms())

    async def _publish(self, message: _Message) -> None:
        if not self._log_started and self._opens is not None and message.fragments is None:
            # One request: the backend stores the opening record with the message only if the log is empty.
            log_start = record(LOG_START, id=self._new_id(), session=self._session, ts=now_ms())
            position = await self._opens.publish_opening(
                self._channel, log_start, message.data, message_id=message.message_id
            )
            self._log_started = True
            self._on_log_started()
            if message.landed is not None and not message.landed.done():
                message.landed.set_result(position)
            return
        opening = None if self._log_started else await self._opening()
        if message.fragments is None:
            data = message.data if opening is None else opening + b"\n" + message.data
            position = await self._backend.publish(self._channel, data, message_id=message.message_id)
        else:
            if opening is not None:
                await self._backend.publish(self._channel, opening, message_id=f"{message.message_id}#start")
            position = await self._publish_fragments(message)
        if opening is not None:
            self._log_started = True
            self._on_log_started()
        if message.landed is not None and not message.landed.done():
            message.landed.set_result(position)

    async def _publish_fragments(self, message: _Message) -> LogPosition:
        assert message.fragments is not None
        count = len(message.fragments)
        position: LogPosition | None = None
        while message.next_fragment < count:
            index = message.next_fragment
            if index > 0 and self._budget is not None:
                await self._budget()
            fragment = {
                "v": 1,
                "type": "fragment",
                "id": message.message_id,
                "index": index,
                "count": count,
                "first": message.first_position,
                "chunk": base64.b64encode(message.fragments[index]).decode(),
            }
            data = json.dumps(fragment, separators=(",", ":")).encode()
            position = await self._backend.publish(self._channel, data, message_id=f"{message.message_id}#{index}")
            if index == 0:
                message.first_position = position.position
            message.next_fragment = index + 1
        assert position is not None
        return position

    # -- shutdown ------------------------------------------------------------------------------------------

    async def close(self, grace: float) -> None:
        """Publish what is buffered (up to ``grace`` seconds), then stop."""
        self._stopped = True
        self._retiring = True
        self._on_idle = _nothing
        self._urgent = True
        self._wake.set()
        task = self._task
        try:
            if task is not None:
                async with asyncio.timeout(grace):
                    await asyncio.shield(task)
        except TimeoutError:
            pending = len(self._items) + len(self._outbox)
            logger.warning(
                "closing with %d unpublished message(s) for session %r: %s", pending, self._session, self._failure
            )
        finally:
            self._finished = True
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            closed = PublishError("the hub closed before the events were published")
            for waiter in self._waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(closed)
            self._waiters.clear()
            for item in self._items:
                if isinstance(item, _Encoded) and item.landed is not None and not item.landed.done():
                    item.landed.set_exception(closed)
            for message in self._outbox:
                if message.landed is not None and not message.landed.done():
                    message.landed.set_exception(closed)


def _as_message(item: _Encoded) -> _Message:
    """An event that went to the outbox as it is, as a sealed message (for the flush loop's full publish)."""
    return _Message(item.id, item.seq, item.seq, data=item.data, landed=item.landed)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome retrieved: whoever waited on it may have given up."""
    if not future.cancelled():
        future.exception()


def _nothing() -> None:
    pass
