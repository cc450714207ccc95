"""How runs turn events into broker messages: what a metered broker bills and a subscriber receives.

The policies use an hour-long ``max_delay`` so that an event can only reach a subscriber through the flush
trigger under test (first delta, non-delta event, ``max_bytes``, run end), never by a timer.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from durable_ai import Coalesce, Event, Hub, Run, RunEnd, Status, TextDelta
from durable_ai._load import LoadGauge
from durable_ai.backends.memory import MemoryBackend
from durable_ai.testing import RecordingBackend
from durable_ai.testing.scenarios import collect, collect_open, text_of

from .doubles import GatedBackend

HOUR = Coalesce(max_delay=3600)


def _position(event: Event) -> str:
    assert event.cursor is not None
    return event.cursor.split(":")[1]


async def test_first_delta_is_flushed_at_once_and_later_ones_wait(backend: MemoryBackend) -> None:
    async with Hub(backend, coalesce=HOUR) as agent, Hub(backend) as client:
        live = client.session("s").events()
        async with agent.session("s").run(agent="w") as run:
            await run.text("Hel")
            first = await collect(live, until=lambda e: isinstance(e, TextDelta))
            await run.text("lo")
            await run.text(" world")
            await run.status("thinking")
        events = await collect(client.session("s").events(after=first[-1].cursor, follow=False))
    assert text_of(first) == "Hel"
    delta, status = events[0], events[1]
    assert isinstance(delta, TextDelta) and delta.delta == "lo world"  # held, then merged into one event
    assert isinstance(status, Status)
    assert _position(delta) == _position(status)  # flushed together by the status, in one broker message


async def test_max_bytes_triggers_a_flush(backend: MemoryBackend) -> None:
    policy = Coalesce(max_delay=3600, max_bytes=100)
    async with Hub(backend, coalesce=policy) as agent, Hub(backend) as client:
        live = client.session("s").events()
        async with agent.session("s").run(agent="w") as run:
            await run.text("0")
            for i in range(15):
                await run.text(f"{i:09d},")  # 10 bytes each: 150 bytes buffered
            received = ""

            def got_all(event: Event) -> bool:
                nonlocal received
                received += text_of([event])
                return len(received) >= 101

            await collect(live, until=got_all)
            await run.text("tail")
        events = await collect(client.session("s").events(follow=False))
    # Flushed as soon as 100 bytes were buffered; the last 50 waited for the run to end.
    assert received == "0" + "".join(f"{i:09d}," for i in range(10))
    assert text_of(events) == "0" + "".join(f"{i:09d}," for i in range(15)) + "tail"


async def test_coalescing_off_writes_one_message_per_event() -> None:
    recording = RecordingBackend(MemoryBackend())
    async with Hub(recording, coalesce=Coalesce.off()) as hub:
        live = hub.session("s").events()  # as written (a catch-up from the snapshot would merge the deltas)
        async with hub.session("s").run(agent="w") as run:
            for i in range(50):
                await run.text(f"{i} ")
            await run.status("done")
        events = await collect(live, until=lambda e: isinstance(e, RunEnd))
    assert recording.events_published("s") == 1 + 50 + 1 + 1
    assert sum(isinstance(e, TextDelta) for e in events) == 50
    assert len({_position(e) for e in events}) == len(events)


async def test_default_policy_batches_a_fast_stream() -> None:
    recording = RecordingBackend(MemoryBackend())
    async with Hub(recording, coalesce=HOUR) as hub:
        async with hub.session("s").run(agent="w") as run:
            for i in range(1000):
                await run.text(f"{i} ")
        events = await collect(hub.session("s").events(follow=False))
    # run-start, the first delta (at once), the other 999 deltas with the run-end.
    assert recording.events_published("s") == 3
    assert text_of(events) == "".join(f"{i} " for i in range(1000))


async def test_runs_of_a_session_share_messages_but_never_mix_their_deltas(backend: MemoryBackend) -> None:
    async with Hub(backend, coalesce=HOUR) as hub:
        session = hub.session("s")
        async with session.run(agent="a") as run_a, session.run(agent="b") as run_b:
            await run_a.text("a1 ")
            await run_b.text("b1 ")
            await run_a.flush()
            await run_b.flush()
            await run_a.text("a2 ")
            await run_b.text("b2 ")
            await run_a.text("a3 ")
            await run_a.status("a is done")
        events = await collect(session.events(follow=False))
    by_position: dict[str, set[str | None]] = defaultdict(set)
    for event in events:
        by_position[_position(event)].add(event.run_id)
    assert any(len(runs) == 2 for runs in by_position.values()), "no message carried both runs"
    assert text_of(events, run_a.id) == "a1 a2 a3 "
    assert text_of(events, run_b.id) == "b1 b2 "


async def test_a_new_part_starts_after_other_output(hub: Hub) -> None:
    async with hub.session("s").run(agent="w") as run:
        await run.text("before ")
        await run.reasoning("hmm")
        await run.text("after")
        call = await run.tool_call("search", {"q": "x"})
        await run.tool_result(call, {"hits": 1})
        await run.text("end")
    view = await hub.session("s").view()
    kinds = [(p.type, getattr(p, "text", None)) for p in view.messages[0].parts]
    assert kinds == [
        ("text", "before "),
        ("reasoning", "hmm"),
        ("text", "after"),
        ("tool", None),
        ("text", "end"),
    ]


async def test_writers_do_not_outlive_their_runs(hub: Hub) -> None:
    async with hub.session("s").run(agent="w") as run:
        await run.text("x")
    await hub.flush()
    await asyncio.sleep(0)
    assert not hub._runtime.owners


async def test_max_bytes_counts_utf8_bytes_not_characters(backend: MemoryBackend) -> None:
    policy = Coalesce(max_delay=3600, max_bytes=100)
    async with Hub(backend, coalesce=policy) as agent, Hub(backend) as client:
        live = client.session("s").events()
        async with agent.session("s").run(agent="w") as run:
            await run.text("·")
            for _ in range(20):
                await run.text("✓✓")  # 6 bytes, 2 characters: 120 bytes buffered, 40 characters
            got = await collect(live, until=lambda e: "✓" in text_of([e]))
        events = await collect(client.session("s").events(follow=False))
    # The item closes at 96 bytes (16 pairs); counted in characters, all 40 would have fit in it.
    assert text_of(got[-1:]) == "✓✓" * 16
    assert text_of(events) == "·" + "✓✓" * 20


async def test_the_first_delta_of_an_explicit_part_is_flushed_at_once(backend: MemoryBackend) -> None:
    async with Hub(backend, coalesce=HOUR) as agent, Hub(backend) as client:
        live = client.session("s").events()
        async with agent.session("s").run(agent="w") as run:
            await run.text("first", part_id="answer")
            got = await collect(live, until=lambda e: isinstance(e, TextDelta))
    assert text_of(got) == "first"


async def test_an_agent_that_never_awaits_still_gets_its_first_token_out(backend: MemoryBackend) -> None:
    """A synchronous token loop (a blocking model client, say) must not hold back the first token."""
    async with Hub(backend, coalesce=HOUR) as hub, hub.session("s").run(agent="w") as run:
        published_at_start = backend.published
        for i in range(1000):
            await run.text(f"{i} ")
            if i == 500:
                published_mid_loop = backend.published
    assert published_at_start == 1  # run-start
    assert published_mid_loop == 2  # and the first delta, while the loop was still running


# -- windows under load ---------------------------------------------------------------------------------------


class _Load:
    """The hub's load gauge, held at what the test says (``widening``: how late the loop runs, in effect)."""

    def __init__(self, loaded: bool, widening: float = 1.0) -> None:
        self.value = loaded
        self.widening = widening

    def loaded(self) -> bool:
        return self.value

    def stretching(self) -> float:
        return self.widening if self.value else 0.0


