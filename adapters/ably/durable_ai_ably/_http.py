"""Ably's REST API over httpx: hosts, authentication, retries and errors (used by :mod:`durable_ai_ably.rest`).

Hosts follow ably-python's ``endpoint`` option: a name such as ``main`` (the default) is Ably's production
routing policy, ``main.realtime.ably.net`` with the ``main.[a-e].fallback.ably-realtime.com`` fallbacks tried after a
connection failure or a 5xx; a value with a dot, ``localhost`` or ``::`` is a host (and port) used as it is, without
fallbacks (``127.0.0.1:8080/`` reaches ``http://127.0.0.1:8080`` with ``tls=false``).

Authentication: over TLS the key itself (HTTP basic auth). Ably refuses basic auth over plain HTTP, so without TLS
(or with ``use_token_auth`` in ``AblyOptions.client``) a token is requested with a token request signed by the key
(``POST /keys/{keyName}/requestToken``), sent as ``Authorization: Bearer <base64 of the token>``, and renewed
shortly before it expires and whenever Ably answers 40140-40149 (token expired or invalid).

Every request is retried on timeouts, connection failures, 5xx and 429 (after ``Retry-After`` when Ably sends it)
for up to ``publish_timeout`` seconds; each attempt waits ``attempt_timeout`` seconds at most.
"""

from __future__ import annotations

import asyncio
import base64
import json
import platform
import random
import secrets
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_before_delay, wait_random_exponential

from durable_ai.errors import BackendError, BackendUnavailable, HubClosed, PayloadTooLarge, PermissionDenied

from ._common import API_VERSION, AblyOptions, sign_token_request

__all__ = ["AblyHttp", "AblyHttpError", "rest_hosts"]

#: a token is renewed this many milliseconds before it expires (as ably-python does)
TOKEN_RENEW_MARGIN_MS = 15_000
#: the longest ``Retry-After`` honoured, in seconds
MAX_RETRY_AFTER = 60.0


def rest_hosts(endpoint: str | None) -> list[str]:
    """The REST hosts for ably-python's ``endpoint`` option: the primary host, then its fallbacks."""
    name = endpoint or "main"
    if "." in name or "::" in name or "localhost" in name:
        return [name.rstrip("/")]
    if name.startswith("nonprod:"):
        root = name[len("nonprod:") :]
        return [
            f"{root}.realtime.ably-nonprod.net",
            *(f"{root}.{c}.fallback.ably-realtime-nonprod.com" for c in "abcde"),
        ]
    return [f"{name}.realtime.ably.net", *(f"{name}.{c}.fallback.ably-realtime.com" for c in "abcde")]


def _agent() -> str:
    try:
        own = version("durable-ai-ably")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        own = "0"
    return f"durable-ai-ably/{own} python/{platform.python_version()}"


