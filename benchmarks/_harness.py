"""The benchmark harness: sizes, result rows, groups, timing helpers and the printed table.

A **group** is the set of benchmarks for one backend (``memory`` here; ``nats`` and ``ably`` later). Each
benchmark is an async function ``(sizes, report) -> None`` that adds :class:`Row` objects and free-form notes to
the :class:`Report` of its group. Rows compare the SDK with a baseline doing the same work (an ``asyncio.Queue``,
the raw broker, or another SDK setting) and carry the ratio SDK/baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import durable_ai

__all__ = [
    "Benchmark",
    "BenchmarkError",
    "BenchmarkFunction",
    "Better",
    "Group",
    "Report",
    "Row",
    "Samples",
    "Sizes",
    "Table",
    "captured_logs",
    "cpu_hogs",
    "machine_description",
    "peak_rss",
    "percentile",
    "process_cpu_seconds",
    "render_json",
    "render_markdown",
    "rss_bytes",
    "sample",
    "settle",
    "source_revision",
    "sources_digest",
]

Better = Literal["higher", "lower"]


class BenchmarkError(Exception):
    """A benchmark saw something wrong (a lost token, a view that differs from the replay): its figures are void."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each benchmark does.

    :meth:`full` is what docs/performance.md reports; :meth:`quick` is for the smoke test (a couple of seconds).
    """

    repeats: int = 3
    """Timed measurements are repeated this many times; the table shows the best."""
    tokens: int = 20_000
    """Tokens of the single run in the throughput benchmark."""
    runs: int = 100
    """Concurrent runs in the throughput benchmark."""
    run_tokens: int = 1_000
    """Tokens of each concurrent run."""
    paced_tokens: int = 1_000
    """Tokens of the paced run in the coalescing benchmark."""
    token_interval: float = 0.010
    """Seconds between two tokens of the paced run (0.010: a model at 100 tokens/s)."""
    catch_up_tokens: int = 10_000
    """Tokens of the finished run that a new subscriber reads in the catch-up benchmark."""
    view_runs: int = 100
    """Finished runs in the session of the view benchmark."""
    view_run_tokens: int = 2_000
    """Tokens of each of those runs."""
    sessions: tuple[int, ...] = (250, 500, 1000)
    """The steps of the sessions benchmark: so many concurrent sessions, each with a paced agent and a subscriber."""
    session_seconds: float = 10.0
    """Seconds of writing in each step of the sessions benchmark."""
    busy_messages: int = 600
    """Messages in the busy session a control is sent to in the requests benchmark (written within a minute)."""
    session_rounds: int = 2
    """Rounds of each step of the sessions benchmark, the SDK and the baseline alternating (SDK, raw, raw, SDK...)."""

    @classmethod
    def full(cls) -> Sizes:
        return cls()

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            repeats=1,
            tokens=500,
            runs=10,
            run_tokens=50,
            paced_tokens=40,
            catch_up_tokens=500,
            view_runs=5,
            view_run_tokens=100,
            sessions=(3,),
            session_seconds=1.0,
            session_rounds=1,
            busy_messages=50,
        )

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, tuple):
                if not value or not all(isinstance(v, int) and v > 0 for v in value):
                    raise ValueError(f"{item.name} must be one or more positive whole numbers, got {value!r}")
            elif not value > 0:
                raise ValueError(f"{item.name} must be positive, got {value!r}")


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table.

    ``id`` is stable across sizes (tests and tools key on it); ``benchmark`` and ``configuration`` are for people.
    ``sdk`` and ``baseline`` are in ``unit``; ``extra`` holds further measured facts (medians, message counts).
    A side that could not be measured (its set-up failed) has ``sdk_failure`` or ``baseline_failure``: the text
    printed in its cell instead of the figure (the figure is then ``nan``) and no ratio.
    """

    id: str
    benchmark: str
    configuration: str
    statistic: str
    unit: str
    sdk: float
    baseline: float | None = None
    baseline_label: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    sdk_failure: str | None = None
    baseline_failure: str | None = None

    @property
    def ratio(self) -> float | None:
        """SDK / baseline, or ``None`` where no baseline applies (or a side failed)."""
        if self.baseline is None or self.baseline == 0 or self.sdk_failure or self.baseline_failure:
            return None
        return self.sdk / self.baseline

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


@dataclass(frozen=True, slots=True)
class Table:
    """A table of text cells that a benchmark adds to its group (printed after the group's table of rows).

    For figures that do not fit one row each: several figures of one configuration side by side, say. The first
    column is left-aligned, the others right-aligned.
    """

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.title!r}: row {row!r} does not have {len(self.columns)} cells")

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": list(self.columns), "rows": [list(row) for row in self.rows]}


