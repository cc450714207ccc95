"""What the NATS backend does beyond the conformance suite: its layout, consumers, snapshots, presence, options."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import StreamConfig

import durable_ai
from durable_ai import Coalesce, Reset, Run, RunEnd
from durable_ai.backend import Channel, LogPosition, PresenceEntry
from durable_ai.errors import BackendError, ConfigurationError, LogReset, PublishRefused, RunIdInUse
from durable_ai.testing.scenarios import collect, text_of
from durable_ai_nats import NatsBackend, NatsOptions, PendingBufferFull, from_url, names
from durable_ai_nats._replies import Replies
from durable_ai_nats.testing import NatsServer, free_ports


def _url(server: NatsServer, prefix: str, query: str = "") -> str:
    return f"{server.url}?prefix={prefix}{query}"


async def _consumers(server: NatsServer, prefix: str) -> int:
    nc = await nats.connect(server.url)
    try:
        info = await nc.jsm().stream_info(names(prefix).stream)
        return int(info.state.consumer_count)
    finally:
        await nc.close()


async def _consumers_become(server: NatsServer, prefix: str, count: int, within: float = 5.0) -> int:
    """The stream's consumer count once it equals ``count``, or what it is after ``within`` seconds.

    A reader's close deletes its consumer in the background (the reader does not wait for the server), so the
    count is polled until it settles rather than read once.
    """
    for _ in range(round(within / 0.05)):
        if (now := await _consumers(server, prefix)) == count:
            return now
        await asyncio.sleep(0.05)  # the server's state has no event to wait on
    return await _consumers(server, prefix)


async def test_stream_is_created_with_the_options(nats_server: NatsServer, prefix: str) -> None:
    url = _url(nats_server, prefix, "&max_messages=500&max_age=3600&duplicate_window=30&storage=memory")
    async with durable_ai.connect(url) as hub, hub.session("s").run(agent="writer") as run:
        await run.status("hello")
        await hub.session("s").cancel()  # the control stream too
    nc = await nats.connect(nats_server.url)
    try:
        config = (await nc.jsm().stream_info(names(prefix).stream)).config
        control = (await nc.jsm().stream_info(names(prefix).control_stream)).config
    finally:
        await nc.close()
    # Events and controls in streams of their own: no shared duplicate window or id space.
    assert config.subjects == [f"{prefix}.*.events", f"{prefix}._epoch"]
    assert control.subjects == [f"{prefix}.*.control", f"{prefix}._epoch_control"]
    for each in (config, control):
        assert (each.max_msgs_per_subject, each.max_age, each.duplicate_window) == (500, 3600, 30)
        assert each.storage == "memory"
        assert each.allow_msg_ttl and each.allow_direct and not each.allow_rollup_hdrs
        assert each.max_consumers == 10_000
        assert each.consumer_limits is not None and each.consumer_limits.inactive_threshold == 30


async def test_one_live_consumer_per_session_and_none_left_after_close(nats_server: NatsServer, prefix: str) -> None:
    url = _url(nats_server, prefix)
    async with durable_ai.connect(url) as agent, durable_ai.connect(url) as client:
        async with agent.session("s").run(agent="writer") as run:
            await run.text("warm")
        streams = [client.session("s").events() for _ in range(5)]
        for stream in streams:
            assert text_of([await anext(stream) for _ in range(3)]) == "warm"  # run-start, delta, run-end
        # Five subscribers of one session in one process share one live consumer.
        assert await _consumers(nats_server, prefix) == 1
        async with agent.session("s").run(agent="writer") as run:
            await run.text("live")
        for stream in streams:
            events = [await asyncio.wait_for(anext(stream), 10) for _ in range(3)]
            assert text_of(events) == "live"
            await stream.aclose()
        # Well inside the consumer's inactivity threshold (30 s), which would remove it anyway.
        assert await _consumers_become(nats_server, prefix, 0) == 0, "closing the readers left consumers on the server"


async def test_a_subscriber_that_falls_behind_the_feed_reads_the_backlog(nats_server: NatsServer, prefix: str) -> None:
    """With a tiny per-reader queue, a stalled subscriber overflows and catches up from the log, losing nothing."""
    url = _url(nats_server, prefix, "&tap_limit=3")
    async with (
        durable_ai.connect(url, coalesce=Coalesce.off()) as agent,
        durable_ai.connect(url) as client,
    ):
        stream = client.session("s").events()
        async with agent.session("s").run(agent="writer") as run:
            await run.text("0 ")
            first = await asyncio.wait_for(anext(stream), 10)
            for i in range(1, 200):
                await run.text(f"{i} ")
        await agent.flush()
        rest = await collect(stream, until=lambda e: e.type == "run-end")
    assert text_of([first, *rest]) == "".join(f"{i} " for i in range(200))


async def test_large_snapshots_are_compressed_or_split(nats_server: NatsServer, prefix: str) -> None:
    backend = NatsBackend(nats_server.url, NatsOptions(prefix=prefix))
    await backend.open()
    try:
        text = b'{"messages": "' + b"all work and no play " * 200_000 + b'"}'  # 4 MiB, compresses well
        noise = os.urandom(3 * 1024 * 1024)  # 3 MiB that does not compress: split over several keys
        await backend.save_snapshot("a", text)
        await backend.save_snapshot("b", noise)
        assert await backend.load_snapshot("a") == text
        assert await backend.load_snapshot("b") == noise
        assert await backend.load_snapshot("none") is None
        await backend.delete("b")
        assert await backend.load_snapshot("b") is None
    finally:
        await backend.close()


async def test_presence_leaves_when_the_backend_closes(nats_server: NatsServer, prefix: str) -> None:
    first = NatsBackend(nats_server.url, NatsOptions(prefix=prefix))
    other = NatsBackend(nats_server.url, NatsOptions(prefix=prefix))
    await first.open()
    await other.open()
    try:
        await first.enter_presence("s", "tab/1 é", b'{"role":"client"}', role="client")
        await first.enter_presence("s", "run-1", b"{}", role="agent")
        await first.enter_presence("t", "tab-2", b"{}", role="client")
        assert sorted(await other.presence("s"), key=lambda e: e.role) == [
            PresenceEntry("run-1", "agent", b"{}"),
            PresenceEntry("tab/1 é", "client", b'{"role":"client"}'),
        ]
        await first.close()
        assert await other.presence("s") == []
        assert await other.presence("t") == []
    finally:
        await other.close()


async def test_presence_the_server_refuses_is_an_error_and_keeps_the_entry_before(
    nats_server: NatsServer, prefix: str
) -> None:
    """Presence writes are acknowledged through the connection's reply subscription: an error answer (here the
    presence stream's 16 KiB message limit) must still raise, at once, and leave the stored entry as it was."""
    backend = NatsBackend(nats_server.url, NatsOptions(prefix=prefix, publish_timeout=5.0))
    await backend.open()
    try:
        await backend.enter_presence("s", "tab-1", b'{"n":1}', role="client")
        started = asyncio.get_running_loop().time()
        with pytest.raises(BackendError, match="maximum"):
            await backend.enter_presence("s", "tab-1", b"x" * (20 * 1024), role="client")
        assert asyncio.get_running_loop().time() - started < 2.0  # answered, not timed out
        assert await backend.presence("s") == [PresenceEntry("tab-1", "client", b'{"n":1}')]
    finally:
        await backend.close()


