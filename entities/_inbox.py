"""Inbox control: cancel or edit a message while it is queued, before a wake takes it.

Both are State Protocol changes of the message's row in the ``inbox`` collection: a
``delete`` (cancel) or an ``update`` carrying the new payload (edit), appended to the entity's
stream. The wake that later takes the range folds them (see
:func:`entities._pipeline.load.wake_event`): a cancelled message is not delivered, an edited
one is delivered with its new payload at its place; an outside reader folding the stream sees
the same.

"Taken" means inside the range of a wake that was claimed (acknowledged, or in flight); such a
message can no longer change (``MessageNotQueued``). The change commits only if the entity
record is still the one read, and, when no wake is in flight, it also rewrites the record, so
a claim that loaded its range before the change cannot commit: either the change lands
before the next claim loads (and the message is folded away or edited) or it is refused.
While a wake runs, the record is left alone (changing it would fence that wake); the next
claim can only come after that wake's commit, and loads the change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from streams import Append, ConditionFailed, KvCheck, KvPut, Op, Store, StreamClosed

from ._clock import Clock
from ._errors import EntityNotFound, EntityStopped, MessageNotQueued
from ._events import event
from ._pipeline.load import messages_between
from ._records import ENTITY_NS, EntityRecord
from ._replies import status_ops
from ._urls import EntityURL

__all__ = ["change_queued"]


async def _queued(store: Store, target: EntityURL, after: str, key: str) -> dict[str, Any] | None:
    """The current value of message ``key`` if it is queued after ``after`` (folding earlier
    edits), else ``None`` (absent there, or cancelled)."""
    found: dict[str, Any] | None = None
    async for message in messages_between(store, target.stream, after):
        if b'"inbox"' not in message.data:
            continue
        item = orjson.loads(message.data)
        if item.get("type") != "inbox" or item.get("key") != key:
            continue
        operation = item.get("headers", {}).get("operation")
        value = item.get("value") or {}
        if operation == "delete":
            found = None
        elif operation == "update":
            found = None if found is None else {**found, **value}
        else:
            found = dict(value)
    return found


async def change_queued(
    store: Store,
    clock: Clock,
    target: EntityURL,
    key: str,
    *,
    payload: Any = None,
    message_type: str | None = None,
    validate: Callable[[Any, str | None], Any] | None = None,
    cancel: bool = False,
) -> dict[str, Any]:
    """Cancel (``cancel=True``) or replace the payload of the queued message ``key`` of
    ``target`` (checked by ``validate(payload, message type)``, the new type or else the
    message's own); returns the message's row as it now is (``{}`` once cancelled).

    Raises:
        EntityNotFound: no entity there.
        EntityStopped: the entity was killed.
        MessageNotQueued: no queued message of that key: a wake took it, it was cancelled, or
            it was never sent.
        Whatever ``validate`` raises.
    """
    while True:
        raw = await store.kv_get(ENTITY_NS, target.url)
        if raw is None:
            raise EntityNotFound(f"no entity at {target.url}", url=target.url)
        record = EntityRecord.load(raw)
        if record.status == "stopped":
            raise EntityStopped(f"entity {target.url} was stopped", url=target.url)
        taken = record.inflight.to_offset if record.inflight is not None else record.acked
        current = await _queued(store, target, taken, key)
        if current is None:
            raise MessageNotQueued(
                f"message {key!r} is not queued at {target.url}: a wake took it already, it was "
                "cancelled, or it was never sent",
                url=target.url,
            )
        now = clock.now()
        if cancel:
            change, row = event("inbox", key, None, now, "delete"), {}
        else:
            kind = message_type if message_type is not None else current.get("message_type")
            checked = payload if validate is None else validate(payload, kind)
            row = {**current, "payload": checked, "message_type": kind, "edited_at": now}
            change = event("inbox", key, row, now, "update")
        ops: list[Op] = [KvCheck(ENTITY_NS, target.url, raw), Append(target.stream, [change])]
        if cancel:
            ops.extend(status_ops(target.url, [key], "cancelled", None))
        if record.inflight is None:
            touched = record.model_copy(update={"last_active": max(now, record.last_active)})
            if touched == record:
                touched = record.model_copy(update={"last_active": record.last_active + 1e-6})
            ops.append(KvPut(ENTITY_NS, target.url, touched.dump()))
        try:
            await store.commit(ops)
        except ConditionFailed:
            continue  # a claim or a commit moved the record: look again
        except StreamClosed:
            raise EntityStopped(f"entity {target.url} was stopped", url=target.url) from None
        return row
