"""The store contract: what every backend (memory, SQLite, PostgreSQL) provides.

A store holds many streams. Every mutation goes through :meth:`Store.commit`, which applies a list
of operations atomically: either all of them take effect or none does. The convenience methods
(``create``, ``append``, ``close_stream``, ``delete``, and for retention ``remove`` and
``truncate``) are one-operation commits. Reads never block writers, and :meth:`Store.wait` is the
live tail: it returns as soon as a commit makes data (or a close) visible after the given offset.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import anyio

from .._errors import InvalidRequest, StreamsError
from .._offsets import format_offset, parse_offset

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "Append",
    "AppendResult",
    "Committed",
    "Create",
    "CreateResult",
    "Delete",
    "KvCheck",
    "KvPut",
    "Message",
    "Notify",
    "Op",
    "OpResult",
    "Producer",
    "ProducerState",
    "ReadResult",
    "Remove",
    "Store",
    "StreamInfo",
    "Touch",
    "Truncate",
]

DEFAULT_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class Producer:
    """An idempotent producer's identity and position: ``(id, epoch, seq)``."""

    id: str
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class ProducerState:
    """The highest ``(epoch, seq)`` a store accepted from one producer."""

    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """Metadata of one stream, as ``head`` returns it."""

    path: str
    content_type: str
    closed: bool
    next_offset: str
    created_at: float
    ttl_seconds: int | None = None
    expires_at: float | None = None
    forked_from: str | None = None
    fork_offset: str | None = None
    retained_from: str | None = None  # the earliest readable offset once a prefix was truncated


@dataclass(frozen=True, slots=True)
class Message:
    """One stored message. ``offset`` is the position right after it (where to resume)."""

    offset: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ReadResult:
    """The answer to a read: messages, where to continue, and whether the tail was reached."""

    messages: list[Message]
    next_offset: str
    up_to_date: bool
    closed: bool


@dataclass(frozen=True, slots=True)
class Create:
    """Create a stream (idempotent when the configuration matches)."""

    path: str
    content_type: str = DEFAULT_CONTENT_TYPE
    ttl_seconds: int | None = None
    expires_at: float | None = None
    closed: bool = False
    fork_from: str | None = None
    fork_offset: str | None = None
    messages: Sequence[bytes] = ()
    exclusive: bool = False  # fail with StreamExists if the path exists at all
    # A fork cut inside the message after ``fork_offset``: ``messages[0]`` is that message's
    # first ``fork_sub_offset`` bytes (the caller materialises it). Part of the fork's identity.
    fork_sub_offset: int = 0


@dataclass(frozen=True, slots=True)
class Append:
    """Append messages (and optionally close) with optional producer and ``Stream-Seq`` checks."""

    path: str
    messages: Sequence[bytes]
    content_type: str | None = None
    producer: Producer | None = None
    stream_seq: str | None = None
    close: bool = False


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete a stream (soft delete while forks still read from it)."""

    path: str


@dataclass(frozen=True, slots=True)
class KvPut:
    """Set (or, with ``value=None``, remove) a key in a small side table, e.g. snapshots.

    With ``only_if=True`` the write happens only when the current value equals ``expect``
    (``None`` meaning absent); otherwise it is skipped, and its result is ``False``, without
    failing the commit. Unconditional writes and applied conditional writes return ``True``.
    ``quiet=True``: the commit does not signal the namespace's listeners for this write (a
    mark removed by the one who took it, which no listener waits to see go).
    """

    namespace: str
    key: str
    value: bytes | None
    only_if: bool = False
    expect: bytes | None = None
    quiet: bool = False


@dataclass(frozen=True, slots=True)
class KvCheck:
    """Fail the whole commit (``ConditionFailed``) unless a side-table key holds ``expect``.

    ``expect=None`` requires the key to be absent. This is compare-and-set: pair it with a
    :class:`KvPut` of the same key to build leases and fencing.
    """

    namespace: str
    key: str
    expect: bytes | None


@dataclass(frozen=True, slots=True)
class Touch:
    """Renew a stream's sliding TTL (what a read does); a no-op for streams without one."""

    path: str


@dataclass(frozen=True, slots=True)
class Remove:
    """Remove single messages (leaving holes): ``offsets`` are the offsets the messages were
    read with (:attr:`Message.offset`, the position right after each). Every other message keeps
    its offset and bytes; reads skip the holes. Messages already gone are ignored (idempotent).
    """

    path: str
    offsets: Sequence[str]


@dataclass(frozen=True, slots=True)
class Truncate:
    """Remove every message before ``offset`` (``now``: all of them) and record ``offset`` as the
    stream's earliest retained position: a read from an earlier offset raises
    :class:`~streams.OffsetGone`, a read from ``-1`` starts there. Surviving messages keep their
    offsets. Truncating to an offset at or before the current start is a no-op."""

    path: str
    offset: str


