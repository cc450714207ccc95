"""The public surface: names, packaging, discovery of backends by URL."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
from pathlib import Path

import pytest

import durable_ai
from durable_ai import ConfigurationError, HubClosed, InvalidCursor, InvalidSessionId, UnknownBackend
from durable_ai.backends.memory import MemoryBackend

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
    session_names = ("run", "events", "cancel", "steer", "prompt", "view", "serve", "presence", "present", "delete")
    for name in (*session_names, "head", "active_runs", "stream"):
        assert callable(getattr(durable_ai.Session, name)), name
        assert getattr(durable_ai.Session, name).__doc__, name
    for name in ("ack", "done"):
        assert callable(getattr(durable_ai.ControlHandle, name)), name
    assert {"run_id", "agent", "start_cursor"} <= set(durable_ai.RunInfo.model_fields)
    assert "input_message_id" in inspect.signature(durable_ai.Session.run).parameters
    assert "input_message_id" in durable_ai.RunStart.model_fields
    assert not hasattr(durable_ai.Session, "join")  # "join" is for reading a run, not for presence
    for name in ("text", "reasoning", "tool_call", "tool_result", "status", "data", "steering", "flush"):
        assert callable(getattr(durable_ai.Run, name)), name
    run_params = inspect.signature(durable_ai.Session.run).parameters
    assert {"agent", "parent"} <= set(run_params)
    assert {"after", "follow"} <= set(inspect.signature(durable_ai.Session.events).parameters)


def test_backend_author_names_live_in_their_own_namespace() -> None:
    import durable_ai.backend
    import durable_ai.backends.memory

    names = ("Backend", "BackendLimits", "Channel", "ChannelKind", "StoredMessage", "LogPosition", "Cursor")
    for name in (*names, "backend_from_url", "RateBudget", "validate_session_id"):
        assert not hasattr(durable_ai, name), name
        assert name in durable_ai.backend.__all__, name
    assert not hasattr(durable_ai, "MemoryBackend")
    assert durable_ai.backends.memory.MemoryBackend is MemoryBackend


def test_connect_and_hub_share_one_options_definition() -> None:
    from durable_ai.options import HubOptions, Settings

    for function in (durable_ai.connect, durable_ai.Hub.__init__):
        parameters = inspect.signature(function).parameters
        assert parameters["options"].kind is inspect.Parameter.VAR_KEYWORD
        assert [p for p in parameters if p not in ("self", "options")] in (["url"], ["backend"])
    assert set(HubOptions.__annotations__) == {f.name for f in dataclasses.fields(Settings)}
    hub = durable_ai.connect("memory://", publish_timeout=3, max_controls_per_second=9)
    assert (hub.settings.publish_timeout, hub.settings.max_controls_per_second) == (3, 9)
    with pytest.raises(ConfigurationError, match="unknown hub option"):
        durable_ai.connect("memory://", publish_timeout=1, no_such_option=1)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="publish_timeout"):
        durable_ai.Hub(MemoryBackend(), publish_timeout=0)


def test_message_text_joins_its_text_parts() -> None:
    from durable_ai import Message, ReasoningPart, TextPart

    message = Message(
        id="m",
        role="assistant",
        parts=[TextPart(id="a", text="Hello, "), ReasoningPart(id="r", text="hmm"), TextPart(id="b", text="world")],
    )
    assert message.text == "Hello, world"


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
    [("nats://127.0.0.1:4222", "adapters/nats"), ("ably://?key=x", "adapters/ably"), ("redis://x", None)],
)
def test_unknown_scheme_names_the_package_to_install(
    url: str, package: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a machine where no adapter is installed.
    monkeypatch.setattr(durable_ai.backend, "entry_points", lambda group: [])
    durable_ai.backend._backend_entry_points.cache_clear()
    with pytest.raises(UnknownBackend) as caught:
        durable_ai.connect(url)
    assert (caught.value.package is None) == (package is None)
    if package:
        assert package in str(caught.value) and "from a clone" in str(caught.value)
    assert caught.value.installed == ("memory",)
    assert "(installed: memory://)" in str(caught.value)


def test_installed_backends_are_looked_up_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading every distribution's metadata takes milliseconds: connect() does it once, not per hub."""
    lookups: list[str] = []
    real = importlib.metadata.entry_points

    def counting(group: str) -> importlib.metadata.EntryPoints:
        lookups.append(group)
        return real(group=group)

    monkeypatch.setattr(durable_ai.backend, "entry_points", counting)
    durable_ai.backend._backend_entry_points.cache_clear()
    for _ in range(3):
        assert type(durable_ai.connect("nats://127.0.0.1:4222?prefix=app").backend).__name__ == "NatsBackend"
        assert type(durable_ai.connect("ably://?key=app.k:s").backend).__name__ == "AblyBackend"
    assert lookups == ["durable_ai.backends"]
    # A scheme it did not find is looked up again (a package installed since), and still refused.
    with pytest.raises(UnknownBackend):
        durable_ai.connect("redis://localhost")
    assert len(lookups) == 2


def test_unknown_scheme_lists_the_installed_schemes() -> None:
    with pytest.raises(UnknownBackend) as caught:
        durable_ai.connect("redis://localhost")
    assert {"memory", "nats", "ably"} <= set(caught.value.installed)
    assert "nats://" in str(caught.value)


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
