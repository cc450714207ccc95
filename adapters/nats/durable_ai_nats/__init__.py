"""NATS JetStream backend for durable-ai: ``durable_ai.connect("nats://127.0.0.1:4222")``.

See ``docs/backends/nats.md`` for the layout on JetStream, the options, clusters and client permissions.
"""

from __future__ import annotations

from .backend import NatsBackend, NatsOptions, PendingBufferFull, from_url, names
from .permissions import Permissions, client_inbox_prefix, client_permissions, permissions_config

__all__ = [
    "NatsBackend",
    "NatsOptions",
    "PendingBufferFull",
    "Permissions",
    "client_inbox_prefix",
    "client_permissions",
    "from_url",
    "names",
    "permissions_config",
]
