"""The worker that ``entities serve`` embeds, on a thread and an event loop of its own.

A store belongs to the event loop that opened it (its connections, its wake-up signals), so the
worker thread opens a :class:`~entities.Runtime` of its own over the same store URL, with the
same settings and worker id. A handler that blocks the worker's loop (``time.sleep`` in an
``async def``) then holds no HTTP request: the control plane and stream reads run on the
server's loop.

Left alone, the two stores would see each other's commits as another process's: PostgreSQL by
``NOTIFY`` (at once, naming what changed), SQLite by watching the file (``PRAGMA data_version``,
every 50 ms, without names). So over SQLite each store's commits wake the other's waiters and
listeners of the paths and names they touched, on the other's loop, as a store's commits wake
its own: a message sent over HTTP starts its wake at once, a reply reaches a long-poll or an SSE
reader at once (measured through ``entities serve``: a send and the wait for the reply of a 20
ms handler took 51 ms at p50 with the file watch alone, 28 ms with this, and 26 ms with the
worker on the server's loop), and an interrupt reaches the running wake's listener at once. The
two SQLite stores are *paired* (``SqliteStore._pair``): their commits, which move the file's
``data_version`` for each other, no longer make each other wake everything at once (every
waiter's look, every worker scan) after each commit; another process's commits still do, within
the file watch's 50 ms.

The server's commits also reach the worker this way over PostgreSQL (whose worker store then
ignores the server store's ``NOTIFY``: ``PostgresStore._pair_with``; the worker's commits
still reach the server by ``NOTIFY``), with the pending marks they wrote: the worker claims a
message sent over HTTP at once (:meth:`Worker.offer`) while it has a free lane, without a scan
of every pending mark first. A sequential call over PostgreSQL: 4.1-4.6 -> 3.8-4.1 ms at p50
(the scan was a round trip between the send's commit and the claim's read); calls under load
+2% (median of 7 interleaved rounds) against offering only to an idle worker.

A ``memory://`` store cannot be opened twice (a second one would be another, empty store):
there the worker stays on the server's loop, as before (``memory://`` is for tests and trials);
so it does with a virtual clock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import anyio

from streams import Committed, Store, open_store

from .._handoff import soon
from .._pipeline.known import pending_marks
from .._records import PENDING_NS
from .._runtime import Runtime
from .._worker import Worker

__all__ = ["EmbeddedWorker", "can_embed"]

logger = logging.getLogger("entities.server")


def can_embed(runtime: Runtime) -> bool:
    """Whether a worker thread can run ``runtime``'s wakes: its store can be opened a second
    time, and its clock is the system's (a virtual clock is driven from one loop)."""
    return urlsplit(runtime.store.url).scheme != "memory" and not runtime.clock.virtual


