"""Starlette and FastAPI building blocks: a hub for the app's lifetime, agents launched detached from requests,
session events as Server-Sent Events, and durable-ai's errors as HTTP statuses.

Install with the ``starlette`` extra (``durable-ai[starlette]``; FastAPI brings Starlette itself)::

    from starlette.applications import Starlette
    from durable_ai.integrations.starlette import DurableAI

    durable = DurableAI("memory://")
    app = Starlette(routes=durable.gateway_routes(), lifespan=durable.lifespan)

- :class:`DurableAI` opens the hub when the app starts and closes it when the app stops. :meth:`DurableAI.launch`
  starts an agent coroutine that belongs to the app, not to the request that asked for it: a client that
  disconnects never stops it. On shutdown the hub cancels every run with the reason "the agent process is shutting
  down" (each writes its ``run-end``), then the launched tasks still running are cancelled and awaited.
- :func:`event_source` streams an :class:`~durable_ai.session.EventStream` as SSE: each event's cursor in ``id:``,
  its wire JSON in ``data:``, a comment line every ``heartbeat`` seconds while nothing happens, and nothing left
  running when the client goes away (the stream is read by a task the response owns and closes).
- :func:`requested_cursor` takes a resume point from ``Last-Event-ID`` (what browsers send on reconnect) or
  ``?after=``; a cursor durable-ai did not make is a 400.
- :func:`http_status` and :data:`EXCEPTION_HANDLERS` map durable-ai's errors: bad ids and cursors 400, refused
  credentials 403, input too large 413, a broker that cannot be reached 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Literal, TypeAlias

import jwt
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .._util import IdFactory, now_ms, validate_name, validate_session_id
from ..backends.base import IssuesClientCredentials
from ..backends.kit import cancel_and_wait
from ..cursor import Cursor
from ..errors import (
    AckTimeout,
    BackendUnavailable,
    ConfigurationError,
    DurableAIError,
    HubClosed,
    InvalidCursor,
    PayloadTooLarge,
    PermissionDenied,
)
from ..events import AckOutcome, ControlAck, Event, encode
from ..hub import Hub
from ..session import EventStream
from ._static import static_route

__all__ = [
    "EXCEPTION_HANDLERS",
    "Action",
    "Authorize",
    "DurableAI",
    "SessionTokens",
    "event_source",
    "http_status",
    "requested_cursor",
    "uvicorn_server",
]

logger = logging.getLogger("durable_ai")

#: seconds between SSE heartbeat comments while a stream is quiet
HEARTBEAT_SECONDS = 15.0
_QUEUE = 256  # events a slow client may be behind before the reader waits for it
_new_id = IdFactory()  # ids of the acks the gateway writes itself (for prompts the app answers)


# -- errors --------------------------------------------------------------------------------------------------------


def http_status(exc: BaseException) -> int:
    """The HTTP status for a durable-ai error: 400 for what the client sent, 403 for refused credentials, 503 for
    a broker that cannot be reached (or a hub that is closing), 500 otherwise."""
    if isinstance(exc, PermissionDenied):
        return 403
    if isinstance(exc, PayloadTooLarge):
        return 413
    if isinstance(exc, BackendUnavailable | HubClosed):
        return 503
    if isinstance(exc, ConfigurationError | InvalidCursor | ValueError):
        return 400
    return 500


async def _error(request: Request, exc: Exception) -> Response:
    status = http_status(exc)
    if status >= 500:
        logger.warning("%s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=status)


#: Starlette ``exception_handlers`` for durable-ai's errors (``Starlette(exception_handlers=EXCEPTION_HANDLERS)``)
EXCEPTION_HANDLERS: Mapping[Any, Callable[[Request, Exception], Awaitable[Response]]] = {DurableAIError: _error}


# -- cursors -------------------------------------------------------------------------------------------------------


def requested_cursor(request: Request) -> str | None:
    """Where the client asks to resume: ``Last-Event-ID``, else ``?after=`` (``None``: from the start).

    Raises :class:`~durable_ai.errors.InvalidCursor` (400) for anything durable-ai did not produce.
    """
    text = request.headers.get("last-event-id") or request.query_params.get("after")
    if not text:
        return None
    Cursor.parse(text)
    return text


# -- Server-Sent Events --------------------------------------------------------------------------------------------


def _frame(event: Event) -> bytes:
    lines = []
    if event.cursor is not None:
        lines.append(f"id: {event.cursor}")
    lines.append(f"event: {event.type}")
    lines.append("data: " + encode(event).decode())
    return ("\n".join(lines) + "\n\n").encode()


def _error_frame(exc: BaseException) -> bytes:
    status = http_status(exc)
    body = json.dumps({"error": type(exc).__name__, "message": str(exc), "status": status})
    return f"event: error\ndata: {body}\n\n".encode()


def event_source(
    stream: EventStream | AsyncIterator[Event],
    *,
    heartbeat: float = HEARTBEAT_SECONDS,
    headers: Mapping[str, str] | None = None,
    frame: Callable[[Event], bytes] = _frame,
    end: bytes = b"",
    error: Callable[[BaseException], bytes] = _error_frame,
) -> StreamingResponse:
    """A ``text/event-stream`` response of ``stream``'s events (see the module docstring).

    ``frame`` turns an event into its SSE bytes (the default: ``id:`` cursor, ``event:`` type, ``data:`` JSON;
    empty bytes send nothing); ``end`` is sent after the stream's last event, and ``error`` makes the frame that
    tells of an error the stream raised (the default: an ``event: error`` with its name, message and HTTP status).
    """
    return StreamingResponse(
        _pump(stream, heartbeat, frame, end, error),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )


async def _pump(
    stream: EventStream | AsyncIterator[Event],
    heartbeat: float,
    frame: Callable[[Event], bytes],
    end: bytes,
    error: Callable[[BaseException], bytes],
) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(_QUEUE)

    async def read() -> None:
        try:
            async for event in stream:
                data = frame(event)
                if data:
                    await queue.put(data)
        except Exception as exc:
            await queue.put(exc)
        else:
            await queue.put(None)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    # The stream is read, and closed, by its own task: the response's body can end at any await (a client that
    # went away) without closing a generator another task is running.
    reader = asyncio.get_running_loop().create_task(read(), name="durable-ai sse reader")
    try:
        yield b": stream\n\n"  # headers and a first byte at once, so proxies and clients see the stream open
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), heartbeat)
            except TimeoutError:
                yield b": heartbeat\n\n"
                continue
            if item is None:
                if end:
                    yield end
                return
            if isinstance(item, BaseException):
                yield error(item)
                if end:
                    yield end
                return
            yield item
    finally:
        await cancel_and_wait(reader)


# -- the app's hub and its agents ------------------------------------------------------------------------------

ACTIONS: tuple[Action, ...] = ("read", "prompt", "cancel", "steer")

Action: TypeAlias = Literal["read", "prompt", "cancel", "steer"]
"""What a client asks to do with a session: read it (events, view, resume, messages), send it a message, stop
a run, steer a run."""

PromptAnswer: TypeAlias = Callable[[str, str, "str | None"], Awaitable["tuple[AckOutcome, str | None, str | None]"]]
"""``answer(session_id, content, message_id)``: start answering a prompt; ``(outcome, reason, run_id)``."""

Authorize: TypeAlias = Callable[[HTTPConnection, str, Action], bool | Awaitable[bool]]
"""``authorize(request_or_websocket, session_id, action)``: whether the client may; see :class:`DurableAI`."""


class SessionTokens:
    """Signed, expiring session tokens (JWT, HS256): an ``authorize`` hook for :class:`DurableAI`.

    The app's own login decides who may use which session and calls :meth:`issue`; the client sends the token as
    ``Authorization: Bearer <token>``, or as ``?token=`` where it cannot set headers (a browser's ``WebSocket`` or
    ``EventSource``). A token allows one session, the actions it names, until it expires::

        tokens = SessionTokens(os.environ["SESSION_TOKEN_SECRET"])
        durable = DurableAI("memory://", authorize=tokens)
        token = tokens.issue("chat-42", subject=user.id)               # hand it to the user's page

    Args:
        secret: the signing key, at least 32 bytes, kept on the server.
        ttl: seconds a token issued without its own ``ttl`` is valid.
        issuer: the ``iss`` claim written and required.
    """

    algorithm = "HS256"

    def __init__(self, secret: str | bytes, *, ttl: float = 3600.0, issuer: str = "durable-ai") -> None:
        key = secret.encode() if isinstance(secret, str) else secret
        if len(key) < 32:
            raise ConfigurationError("a session token secret must be at least 32 bytes")
        if ttl <= 0:
            raise ConfigurationError("ttl must be positive")
        self._key = key
        self.ttl = ttl
        self.issuer = issuer

    def issue(
        self,
        session_id: str,
        *,
        actions: Iterable[Action] = ACTIONS,
        subject: str | None = None,
        ttl: float | None = None,
    ) -> str:
        """A token for ``session_id`` that allows ``actions`` (default: all) for ``ttl`` seconds."""
        validate_session_id(session_id)
        allowed = sorted(set(actions))
        unknown = set(allowed) - set(ACTIONS)
        if unknown:
            raise ConfigurationError(f"unknown actions {sorted(unknown)}; use {', '.join(ACTIONS)}")
        issued = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "iat": issued,
            "exp": issued + max(1, round(ttl if ttl is not None else self.ttl)),
            "sid": session_id,
            "act": allowed,
        }
        if subject is not None:
            claims["sub"] = validate_name("subject", subject)
        return jwt.encode(claims, self._key, algorithm=self.algorithm)

    def claims(self, token: str) -> dict[str, Any] | None:
        """The claims of a valid token (signature, issuer, expiry checked), or ``None``."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                issuer=self.issuer,
                options={"require": ["exp", "iat", "iss", "sid", "act"]},
            )
        except jwt.PyJWTError:
            return None
        return claims

    def allows(self, token: str, session_id: str, action: Action) -> bool:
        """Whether ``token`` is valid and allows ``action`` on ``session_id``."""
        claims = self.claims(token)
        if claims is None or claims.get("sid") != session_id:
            return False
        actions = claims.get("act")
        return isinstance(actions, list) and action in actions

    @staticmethod
    def token_of(connection: HTTPConnection) -> str | None:
        """The token a request carries: ``Authorization: Bearer``, else ``?token=``."""
        header = connection.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return connection.query_params.get("token") or None

    def __call__(self, connection: HTTPConnection, session_id: str, action: Action) -> bool:
        token = self.token_of(connection)
        return token is not None and self.allows(token, session_id, action)


