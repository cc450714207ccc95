"""The Ably emulator behaves as Ably does: per-channel serials, history parameters, channel limits, CORS, tokens."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from ably import AblyRealtime
from ably.types.channelstate import ChannelState
from ably.types.connectionstate import ConnectionState
from ably.util.exceptions import AblyException

from durable_ai_ably.testing import AblyEmulator
from durable_ai_ably.testing.emulator import store as store_module
from durable_ai_ably.testing.emulator.auth import Authority
from durable_ai_ably.testing.emulator.meters import Meters
from durable_ai_ably.testing.emulator.store import Store

TIMEOUT = 10.0
KEY = "app1.root:s3cret"
# <14-digit ms>-<3-digit counter>@<server>:<3-digit index>, as Ably forms them (01826232498871-001@abcdefghij:001)
SERIAL = re.compile(r"^(\d{14})-(\d{3})@([^:]+):(\d{3})$")


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    async with AblyEmulator({KEY: None}, mutable_namespaces={"ai"}) as emu:
        yield emu


@pytest.fixture
async def http(emulator: AblyEmulator) -> AsyncIterator[httpx.AsyncClient]:
    name, _, secret = KEY.partition(":")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{emulator.port}", auth=(name, secret)) as client:
        yield client


async def publish(http: httpx.AsyncClient, channel: str, *data: Any) -> list[str]:
    body = [{"name": "n", "data": d} for d in data]
    response = await http.post(f"/channels/{channel}/messages", json=body)
    assert response.status_code == 201, response.text
    serials: list[str] = response.json()["serials"]
    return serials


# -- serials ---------------------------------------------------------------------------------------------------------


async def test_each_channel_counts_its_own_serials(http: httpx.AsyncClient) -> None:
    for i in range(5):
        await publish(http, "ai:busy", str(i))
    first, second = await publish(http, "ai:quiet", "a", "b")

    # A channel's first publish starts its own counter, whatever other channels published before it; messages
    # published together share the counter and are told apart by their index.
    head_a, head_b = SERIAL.fullmatch(first), SERIAL.fullmatch(second)
    assert head_a is not None and head_b is not None
    assert head_a.group(2) == head_b.group(2) == "000"
    assert (head_a.group(4), head_b.group(4)) == ("000", "001")
    assert head_a.group(1) == head_b.group(1)
    history = (await http.get("/channels/ai:quiet/messages", params={"direction": "forwards"})).json()
    assert [m["serial"] for m in history] == [first, second]
    assert [m["timestamp"] for m in history] == [int(head_a.group(1))] * 2


def test_serials_stay_ordered_past_a_thousand_in_one_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "now_ms", lambda: 1_700_000_000_000)  # the clock stands still
    authority = Authority({KEY: None})
    store = Store(
        instance="test",
        meters=Meters(enforce=False, channel_limit=50, connection_limit=50),
        retention_limit=10_000,
        retention_seconds=None,
        idempotency_window=120.0,
        max_message_size=1 << 20,
        mutable_namespaces=(),
    )
    credential = authority.for_key(KEY)
    serials: list[str | None] = []
    for n in range(1001):
        serials += store.publish("ch", [{"data": n}], credential=credential, id_prefix=f"p{n}")
    serials += store.publish("ch", [{"data": n} for n in range(1500)], credential=credential, id_prefix="big")

    assert all(isinstance(s, str) and SERIAL.fullmatch(s) for s in serials)
    assert serials == sorted(serials, key=str)
    assert len(set(serials)) == len(serials)


async def test_operation_version_serials_share_the_channel_order(http: httpx.AsyncClient) -> None:
    [serial] = await publish(http, "ai:edits", "Hel")
    versions = []
    for fragment in ("lo", ",", " world"):
        response = await http.patch(f"/channels/ai:edits/messages/{serial}", json={"action": 5, "data": fragment})
        assert response.status_code == 200, response.text
        versions.append(response.json()["versionSerial"])
    [later] = await publish(http, "ai:edits", "next")

    assert all(SERIAL.fullmatch(v) for v in versions)
    assert [serial, *versions, later] == sorted([serial, *versions, later])
    latest = (await http.get(f"/channels/ai:edits/messages/{serial}")).json()
    assert (latest["data"], latest["version"]["serial"]) == ("Hello, world", versions[-1])


# -- history ---------------------------------------------------------------------------------------------------------


async def test_history_ignores_camel_case_from_serial(http: httpx.AsyncClient) -> None:
    serials = await publish(http, "ai:h1", "a")
    serials += await publish(http, "ai:h1", "b")
    serials += await publish(http, "ai:h1", "c")

    response = await http.get("/channels/ai:h1/messages", params={"fromSerial": serials[0]})

    assert [m["data"] for m in response.json()] == ["c", "b", "a"]


async def test_history_until_attach_stops_at_the_attach_serial(http: httpx.AsyncClient) -> None:
    before = await publish(http, "ai:h2", "a")
    before += await publish(http, "ai:h2", "b")
    await publish(http, "ai:h2", "after")

    response = await http.get("/channels/ai:h2/messages", params={"from_serial": before[-1]})
    assert [m["data"] for m in response.json()] == ["b", "a"]

    forwards = await http.get("/channels/ai:h2/messages", params={"from_serial": before[-1], "direction": "forwards"})
    assert forwards.status_code == 400
    assert forwards.json()["error"]["code"] == 40003


async def test_history_honours_from_serial_only_when_asked() -> None:
    async with (
        AblyEmulator({KEY: None}, honour_from_serial=True) as emulator,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{emulator.port}", auth=tuple(KEY.split(":"))) as http,
    ):
        serials = [s for d in "abc" for s in await publish(http, "h3", d)]
        backwards = await http.get("/channels/h3/messages", params={"fromSerial": serials[1]})
        forwards = await http.get("/channels/h3/messages", params={"fromSerial": serials[1], "direction": "forwards"})

    assert [m["data"] for m in backwards.json()] == ["b", "a"]
    assert [m["data"] for m in forwards.json()] == ["b", "c"]


async def test_history_time_bounds_are_inclusive_and_limit_is_checked(http: httpx.AsyncClient) -> None:
    for d in "abc":
        await publish(http, "ai:h4", d)
    stored = (await http.get("/channels/ai:h4/messages", params={"direction": "forwards"})).json()
    middle = stored[1]["timestamp"]

    bounded = await http.get("/channels/ai:h4/messages", params={"start": middle, "end": middle})
    assert {m["data"] for m in bounded.json()} >= {"b"}
    assert all(m["timestamp"] == middle for m in bounded.json())
    assert (await http.get("/channels/ai:h4/messages", params={"limit": 1001})).status_code == 400
    assert len((await http.get("/channels/ai:h4/messages", params={"limit": 1000})).json()) == 3


# -- channels per connection -----------------------------------------------------------------------------------------


async def test_a_connection_attaches_at_most_200_channels(emulator: AblyEmulator, http: httpx.AsyncClient) -> None:
    client = AblyRealtime(**emulator.client_options())
    try:
        await asyncio.wait_for(client.connection.once_async(ConnectionState.CONNECTED), TIMEOUT)
        channels = [client.channels.get(f"ai:c{i}") for i in range(200)]
        await asyncio.wait_for(asyncio.gather(*(channel.attach() for channel in channels)), TIMEOUT)

        extra = client.channels.get("ai:one-too-many")
        with pytest.raises(AblyException) as refused:
            await asyncio.wait_for(extra.attach(), TIMEOUT)
        assert (refused.value.code, refused.value.status_code) == (90010, 400)
        assert extra.state == ChannelState.FAILED

        await asyncio.wait_for(channels[0].detach(), TIMEOUT)
        await asyncio.wait_for(extra.attach(), TIMEOUT)
        assert extra.state == ChannelState.ATTACHED
        assert client.connection.state == ConnectionState.CONNECTED
    finally:
        await client.close()
    # REST has no such limit: it attaches nothing.
    for i in range(201):
        await publish(http, f"ai:r{i}", "x")


async def test_a_batch_publish_names_at_most_100_channels(http: httpx.AsyncClient) -> None:
    spec = {"channels": [f"ai:b{i}" for i in range(101)], "messages": [{"data": "x"}]}
    response = await http.post("/messages", json=spec)
    assert (response.status_code, response.json()["error"]["code"]) == (400, 90010)


# -- CORS ------------------------------------------------------------------------------------------------------------


async def test_rest_answers_a_browser_preflight_on_any_path(http: httpx.AsyncClient) -> None:
    origin = "http://localhost:5173"
    for path in ("/channels/ai:x/messages", "/keys/app1.root/requestToken", "/time", "/no/such/path"):
        response = await http.options(
            path,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-ably-version, ably-agent",
            },
        )
        assert response.status_code == 204, path
        assert response.headers["access-control-allow-origin"] == origin
        assert response.headers["access-control-allow-credentials"] == "true"
        assert {"GET", "POST", "PATCH"} <= {
            m.strip() for m in response.headers["access-control-allow-methods"].split(",")
        }
        allowed = {h.strip() for h in response.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "accept", "x-ably-version", "x-ably-lib", "ably-agent"} <= allowed
        assert int(response.headers["access-control-max-age"]) > 0


async def test_every_rest_response_carries_cors_headers(http: httpx.AsyncClient) -> None:
    origin = "https://app.example"
    await publish(http, "ai:cors", "a")
    await publish(http, "ai:cors", "b")

    page = await http.get("/channels/ai:cors/messages", params={"limit": 1}, headers={"Origin": origin})
    async with httpx.AsyncClient(base_url=http.base_url) as anonymous_client:
        failed = await anonymous_client.get("/channels/ai:cors/messages", headers={"Origin": origin})
    anonymous = await http.get("/time")

    for response in (page, failed):
        assert response.headers["access-control-allow-origin"] == origin
        exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
        assert {"link", "x-ably-errorcode", "x-ably-errormessage"} <= exposed
    assert 'rel="next"' in page.headers["link"]
    assert failed.status_code == 401
    assert anonymous.headers["access-control-allow-origin"] == "*"


# -- token expiry on live connections --------------------------------------------------------------------------------


class Changes:
    """A connection's state changes, and a way to wait for one that matches."""

    def __init__(self, client: AblyRealtime) -> None:
        self.seen: list[Any] = []
        self._changed = asyncio.Event()
        client.connection.on(self._add)

    def _add(self, change: Any) -> None:
        self.seen.append(change)
        self._changed.set()

    async def wait_for(self, state: ConnectionState, after: int = 0) -> int:
        """The index of the first change to `state` at or after index `after`."""

        async def wait() -> int:
            while True:
                for index in range(after, len(self.seen)):
                    if self.seen[index].current == state:
                        return index
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(wait(), TIMEOUT)


