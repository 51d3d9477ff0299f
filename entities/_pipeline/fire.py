"""Stage 2, timers firing: delayed sends, cron ticks, debounced and quiet-period observer wakes,
each fired exactly once.

Each timer is a side-table row (namespace ``timer``) whose key starts with its due time, so the
due ones sort first; a second row per schedule (namespace ``schedule``) points at the schedule's
current timer (see :mod:`entities._timers`). Firing a timer is one transaction that checks both
rows are unchanged (compare-and-set), deletes the timer, delivers its effect through the inbox
(an inbox message for a future send, a ``wakes`` event for a cron tick, with the entity marked
pending) and, for cron, stores the next timer. Two schedulers (two processes) racing for the
same timer cannot both commit, so every due time fires once. Due timers are fired in batches,
many per transaction with every timer's checks in it (see :func:`fire_due`), so a burst of
timers costs a few commits.

**Catch-up policy.** A timer that is overdue (the process was down) fires once, as soon as a
scheduler runs, with ``late_ms`` telling how late it is. A cron schedule then skips every tick
that was missed in the meantime (they are counted in ``missed``) and is re-armed for the next due
time after *now*: after downtime there is one tick, never a burst.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import anyio
import orjson

from streams import (
    Append,
    ConditionFailed,
    KvCheck,
    KvPut,
    Op,
    Store,
    StreamClosed,
    StreamGone,
    StreamNotFound,
)

from .._approvals import Approval, decision_ops
from .._errors import EntitiesError
from .._events import event, inbox_value, iso, new_token
from .._metrics import metrics
from .._records import SCHEDULE_NS, TIMER_NS
from .._timers import (
    SEND_FIELDS,
    TimerValue,
    arm_ops,
    due_by,
    due_of,
    next_cron,
    schedule_key,
    sent_entry,
    timeout_timer,
)
from .._urls import EntityURL, parse_url
from .inbox import Deliveries

__all__ = ["BAD_TIMER_NS", "fire_due", "fire_rows", "fire_turn"]

logger = logging.getLogger("entities.scheduler")
FIRE_BATCH = 500  # timers fired together in one transaction
FIRE_CONCURRENCY = 256  # timers in flight at once when fired one by one
# Timer rows that cannot be decoded (written by something else, or corrupted) are moved here,
# key and bytes unchanged, instead of blocking the timers due after them.
BAD_TIMER_NS = "timer_bad"


class _BadTimer(Exception):
    """A timer row that does not decode as a :class:`TimerValue`."""

    def __init__(self, key: str, raw: bytes, reason: Exception) -> None:
        super().__init__(f"timer {key!r} cannot be decoded: {reason}")
        self.ops: list[Op] = [
            KvCheck(TIMER_NS, key, raw),
            KvPut(TIMER_NS, key, None),
            KvPut(BAD_TIMER_NS, key, raw),
        ]


class _Urls(dict[str, EntityURL]):
    """Parsed entity URLs, memoised across the timers of one batch."""

    def __missing__(self, text: str) -> EntityURL:
        parsed = self[text] = parse_url(text)
        return parsed

    def check(self, *texts: str) -> None:
        """Parse (and memoise) ``texts``. Raises InvalidEntityURL for one that is not a URL."""
        for text in texts:
            self.get(text) or self.__missing__(text)


async def fire_turn(store: Store, now: float, limit: int) -> tuple[int, float | None]:
    """One look at the timers for a running worker: fire what is due at ``now`` (up to
    ``limit``) and return ``(fired, next)``, where ``next`` is when to look again: the due time
    of the first timer left (``now`` when more than ``limit`` were due), or ``None`` if none is
    left. One scan serves both.

    Raises whatever the store raises for the scan.
    """
    rows = await store.kv_scan(TIMER_NS, "", limit=limit + 1)
    cutoff = due_by(now)
    due = [row for row in rows[:limit] if row[0] < cutoff]
    fired = await fire_rows(store, due, now) if due else 0
    if len(due) == len(rows):
        return fired, None
    after = due_of(rows[len(due)][0])  # None: not a key timer_key wrote, never due
    return fired, None if after is None else min(now, after)


async def fire_due(
    store: Store,
    now: float,
    *,
    limit: int = 5000,
    batch: int = FIRE_BATCH,
    concurrency: int = FIRE_CONCURRENCY,
) -> int:
    """Fire every timer due at ``now`` (up to ``limit``); return how many fired here.

    Timers fire in due order, ``batch`` at a time in one transaction: every timer's
    compare-and-set checks are in it, so it commits only if all of them still hold, and the
    events for one stream go in as one append. If it fails (another scheduler fired one of them,
    one was cancelled or replaced, a target is gone), that batch is fired again one transaction
    per timer (up to ``concurrency`` in flight, which a group-committing store writes together),
    so one timer's failed check fails only that timer.

    Raises whatever the store raises for the scan.
    """
    due = await store.kv_scan(TIMER_NS, "", end=due_by(now), limit=limit)
    return await fire_rows(store, due, now, batch=batch, concurrency=concurrency)


async def fire_rows(
    store: Store,
    due: list[tuple[str, bytes]],
    now: float,
    *,
    batch: int = FIRE_BATCH,
    concurrency: int = FIRE_CONCURRENCY,
) -> int:
    """Fire the timer rows ``due`` (as scanned, in due order); see :func:`fire_due`."""
    fired = 0
    for start in range(0, len(due), max(1, batch)):
        chunk = due[start : start + max(1, batch)]
        done = await _fire_batch(store, chunk, now) if len(chunk) > 1 else None
        if done is None:
            done = await _fire_each(store, chunk, now, concurrency)
        fired += done
    return fired


async def _fire_batch(store: Store, chunk: list[tuple[str, bytes]], now: float) -> int | None:
    """Fire every timer of ``chunk`` in one transaction and return how many fired (rows set
    aside as undecodable do not count); ``None`` if it could not commit."""
    ops, set_aside = _batch_ops(chunk, now)
    try:
        await store.commit(ops)
    except (ConditionFailed, StreamNotFound, StreamGone, StreamClosed):
        return None
    return len(chunk) - set_aside


def _batch_ops(chunk: list[tuple[str, bytes]], now: float) -> tuple[list[Op], int]:
    """The operations that fire every timer of ``chunk`` together: every timer's checks, then
    one pending mark per woken entity and one append per stream.

    Delayed sends (the bulk of timers) take a lean path: no model validation (the row was
    written by :meth:`TimerValue.dump`) and no per-timer op lists; anything else, or a row that
    does not look like a current delayed send, goes through :func:`_timer_ops`.
    """
    kv_ops: list[Op] = []
    out = Deliveries()
    urls = _Urls()
    set_aside = 0
    for key, raw in chunk:
        timer = _lean_send(raw, urls)
        if timer is not None:
            kv_ops.append(KvCheck(TIMER_NS, key, raw))
            kv_ops.append(KvPut(TIMER_NS, key, None))
            _deliver_send(out, timer, urls, now)
            continue
        try:
            kv_ops.extend(_timer_ops(key, raw, now, out, urls))
        except _BadTimer as bad:
            logger.error("%s; moved to namespace %r", bad, BAD_TIMER_NS)
            kv_ops.extend(bad.ops)
            set_aside += 1
    # one fresh mark per transaction: a wake claimed earlier cannot clear these marks
    return [*kv_ops, *out.ops(new_token())], set_aside


def _lean_send(raw: bytes, urls: _Urls) -> dict[str, Any] | None:
    """The fields of a current delayed-send timer row (its URLs parsed into ``urls``), or
    ``None`` when the row is anything else (the full decoding then says what is wrong)."""
    try:
        timer = orjson.loads(raw)
        if type(timer) is not dict or timer.get("kind") != "future_send":
            return None
        if timer.keys() != SEND_FIELDS or timer["v"] != 1:
            return None
        if not (type(timer["due"]) is float and type(timer["schedule_id"]) is str):
            return None
        urls.check(timer["owner"], timer["target"] or timer["owner"])
    except (ValueError, TypeError, EntitiesError):
        return None
    return timer


def _deliver_send(out: Deliveries, timer: Mapping[str, Any], urls: _Urls, now: float) -> None:
    """A delayed send delivered at ``now``: the message to its target (which wakes), and the
    update of its ``schedule`` entry (``sent``) in the sender's manifest."""
    schedule_id = timer["schedule_id"]
    owner, target = urls[timer["owner"]], urls[timer["target"] or timer["owner"]]
    value = inbox_value(timer["payload"], timer["message_type"], timer["owner"], now)
    value["schedule_id"] = schedule_id  # the message says which schedule it came from
    value["due"] = timer["due"]
    late_ms = round(max(0.0, now - timer["due"]) * 1000, 3)
    metrics.lateness.observe(late_ms / 1000)
    entry = sent_entry(timer, now, late_ms)
    out.wake(target, [event("inbox", schedule_id.removeprefix("send:"), value, now)])
    out.append(owner.stream, [event("manifests", schedule_id, entry, now, "update")])


