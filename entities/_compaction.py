"""Compaction: removing from entity streams what no reader needs any more, per the entity
type's :class:`~entities.Retention` policy. Every surviving event keeps its offset and bytes.

What goes (see ``Retention``):

* the ``text_deltas`` and ``reasoning_deltas`` of runs that have ended (counted together as
  ``text_deltas`` in the report): a delta is removable once its wake is not the
  entity's in-flight wake. The stream's tail is read *before* the entity record, so a wake
  claimed after that look appends its deltas beyond the range looked at: a running wake never
  loses its deltas;
* the ``steps`` journal entries of ended wakes older than the journal window;
* with ``keep_for``, the prefix before the entity's snapshot once that snapshot is older than
  ``keep_for`` and no later than the acknowledged offset (a wake never folds from before it).
  The snapshot the cut relied on is kept beside it (:data:`RETAIN_NS`), so replay and any fold
  that meets the cut start from it.

Bookkeeping per entity lives in the side table :data:`RETAIN_NS` (key: the entity URL): where
the next scan starts, the oldest journal entry kept and when it falls due, the last wake whose
journal went (``replay`` reports such wakes as compacted), and whether the prefix was cut. A
scan reads only from the oldest thing it may still have to remove, so a round over an entity
whose stream did not move costs one side-table read. Removals are idempotent, so several
workers compacting the same entity at once (PostgreSQL) do no harm; rounds in workers take a
lease (:func:`compact_round`) so that normally one runs at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from streams import (
    ConditionFailed,
    KvCheck,
    KvPut,
    OffsetGone,
    Op,
    Remove,
    Store,
    StreamForked,
    StreamGone,
    StreamNotFound,
    Truncate,
    format_offset,
    parse_offset,
)

from ._approvals import list_approvals
from ._events import from_iso
from ._metrics import metrics
from ._pipeline.load import View, read_snapshot
from ._records import ENTITY_NS, SNAPSHOT_NS, EntityRecord
from ._retention import Retention
from ._urls import EntityURL, parse_url

__all__ = [
    "RETAIN_NS",
    "CompactionReport",
    "Marks",
    "compact_all",
    "compact_entity",
    "compact_round",
    "marks",
]

# streamed partials of model calls: removable once their run has ended
_DELTAS = frozenset({"text_deltas", "reasoning_deltas"})

logger = logging.getLogger("entities.compaction")

RETAIN_NS = "retention"  # key: url -> bookkeeping (JSON); "{url}\nbase" -> snapshot at the cut
_ROUND_KEY = "round"  # the lease and cursor of periodic rounds (URLs start with "/")
_PAGE = 2000
_REMOVE_BATCH = 5000


@dataclass(slots=True)
class CompactionReport:
    """What one compaction removed: events by kind and their bytes, over how many entities."""

    entities: int = 0
    text_deltas: int = 0
    steps: int = 0
    prefix: int = 0
    bytes: int = 0
    truncated: dict[str, str] = field(default_factory=dict)  # url -> earliest retained offset

    @property
    def events(self) -> int:
        return self.text_deltas + self.steps + self.prefix

    def add(self, other: CompactionReport) -> None:
        self.entities += other.entities
        self.text_deltas += other.text_deltas
        self.steps += other.steps
        self.prefix += other.prefix
        self.bytes += other.bytes
        self.truncated.update(other.truncated)

    def to_json(self) -> dict[str, Any]:
        return {
            "entities": self.entities,
            "events": self.events,
            "bytes": self.bytes,
            "text_deltas": self.text_deltas,
            "steps": self.steps,
            "prefix": self.prefix,
            "truncated": dict(self.truncated),
        }


@dataclass(slots=True)
class Marks:
    """What compaction left behind for readers of one entity: the position of the last wake
    whose journal went (0: none), and the snapshot the prefix cut relied on (or ``None``)."""

    journal_through: int = 0
    base: tuple[str, View] | None = None


def _position(offset: str) -> int:
    parsed = parse_offset(offset)
    return 0 if parsed is None else parsed


def _wake_end(wake_id: Any) -> int:
    """The end position of the wake ``w{low}-{high}`` (0 if it is not one)."""
    if isinstance(wake_id, str) and wake_id.startswith("w") and "-" in wake_id:
        tail = wake_id.rsplit("-", 1)[1]
        if tail.isdigit():
            return int(tail)
    return 0


async def marks(store: Store, url: str) -> Marks:
    """The compaction marks of the entity at ``url`` (see :class:`Marks`). Raises whatever the
    store raises."""
    raw = await store.kv_get(RETAIN_NS, url)
    meta: dict[str, Any] = {} if raw is None else orjson.loads(raw)
    found = Marks(journal_through=int(meta.get("journal_through", 0)))
    if meta.get("truncated"):
        base = await store.kv_get(RETAIN_NS, f"{url}\nbase")
        if base is not None:
            found.base = read_snapshot(base)
    return found


def _timestamp(item: dict[str, Any]) -> float | None:
    stamp = (item.get("headers") or {}).get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        return from_iso(stamp)
    except ValueError:
        return None


@dataclass(slots=True)
class _Scan:
    """One pass over part of an entity's stream: what goes, and what stays for later."""

    policy: Retention
    inflight: str | None  # the wake running now (its deltas and steps stay)
    waiting: set[str]  # wakes whose runs wait for approvals (their journal stays)
    tail: str  # the scan stops here (read before the entity record)
    now: float
    report: CompactionReport
    journal_through: int
    removals: list[str] = field(default_factory=list)
    kept_delta: str | None = None  # where to read again for a delta that stayed
    kept_step: tuple[str, float] | None = None  # the same for the oldest step, and its time
    offset: str = "-1"  # how far the scan got

    async def run(self, store: Store, stream: str, start: str, max_events: int) -> None:
        self.offset = offset = start
        scanned = 0
        while offset < self.tail:  # "-1" sorts before every offset
            result = await store.read(stream, offset, limit=_PAGE, renew_ttl=False)
            for message in result.messages:
                if message.offset > self.tail:
                    break
                self._look(offset, message.offset, message.data)
                offset = message.offset
            scanned += len(result.messages)
            self.offset = offset
            if result.up_to_date or not result.messages or scanned >= max_events:
                return

    def _look(self, before: str, offset: str, data: bytes) -> None:
        """Decide about the event at ``offset`` (``before``: where a read returns it)."""
        item = orjson.loads(data)
        type_ = item.get("type")
        value = item.get("value") or {}
        report = self.report
        if type_ in _DELTAS and self.policy.text_deltas:
            run = value.get("run_id") or (item.get("headers") or {}).get("txid")
            if run is not None and run == self.inflight:
                self.kept_delta = self.kept_delta or before
                return
            self.removals.append(offset)
            report.text_deltas += 1
            report.bytes += len(data)
        elif type_ == "steps" and self.policy.journal_window is not None:
            wake = value.get("wake_id")
            stamp = _timestamp(item)
            limit = self.now - self.policy.journal_window
            keep = wake == self.inflight or wake in self.waiting
            if not keep and stamp is not None and stamp < limit:
                self.removals.append(offset)
                report.steps += 1
                report.bytes += len(data)
                self.journal_through = max(self.journal_through, _wake_end(wake))
            elif self.kept_step is None:
                self.kept_step = (before, self.now if stamp is None else stamp)