@dataclass(frozen=True, slots=True)
class Target:
    """A goal the project sets for one figure, printed with the measurement that decides it.

    ``goal`` says what must hold (``">= 0.9x nats-py"``), ``measured`` what this run measured, with the baseline
    next to it; ``met`` is ``None`` where this run could not decide (a step that was not measured).
    """

    name: str
    goal: str
    measured: str
    met: bool | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Report:
    """What one group's benchmarks measured."""

    group: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def target(self, target: Target) -> None:
        self.targets.append(target)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def table(self, table: Table) -> None:
        self.tables.append(table)


BenchmarkFunction = Callable[[Sizes, Report], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Benchmark:
    """One benchmark of a group; ``name`` is what ``--only`` selects (``NAME`` or ``GROUP.NAME``)."""

    name: str
    summary: str
    run: BenchmarkFunction


@dataclass(frozen=True, slots=True)
class Group:
    """The benchmarks of one backend. A group module (``benchmarks/core.py``...) defines ``GROUP: Group``."""

    name: str
    title: str
    benchmarks: tuple[Benchmark, ...]


# -- measuring ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Samples:
    """Repeated measurements of one figure."""

    values: tuple[float, ...]
    better: Better

    def best(self) -> float:
        return max(self.values) if self.better == "higher" else min(self.values)

    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def statistic(self) -> str:
        return f"best of {len(self.values)}" if len(self.values) > 1 else "1 run"


async def sample(times: int, measure: Callable[[], Awaitable[float]], better: Better) -> Samples:
    """Run ``measure`` ``times`` times, one after the other."""
    return Samples(tuple([await measure() for _ in range(times)]), better)


@contextlib.contextmanager
def cpu_hogs(count: int | None = None) -> Iterator[int]:
    """A loaded machine: ``count`` processes (default: one per CPU) spinning until the block ends.

    The benchmark then shares every core with a process that never sleeps, as on a busy host. Yields the count
    once every one of them is spinning (an interpreter starting up would load the machine unevenly at first).
    """
    count = count if count is not None else os.cpu_count() or 1
    spin = "import sys; sys.stdout.write('spinning'); sys.stdout.flush()\nwhile True: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE) for _ in range(count)]
    try:
        for hog in hogs:
            assert hog.stdout is not None
            if hog.stdout.read(len("spinning")) != b"spinning":
                raise BenchmarkError("a spinning process did not start")
        yield count
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()
            if hog.stdout is not None:
                hog.stdout.close()


def settle() -> None:
    """Call right before starting a clock: collect the garbage earlier measurements left behind."""
    gc.collect()


def percentile(values: Sequence[float], percent: float) -> float:
    """The ``percent``-th percentile of ``values`` (nearest rank on the sorted values); ``nan`` if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def rss_bytes() -> int:
    """The resident set size of this process now, bytes (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if platform.system() == "Darwin" else peak * 1024
    return pages * os.sysconf("SC_PAGE_SIZE")


class _RssPeak:
    def __init__(self) -> None:
        self.start = rss_bytes()
        self.peak = self.start

    def observe(self) -> None:
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        """Bytes the peak reached above the resident size at the start."""
        return self.peak - self.start


@contextlib.asynccontextmanager
async def peak_rss(interval: float = 0.1) -> AsyncIterator[_RssPeak]:
    """Sample this process's resident size every ``interval`` seconds while the block runs.

    (``ru_maxrss`` is the peak of the whole process: a block after a larger one would show no growth.) Memory
    that earlier work freed but the allocator kept is reused first, so growth can be under-reported after it.
    """
    watch = _RssPeak()

    async def sampling() -> None:
        while True:
            await asyncio.sleep(interval)
            watch.observe()

    task = asyncio.get_running_loop().create_task(sampling())
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        watch.observe()


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds process ``pid`` has used so far (Linux ``/proc``), or ``None``."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields_after_name = stat.rsplit(")", 1)[-1].split()
    # Fields 14 and 15 of stat(5) (utime, stime); the first after the name is field 3.
    ticks = int(fields_after_name[11]) + int(fields_after_name[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.INFO) -> list[str]:
        return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records if r.levelno >= level]


@contextlib.contextmanager
def captured_logs(*names: str) -> Iterator[_Captured]:
    """Collect the records (INFO and above) of loggers ``names`` instead of printing them, while the block runs.

    For a benchmark that must report what the library logged (a reader that keeps retrying, say) in its table.
    """
    handler = _Captured()
    saved: list[tuple[logging.Logger, int, bool]] = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield handler
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


# -- rendering ---------------------------------------------------------------------------------------------------


def _number(value: float, unit: str) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if unit == "ms":
        digits = 3 if value < 1 else 2 if value < 10 else 1 if value < 100 else 0
        return f"{value:,.{digits}f} ms"
    text = f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:,.1f}"
    if value == 1 and unit.endswith("messages"):
        unit = unit[:-1]
    return f"{text} {unit}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    if value < 0.01:
        return f"{value:.1e}"
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def machine_description() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cpus": str(usable),
        "cpu": cpu,
        "platform": platform.platform(),
        "revision": source_revision(),
        "sources": sources_digest(),
    }


