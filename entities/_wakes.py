"""Building a wake from the events of its range: the :class:`WakeEvent` a handler gets, the run
record a wake commits, wake ids and offset arithmetic (shared by the worker and replay)."""

from __future__ import annotations

import math
from typing import Any

from ._records import Inflight
from ._urls import EntityURL
from ._wake import InboxMessage, WakeEvent

__all__ = ["copy_view", "events_between", "run_value", "wake_event", "wake_id"]


def copy_view(view: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in view.items()}


def _position(offset: str) -> int:
    return 0 if offset == "-1" else int(offset.rsplit("_", 1)[1])


def events_between(low: str, high: str) -> int:
    return _position(high) - _position(low)


def wake_id(low: str, high: str) -> str:
    return f"w{_position(low)}-{_position(high)}"


def wake_event(
    url: EntityURL,
    inflight: Inflight,
    events: list[dict[str, Any]],
    wake_events: list[dict[str, Any]],
    *,
    first_wake: bool,
) -> WakeEvent:
    messages = []
    others = []
    for item in wake_events:
        value = item.get("value") or {}
        if item["type"] == "inbox":
            messages.append(
                InboxMessage(
                    key=item["key"],
                    payload=value.get("payload"),
                    sender=value.get("from"),
                    message_type=value.get("message_type"),
                    timestamp=float(value.get("ts") or 0.0),
                    offset=item.get("offset", ""),
                )
            )
        elif item["type"] == "entity_created":
            others.append({"kind": "created", "source": value.get("parent_url"), **value})
        else:
            others.append(value)
    last = wake_events[-1]
    last_value = last.get("value") or {}
    if last["type"] == "inbox":
        payload = last_value.get("payload")
        source = last_value.get("from")
        summary = last_value.get("message_type") or "message"
    elif last["type"] == "entity_created":
        payload = last_value.get("args")
        source = last_value.get("parent_url")
        summary = "created"
    else:
        payload = last_value.get("payload", last_value)
        source = last_value.get("source")
        summary = last_value.get("kind", "wake")
    return WakeEvent(
        source=source,
        type="message_received" if messages else "wake",
        from_offset=inflight.from_offset,
        to_offset=inflight.to_offset,
        event_count=len(wake_events),
        payload=payload,
        summary=summary,
        full_ref=f"{url.stream}?offset={inflight.from_offset}",
        first_wake=first_wake,
        messages=tuple(messages),
        wakes=tuple(others),
        wake_id=inflight.wake_id,
        attempt=inflight.attempt,
    )


def run_value(
    inflight: Inflight,
    wake: WakeEvent,
    status: str,
    duration: float,
    *,
    error: BaseException | None = None,
) -> dict[str, Any]:
    return {
        "status": status,
        "wake_id": inflight.wake_id,
        "attempt": inflight.attempt,
        "from_offset": inflight.from_offset,
        "to_offset": inflight.to_offset,
        "event_count": wake.event_count,
        "duration_ms": round(duration * 1000, 3) if math.isfinite(duration) else None,
        "error": None if error is None else f"{type(error).__name__}: {error}",
    }
