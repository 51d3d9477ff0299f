"""Per-type concurrency caps: at most N wakes of a type at once, across all workers.

A type defined with ``max_concurrency=N`` has N slot rows in the side table ``cap`` (key
``{type}|{slot}``). A claim of one of its entities takes a free slot in the claim's own commit
(checked and written there, so two claims cannot take one slot, on any backend); the slot names
the entity and the fencing epoch of the claim. A slot is free when it is empty, or when the
wake holding it is over: its entity's record no longer holds that epoch's lease (the wake
committed, failed, was interrupted or killed, or its worker died and the lease expired). So a
slot needs no explicit release, and a crashed worker's slots come back with its leases.

When every slot is busy the claim waits (the entity stays pending and is tried again shortly).
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from streams import KvCheck, KvPut, Op, Store

from .._records import ENTITY_NS, EntityRecord

__all__ = ["CAP_NS", "Caps"]

CAP_NS = "cap"  # key: "{type}|{slot:04d}" -> {"url": ..., "epoch": ...} (the wake holding it)


class Caps:
    """The slots of capped types on ``store``; ``limit(type)`` is a type's cap or ``None``."""

    def __init__(self, store: Store, limit: Callable[[str], int | None]) -> None:
        self.store = store
        self.limit = limit

    async def take(self, type: str, url: str, epoch: int, now: float) -> list[Op] | None:
        """The operations that take a free slot of ``type`` for the wake of ``url`` claimed
        at ``epoch`` (to commit with the claim), ``[]`` when the type has no cap, ``None`` when
        every slot is busy. Raises whatever the store raises."""
        cap = self.limit(type)
        if cap is None:
            return []
        held = dict(await self.store.kv_scan(CAP_NS, f"{type}|"))
        value = orjson.dumps({"url": url, "epoch": epoch})
        for slot in range(cap):
            key = f"{type}|{slot:04d}"
            current = held.get(key)
            if current is None or await self._over(current, now):
                return [KvCheck(CAP_NS, key, current), KvPut(CAP_NS, key, value)]
        return None

    async def _over(self, raw: bytes, now: float) -> bool:
        """Whether the wake holding a slot (its value ``raw``) is over."""
        holder = orjson.loads(raw)
        record_raw = await self.store.kv_get(ENTITY_NS, holder.get("url", ""))
        if record_raw is None:
            return True
        record = EntityRecord.load(record_raw)
        return (
            record.epoch != holder.get("epoch")
            or record.owner is None
            or record.lease_expires <= now
        )
