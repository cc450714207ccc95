"""The durable-ai command: the scorecard, the tail, the schema."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from durable_ai import Hub
from durable_ai.cli import main, print_events
from durable_ai.testing.scenarios import CHECKS


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed command, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "durable_ai.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_check_memory_prints_a_passing_scorecard() -> None:
    result = _cli("check", "memory://")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in CHECKS:
        line = next(line for line in lines if name in line)
        assert line.strip().startswith("PASS") and " ms " in line
    assert lines[-1] == f"{len(CHECKS)}/{len(CHECKS)} checks passed"


def test_check_of_an_unknown_backend_fails_once_with_what_to_install() -> None:
    # Every first-party scheme may be installed here; an unknown one still fails once, clearly.
    result = _cli("check", "redis://x")
    assert result.returncode == 2
    assert "no durable-ai backend is installed for 'redis://'" in result.stderr and "PASS" not in result.stdout


def test_check_of_an_unreachable_broker_fails_once() -> None:
    result = _cli("check", "nats://127.0.0.1:1?connect_timeout=1")
    assert result.returncode == 2
    assert "cannot reach the broker" in result.stdout and "PASS" not in result.stdout


def test_tail_prints_events_with_cursors_and_refuses_bad_cursors() -> None:
    out = io.StringIO()
    assert main(["tail", "memory://", "empty-session", "--no-follow"], out) == 0
    assert out.getvalue() == ""
    assert main(["tail", "memory://", "s", "--after", "not-a-cursor"], io.StringIO()) == 2
    assert main(["tail", "memory://", "bad.id"], io.StringIO()) == 2


def test_schema_prints_json_schema() -> None:
    out = io.StringIO()
    assert main(["schema", "controls"], out) == 0
    assert set(json.loads(out.getvalue())["discriminator"]["mapping"]) == {"cancel", "steer", "prompt"}


async def test_tail_output_resumes_from_a_printed_cursor(hub: Hub) -> None:
    async with hub.session("s").run(agent="writer") as run:
        await run.text("Hello")
        await run.status("done")
    out = io.StringIO()
    await print_events(hub, "s", None, False, out)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["run-start", "text-delta", "status", "run-end"]
    assert all(line.split()[2] == "writer" for line in lines)
    assert '"delta":"Hello"' in lines[1]
    rest = io.StringIO()
    await print_events(hub, "s", lines[1].split()[0], False, rest)
    assert rest.getvalue().splitlines() == lines[2:]
