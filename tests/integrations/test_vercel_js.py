"""The chat routes with the real Vercel AI SDK in Node (tests/js/vercel_chat.mjs; `npm ci` in tests/js): ai@6's and
ai@7's ``DefaultChatTransport`` and ai@7's ``WebSocketChatTransport``, used as ``useChat`` uses them and read
through ``readUIMessageStream``, against the demo app (``durable_ai.demo.create_app``) served by uvicorn, on the
memory, NATS and Ably (emulator) backends.

A stream dropped mid-answer, abruptly (a TCP reset in a loopback proxy between the SDK and the server) or cleanly
(the request's AbortSignal, the reader cancelled, the WebSocket closed), never stops the answer, and
``reconnectToStream`` resumes it from its original ``start`` chunk (same ``messageId``) to the end: the SDK's
message is the server's answer, whole and once, as a reloaded page gets it from ``GET {api}/{id}/messages``. The
stop route cancels the answer and ends the SDK's stream with ``abort``; an ``abort`` of a resumed WebSocket request
cancels it too; with nothing active ``reconnectToStream`` resolves ``null`` (204 on HTTP, ``no-active`` on the
WebSocket). Every wait is for something the SDK or the server reported, with a timeout. Skipped only when ``node`` or
``tests/js/node_modules/ai6``, ``ai7`` or ``ws`` is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal
from uuid import uuid4

import httpx
import pytest

from durable_ai.demo import create_app
from durable_ai.events import RunEnd
from durable_ai.integrations.starlette import DurableAI
from durable_ai.integrations.vercel import ABORT_REASON, STOP_REASON
from durable_ai.view import Message
from tests.ably import node
from tests.ably.node import JS_DIR, Record, skip_without_js
from tests.integrations.test_starlette import serve
from tests.nats.proxy import TcpProxy

skip_without_js("ai6", "ai7", "ws")

TIMEOUT = 20.0
SCRIPT = JS_DIR / "vercel_chat.mjs"
# An answer of about 0.7 s (3 reasoning and search steps, then 60 words at 100 a second): long enough to drop and
# resume it well before its end, short enough to read to the end quickly.
TOKENS_PER_SECOND = 100.0
TOKENS = 60
QUESTION = "How does a dropped stream resume?"

Transport = Literal["http", "ws"]
CLIENTS = pytest.mark.parametrize(
    ("sdk", "transport"), [("ai6", "http"), ("ai7", "http"), ("ai7", "ws")], ids=["ai6-http", "ai7-http", "ai7-ws"]
)


class VercelClient(node.NodeClient):
    """vercel_chat.mjs: what the SDK gave it for each request (``req``), as it reported it."""

    def of(self, req: str | None, kind: str) -> list[Record]:
        """The records of ``kind`` about request ``req`` (of any request with ``None``)."""
        return [r for r in self.records if r["kind"] == kind and req in (None, r.get("req"))]

    def chunks(self, req: str) -> list[Record]:
        """The UI message chunks of request ``req``, as the transport's stream yielded them."""
        return [r["chunk"] for r in self.of(req, "chunk")]

    def message(self, req: str) -> Record:
        """The UIMessage ``readUIMessageStream`` assembled from request ``req``, as of its last update."""
        messages = self.of(req, "message")
        assert messages, f"no message assembled from {req}"
        message: Record = messages[-1]["message"]
        return message

    def errors(self, req: str) -> list[Record]:
        return self.of(req, "error")

    async def chunk(self, req: str, kind: str) -> Record:
        """The first chunk of type ``kind`` of request ``req`` (waited for; an end of its stream before it fails)."""
        record = await self.wait(
            lambda r: (
                r.get("req") == req and (r["kind"] == "end" or (r["kind"] == "chunk" and r["chunk"]["type"] == kind))
            ),
            f"{kind} chunk of {req}",
        )
        if record["kind"] == "end":
            raise AssertionError(f"{req} ended ({record['outcome']}) before a {kind} chunk: {self.errors(req)}")
        chunk: Record = record["chunk"]
        return chunk

    async def end(self, req: str) -> str:
        """How the stream of request ``req`` ended: done, error or cancelled (waited for)."""
        record = await self.wait(lambda r: r["kind"] == "end" and r["req"] == req, f"the end of {req}")
        outcome: str = record["outcome"]
        return outcome


