"""The Starlette building blocks, served by a real uvicorn on loopback and read with httpx as a client would:
SSE that follows and resumes by ``Last-Event-ID``, heartbeats, a client that goes away mid-stream, agents launched
detached from their request, a shutdown with a run in flight, and errors as HTTP statuses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

import durable_ai
from durable_ai import Hub
from durable_ai.backends.memory import MemoryBackend
from durable_ai.errors import BackendUnavailable, ControlTooLarge, InvalidCursor, InvalidSessionId, PermissionDenied
from durable_ai.events import parse_event
from durable_ai.integrations.starlette import EXCEPTION_HANDLERS, DurableAI, event_source, http_status
from durable_ai.testing.scenarios import collect, compacted, text_of, written_events

TIMEOUT = 10.0


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own signal handlers
        pass


@contextlib.asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[str]:
    """``app`` on a free loopback port, with its lifespan; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("the server stopped while starting")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)
        sock.close()


async def sse(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The SSE frames of a streamed response: ``{"id", "event", "data"}``, or ``{"comment"}``."""
    frame: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line == "":
            if frame:
                yield frame
            frame = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            field, _, value = line.partition(": ")
            frame[field] = json.loads(value) if field == "data" else value


async def write_answer(hub: Hub, session: str, *words: str) -> None:
    async with hub.session(session).run(agent="writer") as run:
        for word in words:
            await run.text(word)
            await hub.flush()


@pytest.fixture
def durable(backend: MemoryBackend) -> DurableAI:
    return DurableAI(durable_ai.connect(backend))


async def test_events_follow_live_and_resume_from_last_event_id(durable: DurableAI, client_hub: Hub) -> None:
    app = Starlette(routes=durable.gateway_routes(), lifespan=durable.lifespan)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        await write_answer(client_hub, "s1", "Hello ", "there")
        frames: list[dict[str, Any]] = []
        async with http.stream("GET", "/sessions/s1/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for frame in sse(response):
                if "data" in frame:
                    frames.append(frame)
                    if frame["event"] == "run-end":
                        break
        assert frames[0]["event"] == "run-start"
        assert all(f["id"] for f in frames)  # every event carries its cursor
        expected = await written_events(client_hub, "s1")
        assert [f["data"]["id"] for f in frames] == [e.id for e in expected]
        assert [f["id"] for f in frames] == [e.cursor for e in expected]
        # A browser reconnects with the last id it saw: exactly the events after it, then live.
        middle = frames[1]["id"]
        resumed: list[dict[str, Any]] = []
        headers = {"Last-Event-ID": middle}
        async with http.stream("GET", "/sessions/s1/events", headers=headers) as response:
            writer = asyncio.create_task(write_answer(client_hub, "s1", "again"))
            async for frame in sse(response):
                if "data" in frame:
                    resumed.append(frame)
                    if frame["event"] == "run-end" and frame["data"]["run_id"] != frames[0]["data"]["run_id"]:
                        break
            await writer
        assert [f["data"]["id"] for f in resumed][: len(frames) - 2] == [f["data"]["id"] for f in frames[2:]]
        assert text_of(await collect(client_hub.session("s1").events(follow=False))).endswith("again")
        # ?after= does the same without the header, and follow=false stops at the log's end (a catch-up read: the
        # finished run may come from the snapshot, its deltas merged; the same text and events, in order).
        answer = await http.get("/sessions/s1/events", params={"after": middle, "follow": "false"})
        records = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: ")]
        assert compacted(records) == compacted([f["data"] for f in resumed])


async def test_events_from_a_cursor_of_a_log_that_is_gone_start_with_a_reset(
    durable: DurableAI, client_hub: Hub
) -> None:
    app = Starlette(routes=durable.gateway_routes(), lifespan=durable.lifespan)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        await write_answer(client_hub, "s2", "Hello ", "there")
        stale = "deadbeef0000:5:0"  # a cursor of a log this session no longer has (another epoch)
        answer = await http.get("/sessions/s2/events", params={"after": stale, "follow": "false"})
        frames = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: ")]
        assert answer.status_code == 200
        assert frames[0]["type"] == "reset" and frames[0]["reason"], frames[0]
        assert text_of([parse_event(f) for f in frames[1:]]) == "Hello there"  # then the log from its start


async def test_a_quiet_stream_sends_heartbeats(durable: DurableAI) -> None:
    async def quiet(request: Request) -> Response:
        return event_source(durable.hub.session("quiet").events(), heartbeat=0.05)

    app = Starlette(routes=[Route("/quiet", quiet)], lifespan=durable.lifespan)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        async with http.stream("GET", "/quiet") as response:
            comments = []
            async for frame in sse(response):
                comments.append(frame.get("comment"))
                if comments.count("heartbeat") >= 2:
                    break
        assert comments[0] == "stream"


async def test_bad_cursors_and_ids_are_400_with_a_clear_error(durable: DurableAI) -> None:
    app = Starlette(routes=durable.gateway_routes(), lifespan=durable.lifespan)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        answer = await http.get("/sessions/s1/events", headers={"Last-Event-ID": "not a cursor"})
        assert answer.status_code == 400
        assert answer.json()["error"] == "InvalidCursor"
        answer = await http.get("/sessions/" + "x" * 300 + "/view")
        assert answer.status_code == 400
        assert answer.json()["error"] == "InvalidSessionId"


async def test_a_client_that_goes_away_leaves_nothing_running_and_the_agent_goes_on(
    durable: DurableAI, client_hub: Hub
) -> None:
    """The request that launched the agent ends (its client disconnects mid-stream); the agent is not stopped,
    and the stream's reader is closed in its own task (no "aclose(): asynchronous generator is already
    running")."""
    release = asyncio.Event()
    launched: list[asyncio.Task[Any]] = []

    async def agent(session: str) -> None:
        async with durable.hub.session(session).run(agent="writer") as run:
            await run.text("first ")
            await release.wait()
            await run.text("second")

    async def chat(request: Request) -> Response:
        session = request.path_params["session"]
        launched.append(durable.launch(agent(session), name=f"agent {session}"))
        return event_source(durable.hub.session(session).events())

    app = Starlette(routes=[Route("/chat/{session}", chat, methods=["POST"])], lifespan=durable.lifespan)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        async with http.stream("POST", "/chat/s2") as response:
            async for frame in sse(response):
                if frame.get("event") == "text-delta":
                    break  # the client goes away mid-answer
        release.set()
        await asyncio.wait_for(launched[0], TIMEOUT)
        events = await collect(client_hub.session("s2").events(follow=False))
        assert text_of(events) == "first second"
        assert events[-1].type == "run-end" and getattr(events[-1], "status", None) == "completed"


async def test_shutdown_ends_every_launched_run_cancelled_with_the_reason(durable: DurableAI, client_hub: Hub) -> None:
    started = asyncio.Event()

    async def agent() -> None:
        async with durable.hub.session("s3").run(agent="writer") as run:
            await run.text("working")
            started.set()
            await asyncio.sleep(60)

    async def start(request: Request) -> Response:
        durable.launch(agent())
        return JSONResponse({"started": True})

    app = Starlette(routes=[Route("/start", start, methods=["POST"])], lifespan=durable.lifespan)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        assert (await http.post("/start")).status_code == 200
        await asyncio.wait_for(started.wait(), TIMEOUT)
    events = await collect(client_hub.session("s3").events(follow=False))
    end = events[-1]
    assert end.type == "run-end"
    assert getattr(end, "status", None) == "cancelled"
    assert getattr(end, "reason", None) == "the agent process is shutting down"
    with pytest.raises(durable_ai.errors.HubClosed):
        durable.launch(agent())


def test_errors_map_to_http_statuses() -> None:
    assert http_status(InvalidCursor("x", "bad")) == 400
    assert http_status(InvalidSessionId("x" * 300, "too long")) == 400
    assert http_status(PermissionDenied("no")) == 403
    assert http_status(ControlTooLarge(10, 5)) == 413
    assert http_status(BackendUnavailable("down")) == 503
    assert http_status(RuntimeError("bug")) == 500
    assert EXCEPTION_HANDLERS


async def test_the_websocket_carries_events_down_and_controls_up(durable: DurableAI, client_hub: Hub) -> None:
    working = asyncio.Event()

    async def agent() -> None:
        async with durable.hub.session("ws1").run(agent="writer") as run:
            await run.text("partial ")
            await durable.hub.flush()
            working.set()
            async for steer in run.steering():
                await run.text(f"steered: {steer.text} ")

    async def start(request: Request) -> Response:
        durable.launch(agent())
        return JSONResponse({"started": True})

    routes = [*durable.gateway_routes(), Route("/start", start, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=durable.lifespan)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        assert (await http.post("/start")).status_code == 200
        await asyncio.wait_for(working.wait(), TIMEOUT)
        url = base.replace("http://", "ws://") + "/sessions/ws1/ws"
        async with ws_connect(url) as socket:
            pending: list[dict[str, Any]] = []  # frames received but not looked at yet, in order

            async def next_frame(kind: str) -> dict[str, Any]:
                for index, frame in enumerate(pending):
                    if frame["kind"] == kind:
                        return pending.pop(index)
                while True:
                    frame = json.loads(await asyncio.wait_for(socket.recv(), TIMEOUT))
                    if frame["kind"] == kind:
                        return dict(frame)
                    pending.append(frame)

            first = await next_frame("event")
            assert first["event"]["type"] == "run-start" and first["cursor"]
            # Malformed frames are answered, and the connection goes on.
            await socket.send("not json")
            assert (await next_frame("error"))["error"] == "MalformedFrame"
            await socket.send(json.dumps({"type": "launch-missiles", "request": "r0"}))
            error = await next_frame("error")
            assert (error["request"], error["error"]) == ("r0", "MalformedFrame")
            await socket.send(json.dumps({"type": "steer", "text": "use TypeScript", "request": "r1", "extra": 1}))
            assert (await next_frame("error"))["request"] == "r1"
            await socket.send(json.dumps({"type": "steer", "text": "use TypeScript", "request": "r2"}))
            ack = await next_frame("ack")
            assert (ack["request"], ack["ack"]["outcome"]) == ("r2", "applied")
            await socket.send(json.dumps({"type": "cancel", "reason": "user pressed stop", "request": "r3"}))
            ack = await next_frame("ack")
            assert (ack["request"], ack["ack"]["control_type"], ack["ack"]["outcome"]) == ("r3", "cancel", "applied")
            while True:
                event = (await next_frame("event"))["event"]
                if event["type"] == "run-end":
                    break
            assert (event["status"], event["reason"]) == ("cancelled", "user pressed stop")
        events = await collect(client_hub.session("ws1").events(follow=False))
        assert text_of(events) == "partial steered: use TypeScript "
        # A bad cursor: the client is told why, and the socket closes with 1008.
        async with ws_connect(url + "?after=nonsense") as socket:
            refused = json.loads(await asyncio.wait_for(socket.recv(), TIMEOUT))
            assert (refused["kind"], refused["error"]) == ("error", "InvalidCursor")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), TIMEOUT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        # From a cursor: exactly the events after it, each with its cursor.
        written = await written_events(client_hub, "ws1")
        async with ws_connect(f"{url}?after={written[1].cursor}") as socket:
            resumed = []
            while len(resumed) < len(written) - 2:
                frame = json.loads(await asyncio.wait_for(socket.recv(), TIMEOUT))
                assert frame["kind"] == "event", frame
                resumed.append(frame)
        assert [f["event"]["id"] for f in resumed] == [e.id for e in written[2:]]
        assert [f["cursor"] for f in resumed] == [e.cursor for e in written[2:]]
