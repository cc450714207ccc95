"""Least-privilege NATS permissions for a client of one session."""

from __future__ import annotations

import json
from typing import TypedDict

from durable_ai.backend import validate_session_id
from durable_ai.errors import ConfigurationError

from .backend import Names, NatsOptions

__all__ = ["Permissions", "client_inbox_prefix", "client_permissions", "permissions_config"]


class _Rule(TypedDict):
    allow: list[str]


class Permissions(TypedDict):
    """A NATS user's ``permissions`` block: what it may publish to and subscribe to."""

    publish: _Rule
    subscribe: _Rule


def client_inbox_prefix(session: str) -> str:
    """The inbox prefix a client of ``session`` connects with (``?inbox_prefix=...`` in its URL)."""
    return f"_INBOX_{_checked(session)}"


def _checked(session: str) -> str:
    return validate_session_id(session)


def client_permissions(session: str, *, prefix: str = "durable_ai", inbox_prefix: str | None = None) -> Permissions:
    """The permissions of a NATS user that is a client of one session, and nothing more.

    Such a user can read the session's events (from any cursor, live), its snapshot and its presence; publish
    controls (cancel, steer, prompt) to it; and join its presence. It cannot publish events, read the control log,
    or read anything of another session. It must connect with the inbox prefix
    :func:`client_inbox_prefix` returns (``nats://user:pass@host:4222?inbox_prefix=_INBOX_<session>``), since
    that is the only subject space it may subscribe to.

    What it can still see of the stream is its info (limits, message and subject counts) through
    ``$JS.API.STREAM.INFO``, which the backend reads for the stream's epoch.
    """
    session = _checked(session)
    names = Names(NatsOptions(prefix=prefix).prefix)
    inbox = inbox_prefix or client_inbox_prefix(session)
    if not inbox or any(c in inbox for c in " *>\t\r\n"):
        raise ConfigurationError(f"invalid inbox prefix {inbox!r}")
    stream, snapshots, presence = names.stream, names.snapshots, names.presence
    api = "$JS.API"
    return {
        "publish": {
            "allow": [
                names.subject(session, "control"),
                f"{api}.STREAM.INFO.{stream}",
                f"{api}.CONSUMER.CREATE.{stream}.*.{names.subject(session, 'events')}",
                f"{api}.CONSUMER.DELETE.{stream}.*",
                f"{api}.DIRECT.GET.{stream}.{names.subject(session, 'events')}",
                f"$JS.FC.{stream}.>",
                f"{api}.STREAM.INFO.KV_{snapshots}",
                f"{api}.DIRECT.GET.KV_{snapshots}.$KV.{snapshots}.{session}",
                f"{api}.DIRECT.GET.KV_{snapshots}.$KV.{snapshots}.{session}.*",
                f"{api}.STREAM.INFO.KV_{presence}",
                f"{api}.CONSUMER.CREATE.KV_{presence}.*.$KV.{presence}.{session}.>",
                f"{api}.CONSUMER.DELETE.KV_{presence}.*",
                f"$JS.FC.KV_{presence}.>",
                f"$KV.{presence}.{session}.*",
            ]
        },
        "subscribe": {"allow": [f"{inbox}.>"]},
    }


def permissions_config(user: str, password: str, permissions: Permissions) -> str:
    """One entry of a nats-server ``authorization { users = [...] }`` block, for a static config file."""
    return (
        f"{{ user: {json.dumps(user)}, password: {json.dumps(password)}, "
        f"permissions: {json.dumps(permissions, indent=None)} }}"
    )