async def test_a_recreated_stream_resets_old_cursors(nats_server: NatsServer, prefix: str) -> None:
    url = _url(nats_server, prefix)
    async with durable_ai.connect(url) as hub:
        async with hub.session("s").run(agent="writer") as run:
            await run.text("old")
        old = await collect(hub.session("s").events(follow=False))
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jsm().delete_stream(names(prefix).stream)
        finally:
            await nc.close()
        async with hub.session("s").run(agent="writer") as run:
            await run.text("new")
        after = await collect(hub.session("s").events(after=old[-1].cursor, follow=False))
    assert isinstance(after[0], Reset)
    assert text_of(after) == "new"


async def test_head_and_publish_positions(nats_server: NatsServer, prefix: str) -> None:
    backend = NatsBackend(nats_server.url, NatsOptions(prefix=prefix))
    await backend.open()
    try:
        channel = Channel("s", "events")
        assert await backend.head(channel) is None
        first = await backend.publish(channel, b"{}", message_id="m1")
        again = await backend.publish(channel, b"{}", message_id="m1")
        second = await backend.publish(channel, b"{}", message_id="m2")
        assert first == again and int(second.position or 0) > int(first.position or 0)
        assert await backend.head(channel) == second
    finally:
        await backend.close()


def test_url_options() -> None:
    backend = from_url(
        "nats://u:p@a:4222,b:4223?prefix=app&replicas=3&max_age=0&max_messages=0&control_ttl=60&inbox_prefix=_IN_x"
    )
    assert backend.servers == ["nats://u:p@a:4222", "nats://u:p@b:4223"]
    o = backend.options
    assert (o.prefix, o.replicas, o.max_age, o.max_messages, o.control_ttl) == ("app", 3, None, None, 60.0)
    assert o.connect == {"inbox_prefix": "_IN_x"}
    assert names("app").stream == "APP" and names("my-app").stream == "MY_APP"
    assert names("app").control_stream == "APP_CONTROL"
    tuned = from_url(
        "nats://h?ping_interval=1.5&max_outstanding_pings=3&tap_bytes=1000000&feed_subjects=50"
        "&max_consumers=500&consumer_idle=20"
    ).options
    assert (tuned.ping_interval, tuned.max_outstanding_pings, tuned.tap_bytes) == (1.5, 3, 1_000_000)
    assert (tuned.feed_subjects, tuned.max_consumers, tuned.consumer_idle) == (50, 500, 20.0)
    for bad in (
        "nats://h?nope=1",
        "nats://h?replicas=x",
        "nats://h?prefix=a.b",
        "nats://h?replicas=9",
        "nats://h?ping_interval=0",
        "nats://h?consumer_idle=1",  # shorter than three heartbeats
        "nats://h?feed_subjects=0",
    ):
        with pytest.raises(ConfigurationError):
            from_url(bad)


