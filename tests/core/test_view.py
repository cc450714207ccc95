"""session.view(): the state a late joiner renders, from a snapshot plus the tail."""

from __future__ import annotations

from durable_ai import Hub, SessionView, ToolPart
from durable_ai.backends.memory import MemoryBackend


async def test_view_holds_tools_status_errors_and_sub_agents(hub: Hub) -> None:
    session = hub.session("s")
    await session.user_message("find flights", message_id="u1")
    async with session.run(agent="orchestrator") as parent:
        await parent.status("planning")
        async with session.run(agent="search", parent=parent) as child:
            ok = await child.tool_call("flights", {"to": "LIS"})
            await child.tool_result(ok, {"count": 3})
            bad = await child.tool_call("hotels", {})
            await child.tool_result(bad, error="quota exceeded")
            await child.data("citation", {"url": "https://example.com"})
        await parent.text("3 flights")
    view = await session.view()
    user, orchestrator, search = view.messages
    assert (user.role, user.id, user.parts[0].text) == ("user", "u1", "find flights")  # type: ignore[union-attr]
    assert orchestrator.status_text == "planning" and orchestrator.status == "completed"
    assert search.parent_run_id == parent.id and search.agent == "search"
    tools = [p for p in search.parts if isinstance(p, ToolPart)]
    assert [(t.name, t.state, t.output, t.error) for t in tools] == [
        ("flights", "completed", {"count": 3}, None),
        ("hotels", "failed", None, "quota exceeded"),
    ]
    assert search.parts[-1].type == "data"
    assert view.active_runs == []


async def test_view_mid_run_lists_the_active_run(hub: Hub) -> None:
    session = hub.session("s")
    async with session.run(agent="writer") as run:
        await run.text("half")
        await run.flush()
        view = await session.view()
    assert [r.run_id for r in view.active_runs] == [run.id]
    assert view.messages[0].status == "streaming"


async def test_a_snapshot_from_a_recreated_log_is_ignored(hub: Hub, backend: MemoryBackend) -> None:
    session = hub.session("s")
    async with session.run(agent="writer") as run:
        await run.text("old")
    await hub.flush()
    stale = await backend.load_snapshot("s")
    await session.delete()
    async with session.run(agent="writer") as run:
        await run.text("new")
    await hub.flush()
    assert stale is not None
    await backend.save_snapshot("s", stale)  # a writer elsewhere saved a snapshot of the old log
    view = await session.view()
    assert ["".join(p.text for p in m.parts) for m in view.messages] == ["new"]  # type: ignore[union-attr]
    assert not view.truncated


async def test_view_says_truncated_when_retention_dropped_history() -> None:
    async with Hub(MemoryBackend(max_messages=4), snapshots=False) as hub:
        session = hub.session("s")
        async with session.run(agent="writer") as run:
            for i in range(10):
                await run.status(f"step {i}")
        view = await session.view()
    assert view.truncated
    assert view.messages == []  # the run-start itself was dropped, and no snapshot kept it


async def test_an_unreadable_snapshot_falls_back_to_the_log(hub: Hub, backend: MemoryBackend) -> None:
    session = hub.session("s")
    async with session.run(agent="writer") as run:
        await run.text("kept")
    await hub.flush()
    await backend.save_snapshot("s", b"{not a snapshot")
    view = await session.view()
    assert isinstance(view, SessionView)
    assert view.messages[0].parts[0].text == "kept"  # type: ignore[union-attr]
