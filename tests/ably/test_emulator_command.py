"""The documented command: ``python -m durable_ai_ably.testing`` serves the emulator, and ``durable-ai check`` on
the URL it prints passes (in a subprocess, as a user runs it)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys

from durable_ai.cli import main
from durable_ai.testing.scenarios import CHECKS


async def test_durable_ai_check_passes_against_the_emulator_command() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "durable_ai_ably.testing", "--port", "0", "--appends",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            banner = (await process.stdout.readline()).decode()
            url = (await process.stdout.readline()).decode().strip()
        assert "appends on: ai" in banner
        assert url.startswith("ably://?key=")
        out = io.StringIO()
        status = await asyncio.to_thread(main, ["check", url], out)
        assert status == 0, out.getvalue()
        assert f"{len(CHECKS)}/{len(CHECKS)} checks passed" in out.getvalue()
    finally:
        os.kill(process.pid, signal.SIGINT)
        async with asyncio.timeout(10):
            assert await process.wait() == 0
