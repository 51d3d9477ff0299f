"""The reading side of the runtime: lookups and listings of entities, their streams, views,
state and replies, and the workers sharing the store. :class:`~entities.Runtime` inherits it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from streams import Store, StreamGone, StreamNotFound, materialize

from ._clock import Clock
from ._errors import EntityNotFound
from ._observe import db_stream
from ._pipeline.affinity import WorkerInfo, read_presence
from ._records import (
    DEAD_NS,
    ENTITY_NS,
    PENDING_NS,
    TAG_NS,
    WAKE_TYPES,
    EntityInfo,
    EntityRecord,
    Outcome,
    info_of,
)
from ._registry import Registry
from ._urls import parse_url

__all__ = ["Reads"]


class Reads:
    """Reads over ``store`` (see :class:`~entities.Runtime`)."""

    store: Store
    registry: Registry
    clock: Clock

    # -- lookups ------------------------------------------------------------------------------

    async def record(self, url: str) -> tuple[EntityRecord, bytes] | None:
        """The entity record and its stored bytes, or ``None``."""
        raw = await self.store.kv_get(ENTITY_NS, parse_url(url).url)
        return None if raw is None else (EntityRecord.load(raw), raw)

    async def lookup(self, url: str) -> EntityInfo | None:
        """Bookkeeping of the entity at ``url``, or ``None`` if there is none.

        Raises:
            InvalidEntityURL: ``url`` is not ``/type/id``.
        """
        found = await self.record(url)
        if found is None:
            return None
        record = found[0]
        pending = await self.store.kv_get(PENDING_NS, record.url) is not None
        tags = await self._tags(record.url)
        dead = len(await self.store.kv_scan(DEAD_NS, f"{record.url}|"))
        info = info_of(record, pending, tags, dead, orphaned=record.type not in self.registry)
        return replace(info, queue=await self.queue_depth(record)) if pending else info

    async def queue_depth(self, record: EntityRecord, *, cap: int = 10_000) -> int:
        """How many wake events (inbox messages and other wakes) wait after the entity's
        acknowledged offset (counted up to ``cap``)."""
        target = parse_url(record.url)
        count, offset = 0, record.acked
        while count < cap:
            try:
                result = await self.store.read(target.stream, offset, limit=1000, renew_ttl=False)
            except (StreamNotFound, StreamGone):
                return 0
            for message in result.messages:
                if orjson.loads(message.data).get("type") in WAKE_TYPES:
                    count += 1
            offset = result.next_offset
            if result.up_to_date or not result.messages:
                break
        return min(count, cap)

    async def get(self, url: str) -> EntityInfo:
        """Like :meth:`lookup`, raising :class:`EntityNotFound` when there is no entity."""
        info = await self.lookup(url)
        if info is None:
            raise EntityNotFound(f"no entity at {url}", url=url)
        return info

    async def _tags(self, url: str) -> dict[str, str]:
        rows = await self.store.kv_scan(TAG_NS, url + "\n")
        return {key.split("\n", 1)[1]: value.decode() for key, value in rows}

    async def workers(self) -> list[WorkerInfo]:
        """The workers that announced themselves on this store (a running worker renews its
        presence every second; a cleanly stopped one withdraws it; a crashed one shows as not
        live until its record is forgotten an hour later), by id.

        Raises whatever the store raises for a failed read.
        """
        return await read_presence(self.store, self.clock.now())

    async def list_entities(
        self,
        *,
        type: str | None = None,
        status: str | None = None,
        tag: str | None = None,
        parent: str | None = None,
    ) -> list[EntityInfo]:
        """Entities, filtered by type, status (``idle``, ``running``, ``stopped``, ``failed``:
        idle with dead letters, or ``orphaned``: of a type this runtime's registry lacks),
        parent and ``tag`` (``key`` or ``key=value``)."""
        prefix = f"/{type}/" if type else ""
        rows = await self.store.kv_scan(ENTITY_NS, prefix)
        pending = {k for k, _ in await self.store.kv_scan(PENDING_NS, prefix)}
        dead: dict[str, int] = {}
        for key, _raw in await self.store.kv_scan(DEAD_NS, prefix):
            url = key.split("|", 1)[0]
            dead[url] = dead.get(url, 0) + 1
        tags: dict[str, dict[str, str]] = {}
        for key, value in await self.store.kv_scan(TAG_NS, prefix):
            url, name = key.split("\n", 1)
            tags.setdefault(url, {})[name] = value.decode()
        result = []
        for _key, raw in rows:
            record = EntityRecord.load(raw)
            info = info_of(record, record.url in pending, tags.get(record.url, {}),
                           dead.get(record.url, 0),
                           orphaned=record.type not in self.registry)  # fmt: skip
            if status is not None and info.status != status:
                continue
            if parent is not None and record.parent != parent:
                continue
            if tag is not None:
                name, _, wanted = tag.partition("=")
                if name not in info.tags or (wanted and info.tags[name] != wanted):
                    continue
            if info.pending:
                info = replace(info, queue=await self.queue_depth(record))
            result.append(info)
        return result

    # -- reading --------------------------------------------------------------------------------

    async def read(
        self, url: str, offset: str = "-1", *, limit: int = 1000
    ) -> tuple[list[dict[str, Any]], str]:
        """Decoded change events of the entity's stream after ``offset``, and the next offset.

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        target = parse_url(url)
        try:
            result = await self.store.read(target.stream, offset, limit=limit, renew_ttl=False)
        except (StreamNotFound, StreamGone):
            raise EntityNotFound(f"no entity at {target.url}", url=target.url) from None
        decoded = []
        for message in result.messages:
            item = orjson.loads(message.data)
            item["offset"] = message.offset
            decoded.append(item)
        return decoded, result.next_offset

    async def view(self, url: str) -> dict[str, dict[str, Any]]:
        """Every collection of the entity folded from its whole stream (``type -> key -> row``).

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        target = parse_url(url)
        try:
            folded = await materialize(self.store, target.stream, use_snapshot=False, batch=5000)
        except (StreamNotFound, StreamGone):
            raise EntityNotFound(f"no entity at {target.url}", url=target.url) from None
        return folded.collections

    async def shared_state(self, id: str) -> dict[str, dict[str, Any]] | None:
        """The collections of shared-state db ``id`` (``type -> key -> row``), or ``None`` if
        there is no such db. Raises whatever the store raises for a failed read."""
        try:
            folded = await materialize(self.store, db_stream(id), use_snapshot=False, batch=5000)
        except (StreamNotFound, StreamGone):
            return None
        return folded.collections

    async def state_of(self, url: str) -> dict[str, dict[str, Any]]:
        """The entity's user state collections by name (``name -> key -> row``).

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        target = parse_url(url)
        view = await self.view(url)
        result: dict[str, dict[str, Any]] = {}
        if target.type in self.registry:  # an orphan's collections: those its stream holds
            for name, definition in self.registry.get(target.type).state.items():
                result[name] = view.get(definition.event_type(name), {})
        for type_, rows in view.items():
            if type_.startswith("state:") and type_[6:] not in result:
                result[type_[6:]] = rows
        return result

    async def inspect(self, url: str) -> dict[str, Any]:
        """Everything about an entity as JSON-ready data: bookkeeping, args, state, manifest.

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        info = await self.get(url)
        view = await self.view(url)
        created = view.get("entity_created", {}).get("entity") or {}
        data = info.to_json()
        data["args"] = created.get("args", {})
        data["state"] = await self.state_of(url)
        data["manifest"] = view.get("manifests", {})
        data["recent_runs"] = list(view.get("runs", {}).values())[-20:]
        return data

    async def replies(self, url: str, message_key: str, *, after: str = "-1") -> list[Any]:
        """The replies recorded for one inbox message (in order), searching after ``after``
        (e.g. the offset a :class:`SendReceipt` returned).

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        return (await self.outcome(url, message_key, after=after)).replies

    async def outcome(self, url: str, message_key: str, *, after: str = "-1") -> Outcome:
        """The replies to one inbox message and how the wake that took it ended so far,
        searching after ``after`` (the offset its :class:`SendReceipt` returned: the message's
        own; with ``-1`` the message is looked for too).

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        found = Outcome()
        at = None if after == "-1" else after  # the message's offset, once known
        offset = after
        while True:
            batch, offset = await self.read(url, offset, limit=5000)
            for item in batch:
                value = item.get("value")
                if not isinstance(value, dict):
                    continue
                if item["type"] == "texts" and value.get("in_reply_to") == message_key:
                    found.replies.append(value.get("value"))
                elif item["type"] == "inbox" and item["key"] == message_key:
                    at = item["offset"]
                elif item["type"] == "runs" and at is not None and _covers(value, at):
                    found.status, found.error = value["status"], value.get("error")
            if len(batch) < 5000:
                return found


def _covers(run: dict[str, Any], offset: str) -> bool:
    """Whether the wake of ``run`` (a ``runs`` row of a wake) took the event at ``offset``."""
    low, high = run.get("from_offset"), run.get("to_offset")
    return isinstance(low, str) and isinstance(high, str) and low < offset <= high
