"""Stage 5, the commit: how a wake ends, as one transaction checked against the exact entity
record its claim wrote (so a fenced wake changes nothing).

A finished wake (:func:`wake_commit`) commits its own events (steps, state changes, replies,
sends to itself, its run record), its effects on others (sends, spawns, timers, tags, and the
wakes of its parent and observers, see :mod:`.deliver`), the entity record acknowledging the
wake's range and releasing the lease, the removal of the pending mark it was claimed under and,
every so often, a snapshot of the view. A failed attempt (:func:`retry_commit`) records the
failure and its journal and releases the lease with a retry time; the last failed attempt is
dead-lettered: recorded, acknowledged and committed like a finished wake, with the effects of
the type's ``on_error`` hook.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streams import Append, KvCheck, KvPut, Op, Store

from .._effects import Effects
from .._events import encode, event, new_token
from .._records import (
    DEAD_NS,
    ENTITY_NS,
    PENDING_NS,
    SNAPSHOT_NS,
    TAG_NS,
    DeadLetter,
    EntityRecord,
    Inflight,
)
from .._replies import replies_of, reply_ops
from .._timers import arm_ops, cancel_ops
from .._urls import EntityURL
from .._wake import WakeEvent
from .deliver import ObserverCache, observer_ops, parent_ops
from .inbox import Deliveries, message_event, spawn_ops
from .load import View, events_between, snapshot

__all__ = [
    "WakeCommit",
    "dead_letter_op",
    "error_event",
    "format_exception",
    "retry_commit",
    "run_value",
    "wake_commit",
    "without_path",
]


@dataclass(slots=True)
class WakeCommit:
    """The operations of a finished wake's commit."""

    ops: list[Op]
    clear: KvPut  # removes the pending mark the wake was claimed under, if it is still that one
    record: bytes  # the entity record it writes (idle, range acknowledged)
    more: bool  # the entity stays pending (it sent to itself, or the wake was a redelivery)
    replies: list[tuple[str, Any]]  # the wake's replies: (message key, value), in order