@dataclass(frozen=True, slots=True)
class Notify:
    """Store nothing; once the commit lands, wake the waiters and listeners of ``name`` (as
    a commit touching a path wakes that path's), in this process at once and in others
    through the backend's notification path (PostgreSQL ``NOTIFY``). Lets a commit address
    the few waiters it concerns instead of everyone watching a busy stream. Listeners
    registered with ``broadcast=False`` hear it; a backend's "wake everything" does not
    reach them (they hear ``*`` instead, see :meth:`Store.listen`)."""

    name: str


Op: TypeAlias = Create | Append | Delete | KvPut | KvCheck | Touch | Remove | Truncate | Notify


@dataclass(frozen=True, slots=True)
class CreateResult:
    """Outcome of a :class:`Create`: the stream's info and whether this call created it."""

    info: StreamInfo
    created: bool


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Outcome of an :class:`Append`.

    ``duplicate`` is true when an idempotent producer re-sent a batch the store already holds; the
    store then changed nothing. ``producer`` is the producer's state after the call.
    """

    next_offset: str
    closed: bool
    duplicate: bool = False
    producer: ProducerState | None = None


OpResult: TypeAlias = CreateResult | AppendResult | bool | None


@dataclass(frozen=True, slots=True)
class Committed:
    """What one commit of a store wrote, as :meth:`Store._committed` hands it on.

    ``calls``: the operations of the calls that succeeded. ``touched``: the names whose waiters
    and listeners it wakes. ``appended``: the messages it stored, in order, as ``(path, stream
    id, position, data)``; ``position`` counts the stream's messages up to and including this
    one, so the message reads back at offset ``format_offset(position)`` with these bytes (the
    stream id tells two streams that held the same path apart). ``rewritten``: the paths whose
    streams it created, deleted, or whose stored messages it removed or cut."""

    calls: Sequence[Sequence[Op]]
    touched: set[str]
    appended: Sequence[tuple[str, int, int, bytes]] = ()
    rewritten: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Waiters:
    event: anyio.Event = field(default_factory=anyio.Event)
    count: int = 0


class _Notifier:
    """Wakes in-process waiters of a path when a commit touches it (no polling)."""

    def __init__(self) -> None:
        self._by_path: dict[str, _Waiters] = {}
        # name -> [(callback, whether "wake everything" reaches it)]
        self._listeners: dict[str, list[tuple[Callable[[], None], bool]]] = {}

    def listen(
        self, name: str, callback: Callable[[], None], broadcast: bool = True
    ) -> Callable[[], None]:
        entry = (callback, broadcast)
        self._listeners.setdefault(name, []).append(entry)

        def remove() -> None:
            callbacks = self._listeners.get(name, [])
            if entry in callbacks:
                callbacks.remove(entry)
            if not callbacks:
                self._listeners.pop(name, None)

        return remove

    def enter(self, path: str) -> _Waiters:
        waiters = self._by_path.get(path)
        if waiters is None:
            waiters = self._by_path[path] = _Waiters()
        waiters.count += 1
        return waiters

    def leave(self, path: str, waiters: _Waiters) -> None:
        waiters.count -= 1
        if waiters.count <= 0 and self._by_path.get(path) is waiters:
            del self._by_path[path]

    def notify(self, paths: Sequence[str] | set[str], *, everything: bool = False) -> None:
        for path in paths:
            waiters = self._by_path.pop(path, None)
            if waiters is not None:
                waiters.event.set()
            for callback, broadcast in list(self._listeners.get(path, ())):
                if broadcast or not everything or path == "*":
                    callback()

    def notify_all(self) -> None:
        """Wake every waiter and listener (something changed, what is not known); listeners
        that asked for named commits only hear ``*``."""
        self.notify(set(self._by_path) | set(self._listeners), everything=True)

    def __len__(self) -> int:
        return len(self._by_path)


class Store(abc.ABC):
    """An open store of streams. Use ``async with open_store(url) as store``."""

    url: str

    def __init__(self, url: str) -> None:
        self.url = url
        self._notifier = _Notifier()

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def open(self) -> None:
        """Open connections and create or migrate the schema."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Flush pending commits and release every resource."""

    # -- mutations -------------------------------------------------------------------------

    @abc.abstractmethod
    async def commit(self, ops: Sequence[Op]) -> list[OpResult]:
        """Apply ``ops`` atomically, in order; return one result per op.

        Raises:
            StreamsError: the subclass naming the first check that failed; nothing was applied.
        """

    async def create(
        self,
        path: str,
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
        ttl_seconds: int | None = None,
        expires_at: float | None = None,
        closed: bool = False,
        fork_from: str | None = None,
        fork_offset: str | None = None,
        messages: Sequence[bytes] = (),
    ) -> CreateResult:
        """Create a stream, or confirm an existing one with the same configuration.

        Raises:
            StreamExists: the path exists with another content type, TTL, expiry or closed flag.
            StreamGone: the path was deleted but is kept for its forks.
            ForkSourceNotFound: ``fork_from`` does not exist.
            BadOffset: ``fork_offset`` is malformed or beyond the source's tail.
        """
        op = Create(
            path,
            content_type,
            ttl_seconds,
            expires_at,
            closed,
            fork_from,
            fork_offset,
            tuple(messages),
        )
        result = (await self.commit([op]))[0]
        assert isinstance(result, CreateResult)
        return result

    async def append(
        self,
        path: str,
        messages: Sequence[bytes],
        *,
        content_type: str | None = None,
        producer: Producer | None = None,
        stream_seq: str | None = None,
        close: bool = False,
    ) -> AppendResult:
        """Append messages atomically (all or none), optionally closing the stream.

        Raises:
            StreamNotFound, StreamGone: no such stream.
            StreamClosed: the stream is closed.
            ContentTypeMismatch: ``content_type`` differs from the stream's.
            ProducerFenced, ProducerSequenceGap, ProducerEpochInvalid: producer checks failed.
            SequenceConflict: ``stream_seq`` does not sort after the last one.
            InvalidRequest: no messages and no close.
        """
        op = Append(path, tuple(messages), content_type, producer, stream_seq, close)
        result = (await self.commit([op]))[0]
        assert isinstance(result, AppendResult)
        return result

    async def close_stream(self, path: str, *, producer: Producer | None = None) -> AppendResult:
        """Close a stream (idempotent). Raises as :meth:`append`."""
        return await self.append(path, (), producer=producer, close=True)

    async def delete(self, path: str) -> None:
        """Delete a stream; it stays readable to its forks until they are deleted too.

        Raises:
            StreamNotFound: no such stream.
            StreamGone: it was already deleted and is kept only for its forks.
        """
        await self.commit([Delete(path)])

    async def remove(self, path: str, offsets: Sequence[str]) -> None:
        """Remove the messages read with ``offsets`` (see :class:`Remove`).

        Raises:
            StreamNotFound, StreamGone: no such stream.
            BadOffset: a malformed offset, or one beyond the tail.
            InvalidRequest: ``-1``/``now``, or a message a fork inherits from its source.
            StreamForked: forks of the stream still read its messages.
        """
        await self.commit([Remove(path, tuple(offsets))])

    async def truncate(self, path: str, offset: str) -> None:
        """Remove every message before ``offset`` (see :class:`Truncate`).

        Raises:
            StreamNotFound, StreamGone: no such stream.
            BadOffset: a malformed offset, or one beyond the tail.
            StreamForked: forks of the stream still read its messages.
        """
        await self.commit([Truncate(path, offset)])

    async def kv_put(self, namespace: str, key: str, value: bytes | None) -> None:
        """Set or remove a side-table entry (atomic on its own; see :class:`KvPut`)."""
        await self.commit([KvPut(namespace, key, value)])

    # -- reads -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def head(self, path: str) -> StreamInfo:
        """Return a stream's metadata without renewing its TTL.

        Raises:
            StreamNotFound: no such stream (or it expired).
            StreamGone: deleted, kept for its forks.
        """

    @abc.abstractmethod
    async def read(
        self,
        path: str,
        offset: str = "-1",
        *,
        limit: int = 1000,
        max_bytes: int | None = None,
        renew_ttl: bool = True,
    ) -> ReadResult:
        """Read up to ``limit`` messages (and about ``max_bytes``) after ``offset``.

        ``offset`` is ``-1`` (start), ``now`` (tail) or an offset the store returned. At least one
        message is returned when any is available, even if it is larger than ``max_bytes``.
        ``-1`` means the earliest retained message: after a :class:`Truncate` that is the first
        one after the truncation point. Removed messages (:class:`Remove`) are skipped; every
        other message keeps its offset.

        Raises:
            StreamNotFound, StreamGone: no such stream.
            BadOffset: a malformed offset.
            OffsetGone: ``offset`` lies before the stream's earliest retained position.
        """

    async def read_before(
        self, path: str, offset: str = "now", *, limit: int = 1000
    ) -> tuple[list[Message], str]:
        """The up to ``limit`` messages right before ``offset`` (``now``: the tail), oldest
        first, and the offset just before the first of them (``-1`` at the stream's start):
        pass that back to read further back. A bounded read backwards from the tail, whatever
        the stream's length (offsets name positions, so this is one positioned read).

        Raises:
            StreamNotFound, StreamGone: no such stream.
            BadOffset: a malformed offset.
            InvalidRequest: ``limit`` is below 1.
        """
        if limit < 1:
            raise InvalidRequest("read_before needs a limit of at least 1", path=path)
        end = parse_offset(offset, path=path)
        if end is None:
            end = parse_offset((await self.head(path)).next_offset, path=path)
            assert end is not None
        start = max(0, end - limit)
        begin = "-1" if start == 0 else format_offset(start)
        if end == start:
            await self.head(path)  # a missing stream still raises
            return [], begin
        result = await self.read(path, begin, limit=end - start, renew_ttl=False)
        last = format_offset(end)
        return [m for m in result.messages if m.offset <= last], begin

    async def schema_versions(self) -> tuple[int, int]:
        """``(applied, expected)``: the schema version the database holds and the one this code
        migrates to (equal once the store opened; a newer release may have migrated further).
        ``(0, 0)`` for a store without a schema.

        Raises whatever the store raises for a failed read.
        """
        return 0, 0

    @abc.abstractmethod
    async def kv_get(self, namespace: str, key: str) -> bytes | None:
        """Return a side-table value, or ``None``."""

    @abc.abstractmethod
    async def kv_scan(
        self,
        namespace: str,
        prefix: str = "",
        *,
        after: str | None = None,
        end: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, bytes]]:
        """Return the side-table entries of ``namespace`` whose key starts with ``prefix``, in
        key order, from the first key ``> after``, stopping before the first key ``>= end``
        and after ``limit`` entries (``after`` the last key seen and ``limit`` page through a
        large table)."""

    async def wait(self, path: str, offset: str, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until data after ``offset`` exists or the stream is closed; False on timeout.

        Writers in this process wake waiters directly; nothing polls. A wake-up is a hint (a
        backend may wake everything when another process commits): the stream is re-checked
        before returning.

        Raises:
            StreamNotFound, StreamGone: no such stream.
            BadOffset: a malformed offset.
        """
        deadline = time.monotonic() + timeout
        position = parse_offset(offset, path=path)
        woken = False
        while True:
            waiters = self._notifier.enter(path)
            try:
                try:
                    info = await self.head(path)
                except StreamsError:
                    if woken:
                        return True  # woken by a delete: let the caller find out
                    raise
                tail = parse_offset(info.next_offset)
                if position is None:  # "now": whatever the tail is on the first look
                    position = tail
                if info.closed or (position is not None and tail is not None and tail > position):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                with anyio.move_on_after(remaining):
                    await waiters.event.wait()
                woken = True
            finally:
                self._notifier.leave(path, waiters)

    async def wait_signal(self, name: str, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until a commit in this process touches ``name``; False on timeout.

        ``name`` is a stream path, or ``kv:{namespace}`` for side-table writes. Unlike
        :meth:`wait` it checks nothing first, so call it before re-reading what you wait for
        only if a missed signal is harmless (callers re-check on timeout).
        """
        waiters = self._notifier.enter(name)
        try:
            with anyio.move_on_after(timeout):
                await waiters.event.wait()
                return True
            return False
        finally:
            self._notifier.leave(name, waiters)

    def listen(
        self, name: str, callback: Callable[[], None], *, broadcast: bool = True
    ) -> Callable[[], None]:
        """Call ``callback()`` (synchronously, in the writer's task) after every commit in this
        process that touches ``name`` (a path, ``kv:{namespace}``, or the name of a
        :class:`Notify`). Returns a function that removes the listener. Callbacks must be quick
        and must not raise.

        When a backend cannot tell what changed (another process committed, a notification
        connection was re-established) it wakes everything: such a callback is called too,
        unless ``broadcast=False``; those hear it only as listeners of ``*``, so a crowd of
        narrow listeners can answer it with one look instead of one each."""
        return self._notifier.listen(name, callback, broadcast)

    def _notify(self, paths: set[str]) -> None:
        self._notifier.notify(paths)

    def _committed(self, committed: Committed) -> None:
        """What a backend calls after each commit of this store's, with what it wrote. Wakes
        this store's waiters and listeners of the names it touched. (An owner of several stores
        of one process may wrap it to hand another of them the names, or what was written, at
        once.)"""
        self._notify(committed.touched)

    def _notify_all(self) -> None:
        self._notifier.notify_all()


def check_append(op: Append) -> None:
    """Reject arguments no backend could accept (shared by all backends)."""
    if not op.messages and not op.close:
        raise InvalidRequest("append needs at least one message or close=True", path=op.path)


def tail_offset(length: int) -> str:
    return format_offset(length)