async def test_unreachable_server_fails_fast(prefix: str) -> None:
    (port,) = free_ports()  # bound, then released: nothing listens there
    hub = durable_ai.connect(f"nats://127.0.0.1:{port}?connect_timeout=0.5")
    with pytest.raises(durable_ai.BackendUnavailable, match="cannot connect to NATS"):
        await hub.__aenter__()


async def test_a_full_reconnect_buffer_is_a_typed_error_and_loses_nothing(prefix: str) -> None:
    """While the server is away, publishes beyond nats-py's reconnect buffer get PendingBufferFull, never a drop."""
    async with NatsServer() as server:
        options = NatsOptions(prefix=prefix, publish_timeout=1.0, connect={"pending_size": 64 * 1024})
        backend = NatsBackend(server.url, options)
        await backend.open()
        try:
            channel = Channel("s", "events")
            await backend.publish(channel, b'{"n":0}', message_id="m0")
            await server.kill()
            async with asyncio.timeout(10):
                while backend.connection.is_connected:  # noqa: ASYNC110 - nats-py offers no awaitable for it
                    await asyncio.sleep(0.01)
            blob = b'{"blob":"' + b"x" * 40_000 + b'"}'
            with pytest.raises(durable_ai.BackendUnavailable):
                await backend.publish(channel, blob, message_id="m1")  # buffered, unconfirmed: may still land
            with pytest.raises(PendingBufferFull):
                await backend.publish(channel, blob, message_id="m2")
            await server.restart()
            async with asyncio.timeout(10):
                while not backend.connection.is_connected:  # noqa: ASYNC110 - nats-py offers no awaitable for it
                    await asyncio.sleep(0.05)
            # The writer's retry, under the same ids, stores each message once.
            for message_id in ("m1", "m2"):
                await backend.publish(channel, blob, message_id=message_id)
            stored = [m async for m in backend.read(channel, start=None, follow=False)]
        finally:
            await backend.close()
    assert [len(m.data) for m in stored] == [7, len(blob), len(blob)]


async def test_presence_of_a_crashed_member_expires(nats_server: NatsServer, prefix: str) -> None:
    options = NatsOptions(prefix=prefix, presence_ttl=1.0)
    crashed, watcher = NatsBackend(nats_server.url, options), NatsBackend(nats_server.url, options)
    await crashed.open()
    await watcher.open()
    try:
        await crashed.enter_presence("s", "agent-1", b"{}", role="agent")
        assert [e.member_id for e in await watcher.presence("s")] == ["agent-1"]
        # A process that dies neither leaves nor refreshes its entry: stop the refresher, forget the entry.
        await crashed._presence.close(None)
        async with asyncio.timeout(10):
            while await watcher.presence("s"):  # noqa: ASYNC110 - the state is on the server: poll it
                await asyncio.sleep(0.1)
    finally:
        await watcher.close()
        await crashed.close()


