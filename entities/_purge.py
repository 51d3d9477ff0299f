"""Purge: delete an entity for good, its stream and every side-table row about it.

A kill stops an entity and keeps everything; a purge removes it: the stream, the entity record,
its pending mark, snapshots, tags, dead letters, the schedules and timers it owns, its observer
registrations (as observer and as observed), the idempotency keys of sends and spawns to it, and
the stream's links in streams subscriptions. Afterwards the URL is free: a spawn there makes a
new entity that sees nothing of the old one.

All of it is one transaction, checked against the entity records read (compare-and-set), so it
commits whole or not at all. A wake of the entity running somewhere is fenced by it: the
record its claim wrote is gone, so its journal writes and its commit fail, and the worker
cancels it (as for a kill). Children are kept (their completion wakes nobody, as after a kill of
the parent) unless the purge is recursive, which purges every descendant in the same
transaction.

What a purge leaves: delayed sends other entities scheduled *to* the URL (their message goes
wherever the URL points when they fire: nowhere, or a new entity there), shared-state dbs the
entity made (others may read them), and the type's recorded code location.

Subscription links are removed from the stored subscriptions; a standalone streams server
(``python -m streams``) running on the same database keeps its subscriptions in memory too, and
sees the change only when it restarts (``entities serve`` serves no subscriptions).

Finding the rows keyed other than by URL prefix (timers, observers, subscription links) scans
those namespaces whole: a purge is an operator's action, not a request path.
"""

from __future__ import annotations

import orjson

from streams import (
    SNAPSHOT_NAMESPACE,
    ConditionFailed,
    Delete,
    KvCheck,
    KvPut,
    Op,
    Store,
    StreamGone,
    StreamNotFound,
)

from ._approvals import APPROVAL_NS
from ._compaction import RETAIN_NS
from ._errors import EntityNotFound
from ._idempotency import EXPIRY_NS, IDEMPOTENCY_NS, Remembered
from ._observe import OBSERVER_NS, generation_ops
from ._pipeline.caps import CAP_NS
from ._pipeline.fire import BAD_TIMER_NS
from ._records import (
    DEAD_NS,
    ENTITY_NS,
    PAUSED_NS,
    PENDING_NS,
    REPLY_NS,
    SCHEDULE_NS,
    SNAPSHOT_NS,
    TAG_NS,
    TIMER_NS,
    EntityRecord,
)
from ._urls import EntityURL, parse_url

__all__ = ["SUBSCRIPTIONS_NS", "purge"]

# where ``streams.server`` keeps its subscriptions (one row per subscription, with its links)
SUBSCRIPTIONS_NS = "streams.server.subscriptions"
# a purge whose records keep changing under it (wakes committing) is tried this many times
ATTEMPTS = 20
# side-table rows keyed ``{prefix}{url}{suffix}...``, removed by prefix scan
_BY_PREFIX: tuple[tuple[str, str, str], ...] = (
    (TAG_NS, "", "\n"),
    (DEAD_NS, "", "|"),
    (IDEMPOTENCY_NS, "send\n", "\n"),
    (IDEMPOTENCY_NS, "spawn\n", "\n"),
    (REPLY_NS, "", "\n"),
    (APPROVAL_NS, "", "|"),
    (RETAIN_NS, "", "\n"),
)


async def purge(store: Store, url: str, *, recursive: bool = False) -> list[str]:
    """Remove the entity at ``url`` (and, with ``recursive``, its descendants) for good, in one
    transaction; return the URLs purged (``url`` first).

    Raises:
        InvalidEntityURL: ``url`` is not ``/type/id``.
        EntityNotFound: no entity at ``url``.
        ConditionFailed: its records kept changing through every attempt (wakes committing
            under it, which is rare: try again).
        Whatever else the store raises.
    """
    target = parse_url(url)
    for attempt in range(ATTEMPTS):
        records = await _family(store, target, recursive)
        ops: list[Op] = []
        for raw in records.values():
            ops.extend(await _entity_ops(store, EntityRecord.load(raw), raw))
        ops.extend(await _scanned_ops(store, set(records)))
        try:
            await store.commit(ops)
        except (ConditionFailed, StreamNotFound, StreamGone):
            if attempt == ATTEMPTS - 1:
                raise
            continue  # a record or row changed (a wake committed): read again
        return list(records)
    raise AssertionError("unreachable")  # pragma: no cover


