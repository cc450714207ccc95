"""The Ably backend against raw ably-python, measured against the Ably emulator (not Ably): the ``ably`` group.

Every figure here is measured against :class:`durable_ai_ably.testing.AblyEmulator` on the loopback interface, not
against Ably. What the emulator can vouch for is what the client sends: how many messages (creates, and append or
update operations, which Ably bills and rate-limits like messages) reach a channel, how fast, and what the client
process spends doing it. Ably's own latency, throughput and limits in production are not measured.

The emulator runs in a **child process** (``python -m benchmarks.ably``, a line protocol on stdin and stdout that
the group starts and stops), so the CPU time of the benchmark process (``time.process_time()``) is the agent side
alone: the SDK, ably-python and the event loop, without the emulator's share. The emulator counts messages per
channel and per connection (``AblyEmulator.channel_stats``, ``connection_stats``) and the group reads the counts
after each measurement; the counts are reset before it. The emulator does not enforce Ably's rate limits here: the
figures show what would be sent.

``streaming``: a model writes tokens at 50 and 200 tokens/s (one 4-character token per ``run.text()``, paced by
deadline: the n-th token at n/rate seconds, whatever the writes cost), in 1 and in 5 concurrent sub-agent runs
(``session.run(agent="subN", parent=lead)``) of one parent run on one session, one hub (one Ably connection), with
``snapshots=False``. Every run lasts ``paced_tokens / 200`` seconds (5 s at full size: 1,000 tokens at
200 tokens/s, 250 at 50 tokens/s); counts and CPU are reported per 1,000 tokens. Three modes:

- ``per-token``: ``Coalesce.off()`` with the rate budgets off (``rate_limit=0&connection_rate_limit=0``): one
  message per event, as a client without coalescing sends them;
- ``coalesced``: the default ``Coalesce()`` (40 ms windows) with ``appends=off``: one message per batch, and the
  default rate budget of 50 messages/s per channel;
- ``appends``: the default ``Coalesce()`` with ``appends=on`` on a namespace with mutable messages: the count is
  created messages plus append and update operations.

Figures: broker messages per 1,000 tokens on the session's events channel (run-start and run-end events included),
the busiest second on that channel (the most messages in any 1-second sliding window; Ably's default limit is 50
per channel and 50 inbound per connection), and the benchmark process's CPU time per 1,000 tokens from the first
run starting until ``hub.flush()`` returned (every message acknowledged). The baseline is raw ably-python on its own
realtime connection publishing one message per token (with a message id, as the backend sets one, and a payload
the size of the SDK's encoded per-token event), one awaited ``channel.publish`` after another per run, paced the
same way. Each measurement reads the session back through the SDK and fails if any text is missing.

The SDK's connection is attached to the events channel (a run enters presence there), so the emulator echoes its
own messages back to it, as Ably does by default; the baseline's connection is not attached and receives nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from ably import AblyRealtime  # type: ignore[import-untyped]
from ably.types.connectionstate import ConnectionState  # type: ignore[import-untyped]
from ably.types.message import Message  # type: ignore[import-untyped]

from durable_ai import Coalesce, Hub, RunEnd, TextDelta, connect
from durable_ai.testing import RecordingBackend, UrlTarget
from durable_ai_ably.testing import AblyEmulator, MessageStats

from ._harness import Benchmark, BenchmarkError, Group, Report, Row, Sizes, settle
from .ably_requests import bench_requests
from .core import TOKEN

__all__ = [
    "ABLY_LIMIT",
    "GROUP",
    "MODES",
    "RATES",
    "RUN_COUNTS",
    "EmulatorProcess",
    "Measured",
    "Mode",
    "raw_stream",
    "sdk_stream",
    "tokens_per_run",
]

KEY = "bench.key:s3cret"
"""The emulator's API key (every capability)."""

NAMESPACE = "ai"
"""The channel namespace: the emulator allows message appends there."""

RATES = (50, 200)
"""Tokens per second of the simulated model."""

RUN_COUNTS = (1, 5)
"""Concurrent sub-agent runs on the session."""

ABLY_LIMIT = 50
"""Ably's default limits, messages per second: per channel, and inbound per connection."""

_ROOT = Path(__file__).resolve().parents[1]
_TIMEOUT = 60.0
"""Seconds one measurement may take before it is void (a lost acknowledgement would otherwise hang it)."""


@dataclass(frozen=True, slots=True)
class Mode:
    """How the SDK side is configured: the coalescing policy and the ``ably://`` URL options."""

    key: str
    label: str
    policy: Coalesce
    options: str


MODES = (
    Mode(
        "per-token",
        "Coalesce.off(), no rate budget (1 message per event)",
        Coalesce.off(),
        "appends=off&rate_limit=0&connection_rate_limit=0",
    ),
    Mode("coalesced", "Coalesce(), appends=off", Coalesce(), "appends=off"),
    Mode("appends", "Coalesce(), appends=on", Coalesce(), "appends=on"),
)