async def test_a_reader_outrun_by_retention_gets_a_reset(nats_server: NatsServer, prefix: str) -> None:
    """A live reader that overflowed its queue while retention dropped its place is told, not skipped ahead."""
    url = _url(nats_server, prefix, "&tap_limit=2&max_messages=5")
    async with durable_ai.connect(url, coalesce=Coalesce.off()) as agent, durable_ai.connect(url) as client:
        stream = client.session("s").events()
        async with agent.session("s").run(agent="writer") as run:
            await run.status("first")
            seen = [await asyncio.wait_for(anext(stream), 10) for _ in range(2)]  # run-start, status
            for i in range(30):
                await run.status(f"status {i}")
        rest = await collect(stream, until=lambda e: e.type == "run-end")
    assert [e.type for e in seen] == ["run-start", "status"]
    assert isinstance(rest[0], Reset), f"no reset before {[e.type for e in rest[:3]]}"
    statuses = [e.text for e in rest if e.type == "status"]  # type: ignore[attr-defined]
    assert statuses == [f"status {i}" for i in range(26, 30)]


async def test_hubs_sharing_a_backend_open_one_connection(nats_server: NatsServer, prefix: str) -> None:
    backend = NatsBackend(nats_server.url, NatsOptions(prefix=prefix))
    hubs = [durable_ai.connect(backend) for _ in range(3)]
    await asyncio.gather(*(hub.__aenter__() for hub in hubs))
    connection = backend.connection
    async with hubs[0].session("s").run(agent="writer") as run:
        await run.text("shared")
    for hub in hubs[:2]:
        await hub.__aexit__(None, None, None)
    assert connection.is_connected, "the backend closed while a hub still used it"
    assert text_of(await collect(hubs[2].session("s").events(follow=False))) == "shared"
    await hubs[2].__aexit__(None, None, None)
    assert connection.is_closed


async def test_retention_during_a_catch_up_read_is_a_reset_never_a_gap(nats_server: NatsServer, prefix: str) -> None:
    """Messages that retention removes while a reader goes through them end the read with LogReset."""
    backend = NatsBackend(nats_server.url, NatsOptions(prefix=prefix, max_messages=20))
    await backend.open()
    try:
        channel = Channel("s", "events")
        blob = b"x" * 100_000
        first = await backend.publish(channel, blob, message_id="m0")
        for n in range(1, 20):
            await backend.publish(channel, blob, message_id=f"m{n}")
        reader = backend.read(channel, start=first, follow=False)
        seen = [(await anext(reader)).position]
        for n in range(20, 40):  # the log keeps 20: every message the reader has not read yet goes
            await backend.publish(channel, blob, message_id=f"m{n}")
        with pytest.raises(LogReset):
            async for message in reader:
                seen.append(message.position)
        await reader.aclose()  # type: ignore[attr-defined]
    finally:
        await backend.close()
    # Whatever it read before the reset, it read in order and without a hole it did not report.
    assert [int(p) for p in seen] == sorted(int(p) for p in seen)


async def test_a_consumer_the_server_refuses_is_an_error_not_a_retry_loop(nats_server: NatsServer, prefix: str) -> None:
    """Past the streams' max_consumers, following one more session raises at once, naming the limit."""
    url = _url(nats_server, prefix, "&max_consumers=3&feed_subjects=1")
    sessions = [f"s{n}" for n in range(5)]
    async with durable_ai.connect(url) as hub:
        for session in sessions:
            await hub.session(session).user_message("hi")
        followers: list[AsyncIterator[durable_ai.Event]] = []
        refused: list[BaseException] = []
        try:
            async with asyncio.timeout(20):
                for session in sessions:  # each follower holds one live consumer (one session per consumer)
                    follower = hub.session(session).events()
                    followers.append(follower)
                    try:
                        await anext(follower)
                    except BackendError as exc:
                        refused.append(exc)
                        break
        finally:
            for follower in followers:
                await follower.aclose()  # type: ignore[attr-defined]
    assert refused, "every follower got a consumer past the limit"
    assert "max_consumers" in str(refused[0])


async def test_a_duplicate_ack_for_another_subject_is_an_error(nats_server: NatsServer, prefix: str) -> None:
    """A dedupe key taken by a message on another subject is never taken for 'stored'."""
    backend = NatsBackend(nats_server.url, NatsOptions(prefix=prefix))
    await backend.open()
    nc = await nats.connect(nats_server.url)
    try:
        await backend.publish(Channel("a", "events"), b"{}", message_id="first")  # creates the stream
        # A writer outside the SDK stores a message under a's next key, on b's subject.
        await nc.jetstream().publish(names(prefix).subject("b", "events"), b"{}", headers={"Nats-Msg-Id": "a:next"})
        with pytest.raises(BackendError, match="another subject"):
            await backend.publish(Channel("a", "events"), b'{"n":1}', message_id="next")
        # The same id under its own subject is the idempotent retry it looks like.
        position = await backend.publish(Channel("a", "events"), b'{"n":2}', message_id="again")
        assert await backend.publish(Channel("a", "events"), b'{"n":2}', message_id="again") == position
    finally:
        await nc.close()
        await backend.close()


