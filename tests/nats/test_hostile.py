"""Hostile clients on a real nats-server with auth: what the credential we issue can do must be refused or harmless.

Every attack uses exactly the credential ``client_permissions(SESSION)`` describes, connected with
``client_inbox_prefix(SESSION)``, raw (nats-py: any bytes, any header, any id) or through the SDK. Each test judges
only what a user sees: the other session's events stored and readable, cancels acknowledged, agents present in
presence, no other session's id in any answer, no consumer left behind. Subjects, streams and buckets are
discovered (with an admin connection) or tried in several plausible forms, and a request the server denies (a
permissions violation, no reply) counts as refused, so the tests hold whatever layout the adapter uses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamInfo

import durable_ai
from durable_ai import Hub, Run
from durable_ai.errors import AckTimeout
from durable_ai.events import UserMessage
from durable_ai.testing import stored_events
from durable_ai.testing.scenarios import collect, text_of
from durable_ai_nats import client_inbox_prefix, client_permissions, names
from durable_ai_nats.testing import NatsServer
from tests.nats.auth import AGENT, authorization, user_url

SESSION = "victim-1"
OTHER = "secret-9f27c1"  # another session: distinctive, so that any answer naming it is caught
ADMIN = AGENT
CLIENT = ("client", "client-secret")
REQUEST_TIMEOUT = 1.0  # a denied request gets no reply: this long counts as refused
ACK_TIMEOUT = 8.0


@pytest.fixture(scope="module")
def auth_config() -> str:
    return authorization({CLIENT: client_permissions(SESSION)})


@pytest.fixture
async def server(auth_config: str) -> AsyncIterator[NatsServer]:
    async with NatsServer(config=auth_config) as server:
        yield server


@pytest.fixture
async def agent(server: NatsServer) -> AsyncIterator[Hub]:
    async with durable_ai.connect(user_url(server, *ADMIN)) as hub:
        # The agent side creates what it uses, and writes to both sessions.
        for session in (SESSION, OTHER):
            async with hub.session(session).run(agent="writer") as run:
                await run.text(f"the answer of {session}")
        await hub.flush()
        yield hub


@pytest.fixture
def client_url(server: NatsServer) -> str:
    return user_url(server, *CLIENT, f"?inbox_prefix={client_inbox_prefix(SESSION)}")


@contextlib.asynccontextmanager
async def _raw_client(server: NatsServer) -> AsyncIterator[NATS]:
    """The client credential below the SDK: nats-py, free to put any header and any bytes on what it may publish."""

    async def on_error(exc: Exception) -> None:  # permission violations are expected: the server refused
        pass

    nc = await nats.connect(
        user_url(server, *CLIENT),
        inbox_prefix=client_inbox_prefix(SESSION),
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        yield nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def _admin(server: NatsServer) -> AsyncIterator[NATS]:
    nc = await nats.connect(user_url(server, *ADMIN), allow_reconnect=False)
    try:
        yield nc
    finally:
        await nc.close()


async def _ask(
    nc: NATS,
    subject: str,
    payload: bytes = b"",
    headers: dict[str, str] | None = None,
    seconds: float = REQUEST_TIMEOUT,
) -> bytes | None:
    """The reply to a request; ``None`` when the server denied it (no reply comes) or nothing answered."""
    try:
        msg = await nc.request(subject, payload, timeout=seconds, headers=headers)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return None
    return msg.data


async def _streams(server: NatsServer) -> list[StreamInfo]:
    async with _admin(server) as nc:
        return await nc.jsm().streams_info()


async def _subjects(server: NatsServer, stream: str, subjects_filter: str) -> list[str]:
    """Subjects holding messages in ``stream`` under a filter, as the admin sees them."""
    async with _admin(server) as nc:
        info = await nc.jsm().stream_info(stream, subjects_filter=subjects_filter)
    return sorted(info.state.subjects or {})


async def _last(server: NatsServer, stream: str, subject: str) -> bytes:
    async with _admin(server) as nc:
        message = await nc.jsm().get_last_msg(stream, subject)
    return message.data or b""


def _control_subjects(session: str) -> list[str]:
    """Where a client of ``session`` sends controls: today's subject, and any plain subject its permissions allow."""
    found = {names().subject(session, "control")}
    with contextlib.suppress(KeyError, TypeError):
        for subject in client_permissions(session)["publish"]["allow"]:
            tokens = subject.split(".")
            if not subject.startswith("$") and session in tokens:
                found.add(".".join("x" if token in ("*", ">") else token for token in tokens))
    return sorted(found)


