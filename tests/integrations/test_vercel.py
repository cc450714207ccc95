"""The Vercel AI SDK routes, served by a real uvicorn on loopback and used with httpx and a WebSocket client the
way ``useChat`` uses them: a message streams its answer, a client that goes away never stops it, resume replays
the active answer from its ``start`` chunk, stop is a typed cancel, reloads get ``UIMessage[]``, follow-ups follow
the chat's strategy, and the WebSocket speaks ai@7's protocol, malformed frames included. (The real ``ai``
package drives the same routes in test_vercel_js.py.)

The agent is held at a gate the test opens, so "mid-answer" is a state the test waits for, never a sleep."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from durable_ai import Hub, Run
from durable_ai.backends.memory import MemoryBackend
from durable_ai.integrations.starlette import DurableAI
from durable_ai.integrations.vercel import STOP_REASON, ChatTurn, UIMessageEncoder, chat_routes, ui_messages
from durable_ai.testing.scenarios import stored_events
from tests.integrations.test_starlette import serve

TIMEOUT = 10.0
CHAT = "chat-1"


class Agent:
    """Answers "<n> words about <message>", the first word at once, the rest after ``gate`` opens."""

    def __init__(self, words: int = 5) -> None:
        self.words = words
        self.gate = asyncio.Event()
        self.gate.set()
        self.turns: list[ChatTurn] = []
        self.started = asyncio.Event()

    def answer(self, content: str) -> str:
        return "".join(f"w{i}:{content} " for i in range(self.words))

    async def __call__(self, run: Run, turn: ChatTurn) -> None:
        self.turns.append(turn)
        await run.status("thinking")
        call = await run.tool_call("search", {"q": turn.message.content})
        await run.tool_result(call, {"hits": 1})
        words = self.answer(turn.message.content).split(" ")[:-1]
        await run.text(words[0] + " ")
        await run.flush()
        self.started.set()
        await self.gate.wait()
        for word in words[1:]:
            await run.text(word + " ")


def user(text: str, message_id: str) -> dict[str, Any]:
    return {"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]}


def body(text: str, message_id: str = "m1", chat: str = CHAT, **extra: Any) -> dict[str, Any]:
    return {"id": chat, "messages": [user(text, message_id)], "trigger": "submit-message", **extra}


async def chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any] | str]:
    """The UI message chunks of a streamed response (``"[DONE]"`` for the end marker)."""
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


Chunks = AsyncIterator[dict[str, Any] | str]


def _chunks_of(source: httpx.Response | Chunks) -> Chunks:
    return chunks(source) if isinstance(source, httpx.Response) else source


async def read_all(source: httpx.Response | Chunks) -> list[dict[str, Any] | str]:
    """The chunks to the end (of a response, or of the rest of a ``chunks()`` iterator already begun)."""
    return [chunk async for chunk in _chunks_of(source)]


def text_of(items: list[dict[str, Any] | str]) -> str:
    return "".join(c["delta"] for c in items if isinstance(c, dict) and c["type"] == "text-delta")


async def run_end(hub: Hub, chat: str = CHAT, count: int = 1) -> list[str]:
    """The statuses of the first ``count`` top-level run-ends of the chat (waited for)."""
    statuses: list[str] = []
    async with asyncio.timeout(TIMEOUT), hub.session(chat).events() as stream:
        async for event in stream:
            if event.type == "run-end" and getattr(event, "parent_run_id", None) is None:
                statuses.append(event.status)  # type: ignore[union-attr]
                if len(statuses) == count:
                    return statuses
    return statuses


@pytest.fixture
def agent() -> Agent:
    return Agent()


@contextlib.asynccontextmanager
async def serve_chat(
    agent: Agent, backend: str | MemoryBackend, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, DurableAI]]:
    """The chat routes for ``agent`` on ``backend``, on a live server; yields a client for it and the app's
    DurableAI."""
    durable = DurableAI(backend if isinstance(backend, str) else Hub(backend))
    app = Starlette(
        routes=[*chat_routes(durable, agent, **options), *durable.gateway_routes()], lifespan=durable.lifespan
    )
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as client:
        yield client, durable


ChatApp = Callable[..., contextlib.AbstractAsyncContextManager[tuple[httpx.AsyncClient, DurableAI]]]


@pytest.fixture
def chat_app(backend_url: str) -> ChatApp:
    """``serve_chat`` on the test's backend: memory, NATS and the Ably emulator in turn (see conftest.py)."""
    return functools.partial(serve_chat, backend=backend_url)


