"""The core benchmarks on the embedded memory backend: the ``memory`` group.

Everything goes through the public API (``durable_ai.Hub``, sessions, runs, ``events()``, ``view()``) plus
``durable_ai.testing`` (targets, :class:`~durable_ai.testing.RecordingBackend`) and
:class:`durable_ai.view.ViewBuilder`. The measuring helpers (``stream_through_sdk``, ``paced_run``,
``write_session``, ``catch_up``, ``open_view``, ``replay_view``) take a :class:`durable_ai.testing.Target`, so the
groups of other backends can time the SDK side in the same way and bring the raw broker as their baseline.

The simulated model (:func:`produce`) writes one 4-character token per ``run.text()`` call and awaits between
tokens, as an agent awaiting an LLM stream does: ``asyncio.sleep(interval)`` for a paced model, or
``asyncio.sleep(0)`` (a bare yield to the event loop, no delay) for a model as fast as the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import statistics
import time
from dataclasses import dataclass

from durable_ai import Coalesce, Hub, Run, RunEnd, SessionView, TextDelta, TextPart
from durable_ai.backends.memory import MemoryBackend
from durable_ai.testing import MemoryTarget, RecordingBackend, Target
from durable_ai.view import ViewBuilder

from ._harness import (
    Benchmark,
    BenchmarkError,
    Group,
    Report,
    Row,
    Sizes,
    cpu_hogs,
    percentile,
    sample,
    settle,
)
from ._harness import (
    Target as Goal,
)

__all__ = [
    "GROUP",
    "TOKEN",
    "Paced",
    "WrittenSession",
    "catch_up",
    "drain_queue",
    "memory_target",
    "open_view",
    "paced_run",
    "produce",
    "replay_view",
    "stream_through_queues",
    "stream_through_sdk",
    "write_runs",
    "write_session",
]

TOKEN = "abcd"
"""One token: 4 characters, about the size of an LLM token."""


def memory_target() -> MemoryTarget:
    """A fresh embedded broker that keeps every message.

    (The default retention, 50,000 messages per channel, would drop part of the largest logs measured here.)
    """
    return MemoryTarget(MemoryBackend(max_messages=None))


def _session_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


async def produce(run: Run, tokens: int, *, group: int = 1, interval: float = 0.0) -> None:
    """The simulated model: ``tokens`` tokens as text deltas of ``group`` tokens each.

    After each delta it sleeps ``interval`` seconds (none after the last), or with ``interval=0`` yields to the
    event loop once, as awaiting the next chunk of an LLM stream does.
    """
    written = 0
    while written < tokens:
        count = min(group, tokens - written)
        await run.text(TOKEN * count)
        written += count
        if interval > 0:
            if written < tokens:
                await asyncio.sleep(interval)
        else:
            await asyncio.sleep(0)


# -- a) throughput ----------------------------------------------------------------------------------------------


async def stream_through_sdk(
    target: Target,
    *,
    sessions: int,
    runs_per_session: int,
    tokens: int,
    policy: Coalesce,
) -> float:
    """Seconds from the first run starting until every subscriber received the run-end of every run of its session.

    Agents write in one hub, subscribers read ``session.events()`` in another (both on ``target``); each session
    has one subscriber and ``runs_per_session`` concurrent runs of ``tokens`` tokens each.
    """
    ids = [_session_id("stream") for _ in range(sessions)]
    expected = runs_per_session * tokens * len(TOKEN)
    finished: list[float] = []
    async with target.hub(coalesce=policy) as agents, target.hub() as clients:

        async def subscribe(session_id: str) -> None:
            ends = 0
            received = 0
            async with clients.session(session_id).events() as stream:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        received += len(event.delta)
                    elif isinstance(event, RunEnd):
                        if event.status != "completed":
                            raise BenchmarkError(f"run {event.run_id} ended {event.status}: {event.reason}")
                        ends += 1
                        if ends == runs_per_session:
                            break
            finished.append(time.perf_counter())
            if received != expected:
                raise BenchmarkError(f"session {session_id}: {received} characters received, {expected} written")

        async def agent(session_id: str) -> None:
            async with agents.session(session_id).run(agent="bench") as run:
                await produce(run, tokens)

        settle()
        start = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for session_id in ids:
                tasks.create_task(subscribe(session_id))
                for _ in range(runs_per_session):
                    tasks.create_task(agent(session_id))
    return max(finished) - start


async def stream_through_queues(*, queues: int, producers_per_queue: int, tokens: int) -> float:
    """The baseline of :func:`stream_through_sdk`: the same tokens through plain ``asyncio.Queue`` objects.

    Each queue has ``producers_per_queue`` producer tasks (``tokens`` tokens each, yielding after every token like
    :func:`produce`, then an end marker) and one consumer task that stops after the last end marker.
    """
    expected = producers_per_queue * tokens * len(TOKEN)
    finished: list[float] = []

    async def producer(queue: asyncio.Queue[str | None]) -> None:
        for _ in range(tokens):
            await queue.put(TOKEN)
            await asyncio.sleep(0)
        await queue.put(None)

    async def consumer(queue: asyncio.Queue[str | None]) -> None:
        ends = 0
        received = 0
        while ends < producers_per_queue:
            item = await queue.get()
            if item is None:
                ends += 1
            else:
                received += len(item)
        finished.append(time.perf_counter())
        if received != expected:
            raise BenchmarkError(f"queue: {received} characters received, {expected} written")

    settle()
    start = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for _ in range(queues):
            queue: asyncio.Queue[str | None] = asyncio.Queue()
            tasks.create_task(consumer(queue))
            for _ in range(producers_per_queue):
                tasks.create_task(producer(queue))
    return max(finished) - start


@dataclass(frozen=True, slots=True)
class _StreamCase:
    id: str
    configuration: str
    sessions: int
    runs_per_session: int
    tokens: int
    policy: Coalesce
    queues: int
    producers_per_queue: int
    baseline_label: str


async def bench_throughput(sizes: Sizes, report: Report) -> None:
    """Tokens/s end to end: ``run.text()`` calls until the subscribers received the run-end."""
    n, k, m = sizes.tokens, sizes.runs, sizes.run_tokens
    one_queue = "asyncio.Queue, 1 producer → 1 consumer"
    cases = [
        _StreamCase(
            id="throughput.one-run",
            configuration=f"1 session, 1 run x {n:,} tokens, 1 subscriber, Coalesce()",
            sessions=1,
            runs_per_session=1,
            tokens=n,
            policy=Coalesce(),
            queues=1,
            producers_per_queue=1,
            baseline_label=one_queue,
        ),
        _StreamCase(
            id="throughput.one-run-uncoalesced",
            configuration=f"1 session, 1 run x {n:,} tokens, 1 subscriber, Coalesce.off()",
            sessions=1,
            runs_per_session=1,
            tokens=n,
            policy=Coalesce.off(),
            queues=1,
            producers_per_queue=1,
            baseline_label=one_queue,
        ),
        _StreamCase(
            id="throughput.concurrent-sessions",
            configuration=f"{k} sessions x 1 run x {m:,} tokens, 1 subscriber each, Coalesce()",
            sessions=k,
            runs_per_session=1,
            tokens=m,
            policy=Coalesce(),
            queues=k,
            producers_per_queue=1,
            baseline_label=f"{k} asyncio.Queues, 1 producer → 1 consumer each",
        ),
        _StreamCase(
            id="throughput.concurrent-runs-one-session",
            configuration=f"1 session x {k} concurrent runs x {m:,} tokens, 1 subscriber, Coalesce()",
            sessions=1,
            runs_per_session=k,
            tokens=m,
            policy=Coalesce(),
            queues=1,
            producers_per_queue=k,
            baseline_label=f"1 asyncio.Queue, {k} producers → 1 consumer",
        ),
    ]
    for case in cases:
        total = case.sessions * case.runs_per_session * case.tokens
        published: list[int] = []

        async def sdk(case: _StreamCase = case, total: int = total, published: list[int] = published) -> float:
            target = memory_target()
            seconds = await stream_through_sdk(
                target,
                sessions=case.sessions,
                runs_per_session=case.runs_per_session,
                tokens=case.tokens,
                policy=case.policy,
            )
            published.append(target.shared.published)
            return total / seconds

        async def baseline(case: _StreamCase = case, total: int = total) -> float:
            seconds = await stream_through_queues(
                queues=case.queues, producers_per_queue=case.producers_per_queue, tokens=case.tokens
            )
            return total / seconds

        sdk_samples = await sample(sizes.repeats, sdk, "higher")
        base_samples = await sample(sizes.repeats, baseline, "higher")
        report.add(
            Row(
                id=case.id,
                benchmark="Throughput, end to end",
                configuration=case.configuration,
                statistic=sdk_samples.statistic,
                unit="tokens/s",
                sdk=sdk_samples.best(),
                baseline=base_samples.best(),
                baseline_label=case.baseline_label,
                extra={
                    "sdk_median": sdk_samples.median(),
                    "baseline_median": base_samples.median(),
                    "tokens": total,
                    "runs": case.sessions * case.runs_per_session,
                    "broker_messages": max(published),
                },
            )
        )
        counts = "/".join(f"{count:,}" for count in published) if len(set(published)) > 1 else f"{published[0]:,}"
        report.note(
            f"{case.id}: {counts} broker messages for {total:,} tokens; "
            f"median {sdk_samples.median():,.0f} tokens/s (baseline {base_samples.median():,.0f})."
        )


# -- b) coalescing ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Paced:
    """A paced run: the broker messages it published and how long it lasted."""

    tokens: int
    messages: int
    seconds: float

    @property
    def per_thousand_tokens(self) -> float:
        return self.messages / self.tokens * 1000

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


async def paced_run(target: Target, *, tokens: int, interval: float, policy: Coalesce) -> Paced:
    """One run of ``tokens`` tokens, ``interval`` seconds apart; counts the broker messages of its session."""
    recording = RecordingBackend(target.backend())
    session_id = _session_id("paced")
    async with Hub(recording, coalesce=policy) as hub:
        session = hub.session(session_id)
        start = time.perf_counter()
        async with session.run(agent="bench") as run:
            await produce(run, tokens, interval=interval)
        seconds = time.perf_counter() - start
    return Paced(tokens, recording.events_published(session_id), seconds)


async def bench_coalescing(sizes: Sizes, report: Report) -> None:
    """Broker messages per 1,000 tokens and per second for a model at a fixed token rate."""
    n, interval = sizes.paced_tokens, sizes.token_interval
    rate = f"{1 / interval:,.0f} tokens/s"
    default = await paced_run(memory_target(), tokens=n, interval=interval, policy=Coalesce())
    off = await paced_run(memory_target(), tokens=n, interval=interval, policy=Coalesce.off())
    window = f"{Coalesce().max_delay * 1000:g} ms"
    where = f"1 run x {n:,} tokens at {rate} ({interval * 1000:g} ms apart)"
    for policy, paced, base in ((f"Coalesce() ({window})", default, off), ("Coalesce.off()", off, None)):
        key = "default" if base is not None else "uncoalesced"
        extra = {"messages": float(paced.messages), "tokens": float(paced.tokens), "seconds": paced.seconds}
        report.add(
            Row(
                id=f"coalescing.per-1000-tokens.{key}",
                benchmark="Broker messages per 1,000 tokens",
                configuration=f"{where}, {policy}",
                statistic="1 run",
                unit="messages",
                sdk=paced.per_thousand_tokens,
                baseline=base.per_thousand_tokens if base is not None else None,
                baseline_label="Coalesce.off()" if base is not None else None,
                extra=extra,
            )
        )
        report.add(
            Row(
                id=f"coalescing.messages-per-second.{key}",
                benchmark="Broker messages per second",
                configuration=f"{where}, {policy}",
                statistic="1 run",
                unit="messages/s",
                sdk=paced.messages_per_second,
                baseline=base.messages_per_second if base is not None else None,
                baseline_label="Coalesce.off()" if base is not None else None,
                extra=extra,
            )
        )
        report.note(
            f"coalescing, {policy}: {paced.messages:,} broker messages for {paced.tokens:,} tokens in "
            f"{paced.seconds:.2f} s (the simulated model reached {paced.tokens_per_second:,.1f} tokens/s)."
        )


# -- c) catch-up ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrittenSession:
    """A session written for a read benchmark, and where its middle is."""

    session_id: str
    messages: int
    characters: int
    middle: str
    characters_after_middle: int


async def write_session(target: Target, *, runs: int, tokens: int, policy: Coalesce, group: int) -> WrittenSession:
    """Write ``runs`` finished runs of ``tokens`` tokens (deltas of ``group`` tokens) into a new session.

    Waits with ``hub.flush()`` until every event is stored and the snapshot is saved, then finds the cursor of
    the middle token of the session.
    """
    recording = RecordingBackend(target.backend())
    session_id = _session_id("history")
    async with Hub(recording, coalesce=policy) as hub:
        session = hub.session(session_id)
        for _ in range(runs):
            async with session.run(agent="bench") as run:
                await produce(run, tokens, group=group)
        await hub.flush()
    total = runs * tokens * len(TOKEN)
    seen = 0
    middle: str | None = None
    after = 0
    # Read as a follower does (event by event, as stored): a catch-up read may merge the deltas it reads from the
    # snapshot, so that the middle token would have no cursor of its own.
    ended = 0
    async with target.hub() as reader, reader.session(session_id).events() as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                seen += len(event.delta)
                if middle is None and seen * 2 >= total:
                    middle, after = event.cursor, total - seen
            elif isinstance(event, RunEnd):
                ended += 1
                if ended == runs:
                    break
    if seen != total or middle is None:
        raise BenchmarkError(f"session {session_id}: {seen} characters stored, {total} written")
    return WrittenSession(session_id, recording.events_published(session_id), total, middle, after)


async def catch_up(target: Target, session_id: str, *, after: str | None, expected_characters: int) -> float:
    """Seconds for a new subscriber (a fresh hub) to read a finished session after cursor ``after``."""
    async with target.hub() as hub:
        session = hub.session(session_id)
        received = 0
        settle()
        start = time.perf_counter()
        async with session.events(after, follow=False) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    received += len(event.delta)
        seconds = time.perf_counter() - start
    if received != expected_characters:
        raise BenchmarkError(f"catch-up read {received} characters, expected {expected_characters}")
    return seconds


async def drain_queue(items: int) -> float:
    """The baseline of :func:`catch_up`: seconds to drain an ``asyncio.Queue`` pre-filled with ``items`` tokens."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for _ in range(items):
        queue.put_nowait(TOKEN)
    received = 0
    settle()
    start = time.perf_counter()
    for _ in range(items):
        received += len(await queue.get())
    seconds = time.perf_counter() - start
    if received != items * len(TOKEN):
        raise BenchmarkError("the queue lost tokens")
    return seconds