def short_lived(emulator: AblyEmulator, issued: list[dict[str, Any]]) -> dict[str, Any]:
    """Realtime options whose authCallback issues a first token that lives 1.5 s, then tokens of a minute."""

    async def auth_callback(_params: Any) -> dict[str, Any]:
        issued.append(emulator.issue_token(ttl_ms=1500 if not issued else 60_000))
        return issued[-1]

    options = emulator.client_options(auth_callback=auth_callback)
    del options["key"], options["use_token_auth"]
    return options


async def test_an_expired_token_disconnects_and_the_renewed_connection_resumes(
    emulator: AblyEmulator, http: httpx.AsyncClient
) -> None:
    issued: list[dict[str, Any]] = []
    client = AblyRealtime(**short_lived(emulator, issued))
    changes = Changes(client)
    received: list[Any] = []
    got = asyncio.Event()
    try:
        await changes.wait_for(ConnectionState.CONNECTED)
        connection_id = client.connection.connection_manager.connection_id
        channel = client.channels.get("ai:renew")
        await channel.subscribe(lambda m: (received.append(m.data), got.set()))
        await publish(http, "ai:renew", "before")
        await asyncio.wait_for(got.wait(), TIMEOUT)

        # One renewal: ably-python 3.1 keeps the first token error as its error reason once connected again, so it
        # renews only once (tests/js checks repeated renewals with ably-js).
        gone = await changes.wait_for(ConnectionState.DISCONNECTED)
        assert changes.seen[gone].reason.code == 40142
        await changes.wait_for(ConnectionState.CONNECTED, gone)
        assert len(issued) == 2
        assert client.connection.connection_manager.connection_id == connection_id  # resumed, not a new connection
        if channel.state != ChannelState.ATTACHED:  # re-attaching with its channelSerial
            await asyncio.wait_for(channel.once_async(ChannelState.ATTACHED), TIMEOUT)

        got.clear()
        await publish(http, "ai:renew", "after")
        await asyncio.wait_for(got.wait(), TIMEOUT)
        result = await asyncio.wait_for(channel.publish("n", "from-renewed"), TIMEOUT)
        assert result.serials and result.serials[0]
    finally:
        await client.close()
    assert received[0] == "before" and "after" in received