async def compact_entity(
    store: Store, url: str, policy: Retention, now: float, *, max_events: int = 100_000
) -> CompactionReport:
    """Compact the stream of the entity at ``url`` per ``policy`` as of ``now`` (epoch
    seconds), reading at most about ``max_events`` events (the rest waits for the next call).

    A missing entity, one whose stream forks read, or one another compactor compacted at the
    same time is left alone (an empty report). Raises whatever the store raises for a failed
    read or commit.
    """
    target = parse_url(url)
    report = CompactionReport()
    try:
        info = await store.head(target.stream)
    except (StreamNotFound, StreamGone):
        return report
    meta_raw = await store.kv_get(RETAIN_NS, target.url)
    meta: dict[str, Any] = {} if meta_raw is None else dict(orjson.loads(meta_raw))
    window = policy.journal_window
    due = window is not None and meta.get("steps_due") is not None and meta["steps_due"] <= now
    if meta.get("cursor") == info.next_offset and not due and policy.keep_for is None:
        return report  # nothing new since the last scan, and no journal entry falls due
    raw = await store.kv_get(ENTITY_NS, target.url)  # after the tail: see the module docstring
    if raw is None:
        return report
    record = EntityRecord.load(raw)
    retained = info.retained_from or format_offset(0)
    start = str(meta.get("cursor", "-1"))
    if due and meta.get("steps_from") is not None:
        start = min(start, str(meta["steps_from"]))
    if start < retained:
        start = "-1"
    inflight = record.inflight.wake_id if record.inflight is not None else None
    waiting = await _waiting(store, target.url, now, window)
    scan = _Scan(
        policy, inflight, waiting, info.next_offset, now, report, meta.get("journal_through", 0)
    )
    if policy.text_deltas or window is not None:
        await scan.run(store, target.stream, start, max_events)
    new_meta = dict(meta)
    new_meta["cursor"] = scan.kept_delta or max(scan.offset, start)
    # the oldest journal entry kept: found now if this scan covered the old one's place
    if window is not None and (start == "-1" or due or meta.get("steps_from") is None):
        kept = scan.kept_step
        found = (None, None) if kept is None else (kept[0], kept[1] + window)
        new_meta["steps_from"], new_meta["steps_due"] = found
    new_meta["journal_through"] = scan.journal_through
    ops: list[Op] = [KvCheck(RETAIN_NS, target.url, meta_raw)]  # one compactor at a time
    for low in range(0, len(scan.removals), _REMOVE_BATCH):
        ops.append(Remove(target.stream, scan.removals[low : low + _REMOVE_BATCH]))
    gone = set(scan.removals)
    ops.extend(await _truncation(store, target, record, policy, now, retained, gone, report))
    if report.prefix:
        new_meta["truncated"] = report.truncated[target.url]
    if len(ops) > 1 or new_meta != meta:
        ops.append(KvPut(RETAIN_NS, target.url, orjson.dumps(new_meta)))
        try:
            await store.commit(ops)
        except (StreamForked, ConditionFailed) as exc:
            logger.info("%s is not compacted now: %s", target.url, exc)
            return CompactionReport()
    if report.events:
        report.entities = 1
        metrics.compacted_bytes.inc((target.type,), report.bytes)
        for kind in ("text_deltas", "steps", "prefix"):
            if getattr(report, kind):
                metrics.compacted_events.inc((target.type, kind), getattr(report, kind))
    return report


