"""Who a request or a connection is: API keys and their capabilities, tokens, TokenRequests and Ably JWTs."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import secrets
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt

from durable_ai_ably.testing.emulator.protocol import AblyError, now_ms

Capability = dict[str, list[str]]

ALL_OPS = "*"
TOKEN_TTL_MS = 60 * 60 * 1000
MAX_TOKEN_TTL_MS = 24 * 60 * 60 * 1000
TOKEN_REQUEST_WINDOW_MS = 2 * 60 * 1000  # how far a TokenRequest's timestamp may be from the server's clock


def parse_capability(value: str | Mapping[str, Sequence[str]] | None) -> Capability:
    """A capability from its JSON text or mapping; None means every operation on every channel."""
    if value is None or value == "":
        return {"*": [ALL_OPS]}
    raw: Any = json.loads(value) if isinstance(value, str) else value
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, list | tuple) and all(isinstance(op, str) for op in v)
        for k, v in raw.items()
    ):
        raise AblyError("Invalid capability: expected an object of channel names to lists of operations", 40000, 400)
    return {k: sorted(set(v)) for k, v in raw.items()}


def _covers(pattern: str, name: str) -> bool:
    """Whether a capability resource matches a channel name (or a narrower pattern): exact, ``*``, trailing ``*``."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return pattern == name


def _intersect_ops(a: Iterable[str], b: Iterable[str]) -> list[str]:
    sa, sb = set(a), set(b)
    if ALL_OPS in sa:
        return sorted(sb)
    if ALL_OPS in sb:
        return sorted(sa)
    return sorted(sa & sb)


def intersect_capabilities(key: Capability, requested: Capability) -> Capability:
    """The capability a token gets: what it asked for, narrowed to what its key allows."""
    result: dict[str, set[str]] = {}
    for req_res, req_ops in requested.items():
        for key_res, key_ops in key.items():
            if _covers(key_res, req_res):
                resource = req_res
            elif _covers(req_res, key_res):
                resource = key_res
            else:
                continue
            ops = _intersect_ops(req_ops, key_ops)
            if ops:
                result.setdefault(resource, set()).update(ops)
    return {res: sorted(ops) for res, ops in result.items()}


def allows(capability: Capability, channel: str, op: str) -> bool:
    """Whether `capability` grants `op` on `channel`."""
    return any(_covers(res, channel) and (ALL_OPS in ops or op in ops) for res, ops in capability.items())


def any_op(capability: Capability, channel: str) -> bool:
    """Whether `capability` grants anything on `channel` (enough to attach)."""
    return any(_covers(res, channel) and ops for res, ops in capability.items())


def denied(op: str, channel: str) -> AblyError:
    return AblyError(f"Unable to perform channel operation; {op} not permitted on channel {channel!r}", 40160, 401)


def query_token(params: Mapping[str, str]) -> str | None:
    """The token in a query string: ``access_token`` as ably-js sends it, or ``accessToken`` (ably-python)."""
    for name in ("access_token", "accessToken"):
        if name in params:
            return params[name]
    return None


@dataclass(frozen=True)
class EmulatorKey:
    """An API key ``appId.keyId:secret`` and its capability."""

    app_id: str
    key_id: str
    secret: str
    capability: Capability = field(default_factory=lambda: {"*": [ALL_OPS]})

    @property
    def name(self) -> str:
        return f"{self.app_id}.{self.key_id}"

    @property
    def key(self) -> str:
        """The full key string, as `AblyRest(key=...)` takes it."""
        return f"{self.name}:{self.secret}"

    @classmethod
    def parse(cls, key: str, capability: str | Mapping[str, Sequence[str]] | None = None) -> EmulatorKey:
        name, sep, secret = key.partition(":")
        app_id, dot, key_id = name.partition(".")
        if not (sep and dot and secret and app_id and key_id):
            raise ValueError(f"an Ably key looks like appId.keyId:secret, not {key!r}")
        return cls(app_id, key_id, secret, parse_capability(capability))


@dataclass
class Credential:
    """Who a request or connection is: a key (basic auth) or a token issued from one."""

    key: EmulatorKey
    capability: Capability
    client_id: str | None
    token: str | None = None
    issued: int = 0
    expires: int | None = None

    def check(self) -> None:
        if self.expires is not None and now_ms() >= self.expires:
            raise AblyError("Token expired", 40142, 401)

    def token_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "token": self.token,
            "keyName": self.key.name,
            "issued": self.issued,
            "expires": self.expires,
            "capability": json.dumps(self.capability, separators=(",", ":")),
        }
        if self.client_id is not None:
            details["clientId"] = self.client_id
        return details


