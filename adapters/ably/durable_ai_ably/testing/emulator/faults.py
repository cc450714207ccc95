"""Faults a test asks for: REST requests answered with an error, realtime publishes NACKed, connections refused.

Dropping and disconnecting live connections act on the realtime side (`Realtime.drop`, `Realtime.disconnect`); the
pending faults here are consulted by the REST and realtime handlers as requests come.
"""

from __future__ import annotations

from durable_ai_ably.testing.emulator.protocol import AblyError


class Faults:
    """The faults still to happen."""

    def __init__(self) -> None:
        self._fail_rest: list[tuple[int, str | None]] = []
        self._nack: list[AblyError] = []
        #: while True, WebSocket handshakes fail
        self.refusing = False

    def fail_next_rest(self, status: int, count: int, path_prefix: str | None) -> None:
        self._fail_rest.extend([(status, path_prefix)] * count)

    @property
    def pending_rest_failures(self) -> int:
        return len(self._fail_rest)

    def take_rest_failure(self, path: str) -> AblyError | None:
        """The failure a REST request for `path` meets, if one is pending for it (then it is used up)."""
        for index, (status, prefix) in enumerate(self._fail_rest):
            if prefix is None or path.startswith(prefix):
                del self._fail_rest[index]
                return AblyError(f"Injected failure ({status})", status * 100, status)
        return None

    def nack_next(self, count: int, code: int, status: int, message: str) -> None:
        self._nack.extend([AblyError(message or "Message rejected by the emulator", code, status)] * count)

    def take_nack(self) -> AblyError | None:
        """The error the next realtime publish is NACKed with, if one is pending."""
        return self._nack.pop(0) if self._nack else None
