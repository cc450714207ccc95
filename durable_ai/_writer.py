"""The per-session writer: coalescing, the rate budget, idempotent retries and fragmentation.

Every run of a session in one hub writes through one ``SessionWriter``. Events wait in ``_items`` (deltas are
concatenated there) until a flush seals them into broker messages in ``_outbox``. A sealed message never changes:
its id is the id of its first event, so a retry after a timeout or a reconnect is deduplicated by the broker.
A publish that fails leaves the message at the head of the outbox and is retried with backoff until it lands or
the hub closes; waiters get :class:`PublishError` after ``publish_timeout`` but nothing is dropped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ._util import now_ms
from .backend import Backend, Channel
from .coalesce import Coalesce
from .errors import BackendError, HubClosed, PermissionDenied, PublishError

logger = logging.getLogger("durable_ai")

# Room left in a broker message for the fragment record around a chunk.
_FRAGMENT_OVERHEAD = 512


@dataclass(slots=True)
class _Delta:
    seq: int
    id: str
    type: str
    run_id: str
    agent: str
    ts: int
    part_id: str
    chunks: list[str]
    size: int

    def encode(self, session: str) -> bytes:
        record = {
            "v": 1,
            "id": self.id,
            "type": self.type,
            "session": session,
            "run_id": self.run_id,
            "agent": self.agent,
            "ts": self.ts,
            "part_id": self.part_id,
            "delta": "".join(self.chunks),
        }
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(slots=True)
class _Encoded:
    seq: int
    id: str
    data: bytes
    standalone: bool = False


@dataclass(slots=True)
class _Message:
    """A sealed broker message: one or more event lines, or one event split into fragments."""

    message_id: str
    last_seq: int
    data: bytes = b""
    fragments: list[bytes] | None = None
    next_fragment: int = 0
    first_position: str | None = None


@dataclass(slots=True)
class _Waiter:
    seq: int
    future: asyncio.Future[None] = field(repr=False)


class SessionWriter:
    """Buffers, batches and publishes the events of one session (see the module docstring)."""

    def __init__(
        self,
        *,
        backend: Backend,
        session: str,
        policy: Coalesce,
        budget: Callable[[], Awaitable[None]] | None,
        publish_timeout: float,
        max_pending_bytes: int,
    ) -> None:
        self._backend = backend
        self._session = session
        self._channel = Channel(session, "events")
        self._policy = policy
        self._budget = budget
        self._publish_timeout = publish_timeout
        self._max_pending_bytes = max_pending_bytes
        self._max_message = backend.limits.max_message_bytes
        self._items: list[_Delta | _Encoded] = []
        self._pending_bytes = 0
        self._open_delta: dict[str, _Delta] = {}
        self._outbox: deque[_Message] = deque()
        self._seq = 0
        self._done = 0
        self._waiters: deque[_Waiter] = deque()
        self._urgent = False
        self._deadline: float | None = None
        self._wake = asyncio.Event()
        self._failure: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self.users = 0
        self.closing = False
        self.on_retired: Callable[[], None] | None = None
        self._stopped = False

    # -- adding events -------------------------------------------------------------------------------------

    def add_delta(
        self,
        *,
        type: str,
        run_id: str,
        agent: str,
        part_id: str,
        delta: str,
        size: int,
        urgent: bool,
        new_id: Callable[[], str],
    ) -> None:
        """Buffer a delta (``size``: its UTF-8 bytes), concatenating it to the run's open delta of the same part
        when the policy allows."""
        self._check()
        open_delta = self._open_delta.get(run_id)
        if (
            self._policy.batching
            and open_delta is not None
            and open_delta.type == type
            and open_delta.part_id == part_id
            and open_delta.size + size <= self._policy.max_bytes
        ):
            open_delta.chunks.append(delta)
            open_delta.size += size
        else:
            self._seq += 1
            open_delta = _Delta(self._seq, new_id(), type, run_id, agent, now_ms(), part_id, [delta], size)
            self._items.append(open_delta)
            self._open_delta[run_id] = open_delta
        self._pending_bytes += size
        self._schedule(urgent or not self._policy.batching or self._pending_bytes >= self._policy.max_bytes)

    def add_encoded(self, *, id: str, run_id: str | None, data: bytes, standalone: bool = False) -> int:
        """Queue an encoded non-delta event for an immediate flush; returns the sequence to ``wait`` on.

        A ``standalone`` event gets a broker message of its own, whose id is the event's id, so that the broker
        deduplicates it against the same event written by another process.
        """
        self._check()
        self._seq += 1
        self._items.append(_Encoded(self._seq, id, data, standalone))
        if run_id is not None:
            self._open_delta.pop(run_id, None)
        self._pending_bytes += len(data)
        self._schedule(True)
        return self._seq

    def _check(self) -> None:
        if self._stopped:
            raise HubClosed("the hub was closed; nothing more can be written")

    def _schedule(self, urgent: bool) -> None:
        # Wake the flush loop only when a window opens or a flush becomes urgent, not for every token.
        if urgent:
            if not self._urgent:
                self._urgent = True
                self._wake.set()
        elif self._deadline is None:
            self._deadline = time.monotonic() + self._policy.max_delay
            self._wake.set()
        self._start()

    @property
    def flush_due(self) -> bool:
        """A flush should happen now: a writer that never awaits anything else must yield to let it."""
        return self._urgent or (self._deadline is not None and time.monotonic() >= self._deadline)

    @property
    def overloaded(self) -> bool:
        """More is buffered than ``max_pending_bytes``: writers should wait for a flush."""
        return self._pending_bytes > self._max_pending_bytes

    @property
    def last_seq(self) -> int:
        return self._seq

    # -- waiting -------------------------------------------------------------------------------------------

    async def wait(self, seq: int) -> None:
        """Wait until every event up to ``seq`` is stored by the broker."""
        self._check()
        if self._done >= seq:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A waiter that timed out no longer awaits its future; mark its late outcome retrieved.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiters.append(_Waiter(seq, future))
        self._start()
        try:
            async with asyncio.timeout(self._publish_timeout):
                await asyncio.shield(future)
        except TimeoutError:
            raise PublishError(
                f"events of session {self._session!r} were not confirmed by the broker within "
                f"{self._publish_timeout:g}s; they stay buffered and are retried until the hub closes"
            ) from self._failure

    def _fail_waiters(self, error: BackendError, upto: int) -> None:
        while self._waiters and self._waiters[0].seq <= upto:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)
        self._done = max(self._done, upto)

    def wake(self) -> None:
        self._wake.set()

    def _release_waiters(self) -> None:
        while self._waiters and self._waiters[0].seq <= self._done:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)

    # -- the flush loop ------------------------------------------------------------------------------------

    def _start(self) -> None:
        if (self._task is None or self._task.done()) and not self._stopped:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"durable-ai writer {self._session}")

    @property
    def session(self) -> str:
        return self._session

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def idle(self) -> bool:
        return not self._items and not self._outbox

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if self.idle:
                if self.closing:
                    if self.on_retired is not None:
                        self.on_retired()
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._outbox and not self._urgent and self._deadline is not None:
                delay = self._deadline - time.monotonic()
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
            message = self._outbox[0]
            try:
                await self._publish(message)
            except PermissionDenied as exc:
                # Retrying cannot help either: these credentials may not write here.
                logger.error("may not publish to session %r; dropping one message: %s", self._session, exc)
                self._outbox.popleft()
                self._fail_waiters(exc, message.last_seq)
                continue
            except (BackendError, OSError, TimeoutError) as exc:
                if self._failure is None:
                    logger.warning("publishing to session %r failed, retrying: %s", self._session, exc)
                self._failure = exc
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception as exc:
                # Not a broker failure: retrying cannot help, so fail the waiters instead of looping.
                logger.exception("cannot publish to session %r; dropping one message", self._session)
                self._outbox.popleft()
                self._fail_waiters(PublishError(f"the message could not be published: {exc!r}"), message.last_seq)
                continue
            if self._failure is not None:
                logger.info("publishing to session %r recovered", self._session)
            self._failure = None
            backoff = 0.05
            self._outbox.popleft()
            self._done = message.last_seq
            self._release_waiters()

    def _seal(self) -> None:
        """Turn the buffered items into broker messages that fit the broker's size limit."""
        items, self._items = self._items, []
        self._open_delta.clear()
        self._pending_bytes = 0
        self._urgent = False
        self._deadline = None
        limit = self._max_message
        lines: list[bytes] = []
        size = 0
        first_id = ""
        last_seq = 0

        def close_batch() -> None:
            nonlocal lines, size
            if lines:
                self._outbox.append(_Message(first_id, last_seq, data=b"\n".join(lines)))
                lines, size = [], 0

        for item in items:
            line = item.encode(self._session) if isinstance(item, _Delta) else item.data
            if len(line) > limit:
                close_batch()
                self._outbox.append(_Message(item.id, item.seq, fragments=self._fragment(line)))
                continue
            if isinstance(item, _Encoded) and item.standalone:
                close_batch()
                self._outbox.append(_Message(item.id, item.seq, data=line))
                continue
            if lines and (not self._policy.batching or size + 1 + len(line) > limit):
                close_batch()
            if not lines:
                first_id = item.id
            lines.append(line)
            size += len(line) + 1
            last_seq = item.seq
        close_batch()

    def _fragment(self, line: bytes) -> list[bytes]:
        chunk = (self._max_message - _FRAGMENT_OVERHEAD) // 4 * 3
        return [line[i : i + chunk] for i in range(0, len(line), chunk)]

    async def _publish(self, message: _Message) -> None:
        if message.fragments is None:
            await self._backend.publish(self._channel, message.data, message_id=message.message_id)
            return
        count = len(message.fragments)
        while message.next_fragment < count:
            index = message.next_fragment
            if index > 0 and self._budget is not None:
                await self._budget()
            record = {
                "v": 1,
                "type": "fragment",
                "id": message.message_id,
                "index": index,
                "count": count,
                "first": message.first_position,
                "chunk": base64.b64encode(message.fragments[index]).decode(),
            }
            data = json.dumps(record, separators=(",", ":")).encode()
            position = await self._backend.publish(self._channel, data, message_id=f"{message.message_id}#{index}")
            if index == 0:
                message.first_position = position.position
            message.next_fragment = index + 1

    # -- shutdown ------------------------------------------------------------------------------------------

    async def close(self, grace: float) -> None:
        """Publish what is buffered (up to ``grace`` seconds), then stop."""
        self._stopped = True
        self.on_retired = None
        self.closing = True
        self._urgent = True
        self._wake.set()
        task = self._task
        if task is None:
            return
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(task)
        except TimeoutError:
            pending = len(self._items) + len(self._outbox)
            logger.warning(
                "closing with %d unpublished message(s) for session %r: %s", pending, self._session, self._failure
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._fail_waiters(PublishError("the hub closed before the events were published"), self._seq)
