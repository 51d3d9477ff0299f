"""Reads whose cost follows an entity's recent work, not its history: its view from the stored
snapshot plus the events since, its recent runs and its recent timeline read backwards from the
tail (:meth:`streams.Store.read_before`).

An entity's stream only grows (until compaction trims its prefix), so anything a request or a
wake needs is found near its end: the view in the snapshot its wakes store every
``snapshot_every`` events, the last runs and messages in the last few hundred events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from streams import InvalidRequest, Materializer, Store

from ._host import Host
from ._pipeline.load import View, read_snapshot, view_fold
from ._records import SNAPSHOT_NS
from ._urls import EntityURL
from .agent import ChatMessage
from .agent._window import timeline

__all__ = ["TIMELINE_TYPES", "current_view", "recent_runs", "recent_timeline"]

TIMELINE_TYPES = ("inbox", "texts", "tool_calls")
_FIRST_CHUNK = 64
_MAX_CHUNK = 4096


async def current_view(store: Store, url: EntityURL) -> View:
    """The entity's view (creation, manifests, tags, context and user state) as of its tail:
    its stored snapshot, then the events after it (the whole stream only for an entity that
    has no snapshot yet). Raises whatever the store raises (``StreamNotFound``, ...)."""
    fold = view_fold()
    saved = await store.kv_get(SNAPSHOT_NS, url.url)
    if saved is not None:
        try:
            offset, view = read_snapshot(saved)
        except InvalidRequest:  # a snapshot of a newer release: fold from the start
            pass
        else:
            fold = view_fold(view, offset)
    offset = fold.offset
    while True:
        result = await store.read(url.stream, offset, limit=5000, renew_ttl=False)
        for message in result.messages:
            fold.apply_bytes(message.data)
        offset = result.next_offset
        if result.up_to_date or not result.messages:
            return fold.collections


async def recent_runs(store: Store, url: EntityURL, count: int = 20) -> list[dict[str, Any]]:
    """The ``runs`` rows of the entity's last ``count`` wakes, oldest first, read backwards
    from the tail until that many wakes are seen. Raises whatever the store raises."""
    found: list[dict[str, Any]] = []  # runs events, oldest first
    keys: set[str] = set()
    offset, size = "now", _FIRST_CHUNK
    while len(keys) < count:
        messages, begin = await store.read_before(url.stream, offset, limit=size)
        batch = [orjson.loads(m.data) for m in messages]
        runs = [e for e in batch if e.get("type") == "runs"]
        keys.update(str(e.get("key")) for e in runs)
        found[:0] = runs
        if begin == "-1" or not messages:
            break
        offset, size = begin, min(size * 2, _MAX_CHUNK)
    fold = Materializer(types=("runs",))
    for item in found:
        fold.apply(item)
    return list(fold.collection("runs").values())[-count:]


async def recent_timeline(
    host: Host,
    url: str,
    own: Sequence[dict[str, Any]],
    *,
    since: str | None = None,
    last: int | None = None,
) -> list[ChatMessage]:
    """The entity's timeline as model messages (see ``timeline``), ``own`` (this wake's
    buffered replies and tool calls) last; with ``last``, read backwards from the tail only
    until the last ``last`` messages are certain: a suffix that starts at an inbox message
    projects exactly as it would at the end of the whole timeline. With only ``since``, read
    from ``since`` on; with neither, the whole timeline is read. Raises what ``host.read``
    raises."""
    if last is not None and last <= 0:
        return []
    if last is None:
        events: list[dict[str, Any]] = []
        offset = "-1" if since is None else since
        while True:
            batch, offset = await host.read(url, offset, limit=1000)
            events.extend(e for e in batch if e["type"] in TIMELINE_TYPES)
            if len(batch) < 1000:
                break
        return timeline([*events, *own], since=since)
    kept: list[dict[str, Any]] = []
    offset, size = "now", _FIRST_CHUNK
    while True:
        batch, begin = await host.read_before(url, offset, limit=size)
        kept[:0] = [e for e in batch if e["type"] in TIMELINE_TYPES]
        if begin == "-1" or not batch or (since is not None and begin <= since):
            return timeline([*kept, *own], since=since, last=last)
        first = next((i for i, e in enumerate(kept) if e["type"] == "inbox"), None)
        if first is not None:
            suffix = [*kept[first:], *own]
            if len(timeline(suffix, since=since)) >= last:
                return timeline(suffix, since=since, last=last)
        offset, size = begin, min(size * 2, _MAX_CHUNK)