def _with_load(hub: Hub, loaded: bool, widening: float = 1.0) -> Hub:
    hub._runtime.load = _Load(loaded, widening)  # type: ignore[assignment]  # before the hub's first writer takes it
    return hub


async def _write_spaced(run: Run, count: int, *, spacing: float) -> None:
    for _ in range(count):
        await asyncio.sleep(spacing)
        await run.text("x")


async def _twenty_spaced(policy: Coalesce, loaded: bool, widening: float = 1.0) -> tuple[str, int, float]:
    """A run's first delta, then 20 deltas 3 ms apart, under the load given: (the first delta as the subscriber
    got it, the broker messages of the events log, seconds from the first of the 20 until all had arrived)."""
    recording = RecordingBackend(MemoryBackend())
    async with _with_load(Hub(recording, coalesce=policy), loaded, widening) as hub:
        live = hub.session("s").events()
        async with hub.session("s").run(agent="w") as run:
            await run.text("first")
            first = await collect_open(live, until=lambda e: isinstance(e, TextDelta), seconds=5)
            began = time.monotonic()
            await _write_spaced(run, 20, spacing=0.003)
            received = ""

            def all_in(event: Event) -> bool:
                nonlocal received
                received += text_of([event])
                return len(received) == 20

            await collect(live, until=all_in, seconds=5)
            assert received == "x" * 20
            return text_of(first), recording.events_published("s"), time.monotonic() - began


