"""The real ably-js client (tests/js, `npm ci` there) reads a session from the emulator with a client credential.

It connects as a browser app does (``authCallback`` returning a TokenRequest or a JWT, protocol v6), attaches the
session's events channel, reads its history and follows a run written after it subscribed. Skipped only when
``node`` or ``tests/js/node_modules`` is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import durable_ai
from durable_ai import Hub
from durable_ai_ably import issue_client_jwt, issue_client_token
from durable_ai_ably.testing import AblyEmulator

TIMEOUT = 20.0
SECRET = "Zk3vQ9pX2mL7wR4tY8uI1oP6aS5dF0gHjKlMnBvCxZq"
KEY = f"app1.root:{SECRET}"
SESSION = "chat-js"
USER = "browser-user"
JS_DIR = Path(__file__).resolve().parents[1] / "js"
SCRIPT = JS_DIR / "read_session.mjs"
NODE = shutil.which("node")


def _skip_reason() -> str | None:
    if NODE is None:
        return "node is not installed"
    if not (JS_DIR / "node_modules" / "ably").is_dir():
        return f"ably-js is not installed: run `npm ci` in {JS_DIR}"
    return None


if (_reason := _skip_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)  # pytest -ra (the default here) prints the reason


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    async with AblyEmulator({KEY: None}, mutable_namespaces={"ai"}) as emu:
        yield emu


@pytest.fixture
async def agent(emulator: AblyEmulator) -> AsyncIterator[Hub]:
    async with durable_ai.connect(f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false") as hub:
        yield hub


async def write_answer(agent: Hub, *texts: str) -> None:
    async with agent.session(SESSION).run(agent="writer") as run:
        for text in texts:
            await run.text(text)
    await agent.flush()


class NodeReader:
    """tests/js/read_session.mjs in a child process: its JSON lines, read as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.records: list[dict[str, Any]] = []

    async def until(self, kind: str) -> dict[str, Any]:
        """Read lines until one of `kind` (every line read is kept in `records`)."""
        assert self.process.stdout is not None
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), TIMEOUT)
            if not line:
                raise AssertionError(f"read_session.mjs ended before a {kind!r} line: {await self.failure()}")
            record: dict[str, Any] = json.loads(line)
            self.records.append(record)
            if record["kind"] == kind:
                return record

    async def failure(self) -> str:
        assert self.process.stderr is not None
        code = await asyncio.wait_for(self.process.wait(), TIMEOUT)
        stderr = (await self.process.stderr.read()).decode(errors="replace")
        return f"exit code {code}, stderr:\n{stderr}"

    def texts(self, kind: str) -> str:
        events = [r["event"] for r in self.records if r["kind"] == kind]
        return "".join(e["delta"] for e in events if e["type"] == "text-delta")

    def types(self, kind: str) -> list[str]:
        return [r["event"]["type"] for r in self.records if r["kind"] == kind]


async def start_reader(emulator: AblyEmulator, credential: str, runs: int, *, msgpack: bool = False) -> NodeReader:
    assert NODE is not None
    args = ["--port", str(emulator.port), "--channel", f"ai:{SESSION}", "--runs", str(runs)]
    args += ["--timeout", str(int(TIMEOUT * 1000)), *(["--msgpack"] if msgpack else [])]
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(SCRIPT),
        *args,
        cwd=JS_DIR,
        env={**os.environ, "ABLY_CLIENT_TOKEN": credential},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return NodeReader(process)


@pytest.mark.parametrize(
    ("kind", "msgpack"),
    [("token-request", False), ("jwt", False), ("token-request", True)],
    ids=["token-request", "jwt", "token-request-msgpack"],
)
async def test_ably_js_reads_history_and_follows_a_live_run(
    agent: Hub, emulator: AblyEmulator, kind: str, msgpack: bool
) -> None:
    """JSON as browsers speak it, with both credentials; msgpack as ably-js prefers on Node."""
    await write_answer(agent, "Hello from ", "the Python agent.")
    if kind == "jwt":
        credential = issue_client_jwt(SESSION, USER, key=KEY)
    else:
        credential = json.dumps(issue_client_token(SESSION, USER, key=KEY))
    reader = await start_reader(emulator, credential, runs=2, msgpack=msgpack)
    try:
        connected = await reader.until("connected")
        assert connected["clientId"] == USER
        await reader.until("history-end")
        assert reader.texts("history") == "Hello from the Python agent."
        assert reader.types("history")[-1] == "run-end"

        await write_answer(agent, "And this one ", "arrived live.")  # after ably-js subscribed and read history
        await reader.until("done")
        code = await asyncio.wait_for(reader.process.wait(), TIMEOUT)
        assert code == 0, await reader.failure()
    finally:
        if reader.process.returncode is None:
            reader.process.kill()
            await reader.process.wait()
    assert reader.texts("live") == "And this one arrived live."
    assert reader.types("live")[0] == "run-start"
    assert reader.types("live")[-1] == "run-end"
    # The appends (action message.append) reached ably-js live, so the part grew as one message.
    assert "message.append" in {r["action"] for r in reader.records if r["kind"] == "live"}


async def test_ably_js_reports_a_refused_credential(emulator: AblyEmulator) -> None:
    """A JWT signed with the wrong secret: ably-js cannot connect, and the script says why and exits 1 at once."""
    credential = issue_client_jwt(SESSION, USER, key="app1.root:not-the-secret-but-long-enough-for-hs256")
    reader = await start_reader(emulator, credential, runs=1)
    try:
        code = await asyncio.wait_for(reader.process.wait(), TIMEOUT)
    finally:
        if reader.process.returncode is None:
            reader.process.kill()
            await reader.process.wait()
    assert reader.process.stderr is not None
    stderr = (await reader.process.stderr.read()).decode()
    assert code == 1
    assert "read_session: could not connect: 40144 (401)" in stderr
