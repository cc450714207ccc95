"""Write docs/protocol.md from the wire models, so the documented schema is always the one the code uses.

Run: ``uv run python scripts/gen_protocol_doc.py``. ``tests/core/test_protocol_doc.py`` fails when the file is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from durable_ai.events import KNOWN_EVENTS, PROTOCOL_VERSION, control_schema, event_schema

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

_COMMON = {"v", "id", "type", "session", "run_id", "agent", "ts"}

INTRO = f"""\
# The durable-ai wire protocol (v{PROTOCOL_VERSION})

This is what durable-ai writes to the broker, so that a browser, a service in another language, or a debugging
tool can read a session straight from the broker. The JSON Schemas at the end are generated from the library's
models (`scripts/gen_protocol_doc.py`); a test keeps this file in step with the code.

## Channels

A session has two logical channels:

- **events**: the committed, ordered log. Only trusted writers (agents, gateways) publish to it; clients read it.
- **control**: requests from clients (`cancel`, `steer`, `prompt`). It is untrusted: the agent side validates
  every control, commits accepted user input to events as `user-message`, and answers with a `control-ack`.

How the two channels map onto broker names is each backend's business (see `docs/backends/`). Session ids are
1 to 128 characters from `A-Z a-z 0-9 _ -`, so that they are valid in every broker's names.

## Broker messages

One broker message on the events channel holds **one or more events as newline-delimited JSON** (UTF-8, one JSON
object per line). A writer coalesces token deltas into such batches (one message every 40 ms by default), so a
reader must split every message on `\\n`. Concatenating two valid messages with a newline gives a valid message.

The broker's message id (the idempotency key: JetStream `Nats-Msg-Id`, Ably message `id`) is the `id` of the
message's first event. A writer retries a publish with the same bytes and the same id, so a retried publish is
deduplicated by the broker and never duplicates events. Readers also drop an event whose `id` they have already
delivered.

An event larger than one broker message is split into **fragment** records, each in its own broker message with
message id `<event id>#<index>`:

```json
{{"v":1,"type":"fragment","id":"<event id>","index":0,"count":3,"first":null,"chunk":"<base64>"}}
```

`chunk` is a base64 slice of the event's UTF-8 JSON; `first` is the broker position of fragment 0 (null in
fragment 0 itself), so a reader that starts between fragments can fetch the first ones. Readers reassemble the
event when fragment `count - 1` arrives; fragments are never delivered as events.

Two more records are never delivered as events. **`log-start`** is the first record of every events log (the
first line of the first message a writer publishes to an empty log); a reader that reads a log from its start
and does not find it knows that retention dropped the log's first messages. **`tombstone`** is written by
`session.delete()` into the log before the log is cleared, so that every live reader, in every process, learns of
the deletion: it yields a `reset` (with a null cursor: start again from the beginning) and goes on with the new
log. Both carry only `v`, `type`, `id`, `session` and `ts`:

```json
{{"v":1,"type":"log-start","id":"<id>","session":"<session>","ts":1733328000000}}
{{"v":1,"type":"tombstone","id":"<id>","session":"<session>","ts":1733328000000}}
```

On Ably with message appends (see `docs/backends/ably.md`), a text or reasoning part is one Ably message that grows:
each append carries a batch after a link line `{{"~":"<serial>"}}`, and history returns the message whole. Readers
split on `\\n` as always and skip lines that start with `{{"~":`; they are not events.

A control is **one JSON object per broker message** on the control channel; its `id` is the message id.

## Cursors

Every delivered event has a cursor, an opaque string `<epoch>:<position>:<index>`: the identity of the log, the
broker's position of the message that holds the event, and the event's line in that message. `-1` as index
means "before that message" (a `reset` event carries such a cursor). Clients store cursors and hand them back;
they should not build them. A cursor whose events no longer exist (the log was recreated, or retention dropped
them) yields a `reset` event, then the session from its earliest retained event: never a silent gap.

## Common event fields

