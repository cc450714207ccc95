"""The real ably-js client (tests/js, `npm ci` there) uses a session on the emulator with a client credential.

It connects as a browser app does (``authCallback`` returning a TokenRequest or a JWT, protocol v6), in JSON (as
browsers speak) and msgpack (ably-js's default on Node): it reads a session's history and follows live runs, joins
an answer half-way without a gap or a duplicate even when history is slow, attaches with rewind, cancels a run the
Python agent is streaming and sees the agent's ``control-ack`` and ``run-end``, and is refused what its credential
does not allow. The ably-js snippet of docs/backends/ably.md is run as the page prints it.

Every wait is for something ably-js or the agent reported, with a timeout; history is made slow by holding its
request in a loopback proxy (tests/ably/holding_proxy.py) until the test has published what should arrive live
meanwhile. Skipped only when ``node`` or ``tests/js/node_modules/ably`` is missing.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

import durable_ai
from durable_ai import Hub, Run
from durable_ai.testing.scenarios import collect, run_end
from durable_ai_ably import issue_client_jwt, issue_client_token
from durable_ai_ably.testing import AblyEmulator
from tests.ably import node
from tests.ably.holding_proxy import HoldingProxy
from tests.ably.node import JS_DIR, Record, skip_without_ably_js

TIMEOUT = 20.0
SECRET = "Zk3vQ9pX2mL7wR4tY8uI1oP6aS5dF0gHjKlMnBvCxZq"
KEY = f"app1.root:{SECRET}"
SESSION = "chat-js"
USER = "browser-user"
SCRIPT = JS_DIR / "read_session.mjs"
SNIPPET_RUNNER = JS_DIR / "run_snippet.mjs"
ABLY_DOC = Path(__file__).resolve().parents[2] / "docs" / "backends" / "ably.md"
SNIPPET_SECTION = "## Browsers and phones: client credentials"
DOCS_SESSION = "chat-42"  # the session the snippet names

skip_without_ably_js()

TRANSPORTS = pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])


@pytest.fixture
async def emulator() -> AsyncIterator[AblyEmulator]:
    async with AblyEmulator({KEY: None}, mutable_namespaces={"ai"}) as emu:
        yield emu


@pytest.fixture
async def agent(emulator: AblyEmulator) -> AsyncIterator[Hub]:
    async with durable_ai.connect(f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false") as hub:
        yield hub


def token_request(session: str = SESSION) -> str:
    return json.dumps(issue_client_token(session, USER, key=KEY))


async def write_answer(agent: Hub, *texts: str, session: str = SESSION) -> str:
    """One finished run of ``texts``; its id."""
    async with agent.session(session).run(agent="writer") as run:
        for text in texts:
            await run.text(text)
    await agent.flush()
    return run.id


def words(label: str, count: int) -> list[str]:
    return [f"{label} {i}, " for i in range(count)]


async def stream(run: Run, texts: Sequence[str], *, every: int = 3) -> None:
    """Write `texts` as text deltas, storing them every `every` deltas (so the part grows by many appends)."""
    for number, text in enumerate(texts, 1):
        await run.text(text)
        if number % every == 0:
            await run.flush()
    await run.flush()


class NodeClient(node.NodeClient):
    """A script of tests/js reading a session with ably-js: the events it rendered, as it reported them."""

    async def event(self, predicate: Callable[[Record], bool], what: str) -> Record:
        """The first rendered event (history or live) that matches."""
        record = await self.wait(lambda r: r["kind"] in ("history", "live") and predicate(r["event"]), what)
        event: Record = record["event"]
        return event

    def rendered(self, *kinds: str) -> list[Record]:
        """The events rendered (of `kinds`: history and live by default), in the order they were."""
        kinds = kinds or ("history", "live")
        return [r["event"] for r in self.records if r["kind"] in kinds]

    def text(self, *kinds: str) -> str:
        return "".join(e["delta"] for e in self.rendered(*kinds) if e["type"] == "text-delta")

    def types(self, *kinds: str) -> list[str]:
        return [e["type"] for e in self.rendered(*kinds)]

    def buffered_text(self, kind: str = "buffered") -> str:
        """The text of the messages of `kind` (received, not yet rendered), as they came."""
        events = [e for r in self.records if r["kind"] == kind for e in r["events"]]
        return "".join(e["delta"] for e in events if e["type"] == "text-delta")


async def start_node(script: Path, args: Sequence[str], env: dict[str, str]) -> NodeClient:
    return NodeClient(await node.start_node(script, args, env), script.name, TIMEOUT)


async def start_reader(
    port: int, credential: str, runs: int, *, msgpack: bool = False, rewind: str | None = None, session: str = SESSION
) -> NodeClient:
    args = ["--port", str(port), "--channel", f"ai:{session}", "--runs", str(runs)]
    args += ["--timeout", str(int(TIMEOUT * 1000)), *(["--msgpack"] if msgpack else [])]
    args += ["--rewind", rewind] if rewind is not None else []
    return await start_node(SCRIPT, args, {"ABLY_CLIENT_TOKEN": credential})


@pytest.fixture
async def readers() -> AsyncIterator[list[NodeClient]]:
    """Node processes a test starts are appended here and killed if they are still running at its end."""
    started: list[NodeClient] = []
    yield started
    for client in started:
        await client.kill()


def assert_each_once(events: list[Record]) -> None:
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "an event was rendered twice"


# -------------------------------------------------------------------------------------------- reading a session


@pytest.mark.parametrize(
    ("kind", "msgpack"),
    [("token-request", False), ("jwt", False), ("token-request", True)],
    ids=["token-request", "jwt", "token-request-msgpack"],
)
async def test_ably_js_reads_history_and_follows_a_live_run(
    agent: Hub, emulator: AblyEmulator, readers: list[NodeClient], kind: str, msgpack: bool
) -> None:
    """JSON as browsers speak it, with both credentials; msgpack as ably-js prefers on Node."""
    await write_answer(agent, "Hello from ", "the Python agent.")
    credential = issue_client_jwt(SESSION, USER, key=KEY) if kind == "jwt" else token_request()
    readers.append(reader := await start_reader(emulator.port, credential, runs=2, msgpack=msgpack))
    connected = await reader.until("connected")
    assert connected["clientId"] == USER
    await reader.until("history-end")
    assert reader.text("history") == "Hello from the Python agent."
    assert reader.types("history")[-1] == "run-end"

    await write_answer(agent, "And this one ", "arrived live.")  # after ably-js subscribed and read history
    await reader.until("done")
    code = await asyncio.wait_for(reader.process.wait(), TIMEOUT)
    assert code == 0, await reader.failure()
    assert reader.text("live") == "And this one arrived live."
    assert reader.types("live")[0] == "run-start"
    assert reader.types("live")[-1] == "run-end"
    # The appends (action message.append) reached ably-js live, so the part grew as one message.
    assert "message.append" in {r["action"] for r in reader.records if r["kind"] == "live"}


async def test_ably_js_reports_a_refused_credential(emulator: AblyEmulator, readers: list[NodeClient]) -> None:
    """A JWT signed with the wrong secret: ably-js cannot connect, and the script says why and exits 1 at once."""
    credential = issue_client_jwt(SESSION, USER, key="app1.root:not-the-secret-but-long-enough-for-hs256")
    readers.append(reader := await start_reader(emulator.port, credential, runs=1))
    code = await asyncio.wait_for(reader.process.wait(), TIMEOUT)
    assert reader.process.stderr is not None
    stderr = (await reader.process.stderr.read()).decode()
    assert code == 1
    assert "read_session: could not connect: 40144 (401)" in stderr


@TRANSPORTS
async def test_ably_js_joins_mid_answer_gaplessly_while_history_is_slow(
    agent: Hub, emulator: AblyEmulator, readers: list[NodeClient], msgpack: bool
) -> None:
    """Subscribe, history untilAttach (held in the proxy while the answer goes on live), then the buffered live
    messages: the text ably-js renders is exactly the agent's, each event once, in order."""
    first, second, third = words("before the join", 9), words("while history is slow", 9), words("after it", 9)
    async with HoldingProxy(emulator.port, hold=[f"ai:{SESSION}"]) as proxy:
        async with agent.session(SESSION).run(agent="writer") as run:
            await stream(run, first)
            readers.append(reader := await start_reader(proxy.port, token_request(), runs=1, msgpack=msgpack))
            await asyncio.wait_for(proxy.history_requested.wait(), TIMEOUT)  # attached; its history request waits
            await stream(run, second)
            await reader.wait(lambda r: "".join(second) in reader.buffered_text(), "the second third buffered")
            proxy.release()
            await reader.until("history-end")
            await stream(run, third)
        await reader.until("done")
        assert await asyncio.wait_for(reader.process.wait(), TIMEOUT) == 0, await reader.failure()

    view = await agent.session(SESSION).view()
    answer = "".join(first + second + third)
    assert view.messages[-1].text == answer
    assert reader.text() == answer
    events = reader.rendered()
    assert_each_once(events)
    assert [e["type"] for e in events if e["type"] != "text-delta"] == ["run-start", "run-end"]
    assert events[-1]["status"] == "completed"
    # It really joined mid-answer: history began the run, the live messages that came meanwhile ended it.
    assert reader.types("history")[0] == "run-start"
    assert "run-end" not in reader.types("history")
    assert reader.types("live")[-1] == "run-end"
    assert (await reader.until("history-end"))["buffered"] > 0
    assert {"message.append"} <= {r["action"] for r in reader.records if r["kind"] == "buffered"}


