"""The validation and state-transition rules shared by every backend.

A backend loads stream and producer records through a :class:`Loader`; the :class:`Batch` applies
one ``commit`` call's operations to copies of those records, checking every protocol rule, and
collects the effects (new messages, changed records, purges). Only when the whole batch succeeds
does the backend persist the effects, so a failed batch changes nothing. Keeping the rules here
means the memory, SQLite and PostgreSQL backends cannot drift apart.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .._errors import (
    BadOffset,
    ConditionFailed,
    ContentTypeMismatch,
    ForkSourceNotFound,
    InvalidRequest,
    OffsetGone,
    ProducerEpochInvalid,
    ProducerFenced,
    ProducerSequenceGap,
    SequenceConflict,
    StreamClosed,
    StreamExists,
    StreamForked,
    StreamGone,
    StreamNotFound,
    StreamsError,
)
from .._offsets import START, format_offset, parse_offset
from .base import (
    Append,
    AppendResult,
    Committed,
    Create,
    CreateResult,
    Delete,
    KvCheck,
    KvPut,
    Message,
    Notify,
    Op,
    OpResult,
    ProducerState,
    ReadResult,
    Remove,
    StreamInfo,
    Touch,
    Truncate,
    check_append,
)

__all__ = [
    "Batch",
    "Effects",
    "Loader",
    "ProducerRecord",
    "ReadBuilder",
    "StreamRecord",
    "apply_each",
    "committed",
    "kv_range",
    "media_type",
    "read_plan",
    "read_start",
    "readable",
]


def kv_range(prefix: str, after: str | None, end: str | None) -> tuple[str, bool, str]:
    """The key range of a side-table scan (see :meth:`Store.kv_scan`): ``(lower, inclusive,
    upper)``, keys ``>= lower`` (``> lower`` unless ``inclusive``) and ``< upper``. Keys
    starting with ``prefix`` sort between ``prefix`` and ``prefix + U+10FFFF``."""
    upper = prefix + "\U0010ffff"
    if end is not None and end < upper:
        upper = end
    if after is None or after < prefix:
        return prefix, True, upper
    return after, False, upper


def media_type(content_type: str) -> str:
    """The comparable part of a content type: lower-cased, parameters dropped."""
    return content_type.split(";", 1)[0].strip().lower()


@dataclass(slots=True)
class StreamRecord:
    """Everything a backend stores about one stream (its messages aside)."""

    id: int
    path: str
    content_type: str
    created_at: float
    last_access: float
    length: int = 0
    ttl_seconds: int | None = None
    expires_at: float | None = None
    closed: bool = False
    closed_by: tuple[str, int, int] | None = None
    fork_parent: int | None = None
    fork_position: int = 0
    last_stream_seq: str | None = None
    deleted: bool = False
    fork_count: int = 0
    fork_sub_offset: int = 0
    # positions up to this one were truncated away (reads before it: OffsetGone)
    retained_from: int = 0

    def copy(self) -> StreamRecord:
        """A copy (``dataclasses.replace`` costs several times more: this is on every
        commit's path)."""
        return StreamRecord(
            self.id, self.path, self.content_type, self.created_at, self.last_access,
            self.length, self.ttl_seconds, self.expires_at, self.closed, self.closed_by,
            self.fork_parent, self.fork_position, self.last_stream_seq, self.deleted,
            self.fork_count, self.fork_sub_offset, self.retained_from,
        )  # fmt: skip

    def expired(self, now: float) -> bool:
        if self.expires_at is not None and now >= self.expires_at:
            return True
        return self.ttl_seconds is not None and now >= self.last_access + self.ttl_seconds

    def info(self, parent_path: str | None = None) -> StreamInfo:
        return StreamInfo(
            path=self.path,
            content_type=self.content_type,
            closed=self.closed,
            next_offset=format_offset(self.length),
            created_at=self.created_at,
            ttl_seconds=self.ttl_seconds,
            expires_at=self.expires_at,
            forked_from=parent_path,
            fork_offset=format_offset(self.fork_position) if self.fork_parent is not None else None,
            retained_from=format_offset(self.retained_from) if self.retained_from else None,
        )


@dataclass(slots=True)
class ProducerRecord:
    stream_id: int
    producer_id: str
    epoch: int
    seq: int
    length: int  # the stream length right after this producer's last accepted append


class Loader(abc.ABC):
    """How a :class:`Batch` reaches the backend's current records."""

    @abc.abstractmethod
    async def stream(self, path: str) -> StreamRecord | None: ...

    @abc.abstractmethod
    async def stream_by_id(self, stream_id: int) -> StreamRecord | None: ...

    @abc.abstractmethod
    async def producer(self, stream_id: int, producer_id: str) -> ProducerRecord | None: ...

    @abc.abstractmethod
    def new_stream_id(self) -> int: ...

    @abc.abstractmethod
    async def kv(self, namespace: str, key: str) -> bytes | None: ...


@dataclass(slots=True)
class Effects:
    """What a successful batch changes; the backend persists exactly this."""

    streams: dict[int, StreamRecord] = field(default_factory=dict)  # upserted records
    messages: list[tuple[int, int, bytes]] = field(default_factory=list)  # (stream, pos, data)
    producers: dict[tuple[int, str], ProducerRecord] = field(default_factory=dict)
    purged: set[int] = field(default_factory=set)  # hard-deleted stream ids
    kv: dict[tuple[str, str], bytes | None] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)  # paths whose waiters must wake
    removed: list[tuple[int, int]] = field(default_factory=list)  # (stream, pos) holes
    cut: list[tuple[int, int, int]] = field(default_factory=list)  # (stream, low, high]: gone

    def merge(self, other: Effects) -> None:
        for sid in other.purged:
            self.streams.pop(sid, None)
        self.streams.update(other.streams)
        self.messages.extend(other.messages)
        self.producers.update(other.producers)
        self.purged |= other.purged
        self.kv.update(other.kv)
        self.touched |= other.touched
        self.removed.extend(other.removed)
        self.cut.extend(other.cut)


