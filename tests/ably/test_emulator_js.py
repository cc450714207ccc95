"""The Ably emulator with the real ably-js client (tests/js/emulator_checks.mjs, `npm ci` in tests/js): tokens and
JWTs that expire on a live connection are renewed and the connection resumes; history({untilAttach}) stops at the
attachment. Skipped only when ``node`` or ``tests/js/node_modules/ably`` is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from durable_ai_ably.testing import AblyEmulator
from tests.ably.node import JS_DIR, NODE, skip_without_ably_js

TIMEOUT = 20.0
SECRET = "Zk3vQ9pX2mL7wR4tY8uI1oP6aS5dF0gHjKlMnBvCxZq"
KEY = f"app1.root:{SECRET}"
SCRIPT = JS_DIR / "emulator_checks.mjs"


skip_without_ably_js()


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    async with AblyEmulator({KEY: None}) as emu:
        yield emu


class Script:
    """emulator_checks.mjs in a child process: its JSON lines, read as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.records: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, emulator: AblyEmulator, *args: str) -> Script:
        assert NODE is not None
        process = await asyncio.create_subprocess_exec(
            NODE,
            str(SCRIPT),
            "--port",
            str(emulator.port),
            "--timeout",
            str(int(TIMEOUT * 1000)),
            *args,
            cwd=JS_DIR,
            env={**os.environ, "ABLY_KEY": KEY},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def until(self, kind: str) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), TIMEOUT)
            if not line:
                raise AssertionError(f"emulator_checks.mjs ended before a {kind!r} line: {await self.failure()}")
            record: dict[str, Any] = json.loads(line)
            self.records.append(record)
            if record["kind"] == kind:
                return record

    async def failure(self) -> str:
        assert self.process.stderr is not None
        code = await asyncio.wait_for(self.process.wait(), TIMEOUT)
        return f"exit code {code}, stderr:\n{(await self.process.stderr.read()).decode(errors='replace')}"

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


@pytest.mark.parametrize("auth", ["token-request", "jwt"])
async def test_ably_js_renews_an_expired_token_and_resumes(emulator: AblyEmulator, auth: str) -> None:
    # A JWT's expiry has second precision, so it lives 1-2 s; a TokenRequest asks for 1.5 s.
    script = await Script.start(emulator, "--check", "renew", "--auth", auth, "--renewals", "2", "--channel", "ai:r")
    try:
        echo = await script.until("echo")
        await script.until("done")
    finally:
        await script.close()
    states = [r for r in script.records if r["kind"] == "state"]
    expiries = [r for r in states if r["current"] == "disconnected"]
    assert [r["code"] for r in expiries] == [40142, 40142]
    connected = {r["connectionId"] for r in states if r["current"] == "connected"}
    assert len(connected) == 1  # every renewal resumed the same connection
    assert echo["connectionId"] in connected
    assert sum(1 for r in script.records if r["kind"] == "token") == 3
    [published] = [r for r in script.records if r["kind"] == "published"]
    assert [m.serial for m in emulator.messages("ai:r")] == [published["serial"]]


async def test_ably_js_history_until_attach_stops_at_the_attachment(emulator: AblyEmulator) -> None:
    name, _, secret = KEY.partition(":")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{emulator.port}", auth=(name, secret)) as http:
        for data in ("a", "b"):
            assert (await http.post("/channels/ai:h/messages", json={"data": data})).status_code == 201
        script = await Script.start(emulator, "--check", "until-attach", "--channel", "ai:h")
        try:
            attached = await script.until("attached")
            assert attached["attachSerial"] == emulator.messages("ai:h")[-1].serial
            assert (await http.post("/channels/ai:h/messages", json={"data": "after"})).status_code == 201
            history = await script.until("history")
            forwards = await script.until("forwards")
            await script.until("done")
        finally:
            await script.close()
    assert history["data"] == ["b", "a"]
    # ably-js 2.28 sends untilAttach with direction forwards as it is; Ably documents it as an error.
    assert forwards["code"] == 40003
