"""Nothing a client publishes can stop a session or pose as an agent: undecodable controls and forged presence.

The client holds exactly the token ``issue_client_token`` issues and publishes raw messages to its session's
control channel over Ably's REST API, as any HTTP client could: an ``encoding`` that does not match the data
(``json`` over text that is not JSON, ``base64`` over text that is not base64, an unknown encoding), and data of
a type the encoding does not expect. Afterwards the session must work as before: new runs start, and a cancel
is applied and acknowledged, over both transports.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

import durable_ai
from durable_ai import Run
from durable_ai.errors import ConfigurationError, PermissionDenied
from durable_ai.testing.scenarios import collect, eventually, run_end, text_of
from durable_ai_ably import AblyBackend, AblyOptions, issue_client_token
from durable_ai_ably._common import decode_data
from durable_ai_ably.testing import AblyEmulator

SECRET = "Zk3vQ9pX2mL7wR4tY8uI1oP6aS5dF0gHjKlMnBvCxZq"
KEY = f"app1.root:{SECRET}"
SESSION = "chat-poison"
USER = "user-1"

POISON: list[dict[str, Any]] = [
    {"name": "c", "data": "{not json", "encoding": "json"},
    {"name": "c", "data": "!!! not base64 !!!", "encoding": "base64"},
    {"name": "c", "data": "x", "encoding": "utf-8/cipher+aes-128-cbc/base64"},
    {"name": "c", "data": {"an": "object"}, "encoding": "base64"},
    {"name": "c", "data": "bm90IGpzb24=", "encoding": "json/base64"},
    {"name": "c", "data": 42},
]


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    async with AblyEmulator({KEY: None}) as emu:
        yield emu


async def _poison(emulator: AblyEmulator) -> None:
    """Publish every poisoned control with the client's token, straight to Ably's REST API."""
    request = issue_client_token(SESSION, USER, key=KEY)
    base = f"http://127.0.0.1:{emulator.port}"
    async with httpx.AsyncClient(timeout=10) as http:
        token = await http.post(f"{base}/keys/{request['keyName']}/requestToken", json=request)
        token.raise_for_status()
        auth = {"Authorization": f"Bearer {token.json()['token']}"}
        channel = quote(AblyOptions(key=KEY).channel_name(SESSION, "control"), safe="")
        for message in POISON:
            answer = await http.post(f"{base}/channels/{channel}/messages", json=message, headers=auth)
            assert answer.status_code < 300, answer.text  # the client may publish them: they must be harmless


@pytest.mark.parametrize("transport", ["realtime", "rest"])
async def test_undecodable_controls_do_not_stop_the_session(emulator: AblyEmulator, transport: str) -> None:
    url = f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false&transport={transport}&poll_interval=0.1"
    async with durable_ai.connect(url) as agent, durable_ai.connect(url) as client:
        async with agent.session(SESSION).run(agent="writer") as run:
            await run.text("before")  # the session's control loop is running
        await _poison(emulator)

        async def answer() -> Run:
            async with agent.session(SESSION).run(agent="writer") as live:
                await live.text("after")
                await asyncio.Event().wait()  # until the cancel stops it
            return live

        stream = client.session(SESSION).events(after=None)
        try:
            async with asyncio.timeout(30), asyncio.TaskGroup() as group:
                task = group.create_task(answer())
                seen = await collect(
                    stream, until=lambda e: getattr(e, "type", None) == "text-delta" and e.run_id != run.id
                )
                ack = await (await client.session(SESSION).cancel(seen[-1].run_id, reason="stop")).ack(timeout=15)
                live = await task
                seen += await collect(stream, until=run_end(live.id))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
    assert ack.outcome == "applied" and live.cancelled
    assert text_of(seen) == "beforeafter"


async def test_a_client_cannot_appear_as_an_agent_in_presence(emulator: AblyEmulator) -> None:
    """Presence takes who a member is from its clientId, which the token fixes, never from the member's data."""
    url = f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false"
    request = issue_client_token(SESSION, USER, key=KEY, presence=True)

    async def callback(params: dict[str, Any]) -> dict[str, Any]:
        return request

    client_backend = AblyBackend(AblyOptions(auth_callback=callback, endpoint=emulator.endpoint, tls=False))
    async with (
        durable_ai.connect(url) as agent,
        durable_ai.connect(client_backend) as client,
        agent.session(SESSION).run(agent="writer") as run,
    ):
        members = await eventually(agent.session(SESSION).presence, lambda m: len(m) == 1, "the agent")
        # The client writes an agent's payload under its own clientId, claiming the real run.
        forged = members[0].model_copy(update={"data": "forged"}).model_dump_json().encode()
        await client.backend.enter_presence(SESSION, USER, forged, role="client")
        members = await eventually(agent.session(SESSION).presence, lambda m: len(m) == 2, "the client")
        with pytest.raises(PermissionDenied):  # nor can it enter as an agent
            await client.backend.enter_presence(SESSION, run.id, forged, role="agent")
    assert sorted((m.member_id, m.role, m.run_id) for m in members) == [
        (run.id, "agent", run.id),
        (USER, "client", None),
    ]
    assert next(m for m in members if m.role == "agent").data is None
    with pytest.raises(ConfigurationError, match="reserved"):
        issue_client_token(SESSION, "agent:" + run.id, key=KEY, presence=True)


@pytest.mark.parametrize("message", POISON)
def test_what_history_returns_is_decoded_without_raising(message: dict[str, Any]) -> None:
    """Both transports read REST history through decode_data: data that does not decode comes back as it came."""
    assert isinstance(decode_data(message), bytes)