def tokens_per_run(sizes: Sizes, rate: int) -> int:
    """Tokens of each run at ``rate`` tokens/s: every run lasts ``paced_tokens / 200`` seconds."""
    return max(1, round(sizes.paced_tokens * rate / 200))


def _session_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def _channel(session_id: str) -> str:
    return f"{NAMESPACE}:{session_id}"


# -- the emulator in a child process -----------------------------------------------------------------------------


class EmulatorProcess:
    """An :class:`AblyEmulator` in a child process (``python -m benchmarks.ably``), asked for its counts over a pipe.

    Use it as a context manager; requests block, so make them outside the timed parts.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self.endpoint = ""

    def __enter__(self) -> EmulatorProcess:
        self._log = tempfile.TemporaryFile("w+")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.ably"],
            cwd=_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        try:
            self.endpoint = str(self._read()["endpoint"])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()  # the child stops at the end of its input
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def url(self, options: str) -> str:
        """An ``ably://`` URL for the emulator, with extra query ``options``."""
        return f"ably://?key={KEY}&endpoint={self.endpoint}&tls=false&{options}"

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of ``AblyRealtime`` for the emulator, as the backend builds them."""
        return {
            "key": KEY,
            "endpoint": self.endpoint,
            "tls": False,
            "use_token_auth": True,
            "use_binary_protocol": False,
            "fallback_hosts": [],
        }

    def reset_stats(self) -> None:
        self._ask({"op": "reset"})

    def stats(self, channel: str) -> tuple[MessageStats, dict[str, MessageStats]]:
        """The counts of ``channel``, and of every connection that published, since the last reset."""
        answer = self._ask({"op": "stats", "channel": channel})
        connections = {key: MessageStats(**value) for key, value in answer["connections"].items()}
        return MessageStats(**answer["channel"]), connections

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        process = self._process
        if process is None or process.stdin is None:
            raise BenchmarkError("the emulator process is not running")
        try:
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
        except OSError as exc:
            raise BenchmarkError(f"the emulator process is gone: {exc}; {self._stderr()}") from exc
        return self._read()

    def _read(self) -> dict[str, Any]:
        process = self._process
        assert process is not None and process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise BenchmarkError(f"the emulator process stopped; {self._stderr()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _stderr(self) -> str:
        if self._log is None:
            return "no output"
        self._log.seek(0)
        text = self._log.read().strip()
        return f"its output: {text[-2000:]}" if text else "no output"


def _reply(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


async def serve() -> None:
    """The child process: serve an emulator and answer requests on stdin until it ends."""
    # Rates are counted, not enforced: the per-token mode shows what an uncoalesced client would send.
    async with AblyEmulator(
        {KEY: None}, mutable_namespaces={NAMESPACE}, retention_limit=100_000, enforce_rate_limits=False
    ) as emulator:
        _reply({"endpoint": emulator.endpoint})
        while line := await asyncio.to_thread(sys.stdin.readline):
            request = json.loads(line)
            if request["op"] == "reset":
                emulator.reset_stats()
                _reply({})
            elif request["op"] == "stats":
                channel = emulator.channel_stats(request["channel"])
                connections = {key: asdict(value) for key, value in emulator.connection_stats().items()}
                _reply({"channel": asdict(channel), "connections": connections})
            else:
                _reply({"error": f"unknown request {request!r}"})


# -- measuring ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measured:
    """One measurement: tokens written, wall and CPU seconds, and what the emulator counted."""

    tokens: int
    seconds: float
    cpu_seconds: float
    channel: MessageStats
    connection_peak: int
    """The busiest second of the connection that published, over all its channels (Ably's inbound limit)."""

    def per_thousand_tokens(self, value: float) -> float:
        return value * 1000 / self.tokens

    @property
    def messages_per_thousand(self) -> float:
        return self.per_thousand_tokens(self.channel.messages)

    @property
    def cpu_ms_per_thousand(self) -> float:
        return self.per_thousand_tokens(self.cpu_seconds * 1000)


async def _paced(write: Callable[[str], Awaitable[object]], tokens: int, interval: float) -> None:
    """The simulated model: ``tokens`` tokens, the n-th written at ``n * interval`` seconds from the start."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index in range(tokens):
        await write(TOKEN)
        if index + 1 < tokens:
            await asyncio.sleep(max(0.0, start + (index + 1) * interval - loop.time()))


async def sdk_stream(emulator: EmulatorProcess, mode: Mode, *, rate: int, runs: int, tokens: int) -> Measured:
    """A parent run with ``runs`` concurrent sub-agent runs of ``tokens`` tokens at ``rate`` tokens/s each."""
    session_id = _session_id(mode.key)
    url = emulator.url(mode.options)
    async with connect(url, coalesce=mode.policy, snapshots=False) as hub:
        session = hub.session(session_id)
        emulator.reset_stats()
        settle()
        cpu = time.process_time()
        start = time.perf_counter()
        async with asyncio.timeout(_TIMEOUT):
            async with session.run(agent="lead") as lead:

                async def sub(index: int) -> None:
                    async with session.run(agent=f"sub{index}", parent=lead) as run:
                        await _paced(run.text, tokens, 1 / rate)

                async with asyncio.TaskGroup() as tasks:
                    for index in range(runs):
                        tasks.create_task(sub(index))
            await hub.flush()
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
    channel, connections = emulator.stats(_channel(session_id))
    await _check_session(url, session_id, runs=runs, characters=tokens * len(TOKEN))
    if mode.key == "per-token" and channel.messages != runs * (tokens + 2) + 2:
        raise BenchmarkError(f"{channel.messages} messages stored, {runs * (tokens + 2) + 2} events written")
    peak = max((stats.peak_per_second for stats in connections.values()), default=0)
    return Measured(runs * tokens, seconds, cpu, channel, peak)


async def _check_session(url: str, session_id: str, *, runs: int, characters: int) -> None:
    """Read the session back: every sub-agent run wrote all its text and completed."""
    texts: dict[str, int] = {}
    ends: dict[str, str] = {}
    async with connect(url) as hub, hub.session(session_id).events(follow=False) as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                run_id = event.run_id or ""
                texts[run_id] = texts.get(run_id, 0) + len(event.delta)
            elif isinstance(event, RunEnd):
                ends[event.run_id or ""] = event.status
    if sorted(texts.values()) != [characters] * runs or len(ends) != runs + 1:
        raise BenchmarkError(f"session {session_id}: read {texts} characters and {len(ends)} run ends back")
    if any(status != "completed" for status in ends.values()):
        raise BenchmarkError(f"session {session_id}: runs ended {ends}")


async def raw_stream(emulator: EmulatorProcess, *, rate: int, runs: int, tokens: int, payload: str) -> Measured:
    """The baseline: ably-python publishes one message per token, ``runs`` publishers on one connection."""
    session_id = _session_id("raw")
    client = AblyRealtime(**emulator.client_options())
    try:
        async with asyncio.timeout(10):
            await client.connection.once_async(ConnectionState.CONNECTED)
        channel = client.channels.get(_channel(session_id))
        emulator.reset_stats()

        async def publisher(index: int) -> None:
            ids = itertools.count()

            async def write(_: str) -> None:
                await channel.publish(Message(name="e", data=payload, id=f"{session_id}:{index}:{next(ids)}"))

            await _paced(write, tokens, 1 / rate)

        settle()
        cpu = time.process_time()
        start = time.perf_counter()
        async with asyncio.timeout(_TIMEOUT), asyncio.TaskGroup() as tasks:
            for index in range(runs):
                tasks.create_task(publisher(index))
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
    finally:
        await _close(client)
    stats, connections = emulator.stats(_channel(session_id))
    if stats.messages != runs * tokens:
        raise BenchmarkError(f"ably-python stored {stats.messages} messages, {runs * tokens} published")
    peak = max((value.peak_per_second for value in connections.values()), default=0)
    return Measured(runs * tokens, seconds, cpu, stats, peak)


async def _close(client: AblyRealtime) -> None:
    """Close an ably-python client and stop the idle timer it may leave behind (as ``AblyBackend.close`` does)."""
    transport = getattr(client.connection.connection_manager, "transport", None)
    with contextlib.suppress(Exception):
        await client.close()
    idle = getattr(transport, "idle_timer", None)
    if idle is not None:
        idle.cancel()
    for _ in range(3):
        await asyncio.sleep(0)


async def _event_size(emulator: EmulatorProcess) -> int:
    """The median size of the SDK's encoded per-token events (``Coalesce.off()``), bytes. Also a warm-up."""
    recording = RecordingBackend(UrlTarget(emulator.url(MODES[0].options)).backend())
    async with Hub(recording, coalesce=Coalesce.off(), snapshots=False) as hub:
        async with hub.session(_session_id("warm-up")).run(agent="bench") as run:
            await _paced(run.text, 50, 0.001)
        await hub.flush()
    sizes = [record.size for record in recording.publishes if record.channel.kind == "events"]
    return round(statistics.median(sizes[1:-1] or sizes))  # without run-start and run-end


# -- the benchmark -----------------------------------------------------------------------------------------------


def _cases(sizes: Sizes) -> Iterator[tuple[int, int, int]]:
    for rate in RATES:
        for runs in RUN_COUNTS:
            yield rate, runs, tokens_per_run(sizes, rate)


async def bench_streaming(sizes: Sizes, report: Report) -> None:
    """Messages, the busiest second and CPU per 1,000 tokens for paced runs, SDK modes vs raw ably-python."""
    with EmulatorProcess() as emulator:
        payload = "x" * await _event_size(emulator)
        for mode in MODES:  # warm-up: the first connection, token request and channel of each configuration
            await sdk_stream(emulator, mode, rate=1000, runs=1, tokens=10)
        await raw_stream(emulator, rate=1000, runs=1, tokens=10, payload=payload)
        for rate, runs, tokens in _cases(sizes):
            raw = await raw_stream(emulator, rate=rate, runs=runs, tokens=tokens, payload=payload)
            measured = {
                mode.key: await sdk_stream(emulator, mode, rate=rate, runs=runs, tokens=tokens) for mode in MODES
            }
            _add_rows(report, rate=rate, runs=runs, tokens=tokens, raw=raw, measured=measured)
    report.note(
        "ably: measured against durable_ai_ably.testing.AblyEmulator in a child process on loopback, not against "
        "Ably; the CPU figures are the benchmark process's (SDK, ably-python and the event loop), without the "
        f"emulator's. The baseline publishes {len(payload)}-character payloads, the median size of the SDK's "
        "per-token events; the SDK runs with snapshots=False."
    )


def _add_rows(
    report: Report, *, rate: int, runs: int, tokens: int, raw: Measured, measured: dict[str, Measured]
) -> None:
    plural = "s" if runs > 1 else ""
    label = "ably-python, 1 message per token"
    summary: list[str] = []
    for mode in MODES:
        m = measured[mode.key]
        case = f"{mode.key}.{rate}tps-{runs}x"
        configuration = f"{rate} tokens/s, {runs} sub-agent run{plural} x {tokens:,} tokens, {mode.label}"
        counts = m.channel
        extra = {
            "tokens": float(m.tokens),
            "seconds": m.seconds,
            "messages": float(counts.messages),
            "created": float(counts.count("create")),
            "appends": float(counts.count("append")),
            "updates": float(counts.count("update")),
            "baseline_messages": float(raw.channel.messages),
        }
        report.add(
            Row(
                id=f"ably.messages.{case}",
                benchmark="Broker messages per 1,000 tokens (emulator)",
                configuration=configuration,
                statistic="count",
                unit="messages",
                sdk=m.messages_per_thousand,
                baseline=raw.messages_per_thousand,
                baseline_label=label,
                extra=extra,
            )
        )
        report.add(
            Row(
                id=f"ably.peak.{case}",
                benchmark="Busiest second on the session's channel (emulator; Ably's limit: 50)",
                configuration=configuration,
                statistic="max over 1-s windows",
                unit="messages/s",
                sdk=float(counts.peak_per_second),
                baseline=float(raw.channel.peak_per_second),
                baseline_label=label,
                extra={
                    **extra,
                    "connection_peak": float(m.connection_peak),
                    "baseline_connection_peak": float(raw.connection_peak),
                    "under_limit": float(max(counts.peak_per_second, m.connection_peak) <= ABLY_LIMIT),
                },
            )
        )
        report.add(
            Row(
                id=f"ably.cpu.{case}",
                benchmark="Agent process CPU per 1,000 tokens (emulator)",
                configuration=configuration,
                statistic="1 run",
                unit="ms",
                sdk=m.cpu_ms_per_thousand,
                baseline=raw.cpu_ms_per_thousand,
                baseline_label=label,
                extra={**extra, "cpu_seconds": m.cpu_seconds, "baseline_cpu_seconds": raw.cpu_seconds},
            )
        )
        operations = ", ".join(f"{count:,} {kind}" for kind, count in sorted(counts.operations.items()))
        verdict = "under" if max(counts.peak_per_second, m.connection_peak) <= ABLY_LIMIT else "over"
        summary.append(
            f"{mode.key} {counts.messages:,} messages ({operations}), busiest second {counts.peak_per_second} "
            f"({verdict} 50), {m.seconds:.2f} s"
        )
    summary.append(
        f"ably-python {raw.channel.messages:,} messages, busiest second {raw.channel.peak_per_second}, "
        f"{raw.seconds:.2f} s"
    )
    report.note(f"ably {rate} tokens/s x {runs} run{plural}, {runs * tokens:,} tokens: " + "; ".join(summary) + ".")


GROUP = Group(
    name="ably",
    title="the Ably backend against the Ably emulator (not Ably itself)",
    benchmarks=(
        Benchmark(
            "streaming",
            "paced runs at 50 and 200 tokens/s: messages, busiest second and CPU per 1,000 tokens, vs ably-python",
            bench_streaming,
        ),
        Benchmark(
            "requests",
            "REST requests and realtime messages before a run's first token and per control (counts)",
            bench_requests,
        ),
    ),
)


if __name__ == "__main__":
    asyncio.run(serve())
