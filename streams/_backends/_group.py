"""The queue behind group commit, shared by the SQLite and PostgreSQL backends.

``commit`` calls enqueue their operations and wait; the backend's writer task takes whatever is
queued (up to a bound), validates and persists it as one transaction, and answers each caller.
A backend whose transactions cost round trips (PostgreSQL) may have the writer *linger* a
moment before taking a group while it is busy (its last group held several calls), so that
groups grow with the load instead of the round trips; a lone call never waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from .._errors import InvalidRequest, StreamsError
from .base import (
    Append,
    Create,
    Delete,
    KvCheck,
    KvPut,
    Notify,
    Op,
    OpResult,
    Remove,
    Touch,
    Truncate,
)

__all__ = ["CommitQueue", "Pending", "succeeded"]

MAX_GROUP_OPS = 2048


class Pending:
    """One ``commit`` call waiting in the queue."""

    __slots__ = ("future", "ops")

    def __init__(self, ops: Sequence[Op], future: asyncio.Future[list[OpResult]]) -> None:
        self.ops = ops
        self.future = future


class CommitQueue:
    """Calls queue here; :meth:`groups` hands them to the writer in bounded groups."""

    def __init__(self, max_ops: int = MAX_GROUP_OPS, *, linger: float = 0.0) -> None:
        self._queue: asyncio.Queue[Pending | None] = asyncio.Queue()
        self._max_ops = max_ops
        self._linger = linger
        self._busy = False  # the last group held more than one call

    async def submit(self, ops: Sequence[Op], writer: asyncio.Task[None] | None) -> list[OpResult]:
        """Queue ``ops`` and wait for the writer's answer.

        Raises:
            StreamsError: the store is not open (no running writer); otherwise whatever the
                writer set for this call.
        """
        if writer is None or writer.done():
            raise StreamsError("store is not open", path="")
        check_text(ops)  # before it joins a group: it would fail the whole group
        future: asyncio.Future[list[OpResult]] = asyncio.get_running_loop().create_future()
        await self._queue.put(Pending(ops, future))
        return await future

    async def stop(self) -> None:
        """Let the writer finish what is queued, then end :meth:`groups`."""
        await self._queue.put(None)

    async def groups(self) -> AsyncIterator[list[Pending]]:
        """The queued calls in groups of up to ``max_ops`` operations, until :meth:`stop` and
        everything queued before or after it is handed out."""
        stopping = False  # set by stop()'s marker; calls queued behind it still run
        while not (stopping and self._queue.empty()):
            item = await self._queue.get()
            if item is None:
                stopping = True
                continue
            if self._busy and self._linger:
                # under load, wait a moment for more calls to join: a transaction costs its
                # round trips whatever it holds, and a bigger group needs fewer of them
                await asyncio.sleep(self._linger)
            group = [item]
            count = len(item.ops)
            while count < self._max_ops and not self._queue.empty():
                more = self._queue.get_nowait()
                if more is None:
                    stopping = True
                    continue
                group.append(more)
                count += len(more.ops)
            self._busy = len(group) > 1
            yield group


def succeeded(
    group: Sequence[Pending], outcomes: Sequence[list[OpResult] | StreamsError]
) -> list[Sequence[Op]]:
    """The operations of the calls of ``group`` whose outcome is not an error."""
    return [p.ops for p, o in zip(group, outcomes, strict=True) if not isinstance(o, StreamsError)]


_TEXT_FIELDS: dict[type, tuple[str, ...]] = {
    Create: ("path", "content_type", "fork_from", "fork_offset"),
    Append: ("path", "content_type", "stream_seq"),
    Delete: ("path",),
    KvPut: ("namespace", "key"),
    KvCheck: ("namespace", "key"),
    Touch: ("path",),
    Remove: ("path",),
    Truncate: ("path", "offset"),
    Notify: ("name",),
}


def check_text(ops: Sequence[Op]) -> None:
    """Refuse text no database can store (not UTF-8: a lone surrogate), call by call.

    Raises:
        InvalidRequest: naming the field.
    """
    for op in ops:
        for name in _TEXT_FIELDS.get(type(op), ()):
            _check(op, name, getattr(op, name))
        if isinstance(op, Append) and op.producer is not None:
            _check(op, "producer", op.producer.id)


def _check(op: Op, name: str, text: str | None) -> None:
    if text is None or text.isascii():
        return
    try:
        text.encode()
    except UnicodeEncodeError:
        path = getattr(op, "path", "")
        raise InvalidRequest(
            f"{name} {text!r} is not valid text (a lone surrogate)", path=path
        ) from None
