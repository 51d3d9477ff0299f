"""Durable timers as values: a timer row (namespace ``timer``, keyed by due time so due ones sort
first) and its schedule index row (namespace ``schedule``, key ``{url}|{id}``, pointing at the
schedule's current timer); the operations that arm and cancel them; cron arithmetic. Firing them
is a stage of the wake pipeline (:mod:`entities._pipeline.fire`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from croniter import croniter
from pydantic import BaseModel, ConfigDict

from streams import KvPut, Op, Store

from ._errors import ContextError
from ._manifest import ScheduleEntry
from ._records import SCHEDULE_NS, TIMER_NS

__all__ = [
    "SEND_FIELDS",
    "TimerValue",
    "arm_ops",
    "cancel_ops",
    "cron_schedule",
    "debounce_timer",
    "due_by",
    "due_of",
    "next_cron",
    "next_due",
    "schedule_key",
    "sent_entry",
    "timeout_timer",
    "timer_key",
]


class TimerValue(BaseModel):
    """What a timer does when due."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["future_send", "cron", "debounce", "timeout", "approval"]
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


SEND_FIELDS = frozenset(TimerValue.model_fields)


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


def due_of(key: str) -> float | None:
    """The due time a :func:`timer_key` starts with (``None`` for a key it did not write)."""
    try:
        return float(key.split("|", 1)[0])
    except ValueError:
        return None


def due_by(now: float) -> str:
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
    return due_of(first[0][0]) if first else None
