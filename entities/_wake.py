"""What a handler is woken with: the WakeEvent and the inbox messages it covers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["InboxMessage", "WakeEvent"]


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """One message delivered to an entity."""

    key: str
    payload: Any
    sender: str | None = None
    message_type: str | None = None
    timestamp: float = 0.0
    offset: str = ""
    # files the message carries by reference: {type, name, mime, url | stream} (see
    # entities._attachments)
    attachments: tuple[dict[str, Any], ...] = ()

    @property
    def text(self) -> str | None:
        """The ``text`` field of a ``{"text": ...}`` payload, else ``None``."""
        if isinstance(self.payload, dict):
            value = self.payload.get("text")
            return value if isinstance(value, str) else None
        return self.payload if isinstance(self.payload, str) else None


@dataclass(frozen=True, slots=True)
class WakeEvent:
    """Why the handler runs: the coalesced events in ``(from_offset, to_offset]``.

    ``type`` is ``"message_received"`` when the wake holds inbox messages, else ``"wake"``
    (child finished, observed change, schedule...). ``payload`` is the last event's payload;
    ``messages`` lists every inbox message of the wake in order, ``wakes`` every other event.
    ``full_ref`` names the stream and range where the raw events live.
    """

    source: str | None
    type: Literal["message_received", "wake"]
    from_offset: str
    to_offset: str
    event_count: int
    payload: Any
    summary: str
    full_ref: str
    first_wake: bool = False
    messages: tuple[InboxMessage, ...] = ()
    wakes: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    wake_id: str = ""
    attempt: int = 1
