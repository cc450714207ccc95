"""The demo chat page (``durable-ai demo``) in real headless Chromium, as a person uses it: a reload mid-answer
shows the answer so far and completes it identically, a second tab follows the live answer and its Stop cancels the
run in both, the network-drop button reconnects without loss, Steer changes the answer, a "team" message lists
four agents, a deleted session resets the page, and a page that cannot read the view follows the log instead. The
``durable-ai demo`` command itself serves the chat on each backend, and the JS client's doc example runs as written.
Every page ends with the transcript the gateway's view holds, exactly.

The core cases run on memory, NATS and the Ably emulator; screenshots: tests/browser/artifacts/<test>/.
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from tests.browser.conftest import LOOP, TIMEOUT_MS, Demo, Gateway, Shots, StartDemo, demo_command, missing_browser

_why = missing_browser()
if _why is not None:
    pytest.skip(_why, allow_module_level=True)

from playwright.async_api import Browser, BrowserContext, Locator, Page, WebSocketRoute, expect  # noqa: E402

expect.set_options(timeout=TIMEOUT_MS)
pytestmark = LOOP

PACE = 50.0  # tokens per second: a few seconds of answer, time enough to reload, open a tab, drop the connection
SHORT = 80  # tokens of an answer that is followed to its end, with time to act on it mid-way
BRIEF = 30  # tokens of an answer that is only waited for
ENDLESS = 100_000  # tokens of an answer that is always stopped
QUESTION = "How does a client resume after a dropped connection?"
JS_CLIENT_DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations" / "js-client.md"
DOC_SESSION = "chat-42"  # the session the doc's example follows
SOME_WORDS = re.compile(r"^(\S+\s+){8}")  # an answer that has started: at least eight words


class ChatPage:
    """The demo page in one tab, found by what a person sees: labels, roles and accessible names."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.conversation = page.get_by_role("log", name="Conversation")
        self.answers = self.conversation.get_by_role("article")
        self.agents = page.get_by_role("region", name="Agents")
        self.connection = page.get_by_role("region", name="Connection").get_by_role("status")
        self.stop_button = page.get_by_role("button", name="Stop")
        self.notice = page.get_by_role("region", name="Chat").get_by_role("status")

    @classmethod
    async def open(cls, context: BrowserContext, url: str) -> ChatPage:
        page = await context.new_page()
        await page.goto(url)
        chat = cls(page)
        await expect(chat.connection).to_have_text(re.compile("^Live"))
        return chat

    @property
    def session_id(self) -> str:
        return parse_qs(urlparse(self.page.url).query)["session"][0]

    def text(self, answer: Locator) -> Locator:
        return answer.locator(".text")

    async def send(self, text: str) -> None:
        await self.page.get_by_role("textbox", name="Message").fill(text)
        await self.page.get_by_role("button", name="Send").click()

    async def started_answer(self) -> Locator:
        """The only answer, once it streams at least a few words."""
        await expect(self.answers).to_have_count(1)
        answer = self.answers.first
        await expect(answer).to_have_attribute("data-status", "streaming")
        await expect(self.text(answer)).to_have_text(SOME_WORDS)
        return answer

    async def answer_text(self, answer: Locator) -> str:
        return "".join(await self.text(answer).all_text_contents())

    async def matches_view(self, demo: Gateway) -> dict[str, Any]:
        """The transcript on the page is the gateway's view: every message, its status, its text, exactly."""
        view = await demo.view(self.session_id)
        assistants = [m for m in view["messages"] if m["role"] == "assistant"]
        users = [m for m in view["messages"] if m["role"] == "user"]
        await expect(self.answers).to_have_count(len(assistants))
        for n, message in enumerate(assistants):
            answer = self.answers.nth(n)
            await expect(answer).to_have_attribute("data-run", message["run_id"])
            await expect(answer).to_have_attribute("data-status", message["status"])
            assert await self.answer_text(answer) == text_of(message)
            reasoning = "".join(await answer.locator(".reasoning-text").all_text_contents())
            assert reasoning == text_of(message, "reasoning")
        shown_users = await self.conversation.locator(".user .text").all_text_contents()
        assert shown_users == [text_of(m) for m in users]
        return view


