"""The examples and the README run, and say what they claim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(path: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / path)], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_readme_quickstart_has_exactly_the_two_set_up_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", quickstart, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["uv run durable-ai demo", "uv run pytest"]
    assert "uv run pytest" in (ROOT / ".ci" / "run").read_text()


def test_readme_example_is_the_quickstart_example_and_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "quickstart.py").read_text()
    assert f"```python\n{example}```" in readme
    lines = _run("examples/quickstart.py").splitlines()
    assert lines[-1] == "Durable sessions survive reconnects."
    types = [line.split()[1] for line in lines[:-1]]
    assert types[0] == "run-start" and types[-1] == "run-end" and set(types[1:-1]) == {"text-delta"}
    deltas = "".join(line.split(" ", 2)[2] for line in lines[1:-2])
    assert deltas == "Durable sessions survive reconnects."  # the first token is flushed on its own


def test_three_capabilities_example() -> None:
    out = _run("examples/three_capabilities.py")
    assert "stop acknowledged: applied" in out
    assert "agent cancelled: True" in out
    assert "identical to the session; run ended cancelled" in out


def test_serve_chat_example() -> None:
    out = _run("examples/serve_chat.py")
    assert "steer:     steered run" in out
    assert "interrupt: interrupted run" in out
    assert "assistant (cancelled): explain cursors:0" in out and "[ok: shorter please]" in out
    assert "assistant (completed): actually, explain cancel:0" in out


def test_langchain_chat_example() -> None:
    out = _run("examples/langchain_chat.py").splitlines()
    assert out[:4] == [
        "you: Which language should I use for a small CLI?",
        "  tool call search({'query': 'CLI languages'})",
        "  tool result: 3 articles about CLI languages",
        "assistant (completed): Both Python and TypeScript suit a small CLI; Python is quic…",
    ]
    assert out[4:6] == ["you: Show me hello world.", "  steer: applied"]
    # the Python answer was cut short; the rest of the answer, a part of its own, is the steered one
    assert out[6].startswith("assistant (completed): In ") and out[6].endswith(
        " | In TypeScript: console.log('hello world');"
    )
    assert out[7:9] == ["you: Now explain everything.", "  stop: applied"]
    assert out[9].startswith("assistant (cancelled): Every") and len(out) == 10


def test_multi_agent_example() -> None:
    out = _run("examples/multi_agent.py").splitlines()
    middle = out.index("round 2: the client stops everything")
    first, second = out[:middle], out[middle:]
    rows = {line.split()[0]: line.split()[1] for line in first[1:]}
    assert rows == {
        "orchestrator": "completed",
        "researcher-currents": "cancelled",
        "researcher-tides": "completed",
        "researcher-winds": "completed",
    }
    assert "Summary: 2 reports (tides, winds)." in first[1]
    assert {line.split()[0]: line.split()[1] for line in second[1:]} == dict.fromkeys(rows, "cancelled")