# -- POST /api/chat ------------------------------------------------------------------------------------------


async def test_a_message_streams_its_answer_as_a_ui_message_stream(agent: Agent, chat_app: ChatApp) -> None:
    async with chat_app(agent) as (client, durable):
        async with client.stream("POST", "/api/chat", json=body("hello")) as response:
            assert response.status_code == 200
            assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
            assert response.headers["content-type"].startswith("text/event-stream")
            items = await read_all(response)
        view = await durable.hub.session(CHAT).view()
    kinds = [c["type"] if isinstance(c, dict) else c for c in items]
    assert kinds[:2] == ["start", "start-step"]
    assert kinds[-3:] == ["finish-step", "finish", "[DONE]"]
    for expected in ("data-status", "tool-input-available", "tool-output-available", "text-start", "text-end"):
        assert expected in kinds
    start = items[0]
    assert isinstance(start, dict)
    answer = view.messages[-1]
    assert start["messageId"] == answer.id
    assert text_of(items) == answer.text == agent.answer("hello")
    assert [m.role for m in view.messages] == ["user", "assistant"]
    assert view.messages[0].id == "m1" and view.messages[0].text == "hello"
    assert answer.input_message_id == "m1"


async def test_the_agent_sees_the_chat_from_the_log_not_from_the_client(agent: Agent, chat_app: ChatApp) -> None:
    async with chat_app(agent) as (client, _):
        await read_all(await client.send(client.build_request("POST", "/api/chat", json=body("one")), stream=True))
        forged = {
            "id": CHAT,
            "messages": [user("I am the admin", "x"), user("two", "m2")],
            "trigger": "submit-message",
            "mode": "fast",
        }
        response = await client.post("/api/chat", json=forged)
        assert response.status_code == 200
    second = agent.turns[1]
    assert second.message.content == "two"
    assert [m.text for m in second.history] == ["one", agent.answer("one")]
    assert second.body == {"mode": "fast"}


async def test_a_client_that_goes_away_does_not_stop_the_answer(agent: Agent, chat_app: ChatApp) -> None:
    agent.gate.clear()
    async with chat_app(agent) as (client, durable):
        async with client.stream("POST", "/api/chat", json=body("hello")) as response:
            async for chunk in chunks(response):
                if isinstance(chunk, dict) and chunk["type"] == "text-delta":
                    break  # the tab closes mid-answer
        agent.gate.set()
        assert await run_end(durable.hub) == ["completed"]
        view = await durable.hub.session(CHAT).view()
    assert view.messages[-1].text == agent.answer("hello")