| field | type | meaning |
| --- | --- | --- |
| `v` | `1` | protocol version; readers pass events of other versions through untouched |
| `id` | string (1 to 128) | unique event id; the idempotency key |
| `type` | kebab-case string | one of the types below; unknown types are passed through untouched |
| `session` | string | the session id |
| `run_id` | string or null | the run that wrote it (for a user message or an ack: the run it went to, or null) |
| `agent` | string or null | the agent of that run |
| `ts` | integer | milliseconds since the Unix epoch, set by the writer |
"""


def _type_words(annotation: str) -> str:
    """Python annotations in words that fit a markdown table cell."""
    text = annotation.replace("typing.", "").replace("<class '", "").replace("'>", "")
    if text.startswith("Literal["):
        return " or ".join(f"`{v.strip().strip(chr(39))}`" for v in text[len("Literal[") : -1].split(","))
    words = {"str": "string", "int": "integer", "None": "null", "JsonValue": "any JSON"}
    return " or ".join(words.get(part.strip(), part.strip()) for part in text.split("|"))


def _field_rows(cls: type) -> list[str]:
    rows = []
    for name, info in cls.model_fields.items():  # type: ignore[attr-defined]
        if name in _COMMON:
            continue
        annotation = _type_words(str(info.annotation))
        required = "required" if info.is_required() else f"default `{json.dumps(info.default)}`"
        rows.append(f"`{name}` ({annotation}, {required})")
    return rows


def render() -> str:
    parts = [INTRO, "## Event types\n", "| type | fields besides the common ones | meaning |", "| --- | --- | --- |"]
    for type_name, cls in KNOWN_EVENTS.items():
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        fields = "; ".join(_field_rows(cls)) or "none"
        parts.append(f"| `{type_name}` | {fields} | {doc} |")
    parts.append(
        "\n`reset` is synthesised by readers and never stored. `control-ack.control_id` is null when the control "
        "was not readable enough to have an id.\n\nA `run-start` whose run id the writer chose has the message id "
        "`run-start-<hash of session, epoch and run id>`, so that the broker keeps one of two writers entering "
        "the same run id at once; the other one reads the stored message back, sees it is not its own, and "
        "writes nothing more.\n"
    )
    parts.append("## Controls\n")
    parts.append(
        "Every control has `v` (1), `id` (1 to 128 characters; the broker message id) and `type`, and optionally "
        "`ts`. Unknown fields are refused. The agent side answers every control it is responsible for with a "
        "`control-ack`: `applied`, `rejected` (malformed, unknown type, over the size limit, nested too deeply, "
        "text that is not valid Unicode, a full inbox or queue, or refused by the multitask strategy) or `ignored` "
        "(nothing to apply it to). Acks and the user messages recorded for steers and prompts have ids derived "
        "from the control, so two processes giving the same answer store it once. Each session's controls are "
        "answered within a budget (5 per second with bursts of 20 by default); past it, controls are dropped "
        "unanswered, except a cancel, which is still applied. A client reading the log answers itself `ignored` "
        "for a cancel or steer whose run is not active there.\n"
    )
    parts.append("| type | fields | meaning |\n| --- | --- | --- |")
    schema = control_schema()
    for name in ("Cancel", "Steer", "Prompt"):
        definition = schema["$defs"][name]
        fields = ", ".join(f"`{f}`" for f in definition["properties"] if f not in {"v", "id", "type", "ts"})
        type_name = definition["properties"]["type"]["const"]
        parts.append(f"| `{type_name}` | {fields} | {definition.get('description', '')} |")
    parts.append(
        "\n`prompt.strategy` asks for a multitask strategy (`enqueue`, `interrupt`, `reject`, `steer`); the agent "
        "side decides which ones a client may ask for.\n"
    )
    parts.append("## JSON Schema: events\n\n```json")
    parts.append(json.dumps(event_schema(), indent=2))
    parts.append("```\n\n## JSON Schema: controls\n\n```json")
    parts.append(json.dumps(schema, indent=2))
    parts.append("```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    sys.stdout.write(f"wrote {DOC}\n")
