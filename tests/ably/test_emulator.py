"""The Ably emulator against the real ably-python client: realtime, REST, capabilities, idempotency and faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from ably import AblyRealtime, AblyRest
from ably.types.connectionstate import ConnectionState
from ably.types.message import Message, MessageAction
from ably.types.presence import PresenceAction, PresenceMessage
from ably.util.exceptions import AblyException

from durable_ai_ably.testing import AblyEmulator

TIMEOUT = 10.0
KEY = "app1.full:s3cret"
READ_ONLY = "app1.reader:r3ad"


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    keys = {
        KEY: {"ai:*": ["subscribe", "history", "publish", "presence"], "other": ["*"]},
        READ_ONLY: {"ai:*": ["subscribe", "history"]},
    }
    # Presence members of a dropped connection leave at once (Ably waits about 15 s for a resume, as the emulator does
    # by default): the presence tests below watch leaves happen.
    async with AblyEmulator(keys, presence_leave_delay=0) as emu:
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
    """Collects a channel's messages (or presence messages) and lets a test wait for a count of them."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._changed = asyncio.Event()

    def add(self, message: Any) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait_for(self, count: int) -> list[Any]:
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


async def test_several_messages_share_one_id_base_or_have_none(rest: AblyRest, emulator: AblyEmulator) -> None:
    channel = rest.channels.get("ai:ids")
    await channel.publish([Message("x", "a", id="base:0"), Message("x", "b", id="base:1")])
    with pytest.raises(AblyException) as refused:
        await channel.publish([Message("x", "c", id="one"), Message("x", "d", id="two")])
    assert refused.value.code == 40031
    assert [m.id for m in emulator.messages("ai:ids")] == ["base:0", "base:1"]


async def test_batch_publish_answers_one_result_per_spec(rest: AblyRest, emulator: AblyEmulator) -> None:
    specs = [
        {"channels": "ai:batch", "messages": {"id": "one", "name": "x", "data": "1"}},
        {"channels": ["ai:batch", "other"], "messages": [{"id": "two", "name": "x", "data": "2"}]},
        {"channels": "denied", "messages": {"name": "x", "data": "3"}},
        {"channels": "ai:batch", "messages": {"id": "one", "name": "x", "data": "again"}},  # a duplicate
    ]
    response = await rest.request("POST", "/messages", "5", body=specs)
    results = response.items
    assert [(r["successCount"], r["failureCount"]) for r in results] == [(1, 0), (2, 0), (0, 1), (1, 0)]
    stored = {m.id: m.serial for m in emulator.messages("ai:batch")}
    assert sorted(stored) == ["one", "two"]
    assert results[0]["results"][0]["serials"] == [stored["one"]]
    assert results[3]["results"][0]["serials"] == [stored["one"]]  # stored once
    assert [r["channel"] for r in results[1]["results"]] == ["ai:batch", "other"]
    assert results[2]["results"][0]["error"]["code"] == 40160
    single = await rest.request("POST", "/messages", "5", body=specs[0])
    assert single.items[0]["results"][0]["serials"] == [stored["one"]]


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


# ---------------------------------------------------------------------------------------------------------- presence


def _as(client_id: str) -> dict[str, Any]:
    """Options for a realtime client identified as `client_id`.

    ably-python 3.1.4's realtime client leaves its ``client_id`` option out of the token requests it signs (its
    ``Auth`` starts with no clientId when realtime), so the token comes back without one and the library fails with
    40102 "Client ID is immutable"; asking for it in the token parameters works.
    """
    return {"client_id": client_id, "default_token_params": {"client_id": client_id}}


def _presence(messages: list[PresenceMessage]) -> list[tuple[int, str, Any]]:
    return [(p.action, p.client_id, p.data) for p in messages]


async def _wildcard_realtime(emulator: AblyEmulator, capability: dict[str, list[str]]) -> AblyRealtime:
    """A realtime client whose token has the wildcard clientId, so it can enter presence for anyone."""
    options = emulator.client_options(client_id="*", default_token_params={"client_id": "*", "capability": capability})
    client = AblyRealtime(**options)
    await asyncio.wait_for(client.connection.once_async(ConnectionState.CONNECTED), TIMEOUT)
    return client


