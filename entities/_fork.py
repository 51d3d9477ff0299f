"""Fork: a new entity whose history is another's up to a point, then its own.

The new entity's stream is a ``streams`` fork of the source's (no copy: its prefix is read from
the source), followed by one ``entity_created`` change naming the new entity and deletes of the
manifest rows that stay with the source (children, schedules). Its record acknowledges
everything up to that point, so forking runs no handler for the shared history; its snapshot
is written with it, so its first wake folds nothing of the shared history.

The fork point is an offset of the source's stream (the messages up to it are shared), the
string ``"latest_completed_run"`` (the end of the commit of the source's last completed wake),
or, by default, the source's tail. Messages the source had not processed by that point are
queued in the fork again (same keys), so the fork answers them too.
"""

from __future__ import annotations

from typing import Any

import orjson

from streams import (
    BadOffset,
    Create,
    KvPut,
    Op,
    Store,
    StreamGone,
    StreamNotFound,
    format_offset,
    parse_offset,
)

from ._errors import DuplicateEntity, EntityNotFound, InvalidForkPoint
from ._events import event, iso, new_token
from ._pipeline.load import load_range, messages_between, snapshot
from ._records import ENTITY_NS, PENDING_NS, SNAPSHOT_NS, TAG_NS, EntityRecord
from ._urls import EntityURL

__all__ = ["LATEST_COMPLETED_RUN", "fork_ops", "fork_point"]

LATEST_COMPLETED_RUN = "latest_completed_run"
_LEFT_WITH_SOURCE = ("child", "schedule")  # manifest kinds a fork does not take over


def _position(offset: str, url: str) -> int:
    try:
        position = parse_offset(offset)
    except BadOffset:
        raise InvalidForkPoint(f"malformed fork offset {offset!r}", url=url) from None
    if position is None:
        raise InvalidForkPoint("fork at an offset, not 'now'", url=url)
    return position


async def fork_point(store: Store, source: EntityRecord, at: str | None) -> str:
    """The offset of ``source``'s stream a fork at ``at`` shares history up to: by default its
    tail; for ``"latest_completed_run"`` the end of that run's commit.

    Raises:
        InvalidForkPoint: ``at`` is malformed, beyond the source's tail, or names a run that
            does not exist; or the source has not run yet.
        EntityNotFound: the source's stream is gone.
    """
    target = EntityURL(source.type, source.id)
    if source.acked == "-1":
        raise InvalidForkPoint(
            f"{source.url} has not run yet: spawn a new entity instead", url=source.url
        )
    try:
        tail = (await store.head(target.stream)).next_offset
    except (StreamNotFound, StreamGone):
        raise EntityNotFound(f"no entity at {source.url}", url=source.url) from None
    if at is None:
        return tail
    if at == LATEST_COMPLETED_RUN:
        found = await _latest_completed(store, target)
        if found is None:
            raise InvalidForkPoint(f"{source.url} has no completed run", url=source.url)
        return found
    position = _position(at, source.url)
    if position > _position(tail, source.url):
        raise InvalidForkPoint(f"fork offset {at} is beyond {source.url}'s tail", url=source.url)
    return format_offset(position)


async def _latest_completed(store: Store, target: EntityURL) -> str | None:
    """The offset after the commit of the last completed run in ``target``'s stream: its
    ``runs`` row is the first event of that commit, followed by the rows the wake wrote
    (stamped with its wake id) and its journal entries."""
    found: str | None = None
    wake: str | None = None  # the wake whose commit is being followed
    async for message in messages_between(store, target.stream, "-1"):
        item = orjson.loads(message.data)
        value = item.get("value")
        if wake is not None and _of_wake(item, wake):
            found = message.offset
            continue
        wake = None
        if item.get("type") == "runs" and isinstance(value, dict):
            if value.get("status") == "completed":
                wake, found = item.get("key"), message.offset
    return found


def _of_wake(item: dict[str, Any], wake: str) -> bool:
    """Whether the change ``item`` was written by the commit of ``wake``."""
    if (item.get("headers") or {}).get("txid") == wake:
        return True
    value = item.get("value")
    return item.get("type") == "steps" and isinstance(value, dict) and value.get("wake_id") == wake


async def _unprocessed(store: Store, stream: str, acked: str, at: str) -> list[bytes]:
    """The wake events (messages, wakes) of ``stream`` in ``(acked, at]``: what the source
    had not processed by the fork point, delivered to the fork again."""
    return [
        message.data
        async for message in messages_between(store, stream, acked, at)
        if orjson.loads(message.data).get("type") in ("inbox", "wakes")
    ]


async def fork_ops(
    store: Store, source: EntityRecord, target: EntityURL, at: str, now: float
) -> tuple[list[Op], EntityRecord]:
    """The operations that create ``target`` as a fork of ``source`` at offset ``at`` (see the
    module), and the new entity's record. What the source had not processed by ``at``
    (messages after its acknowledged offset) is queued in the fork again, after its
    ``entity_created`` change; the fork is then pending.

    Raises:
        DuplicateEntity: ``target`` exists (checked again by the commit).
        EntityNotFound: the source's stream is gone.
    """
    if await store.kv_get(ENTITY_NS, target.url) is not None:
        raise DuplicateEntity(f"entity {target.url} already exists", url=target.url)
    src = EntityURL(source.type, source.id)
    try:
        loaded = await load_range(store, src, at, at)
        queued = await _unprocessed(store, src.stream, source.acked, at)
    except (StreamNotFound, StreamGone):
        raise EntityNotFound(f"no entity at {source.url}", url=source.url) from None
    view = loaded.view
    created = dict((view.get("entity_created") or {}).get("entity") or {})
    created.update(
        url=target.url,
        parent_url=None,
        created_at=iso(now),
        forked_from=source.url,
        fork_offset=at,
    )
    changes = [event("entity_created", "entity", created, now)]
    manifest = view.get("manifests") or {}
    left = [k for k, row in manifest.items() if row.get("kind") in _LEFT_WITH_SOURCE]
    changes.extend(event("manifests", key, None, now, "delete") for key in left)
    acked = format_offset(_position(at, source.url) + len(changes))
    # the fork's view at ``acked``: the source's at ``at`` with the same changes applied
    folded: dict[str, dict[str, Any]] = {k: dict(v) for k, v in view.items()}
    folded.setdefault("entity_created", {})["entity"] = created
    for key in left:
        folded["manifests"].pop(key, None)
    record = EntityRecord(
        url=target.url,
        type=target.type,
        id=target.id,
        created_at=now,
        acked=acked,
        last_active=now,
    )
    ops: list[Op] = [
        Create(
            target.stream,
            content_type="application/json",
            fork_from=src.stream,
            fork_offset=at,
            messages=(*changes, *queued),
            exclusive=True,
        ),
        KvPut(ENTITY_NS, target.url, record.dump(), only_if=True, expect=None),
        KvPut(SNAPSHOT_NS, target.url, snapshot(folded, acked)),
    ]
    if queued:
        ops.append(KvPut(PENDING_NS, target.url, new_token()))
    for name, row in (view.get("tags") or {}).items():
        value = row.get("value") if isinstance(row, dict) else None
        if isinstance(value, str):
            ops.append(KvPut(TAG_NS, f"{target.url}\n{name}", value.encode()))
    return ops, record
