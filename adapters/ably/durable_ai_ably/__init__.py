"""The Ably backend for durable-ai: durable AI sessions on Ably channels.

``durable_ai_ably.from_url`` builds the backend for ``ably://?key=appId.keyId:secret`` URLs (the
``durable_ai.backends`` entry point): :class:`AblyBackend` over a realtime connection, or, with
``transport=rest``, :class:`AblyRestBackend` over HTTP only (for serverless functions; it does not load the
realtime client). ``durable_ai_ably.testing.AblyEmulator`` emulates the part of Ably's realtime and REST protocols
that ably-python 3.x uses, so applications can be tested offline.

For browser and mobile clients, :func:`issue_client_token` and :func:`issue_client_jwt` sign credentials confined to
one session (:func:`client_capability`); a client process runs durable-ai with one as ``AblyOptions(token=...)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from durable_ai.backend import Backend

from ._common import AblyOptions, options_from_url
from .auth import client_capability, issue_client_jwt, issue_client_token

if TYPE_CHECKING:
    from .backend import AblyBackend
    from .rest import AblyRestBackend

__all__ = [
    "AblyBackend",
    "AblyOptions",
    "AblyRestBackend",
    "client_capability",
    "from_url",
    "issue_client_jwt",
    "issue_client_token",
    "options_from_url",
]


def from_url(url: str) -> Backend:
    """The backend for an ``ably://`` URL (see :func:`options_from_url` for its options)."""
    options = options_from_url(url)
    if options.transport == "rest":
        from .rest import AblyRestBackend

        return AblyRestBackend(options)
    from .backend import AblyBackend

    return AblyBackend(options)


def __getattr__(name: str) -> Any:
    # The backends load lazily, so a serverless function using the REST backend never imports the realtime client.
    if name == "AblyBackend":
        from .backend import AblyBackend

        return AblyBackend
    if name == "AblyRestBackend":
        from .rest import AblyRestBackend

        return AblyRestBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