def _live_group(sizes: Sizes) -> int:
    """Tokens per broker message that ``Coalesce()`` produces for the paced model: one 40 ms window's worth."""
    return max(1, round(Coalesce().max_delay / sizes.token_interval))


async def bench_catch_up(sizes: Sizes, report: Report) -> None:
    """A new subscriber reads a finished run from the start, and from its middle."""
    n = sizes.catch_up_tokens
    group = _live_group(sizes)
    rate = f"{1 / sizes.token_interval:,.0f} tokens/s"
    logs = [
        ("burst", "Coalesce(), model at full speed", Coalesce(), 1),
        ("paced", f"Coalesce() at {rate} ({group} tokens/message)", Coalesce.off(), group),
        ("uncoalesced", "Coalesce.off()", Coalesce.off(), 1),
    ]
    for key, label, policy, size in logs:
        target = memory_target()
        written = await write_session(target, runs=1, tokens=n, policy=policy, group=size)
        starts: list[tuple[str, str, str | None, int]] = [("start", "from the start", None, written.characters)]
        if key != "burst":
            # (The burst log holds the run in a few large deltas: its middle token has no cursor of its own.)
            starts.append(("middle", "from the middle cursor", written.middle, written.characters_after_middle))
        for where_key, where, after, characters in starts:

            async def sdk(
                after: str | None = after,
                characters: int = characters,
                target: Target = target,
                session_id: str = written.session_id,
            ) -> float:
                seconds = await catch_up(target, session_id, after=after, expected_characters=characters)
                return seconds * 1000

            async def baseline(characters: int = characters) -> float:
                return await drain_queue(characters // len(TOKEN)) * 1000

            sdk_samples = await sample(sizes.repeats, sdk, "lower")
            base_samples = await sample(sizes.repeats, baseline, "lower")
            report.add(
                Row(
                    id=f"catch-up.{where_key}.{key}",
                    benchmark="Catch-up read of a finished run",
                    configuration=(
                        f"{n:,}-token run written with {label}, {written.messages:,} messages; "
                        f"{where} ({characters // len(TOKEN):,} tokens)"
                    ),
                    statistic=sdk_samples.statistic,
                    unit="ms",
                    sdk=sdk_samples.best(),
                    baseline=base_samples.best(),
                    baseline_label="asyncio.Queue",
                    extra={
                        "sdk_median": sdk_samples.median(),
                        "baseline_median": base_samples.median(),
                        "log_messages": float(written.messages),
                        "tokens": float(characters // len(TOKEN)),
                    },
                )
            )


# -- d) view ----------------------------------------------------------------------------------------------------


async def open_view(target: Target, session_id: str) -> tuple[float, int, SessionView]:
    """``session.view()`` from a fresh client hub: (seconds, broker messages read, the view)."""
    recording = RecordingBackend(target.backend())
    async with Hub(recording) as hub:
        session = hub.session(session_id)
        settle()
        start = time.perf_counter()
        view = await session.view()
        seconds = time.perf_counter() - start
    return seconds, recording.messages_read, view


async def replay_view(target: Target, session_id: str, runs: int) -> tuple[float, int, SessionView]:
    """The same view without a snapshot: every event of the log folded with ``ViewBuilder``.

    It reads as a follower does, up to the last run's end: a catch-up read (``follow=False``) would be served from
    the snapshot's tail.
    """
    recording = RecordingBackend(target.backend())
    async with Hub(recording) as hub:
        session = hub.session(session_id)
        settle()
        start = time.perf_counter()
        builder = ViewBuilder(session_id)
        ended = 0
        async with session.events() as stream:
            async for event in stream:
                builder.apply(event)
                if isinstance(event, RunEnd):
                    ended += 1
                    if ended == runs:
                        break
        view = builder.build()
        seconds = time.perf_counter() - start
    return seconds, recording.messages_read, view


async def bench_view(sizes: Sizes, report: Report) -> None:
    """``session.view()`` of a long session (snapshot + tail) against replaying the whole session."""
    runs, tokens = sizes.view_runs, sizes.view_run_tokens
    group = _live_group(sizes)
    rate = f"{1 / sizes.token_interval:,.0f} tokens/s"
    logs = [
        ("paced", f"Coalesce() at {rate} ({group} tokens/message)", Coalesce.off(), group),
        ("uncoalesced", "Coalesce.off()", Coalesce.off(), 1),
    ]
    for key, label, policy, size in logs:
        target = memory_target()
        written = await write_session(target, runs=runs, tokens=tokens, policy=policy, group=size)
        reads: dict[str, int] = {}

        async def snapshot(
            reads: dict[str, int] = reads, target: Target = target, session_id: str = written.session_id
        ) -> float:
            seconds, read, view = await open_view(target, session_id)
            reads["view"] = read
            _check_view(view, runs, tokens)
            return seconds * 1000

        async def replay(
            reads: dict[str, int] = reads, target: Target = target, session_id: str = written.session_id
        ) -> float:
            seconds, read, view = await replay_view(target, session_id, runs)
            reads["replay"] = read
            _check_view(view, runs, tokens)
            return seconds * 1000

        view_samples = await sample(sizes.repeats, snapshot, "lower")
        replay_samples = await sample(sizes.repeats, replay, "lower")
        _, _, from_snapshot = await open_view(target, written.session_id)
        _, _, replayed = await replay_view(target, written.session_id, runs)
        if from_snapshot.messages != replayed.messages or from_snapshot.cursor != replayed.cursor:
            raise BenchmarkError("the view from the snapshot differs from the replayed view")
        configuration = f"{runs} finished runs x {tokens:,} tokens written with {label}, {written.messages:,} messages"
        extra = {"log_messages": float(written.messages), "tokens": float(runs * tokens)}
        report.add(
            Row(
                id=f"view.time.{key}",
                benchmark="session.view() time",
                configuration=configuration,
                statistic=view_samples.statistic,
                unit="ms",
                sdk=view_samples.best(),
                baseline=replay_samples.best(),
                baseline_label="replay",
                extra={**extra, "sdk_median": view_samples.median(), "baseline_median": replay_samples.median()},
            )
        )
        report.add(
            Row(
                id=f"view.messages-read.{key}",
                benchmark="session.view() broker messages read",
                configuration=configuration,
                statistic="count",
                unit="messages",
                sdk=float(reads["view"]),
                baseline=float(reads["replay"]),
                baseline_label="replay",
                extra=extra,
            )
        )


# -- e) the writer's cost of snapshots ---------------------------------------------------------------------------


async def write_runs(target: Target, *, runs: int, tokens: int, snapshots: bool) -> float:
    """Seconds to write ``runs`` runs of ``tokens`` tokens one after the other, until everything is saved."""
    async with Hub(target.backend(), snapshots=snapshots) as hub:
        session = hub.session(_session_id("snapshots"))
        settle()
        start = time.perf_counter()
        for _ in range(runs):
            async with session.run(agent="writer") as run:
                await produce(run, tokens)
        await hub.flush()
        seconds = time.perf_counter() - start
        view = await session.view()
    _check_view(view, runs, tokens)
    return seconds


async def bench_snapshots(sizes: Sizes, report: Report) -> None:
    """What saving a snapshot after every run costs the writer, against a hub that saves none."""
    runs, tokens = sizes.view_runs, sizes.run_tokens

    async def with_snapshots() -> float:
        return await write_runs(memory_target(), runs=runs, tokens=tokens, snapshots=True) * 1000

    async def without() -> float:
        return await write_runs(memory_target(), runs=runs, tokens=tokens, snapshots=False) * 1000

    sdk_samples = await sample(sizes.repeats, with_snapshots, "lower")
    base_samples = await sample(sizes.repeats, without, "lower")
    report.add(
        Row(
            id="snapshots.write",
            benchmark="Writing a session, snapshot after each run",
            configuration=f"{runs} runs x {tokens:,} tokens one after the other, model at full speed, Coalesce()",
            statistic=sdk_samples.statistic,
            unit="ms",
            sdk=sdk_samples.best(),
            baseline=base_samples.best(),
            baseline_label="snapshots=False",
            extra={"sdk_median": sdk_samples.median(), "baseline_median": base_samples.median()},
        )
    )


# -- f) coalescing under load -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _LoadSamples:
    """What one (machine, policy) pair measured over the repeats."""

    rates: list[float]
    messages: list[int]
    first_tokens: list[float]


def _median(values: list[float]) -> float:
    """The median of ``values``; ``nan`` if there are none (rounds too short for a probe, as with ``--quick``)."""
    return statistics.median(values) if values else math.nan


_PROBE_EVERY = 0.020
"""Seconds between two runs that measure time to first token while the benchmark of coalescing under load runs."""
_PROBE_TIMEOUT = 10.0
"""Seconds a round waits, after its runs, for its first probe (a round shorter than the first probe's start)."""


async def first_tokens_meanwhile(policy: Coalesce, first_tokens: list[float], measured: asyncio.Event) -> None:
    """Until cancelled: a new run every ``_PROBE_EVERY`` seconds (from ``5 * _PROBE_EVERY`` on, once the measured
    runs stream), in hubs of its own on the same event loop with the same policy; appends to ``first_tokens`` the
    seconds from each run's start (its first ``run.text()`` follows at once) to its subscriber's first delta, and
    sets ``measured``.

    The runs measured for throughput all start at once, so their first tokens measure only that burst, before any
    window is open; these runs start while the others stream, in the windows the policy keeps.
    """
    backend = MemoryBackend(max_messages=None)
    async with Hub(backend, coalesce=policy) as agents, Hub(backend) as clients:
        await asyncio.sleep(4 * _PROBE_EVERY)
        while True:
            await asyncio.sleep(_PROBE_EVERY)
            session_id = _session_id("probe")
            async with (
                clients.session(session_id).events() as stream,
                agents.session(session_id).run(agent="probe") as run,
            ):
                started = time.perf_counter()
                await run.text(TOKEN)
                async for event in stream:
                    if isinstance(event, TextDelta):
                        first_tokens.append(time.perf_counter() - started)
                        measured.set()
                        break


async def bench_load(sizes: Sizes, report: Report) -> None:
    """Concurrent runs at full speed on an idle and on a loaded machine: windows that stretch under load, against
    fixed windows (``stretch_under_load=1``). Messages per token should not grow with the load."""
    k, m = sizes.runs, sizes.run_tokens
    total = k * m
    policies = {"stretching": Coalesce(), "fixed": Coalesce(stretch_under_load=1)}
    machines = ("idle", "loaded")
    samples = {(machine, name): _LoadSamples([], [], []) for machine in machines for name in policies}
    hogs = 0
    for _ in range(sizes.repeats):  # interleaved, so that drift in the machine hits every pair alike
        for machine in machines:
            for name, policy in policies.items():
                target = memory_target()
                pair = samples[machine, name]
                with cpu_hogs() if machine == "loaded" else contextlib.nullcontext(0) as hogs_started:
                    hogs = max(hogs, hogs_started)
                    probed = asyncio.Event()
                    probes = asyncio.create_task(first_tokens_meanwhile(policy, pair.first_tokens, probed))
                    try:
                        seconds = await stream_through_sdk(
                            target, sessions=k, runs_per_session=1, tokens=m, policy=policy
                        )
                        async with asyncio.timeout(_PROBE_TIMEOUT):
                            await probed.wait()  # a round may be shorter than the first probe's start (--quick)
                    finally:
                        probes.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await probes
                pair.rates.append(total / seconds)
                pair.messages.append(target.shared.published)
    per_thousand: dict[tuple[str, str], float] = {}
    for machine in machines:
        where = f"{k} sessions x 1 run x {m:,} tokens at full speed, 1 subscriber each, {machine} machine"
        if machine == "loaded":
            where += f" ({hogs} spinning processes, one per CPU)"
        sdk, base = samples[machine, "stretching"], samples[machine, "fixed"]
        for pair in (sdk, base):
            per_thousand[machine, "stretching" if pair is sdk else "fixed"] = (
                statistics.median(pair.messages) / total * 1000
            )
        report.add(
            Row(
                id=f"load.messages-per-1000-tokens.{machine}",
                benchmark="Broker messages per 1,000 tokens under load",
                configuration=f"{where}, Coalesce()",
                statistic="median",
                unit="messages",
                sdk=per_thousand[machine, "stretching"],
                baseline=per_thousand[machine, "fixed"],
                baseline_label="fixed windows",
                extra={"tokens": float(total)},
            )
        )
        report.add(
            Row(
                id=f"load.throughput.{machine}",
                benchmark="Throughput under load",
                configuration=f"{where}, Coalesce()",
                statistic=f"best of {len(sdk.rates)}",
                unit="tokens/s",
                sdk=max(sdk.rates),
                baseline=max(base.rates),
                baseline_label="fixed windows",
                extra={"sdk_median": statistics.median(sdk.rates), "baseline_median": statistics.median(base.rates)},
            )
        )
        report.add(
            Row(
                id=f"load.first-token.{machine}",
                benchmark="Time to first token under load",
                configuration=(
                    f"{where}, Coalesce(); run start to the subscriber's first delta, of a run started every "
                    f"{_PROBE_EVERY * 1000:g} ms while they stream"
                ),
                statistic=f"median of {len(sdk.first_tokens)}",
                unit="ms",
                sdk=_median(sdk.first_tokens) * 1000,
                baseline=_median(base.first_tokens) * 1000,
                baseline_label="fixed windows",
                extra={
                    "sdk_p99": percentile(sdk.first_tokens, 99) * 1000,
                    "baseline_p99": percentile(base.first_tokens, 99) * 1000,
                },
            )
        )
    growth = per_thousand["loaded", "stretching"] / per_thousand["idle", "stretching"]
    fixed_growth = per_thousand["loaded", "fixed"] / per_thousand["idle", "fixed"]
    report.target(
        Goal(
            "messages per token on a loaded machine, Coalesce()",
            "<= 1.1x the idle machine's",
            f"{growth:.2f}x ({per_thousand['loaded', 'stretching']:.1f} vs {per_thousand['idle', 'stretching']:.1f} "
            f"per 1,000 tokens; fixed windows: {fixed_growth:.2f}x)",
            growth <= 1.1,
        )
    )
    loaded_first = _median(samples["loaded", "stretching"].first_tokens)
    fixed_first = _median(samples["loaded", "fixed"].first_tokens)
    report.target(
        Goal(
            "time to first token on a loaded machine, Coalesce()",
            "<= fixed windows' (the first delta is flushed at once)",
            f"{loaded_first * 1000:.2f} ms vs {fixed_first * 1000:.2f} ms (medians)",
            loaded_first <= fixed_first * 1.1,
        )
    )


def _check_view(view: SessionView, runs: int, tokens: int) -> None:
    texts = [part.text for message in view.messages for part in message.parts if isinstance(part, TextPart)]
    if len(texts) != runs or any(len(text) != tokens * len(TOKEN) for text in texts):
        raise BenchmarkError(f"the view has {len(view.messages)} messages, expected {runs} of {tokens} tokens")


GROUP = Group(
    name="memory",
    title="the core on the embedded memory backend",
    benchmarks=(
        Benchmark("throughput", "tokens/s end to end, 1 run and concurrent runs, vs asyncio.Queue", bench_throughput),
        Benchmark(
            "coalescing", "broker messages per 1,000 tokens for a paced model, Coalesce() vs off", bench_coalescing
        ),
        Benchmark("catch-up", "a new subscriber reads a finished run, vs draining an asyncio.Queue", bench_catch_up),
        Benchmark("view", "session.view() from a snapshot vs replaying the session", bench_view),
        Benchmark("snapshots", "writing runs with a snapshot after each, vs snapshots=False", bench_snapshots),
        Benchmark("load", "concurrent runs on an idle and a loaded machine, windows that stretch vs fixed", bench_load),
    ),
)
