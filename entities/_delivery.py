"""What a wake's commit owes others: the wake of a parent waiting for its child to finish, the
wakes (or debounce timers) of observers whose filters match the committed changes, the shared-db
writes, and the status of a parent's other children."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from streams import Append, Create, KvPut, Op

from ._context import HandlerContext
from ._observe import OBSERVER_NS, change_summary, db_stream, matches
from ._records import ENTITY_NS, PENDING_NS, SCHEDULE_NS, TIMER_NS, EntityRecord
from ._runtime import JSON, Runtime, event, new_token
from ._scheduler import arm_ops, debounce_timer, schedule_key, timeout_timer
from ._urls import EntityURL, parse_url

__all__ = ["deliver", "observer_ops", "other_children", "parent_ops"]


async def parent_ops(
    rt: Runtime,
    entity: EntityURL,
    record: EntityRecord,
    contexts: Sequence[HandlerContext],
    run_status: str,
    error: str | None,
    now: float,
) -> list[Op]:
    """Operations that wake the parent with ``finished_child`` (spawned with run_finished)."""
    if record.parent is None or record.parent_wake != "run_finished":
        return []
    found = await rt.record(record.parent)
    if found is None or found[0].status == "stopped":
        return []
    replies = [r for ctx in contexts for r in ctx.effects.replies]
    response = None if not replies else replies[0] if len(replies) == 1 else replies
    inflight = record.inflight
    assert inflight is not None
    value = {
        "kind": "child_finished",
        "source": entity.url,
        "finished_child": {
            "url": entity.url,
            "type": entity.type,
            "run_status": run_status,
            "response": response,
            "error": error,
        },
    }
    parent = parse_url(record.parent)
    key = f"{entity.url}@{inflight.wake_id}"
    return [
        Append(parent.stream, [event("wakes", key, value, now)]),
        KvPut(PENDING_NS, parent.url, new_token()),
    ]


async def observer_ops(
    rt: Runtime,
    entity: EntityURL,
    contexts: Sequence[HandlerContext],
    run_status: str | None,
    error: str | None,
    view: dict[str, dict[str, Any]],
    now: float,
) -> list[Op]:
    """Observer-index updates, shared-db writes, and the wakes this commit owes observers."""
    store = rt.store
    url = entity.url
    ops: list[Op] = []
    own = [change for ctx in contexts for change in ctx.effects.own]
    for ctx in contexts:
        for key, value in ctx.effects.observers.items():
            ops.append(KvPut(OBSERVER_NS, key, value))
    rows = await store.kv_scan(OBSERVER_NS, f"{url}|")
    if rows:
        replies = [r for ctx in contexts for r in ctx.effects.replies]
        finished = None
        if run_status is not None:
            finished = {
                "url": url,
                "type": entity.type,
                "run_status": run_status,
                "response": None if not replies else replies[0] if len(replies) == 1 else replies,
                "error": error,
            }
        changes = change_summary(own)
        for _key, raw in rows:
            ops.extend(await deliver(rt, orjson.loads(raw), url, changes, finished, now))
    for ctx in contexts:
        for db_id, handle in ctx.effects.shared.items():
            stream = db_stream(db_id)
            encoded = [orjson.dumps(e) for e in handle.events]
            if db_id in ctx.effects.new_dbs:
                ops.append(Create(stream, content_type=JSON, messages=encoded, exclusive=True))
            elif encoded:
                ops.append(Append(stream, encoded))
            if encoded:
                changes = change_summary(handle.events)
                for _key, raw in await store.kv_scan(OBSERVER_NS, f"db:{db_id}|"):
                    obs = orjson.loads(raw)
                    if obs["observer"] != url:
                        ops.extend(await deliver(rt, obs, f"db:{db_id}", changes, None, now))
    if any(change["type"] == "tags" for change in own):
        before = {k: (v or {}).get("value") for k, v in view.get("tags", {}).items()}
        after = dict(contexts[0].tags) if contexts else before
        for _key, raw in await store.kv_scan(OBSERVER_NS, "entities:"):
            obs = orjson.loads(raw)
            wanted = dict(item.split("=", 1) for item in obs["source_ref"].split(",") if item)
            was = all(before.get(k) == v for k, v in wanted.items())
            now_in = all(after.get(k) == v for k, v in wanted.items())
            if was != now_in and obs["observer"] != url:
                change = {
                    "collection": "members",
                    "kind": "insert" if now_in else "delete",
                    "key": url,
                }
                ops.extend(
                    await deliver(rt, obs, f"entities:{obs['source_ref']}", [change], None, now)
                )
    return ops


async def deliver(
    rt: Runtime,
    observer: dict[str, Any],
    source: str,
    changes: list[dict[str, Any]],
    finished: dict[str, Any] | None,
    now: float,
) -> list[Op]:
    """Operations that wake one observer (or arm its debounce timer)."""
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
            index = schedule_key(target.url, f"debounce:{source}")
            current = await rt.store.kv_get(SCHEDULE_NS, index)
            earlier: list[Any] = []
            replaces = None
            if current is not None:
                replaces = current.decode()
                raw = await rt.store.kv_get(TIMER_NS, replaces)
                if raw is not None:
                    earlier = list((orjson.loads(raw).get("payload") or {}).get("changes", []))
            timer = debounce_timer(
                target.url,
                source,
                wake["debounce_ms"],
                now,
                earlier + matched,
                wake.get("timeout_ms"),
            )
            return arm_ops(timer, replaces)
        value = {"kind": "change", "source": source, "changes": matched}
    ops: list[Op] = [
        Append(target.stream, [event("wakes", f"{source}@{new_token().decode()}", value, now)]),
        KvPut(PENDING_NS, target.url, new_token()),
    ]
    if wake.get("timeout_ms"):
        ops.extend(arm_ops(timeout_timer(target.url, source, wake["timeout_ms"], now)))
    return ops


async def other_children(
    rt: Runtime, view: dict[str, dict[str, Any]], finished: set[str]
) -> list[dict[str, Any]]:
    children = [v for v in view.get("manifests", {}).values() if v.get("kind") == "child"]
    statuses: dict[str, str] = {}
    for type_ in {c["entity_type"] for c in children}:
        for _key, raw in await rt.store.kv_scan(ENTITY_NS, f"/{type_}/"):
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
