"""Misusing a run gets a clear, typed error and loses nothing."""

from __future__ import annotations

import pytest

from durable_ai import ConfigurationError, EventTooLarge, Hub, RunClosed
from durable_ai.testing.scenarios import collect, text_of


async def test_writing_after_the_block_raises_run_closed(hub: Hub) -> None:
    async with hub.session("s").run(agent="w") as run:
        await run.text("x")
    with pytest.raises(RunClosed):
        await run.text("late")
    with pytest.raises(RunClosed):
        await run.status("late")


async def test_a_run_is_entered_once(hub: Hub) -> None:
    run = hub.session("s").run(agent="w")
    async with run:
        pass
    with pytest.raises(ConfigurationError):
        async with run:
            pass


async def test_bad_arguments_are_configuration_errors_and_the_run_goes_on(hub: Hub) -> None:
    async with hub.session("s").run(agent="w") as run:
        with pytest.raises(ConfigurationError, match="input"):
            await run.tool_call("t", {"when": object()})
        with pytest.raises(ConfigurationError, match="string"):
            await run.text(42)  # type: ignore[arg-type]
        with pytest.raises(EventTooLarge) as caught:
            await run.text("x" * (hub.settings.max_event_bytes + 1))
        assert caught.value.limit == hub.settings.max_event_bytes
        await run.text("still fine")
    events = await collect(hub.session("s").events(follow=False))
    assert text_of(events) == "still fine" and events[-1].status == "completed"  # type: ignore[union-attr]


@pytest.mark.parametrize("agent", ["", "x" * 129, "tab\there"])
async def test_agent_names_are_validated(hub: Hub, agent: str) -> None:
    with pytest.raises(ConfigurationError):
        hub.session("s").run(agent=agent)


async def test_empty_deltas_write_nothing(hub: Hub) -> None:
    async with hub.session("s").run(agent="w") as run:
        await run.text("")
        await run.reasoning("")
    events = await collect(hub.session("s").events(follow=False))
    assert [e.type for e in events] == ["run-start", "run-end"]