def source_revision() -> str:
    """The git commit of the code measured, and whether the library had uncommitted changes."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "durable_ai")
    except (OSError, subprocess.SubprocessError):
        return f"unknown commit (sources {sources_digest()})"
    return f"{commit} + uncommitted changes to durable_ai/ (sources {sources_digest()})" if dirty else commit


def sources_digest() -> str:
    """A short hash of the library's source files, to notice code that changes while the benchmarks run."""
    package = Path(durable_ai.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def render_markdown(reports: Sequence[Report], *, sizes: Sizes, command: str, machine: dict[str, str]) -> str:
    """The table(s) and notes as markdown; ``machine`` comes from :func:`machine_description`."""
    lines = [
        "# durable-ai benchmarks",
        "",
        f"`{command}` on {machine['python']}, {machine['cpus']} CPU(s) ({machine['cpu']}), {machine['platform']}; "
        f"durable-ai {durable_ai.__version__} at {machine['revision']}.",
        (
            f"Timed figures: the best of {sizes.repeats} measurements. "
            if sizes.repeats > 1
            else "Timed figures: one measurement each. "
        )
        + "Ratio = SDK / baseline: for rates (tokens/s) below 1 means slower than the baseline, "
        "for times and counts above 1 means slower or more.",
    ]
    if machine.get("sources_after", machine["sources"]) != machine["sources"]:
        lines.append(
            f"**Warning: durable_ai/ changed during the run** (now {machine.get('revision_after')}): "
            "the figures may mix two versions of the code."
        )
    for report in reports:
        lines += [
            "",
            f"## {report.group}: {report.title}",
            "",
            "| Benchmark | Configuration | Statistic | SDK | Baseline | SDK / baseline |",
            "| --- | --- | --- | ---: | ---: | ---: |",
        ]
        for row in report.rows:
            baseline = "n/a"
            if row.baseline_failure:
                baseline = row.baseline_failure
            elif row.baseline is not None:
                baseline = _number(row.baseline, row.unit)
            if row.baseline_label and (row.baseline is not None or row.baseline_failure):
                baseline += f" ({row.baseline_label})"
            cells = [
                row.benchmark,
                row.configuration,
                row.statistic,
                row.sdk_failure or _number(row.sdk, row.unit),
                baseline,
                _ratio(row.ratio),
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        for table in report.tables:
            lines += [
                "",
                f"### {table.title}",
                "",
                "| " + " | ".join(_cell(c) for c in table.columns) + " |",
                "| " + " | ".join(["---", *["---:"] * (len(table.columns) - 1)]) + " |",
            ]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
        if report.notes:
            lines += ["", "Notes:", ""]
            lines += [f"- {note}" for note in report.notes]
    targets = [(report.group, target) for report in reports for target in report.targets]
    if targets:
        lines += [
            "",
            "## Targets",
            "",
            "Each goal next to what this run measured and the baseline it is a ratio of.",
            "",
            "| Group | Target | Goal | Measured (SDK vs baseline) | Met |",
            "| --- | --- | --- | --- | --- |",
        ]
        for group, target in targets:
            met = "n/a" if target.met is None else ("yes" if target.met else "**no**")
            cells = [group, target.name, target.goal, target.measured, met]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render_json(reports: Sequence[Report], *, sizes: Sizes, command: str, machine: dict[str, str]) -> dict[str, Any]:
    """The same results as data (``--json PATH``)."""
    return {
        "command": command,
        "machine": machine,
        "sizes": asdict(sizes),
        "groups": [
            {
                "group": report.group,
                "title": report.title,
                "rows": [row.as_dict() for row in report.rows],
                "tables": [table.as_dict() for table in report.tables],
                "notes": list(report.notes),
                "targets": [target.as_dict() for target in report.targets],
            }
            for report in reports
        ],
    }