async def test_presence_enter_update_leave_sync_and_close(
    realtime_factory: Callable[..., Awaitable[AblyRealtime]], emulator: AblyEmulator
) -> None:
    watcher = await realtime_factory()
    inbox = Inbox()
    await watcher.channels.get("ai:room").presence.subscribe(inbox.add)
    alice = await realtime_factory(**_as("alice"))
    bob = await realtime_factory(**_as("bob"))
    alice_presence = alice.channels.get("ai:room").presence
    await alice_presence.enter({"status": "here"})
    await bob.channels.get("ai:room").presence.enter("hi")
    await alice_presence.update("busy")
    events = await inbox.wait_for(3)
    assert _presence(events) == [
        (PresenceAction.ENTER, "alice", {"status": "here"}),
        (PresenceAction.ENTER, "bob", "hi"),
        (PresenceAction.UPDATE, "alice", "busy"),
    ]
    alice_id = alice.connection.connection_manager.connection_id
    assert events[0].connection_id == alice_id
    assert events[0].id.startswith(f"{alice_id}:")

    # A client attaching later gets the members in a SYNC after ATTACHED (HAS_PRESENCE).
    late = await realtime_factory()
    members = await asyncio.wait_for(late.channels.get("ai:room").presence.get(), TIMEOUT)
    assert sorted((m.client_id, m.data, m.action) for m in members) == [
        ("alice", "busy", PresenceAction.PRESENT),
        ("bob", "hi", PresenceAction.PRESENT),
    ]

    await alice_presence.leave()
    await bob.close()  # a clean close: its members leave at once
    events = await inbox.wait_for(5)
    assert [(p.action, p.client_id) for p in events[3:]] == [
        (PresenceAction.LEAVE, "alice"),
        (PresenceAction.LEAVE, "bob"),
    ]
    assert await late.channels.get("ai:room").presence.get() == []
    assert emulator.presence_members("ai:room") == []


async def test_presence_requires_presence_capability(
    realtime_factory: Callable[..., Awaitable[AblyRealtime]], emulator: AblyEmulator
) -> None:
    reader = await realtime_factory(key=READ_ONLY, **_as("carol"))
    channel = reader.channels.get("ai:locked")
    await channel.attach()
    with pytest.raises(AblyException) as refused:
        await asyncio.wait_for(channel.presence.enter("no"), TIMEOUT)
    assert refused.value.code == 40160
    assert emulator.presence_members("ai:locked") == []


async def test_presence_sync_pages_and_rest_presence_pagination(emulator: AblyEmulator, rest: AblyRest) -> None:
    host = await _wildcard_realtime(emulator, {"ai:*": ["presence", "subscribe"]})
    late: AblyRealtime | None = None
    try:
        presence = host.channels.get("ai:crowd").presence
        await asyncio.gather(*(presence.enter_client(f"user{i:03d}", str(i)) for i in range(150)))
        assert len(emulator.presence_members("ai:crowd")) == 150

        late = AblyRealtime(**emulator.client_options())
        members = await asyncio.wait_for(late.channels.get("ai:crowd").presence.get(), TIMEOUT)
        assert sorted((m.client_id, m.data) for m in members) == [(f"user{i:03d}", str(i)) for i in range(150)]

        first = await rest.channels.get("ai:crowd").presence.get(limit=100)
        assert len(first.items) == 100
        assert first.has_next()
        second = await first.next()
        assert not second.has_next()
        assert sorted(m.client_id for m in [*first.items, *second.items]) == [f"user{i:03d}" for i in range(150)]
        assert {m.action for m in first.items} == {PresenceAction.PRESENT}
    finally:
        if late is not None:
            await late.close()
        await host.close()


async def test_dropped_connection_leaves_then_reenters_on_resume(
    realtime_factory: Callable[..., Awaitable[AblyRealtime]], emulator: AblyEmulator
) -> None:
    watcher = await realtime_factory()
    inbox = Inbox()
    await watcher.channels.get("ai:flaky").presence.subscribe(inbox.add)
    alice = await realtime_factory(**_as("alice"))
    await alice.channels.get("ai:flaky").presence.enter("v1")
    await inbox.wait_for(1)

    connection_id = alice.connection.connection_manager.connection_id
    assert emulator.drop_connections(connection_id) == 1  # presence_leave_delay=0: the member leaves at once
    events = await inbox.wait_for(3)  # ... and the resumed client enters again (RTP17i)
    assert _presence(events) == [
        (PresenceAction.ENTER, "alice", "v1"),
        (PresenceAction.LEAVE, "alice", "v1"),
        (PresenceAction.ENTER, "alice", "v1"),
    ]
    assert alice.connection.connection_manager.connection_id == connection_id
    assert emulator.presence_members("ai:flaky") == [("alice", connection_id, "v1")]