async def _fire_each(
    store: Store, chunk: list[tuple[str, bytes]], now: float, concurrency: int
) -> int:
    """Fire each timer of ``chunk`` in its own transaction, up to ``concurrency`` at once."""
    if len(chunk) == 1 or concurrency <= 1:
        fired = 0
        for key, raw in chunk:
            fired += await _fire_one(store, key, raw, now)
        return fired
    results: list[int] = []
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(key: str, raw: bytes) -> None:
        async with limiter:
            results.append(await _fire_one(store, key, raw, now))

    async with anyio.create_task_group() as tg:
        for key, raw in chunk:
            tg.start_soon(one, key, raw)
    return sum(results)


def _timer_ops(key: str, raw: bytes, now: float, out: Deliveries, urls: _Urls) -> list[Op]:
    """Fire one timer: its checks and side-table writes are returned, its wake events go to
    ``out``.

    Raises:
        _BadTimer: the row does not decode (JSON, validation, bad URLs).
    """
    try:
        timer = TimerValue.model_validate(orjson.loads(raw))
        owner = urls[timer.owner]
        if timer.target is not None:
            urls.check(timer.target)
    except (ValueError, TypeError, EntitiesError) as exc:
        raise _BadTimer(key, raw, exc) from None
    if timer.kind == "future_send":
        # one-shot: the timer row is the whole schedule (cancel deletes it), so checking and
        # deleting that row is enough for exactly-once
        _deliver_send(out, timer.model_dump(mode="json"), urls, now)
        return [KvCheck(TIMER_NS, key, raw), KvPut(TIMER_NS, key, None)]
    index = schedule_key(timer.owner, timer.schedule_id)
    checks: list[Op] = [
        KvCheck(TIMER_NS, key, raw),
        KvCheck(SCHEDULE_NS, index, key.encode()),
        KvPut(TIMER_NS, key, None),
    ]
    late_ms = round(max(0.0, now - timer.due) * 1000, 3)
    metrics.lateness.observe(late_ms / 1000)
    if timer.kind in ("debounce", "timeout"):
        return [*checks, *_observation(timer, owner, index, late_ms, now, out)]
    if timer.kind == "approval":
        return [*checks, KvPut(SCHEDULE_NS, index, None), *_approval_expired(timer, key, raw)]
    return [*checks, *_cron_tick(timer, owner, late_ms, now, out)]


