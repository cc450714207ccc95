"""Cross-origin REST requests answered as Ably answers a browser: preflights on any path, CORS headers on every
response, the request's ``Origin`` echoed so that ably-js's credentialed requests (``withCredentials``) pass.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
#: what ably-js and ably-python send (and the ``X-Ably-*`` headers of an unenveloped publish)
ALLOW_HEADERS = (
    "authorization, content-type, accept, x-ably-version, x-ably-lib, ably-agent, x-ably-clientid, "
    "x-ably-messageid, x-ably-name, x-ably-encoding, x-ably-connectionkey, x-requested-with"
)
#: what a browser lets a client read: the ``Link`` pagination ably-js follows and Ably's error headers
EXPOSE_HEADERS = "Link, Content-Type, Content-Length, X-Ably-Errorcode, X-Ably-Errormessage, X-Ably-Serverid"
MAX_AGE = "86400"


class Cors:
    """ASGI middleware: ``OPTIONS`` on any path is a preflight (204); every HTTP response carries CORS headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_headers = Headers(scope=scope)
        origin = request_headers.get("origin")
        if scope["method"] == "OPTIONS":
            headers = self._headers(origin)
            headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            requested = request_headers.get("access-control-request-headers")
            headers["Access-Control-Allow-Headers"] = f"{ALLOW_HEADERS}, {requested}" if requested else ALLOW_HEADERS
            headers["Access-Control-Max-Age"] = MAX_AGE
            headers["Content-Length"] = "0"
            await send({"type": "http.response.start", "status": 204, "headers": _raw(headers)})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                for name, value in self._headers(origin).items():
                    response_headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _headers(origin: str | None) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": origin or "*", "Access-Control-Expose-Headers": EXPOSE_HEADERS}
        if origin:
            headers["Access-Control-Allow-Credentials"] = "true"
            headers["Vary"] = "Origin"
        return headers


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
