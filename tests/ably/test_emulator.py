"""The Ably emulator against the real ably-python client: realtime, REST, capabilities, idempotency and faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from ably import AblyRealtime, AblyRest
from ably.types.connectionstate import ConnectionState
from ably.types.message import Message
from ably.util.exceptions import AblyException

from durable_ai_ably.testing import AblyEmulator

TIMEOUT = 10.0
KEY = "app1.full:s3cret"
READ_ONLY = "app1.reader:r3ad"


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    keys = {
        KEY: {"ai:*": ["subscribe", "history", "publish"], "other": ["*"]},
        READ_ONLY: {"ai:*": ["subscribe", "history"]},
    }
    async with AblyEmulator(keys) as emu:
        yield emu


@pytest.fixture
async def realtime_factory(emulator: AblyEmulator) -> AsyncIterator[Callable[..., Awaitable[AblyRealtime]]]:
    clients: list[AblyRealtime] = []

    async def make(**overrides: Any) -> AblyRealtime:
        client = AblyRealtime(**emulator.client_options(**overrides))
        clients.append(client)
        await asyncio.wait_for(client.connection.once_async(ConnectionState.CONNECTED), TIMEOUT)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def rest(emulator: AblyEmulator) -> AsyncIterator[AblyRest]:
    client = AblyRest(**emulator.client_options())
    yield client
    await client.close()


class Inbox:
    """Collects a channel's messages and lets a test wait for a count of them."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = asyncio.Event()

    def add(self, message: Message) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait_for(self, count: int) -> list[Message]:
        async def wait() -> None:
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), TIMEOUT)
        return self.messages


async def test_realtime_round_trip_between_two_clients(
    realtime_factory: Callable[..., Awaitable[AblyRealtime]],
) -> None:
    publisher = await realtime_factory()
    subscriber = await realtime_factory()
    inbox = Inbox()
    await subscriber.channels.get("ai:room").subscribe(inbox.add)
    result = await publisher.channels.get("ai:room").publish("token", {"text": "hello"})

    [received] = await inbox.wait_for(1)
    assert received.name == "token"
    assert received.data == {"text": "hello"}
    assert received.connection_id == publisher.connection.connection_manager.connection_id
    assert received.serial == result.serials[0]
    assert received.id and received.timestamp


async def test_publish_ack_carries_serials(
    realtime_factory: Callable[..., Awaitable[AblyRealtime]], emulator: AblyEmulator
) -> None:
    client = await realtime_factory()
    channel = client.channels.get("ai:acks")
    await channel.attach()
    first = await channel.publish([Message("a", "1"), Message("b", "2")])
    second = await channel.publish("c", "3")

    assert len(first.serials) == 2
    assert len(second.serials) == 1
    assert first.serials[0] < first.serials[1] < second.serials[0]
    assert [m.serial for m in emulator.messages("ai:acks")] == [*first.serials, *second.serials]


async def test_rest_history_pages_with_link_headers(rest: AblyRest) -> None:
    channel = rest.channels.get("ai:history")
    for i in range(25):
        await channel.publish("n", str(i))

    pages = [await channel.history(limit=10)]
    while pages[-1].has_next():
        pages.append(await pages[-1].next())

    assert [len(p.items) for p in pages] == [10, 10, 5]
    assert [m.data for p in pages for m in p.items] == [str(i) for i in range(24, -1, -1)]
    forwards = await channel.history(direction="forwards", limit=10)
    assert [m.data for m in forwards.items] == [str(i) for i in range(10)]
    assert [m.data for m in (await forwards.next()).items] == [str(i) for i in range(10, 20)]


async def test_idempotent_publish_with_explicit_ids(
    rest: AblyRest, realtime_factory: Callable[..., Awaitable[AblyRealtime]], emulator: AblyEmulator
) -> None:
    channel = rest.channels.get("ai:idem")
    first = await channel.publish(Message("x", "once", id="fixed-id:0"))
    again = await channel.publish(Message("x", "twice", id="fixed-id:0"))
    assert first.serials == again.serials

    realtime = await realtime_factory()
    rt_channel = realtime.channels.get("ai:idem")
    await rt_channel.attach()
    dup = await rt_channel.publish(Message("x", "thrice", id="fixed-id:0"))
    assert dup.serials == first.serials

    history = await channel.history()
    assert [m.data for m in history.items] == ["once"]
    assert len(emulator.messages("ai:idem")) == 1


async def test_token_without_publish_capability_is_refused(
    emulator: AblyEmulator, realtime_factory: Callable[..., Awaitable[AblyRealtime]]
) -> None:
    reader = await realtime_factory(key=READ_ONLY)
    channel = reader.channels.get("ai:locked")
    await channel.attach()
    with pytest.raises(AblyException) as nacked:
        await channel.publish("x", "no")
    assert nacked.value.code == 40160
    assert nacked.value.status_code == 401

    rest = AblyRest(**emulator.client_options(key=READ_ONLY))
    try:
        with pytest.raises(AblyException) as refused:
            await rest.channels.get("ai:locked").publish("x", "no")
        assert refused.value.code == 40160
        assert refused.value.status_code == 401
        history = await rest.channels.get("ai:locked").history()
        assert history.items == []
    finally:
        await rest.close()
    assert emulator.messages("ai:locked") == []


