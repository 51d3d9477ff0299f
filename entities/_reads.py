"""The reading side of the runtime: lookups and listings of entities, their streams, views,
state and replies, and the workers sharing the store. :class:`~entities.Runtime` inherits it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from streams import Materializer, Store, StreamGone, StreamNotFound, materialize

from ._clock import Clock
from ._compaction import marks
from ._errors import EntitiesError, EntityNotFound
from ._migrations import stored_row
from ._observe import db_stream
from ._pipeline.affinity import WorkerInfo, read_presence
from ._records import (
    DEAD_NS,
    ENTITY_NS,
    PAUSED_NS,
    PENDING_NS,
    TAG_NS,
    WAKE_TYPES,
    EntityInfo,
    EntityRecord,
    Outcome,
    info_of,
)
from ._registry import Registry
from ._replies import outcome_of
from ._tail import current_view, recent_runs
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
        paused = await self.store.kv_get(PAUSED_NS, record.url) is not None
        orphaned = record.type not in self.registry
        info = info_of(record, pending, tags, dead, paused=paused, orphaned=orphaned)
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
                item = orjson.loads(message.data)
                if item.get("type") in WAKE_TYPES:
                    operation = item.get("headers", {}).get("operation")
                    if operation == "update":  # an edit, or taken by a run it steered
                        count -= 1 if (item.get("value") or {}).get("steered_into") else 0
                    else:
                        count += -1 if operation == "delete" else 1
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
        """Entities, filtered by type, status (``idle``, ``running``, ``stopped``, ``paused``,
        ``failed``: idle with dead letters, or ``orphaned``: of a type this runtime's registry
        lacks), parent and ``tag`` (``key`` or ``key=value``)."""
        prefix = f"/{type}/" if type else ""
        rows = await self.store.kv_scan(ENTITY_NS, prefix)
        pending = {k for k, _ in await self.store.kv_scan(PENDING_NS, prefix)}
        paused = {k for k, _ in await self.store.kv_scan(PAUSED_NS, prefix)}
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
                           dead.get(record.url, 0), paused=record.url in paused,
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

    async def stream_bytes(self, path: str, *, limit: int = 32 * 1024 * 1024) -> bytes:
        """The content of stream ``path`` (an attachment uploaded with the streams protocol):
        its messages' bytes, in order.

        Raises:
            EntitiesError: no such stream, or more than ``limit`` bytes.
        """
        parts: list[bytes] = []
        size, offset = 0, "-1"
        while True:
            try:
                result = await self.store.read(path.lstrip("/"), offset, renew_ttl=False)
            except (StreamNotFound, StreamGone):
                raise EntitiesError(f"no stream {path!r}") from None
            for message in result.messages:
                size += len(message.data)
                if size > limit:
                    raise EntitiesError(f"stream {path!r} holds more than {limit} bytes")
                parts.append(message.data)
            if result.up_to_date or not result.messages:
                return b"".join(parts)
            offset = result.next_offset

    async def read_before(
        self, url: str, offset: str = "now", *, limit: int = 1000
    ) -> tuple[list[dict[str, Any]], str]:
        """Decoded change events of the entity's stream right before ``offset`` (``now``: its
        tail), up to ``limit``, oldest first, and the offset before the first of them (``-1``
        once the start is reached): a bounded read backwards.

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        target = parse_url(url)
        try:
            messages, begin = await self.store.read_before(target.stream, offset, limit=limit)
        except (StreamNotFound, StreamGone):
            raise EntityNotFound(f"no entity at {target.url}", url=target.url) from None
        decoded = []
        for message in messages:
            item = orjson.loads(message.data)
            item["offset"] = message.offset
            decoded.append(item)
        return decoded, begin

    async def current_view(self, url: str) -> dict[str, dict[str, Any]]:
        """The entity's view as its next wake would see it (``type -> key -> row`` of its
        creation, manifests, tags, context and ``state:*`` collections): its stored snapshot
        plus the events since, so its cost follows recent work, not history.

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        target = parse_url(url)
        try:
            return await current_view(self.store, target)
        except (StreamNotFound, StreamGone):
            raise EntityNotFound(f"no entity at {target.url}", url=target.url) from None

    async def view(self, url: str) -> dict[str, dict[str, Any]]:
        """Every collection of the entity folded from its whole stream (``type -> key -> row``):
        a full fold, as long as the stream, for debugging and tests; requests and the console
        use :meth:`current_view` and :meth:`inspect` instead.

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        target = parse_url(url)
        try:
            base = (await marks(self.store, target.url)).base
            if base is None:
                folded = await materialize(
                    self.store, target.stream, use_snapshot=False, batch=5000
                )
            else:  # a prefix was truncated (Retention.keep_for): on from the snapshot at the cut
                folded = Materializer(base[1], base[0])
                offset = base[0]
                while True:
                    result = await self.store.read(
                        target.stream, offset, limit=5000, renew_ttl=False
                    )
                    for message in result.messages:
                        folded.apply_bytes(message.data)
                    offset = result.next_offset
                    if result.up_to_date or not result.messages:
                        break
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

    async def state_of(self, url: str, *, migrate: bool = True) -> dict[str, dict[str, Any]]:
        """The entity's user state collections by name (``name -> key -> row``), rows of a
        versioned collection upgraded to its version (``migrate=False``: as stored).

        Raises:
            EntityNotFound: no entity at ``url``.
            MigrationFailed: a row's migration raised.
        """
        return self._state_in(url, await self.current_view(url), migrate=migrate)

    def _state_in(
        self, url: str, view: dict[str, dict[str, Any]], *, migrate: bool = True
    ) -> dict[str, dict[str, Any]]:
        target = parse_url(url)
        result: dict[str, dict[str, Any]] = {}
        if target.type in self.registry:  # an orphan's collections: those its stream holds
            for name, definition in self.registry.get(target.type).state.items():
                rows = view.get(definition.event_type(name), {})
                if migrate and definition.version > 1:
                    rows = {
                        k: stored_row(definition.upgrade(name, k, row, url=target.url))
                        for k, row in rows.items()
                    }
                result[name] = rows
        for type_, rows in view.items():
            if type_.startswith("state:") and type_[6:] not in result:
                result[type_[6:]] = rows
        return result

    async def inspect(self, url: str) -> dict[str, Any]:
        """Everything about an entity as JSON-ready data: bookkeeping, args, state, manifest
        and its last 20 runs (from its snapshot and the tail of its stream).

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        info = await self.get(url)
        view = await self.current_view(url)
        created = view.get("entity_created", {}).get("entity") or {}
        data = info.to_json()
        data["args"] = created.get("args", {})
        data["state"] = self._state_in(url, view, migrate=False)  # as stored, even if broken
        data["manifest"] = view.get("manifests", {})
        try:
            data["recent_runs"] = await recent_runs(self.store, parse_url(url))
        except (StreamNotFound, StreamGone):
            raise EntityNotFound(f"no entity at {info.url}", url=info.url) from None
        return data

    async def replies(self, url: str, message_key: str, *, after: str = "-1") -> list[Any]:
        """The replies recorded for one inbox message (in order), searching after ``after``
        (e.g. the offset a :class:`SendReceipt` returned).

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        return (await self.outcome(url, message_key, after=after)).replies

    async def outcome(self, url: str, message_key: str, *, after: str = "-1") -> Outcome:
        """The replies to one inbox message and how the wake that took it ended so far: from
        the reply index and the entity's unacknowledged tail, never its whole stream (see
        :mod:`entities._replies`). ``after`` is the offset its :class:`SendReceipt` returned
        (the message's own); with ``-1`` the message is looked for in the tail, and one
        already taken by a wake that completed without replying reads ``pending``.

        Raises:
            EntityNotFound: no entity at ``url``.
            BadOffset: ``after`` is malformed.
        """
        target = parse_url(url)
        found = await self.record(target.url)
        for _try in range(10):  # a busy entity: the tenth answer stands
            if found is None:
                raise EntityNotFound(f"no entity at {target.url}", url=target.url)
            outcome = await outcome_of(self.store, found[0], message_key, after)
            # a wake's commit writes its record, reply rows and events at once: if one came
            # between the index and the tail read, the two disagree; read both again
            again = await self.record(target.url)
            if again is not None and again[1] == found[1]:
                break
            found = again
        return outcome
