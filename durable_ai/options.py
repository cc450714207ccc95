"""The options of a hub, defined once for ``durable_ai.connect()`` and ``Hub()``.

Both take them as keyword arguments (``connect(url, publish_timeout=10)``): :class:`HubOptions` names and types
them, :class:`Settings` holds the values a hub runs with (the defaults below, and ``rate_limit`` resolved against
the backend's own limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TypedDict

from .coalesce import Coalesce
from .errors import ConfigurationError

__all__ = ["HubOptions", "Settings"]


class HubOptions(TypedDict, total=False):
    """Keyword options of :func:`durable_ai.connect` and :class:`durable_ai.Hub`.

    Attributes:
        coalesce: how runs batch deltas into broker messages (default: 40 ms windows, 16 KiB).
        rate_limit: broker messages per second per session, shared by all runs of a session in this hub.
            ``None`` (the default) takes the backend's limit (Ably: 50); ``math.inf`` removes it.
        max_event_bytes: the largest event a run may write (default 1 MiB; :class:`EventTooLarge` above it).
            Events larger than one broker message are split and reassembled.
        max_control_bytes: the largest control a client may send (default 64 KiB); larger ones are rejected.
        max_controls_per_second: controls per session this hub answers (default 5, with bursts of 20). Past
            it, steers, prompts and malformed controls are dropped unanswered, and cancels are applied without
            an ack, so a flood cannot fill the session's log.
        publish_timeout: seconds a write waits for the broker before :class:`PublishError` (default 30; the
            events stay buffered and are retried).
        reconnect_timeout: seconds a reader keeps reconnecting to a broker that is gone (default 300).
        snapshots: save a snapshot of the session's view after each run ends, so late joiners read little
            (default ``True``). A hub always uses the snapshots it finds; this only decides whether it saves them.
        close_timeout: seconds ``close()`` gives runs to end and buffered events and snapshots to be stored
            (default 5).
    """

    coalesce: Coalesce
    rate_limit: float | None
    max_event_bytes: int
    max_control_bytes: int
    max_controls_per_second: float
    publish_timeout: float
    reconnect_timeout: float
    snapshots: bool
    close_timeout: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """The options a hub runs with: :class:`HubOptions` with defaults filled in and checked.

    ``rate_limit`` is resolved: ``None`` here means no limit.
    """

    coalesce: Coalesce = field(default_factory=Coalesce)
    rate_limit: float | None = None
    max_event_bytes: int = 1024 * 1024
    max_control_bytes: int = 64 * 1024
    max_controls_per_second: float = 5.0
    publish_timeout: float = 30.0
    reconnect_timeout: float = 300.0
    snapshots: bool = True
    close_timeout: float = 5.0

    @classmethod
    def resolve(cls, options: HubOptions, backend_rate_limit: float | None) -> Settings:
        """Fill in defaults, check every value, and resolve ``rate_limit`` against the backend's."""
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigurationError(f"unknown hub option(s): {', '.join(sorted(unknown))}")
        values: dict[str, object] = dict(options)
        if values.get("coalesce") is None:
            values.pop("coalesce", None)
        limit = options.get("rate_limit")
        if limit is None:
            limit = backend_rate_limit
        values["rate_limit"] = None if limit is None or math.isinf(limit) else float(limit)
        settings = cls(**values)  # type: ignore[arg-type]
        settings._check()
        return settings

    def _check(self) -> None:
        if not isinstance(self.coalesce, Coalesce):
            raise ConfigurationError(f"coalesce must be a Coalesce, got {self.coalesce!r}")
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ConfigurationError("rate_limit must be positive")
        if self.max_event_bytes < 1024 or self.max_control_bytes < 256:
            raise ConfigurationError("max_event_bytes must be >= 1024 and max_control_bytes >= 256")
        for name in ("max_controls_per_second", "publish_timeout", "reconnect_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be positive")
        if not self.close_timeout >= 0:
            raise ConfigurationError("close_timeout cannot be negative")
