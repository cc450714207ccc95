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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..cursor import Cursor
from ..errors import (
    BackendUnavailable,
    ConfigurationError,
    DurableAIError,
    HubClosed,
    InvalidCursor,
    PayloadTooLarge,
    PermissionDenied,
)
from ..events import Event, encode
from ..hub import Hub
from ..session import EventStream

__all__ = [
    "EXCEPTION_HANDLERS",
    "DurableAI",
    "event_source",
    "http_status",
    "requested_cursor",
]

logger = logging.getLogger("durable_ai")

#: seconds between SSE heartbeat comments while a stream is quiet
HEARTBEAT_SECONDS = 15.0
_QUEUE = 256  # events a slow client may be behind before the reader waits for it


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


def event_source(
    stream: EventStream | AsyncIterator[Event],
    *,
    heartbeat: float = HEARTBEAT_SECONDS,
    headers: Mapping[str, str] | None = None,
    frame: Callable[[Event], bytes] = _frame,
) -> StreamingResponse:
    """A ``text/event-stream`` response of ``stream``'s events (see the module docstring).

    ``frame`` turns an event into its SSE bytes (the default: ``id:`` cursor, ``event:`` type, ``data:`` JSON).
    """
    return StreamingResponse(
        _pump(stream, heartbeat, frame),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )


async def _pump(
    stream: EventStream | AsyncIterator[Event], heartbeat: float, frame: Callable[[Event], bytes]
) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(_QUEUE)

    async def read() -> None:
        try:
            async for event in stream:
                await queue.put(frame(event))
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
                return
            if isinstance(item, BaseException):
                status = http_status(item)
                body = json.dumps({"error": type(item).__name__, "message": str(item), "status": status})
                yield f"event: error\ndata: {body}\n\n".encode()
                return
            yield item
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


# -- the app's hub and its agents ------------------------------------------------------------------------------


class DurableAI:
    """A hub for a Starlette or FastAPI app's lifetime, and the agents it launches (see the module docstring).

    Args:
        hub: a :class:`~durable_ai.Hub` (not yet open), or a backend URL to make one from.
        shutdown_grace: seconds the launched agents get to end after the hub closed, before they are cancelled.
    """

    def __init__(self, hub: Hub | str = "memory://", *, shutdown_grace: float = 5.0) -> None:
        self._hub = hub if isinstance(hub, Hub) else Hub(hub)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._open = False
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

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("agent %r failed", task.get_name(), exc_info=exc)

    # -- the native gateway --------------------------------------------------------------------------------

    def gateway_routes(self, prefix: str = "/sessions") -> list[Route]:
        """``GET {prefix}/{id}/events`` (SSE, resumable with ``Last-Event-ID`` or ``?after=``, ``?follow=false``
        to stop at the log's end) and ``GET {prefix}/{id}/view`` (the session's view as JSON)."""
        return [
            Route(f"{prefix}/{{session_id}}/events", self._events, methods=["GET"]),
            Route(f"{prefix}/{{session_id}}/view", self._view, methods=["GET"]),
        ]

    async def _events(self, request: Request) -> Response:
        try:
            session = self._hub.session(request.path_params["session_id"])
            after = requested_cursor(request)
            follow = request.query_params.get("follow", "true").lower() not in ("false", "0", "no")
            return event_source(session.events(after, follow=follow))
        except DurableAIError as exc:
            return await _error(request, exc)

    async def _view(self, request: Request) -> Response:
        try:
            view = await self._hub.session(request.path_params["session_id"]).view()
        except DurableAIError as exc:
            return await _error(request, exc)
        return Response(view.model_dump_json(), media_type="application/json")
