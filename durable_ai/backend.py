"""What backend authors build on: the contract, positions, and the helpers adapters share.

Application code never needs this module: it calls :func:`durable_ai.connect`. A backend implements
:class:`Backend` (a ``typing.Protocol``; see :mod:`durable_ai.backends.base` for the semantics), is registered
under a URL scheme in the ``durable_ai.backends`` entry-point group (a callable taking the URL and returning the
backend), and passes the conformance suite in :mod:`durable_ai.testing`. The memory backend,
:class:`durable_ai.backends.memory.MemoryBackend`, is the reference implementation.

A networked backend builds on the adapter kit re-exported here (:mod:`durable_ai.backends.kit`): bounded live
fan-out (:class:`Tap`, :class:`Fanout`), the read loop (:func:`follow_log`), shared open/close
(:class:`OpenCount`), presence upkeep (:class:`PresenceKeeper`), the snapshot codec and :func:`retry_call`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import TypeAlias
from urllib.parse import urlsplit

from ._util import RateBudget, validate_name, validate_session_id
from .backends.base import (
    Backend,
    BackendLimits,
    Channel,
    ChannelKind,
    IssuesClientCredentials,
    Landed,
    OpensLogs,
    Outgoing,
    PresenceEntry,
    PresenceRole,
    PublishesAhead,
    ReadsSince,
    StoredMessage,
)
from .backends.kit import (
    Fanout,
    OpenCount,
    PresenceKeeper,
    Tap,
    cancel_and_wait,
    follow_log,
    pack_snapshot,
    raise_if_cancelling,
    retry_call,
    snapshot_chunk_count,
    unpack_snapshot,
)
from .backends.memory import from_url as memory_from_url
from .cursor import Cursor, LogPosition
from .errors import ConfigurationError, UnknownBackend

__all__ = [
    "ENTRY_POINT_GROUP",
    "Backend",
    "BackendFactory",
    "BackendLimits",
    "Channel",
    "ChannelKind",
    "Cursor",
    "Fanout",
    "IssuesClientCredentials",
    "Landed",
    "LogPosition",
    "OpenCount",
    "OpensLogs",
    "Outgoing",
    "PresenceEntry",
    "PresenceKeeper",
    "PresenceRole",
    "PublishesAhead",
    "RateBudget",
    "ReadsSince",
    "StoredMessage",
    "Tap",
    "backend_from_url",
    "cancel_and_wait",
    "follow_log",
    "pack_snapshot",
    "raise_if_cancelling",
    "retry_call",
    "snapshot_chunk_count",
    "unpack_snapshot",
    "validate_name",
    "validate_session_id",
]

BackendFactory: TypeAlias = Callable[[str], Backend]
"""What an entry point of the ``durable_ai.backends`` group loads: it takes the URL and returns the backend."""

ENTRY_POINT_GROUP = "durable_ai.backends"

# Schemes served by first-party adapters, so an unknown scheme can say what to install. Nothing is on a package
# index yet: the adapters install from a clone of the repository.
_FIRST_PARTY = {
    "nats": "pip install -e <clone>/adapters/nats (the durable-ai-nats adapter, from a clone of durable-ai)",
    "ably": "pip install -e <clone>/adapters/ably (the durable-ai-ably adapter, from a clone of durable-ai)",
}


def backend_from_url(url: str) -> Backend:
    """Build the backend for a URL such as ``memory://``, ``nats://127.0.0.1:4222`` or ``ably://?key=...``.

    Raises :class:`UnknownBackend` (naming the installed schemes, and what to install for a first-party one)
    when no installed backend serves the scheme.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"expected a backend URL such as 'memory://', got {url!r}")
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":  # without an entry-point lookup: the embedded default must start fast
        return memory_from_url(url)
    found = _backend_entry_points()
    if scheme not in found:
        _backend_entry_points.cache_clear()  # installed since the last lookup?
        found = _backend_entry_points()
    if scheme in found:
        factory: BackendFactory = found[scheme].load()
        return factory(url)
    raise UnknownBackend(scheme, _FIRST_PARTY.get(scheme), tuple(sorted({"memory", *found})))


@functools.cache
def _backend_entry_points() -> dict[str, EntryPoint]:
    """The installed backends by scheme. Looking them up reads every installed distribution's metadata
    (milliseconds), so it is done once per process, and again only for a scheme it did not find."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found
