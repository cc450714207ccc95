"""A scripted agent and a ready-made app, to try durable-ai without an LLM (``durable-ai demo``).

:class:`ScriptedAgent` answers every chat message the way a streaming LLM agent would, deterministically: a
status, a few reasoning deltas, a ``search`` tool call and its result, then a long answer paced at a fixed rate
of tokens per second. Before each token it looks at its run's inbox: a steer changes the rest of the answer. A
cancel stops it at its next ``await``, as it stops any agent. A message with the word "team" in it makes the run
an orchestrator of three sub-agents, ``researcher-1`` to ``researcher-3``, each writing its own run straight to
the session.

:func:`create_app` serves it behind the Vercel AI SDK chat routes and the native gateway, with a chat page at ``/``
(install the ``demo`` extra: ``durable-ai[demo]``)::

    from durable_ai.demo import create_app

    app = create_app("memory://", tokens_per_second=50)  # uvicorn module:app
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
from collections import deque
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError
from .run import Run
from .session import Session

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.routing import BaseRoute

    from .hub import Hub
    from .integrations.vercel import ChatTurn

__all__ = ["ScriptedAgent", "create_app", "page_routes"]

logger = logging.getLogger("durable_ai.demo")

MAX_QUERY = 200
"""Characters of the user's message that go into the ``search`` tool call's query."""

RESEARCHERS = 3
"""Sub-agents an orchestrator ("team") run starts."""

_TEAM = re.compile(r"\bteam\b", re.IGNORECASE)
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
_MAX_TOPIC = 24  # words of a message (or a steer) the answer weaves in
_MAX_LAG = 0.25  # seconds the pacing may fall behind before its schedule restarts from now (no bursts)

_VOCABULARY_TEXT = (
    "the answer depends on how durable sessions keep every token in order so that a client which reconnects "
    "resumes from its cursor without gaps or duplicates while the agent keeps writing and other devices join "
    "late and see the same history cancel and steer travel as typed controls acknowledged by the writer runs "
    "end completed cancelled or failed and sub-agents write their own runs into the session for everyone to see"
)
_VOCABULARY = tuple(_VOCABULARY_TEXT.split())


class _Pacer:
    """Paces tokens at a fixed rate against a monotonic schedule (``next_at += 1 / rate``), so the time spent
    writing a token does not add up into drift."""

    def __init__(self, tokens_per_second: float) -> None:
        self._interval = 1.0 / tokens_per_second
        self._next_at: float | None = None

    async def wait(self) -> None:
        now = asyncio.get_running_loop().time()
        if self._next_at is None or self._next_at < now - _MAX_LAG:
            self._next_at = now
        self._next_at += self._interval
        # sleep(0) when on time or behind: a cancel still lands here, and other tasks get to run.
        await asyncio.sleep(max(0.0, self._next_at - now))


class _Words:
    """The deterministic words of one answer: a fixed vocabulary with the topic's words woven in, drawn from a
    generator seeded by the text the answer is about (so different messages give different answers)."""

    def __init__(self, about: str) -> None:
        self._topic = _topic(about)
        self._random = random.Random(_seed(about))
        self._sentence = 0  # words so far in the current sentence
        self._length = self._sentence_length()

    def _sentence_length(self) -> int:
        return self._random.randint(8, 16)

    def steer(self, text: str) -> list[str]:
        """Switch the rest of the answer to ``text``; returns the words that acknowledge it, to write next."""
        self._topic = _topic(text) or self._topic
        self._random = random.Random(_seed(text))
        self._sentence, self._length = 0, self._sentence_length()
        return ["Steering", "now:", *text.split()[:_MAX_TOPIC], "—"]

    def next(self) -> str:
        """The next word."""
        if self._topic and self._random.random() < 0.2:
            word = self._random.choice(self._topic)
        else:
            word = self._random.choice(_VOCABULARY)
        if self._sentence == 0:
            word = word[:1].upper() + word[1:]
        self._sentence += 1
        if self._sentence >= self._length:
            word += "."
            self._sentence, self._length = 0, self._sentence_length()
        return word


def _topic(text: str) -> list[str]:
    return _WORD.findall(text)[:_MAX_TOPIC]


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")


class ScriptedAgent:
    """A chat agent that streams a scripted, deterministic answer at ``tokens_per_second`` (see the module
    docstring). Use it wherever a :data:`~durable_ai.integrations.vercel.ChatAgent` goes::

        chat_routes(durable, ScriptedAgent(tokens_per_second=50))

    For each message it writes a ``status`` ("thinking"), a short reasoning, a ``search`` tool call (its input
    ``{"query": <the message, at most 200 characters>}``) and its result, then an answer of at least ``tokens``
    text deltas, each a word and a space. A steer that reaches the run writes a status ``steered: <text>`` and
    the rest of the answer is about the steer. A message with the word "team" makes a ``plan`` tool call, starts
    three sub-agent runs concurrently on ``turn.session`` (parent: the run), each with ``tokens // 3`` tokens of
    its own, then writes a short summary; cancelling the orchestrator cancels them too.

    Args:
        tokens_per_second: the pace of every delta the agent writes (positive).
        tokens: the answer's length in text deltas (at least 1).
    """

    def __init__(self, *, tokens_per_second: float = 50.0, tokens: int = 320) -> None:
        if not (isinstance(tokens_per_second, int | float) and math.isfinite(tokens_per_second)) or (
            tokens_per_second <= 0
        ):
            raise ConfigurationError(f"tokens_per_second must be a positive number, got {tokens_per_second!r}")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ConfigurationError(f"tokens must be a positive integer, got {tokens!r}")
        self.tokens_per_second = float(tokens_per_second)
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"ScriptedAgent(tokens_per_second={self.tokens_per_second:g}, tokens={self.tokens})"

    async def __call__(self, run: Run, turn: ChatTurn) -> None:
        """Answer ``turn.message`` into ``run``."""
        text = turn.message.content
        pacer = _Pacer(self.tokens_per_second)
        if _TEAM.search(text):
            logger.debug("run %s orchestrates %d researchers", run.id, RESEARCHERS)
            await self._orchestrate(run, turn.session, text, pacer)
        else:
            logger.debug("run %s answers with %d tokens", run.id, self.tokens)
            await self._respond(run, text, pacer)

    async def _respond(self, run: Run, text: str, pacer: _Pacer) -> None:
        query = text[:MAX_QUERY]
        await run.status("thinking")
        phrases = ["The user asks about", f"{_quote(query, 60)}.", "Searching first, then answering."]
        await self._reason(run, phrases, pacer)
        call = await run.tool_call("search", {"query": query})
        for _ in range(3):  # the search takes a moment
            await pacer.wait()
        await run.tool_result(call, {"hits": 3, "titles": _titles(query)})
        await _stream(run, _Words(text), self.tokens, pacer)

    async def _orchestrate(self, run: Run, session: Session, text: str, pacer: _Pacer) -> None:
        await run.status("planning")
        await self._reason(run, ["Splitting the question", f"among {RESEARCHERS} researchers."], pacer)
        query = text[:MAX_QUERY]
        call = await run.tool_call("plan", {"question": query, "researchers": RESEARCHERS})
        parts = [f"part {n} of {_quote(query, 60)}" for n in range(1, RESEARCHERS + 1)]
        await run.tool_result(call, {"parts": parts})
        share = max(1, self.tokens // RESEARCHERS)  # the team writes at least as much as one answer
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._research(session, run, n, text, share), name=f"durable-ai demo researcher-{n}")
                for n in range(1, RESEARCHERS + 1)
            ]
        outcomes = [task.result() for task in tasks]
        await run.status("summarising")
        words = ["Summary:", *(f"{name} {outcome}," for name, outcome in outcomes[:-1])]
        last_name, last_outcome = outcomes[-1]
        words.append(f"and {last_name} {last_outcome}.")
        words.append(f"Together they covered {_quote(text[:MAX_QUERY], 60)}.")
        summary: deque[str] = deque(" ".join(words).split())
        await _stream(run, _Words(text), len(summary), pacer, script=summary)

    async def _research(self, session: Session, parent: Run, n: int, text: str, tokens: int) -> tuple[str, str]:
        name = f"researcher-{n}"
        pacer = _Pacer(self.tokens_per_second)
        async with session.run(agent=name, parent=parent) as run:
            await run.status(f"researching part {n} of {RESEARCHERS}")
            await _stream(run, _Words(f"{text}\n{name}"), tokens, pacer)
        return name, "was stopped" if run.cancelled else "finished"

    async def _reason(self, run: Run, phrases: list[str], pacer: _Pacer) -> None:
        for i, phrase in enumerate(phrases):
            await pacer.wait()
            await run.reasoning(phrase if i == len(phrases) - 1 else phrase + " ")


async def _stream(run: Run, words: _Words, tokens: int, pacer: _Pacer, *, script: deque[str] | None = None) -> None:
    """Write ``tokens`` text deltas (more if a steer adds words), checking the run's inbox before each one.

    ``script``: words to write first (then the generated ones).
    """
    pending: deque[str] = script if script is not None else deque()
    written = 0
    while written < tokens or pending:
        steer = run.inbox.get_nowait()
        if steer is not None:
            logger.debug("run %s steered: %s", run.id, steer.text)
            await run.status(f"steered: {_quote(steer.text, MAX_QUERY)}")
            pending.extendleft(reversed(words.steer(steer.text)))  # before any scripted words left
        word = pending.popleft() if pending else words.next()
        await pacer.wait()
        await run.text(word + " ")
        written += 1


def _quote(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _titles(query: str) -> list[str]:
    topic = " ".join(_topic(query)[:4]) or "your question"
    return [f"An introduction to {topic}", f"{topic}: common pitfalls", f"What changed in {topic} this year"]


_PAGE_FILES = {"/": "demo.html", "/demo.js": "demo.js", "/demo.css": "demo.css"}


def page_routes() -> list[BaseRoute]:
    """The demo's chat page: ``GET /`` (``/?session=<id>`` opens that session; without one the page makes one and
    puts it in the URL), and its script and style sheet. Plain HTML, CSS and JavaScript: no build step, nothing
    fetched from elsewhere. The page sends messages with ``POST /api/chat`` and follows the session with the
    gateway's JS client (``/sessions/durable-ai.js``), so it needs the routes :func:`create_app` serves.
    """
    from .integrations._static import static_route

    return [static_route(path, name) for path, name in _PAGE_FILES.items()]


def create_app(
    backend: str | Hub = "memory://",
    *,
    tokens_per_second: float = 50.0,
    tokens: int = 320,
    **chat_options: Any,
) -> Starlette:
    """A Starlette app serving a :class:`ScriptedAgent` behind the Vercel AI SDK chat routes and the native
    gateway, with its hub on ``backend`` (a URL, or a hub not yet open) for the app's lifetime, and the chat page
    at ``/`` (see :func:`page_routes`).

    ``chat_options`` go to :func:`~durable_ai.integrations.vercel.chat_routes` (``prefix``, ``strategy``,
    ``abort``, ``sub_agents``, ``chunks``...). The app's :class:`~durable_ai.integrations.starlette.DurableAI`
    is ``app.state.durable``. Needs the ``demo`` extra (Starlette; uvicorn to serve it).
    """
    from starlette.applications import Starlette

    from .integrations.starlette import EXCEPTION_HANDLERS, DurableAI
    from .integrations.vercel import chat_routes

    agent = ScriptedAgent(tokens_per_second=tokens_per_second, tokens=tokens)
    durable = DurableAI(backend)
    app = Starlette(
        routes=[
            *page_routes(),
            *chat_routes(durable, agent, **chat_options),
            *durable.gateway_routes(),
        ],
        lifespan=durable.lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.durable = durable
    return app