def doc_example(doc: Path) -> str:
    """The first ```html block of a doc."""
    found = re.search(r"^```html\n(.*?)^```$", doc.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    assert found is not None, f"no html example in {doc}"
    return found.group(1)


def text_of(message: dict[str, Any], kind: str = "text") -> str:
    return "".join(part["text"] for part in message["parts"] if part["type"] == kind)


def memory_only(test: Any) -> Any:
    return pytest.mark.parametrize("backend_name", ["memory"])(test)


async def answering(start_demo: StartDemo, context: BrowserContext, tokens: int) -> tuple[Demo, ChatPage, Locator]:
    """A demo whose answers are ``tokens`` long, a page on it that asked QUESTION, and the answer once it streams."""
    demo = await start_demo(tokens_per_second=PACE, tokens=tokens)
    chat = await ChatPage.open(context, demo.base + "/")
    await chat.send(QUESTION)
    return demo, chat, await chat.started_answer()


# -- every backend: memory, nats, ably ------------------------------------------------------------------------------


async def test_a_reload_mid_answer_shows_the_answer_so_far_and_completes_it_identically(
    start_demo: StartDemo, browser_context: BrowserContext, shots: Shots, backend_name: str
) -> None:
    demo, chat, answer = await answering(start_demo, browser_context, SHORT)
    so_far = await chat.answer_text(answer)
    await shots.take(chat.page, "before-reload")

    await chat.page.reload()
    # At once the answer so far (kept with its cursor in localStorage), then the rest of it.
    await expect(chat.text(answer)).to_have_text(re.compile("^" + re.escape(so_far)))
    await expect(chat.answers).to_have_count(1)
    await shots.take(chat.page, "after-reload")
    await expect(answer).to_have_attribute("data-status", "completed")
    await expect(answer.locator(".outcome")).to_have_text("Completed")
    await chat.matches_view(demo)
    assert len(await chat.answer_text(answer)) > len(so_far)
    await shots.take(chat.page, "completed")

    # It followed on after the cursor it kept, in one connection, and the log was read on from there: no reset.
    await expect(chat.connection).to_have_text(re.compile("^Live, resumed after cursor "))
    notice = await chat.notice.text_content() or ""
    assert notice == "", notice


async def test_a_second_tab_follows_the_live_answer_and_its_stop_cancels_the_run_in_both(
    start_demo: StartDemo, browser_context: BrowserContext, shots: Shots
) -> None:
    demo = await start_demo(tokens_per_second=PACE, tokens=ENDLESS)
    acks = AckGate()
    await browser_context.route_web_socket(re.compile(r"/sessions/[^/]+/ws"), acks.route)
    first = await ChatPage.open(browser_context, demo.base + "/")
    await first.send(QUESTION)
    await first.started_answer()

    async with browser_context.expect_page() as opened:
        await first.page.get_by_role("link", name="Open in new tab").click()
    second = ChatPage(await opened.value)
    assert second.session_id == first.session_id
    answer = await second.started_answer()
    seen = await second.answer_text(answer)
    # Live: the second tab's answer grows past what it first showed.
    await expect(second.text(answer)).to_have_text(re.compile("^" + re.escape(seen) + r"(\S+\s+){3}"))
    await shots.take(second.page, "second-tab-live")

    acks.hold = True
    await second.stop_button.click()
    await expect(second.stop_button).to_have_text("stopping…")
    await expect(second.stop_button).to_be_disabled()
    await shots.take(second.page, "stopping")
    acks.release()
    for chat in (first, second):
        stopped = chat.answers.first
        await expect(stopped).to_have_attribute("data-status", "cancelled")
        await expect(stopped.locator(".outcome")).to_have_text("Cancelled: stopped by the user")
    await expect(second.stop_button).to_have_text("Stop")
    await expect(second.stop_button).to_be_disabled()  # nothing left to stop
    view = await second.matches_view(demo)
    await first.matches_view(demo)
    assert [m["reason"] for m in view["messages"] if m["role"] == "assistant"] == ["stopped by the user"]
    await shots.take(first.page, "first-tab-cancelled")


async def test_the_network_drop_button_reconnects_and_resumes_without_loss(
    start_demo: StartDemo, browser_context: BrowserContext, shots: Shots
) -> None:
    demo, chat, answer = await answering(start_demo, browser_context, SHORT)

    await chat.page.get_by_role("button", name="Simulate network drop").click()
    await expect(chat.connection).to_have_text(re.compile("^Reconnected 1 time, resumed after cursor "))
    await shots.take(chat.page, "reconnected")
    await expect(answer).to_have_attribute("data-status", "completed")
    await chat.matches_view(demo)


async def test_the_durable_ai_demo_command_serves_the_chat_on_this_backend(
    backend_url: str, browser_context: BrowserContext, shots: Shots
) -> None:
    """The command itself, as a newcomer runs it (``--backend`` as given), in a child process."""
    async with demo_command("--backend", backend_url, "--tokens-per-second", "100", "--tokens", "30") as demo:
        base = demo.base
        chat = await ChatPage.open(browser_context, base + "/")
        await chat.send(QUESTION)
        await expect(chat.answers.first).to_have_attribute("data-status", "completed")
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT_MS / 1000) as http:
            await chat.matches_view(Gateway(base, http))
        await shots.take(chat.page, "served-by-the-command")
        await chat.page.close()