class AblyHttpError(Exception):
    """An error answer from Ably: the HTTP status, Ably's 5-digit code and its message."""

    def __init__(self, status: int, code: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{message} (code {code}, HTTP {status})")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def from_error(cls, error: object, status: int | None = None) -> AblyHttpError:
        """From an ``ErrorInfo`` object as Ably sends it (``{"message", "code", "statusCode"}``)."""
        info = error if isinstance(error, Mapping) else {}
        raw_status = info.get("statusCode")
        status = status or (raw_status if isinstance(raw_status, int) else 500)
        raw_code = info.get("code")
        code = raw_code if isinstance(raw_code, int) else status * 100
        message = info.get("message")
        return cls(status, code, message if isinstance(message, str) else f"HTTP {status}")

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500

    @property
    def token_error(self) -> bool:
        return self.status == 401 and 40140 <= self.code < 40150


class _Retry(Exception):
    """A failed attempt worth another: after ``delay`` seconds (``None``: backoff), on the next host if asked."""

    def __init__(self, cause: Exception, *, delay: float | None = None, next_host: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.delay = delay
        self.next_host = next_host


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def error_of(response: httpx.Response) -> AblyHttpError:
    """The error an unsuccessful answer carries (its body, else Ably's error headers, else the status)."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        error = AblyHttpError.from_error(body["error"], status)
    else:
        header = response.headers.get("x-ably-errorcode", "")
        code = int(header) if header.isdigit() else status * 100
        error = AblyHttpError(status, code, response.headers.get("x-ably-errormessage") or f"HTTP {status}")
    error.retry_after = _retry_after(response)
    return error


def json_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise BackendError(
            f"Ably answered {response.request.method} {response.request.url.path} with something that is not JSON"
        ) from None


def _token_expiry(token: str) -> int:
    """When a token expires (ms): a JWT's ``exp``; an opaque token is taken as valid for an hour."""
    parts = token.split(".")
    if len(parts) == 3:
        try:
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            return int(claims["exp"]) * 1000
        except (ValueError, KeyError, TypeError):
            pass
    return int(time.time() * 1000) + 3_600_000


class AblyHttp:
    """An httpx client for Ably's REST API with authentication and retries (see the module docstring)."""

    def __init__(self, options: AblyOptions) -> None:
        self.options = options
        hosts = rest_hosts(options.endpoint)
        fallbacks = hosts[1:]
        random.shuffle(fallbacks)
        self.hosts = [hosts[0], *fallbacks]
        self.scheme = "https" if options.tls else "http"
        self.uses_tokens = options.key is None or not options.tls or bool(options.client.get("use_token_auth"))
        self._basic = base64.b64encode((options.key or "").encode()).decode("ascii")
        self._headers = {"X-Ably-Version": API_VERSION, "Ably-Agent": _agent(), "Accept": "application/json"}
        self._client: httpx.AsyncClient | None = None
        self._token: str | None = None
        self._token_expires = 0
        self._token_lock = asyncio.Lock()

    async def open(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.options.attempt_timeout)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- requests ------------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        deadline: float | None = None,
        partial: bool = False,
    ) -> httpx.Response:
        """One request, retried (see the module docstring); a successful answer, or a typed error.

        ``path`` may carry a query (a ``Link`` of a paginated answer). ``deadline`` (``time.monotonic()``) ends
        the retries earlier than ``publish_timeout``. With ``partial``, a batch answer that some of its
        operations failed (400, code 40020) is returned as it is.
        """
        content = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        budget = self.options.publish_timeout
        if deadline is not None:
            budget = max(0.0, min(budget, deadline - time.monotonic()))
        host = 0
        try:
            async for attempt in AsyncRetrying(
                stop=stop_before_delay(budget),
                wait=self._wait,
                retry=retry_if_exception_type(_Retry),
                reraise=True,
            ):
                with attempt:
                    try:
                        return await self._attempt(method, self.hosts[host], path, params, content, partial)
                    except _Retry as retry:
                        if retry.next_host:
                            host = (host + 1) % len(self.hosts)
                        raise
        except _Retry as exc:
            raise self.typed(exc.cause, len(content or b"")) from exc.cause
        except AblyHttpError as exc:
            raise self.typed(exc, len(content or b"")) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    _backoff = wait_random_exponential(multiplier=0.05, max=1.0)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        # A renewed token is tried at once, but a token refused again waits like any other failure.
        if isinstance(exc, _Retry) and exc.delay is not None and (exc.delay > 0 or state.attempt_number <= 2):
            return exc.delay
        return float(self._backoff(state))

    def _client_or_raise(self) -> httpx.AsyncClient:
        if self._client is None:
            raise HubClosed("the Ably REST backend is not open")
        return self._client

    async def _attempt(
        self, method: str, host: str, path: str, params: Mapping[str, str] | None, content: bytes | None, partial: bool
    ) -> httpx.Response:
        headers = dict(self._headers)
        headers["Authorization"] = await self._authorization(host)
        if content is not None:
            headers["Content-Type"] = "application/json"
        response = await self._send(method, f"{self.scheme}://{host}{path}", params, content, headers)
        if response.is_success:
            return response
        error = error_of(response)
        if partial and error.code == 40020:
            return response
        if error.token_error and self.uses_tokens:
            self._token = None  # renew it, and try again at once
            raise _Retry(error, delay=0.0)
        if error.retryable:
            raise _Retry(error, delay=error.retry_after, next_host=error.status != 429)
        raise error

    async def _send(
        self,
        method: str,
        url: str,
        params: Mapping[str, str] | None,
        content: bytes | None,
        headers: Mapping[str, str],
    ) -> httpx.Response:
        client = self._client_or_raise()
        try:
            return await client.request(method, url, params=params, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            unavailable = BackendUnavailable(f"Ably did not answer within {self.options.attempt_timeout:g} s")
            raise _Retry(unavailable, next_host=True) from exc
        except httpx.TransportError as exc:
            raise _Retry(BackendUnavailable(f"cannot reach Ably: {exc!r}"), next_host=True) from exc

    def typed(self, exc: Exception, size: int = 0) -> Exception:
        """The durable-ai error for a failure that is not retried (again)."""
        if not isinstance(exc, AblyHttpError):
            return exc
        if exc.status == 413 or exc.code == 40009:
            return PayloadTooLarge(size, self.options.max_message_bytes)
        if exc.status in (401, 403):
            return PermissionDenied(f"Ably refused the credentials: {exc}")
        if exc.retryable:
            return BackendUnavailable(f"Ably is unavailable: {exc}")
        return BackendError(f"Ably refused the request: {exc}")

    def next_page(self, response: httpx.Response) -> str | None:
        """The path (with its query) of the next page of a paginated answer, from its ``Link`` header."""
        link = response.links.get("next")
        url = link.get("url") if link else None
        if not url:
            return None
        return response.request.url.join(url).raw_path.decode("ascii")

    # -- authentication ------------------------------------------------------------------------------------

    async def _authorization(self, host: str) -> str:
        if not self.uses_tokens:
            return f"Basic {self._basic}"
        async with self._token_lock:
            if self._token is None or self._token_expires - TOKEN_RENEW_MARGIN_MS <= time.time() * 1000:
                self._token, self._token_expires = await self._request_token(host)
            token = self._token
        return "Bearer " + base64.b64encode(token.encode()).decode("ascii")

    def token_request(self) -> dict[str, Any]:
        """A token request signed with the key: the key's capability, no clientId, Ably's default TTL."""
        assert self.options.key is not None
        key_name, _, secret = self.options.key.partition(":")
        request = {"keyName": key_name, "timestamp": int(time.time() * 1000), "nonce": secrets.token_hex(16)}
        return sign_token_request(secret, request)

    async def _client_token(self, host: str) -> tuple[str, int]:
        """A client credential's token: the one given until it expires, then the callback's (a token or JWT, or a
        TokenRequest exchanged at Ably)."""
        options = self.options
        if options.token is not None and self._token is None:
            return options.token, _token_expiry(options.token)
        if options.auth_callback is None:
            raise PermissionDenied("the Ably token expired and there is no auth_callback to renew it")
        answer = await options.auth_callback({})
        if isinstance(answer, str):
            return answer, _token_expiry(answer)
        if "mac" in answer:  # a TokenRequest: exchange it
            url = f"{self.scheme}://{host}/keys/{answer.get('keyName')}/requestToken"
            content = json.dumps(answer, separators=(",", ":")).encode()
            response = await self._send(
                "POST", url, None, content, {**self._headers, "Content-Type": "application/json"}
            )
            if not response.is_success:
                raise error_of(response)
            answer = json_of(response)
        token, expires = answer.get("token"), answer.get("expires")
        if not isinstance(token, str) or not isinstance(expires, int):
            raise BackendError("the auth_callback gave no token with an expiry")
        return token, expires

    async def _request_token(self, host: str) -> tuple[str, int]:
        if self.options.key is None:
            return await self._client_token(host)
        key_name = self.options.key_name
        url = f"{self.scheme}://{host}/keys/{key_name}/requestToken"
        content = json.dumps(self.token_request(), separators=(",", ":")).encode()
        headers = {**self._headers, "Content-Type": "application/json"}
        response = await self._send("POST", url, None, content, headers)
        if not response.is_success:
            error = error_of(response)
            if error.retryable:
                raise _Retry(error, delay=error.retry_after, next_host=error.status != 429)
            raise error
        details = json_of(response)
        token = details.get("token") if isinstance(details, Mapping) else None
        expires = details.get("expires") if isinstance(details, Mapping) else None
        if not isinstance(token, str) or not token or not isinstance(expires, int):
            raise BackendError("Ably answered a token request without a token and its expiry")
        return token, expires
