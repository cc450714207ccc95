"""The backend contract: what a broker must provide for durable sessions.

Backends see bytes and positions, never events; the layers above encode, batch, cursor and validate. The
in-memory backend (:mod:`durable_ai.backends.memory`) is the reference implementation, and the conformance suite in
:mod:`durable_ai.testing` checks any implementation against the semantics written here. Backend authors import
these names from :mod:`durable_ai.backend`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

from ..cursor import LogPosition

__all__ = [
    "Backend",
    "BackendLimits",
    "Channel",
    "ChannelKind",
    "IssuesClientCredentials",
    "Landed",
    "OpensLogs",
    "Outgoing",
    "PresenceEntry",
    "PresenceRole",
    "PublishesAhead",
    "ReadsSince",
    "StoredMessage",
]

ChannelKind: TypeAlias = Literal["events", "control"]
PresenceRole: TypeAlias = Literal["agent", "client"]


@dataclass(frozen=True, slots=True)
class Channel:
    """One of a session's two logs: ``events`` (trusted writers) or ``control`` (client requests)."""

    session: str
    kind: ChannelKind


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A broker message read back from a log, with the position the backend gave it."""

    epoch: str
    position: str
    data: bytes


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    """A member present on a session, as the broker identifies it.

    ``member_id`` and ``role`` come from where the member was entered (the key, channel or client id the broker
    gave it), never from ``data``: a client can only appear as a client, under the identity its credential
    allows, and cannot remove or replace an agent.
    """

    member_id: str
    role: PresenceRole
    data: bytes


@dataclass(frozen=True, slots=True)
class BackendLimits:
    """What the broker allows; the writer shapes its publishes to fit.

    Attributes:
        max_message_bytes: the largest broker message; larger events are split into fragments.
        max_messages_per_second: the publish budget of one channel, shared by every run of a session
            (``None``: no limit).
    """

    max_message_bytes: int
    max_messages_per_second: float | None


@runtime_checkable
class Backend(Protocol):
    """A broker that stores each channel as an ordered, retained, readable log.

    ``read`` semantics, which every backend honours:

    - ``start=None`` reads from the earliest retained message.
    - ``start=LogPosition(epoch, None)`` reads from the first message of that epoch, and raises
      :class:`~durable_ai.errors.LogReset` when the log's epoch differs (and, if the backend can tell, when any
      of its messages were dropped: the core also checks that the first message opens the log).
    - ``start=LogPosition(epoch, position)`` reads from the message at ``position``, **inclusive**, and raises
      ``LogReset`` when the epoch differs or that message no longer exists.
    - With ``follow=False`` reading stops at the last message that existed when ``read`` was called; with
      ``follow=True`` it goes on with the live tail until the iterator is closed. A live reader that the log
      outruns (retention) or that sees the log recreated gets ``LogReset``; one whose connection is lost gets
      :class:`~durable_ai.errors.BackendUnavailable`, and the caller reads again from its last position.
    - A slow reader never slows ``publish``.

    ``publish`` is idempotent on ``message_id``: a second publish with an id seen inside the backend's dedupe
    window stores nothing and returns the first message's position.
    """

    @property
    def limits(self) -> BackendLimits: ...

    async def open(self) -> None:
        """Connect. Called once by the hub before any other method."""

    async def close(self) -> None:
        """Disconnect and release every resource; open readers end."""

    async def publish(self, channel: Channel, data: bytes, *, message_id: str) -> LogPosition:
        """Append one message to the channel's log and return where it landed, once the broker has it."""
        ...

    def read(self, channel: Channel, *, start: LogPosition | None, follow: bool) -> AsyncIterator[StoredMessage]:
        """Read the channel's log from ``start`` (see the class docstring for the exact semantics)."""
        ...

    async def head(self, channel: Channel) -> LogPosition | None:
        """The position of the newest message, or ``None`` if the log is empty."""
        ...

    async def delete(self, session: str) -> None:
        """Drop both logs, the snapshot and presence of a session. A later write starts a new epoch."""

    async def load_snapshot(self, session: str) -> bytes | None:
        """The latest snapshot saved for the session, if any."""
        ...

    async def save_snapshot(self, session: str, data: bytes) -> None:
        """Store the session's snapshot, replacing the previous one."""

    async def enter_presence(self, session: str, member_id: str, data: bytes, *, role: PresenceRole) -> None:
        """Mark a member present on the session, or update its data.

        ``role="agent"`` is for trusted writers (agent runs); a backend holding a client credential must refuse it
        (:class:`~durable_ai.errors.PermissionDenied`) rather than enter the member as a client.
        """

    async def leave_presence(self, session: str, member_id: str, *, role: PresenceRole) -> None:
        """Remove a member (entered with this role) from the session's presence set."""

    async def presence(self, session: str) -> list[PresenceEntry]:
        """The members present on the session now. Entries that do not decode are skipped, never raised."""
        ...


