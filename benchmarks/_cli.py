"""The ``python -m benchmarks`` command: choose sizes and benchmarks, run them, print the table."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import GROUPS, load_group
from ._harness import (
    Benchmark,
    Group,
    Report,
    Sizes,
    machine_description,
    render_json,
    render_markdown,
    source_revision,
    sources_digest,
)

__all__ = ["Options", "SelectionError", "main", "parse_args", "run", "selected"]


class SelectionError(ValueError):
    """``--only`` names a benchmark that no selected group has."""


def _counts(text: str) -> tuple[int, ...]:
    """``250,500,1000`` as ``(250, 500, 1000)``."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if not counts:
        raise argparse.ArgumentTypeError("expected at least one number")
    return counts


def _shown(value: object) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


# Size flags: (flag, field of Sizes, parser of the value).
_SIZE_FLAGS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("--repeats", "repeats", int),
    ("--tokens", "tokens", int),
    ("--runs", "runs", int),
    ("--run-tokens", "run_tokens", int),
    ("--paced-tokens", "paced_tokens", int),
    ("--token-interval", "token_interval", float),
    ("--catch-up-tokens", "catch_up_tokens", int),
    ("--view-runs", "view_runs", int),
    ("--view-run-tokens", "view_run_tokens", int),
    ("--sessions", "sessions", _counts),
    ("--session-seconds", "session_seconds", float),
    ("--session-rounds", "session_rounds", int),
)


@dataclass(frozen=True, slots=True)
class Options:
    sizes: Sizes
    groups: tuple[str, ...]
    only: tuple[str, ...]
    json_path: Path | None
    list_only: bool
    quiet: bool
    command: str


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the durable-ai benchmarks and print a markdown table (see docs/performance.md).",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test); default: full sizes")
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run this group only (repeatable; known: {', '.join(GROUPS)}; default: all)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run this benchmark only, by NAME or GROUP.NAME (repeatable; see --list)",
    )
    parser.add_argument("--list", action="store_true", help="list the groups and benchmarks, run nothing")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    defaults = Sizes.full()
    sizes = parser.add_argument_group("sizes (override --quick or the full defaults)")
    for flag, name, kind in _SIZE_FLAGS:
        sizes.add_argument(flag, type=kind, default=None, help=f"full size: {_shown(getattr(defaults, name))}")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = _parser()
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes.full()
    overrides = {name: getattr(args, name) for _, name, _ in _SIZE_FLAGS if getattr(args, name) is not None}
    try:
        sizes = dataclasses.replace(sizes, **overrides)
    except ValueError as exc:
        parser.error(str(exc))
    for name in args.group:
        if name not in GROUPS:
            parser.error(f"unknown group {name!r}; known groups: {', '.join(GROUPS)}")
    words = ["uv run python -m benchmarks", *(sys.argv[1:] if argv is None else argv)]
    return Options(
        sizes=sizes,
        groups=tuple(args.group) or tuple(GROUPS),
        only=tuple(args.only),
        json_path=args.json,
        list_only=args.list,
        quiet=args.quiet,
        command=" ".join(words),
    )


def selected(group: Group, only: Sequence[str]) -> list[Benchmark]:
    """The benchmarks of ``group`` that ``--only`` selects (all of them when ``only`` is empty)."""
    if not only:
        return list(group.benchmarks)
    return [b for b in group.benchmarks if b.name in only or f"{group.name}.{b.name}" in only]


def _progress(options: Options, text: str) -> None:
    if not options.quiet:
        print(f"[benchmarks] {text}", file=sys.stderr, flush=True)


async def run(options: Options) -> list[Report]:
    """Run the selected benchmarks, group after group, one benchmark at a time."""
    groups = [load_group(name) for name in options.groups]
    known = {b.name for g in groups for b in g.benchmarks} | {
        f"{g.name}.{b.name}" for g in groups for b in g.benchmarks
    }
    unknown = [name for name in options.only if name not in known]
    if unknown:
        raise SelectionError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    reports: list[Report] = []
    for group in groups:
        benchmarks = selected(group, options.only)
        if not benchmarks:
            continue
        report = Report(group.name, group.title)
        for benchmark in benchmarks:
            _progress(options, f"{group.name}.{benchmark.name}: {benchmark.summary}")
            started = time.perf_counter()
            await benchmark.run(options.sizes, report)
            _progress(options, f"{group.name}.{benchmark.name}: done in {time.perf_counter() - started:.1f} s")
        reports.append(report)
    return reports


def _listing(options: Options) -> str:
    lines: list[str] = []
    for name in options.groups:
        group = load_group(name)
        lines.append(f"{group.name}: {group.title}")
        lines += [f"  {group.name}.{b.name}: {b.summary}" for b in group.benchmarks]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    if options.list_only:
        print(_listing(options))
        return 0
    started = time.perf_counter()
    machine = machine_description()  # before running: the revision of the code being measured
    try:
        reports = asyncio.run(run(options))
    except SelectionError as exc:
        print(f"python -m benchmarks: error: {exc}", file=sys.stderr)
        return 2
    _progress(options, f"all done in {time.perf_counter() - started:.1f} s")
    machine["revision_after"] = source_revision()
    machine["sources_after"] = sources_digest()
    print(render_markdown(reports, sizes=options.sizes, command=options.command, machine=machine), end="")
    if options.json_path is not None:
        data = render_json(reports, sizes=options.sizes, command=options.command, machine=machine)
        options.json_path.write_text(json.dumps(data, indent=2) + "\n")
    return 0