_REWRITES = (Create, Delete, Remove, Truncate)


def committed(calls: Sequence[Sequence[Op]], effects: Effects) -> Committed:
    """What a commit of ``calls`` (those that succeeded) with the merged ``effects`` wrote, for
    :meth:`Store._committed`."""
    streams = effects.streams
    return Committed(
        calls,
        effects.touched,
        [(streams[sid].path, sid, position, data) for sid, position, data in effects.messages],
        frozenset(op.path for ops in calls for op in ops if isinstance(op, _REWRITES)),
    )


class Batch:
    """Applies one commit's operations to record copies, raising on the first failed check."""

    def __init__(self, loader: Loader, now: float | None = None) -> None:
        self.loader = loader
        self.now = time.time() if now is None else now
        self.effects = Effects()
        self._by_path: dict[str, StreamRecord | None] = {}

    # -- record access (copy on first touch; purged records read as absent) -------------------

    async def _get(self, path: str) -> StreamRecord | None:
        if path in self._by_path:
            return self._by_path[path]
        found = await self.loader.stream(path)
        record = None if found is None or found.id in self.effects.purged else found.copy()
        self._by_path[path] = record
        return record

    async def _get_by_id(self, stream_id: int) -> StreamRecord | None:
        if stream_id in self.effects.streams:
            return self.effects.streams[stream_id]
        for record in self._by_path.values():
            if record is not None and record.id == stream_id:
                return record
        found = await self.loader.stream_by_id(stream_id)
        if found is None or stream_id in self.effects.purged:
            return None
        record = found.copy()
        self._by_path[record.path] = record
        return record

    def _dirty(self, record: StreamRecord) -> None:
        self.effects.streams[record.id] = record
        self._by_path[record.path] = record

    async def _live(self, path: str) -> StreamRecord:
        """The stream at ``path`` for a direct operation (404/410 otherwise)."""
        record = await self._get(path)
        if record is not None and not record.deleted and record.expired(self.now):
            await self._remove(record)
            record = None
        if record is None:
            raise StreamNotFound(f"stream {path!r} not found", path=path)
        if record.deleted:
            raise StreamGone(f"stream {path!r} was deleted", path=path)
        return record

    async def _remove(self, record: StreamRecord) -> None:
        """Delete ``record``: soft while forks read from it, else purge it and maybe its parent."""
        self.effects.touched.add(record.path)
        if record.fork_count > 0:
            record.deleted = True
            self._dirty(record)
            return
        self.effects.purged.add(record.id)
        self.effects.streams.pop(record.id, None)
        self._by_path[record.path] = None
        if record.fork_parent is not None:
            parent = await self._get_by_id(record.fork_parent)
            if parent is not None:
                parent.fork_count -= 1
                if parent.deleted and parent.fork_count <= 0:
                    await self._remove(parent)
                else:
                    self._dirty(parent)

    async def _kv(self, namespace: str, key: str) -> bytes | None:
        if (namespace, key) in self.effects.kv:
            return self.effects.kv[(namespace, key)]
        return await self.loader.kv(namespace, key)

    # -- operations ---------------------------------------------------------------------------

    async def apply(self, ops: Sequence[Op]) -> list[OpResult]:
        results: list[OpResult] = []
        for op in ops:  # exact types, the common ones first: this loop is on every commit's path
            if type(op) is KvPut:
                if op.only_if and await self._kv(op.namespace, op.key) != op.expect:
                    results.append(False)
                    continue
                self.effects.kv[(op.namespace, op.key)] = op.value
                if not op.quiet:
                    self.effects.touched.add(f"kv:{op.namespace}")
                results.append(True)
            elif type(op) is Append:
                results.append(await self._append(op))
            elif type(op) is Notify:
                self.effects.touched.add(op.name)
                results.append(None)
            elif type(op) is KvCheck:
                if await self._kv(op.namespace, op.key) != op.expect:
                    raise ConditionFailed(
                        f"{op.namespace}/{op.key} changed concurrently",
                        namespace=op.namespace,
                        key=op.key,
                    )
                results.append(None)
            else:
                results.append(await self._apply_rare(op))
        return results

    async def _apply_rare(self, op: Op) -> OpResult:
        """Apply a ``Create``, ``Touch``, ``Delete``, ``Remove`` or ``Truncate``."""
        if isinstance(op, Create):
            return await self._create(op)
        if isinstance(op, Touch):
            record = await self._live(op.path)
            if record.ttl_seconds is not None:
                self._renew(record)
        elif isinstance(op, Delete):
            await self._remove(await self._live(op.path))
        elif isinstance(op, Remove):
            await self._remove_messages(op)
        elif isinstance(op, Truncate):
            await self._truncate(op)
        else:  # pragma: no cover - Op is a closed union
            raise TypeError(f"not an operation: {op!r}")
        return None

    def _position(self, record: StreamRecord, offset: str) -> int:
        """The position ``offset`` names in ``record`` (``now``: its tail)."""
        parsed = parse_offset(offset, path=record.path)
        position = record.length if parsed is None else parsed
        if position > record.length:
            raise BadOffset(f"offset {offset!r} is beyond the stream's tail", path=record.path)
        return position

    async def _remove_messages(self, op: Remove) -> None:
        record = await self._live(op.path)
        if record.fork_count > 0:
            raise StreamForked(f"forks of {op.path!r} still read its messages", path=op.path)
        own_low = record.fork_position if record.fork_parent is not None else 0
        for offset in op.offsets:
            if offset in (START, "now"):
                raise InvalidRequest(f"{offset!r} names no message", path=op.path)
            position = self._position(record, offset)
            if position <= record.retained_from:
                continue  # truncated already
            if position <= own_low:
                raise InvalidRequest(
                    f"the message at {offset!r} belongs to the fork's source", path=op.path
                )
            self.effects.removed.append((record.id, position))

    async def _truncate(self, op: Truncate) -> None:
        record = await self._live(op.path)
        position = self._position(record, op.offset)
        if position <= record.retained_from:
            return
        if record.fork_count > 0:
            raise StreamForked(f"forks of {op.path!r} still read its messages", path=op.path)
        own_low = record.fork_position if record.fork_parent is not None else 0
        if position > own_low:  # a fork's earlier positions live in (and stay in) its source
            self.effects.cut.append((record.id, max(record.retained_from, own_low), position))
        record.retained_from = position
        self._dirty(record)

    async def _create(self, op: Create) -> CreateResult:
        if op.ttl_seconds is not None and op.expires_at is not None:
            raise InvalidRequest("give a TTL or an expiry time, not both", path=op.path)
        if op.ttl_seconds is not None and op.ttl_seconds < 0:
            raise InvalidRequest("TTL must not be negative", path=op.path)
        existing = await self._get(op.path)
        if existing is not None and not existing.deleted and existing.expired(self.now):
            await self._remove(existing)
            # Expired is deleted: the path is free unless forks keep the old stream (then 410,
            # as after an explicit delete; the old record still holds the path).
            existing = self._by_path.get(op.path)
        if existing is not None:
            if existing.deleted:
                raise StreamGone(f"stream {op.path!r} was deleted", path=op.path)
            if op.exclusive:
                raise StreamExists(f"stream {op.path!r} already exists", path=op.path)
            same = (
                media_type(existing.content_type) == media_type(op.content_type)
                and existing.ttl_seconds == op.ttl_seconds
                and existing.expires_at == op.expires_at
                and existing.closed == op.closed
            )
            if op.fork_from is not None:
                parent = await self._get_by_id(existing.fork_parent or -1)
                same = (
                    same
                    and parent is not None
                    and parent.path == op.fork_from
                    and existing.fork_sub_offset == op.fork_sub_offset
                )
                if same and parent is not None and op.fork_offset is not None:
                    wanted = parse_offset(op.fork_offset, path=op.fork_from)
                    same = existing.fork_position == (parent.length if wanted is None else wanted)
            if not same:
                raise StreamExists(
                    f"stream {op.path!r} exists with a different configuration", path=op.path
                )
            if op.ttl_seconds is not None:
                existing.last_access = self.now
                self._dirty(existing)
            return CreateResult(existing.info(await self._parent_path(existing)), created=False)

        record = StreamRecord(
            id=self.loader.new_stream_id(),
            path=op.path,
            content_type=op.content_type,
            created_at=self.now,
            last_access=self.now,
            ttl_seconds=op.ttl_seconds,
            expires_at=op.expires_at,
        )
        parent_path = None
        if op.fork_from is not None:
            source = await self._get(op.fork_from)
            if source is not None and not source.deleted and source.expired(self.now):
                await self._remove(source)
                source = None
            if source is None:
                raise ForkSourceNotFound(
                    f"fork source {op.fork_from!r} not found", path=op.fork_from
                )
            if source.deleted:
                raise StreamGone(f"fork source {op.fork_from!r} was deleted", path=op.fork_from)
            if media_type(source.content_type) != media_type(op.content_type):
                raise ContentTypeMismatch(
                    f"fork source {op.fork_from!r} holds {source.content_type}, "
                    f"not {op.content_type}",
                    path=op.path,
                )
            position = source.length
            if op.fork_offset is not None:
                parsed = parse_offset(op.fork_offset, path=op.fork_from)
                position = source.length if parsed is None else parsed
                if position > source.length:
                    raise BadOffset(
                        f"fork offset {op.fork_offset!r} is beyond the source's tail",
                        path=op.fork_from,
                    )
            if position < source.retained_from:
                raise OffsetGone(
                    f"fork offset {op.fork_offset!r} lies before {op.fork_from!r}'s retained data",
                    path=op.fork_from,
                    earliest=format_offset(source.retained_from),
                )
            record.fork_parent = source.id
            record.fork_position = position
            record.retained_from = source.retained_from
            record.fork_sub_offset = op.fork_sub_offset
            record.length = position
            source.fork_count += 1
            self._dirty(source)
            parent_path = source.path
        self._dirty(record)
        self.effects.purged.discard(record.id)
        self._write(record, op.messages)
        record.closed = op.closed
        self.effects.touched.add(record.path)
        return CreateResult(record.info(parent_path), created=True)

    async def _parent_path(self, record: StreamRecord) -> str | None:
        if record.fork_parent is None:
            return None
        parent = await self._get_by_id(record.fork_parent)
        return None if parent is None else parent.path

    def _write(self, record: StreamRecord, messages: Sequence[bytes]) -> None:
        for data in messages:
            record.length += 1
            self.effects.messages.append((record.id, record.length, bytes(data)))

    async def _append(self, op: Append) -> AppendResult:
        check_append(op)
        record = await self._live(op.path)
        producer = op.producer
        if producer is not None:
            if producer.epoch < 0 or producer.seq < 0 or not producer.id:
                raise InvalidRequest("producer id, epoch and seq are required", path=op.path)
        if record.closed:
            if producer is not None and record.closed_by == (
                producer.id,
                producer.epoch,
                producer.seq,
            ):
                closer = ProducerState(producer.epoch, producer.seq)
                return AppendResult(
                    format_offset(record.length), True, duplicate=True, producer=closer
                )
            if not op.messages and producer is None:  # a plain close is idempotent
                self._renew(record)
                return AppendResult(format_offset(record.length), True)
            raise StreamClosed(
                f"stream {op.path!r} is closed",
                path=op.path,
                next_offset=format_offset(record.length),
            )
        if (
            op.messages
            and op.content_type is not None
            and media_type(op.content_type) != media_type(record.content_type)
        ):
            raise ContentTypeMismatch(
                f"stream {op.path!r} holds {record.content_type}, not {op.content_type}",
                path=op.path,
            )
        state: ProducerState | None = None
        if producer is not None:
            known = self.effects.producers.get((record.id, producer.id))
            if known is None:
                known = await self.loader.producer(record.id, producer.id)
            if known is not None and producer.epoch < known.epoch:
                raise ProducerFenced(
                    f"producer {producer.id!r} epoch {producer.epoch} is stale",
                    path=op.path,
                    current_epoch=known.epoch,
                )
            if known is None or producer.epoch > known.epoch:
                if producer.seq != 0:
                    if known is None:
                        raise ProducerSequenceGap(
                            f"producer {producer.id!r} must start at seq 0",
                            path=op.path,
                            expected=0,
                            received=producer.seq,
                        )
                    raise ProducerEpochInvalid(
                        f"producer {producer.id!r} must start epoch {producer.epoch} at seq 0",
                        path=op.path,
                    )
            elif producer.seq <= known.seq:
                state = ProducerState(known.epoch, known.seq)
                return AppendResult(
                    format_offset(known.length), record.closed, duplicate=True, producer=state
                )
            elif producer.seq > known.seq + 1:
                raise ProducerSequenceGap(
                    f"producer {producer.id!r} skipped from seq {known.seq} to {producer.seq}",
                    path=op.path,
                    expected=known.seq + 1,
                    received=producer.seq,
                )
        if op.stream_seq is not None:
            if record.last_stream_seq is not None and op.stream_seq <= record.last_stream_seq:
                raise SequenceConflict(
                    f"Stream-Seq {op.stream_seq!r} does not follow {record.last_stream_seq!r}",
                    path=op.path,
                )
            record.last_stream_seq = op.stream_seq
        self._write(record, op.messages)
        if op.close:
            record.closed = True
            if producer is not None:
                record.closed_by = (producer.id, producer.epoch, producer.seq)
        if producer is not None:
            self.effects.producers[(record.id, producer.id)] = ProducerRecord(
                record.id, producer.id, producer.epoch, producer.seq, record.length
            )
            state = ProducerState(producer.epoch, producer.seq)
        self._renew(record)
        self.effects.touched.add(record.path)
        return AppendResult(format_offset(record.length), record.closed, producer=state)

    def _renew(self, record: StreamRecord) -> None:
        record.last_access = self.now
        self._dirty(record)