def format_exception(exc: BaseException) -> str:
    """``exc`` with its traceback, as recorded in ``errors``."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def run_value(
    record: EntityRecord,
    wake: WakeEvent,
    status: str,
    duration: float,
    *,
    error: BaseException | None = None,
) -> dict[str, Any]:
    """The ``runs`` row of the wake ``record.inflight`` (``status``: completed, failed or
    dead_lettered), with the epoch and worker that ran it."""
    inflight = record.inflight
    assert inflight is not None
    return {
        "status": status,
        "wake_id": inflight.wake_id,
        "attempt": inflight.attempt,
        "from_offset": inflight.from_offset,
        "to_offset": inflight.to_offset,
        "event_count": wake.event_count,
        "duration_ms": round(duration * 1000, 3) if math.isfinite(duration) else None,
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "epoch": record.epoch,
        "worker": record.owner,
    }


def error_event(
    inflight: Inflight, error: BaseException, now: float, *, final: bool, hook: bool = False
) -> bytes:
    """The ``errors`` row of a failed attempt (or, with ``hook``, of a failed ``on_error``)."""
    if hook:
        key = f"{inflight.wake_id}.on_error"
        value: dict[str, Any] = {"run_id": inflight.wake_id, "error": repr(error)}
    else:
        key = f"{inflight.wake_id}.{inflight.attempt}"
        value = {
            "run_id": inflight.wake_id,
            "attempt": inflight.attempt,
            "error": f"{type(error).__name__}: {error}",
            "type": type(error).__name__,
        }
    value["traceback"] = format_exception(error)
    value["final"] = final
    return event("errors", key, value, now)


def dead_letter_op(
    url: EntityURL, record: EntityRecord, wake: WakeEvent, error: BaseException, now: float
) -> KvPut:
    """The dead-letter row of the wake ``record.inflight``, given up after its last attempt."""
    inflight = record.inflight
    assert inflight is not None
    letter = DeadLetter(
        url=url.url,
        type=url.type,
        wake_id=inflight.wake_id,
        from_offset=inflight.from_offset,
        to_offset=inflight.to_offset,
        attempts=inflight.attempt,
        error=f"{type(error).__name__}: {error}",
        error_type=type(error).__name__,
        at=now,
        messages=len(wake.messages),
    )
    return KvPut(DEAD_NS, letter.key, letter.model_dump_json().encode())


def _step_events(effects: Sequence[Effects], now: float) -> list[bytes]:
    """The journal entries of ``effects`` not yet flushed, as ``steps`` events."""
    return [
        event("steps", f"{entry['wake_id']}/{entry['name']}", entry, now)
        for e in effects
        for entry in e.journal
    ]


def _effect_ops(
    url: EntityURL, effects: Sequence[Effects], now: float
) -> tuple[list[bytes], list[Op], Deliveries, bool]:
    """What ``effects`` write: events for the entity's own stream, side-table operations
    (tags, timers, spawns), deliveries to other entities, and whether it sent to itself."""
    own: list[bytes] = []
    extra: list[Op] = []
    out = Deliveries()
    self_pending = False
    for e in effects:
        for change in e.own:
            own.append(encode(change))
            if change["type"] == "tags":
                value = change.get("value")
                encoded = None if value is None else str(value.get("value", "")).encode()
                extra.append(KvPut(TAG_NS, f"{url.url}\n{change['key']}", encoded))
        for timer in e.timers:
            if timer.timer is None:
                extra.extend(cancel_ops(url.url, timer.schedule_id, timer.replaces))
            else:
                extra.extend(arm_ops(timer.timer, timer.replaces))
        for spawn in e.spawns:
            extra.extend(
                spawn_ops(
                    spawn.target,
                    spawn.args,
                    now,
                    tags=spawn.tags,
                    parent=url.url,
                    initial_message=spawn.initial_message,
                    initial_message_type=spawn.initial_message_type,
                    parent_wake=spawn.wake,
                )
            )
        for send in e.sends:
            message = message_event(send.key, send.payload, send.message_type, url.url, now)
            if send.target == url:
                own.append(message)
                self_pending = True
            else:
                out.wake(send.target, [message])
    return own, extra, out, self_pending


async def wake_commit(
    store: Store,
    url: EntityURL,
    record: EntityRecord,
    raw: bytes,
    token: bytes,
    head: list[bytes],
    effects: Sequence[Effects],
    view: View,
    snapshot_offset: str,
    now: float,
    *,
    snapshot_every: int,
    empty: bool = False,
    run_status: str | None = None,
    error: str | None = None,
    sleeping: bool = False,
    observers: ObserverCache | None = None,
) -> WakeCommit:
    """The commit of the wake ``record.inflight`` of ``url``, claimed as ``raw`` under the
    pending mark ``token``: ``head`` (its run record and error rows) and ``effects`` first,
    checked against ``raw``, so a fenced wake changes nothing. ``view`` is the entity's view
    before the wake; a snapshot of it is stored once ``snapshot_every`` events have passed
    since ``snapshot_offset``. ``sleeping``: the handler asked not to be woken again for what
    arrived while it ran (``ctx.sleep()``): the pending mark goes whatever it is now, and those
    events wait for the next one. ``observers``: the worker's copy of the entity's observers
    (the commit then checks they are current: ``ConditionFailed`` in the ``observer``
    namespace says to build it again).

    Raises whatever the store raises for the reads behind parent and observer wakes, and
    TypeError or ValueError for an effect that does not encode.
    """
    inflight = record.inflight
    assert inflight is not None
    own, extra, out, self_pending = _effect_ops(url, effects, now)
    own = [*head, *_step_events(effects, now), *own]
    done = record.model_copy(
        update={
            "owner": None,
            "status": "idle",
            "acked": inflight.to_offset,
            "inflight": None,
            "retry_at": None,
            "lease_expires": 0.0,
            "runs": record.runs + (0 if empty else 1),
            "last_active": now,
        }
    )
    ops: list[Op] = [KvCheck(ENTITY_NS, url.url, raw)]
    if own:
        ops.append(Append(url.stream, own))
    if not empty and run_status is not None:
        ops.extend(await parent_ops(store, url, record, effects, run_status, error, now))
    if not empty:
        ops.extend(
            await observer_ops(
                store, url, effects, run_status, error, view, now, record.created_at, observers
            )
        )
    ops.extend(extra)
    replies = replies_of(effects)
    ops.extend(reply_ops(url, inflight.to_offset, replies))
    ops.extend(out.ops())
    done_raw = done.dump()
    ops.append(KvPut(ENTITY_NS, url.url, done_raw))
    # the mark goes quietly: its removal is no work for any worker (the worker that ran the
    # wake looks again itself if more is pending, see ``more``)
    if sleeping:
        clear = KvPut(PENDING_NS, url.url, None, quiet=True)
    else:
        clear = KvPut(PENDING_NS, url.url, None, only_if=True, expect=token, quiet=True)
    ops.append(clear)
    more = self_pending or (inflight.attempt > 1 and not sleeping)
    if more:
        # A redelivered or retried wake runs the event range of an earlier claim, but the
        # pending token it holds may stand for later messages: keep the entity pending
        # (at worst one empty wake follows) rather than strand them unprocessed.
        ops.append(KvPut(PENDING_NS, url.url, new_token()))
    if events_between(snapshot_offset, inflight.to_offset) >= snapshot_every:
        ops.append(KvPut(SNAPSHOT_NS, url.url, snapshot(view, inflight.to_offset)))
    return WakeCommit(ops, clear, done_raw, more, replies)


def retry_commit(
    url: EntityURL,
    record: EntityRecord,
    raw: bytes,
    head: list[bytes],
    effects: Effects,
    now: float,
    delay: float,
) -> tuple[list[Op], EntityRecord, bytes]:
    """The commit of a failed attempt that will be retried ``delay`` seconds from ``now``: its
    run and error rows (``head``) and the journal it recorded (so ``now()`` and ``uuid()`` stay
    stable for the next attempt), and the record releasing the lease with a retry time; checked
    against ``raw``. Returns the operations, and the record they write with its bytes."""
    retry = record.model_copy(
        update={
            "owner": None,
            "status": "idle",
            "retry_at": now + delay,
            "lease_expires": 0.0,
            "last_active": now,
        }
    )
    retry_raw = retry.dump()
    ops: list[Op] = [
        KvCheck(ENTITY_NS, url.url, raw),
        Append(url.stream, [*head, *_step_events([effects], now)]),
        KvPut(ENTITY_NS, url.url, retry_raw),
    ]
    return ops, retry, retry_raw


def without_path(ops: list[Op], path: str) -> list[Op]:
    """``ops`` minus the appends to ``path`` and the pending marks of its entity."""
    url = "/" + path.removesuffix("/main")
    return [
        op
        for op in ops
        if not (isinstance(op, Append) and op.path == path)
        and not (isinstance(op, KvPut) and op.namespace == PENDING_NS and op.key == url)
    ]
