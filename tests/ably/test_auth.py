"""Client credentials confined to one session: capabilities, TokenRequests and JWTs, over the emulator and the SDK."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import jwt
import pytest
from ably import AblyRealtime, AblyRest
from ably.types.connectionstate import ConnectionState
from ably.util.exceptions import AblyException

import durable_ai
from durable_ai import Hub
from durable_ai.errors import ConfigurationError, InvalidSessionId, PermissionDenied
from durable_ai_ably import (
    AblyBackend,
    AblyOptions,
    client_capability,
    issue_client_jwt,
    issue_client_token,
    options_from_url,
)
from durable_ai_ably.testing import AblyEmulator
from tests.ably.client_checks import (
    check_client_cannot_use_another_session,
    check_client_cannot_write_events,
    check_client_reads_and_cancels,
    write_answers,
)

TIMEOUT = 10.0
SECRET = "Zk3vQ9pX2mL7wR4tY8uI1oP6aS5dF0gHjKlMnBvCxZq"  # as long as Ably's (HS256 wants 32 bytes or more)
KEY = f"app1.root:{SECRET}"
KEY_NAME = "app1.root"
SESSION = "chat-1"
OTHER = "chat-2"
USER = "user-1"
CREDENTIALS = ["token-request", "jwt"]

AuthCallback = Callable[[dict[str, Any]], Awaitable[str | dict[str, Any]]]


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    async with AblyEmulator({KEY: None}) as emu:
        yield emu


def auth_callback(kind: str, session: str = SESSION, *, presence: bool = False) -> AuthCallback:
    """What a browser's ``authCallback`` does: fetch a fresh credential from the application's server."""

    async def callback(token_params: dict[str, Any]) -> str | dict[str, Any]:
        if kind == "jwt":
            return issue_client_jwt(session, USER, key=KEY, presence=presence)
        return issue_client_token(session, USER, key=KEY, presence=presence)

    return callback


def client_options(emulator: AblyEmulator, callback: AuthCallback) -> dict[str, Any]:
    """ably-python options that reach the emulator with a client credential (no key)."""
    options = emulator.client_options()
    del options["key"], options["use_token_auth"]
    return {**options, "auth_callback": callback}


async def refusal(action: Awaitable[Any]) -> AblyException:
    with pytest.raises(AblyException) as caught:
        await asyncio.wait_for(action, TIMEOUT)
    return caught.value


# -- what is issued ----------------------------------------------------------------------------------------------


def test_capability_is_one_session_read_and_its_controls() -> None:
    assert client_capability(SESSION) == {
        "ai:chat-1": ["history", "subscribe"],
        "ai:chat-1:control": ["publish"],
        "ai:chat-1:meta": ["history", "subscribe"],
        "ai:chat-1:snapshot": ["history", "subscribe"],
        "ai:chat-1:presence": ["history", "subscribe"],
    }
    assert client_capability("s", namespace="chat", presence=True) == {
        "chat:s": ["history", "presence", "subscribe"],
        "chat:s:control": ["publish"],
        "chat:s:meta": ["history", "subscribe"],
        "chat:s:snapshot": ["history", "subscribe"],
        "chat:s:presence": ["history", "subscribe"],
    }
    names = client_capability(SESSION)
    options = AblyOptions(key=KEY)
    assert set(names) == {
        options.channel_name(SESSION, kind) for kind in ("events", "control", "meta", "snapshot", "presence")
    }


def test_token_request_is_signed_with_the_key() -> None:
    before = int(time.time() * 1000)
    request = issue_client_token(SESSION, USER, 90, key=KEY)
    after = int(time.time() * 1000)
    assert set(request) == {"keyName", "ttl", "capability", "clientId", "timestamp", "nonce", "mac"}
    assert request["keyName"] == KEY_NAME
    assert request["ttl"] == 90_000
    assert request["clientId"] == USER
    assert before <= request["timestamp"] <= after
    assert len(request["nonce"]) >= 16
    assert request["nonce"] != issue_client_token(SESSION, USER, 90, key=KEY)["nonce"]
    # The capability is canonical JSON: sorted, no white space.
    assert request["capability"] == json.dumps(client_capability(SESSION), sort_keys=True, separators=(",", ":"))
    assert " " not in request["capability"]
    text = "".join(f"{request[f]}\n" for f in ("keyName", "ttl", "capability", "clientId", "timestamp", "nonce"))
    mac = hmac.new(SECRET.encode(), text.encode(), hashlib.sha256).digest()
    assert request["mac"] == base64.b64encode(mac).decode()


def test_jwt_is_signed_with_the_key() -> None:
    token = issue_client_jwt(SESSION, USER, 600, key=KEY, presence=True)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    assert header["kid"] == KEY_NAME
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 600
    assert abs(claims["iat"] - time.time()) < 5
    assert claims["x-ably-clientId"] == USER
    assert json.loads(claims["x-ably-capability"]) == client_capability(SESSION, presence=True)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, SECRET[::-1], algorithms=["HS256"])


def test_key_and_namespace_from_options() -> None:
    options = AblyOptions(key=KEY, namespace="chat")
    request = issue_client_token(SESSION, USER, key=options)
    assert request["keyName"] == KEY_NAME
    assert set(json.loads(request["capability"])) == set(client_capability(SESSION, namespace="chat"))
    claims = jwt.decode(issue_client_jwt(SESSION, USER, key=options, namespace="other"), SECRET, algorithms=["HS256"])
    assert set(json.loads(claims["x-ably-capability"])) == set(client_capability(SESSION, namespace="other"))
    with pytest.raises(ConfigurationError):
        issue_client_token(SESSION, USER, key=AblyOptions(token="a-client-token"))


@pytest.mark.parametrize("issue", [issue_client_token, issue_client_jwt])
def test_invalid_arguments_raise_typed_errors(issue: Callable[..., Any]) -> None:
    for bad_session in ("", "a:b", "a*", "has space", "x" * 129):
        with pytest.raises(InvalidSessionId):
            issue(bad_session, USER, key=KEY)
        with pytest.raises(InvalidSessionId):
            client_capability(bad_session)
    for bad_ttl in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigurationError, match="ttl"):
            issue(SESSION, USER, bad_ttl, key=KEY)
    for bad_client in ("", "*", "user-*"):
        with pytest.raises(ConfigurationError, match="client id"):
            issue(SESSION, bad_client, key=KEY)
    for bad_key in ("nokey", "app.key", "app:secret", ".key:secret", "app.:secret", "app.key:"):
        with pytest.raises(ConfigurationError, match=r"appId\.keyId:secret"):
            issue(SESSION, USER, key=bad_key)
    with pytest.raises(ConfigurationError, match="namespace"):
        issue(SESSION, USER, key=KEY, namespace="a:b")


def test_options_take_a_key_or_a_client_credential() -> None:
    assert AblyOptions(token="tok").key_name is None
    assert AblyOptions(key=KEY).key_name == KEY_NAME
    assert options_from_url("ably://?token=abc.def.ghi&namespace=chat").token == "abc.def.ghi"
    for bad in (
        lambda: AblyOptions(),
        lambda: AblyOptions(token=""),
        lambda: AblyOptions(key=KEY, token="tok"),
        lambda: AblyOptions(key=KEY, auth_callback=auth_callback("jwt")),
        lambda: options_from_url("ably://?namespace=chat"),
        lambda: options_from_url(f"ably://?key={KEY}&token=tok"),
    ):
        with pytest.raises(ConfigurationError):
            bad()


# -- what the emulator checks, as Ably does ----------------------------------------------------------------------


async def test_token_requests_are_verified(emulator: AblyEmulator) -> None:
    url = f"http://127.0.0.1:{emulator.port}/keys/{KEY_NAME}/requestToken"
    async with httpx.AsyncClient() as http:
        request = issue_client_token(SESSION, USER, 60, key=KEY)
        answer = await http.post(url, json=request)
        assert answer.status_code == 200
        details = answer.json()
        assert details["clientId"] == USER
        assert json.loads(details["capability"]) == client_capability(SESSION)
        assert details["expires"] - details["issued"] == 60_000

        replayed = await http.post(url, json=request)
        assert (replayed.status_code, replayed.json()["error"]["code"]) == (401, 40105)

        tampered = issue_client_token(SESSION, USER, key=KEY)
        tampered["capability"] = json.dumps({"*": ["*"]}, separators=(",", ":"))
        refused = await http.post(url, json=tampered)
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, 40101)

        wrong_secret = issue_client_token(SESSION, USER, key=f"{KEY_NAME}:{SECRET[::-1]}")
        refused = await http.post(url, json=wrong_secret)
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, 40101)

        # Ably accepts a timestamp within 2 minutes of its clock.
        stale = issue_client_token(SESSION, USER, key=KEY)
        stale["timestamp"] -= 3 * 60 * 1000
        text = "".join(f"{stale[f]}\n" for f in ("keyName", "ttl", "capability", "clientId", "timestamp", "nonce"))
        stale["mac"] = base64.b64encode(hmac.new(SECRET.encode(), text.encode(), hashlib.sha256).digest()).decode()
        refused = await http.post(url, json=stale)
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, 40104)


async def test_jwts_are_verified(emulator: AblyEmulator) -> None:
    def signed(claims: dict[str, Any], secret: str = SECRET, kid: str = KEY_NAME) -> str:
        now = int(time.time())
        base = {"iat": now, "exp": now + 60, "x-ably-capability": json.dumps(client_capability(SESSION))}
        return jwt.encode({**base, **claims}, secret, algorithm="HS256", headers={"kid": kid})

    async def history_code(token: str) -> int | None:
        """The error code of a history request with this token as ``Bearer`` (base64, as ably-python sends it)."""
        bearer = base64.b64encode(token.encode()).decode()
        url = f"http://127.0.0.1:{emulator.port}/channels/ai%3Achat-1/messages"
        async with httpx.AsyncClient() as http:
            answer = await http.get(url, headers={"Authorization": f"Bearer {bearer}"})
        return None if answer.status_code == 200 else int(answer.json()["error"]["code"])

    assert await history_code(signed({})) is None
    assert await history_code(signed({"iat": int(time.time()) - 120, "exp": int(time.time()) - 60})) == 40142
    assert await history_code(signed({}, secret=SECRET[::-1])) == 40144
    assert await history_code(signed({}, kid="app1.nokey")) == 40101
    assert await history_code(signed({"x-ably-capability": None})) == 40144
    assert await history_code("not.a.jwt") == 40144


async def test_a_jwt_gets_at_most_its_keys_capability() -> None:
    narrow = f"app1.narrow:{SECRET}"
    async with AblyEmulator({narrow: {"ai:chat-1": ["history"]}}) as emulator:
        token = issue_client_jwt(SESSION, USER, key=narrow)
        options = {k: v for k, v in emulator.client_options().items() if k != "key"}
        rest = AblyRest(token=token, **options)
        try:
            await rest.channels.get("ai:chat-1").history()
            error = await refusal(rest.channels.get("ai:chat-1:meta").history())
            assert error.code == 40160
        finally:
            await rest.close()


# -- through ably-python, as a browser would -----------------------------------------------------------------------


@pytest.fixture(params=CREDENTIALS)
async def client(
    request: pytest.FixtureRequest, emulator: AblyEmulator
) -> AsyncIterator[tuple[AblyRealtime, AblyRest]]:
    """A realtime and a REST client of SESSION whose ``auth_callback`` fetches a TokenRequest or a JWT."""
    options = client_options(emulator, auth_callback(request.param))
    realtime = AblyRealtime(**options)
    rest = AblyRest(**options)
    try:
        await asyncio.wait_for(realtime.connection.once_async(ConnectionState.CONNECTED), TIMEOUT)
        yield realtime, rest
    finally:
        await realtime.close()
        await rest.close()


@pytest.fixture
async def agent_rest(emulator: AblyEmulator) -> AsyncIterator[AblyRest]:
    rest = AblyRest(**emulator.client_options(KEY))
    yield rest
    await rest.close()


async def test_client_reads_its_session(client: tuple[AblyRealtime, AblyRest], agent_rest: AblyRest) -> None:
    realtime, rest = client
    for name in ("ai:chat-1", "ai:chat-1:meta", "ai:chat-1:snapshot"):
        await agent_rest.channels.get(name).publish("e", "before")
    received: asyncio.Queue[Any] = asyncio.Queue()
    await asyncio.wait_for(realtime.channels.get("ai:chat-1").subscribe(received.put_nowait), TIMEOUT)
    await agent_rest.channels.get("ai:chat-1").publish("e", "live")
    assert (await asyncio.wait_for(received.get(), TIMEOUT)).data == "live"
    for name in ("ai:chat-1", "ai:chat-1:meta", "ai:chat-1:snapshot"):
        page = await rest.channels.get(name).history(direction="forwards")
        assert page.items[0].data == "before"
    assert realtime.auth.client_id == USER


async def test_client_cannot_publish_events(client: tuple[AblyRealtime, AblyRest], emulator: AblyEmulator) -> None:
    realtime, rest = client
    for channel in (realtime.channels.get("ai:chat-1"), rest.channels.get("ai:chat-1")):
        error = await refusal(channel.publish("e", "forged"))
        assert (error.status_code, error.code) == (401, 40160)
    for kind in ("meta", "snapshot"):
        error = await refusal(rest.channels.get(f"ai:chat-1:{kind}").publish("e", "forged"))
        assert error.code == 40160
    assert emulator.messages("ai:chat-1") == []


async def test_client_cannot_read_another_session(client: tuple[AblyRealtime, AblyRest]) -> None:
    realtime, rest = client
    for name in ("ai:chat-2", "ai:chat-2:meta", "ai:chat-2:snapshot", "ai:chat-1:control"):
        error = await refusal(rest.channels.get(name).history())
        assert (error.status_code, error.code) == (401, 40160)
    error = await refusal(realtime.channels.get("ai:chat-2").attach())
    assert error.code == 40160


async def test_client_sends_controls_to_its_session_only(
    client: tuple[AblyRealtime, AblyRest], emulator: AblyEmulator
) -> None:
    realtime, rest = client
    await asyncio.wait_for(realtime.channels.get("ai:chat-1:control").publish("c", "cancel"), TIMEOUT)
    await rest.channels.get("ai:chat-1:control").publish("c", "steer")
    [first, second] = emulator.messages("ai:chat-1:control")
    assert (first.data, second.data) == ("cancel", "steer")
    assert first.client_id == second.client_id == USER  # the agent knows who sent a control
    for channel in (realtime.channels.get("ai:chat-2:control"), rest.channels.get("ai:chat-2:control")):
        error = await refusal(channel.publish("c", "cancel"))
        assert error.code == 40160
    assert emulator.messages("ai:chat-2:control") == []


# -- through the SDK -----------------------------------------------------------------------------------------------


def agent_url(emulator: AblyEmulator) -> str:
    return f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false&publish_timeout=5"


def client_backend(kind: str, emulator: AblyEmulator, session: str = SESSION) -> AblyBackend:
    """A client process's backend: a JWT in its URL, or a TokenRequest fetched by its ``auth_callback``."""
    if kind == "jwt":
        token = issue_client_jwt(session, USER, key=KEY)
        return AblyBackend(options_from_url(f"ably://?token={token}&endpoint={emulator.endpoint}&tls=false"))
    return AblyBackend(AblyOptions(auth_callback=auth_callback(kind, session), endpoint=emulator.endpoint, tls=False))


