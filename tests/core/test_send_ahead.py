"""Publishing ahead: a backend that sends a session's next message from its acknowledgement handler.

Counts are of raw messages in the broker's log (the reader deduplicates, so reading back would hide a copy).
"""

from __future__ import annotations

import json

import pytest

from durable_ai import Coalesce, Hub
from durable_ai.testing.scenarios import collect, text_of

from .doubles import AheadBackend


def _events(raw: list[bytes]) -> list[dict[str, object]]:
    return [json.loads(line) for message in raw for line in message.split(b"\n")]


async def _write(backend: AheadBackend, tokens: int) -> list[str]:
    texts = [f"t{i} " for i in range(tokens)]
    async with Hub(backend, coalesce=Coalesce.off(), snapshots=False) as hub:
        async with hub.session("s").run(agent="w") as run:
            for index, text in enumerate(texts):
                await run.text(text)
                if index == tokens // 2:
                    await run.tool_call("look", {"at": index})
        await hub.flush()
    return texts


async def test_a_stream_goes_out_one_acknowledgement_after_another() -> None:
    backend = AheadBackend()
    async with Hub(backend):  # keeps the broker open while the writing hub comes and goes
        texts = await _write(backend, 300)
        events = _events(backend.stored("s"))
        assert "".join(str(e["delta"]) for e in events if e["type"] == "text-delta") == "".join(texts)
        # Every message but the run's first (the log's opening) went ahead, most from the acknowledgement of
        # the one before it rather than from the writing run or the flush loop.
        assert backend.publishes <= 2
        assert backend.chained >= 250


@pytest.mark.parametrize("stumble", [4, 7])
async def test_what_goes_wrong_ahead_is_published_again_once_in_order(stumble: int) -> None:
    backend = AheadBackend(stumble=stumble)
    async with Hub(backend) as client:
        texts = await _write(backend, 300)
        raw = backend.stored("s")
        events = _events(raw)
        ids = [e["id"] for e in events]
        assert len(ids) == len(set(ids)), "an event was stored twice"
        deltas = [str(e["delta"]) for e in events if e["type"] == "text-delta"]
        assert deltas == texts, "an event was lost or stored out of order"
        assert [e["type"] for e in events if e["type"] not in ("text-delta",)] == [
            "log-start",
            "run-start",
            "tool-call",
            "run-end",
        ]
        # The stumbles were real and each went through a full publish.
        assert backend.publishes >= 3 * (backend.sent // stumble) - 3
        read = await collect(client.session("s").events(follow=False))
        assert text_of(read) == "".join(texts)