# -- memory ---------------------------------------------------------------------------------------------------------


@memory_only
async def test_a_new_page_makes_a_session_and_puts_it_in_the_url_with_nothing_from_elsewhere(
    start_demo: StartDemo, browser_context: BrowserContext, shots: Shots
) -> None:
    demo = await start_demo(tokens_per_second=PACE, tokens=BRIEF)
    page = await browser_context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    await page.goto(demo.base + "/")
    chat = ChatPage(page)
    await expect(chat.connection).to_have_text("Live, from the start")
    assert re.fullmatch(r"chat-[0-9a-f]{16}", chat.session_id)
    await expect(page.get_by_role("link", name="Open in new tab")).to_have_attribute(
        "href", f"{demo.base}/?session={chat.session_id}"
    )
    await expect(chat.agents).to_contain_text("No agent has run yet")
    await expect(chat.stop_button).to_be_disabled()
    await expect(page.get_by_role("button", name="Steer")).to_be_disabled()
    await shots.take(page, "new-session")
    assert requested and all(url.startswith(demo.base + "/") for url in requested), requested
    assert demo.base + "/sessions/durable-ai.js" in requested


@memory_only
async def test_a_reload_reads_the_view_and_cursor_kept_in_local_storage_not_the_gateway(
    start_demo: StartDemo, browser_context: BrowserContext, shots: Shots
) -> None:
    demo, chat, answer = await answering(start_demo, browser_context, SHORT)
    key = f"durable-ai:{demo.base}/sessions/{chat.session_id}"
    kept_cursor = "(key) => JSON.parse(localStorage.getItem(key) ?? 'null')?.view?.cursor ?? null"
    await chat.page.wait_for_function(kept_cursor, arg=key)

    views: list[str] = []
    sockets: list[str] = []
    chat.page.on("request", lambda request: views.append(request.url) if request.url.endswith("/view") else None)
    chat.page.on("websocket", lambda socket: sockets.append(socket.url))
    await chat.page.reload()
    await expect(chat.connection).to_have_text(re.compile("^Live, resumed after cursor "))
    await expect(answer).to_have_attribute("data-status", "completed")
    await chat.matches_view(demo)
    await shots.take(chat.page, "completed-from-storage")
    assert views == [], "the reloaded page read the gateway's view instead of what it kept"
    after = parse_qs(urlparse(sockets[0]).query)["after"][0]
    assert re.fullmatch(r"[0-9a-f]+:\d+:-?\d+", after), after  # it followed on after the cursor it kept
    kept = await chat.page.evaluate(kept_cursor, key)
    assert kept is not None  # and keeps the cursor of what it shows now


# Fills the origin's localStorage with records of other sessions (each saved a moment later than the one before,
# in shrinking sizes, so that not even a small record fits after them), with one unreadable record first; returns
# the keys written, oldest first.
FILL_STORAGE = """(prefix) => {
  const keys = [];
  localStorage.setItem(prefix + "unreadable", "{not json");
  keys.push(prefix + "unreadable");
  let at = 1000;
  for (const size of [500000, 50000, 5000, 500, 50, 5]) {
    for (;;) {
      const key = prefix + "other-" + keys.length;
      const view = { session: "other-" + keys.length, messages: [], pad: "x".repeat(size) };
      try {
        localStorage.setItem(key, JSON.stringify({ v: 1, at: at++, view }));
      } catch {
        break;
      }
      keys.push(key);
    }
  }
  return keys;
}"""


