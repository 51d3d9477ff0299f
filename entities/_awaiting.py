"""Waiting for what becomes of a message, woken by the commit that answers it: request-response
(:meth:`~entities.Runtime.call`, ``POST .../call``) and the long-poll of ``GET .../replies``.

A waiter is not woken by every append to the entity's stream. Commits address waiters with
:class:`~streams.Notify` names (see :mod:`entities._replies`):

- ``reply:{url}`` from every wake commit (and a kill): one look at the entity record (its
  acknowledged offset) per commit, however many wait, wakes exactly the waiters whose message
  sits at or before that offset (kept in offset order, so the look pops them off a heap); a
  waiter whose message was taken by a wake that completed without replying (a reply may come
  from a later wake, e.g. once children finish) waits for its own name from then on;
- ``reply:{url}|{key}`` from a commit that writes a reply row or a status row for one message
  (a reply to an earlier message, a cancel, an interrupt, a wait for approval, a dead letter):
  that message's waiters alone.

Only the woken waiters read their answer (a few reads each, from the reply index and the
unacknowledged tail, never the whole stream). Across processes the names travel through the
store's notification path (PostgreSQL ``NOTIFY``; the embedded worker's commits are mirrored to
the server's store). When a backend cannot tell what changed ("wake everything": another
process committed to a SQLite file, a ``LISTEN`` connection came back) the hub takes one look
per entity that has waiters instead of one per waiter (at most every
:data:`BROADCAST_SECONDS`). Each waiter also looks again every
:data:`RECHECK_SECONDS`, in case a notification was lost.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from streams import Store, parse_offset

from ._errors import EntityNotFound
from ._reads import Reads
from ._records import ENTITY_NS, EntityRecord, Outcome, SendReceipt
from ._replies import RECENT, answered_signal, indexed_outcome, message_signal, outcome_of
from ._urls import parse_url

__all__ = ["RECHECK_SECONDS", "Awaiting", "CallResult", "ReplyWaiters", "waiters_of"]

logger = logging.getLogger("entities")

RECHECK_SECONDS = 5.0
BROADCAST_SECONDS = 0.02
# how long a waiter waits for a commit of this process that is answering it to hand its replies
# over (see RecentReplies), before it reads the index instead
_SETTLE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class CallResult:
    """What :meth:`~entities.Runtime.call` returns: the message sent (``url``, ``key``,
    ``offset`` as in a :class:`~entities.SendReceipt`), its replies in order, the status of the
    wake that took it (``completed``; given up: ``dead_lettered``, ``cancelled``,
    ``interrupted``; when the wait ran out: ``pending``, ``failed`` while retried,
    ``waiting_approval``, or ``completed`` without a reply so far) with that wake's error, and
    ``timed_out``: no answer within the wait (the message was sent; ask again with
    ``GET .../replies/{key}``)."""

    url: str
    key: str
    offset: str
    replies: list[Any]
    status: str
    error: str | None
    timed_out: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "key": self.key,
            "offset": self.offset,
            "replies": self.replies,
            "status": self.status,
            "error": self.error,
            "timed_out": self.timed_out,
        }


@dataclass(eq=False)
class _Waiter:
    url: str
    key: str
    at: str | None  # the message's offset, if known
    event: anyio.Event = field(default_factory=anyio.Event)
    queued: bool = False  # in its entity's heap (or loose list)
    keyed: bool = False  # taken, no reply yet: woken by its own name (or a kill) only
    done: bool = False
    glancing: bool = False  # reading its answer right now (after every commit so far)

    def wake(self) -> None:
        self.queued = False  # its entity's lists drop it (or dropped it) themselves
        self.event.set()


@dataclass(eq=False)
class _Entity:
    """The waiters of one entity."""

    heap: list[tuple[str, int, _Waiter]] = field(default_factory=list)  # by message offset
    loose: list[_Waiter] = field(default_factory=list)  # offset unknown: woken by every ack
    keyed: set[_Waiter] = field(default_factory=set)  # woken by their own name or a kill
    count: int = 0
    remove: Callable[[], None] | None = None
    looking: bool = False
    again: bool = False
    heard: int = 0  # answered signals heard


class ReplyWaiters:
    """The waiters of one store's messages (one per store: see :func:`waiters_of`)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.looks = 0  # record reads made for waiters (tests count them)
        self.sleeping = 0  # waiters waiting to be woken right now
        self._entities: dict[str, _Entity] = {}
        self._seq = 0
        self._remove_everything: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._broadcast: asyncio.TimerHandle | None = None

    def enter(self, url: str, key: str, at: str | None) -> tuple[_Waiter, Callable[[], None]]:
        """Register a waiter of message ``key`` of ``url`` (at offset ``at``); returns it and
        the function that removes it."""
        waiter = _Waiter(url, key, at)
        entity = self._join(url)
        remove_key = self.store.listen(message_signal(url, key), waiter.wake, broadcast=False)
        RECENT.expect(url, key)

        def leave() -> None:
            RECENT.forget(url, key)
            remove_key()
            waiter.done = True
            entity.keyed.discard(waiter)
            self._part(url, entity)

        return waiter, leave

    def hold(self, url: str) -> tuple[Callable[[], bool], Callable[[], None]]:
        """Listen for the answers of ``url`` before a message is sent to it: returns
        ``quiet()``, whether nothing that could answer a message came since (no commit
        acknowledged a wake of it, no look at it was made for a "wake everything"), and the
        function that stops listening. A message sent meanwhile, its key known to no one else
        yet, needs no first look while ``quiet()`` holds. A "wake everything" heard but not
        yet acted on does not end the quiet: the look it schedules for every entity with
        waiters (see :meth:`_everything`) sees a waiter armed by then; one made already
        counted as heard."""
        entity = self._join(url)
        heard = entity.heard

        def quiet() -> bool:
            return entity.heard == heard

        return quiet, lambda: self._part(url, entity)

    def _join(self, url: str) -> _Entity:
        entity = self._entities.get(url)
        if entity is None:
            entity = self._entities[url] = _Entity()
            entity.remove = self.store.listen(
                answered_signal(url), lambda: self._answered(url), broadcast=False
            )
        if self._remove_everything is None:
            self._remove_everything = self.store.listen("*", self._everything, broadcast=False)
        entity.count += 1
        return entity

    def _part(self, url: str, entity: _Entity) -> None:
        entity.count -= 1
        if entity.count <= 0 and self._entities.get(url) is entity:
            del self._entities[url]
            if entity.remove is not None:
                entity.remove()
            if not self._entities and self._remove_everything is not None:
                self._remove_everything()
                self._remove_everything = None
                if self._broadcast is not None:
                    self._broadcast.cancel()
                    self._broadcast = None

    def arm(self, waiter: _Waiter) -> anyio.Event:
        """Make ``waiter`` wakeable by the next answer; returns the event it is woken by."""
        if waiter.event.is_set():
            waiter.event = anyio.Event()
        if not waiter.queued:
            entity = self._entities[waiter.url]
            waiter.queued = True
            if waiter.keyed:
                entity.keyed.add(waiter)
            elif waiter.at is None:
                entity.loose.append(waiter)
            else:
                self._seq += 1
                heapq.heappush(entity.heap, (waiter.at, self._seq, waiter))
        return waiter.event

    def _answered(self, url: str) -> None:
        entity = self._entities.get(url)
        if entity is None:
            return
        entity.heard += 1
        if entity.looking:
            entity.again = True
            return
        entity.looking = True
        task = asyncio.get_running_loop().create_task(self._look(url, entity))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _everything(self) -> None:
        """Something changed, what is not known: a look per entity, at most once per
        :data:`BROADCAST_SECONDS` however often it is heard (a SQLite file shared with
        another process says so after every commit; the precise names act at once)."""
        if self._broadcast is not None:
            return
        self._broadcast = asyncio.get_running_loop().call_later(BROADCAST_SECONDS, self._looks)

    def _looks(self) -> None:
        self._broadcast = None
        for url in list(self._entities):
            self._answered(url)

    async def _look(self, url: str, entity: _Entity) -> None:
        """One read of the entity record per round; wake the waiters it answers. No read when
        every waiter was woken already (by its own name, from the same commit)."""
        try:
            while True:
                entity.again = False
                while entity.heap and (entity.heap[0][2].done or not entity.heap[0][2].queued):
                    heapq.heappop(entity.heap)  # woken meanwhile: it looks for itself
                if not entity.keyed and all(
                    w.glancing for w in (*(e[2] for e in entity.heap), *entity.loose)
                ):
                    return  # nobody left to wake (those reading now see this commit)
                self.looks += 1
                try:
                    raw = await self.store.kv_get(ENTITY_NS, url)
                    record = None if raw is None else EntityRecord.load(raw)
                except Exception:  # the waiters look for themselves
                    logger.warning("looking up %s for its callers failed", url, exc_info=True)
                    record = None
                if record is None or record.status == "stopped":
                    woken = [w for _at, _n, w in entity.heap] + list(entity.keyed)
                    entity.heap.clear()
                    entity.keyed.clear()
                else:
                    woken = []
                    while entity.heap and entity.heap[0][0] <= record.acked:
                        woken.append(heapq.heappop(entity.heap)[2])
                woken.extend(entity.loose)
                entity.loose.clear()
                for waiter in woken:
                    if not waiter.done:
                        waiter.wake()
                if not entity.again:
                    return
        finally:
            entity.looking = False


