"""The NATS tests share the session's nats-server (tests/conftest.py); fault tests start fresh ones."""

from __future__ import annotations

import secrets

import pytest


@pytest.fixture
def prefix() -> str:
    """A subject prefix of its own, so a test's stream and buckets start empty."""
    return f"t{secrets.token_hex(4)}"
