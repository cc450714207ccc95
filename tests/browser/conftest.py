"""Real headless Chromium (Debian's ``chromium``, driven by Playwright with ``executable_path``; never a browser
download) against the demo app served by uvicorn on loopback, on memory, NATS and the Ably emulator.

One Chromium serves a test module (its tests run in the module's event loop: ``pytestmark = LOOP``); each test gets
a context of its own (its own localStorage) and a demo server of its own, both closed when it ends, and no task of
its own left running.

Screenshots are kept under ``tests/browser/artifacts/<test>/`` (ignored by git): the ones a test takes at its steps,
and one of every page still open when it ends, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from durable_ai import Hub
from durable_ai.demo import create_app
from durable_ai.events import RunEnd
from durable_ai_nats.testing import NatsServer
from tests.conftest import tasks_all_ended
from tests.integrations.test_starlette import serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TIMEOUT_MS = 15_000  # every wait on a page state
ABLY_KEY = "app1.root:Zk3vQ9pX2mL7wR4tY8uI1oP6aS5dF0gHjKlMnBvCxZq"
BACKENDS = ["memory", "nats", "ably"]
LOOP = pytest.mark.asyncio(loop_scope="module")  # the browser tests run in their module's event loop
module_loop = pytest_asyncio.fixture(loop_scope="module")


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or ``None``."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright (Python) is not installed: `uv sync` installs the dev group"
    if not Path(CHROMIUM).is_file():
        return "chromium is not installed: `apt-get install -y chromium` (Debian's headless Chromium)"
    return None


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend the demo runs on; a test that needs only one parametrizes ``backend_name`` itself."""
    name: str = request.param
    return name


@pytest.fixture
def nats_prefix_url(backend_name: str, request: pytest.FixtureRequest) -> str | None:
    """On NATS, the server's URL with a subject prefix of the test's own (the server starts on first use)."""
    if backend_name != "nats":
        return None
    server: NatsServer = request.getfixturevalue("nats_server")
    return f"{server.url}?prefix=t{secrets.token_hex(4)}"


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def no_leaked_tasks_in_the_module_loop() -> AsyncIterator[None]:
    """Every task a test started in the module's loop must be finished or cancelled when it ends (the shared
    browser's own tasks were there before)."""
    async for _ in tasks_all_ended():
        yield


@module_loop
async def backend_url(backend_name: str, nats_prefix_url: str | None) -> AsyncIterator[str]:
    """The URL ``durable-ai demo --backend`` would be given: memory, NATS (a prefix of the test's own), or the
    Ably emulator (one per test)."""
    if backend_name == "memory":
        yield "memory://"
    elif nats_prefix_url is not None:
        yield nats_prefix_url
    else:
        from durable_ai_ably.testing import AblyEmulator

        async with AblyEmulator({ABLY_KEY: None}, mutable_namespaces={"ai"}) as emulator:
            yield f"ably://?key={ABLY_KEY}&endpoint={emulator.endpoint}&tls=false"


class Gateway:
    """A served demo seen from outside: its base URL, and the gateway's view of a session, as JSON."""

    def __init__(self, base: str, http: httpx.AsyncClient) -> None:
        self.base = base
        self.http = http

    async def view(self, session_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/sessions/{session_id}/view")
        response.raise_for_status()
        view: dict[str, Any] = response.json()
        return view


class Demo(Gateway):
    """The demo app served on loopback by the test, with its hub at hand."""

    def __init__(self, base: str, http: httpx.AsyncClient, hub: Hub) -> None:
        super().__init__(base, http)
        self.hub = hub

    async def send(self, session_id: str, text: str) -> None:
        """Send a message as the demo page does: ``POST /api/chat``, then let go of the response."""
        message = {"id": f"m-{secrets.token_hex(4)}", "role": "user", "parts": [{"type": "text", "text": text}]}
        body = {"id": session_id, "trigger": "submit-message", "messages": [message]}
        async with self.http.stream("POST", "/api/chat", json=body) as response:
            assert response.status_code == 200, await response.aread()

    async def run_ended(self, session_id: str, after: str | None = None) -> None:
        """Wait (with a timeout) for the first answer after ``after`` (from the start: ``None``) to end."""
        async with asyncio.timeout(TIMEOUT_MS / 1000), self.hub.session(session_id).events(after) as events:
            async for event in events:
                if isinstance(event, RunEnd) and event.agent == "assistant":
                    return


StartDemo = Callable[..., Awaitable[Demo]]


def _page(html: str) -> Callable[[Request], Awaitable[Response]]:
    async def serve_page(request: Request) -> Response:
        return HTMLResponse(html)

    return serve_page


@module_loop
async def start_demo(backend_url: str) -> AsyncIterator[StartDemo]:
    """Serve ``create_app(backend_url, tokens_per_second=..., tokens=...)``; stopped when the test ends."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(*, tokens_per_second: float, tokens: int, pages: dict[str, str] | None = None) -> Demo:
            app = create_app(backend_url, tokens_per_second=tokens_per_second, tokens=tokens)
            for path, html in (pages or {}).items():  # more pages of the app's own (same origin as the gateway)
                app.router.routes.insert(0, Route(path, _page(html), methods=["GET"]))
            base = await stack.enter_async_context(serve(app))
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=TIMEOUT_MS / 1000))
            return Demo(base, http, app.state.durable.hub)

        yield start


@dataclass(frozen=True)
class DemoProcess:
    """A ``durable-ai demo`` child process and the base URL it serves."""

    base: str
    process: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def demo_command(*args: str) -> AsyncIterator[DemoProcess]:
    """``durable-ai demo --port 0 ARGS`` in a child process; yields it with its base URL (from uvicorn's log line)
    and stops it (SIGTERM, then waits) at the end, unless it ended already."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "durable_ai.cli",
        "demo",
        "--port",
        "0",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    stderr = process.stderr
    logged: list[bytes] = []
    drain: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(TIMEOUT_MS / 1000):
            while (found := re.search(rb"Uvicorn running on (http://\S+)", line := await stderr.readline())) is None:
                logged.append(line)
                if not line:
                    raise AssertionError(b"durable-ai demo ended before serving:\n" + b"".join(logged))

        async def read_the_rest() -> None:  # so the child never blocks on a full pipe
            while await stderr.readline():
                pass

        drain = asyncio.create_task(read_the_rest(), name="durable-ai demo stderr")
        yield DemoProcess(found.group(1).decode(), process)
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), TIMEOUT_MS / 1000)
        if drain is not None:
            await drain


class Shots:
    """Screenshots of one test, numbered in the order taken, under ``tests/browser/artifacts/<test>/``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.taken = 0

    async def take(self, page: Any, name: str) -> Path:
        self.taken += 1
        path = self.folder / f"{self.taken:02d}-{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Shots:
    folder = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return Shots(folder)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium, headless, for the module's tests."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@module_loop
async def browser_context(browser: Any, start_demo: StartDemo, shots: Shots) -> AsyncIterator[Any]:
    """A browser context of the test's own (its own localStorage). It closes before the demo's server stops (it
    depends on ``start_demo``), after a last screenshot of every page still open."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        yield context
        for n, page in enumerate(context.pages, 1):
            with contextlib.suppress(Exception):
                await shots.take(page, f"end-tab{n}")
    finally:
        await context.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say where the screenshots of this run are, so a CI log points at the artifacts to keep."""
    shots = sorted(ARTIFACTS.rglob("*.png")) if ARTIFACTS.is_dir() else []
    if shots:
        terminalreporter.write_line(f"browser screenshots: {len(shots)} in {ARTIFACTS}")