@dataclass
class Chat:
    """One chat of the SDK client with the demo app, the client's connections going through ``proxy``."""

    client: VercelClient
    durable: DurableAI
    http: httpx.AsyncClient  # straight to the app, as a reloaded page would read it
    proxy: TcpProxy
    transport: Transport
    id: str

    @property
    def api(self) -> str:
        """DefaultChatTransport's ``api``, through the proxy (also where stop is posted)."""
        return f"http://127.0.0.1:{self.proxy.port}/api/chat"

    @property
    def url(self) -> str:
        """Where the transport connects: ``api``, or the WebSocket route for the WebSocket transport."""
        return f"ws://127.0.0.1:{self.proxy.port}/api/chat/ws" if self.transport == "ws" else self.api

    async def command(self, cmd: str, req: str | None = None, **fields: Any) -> Record:
        """Send a command to the harness; its answer must be ok."""
        command: Record = {"cmd": cmd, "transport": self.transport, "url": self.url, "chat": self.id, **fields}
        if req is not None:
            command["req"] = req
        result = await self.client.send(command)
        assert result["ok"], result
        return result

    async def send(self, req: str, text: str) -> Record:
        return await self.command("send", req, text=text)

    async def resume(self, req: str) -> bool:
        """``reconnectToStream``: whether it gave a stream (false: it resolved null)."""
        stream: bool = (await self.command("resume", req))["stream"]
        return stream

    async def drop(self, req: str, how: str) -> None:
        """Lose the stream of ``req``: a TCP reset of every connection, or as the client lets go of it."""
        if how == "reset":
            self.proxy.sever()
        elif how == "close":
            await self.command("close")
        else:
            await self.command(how, req)  # abort (the AbortSignal) or cancel (the reader)

    async def view(self) -> tuple[Message, list[str]]:
        """The chat's last message and the runs still active, as the server's log has them."""
        view = await self.durable.hub.session(self.id).view()
        return view.messages[-1], [info.run_id for info in view.active_runs]

    async def reloaded(self) -> Record:
        """The last UIMessage of ``GET {api}/{id}/messages``: what a reloaded page shows."""
        response = await self.http.get(f"/api/chat/{self.id}/messages")
        assert response.status_code == 200, response.text
        message: Record = response.json()[-1]
        return message

    async def run_end(self, run_id: str) -> RunEnd:
        """The run-end of ``run_id`` in the chat's log (waited for)."""
        async with asyncio.timeout(TIMEOUT), self.durable.hub.session(self.id).events() as events:
            async for event in events:
                if isinstance(event, RunEnd) and event.run_id == run_id:
                    return event
        raise AssertionError(f"the log ended without the run-end of {run_id}")


@pytest.fixture
async def client(sdk: str) -> AsyncIterator[VercelClient]:
    """The harness for ``sdk`` in node, started first: it imports the SDK while the backend and the app start."""
    process = await node.start_node(SCRIPT, ["--sdk", sdk, "--timeout", str(int(TIMEOUT * 1000) * 3)])
    client = VercelClient(process, f"{SCRIPT.name} --sdk {sdk}", TIMEOUT)
    try:
        yield client
    finally:
        await client.kill()


@pytest.fixture
def chunks() -> str:
    """The app's chunk set (``chunks=`` of the chat routes); a test parametrizes it to use another."""
    return "common"


@pytest.fixture
async def chat(
    client: VercelClient, backend_url: str, sdk: str, transport: Transport, chunks: str
) -> AsyncIterator[Chat]:
    """The demo app on ``backend_url`` on a live server, and the SDK client (``sdk``, ``transport``) for a new chat."""
    app = create_app(backend_url, tokens_per_second=TOKENS_PER_SECOND, tokens=TOKENS, chunks=chunks)
    async with contextlib.AsyncExitStack() as stack:
        base = await stack.enter_async_context(serve(app))
        port = int(base.rsplit(":", 1)[1])
        proxy = await stack.enter_async_context(TcpProxy("127.0.0.1", port))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=TIMEOUT))
        assert (await client.until("ready"))["sdk"] == sdk
        yield Chat(client, app.state.durable, http, proxy, transport, f"chat-{uuid4().hex[:12]}")
        assert await client.exit() == 0, await client.failure()
        assert client.of(None, "unhandled") == []