@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "idle"])
async def test_under_load_a_window_stays_open_until_it_holds_enough_deltas(loaded: bool) -> None:
    # 20 deltas 3 ms apart span 60 ms, six 10 ms windows: an idle loop flushes several messages, a loaded one keeps
    # the window open (for up to 1,000 s here) until it holds 20 deltas, then flushes them at once.
    policy = Coalesce(max_delay=0.010, deltas_under_load=20, stretch_under_load=100_000)
    first, published, _ = await _twenty_spaced(policy, loaded)
    assert first == "first"  # the first token is out at once, under load too
    if loaded:
        assert published == 3  # run-start, the first delta, the 20 deltas together (flushed before the run ended)
    else:
        assert published > 3


@pytest.mark.parametrize("widening", [1.0, 50.0], ids=["on-time", "late"])
async def test_while_the_loop_runs_late_a_window_under_load_widens(widening: float) -> None:
    # Under load a window closes after 2 x 10 ms while the loop is on time, so the 20 deltas take several
    # messages; while it runs late the stretch widens 50 times: one window of 510 ms holds every delta.
    policy = Coalesce(max_delay=0.010, stretch_under_load=2, deltas_under_load=10_000, max_delay_under_load=5.0)
    _, published, waited = await _twenty_spaced(policy, True, widening)
    if widening > 1:
        assert published == 3  # run-start, the first delta, the 20 deltas in one window
        assert waited >= 0.5  # the widened window: 10 ms + 50 x 10 ms
    else:
        assert published > 3


@pytest.mark.parametrize(
    ("policy", "widening"),
    [
        # Never enough deltas (a slow model under load): each window closes after 5 x 10 ms.
        (Coalesce(max_delay=0.010, deltas_under_load=10_000, stretch_under_load=5), 1.0),
        # The loop runs so late that the stretch would be 1,000 x 10 ms: max_delay_under_load (50 ms) closes them.
        (Coalesce(max_delay=0.010, stretch_under_load=2, deltas_under_load=10_000, max_delay_under_load=0.05), 1000.0),
    ],
    ids=["stretch-times-max-delay", "max-delay-under-load"],
)
async def test_under_load_a_window_still_closes_while_the_run_goes_on(policy: Coalesce, widening: float) -> None:
    async with _with_load(Hub(MemoryBackend(), coalesce=policy), True, widening) as hub:
        live = hub.session("s").events()
        async with hub.session("s").run(agent="w") as run:
            await run.text("first")
            deltas = 0

            async def write_until_two_arrive() -> None:
                while deltas < 2:
                    await _write_spaced(run, 1, spacing=0.005)

            writer = asyncio.create_task(write_until_two_arrive())
            try:

                def count(event: Event) -> bool:
                    nonlocal deltas
                    deltas += isinstance(event, TextDelta)
                    return deltas >= 2

                await collect(live, until=count, seconds=5)
            finally:
                await writer
    assert deltas == 2


def test_the_load_gauge_widens_while_the_loop_runs_late_and_narrows_once_on_time() -> None:
    clock = demand = 0.0
    gauge = LoadGauge(period=1.0, clock=lambda: clock, demand=lambda: (demand, 0.0))
    assert gauge.stretching() == 0.0  # the first call starts the first period
    widths = []
    for _ in range(4):  # under load, and callbacks wait 50 ms to run
        gauge.note_delay(0.050)
        gauge.note_delay(0.050)
        clock, demand = clock + 1.0, demand + 1.0
        widths.append(gauge.stretching())
    assert widths[0] >= 1.0
    assert widths == sorted(widths) and widths[-1] > widths[0]  # wider every period
    for _ in range(40):  # on time again: back to the usual stretch, never below it
        gauge.note_delay(0.0)
        clock, demand = clock + 1.0, demand + 1.0
        gauge.stretching()
    assert gauge.stretching() == 1.0
    for _ in range(3):  # late, but with CPU to spare: waiting for I/O, nothing to widen
        gauge.note_delay(0.050)
        clock, demand = clock + 1.0, demand + 0.1
        assert gauge.stretching() == 0.0
    assert gauge.widening == 1.0