@memory_only
async def test_a_full_local_storage_drops_the_least_recently_saved_sessions_to_keep_this_one(
    start_demo: StartDemo, browser_context: BrowserContext, shots: Shots
) -> None:
    demo = await start_demo(tokens_per_second=PACE, tokens=BRIEF)
    chat = await ChatPage.open(browser_context, demo.base + "/")
    others: list[str] = await chat.page.evaluate(FILL_STORAGE, f"durable-ai:{demo.base}/sessions/")
    assert len(others) > 10, others  # the origin's quota was reached
    await chat.send(QUESTION)
    await expect(chat.answers.first).to_have_attribute("data-status", "completed")
    key = f"durable-ai:{demo.base}/sessions/{chat.session_id}"
    kept = "(key) => JSON.parse(localStorage.getItem(key) ?? 'null')?.view?.messages?.at(-1)?.status ?? null"
    await chat.page.wait_for_function(f"(key) => ({kept})(key) === 'completed'", arg=key)
    left: list[str] = await chat.page.evaluate(
        "(keys) => keys.filter((key) => localStorage.getItem(key) !== null)", others
    )
    await shots.take(chat.page, "kept-after-dropping-others")
    # The unreadable record and the least recently saved one made room; every later one is still kept.
    assert left == others[2:], (others[:3], left[:3], len(others), len(left))

    await chat.page.reload()
    await expect(chat.connection).to_have_text(re.compile("^Live, resumed after cursor "))
    await chat.matches_view(demo)


@memory_only
async def test_reconnects_back_off_exponentially_while_the_gateway_refuses(
    start_demo: StartDemo, browser_context: BrowserContext, shots: Shots
) -> None:
    demo = await start_demo(tokens_per_second=PACE, tokens=SHORT)
    attempts: list[float] = []
    refuse = 0

    async def route(page_side: WebSocketRoute) -> None:
        nonlocal refuse
        attempts.append(time.monotonic())
        if refuse > 0:
            refuse -= 1
            await page_side.close(code=1011, reason="refused by the test")  # as a gateway that is down
        else:
            page_side.connect_to_server()

    await browser_context.route_web_socket(re.compile(r"/sessions/[^/]+/ws"), route)
    chat = await ChatPage.open(browser_context, demo.base + "/")
    await chat.send(QUESTION)
    answer = await chat.started_answer()
    refuse = 3
    before = len(attempts)
    await chat.page.get_by_role("button", name="Simulate network drop").click()
    await expect(chat.connection).to_have_text(re.compile("^Connection lost: reconnecting in"))
    await expect(chat.connection).to_have_text(re.compile("^Reconnected "), timeout=20_000)
    await expect(answer).to_have_attribute("data-status", "completed")
    await chat.matches_view(demo)
    await shots.take(chat.page, "reconnected-after-refusals")
    # Four attempts after the drop (three refused); each wait is at least half of 250 ms doubling (jitter takes
    # off up to half): after the 1st refusal 250 ms or more, after the 2nd 500, after the 3rd 1,000.
    tried = attempts[before:]
    assert len(tried) == 4, tried
    gaps = [later - earlier for earlier, later in itertools.pairwise(tried)]
    for gap, least in zip(gaps, (0.25, 0.5, 1.0), strict=True):
        assert gap >= least * 0.95, gaps


@memory_only
async def test_a_page_whose_view_cannot_be_read_follows_the_log_from_its_start(
    start_demo: StartDemo, browser_context: BrowserContext, browser: Browser, shots: Shots
) -> None:
    demo = await start_demo(tokens_per_second=PACE, tokens=BRIEF)
    first = await ChatPage.open(browser_context, demo.base + "/")
    await first.send(QUESTION)
    await expect(first.answers.first).to_have_attribute("data-status", "completed")
    await first.page.close()

    other = await browser.new_context()  # another device: nothing kept in its storage
    try:
        await other.route(re.compile(r"/sessions/[^/]+/view$"), lambda route: route.abort())
        chat = await ChatPage.open(other, f"{demo.base}/?session={first.session_id}")
        await expect(chat.connection).to_have_text("Live, from the start")
        await expect(chat.answers.first).to_have_attribute("data-status", "completed")
        await chat.matches_view(demo)
        await shots.take(chat.page, "from-the-start")
    finally:
        await other.close()


@memory_only
async def test_steer_changes_the_rest_of_the_answer(
    start_demo: StartDemo, browser_context: BrowserContext, shots: Shots
) -> None:
    demo, chat, answer = await answering(start_demo, browser_context, ENDLESS)

    await chat.page.get_by_role("textbox", name="Steer").fill("focus on NATS")
    await chat.page.get_by_role("button", name="Steer").click()
    await expect(chat.notice).to_have_text("Steer applied")
    await expect(chat.page.get_by_role("textbox", name="Steer")).to_have_value("")
    await expect(answer.locator(".progress")).to_have_text("steered: focus on NATS")
    await expect(chat.text(answer)).to_contain_text("Steering now: focus on NATS —")
    await shots.take(chat.page, "steered")
    await chat.stop_button.click()
    await expect(answer).to_have_attribute("data-status", "cancelled")
    await chat.matches_view(demo)