async def test_capability_of_token_is_the_intersection(emulator: AblyEmulator) -> None:
    rest = AblyRest(
        **emulator.client_options(default_token_params={"capability": {"ai:one": ["publish"], "zzz": ["*"]}})
    )
    try:
        await rest.channels.get("ai:one").publish("x", "1")
        with pytest.raises(AblyException) as refused:
            await rest.channels.get("ai:two").publish("x", "2")
        assert refused.value.code == 40160
        details = rest.auth.token_details
        assert details is not None
        assert {res: set(ops) for res, ops in details.capability.items()} == {"ai:one": {"publish"}}
    finally:
        await rest.close()


async def test_nack_on_demand(realtime_factory: Callable[..., Awaitable[AblyRealtime]], emulator: AblyEmulator) -> None:
    client = await realtime_factory()
    channel = client.channels.get("ai:nack")
    await channel.attach()
    emulator.nack_next(1, code=50001, status=500)
    with pytest.raises(AblyException) as nacked:
        await channel.publish("x", "refused")
    assert nacked.value.code == 50001
    ok = await channel.publish("x", "accepted")
    assert ok.serials
    assert [m.data for m in emulator.messages("ai:nack")] == ["accepted"]


async def test_fail_next_rest(rest: AblyRest, emulator: AblyEmulator) -> None:
    channel = rest.channels.get("ai:faults")
    await channel.publish("warm", "up")  # gets the token first
    emulator.fail_next_rest(429, 1, path_prefix="/channels/")
    with pytest.raises(AblyException) as failed:
        await channel.publish("x", "no")
    assert failed.value.status_code == 429
    await channel.publish("x", "yes")
    assert [m.data for m in (await channel.history()).items] == ["yes", "up"]


async def test_drop_connections_reconnects_and_keeps_receiving(
    realtime_factory: Callable[..., Awaitable[AblyRealtime]], emulator: AblyEmulator, rest: AblyRest
) -> None:
    subscriber = await realtime_factory()
    inbox = Inbox()
    channel = subscriber.channels.get("ai:drop")
    await channel.subscribe(inbox.add)
    await rest.channels.get("ai:drop").publish("n", "0")
    await inbox.wait_for(1)

    states: list[ConnectionState] = []
    reconnected = asyncio.get_running_loop().create_future()

    def on_state(change: Any) -> None:
        states.append(change.current)
        if change.current == ConnectionState.CONNECTED and not reconnected.done():
            reconnected.set_result(None)

    subscriber.connection.on(on_state)
    connection_id = subscriber.connection.connection_manager.connection_id
    assert emulator.drop_connections() == 1
    await rest.channels.get("ai:drop").publish("n", "1")  # while the subscriber is away
    await asyncio.wait_for(reconnected, TIMEOUT)
    subscriber.connection.off(on_state)

    assert ConnectionState.DISCONNECTED in states
    assert subscriber.connection.connection_manager.connection_id == connection_id  # resumed
    await rest.channels.get("ai:drop").publish("n", "2")
    messages = await inbox.wait_for(3)
    assert [m.data for m in messages] == ["0", "1", "2"]


async def test_rewind_on_attach(realtime_factory: Callable[..., Awaitable[AblyRealtime]], rest: AblyRest) -> None:
    for i in range(5):
        await rest.channels.get("ai:rewind").publish("n", str(i))
    client = await realtime_factory()
    inbox = Inbox()
    await client.channels.get("ai:rewind", params={"rewind": "2"}).subscribe(inbox.add)
    assert [m.data for m in await inbox.wait_for(2)] == ["3", "4"]


async def test_auth_callback_with_issued_token(emulator: AblyEmulator) -> None:
    async def callback(params: Any) -> dict[str, Any]:
        return emulator.issue_token(KEY, capability={"ai:cb": ["publish", "history"]}, client_id="alice")

    options = emulator.client_options(auth_callback=callback)
    del options["key"], options["use_token_auth"]
    rest = AblyRest(**options)
    realtime = AblyRealtime(**options)
    try:
        await asyncio.wait_for(realtime.connection.once_async(ConnectionState.CONNECTED), TIMEOUT)
        channel = realtime.channels.get("ai:cb")
        await channel.attach()
        await channel.publish("x", "from-alice")
        history = await rest.channels.get("ai:cb").history()
        assert [(m.data, m.client_id) for m in history.items] == [("from-alice", "alice")]
    finally:
        await realtime.close()
        await rest.close()


async def test_time(rest: AblyRest) -> None:
    assert await rest.time() > 1_600_000_000_000


async def test_msgpack_protocol_round_trip(
    realtime_factory: Callable[..., Awaitable[AblyRealtime]], emulator: AblyEmulator
) -> None:
    publisher = await realtime_factory(use_binary_protocol=True)
    subscriber = await realtime_factory()
    inbox = Inbox()
    await subscriber.channels.get("ai:bin").subscribe(inbox.add)
    await publisher.channels.get("ai:bin").publish("blob", b"\x00\x01binary")
    [received] = await inbox.wait_for(1)
    assert received.data == b"\x00\x01binary"
    rest = AblyRest(**emulator.client_options(use_binary_protocol=True))
    try:
        history = await rest.channels.get("ai:bin").history()
        assert [m.data for m in history.items] == [b"\x00\x01binary"]
    finally:
        await rest.close()
