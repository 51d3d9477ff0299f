"""Stage 6, delivery: what a wake's commit owes others, in the same transaction.

A child spawned with ``wake="run_finished"`` wakes its parent with ``finished_child`` when a run
of it ends; observers whose conditions match the committed changes get a ``wakes`` event (or
their debounce timer is armed); writes to shared-state dbs are appended to them, and tag changes
wake the observers of tag membership. All of it goes through the inbox (:mod:`.inbox`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from streams import Append, Create, KvCheck, KvPut, Op, Store

from .._effects import Effects, response_of
from .._events import JSON, encode, event, new_token
from .._observe import (
    OBSERVER_NS,
    change_summary,
    db_stream,
    generation_key,
    generation_ops,
    matches,
)
from .._records import ENTITY_NS, SCHEDULE_NS, TIMER_NS, EntityRecord
from .._timers import arm_ops, debounce_timer, schedule_key, timeout_timer
from .._urls import EntityURL, parse_url
from .inbox import wake_ops
from .load import View

__all__ = ["ObserverCache", "deliver", "observer_ops", "other_children", "parent_ops"]


class ObserverCache:
    """A worker's copy of the observers of the entities it runs, so that a wake's commit does
    not read them each time: each copy holds the generation row it was read with, and the
    commit that uses it checks (``KvCheck``) that the row is unchanged, so an observer added
    or removed meanwhile (by any process) fails the commit, which is then built again from a
    fresh read (:meth:`forget`). Bounded (least recently used first out); keyed by the
    entity's creation time too, so an entity spawned again after a purge starts afresh."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._rows: OrderedDict[str, tuple[float, bytes | None, list[bytes]]] = OrderedDict()

    async def rows(self, store: Store, url: str, born: float) -> tuple[list[bytes], KvCheck]:
        """The observer rows of ``url`` (the entity created at ``born``), and the check that
        they are current. Raises whatever the store raises."""
        cached = self._rows.get(url)
        if cached is None or cached[0] != born:
            cached = self._rows[url] = (born, *await _observers_of(store, url))
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)
        else:
            self._rows.move_to_end(url)
        return cached[2], KvCheck(OBSERVER_NS, generation_key(url), cached[1])

    def forget(self, url: str) -> None:
        """Read the observers of ``url`` afresh next time."""
        self._rows.pop(url, None)

    def forget_key(self, key: str) -> None:
        """:meth:`forget` the entity whose generation row is ``key``."""
        self._rows.pop(key.removesuffix("|"), None)


async def _observers_of(store: Store, url: str) -> tuple[bytes | None, list[bytes]]:
    """The generation row of ``url``'s observers (``None``: never written) and their rows,
    from one scan. Raises whatever the store raises."""
    generation, rows = None, []
    first = generation_key(url)
    for key, raw in await store.kv_scan(OBSERVER_NS, first):
        if key == first:
            generation = raw
        else:
            rows.append(raw)
    return generation, rows


async def parent_ops(
    store: Store,
    entity: EntityURL,
    record: EntityRecord,
    effects: Sequence[Effects],
    run_status: str,
    error: str | None,
    now: float,
) -> list[Op]:
    """Operations that wake the parent with ``finished_child`` (if the entity was spawned with
    ``wake="run_finished"`` and its parent still runs: not stopped, not purged, and not an
    entity spawned at the parent's URL after a purge, which is younger than the child).
    Raises whatever the store raises."""
    if record.parent is None or record.parent_wake != "run_finished":
        return []
    raw = await store.kv_get(ENTITY_NS, record.parent)
    if raw is None:
        return []
    parent = EntityRecord.load(raw)
    if parent.status == "stopped" or parent.created_at > record.created_at:
        return []
    inflight = record.inflight
    assert inflight is not None
    value = {
        "kind": "child_finished",
        "source": entity.url,
        "finished_child": _finished(entity, run_status, response_of(effects), error),
    }
    key = f"{entity.url}@{inflight.wake_id}"
    return wake_ops(parse_url(record.parent), [event("wakes", key, value, now)])


def _finished(
    entity: EntityURL, run_status: str, response: Any, error: str | None
) -> dict[str, Any]:
    return {
        "url": entity.url,
        "type": entity.type,
        "run_status": run_status,
        "response": response,
        "error": error,
    }


async def observer_ops(
    store: Store,
    entity: EntityURL,
    effects: Sequence[Effects],
    run_status: str | None,
    error: str | None,
    view: View,
    now: float,
    born: float = 0.0,
    cache: ObserverCache | None = None,
) -> list[Op]:
    """Observer-index updates, shared-db writes, and the wakes this commit owes observers.
    ``view`` is the entity's view before the wake (its tags are compared with the wake's tag
    changes); ``born``, the entity's creation time. With ``cache``, the entity's observers
    come from it, checked in the commit (see :class:`ObserverCache`). Raises whatever the
    store raises."""
    url = entity.url
    ops: list[Op] = []
    if cache is None:
        _generation, rows = await _observers_of(store, url)
    else:
        rows, current = await cache.rows(store, url, born)
        ops.append(current)  # checked before this commit writes generation rows of its own
    index = {k: v for e in effects for k, v in e.observers.items()}
    ops.extend(KvPut(OBSERVER_NS, k, v) for k, v in index.items())
    ops.extend(generation_ops(index))
    if cache is not None:
        for key in index:
            cache.forget(key.rpartition("|")[0])
    own = [change for e in effects for change in e.own]
    if rows:
        finished = None
        if run_status is not None:
            finished = _finished(entity, run_status, response_of(effects), error)
        changes = change_summary(own)
        for raw in rows:
            ops.extend(await deliver(store, orjson.loads(raw), url, changes, finished, now))
    for e in effects:
        for db_id, handle in e.shared.items():
            ops.extend(await _shared_ops(store, url, db_id, handle.events, db_id in e.new_dbs, now))
    tag_changes = [change for change in own if change["type"] == "tags"]
    if tag_changes:
        ops.extend(await _membership_ops(store, url, view, tag_changes, now))
    return ops