@pytest.mark.parametrize(
    ("rewind", "msgpack", "whole"),
    [("100", False, True), ("100", True, True), ("10s", False, True), ("2", False, False)],
    ids=["100-json", "100-msgpack", "10s-json", "2-json"],
)
async def test_ably_js_rewind_brings_the_tail_of_the_log(
    agent: Hub, emulator: AblyEmulator, readers: list[NodeClient], rewind: str, msgpack: bool, whole: bool
) -> None:
    """`channels.get(name, {params: {rewind}})`: on attach the most recent messages arrive, and they are the log's
    tail (all of it when the rewind covers it), then the live tail follows."""
    await write_answer(agent, "The first ", "answer.")
    last = await write_answer(agent, "The second ", "answer.")
    # The log as stored, one event per event written (a catch-up read may merge deltas the snapshot keeps).
    log = await collect(agent.session(SESSION).events(), until=run_end(last))
    readers.append(reader := await start_reader(emulator.port, token_request(), 0, msgpack=msgpack, rewind=rewind))
    await reader.event(lambda e: e["id"] == log[-1].id, "the log's last event")
    rewound = reader.rendered()
    assert rewound, "rewind brought nothing"
    assert [e["id"] for e in rewound] == [e.id for e in log[-len(rewound) :]]
    if whole:
        assert reader.text() == "The first answer.The second answer."
    else:
        assert len(rewound) < len(log)
    assert reader.types()[-1] == "run-end"

    start = len(reader.records)
    await write_answer(agent, "A third, ", "live.")
    await reader.wait(
        lambda r: r["kind"] == "live" and r["event"]["type"] == "run-end", "the live run-end", start=start
    )
    assert (
        reader.text().removeprefix("".join(e["delta"] for e in rewound if e["type"] == "text-delta"))
        == "A third, live."
    )
    assert_each_once(reader.rendered())
    assert await reader.exit() == 0


