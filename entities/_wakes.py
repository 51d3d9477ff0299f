"""Building a wake from the events of its range: loading the range (and the view folded up to
its end), the :class:`WakeEvent` a handler gets, the run record a wake commits, the journal of
an earlier attempt, wake ids and offset arithmetic (shared by the worker and replay)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from streams import Store

from ._records import SNAPSHOT_NS, VIEW_TYPES, Inflight
from ._urls import EntityURL
from ._wake import InboxMessage, WakeEvent

__all__ = [
    "Loaded",
    "copy_view",
    "events_between",
    "load_range",
    "read_journal",
    "run_value",
    "wake_event",
    "wake_id",
]


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


@dataclass(slots=True)
class Loaded:
    """A wake range as loaded: the view at its end, the offset that view was folded from, the
    events after the acknowledged offset, and the offset the range ends at."""

    view: dict[str, dict[str, Any]]
    base_offset: str
    events: list[dict[str, Any]]
    to_offset: str


async def load_range(
    store: Store,
    url: EntityURL,
    acked: str,
    to_offset: str | None,
    cached: tuple[str, dict[str, dict[str, Any]]] | None = None,
) -> Loaded:
    """The view at the end of the wake range and the events after ``acked``.

    The range ends at ``to_offset`` or, when that is ``None``, at the current tail. The view
    starts from ``cached`` (an offset and the view folded up to it), else the stored snapshot,
    else the stream start, and never from beyond ``acked`` (the stream is append-only, so any
    earlier fold stays valid). Raises whatever the store raises (``StreamNotFound``, ...).
    """
    view: dict[str, dict[str, Any]] = {}
    offset = "-1"
    if cached is not None and acked != "-1" and cached[0] <= acked:
        offset, view = cached[0], copy_view(cached[1])
    else:
        saved = await store.kv_get(SNAPSHOT_NS, url.url)
        if saved is not None:
            snap = orjson.loads(saved)
            if acked != "-1" and snap["offset"] <= acked:
                view, offset = snap["collections"], snap["offset"]
    base_offset = offset
    events: list[dict[str, Any]] = []
    while True:
        result = await store.read(url.stream, offset, limit=1000, renew_ttl=False)
        for message in result.messages:
            if to_offset is not None and message.offset > to_offset:
                return Loaded(view, base_offset, events, offset)
            item = orjson.loads(message.data)
            type_ = item.get("type")
            if type_ in VIEW_TYPES or (type_ or "").startswith("state:"):
                table = view.setdefault(type_, {})
                if item["headers"]["operation"] == "delete":
                    table.pop(item["key"], None)
                else:
                    table[item["key"]] = item.get("value")
            if acked == "-1" or message.offset > acked:
                item["offset"] = message.offset
                events.append(item)
            offset = message.offset
        if not result.messages or result.up_to_date:
            end = offset if result.messages else result.next_offset
            if to_offset is not None and end < to_offset:
                end = to_offset
            return Loaded(view, base_offset, events, end)
        if to_offset is not None and offset >= to_offset:
            return Loaded(view, base_offset, events, offset)


async def read_journal(store: Store, stream: str, inflight: Inflight) -> dict[str, Any]:
    """The steps an earlier attempt of the wake ``inflight`` recorded (name -> result), read
    from the end of its range on. Raises whatever the store raises."""
    journal: dict[str, Any] = {}
    offset = inflight.to_offset
    while True:
        result = await store.read(stream, offset, limit=2000, renew_ttl=False)
        for message in result.messages:
            item = orjson.loads(message.data)
            value = item.get("value") or {}
            if item.get("type") == "steps" and value.get("wake_id") == inflight.wake_id:
                journal[value["name"]] = value.get("result")
        offset = result.next_offset
        if result.up_to_date or not result.messages:
            return journal
