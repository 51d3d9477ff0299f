"""Read coalescing for the PostgreSQL backend: concurrent point reads of one kind (side-table
gets, side-table scans, stream reads) go to the database as one query.

A round trip costs both sides far more than the rows it carries (in asyncpg about 0.1 ms of
Python, in PostgreSQL about 0.05 ms of CPU for a one-row lookup), and a busy worker makes many
small reads at once, one per running wake. While a query of a kind is in flight, new reads of
that kind queue, and the next query takes all of them (up to ``max_batch``). A read is always
answered by a query that started after the read was made, so reads still see every commit that
finished before them.

A drain gives its slot back in the same step in which it finds the queue empty (``_draining`` is
a plain count, not the set of drain tasks, which shrinks only in a done-callback that runs after
the callers a drain answered have woken): a caller that reads again as soon as it is answered
always finds either a drain that will take its read or a free slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["ReadBatcher"]

K = TypeVar("K")
V = TypeVar("V")


class ReadBatcher(Generic[K, V]):
    """Coalesces concurrent calls of ``get(key)`` into calls of ``run(keys) -> values`` (one
    value per key, in order), with at most ``parallel`` runs in flight."""

    def __init__(
        self,
        run: Callable[[Sequence[K]], Awaitable[Sequence[V]]],
        *,
        max_batch: int = 128,
        parallel: int = 1,
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._parallel = parallel
        self._queue: list[tuple[K, asyncio.Future[V]]] = []
        self._draining = 0  # drains running (each holds one of ``parallel`` slots)
        self._tasks: set[asyncio.Task[None]] = set()  # for aclose

    async def get(self, key: K) -> V:
        """The value for ``key``, read by the next query of this kind.

        Raises whatever that query raised.
        """
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._queue.append((key, future))
        if self._draining < self._parallel:
            self._draining += 1
            task = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        live: list[tuple[K, asyncio.Future[V]]] = []
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                live = [(key, future) for key, future in batch if not future.done()]
                if not live:
                    continue
                try:
                    values = await self._run([key for key, _future in live])
                except Exception as exc:
                    _fail(live, exc)
                else:
                    for (_key, future), value in zip(live, values, strict=True):
                        if not future.done():
                            future.set_result(value)
                live = []
        except BaseException:  # cancelled (the store closes): fail the reads of this run
            _fail(live, ConnectionError("the store closed while the read waited"))
            raise
        finally:  # no await between the empty queue and here: the next read finds the slot
            self._draining -= 1

    async def aclose(self) -> None:
        """Cancel the runs in flight; every read still waiting fails."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _fail(self._queue, ConnectionError("the store is closed"))
        self._queue.clear()


def _fail(waiting: Sequence[tuple[object, asyncio.Future[V]]], error: BaseException) -> None:
    for _key, future in waiting:
        if not future.done():
            future.set_exception(error)
