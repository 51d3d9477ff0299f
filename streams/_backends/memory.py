"""``memory://``: a complete in-process store for tests, examples and embedding."""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio

from .._offsets import parse_offset
from ._engine import (
    Batch,
    Loader,
    ProducerRecord,
    ReadBuilder,
    StreamRecord,
    committed,
    read_plan,
    read_start,
    readable,
)
from .base import Op, OpResult, ReadResult, Store, StreamInfo

__all__ = ["MemoryStore"]


class _MemoryLoader(Loader):
    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    async def stream(self, path: str) -> StreamRecord | None:
        sid = self._store._paths.get(path)
        return None if sid is None else self._store._streams.get(sid)

    async def stream_by_id(self, stream_id: int) -> StreamRecord | None:
        return self._store._streams.get(stream_id)

    async def producer(self, stream_id: int, producer_id: str) -> ProducerRecord | None:
        return self._store._producers.get((stream_id, producer_id))

    def new_stream_id(self) -> int:
        self._store._next_id += 1
        return self._store._next_id

    async def kv(self, namespace: str, key: str) -> bytes | None:
        return self._store._kv.get(namespace, {}).get(key)


class MemoryStore(Store):
    """Keeps everything in dictionaries; lost when the process exits."""

    def __init__(self, url: str = "memory://") -> None:
        super().__init__(url)
        self._streams: dict[int, StreamRecord] = {}
        self._paths: dict[str, int] = {}
        # stream id -> own messages, in order (None: removed, see Remove and Truncate)
        self._messages: dict[int, list[bytes | None]] = {}
        self._producers: dict[tuple[int, str], ProducerRecord] = {}
        self._kv: dict[str, dict[str, bytes]] = {}
        self._next_id = 0
        self._lock = anyio.Lock()
        self._loader = _MemoryLoader(self)

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def commit(self, ops: Sequence[Op]) -> list[OpResult]:
        async with self._lock:
            batch = Batch(self._loader)
            results = await batch.apply(ops)
            effects = batch.effects
            for sid in effects.purged:
                old = self._streams.pop(sid, None)
                if old is not None and self._paths.get(old.path) == sid:
                    del self._paths[old.path]
                self._messages.pop(sid, None)
                for pkey in [k for k in self._producers if k[0] == sid]:
                    del self._producers[pkey]
            for sid, record in effects.streams.items():
                self._streams[sid] = record
                self._paths[record.path] = sid
                self._messages.setdefault(sid, [])
            for sid, _position, data in effects.messages:
                self._messages[sid].append(data)
            for sid, position in effects.removed:
                self._drop(sid, position - 1, position)
            for sid, low, high in effects.cut:
                self._drop(sid, low, high)
            self._producers.update(effects.producers)
            for (namespace, key), value in effects.kv.items():
                table = self._kv.setdefault(namespace, {})
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
        self._committed(committed([ops], effects))
        return results

    def _drop(self, sid: int, low: int, high: int) -> None:
        """Forget the messages at positions ``low < p <= high`` of stream ``sid``."""
        record = self._streams[sid]
        own_low = record.fork_position if record.fork_parent is not None else 0
        stored = self._messages[sid]
        for index in range(max(low - own_low, 0), min(high - own_low, len(stored))):
            stored[index] = None

    def _record(self, path: str) -> StreamRecord:
        sid = self._paths.get(path)
        record = None if sid is None else self._streams.get(sid)
        return readable(record, path)

    async def head(self, path: str) -> StreamInfo:
        record = self._record(path)
        parent = self._streams.get(record.fork_parent) if record.fork_parent else None
        return record.info(None if parent is None else parent.path)

    async def read(
        self,
        path: str,
        offset: str = "-1",
        *,
        limit: int = 1000,
        max_bytes: int | None = None,
        renew_ttl: bool = True,
    ) -> ReadResult:
        record = self._record(path)
        start = read_start(record, offset, parse_offset(offset, path=path))
        if renew_ttl and record.ttl_seconds is not None:
            record.last_access = time.time()
        read = ReadBuilder(start, limit, max_bytes)
        for sid, low, high in await read_plan(record, start, self._loader.stream_by_id):
            owner = self._streams[sid]
            own_low = owner.fork_position if owner.fork_parent is not None else 0
            stored = self._messages.get(sid, [])
            for index in range(low - own_low, high - own_low):
                data = stored[index]
                if data is not None and not read.add(own_low + index + 1, data):
                    break
            read.reach(high)
        return read.result(record)

    async def kv_get(self, namespace: str, key: str) -> bytes | None:
        return self._kv.get(namespace, {}).get(key)

    async def kv_scan(
        self,
        namespace: str,
        prefix: str = "",
        *,
        after: str | None = None,
        end: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, bytes]]:
        table = self._kv.get(namespace, {})
        rows = sorted(
            (k, v)
            for k, v in table.items()
            if k.startswith(prefix) and (end is None or k < end) and (after is None or k > after)
        )
        return rows if limit is None else rows[:limit]