async def _waiting(store: Store, url: str, now: float, window: float | None) -> set[str]:
    """The wakes whose suspended runs still need their journal: approvals pending, or decided
    within the window (the run resumes from that journal)."""
    since = now - (window or 0.0)
    return {
        a.origin
        for a in await list_approvals(store, url)
        if a.status == "pending" or (a.decided_at or 0.0) >= since
    }


async def _truncation(
    store: Store,
    target: EntityURL,
    record: EntityRecord,
    policy: Retention,
    now: float,
    retained: str,
    gone: set[str],
    report: CompactionReport,
) -> list[Op]:
    """The ops cutting the prefix before the entity's snapshot, when ``policy.keep_for`` allows
    (the snapshot is older than that and no later than the acknowledged offset); counts what
    goes into ``report`` (but not the events at ``gone``, removed already)."""
    if policy.keep_for is None or record.acked == "-1":
        return []
    saved = await store.kv_get(SNAPSHOT_NS, target.url)
    if saved is None:
        return []
    at, _view = read_snapshot(saved)
    if at > record.acked or at <= retained:
        return []
    # the snapshot's age: the time of the first event at or after its offset (never younger)
    probe = await store.read(target.stream, format_offset(_position(at) - 1), limit=1)
    if not probe.messages:
        return []
    stamp = _timestamp(orjson.loads(probe.messages[0].data))
    if stamp is None or stamp >= now - policy.keep_for:
        return []
    offset = "-1"
    while True:  # count what the cut removes (holes are gone already)
        result = await store.read(target.stream, offset, limit=_PAGE, renew_ttl=False)
        for message in result.messages:
            if message.offset > at:
                break
            if message.offset in gone:
                continue
            report.prefix += 1
            report.bytes += len(message.data)
        offset = result.next_offset
        if result.up_to_date or not result.messages or offset >= at:
            break
    report.truncated[target.url] = at
    return [
        KvPut(RETAIN_NS, f"{target.url}\nbase", saved),
        Truncate(target.stream, at),
    ]


async def compact_all(
    store: Store,
    policies: dict[str, Retention],
    now: float,
    *,
    after: str | None = None,
    limit: int | None = None,
) -> tuple[CompactionReport, str | None]:
    """Compact the entities whose type has a policy in ``policies``, in URL order from the
    first URL after ``after``, at most ``limit`` of them. Returns the report and the last URL
    looked at (``None`` once the end was reached). Raises whatever the store raises."""
    report = CompactionReport()
    rows = await store.kv_scan(ENTITY_NS, after=after, limit=limit)
    for key, _raw in rows:
        policy = policies.get(parse_url(key).type)
        if policy is None:
            continue
        try:
            report.add(await compact_entity(store, key, policy, now))
        except OffsetGone:  # truncated meanwhile by another compactor: the next round retries
            continue
    last = rows[-1][0] if rows and (limit is None or len(rows) >= limit) else None
    return report, last


async def compact_round(
    store: Store,
    policies: dict[str, Retention],
    now: float,
    owner: str,
    *,
    entities: int = 1000,
    lease_seconds: float = 120.0,
) -> CompactionReport | None:
    """One bounded round of periodic compaction: up to ``entities`` entities, continuing where
    the previous round (of any worker) stopped. Rounds take a lease (compare-and-set in
    :data:`RETAIN_NS`), so with many workers one compacts at a time; ``None`` when another
    holds it. Raises whatever the store raises."""
    raw = await store.kv_get(RETAIN_NS, _ROUND_KEY)
    state = {} if raw is None else dict(orjson.loads(raw))
    if state.get("owner") not in (None, owner) and float(state.get("expires", 0)) > now:
        return None
    after = state.get("after")
    mine = {"owner": owner, "expires": now + lease_seconds, "after": after}
    claimed = orjson.dumps(mine)
    try:
        await store.commit(
            [KvCheck(RETAIN_NS, _ROUND_KEY, raw), KvPut(RETAIN_NS, _ROUND_KEY, claimed)]
        )
    except ConditionFailed:  # another worker took the round
        return None
    report, last = await compact_all(
        store, policies, now, after=after if isinstance(after, str) else None, limit=entities
    )
    done = orjson.dumps({"owner": None, "expires": 0, "after": last})
    await store.commit([KvPut(RETAIN_NS, _ROUND_KEY, done, only_if=True, expect=claimed)])
    return report