async def test_a_stream_of_the_older_layout_is_brought_to_this_one(nats_server: NatsServer, prefix: str) -> None:
    """A stream that also holds controls, without direct gets or consumer limits, is changed where needed."""
    stream = names(prefix).stream
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jsm().add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.*.events", f"{prefix}.*.control"]))
        async with durable_ai.connect(_url(nats_server, prefix)) as hub:

            async def work() -> Run:
                async with hub.session("s").run(agent="writer") as run:
                    await run.text("hi")
                    await asyncio.Event().wait()
                return run

            async with asyncio.timeout(20), asyncio.TaskGroup() as group:
                task = group.create_task(work())
                follower = hub.session("s").events()
                first = await anext(follower)
                ack = await (await hub.session("s").cancel(first.run_id)).ack(timeout=10)
                await follower.aclose()  # type: ignore[attr-defined]
            assert ack.outcome == "applied" and task.result().cancelled
        config = (await nc.jsm().stream_info(stream)).config
    finally:
        await nc.close()
    assert config.subjects == [f"{prefix}.*.events", f"{prefix}._epoch"]
    assert config.allow_direct and config.max_consumers == 10_000
    assert config.consumer_limits is not None and config.consumer_limits.inactive_threshold == 30


async def test_cleanup_after_a_task_caught_its_cancellation_can_still_write(
    nats_server: NatsServer, prefix: str
) -> None:
    """Code that catches its own cancellation to clean up calls the backend as it would on memory."""
    backend = NatsBackend(nats_server.url, NatsOptions(prefix=prefix))
    await backend.open()
    waiting = asyncio.Event()
    try:
        await backend.publish(Channel("s", "events"), b"{}", message_id="first")

        async def work() -> LogPosition:
            try:
                waiting.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                # Cleanup writes a last message, then lets the cancellation go on.
                position = await backend.publish(Channel("s", "events"), b'{"bye":1}', message_id="last")
                assert await backend.head(Channel("s", "events")) == position
                return position
            raise AssertionError("not cancelled")

        task = asyncio.create_task(work())
        await waiting.wait()
        task.cancel()
        position = await asyncio.wait_for(task, 10)
        stored = [m async for m in backend.read(Channel("s", "events"), start=None, follow=False)]
    finally:
        await backend.close()
    assert [m.data for m in stored] == [b"{}", b'{"bye":1}']
    assert position == LogPosition(stored[-1].epoch, stored[-1].position)


async def test_a_live_consumer_deleted_on_the_server_is_replaced(nats_server: NatsServer, prefix: str) -> None:
    """A follower whose live consumer vanishes (an operator, a client that learnt its name) loses nothing."""
    url = _url(nats_server, prefix)
    async with durable_ai.connect(url) as agent, durable_ai.connect(url) as client:
        async with agent.session("s").run(agent="writer") as run:
            await run.text("before ")
        follower = client.session("s").events()
        try:
            seen = [await anext(follower) for _ in range(3)]  # run-start, the text, run-end
            nc = await nats.connect(nats_server.url)
            try:
                jsm = nc.jsm()
                for info in await jsm.consumers_info(names(prefix).stream):
                    await jsm.delete_consumer(names(prefix).stream, info.name)
            finally:
                await nc.close()
            async with agent.session("s").run(agent="writer") as second:
                await second.text("after")
            async with asyncio.timeout(30):
                seen += await collect(follower, until=lambda e: isinstance(e, RunEnd) and e.run_id == second.id)
        finally:
            await follower.aclose()  # type: ignore[attr-defined]
    assert text_of(seen) == "before after"
    ids = [e.id for e in seen]
    assert len(ids) == len(set(ids))


async def _sent(server: NatsServer, hub: durable_ai.Hub) -> int:
    """Messages the server received from the hub's connection: each request is one."""
    backend = hub.backend
    assert isinstance(backend, NatsBackend)
    return await server.messages_from(backend.connection.client_id)