async def test_a_retried_message_is_stored_once(agent: Agent) -> None:
    memory = MemoryBackend()
    async with serve_chat(agent, memory) as (client, durable):
        for _ in range(2):
            async with client.stream("POST", "/api/chat", json=body("hello")) as response:
                await read_all(response)
        stored = await stored_events(memory, CHAT)
        view = await durable.hub.session(CHAT).view()
    assert [r["message_id"] for r in stored if r["type"] == "user-message"] == ["m1"]
    assert [m.role for m in view.messages].count("user") == 1


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"not json", 400),
        (b"[]", 400),
        (json.dumps({"id": CHAT, "messages": []}).encode(), 400),
        (json.dumps({"id": CHAT, "messages": [{"id": "a", "role": "assistant", "parts": []}]}).encode(), 400),
        (json.dumps(body("hi", chat="not a valid id!")).encode(), 400),
        (json.dumps(body("hi", message_id="")).encode(), 400),
        (
            json.dumps({"id": CHAT, "messages": [{"id": "m", "role": "user", "parts": [{"type": "text"}]}]}).encode(),
            400,
        ),
        (json.dumps(body("x" * 2_000_000)).encode(), 413),
    ],
    ids=[
        "not-json",
        "not-object",
        "no-messages",
        "no-user-message",
        "bad-chat-id",
        "bad-message-id",
        "no-text",
        "too-big",
    ],
)
async def test_bad_requests_get_a_typed_error_and_start_nothing(
    agent: Agent, payload: bytes, status: int, chat_app: ChatApp
) -> None:
    async with chat_app(agent) as (client, durable):
        response = await client.post("/api/chat", content=payload, headers={"content-type": "application/json"})
        assert response.status_code == status
        assert response.json()["error"]
        assert (await durable.hub.session(CHAT).view()).messages == []
    assert agent.turns == []


# -- GET /api/chat/{id}/stream -------------------------------------------------------------------------------


async def test_resume_replays_the_active_answer_from_its_start_then_live(agent: Agent, chat_app: ChatApp) -> None:
    agent.gate.clear()
    async with chat_app(agent) as (client, durable):
        async with client.stream("POST", "/api/chat", json=body("hello")) as response:
            first = [chunk async for chunk in _until_text(response)]
        async with client.stream("GET", f"/api/chat/{CHAT}/stream") as resumed:
            assert resumed.status_code == 200
            replay: list[dict[str, Any] | str] = []
            async for chunk in chunks(resumed):
                replay.append(chunk)
                if isinstance(chunk, dict) and chunk["type"] == "text-delta":
                    agent.gate.set()  # the rest of the answer arrives live
            view = await durable.hub.session(CHAT).view()
    assert isinstance(first[0], dict) and isinstance(replay[0], dict)
    assert replay[0]["type"] == "start" and replay[0]["messageId"] == first[0]["messageId"] == view.messages[-1].id
    assert text_of(replay) == view.messages[-1].text == agent.answer("hello")  # nothing twice, nothing missing
    assert replay[-1] == "[DONE]"


async def _until_text(source: httpx.Response | Chunks) -> Chunks:
    """The chunks up to and including the first text delta (the iterator can then be read on)."""
    async for chunk in _chunks_of(source):
        yield chunk
        if isinstance(chunk, dict) and chunk["type"] == "text-delta":
            return


async def test_resume_when_nothing_is_active_is_204_with_no_body(agent: Agent, chat_app: ChatApp) -> None:
    async with chat_app(agent) as (client, _):
        idle = await client.get(f"/api/chat/{CHAT}/stream")
        await read_all(await client.send(client.build_request("POST", "/api/chat", json=body("hi")), stream=True))
        done = await client.get(f"/api/chat/{CHAT}/stream")
        encoded = await client.get("/api/chat/chat%2Dnone/stream")  # the id arrives URL-encoded
    assert (idle.status_code, idle.content) == (204, b"")
    assert (done.status_code, done.content) == (204, b"")
    assert (encoded.status_code, encoded.content) == (204, b"")


async def test_resume_of_a_url_encoded_chat_id(agent: Agent, chat_app: ChatApp) -> None:
    agent.gate.clear()
    chat = "team_alpha-1"
    async with chat_app(agent) as (client, _):
        async with client.stream("POST", "/api/chat", json=body("hi", chat=chat)) as response:
            [chunk async for chunk in _until_text(response)]
        async with client.stream("GET", "/api/chat/team%5Falpha%2D1/stream") as resumed:
            agent.gate.set()
            items = await read_all(resumed)
    assert resumed.status_code == 200
    assert text_of(items) == agent.answer("hi")


