"""Test helpers for Ably: an offline emulator of the part of Ably's realtime and REST protocols ably-python 3.x uses."""

from __future__ import annotations

from durable_ai_ably.testing.emulator import AblyEmulator, EmulatorKey, MessageStats, StoredMessage

__all__ = ["AblyEmulator", "EmulatorKey", "MessageStats", "StoredMessage"]
