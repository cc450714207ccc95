"""Smoke test of the benchmarks: ``python -m benchmarks --quick`` runs, prints every row, and its counts agree.

The benchmarks run exactly as the documented command runs them, in a subprocess started from the repository root.
(This test package is itself named ``benchmarks`` on pytest's import path, so the command's package cannot be
imported in-process here.) No assertion is made on wall-clock times: only on rows, counts and their consistency.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

EXPECTED_ROWS = {
    "throughput.one-run",
    "throughput.one-run-uncoalesced",
    "throughput.concurrent-sessions",
    "throughput.concurrent-runs-one-session",
    "coalescing.per-1000-tokens.default",
    "coalescing.messages-per-second.default",
    "coalescing.per-1000-tokens.uncoalesced",
    "coalescing.messages-per-second.uncoalesced",
    "catch-up.start.burst",
    "catch-up.start.paced",
    "catch-up.middle.paced",
    "catch-up.start.uncoalesced",
    "catch-up.middle.uncoalesced",
    "view.time.paced",
    "view.messages-read.paced",
    "view.time.uncoalesced",
    "view.messages-read.uncoalesced",
    "snapshots.write",
    "load.messages-per-1000-tokens.idle",
    "load.throughput.idle",
    "load.first-token.idle",
    "load.messages-per-1000-tokens.loaded",
    "load.throughput.loaded",
    "load.first-token.loaded",
    "nats.publish.one-run",
    "nats.publish.concurrent-runs",
    "nats.publish.run-lifecycle",
    "nats.publish.pipelined-ceiling",
    "nats.publish.coalesced",
    "nats.publish.coalesced-messages",
    "nats.latency.p50",
    "nats.latency.p99",
    "nats.catch-up.start",
    "nats.catch-up.middle",
    "nats.late-join.requests",
    "nats.late-join.time",
}
QUICK_SESSIONS = 3  # Sizes.quick().sessions: one step of 3 sessions
EXPECTED_ROWS |= {f"nats.sessions.{figure}.n{QUICK_SESSIONS}" for figure in ("delivered", "p99", "cpu")}
EXPECTED_ROWS |= {
    f"ably.{figure}.{mode}.{rate}tps-{runs}x"
    for figure in ("messages", "peak", "cpu")
    for mode in ("per-token", "coalesced", "appends")
    for rate in (50, 200)
    for runs in (1, 5)
}
EXPECTED_ROWS |= {
    f"ably.requests.{appends}.{step}"
    for appends in ("auto", "off")
    for step in (
        "first-run-of-a-new-session",
        "a-later-run-of-the-session",
        "a-cancel-on-a-busy-session",
        "then-until-its-ack",
    )
}


@dataclass(frozen=True)
class Output:
    stdout: str
    stderr: str
    data: dict[str, Any]

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        return {row["id"]: row for group in self.data["groups"] for row in group["rows"]}

    @property
    def sizes(self) -> dict[str, Any]:
        sizes: dict[str, Any] = self.data["sizes"]
        return sizes


def run_command(*args: str, json_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-W", "error", "-m", "benchmarks", *args]
    if json_path is not None:
        command += ["--json", str(json_path)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)


def table_lines(stdout: str) -> list[str]:
    """The data lines of the groups' tables of rows: no header, no separator, none of the extra tables."""
    lines: list[str] = []
    in_rows = False
    for line in stdout.splitlines():
        if not line.startswith("| "):
            in_rows = False
        elif line.startswith("| Benchmark |"):
            in_rows = True
        elif in_rows and not line.startswith("| --- |"):
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Output:
    json_path = tmp_path_factory.mktemp("benchmarks") / "quick.json"
    result = run_command("--quick", json_path=json_path)
    assert result.returncode == 0, result.stderr
    return Output(result.stdout, result.stderr, json.loads(json_path.read_text()))


def test_the_command_prints_a_row_for_every_benchmark(quick: Output) -> None:
    assert set(quick.rows) == EXPECTED_ROWS
    lines = table_lines(quick.stdout)
    assert len(lines) == len(EXPECTED_ROWS)
    for row in quick.rows.values():
        assert any(f"| {row['benchmark']} | {row['configuration']} |" in line for line in lines), row["id"]
    assert quick.stdout.startswith("# durable-ai benchmarks")
    assert "## memory:" in quick.stdout