async def _family(store: Store, target: EntityURL, recursive: bool) -> dict[str, bytes]:
    """The record bytes of ``target`` and, with ``recursive``, of all its descendants (by
    URL, ``target`` first).

    Raises:
        EntityNotFound: no entity at ``target``.
    """
    raw = await store.kv_get(ENTITY_NS, target.url)
    if raw is None:
        raise EntityNotFound(f"no entity at {target.url}", url=target.url)
    found = {target.url: raw}
    if not recursive:
        return found
    children: dict[str, list[tuple[str, bytes]]] = {}
    for key, value in await store.kv_scan(ENTITY_NS):
        parent = EntityRecord.load(value).parent
        if parent is not None:
            children.setdefault(parent, []).append((key, value))
    queue = [target.url]
    while queue:
        for key, value in children.get(queue.pop(), []):
            if key not in found:
                found[key] = value
                queue.append(key)
    return found


async def _entity_ops(store: Store, record: EntityRecord, raw: bytes) -> list[Op]:
    """What removes one entity: its record (checked), stream and the rows keyed by its URL."""
    url = parse_url(record.url)
    ops: list[Op] = [KvCheck(ENTITY_NS, url.url, raw), KvPut(ENTITY_NS, url.url, None)]
    try:
        await store.head(url.stream)
        ops.append(Delete(url.stream))
    except (StreamNotFound, StreamGone):
        pass  # a record without its stream: only the rows go
    for namespace in (PENDING_NS, SNAPSHOT_NS, PAUSED_NS, RETAIN_NS):
        ops.append(KvPut(namespace, url.url, None))
    for key, value in await store.kv_scan(CAP_NS, f"{url.type}|"):  # a concurrency slot
        if orjson.loads(value).get("url") == url.url:
            ops.append(KvPut(CAP_NS, key, None))
    ops.append(KvPut(SNAPSHOT_NAMESPACE, url.stream, None))
    for namespace, before, after in _BY_PREFIX:
        for key, value in await store.kv_scan(namespace, f"{before}{url.url}{after}"):
            ops.append(KvPut(namespace, key, None))
            if namespace == IDEMPOTENCY_NS:  # and its expiry index row
                expires = Remembered.model_validate_json(value).expires
                ops.append(KvPut(EXPIRY_NS, f"{expires:017.6f}|{key}", None))
    for key, value in await store.kv_scan(SCHEDULE_NS, f"{url.url}|"):
        # checked: a cron tick firing meanwhile re-arms it (then the purge reads again)
        ops.append(KvCheck(SCHEDULE_NS, key, value))
        ops.append(KvPut(SCHEDULE_NS, key, None))
        ops.append(KvPut(TIMER_NS, value.decode(), None))  # its current timer
    return ops


async def _scanned_ops(store: Store, urls: set[str]) -> list[Op]:
    """The rows about ``urls`` that no prefix finds: timers they own (delayed sends have no
    schedule row), observer registrations either way round, subscription links."""
    ops: list[Op] = []
    for namespace in (TIMER_NS, BAD_TIMER_NS):
        for key, _value in await store.kv_scan(namespace):
            parts = key.split("|")
            if len(parts) >= 3 and parts[1] in urls:
                ops.append(KvPut(namespace, key, None))
    observed: list[str] = []  # rows of entities that stay: their observers change
    for key, _value in await store.kv_scan(OBSERVER_NS):
        source, _, observer = key.rpartition("|")
        if source in urls or observer in urls:
            ops.append(KvPut(OBSERVER_NS, key, None))
            if source not in urls:
                observed.append(key)
    ops.extend(generation_ops(observed))
    streams = {parse_url(u).stream for u in urls}
    for key, value in await store.kv_scan(SUBSCRIPTIONS_NS):
        try:
            subscription = orjson.loads(value)
            links = subscription["links"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        if isinstance(links, dict) and streams & links.keys():
            subscription["links"] = {p: v for p, v in links.items() if p not in streams}
            ops.append(KvCheck(SUBSCRIPTIONS_NS, key, value))
            ops.append(KvPut(SUBSCRIPTIONS_NS, key, orjson.dumps(subscription)))
    return ops
