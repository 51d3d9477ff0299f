"""Speculative group commits for PostgreSQL: two round trips instead of three.

A group commit reads what it validates against under its locks (``lock_and_read``), writes, and
commits: three round trips. When this process already knows every row a group's validation
consults (the stream rows and side-table values that its stores on the same schema wrote or
read under lock last: :class:`KnownRows`, shared by them), the writer validates against those
copies first, without a round trip, and sends one call of the schema's ``speculate`` function
(migration 5): it takes the same locks, compares every consulted row with the copy it was
validated against (with a snapshot taken after the locks), and writes the group's effects only
if all match. A mismatch writes nothing: the group then runs the ordinary way in the same
transaction, so a stale copy costs one round trip, never a wrong commit.

A notification from another process drops the copies of what it names (a stream path, a whole
side-table namespace, or everything); a side-table write that notifies nobody (``quiet``) is
caught by the comparison.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from .._errors import StreamsError
from ._engine import Effects, Loader, ProducerRecord, StreamRecord, apply_each
from ._postgres_sql import columns, from_record
from .base import Append, KvCheck, KvPut, Notify, Op, OpResult

__all__ = [
    "SPECULATE_SQL",
    "KnownRows",
    "SpeculativeLoader",
    "Unknown",
    "known_rows",
    "speculate",
]

_MAX_STREAMS = 20_000
_MAX_KV = 50_000
_STREAM_TYPES = (
    "bigint text text float8 float8 bigint bigint float8 boolean text bigint bigint text boolean "
    "bigint bigint bigint"
).split()
# the ``speculate`` call: the locks, the expected stream rows (a column each), the expected
# side-table values, the stream rows written, the messages, the side-table puts and deletes,
# then the notification channel and payloads
_ARRAYS = ["bigint", *_STREAM_TYPES, "text", "text", "bytea", *_STREAM_TYPES,
           "bigint", "bigint", "bytea", "text", "text", "bytea", "text", "text"]  # fmt: skip
SPECULATE_SQL = "SELECT speculate({}, ${}::text, ${}::text[])".format(
    ", ".join(f"${n}::{t}[]" for n, t in enumerate(_ARRAYS, start=1)),
    len(_ARRAYS) + 1,
    len(_ARRAYS) + 2,
)


class Unknown(Exception):
    """A speculation consulted a row this process has no copy of (not an error: the group
    runs the ordinary way)."""


class KnownRows:
    """The rows this process's stores on one schema last wrote or read under lock, as they
    were when that transaction committed; shared by those stores across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, StreamRecord] = {}
        self._kv: dict[str, dict[str, bytes | None]] = {}  # namespace -> key -> value
        self.writers: set[int] = set()  # backend pids of the writers sharing these copies

    def stream(self, path: str) -> StreamRecord:
        """The copy of the stream row at ``path``. Raises :class:`Unknown` without one."""
        with self._lock:
            record = self._streams.get(path)
        if record is None:
            raise Unknown(path)
        return record

    def kv(self, namespace: str, key: str) -> bytes | None:
        """The copy of a side-table value (``None``: absent). Raises :class:`Unknown`."""
        with self._lock:
            values = self._kv.get(namespace)
            if values is None or key not in values:
                raise Unknown(f"{namespace}/{key}")
            return values[key]

    def learn(
        self,
        streams: Iterable[StreamRecord],
        kv: Iterable[tuple[tuple[str, str], bytes | None]],
        gone: Iterable[str] = (),
    ) -> None:
        """Remember rows as a committed transaction left them (``gone``: paths purged)."""
        with self._lock:
            if len(self._streams) > _MAX_STREAMS:
                self._streams.clear()
            if sum(len(values) for values in self._kv.values()) > _MAX_KV:  # a few namespaces
                self._kv.clear()
            for path in gone:
                self._streams.pop(path, None)
            for record in streams:
                self._streams[record.path] = record
            for (namespace, key), value in kv:
                self._kv.setdefault(namespace, {})[key] = value

    def forget(self, names: Iterable[str]) -> None:
        """Drop the copies of what another process's commit named: stream paths, ``kv:``
        namespaces, or ``*`` (everything)."""
        with self._lock:
            for name in names:
                if name == "*":
                    self._streams.clear()
                    self._kv.clear()
                    return
                if name.startswith("kv:"):
                    self._kv.pop(name[3:], None)
                else:
                    self._streams.pop(name, None)


