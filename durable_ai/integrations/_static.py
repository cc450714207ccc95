"""The files the integrations serve from ``static/`` (package data): the JS client and the demo's page."""

from __future__ import annotations

import importlib.resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def static_route(path: str, name: str) -> Route:
    """``GET path`` answered with ``static/<name>``, read once, here; ``no-cache``, so a new version is seen at
    once. The media type comes from the name's suffix."""
    body = importlib.resources.files("durable_ai.integrations").joinpath("static", name).read_bytes()
    media_type = MEDIA_TYPES[name[name.rindex(".") :]]

    async def serve(request: Request) -> Response:
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return Route(path, serve, methods=["GET"])
