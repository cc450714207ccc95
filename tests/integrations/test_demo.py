"""The demo: the scripted agent driven on a memory hub (its answer's shape, determinism, steer, cancel, the
"team" of sub-agents and its cancel), ``create_app`` served by a real uvicorn, and the ``durable-ai demo``
command's options."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

import durable_ai
from durable_ai import Coalesce, ConfigurationError, Hub, Session
from durable_ai.cli import _parser, main
from durable_ai.demo import MAX_QUERY, ScriptedAgent, create_app
from durable_ai.events import (
    Event,
    ReasoningDelta,
    RunEnd,
    RunStart,
    Status,
    TextDelta,
    ToolCall,
    ToolResult,
)
from durable_ai.integrations.vercel import ChatTurn
from durable_ai.testing.scenarios import collect, collect_open, run_end, text_of
from tests.browser.conftest import demo_command
from tests.integrations.test_starlette import serve, sse
from tests.integrations.test_vercel import body

TIMEOUT = 10.0
FAST = 2000.0  # tokens per second: fast tests, paced all the same
ENDLESS = 1_000_000  # tokens: an answer that outlasts any test (it is steered or cancelled, never finished)


class Answer:
    """A scripted answer to one user message, running in a task of its own."""

    def __init__(self, session: Session, agent: ScriptedAgent, text: str) -> None:
        self.session = session
        self.agent = agent
        self.text = text
        self.run_id = f"run-{secrets.token_hex(6)}"
        self.task: asyncio.Task[bool] | None = None

    async def start(self) -> Answer:
        message = await self.session.user_message(self.text)
        turn = ChatTurn(session=self.session, message=message)

        async def answer() -> bool:
            async with self.session.run(
                agent="assistant", run_id=self.run_id, input_message_id=message.message_id
            ) as run:
                await self.agent(run, turn)
            return run.cancelled

        self.task = asyncio.create_task(answer(), name=f"answer {self.run_id}")
        return self

    async def cancelled(self) -> bool:
        """Whether the run was cancelled (waits for its task)."""
        assert self.task is not None
        async with asyncio.timeout(TIMEOUT):
            return await self.task


async def answered(session: Session, agent: ScriptedAgent, text: str) -> tuple[Answer, list[Event]]:
    """Answer ``text`` to the end; the run's events, as a live subscriber saw them."""
    async with session.events(await session.head()) as live:
        answer = await Answer(session, agent, text).start()
        events = await collect(live, until=run_end(answer.run_id), seconds=TIMEOUT)
    assert not await answer.cancelled()
    return answer, [e for e in events if e.run_id == answer.run_id]


def of_run(events: list[Event], run_id: str) -> list[Event]:
    return [e for e in events if e.run_id == run_id]


def words(text: str) -> list[str]:
    return text.split()


@pytest.fixture
async def unbatched() -> AsyncIterator[Hub]:
    """A hub that writes every delta as an event of its own, so deltas can be counted."""
    async with durable_ai.connect("memory://", coalesce=Coalesce.off()) as hub:
        yield hub


# -- one answer --------------------------------------------------------------------------------------------------


