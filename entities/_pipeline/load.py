"""Stage 4, loading a wake: the events of its range and the view folded up to its end.

A wake covers the events of its entity's stream after the acknowledged offset, up to the offset
its claim recorded. The handler sees the entity's *view* (its folded collections: creation,
manifest, tags, context and user state) as of the end of that range, built with the
``streams`` :class:`~streams.Materializer` from the nearest starting point: the worker's cached
view, else the entity's stored snapshot, else the stream's start. So waking a long-lived entity
costs the events since its last snapshot, not its whole history.

Also here: the :class:`~entities.WakeEvent` a handler gets (built from the range's wake events),
the journal an earlier attempt recorded, wake ids and offset arithmetic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import orjson

from streams import Materializer, Message, OffsetGone, ReadResult, Store

from .._approvals import resumed_messages
from .._records import SNAPSHOT_NS, VIEW_TYPES, Inflight
from .._urls import EntityURL
from .._wake import InboxMessage, WakeEvent

__all__ = [
    "Loaded",
    "View",
    "copy_view",
    "events_between",
    "load_range",
    "messages_between",
    "read_journal",
    "read_snapshot",
    "snapshot",
    "view_fold",
    "wake_event",
    "wake_id",
]

View = dict[str, dict[str, Any]]  # collection (event type) -> key -> row


def view_fold(view: View | None = None, offset: str = "-1") -> Materializer:
    """A fold of an entity's view (its creation, manifest, tags, context and user state; the
    rest of the stream is timeline, read on demand), starting from ``view`` at ``offset``."""
    return Materializer(view, offset, types=VIEW_TYPES, prefixes=("state:",))


def copy_view(view: View) -> View:
    """A copy a wake may change without touching ``view`` (rows themselves are replaced,
    never mutated, by writes)."""
    return {k: dict(v) for k, v in view.items()}


def _position(offset: str) -> int:
    return 0 if offset == "-1" else int(offset.rsplit("_", 1)[1])


def events_between(low: str, high: str) -> int:
    """How many events lie in ``(low, high]``."""
    return _position(high) - _position(low)


def wake_id(low: str, high: str) -> str:
    """The id of the wake covering ``(low, high]`` (stable across its attempts)."""
    return f"w{_position(low)}-{_position(high)}"


def snapshot(view: View, offset: str) -> bytes:
    """An entity snapshot: ``view`` as folded up to ``offset`` (versioned like any
    :meth:`~streams.Materializer.snapshot`)."""
    return Materializer(view, offset).snapshot()


def read_snapshot(data: bytes) -> tuple[str, View]:
    """The offset and view of a stored entity snapshot. Snapshots written before they carried
    a version (``{"offset", "collections"}``) read the same.

    Raises:
        InvalidRequest: a snapshot of an unknown version.
    """
    raw = orjson.loads(data)
    if "v" not in raw:
        return raw["offset"], raw["collections"]
    saved = Materializer.from_snapshot(data)
    return saved.offset, saved.collections


def wake_event(
    url: EntityURL,
    inflight: Inflight,
    events: list[dict[str, Any]],
    wake_events: list[dict[str, Any]],
    *,
    first_wake: bool,
) -> WakeEvent:
    """The :class:`WakeEvent` of a wake whose range holds ``wake_events`` (a non-empty list
    of inbox, ``wakes`` and ``entity_created`` events, in order)."""
    messages: dict[str, InboxMessage] = {}  # by key: a message edited or cancelled while
    others = []  # queued is folded here (see ``entities._inbox``)
    for item in wake_events:
        value = item.get("value") or {}
        if item["type"] == "inbox":
            operation = item.get("headers", {}).get("operation")
            if operation == "delete" or (operation == "update" and value.get("steered_into")):
                messages.pop(item["key"], None)  # cancelled, or taken by a run it steered
                continue
            if operation == "update" and item["key"] in messages:
                earlier = messages[item["key"]]
                messages[item["key"]] = replace(
                    earlier,
                    payload=value.get("payload"),
                    message_type=value.get("message_type", earlier.message_type),
                )
                continue
            messages[item["key"]] = InboxMessage(
                key=item["key"],
                payload=value.get("payload"),
                sender=value.get("from"),
                message_type=value.get("message_type"),
                timestamp=float(value.get("ts") or 0.0),
                offset=item.get("offset", ""),
                attachments=tuple(value.get("attachments") or ()),
            )
        elif item["type"] == "entity_created":
            others.append({"kind": "created", "source": value.get("parent_url"), **value})
        else:
            if value.get("kind") == "approval":  # a suspended run resumes: its messages again
                for message in resumed_messages([value]):
                    messages.setdefault(message.key, message)
            others.append(value)
    source, payload, summary = _last(wake_events[-1])
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
        messages=tuple(messages.values()),
        wakes=tuple(others),
        wake_id=inflight.wake_id,
        attempt=inflight.attempt,
    )


def _last(item: dict[str, Any]) -> tuple[Any, Any, str]:
    """The ``source``, ``payload`` and ``summary`` a wake shows: those of its last event."""
    value = item.get("value") or {}
    if item["type"] == "inbox":
        return value.get("from"), value.get("payload"), value.get("message_type") or "message"
    if item["type"] == "entity_created":
        return value.get("parent_url"), value.get("args"), "created"
    return value.get("source"), value.get("payload", value), value.get("kind", "wake")


@dataclass(slots=True)
class Loaded:
    """A wake range as loaded: the view at its end, the offset that view was folded from, the
    events after the acknowledged offset, and the offset the range ends at."""

    view: View
    base_offset: str
    events: list[dict[str, Any]]
    to_offset: str


async def _start(
    store: Store, url: EntityURL, acked: str, cached: tuple[str, View] | None
) -> Materializer:
    """Where the fold of a range starts: the cached view, else the stored snapshot, else the
    stream's start; never beyond ``acked`` (the stream is append-only, so any earlier fold stays
    valid)."""
    if cached is not None and acked != "-1" and cached[0] <= acked:
        return view_fold(copy_view(cached[1]), cached[0])
    saved = await store.kv_get(SNAPSHOT_NS, url.url)
    if saved is not None and acked != "-1":
        offset, view = read_snapshot(saved)
        if offset <= acked:
            return view_fold(view, offset)
    return view_fold()


async def load_range(
    store: Store,
    url: EntityURL,
    acked: str,
    to_offset: str | None,
    cached: tuple[str, View] | None = None,
    known: list[Message] | None = None,
) -> Loaded:
    """The view at the end of the wake range and the events after ``acked``.

    The range ends at ``to_offset`` or, when that is ``None``, at the current tail (with
    ``known``, the messages after ``cached``'s offset as far as the caller knows them, without
    a gap: at the last of them, without reading the stream). The fold
    starts from ``cached`` (an offset and the view folded up to it), else the stored snapshot,
    else the stream start. A start that compaction cut away (``OffsetGone``: the prefix before
    an old snapshot was truncated) falls back to the stored snapshot, which is never before the
    cut. Raises whatever the store raises (``StreamNotFound``, ...).
    """
    try:
        start = await _start(store, url, acked, cached)
        if known is not None and (cached is None or start.offset != cached[0]):
            known = None  # the fold does not start where they follow on
        return await _load(store, url, acked, to_offset, start, known)
    except OffsetGone:
        if cached is None:
            raise
    return await _load(store, url, acked, to_offset, await _start(store, url, acked, None))


async def _load(
    store: Store,
    url: EntityURL,
    acked: str,
    to_offset: str | None,
    view: Materializer,
    known: list[Message] | None = None,
) -> Loaded:
    base_offset = offset = view.offset
    apply, loads = view.apply, orjson.loads
    events: list[dict[str, Any]] = []
    while True:
        if known is not None:  # as a read that reached the tail then would have found them
            result = ReadResult(known, known[-1].offset if known else offset, True, False)
            known = None
        else:
            result = await store.read(url.stream, offset, limit=1000, renew_ttl=False)
        for message in result.messages:
            if to_offset is not None and message.offset > to_offset:
                return Loaded(view.collections, base_offset, events, offset)
            item = loads(message.data)
            apply(item)
            if acked == "-1" or message.offset > acked:
                item["offset"] = message.offset
                events.append(item)
            offset = message.offset
        if not result.messages or result.up_to_date:
            end = offset if result.messages else result.next_offset
            if to_offset is not None and end < to_offset:
                end = to_offset
            return Loaded(view.collections, base_offset, events, end)
        if to_offset is not None and offset >= to_offset:
            return Loaded(view.collections, base_offset, events, offset)


async def messages_between(
    store: Store, stream: str, after: str, upto: str | None = None, *, page: int = 1000
) -> AsyncIterator[Message]:
    """The messages of ``stream`` after offset ``after`` up to ``upto`` (included; ``None``:
    the tail), read ``page`` at a time. Raises whatever the store raises."""
    offset = after
    while upto is None or offset < upto:  # "-1" sorts before every offset
        result = await store.read(stream, offset, limit=page, renew_ttl=False)
        for message in result.messages:
            if upto is not None and message.offset > upto:
                return
            yield message
        if result.up_to_date or not result.messages:
            return
        offset = result.next_offset


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