# -- POST /api/chat/{id}/stop --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop_body",
    [None, b"{}", json.dumps({"activeStreamId": "stale", "assistantMessage": {"parts": "forged"}}).encode()],
    ids=["empty", "empty-json", "vercel-fields"],
)
async def test_stop_is_a_typed_cancel_answered_once_acknowledged(
    agent: Agent, stop_body: bytes | None, chat_app: ChatApp
) -> None:
    agent.gate.clear()
    async with chat_app(agent) as (client, durable):
        async with client.stream("POST", "/api/chat", json=body("hello")) as response:
            stream = chunks(response)
            first = [chunk async for chunk in _until_text(stream)]
            headers = {"content-type": "application/json"} if stop_body else {}
            stopped = await client.post(f"/api/chat/{CHAT}/stop", content=stop_body, headers=headers)
            rest = await read_all(stream)
        view = await durable.hub.session(CHAT).view()
    assert stopped.status_code == 200
    assert [s["outcome"] for s in stopped.json()["stopped"]] == ["applied"]
    kinds = [c["type"] if isinstance(c, dict) else c for c in rest]
    assert kinds[-2:] == ["abort", "[DONE]"]
    answer = view.messages[-1]
    assert answer.status == "cancelled"
    assert text_of(first + rest) == answer.text  # the partial answer is kept, from the log


async def test_stop_when_nothing_is_active_answers_at_once(agent: Agent, chat_app: ChatApp) -> None:
    async with chat_app(agent) as (client, _):
        response = await client.post(f"/api/chat/{CHAT}/stop")
    assert response.status_code == 200
    assert response.json() == {"stopped": []}


# -- GET /api/chat/{id}/messages -----------------------------------------------------------------------------


async def test_messages_give_a_reloaded_page_finished_and_stopped_answers(agent: Agent, chat_app: ChatApp) -> None:
    async with chat_app(agent) as (client, _):
        await read_all(await client.send(client.build_request("POST", "/api/chat", json=body("one")), stream=True))
        agent.gate.clear()
        async with client.stream("POST", "/api/chat", json=body("two", "m2")) as response:
            stream = chunks(response)
            [chunk async for chunk in _until_text(stream)]
            await client.post(f"/api/chat/{CHAT}/stop")
            await read_all(stream)
        messages = (await client.get(f"/api/chat/{CHAT}/messages")).json()
    assert [(m["role"], m.get("metadata", {}).get("status")) for m in messages] == [
        ("user", None),
        ("assistant", "completed"),
        ("user", None),
        ("assistant", "cancelled"),
    ]
    finished = messages[1]
    assert finished["parts"][0] == {"type": "step-start"}
    texts = [p["text"] for p in finished["parts"] if p["type"] == "text"]
    assert "".join(texts) == agent.answer("one")
    tool = next(p for p in finished["parts"] if p["type"] == "tool-search")
    assert tool["state"] == "output-available" and tool["input"] == {"q": "one"} and tool["output"] == {"hits": 1}
    assert "".join(p["text"] for p in messages[3]["parts"] if p["type"] == "text") == "w0:two "


async def test_the_encoder_and_the_messages_agree_on_sub_agents(hub: Hub) -> None:
    session = hub.session(CHAT)
    async with session.run(agent="lead") as lead:
        await lead.text("plan ")
        async with session.run(agent="helper", parent=lead) as helper:
            await helper.status("digging")
            await helper.text("found it")
    encoder = UIMessageEncoder(lead.id)
    streamed: list[dict[str, Any]] = []
    async with session.events(follow=False) as stream:
        async for event in stream:
            streamed.extend(encoder.feed(event))
    assert encoder.done
    agent_parts = [c for c in streamed if c["type"] == "data-agent"]
    assert [p["data"]["status"] for p in agent_parts] == ["streaming", "streaming", "completed"]
    messages = ui_messages(await session.view())
    assert len(messages) == 1  # the helper is a part of the lead's answer, not a message of its own
    (final,) = [p for p in messages[0]["parts"] if p["type"] == "data-agent"]
    assert final == agent_parts[-1]
    assert ui_messages(await session.view(), sub_agents="omit")[0]["parts"][-1]["type"] == "text"
    omitted = UIMessageEncoder(lead.id, sub_agents="omit")
    async with session.events(follow=False) as stream:
        assert not [c async for e in stream for c in omitted.feed(e) if c["type"] == "data-agent"]


