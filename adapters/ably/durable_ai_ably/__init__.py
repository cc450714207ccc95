"""The Ably backend for durable-ai: durable AI sessions on Ably channels.

``durable_ai_ably.from_url`` builds the backend for ``ably://?key=appId.keyId:secret`` URLs (the
``durable_ai.backends`` entry point). `durable_ai_ably.testing.AblyEmulator` emulates the part of Ably's realtime and
REST protocols that ably-python 3.x uses, so applications can be tested offline.
"""

from __future__ import annotations

from .backend import AblyBackend, AblyOptions, from_url

__all__ = ["AblyBackend", "AblyOptions", "from_url"]