_SHARED: weakref.WeakValueDictionary[tuple[str, str], KnownRows] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def known_rows(dsn: str, schema: str) -> KnownRows:
    """The copies shared by this process's stores on ``schema`` of the database at ``dsn``."""
    with _SHARED_LOCK:
        known = _SHARED.get((dsn, schema))
        if known is None:
            known = _SHARED[(dsn, schema)] = KnownRows()
        return known


class SpeculativeLoader(Loader):
    """Answers a group's validation from :class:`KnownRows` (after the group's own earlier
    effects), remembering every copy it handed out; raises :class:`Unknown` for anything else
    (a row without a copy, a fork's ancestor, a producer, a new stream id)."""

    def __init__(self, known: KnownRows) -> None:
        self.known = known
        self.effects = Effects()
        self._by_path: dict[str, StreamRecord] = {}  # from effects
        self.streams: dict[str, StreamRecord] = {}  # consulted copies
        self.kv_values: dict[tuple[str, str], bytes | None] = {}

    def merge(self, effects: Effects) -> None:
        if effects.purged:
            raise Unknown("a purge")
        self.effects.merge(effects)
        for record in effects.streams.values():
            self._by_path[record.path] = record

    async def stream(self, path: str) -> StreamRecord | None:
        if path in self._by_path:
            return self._by_path[path]
        if path not in self.streams:
            self.streams[path] = self.known.stream(path)
        return self.streams[path]

    async def stream_by_id(self, stream_id: int) -> StreamRecord | None:
        raise Unknown(f"stream {stream_id}")

    async def producer(self, stream_id: int, producer_id: str) -> ProducerRecord | None:
        raise Unknown(f"producer {producer_id}")

    def new_stream_id(self) -> int:
        raise Unknown("a new stream")

    async def kv(self, namespace: str, key: str) -> bytes | None:
        wanted = (namespace, key)
        if wanted in self.effects.kv:
            return self.effects.kv[wanted]
        if wanted not in self.kv_values:
            self.kv_values[wanted] = self.known.kv(namespace, key)
        return self.kv_values[wanted]


_SIMPLE = (Append, KvPut, KvCheck, Notify)


async def speculate(
    known: KnownRows, calls: Sequence[Sequence[Op]]
) -> tuple[SpeculativeLoader, list[list[OpResult] | StreamsError], list[Any]] | None:
    """Validate ``calls`` (one group) against the copies in ``known``: the loader (its effects
    and the copies consulted), each call's outcome, and the arguments of the ``speculate``
    call that checks those copies and writes the effects (after ``locks``, which the caller
    puts first). ``None`` when the group cannot be speculated: an operation other than
    appends without a producer and side-table reads and writes, a row without a copy, or
    effects other than stream rows, messages and side-table changes."""
    for ops in calls:
        for op in ops:
            if type(op) not in _SIMPLE or (isinstance(op, Append) and op.producer is not None):
                return None
    loader = SpeculativeLoader(known)
    try:
        outcomes = await apply_each(loader, calls, loader.merge)
    except Unknown:
        return None
    effects = loader.effects
    if effects.purged or effects.producers or effects.removed or effects.cut:
        return None
    args: list[Any] = []
    expected = [from_record(r) for _path, r in sorted(loader.streams.items())]
    args.extend(columns(expected) if expected else [[] for _ in range(len(_STREAM_TYPES))])
    values = sorted(loader.kv_values.items())
    args.extend([[k[0] for k, _v in values], [k[1] for k, _v in values], [v for _k, v in values]])
    written = [from_record(r) for _sid, r in sorted(effects.streams.items())]
    args.extend(columns(written) if written else [[] for _ in range(len(_STREAM_TYPES))])
    messages = effects.messages
    args.extend([[m[0] for m in messages], [m[1] for m in messages], [m[2] for m in messages]])
    puts = sorted((k, v) for k, v in effects.kv.items() if v is not None)
    args.extend([[k[0] for k, _v in puts], [k[1] for k, _v in puts], [v for _k, v in puts]])
    drops = sorted(k for k, v in effects.kv.items() if v is None)
    args.extend([[k[0] for k in drops], [k[1] for k in drops]])
    return loader, outcomes, args