async def test_an_answer_is_status_reasoning_a_search_then_paced_text(unbatched: Hub) -> None:
    session = unbatched.session("shape")
    agent = ScriptedAgent(tokens_per_second=FAST, tokens=120)
    question = "How do durable sessions resume after a dropped connection?"
    _, events = await answered(session, agent, question)

    kinds = [e.type for e in events]
    assert kinds[0] == "run-start" and kinds[-1] == "run-end"
    start, end = events[0], events[-1]
    assert isinstance(start, RunStart) and isinstance(end, RunEnd) and end.status == "completed"
    statuses = [e.text for e in events if isinstance(e, Status)]
    assert statuses == ["thinking"]
    assert kinds.index("status") < kinds.index("reasoning-delta") < kinds.index("tool-call")
    assert kinds.index("tool-call") < kinds.index("tool-result") < kinds.index("text-delta")
    assert len([e for e in events if isinstance(e, ReasoningDelta)]) >= 2
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert len(calls) == len(results) == 1
    assert calls[0].name == "search" and calls[0].input == {"query": question}
    assert results[0].call_id == calls[0].call_id and results[0].error is None
    output = results[0].output
    assert isinstance(output, dict) and output["hits"] == 3 and len(output["titles"]) == 3  # type: ignore[arg-type]
    # After the tool result only text: at least `tokens` deltas, each one word and a space.
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 120
    assert all(d.delta.endswith(" ") and len(d.delta.split()) == 1 for d in deltas)
    assert kinds[kinds.index("text-delta") : -1] == ["text-delta"] * len(deltas)
    assert len(words(text_of(events))) == len(deltas)


async def test_the_text_comes_at_the_pace_asked_for(unbatched: Hub) -> None:
    """The demo's answers are paced like a model (50 tokens/s by default): never faster than asked."""
    rate = 200.0
    _, events = await answered(unbatched.session("pace"), ScriptedAgent(tokens_per_second=rate, tokens=100), "pace")
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 100
    seconds = (deltas[-1].ts - deltas[0].ts) / 1000
    assert seconds >= 0.9 * (len(deltas) - 1) / rate, seconds  # a lower bound only: a busy machine is slower


async def test_answers_are_deterministic_and_differ_by_message(hub: Hub) -> None:
    agent = ScriptedAgent(tokens_per_second=FAST, tokens=80)
    _, first = await answered(hub.session("same-1"), agent, "Tell me about cursors")
    _, again = await answered(hub.session("same-2"), agent, "Tell me about cursors")
    _, other = await answered(hub.session("other"), agent, "Tell me about presence")
    assert len(words(text_of(first))) >= 80  # coalesced deltas reassemble into every word
    assert text_of(first) == text_of(again)
    assert text_of(first) != text_of(other)
    assert "cursors" in text_of(first) or "cursors" in str([e for e in first if isinstance(e, ReasoningDelta)])


async def test_the_search_query_is_the_message_cut_to_200_characters(hub: Hub) -> None:
    question = "why " * 150
    _, events = await answered(hub.session("long"), ScriptedAgent(tokens_per_second=FAST, tokens=5), question)
    (call,) = [e for e in events if isinstance(e, ToolCall)]
    assert call.input == {"query": question[:MAX_QUERY]}


@pytest.mark.parametrize(
    "options",
    [{"tokens_per_second": 0}, {"tokens_per_second": -1.0}, {"tokens_per_second": float("nan")}, {"tokens": 0}],
)
def test_bad_settings_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ScriptedAgent(**options)


# -- steer and cancel ------------------------------------------------------------------------------------------


def text_words_at_least(run_id: str, n: int) -> Callable[[Event], bool]:
    seen: list[str] = []

    def enough(event: Event) -> bool:
        if isinstance(event, TextDelta) and event.run_id == run_id:
            seen.append(event.delta)
        return len(words("".join(seen))) >= n

    return enough