def test_only_progress_lines_on_stderr(quick: Output) -> None:
    # No warnings (the command ran with -W error), no logged errors from the library.
    lines = quick.stderr.splitlines()
    assert lines, "progress lines are expected"
    assert all(line.startswith("[benchmarks] ") for line in lines), quick.stderr


def test_every_figure_is_a_positive_number_and_the_ratio_is_sdk_over_baseline(quick: Output) -> None:
    for row in quick.rows.values():
        assert math.isfinite(row["sdk"]) and row["sdk"] > 0, row["id"]
        if row["baseline"] is None:
            assert row["ratio"] is None
            continue
        assert math.isfinite(row["baseline"]) and row["baseline"] > 0, row["id"]
        assert row["ratio"] == pytest.approx(row["sdk"] / row["baseline"])


def test_throughput_counts(quick: Output) -> None:
    rows = quick.rows
    sizes = quick.sizes
    uncoalesced = rows["throughput.one-run-uncoalesced"]["extra"]
    assert uncoalesced["tokens"] == sizes["tokens"]
    # One broker message per token, plus run-start and run-end.
    assert uncoalesced["broker_messages"] == sizes["tokens"] + 2
    coalesced = rows["throughput.one-run"]["extra"]
    assert coalesced["broker_messages"] < sizes["tokens"] / 2
    # Sessions have a writer each (at least run-start and run-end each); runs of one session share one writer.
    cases = (("throughput.concurrent-sessions", sizes["runs"]), ("throughput.concurrent-runs-one-session", 1))
    for key, sessions in cases:
        extra = rows[key]["extra"]
        assert extra["tokens"] == sizes["runs"] * sizes["run_tokens"]
        assert extra["runs"] == sizes["runs"]
        assert 2 * sessions <= extra["broker_messages"] < extra["tokens"]


def test_coalescing_counts(quick: Output) -> None:
    rows = quick.rows
    tokens = quick.sizes["paced_tokens"]
    off = rows["coalescing.per-1000-tokens.uncoalesced"]
    default = rows["coalescing.per-1000-tokens.default"]
    # Without coalescing: exactly one message per token, plus run-start and run-end.
    assert off["extra"]["messages"] == tokens + 2
    assert off["sdk"] == pytest.approx((tokens + 2) / tokens * 1000)
    assert off["sdk"] >= 1000
    # With the default policy several tokens share a message: far fewer messages.
    assert default["extra"]["messages"] >= 3
    assert default["sdk"] < 0.75 * off["sdk"]
    assert default["baseline"] == pytest.approx(off["sdk"])
    rate_default = rows["coalescing.messages-per-second.default"]
    rate_off = rows["coalescing.messages-per-second.uncoalesced"]
    assert rate_default["sdk"] == pytest.approx(default["extra"]["messages"] / default["extra"]["seconds"])
    assert rate_off["sdk"] == pytest.approx(off["extra"]["messages"] / off["extra"]["seconds"])


def test_catch_up_counts(quick: Output) -> None:
    rows = quick.rows
    tokens = quick.sizes["catch_up_tokens"]
    for key in ("burst", "paced", "uncoalesced"):
        assert rows[f"catch-up.start.{key}"]["extra"]["tokens"] == tokens
    assert rows["catch-up.start.uncoalesced"]["extra"]["log_messages"] == tokens + 2
    assert rows["catch-up.start.paced"]["extra"]["log_messages"] == math.ceil(tokens / 4) + 2
    assert rows["catch-up.start.burst"]["extra"]["log_messages"] < rows["catch-up.start.paced"]["extra"]["log_messages"]
    for key in ("paced", "uncoalesced"):
        middle = rows[f"catch-up.middle.{key}"]["extra"]["tokens"]
        assert tokens / 2 - 4 <= middle <= tokens / 2


def test_view_reads_fewer_messages_with_the_snapshot(quick: Output) -> None:
    rows = quick.rows
    sizes = quick.sizes
    for key, tokens_per_message in (("paced", 4), ("uncoalesced", 1)):
        reads = rows[f"view.messages-read.{key}"]
        expected_log = sizes["view_runs"] * (math.ceil(sizes["view_run_tokens"] / tokens_per_message) + 2)
        assert reads["extra"]["log_messages"] == expected_log
        assert reads["baseline"] == expected_log  # the replay reads the whole log
        assert reads["sdk"] < reads["baseline"]  # the snapshot spares it
        assert reads["sdk"] <= 2