async def test_a_late_join_of_a_hundred_finished_answers_takes_three_requests(
    nats_server: NatsServer, prefix: str
) -> None:
    url = _url(nats_server, prefix)
    async with durable_ai.connect(url) as agent:
        for i in range(100):
            async with agent.session("s").run(agent="writer") as run:
                await run.text(f"answer {i}")
        await agent.flush()  # the snapshot is saved
    async with durable_ai.connect(url) as client:
        before = await _sent(nats_server, client)
        view = await client.session("s").view()
        sent = await _sent(nats_server, client) - before
        assert [m.text for m in view.messages] == [f"answer {i}" for i in range(100)]
        # The snapshot, the stream's epoch marker and the session's last message (the one the snapshot ends at):
        # no consumer is made for a log that holds nothing after the snapshot.
        assert sent == 3
        assert await _consumers(nats_server, prefix) == 0


async def test_a_catch_up_read_from_the_last_message_yields_it_and_one_from_before_reads_on(
    nats_server: NatsServer, prefix: str
) -> None:
    backend = from_url(_url(nats_server, prefix))
    await backend.open()
    try:
        channel = Channel("s", "events")
        first = await backend.publish(channel, b'{"one":1}', message_id="m1")
        last = await backend.publish(channel, b'{"two":2}\n{"three":3}', message_id="m2")
        read = [m async for m in backend.read(channel, start=last, follow=False)]
        assert [(m.position, m.data) for m in read] == [(last.position, b'{"two":2}\n{"three":3}')]
        read = [m async for m in backend.read(channel, start=first, follow=False)]
        assert [m.position for m in read] == [first.position, last.position]
        with pytest.raises(LogReset):  # a position past the end is none of this log's
            _ = [m async for m in backend.read(channel, start=LogPosition(last.epoch, "999999"), follow=False)]
        with pytest.raises(LogReset):  # nor is one from another epoch
            _ = [m async for m in backend.read(channel, start=LogPosition("other", last.position), follow=False)]
    finally:
        await backend.close()


async def test_a_run_starts_its_control_loop_without_a_backlog_consumer(nats_server: NatsServer, prefix: str) -> None:
    # A run's control loop reads the control log from where it ends. When the log's last message is that end, or
    # the log is empty, the backlog is known to be empty: the read asks for the last message, not for a consumer.
    watcher = await nats.connect(nats_server.url)
    created: list[tuple[str, list[str]]] = []  # (deliver policy, filter subjects) of each consumer asked for

    async def on_create(msg: nats.aio.msg.Msg) -> None:
        config = json.loads(msg.data).get("config", {})
        subjects = config.get("filter_subjects") or [config.get("filter_subject")]
        created.append((config.get("deliver_policy"), subjects))

    await watcher.subscribe("$JS.API.CONSUMER.CREATE.>", cb=on_create)
    await watcher.flush()
    control = names(prefix).subject("s", "control")
    try:
        async with durable_ai.connect(_url(nats_server, prefix)) as hub:
            async with hub.session("s").run(agent="w") as run:  # the control log is empty
                await run.text("one")
            await hub.session("s").steer("shorter")  # no run to take it: the log ends with it
        other = durable_ai.connect(_url(nats_server, prefix))  # a new process: it reads on from that control
        async with other, other.session("s").run(agent="w") as run:
            await run.text("two")
        await watcher.flush()
    finally:
        await watcher.close()
    # Each process's live feed (new messages only), and no backlog consumer.
    assert [policy for policy, subjects in created if control in subjects] == ["new", "new"]


async def _raw_messages(server: NatsServer, stream: str, subject: str) -> list[bytes]:
    """Every message stored on ``subject``, as stored (the reader would drop repeats and decode records)."""
    nc = await nats.connect(server.url)
    try:
        jsm = nc.jsm()
        info = await jsm.stream_info(stream, subjects_filter=subject)
        count = (info.state.subjects or {}).get(subject, 0)
        stored: list[bytes] = []
        seq = 0
        while len(stored) < count:
            seq += 1
            try:
                message = await jsm.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            if message.subject == subject:
                stored.append(message.data or b"")
        return stored
    finally:
        await nc.close()