_HUBS: weakref.WeakKeyDictionary[Store, ReplyWaiters] = weakref.WeakKeyDictionary()


def waiters_of(store: Store) -> ReplyWaiters:
    """The :class:`ReplyWaiters` of ``store`` (made on first use, on the store's loop)."""
    hub = _HUBS.get(store)
    if hub is None:
        hub = _HUBS[store] = ReplyWaiters(store)
    return hub


class Awaiting(Reads):
    """Request-response over ``store`` (see :class:`~entities.Runtime`)."""

    async def _send(
        self,
        url: str,
        payload: Any,
        *,
        type: str | None,
        sender: str | None,
        idempotency_key: str | None,
        mode: str,
        attachments: list[dict[str, Any]] | None,
        key: str | None = None,
    ) -> SendReceipt:  # pragma: no cover - Runtime._send
        raise NotImplementedError

    async def call(
        self,
        url: str,
        payload: Any,
        *,
        wait: float = 30.0,
        type: str | None = None,
        sender: str | None = None,
        idempotency_key: str | None = None,
        mode: str = "queued",
        attachments: list[dict[str, Any]] | None = None,
    ) -> CallResult:
        """Send a message (as :meth:`send`, with the same checks and idempotency) and wait up to
        ``wait`` seconds for its answer: its replies (those of the commit that first replied
        to it), or the end of a wake given up (``dead_lettered``, ``cancelled``,
        ``interrupted``, with the error and any ``on_error`` reply). Past ``wait`` the result
        says ``timed_out``; the message stays sent. Retried with the same
        ``idempotency_key``, it sends nothing new and waits for the first message's answer.

        Raises what :meth:`send` raises (InvalidEntityURL, UnknownEntityType, InvalidSendMode,
        EntityNotFound, EntityStopped, SchemaValidationFailed, InvalidIdempotencyKey,
        IdempotencyKeyReused), and ValueError for a negative ``wait``.
        """
        if not wait >= 0:
            raise ValueError("wait must be a number of seconds, at least 0")
        # listening before the send: a new message answered by nothing heard since needs no
        # first look (a retried key may name a message answered long ago: it gets one)
        target = parse_url(url).url
        quiet, release = waiters_of(self.store).hold(target)
        # a new message's key is chosen here, so that a wake of this process answering it
        # before the wait below begins still hands its replies over (see RECENT)
        key = uuid.uuid4().hex if idempotency_key is None else None
        if key is not None:
            RECENT.expect(target, key)
        try:
            receipt = await self._send(
                url, payload, type=type, sender=sender, idempotency_key=idempotency_key,
                mode=mode, attachments=attachments, key=key,
            )  # fmt: skip
            found, timed_out = await self.wait_outcome(
                receipt.url, receipt.key, after=receipt.offset, wait=wait,
                quiet=None if idempotency_key is not None else quiet,
            )  # fmt: skip
        finally:
            release()
            if key is not None:
                RECENT.forget(target, key)
        return CallResult(
            receipt.url, receipt.key, receipt.offset, found.replies, found.status, found.error,
            timed_out,
        )  # fmt: skip

    async def wait_outcome(
        self,
        url: str,
        message_key: str,
        *,
        after: str = "-1",
        wait: float,
        quiet: Callable[[], bool] | None = None,
    ) -> tuple[Outcome, bool]:
        """Wait up to ``wait`` seconds for an answer to message ``message_key`` (at offset
        ``after``, a receipt's, or ``-1``): replies, or a wake given up. Woken by the
        commit that answers it, not by every append (see the module docstring). Returns what
        became of it and whether the wait ran out first. A killed entity ends the wait
        (``cancelled`` while the message was still pending). ``quiet`` (see
        :meth:`ReplyWaiters.hold`): the first look is skipped while it says nothing came.

        Raises:
            EntityNotFound: no entity at ``url``.
            BadOffset: ``after`` is malformed.
        """
        target = parse_url(url)
        at = None if after == "-1" else after
        if at is not None:
            parse_offset(at)  # a malformed offset is the caller's mistake (BadOffset)
        hub = waiters_of(self.store)
        waiter, leave = hub.enter(target.url, message_key, at)
        deadline = time.monotonic() + wait
        try:
            first = True
            while True:
                event = hub.arm(waiter)
                if first and quiet is not None and quiet():
                    found, stopped, taken = None, False, False  # just sent, nothing came since
                else:
                    waiter.glancing = True
                    try:
                        found, stopped, taken = await self._glance(target.url, message_key, at)
                    finally:
                        waiter.glancing = False
                first = False
                if found is not None:  # replies, or a wake given up
                    return found, False
                remaining = deadline - time.monotonic()
                if stopped or remaining <= 0:  # killed (no reply can come), or out of time
                    answer, stopped = await self._answer(target.url, message_key, after)
                    if stopped and not answer.replies and answer.status == "pending":
                        answer.status = "cancelled"
                    return answer, not stopped and not answer.replies and not answer.failed
                # taken without a reply so far: a later commit naming it answers it
                waiter.keyed = taken
                hub.sleeping += 1
                try:
                    with anyio.move_on_after(min(remaining, RECHECK_SECONDS)):
                        await event.wait()
                finally:
                    hub.sleeping -= 1
        finally:
            leave()

    async def _glance(
        self, url: str, message_key: str, at: str | None
    ) -> tuple[Outcome | None, bool, bool]:
        """What a waiter needs to know, without reading the stream: the answer if the reply
        index holds one (replies, or a wake given up: every status that ends a wait is an
        index row, but a kill), else ``None``, whether the entity was stopped, and whether
        the message was taken by a wake already (at or before the acknowledged offset).

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        # answered by a wake of this process (committed, or committing right now)
        recent = await RECENT.settled(url, message_key, _SETTLE_SECONDS)
        if recent is not None:
            return Outcome(replies=recent, status="completed"), False, True
        indexed = await indexed_outcome(self.store, url, message_key)
        if indexed is not None:
            return indexed, False, True
        found = await self.record(url)
        if found is None:
            raise EntityNotFound(f"no entity at {url}", url=url)
        record = found[0]
        taken = at is not None and at <= record.acked
        if taken:  # acknowledged after the index read? its replies came in that commit
            indexed = await indexed_outcome(self.store, url, message_key)
        return indexed, record.status == "stopped", taken

    async def _answer(self, url: str, message_key: str, after: str) -> tuple[Outcome, bool]:
        """:meth:`outcome`, and whether the entity was stopped.

        Raises:
            EntityNotFound, BadOffset.
        """
        found = await self.record(url)
        for _try in range(10):  # a busy entity: the tenth answer stands
            if found is None:
                raise EntityNotFound(f"no entity at {url}", url=url)
            outcome = await outcome_of(self.store, found[0], message_key, after)
            again = await self.record(url)
            if again is not None and again[1] == found[1]:
                break
            found = again
        assert found is not None
        return outcome, found[0].status == "stopped"