def test_a_thread_waiting_for_a_core_stretches_windows_by_the_share_it_did_not_get() -> None:
    # Its runs write their tokens as much more slowly, so a window must be as much longer to hold as many deltas.
    clock = ran = waited = 0.0
    gauge = LoadGauge(period=1.0, clock=lambda: clock, demand=lambda: (ran, waited))
    gauge.stretching()  # the first call starts the first period
    clock, ran = 0.2, 0.2  # running all the time, waiting for nothing: the usual stretch
    assert gauge.stretching() == 1.0
    clock, ran, waited = 1.2, 0.7, 0.5  # runnable all the time, and ran half of it
    assert gauge.stretching() == pytest.approx(2.0)
    assert gauge.got == pytest.approx(0.5)
    clock, ran, waited = 2.2, 0.75, 1.45  # ran 5% of what it wanted: stretched 4 times at most
    assert gauge.stretching() == pytest.approx(4.0)
    clock, ran, waited = 3.2, 1.0, 1.45  # a quarter of the time: not short of CPU, whatever it got
    assert gauge.stretching() == 0.0


async def test_the_load_gauge_measures_how_late_the_loop_runs_a_callback() -> None:
    gauge = LoadGauge(period=0.01)
    gauge.loaded()
    await asyncio.sleep(0.02)

    def busy() -> None:  # a callback that holds the loop for 50 ms
        end = time.monotonic() + 0.05
        while time.monotonic() < end:
            pass

    asyncio.get_running_loop().call_soon(busy)
    gauge.loaded()  # a sample: its callback runs after the busy one
    await asyncio.sleep(0.01)
    assert gauge.delay >= 0.3 * 0.05  # the moving average's first step towards 50 ms


def test_the_load_gauge_enters_and_leaves_with_hysteresis() -> None:
    clock = demand = 0.0
    gauge = LoadGauge(period=1.0, enter=0.9, leave=0.75, clock=lambda: clock, demand=lambda: (demand, 0.0))
    assert gauge.loaded() is False  # the first call starts the first period
    clock, demand = 0.25, 0.25  # the first period is a fifth of the others: busy from the start is known soon
    assert gauge.loaded() is True
    clock, demand = 1.25, 1.05  # 80%: under load still (it leaves below 75%)
    assert gauge.loaded() is True
    clock, demand = 2.25, 1.75  # 70%
    assert gauge.loaded() is False
    clock, demand = 3.25, 2.60  # 85%: not enough to enter again
    assert gauge.loaded() is False
    clock, demand = 3.75, 3.10  # within the period: the last answer
    assert gauge.loaded() is False
    clock, demand = 4.25, 3.55  # 95% of the second since the last sample
    assert gauge.loaded() is True


async def test_the_load_gauge_reads_a_busy_and_an_idle_thread() -> None:
    gauge = LoadGauge(period=0.02)
    gauge.loaded()
    end = time.monotonic() + 0.05
    while time.monotonic() < end:  # the loop's thread busy: what a saturated event loop looks like
        pass
    assert gauge.loaded() is True, gauge.share
    await asyncio.sleep(0.05)  # waiting for I/O: not short of CPU
    assert gauge.loaded() is False, gauge.share


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"), reason="the kernel does not say run-queue waits")
def test_a_thread_that_shares_its_cores_with_spinning_processes_gets_less_than_it_wanted() -> None:
    # One spinning process per core the thread may run on, and one more: the kernel shares the cores out, so a busy
    # thread is runnable all the time and runs only part of it.
    cores = len(os.sched_getaffinity(0))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores + 1)]
    try:
        gauge = LoadGauge(period=0.2)
        gauge.loaded()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            gauge.loaded()
        stretched = gauge.stretching()
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()
    assert gauge.share >= 0.9  # it wanted the CPU all along
    assert gauge.got < 0.9, gauge.got
    assert stretched == pytest.approx(1 / gauge.got)


async def test_a_writer_far_ahead_of_a_held_broker_is_held_back_and_loses_nothing() -> None:
    # One message per event: a run writes 1 KB deltas as fast as it can. 20,000 go out while the broker keeps up;
    # then the broker holds every publish, and the run stops once about 8 MB (the writer's bound on what it
    # buffers) wait, however much went out before. Then everything arrives once, in order.
    backend = GatedBackend()
    written = 0

    async def write(run: Run, count: int) -> None:
        nonlocal written
        for _ in range(count):
            await run.text(f"{written:09d}," + "x" * 990)
            written += 1

    async with Hub(backend, coalesce=Coalesce.off(), snapshots=False) as hub:
        async with hub.session("s").run(agent="w") as run:
            await write(run, 20_000)
            await run.flush()
            backend.gate.clear()
            task = asyncio.create_task(write(run, 20_000))
            done, _ = await asyncio.wait({task}, timeout=2.0)
            assert not done
            assert 27_000 <= written <= 29_000, written
            backend.gate.set()
            await task
        events = await collect(hub.session("s").events(follow=False))
    deltas = [e.delta for e in events if isinstance(e, TextDelta)]
    assert [int(d[:9]) for d in deltas] == list(range(40_000))
