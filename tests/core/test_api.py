"""The public surface: names, packaging, discovery of backends by URL."""

from __future__ import annotations

import importlib.metadata
import inspect
from pathlib import Path

import pytest

import durable_ai
from durable_ai import (
    ConfigurationError,
    HubClosed,
    InvalidCursor,
    InvalidSessionId,
    MemoryBackend,
    UnknownBackend,
)

ROOT = Path(__file__).resolve().parents[2]


def test_all_is_sorted_and_complete() -> None:
    exported = durable_ai.__all__
    assert exported == sorted(exported, key=lambda n: (not n.isupper(), n))
    for name in exported:
        assert hasattr(durable_ai, name), name
    public = {
        name
        for name, value in vars(durable_ai).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name not in {"annotations"}
    }
    assert public == set(exported)


def test_design_api_names_exist() -> None:
    """The names DESIGN.md section 3 promises."""
    assert callable(durable_ai.connect)
    for name in ("session", "open", "close", "flush"):
        assert callable(getattr(durable_ai.Hub, name))
    for name in ("run", "events", "cancel", "steer", "prompt", "view", "serve", "presence", "join", "delete"):
        assert callable(getattr(durable_ai.Session, name)), name
    for name in ("text", "reasoning", "tool_call", "tool_result", "status", "data", "steering", "flush"):
        assert callable(getattr(durable_ai.Run, name)), name
    run_params = inspect.signature(durable_ai.Session.run).parameters
    assert {"agent", "parent"} <= set(run_params)
    assert {"after", "follow"} <= set(inspect.signature(durable_ai.Session.events).parameters)


def test_typed_packages() -> None:
    assert (ROOT / "durable_ai" / "py.typed").is_file()


def test_memory_backend_is_registered_as_an_entry_point() -> None:
    names = {ep.name for ep in importlib.metadata.entry_points(group="durable_ai.backends")}
    assert "memory" in names


def test_connect_by_url_and_by_instance() -> None:
    assert isinstance(durable_ai.connect("memory://").backend, MemoryBackend)
    backend = MemoryBackend(max_messages=10)
    assert durable_ai.connect(backend).backend is backend
    assert durable_ai.connect("memory://?max_messages=7&max_age=60").backend.max_messages == 7  # type: ignore[attr-defined]


def test_installed_adapters_are_found_by_scheme() -> None:
    backend = durable_ai.connect("nats://127.0.0.1:4222?prefix=app").backend
    assert type(backend).__name__ == "NatsBackend"


@pytest.mark.parametrize(
    ("url", "package"),
    [("nats://127.0.0.1:4222", "'durable-ai[nats]'"), ("ably://?key=x", "'durable-ai[ably]'"), ("redis://x", None)],
)
def test_unknown_scheme_names_the_package_to_install(
    url: str, package: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a machine where no adapter is installed.
    monkeypatch.setattr(durable_ai.backend, "entry_points", lambda group: [])
    with pytest.raises(UnknownBackend) as caught:
        durable_ai.connect(url)
    assert caught.value.package == package
    if package:
        assert package in str(caught.value)


@pytest.mark.parametrize("url", ["", "memory", "memory://?max_messages=lots", "memory://?nope=1", 42])
def test_bad_urls_are_configuration_errors(url: object) -> None:
    with pytest.raises(ConfigurationError):
        durable_ai.connect(url)  # type: ignore[arg-type]


async def test_hub_lifecycle_errors() -> None:
    hub = durable_ai.connect("memory://")
    with pytest.raises(HubClosed):
        hub.session("s").events()
    async with hub:
        await hub.open()  # idempotent
        hub.session("s")
    with pytest.raises(HubClosed):
        await hub.open()
    with pytest.raises(HubClosed):
        await hub.session("s").view()


async def test_session_ids_are_validated_without_io(hub: durable_ai.Hub) -> None:
    with pytest.raises(InvalidSessionId) as caught:
        hub.session("chat.42")
    assert caught.value.session_id == "chat.42"
    assert "'.'" in caught.value.reason
    assert isinstance(caught.value, ValueError)


async def test_bad_cursors_are_refused(hub: durable_ai.Hub) -> None:
    for cursor in ["", "nocolons", "e:1:x", "e:1:-2", "e::3", "a b:1:0", "x" * 600]:
        with pytest.raises(InvalidCursor):
            hub.session("s").events(after=cursor)


@pytest.mark.parametrize("query", ["dedupe_window=none", "dedupe_window=", "dedupe_window=-1", "max_message_bytes=10"])
def test_memory_options_are_validated(query: str) -> None:
    with pytest.raises(ConfigurationError):
        durable_ai.connect(f"memory://?{query}")