def text_of(message: Record) -> str:
    return "".join(part["text"] for part in message["parts"] if part["type"] == "text")


def shown(message: Record) -> list[tuple[Any, ...]]:
    """What a page renders of a UIMessage: each part's type and state with its text, or its tool call."""
    out: list[tuple[Any, ...]] = []
    for part in message["parts"]:
        if part["type"] in ("text", "reasoning"):
            out.append((part["type"], part["state"], part["text"]))
        elif part["type"].startswith("tool-"):
            out.append((part["type"], part["state"], part["toolCallId"], part["input"], part.get("output")))
        else:
            out.append((part["type"],))
    return out


def text_deltas(chunks: list[Record]) -> str:
    return "".join(chunk["delta"] for chunk in chunks if chunk["type"] == "text-delta")


# ------------------------------------------------------------------------------------------- drop and resume


@pytest.mark.parametrize(
    ("sdk", "transport", "how"),
    [
        ("ai6", "http", "reset"),
        ("ai6", "http", "abort"),
        ("ai7", "http", "reset"),
        ("ai7", "http", "cancel"),
        ("ai7", "ws", "reset"),
        ("ai7", "ws", "close"),
    ],
    ids=["ai6-http-reset", "ai6-http-abort", "ai7-http-reset", "ai7-http-cancel", "ai7-ws-reset", "ai7-ws-close"],
)
async def test_a_dropped_stream_is_resumed_from_its_start_and_read_to_the_end(chat: Chat, how: str) -> None:
    """Send, read until text arrived, lose the stream (a TCP reset; or cleanly: the request's AbortSignal, the
    reader cancelled, the WebSocket closed); reconnectToStream gives the answer from its original start chunk, live
    to its finish: the SDK's message is the server's answer (whole, each word once, as a reload shows it), and the
    dropped stream did not stop it."""
    await chat.send("first", QUESTION)
    start = await chat.client.chunk("first", "start")
    await chat.client.chunk("first", "text-delta")
    await chat.drop("first", how)
    assert await chat.client.end("first") == ("cancelled" if how == "cancel" else "error")
    dropped = chat.client.chunks("first")
    assert "finish" not in [c["type"] for c in dropped], "the stream was dropped after its end"

    assert await chat.resume("again"), "reconnectToStream found nothing to resume"
    assert await chat.client.end("again") == "done"
    assert chat.client.errors("again") == []
    resumed = chat.client.chunks("again")
    assert resumed[0] == start  # the original start chunk: same messageId, same run
    assert [c["type"] for c in resumed[-3:]] == ["message-metadata", "finish-step", "finish"]
    message = chat.client.message("again")

    answer, active = await chat.view()
    assert (answer.status, active) == ("completed", [])
    assert message["id"] == answer.id == start["messageId"]
    assert text_of(message) == text_deltas(resumed) == answer.text
    assert answer.text.startswith(text_deltas(dropped)) and len(text_deltas(dropped)) < len(answer.text)
    assert message["metadata"] == {"runId": answer.run_id, "agent": "assistant", "status": "completed"}
    reloaded = await chat.reloaded()
    assert (reloaded["id"], reloaded["metadata"]) == (message["id"], message["metadata"])
    assert shown(message) == shown(reloaded)
    assert [p["type"] for p in message["parts"]] == ["step-start", "reasoning", "tool-search", "text"]


# ------------------------------------------------------------------------------------------------------ stop


