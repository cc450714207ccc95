"""docs/protocol.md carries the JSON Schema generated from the wire models, and stays in step with them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from durable_ai.events import KNOWN_EVENTS, control_schema, event_schema

ROOT = Path(__file__).resolve().parents[2]


def _render() -> str:
    spec = importlib.util.spec_from_file_location("gen_protocol_doc", ROOT / "scripts" / "gen_protocol_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.render())


def test_protocol_doc_is_up_to_date() -> None:
    current = (ROOT / "docs" / "protocol.md").read_text()
    assert current == _render(), "docs/protocol.md is stale: run `uv run python scripts/gen_protocol_doc.py`"


def test_schema_covers_every_event_and_control() -> None:
    events = event_schema()
    mapping = events["discriminator"]["mapping"]
    assert set(mapping) == set(KNOWN_EVENTS)
    controls = control_schema()
    assert set(controls["discriminator"]["mapping"]) == {"cancel", "steer", "prompt"}
    doc = (ROOT / "docs" / "protocol.md").read_text()
    assert json.dumps(events, indent=2) in doc