async def test_presence_leave_delay_keeps_members_of_a_resumed_connection() -> None:
    async with AblyEmulator({KEY: None}, presence_leave_delay=30.0) as emulator:
        watcher = AblyRealtime(**emulator.client_options())
        alice = AblyRealtime(**emulator.client_options(**_as("alice")))
        try:
            inbox = Inbox()
            await watcher.channels.get("ai:steady").presence.subscribe(inbox.add)
            await alice.channels.get("ai:steady").presence.enter("v1")
            await inbox.wait_for(1)
            connection_id = alice.connection.connection_manager.connection_id
            reconnected = asyncio.get_running_loop().create_future()
            alice.connection.once(
                ConnectionState.CONNECTED, lambda _: reconnected.done() or reconnected.set_result(None)
            )
            assert emulator.drop_connections(connection_id) == 1
            await asyncio.wait_for(reconnected, TIMEOUT)
            await alice.channels.get("ai:steady").presence.update("v2")
            events = await inbox.wait_for(2)
            assert _presence(events) == [
                (PresenceAction.ENTER, "alice", "v1"),
                (PresenceAction.UPDATE, "alice", "v2"),
            ]
            await alice.close()  # a clean close does not wait for the delay
            events = await inbox.wait_for(3)
            assert (events[2].action, events[2].client_id) == (PresenceAction.LEAVE, "alice")
        finally:
            await alice.close()
            await watcher.close()


# --------------------------------------------------------------------------------------------- mutable messages

AGENT_KEY = "app1.agent:ag3nt"
PLAIN_KEY = "app1.plain:pl4in"


@pytest.fixture
async def mutable_emulator() -> AsyncIterator[AblyEmulator]:
    keys = {
        AGENT_KEY: {"ai:*": ["publish", "subscribe", "history", "message-update-own"], "chat:*": ["*"]},
        PLAIN_KEY: {"ai:*": ["publish", "subscribe", "history"]},
    }
    async with AblyEmulator(keys, mutable_namespaces={"ai"}) as emu:
        yield emu


async def test_append_streams_fragments_and_history_aggregates(mutable_emulator: AblyEmulator) -> None:
    emulator = mutable_emulator
    writer = AblyRealtime(**emulator.client_options(AGENT_KEY, **_as("agent")))
    reader = AblyRealtime(**emulator.client_options(AGENT_KEY))
    rest = AblyRest(**emulator.client_options(AGENT_KEY, client_id="agent"))
    try:
        inbox = Inbox()
        await reader.channels.get("ai:chat").subscribe(inbox.add)
        channel = writer.channels.get("ai:chat")
        await channel.attach()
        created = await channel.publish("response", "")
        serial = created.serials[0]
        first = await channel.append_message(Message(data="Hel", serial=serial))
        second = await channel.append_message(Message(data="lo", serial=serial))
        assert serial < first.version_serial < second.version_serial

        received = await inbox.wait_for(3)
        assert [(m.action, m.serial, m.data) for m in received] == [
            (MessageAction.MESSAGE_CREATE, serial, ""),
            (MessageAction.MESSAGE_APPEND, serial, "Hel"),
            (MessageAction.MESSAGE_APPEND, serial, "lo"),
        ]
        assert [m.version.serial for m in received] == [serial, first.version_serial, second.version_serial]
        assert received[1].name == "response"
        assert received[1].id == received[0].id

        [whole] = (await rest.channels.get("ai:chat").history()).items
        assert (whole.serial, whole.data, whole.action) == (serial, "Hello", MessageAction.MESSAGE_UPDATE)
        assert whole.version.serial == second.version_serial
        assert (await rest.channels.get("ai:chat").get_message(serial)).data == "Hello"

        updated = await rest.channels.get("ai:chat").update_message(Message(data="Bye", serial=serial))
        assert updated.version_serial > second.version_serial
        received = await inbox.wait_for(4)
        assert (received[3].action, received[3].serial, received[3].data) == (
            MessageAction.MESSAGE_UPDATE,
            serial,
            "Bye",
        )
        assert [m.data for m in (await rest.channels.get("ai:chat").history()).items] == ["Bye"]
        assert [(m.data, m.position) for m in emulator.messages("ai:chat")] == [("Bye", updated.version_serial)]
    finally:
        await rest.close()
        await reader.close()
        await writer.close()


