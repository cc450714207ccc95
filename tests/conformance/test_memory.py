"""The conformance suite over the embedded backend."""

from __future__ import annotations

import pytest

from durable_ai.testing import ConformanceSuite, MemoryTarget, Target


class TestMemory(ConformanceSuite):
    @pytest.fixture
    def target(self) -> Target:
        return MemoryTarget()