async def apply_each(
    loader: Loader, calls: Iterable[Sequence[Op]], merge: Callable[[Effects], None]
) -> list[list[OpResult] | StreamsError]:
    """Validate a group's calls in order against ``loader``, each seeing the effects of the
    calls before it (``merge`` adds a call's effects to the group's); a call that fails
    contributes nothing, and its error is its outcome."""
    outcomes: list[list[OpResult] | StreamsError] = []
    now = time.time()
    for ops in calls:
        batch = Batch(loader, now)
        try:
            results = await batch.apply(ops)
        except StreamsError as exc:
            outcomes.append(exc)
            continue
        merge(batch.effects)
        outcomes.append(results)
    return outcomes


def plan_ranges(chain: Sequence[StreamRecord], start: int) -> list[tuple[int, int, int]]:
    """Which stored ranges make up ``chain[0]``'s positions after ``start``.

    ``chain`` is the stream followed by its fork ancestors (parent first), as far as ``start``
    reaches. Returns ``(stream_id, low, high)`` triples, oldest first: read positions
    ``low < p <= high`` of that stream id. A fork's early positions live in its ancestors.
    """
    plan: list[tuple[int, int, int]] = []
    high = chain[0].length
    for current in chain:
        if start >= high:
            break
        own_low = current.fork_position if current.fork_parent is not None else 0
        if high > own_low:
            plan.append((current.id, max(start, own_low), high))
        if current.fork_parent is None or start >= own_low:
            break
        high = min(high, own_low)
    plan.reverse()
    return plan