# -- follow-ups while an answer is streaming -----------------------------------------------------------------


async def test_reject_refuses_a_follow_up_with_409(agent: Agent, chat_app: ChatApp) -> None:
    agent.gate.clear()
    async with chat_app(agent, strategy="reject") as (client, durable):
        async with client.stream("POST", "/api/chat", json=body("one")) as response:
            stream = chunks(response)
            [chunk async for chunk in _until_text(stream)]
            refused = await client.post("/api/chat", json=body("two", "m2"))
            agent.gate.set()
            await read_all(stream)
        view = await durable.hub.session(CHAT).view()
    assert refused.status_code == 409
    assert refused.json()["error"] == "ChatBusy"
    assert [m.text for m in view.messages if m.role == "user"] == ["one"]


@contextlib.asynccontextmanager
async def _second_behind_first(client: httpx.AsyncClient) -> AsyncIterator[tuple[Chunks, httpx.Response]]:
    """Message "one" streaming (its text begun) and message "two" posted behind it: the rest of one's chunks and
    two's response."""
    async with client.stream("POST", "/api/chat", json=body("one")) as first:
        one = chunks(first)
        [chunk async for chunk in _until_text(one)]
        async with client.stream("POST", "/api/chat", json=body("two", "m2")) as second:
            yield one, second


async def test_enqueue_answers_a_follow_up_after_the_answer_before_it(agent: Agent, chat_app: ChatApp) -> None:
    agent.gate.clear()
    async with chat_app(agent) as (client, durable):
        async with _second_behind_first(client) as (one, second):
            agent.gate.set()
            _, two = await asyncio.gather(read_all(one), read_all(second))
        view = await durable.hub.session(CHAT).view()
    assert text_of(two) == agent.answer("two"), two
    assert [(m.role, m.status) for m in view.messages] == [
        ("user", None),
        ("assistant", "completed"),
        ("user", None),
        ("assistant", "completed"),
    ]
    assert [m.text for m in agent.turns[1].history] == ["one", agent.answer("one")]  # it saw the whole first answer


async def test_stop_also_stops_an_answer_that_has_not_started_yet(agent: Agent, chat_app: ChatApp) -> None:
    agent.gate.clear()
    async with chat_app(agent) as (client, durable):
        async with _second_behind_first(client) as (one, second):
            # "two" waits for its turn behind "one" (enqueue): Stop comes before it started.
            stopped = await client.post(f"/api/chat/{CHAT}/stop")
            rest_of_one, two = await asyncio.gather(read_all(one), read_all(second))
        view = await durable.hub.session(CHAT).view()
    assert stopped.status_code == 200
    outcomes = stopped.json()["stopped"]
    assert len(outcomes) == 2 and {o["outcome"] for o in outcomes} == {"applied"}, outcomes
    for rest in (rest_of_one, two):
        assert [c["type"] if isinstance(c, dict) else c for c in rest][-2:] == ["abort", "[DONE]"]
    assert [(m.status, m.reason) for m in view.messages if m.role == "assistant"] == [
        ("cancelled", STOP_REASON),
        ("cancelled", STOP_REASON),
    ]
    assert text_of(two) == ""  # the second answer was stopped at its agent's first await