@CLIENTS
async def test_stop_through_the_route_cancels_the_answer_and_leaves_nothing_to_resume(chat: Chat) -> None:
    """POST {api}/{id}/stop while the answer streams, as a stop button does: the run ends cancelled, the SDK's stream
    ends with abort, and its message is the server's partial answer. With nothing active, before the message and
    after the stop, reconnectToStream resolves null (HTTP 204, the WebSocket's no-active) with no error."""
    assert not await chat.resume("before"), "reconnectToStream gave a stream with nothing active"
    await chat.send("first", QUESTION)
    start = await chat.client.chunk("first", "start")
    await chat.client.chunk("first", "text-delta")
    stopped = await chat.client.send({"cmd": "stop", "url": chat.api, "chat": chat.id})
    run_id = start["messageMetadata"]["runId"]
    assert (stopped["status"], stopped["body"]) == (
        200,
        {"stopped": [{"runId": run_id, "outcome": "applied", "reason": None}]},
    )

    assert await chat.client.end("first") == "done"
    assert chat.client.errors("first") == []
    chunks = chat.client.chunks("first")
    assert chunks[-1] == {"type": "abort", "reason": STOP_REASON}
    assert "finish" not in [c["type"] for c in chunks]
    answer, active = await chat.view()
    assert (answer.run_id, answer.status, answer.reason, active) == (run_id, "cancelled", STOP_REASON, [])
    message = chat.client.message("first")
    assert text_of(message) == answer.text != ""
    assert message["metadata"]["status"] == "cancelled"
    assert shown(message) == shown(await chat.reloaded())
    assert not await chat.resume("after"), "reconnectToStream gave a stream after the stop"
    assert chat.client.errors("before") == chat.client.errors("after") == []


# -------------------------------------------------------------------------------------- abort after a resume


@pytest.mark.parametrize(("sdk", "transport"), [("ai7", "ws")], ids=["ai7-ws"])
async def test_an_abort_of_a_resumed_websocket_request_cancels_the_answer(chat: Chat) -> None:
    """The WebSocket is lost mid-answer (a TCP reset), the answer is resumed on a new one, then the resumed request's
    signal is aborted: the transport sends abort for it, and the server cancels the run it was reading."""
    await chat.send("first", QUESTION)
    start = await chat.client.chunk("first", "start")
    await chat.client.chunk("first", "text-delta")
    await chat.drop("first", "reset")
    assert await chat.client.end("first") == "error"

    assert await chat.resume("again"), "reconnectToStream found nothing to resume"
    assert await chat.client.chunk("again", "start") == start
    await chat.client.chunk("again", "text-delta")
    await chat.command("abort", "again")
    end = await chat.run_end(start["messageMetadata"]["runId"])
    assert (end.status, end.reason) == ("cancelled", ABORT_REASON)
    assert await chat.client.end("again") == "done"
    assert chat.client.errors("again") == []
    answer, active = await chat.view()
    assert (answer.status, active) == ("cancelled", [])
    assert answer.text.startswith(text_deltas(chat.client.chunks("again")))


# ------------------------------------------------------------------------------------------- chunk sets


@pytest.mark.parametrize(
    ("sdk", "transport", "chunks", "backend_name"),
    [("ai7", "http", "ai7", "memory"), ("ai6", "http", "common", "memory"), ("ai7", "http", "common", "memory")],
    ids=["ai7-opted-in", "ai6-common", "ai7-common"],
)
async def test_a_steer_is_a_steering_message_only_for_an_app_that_opts_into_ai7_chunks(chat: Chat, chunks: str) -> None:
    await chat.send("r1", "Tell me about durable sessions.")
    await chat.client.chunk("r1", "text-delta")
    _, active = await chat.view()
    steer = await chat.durable.hub.session(chat.id).steer("actually, use TypeScript", run_id=active[0])
    assert (await steer.ack()).outcome == "applied"
    assert await chat.client.end("r1") == "done"
    assert chat.client.errors("r1") == []  # every chunk passed the SDK's validation
    types = [chunk["type"] for chunk in chat.client.chunks("r1")]
    parts = [part["type"] for part in chat.client.message("r1")["parts"]]
    if chunks == "ai7":
        assert types.count("steering-message") == 1 and "steering-message" in parts
        (steering,) = [c for c in chat.client.chunks("r1") if c["type"] == "steering-message"]
        assert steering["parts"] == [{"type": "text", "text": "actually, use TypeScript"}]
    else:
        assert "steering-message" not in types and "steering-message" not in parts