async def test_a_new_sessions_first_message_opens_its_log_in_one_request(nats_server: NatsServer, prefix: str) -> None:
    # A run of a new session publishes its first message on the condition that the subject is empty, with the
    # log-start record in it: no request for the log's end first. A session that holds messages already (written
    # by another process, which this hub cannot know) gets its first message without a second log-start.
    first = durable_ai.connect(_url(nats_server, prefix), snapshots=False)
    async with first, first.session("other").run(agent="w") as run:  # the streams exist before anything watches
        await run.text("zero")
    watcher = await nats.connect(nats_server.url)
    events = names(prefix).subject("s", "events")
    asked_end: list[str] = []  # requests for the last message of the session's events subject

    async def on_get(msg: nats.aio.msg.Msg) -> None:
        if msg.subject.endswith(f".{events}") or events.encode() in msg.data:  # direct get by subject, or stream API
            asked_end.append(msg.subject)

    await watcher.subscribe("$JS.API.DIRECT.GET.>", cb=on_get)
    await watcher.subscribe("$JS.API.STREAM.MSG.GET.>", cb=on_get)
    await watcher.flush()
    try:
        hub = durable_ai.connect(_url(nats_server, prefix), snapshots=False)
        async with hub, hub.session("s").run(agent="w") as run:
            await run.text("one")
        await watcher.flush()
        assert asked_end == []
        other = durable_ai.connect(_url(nats_server, prefix), snapshots=False)  # knows nothing of "s"
        async with other, other.session("s").run(agent="w") as run:
            await run.text("two")
    finally:
        await watcher.close()
    stored = await _raw_messages(nats_server, names(prefix).stream, events)
    types = [[json.loads(line)["type"] for line in message.splitlines()] for message in stored]
    assert types[0][:2] == ["log-start", "run-start"]
    assert sum(kinds.count("log-start") for kinds in types) == 1
    assert sum(kinds.count("run-start") for kinds in types) == 2


async def test_concurrent_first_runs_read_the_streams_epoch_marker_no_more(
    nats_server: NatsServer, prefix: str
) -> None:
    # Fifty runs of new sessions start at once: their first messages go out through full publishes, and while one
    # waits to resume, acknowledgements of later messages are handled. That is no recreated stream, and must not
    # cost a read of the stream's epoch marker each.
    layout = names(prefix)
    # Only the marker's own subject is listened to: a listener on every direct get would pass for a responder of
    # streams that do not exist (the snapshots bucket), whose requests would then wait instead of failing at once.
    marker = f"$JS.API.DIRECT.GET.{layout.stream}.{layout.epoch_subject('events')}"
    watcher = await nats.connect(nats_server.url)
    asked: list[str] = []

    async def on_get(msg: nats.aio.msg.Msg) -> None:
        asked.append(msg.subject)

    try:
        async with durable_ai.connect(_url(nats_server, prefix), snapshots=False) as hub:
            async with hub.session("warm").run(agent="w") as run:  # the hub knows the stream's epoch
                await run.text("zero")
            await watcher.subscribe(marker, cb=on_get)
            await watcher.flush()

            async def one(i: int) -> None:
                async with hub.session(f"s{i}").run(agent="w") as run:
                    for _ in range(5):
                        await run.text("token ")

            await asyncio.gather(*(one(i) for i in range(50)))
            await hub.flush()
            await watcher.flush()
            during_runs = list(asked)
            views = [await hub.session(f"s{i}").view() for i in (0, 49)]  # a read asks for the marker: after
    finally:
        await watcher.close()
    assert [view.messages[-1].text for view in views] == ["token " * 5] * 2
    assert during_runs == []


async def test_a_run_with_a_chosen_id_in_a_session_written_before_lands_where_it_is_read_back(
    nats_server: NatsServer, prefix: str
) -> None:
    # Its run-start is a message of its own, sent ahead like any other once the session's log is known to have
    # begun; the acknowledgement must give the writer its position, from which it reads the run-start back.
    async with durable_ai.connect(_url(nats_server, prefix), snapshots=False) as hub:
        async with hub.session("s").run(agent="w") as run:
            await run.text("first")
        async with hub.session("s").run(agent="w", run_id="chosen") as run:
            await run.text("second")
        with pytest.raises(RunIdInUse):
            async with hub.session("s").run(agent="w", run_id="chosen"):
                pass
        view = await hub.session("s").view()
    assert [m.text for m in view.messages] == ["first", "second"]
    assert view.active_runs == []


async def test_publish_opening_stores_once_and_only_opens_an_empty_log(nats_server: NatsServer, prefix: str) -> None:
    backend = NatsBackend(nats_server.url, NatsOptions(prefix=prefix))
    await backend.open()
    channel = Channel("s", "events")
    try:
        first = await backend.publish_opening(channel, b'{"o":1}', b'{"a":1}', message_id="m1")
        # A retry of the same message (its acknowledgement lost, say) answers where the first copy is.
        assert await backend.publish_opening(channel, b'{"o":2}', b'{"a":1}', message_id="m1") == first
        second = await backend.publish_opening(channel, b'{"o":3}', b'{"b":2}', message_id="m2")
        assert int(second.position) > int(first.position)
    finally:
        await backend.close()
    stored = await _raw_messages(nats_server, names(prefix).stream, names(prefix).subject("s", "events"))
    assert stored == [b'{"o":1}\n{"a":1}', b'{"b":2}']


