"""An offline emulator of the part of Ably's realtime (WebSocket) and REST protocols that ably-python and ably-js use.

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
``Link`` pagination, batch publish (``POST /messages``, one ``BatchResult`` per spec, at most 100 channels: 90010),
time and token requests, capability checks everywhere. As on Ably, several messages published together either have
no ids or ids ``<base>:<index>`` sharing one base (40031 otherwise). Fault hooks: `drop_connections`,
`disconnect_connections`, `refuse_connections`, `fail_next_rest`, `nack_next`.

Serials as Ably forms them (``01826232498871-001@abcdefghij:001``): ``<14-digit ms>-<counter>@<server>:<index>``,
counted per channel. The 3-digit counter numbers the publishes of a millisecond on that channel, the index the
messages of one publish; the version serials of updates, deletes and appends take their place in the same sequence.
A channel's serials (and its ATTACHED ``channelSerial``, which an attachment resumes from) increase as strings; the
1001st publish in one millisecond takes the next millisecond, and a publish of more than 1000 messages a new counter
per 1000, so the order never breaks. Serials of two channels are not ordered with each other, as on Ably.

History (``GET /channels/{name}/messages``) takes Ably's parameters: ``start`` and ``end`` (ms, inclusive),
``direction`` (``backwards`` by default), ``limit`` (100 by default, at most 1000), and ``from_serial``, which ably-js
sends for ``history({untilAttach: true})`` with the channel's attach serial: the history then ends at the attachment.
Ably documents untilAttach for backwards only; forwards with ``from_serial`` is 40003 (400). The camelCase
``fromSerial`` is not an Ably parameter and is ignored (``honour_from_serial=True``: read it as the serial to page
from, inclusive, in either direction, as earlier versions of the emulator did).

Tokens expire on live connections: when the token or JWT of a realtime connection expires, the emulator sends
DISCONNECTED with 40142 and closes the transport (a timer per connection, cancelled when it closes); the client
renews its token and resumes the same connection, its attachments by channelSerial. An AUTH message
(``auth.accessToken``, a token or JWT) replaces the connection's credential, its capability and expiry, and is
answered with CONNECTED; a token of another clientId fails it with 40102. An expired token is refused with 40142
when a connection opens (ERROR) and over REST (401).

A connection may be attached to at most ``max_channels_per_connection`` channels (200, Ably's limit on every
package); an ATTACH beyond it is answered with a channel ERROR 90010 (400, "Maximum number of channels per connection
(200) exceeded") and a DETACH frees a slot. REST has no such limit.

CORS, for browser apps: ``OPTIONS`` on any path is a preflight answered 204 with ``Access-Control-Allow-Methods``,
``-Allow-Headers`` (authorization, content-type, accept, x-ably-version, x-ably-lib, ably-agent, x-ably-clientid and
whatever the browser asks for) and ``-Max-Age``; every HTTP response carries ``Access-Control-Allow-Origin`` (the
request's ``Origin``, with ``Access-Control-Allow-Credentials`` since ably-js sends credentialed requests when it has
an ``Authorization`` header, or ``*`` without an Origin) and ``Access-Control-Expose-Headers`` (``Link``, which
ably-js pages with, and ``X-Ably-Errorcode``/``-Errormessage``).

Presence: PRESENCE (enter/update/leave, ACKed, broadcast to every attached connection with ``subscribe``; entering
needs the ``presence`` capability and a clientId), the presence set in SYNC messages after an ATTACHED with the
HAS_PRESENCE flag (``channelSerial`` ``<syncId>:<cursor>``, the last with an empty cursor), ``GET
/channels/{name}/presence`` with ``Link`` pagination, and synthesized leaves when a connection closes, detaches or
drops (after ``presence_leave_delay`` seconds, default 15, as Ably waits for a resume).

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
published (its inbound rate).

Switches (constructor options) where the emulator can differ from Ably, each defaulting to what Ably does:
``presence_leave_delay`` (15 s: a dropped connection's members leave after Ably's wait for a resume; 0 in tests
that want them gone at once), ``enforce_rate_limits`` (True: 50 messages per second per channel,
``channel_rate_limit``, and 50 inbound per connection, ``connection_rate_limit``, refused with 42913 or 42911, 429),
``honour_from_serial`` (False), ``max_channels_per_connection`` (200), ``retention_seconds`` (24 hours, as on a
namespace with "Persist all messages" on Ably's free plan; Ably keeps 2 minutes without it) and ``retention_limit``
(None: no count limit, as on Ably; a number bounds the memory a long test uses), ``idempotency_window`` (120 s),
``max_message_size`` (65536), ``connection_state_ttl_ms`` (120,000) and ``max_idle_interval_ms`` (15,000),
``mutable_namespaces`` (none, as an app without the channel rule).

Simplifications that remain: Ably's server-initiated AUTH (RTN22) is never sent, tokens simply expire; an AUTH that
narrows the capability does not detach channels it no longer allows (their operations are refused instead);
``from_serial`` older than retention is answered, not refused with 90008; messages per protocol message and the
``maxInboundRate`` in connection details are not enforced or configurable; connection keys are not bound to the
client's IP; server ids and ``@<server>`` are one per emulator, not one per channel's host.

Not emulated: presence history, annotations, message version history (``.../versions``), deltas, channel globs other
than ``*`` and a trailing ``*``, connection recovery (``recover``), Ably's stats API, push, batch presence, LiveObjects,
JWTs that embed an Ably token (``x-ably-token``), the JSONP, HTML and envelope response formats.
"""

from __future__ import annotations

from durable_ai_ably.testing.emulator.auth import EmulatorKey
from durable_ai_ably.testing.emulator.meters import MessageStats
from durable_ai_ably.testing.emulator.server import AblyEmulator
from durable_ai_ably.testing.emulator.store import StoredMessage

__all__ = ["AblyEmulator", "EmulatorKey", "MessageStats", "StoredMessage"]