def needs_parent(chain: Sequence[StreamRecord], start: int) -> int | None:
    """The id of the next ancestor :func:`plan_ranges` needs for ``start``, or ``None``."""
    last = chain[-1]
    if last.fork_parent is None or start >= last.fork_position:
        return None
    return last.fork_parent


async def read_plan(
    record: StreamRecord,
    start: int,
    stream_by_id: Callable[[int], Awaitable[StreamRecord | None]],
) -> list[tuple[int, int, int]]:
    """:func:`plan_ranges` for ``record``, loading the ancestors it needs by id."""
    chain = [record]
    while (parent_id := needs_parent(chain, start)) is not None:
        parent = await stream_by_id(parent_id)
        if parent is None:
            break
        chain.append(parent)
    return plan_ranges(chain, start)


def read_start(record: StreamRecord, offset: str, parsed: int | None) -> int:
    """Where a read of ``record`` from ``offset`` (parsed: ``parsed``) starts: ``-1`` is the
    earliest retained position, ``now`` the tail.

    Raises:
        OffsetGone: ``offset`` lies before the earliest retained position (truncated).
    """
    if parsed is None:
        return record.length
    if offset == START:
        return record.retained_from
    if parsed < record.retained_from:
        raise OffsetGone(
            f"offset {offset!r} of {record.path!r} was truncated: the stream starts at "
            f"{format_offset(record.retained_from)}",
            path=record.path,
            earliest=format_offset(record.retained_from),
        )
    return min(parsed, record.length)


