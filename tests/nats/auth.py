"""A nats-server that requires auth: an agent user with every right, and clients with the permissions we issue."""

from __future__ import annotations

from durable_ai_nats import permissions_config
from durable_ai_nats.permissions import Permissions
from durable_ai_nats.testing import NatsServer

AGENT = ("agent", "agent-secret")


def authorization(clients: dict[tuple[str, str], Permissions]) -> str:
    """The ``authorization`` block: the agent user, and each client ``(user, password)`` with its permissions."""
    users = [f'{{ user: "{AGENT[0]}", password: "{AGENT[1]}" }}']
    users += [permissions_config(user, password, permissions) for (user, password), permissions in clients.items()]
    return "authorization {\n  users = [\n    " + "\n    ".join(users) + "\n  ]\n}\n"


def user_url(server: NatsServer, user: str, password: str, query: str = "") -> str:
    return f"nats://{user}:{password}@127.0.0.1:{server.port}{query}"