async def test_in_band_auth_updates_the_connection_credential(emulator: AblyEmulator) -> None:
    issued: list[dict[str, Any]] = []
    client = AblyRealtime(**short_lived(emulator, issued))
    changes = Changes(client)
    try:
        await changes.wait_for(ConnectionState.CONNECTED)
        connection_id = client.connection.connection_manager.connection_id
        # authorize() sends AUTH with the new token over the live connection; the emulator answers CONNECTED.
        await asyncio.wait_for(client.auth.authorize(), TIMEOUT)
        assert len(issued) == 2
        # The first token's expiry no longer applies: the connection stays up past it.
        publisher = client.channels.get("ai:auth")
        await asyncio.wait_for(publisher.attach(), TIMEOUT)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.5
        while loop.time() < deadline:
            await asyncio.wait_for(publisher.publish("n", "x"), TIMEOUT)
            await asyncio.sleep(0.05)  # within Ably's 50 messages per second
        assert client.connection.connection_manager.connection_id == connection_id
        assert all(c.current != ConnectionState.DISCONNECTED for c in changes.seen)
    finally:
        await client.close()


async def test_in_band_auth_applies_the_new_capability(emulator: AblyEmulator) -> None:
    capabilities = iter([{"ai:*": ["subscribe", "publish"]}, {"ai:*": ["subscribe"]}])

    async def auth_callback(_params: Any) -> dict[str, Any]:
        return emulator.issue_token(capability=next(capabilities))

    options = emulator.client_options(auth_callback=auth_callback)
    del options["key"], options["use_token_auth"]
    client = AblyRealtime(**options)
    try:
        await asyncio.wait_for(client.connection.once_async(ConnectionState.CONNECTED), TIMEOUT)
        channel = client.channels.get("ai:narrowed")
        await asyncio.wait_for(channel.publish("n", "allowed"), TIMEOUT)
        await asyncio.wait_for(client.auth.authorize(), TIMEOUT)
        with pytest.raises(AblyException) as refused:
            await asyncio.wait_for(channel.publish("n", "refused"), TIMEOUT)
        assert refused.value.code == 40160
    finally:
        await client.close()


async def test_expired_tokens_are_refused_on_connect_and_over_rest(emulator: AblyEmulator) -> None:
    token = emulator.issue_token(ttl_ms=1)["token"]
    await asyncio.sleep(0.01)  # let the 1 ms token expire
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{emulator.port}") as http:
        response = await http.get("/channels/ai:x/messages", headers={"Authorization": f"Bearer {token}"})
    assert (response.status_code, response.json()["error"]["code"]) == (401, 40142)

    async with websockets.connect(f"ws://127.0.0.1:{emulator.port}/?v=5&format=json&accessToken={token}") as ws:
        frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert (frame["action"], frame["error"]["code"]) == (9, 40142)