async def _shared_ops(
    store: Store,
    url: str,
    db_id: str,
    events: Sequence[Mapping[str, Any]],
    new: bool,
    now: float,
) -> list[Op]:
    """A wake's writes to shared db ``db_id`` (creating it when ``new``), and the wakes of its
    other observers."""
    stream = db_stream(db_id)
    encoded = [encode(e) for e in events]
    ops: list[Op] = []
    if new:
        ops.append(Create(stream, content_type=JSON, messages=encoded, exclusive=True))
    elif encoded:
        ops.append(Append(stream, encoded))
    if encoded:
        changes = change_summary(events)
        for _key, raw in await store.kv_scan(OBSERVER_NS, f"db:{db_id}|"):
            obs = orjson.loads(raw)
            if obs["observer"] != url:
                ops.extend(await deliver(store, obs, f"db:{db_id}", changes, None, now))
    return ops


async def _membership_ops(
    store: Store,
    url: str,
    view: View,
    tag_changes: Sequence[Mapping[str, Any]],
    now: float,
) -> list[Op]:
    """Wakes of the observers of tag membership whose set ``url`` joined or left."""
    before = {k: (v or {}).get("value") for k, v in view.get("tags", {}).items()}
    after = dict(before)
    for change in tag_changes:
        if change["headers"]["operation"] == "delete":
            after.pop(change["key"], None)
        else:
            after[change["key"]] = str((change.get("value") or {}).get("value"))
    ops: list[Op] = []
    for _key, raw in await store.kv_scan(OBSERVER_NS, "entities:"):
        obs = orjson.loads(raw)
        wanted = dict(item.split("=", 1) for item in obs["source_ref"].split(",") if item)
        was = all(before.get(k) == v for k, v in wanted.items())
        now_in = all(after.get(k) == v for k, v in wanted.items())
        if was != now_in and obs["observer"] != url:
            change = {"collection": "members", "kind": "insert" if now_in else "delete", "key": url}
            source = f"entities:{obs['source_ref']}"
            ops.extend(await deliver(store, obs, source, [change], None, now))
    return ops


async def deliver(
    store: Store,
    observer: dict[str, Any],
    source: str,
    changes: list[dict[str, Any]],
    finished: dict[str, Any] | None,
    now: float,
) -> list[Op]:
    """Operations that wake one observer (or arm its debounce timer). Raises whatever the
    store raises reading a debounce timer."""
    wake = observer["wake"]
    target = parse_url(observer["observer"])
    value: dict[str, Any]
    if wake.get("on") == "run_finished":
        if finished is None:
            return []
        shown = dict(finished)
        if not wake.get("include_response", True):
            shown["response"] = None
        value = {"kind": "run_finished", "source": source, "finished": shown}
    else:
        matched = matches(wake, changes)
        if not matched:
            return []
        if wake.get("debounce_ms"):
            return await _debounce(store, target, wake, source, matched, now)
        value = {"kind": "change", "source": source, "changes": matched}
    key = f"{source}@{new_token().decode()}"
    ops = wake_ops(target, [event("wakes", key, value, now)])
    if wake.get("timeout_ms"):
        ops.extend(arm_ops(timeout_timer(target.url, source, wake["timeout_ms"], now)))
    return ops


async def _debounce(
    store: Store,
    target: EntityURL,
    wake: Mapping[str, Any],
    source: str,
    matched: list[dict[str, Any]],
    now: float,
) -> list[Op]:
    """(Re)arm an observer's debounce timer, carrying the changes it has gathered so far."""
    index = schedule_key(target.url, f"debounce:{source}")
    current = await store.kv_get(SCHEDULE_NS, index)
    earlier: list[Any] = []
    replaces = None
    if current is not None:
        replaces = current.decode()
        raw = await store.kv_get(TIMER_NS, replaces)
        if raw is not None:
            earlier = list((orjson.loads(raw).get("payload") or {}).get("changes", []))
    timer = debounce_timer(
        target.url, source, wake["debounce_ms"], now, earlier + matched, wake.get("timeout_ms")
    )
    return arm_ops(timer, replaces)


async def other_children(store: Store, view: View, finished: set[str]) -> list[dict[str, Any]]:
    """The parent's children other than ``finished``, with their status (``spawning`` until
    the wake that spawned them committed). Raises whatever the store raises."""
    children = [v for v in view.get("manifests", {}).values() if v.get("kind") == "child"]
    statuses: dict[str, str] = {}
    for type_ in {c["entity_type"] for c in children}:
        for _key, raw in await store.kv_scan(ENTITY_NS, f"/{type_}/"):
            record = EntityRecord.load(raw)
            statuses[record.url] = record.status
    return [
        {
            "url": c["entity_url"],
            "type": c["entity_type"],
            "status": statuses.get(c["entity_url"], "spawning"),
        }
        for c in children
        if c["entity_url"] not in finished
    ]
