"""The Ably backend's own behaviour over the emulator: URLs, retries, disconnects, deletion, snapshots, presence."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from durable_ai.backend import Channel, LogPosition, PresenceEntry, StoredMessage
from durable_ai.errors import BackendUnavailable, ConfigurationError, LogReset
from durable_ai_ably import AblyBackend, from_url, options_from_url
from durable_ai_ably.testing import AblyEmulator
from durable_ai_ably.testing.emulator import store as emulator_store

KEY = "app1.full:s3cret"
EVENTS = Channel("s1", "events")
CONTROL = Channel("s1", "control")


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    async with AblyEmulator({KEY: None}) as emu:
        yield emu


@pytest.fixture
async def backend(emulator: AblyEmulator) -> AsyncIterator[AblyBackend]:
    backend = AblyBackend(
        options_from_url(f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false&publish_timeout=5")
    )
    await backend.open()
    yield backend
    await backend.close()


async def _all(backend: AblyBackend, start: LogPosition | None = None) -> list[StoredMessage]:
    return [m async for m in backend.read(EVENTS, start=start, follow=False)]


def test_from_url() -> None:
    backend = from_url("ably://?key=a.b:c&namespace=chat&rate_limit=0&max_message_bytes=32768")
    assert isinstance(backend, AblyBackend)
    assert backend.options.namespace == "chat"
    assert backend.limits.max_messages_per_second is None
    assert backend.limits.max_message_bytes == 32768
    assert backend.channel_name("s", "control") == "chat:s:control"
    assert options_from_url("ably://a.b:c@").key == "a.b:c"
    for bad in (
        "ably://",
        "ably://?key=nokey",
        "ably://?key=a.b:c&nope=1",
        "ably://?key=a.b:c&tls=maybe",
        "ably://?key=a.b:c&appends=sometimes",
        "ably://?key=a.b:c&transport=carrier-pigeon",
    ):
        with pytest.raises(ConfigurationError):
            from_url(bad)


async def test_publish_read_head_and_inclusive_start(backend: AblyBackend, emulator: AblyEmulator) -> None:
    assert await backend.head(EVENTS) is None
    positions = [await backend.publish(EVENTS, f"m{i}\n".encode(), message_id=f"id{i}") for i in range(3)]
    assert [m.data for m in await _all(backend)] == [b"m0\n", b"m1\n", b"m2\n"]
    assert [m.data for m in await _all(backend, positions[1])] == [b"m1\n", b"m2\n"]
    assert await backend.head(EVENTS) == positions[2]
    assert [m.name for m in emulator.messages("ai:s1")] == ["e", "e", "e"]


async def test_nacked_publish_is_retried_without_a_duplicate(backend: AblyBackend, emulator: AblyEmulator) -> None:
    await backend.publish(EVENTS, b"warm", message_id="w")
    emulator.nack_next(2, code=50001, status=500)
    first = await backend.publish(EVENTS, b"x", message_id="same")
    again = await backend.publish(EVENTS, b"x", message_id="same")
    assert first == again
    assert [m.data for m in emulator.messages("ai:s1")] == ["warm", "x"]


async def test_binary_payloads_round_trip(backend: AblyBackend) -> None:
    data = os.urandom(300)
    await backend.publish(EVENTS, data, message_id="bin")
    [message] = await _all(backend)
    assert message.data == data


async def test_a_dropped_connection_ends_a_live_read(backend: AblyBackend, emulator: AblyEmulator) -> None:
    await backend.publish(EVENTS, b"a", message_id="a")
    reader = backend.read(EVENTS, start=None, follow=True)
    assert (await anext(reader)).data == b"a"
    pending = asyncio.ensure_future(anext(reader))
    # The reader attached its live subscription before reading history, so the drop reaches it whenever it strikes.
    emulator.drop_connections()
    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(pending, 10)
    await reader.aclose()


async def test_live_read_continues_after_the_backlog(backend: AblyBackend) -> None:
    await backend.publish(EVENTS, b"a", message_id="a")
    reader = backend.read(EVENTS, start=None, follow=True)
    assert (await anext(reader)).data == b"a"
    await backend.publish(EVENTS, b"b", message_id="b")
    assert (await asyncio.wait_for(anext(reader), 10)).data == b"b"
    await reader.aclose()


@pytest.fixture(params=["clock", "one millisecond"])
def clock(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The emulator's clock as it runs, or standing still: every serial of every channel from one millisecond,
    where only the serials of one channel are ordered (as on Ably)."""
    if request.param == "one millisecond":
        frozen = int(time.time() * 1000)
        monkeypatch.setattr(emulator_store, "now_ms", lambda: frozen)
    return str(request.param)


async def test_delete_resets_old_cursors_and_hides_old_messages(backend: AblyBackend, clock: str) -> None:
    """Each channel's messages are hidden by a floor of its own channel: before, the delete marker's serial on the
    meta channel was compared with other channels' serials, which Ably does not order (a snapshot saved in the
    same millisecond survived the deletion)."""
    old = await backend.publish(EVENTS, b"old", message_id="o")
    await backend.publish(CONTROL, b"old control", message_id="oc")
    await backend.save_snapshot("s1", b"snap")
    await backend.delete("s1")
    assert await backend.head(EVENTS) is None
    assert await backend.load_snapshot("s1") is None
    new = await backend.publish(EVENTS, b"new", message_id="n")
    assert new.epoch != old.epoch
    with pytest.raises(LogReset):
        await _all(backend, old)
    assert [m.data for m in await _all(backend)] == [b"new"]
    assert await backend.head(CONTROL) is None
    assert [m.data async for m in backend.read(CONTROL, start=None, follow=False)] == []
    await backend.save_snapshot("s1", b"after")
    assert await backend.load_snapshot("s1") == b"after"


async def test_large_snapshots_are_chunked(backend: AblyBackend) -> None:
    assert await backend.load_snapshot("s1") is None
    data = os.urandom(150_000)  # incompressible: three messages or more
    await backend.save_snapshot("s1", data)
    assert await backend.load_snapshot("s1") == data
    await backend.save_snapshot("s1", b"small")
    assert await backend.load_snapshot("s1") == b"small"


async def test_presence(backend: AblyBackend, emulator: AblyEmulator) -> None:
    await backend.enter_presence("s1", "agent-1", b'{"role":"agent"}', role="agent")
    await backend.enter_presence("s1", "tab-1", b"\xff\x00", role="client")
    assert sorted(await backend.presence("s1"), key=lambda e: e.member_id) == [
        PresenceEntry("agent-1", "agent", b'{"role":"agent"}'),
        PresenceEntry("tab-1", "client", b"\xff\x00"),
    ]
    await backend.leave_presence("s1", "agent-1", role="agent")
    assert await backend.presence("s1") == [PresenceEntry("tab-1", "client", b"\xff\x00")]