def _b64(member_id: str) -> str:
    return base64.urlsafe_b64encode(member_id.encode()).decode().rstrip("=")


async def _holds_within(check: Callable[[], Awaitable[bool]], seconds: float, interval: float = 0.1) -> bool:
    """Poll ``check`` until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


async def _eventually(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 10.0) -> None:
    if not await _holds_within(check, seconds):
        pytest.fail(f"timed out after {seconds:g}s waiting for {what}")


# -- 1. suppressing another session's events through the duplicate window -------------------------------------

_HUB_ID = re.compile(r"([0-9a-f]{16})([0-9a-f]+)")


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


async def test_controls_cannot_suppress_another_sessions_events(
    agent: Hub, client_url: str, server: NatsServer
) -> None:
    """Controls carrying the agent's next message ids (predicted from its event ids) must not swallow its events."""
    async with durable_ai.connect(client_url) as client:
        history = await collect(client.session(SESSION).events(follow=False))
    # The agent hub's ids are a 64-bit hex prefix and a hex counter: read both off the events a client may read.
    counters: dict[str, list[int]] = {}
    for event in history:
        for text in _strings(event.model_dump()):
            if (match := _HUB_ID.fullmatch(text)) is not None:
                counters.setdefault(match.group(1), []).append(int(match.group(2), 16))
    assert counters, "no hub-generated id in the events (the ids are no longer predictable: nothing to attack)"
    prefix, _ = Counter({p: len(c) for p, c in counters.items()}).most_common(1)[0]
    highest = max(counters[prefix])
    subjects = _control_subjects(SESSION)
    async with _raw_client(server) as nc:
        for counter in range(highest + 1, highest + 2001):
            guess = f"{prefix}{counter:x}"
            for message_id in (guess, f"{guess}#start", f"{guess}#0"):
                for subject in subjects:
                    body = json.dumps({"type": "cancel", "id": f"x{message_id}", "ts": 0, "run_id": "nope"})
                    await nc.publish(subject, body.encode(), headers={"Nats-Msg-Id": message_id})
        await nc.flush()
        for subject in subjects:  # acknowledged: every publish before it is stored (or was refused)
            await _ask(nc, subject, b"{}", seconds=5)

    async with agent.session(OTHER).run(agent="writer") as run:
        await run.text("a bystander's answer")
    await agent.flush()
    stored = [record for record in await stored_events(agent.backend, OTHER) if record.get("run_id") == run.id]
    stored_types = [record.get("type") for record in stored]
    stored_text = "".join(r["delta"] for r in stored if r.get("type") == "text-delta")
    assert "run-start" in stored_types and "run-end" in stored_types and stored_text == "a bystander's answer", (
        f"the client's controls suppressed run {run.id} of {OTHER!r}: stored only {stored_types}"
    )
    events = await collect(agent.session(OTHER).events(follow=False))
    assert text_of(events, run.id) == "a bystander's answer"


# -- 2. Status headers on a control ----------------------------------------------------------------------------

STATUS_HEADERS = [
    pytest.param({"Status": "503", "Description": "No Responders"}, id="status-503"),
    pytest.param({"Status": "100", "Description": "FlowControl Request"}, id="status-100"),
]