async def test_a_steer_mid_answer_changes_the_rest_of_it(hub: Hub) -> None:
    session = hub.session("steer")
    async with session.events() as live:
        answer = await Answer(session, ScriptedAgent(tokens_per_second=FAST, tokens=ENDLESS), "Explain cursors").start()
        before = await collect_open(live, until=text_words_at_least(answer.run_id, 20), seconds=TIMEOUT)
        handle = await session.steer("use TypeScript examples", run_id=answer.run_id)
        assert (await handle.ack(timeout=TIMEOUT)).outcome == "applied"
        steered_so_far = "".join(e.delta for e in before if isinstance(e, TextDelta))

        def steered_text_seen(event: Event) -> bool:
            return "use TypeScript examples" in text_of([*before, *after], answer.run_id)

        after: list[Event] = []
        async with asyncio.timeout(TIMEOUT):
            async for event in live:
                after.append(event)
                if steered_text_seen(event):
                    break
        (await session.cancel(answer.run_id)).control  # noqa: B018 (sent; the run is endless)
        assert await answer.cancelled()
    statuses = [e for e in after if isinstance(e, Status) and e.run_id == answer.run_id]
    assert [s.text for s in statuses] == ["steered: use TypeScript examples"]
    # The steer's status comes between text written before it and the text that follows it.
    position = after.index(statuses[0])
    assert "TypeScript" not in steered_so_far
    rest = text_of(after[position:], answer.run_id)
    assert rest.startswith("Steering now: use TypeScript examples")
    assert "TypeScript" not in text_of(after[:position], answer.run_id)


async def test_a_cancel_ends_the_run_cancelled_mid_answer(hub: Hub) -> None:
    session = hub.session("cancel")
    async with session.events() as live:
        answer = await Answer(session, ScriptedAgent(tokens_per_second=FAST, tokens=ENDLESS), "Go on").start()
        await collect_open(live, until=text_words_at_least(answer.run_id, 10), seconds=TIMEOUT)
        handle = await session.cancel(answer.run_id, reason="user pressed stop")
        end = await handle.done(timeout=TIMEOUT)
    assert end is not None and end.status == "cancelled" and end.reason == "user pressed stop"
    assert await answer.cancelled()
    events = of_run(await collect(session.events(follow=False)), answer.run_id)
    assert [e for e in events if isinstance(e, RunEnd)] == [end]
    assert 10 <= len(words(text_of(events))) < ENDLESS


# -- the team -------------------------------------------------------------------------------------------------


def run_starts(events: list[Event]) -> list[RunStart]:
    return [e for e in events if isinstance(e, RunStart)]


def run_ends(events: list[Event]) -> list[RunEnd]:
    return [e for e in events if isinstance(e, RunEnd)]


async def test_team_starts_three_sub_agents_that_write_their_own_runs(hub: Hub) -> None:
    session = hub.session("team")
    agent = ScriptedAgent(tokens_per_second=FAST, tokens=200)
    async with session.events() as live:
        answer = await Answer(session, agent, "Ask the TEAM how resume works").start()
        events = await collect(live, until=run_end(answer.run_id), seconds=TIMEOUT)
    assert not await answer.cancelled()
    starts, ends = run_starts(events), run_ends(events)
    assert len(starts) == len(ends) == 4
    orchestrator, *subs = starts
    assert orchestrator.run_id == answer.run_id and orchestrator.parent_run_id is None
    assert sorted(s.agent or "" for s in subs) == ["researcher-1", "researcher-2", "researcher-3"]
    assert all(s.parent_run_id == answer.run_id for s in subs)
    assert all(e.status == "completed" for e in ends)
    assert ends[-1].run_id == answer.run_id
    # They ran concurrently: every researcher started before the first one ended.
    first_sub_end = min(events.index(e) for e in ends if e.run_id != answer.run_id)
    assert all(events.index(s) < first_sub_end for s in subs)
    for sub in subs:
        own = of_run(events, sub.run_id or "")
        assert len(words(text_of(own))) >= 200 // 3  # the team writes at least one answer's worth of text
        assert next(e.text for e in own if isinstance(e, Status)).startswith("researching part")
    # The orchestrator only plans, waits, then summarises: its text follows every researcher's end.
    mine = of_run(events, answer.run_id)
    assert [e.text for e in mine if isinstance(e, Status)] == ["planning", "summarising"]
    (plan,) = [e for e in mine if isinstance(e, ToolCall)]  # one tool call, as every answer has
    assert plan.name == "plan" and plan.input == {"question": "Ask the TEAM how resume works", "researchers": 3}
    assert len(words(text_of(events))) >= 200
    last_sub_end = max(events.index(e) for e in ends if e.run_id != answer.run_id)
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta) and e.run_id == answer.run_id)
    assert first_text > last_sub_end
    summary = text_of(events, answer.run_id)
    assert summary.startswith("Summary:") and "researcher-3 finished" in summary