async def test_resumed_subscriber_receives_appends_it_missed(mutable_emulator: AblyEmulator) -> None:
    emulator = mutable_emulator
    writer = AblyRest(**emulator.client_options(AGENT_KEY, client_id="agent"))
    reader = AblyRealtime(**emulator.client_options(AGENT_KEY))
    try:
        inbox = Inbox()
        await reader.channels.get("ai:resume").subscribe(inbox.add)
        channel = writer.channels.get("ai:resume")
        serial = (await channel.publish("response", "a")).serials[0]
        await inbox.wait_for(1)
        connection_id = reader.connection.connection_manager.connection_id
        assert emulator.drop_connections(connection_id) == 1
        await channel.append_message(Message(data="b", serial=serial))
        await channel.append_message(Message(data="c", serial=serial))
        received = await inbox.wait_for(3)
        assert [(m.action, m.data) for m in received] == [
            (MessageAction.MESSAGE_CREATE, "a"),
            (MessageAction.MESSAGE_APPEND, "b"),
            (MessageAction.MESSAGE_APPEND, "c"),
        ]
        assert reader.connection.connection_manager.connection_id == connection_id
        assert [m.data for m in emulator.messages("ai:resume")] == ["abc"]
    finally:
        await reader.close()
        await writer.close()


async def test_updates_need_the_channel_rule_and_capability(mutable_emulator: AblyEmulator) -> None:
    emulator = mutable_emulator
    agent = AblyRealtime(**emulator.client_options(AGENT_KEY, **_as("agent")))
    plain = AblyRest(**emulator.client_options(PLAIN_KEY, client_id="agent"))
    agent_rest = AblyRest(**emulator.client_options(AGENT_KEY, client_id="agent"))
    try:
        # No "Message annotations, updates, deletes and appends" rule on the "chat" namespace: 93002.
        chat = agent.channels.get("chat:room")
        await chat.attach()
        serial = (await chat.publish("response", "x")).serials[0]
        with pytest.raises(AblyException) as no_rule:
            await chat.append_message(Message(data="y", serial=serial))
        assert (no_rule.value.code, no_rule.value.status_code) == (93002, 400)
        rest_serial = (await agent_rest.channels.get("chat:rest").publish("response", "x")).serials[0]
        with pytest.raises(AblyException) as no_rule_rest:
            await agent_rest.channels.get("chat:rest").append_message(Message(data="y", serial=rest_serial))
        assert (no_rule_rest.value.code, no_rule_rest.value.status_code) == (93002, 400)

        # A mutable namespace, but a key without message-update-own/any: 40160.
        ai_serial = (await plain.channels.get("ai:strict").publish("response", "x")).serials[0]
        with pytest.raises(AblyException) as denied:
            await plain.channels.get("ai:strict").update_message(Message(data="y", serial=ai_serial))
        assert (denied.value.code, denied.value.status_code) == (40160, 401)

        # An unknown serial: 404.
        ai = agent.channels.get("ai:strict")
        await ai.attach()
        with pytest.raises(AblyException) as missing:
            await ai.append_message(Message(data="y", serial="01234567890123-000000001@nowhere"))
        assert missing.value.status_code == 404
        assert [m.data for m in emulator.messages("ai:strict")] == ["x"]
        assert [m.data for m in emulator.messages("chat:room")] == ["x"]
    finally:
        await agent_rest.close()
        await plain.close()
        await agent.close()


# --------------------------------------------------------------------------------------------------- statistics