@runtime_checkable
class ReadsSince(Protocol):
    """An optional capability: a start for reading one log that follows a message just stored in another.

    A control's sender waits for the agent's answer in the events log; it must read from a point no later than
    where the answer can land, and ``head()`` may cost requests (on Ably, history scans). A backend whose positions
    carry a time implements this from the control's own position instead; without it, the sender reads the
    events head before it publishes.
    """

    async def since(self, channel: Channel, published: LogPosition) -> LogPosition:
        """A position to ``read`` ``channel`` from (it need not name a message there; ``read`` must accept it and
        never raise ``LogReset`` for it merely because no message is at it) that yields every message stored in
        ``channel`` after ``published`` (a message of the same session's other log) was stored, and maybe a few
        stored shortly before."""
        ...


@runtime_checkable
class OpensLogs(Protocol):
    """An optional capability: a log's first message and its opening record in one request.

    A writer puts an opening record (``log-start``) before the first message it publishes to an empty log. Without
    this capability it asks for the log's end first (:meth:`Backend.head`), then publishes: two requests for every
    new session. A backend that can publish on the condition that a log is empty implements this instead.
    """

    async def publish_opening(self, channel: Channel, opening: bytes, data: bytes, *, message_id: str) -> LogPosition:
        """Store ``opening + b"\\n" + data`` if ``channel``'s log is empty, else ``data`` alone: one message under
        ``message_id``, deduplicated as :meth:`Backend.publish` is (a retry of a message that was stored already
        returns where it is, whichever of the two it was)."""
        ...


Landed: TypeAlias = "Callable[[LogPosition | BaseException | None], Outgoing | None]"
"""Told where a message sent with :meth:`PublishesAhead.send` landed (``None``: it landed, and its
:class:`Outgoing` did not ask where), or why it did not; may answer with the next message of the same channel to
send."""


@dataclass(slots=True)
class Outgoing:
    """A message to send with :meth:`PublishesAhead.send`, and who to tell where it landed (not frozen only
    because a frozen dataclass is slower to create, once per message; nothing changes it)."""

    channel: Channel
    data: bytes
    message_id: str
    landed: Landed
    #: ``False``: ``landed`` only needs to know that the message landed, and may be given ``None`` for its position
    #: (a writer that keeps nothing of a message's position spares the backend making one per message).
    wants_position: bool = True


@runtime_checkable
class PublishesAhead(Protocol):
    """An optional capability: publishing without a task waiting for each acknowledgement.

    :meth:`Backend.publish` returns once the broker has the message, so a writer that keeps one message in flight
    per session wakes once per message. A backend with this capability sends the message and returns at once; when
    the broker answers it calls ``landed`` from its own reader (no task, future or timer per message), and sends
    the ``Outgoing`` that ``landed`` returns, if any: the next message of that session, so a stream of messages
    goes out one acknowledgement after another without waking the writer. Anything unusual (a timeout, a refusal,
    a duplicate, a log that was recreated) is reported to ``landed`` as an exception, and the writer publishes the
    same message again through :meth:`Backend.publish` under the same id, which handles it in full.
    """

    async def send(self, outgoing: Outgoing) -> bool:
        """Send ``outgoing``; ``True`` if it went out (``landed`` is then called exactly once, later), ``False`` if
        it did not (nothing is called: use :meth:`Backend.publish`)."""
        ...


@runtime_checkable
class IssuesClientCredentials(Protocol):
    """An optional capability: a credential with which a browser or app client uses one session on the broker
    itself (read its events, send it controls, nothing else), so a web server hands it out instead of relaying
    the session's events. Issuing one is local (signing): it makes no request to the broker."""

    def client_credential(self, session_id: str, client_id: str) -> dict[str, Any]:
        """The JSON a client of ``session_id`` connects with, as ``client_id`` (e.g. an Ably TokenRequest)."""
        ...