@memory_only
async def test_a_team_message_lists_four_agents_with_their_status(
    start_demo: StartDemo, browser_context: BrowserContext, shots: Shots
) -> None:
    demo = await start_demo(tokens_per_second=PACE, tokens=SHORT)
    chat = await ChatPage.open(browser_context, demo.base + "/")
    await chat.send("Ask the team how cursors survive a reload")
    agents = chat.agents.get_by_role("listitem")
    await expect(agents).to_have_count(4)
    await expect(agents.filter(has_text="working")).not_to_have_count(0)
    await shots.take(chat.page, "team-working")
    names = ["assistant", "researcher-1", "researcher-2", "researcher-3"]
    for name, item in zip(names, await agents.all(), strict=True):
        await expect(item).to_have_text(re.compile(f"^{name} "))
        await expect(item).to_have_text(f"{name} completed")
    await expect(chat.answers).to_have_count(4)
    view = await chat.matches_view(demo)
    assert sorted(m["agent"] for m in view["messages"] if m["role"] == "assistant") == names
    await shots.take(chat.page, "team-completed")


@memory_only
async def test_a_deleted_session_resets_the_page_which_then_follows_the_new_log(
    start_demo: StartDemo, browser_context: BrowserContext, shots: Shots
) -> None:
    demo, chat, answer = await answering(start_demo, browser_context, BRIEF)
    await expect(answer).to_have_attribute("data-status", "completed")

    await demo.hub.session(chat.session_id).delete()
    await expect(chat.notice).to_have_text(re.compile("^The session was reset: "))
    await expect(chat.answers).to_have_count(0)
    await chat.send("A new start")
    await expect(chat.answers.first).to_have_attribute("data-status", "completed")
    view = await chat.matches_view(demo)
    assert [text_of(m) for m in view["messages"] if m["role"] == "user"] == ["A new start"]
    await shots.take(chat.page, "after-reset")


@memory_only
async def test_the_js_client_doc_example_follows_an_answer_and_stops_the_next(
    start_demo: StartDemo, browser_context: BrowserContext, shots: Shots
) -> None:
    demo = await start_demo(tokens_per_second=PACE, tokens=SHORT, pages={"/example.html": doc_example(JS_CLIENT_DOC)})
    page = await browser_context.new_page()
    await page.goto(demo.base + "/example.html")
    answer, said = page.locator("#answer"), page.locator("#said")

    await demo.send(DOC_SESSION, QUESTION)
    await demo.run_ended(DOC_SESSION)
    first = (await demo.view(DOC_SESSION))["messages"][-1]
    await expect(answer).to_have_text(text_of(first))

    before_second = (await demo.view(DOC_SESSION))["cursor"]
    await demo.send(DOC_SESSION, "And how does it stop?")
    await expect(answer).not_to_have_text(text_of(first))
    await expect(answer).to_have_text(SOME_WORDS)
    await page.get_by_role("button", name="Stop").click()
    await expect(said).to_have_text("stop applied")
    await shots.take(page, "doc-example-stopped")
    await demo.run_ended(DOC_SESSION, after=before_second)
    second = (await demo.view(DOC_SESSION))["messages"][-1]
    assert second["status"] == "cancelled" and second["reason"] == "stopped by the user"
    await expect(answer).to_have_text(text_of(second))


# -- helpers --------------------------------------------------------------------------------------------------------


class AckGate:
    """Routes the page's gateway WebSockets through to the server, and holds back acks while ``hold`` is set (so
    a test can see what the page shows until a control is acknowledged)."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[tuple[WebSocketRoute, str | bytes]] = []

    def route(self, page_side: WebSocketRoute) -> None:
        server = page_side.connect_to_server()

        def down(message: str | bytes) -> None:
            if self.hold and isinstance(message, str) and '"kind":"ack"' in message:
                self.held.append((page_side, message))
            else:
                page_side.send(message)

        server.on_message(down)

    def release(self) -> None:
        self.hold = False
        for page_side, message in self.held:
            page_side.send(message)
        self.held.clear()