@pytest.fixture
async def agent(emulator: AblyEmulator) -> AsyncIterator[Hub]:
    async with durable_ai.connect(agent_url(emulator)) as hub:
        await write_answers(hub, SESSION, OTHER)
        yield hub


@pytest.mark.parametrize("kind", CREDENTIALS)
async def test_sdk_client_reads_its_session_and_cancels(agent: Hub, emulator: AblyEmulator, kind: str) -> None:
    async with durable_ai.connect(client_backend(kind, emulator)) as client:
        await check_client_reads_and_cancels(agent, client, SESSION)


@pytest.mark.parametrize("kind", CREDENTIALS)
async def test_sdk_client_cannot_write_events(agent: Hub, emulator: AblyEmulator, kind: str) -> None:
    backend = client_backend(kind, emulator)
    async with durable_ai.connect(backend) as client:
        await check_client_cannot_write_events(client, backend, SESSION)


@pytest.mark.parametrize("kind", CREDENTIALS)
async def test_sdk_client_cannot_use_another_session(agent: Hub, emulator: AblyEmulator, kind: str) -> None:
    async with durable_ai.connect(client_backend(kind, emulator)) as client:
        await check_client_cannot_use_another_session(client, OTHER)


async def test_sdk_client_enters_presence_as_itself_only_when_allowed(emulator: AblyEmulator) -> None:
    for presence in (True, False):
        token = issue_client_jwt(SESSION, USER, key=KEY, presence=presence)
        backend = AblyBackend(AblyOptions(token=token, endpoint=emulator.endpoint, tls=False))
        async with durable_ai.connect(backend) as client:
            session = client.session(SESSION)
            if presence:
                async with session.present(USER):
                    assert [m.member_id for m in await session.presence()] == [USER]
            else:
                with pytest.raises(PermissionDenied):
                    async with session.present(USER):
                        pass