async def _publish_hostile_controls(nc: NATS, headers: dict[str, str]) -> None:
    """A control with ``headers`` (empty, and with a harmless control body) on every control subject."""
    control = {"type": "cancel", "id": f"hostile-{secrets.token_hex(4)}", "ts": 0, "run_id": "no-such-run"}
    body = json.dumps(control).encode()
    for subject in _control_subjects(SESSION):
        await _ask(nc, subject, b"", headers=headers)
        await _ask(nc, subject, body, headers=headers)


@pytest.mark.parametrize("headers", STATUS_HEADERS)
async def test_a_status_header_on_a_control_does_not_break_cancel(
    agent: Hub, client_url: str, server: NatsServer, headers: dict[str, str]
) -> None:
    async def answer() -> Run:
        async with agent.session(SESSION).run(agent="writer") as run:
            await run.text("streaming")
            await asyncio.Event().wait()  # until the client's cancel stops it
        return run

    async with durable_ai.connect(client_url) as client, _raw_client(server) as nc:
        session = client.session(SESSION)
        history = await collect(session.events(follow=False))
        await _publish_hostile_controls(nc, headers)  # already in the control log when the run starts
        stream = session.events(after=history[-1].cursor)
        agent_task = asyncio.create_task(answer())
        try:
            first_task = asyncio.ensure_future(anext(stream))
            await asyncio.wait({first_task, agent_task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
            if not first_task.done():
                first_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await first_task
                failure = agent_task.exception() if agent_task.done() else None
                pytest.fail(f"a control with {headers} broke the session: the agent's run did not start: {failure!r}")
            first = first_task.result()
            await _publish_hostile_controls(nc, headers)  # and while the run is live
            handle = await session.cancel(first.run_id, reason="stop")
            try:
                ack = await handle.ack(timeout=ACK_TIMEOUT)
            except AckTimeout:
                pytest.fail(f"a control with {headers} broke the session: a cancel got no ack in {ACK_TIMEOUT:g}s")
            async with asyncio.timeout(10):
                run = await agent_task
        finally:
            await stream.aclose()
            agent_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # its failure is reported above
                await agent_task
    assert ack.outcome == "applied" and run.cancelled


@pytest.mark.parametrize("headers", STATUS_HEADERS)
async def test_a_status_header_on_a_control_does_not_break_a_served_session(
    agent: Hub, client_url: str, server: NatsServer, headers: dict[str, str]
) -> None:
    started: asyncio.Queue[str] = asyncio.Queue()

    async def handler(run: Run, message: UserMessage) -> None:
        await run.text(f"re: {message.content}")
        started.put_nowait(run.id)
        await asyncio.Event().wait()  # until the client's cancel stops it

    async with (
        durable_ai.connect(client_url) as client,
        _raw_client(server) as nc,
        agent.session(SESSION).serve(handler),
    ):
        session = client.session(SESSION)
        await _publish_hostile_controls(nc, headers)
        try:
            prompted = await (await session.prompt("hello")).ack(timeout=ACK_TIMEOUT)
        except AckTimeout:
            pytest.fail(f"a control with {headers} broke the served session: a prompt got no ack")
        assert prompted.outcome == "applied"
        async with asyncio.timeout(10):
            run_id = await started.get()
        await _publish_hostile_controls(nc, headers)
        try:
            cancelled = await (await session.cancel(run_id, reason="stop")).ack(timeout=ACK_TIMEOUT)
        except AckTimeout:
            pytest.fail(f"a control with {headers} broke the served session: a cancel got no ack")
    assert cancelled.outcome == "applied"


# -- 3. presence -----------------------------------------------------------------------------------------------


@pytest.fixture
async def working(agent: Hub) -> AsyncIterator[dict[str, str]]:
    """An agent run working (so present) in SESSION and in OTHER; yields their run ids by session."""
    release = asyncio.Event()
    started: dict[str, asyncio.Future[str]] = {}

    async def work(session: str, ready: asyncio.Future[str]) -> None:
        async with agent.session(session).run(agent="writer") as run:
            await run.text("working")
            ready.set_result(run.id)
            await release.wait()

    loop = asyncio.get_running_loop()
    tasks = []
    for session in (SESSION, OTHER):
        started[session] = loop.create_future()
        tasks.append(asyncio.create_task(work(session, started[session])))
    try:
        run_ids = {session: await asyncio.wait_for(ready, 10) for session, ready in started.items()}
        for session, run_id in run_ids.items():

            async def present(session: str = session, run_id: str = run_id) -> bool:
                return any(m.run_id == run_id for m in await agent.session(session).presence())

            await _eventually(present, f"run {run_id} to be present in {session!r}")
        yield run_ids
    finally:
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


def _agents_of(members: Iterable[durable_ai.PresenceMember]) -> list[dict[str, Any]]:
    return sorted((m.model_dump() for m in members if m.role == "agent"), key=lambda m: str(m["member_id"]))


async def _agents(hub: Hub, session: str) -> list[dict[str, Any]]:
    return _agents_of(await hub.session(session).presence())


async def _presence_buckets(server: NatsServer) -> list[tuple[str, str]]:
    """``(stream, bucket)`` of every KV bucket on the server (presence is one of them today)."""
    found = {(info.config.name, info.config.name[3:]) for info in await _streams(server) if info.config.name}
    found = {(stream, bucket) for stream, bucket in found if stream.startswith("KV_")}
    found.add((f"KV_{names().presence}", names().presence))
    return sorted(found)


async def _agent_keys(server: NatsServer, run_id: str, session: str) -> list[str]:
    """The presence subjects holding the agent's entry: found by the admin, plus today's key for its member id."""
    keys: set[str] = set()
    for stream, bucket in await _presence_buckets(server):
        keys.add(f"$KV.{bucket}.{session}.{_b64(run_id)}")
        with contextlib.suppress(nats.js.errors.NotFoundError):
            for subject in await _subjects(server, stream, f"$KV.{bucket}.{session}.>"):
                if run_id.encode() in await _last(server, stream, subject):
                    keys.add(subject)
    return sorted(keys)


async def _real_entry(server: NatsServer, run_id: str, session: str) -> bytes:
    """The agent's stored presence entry, raw, as the admin reads it (today ``p`` + JSON)."""
    for stream, bucket in await _presence_buckets(server):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            for subject in await _subjects(server, stream, f"$KV.{bucket}.{session}.>"):
                data = await _last(server, stream, subject)
                if run_id.encode() in data:
                    return data
    return b'p{"member_id":"","role":"agent"}'


def _forge(entry: bytes, **changes: Any) -> bytes:
    """``entry`` (any prefix, then a JSON object) with some of its fields changed."""
    start = entry.find(b"{")
    try:
        member = json.loads(entry[start:])
    except ValueError:
        member = {}
    member.update(changes)
    return entry[: max(start, 0)] + json.dumps(member).encode()


Write = tuple[str, bytes, dict[str, str] | None]


async def _assert_agents_survive(agent: Hub, server: NatsServer, writes: list[Write], sessions: Iterable[str]) -> None:
    """Make each write as the client; after each one the server accepted, the agents present (as the agent hub sees
    them) must be exactly those before, and presence must read. Looked at at once: a refresh would hide it later."""
    before = {session: await _agents(agent, session) for session in sessions}
    assert all(before.values()), f"no agent present to begin with: {before}"
    async with _raw_client(server) as nc:
        for subject, payload, headers in writes:
            if await _ask(nc, subject, payload, headers) is None:
                continue  # refused
            wrote = f"the client wrote {subject!r} ({headers}, {payload[:60]!r})"
            for session, agents in before.items():
                try:
                    now = await _agents(agent, session)
                except Exception as exc:
                    pytest.fail(f"presence() of {session!r} raised after {wrote}: {exc!r}")
                assert now == agents, f"after {wrote}, the agents present in {session!r} are {now}, not {agents}"


async def test_a_rollup_from_a_client_removes_no_agent(agent: Hub, server: NatsServer, working: dict[str, str]) -> None:
    writes: list[Write] = [
        (f"$KV.{bucket}.{SESSION}.{token}", b"", {"Nats-Rollup": rollup})
        for _, bucket in await _presence_buckets(server)
        for token in (_b64("tab-1"), "tab-1", "x.y")
        for rollup in ("all", "sub")
    ]
    await _assert_agents_survive(agent, server, writes, working)


async def test_a_client_cannot_delete_an_agents_presence(
    agent: Hub, server: NatsServer, working: dict[str, str]
) -> None:
    writes: list[Write] = []
    for key in await _agent_keys(server, working[SESSION], SESSION):
        writes.append((key, b"", {"KV-Operation": "DEL"}))
        writes.append((key, b"", {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}))
    await _assert_agents_survive(agent, server, writes, [SESSION])


async def test_a_client_cannot_appear_as_an_agent(agent: Hub, server: NatsServer, working: dict[str, str]) -> None:
    """A made-up agent entry, and the real run's member id reused, copying the real entry's format."""
    real_id = working[SESSION]
    entry = await _real_entry(server, real_id, SESSION)
    impostor = "impostor-run"
    fake = _forge(entry, member_id=impostor, run_id=impostor, agent="impostor", role="agent", data=None)
    hijack = _forge(entry, agent="impostor", data={"forged": True})
    writes: list[Write] = [
        (f"$KV.{bucket}.{SESSION}.{_b64(impostor)}", fake, None) for _, bucket in await _presence_buckets(server)
    ]
    writes += [(key, hijack, None) for key in await _agent_keys(server, real_id, SESSION)]
    await _assert_agents_survive(agent, server, writes, [SESSION])


@pytest.mark.parametrize(
    "tokens",
    [
        pytest.param(["A", "a=b", "AB=C", "!!!", "%%"], id="not-base64"),
        pytest.param(["_w", "gA"], id="not-utf8"),
        pytest.param(["\u00e9t\u00e9"], id="not-ascii"),
    ],
)
async def test_an_undecodable_presence_key_does_not_break_presence(
    agent: Hub, server: NatsServer, working: dict[str, str], tokens: list[str]
) -> None:
    entry = _forge(
        await _real_entry(server, working[SESSION], SESSION), member_id="tab-2", role="client", agent=None, run_id=None
    )
    writes: list[Write] = [
        (f"$KV.{bucket}.{SESSION}.{token}", entry, None)
        for _, bucket in await _presence_buckets(server)
        for token in tokens
    ]
    await _assert_agents_survive(agent, server, writes, [SESSION])


# -- 4. enumeration --------------------------------------------------------------------------------------------


async def test_the_stream_api_does_not_reveal_other_sessions(server: NatsServer, working: dict[str, str]) -> None:
    streams = [info.config.name for info in await _streams(server) if info.config.name]
    assert streams
    requests: list[tuple[str, dict[str, Any]]] = [
        ("$JS.API.STREAM.NAMES", {}),
        ("$JS.API.STREAM.NAMES", {"subject": ">"}),
        ("$JS.API.STREAM.LIST", {}),
        ("$JS.API.STREAM.LIST", {"subject": ">"}),
    ]
    for stream in streams:
        for subjects_filter in (">", "$KV.>", f"*.{OTHER}.>", f"$KV.*.{OTHER}.>"):
            requests.append((f"$JS.API.STREAM.INFO.{stream}", {"subjects_filter": subjects_filter}))
        requests.append((f"$JS.API.CONSUMER.LIST.{stream}", {}))
        requests.append((f"$JS.API.CONSUMER.NAMES.{stream}", {}))
    async with _raw_client(server) as nc:
        answers = await asyncio.gather(*(_ask(nc, subject, json.dumps(body).encode()) for subject, body in requests))
    revealing = [
        f"{subject} {json.dumps(body)}"
        for (subject, body), answer in zip(requests, answers, strict=True)
        if answer is not None and OTHER.encode() in answer
    ]
    assert not revealing, f"the client learnt the id of session {OTHER!r} from: {revealing}"


# -- 5. durable state ------------------------------------------------------------------------------------------

_HUGE_NS = 10 * 86400 * 10**9  # ten days, in nanoseconds as the wire format wants


def _filters(subjects: Iterable[str], session: str) -> list[str]:
    """Plausible filter subjects of ``session`` within a stream's subjects."""
    found: set[str] = set()
    for subject in subjects:
        tokens = subject.split(".")
        if "*" in tokens:
            index = tokens.index("*")
            found.add(".".join([*tokens[:index], session, *tokens[index + 1 :]]))
        elif tokens[-1] == ">":
            found.add(".".join([*tokens[:-1], session, ">"]))
            found.add(".".join([*tokens[:-1], session]))
        else:
            found.add(subject)
    return sorted(found)


async def test_consumers_a_client_creates_do_not_outlive_it(server: NatsServer, working: dict[str, str]) -> None:
    streams = {
        info.config.name: list(info.config.subjects or []) for info in await _streams(server) if info.config.name
    }
    assert streams
    inbox = client_inbox_prefix(SESSION)
    attempts: list[tuple[str, str, dict[str, Any]]] = []  # (stream, subject, consumer config)
    count = 0

    def name() -> str:
        nonlocal count
        count += 1
        return f"hostile{count}"

    for stream, subjects in streams.items():
        for subject_filter in _filters(subjects, SESSION):
            api = f"$JS.API.CONSUMER.CREATE.{stream}"
            n = name()
            attempts.append((stream, f"{api}.{n}.{subject_filter}", {"durable_name": n, "name": n}))
            n = name()
            durable_push = {"durable_name": n, "name": n, "deliver_subject": f"{inbox}.{n}"}
            attempts.append((stream, f"{api}.{n}.{subject_filter}", durable_push))
            n = name()
            attempts.append((stream, f"{api}.{n}.{subject_filter}", {"name": n, "inactive_threshold": _HUGE_NS}))
            n = name()
            attempts.append((stream, f"{api}.{n}.{subject_filter}", {"name": n}))
            for _, _, config in attempts[-4:]:
                config["filter_subject"] = subject_filter
        n = name()
        attempts.append((stream, f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{n}", {"durable_name": n}))
        n = name()
        attempts.append((stream, f"$JS.API.CONSUMER.CREATE.{stream}.{n}", {"durable_name": n, "name": n}))
        attempts.append((stream, f"$JS.API.CONSUMER.CREATE.{stream}", {"inactive_threshold": _HUGE_NS}))

    ours = {str(config.get("name") or config.get("durable_name")) for _, _, config in attempts}
    async with _raw_client(server) as nc:

        async def create(stream: str, subject: str, config: dict[str, Any]) -> bytes | None:
            config = {"ack_policy": "none", "deliver_policy": "all", **config}
            return await _ask(nc, subject, json.dumps({"stream_name": stream, "config": config}).encode())

        answers = await asyncio.gather(*(create(*attempt) for attempt in attempts))
    created: list[str] = []
    for (stream, subject, _), answer in zip(attempts, answers, strict=True):
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            reply = json.loads(answer or b"null")
            if isinstance(reply, dict) and "error" not in reply and reply.get("name"):
                ours.add(str(reply["name"]))
                created.append(f"{stream}/{reply['name']} via {subject}")

    remaining: list[str] = []

    async def gone() -> bool:
        remaining.clear()
        async with _admin(server) as admin:
            jsm = admin.jsm()
            for stream in streams:
                remaining.extend(f"{stream}/{c.name}" for c in await jsm.consumers_info(stream) if c.name in ours)
        return not remaining

    await _holds_within(gone, 60, interval=0.5)
    assert not remaining, f"consumers the client created outlive it by 60 s: {remaining} (created: {len(created)})"