async def test_a_message_jetstream_refuses_fails_alone_and_the_run_still_ends(
    nats_server: NatsServer, prefix: str
) -> None:
    # An operator's stream takes smaller messages than the backend was told: JetStream refuses a large one. That
    # refusal must reach the writer as one (its event fails at once), not as a broker that does not answer, which
    # would be retried for ever and hold up every event behind it, the run's end included.
    url = _url(nats_server, prefix, "&publish_timeout=5")
    first = durable_ai.connect(url)
    async with first, first.session("warm").run(agent="w") as run:
        await run.text("the stream exists")
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jsm().stream_info(names(prefix).stream)
        await nc.jsm().update_stream(dataclasses.replace(info.config, max_msg_size=4096))
    finally:
        await nc.close()
    async with durable_ai.connect(url) as hub:
        started = asyncio.get_running_loop().time()
        async with hub.session("s").run(agent="w") as run:
            await run.text("before ")
            with pytest.raises(PublishRefused):
                await run.tool_call("big", {"blob": "y" * 10_000})
            await run.text("after")
        assert asyncio.get_running_loop().time() - started < 4.0  # refused, not timed out and retried
        view = await hub.session("s").view()
    assert view.messages[-1].text == "before after"
    assert view.active_runs == []
    assert view.messages[-1].status == "completed"


async def test_without_a_reply_subscription_requests_go_through_nats_py_and_answer_the_same(
    nats_server: NatsServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection that could not subscribe to its reply subject publishes and reads the last message with
    # nats-py's own requests; their answers must mean what the others do.
    async def refused(self: Replies) -> None:
        raise nats.errors.Error("permissions violation")

    monkeypatch.setattr(Replies, "open", refused)
    backend = NatsBackend(nats_server.url, NatsOptions(prefix=prefix))
    await backend.open()
    try:
        for kind in ("events", "control"):
            channel = Channel("s", kind)
            assert await backend.head(channel) is None
            first = await backend.publish(channel, b"{}", message_id=f"{kind}-1")
            assert await backend.publish(channel, b"{}", message_id=f"{kind}-1") == first
            second = await backend.publish(channel, b"{}", message_id=f"{kind}-2")
            assert int(second.position or 0) > int(first.position or 0)
            assert await backend.head(channel) == second
    finally:
        await backend.close()
    async with durable_ai.connect(_url(nats_server, prefix)) as hub:
        async with hub.session("t").run(agent="w") as run:
            await run.text("through nats-py")
        view = await hub.session("t").view()
    assert view.messages[-1].text == "through nats-py"
    assert view.messages[-1].status == "completed"


async def test_a_next_message_nats_py_refuses_to_send_from_an_acknowledgement_is_published_again(
    nats_server: NatsServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The next message of a session goes out from the previous one's acknowledgement, in the reply subscription's
    # task. If nats-py refuses that publish (the connection closing, say), nobody awaits it: the writer must still
    # hear of it and publish the message again, once.
    sent_ahead = 0
    refused: list[str] = []
    publish = NatsClient.publish

    async def refusing(self: NatsClient, subject: str, payload: bytes = b"", **kwargs: Any) -> None:
        nonlocal sent_ahead
        headers = kwargs.get("headers")
        if subject.endswith(".events") and isinstance(headers, dict) and not refused:
            sent_ahead += 1
            if sent_ahead >= 5 and any(frame.function == "_reply" for frame in inspect.stack()):
                refused.append(subject)
                raise nats.errors.ConnectionClosedError
        await publish(self, subject, payload, **kwargs)

    monkeypatch.setattr(NatsClient, "publish", refusing)
    async with durable_ai.connect(_url(nats_server, prefix), coalesce=Coalesce.off(), snapshots=False) as hub:
        async with asyncio.timeout(20):
            async with hub.session("s").run(agent="w") as run:
                for index in range(20):
                    await run.text(f"{index} ")
            await hub.flush()
        view = await hub.session("s").view()
    assert refused, "no publish from an acknowledgement was refused"
    assert view.messages[-1].text == "".join(f"{index} " for index in range(20))
    assert view.messages[-1].status == "completed"
    stored = await _raw_messages(nats_server, names(prefix).stream, names(prefix).subject("s", "events"))
    deltas = [json.loads(line)["delta"] for message in stored for line in message.splitlines() if b'"delta"' in line]
    assert deltas == [f"{index} " for index in range(20)]  # each stored once, in order
