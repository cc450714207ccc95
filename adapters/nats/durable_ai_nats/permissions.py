"""Least-privilege NATS permissions for a client of one session."""

from __future__ import annotations

import json
from typing import TypedDict

from durable_ai.backend import validate_name, validate_session_id
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


def client_permissions(
    session: str, *, prefix: str = "durable_ai", inbox_prefix: str | None = None, client_id: str | None = None
) -> Permissions:
    """The permissions of a NATS user that is a client of one session, and nothing more.

    Such a user can read the session's events (from any cursor, live), its snapshot and its presence, and
    publish controls (cancel, steer, prompt) to it. With a ``client_id`` it may also be present on the session
    as that one client (``session.present(client_id)``): the presence key is the identity, so it can neither
    appear as an agent nor touch anyone else's entry. It cannot publish events, read the control log, read
    anything of another session, list streams or sessions, or read stream info. It must connect with the inbox
    prefix :func:`client_inbox_prefix` returns (``nats://user:pass@host:4222?inbox_prefix=_INBOX_<session>``),
    since that is the only subject space it may subscribe to.

    What remains (see docs/backends/nats.md, "Permissions"): it may create consumers on its own session's
    events and on its presence keys (ephemeral: the streams' ``consumer_idle`` limit removes them once nobody
    listens, and ``max_consumers`` bounds them), delete a consumer whose random name it knows, publish controls
    as fast as its connection allows (the agent side rate-limits what it applies), and set any header on its
    controls (they are in a stream of their own, and nothing reads their headers).
    """
    session = _checked(session)
    names = Names(NatsOptions(prefix=prefix).prefix)
    inbox = inbox_prefix or client_inbox_prefix(session)
    if not inbox or any(c in inbox for c in " *>\t\r\n"):
        raise ConfigurationError(f"invalid inbox prefix {inbox!r}")
    if client_id is not None:
        validate_name("client_id", client_id)
    stream, control, snapshots, presence = names.stream, names.control_stream, names.snapshots, names.presence
    events = names.subject(session, "events")
    api = "$JS.API"
    allow = [
        names.subject(session, "control"),
        f"{api}.DIRECT.GET.{stream}.{names.epoch_subject('events')}",
        f"{api}.DIRECT.GET.{control}.{names.epoch_subject('control')}",
        f"{api}.CONSUMER.CREATE.{stream}.*.{events}",
        f"{api}.CONSUMER.DELETE.{stream}.*",
        f"{api}.DIRECT.GET.{stream}.{events}",
        f"$JS.FC.{stream}.>",
        f"{api}.DIRECT.GET.KV_{snapshots}.$KV.{snapshots}.{session}",
        f"{api}.DIRECT.GET.KV_{snapshots}.$KV.{snapshots}.{session}.*",
        f"{api}.CONSUMER.CREATE.KV_{presence}.*.$KV.{presence}.{session}.>",
        f"{api}.CONSUMER.DELETE.KV_{presence}.*",
        f"$JS.FC.KV_{presence}.>",
    ]
    if client_id is not None:
        allow.append(names.presence_subject(session, client_id, "client"))
    return {"publish": {"allow": allow}, "subscribe": {"allow": [f"{inbox}.>"]}}


def permissions_config(user: str, password: str, permissions: Permissions) -> str:
    """One entry of a nats-server ``authorization { users = [...] }`` block, for a static config file."""
    return (
        f"{{ user: {json.dumps(user)}, password: {json.dumps(password)}, "
        f"permissions: {json.dumps(permissions, indent=None)} }}"
    )
