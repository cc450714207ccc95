"""The wire vocabulary as a subscriber meets it: typed events, forward compatibility, control validation."""

from __future__ import annotations

import asyncio
import json

import pytest

from durable_ai import Hub, Reset, RunStart, TextDelta, UnknownEvent, UserMessage
from durable_ai.backend import Channel
from durable_ai.backends.memory import MemoryBackend
from durable_ai.errors import ProtocolError
from durable_ai.events import ControlRejected, decode_records, parse_control
from durable_ai.testing.scenarios import text_of


async def _raw(backend: MemoryBackend, session: str, *lines: dict[str, object]) -> None:
    data = b"\n".join(json.dumps(line).encode() for line in lines)
    await backend.publish(Channel(session, "events"), data, message_id=f"raw-{id(lines)}")


async def test_unknown_event_types_pass_through_untouched(hub: Hub, backend: MemoryBackend) -> None:
    future = {"v": 1, "id": "e1", "type": "citation-v2", "session": "s", "ts": 5, "run_id": None, "source": [1, 2]}
    newer = {"v": 2, "id": "e2", "type": "text-delta", "session": "s", "ts": 6, "shape": "new"}
    broken = {"v": 1, "id": "e3", "type": "text-delta", "session": "s", "ts": 7}  # no part_id, no delta
    known = {"v": 1, "id": "e4", "type": "user-message", "session": "s", "ts": 8, "message_id": "m", "content": "hi"}
    await _raw(backend, "s", future, newer, broken, known)
    events = [e async for e in hub.session("s").events(follow=False)]
    assert [type(e) for e in events] == [UnknownEvent, UnknownEvent, UnknownEvent, UserMessage]
    assert events[0].raw == future
    assert events[1].raw == newer
    assert events[2].raw == broken
    assert all(e.cursor is not None for e in events)


async def test_foreign_bytes_in_the_log_are_skipped_not_fatal(hub: Hub, backend: MemoryBackend) -> None:
    await backend.publish(Channel("s", "events"), b"\xff not json", message_id="junk")
    async with hub.session("s").run(agent="a") as run:
        await run.text("fine")
    events = [e async for e in hub.session("s").events(follow=False)]
    assert [e.type for e in events] == ["run-start", "text-delta", "run-end"]


async def test_events_are_typed_and_carry_their_run(hub: Hub) -> None:
    session = hub.session("typed")
    async with session.run(agent="writer", run_id="run-1", message_id="msg-1") as run:
        await run.text("hi")
    events = [e async for e in session.events(follow=False)]
    start, delta = events[0], events[1]
    assert isinstance(start, RunStart) and start.message_id == "msg-1" and start.agent == "writer"
    assert isinstance(delta, TextDelta) and delta.run_id == "run-1" and delta.session == "typed"
    assert start.v == 1 and start.ts > 0
    with pytest.raises(ValueError):
        delta.delta = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "reason", "control_id"),
    [
        (b"{", "not JSON", None),
        (b'"cancel"', "not a JSON object", None),
        (b'{"v":1,"id":"c1","type":"launch"}', "unknown control type 'launch'", "c1"),
        (b'{"v":1,"id":"c2","type":"steer"}', "malformed steer: text: Field required", "c2"),
        (b'{"v":1,"id":"c3","type":"cancel","extra":1}', "extra: Extra inputs are not permitted", "c3"),
        (b'{"v":1,"id":"c4","type":"prompt","message_id":"m","content":"x","strategy":"yolo"}', "strategy", "c4"),
        (b'{"v":2,"id":"c5","type":"cancel"}', "v:", "c5"),
        (b'{"v":1,"id":"' + b"x" * 200 + b'","type":"cancel"}', "id:", None),
    ],
)
def test_malformed_controls_are_rejected_with_a_reason(data: bytes, reason: str, control_id: str | None) -> None:
    with pytest.raises(ControlRejected) as caught:
        parse_control(data, max_bytes=1024)
    assert reason in caught.value.reason
    assert caught.value.control_id == control_id


def test_oversized_controls_are_rejected_before_parsing() -> None:
    data = b'{"v":1,"id":"c","type":"steer","text":"' + b"x" * 2000 + b'"}'
    with pytest.raises(ControlRejected) as caught:
        parse_control(data, max_bytes=1024)
    assert "over the limit of 1024 bytes" in caught.value.reason


async def test_cursor_of_another_session_or_epoch_yields_reset(hub: Hub) -> None:
    async with hub.session("a").run(agent="w") as run:
        await run.text("in a")
    async with hub.session("b").run(agent="w") as run:
        await run.text("in b")
    cursor_in_a = [e async for e in hub.session("a").events(follow=False)][-1].cursor
    events = [e async for e in hub.session("b").events(after=cursor_in_a, follow=False)]
    assert isinstance(events[0], Reset)
    assert [e.type for e in events[1:]] == ["run-start", "text-delta", "run-end"]


async def test_a_deleted_session_yields_a_reset_even_when_nothing_replaced_it(hub: Hub) -> None:
    async with hub.session("s").run(agent="w") as run:
        await run.text("gone soon")
    cursor = [e async for e in hub.session("s").events(follow=False)][-1].cursor
    await hub.session("s").delete()
    events = [e async for e in hub.session("s").events(after=cursor, follow=False)]
    assert len(events) == 1 and isinstance(events[0], Reset)
    assert events[0].cursor is None and "recreated" in events[0].reason


async def test_a_live_follower_is_told_when_the_session_is_deleted(hub: Hub, client_hub: Hub) -> None:
    async with hub.session("s").run(agent="w") as run:
        await run.text("old")
    async with client_hub.session("s").events() as follower:  # reading live before, during and after
        old = [await asyncio.wait_for(anext(follower), 5) for _ in range(3)]
        await hub.session("s").delete()
        async with hub.session("s").run(agent="w") as run:
            await run.text("new")
        events = [await asyncio.wait_for(anext(follower), 5) for _ in range(4)]
    assert [e.type for e in old] == ["run-start", "text-delta", "run-end"]
    assert isinstance(events[0], Reset) and events[0].reason == "the session was deleted"
    assert [e.type for e in events[1:]] == ["run-start", "text-delta", "run-end"]
    assert text_of(events) == "new"


@pytest.mark.parametrize(
    ("data", "count"),
    [(b'{"a":1}', 1), (b'  {"a":1}  ', 1), (b'{"a":1}\n{"b":2}\n', 2), (b'\n\n{"a":1}\n', 1), (b"", 0)],
)
def test_decode_records_reads_one_object_per_line(data: bytes, count: int) -> None:
    assert len(decode_records(data)) == count


@pytest.mark.parametrize("data", [b'{"a":1} trailing', b"[1, 2]", b'{"a":"\xff"}', b'{"a":1}\n{oops', b"not json"])
def test_decode_records_refuses_what_is_not_wire_data(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_records(data)
