"""Durable timers: delayed sends and cron ticks, fired exactly once.

Each timer is a side-table row (namespace ``timer``) whose key starts with its due time, so the
due ones sort first. A second row per schedule (namespace ``schedule``, key ``{url}|{id}``) points
at the schedule's current timer. Firing a timer is one transaction that checks both rows are
unchanged (compare-and-set), deletes the timer, delivers its effect (an inbox message for a
future send, a ``wakes`` event for a cron tick, with the entity marked pending) and, for cron,
stores the next timer. Two schedulers (two processes) racing for the same timer cannot both
commit, so every due time fires once. Due timers are fired in batches, many per transaction with
every timer's checks in it (see :func:`fire_due`), so a burst of timers costs a few commits.

**Catch-up policy.** A timer that is overdue (the process was down) fires once, as soon as a
scheduler runs, with ``late_ms`` telling how late it is. A cron schedule then skips every tick
that was missed in the meantime (they are counted in ``missed``) and is re-armed for the next due
time after *now*: after downtime there is one tick, never a burst.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import orjson
from croniter import croniter
from pydantic import BaseModel, ConfigDict

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

from ._errors import ContextError, EntitiesError
from ._manifest import ScheduleEntry
from ._records import PENDING_NS, SCHEDULE_NS, TIMER_NS
from ._urls import EntityURL, parse_url

__all__ = [
    "TimerValue",
    "fire_due",
    "fire_rows",
    "fire_turn",
    "next_cron",
    "next_due",
    "schedule_key",
    "sent_entry",
    "timer_key",
]

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


class TimerValue(BaseModel):
    """What a timer does when due."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["future_send", "cron", "debounce", "timeout"]
    v: int = 1
    owner: str  # the entity that scheduled it
    schedule_id: str
    due: float
    target: str | None = None
    payload: Any = None
    message_type: str | None = None
    expression: str | None = None
    timezone: str = "UTC"

    def dump(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


_SEND_FIELDS = frozenset(TimerValue.model_fields)


def sent_entry(timer: Mapping[str, Any], now: float, late_ms: float) -> dict[str, Any]:
    """The sender's ``schedule`` manifest entry of a delivered delayed send (status ``sent``),
    as :class:`ScheduleEntry` dumps it; ``timer`` is the timer's fields."""
    return {
        "v": 1,
        "id": timer["schedule_id"],
        "kind": "schedule",
        "schedule_type": "future_send",
        "expression": None,
        "timezone": None,
        "fire_at": timer["due"],
        "target_url": timer["target"],
        "payload": timer["payload"],
        "message_type": timer["message_type"],
        "status": "sent",
        "sent_at": now,
        "late_ms": late_ms,
    }


def timer_key(due: float, owner: str, schedule_id: str) -> str:
    """The side-table key of a timer: sorts by due time."""
    return f"{due:017.6f}|{owner}|{schedule_id}"


def _delivery(timer: Mapping[str, Any], now: float) -> tuple[bytes, bytes]:
    """A delayed send's two events when delivered at ``now``: the inbox message for its target
    and the update of its schedule entry (``sent``) in the sender's manifest."""
    from ._runtime import _inbox, event  # late import: no cycle at load

    schedule_id = timer["schedule_id"]
    inbox = _inbox(timer["payload"], timer["message_type"], timer["owner"], now)
    inbox["schedule_id"] = schedule_id
    inbox["due"] = timer["due"]
    late_ms = round(max(0.0, now - timer["due"]) * 1000, 3)
    entry = sent_entry(timer, now, late_ms)
    return (
        event("inbox", schedule_id.removeprefix("send:"), inbox, now),
        event("manifests", schedule_id, entry, now, operation="update"),
    )


def _due_of(key: str) -> float | None:
    """The due time a :func:`timer_key` starts with (``None`` for a key it did not write)."""
    try:
        return float(key.split("|", 1)[0])
    except ValueError:
        return None


def _due_by(now: float) -> str:
    """The first key past every timer due at ``now``: they sort below it."""
    return f"{now:017.6f}|~"


def schedule_key(owner: str, schedule_id: str) -> str:
    return f"{owner}|{schedule_id}"


def next_cron(expression: str, timezone: str, after: float) -> float:
    """The first time strictly after ``after`` that the cron expression names.

    Raises:
        ContextError: invalid expression or unknown timezone.
    """
    if not croniter.is_valid(expression):
        raise ContextError(f"invalid cron expression {expression!r}")
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ContextError(f"unknown timezone {timezone!r}") from None
    start = datetime.fromtimestamp(after, tz=UTC).astimezone(zone)
    nxt = croniter(expression, start).get_next(datetime)
    assert isinstance(nxt, datetime)
    return nxt.timestamp()


def timeout_timer(owner: str, source: str, timeout_ms: int, now: float) -> TimerValue:
    """The timer that wakes ``owner`` when ``source`` stayed quiet for ``timeout_ms``."""
    return TimerValue(
        kind="timeout",
        owner=owner,
        schedule_id=f"timeout:{source}",
        due=now + timeout_ms / 1000,
        payload={"source": source, "timeout_ms": timeout_ms},
    )


def debounce_timer(
    owner: str,
    source: str,
    debounce_ms: int,
    now: float,
    changes: list[Any],
    timeout_ms: int | None,
) -> TimerValue:
    """The timer that delivers ``changes`` once ``source`` was quiet for ``debounce_ms``."""
    return TimerValue(
        kind="debounce",
        owner=owner,
        schedule_id=f"debounce:{source}",
        due=now + debounce_ms / 1000,
        payload={"source": source, "changes": changes, "timeout_ms": timeout_ms},
    )


def cron_schedule(
    owner: str,
    id: str,
    expression: str,
    *,
    timezone: str,
    payload: Any,
    now: float,
    existing: Mapping[str, Any] | None,
) -> tuple[TimerValue, str | None, ScheduleEntry]:
    """A cron schedule's timer, the timer it replaces (if ``existing`` had one) and its manifest
    entry; shared by ``ctx.schedule_cron`` and ``Runtime.schedule_cron``.

    Raises:
        ContextError: invalid expression or unknown timezone.
    """
    schedule_id = f"cron:{id}"
    fire_at = next_cron(expression, timezone, now)
    replaces = None
    if existing and existing.get("fire_at") is not None:
        replaces = timer_key(existing["fire_at"], owner, schedule_id)
    timer = TimerValue(
        kind="cron",
        owner=owner,
        schedule_id=schedule_id,
        due=fire_at,
        payload=payload,
        expression=expression,
        timezone=timezone,
    )
    entry = ScheduleEntry(
        id=schedule_id,
        schedule_type="cron",
        expression=expression,
        timezone=timezone,
        fire_at=fire_at,
        payload=payload,
        status="active",
    )
    return timer, replaces, entry


def arm_ops(timer: TimerValue, replaces: str | None = None) -> list[Op]:
    """Operations that store a timer (and make it the schedule's current one)."""
    key = timer_key(timer.due, timer.owner, timer.schedule_id)
    ops: list[Op] = [KvPut(TIMER_NS, key, timer.dump())]
    if timer.kind != "future_send":  # a one-shot send is cancelled by deleting its timer row
        ops.append(KvPut(SCHEDULE_NS, schedule_key(timer.owner, timer.schedule_id), key.encode()))
    if replaces is not None and replaces != key:
        ops.insert(0, KvPut(TIMER_NS, replaces, None))
    return ops


def cancel_ops(owner: str, schedule_id: str, current_key: str | None) -> list[Op]:
    """Operations that cancel a schedule: its index row goes, so its timer can no longer fire."""
    ops: list[Op] = [KvPut(SCHEDULE_NS, schedule_key(owner, schedule_id), None)]
    if current_key is not None:
        ops.append(KvPut(TIMER_NS, current_key, None))
    return ops


async def next_due(store: Store) -> float | None:
    """The due time of the earliest timer, or ``None``."""
    first = await store.kv_scan(TIMER_NS, "", limit=1)
    return _due_of(first[0][0]) if first else None


async def fire_turn(store: Store, now: float, limit: int) -> tuple[int, float | None]:
    """One look at the timers for a running worker: fire what is due at ``now`` (up to
    ``limit``) and return ``(fired, next)``, where ``next`` is when to look again: the due time
    of the first timer left (``now`` when more than ``limit`` were due), or ``None`` if none is
    left. One scan serves both.
    """
    rows = await store.kv_scan(TIMER_NS, "", limit=limit + 1)
    cutoff = _due_by(now)
    due = [row for row in rows[:limit] if row[0] < cutoff]
    fired = await fire_rows(store, due, now) if due else 0
    if len(due) == len(rows):
        return fired, None
    after = _due_of(rows[len(due)][0])  # None: not a key timer_key wrote, never due
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
    """
    due = await store.kv_scan(TIMER_NS, "", end=_due_by(now), limit=limit)
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
    """The operations that fire every timer of ``chunk`` together: every timer's checks, one
    pending mark per woken entity and one append per stream.

    Delayed sends (the bulk of timers) take a lean path: no model validation (the row was
    written by :meth:`TimerValue.dump`) and no per-timer op lists; anything else, or a row that
    does not look like a current delayed send, goes through :func:`_timer_ops`.
    """
    from ._runtime import new_token  # late import: no cycle at load

    kv_ops: list[Op] = []
    appends: dict[str, list[bytes]] = {}
    pending: dict[str, Op] = {}
    urls: dict[str, EntityURL] = {}
    token = new_token()  # fresh per transaction: a wake claimed earlier cannot clear these marks
    set_aside = 0
    for key, raw in chunk:
        try:
            timer = orjson.loads(raw)
            lean = type(timer) is dict and timer.get("kind") == "future_send"
            if lean and timer.keys() == _SEND_FIELDS and timer["v"] == 1:
                owner = timer["owner"]
                if not (type(timer["due"]) is float and type(timer["schedule_id"]) is str):
                    raise ValueError("not a delayed send")
                owner_url = urls.get(owner) or urls.setdefault(owner, parse_url(owner))
                target_text = timer["target"] or owner
                target = urls.get(target_text) or urls.setdefault(
                    target_text, parse_url(target_text)
                )
            else:
                lean = False
        except (ValueError, TypeError, EntitiesError):
            lean = False  # let the full decoding below say what is wrong
        if lean:
            inbox, sent = _delivery(timer, now)
            kv_ops.append(KvCheck(TIMER_NS, key, raw))
            kv_ops.append(KvPut(TIMER_NS, key, None))
            if target.url not in pending:
                pending[target.url] = KvPut(PENDING_NS, target.url, token)
            appends.setdefault(target.stream, []).append(inbox)
            appends.setdefault(owner_url.stream, []).append(sent)
            continue
        try:
            ops, _index = _timer_ops(key, raw, now, urls, token)
        except _BadTimer as bad:
            logger.error("%s; moved to namespace %r", bad, BAD_TIMER_NS)
            kv_ops.extend(bad.ops)
            set_aside += 1
            continue
        for op in ops:
            if isinstance(op, Append):
                appends.setdefault(op.path, []).extend(op.messages)
            elif isinstance(op, KvPut) and op.namespace == PENDING_NS and not op.only_if:
                pending[op.key] = op  # one pending mark per entity is enough
            else:
                kv_ops.append(op)
    merged = [
        *kv_ops,
        *pending.values(),
        *(Append(path, messages) for path, messages in appends.items()),
    ]
    return merged, set_aside


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


def _timer_ops(
    key: str,
    raw: bytes,
    now: float,
    urls: dict[str, EntityURL] | None = None,
    token: bytes | None = None,
) -> tuple[list[Op], str]:
    """The operations that fire one timer (checks first), and its schedule index key.
    ``urls`` memoises parsed entity URLs across the timers of one batch; ``token`` is the
    pending mark to write (one per transaction; a new one if not given)."""
    from ._runtime import event, iso, new_token  # late import: no cycle at load

    mark = token or new_token()

    memo: dict[str, EntityURL] = {} if urls is None else urls

    def url_of(text: str) -> EntityURL:
        parsed = memo.get(text)
        if parsed is None:
            parsed = memo[text] = parse_url(text)
        return parsed

    try:
        timer = TimerValue.model_validate(orjson.loads(raw))
        owner = url_of(timer.owner)
        if timer.target is not None:
            url_of(timer.target)
    except (ValueError, TypeError, EntitiesError) as exc:  # JSON, validation, bad URLs
        raise _BadTimer(key, raw, exc) from None
    index = schedule_key(timer.owner, timer.schedule_id)
    checks: list[Op] = [
        KvCheck(TIMER_NS, key, raw),
        KvCheck(SCHEDULE_NS, index, key.encode()),
        KvPut(TIMER_NS, key, None),
    ]
    late_ms = round(max(0.0, now - timer.due) * 1000, 3)
    ops: list[Op]
    if timer.kind == "future_send":
        # one-shot: the timer row is the whole schedule (cancel deletes it), so checking and
        # deleting that row is enough for exactly-once
        target = url_of(timer.target or timer.owner)
        inbox, sent = _delivery(timer.model_dump(mode="json"), now)
        ops = [
            KvCheck(TIMER_NS, key, raw),
            KvPut(TIMER_NS, key, None),
            Append(target.stream, [inbox]),
            KvPut(PENDING_NS, target.url, mark),
            Append(owner.stream, [sent]),
        ]
    elif timer.kind in ("debounce", "timeout"):
        ops = _observation_ops(timer, checks, index, owner.url, owner.stream, late_ms, now)
    else:
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
        following = timer.model_copy(update={"due": nxt})
        ops = [
            *checks,
            Append(
                owner.stream,
                [event("wakes", f"{timer.schedule_id}@{timer.due:.6f}", tick, now)],
            ),
            KvPut(PENDING_NS, owner.url, mark),
            *arm_ops(following),
        ]
    return ops, index


async def _fire_one(store: Store, key: str, raw: bytes, now: float) -> int:
    """Fire one timer in one transaction; 1 if it fired here, 0 if not (fired elsewhere,
    cancelled or replaced, or its target is gone)."""
    try:
        ops, index = _timer_ops(key, raw, now)
    except _BadTimer as bad:
        logger.error("%s; moved to namespace %r", bad, BAD_TIMER_NS)
        with contextlib.suppress(ConditionFailed):
            await store.commit(bad.ops)
        return 0
    try:
        await store.commit(ops)
        return 1
    except ConditionFailed:
        await _drop_orphan(store, key, raw, index)
    except (StreamNotFound, StreamGone, StreamClosed) as exc:
        logger.info("timer %s has nowhere to go (%s); dropped", key, exc)
        try:
            await store.commit([KvCheck(TIMER_NS, key, raw), KvPut(TIMER_NS, key, None)])
        except ConditionFailed:
            pass
    return 0


def _observation_ops(
    timer: TimerValue,
    checks: list[Op],
    index: str,
    owner_url: str,
    owner_stream: str,
    late_ms: float,
    now: float,
) -> list[Op]:
    """A debounced change wake or a quiet-period (timeout) wake of an observer."""
    from ._runtime import event, new_token  # late import: no cycle at load

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
    ops: list[Op] = [
        *checks,
        KvPut(SCHEDULE_NS, index, None),
        Append(owner_stream, [event("wakes", f"{timer.schedule_id}@{timer.due:.6f}", wake, now)]),
        KvPut(PENDING_NS, owner_url, new_token()),
    ]
    timeout_ms = payload.get("timeout_ms")
    if timeout_ms:  # a heartbeat: (re)start the quiet-period timer
        ops.extend(arm_ops(timeout_timer(timer.owner, str(source), timeout_ms, now)))
    return ops


async def _drop_orphan(store: Store, key: str, raw: bytes, index: str) -> None:
    """A timer whose schedule was cancelled or replaced (or that another process fired)."""
    current = await store.kv_get(SCHEDULE_NS, index)
    if current is not None and current.decode() == key:
        return  # the timer row changed under us: another scheduler fired it
    try:
        await store.commit([KvCheck(TIMER_NS, key, raw), KvPut(TIMER_NS, key, None)])
    except ConditionFailed:
        pass