# ------------------------------------------------------------------------------------------------- controls


@TRANSPORTS
async def test_ably_js_cancels_a_run_the_python_agent_is_streaming(
    agent: Hub, emulator: AblyEmulator, readers: list[NodeClient], msgpack: bool
) -> None:
    """ably-js publishes `{v, id, type: "cancel", reason}` on the control channel, as the docs show; the agent's run
    stops at its next await and ends cancelled, and ably-js sees the ack of its control id and the run-end."""
    readers.append(reader := await start_reader(emulator.port, token_request(), runs=0, msgpack=msgpack))
    await reader.until("history-end")

    async def answer() -> Run:
        async with agent.session(SESSION).run(agent="writer") as run:
            await stream(run, words("streaming", 6))
            await asyncio.Event().wait()  # an LLM that never finishes: only the cancel ends the run
        return run

    task = asyncio.create_task(answer())
    try:
        started = await reader.event(lambda e: e["type"] == "text-delta", "a text delta")
        sent = await reader.send({"cmd": "cancel", "reason": "user pressed stop"})
        assert sent["ok"], sent
        run = await asyncio.wait_for(task, TIMEOUT)
    finally:
        task.cancel()
    ack = await reader.event(lambda e: e["type"] == "control-ack" and e["control_id"] == sent["id"], "the ack")
    end = await reader.event(lambda e: e["type"] == "run-end", "the run-end")
    assert await reader.exit() == 0

    assert run.cancelled
    assert (ack["outcome"], ack["control_type"]) == ("applied", "cancel")
    assert (end["run_id"], end["status"], end["reason"]) == (started["run_id"], "cancelled", "user pressed stop")
    view = await agent.session(SESSION).view()
    assert (view.messages[-1].status, view.active_runs) == ("cancelled", [])
    # ably-js rendered what the agent wrote before the cancel stopped it, as the agent's view has it.
    assert reader.text() == view.messages[-1].text
    assert reader.text() and "".join(words("streaming", 6)).startswith(reader.text())


