"""The backend conformance suite for pytest.

Subclass :class:`ConformanceSuite` in a test module and provide the ``target`` fixture; every test then runs
against your backend::

    from durable_ai.testing import ConformanceSuite, UrlTarget

    class TestMyBackend(ConformanceSuite):
        @pytest.fixture
        def target(self):
            return UrlTarget("mine://127.0.0.1:9000")

Needs ``pytest``, ``pytest-asyncio`` and ``hypothesis`` (``pip install "durable-ai[testing]"``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import scenarios
from .targets import Target

__all__ = ["ConformanceSuite"]

_STEP = st.one_of(
    st.tuples(st.just("text"), st.text(min_size=1, max_size=12)),
    st.tuples(st.just("reasoning"), st.text(min_size=1, max_size=12)),
    st.tuples(st.just("tool"), st.sampled_from(["search", "fetch"])),
    st.tuples(st.just("status"), st.text(max_size=8)),
    st.tuples(st.just("yield"), st.just("")),
    st.tuples(st.just("flush"), st.just("")),
)


async def _run(check: Callable[[Target], Awaitable[str]], target: Target) -> None:
    try:
        await check(target)
    except scenarios.CheckSkipped as exc:
        pytest.skip(str(exc))


@pytest.mark.asyncio
class ConformanceSuite:
    """What every durable-ai backend must do. Override the ``target`` fixture in a subclass."""

    @pytest.fixture
    def target(self) -> Target:
        raise NotImplementedError("a ConformanceSuite subclass must provide the 'target' fixture")

    # The three validations of a durable session.

    async def test_resume_after_drop(self, target: Target) -> None:
        await _run(scenarios.resume_after_drop, target)

    async def test_join_mid_run(self, target: Target) -> None:
        await _run(scenarios.join_mid_run, target)

    async def test_cancel_from_another_client(self, target: Target) -> None:
        await _run(scenarios.cancel_from_another_client, target)

    async def test_follow_from_head_beside_a_follower(self, target: Target) -> None:
        await _run(scenarios.follow_from_head_beside_a_follower, target)

    # Ordering, loss, duplicates, cursors.

    async def test_ordering_across_subagents(self, target: Target) -> None:
        await _run(scenarios.ordering_across_subagents, target)

    async def test_no_loss_no_duplicate(self, target: Target) -> None:
        await _run(scenarios.no_loss_no_duplicate, target)

    async def test_idempotent_publish(self, target: Target) -> None:
        await _run(scenarios.idempotent_publish, target)

    # Each backend's subclass runs this same method: several executors are the point, not a mistake.
    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,  # the same examples on every run and in CI: a failure reproduces
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    )
    @given(steps=st.lists(_STEP, min_size=1, max_size=30))
    async def test_resume_from_every_cursor(self, target: Target, steps: list[tuple[str, str]]) -> None:
        await scenarios.resume_from_every_cursor(target, steps)

    async def test_slow_subscriber(self, target: Target) -> None:
        await _run(scenarios.slow_subscriber, target)

    # Live control.

    async def test_steer_into_run(self, target: Target) -> None:
        await _run(scenarios.steer_into_run, target)

    async def test_strategy_enqueue(self, target: Target) -> None:
        await _run(scenarios.strategy_enqueue, target)

    async def test_strategy_interrupt(self, target: Target) -> None:
        await _run(scenarios.strategy_interrupt, target)

    async def test_strategy_reject(self, target: Target) -> None:
        await _run(scenarios.strategy_reject, target)

    async def test_strategy_steer(self, target: Target) -> None:
        await _run(scenarios.strategy_steer, target)

    async def test_malformed_controls(self, target: Target) -> None:
        await _run(scenarios.malformed_controls, target)

    async def test_stop_answered_when_idle(self, target: Target) -> None:
        await _run(scenarios.stop_answered_when_idle, target)

    async def test_run_id_in_use(self, target: Target) -> None:
        await _run(scenarios.run_id_in_use, target)

    # Resets, late join, limits.

    async def test_reset_on_retention(self, target: Target) -> None:
        await _run(scenarios.reset_on_retention, target)

    async def test_reset_on_recreate(self, target: Target) -> None:
        await _run(scenarios.reset_on_recreate, target)

    async def test_delete_seen_everywhere(self, target: Target) -> None:
        await _run(scenarios.delete_seen_everywhere, target)

    async def test_truncated_from_the_start(self, target: Target) -> None:
        await _run(scenarios.truncated_from_the_start, target)

    async def test_late_join_view(self, target: Target) -> None:
        await _run(scenarios.late_join_view, target)

    async def test_large_events(self, target: Target) -> None:
        await _run(scenarios.large_events, target)

    async def test_failed_run(self, target: Target) -> None:
        await _run(scenarios.failed_run, target)

    async def test_presence(self, target: Target) -> None:
        await _run(scenarios.presence, target)

    async def test_invalid_session_ids(self, target: Target) -> None:
        await _run(scenarios.invalid_session_ids, target)

    async def test_rate_budget(self, target: Target) -> None:
        await _run(scenarios.rate_budget, target)
