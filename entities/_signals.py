"""Signals: pause, resume and interrupt an entity while it lives.

* ``pause``: no new wake of the entity starts (messages queue; a running wake finishes). The
  pause is a row of its own (side table ``paused``), not a change of the entity record, so a
  running wake's commit, checked against the record it claimed, is not fenced by it. Workers
  leave paused entities out of their scans, and every claim checks, in its own commit, that
  the entity is not paused, so no wake starts after the pause is stored.
* ``resume``: removes that row and marks the entity pending: what queued meanwhile runs.
* ``interrupt``: the running wake (or the one waiting for its retry) ends as ``interrupted``:
  its range is acknowledged (its messages are not delivered again; their reply waits end) and
  the epoch moves on, which cancels the handler wherever it runs and fences its commit. The
  next wake starts at once for what arrived after that range.

Each signal is recorded in the entity's ``signals`` collection and appended as a ``wakes``
event of kind ``signal``, which the type's ``on_signal(ctx, signal)`` hook receives in the
entity's next wake (for a pause, the wake after the resume). A wake of signals alone runs that
hook and never the handler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, get_args

import orjson

from streams import Append, ConditionFailed, KvCheck, KvPut, Op, Store, StreamClosed

from ._clock import Clock
from ._errors import EntityNotFound, EntityStopped
from ._events import event, new_token
from ._pipeline.load import messages_between
from ._records import ENTITY_NS, PAUSED_NS, PENDING_NS, EntityRecord, Inflight
from ._replies import status_ops
from ._urls import EntityURL

__all__ = [
    "SEND_MODES",
    "SIGNALS",
    "SendMode",
    "Signal",
    "SignalName",
    "send_signal",
    "signal_of",
    "signal_ops",
]

SignalName: TypeAlias = Literal["pause", "resume", "interrupt"]
SIGNALS: tuple[str, ...] = get_args(SignalName)
SendMode: TypeAlias = Literal["queued", "steer", "interrupt"]
SEND_MODES: tuple[str, ...] = get_args(SendMode)


@dataclass(frozen=True, slots=True)
class Signal:
    """A signal as ``on_signal(ctx, signal)`` receives it."""

    signal: str
    reason: str | None = None
    sender: str | None = None
    at: float = 0.0


def signal_of(wake: dict[str, Any]) -> Signal | None:
    """The signal a ``wakes`` event value carries, or ``None`` for any other wake."""
    if wake.get("kind") != "signal":
        return None
    return Signal(
        signal=str(wake.get("signal")),
        reason=wake.get("reason"),
        sender=wake.get("from"),
        at=float(wake.get("at") or 0.0),
    )


def _events(name: str, reason: str | None, sender: str | None, now: float) -> list[bytes]:
    row = {"signal": name, "reason": reason, "from": sender, "at": now}
    key = f"{name}@{now:.6f}"
    return [
        event("signals", key, row, now),
        event("wakes", key, {"kind": "signal", "source": sender, **row}, now),
    ]


def _interrupted(
    record: EntityRecord, reason: str | None, now: float
) -> tuple[EntityRecord, bytes]:
    """The record after interrupting its wake in flight, and that wake's ``runs`` row."""
    inflight = record.inflight
    assert inflight is not None
    run = {
        "status": "interrupted",
        "wake_id": inflight.wake_id,
        "attempt": inflight.attempt,
        "from_offset": inflight.from_offset,
        "to_offset": inflight.to_offset,
        "reason": reason or "interrupted",
        "epoch": record.epoch,
        "worker": record.owner,
    }
    done = record.model_copy(
        update={
            "status": "idle",
            "acked": inflight.to_offset,
            "epoch": record.epoch + 1,
            "owner": None,
            "lease_expires": 0.0,
            "inflight": None,
            "retry_at": None,
            "last_active": now,
        }
    )
    return done, event("runs", inflight.wake_id, run, now, txid=inflight.wake_id)


async def _messages_in(store: Store, stream: str, inflight: Inflight) -> list[str]:
    """The keys of the inbox messages in the range of the wake ``inflight``."""
    keys: list[str] = []
    async for message in messages_between(store, stream, inflight.from_offset, inflight.to_offset):
        item = orjson.loads(message.data)
        if item.get("type") == "inbox" and isinstance(item.get("key"), str):
            keys.append(item["key"])
    return keys


async def signal_ops(
    store: Store,
    target: EntityURL,
    name: str,
    now: float,
    *,
    reason: str | None = None,
    sender: str | None = None,
    extra: Sequence[bytes] = (),
) -> tuple[list[Op], bool]:
    """The transaction of signal ``name`` to ``target`` (checked against the entity record
    as read now: it fails with ``ConditionFailed`` if the record moves), with the events
    ``extra`` appended after the signal's (a message sent with ``mode="interrupt"``), and
    whether it interrupts a wake.

    Raises:
        EntityNotFound: no entity there.
        EntityStopped: the entity was killed.
    """
    raw = await store.kv_get(ENTITY_NS, target.url)
    if raw is None:
        raise EntityNotFound(f"no entity at {target.url}", url=target.url)
    record = EntityRecord.load(raw)
    if record.status == "stopped":
        raise EntityStopped(f"entity {target.url} was stopped", url=target.url)
    events = _events(name, reason, sender, now)
    ops: list[Op] = [KvCheck(ENTITY_NS, target.url, raw)]
    interrupted = False
    if name == "pause":
        value = orjson.dumps({"reason": reason, "from": sender, "at": now})
        ops.append(KvPut(PAUSED_NS, target.url, value))
    elif name == "resume":
        ops.append(KvPut(PAUSED_NS, target.url, None))
    elif record.inflight is not None:
        done, run = _interrupted(record, reason, now)
        events.insert(1, run)
        ops.append(KvPut(ENTITY_NS, target.url, done.dump()))
        taken = await _messages_in(store, target.stream, record.inflight)
        ops.extend(status_ops(target.url, taken, "interrupted", reason or "interrupted"))
        interrupted = True
    ops.append(Append(target.stream, [*events, *extra]))
    if name != "pause" or extra:
        ops.append(KvPut(PENDING_NS, target.url, new_token()))
    return ops, interrupted


async def send_signal(
    store: Store,
    clock: Clock,
    target: EntityURL,
    name: str,
    *,
    reason: str | None = None,
    sender: str | None = None,
) -> bool:
    """Apply signal ``name`` to the entity at ``target`` (see the module). Returns whether it
    interrupted a wake (always ``False`` for ``pause`` and ``resume``).

    Raises:
        ValueError: ``name`` is not a signal.
        EntityNotFound: no entity there.
        EntityStopped: the entity was killed.
    """
    if name not in SIGNALS:
        raise ValueError(f"unknown signal {name!r}: one of {', '.join(SIGNALS)}")
    while True:
        ops, interrupted = await signal_ops(
            store, target, name, clock.now(), reason=reason, sender=sender
        )
        try:
            await store.commit(ops)
        except ConditionFailed:
            continue  # the record moved (a claim, a commit): look again
        except StreamClosed:
            raise EntityStopped(f"entity {target.url} was stopped", url=target.url) from None
        return interrupted