@TRANSPORTS
async def test_ably_js_is_refused_what_its_credential_does_not_allow(
    agent: Hub, emulator: AblyEmulator, readers: list[NodeClient], msgpack: bool
) -> None:
    """With the credential issue_client_token gives: no publish on the events channel, no other session, no reading
    of controls, each refused with 40160; the session goes on for it."""
    await write_answer(agent, "The answer ", "so far.")
    await write_answer(agent, "Secret of ", "another session.", session="chat-other")
    readers.append(reader := await start_reader(emulator.port, token_request(), runs=0, msgpack=msgpack))
    await reader.until("history-end")

    forged = json.dumps({"v": 1, "id": "forged", "type": "text-delta", "session": SESSION, "part_id": "x"})
    publish = await reader.send({"cmd": "publish", "channel": f"ai:{SESSION}", "name": "e", "data": forged})
    attach = await reader.send({"cmd": "attach", "channel": "ai:chat-other"})
    history = await reader.send({"cmd": "history", "channel": f"ai:{SESSION}:control"})
    assert (publish["ok"], publish["code"]) == (False, 40160), publish
    assert (attach["ok"], attach["code"]) == (False, 40160), attach
    assert (history["ok"], history["code"]) == (False, 40160), history

    # Refusals are not failures of the session: its channel stays attached and the next answer arrives.
    assert (await reader.send({"cmd": "state", "channel": f"ai:{SESSION}"}))["state"] == "attached"
    await write_answer(agent, "Still ", "here.")
    await reader.event(lambda e: e["type"] == "run-end" and reader.text("live") == "Still here.", "the next run-end")
    assert await reader.exit() == 0
    assert "forged" not in {e.id async for e in agent.session(SESSION).events(follow=False)}
    assert reader.text() == "The answer so far.Still here."


# ----------------------------------------------------------------------------------------- the docs' snippet