async def test_a_word_containing_team_is_not_a_team() -> None:
    async with durable_ai.connect("memory://") as hub:
        _, events = await answered(
            hub.session("steam"), ScriptedAgent(tokens_per_second=FAST, tokens=5), "teamwork and steam"
        )
    assert len(run_starts(events)) == 1


async def test_cancelling_the_orchestrator_cancels_every_researcher(hub: Hub) -> None:
    session = hub.session("team-cancel")
    agent = ScriptedAgent(tokens_per_second=FAST, tokens=ENDLESS)
    writing: set[str] = set()

    def all_writing(event: Event) -> bool:
        if isinstance(event, TextDelta) and event.agent and event.agent.startswith("researcher-"):
            writing.add(event.agent)
        return len(writing) == 3

    async with session.events() as live:
        answer = await Answer(session, agent, "a team, please").start()
        await collect_open(live, until=all_writing, seconds=TIMEOUT)
        handle = await session.cancel(answer.run_id, reason="user pressed stop")
        ended: list[RunEnd] = []

        def four_ended(event: Event) -> bool:
            if isinstance(event, RunEnd):
                ended.append(event)
            return len(ended) == 4

        await collect_open(live, until=four_ended, seconds=TIMEOUT)
    assert (await handle.ack(timeout=TIMEOUT)).outcome == "applied"
    assert await answer.cancelled()
    assert all(e.status == "cancelled" for e in ended), [(e.agent, e.status) for e in ended]
    assert {e.agent for e in ended} == {"assistant", "researcher-1", "researcher-2", "researcher-3"}
    (mine,) = [e for e in ended if e.run_id == answer.run_id]
    assert mine.reason == "user pressed stop"
    assert await session.active_runs() == []


# -- the app -----------------------------------------------------------------------------------------------------


async def test_create_app_serves_the_agent_behind_the_chat_routes_and_the_gateway() -> None:
    app = create_app("memory://", tokens_per_second=FAST, tokens=30)
    durable = app.state.durable
    body = {
        "id": "demo-chat",
        "trigger": "submit-message",
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "What is a cursor?"}]}],
    }
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        chunks: list[Any] = []
        async with http.stream("POST", "/api/chat", json=body) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    chunks.append(data if data == "[DONE]" else json.loads(data))
        assert chunks[-1] == "[DONE]"
        types = [c["type"] for c in chunks[:-1]]
        assert types[0] == "start" and "finish" in types
        assert any(c["type"] == "tool-input-available" and c["toolName"] == "search" for c in chunks[:-1])
        text = "".join(c["delta"] for c in chunks[:-1] if c["type"] == "text-delta")
        assert len(words(text)) >= 30
        view = (await http.get("/sessions/demo-chat/view")).json()
        assert [m["role"] for m in view["messages"]][:2] == ["user", "assistant"]
    assert durable.hub.closed