def test_ably_counts(quick: Output) -> None:
    rows = quick.rows
    for rate in (50, 200):
        tokens = max(1, round(quick.sizes["paced_tokens"] * rate / 200))  # every run lasts as long
        for runs in (1, 5):
            case = f"{rate}tps-{runs}x"
            per_token = rows[f"ably.messages.per-token.{case}"]
            # One message per event: each sub-agent run's tokens, run-start and run-end, and the parent's two.
            assert per_token["extra"]["messages"] == runs * (tokens + 2) + 2
            assert per_token["extra"]["tokens"] == runs * tokens
            assert per_token["extra"]["baseline_messages"] == runs * tokens
            assert per_token["baseline"] == pytest.approx(1000)
            assert per_token["sdk"] == pytest.approx(per_token["extra"]["messages"] * 1000 / (runs * tokens))
            for mode in ("coalesced", "appends"):
                extra = rows[f"ably.messages.{mode}.{case}"]["extra"]
                assert extra["messages"] == extra["created"] + extra["appends"] + extra["updates"]
                # (Events of concurrent runs, run-starts included, can share a batch.)
                assert 2 <= extra["messages"] <= per_token["extra"]["messages"]
                peak = rows[f"ably.peak.{mode}.{case}"]
                assert peak["sdk"] <= extra["messages"]
                assert peak["extra"]["under_limit"] == 1  # the rate budget keeps the channel under 50/s
            for mode in ("per-token", "coalesced", "appends"):
                assert rows[f"ably.cpu.{mode}.{case}"]["extra"]["cpu_seconds"] > 0


def test_ably_request_counts(quick: Output) -> None:
    rows = quick.rows
    for appends in ("auto", "off"):
        sent = rows[f"ably.requests.{appends}.a-cancel-on-a-busy-session"]
        assert sent["baseline"] == 1  # the control's publish
        assert sent["extra"]["rest"] + sent["extra"]["realtime"] == sent["sdk"]
        assert rows[f"ably.requests.{appends}.first-run-of-a-new-session"]["baseline"] >= 2  # run-start, token


def test_nats_sessions_counts(quick: Output) -> None:
    rows = quick.rows
    sizes = quick.sizes
    assert sizes["sessions"] == [QUICK_SESSIONS]
    delivered = rows[f"nats.sessions.delivered.n{QUICK_SESSIONS}"]
    extra = delivered["extra"]
    # Agent i writes 20 + (i % 31) tokens/s for session_seconds: every planned token is written and delivered.
    planned = sum(math.ceil((sizes["session_seconds"] - (i * 37 % 100) / 100 / (20 + i)) * (20 + i)) for i in range(3))
    assert extra["planned"] == planned
    for side in ("sdk", "baseline"):
        assert extra[f"{side}_written"] == planned
        assert extra[f"{side}_missing"] == 0
        # At least a run-start and an end per session, at most one message per token besides them.
        assert 2 * QUICK_SESSIONS <= extra[f"{side}_messages"] <= planned + 2 * QUICK_SESSIONS
    assert delivered["sdk"] == delivered["baseline"] == planned
    assert f"### nats sessions: {QUICK_SESSIONS} concurrent sessions" in quick.stdout
    (table,) = [t for group in quick.data["groups"] for t in group["tables"] if t["title"].startswith("nats sessions")]
    assert table["columns"][1:] == ["SDK", "nats-py", "SDK / nats-py"]
    assert all(len(row) == 4 for row in table["rows"])
    assert "set-up failed" not in quick.stdout


def test_only_runs_the_selected_benchmark(tmp_path: Path) -> None:
    json_path = tmp_path / "view.json"
    result = run_command("--quick", "--quiet", "--only", "memory.view", json_path=json_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    ids = {row["id"] for group in json.loads(json_path.read_text())["groups"] for row in group["rows"]}
    assert ids == {row for row in EXPECTED_ROWS if row.startswith("view.")}
    assert len(table_lines(result.stdout)) == len(ids)


def test_unknown_names_and_sizes_are_refused() -> None:
    result = run_command("--quick", "--only", "no-such-benchmark")
    assert result.returncode == 2
    assert "unknown benchmark" in result.stderr
    result = run_command("--repeats", "0")
    assert result.returncode == 2
    assert "repeats must be positive" in result.stderr


def test_list_names_every_benchmark() -> None:
    result = run_command("--list")
    assert result.returncode == 0, result.stderr
    for name in ("memory.throughput", "memory.coalescing", "memory.catch-up", "memory.view", "nats.sessions"):
        assert name in result.stdout
