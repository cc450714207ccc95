"""Testing tools: the backend conformance suite, its scenarios, and test doubles for your own tests.

- :class:`ConformanceSuite` (pytest) runs every scenario against a backend you name with a ``target`` fixture.
- :mod:`durable_ai.testing.scenarios` holds the scenarios as plain async functions (``durable-ai check`` runs
  them too).
- :class:`RecordingBackend` wraps any backend and records publishes and reads, to assert message counts;
  :func:`stored_events` reads what the broker stores, raw, to count copies the reader would hide.

``ConformanceSuite`` needs pytest, pytest-asyncio and hypothesis: ``pip install "durable-ai[testing]"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .scenarios import stored_events
from .targets import MemoryTarget, PublishRecord, RecordingBackend, Target, UrlTarget, target_for_url

if TYPE_CHECKING:
    from .suite import ConformanceSuite

__all__ = [
    "ConformanceSuite",
    "MemoryTarget",
    "PublishRecord",
    "RecordingBackend",
    "Target",
    "UrlTarget",
    "stored_events",
    "target_for_url",
]


def __getattr__(name: str) -> Any:
    # The suite imports pytest and hypothesis; load it only when asked for.
    if name == "ConformanceSuite":
        from .suite import ConformanceSuite

        return ConformanceSuite
    raise AttributeError(name)
