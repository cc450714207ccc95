"""Who is on a session: agent runs that are working and clients that are watching."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, JsonValue

__all__ = ["PresenceMember"]


class PresenceMember(BaseModel):
    """A participant present on a session: an agent run that is working, or a client that is watching."""

    member_id: str
    role: Literal["agent", "client"]
    agent: str | None = None
    run_id: str | None = None
    data: JsonValue = None
    since: int = 0
