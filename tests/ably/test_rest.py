"""The REST backend's requests, against a mocked Ably (respx): retries, idempotent ids, batching, tokens, errors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import respx
from tenacity import RetryCallState

from durable_ai.backend import Channel
from durable_ai.errors import BackendError, BackendUnavailable, PayloadTooLarge, PermissionDenied
from durable_ai_ably import AblyOptions, AblyRestBackend, from_url
from durable_ai_ably._common import PRESENCE_TTL_SECONDS, PresenceLog, presence_record
from durable_ai_ably._http import AblyHttp

KEY = "app1.key1:s3cret"
EVENTS = Channel("s1", "events")
PUBLISH = "https://rest.test/channels/ai%3As1/messages"
BATCH = "https://rest.test/messages"


def options(**overrides: Any) -> AblyOptions:
    values: dict[str, Any] = {
        "key": KEY,
        "endpoint": "rest.test",
        "publish_timeout": 3.0,
        "attempt_timeout": 1.0,
        "rate_limit": None,
    }
    values.update(overrides)
    return AblyOptions(**values)


def created(*serials: str | None) -> httpx.Response:
    return httpx.Response(201, json={"channel": "ai:s1", "messageId": "abc", "serials": list(serials)})


def failed(status: int, code: int, **headers: str) -> httpx.Response:
    body = {"error": {"message": "refused", "code": code, "statusCode": status}}
    return httpx.Response(status, json=body, headers=headers)


def history_of_s1(router: respx.MockRouter, answer: Callable[[httpx.Request], httpx.Response]) -> None:
    """History of the channel ``ai:s1`` from ``answer``; the other channels (the meta channel) stay empty."""

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/channels/ai:s1/messages":
            return answer(request)
        return httpx.Response(200, json=[])

    router.routes["history"].mock(side_effect=route)


def sent_ids(route: respx.Route) -> list[Any]:
    """The message ids each request of a route carried (a list per batch request)."""
    out: list[Any] = []
    for call in route.calls:
        body = json.loads(call.request.content)
        out.append([spec["messages"]["id"] for spec in body] if isinstance(body, list) else body["id"])
    return out


@pytest.fixture
def ably() -> respx.MockRouter:
    with respx.mock(assert_all_called=False) as router:
        # Empty history everywhere (no deletion marker, no messages) unless a test says otherwise.
        router.get(url__regex=r"https?://[^/]+/channels/[^/]+/messages", name="history").mock(
            return_value=httpx.Response(200, json=[])
        )
        yield router


@pytest.fixture
def make_backend() -> Callable[..., AblyRestBackend]:
    return lambda **overrides: AblyRestBackend(options(**overrides))


@pytest.fixture
async def backend(make_backend: Callable[..., AblyRestBackend]) -> AsyncIterator[AblyRestBackend]:
    backend = make_backend()
    await backend.open()
    yield backend
    await backend.close()


def test_from_url_picks_the_rest_transport() -> None:
    backend = from_url("ably://?key=a.b:c&transport=rest&poll_interval=0.2")
    assert isinstance(backend, AblyRestBackend)
    assert backend.options.poll_interval == 0.2


async def test_basic_auth_over_tls_and_ablys_headers(ably: respx.MockRouter, backend: AblyRestBackend) -> None:
    route = ably.post(PUBLISH).mock(return_value=created("s-1"))
    position = await backend.publish(EVENTS, b'{"v":1}', message_id="m1")
    assert position.position == "s-1"
    request = route.calls.last.request
    assert request.headers["authorization"] == "Basic " + base64.b64encode(KEY.encode()).decode()
    assert request.headers["x-ably-version"] == "5"
    assert json.loads(request.content) == {"id": "m1", "name": "e", "data": '{"v":1}'}


async def test_binary_data_travels_base64(ably: respx.MockRouter, backend: AblyRestBackend) -> None:
    route = ably.post(PUBLISH).mock(return_value=created("s-1"))
    await backend.publish(EVENTS, b"\xff\x00", message_id="m1")
    assert json.loads(route.calls.last.request.content) == {
        "id": "m1",
        "name": "e",
        "data": base64.b64encode(b"\xff\x00").decode(),
        "encoding": "base64",
    }


async def test_a_429_is_retried_after_its_retry_after(
    ably: respx.MockRouter, backend: AblyRestBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []
    policy = AblyHttp._wait

    def recorded(self: AblyHttp, state: RetryCallState) -> float:
        waits.append(policy(self, state))
        return waits[-1]

    monkeypatch.setattr(AblyHttp, "_wait", recorded)
    route = ably.post(PUBLISH).mock(side_effect=[failed(429, 42910, **{"Retry-After": "1"}), created("s-1")])
    position = await backend.publish(EVENTS, b"x", message_id="m1")
    assert position.position == "s-1"
    assert sent_ids(route) == ["m1", "m1"]
    assert waits and waits[0] >= 1.0  # Ably asked for a second before the retry


async def test_a_503_storm_within_publish_timeout_stores_once(ably: respx.MockRouter, backend: AblyRestBackend) -> None:
    route = ably.post(PUBLISH).mock(side_effect=[failed(503, 50300)] * 4 + [created("s-1")])
    position = await backend.publish(EVENTS, b"x", message_id="m1")
    assert position.position == "s-1"
    assert sent_ids(route) == ["m1"] * 5


async def test_timeouts_and_connection_errors_are_retried(ably: respx.MockRouter, backend: AblyRestBackend) -> None:
    route = ably.post(PUBLISH).mock(
        side_effect=[httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), failed(500, 50000), created("s-1")]
    )
    assert (await backend.publish(EVENTS, b"x", message_id="m1")).position == "s-1"
    assert sent_ids(route) == ["m1"] * 4


async def test_a_storm_past_publish_timeout_is_backend_unavailable(
    ably: respx.MockRouter, make_backend: Callable[..., AblyRestBackend]
) -> None:
    backend = make_backend(publish_timeout=0.5)
    await backend.open()
    try:
        route = ably.post(PUBLISH).mock(return_value=failed(503, 50300))
        with pytest.raises(BackendUnavailable):
            await backend.publish(EVENTS, b"x", message_id="m1")
    finally:
        await backend.close()
    assert len(route.calls) > 1
    assert set(sent_ids(route)) == {"m1"}


async def test_a_failing_host_falls_back(ably: respx.MockRouter, make_backend: Callable[..., AblyRestBackend]) -> None:
    backend = make_backend(endpoint=None)  # Ably's production hosts
    await backend.open()
    try:
        primary = ably.post("https://main.realtime.ably.net/channels/ai%3As1/messages").mock(
            return_value=failed(503, 50300)
        )
        fallback = ably.post(url__regex=r"https://main\.[a-e]\.fallback\.ably-realtime\.com/channels/").mock(
            return_value=created("s-1")
        )
        assert (await backend.publish(EVENTS, b"x", message_id="m1")).position == "s-1"
    finally:
        await backend.close()
    assert len(primary.calls) == 1
    assert sent_ids(fallback) == ["m1"]


async def test_concurrent_publishes_go_in_one_batch_request(ably: respx.MockRouter, backend: AblyRestBackend) -> None:
    in_flight = asyncio.Event()
    release = asyncio.Event()

    async def first(request: httpx.Request) -> httpx.Response:
        in_flight.set()
        await release.wait()
        return created("s-0")

    def batch(request: httpx.Request) -> httpx.Response:
        specs = json.loads(request.content)
        assert all(spec["channels"] == "ai:s1" for spec in specs)
        results = [
            {
                "successCount": 1,
                "failureCount": 0,
                "results": [{"channel": "ai:s1", "messageId": "b", "serials": [f"s-{i + 1}"]}],
            }
            for i in range(len(specs))
        ]
        return httpx.Response(201, json=results)

    single = ably.post(PUBLISH).mock(side_effect=first)
    batched = ably.post(BATCH).mock(side_effect=batch)
    head = asyncio.create_task(backend.publish(EVENTS, b"m0", message_id="m0"))
    await asyncio.wait_for(in_flight.wait(), 5)
    rest = [asyncio.create_task(backend.publish(EVENTS, f"m{i}".encode(), message_id=f"m{i}")) for i in range(1, 6)]
    await asyncio.sleep(0)  # let them queue behind the request in flight
    release.set()
    positions = await asyncio.wait_for(asyncio.gather(head, *rest), 5)
    assert [p.position for p in positions] == [f"s-{i}" for i in range(6)]
    assert sent_ids(single) == ["m0"]
    assert sent_ids(batched) == [[f"m{i}" for i in range(1, 6)]]


async def test_a_batch_retries_only_what_failed_in_it(ably: respx.MockRouter, backend: AblyRestBackend) -> None:
    in_flight = asyncio.Event()
    release = asyncio.Event()
    answers: list[list[dict[str, Any]]] = [
        [
            {"channel": "ai:s1", "messageId": "b", "serials": ["s-1"]},
            {"channel": "ai:s1", "error": {"code": 50000, "statusCode": 500, "message": "hiccup"}},
            {"channel": "ai:s1", "error": {"code": 40160, "statusCode": 401, "message": "not permitted"}},
        ],
    ]

    async def first(request: httpx.Request) -> httpx.Response:
        if not in_flight.is_set():
            in_flight.set()
            await release.wait()
            return created("s-0")
        return created("s-2")  # the retried message, alone again

    def batch(request: httpx.Request) -> httpx.Response:
        # The old form of a partial failure: 400, code 40020, one result per spec.
        body = {"error": {"code": 40020, "statusCode": 400, "message": "batch"}, "batchResponse": answers.pop(0)}
        return httpx.Response(400, json=body)

    single = ably.post(PUBLISH).mock(side_effect=first)
    ably.post(BATCH).mock(side_effect=batch)
    head = asyncio.create_task(backend.publish(EVENTS, b"m0", message_id="m0"))
    await asyncio.wait_for(in_flight.wait(), 5)
    rest = [asyncio.create_task(backend.publish(EVENTS, f"m{i}".encode(), message_id=f"m{i}")) for i in range(1, 4)]
    await asyncio.sleep(0)
    release.set()
    outcomes = await asyncio.wait_for(asyncio.gather(head, *rest, return_exceptions=True), 5)
    assert [getattr(o, "position", None) for o in outcomes[:3]] == ["s-0", "s-1", "s-2"]
    assert isinstance(outcomes[3], PermissionDenied)
    assert sent_ids(single) == ["m0", "m2"]


async def test_tokens_are_requested_without_tls_and_renewed_on_40142(
    ably: respx.MockRouter, make_backend: Callable[..., AblyRestBackend]
) -> None:
    tokens = iter(["tok-1", "tok-2"])

    def issue(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        signed = f"{body['keyName']}\n\n\n\n{body['timestamp']}\n{body['nonce']}\n"
        mac = base64.b64encode(hmac.new(b"s3cret", signed.encode(), hashlib.sha256).digest()).decode()
        assert body["keyName"] == "app1.key1" and body["mac"] == mac and "authorization" not in request.headers
        expires = int(time.time() * 1000) + 3_600_000
        return httpx.Response(200, json={"token": next(tokens), "expires": expires, "keyName": "app1.key1"})

    def publish(request: httpx.Request) -> httpx.Response:
        if request.headers["authorization"] == "Bearer " + base64.b64encode(b"tok-1").decode():
            return failed(401, 40142)
        assert request.headers["authorization"] == "Bearer " + base64.b64encode(b"tok-2").decode()
        return created("s-1")

    token_route = ably.post("http://rest.test/keys/app1.key1/requestToken").mock(side_effect=issue)
    route = ably.post("http://rest.test/channels/ai%3As1/messages").mock(side_effect=publish)
    backend = make_backend(tls=False)
    await backend.open()
    try:
        assert (await backend.publish(EVENTS, b"x", message_id="m1")).position == "s-1"
    finally:
        await backend.close()
    assert len(token_route.calls) == 2
    assert sent_ids(route) == ["m1", "m1"]


async def test_a_token_about_to_expire_is_renewed_before_use(
    ably: respx.MockRouter, make_backend: Callable[..., AblyRestBackend]
) -> None:
    lifetimes = iter([5_000, 3_600_000])  # the first expires within the renewal margin

    def issue(request: httpx.Request) -> httpx.Response:
        lifetime = next(lifetimes)
        expires = int(time.time() * 1000) + lifetime
        return httpx.Response(200, json={"token": f"tok-{lifetime}", "expires": expires})

    token_route = ably.post("http://rest.test/keys/app1.key1/requestToken").mock(side_effect=issue)
    route = ably.post("http://rest.test/channels/ai%3As1/messages").mock(return_value=created("s-1"))
    backend = make_backend(tls=False)
    await backend.open()
    try:
        await backend.publish(EVENTS, b"x", message_id="m1")  # reads the session's state first, with tok-5000
        await backend.publish(EVENTS, b"y", message_id="m2")
    finally:
        await backend.close()
    fresh = "Bearer " + base64.b64encode(b"tok-3600000").decode()
    assert [call.request.headers["authorization"] for call in route.calls] == [fresh, fresh]
    assert len(token_route.calls) == 2


async def test_refused_credentials_are_permission_denied(ably: respx.MockRouter, backend: AblyRestBackend) -> None:
    route = ably.post(PUBLISH).mock(return_value=failed(401, 40160))
    with pytest.raises(PermissionDenied):
        await backend.publish(EVENTS, b"x", message_id="m1")
    assert len(route.calls) == 1  # retrying cannot help


async def test_a_refused_token_request_is_permission_denied(
    ably: respx.MockRouter, make_backend: Callable[..., AblyRestBackend]
) -> None:
    ably.post("http://rest.test/keys/app1.key1/requestToken").mock(return_value=failed(401, 40101))
    route = ably.post("http://rest.test/channels/ai%3As1/messages").mock(return_value=created("s-1"))
    backend = make_backend(tls=False)
    await backend.open()
    try:
        with pytest.raises(PermissionDenied):
            await backend.publish(EVENTS, b"x", message_id="m1")
    finally:
        await backend.close()
    assert not route.calls


@pytest.mark.parametrize("answer", [failed(413, 41300), failed(400, 40009)], ids=["413", "40009"])
async def test_too_large_for_ably_is_payload_too_large(
    ably: respx.MockRouter, backend: AblyRestBackend, answer: httpx.Response
) -> None:
    route = ably.post(PUBLISH).mock(return_value=answer)
    with pytest.raises(PayloadTooLarge):
        await backend.publish(EVENTS, b"x" * 1000, message_id="m1")
    assert len(route.calls) == 1


async def test_over_max_message_bytes_is_refused_before_any_request(
    ably: respx.MockRouter, backend: AblyRestBackend
) -> None:
    route = ably.post(PUBLISH).mock(return_value=created("s-1"))
    with pytest.raises(PayloadTooLarge):
        await backend.publish(EVENTS, b"x" * (backend.limits.max_message_bytes + 1), message_id="m1")
    assert not route.calls


async def test_another_refusal_is_a_backend_error(ably: respx.MockRouter, backend: AblyRestBackend) -> None:
    ably.post(PUBLISH).mock(return_value=failed(400, 40000))
    with pytest.raises(BackendError) as caught:
        await backend.publish(EVENTS, b"x", message_id="m1")
    assert not isinstance(caught.value, BackendUnavailable | PermissionDenied)


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(201, text="<html>gateway</html>"),
        httpx.Response(201, json={"channel": "ai:s1"}),
        httpx.Response(201, json={"serials": ["a", "b"]}),
        httpx.Response(201, json=["s-1"]),
    ],
    ids=["not-json", "no-serials", "two-serials", "a-list"],
)
async def test_a_malformed_answer_is_a_backend_error(
    ably: respx.MockRouter, backend: AblyRestBackend, answer: httpx.Response
) -> None:
    ably.post(PUBLISH).mock(return_value=answer)
    with pytest.raises(BackendError):
        await backend.publish(EVENTS, b"x", message_id="m1")


async def test_a_malformed_history_page_is_a_backend_error(ably: respx.MockRouter, backend: AblyRestBackend) -> None:
    history_of_s1(ably, lambda request: httpx.Response(200, json={"not": "a list"}))
    with pytest.raises(BackendError):
        [m async for m in backend.read(EVENTS, start=None, follow=False)]


async def test_a_serial_left_out_is_found_in_history(ably: respx.MockRouter, backend: AblyRestBackend) -> None:
    ably.post(PUBLISH).mock(return_value=created(None))
    history = [{"id": "other", "serial": "s-2"}, {"id": "m1", "serial": "s-1"}]
    history_of_s1(ably, lambda request: httpx.Response(200, json=history))
    assert (await backend.publish(EVENTS, b"x", message_id="m1")).position == "s-1"


async def test_history_follows_link_pages(ably: respx.MockRouter, backend: AblyRestBackend) -> None:
    def page(request: httpx.Request) -> httpx.Response:
        if request.url.params["direction"] == "backwards":  # the newest message, where the read stops
            return httpx.Response(200, json=[{"id": "b", "serial": "00000000000002-x", "name": "e", "data": "b"}])
        if request.url.params.get("cursor") == "2":
            return httpx.Response(200, json=[{"id": "b", "serial": "00000000000002-x", "name": "e", "data": "b"}])
        headers = {"Link": '<./messages?direction=forwards&cursor=2>; rel="next"'}
        items = [{"id": "a", "serial": "00000000000001-x", "name": "e", "data": "a"}]
        return httpx.Response(200, json=items, headers=headers)

    history_of_s1(ably, page)
    messages = [m async for m in backend.read(EVENTS, start=None, follow=False)]
    assert [(m.position, m.data) for m in messages] == [("00000000000001-x", b"a"), ("00000000000002-x", b"b")]


def test_presence_log_keeps_recent_enters_and_forgets_silent_members() -> None:
    now = 10_000_000
    log = PresenceLog(floor="s-10", now_ms=now)
    newest_first = [
        ("leave", "s-50", now - 1_000, presence_record("tab-1")),
        ("enter", "s-40", now - 2_000, presence_record("agent-1", b'{"role":"agent"}')),
        ("enter", "s-30", now - 3_000, presence_record("tab-1", b"{}")),  # left since
        ("enter", "s-20", now - 4_000, presence_record("agent-1", b"older data")),
        ("enter", "s-15", now - 5_000, presence_record("raw", b"\xff\x00")),
    ]
    assert all(log.add(name, serial, stamp, record.encode()) for name, serial, stamp, record in newest_first)
    # A function that died without leaving: its enter is older than the TTL, and so is everything before it.
    assert not log.add("enter", "s-12", now - int(PRESENCE_TTL_SECONDS * 1000) - 1, presence_record("ghost").encode())
    assert log.members == {"agent-1": b'{"role":"agent"}', "raw": b"\xff\x00"}
    # Messages from before the session's deletion are hidden too.
    assert not PresenceLog(floor="s-10", now_ms=now).add("enter", "s-09", now, presence_record("old").encode())
