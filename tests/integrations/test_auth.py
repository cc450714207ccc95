"""Who may use a session through the web routes: the ``authorize`` hook on every route and WebSocket control,
signed expiring session tokens (forged, expired, other-session and under-scoped tokens refused), and the route that
hands a client its own Ably credential instead of relaying (exchanged at the Ably emulator as ably-js would)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from websockets.asyncio.client import connect as ws_connect

from durable_ai import Event, Hub, Run, RunEnd, TextDelta
from durable_ai.errors import ConfigurationError
from durable_ai.integrations.starlette import Action, DurableAI, SessionTokens
from durable_ai.integrations.vercel import ChatTurn, chat_routes
from durable_ai_ably import client_capability
from durable_ai_ably.testing import AblyEmulator
from tests.integrations.test_starlette import serve

SECRET = "s" * 40
CHAT = "chat-1"
OTHER = "chat-2"
ABLY_SECRET = "Zk3vQ9pX2mL7wR4tY8uI1oP6aS5dF0gHjKlMnBvCxZq"
ABLY_KEY = f"app1.root:{ABLY_SECRET}"


async def answer(run: Run, turn: ChatTurn) -> None:
    await run.text(f"echo {turn.message.content}")


def chat_body(chat: str = CHAT) -> dict[str, Any]:
    message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    return {"id": chat, "messages": [message], "trigger": "submit-message"}


@contextlib.asynccontextmanager
async def app_with(durable: DurableAI) -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(routes=[*chat_routes(durable, answer), *durable.gateway_routes()], lifespan=durable.lifespan)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        yield client


# -- the tokens ----------------------------------------------------------------------------------------------


def test_a_token_allows_its_session_and_actions_until_it_expires() -> None:
    tokens = SessionTokens(SECRET)
    token = tokens.issue(CHAT, actions=["read"], subject="user-7")
    assert tokens.allows(token, CHAT, "read")
    assert not tokens.allows(token, CHAT, "cancel")
    assert not tokens.allows(token, OTHER, "read")
    assert tokens.claims(token)["sub"] == "user-7"  # type: ignore[index]

    now = int(time.time())
    claims = {"iss": "durable-ai", "iat": now - 100, "exp": now - 1, "sid": CHAT, "act": ["read"]}
    expired = jwt.encode(claims, SECRET, algorithm="HS256")
    assert not tokens.allows(expired, CHAT, "read")
    forged = jwt.encode({**claims, "exp": now + 100}, "x" * 40, algorithm="HS256")
    assert not tokens.allows(forged, CHAT, "read")
    unsigned = jwt.encode({**claims, "exp": now + 100}, None, algorithm="none")
    assert not tokens.allows(unsigned, CHAT, "read")
    other_issuer = jwt.encode({**claims, "exp": now + 100, "iss": "someone"}, SECRET, algorithm="HS256")
    assert not tokens.allows(other_issuer, CHAT, "read")
    assert not tokens.allows("not a token", CHAT, "read")


def test_bad_token_settings_are_typed_errors() -> None:
    with pytest.raises(ConfigurationError):
        SessionTokens("short")
    tokens = SessionTokens(SECRET)
    with pytest.raises(ConfigurationError):
        tokens.issue(CHAT, actions=["delete"])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError):
        tokens.issue("not a session id!")


# -- every route asks --------------------------------------------------------------------------------------

ROUTES: list[tuple[str, str, Action]] = [
    ("GET", f"/sessions/{CHAT}/events?follow=false", "read"),
    ("GET", f"/sessions/{CHAT}/view", "read"),
    ("GET", f"/api/chat/{CHAT}/stream", "read"),
    ("GET", f"/api/chat/{CHAT}/messages", "read"),
    ("POST", f"/api/chat/{CHAT}/stop", "cancel"),
    ("POST", "/api/chat", "prompt"),
]


@pytest.mark.parametrize(("method", "path", "action"), ROUTES, ids=[f"{m} {p.split('?')[0]}" for m, p, _ in ROUTES])
async def test_every_route_refuses_without_the_right_token(method: str, path: str, action: Action) -> None:
    tokens = SessionTokens(SECRET)
    durable = DurableAI("memory://", authorize=tokens)
    others: list[Action] = [a for a in ("read", "prompt", "cancel", "steer") if a != action]
    payload = chat_body() if path == "/api/chat" else None
    async with app_with(durable) as client:

        async def call(token: str | None, *, query: bool = False) -> httpx.Response:
            headers = {"authorization": f"Bearer {token}"} if token and not query else {}
            url = path + (("&" if "?" in path else "?") + f"token={token}" if token and query else "")
            return await client.request(method, url, json=payload, headers=headers)

        assert (await call(None)).status_code == 403
        assert (await call(tokens.issue(OTHER))).status_code == 403
        assert (await call(tokens.issue(CHAT, actions=others))).status_code == 403
        refused = await call("garbage")
        assert refused.status_code == 403 and refused.json()["error"] == "PermissionDenied"
        allowed = await call(tokens.issue(CHAT, actions=[action]))
        assert allowed.status_code in (200, 204)
        assert (await call(tokens.issue(CHAT, actions=[action]), query=True)).status_code in (200, 204)
        view = await durable.hub.session(CHAT).view()
    assert [m.role for m in view.messages] == (["user", "assistant"] if action == "prompt" else [])


async def test_the_hook_sees_the_request_session_and_action() -> None:
    asked: list[tuple[str, str, str | None]] = []

    async def authorize(connection: HTTPConnection, session_id: str, action: Action) -> bool:
        asked.append((session_id, action, connection.headers.get("x-user")))
        return connection.headers.get("x-user") == "ada"

    durable = DurableAI("memory://", authorize=authorize)
    async with app_with(durable) as client:
        assert (await client.get(f"/sessions/{CHAT}/view", headers={"x-user": "eve"})).status_code == 403
        assert (await client.get(f"/sessions/{CHAT}/view", headers={"x-user": "ada"})).status_code == 200
    assert asked == [(CHAT, "read", "eve"), (CHAT, "read", "ada")]


async def test_websockets_refuse_without_the_right_token() -> None:
    tokens = SessionTokens(SECRET)
    durable = DurableAI("memory://", authorize=tokens)
    async with app_with(durable) as client:
        ws = str(client.base_url).replace("http://", "ws://")
        async with ws_connect(f"{ws}/sessions/{CHAT}/ws") as socket:  # no token: told, then closed
            error = json.loads(await socket.recv())
            assert error["error"] == "PermissionDenied"
            await socket.wait_closed()
            assert socket.close_code == 1008
        read_only = tokens.issue(CHAT, actions=["read"])
        async with ws_connect(f"{ws}/sessions/{CHAT}/ws?token={read_only}") as socket:
            await socket.send(json.dumps({"type": "cancel", "request": "c1"}))
            frame = json.loads(await socket.recv())
            assert (frame["kind"], frame["request"], frame["error"]) == ("error", "c1", "PermissionDenied")
        async with ws_connect(f"{ws}/api/chat/ws?token={read_only}") as socket:
            send = {"type": "send", "requestId": "r1", "headers": {}, "body": {}, **chat_body()}
            await socket.send(json.dumps(send))
            frame = json.loads(await socket.recv())
            assert (frame["type"], frame["requestId"]) == ("error", "r1")
            assert "not allowed to prompt" in frame["errorText"]
        prompt_only = tokens.issue(CHAT, actions=["prompt"])
        async with ws_connect(f"{ws}/api/chat/ws?token={prompt_only}") as socket:
            resume = {"type": "resume", "requestId": "r2", "id": CHAT, "headers": {}, "body": {}}
            await socket.send(json.dumps(resume))
            frame = json.loads(await socket.recv())
            assert (frame["type"], frame["requestId"]) == ("error", "r2")
            assert "not allowed to read" in frame["errorText"]
        assert (await durable.hub.session(CHAT).view()).messages == []


async def test_a_chat_websocket_abort_without_the_right_to_cancel_only_detaches() -> None:
    tokens = SessionTokens(SECRET)
    gate = asyncio.Event()

    async def slow(run: Run, turn: ChatTurn) -> None:
        await run.text("first ")
        await gate.wait()
        await run.text("rest")

    durable = DurableAI("memory://", authorize=tokens)
    app = Starlette(routes=[*chat_routes(durable, slow), *durable.gateway_routes()], lifespan=durable.lifespan)
    async with serve(app) as base:
        ws = base.replace("http://", "ws://")
        no_cancel = tokens.issue(CHAT, actions=["prompt", "read"])
        async with (
            durable.hub.session(CHAT).events() as events,
            ws_connect(f"{ws}/api/chat/ws?token={no_cancel}") as socket,
        ):
            await socket.send(json.dumps({"type": "send", "requestId": "r1", "headers": {}, "body": {}, **chat_body()}))
            async with asyncio.timeout(10):
                while json.loads(await socket.recv()).get("chunk", {}).get("type") != "text-delta":
                    pass
            await socket.send(json.dumps({"type": "abort", "requestId": "r1"}))
            # Frames are handled in order: once the resume after it is answered, the abort was dealt with.
            await socket.send(json.dumps({"type": "resume", "requestId": "r2", "id": CHAT, "headers": {}, "body": {}}))
            async with asyncio.timeout(10):
                while json.loads(await socket.recv()).get("requestId") != "r2":
                    pass
            gate.set()
            ends = [e async for e in _until_run_end(events)]
    assert (ends[-1].status, "".join(e.delta for e in ends if isinstance(e, TextDelta))) == ("completed", "first rest")


async def _until_run_end(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    async with asyncio.timeout(10):
        async for event in events:
            yield event
            if isinstance(event, RunEnd):
                return


# -- a client's own broker credential ------------------------------------------------------------------------


async def test_no_credential_route_on_a_relayed_backend() -> None:
    async with app_with(DurableAI("memory://")) as client:
        response = await client.get(f"/sessions/{CHAT}/credential")
    assert response.status_code == 404
    assert response.json()["error"] == "NoClientCredentials"


async def test_on_ably_the_client_gets_a_token_request_for_its_session_only() -> None:
    tokens = SessionTokens(SECRET)

    def client_id(connection: HTTPConnection) -> str:
        claims = tokens.claims(SessionTokens.token_of(connection) or "")
        return str(claims["sub"]) if claims else "anonymous"

    async with AblyEmulator({ABLY_KEY: None}, mutable_namespaces={"ai"}) as emulator:
        url = f"ably://?key={ABLY_KEY}&endpoint={emulator.endpoint}&tls=false"
        durable = DurableAI(Hub(url), authorize=tokens, client_id=client_id)
        async with app_with(durable) as client:
            refused = await client.get(f"/sessions/{CHAT}/credential")
            token = tokens.issue(CHAT, actions=["read"], subject="user-7")
            response = await client.get(f"/sessions/{CHAT}/credential", headers={"authorization": f"Bearer {token}"})
            assert response.headers["cache-control"] == "no-store"
            request = response.json()
        exchange = f"http://127.0.0.1:{emulator.port}/keys/{request['keyName']}/requestToken"
        async with httpx.AsyncClient() as http:
            details = (await http.post(exchange, json=request)).json()
    assert refused.status_code == 403
    assert "secret" not in json.dumps(request) and ABLY_SECRET not in json.dumps(request)
    assert details["clientId"] == "user-7"
    assert json.loads(details["capability"]) == client_capability(CHAT)
