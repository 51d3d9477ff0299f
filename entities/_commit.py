"""What a finished wake commits, as one transaction: its own events (steps, state changes, sends
to itself), its effects on others (sends, spawns, timers, tags, the parent's and observers'
wakes), the entity record acknowledging the wake's range and releasing the lease, and the
removal of the pending mark the wake was claimed under."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from streams import Append, KvCheck, KvPut, Op

from ._context import HandlerContext
from ._delivery import observer_ops, parent_ops
from ._records import ENTITY_NS, PENDING_NS, SNAPSHOT_NS, EntityRecord
from ._runtime import TAG_NS, Runtime, _inbox, event, new_token
from ._scheduler import arm_ops, cancel_ops
from ._urls import EntityURL, parse_url
from ._wakes import events_between

__all__ = ["WakeCommit", "wake_commit", "without_path"]


@dataclass(slots=True)
class WakeCommit:
    """The operations of a finished wake's commit."""

    ops: list[Op]
    clear: KvPut  # removes the pending mark the wake was claimed under, if it is still that one
    record: bytes  # the entity record it writes (idle, range acknowledged)
    more: bool  # the entity stays pending (it sent to itself, or the wake was a redelivery)


async def wake_commit(
    rt: Runtime,
    url: EntityURL,
    record: EntityRecord,
    raw: bytes,
    token: bytes,
    own_head: list[bytes],
    contexts: Sequence[HandlerContext],
    view: dict[str, dict[str, Any]],
    snapshot_offset: str,
    now: float,
    *,
    empty: bool = False,
    run_status: str | None = None,
    error: str | None = None,
) -> WakeCommit:
    """The commit of the wake ``record.inflight`` of ``url``, claimed as ``raw`` under the
    pending mark ``token``: checked against ``raw``, so a fenced wake changes nothing.

    Raises whatever the store raises for the reads behind parent and observer wakes.
    """
    inflight = record.inflight
    assert inflight is not None
    own: list[bytes] = list(own_head)
    by_target: dict[str, list[bytes]] = {}
    extra: list[Op] = []
    self_pending = False
    for ctx in contexts:
        for entry in ctx.effects.journal:
            own.append(event("steps", f"{entry['wake_id']}/{entry['name']}", entry, now))
        for change in ctx.effects.own:
            own.append(orjson.dumps(change))
            if change["type"] == "tags":
                value = change.get("value")
                encoded = None if value is None else str(value.get("value", "")).encode()
                extra.append(KvPut(TAG_NS, f"{url.url}\n{change['key']}", encoded))
        for timer in ctx.effects.timers:
            if timer.timer is None:
                extra.extend(cancel_ops(url.url, timer.schedule_id, timer.replaces))
            else:
                extra.extend(arm_ops(timer.timer, timer.replaces))
        for spawn in ctx.effects.spawns:
            extra.extend(
                rt.spawn_ops(
                    spawn.target,
                    spawn.args,
                    tags=spawn.tags,
                    parent=url.url,
                    initial_message=spawn.initial_message,
                    initial_message_type=spawn.initial_message_type,
                    parent_wake=spawn.wake,
                )
            )
        for send in ctx.effects.sends:
            message = event(
                "inbox", send.key, _inbox(send.payload, send.message_type, url.url, now), now
            )
            if send.target == url:
                own.append(message)
                self_pending = True
            else:
                by_target.setdefault(send.target.url, []).append(message)
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
        ops.extend(await parent_ops(rt, url, record, contexts, run_status, error, now))
    if not empty:
        ops.extend(await observer_ops(rt, url, contexts, run_status, error, view, now))
    ops.extend(extra)
    for target_url, messages in by_target.items():
        target = parse_url(target_url)
        ops.append(Append(target.stream, messages))
        ops.append(KvPut(PENDING_NS, target.url, new_token()))
    done_raw = done.dump()
    ops.append(KvPut(ENTITY_NS, url.url, done_raw))
    clear = KvPut(PENDING_NS, url.url, None, only_if=True, expect=token)
    ops.append(clear)
    more = self_pending or inflight.attempt > 1
    if more:
        # A redelivered or retried wake runs the event range of an earlier claim, but the
        # pending token it holds may stand for later messages: keep the entity pending
        # (at worst one empty wake follows) rather than strand them unprocessed.
        ops.append(KvPut(PENDING_NS, url.url, new_token()))
    if events_between(snapshot_offset, inflight.to_offset) >= rt.snapshot_every:
        snap = {"offset": inflight.to_offset, "collections": view}
        ops.append(KvPut(SNAPSHOT_NS, url.url, orjson.dumps(snap)))
    return WakeCommit(ops, clear, done_raw, more)


def without_path(ops: list[Op], path: str) -> list[Op]:
    """``ops`` minus the appends to ``path`` and the pending marks of its entity."""
    url = "/" + path.removesuffix("/main")
    return [
        op
        for op in ops
        if not (isinstance(op, Append) and op.path == path)
        and not (isinstance(op, KvPut) and op.namespace == PENDING_NS and op.key == url)
    ]