class DurableAI:
    """A hub for a Starlette or FastAPI app's lifetime, and the agents it launches (see the module docstring).

    Args:
        hub: a :class:`~durable_ai.Hub` (not yet open), or a backend URL to make one from.
        shutdown_grace: seconds the launched agents get to end after the hub closed, before they are cancelled.
        authorize: asked on every route (and for every control on a WebSocket) whether the client may do
            ``action`` on the session; a refusal is a 403 (or an error frame). Without it every client may do
            everything: fine on loopback, never in production. :class:`SessionTokens` makes one.
        client_id: the identity a client's broker credential carries (see :meth:`gateway_routes`), from its
            request (e.g. the subject of its session token); by default ``"anonymous"``.
    """

    def __init__(
        self,
        hub: Hub | str = "memory://",
        *,
        shutdown_grace: float = 5.0,
        authorize: Authorize | None = None,
        client_id: Callable[[HTTPConnection], str] | None = None,
    ) -> None:
        self._hub = hub if isinstance(hub, Hub) else Hub(hub)
        self.authorize = authorize
        self.client_id = client_id
        self._tasks: set[asyncio.Task[Any]] = set()
        self._open = False
        self._prompts: PromptAnswer | None = None
        self.shutdown_grace = shutdown_grace

    @property
    def hub(self) -> Hub:
        """The app's hub (open while the app runs)."""
        return self._hub

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """The app's lifespan: ``Starlette(lifespan=durable.lifespan)`` or ``FastAPI(lifespan=durable.lifespan)``."""
        await self._hub.open()
        self._open = True
        try:
            yield
        finally:
            self._open = False
            await self.close()

    async def close(self) -> None:
        """Close the hub (every run ends cancelled, with the shutdown reason), then end the launched agents."""
        try:
            await self._hub.close()
        finally:
            tasks = list(self._tasks)
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=self.shutdown_grace)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def answer_prompts(self, answer: PromptAnswer | None) -> None:
        """Who answers the ``prompt`` controls clients send over the gateway's WebSocket in this app:
        ``answer(session_id, content, message_id)`` starts the answer and returns ``(outcome, reason, run_id)``,
        which the client gets as the prompt's ``control-ack``. The chat routes register theirs (a prompt is then a
        message of the chat). Without one, a prompt goes to the agent serving the session (``session.serve``)."""
        self._prompts = answer

    @property
    def prompt_answer(self) -> PromptAnswer | None:
        """What :meth:`answer_prompts` registered, if anything."""
        return self._prompts

    async def begin_shutdown(self) -> None:
        """What a server calls when it starts to shut down, before it waits for open connections to close.

        Servers run the lifespan's shutdown only once every connection is closed, and a live SSE stream or
        WebSocket never closes on its own: so this closes the app's hub at once (every run ends ``cancelled`` with
        the shutdown reason, and every stream served from the hub ends), then ends the launched agents. The
        lifespan's own close is then a no-op. :func:`uvicorn_server` calls it.
        """
        self._open = False
        await self.close()

    def launch(self, agent: Coroutine[Any, Any, Any], *, name: str = "durable-ai agent") -> asyncio.Task[Any]:
        """Run ``agent`` (a coroutine, typically ``async with session.run(...)``) detached from the request.

        The task belongs to the app: a client disconnect never cancels it, and shutdown ends it (see
        :meth:`close`). An exception it raises is logged. Raises :class:`~durable_ai.errors.HubClosed` when the
        app is not running.
        """
        if not self._open or self._hub.closed:
            agent.close()
            raise HubClosed("the app's hub is not open: launch agents while the app runs")
        task = asyncio.get_running_loop().create_task(agent, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    async def check_access(self, connection: HTTPConnection, session_id: str, action: Action) -> None:
        """Ask the ``authorize`` hook; raises :class:`~durable_ai.errors.PermissionDenied` (403) on a refusal."""
        if self.authorize is None:
            return
        verdict = self.authorize(connection, session_id, action)
        if not isinstance(verdict, bool):
            verdict = await verdict
        if verdict is not True:
            raise PermissionDenied(f"not allowed to {action} session {session_id!r}")

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("agent %r failed", task.get_name(), exc_info=exc)

    # -- the native gateway --------------------------------------------------------------------------------

    def gateway_routes(self, prefix: str = "/sessions") -> list[BaseRoute]:
        """The native gateway:

        - ``GET {prefix}/durable-ai.js``: the JavaScript client for browsers (an ES module without dependencies; see
          docs/integrations/js-client.md). It is the same for everyone, so it asks no ``authorize``.
        - ``GET {prefix}/{id}/events``: SSE, resumable with ``Last-Event-ID`` or ``?after=``; ``?follow=false`` stops
          at the log's end.
        - ``GET {prefix}/{id}/view``: the session's view as JSON.
        - ``GET {prefix}/{id}/credential``: on a backend whose clients connect to the broker themselves (Ably), the
          client's credential for this session only (an Ably TokenRequest, for ably-js's ``authUrl`` or
          ``authCallback``), so the server does not relay; 404 on a backend that has none.
        - ``WS {prefix}/{id}/ws?after=<cursor>``: the events as ``{"kind": "event", "cursor", "event"}`` frames, and
          controls upstream: ``{"type": "cancel" | "steer" | "prompt", ..., "request": <any id>}``, each answered
          with ``{"kind": "ack", "request", "ack": <control-ack>}``. A frame that is not such a control is answered
          ``{"kind": "error", "request", "error", "message"}``, and the connection goes on.
        """
        return [
            static_route(f"{prefix}/durable-ai.js", "durable-ai.js"),
            Route(f"{prefix}/{{session_id}}/events", self._events, methods=["GET"]),
            Route(f"{prefix}/{{session_id}}/view", self._view, methods=["GET"]),
            Route(f"{prefix}/{{session_id}}/credential", self._credential, methods=["GET"]),
            WebSocketRoute(f"{prefix}/{{session_id}}/ws", self._socket),
        ]

    async def _events(self, request: Request) -> Response:
        try:
            session = self._hub.session(request.path_params["session_id"])
            await self.check_access(request, session.id, "read")
            after = requested_cursor(request)
            follow = request.query_params.get("follow", "true").lower() not in ("false", "0", "no")
            return event_source(session.events(after, follow=follow))
        except DurableAIError as exc:
            return await _error(request, exc)

    async def _view(self, request: Request) -> Response:
        try:
            session = self._hub.session(request.path_params["session_id"])
            await self.check_access(request, session.id, "read")
            view = await session.view()
        except DurableAIError as exc:
            return await _error(request, exc)
        return Response(view.model_dump_json(), media_type="application/json")

    async def _credential(self, request: Request) -> Response:
        try:
            session = self._hub.session(request.path_params["session_id"])
            await self.check_access(request, session.id, "read")
            backend = self._hub.backend
            if not isinstance(backend, IssuesClientCredentials):
                message = f"{type(backend).__name__} has no client credentials: read the session through this server"
                return JSONResponse({"error": "NoClientCredentials", "message": message}, status_code=404)
            client = self.client_id(request) if self.client_id is not None else "anonymous"
            credential = backend.client_credential(session.id, client)
        except DurableAIError as exc:
            return await _error(request, exc)
        return JSONResponse(credential, headers={"Cache-Control": "no-store"})

    async def _socket(self, websocket: WebSocket) -> None:
        try:
            session = self._hub.session(websocket.path_params["session_id"])
            await self.check_access(websocket, session.id, "read")
            after = websocket.query_params.get("after") or None
            if after is not None:
                Cursor.parse(after)
        except DurableAIError as exc:
            # A bad id or cursor: the client is told why, then the socket closes (1008, policy violation).
            await websocket.accept()
            error = {"kind": "error", "request": None, "error": type(exc).__name__, "message": str(exc)}
            await websocket.send_text(json.dumps(error))
            await websocket.close(code=1008, reason=type(exc).__name__)
            return
        await websocket.accept()
        gateway = _Socket(self, websocket, session, after)
        await gateway.run()


_CONTROL_FIELDS = {
    "cancel": {"run_id", "reason"},
    "steer": {"text", "run_id"},
    "prompt": {"content", "message_id"},
}


class _Socket:
    """One gateway WebSocket: the session's events down, controls up (see :meth:`DurableAI.gateway_routes`)."""

    def __init__(self, durable: DurableAI, websocket: WebSocket, session: Any, after: str | None) -> None:
        self.durable = durable
        self.websocket = websocket
        self.session = session
        self.after = after
        self.outgoing: asyncio.Queue[str] = asyncio.Queue(_QUEUE)
        self.tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> None:
        sender = asyncio.get_running_loop().create_task(self._send(), name="durable-ai ws sender")
        self._spawn(self._events(), "durable-ai ws events")
        try:
            while True:
                text = await self.websocket.receive_text()
                self._spawn(self._control(text), "durable-ai ws control")
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away (a dropped socket is never a cancel)
        finally:
            for task in [*self.tasks, sender]:
                await cancel_and_wait(task)

    async def _send(self) -> None:
        while True:
            await self.websocket.send_text(await self.outgoing.get())

    async def _events(self) -> None:
        try:
            async with self.session.events(self.after) as stream:
                async for event in stream:
                    cursor, wire = json.dumps(event.cursor), encode(event).decode()
                    await self.outgoing.put(f'{{"kind":"event","cursor":{cursor},"event":{wire}}}')
        except DurableAIError as exc:
            await self._error(None, exc)

    async def _error(self, request: object, exc: BaseException | str, kind: str = "") -> None:
        name = kind or type(exc).__name__
        message = str(exc)
        await self.outgoing.put(json.dumps({"kind": "error", "request": request, "error": name, "message": message}))

    async def _control(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            await self._error(None, "the frame is not JSON", "MalformedFrame")
            return
        request = frame.get("request") if isinstance(frame, dict) else None
        kind = frame.get("type") if isinstance(frame, dict) else None
        if not isinstance(frame, dict) or kind not in _CONTROL_FIELDS:
            await self._error(request, "expected a cancel, steer or prompt control", "MalformedFrame")
            return
        fields = {k: v for k, v in frame.items() if k not in ("type", "request")}
        unknown = set(fields) - _CONTROL_FIELDS[kind]
        if unknown:
            await self._error(request, f"unknown fields for {kind}: {sorted(unknown)}", "MalformedFrame")
            return
        try:
            await self.durable.check_access(self.websocket, self.session.id, kind)
            send = getattr(self.session, kind)
            answer = self.durable.prompt_answer
            if kind == "prompt" and answer is not None:
                await self._answered(request, answer, fields)
                return
            if kind == "steer":
                handle = await send(fields.pop("text", None), **fields)
            elif kind == "prompt":
                handle = await send(fields.pop("content", None), **fields)
            else:
                handle = await send(**fields)
            ack = await handle.ack()
        except (DurableAIError, TypeError, AckTimeout) as exc:
            await self._error(request, exc)
            return
        await self._ack(request, ack)

    async def _ack(self, request: object, ack: ControlAck) -> None:
        wire = encode(ack).decode()
        await self.outgoing.put(f'{{"kind":"ack","request":{json.dumps(request)},"ack":{wire}}}')

    async def _answered(self, request: object, answer: PromptAnswer, fields: dict[str, Any]) -> None:
        """A prompt the app answers itself (see :meth:`DurableAI.answer_prompts`); its ack comes from here."""
        content, message_id = fields.get("content"), fields.get("message_id")
        if not isinstance(content, str) or not content or not (message_id is None or isinstance(message_id, str)):
            await self._error(request, "a prompt needs its content (and a string message_id, if any)", "MalformedFrame")
            return
        outcome, reason, run_id = await answer(self.session.id, content, message_id)
        ack = ControlAck(
            id=_new_id(),
            session=self.session.id,
            run_id=run_id,
            ts=now_ms(),
            control_id=None,
            control_type="prompt",
            outcome=outcome,
            reason=reason,
        )
        await self._ack(request, ack)


# -- serving ---------------------------------------------------------------------------------------------------


def uvicorn_server(app: Any, durable: DurableAI, **config: Any) -> Any:
    """A ``uvicorn.Server`` for ``app`` (``config``: ``uvicorn.Config``'s arguments) whose shutdown starts with
    :meth:`DurableAI.begin_shutdown`, so that runs end ``cancelled`` and live streams end while clients are still
    connected (uvicorn would otherwise wait for them to disconnect). ``uvicorn_server(app, durable).run()``.
    Needs uvicorn."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            await durable.begin_shutdown()
            await super().shutdown(sockets)

    return _Server(uvicorn.Config(app, **config))
