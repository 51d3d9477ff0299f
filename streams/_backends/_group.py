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

from .._errors import StreamsError
from .base import Op, OpResult

__all__ = ["CommitQueue", "Pending"]

MAX_GROUP_OPS = 2048


class Pending:
    """One ``commit`` call waiting in the queue."""

    __slots__ = ("durable", "future", "ops")

    def __init__(
        self, ops: Sequence[Op], future: asyncio.Future[list[OpResult]], durable: bool = True
    ) -> None:
        self.ops = ops
        self.future = future
        self.durable = durable  # see Store.commit


class CommitQueue:
    """Calls queue here; :meth:`groups` hands them to the writer in bounded groups."""

    def __init__(self, max_ops: int = MAX_GROUP_OPS, *, linger: float = 0.0) -> None:
        self._queue: asyncio.Queue[Pending | None] = asyncio.Queue()
        self._max_ops = max_ops
        self._linger = linger
        self._busy = False  # the last group held more than one call

    async def submit(
        self, ops: Sequence[Op], writer: asyncio.Task[None] | None, *, durable: bool = True
    ) -> list[OpResult]:
        """Queue ``ops`` (``durable``: see ``Store.commit``) and wait for the writer's answer.

        Raises:
            StreamsError: the store is not open (no running writer); otherwise whatever the
                writer set for this call.
        """
        if writer is None or writer.done():
            raise StreamsError("store is not open", path="")
        future: asyncio.Future[list[OpResult]] = asyncio.get_running_loop().create_future()
        await self._queue.put(Pending(ops, future, durable))
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
