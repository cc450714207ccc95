"""Ably's wire vocabulary as the emulator speaks it: protocol message actions, flags, errors and data encoding."""

from __future__ import annotations

import base64
import binascii
import contextlib
import time
from typing import Any

# Protocol message actions (ably/transport/websockettransport.py ProtocolMessageAction).
HEARTBEAT, ACK, NACK, CONNECT, CONNECTED, DISCONNECT, DISCONNECTED = 0, 1, 2, 3, 4, 5, 6
CLOSE, CLOSED, ERROR, ATTACH, ATTACHED, DETACH, DETACHED, PRESENCE, MESSAGE = 7, 8, 9, 10, 11, 12, 13, 14, 15
SYNC, AUTH = 16, 17
#: actions of features the emulator does not have (annotations, objects): NACKed
UNSUPPORTED_ACTIONS = (19, 21)

# Message actions (ably/types/message.py MessageAction) and presence actions (ably/types/presence.py PresenceAction).
MESSAGE_CREATE, MESSAGE_UPDATE, MESSAGE_DELETE, MESSAGE_APPEND = 0, 1, 2, 5
PRESENCE_ABSENT, PRESENCE_PRESENT, PRESENCE_ENTER, PRESENCE_LEAVE, PRESENCE_UPDATE = 0, 1, 2, 3, 4

#: the names statistics use for message actions
ACTION_NAMES = {MESSAGE_CREATE: "create", MESSAGE_UPDATE: "update", MESSAGE_DELETE: "delete", MESSAGE_APPEND: "append"}

# Channel flags (ably/types/flags.py).
FLAG_HAS_PRESENCE = 1 << 0
FLAG_HAS_BACKLOG = 1 << 1
FLAG_RESUMED = 1 << 2
FLAG_PRESENCE = 1 << 16
FLAG_PUBLISH = 1 << 17
FLAG_SUBSCRIBE = 1 << 18
FLAG_PRESENCE_SUBSCRIBE = 1 << 19

#: presence members per SYNC message
SYNC_PAGE = 100

# The `v` a realtime connection may ask for (none: the latest). ably-python 3.x sends 5, ably-js 2.20 and later 6;
# what 6 changed from 5 is all LiveObjects (object messages and their sync), which the emulator does not emulate.
PROTOCOL_VERSIONS = (None, "2", "3", "4", "5", "6")


class AblyError(Exception):
    """An error the way Ably reports it: an HTTP status, a 5-digit code and a message."""

    def __init__(self, message: str, code: int, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "code": self.code, "statusCode": self.status, "href": href(self.code)}


def href(code: int) -> str:
    """The help page Ably links an error code to."""
    return f"https://help.ably.io/error/{code}"


def now_ms() -> int:
    return int(time.time() * 1000)


def wire_data(data: Any, encoding: str | None, binary: bool) -> tuple[Any, str | None]:
    """Data and encoding as sent to a JSON (``binary=False``) or msgpack client: bytes travel base64 in JSON."""
    if isinstance(data, bytes | bytearray) and not binary:
        return base64.b64encode(data).decode("ascii"), f"{encoding}/base64" if encoding else "base64"
    if binary and isinstance(data, str) and encoding and encoding.split("/")[-1] == "base64":
        with contextlib.suppress(binascii.Error, ValueError):
            return base64.b64decode(data), "/".join(encoding.split("/")[:-1]) or None
    return data, encoding