def docs_snippet() -> str:
    """The one js code block of the section of docs/backends/ably.md on client credentials, as the page prints it."""
    section = ABLY_DOC.read_text().split(f"\n{SNIPPET_SECTION}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```js\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"{SNIPPET_SECTION} should hold one js block, not {len(blocks)}"
    code: str = blocks[0]
    return code


class StreamingAgent:
    """A run of the Python agent in a task of its own, writing text when told to, until it is cancelled."""

    def __init__(self, hub: Hub, session: str) -> None:
        self.hub = hub
        self.session = session
        self.orders: asyncio.Queue[tuple[Sequence[str], asyncio.Future[None]]] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> Run:
        async with self.hub.session(self.session).run(agent="writer") as run:
            while not run.cancelled:
                texts, written = await self.orders.get()
                await stream(run, texts)
                written.set_result(None)
        return run

    async def write(self, texts: Sequence[str]) -> None:
        """Write `texts` and wait until they are stored."""
        written = asyncio.get_running_loop().create_future()
        await self.orders.put((texts, written))
        await asyncio.wait_for(written, TIMEOUT)


@pytest.mark.parametrize(
    ("slow", "msgpack"),
    [(False, False), (True, False), (True, True)],
    ids=["json", "slow-history-json", "slow-history-msgpack"],
)
async def test_the_docs_ably_js_snippet_renders_the_answer_in_order_and_stops_it(
    agent: Hub, emulator: AblyEmulator, readers: list[NodeClient], tmp_path: Path, slow: bool, msgpack: bool
) -> None:
    """The snippet of docs/backends/ably.md, extracted at test time and run unchanged: it gets its TokenRequest from
    the app's endpoint, renders the answer it joined half-way exactly once and in order (also when history is slow
    and live messages arrive before it), and its stop() cancels the run."""
    code = docs_snippet()
    assert "async function stop(" in code
    snippet = tmp_path / "snippet.mjs"
    snippet.write_text(f"{code}\nexport {{ stop }};\n")  # so the test can press stop
    channel = f"ai:{DOCS_SESSION}"
    first, second, third = words("before the join", 9), words("while history is slow", 9), words("after it", 9)
    answer = "".join(first + second + third)
    writer = StreamingAgent(agent, DOCS_SESSION)
    try:
        await writer.write(first)
        async with HoldingProxy(emulator.port, hold=[channel] if slow else []) as proxy:
            args = ["--snippet", str(snippet), "--port", str(proxy.port), "--channel", channel]
            args += ["--timeout", str(int(TIMEOUT * 1000)), *(["--msgpack"] if msgpack else [])]
            env = {"ABLY_TOKEN_REQUEST": token_request(DOCS_SESSION)}
            readers.append(client := await start_node(SNIPPET_RUNNER, args, env))
            if slow:
                await asyncio.wait_for(proxy.history_requested.wait(), TIMEOUT)  # subscribed; history waits
                await writer.write(second)
                await client.wait(lambda r: "".join(second) in client.buffered_text("received"), "second received")
                proxy.release()
            await client.until("ready")  # the snippet ran to its end: history handled
            if not slow:
                await writer.write(second)
            await writer.write(third)
            await client.wait(lambda r: len(client.text("render")) >= len(answer), "the whole answer rendered")
            assert (await client.send({"cmd": "call", "name": "stop"}))["ok"]
            run = await writer.task
            await client.wait(lambda r: r["kind"] == "render" and r["event"]["type"] == "run-end", "the run-end")
            await client.wait(lambda r: r["kind"] == "render" and r["event"]["type"] == "control-ack", "the ack")
            assert await client.exit() == 0, await client.failure()
    finally:
        writer.task.cancel()

    assert [(r["url"], r["method"]) for r in client.records if r["kind"] == "fetch"] == [
        ("/api/sessions/chat-42/ably-token", "POST")
    ]
    view = await agent.session(DOCS_SESSION).view()
    assert view.messages[-1].text == answer
    assert client.text("render") == answer
    events = client.rendered("render")
    assert_each_once(events)
    assert events[0]["type"] == "run-start"
    assert run.cancelled
    [ack] = [e for e in events if e["type"] == "control-ack"]
    [end] = [e for e in events if e["type"] == "run-end"]
    assert (ack["outcome"], ack["control_type"]) == ("applied", "cancel")
    assert (end["status"], end["reason"]) == ("cancelled", "user pressed stop")
    if slow:
        assert proxy.held == [channel]
