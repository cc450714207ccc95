"""Ably's REST API as the emulator serves it: time, requestToken, publish, batch publish, history, presence and
message versions, in JSON or msgpack.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import msgpack  # type: ignore[import-untyped]
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from durable_ai_ably.testing.emulator.auth import Authority, Credential, allows, denied
from durable_ai_ably.testing.emulator.faults import Faults
from durable_ai_ably.testing.emulator.protocol import (
    MESSAGE_CREATE,
    MESSAGE_UPDATE,
    PRESENCE_PRESENT,
    AblyError,
    now_ms,
)
from durable_ai_ably.testing.emulator.store import Store

#: how many channels one batch publish may name
BATCH_CHANNEL_LIMIT = 100


def wants_binary(request: Request) -> bool:
    return (
        "application/x-msgpack" in request.headers.get("accept", "") or request.query_params.get("format") == "msgpack"
    )


def encode(body: Any, binary: bool, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    if binary:
        return Response(msgpack.packb(body, use_bin_type=True), status, headers, media_type="application/x-msgpack")
    return Response(json.dumps(body, separators=(",", ":")), status, headers, media_type="application/json")


def error_response(error: AblyError, binary: bool) -> Response:
    headers = {"X-Ably-Errorcode": str(error.code), "X-Ably-Errormessage": error.message}
    return encode({"error": error.to_dict()}, binary, error.status, headers)


async def read_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return None
    content_type = request.headers.get("content-type", "application/json")
    try:
        if content_type.startswith("application/x-msgpack"):
            return msgpack.unpackb(raw, raw=False)
        return json.loads(raw)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise AblyError(f"Unable to parse request body: {exc}", 40000, 400) from None


def _limit(q: Mapping[str, str]) -> int:
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        raise AblyError("Invalid limit parameter", 40003, 400) from None
    if not 1 <= limit <= 1000:
        raise AblyError("limit must be between 1 and 1000", 40003, 400)
    return limit


class RestApi:
    """The REST routes, answering from the store with the authority's credentials and the pending faults."""

    def __init__(self, store: Store, authority: Authority, faults: Faults, *, honour_from_serial: bool) -> None:
        self.store = store
        self.authority = authority
        self.faults = faults
        #: also take the camelCase ``fromSerial`` (not an Ably parameter) as ``from_serial``
        self.honour_from_serial = honour_from_serial

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/time", self._time, methods=["GET"]),
            Route("/keys/{key_name}/requestToken", self._request_token, methods=["POST"]),
            Route("/messages", self._batch_publish, methods=["POST"]),
            Route("/channels/{channel}/messages", self._channel_messages, methods=["GET", "POST"]),
            Route("/channels/{channel}/messages/{serial}", self._channel_message, methods=["GET", "PATCH"]),
            Route("/channels/{channel}/presence", self._channel_presence, methods=["GET"]),
        ]

    def _failure(self, request: Request) -> Response | None:
        error = self.faults.take_rest_failure(request.url.path)
        return error_response(error, binary=False) if error is not None else None

    def _credential(self, request: Request) -> Credential:
        return self.authority.for_rest(request.headers, request.query_params)

    async def _time(self, request: Request) -> Response:
        failure = self._failure(request)
        if failure is not None:
            return failure
        return encode([now_ms()], wants_binary(request))

    async def _request_token(self, request: Request) -> Response:
        binary = wants_binary(request)
        failure = self._failure(request)
        if failure is not None:
            return failure
        try:
            body = await read_body(request)
            if not isinstance(body, Mapping):
                raise AblyError("Invalid token request body", 40000, 400)
            credential = self.authority.token_request(request.path_params["key_name"], body)
        except AblyError as error:
            return error_response(error, binary)
        return encode(credential.token_details(), binary)

    async def _channel_messages(self, request: Request) -> Response:
        binary = wants_binary(request)
        failure = self._failure(request)
        if failure is not None:
            return failure
        channel = request.path_params["channel"]
        try:
            credential = self._credential(request)
            if request.method == "POST":
                return await self._publish(request, channel, credential, binary)
            return self._history(request, channel, credential, binary)
        except AblyError as error:
            return error_response(error, binary)

    async def _publish(self, request: Request, channel: str, credential: Credential, binary: bool) -> Response:
        body = await read_body(request)
        raw_messages = [body] if isinstance(body, Mapping) else body
        if not isinstance(raw_messages, list) or not all(isinstance(m, Mapping) for m in raw_messages):
            raise AblyError("Invalid message body: expected a message or a list of messages", 40000, 400)
        id_prefix = f"{secrets.token_urlsafe(9)}"
        serials = self.store.publish(channel, raw_messages, credential=credential, id_prefix=id_prefix)
        return encode({"channel": channel, "messageId": id_prefix, "serials": serials}, binary, 201)

    async def _batch_publish(self, request: Request) -> Response:
        """``POST /messages``: publish specs (``channels``, ``messages``), each channel's publish on its own."""
        binary = wants_binary(request)
        failure = self._failure(request)
        if failure is not None:
            return failure
        try:
            credential = self._credential(request)
            body = await read_body(request)
            specs = body if isinstance(body, list) else [body]
            if not specs or not all(isinstance(spec, Mapping) for spec in specs):
                raise AblyError("Invalid batch publish body: expected a spec or a list of specs", 40000, 400)
            parsed: list[tuple[list[str], list[Mapping[str, Any]]]] = []
            for spec in specs:
                channels, messages = spec.get("channels"), spec.get("messages")
                channels = [channels] if isinstance(channels, str) else channels
                messages = [messages] if isinstance(messages, Mapping) else messages
                if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
                    raise AblyError("Invalid batch spec: channels must name one or more channels", 40000, 400)
                if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) for m in messages):
                    raise AblyError("Invalid batch spec: messages must be one or more messages", 40000, 400)
                parsed.append((channels, messages))
            if sum(len(channels) for channels, _ in parsed) > BATCH_CHANNEL_LIMIT:
                raise AblyError(
                    "Max number of channels permitted in a single bulk publish request "
                    f"({BATCH_CHANNEL_LIMIT}) exceeded",
                    90010,
                    400,
                )
            results: list[dict[str, Any]] = []
            for channels, messages in parsed:
                outcomes: list[dict[str, Any]] = []
                for channel in channels:
                    id_prefix = secrets.token_urlsafe(9)
                    try:
                        serials = self.store.publish(channel, messages, credential=credential, id_prefix=id_prefix)
                    except AblyError as error:
                        outcomes.append({"channel": channel, "error": error.to_dict()})
                    else:
                        outcomes.append({"channel": channel, "messageId": id_prefix, "serials": serials})
                failed = sum(1 for outcome in outcomes if "error" in outcome)
                results.append({"successCount": len(outcomes) - failed, "failureCount": failed, "results": outcomes})
        except AblyError as error:
            return error_response(error, binary)
        return encode(results if isinstance(body, list) else results[0], binary, 201)

    def _history(self, request: Request, channel: str, credential: Credential, binary: bool) -> Response:
        if not allows(credential.capability, channel, "history"):
            raise denied("history", channel)
        q = request.query_params
        direction = q.get("direction", "backwards")
        if direction not in ("backwards", "forwards"):
            raise AblyError(f"Invalid direction {direction!r}", 40003, 400)
        limit = _limit(q)
        try:
            start = int(q["start"]) if q.get("start") else None
            end = int(q["end"]) if q.get("end") else None
        except ValueError:
            raise AblyError("Invalid limit, start or end parameter", 40003, 400) from None
        if start is not None and end is not None and start > end:
            raise AblyError("start must be before end", 40003, 400)
        # ``from_serial`` is what ably-js sends for history({untilAttach: true}): the attach serial of the channel,
        # where the history a client needs before its live messages ends. Ably documents untilAttach as backwards only.
        from_serial = q.get("from_serial")
        if from_serial and direction != "backwards":
            raise AblyError("untilAttach (from_serial) requires direction backwards", 40003, 400)
        legacy = q.get("fromSerial") if self.honour_from_serial else None
        from_serial = from_serial or legacy
        cursor = q.get("cursor")
        ch = self.store.get(channel)
        items = list(ch.messages) if ch else []
        if start is not None:
            items = [m for m in items if m.timestamp >= start]
        if end is not None:
            items = [m for m in items if m.timestamp <= end]
        if direction == "backwards":
            items.reverse()
            if from_serial:
                items = [m for m in items if m.serial <= from_serial]
            if cursor:
                items = [m for m in items if m.serial < cursor]
        else:
            if legacy:
                items = [m for m in items if m.serial >= legacy]
            if cursor:
                items = [m for m in items if m.serial > cursor]
        page, rest = items[:limit], items[limit:]
        after = page[-1].serial if rest and page else None
        link = _links("messages", q, {"limit": str(limit), "direction": direction}, after)
        return encode([m.wire(binary) for m in page], binary, 200, {"Link": link})

    async def _channel_presence(self, request: Request) -> Response:
        """``GET /channels/{name}/presence``: the current members, paginated with ``limit`` and ``Link`` headers."""
        binary = wants_binary(request)
        failure = self._failure(request)
        if failure is not None:
            return failure
        channel = request.path_params["channel"]
        try:
            credential = self._credential(request)
            if not allows(credential.capability, channel, "subscribe"):
                raise denied("subscribe", channel)
            q = request.query_params
            limit = _limit(q)
            ch = self.store.get(channel)
            members = sorted(ch.members.values(), key=lambda m: m.key) if ch else []
            if q.get("clientId"):
                members = [m for m in members if m.client_id == q["clientId"]]
            if q.get("connectionId"):
                members = [m for m in members if m.connection_id == q["connectionId"]]
            if q.get("cursor"):
                members = [m for m in members if m.key > q["cursor"]]
            page, rest = members[:limit], members[limit:]
            link = _links("presence", q, {"limit": str(limit)}, page[-1].key if rest and page else None)
            body = [m.wire(PRESENCE_PRESENT, binary) for m in page]
            return encode(body, binary, 200, {"Link": link})
        except AblyError as error:
            return error_response(error, binary)

    async def _channel_message(self, request: Request) -> Response:
        """``GET`` (latest version) or ``PATCH`` (update, delete or append) ``/channels/{name}/messages/{serial}``."""
        binary = wants_binary(request)
        failure = self._failure(request)
        if failure is not None:
            return failure
        channel, serial = request.path_params["channel"], request.path_params["serial"]
        try:
            credential = self._credential(request)
            if request.method == "GET":
                if not allows(credential.capability, channel, "history"):
                    raise denied("history", channel)
                ch = self.store.get(channel)
                if ch is None:
                    raise AblyError(f"Message not found: no message with serial {serial!r}", 40400, 404)
                return encode(self.store.find(ch, serial).wire(binary), binary)
            body = await read_body(request)
            if not isinstance(body, Mapping):
                raise AblyError("Invalid message body: expected a message", 40000, 400)
            operation = {**body, "serial": serial}
            if operation.get("action") in (None, MESSAGE_CREATE):
                operation["action"] = MESSAGE_UPDATE
            [version] = self.store.publish(
                channel, [operation], credential=credential, id_prefix=secrets.token_urlsafe(9)
            )
            return encode({"versionSerial": version}, binary)
        except AblyError as error:
            return error_response(error, binary)


def _links(path: str, query: Mapping[str, str], defaults: Mapping[str, str], after: str | None) -> str:
    """The ``Link`` header of a paginated answer: its first and current pages, and the next one after ``after``."""
    base = {**defaults, **{k: v for k, v in query.items() if k != "cursor"}}
    links = [
        f'<./{path}?{urlencode(base, quote_via=quote)}>; rel="first"',
        f'<./{path}?{urlencode(dict(query.items()), quote_via=quote)}>; rel="current"',
    ]
    if after is not None:
        links.append(f'<./{path}?{urlencode({**base, "cursor": after}, quote_via=quote)}>; rel="next"')
    return ", ".join(links)