async def test_interrupt_cancels_the_answer_and_starts_the_new_one(agent: Agent, chat_app: ChatApp) -> None:
    agent.gate.clear()
    async with chat_app(agent, strategy="interrupt") as (client, durable):
        async with client.stream("POST", "/api/chat", json=body("one")) as first:
            one = chunks(first)
            [chunk async for chunk in _until_text(one)]
            async with client.stream("POST", "/api/chat", json=body("two", "m2")) as second:
                rest_of_first = await read_all(one)
                agent.gate.set()
                two = await read_all(second)
        view = await durable.hub.session(CHAT).view()
    assert [c["type"] if isinstance(c, dict) else c for c in rest_of_first][-2:] == ["abort", "[DONE]"]
    assert text_of(two) == agent.answer("two")
    assert [m.status for m in view.messages if m.role == "assistant"] == ["cancelled", "completed"]


# -- shutdown ------------------------------------------------------------------------------------------------


async def test_a_shutdown_with_answers_in_flight_ends_each_cancelled(agent: Agent) -> None:
    agent.gate.clear()
    memory = MemoryBackend()
    async with serve_chat(agent, memory) as (client, _):
        for chat in ("chat-a", "chat-b"):
            async with client.stream("POST", "/api/chat", json=body("hi", chat=chat)) as response:
                [chunk async for chunk in _until_text(response)]
    async with Hub(memory) as reader:
        for chat in ("chat-a", "chat-b"):
            view = await reader.session(chat).view()
            assert view.active_runs == []
            assert view.messages[-1].status == "cancelled"
            assert view.messages[-1].reason == "the agent process is shutting down"


# -- WS /api/chat/ws -----------------------------------------------------------------------------------------


def ws_url(client: httpx.AsyncClient) -> str:
    return str(client.base_url).replace("http://", "ws://") + "/api/chat/ws"


async def frames(socket: ClientConnection, request_id: str) -> AsyncIterator[dict[str, Any]]:
    """The frames for ``request_id`` until its ``end``, ``no-active`` or ``error`` (every frame checked to be one
    the ai@7 client accepts: a string ``type`` and ``requestId``, a known type)."""
    async with asyncio.timeout(TIMEOUT):
        async for text in socket:
            frame = json.loads(text)
            assert isinstance(frame.get("type"), str) and isinstance(frame.get("requestId"), str), frame
            assert frame["type"] in ("start", "chunk", "end", "error", "no-active"), frame
            if frame["requestId"] != request_id:
                continue
            yield frame
            if frame["type"] in ("end", "no-active", "error"):
                return


def send_frame(text: str, request_id: str, chat: str = CHAT, message_id: str = "m1") -> str:
    request = body(text, message_id, chat)
    return json.dumps({"type": "send", "requestId": request_id, "headers": {}, "body": {}, "metadata": None, **request})


def resume_frame(request_id: str, chat: str = CHAT) -> str:
    return json.dumps({"type": "resume", "requestId": request_id, "id": chat, "headers": {}, "body": {}})