def _approval_expired(timer: TimerValue, key: str, raw: bytes) -> list[Op]:
    """An approval still pending at its timeout: denied ("timed out"), which resumes its run.
    The approval row is checked as the timer saw it: a decision taken meanwhile cancelled the
    timer in its own transaction, so this fires only for a pending approval.

    Raises:
        _BadTimer: the timer's approval does not decode.
    """
    try:
        stored = str((timer.payload or {})["approval"]).encode()
        approval = Approval.model_validate_json(stored)
    except (KeyError, ValueError) as exc:
        raise _BadTimer(key, raw, exc) from None
    waited = max(0.0, timer.due - approval.requested_at)
    note = f"timed out: no decision within {waited:g} s"
    ops, _decided = decision_ops(approval, stored, "denied", note, "timeout", timer.due)
    return ops


def _cron_tick(
    timer: TimerValue, owner: EntityURL, late_ms: float, now: float, out: Deliveries
) -> list[Op]:
    """A cron tick: the ``wakes`` event, and the next timer (missed ticks counted, skipped)."""
    missed = 0
    nxt = next_cron(timer.expression or "", timer.timezone, timer.due)
    while nxt <= now:
        missed += 1
        nxt = next_cron(timer.expression or "", timer.timezone, nxt)
    tick = {
        "kind": "cron",
        "source": f"cron:{timer.schedule_id.removeprefix('cron:')}",
        "schedule_id": timer.schedule_id,
        "expression": timer.expression,
        "due": timer.due,
        "due_at": iso(timer.due),
        "late_ms": late_ms,
        "missed": missed,
        "payload": timer.payload,
    }
    out.wake(owner, [event("wakes", f"{timer.schedule_id}@{timer.due:.6f}", tick, now)])
    return arm_ops(timer.model_copy(update={"due": nxt}))