async def test_create_app_serves_the_chat_page_and_the_gateway_serves_its_js_client() -> None:
    """The page, its script and style, and durable-ai.js: all from this server, nothing fetched from elsewhere
    (tests/browser drives the page itself in Chromium)."""
    app = create_app("memory://", tokens_per_second=FAST, tokens=30)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        page = await http.get("/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        for needed in ('<label for="message">Message</label>', 'role="log" aria-label="Conversation"', "Agents"):
            assert needed in page.text
        assert 'src="demo.js"' in page.text and 'href="demo.css"' in page.text
        files = {path: await http.get(path) for path in ("/demo.js", "/demo.css", "/sessions/durable-ai.js")}
        assert {path: r.status_code for path, r in files.items()} == dict.fromkeys(files, 200)
        assert files["/demo.js"].headers["content-type"] == "text/javascript; charset=utf-8"
        assert files["/demo.css"].headers["content-type"] == "text/css; charset=utf-8"
        client = files["/sessions/durable-ai.js"]
        assert client.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "export class DurableSession" in client.text
        assert 'from "./sessions/durable-ai.js"' in files["/demo.js"].text
        for response in (page, *files.values()):
            assert "http://" not in response.text and "https://" not in response.text  # no CDN, no other host
            assert response.headers["cache-control"] == "no-cache"


# -- the command -----------------------------------------------------------------------------------------------


def test_the_demo_command_has_its_options() -> None:
    args = _parser().parse_args(["demo"])
    assert (args.backend, args.host, args.port, args.tokens_per_second, args.tokens) == (
        "memory://",
        "127.0.0.1",
        8000,
        50.0,
        320,
    )
    args = _parser().parse_args(
        [
            "demo",
            "--backend",
            "nats://127.0.0.1:4222",
            "--host",
            "0.0.0.0",
            "--port",
            "9000",
            "--tokens-per-second",
            "5",
        ]
    )
    options = (args.backend, args.host, args.port, args.tokens_per_second)
    assert options == ("nats://127.0.0.1:4222", "0.0.0.0", 9000, 5)


def test_demo_help_names_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--backend", "--host", "--port", "--tokens-per-second", "--tokens"):
        assert option in out


@pytest.mark.parametrize("bad", [["--tokens-per-second", "0"], ["--tokens-per-second", "nan"], ["--tokens", "0"]])
def test_demo_refuses_bad_numbers(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", *bad])
    assert exit_.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_demo_without_uvicorn_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "'demo' extra" in err and "durable-ai[demo]" in err


def test_demo_serves_create_app_with_websocket_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    configs: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: configs.append(server.config))
    assert main(["demo", "--port", "8123", "--tokens-per-second", "7"]) == 0
    (config,) = configs
    options = (config.host, config.port, config.ws_ping_interval, config.ws_ping_timeout)
    assert options == ("127.0.0.1", 8123, 20, 20)
    assert config.app.state.durable.hub is not None


def test_demo_with_an_unknown_backend_fails_before_serving(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--backend", "redis://x"]) == 2
    assert "no durable-ai backend is installed for 'redis://'" in capsys.readouterr().err


async def test_the_demo_command_shuts_down_with_clients_connected_and_ends_the_answer_cancelled() -> None:
    """Ctrl-C while an answer streams to its POST and a follower: the answer ends cancelled with the shutdown reason,
    both streams end, and the process exits (servers wait for open connections before the lifespan's shutdown)."""
    async with (
        demo_command("--tokens-per-second", "50", "--tokens", str(ENDLESS)) as demo,
        httpx.AsyncClient(base_url=demo.base, timeout=TIMEOUT) as http,
        http.stream("POST", "/api/chat", json=body("Tell me everything.", chat="c1")) as answer,
        http.stream("GET", "/sessions/c1/events") as follower,
    ):
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(TIMEOUT):
            async for frame in sse(follower):
                if "data" in frame:
                    seen.append(frame)
                    if len(seen) == 4:  # the answer streams
                        demo.process.send_signal(signal.SIGINT)
            chunks = [line async for line in answer.aiter_lines() if line.startswith("data: ")]
            code = await demo.process.wait()
    end = seen[-2] if seen[-1]["event"] == "error" else seen[-1]  # the stream may tell of the hub closing
    assert end["event"] == "run-end", seen[-3:]
    assert (end["data"]["status"], end["data"]["reason"]) == ("cancelled", "the agent process is shutting down")
    assert chunks[-1] == "data: [DONE]"
    assert code in (0, 128 + signal.SIGINT, -signal.SIGINT)  # uvicorn re-raises the signal once it shut down