class Authority:
    """The app's keys and the tokens issued from them: issues tokens and tells who a credential is."""

    def __init__(self, keys: Mapping[str, str | Mapping[str, Sequence[str]] | None]) -> None:
        self.keys: dict[str, EmulatorKey] = {}
        for key_text, capability in keys.items():
            key = EmulatorKey.parse(key_text, capability)
            self.keys[key.name] = key
        self._tokens: dict[str, Credential] = {}
        self._nonces: dict[tuple[str, str], int] = {}

    @property
    def default_key(self) -> EmulatorKey:
        return next(iter(self.keys.values()))

    def issue(self, key: EmulatorKey, requested: Capability, client_id: str | None, ttl_ms: int | None) -> Credential:
        """A new token of `key` with the requested capability narrowed to the key's."""
        capability = intersect_capabilities(key.capability, requested)
        if not capability:
            raise AblyError("Invalid capability: the intersection with the key's capability is empty", 40160, 401)
        ttl = TOKEN_TTL_MS if not ttl_ms else int(ttl_ms)
        if ttl <= 0 or ttl > MAX_TOKEN_TTL_MS:
            raise AblyError("Invalid ttl", 40003, 400)
        issued = now_ms()
        token = f"{key.app_id}.{secrets.token_urlsafe(24)}"
        credential = Credential(key, capability, client_id, token, issued, issued + ttl)
        self._tokens[token] = credential
        return credential

    def token_request(self, key_name: str, body: Mapping[str, Any]) -> Credential:
        """The token a signed TokenRequest (``POST /keys/{keyName}/requestToken``) gets: mac, time and nonce checked."""
        key = self.keys.get(key_name)
        if key is None or body.get("keyName") not in (None, key_name):
            raise AblyError(f"No key found with name {key_name!r}", 40400, 404)
        ttl, capability = body.get("ttl"), body.get("capability")
        client_id, timestamp, nonce, mac = (
            body.get("clientId"),
            body.get("timestamp"),
            body.get("nonce"),
            body.get("mac"),
        )
        if not isinstance(nonce, str) or len(nonce) < 16 or not isinstance(mac, str) or timestamp is None:
            raise AblyError("Invalid token request: nonce, timestamp and mac are required", 40001, 400)
        sign_text = "\n".join(
            str(x) for x in (key_name, ttl or "", capability or "", client_id or "", timestamp or 0, nonce, "")
        )
        expected = base64.b64encode(hmac.new(key.secret.encode(), sign_text.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(expected, mac.encode()):
            raise AblyError("Invalid mac on token request", 40101, 401)
        now = now_ms()
        if abs(now - int(timestamp)) > TOKEN_REQUEST_WINDOW_MS:
            raise AblyError("Timestamp not current", 40104, 401)
        self._nonces = {k: t for k, t in self._nonces.items() if now - t < 2 * TOKEN_REQUEST_WINDOW_MS}
        if (key_name, nonce) in self._nonces:
            raise AblyError("Nonce value replayed", 40105, 401)
        self._nonces[(key_name, nonce)] = now
        requested = parse_capability(capability) if capability else key.capability
        return self.issue(key, requested, client_id, int(ttl) if ttl else None)

    def for_key(self, key_text: str, client_id: str | None = None) -> Credential:
        """The credential of an API key (basic auth)."""
        name, _, secret = key_text.partition(":")
        key = self.keys.get(name)
        if key is None or not hmac.compare_digest(key.secret, secret):
            raise AblyError("Invalid key in request", 40101, 401)
        return Credential(key, key.capability, client_id)

    def for_token(self, token: str) -> Credential:
        """The credential of a token or JWT, given as it is or (REST ``Bearer``) base64-encoded."""
        candidates = [token]
        with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
            candidates.append(base64.b64decode(token, validate=True).decode())
        for candidate in candidates:
            credential = self._tokens.get(candidate)
            if credential is None and candidate.count(".") == 2:
                credential = self.for_jwt(candidate)
            if credential is not None:
                credential.check()
                return credential
        raise AblyError("Invalid token; token not found", 40140, 401)

    def for_jwt(self, token: str) -> Credential:
        """Verify an Ably JWT: signed (HS256) with the secret of the key its ``kid`` names, not expired."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AblyError("Invalid JWT format", 40144, 401) from None
        key = self.keys.get(str(header.get("kid", "")))
        if key is None:
            raise AblyError(f"Invalid JWT: no key named {header.get('kid')!r}", 40101, 401)
        try:
            with warnings.catch_warnings():
                # Ably's secrets are long; the short ones tests give keys are fine here.
                warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                claims = jwt.decode(token, key.secret, algorithms=["HS256"], options={"require": ["iat", "exp"]})
        except jwt.ExpiredSignatureError:
            raise AblyError("Token expired", 40142, 401) from None
        except jwt.InvalidTokenError as exc:
            raise AblyError(f"Invalid JWT: {exc}", 40144, 401) from None
        capability_text = claims.get("x-ably-capability")
        if not isinstance(capability_text, str):
            raise AblyError("Invalid JWT: the x-ably-capability claim (a JSON string) is required", 40144, 401)
        try:
            requested = parse_capability(capability_text)
        except ValueError:
            raise AblyError("Invalid JWT: x-ably-capability is not JSON", 40144, 401) from None
        capability = intersect_capabilities(key.capability, requested)
        if not capability:
            raise AblyError("Invalid capability: the intersection with the key's capability is empty", 40160, 401)
        client_id = claims.get("x-ably-clientId")
        if client_id is not None and not (isinstance(client_id, str) and client_id):
            raise AblyError("Invalid JWT: x-ably-clientId must be a non-empty string", 40012, 400)
        return Credential(key, capability, client_id, token, int(claims["iat"]) * 1000, int(claims["exp"]) * 1000)

    def for_rest(self, headers: Mapping[str, str], query: Mapping[str, str]) -> Credential:
        """The credential of a REST request: ``Authorization`` (Bearer or Basic), or a key or token in the query."""
        header = headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value:
            return self.for_token(value.strip())
        if scheme.lower() == "basic" and value:
            try:
                key_text = base64.b64decode(value.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise AblyError("Invalid basic credentials", 40101, 401) from None
            client_id = headers.get("x-ably-clientid")
            if client_id:
                client_id = base64.b64decode(client_id).decode()
            return self.for_key(key_text, client_id)
        if "key" in query:
            return self.for_key(query["key"])
        token = query_token(query)
        if token is not None:
            return self.for_token(token)
        raise AblyError("Authentication failed: no credentials", 40101, 401)