def _observation(
    timer: TimerValue,
    owner: EntityURL,
    index: str,
    late_ms: float,
    now: float,
    out: Deliveries,
) -> list[Op]:
    """A debounced change wake or a quiet-period (timeout) wake of an observer."""
    payload = dict(timer.payload or {})
    source = payload.get("source")
    wake = {
        "kind": "change" if timer.kind == "debounce" else "timeout",
        "source": source,
        "changes": payload.get("changes", []),
        "timeout": timer.kind == "timeout",
        "debounced": timer.kind == "debounce",
        "late_ms": late_ms,
    }
    out.wake(owner, [event("wakes", f"{timer.schedule_id}@{timer.due:.6f}", wake, now)])
    ops: list[Op] = [KvPut(SCHEDULE_NS, index, None)]
    timeout_ms = payload.get("timeout_ms")
    if timeout_ms:  # a heartbeat: (re)start the quiet-period timer
        ops.extend(arm_ops(timeout_timer(timer.owner, str(source), timeout_ms, now)))
    return ops


async def _fire_one(store: Store, key: str, raw: bytes, now: float) -> int:
    """Fire one timer in one transaction; 1 if it fired here, 0 if not (fired elsewhere,
    cancelled or replaced, or its target is gone)."""
    out = Deliveries()
    try:
        ops = _timer_ops(key, raw, now, out, _Urls())
    except _BadTimer as bad:
        logger.error("%s; moved to namespace %r", bad, BAD_TIMER_NS)
        with contextlib.suppress(ConditionFailed):
            await store.commit(bad.ops)
        return 0
    try:
        await store.commit([*ops, *out.ops()])
        return 1
    except ConditionFailed:
        await _drop_orphan(store, key, raw)
    except (StreamNotFound, StreamGone, StreamClosed) as exc:
        logger.info("timer %s has nowhere to go (%s); dropped", key, exc)
        drop: list[Op] = [KvCheck(TIMER_NS, key, raw), KvPut(TIMER_NS, key, None)]
        with contextlib.suppress(ConditionFailed, StreamNotFound, StreamGone, StreamClosed):
            await store.commit([*drop, *_undelivered(raw, exc, now)])
        with contextlib.suppress(ConditionFailed):
            await store.commit(drop)  # the sender is gone too: just drop the timer
    return 0


def _undelivered(raw: bytes, exc: Exception, now: float) -> list[Op]:
    """For a delayed send whose target was stopped or deleted: the update of its schedule entry
    in the sender's manifest to ``failed``, with the reason (nothing for other timers)."""
    timer = orjson.loads(raw)
    if timer.get("kind") != "future_send":
        return []
    sender = parse_url(timer["owner"])
    target = timer["target"] or timer["owner"]
    why = "stopped" if isinstance(exc, StreamClosed) else "gone"
    entry = sent_entry(timer, now, round(max(0.0, now - timer["due"]) * 1000, 3))
    entry.update(status="failed", sent_at=None, reason=f"the target {target} is {why}")
    return [Append(sender.stream, [event("manifests", timer["schedule_id"], entry, now, "update")])]


async def _drop_orphan(store: Store, key: str, raw: bytes) -> None:
    """A timer whose schedule was cancelled or replaced (or that another process fired)."""
    index = _index_of(raw)
    if index is not None:
        current = await store.kv_get(SCHEDULE_NS, index)
        if current is not None and current.decode() == key:
            return  # the timer row changed under us: another scheduler fired it
    with contextlib.suppress(ConditionFailed):
        await store.commit([KvCheck(TIMER_NS, key, raw), KvPut(TIMER_NS, key, None)])


def _index_of(raw: bytes) -> str | None:
    """The schedule index key of a (decodable) timer row."""
    try:
        value = orjson.loads(raw)
        return schedule_key(value["owner"], value["schedule_id"])
    except (ValueError, TypeError, KeyError):
        return None