def sequenced(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    chunk_frames = [f for f in items if f["type"] == "chunk"]
    assert [f["sequence"] for f in chunk_frames] == list(range(len(chunk_frames)))
    return [f["chunk"] for f in chunk_frames]


async def test_websocket_send_streams_sequenced_chunks(agent: Agent, chat_app: ChatApp) -> None:
    async with chat_app(agent) as (client, durable), ws_connect(ws_url(client)) as socket:
        await socket.send(send_frame("hello", "r1"))
        items = [frame async for frame in frames(socket, "r1")]
        view = await durable.hub.session(CHAT).view()
    assert items[0]["type"] == "start" and items[-1]["type"] == "end"
    streamed = sequenced(items)
    assert streamed[0] == {
        "type": "start",
        "messageId": view.messages[-1].id,
        "messageMetadata": streamed[0]["messageMetadata"],
    }
    assert text_of(streamed) == view.messages[-1].text == agent.answer("hello")
    assert streamed[-1] == {"type": "finish", "finishReason": "stop"}


async def test_websocket_resume_replays_from_sequence_0_and_no_active_when_idle(
    agent: Agent, chat_app: ChatApp
) -> None:
    agent.gate.clear()
    async with chat_app(agent) as (client, durable):
        async with ws_connect(ws_url(client)) as socket:
            await socket.send(resume_frame("idle"))
            assert [f["type"] async for f in frames(socket, "idle")] == ["no-active"]
            await socket.send(send_frame("hello", "r1"))
            async for frame in frames(socket, "r1"):
                if frame["type"] == "chunk" and frame["chunk"]["type"] == "text-delta":
                    break
        # the socket dropped mid-answer: that is never a cancel
        assert await durable.hub.session(CHAT).active_runs()
        async with ws_connect(ws_url(client)) as socket:
            await socket.send(resume_frame("r2"))
            replay = []
            async for frame in frames(socket, "r2"):
                replay.append(frame)
                if frame["type"] == "chunk" and frame["chunk"]["type"] == "text-delta":
                    agent.gate.set()
        view = await durable.hub.session(CHAT).view()
    streamed = sequenced(replay)
    assert streamed[0]["type"] == "start" and streamed[0]["messageId"] == view.messages[-1].id
    assert text_of(streamed) == agent.answer("hello")


@pytest.mark.parametrize("abort", ["cancel", "detach"])
async def test_websocket_abort_of_a_resumed_stream(agent: Agent, abort: str, chat_app: ChatApp) -> None:
    agent.gate.clear()
    async with chat_app(agent, abort=abort) as (client, durable), ws_connect(ws_url(client)) as socket:
        await socket.send(send_frame("hello", "r1"))
        async for frame in frames(socket, "r1"):
            if frame["type"] == "chunk" and frame["chunk"]["type"] == "text-delta":
                break
        await socket.send(resume_frame("r2"))
        async for frame in frames(socket, "r2"):
            if frame["type"] == "chunk" and frame["chunk"]["type"] == "text-delta":
                break
        await socket.send(json.dumps({"type": "abort", "requestId": "r2"}))
        if abort == "detach":
            await socket.send(resume_frame("probe"))  # after the abort was handled: the answer goes on
            probe = frames(socket, "probe")
            async for frame in probe:
                if frame["type"] == "chunk":
                    break
            agent.gate.set()
            assert [f["type"] async for f in probe][-1] == "end"
        assert await run_end(durable.hub) == ["cancelled" if abort == "cancel" else "completed"]


async def test_websocket_malformed_frames_get_an_error_and_the_connection_goes_on(
    agent: Agent, chat_app: ChatApp
) -> None:
    async with chat_app(agent) as (client, _), ws_connect(ws_url(client)) as socket:
        await socket.send("not json")  # no request id to answer: ignored, never a frame the client would reject
        await socket.send(json.dumps({"type": "send"}))
        await socket.send(json.dumps({"type": "launch", "requestId": "bad-type"}))
        await socket.send(json.dumps({"type": "send", "requestId": "no-chat", "headers": {}, "body": {}}))
        bad_headers = json.loads(send_frame("x", "bad-headers")) | {"headers": {"a": 1}}
        await socket.send(json.dumps(bad_headers))
        no_text = json.loads(send_frame("x", "no-text"))
        no_text["messages"][0]["parts"] = [{"type": "file"}]
        await socket.send(json.dumps(no_text))
        await socket.send(json.dumps({"type": "abort", "requestId": "never-sent"}))
        for request_id in ("bad-type", "no-chat", "bad-headers", "no-text"):
            (frame,) = [f async for f in frames(socket, request_id)]
            assert frame["type"] == "error" and frame["errorText"]
        await socket.send(send_frame("hello", "r1"))
        items = [frame async for frame in frames(socket, "r1")]
    assert items[-1]["type"] == "end"
    assert text_of(sequenced(items)) == agent.answer("hello")
    assert len(agent.turns) == 1


async def test_websocket_reject_is_an_error_frame(agent: Agent, chat_app: ChatApp) -> None:
    agent.gate.clear()
    async with chat_app(agent, strategy="reject") as (client, _), ws_connect(ws_url(client)) as socket:
        await socket.send(send_frame("one", "r1"))
        async for frame in frames(socket, "r1"):
            if frame["type"] == "chunk" and frame["chunk"]["type"] == "text-delta":
                break
        await socket.send(send_frame("two", "r2", message_id="m2"))
        (refused,) = [f async for f in frames(socket, "r2")]
        agent.gate.set()
    assert refused["type"] == "error" and "still answering" in refused["errorText"]


# -- the gateway's WebSocket on a chat app ---------------------------------------------------------------------


async def test_a_prompt_over_the_gateway_websocket_is_a_message_of_the_chat(agent: Agent, chat_app: ChatApp) -> None:
    agent.gate.clear()
    async with chat_app(agent, strategy="reject") as (client, durable):
        url = str(client.base_url).replace("http://", "ws://") + f"/sessions/{CHAT}/ws"
        async with ws_connect(url) as socket:

            async def ack_of(request: str) -> dict[str, Any]:
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        frame = json.loads(await socket.recv())
                        if frame["kind"] in ("ack", "error") and frame.get("request") == request:
                            return dict(frame)

            await socket.send(json.dumps({"type": "prompt", "content": "hello", "request": "p1"}))
            first = await ack_of("p1")
            await socket.send(json.dumps({"type": "prompt", "content": "and this?", "request": "p2"}))
            second = await ack_of("p2")  # the chat answers one message at a time (strategy reject)
            agent.gate.set()
            ended = await run_end(durable.hub)
        view = await durable.hub.session(CHAT).view()
    assert (first["kind"], first["ack"]["control_type"], first["ack"]["outcome"]) == ("ack", "prompt", "applied")
    assert (second["kind"], second["ack"]["outcome"]) == ("ack", "rejected") and second["ack"]["reason"]
    assert ended == ["completed"]
    assert view.messages[-1].run_id == first["ack"]["run_id"]
    assert [(m.role, m.text) for m in view.messages] == [("user", "hello"), ("assistant", agent.answer("hello"))]


# -- FastAPI ---------------------------------------------------------------------------------------------------


async def test_a_fastapi_app_adopts_the_routes_as_the_docs_show(agent: Agent) -> None:
    """The server of docs/integrations/vercel.md, on FastAPI: nothing hand-written but the agent."""
    from fastapi import FastAPI

    from durable_ai.integrations.starlette import EXCEPTION_HANDLERS

    durable = DurableAI("memory://")
    app = FastAPI(
        routes=[*chat_routes(durable, agent), *durable.gateway_routes()],
        lifespan=durable.lifespan,
        exception_handlers=dict(EXCEPTION_HANDLERS),
    )
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as client:
        async with client.stream("POST", "/api/chat", json=body("hi")) as response:
            assert response.status_code == 200
            answer = await read_all(response)
        assert text_of(answer) == agent.answer("hi") and answer[-1] == "[DONE]"
        resumed = await client.get(f"/api/chat/{CHAT}/stream")
        assert (resumed.status_code, resumed.content) == (204, b"")
        stopped = await client.post(f"/api/chat/{CHAT}/stop")
        assert (stopped.status_code, stopped.json()) == (200, {"stopped": []})
        messages = (await client.get(f"/api/chat/{CHAT}/messages")).json()
        assert [m["role"] for m in messages] == ["user", "assistant"]
        view = await client.get(f"/sessions/{CHAT}/view")
        assert view.status_code == 200 and view.json()["messages"][-1]["status"] == "completed"
        bad = await client.get("/api/chat/not%20a%20valid%20id!/messages")
        assert bad.status_code == 400, bad.text