async def test_stats_count_creates_and_operations_per_channel_and_connection(mutable_emulator: AblyEmulator) -> None:
    emulator = mutable_emulator
    writer = AblyRealtime(**emulator.client_options(AGENT_KEY, **_as("agent")))
    rest = AblyRest(**emulator.client_options(AGENT_KEY, client_id="agent"))
    try:
        channel = writer.channels.get("ai:stats")
        first = (await channel.publish("response", "a")).serials[0]
        await channel.publish([Message(name="e", data="b", id="m:0"), Message(name="e", data="c", id="m:1")])
        await channel.publish(Message(name="e", data="b", id="m:0"))  # a retry: stored once, counted once
        await channel.append_message(Message(data="+", serial=first))
        await channel.append_message(Message(data="+", serial=first))
        await channel.update_message(Message(data="d", serial=first))
        await writer.channels.get("ai:other").publish("response", "x")
        await rest.channels.get("ai:stats").publish("response", "rest")  # REST: a channel's, no connection's

        stats = emulator.channel_stats("ai:stats")
        assert stats.messages == 7
        assert stats.operations == {"create": 4, "append": 2, "update": 1}
        assert (stats.count("create"), stats.count("append"), stats.count("delete")) == (4, 2, 0)
        assert stats.duplicates == 1
        assert stats.refused == 0
        assert stats.peak_per_second == 7  # all within one second
        assert emulator.channel_stats("ai:other").messages == 1
        assert emulator.channel_stats("ai:never").messages == 0

        connection_id = writer.connection.connection_manager.connection_id
        connections = emulator.connection_stats()
        assert set(connections) == {connection_id}  # REST publishes have no connection
        inbound = connections[connection_id]
        assert inbound.messages == 7  # 6 on ai:stats, 1 on ai:other
        assert inbound.operations == {"create": 4, "append": 2, "update": 1}
        assert inbound.duplicates == 1

        emulator.reset_stats()
        assert emulator.channel_stats("ai:stats").messages == 0
        assert emulator.connection_stats() == {}
        assert len(emulator.messages("ai:stats")) == 4  # what is stored stays
    finally:
        await rest.close()
        await writer.close()


async def test_stats_peak_is_the_busiest_second(rest: AblyRest, emulator: AblyEmulator) -> None:
    channel = rest.channels.get("ai:peak")
    for index in range(3):
        await channel.publish("e", str(index))
    await asyncio.sleep(1.05)
    for index in range(2):
        await channel.publish("e", str(index))
    stats = emulator.channel_stats("ai:peak")
    assert (stats.messages, stats.peak_per_second) == (5, 3)
    await channel.publish([Message(name="e", data=str(index)) for index in range(2)])
    assert emulator.channel_stats("ai:peak").peak_per_second == 4


async def test_rate_limits_are_enforced_unless_turned_off() -> None:
    keys = {KEY: None}
    async with AblyEmulator(keys, channel_rate_limit=3, connection_rate_limit=4) as emulator:  # as Ably: enforced
        client = AblyRealtime(**emulator.client_options(KEY))
        try:
            busy = client.channels.get("ai:busy")
            for index in range(3):
                await busy.publish("e", str(index))
            with pytest.raises(AblyException) as per_channel:
                await busy.publish("e", "too many")
            assert (per_channel.value.code, per_channel.value.status_code) == (42913, 429)
            await client.channels.get("ai:quiet").publish("e", "fourth on the connection")
            with pytest.raises(AblyException) as per_connection:
                await client.channels.get("ai:third").publish("e", "fifth on the connection")
            assert (per_connection.value.code, per_connection.value.status_code) == (42911, 429)
            assert [m.data for m in emulator.messages("ai:busy")] == ["0", "1", "2"]
            assert emulator.messages("ai:third") == []
            assert emulator.channel_stats("ai:busy").refused == 1
            [inbound] = emulator.connection_stats().values()
            assert (inbound.messages, inbound.refused, inbound.peak_per_second) == (4, 2, 4)
            await asyncio.sleep(1.05)  # a second later there is room again
            await busy.publish("e", "later")
            assert emulator.channel_stats("ai:busy").messages == 4
        finally:
            await client.close()
    async with AblyEmulator(keys, enforce_rate_limits=False) as emulator:  # counted only
        client = AblyRealtime(**emulator.client_options(KEY))
        try:
            channel = client.channels.get("ai:free")
            for index in range(60):
                await channel.publish("e", str(index))
            stats = emulator.channel_stats("ai:free")
            assert (stats.messages, stats.peak_per_second, stats.refused) == (60, 60, 0)
        finally:
            await client.close()
