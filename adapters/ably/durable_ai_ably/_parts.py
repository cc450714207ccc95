"""Message per part: how one batch from the hub becomes Ably operations (see :mod:`durable_ai_ably._log`).

The hub hands the backend a batch: NDJSON event lines, deltas of one or more parts mixed with other events.
:class:`PartPlanner` turns it into operations: the deltas of a part that already has a message are appended to
that message; other lines go into new messages, and a new message whose lines include the start of a part stays
open for that part's later deltas. Deltas never move across another event, so every run's events keep their order.
A plan is kept until all its operations are acknowledged, so a retried publish resumes where it stopped instead of
appending twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from ._log import PART_MAX_AGE_SECONDS, append_frame

__all__ = ["OpenPart", "PartPlanner", "Plan", "PlannedOp"]

_DELTAS = frozenset({"text-delta", "reasoning-delta"})
_FRAME_ROOM = 128  # bytes a frame adds to an append, at most

PartKey = tuple[str, str]  # (run_id, part_id)


@dataclass(slots=True)
class OpenPart:
    """A part's message that later deltas of the part are appended to."""

    serial: str
    last: str  # the position of the message's latest operation
    size: int
    created: float  # time.monotonic() when the message was created


@dataclass(slots=True)
class PlannedOp:
    """One operation of a plan: a new message (``target is None``) or an append to ``target``."""

    lines: list[bytes] = field(default_factory=list)
    part: PartKey | None = None  # the part whose message this is (or is appended to)
    target: OpenPart | None = None
    message_id: str = ""
    position: str | None = None  # once acknowledged

    @property
    def batch(self) -> bytes:
        return b"\n".join(self.lines)

    def payload(self) -> bytes:
        """What is published: the batch, framed for an append."""
        if self.target is None:
            return self.batch
        return append_frame(self.target.last, self.batch)


@dataclass(slots=True)
class Plan:
    channel: str
    message_id: str
    ops: list[PlannedOp]
    ended_runs: set[str]


def _classify(line: bytes) -> tuple[PartKey | None, str | None]:
    """``(part, None)`` for a delta line; ``(None, run_id)`` for a run-end; ``(None, None)`` otherwise."""
    try:
        record = json.loads(line)
    except ValueError:
        return None, None
    if not isinstance(record, dict):
        return None, None
    kind, run_id = record.get("type"), record.get("run_id")
    if not isinstance(run_id, str):
        return None, None
    if kind in _DELTAS:
        part_id = record.get("part_id")
        return ((run_id, part_id), None) if isinstance(part_id, str) else (None, None)
    return None, (run_id if kind == "run-end" else None)


class PartPlanner:
    """Open parts per channel and the plans of batches not yet fully published."""

    def __init__(self, max_message_bytes: int, *, max_age: float = PART_MAX_AGE_SECONDS) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_age = max_age
        self.enabled = True
        self._open: dict[str, dict[PartKey, OpenPart]] = {}
        self._plans: dict[str, Plan] = {}

    def plan(self, channel: str, data: bytes, message_id: str) -> Plan:
        """The plan for a batch: the same plan again while a publish of ``message_id`` is being retried."""
        existing = self._plans.get(message_id)
        if existing is not None and existing.channel == channel:
            return existing
        now = time.monotonic()
        parts = self._open.get(channel, {})
        for stale in [k for k, p in parts.items() if now - p.created > self.max_age]:
            del parts[stale]
        ops: list[PlannedOp] = []
        stretch: dict[PartKey, PlannedOp] = {}
        plain: PlannedOp | None = None
        ended: set[str] = set()
        for line in data.split(b"\n") if data else []:
            key, ended_run = _classify(line)
            if key is None:
                stretch = {}
                if plain is None or (ops and plain is not ops[-1]):
                    plain = PlannedOp()
                    ops.append(plain)
                plain.lines.append(line)
                if ended_run is not None:
                    ended.add(ended_run)
                continue
            op = stretch.get(key)
            if op is None:
                target = parts.get(key) if self.enabled else None
                if target is not None:
                    op = PlannedOp(part=key, target=target)
                    ops.append(op)
                elif plain is not None and plain is ops[-1] and plain.part is None:
                    op = plain  # the message of the events before it becomes the part's message
                    op.part = key
                else:
                    op = PlannedOp(part=key)
                    ops.append(op)
                stretch[key] = op
            op.lines.append(line)
        for op in ops:
            if op.target is not None and op.target.size + len(op.batch) + _FRAME_ROOM > self.max_message_bytes:
                op.target = None  # the part's message is full: the part goes on in a new message
        creates = 0
        for op in ops:
            if op.target is None:
                op.message_id = message_id if creates == 0 else f"{message_id}:{creates}"
                creates += 1
        plan = Plan(channel, message_id, ops, ended)
        self._plans[message_id] = plan
        if len(self._plans) > 1000:  # plans of messages the hub gave up on
            del self._plans[next(iter(self._plans))]
        return plan

    def created(self, plan: Plan, op: PlannedOp, serial: str, size: int) -> None:
        op.position = serial
        if op.part is not None and self.enabled:
            self._open.setdefault(plan.channel, {})[op.part] = OpenPart(serial, serial, size, time.monotonic())

    def appended(self, op: PlannedOp, version_serial: str, size: int) -> None:
        assert op.target is not None
        op.position = version_serial
        op.target.last = version_serial
        op.target.size += size

    def finished(self, plan: Plan, message_id: str) -> None:
        """All operations are acknowledged: close the parts of runs that ended."""
        self._plans.pop(message_id, None)
        parts = self._open.get(plan.channel)
        if parts is None:
            return
        for key in [k for k in parts if k[0] in plan.ended_runs]:
            del parts[key]
        if not parts:
            del self._open[plan.channel]

    def disable(self) -> None:
        """Appends are refused (the namespace lacks the channel rule): publish whole messages from now on."""
        self.enabled = False
        self._open.clear()
        for plan in self._plans.values():
            for index, op in enumerate(plan.ops):
                if op.position is None and op.target is not None:
                    op.target = None
                    op.message_id = f"{plan.message_id}:a{index}"

    def needed(self, message_id: str) -> bool:
        """Whether a batch goes through a plan: appends are on, or an earlier attempt left one to finish."""
        return self.enabled or message_id in self._plans

    def forget(self, channel: str) -> None:
        """The channel's session was deleted: its parts are gone."""
        self._open.pop(channel, None)
