"""Credentials for the clients of one session: least-privilege capabilities, signed TokenRequests and JWTs.

The API key stays on the agent and on the application's server. The server authorises a user for a session and
hands out a credential that can read that session's events and send it controls, and nothing else; the client
uses it through ably-js's ``authCallback`` (or ably-python's ``auth_callback``), or as ``AblyOptions(token=...)``
when it runs durable-ai itself::

    @app.post("/sessions/{session_id}/ably-token")
    async def ably_token(session_id: str, user: User = Depends(current_user)) -> dict[str, Any]:
        await check_access(user, session_id)  # the application decides who may watch which session
        return issue_client_token(session_id, user.id, key=os.environ["ABLY_API_KEY"])

A TokenRequest is exchanged by the client at Ably for a token, so its capability is not readable by the client; a
JWT is used as it is, with no round trip. Both are signed locally: issuing one makes no request to Ably. This module
does not import ably-python.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from typing import Any

from durable_ai.backend import validate_session_id
from durable_ai.errors import ConfigurationError

from ._common import AGENT_CLIENT_PREFIX, AblyOptions, channel_name, sign_token_request, split_key, validate_namespace

__all__ = ["client_capability", "issue_client_jwt", "issue_client_token"]

_READ = ["history", "subscribe"]


def client_capability(session_id: str, *, namespace: str = "ai", presence: bool = False) -> dict[str, list[str]]:
    """The least an SDK or browser client of one session needs: read its channels, publish its controls.

    Events (``<namespace>:<session>``): subscribe and history, and presence when ``presence`` (the client enters
    as its clientId). Meta, snapshot and presence (deletion markers, the saved view, the presence of agents
    that publish over REST): subscribe and history. Control: publish only. No other channel, so a client can
    neither write events nor read another session.

    Raises:
        InvalidSessionId: for a session id that cannot name a channel.
        ConfigurationError: for an invalid namespace.
    """
    validate_session_id(session_id)
    validate_namespace(namespace)
    events = sorted([*_READ, "presence"]) if presence else list(_READ)
    return {
        channel_name(namespace, session_id): events,
        channel_name(namespace, session_id, "control"): ["publish"],
        channel_name(namespace, session_id, "meta"): list(_READ),
        channel_name(namespace, session_id, "snapshot"): list(_READ),
        channel_name(namespace, session_id, "presence"): list(_READ),
    }


def issue_client_token(
    session_id: str,
    client_id: str,
    ttl: float = 3600.0,
    *,
    key: str | AblyOptions,
    namespace: str | None = None,
    presence: bool = False,
) -> dict[str, Any]:
    """A signed Ably TokenRequest for one client of one session, with :func:`client_capability`.

    Return it as JSON to ably-js's ``authCallback`` (or ably-python's ``auth_callback``): the client posts it to
    ``/keys/{keyName}/requestToken`` and gets a token for ``ttl`` seconds. Ably refuses a TokenRequest more than
    2 minutes old, or used twice, so hand out a fresh one each time it is asked for.

    Args:
        session_id: the only session the client may use.
        client_id: the client's identity (a user id), carried by everything it sends; not ``*``.
        ttl: seconds the token is valid once issued (Ably allows at most 24 hours).
        key: the API key ``appId.keyId:secret``, or :class:`AblyOptions` holding it (its namespace then applies).
        namespace: the channel namespace (default: the options' namespace, or ``ai``).
        presence: let the client enter presence on the session.

    Raises:
        InvalidSessionId: for a session id that cannot name a channel.
        ConfigurationError: for an invalid key, ttl, client id or namespace.
    """
    name, secret, capability = _prepare(session_id, client_id, ttl, key, namespace, presence)
    request: dict[str, Any] = {
        "keyName": name,
        "ttl": max(1, round(ttl * 1000)),
        "capability": capability,
        "clientId": client_id,
        "timestamp": int(time.time() * 1000),
        "nonce": secrets.token_hex(16),
    }
    return sign_token_request(secret, request)


def issue_client_jwt(
    session_id: str,
    client_id: str,
    ttl: float = 3600.0,
    *,
    key: str | AblyOptions,
    namespace: str | None = None,
    presence: bool = False,
) -> str:
    """An Ably JWT for one client of one session, with :func:`client_capability`, valid for ``ttl`` seconds.

    HS256, signed with the key's secret, ``kid`` the key's name, claims ``iat``, ``exp``, ``x-ably-capability`` and
    ``x-ably-clientId``. Clients use it directly as their token (``authCallback`` returning it, or
    ``AblyOptions(token=...)``). The arguments are those of :func:`issue_client_token`.

    Raises:
        InvalidSessionId: for a session id that cannot name a channel.
        ConfigurationError: for an invalid key, ttl, client id or namespace.
    """
    import jwt  # only when JWTs are issued

    name, secret, capability = _prepare(session_id, client_id, ttl, key, namespace, presence)
    issued = int(time.time())
    claims = {
        "iat": issued,
        "exp": issued + max(1, math.ceil(ttl)),
        "x-ably-capability": capability,
        "x-ably-clientId": client_id,
    }
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": name})


def _prepare(
    session_id: str,
    client_id: str,
    ttl: float,
    key: str | AblyOptions,
    namespace: str | None,
    presence: bool,
) -> tuple[str, str, str]:
    """The key's name and secret and the canonical capability text, after checking every argument."""
    given: object = key
    if isinstance(given, AblyOptions):
        if given.key is None:
            raise ConfigurationError("these Ably options have a token, not an API key to sign client credentials with")
        key_text, namespace = given.key, given.namespace if namespace is None else namespace
    elif isinstance(given, str):
        key_text = given
    else:
        raise ConfigurationError(f"key must be an Ably API key or AblyOptions, got {type(given).__name__}")
    name, secret = split_key(key_text)
    if not isinstance(client_id, str) or not client_id or "*" in client_id:
        raise ConfigurationError(f"a client needs a fixed client id (not empty, no '*'), got {client_id!r}")
    if client_id.startswith(AGENT_CLIENT_PREFIX):
        # Presence takes a member's role from its clientId: a client must never be able to appear as an agent.
        raise ConfigurationError(f"client ids starting with {AGENT_CLIENT_PREFIX!r} are reserved for agents")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not (math.isfinite(ttl) and ttl > 0):
        raise ConfigurationError(f"ttl must be a positive number of seconds, got {ttl!r}")
    capability = client_capability(session_id, namespace="ai" if namespace is None else namespace, presence=presence)
    return name, secret, json.dumps(capability, sort_keys=True, separators=(",", ":"))
