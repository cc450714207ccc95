"""Where the tests find node and the JS packages of tests/js (installed there with ``npm ci``), why they skip
without them, and :class:`NodeClient`: a node script in a child process that prints JSON lines and reads commands
as JSON lines on its stdin."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

JS_DIR = Path(__file__).resolve().parents[1] / "js"
NODE = shutil.which("node")
TIMEOUT = 20.0

Record = dict[str, Any]


def skip_without_js(*packages: str) -> None:
    """Skip the calling test module when node or one of ``packages`` (in tests/js/node_modules) is missing (pytest
    -ra, the default here, says why)."""
    if NODE is None:
        pytest.skip("node is not installed", allow_module_level=True)
    missing = [name for name in packages if not (JS_DIR / "node_modules" / name).is_dir()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run `npm ci` in {JS_DIR}", allow_module_level=True)


def skip_without_ably_js() -> None:
    """Skip the calling test module when node or ably-js is missing."""
    skip_without_js("ably")


class NodeClient:
    """A node script in a child process: its JSON lines, read as they come, and commands sent on its stdin.

    Every line read is kept in ``records``, in order; waits are for a record that matches, with ``timeout``.
    """

    def __init__(self, process: asyncio.subprocess.Process, name: str, timeout: float = TIMEOUT) -> None:
        self.process = process
        self.name = name
        self.timeout = timeout
        self.records: list[Record] = []

    async def wait(self, predicate: Callable[[Record], bool], what: str = "", *, start: int = 0) -> Record:
        """The first record from the `start`-th on (read before or now) that matches; every line read is kept."""
        for earlier in self.records[start:]:
            if predicate(earlier):
                return earlier
        assert self.process.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(self.process.stdout.readline(), self.timeout)
            except TimeoutError:
                raise AssertionError(f"{self.name}: no {what or 'matching'} line in {self.timeout} s") from None
            if not line:
                raise AssertionError(f"{self.name} ended before a {what or 'matching'} line: {await self.failure()}")
            record: Record = json.loads(line)
            self.records.append(record)
            if predicate(record):
                return record

    async def until(self, kind: str) -> Record:
        return await self.wait(lambda r: r["kind"] == kind, kind)

    async def send(self, command: Record) -> Record:
        """Send a command and wait for its answer (a ``result`` record with the same ``cmd``)."""
        assert self.process.stdin is not None
        start = len(self.records)
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        return await self.wait(
            lambda r: r["kind"] == "result" and r["cmd"] == command["cmd"], f"{command['cmd']} result", start=start
        )

    async def exit(self) -> int:
        """Ask it to exit, then its exit code."""
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.write(b'{"cmd":"exit"}\n')
            await self.process.stdin.drain()
        return await asyncio.wait_for(self.process.wait(), self.timeout)

    async def failure(self) -> str:
        assert self.process.stderr is not None
        code = await asyncio.wait_for(self.process.wait(), self.timeout)
        stderr = (await self.process.stderr.read()).decode(errors="replace")
        return f"exit code {code}, stderr:\n{stderr}"

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def start_node(
    script: Path, args: Sequence[str], env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """``node script args`` in tests/js, with pipes for stdin, stdout and stderr."""
    assert NODE is not None
    return await asyncio.create_subprocess_exec(
        NODE,
        str(script),
        *args,
        cwd=JS_DIR,
        env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