def readable(record: StreamRecord | None, path: str) -> StreamRecord:
    """``record`` if a reader may see it now.

    Raises:
        StreamNotFound: no record, or it expired.
        StreamGone: deleted, kept only for its forks.
    """
    if record is None or (not record.deleted and record.expired(time.time())):
        raise StreamNotFound(f"stream {path!r} not found", path=path)
    if record.deleted:
        raise StreamGone(f"stream {path!r} was deleted", path=path)
    return record


class ReadBuilder:
    """One read's answer as it is collected: messages up to ``limit`` and about ``max_bytes``
    (never fewer than one when one is available), then the :class:`ReadResult`."""

    __slots__ = ("limit", "max_bytes", "messages", "position", "size")

    def __init__(self, start: int, limit: int, max_bytes: int | None) -> None:
        self.position = start
        self.limit = limit
        self.max_bytes = max_bytes
        self.messages: list[Message] = []
        self.size = 0

    @property
    def full(self) -> bool:
        """Whether the read must stop (never while it holds nothing)."""
        count = len(self.messages)
        if count == 0:
            return False
        return count >= self.limit or (self.max_bytes is not None and self.size >= self.max_bytes)

    @property
    def room(self) -> int:
        """How many more messages the read may hold."""
        return self.limit - len(self.messages)

    def add(self, position: int, data: bytes) -> bool:
        """Add the message ending at ``position``; ``False`` (nothing added) once full."""
        if self.full:
            return False
        self.position = position
        self.size += len(data)
        self.messages.append(Message(format_offset(position), data))
        return True

    def reach(self, position: int) -> None:
        """Every stored message up to ``position`` was taken: unless full, the read continues
        from there (a range that ends in removed messages is not read again)."""
        if not self.full and position > self.position:
            self.position = position

    def result(self, record: StreamRecord) -> ReadResult:
        up_to_date = self.position >= record.length
        return ReadResult(
            self.messages, format_offset(self.position), up_to_date, up_to_date and record.closed
        )
