"""What the Ably backend asks of Ably: requests before a run's first token and per control (``ably.requests``).

Counted where requests leave the process (httpx for REST, ably-python's connection manager for realtime protocol
messages), against an in-process :class:`durable_ai_ably.testing.AblyEmulator`: these are counts, not timings, so
the emulator's share of the CPU does not matter. The baseline is the least a raw client does for the same work:
one realtime publish, no REST request.

Run it alone with ``uv run python -m benchmarks --only ably.requests``; ``python -m benchmarks.ably_requests``
prints the counts as text (it runs against whatever ``durable_ai_ably`` is importable, e.g. an older checkout).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from ably.realtime.connectionmanager import ConnectionManager  # type: ignore[import-untyped]

import durable_ai
from durable_ai import Hub
from durable_ai_ably.testing import AblyEmulator

from ._harness import Report, Row, Sizes

KEY = "bench.requests:Zk3vQ9pX2mL7wR4tY8uI1oP6aS5dF0gHjKlMnBvCxZq"
_MESSAGE = 15


@dataclass
class Counts:
    rest: int = 0
    realtime: int = 0
    published: int = 0

    def describe(self) -> str:
        return f"{self.rest} REST, {self.realtime} realtime ({self.published} publishes)"


class _Counter:
    def __init__(self) -> None:
        self.rest: collections.Counter[str] = collections.Counter()
        self.realtime: collections.Counter[int] = collections.Counter()

    def take(self) -> Counts:
        rest = sum(n for path, n in self.rest.items() if not path.endswith("/requestToken"))
        counts = Counts(rest, sum(self.realtime.values()), self.realtime[_MESSAGE])
        self.rest.clear()
        self.realtime.clear()
        return counts


@contextmanager
def _counting() -> Iterator[_Counter]:
    counter = _Counter()
    send, protocol = httpx.AsyncClient.send, ConnectionManager.send_protocol_message

    async def counted_send(self: httpx.AsyncClient, request: httpx.Request, *args: Any, **kwargs: Any) -> Any:
        counter.rest[request.url.path] += 1
        return await send(self, request, *args, **kwargs)

    async def counted_protocol(self: Any, message: dict[str, Any]) -> Any:
        counter.realtime[int(message.get("action", -1))] += 1
        return await protocol(self, message)

    httpx.AsyncClient.send = counted_send  # type: ignore[method-assign]
    ConnectionManager.send_protocol_message = counted_protocol
    try:
        yield counter
    finally:
        httpx.AsyncClient.send = send  # type: ignore[method-assign]
        ConnectionManager.send_protocol_message = protocol


@asynccontextmanager
async def _hubs(appends: str) -> AsyncIterator[tuple[Hub, Hub]]:
    # Counted with the client's rate budgets off (a busy session written fast), so rates are not enforced.
    async with AblyEmulator({KEY: None}, mutable_namespaces={"ai"}, enforce_rate_limits=False) as emulator:
        url = (
            f"ably://?key={KEY}&endpoint={emulator.endpoint}&tls=false&rate_limit=0&connection_rate_limit=0"
            f"&appends={appends}"
        )
        async with durable_ai.connect(url) as agent, durable_ai.connect(url) as client:
            yield agent, client


async def measure(appends: str, busy_messages: int = 600) -> dict[str, Counts]:
    """The counts of each step, for one streaming mode."""
    found: dict[str, Counts] = {}
    with _counting() as counter:
        async with _hubs(appends) as (agent, client):
            async with agent.session("warm").run(agent="a") as run:  # the connection and its token
                await run.text("hi")
            await agent.flush()
            await client.session("warm").view()
            counter.take()
            session = agent.session("s1")
            async with session.run(agent="a") as run:
                await run.text("first")
                await agent.flush()
                found["first run of a new session: until its first token is stored"] = counter.take()
            await agent.flush()
            await asyncio.sleep(0.5)  # the first run's end, presence leave and releases are not the next run's
            counter.take()
            async with session.run(agent="a") as run:
                await run.text("first")
                await agent.flush()
                found["a later run of the session: until its first token is stored"] = counter.take()
            written = asyncio.Event()

            async def busy() -> None:
                async with agent.session("busy").run(agent="a") as run:
                    for index in range(busy_messages):
                        await run.text(f"t{index} ")
                        await agent.flush()
                    written.set()
                    await asyncio.sleep(60)  # until cancelled

            task = asyncio.create_task(busy())
            await asyncio.wait_for(written.wait(), 120)
            await client.session("busy").view()
            counter.take()
            handle = await client.session("busy").cancel(reason="stop")
            found[f"a cancel on a busy session ({busy_messages} messages): until it is sent"] = counter.take()
            await handle.ack(timeout=30)
            found["then until its ack"] = counter.take()
            await asyncio.wait_for(task, 30)
    return found


async def bench_requests(sizes: Sizes, report: Report) -> None:
    """Requests (REST and realtime) before a run's first token and per control, both streaming modes."""
    for appends in ("auto", "off"):
        for step, counts in (await measure(appends, sizes.busy_messages)).items():
            key = step.split(":")[0].split(" (")[0].replace(" ", "-").replace(",", "")
            report.add(
                Row(
                    id=f"ably.requests.{appends}.{key}",
                    benchmark="Requests to Ably: REST and realtime (emulator)",
                    configuration=f"{step}, appends={appends}",
                    statistic="count",
                    unit="requests",
                    sdk=float(counts.rest + counts.realtime),
                    baseline=float(counts.published),
                    baseline_label="a raw client: its publishes only",
                    extra={"rest": float(counts.rest), "realtime": float(counts.realtime)},
                )
            )
            report.note(f"ably.requests appends={appends}: {step}: {counts.describe()}.")


def main(print_: Callable[[str], None] = print) -> None:
    for appends in ("auto", "off"):
        for step, counts in asyncio.run(measure(appends)).items():
            print_(f"appends={appends}: {step}: {counts.describe()}")


if __name__ == "__main__":
    main()
