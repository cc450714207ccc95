"""Against real Ably, when ``ABLY_API_KEY`` is set: the conformance suite and the client-credential checks.

The key (``appId.keyId:secret``, of a test app) needs every operation on the channels of the namespaces
``ai-test-*``; each run uses a namespace of its own, so runs never see each other's messages. Run them with
``ABLY_API_KEY=... uv run pytest -m ably_live tests/ably/test_live.py``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import pytest

import durable_ai
from durable_ai import Hub
from durable_ai.testing import ConformanceSuite, Target, UrlTarget
from durable_ai_ably import AblyBackend, AblyOptions, issue_client_jwt, issue_client_token
from tests.ably.client_checks import (
    check_client_cannot_use_another_session,
    check_client_cannot_write_events,
    check_client_reads_and_cancels,
    write_answers,
)

API_KEY = os.environ.get("ABLY_API_KEY", "")
NAMESPACE = f"ai-test-{secrets.token_hex(4)}"
SESSION = f"chat-{secrets.token_hex(4)}"
OTHER = f"chat-{secrets.token_hex(4)}"
USER = "live-user"

pytestmark = [
    pytest.mark.ably_live,
    pytest.mark.skipif(not API_KEY, reason="ABLY_API_KEY is not set: live Ably tests skipped"),
]


def agent_url() -> str:
    return "ably://?" + urlencode({"key": API_KEY, "namespace": NAMESPACE})


class TestAblyLive(ConformanceSuite):
    @pytest.fixture
    def target(self) -> Target:
        return UrlTarget(agent_url())

    async def test_reset_on_retention(self, target: Target) -> None:
        pytest.skip("retention is a channel rule of the Ably app: a test cannot set it")


@pytest.fixture
async def agent() -> AsyncIterator[Hub]:
    async with durable_ai.connect(agent_url()) as hub:
        await write_answers(hub, SESSION, OTHER)
        yield hub


def client_backend(kind: str) -> AblyBackend:
    """A client's backend with a JWT, or with an ``auth_callback`` that fetches a TokenRequest."""
    if kind == "jwt":
        return AblyBackend(AblyOptions(token=issue_client_jwt(SESSION, USER, key=API_KEY, namespace=NAMESPACE)))

    async def callback(token_params: dict[str, Any]) -> str | dict[str, Any]:
        return issue_client_token(SESSION, USER, key=API_KEY, namespace=NAMESPACE)

    return AblyBackend(AblyOptions(auth_callback=callback, namespace=NAMESPACE))


@pytest.mark.parametrize("kind", ["token-request", "jwt"])
async def test_client_credential_is_confined_to_its_session(agent: Hub, kind: str) -> None:
    backend = client_backend(kind)
    async with durable_ai.connect(backend) as client:
        await check_client_reads_and_cancels(agent, client, SESSION)
        await check_client_cannot_write_events(client, backend, SESSION)
        await check_client_cannot_use_another_session(client, OTHER)