class EmbeddedWorker:
    """A worker over ``runtime``'s store URL and settings, on a thread of its own:
    ``await embedded.start()``, then ``embedded.stop()`` and ``await embedded.wait()`` (both
    on the loop that started it; ``wait`` also returns when the worker failed by itself).

    ``worker`` (once started) may be read from any thread for its ``alive()`` check.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.worker: Worker | None = None
        self.failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the worker's
        self._server_loop: asyncio.AbstractEventLoop | None = None
        self._started: anyio.Event | None = None  # both of the server's loop
        self._ended: anyio.Event | None = None
        self._stop: anyio.Event | None = None  # of the worker's loop
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="entities-worker", daemon=True)
        self._removers: list[Callable[[], None]] = []
        # each store's own notify (what a commit of the other is handed to: never the
        # forwarding one, or each would echo the other's names back)
        self._server_notify = runtime.store._notify
        self._worker_notify: Callable[[set[str]], None] = lambda _paths: None

    async def start(self) -> Worker:
        """Start the thread; return its worker once its store is open and it runs.

        Raises:
            Exception: whatever opening the worker's store raised.
        """
        self._server_loop = asyncio.get_running_loop()
        self._started, self._ended = anyio.Event(), anyio.Event()
        self._thread.start()
        await self._started.wait()
        if self.worker is None:
            assert self.failure is not None
            raise self.failure
        _pair(self.runtime.store, self.worker.rt.store)
        self._removers = [self._forward(self.runtime.store, self.worker)]
        return self.worker

    def stop(self) -> None:
        """Ask the worker to drain its in-flight wakes and end (from any thread; it returns at
        once, even while a handler blocks the worker's loop)."""
        self._stopping = True
        for remove in self._removers:
            remove()
        self._removers = []
        self._call(lambda: self._stop.set() if self._stop is not None else None)

    async def wait(self) -> None:
        """Wait until the thread has ended (the worker stopped and drained, or failed).

        Raises:
            RuntimeError: it was not started.
        """
        if self._ended is None:
            raise RuntimeError("the embedded worker was not started")
        await self._ended.wait()

    def _call(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the worker's loop soon (a no-op once that loop has ended)."""
        _soon(self._loop, fn)

    def _main(self) -> None:
        try:
            anyio.run(self._run)
        except BaseException as exc:  # told to the server's loop: ``start`` raises it, or logged
            self.failure = exc
            if self.worker is not None and not self._stopping:
                logger.error("the embedded worker failed", exc_info=exc)
        finally:
            self._loop = None
            self._tell(self._started)
            self._tell(self._ended)

    def _tell(self, event: anyio.Event | None) -> None:
        """Set ``event`` (of the server's loop) from the worker's thread."""
        if event is not None:
            _soon(self._server_loop, event.set)

    async def _run(self) -> None:
        rt = self.runtime
        store = open_store(rt.store.url)
        self._worker_notify = store._notify
        if urlsplit(rt.store.url).scheme == "sqlite":  # PostgreSQL's NOTIFY reaches the server
            self._mirror(store)
        own = rt.over(store)
        async with store, own:
            self._stop = anyio.Event()
            self._loop = asyncio.get_running_loop()
            self.worker = own.worker()
            _learn_own(store, self.worker)
            self._tell(self._started)
            if self._stopping:  # stopped before it started
                return
            await self.worker.run(self._stop)

    def _mirror(self, store: Store) -> None:
        """Make each commit of ``store`` (the worker's SQLite store) wake the server store's
        waiters and listeners of the paths it touched, on the server's loop, as one store's
        commits wake its own (see the module docstring)."""
        server_loop = self._server_loop
        _relay(store, self._server_notify, lambda fn: _soon(server_loop, fn))
        store._pair()  # type: ignore[attr-defined]

    def _forward(self, server_store: Store, worker: Worker) -> Callable[[], None]:
        """The other way: each commit of the server's store wakes the worker store's waiters
        and listeners of what it touched (timers, the stream of an entity a wake runs), and
        hands ``worker`` what it appended and the pending marks it wrote, on the worker's
        loop. Returns the function that stops it."""
        return _relay(server_store, self._worker_notify, self._call, worker)


def _relay(
    store: Store,
    other: Callable[[set[str]], None],
    schedule: Callable[[Callable[[], object]], None],
    worker: Worker | None = None,
) -> Callable[[], None]:
    """Make each commit of ``store`` also hand the names it touched to ``other`` (the other
    store's own notify, never a relaying one, or each would echo the other's names back) and,
    with ``worker``, what it appended (:meth:`KnownTails.learn`: a claim of the entities it
    marked pending may fold those messages without reading them) and the pending marks it
    wrote (:meth:`Worker.offer`, which then stands for the pending-marks signal), scheduled by
    ``schedule`` on the other's loop, in the order of the commits. ``Store._committed`` is what
    every backend calls after its commits; the ``streams`` package has no public hook for this
    yet. Returns the function that stops it."""
    original = store._committed
    pending = f"kv:{PENDING_NS}"

    def relayed(committed: Committed) -> None:
        original(committed)
        touched = committed.touched
        written = pending_marks(committed.calls) if worker is not None else []
        marks = written if pending in touched else []  # offered: they stand for the signal
        names = touched - {pending} if marks else set(touched)
        learn = worker is not None and bool(committed.appended or committed.rewritten)
        if not names and not marks and not learn:
            return

        def deliver() -> None:
            if learn and worker is not None:
                worker.claimer.tails.learn(committed, written, own=False)
            if names:
                other(names)
            if marks and worker is not None:
                worker.offer(marks)

        schedule(deliver)

    store._committed = relayed  # type: ignore[method-assign]

    def stop() -> None:
        if store._committed == relayed:
            store._committed = original  # type: ignore[method-assign]

    return stop


def _learn_own(store: Store, worker: Worker) -> None:
    """Make each commit of the worker's own ``store`` (on its loop) hand ``worker`` what it
    appended, as the server's commits do (see :func:`_relay`)."""
    original = store._committed
    tails = worker.claimer.tails

    def learned(committed: Committed) -> None:
        original(committed)
        if committed.appended or committed.rewritten:
            tails.learn(committed, pending_marks(committed.calls), own=True)

    store._committed = learned  # type: ignore[method-assign]


def _soon(loop: asyncio.AbstractEventLoop | None, fn: Callable[[], object]) -> None:
    """Run ``fn()`` on ``loop`` soon, from another thread (a no-op once it has closed), in
    one wake-up of that loop with the calls handed to it meanwhile (:mod:`entities._handoff`)."""
    soon(loop, _invoke, fn)


def _invoke(fn: Callable[[], object]) -> None:
    fn()


def _pair(server_store: Store, worker_store: Store) -> None:
    """Pair the server's store with the worker's (see the module docstring): a SQLite store
    joins the paired stores on its file (the worker's did when it opened); a PostgreSQL worker
    store stops hearing the server store's ``NOTIFY`` (its commits are handed over here)."""
    pair = getattr(server_store, "_pair", None)
    if pair is not None:
        pair()
    pair_with = getattr(worker_store, "_pair_with", None)
    if pair_with is not None:
        pair_with(server_store)
