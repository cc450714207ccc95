"""An offline emulator of the part of Ably's realtime (WebSocket) and REST protocols that ably-python 3.x uses.

It binds 127.0.0.1 on a free port and speaks protocol versions 2 to 6 in JSON or msgpack (ably-python 3.x asks for
5, ably-js 2.20 and later for 6, whose changes are all in LiveObjects, not emulated). Point a client at it with
`AblyEmulator.client_options()`: ably-python builds its WebSocket address as ``ws://{host}?...`` and ignores the
`port` option there, while its REST address is ``http://{host}:{port}{path}``; the endpoint ``127.0.0.1:PORT/`` serves
both (the REST base becomes ``http://127.0.0.1:PORT/:80`` and every REST path is absolute, so it replaces ``/:80``).
ably-python refuses basic (API key) auth over plain HTTP, so the options ask for token auth: the client signs a token
request with the key and posts it to ``/keys/{keyName}/requestToken``, which the emulator verifies and answers.

Auth as Ably does it: a signed TokenRequest needs the right mac, a timestamp within 2 minutes, a nonce of 16
characters or more not used before; its token gets the requested capability narrowed to the key's. Ably JWTs (HS256,
``kid`` the key's name, claims ``iat``, ``exp``, ``x-ably-capability`` and optionally ``x-ably-clientId``) are
accepted wherever tokens are: the ``access_token`` (ably-js) or ``accessToken`` (ably-python) query parameter of a
realtime connection, AUTH, and ``Authorization: Bearer`` (the token or its base64) over REST. They are checked
against the named key's secret and expiry, and get their capability narrowed to the key's and their clientId. JWTs
that embed an Ably token (``x-ably-token``) are not emulated.

What it does: API keys with capabilities, token requests and tokens (capability = key ∩ requested), CONNECTED with
connection details and resume of a known connection key, HEARTBEAT, ATTACH/ATTACHED with ``params.rewind`` and
channel-serial resume, DETACH, MESSAGE publish with ACK (``res`` serials) or NACK, delivery to every attached
connection, AUTH, CLOSE/CLOSED, server DISCONNECTED, idempotent publishing by message id, REST publish, history with
``Link`` pagination, batch publish (``POST /messages``, one ``BatchResult`` per spec), time and token requests,
capability checks everywhere. As on Ably, several messages published together either have no ids or ids
``<base>:<index>`` sharing one base (40031 otherwise). Fault hooks: `drop_connections`,
`disconnect_connections`, `fail_next_rest`, `nack_next`.

Presence: PRESENCE (enter/update/leave, ACKed, broadcast to every attached connection with ``subscribe``; entering
needs the ``presence`` capability and a clientId), the presence set in SYNC messages after an ATTACHED with the
HAS_PRESENCE flag (``channelSerial`` ``<syncId>:<cursor>``, the last with an empty cursor), ``GET
/channels/{name}/presence`` with ``Link`` pagination, and synthesized leaves when a connection closes, detaches or
drops (after ``presence_leave_delay`` seconds, default 0; Ably waits about 15 s for a resume).

Mutable messages, on channels whose namespace is in ``mutable_namespaces``: a MESSAGE (or ``PATCH
/channels/{name}/messages/{serial}``) whose message has ``action`` 1 (update), 2 (delete) or 5 (append) and the
``serial`` of a stored message changes it and gets the new version serial back (ACK ``res`` serials, or
``{"versionSerial"}``). Subscribers get the operation as a message with the original ``serial`` and a new
``version.serial``; an append carries only the appended fragment, while history and ``GET
/channels/{name}/messages/{serial}`` give the aggregate (action 1, update). Resumed attachments replay the operations
they missed. Elsewhere operations fail with 93002 (400), as on Ably without the "Message annotations, updates,
deletes and appends" channel rule; they need ``message-update-own``/``-any`` (``message-delete-...`` for deletes).

Statistics (not an Ably API; for tests and benchmarks): `channel_stats` counts the messages each channel stored, by
kind (creates, and update, delete and append operations, which Ably bills and rate-limits like messages), with the
peak over any 1-second sliding window; `connection_stats` does the same for the messages each realtime connection
published (its inbound rate). With ``enforce_rate_limits=True`` publishes beyond Ably's default limits (50 messages
per second per channel, 50 inbound per connection) are refused with 42913 or 42911 (429), as Ably refuses them.

Not emulated: presence history, annotations, message version history (``.../versions``), deltas, channel globs other
than ``*`` and a trailing ``*``, connection recovery (``recover``), Ably's stats API, push, batch presence.
"""

from __future__ import annotations

from durable_ai_ably.testing.emulator.auth import EmulatorKey
from durable_ai_ably.testing.emulator.meters import MessageStats
from durable_ai_ably.testing.emulator.server import AblyEmulator
from durable_ai_ably.testing.emulator.store import StoredMessage

__all__ = ["AblyEmulator", "EmulatorKey", "MessageStats", "StoredMessage"]
