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
  (a reply to an earlier message, a cancel, an interrupt, a wait for approval, a dead letter)
  or takes it: that message's waiters alone;
- ``stopped:{url}`` from a kill: every waiter of the entity, including a caller whose message
  is still being sent.

A caller waits before it sends (:meth:`Awaiting.call`), under a key it chose: every commit
that answers its message names it, so its first look is skipped unless a kill or a "wake
everything" came meanwhile. A wake committed by this process (``entities serve``'s embedded
worker) hands its replies to the callers here directly (:data:`~entities._replies.RECENT`:
one scheduled call per commit, no notification, no read).

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

from streams import Store, parse_offset

from ._errors import EntityNotFound
from ._reads import Reads
from ._records import ENTITY_NS, EntityRecord, Outcome, SendReceipt
from ._replies import (
    RECENT,
    answered_signal,
    indexed_outcome,
    message_signal,
    outcome_of,
    resolve,
    stopped_signal,
)
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
    heard: int  # its entity's count of signals that may answer anything, when it entered
    future: asyncio.Future[None] | None = None  # resolved to wake it
    woken: bool = False  # woken since it was last armed
    replies: list[Any] | None = None  # handed over by a commit of this process (see RECENT)
    queued: bool = False  # in its entity's heap (or loose list)
    keyed: bool = False  # taken, no reply yet: woken by its own name (or a kill) only
    done: bool = False
    glancing: bool = False  # reading its answer right now (after every commit so far)
    leave: Callable[[], None] | None = None  # what removes it from its hub (see enter)

    def wake(self) -> None:
        self.queued = False  # its entity's lists drop it (or dropped it) themselves
        self.woken = True
        if self.future is not None:
            resolve(self.future)

    def hand(self, replies: list[Any]) -> None:
        """The replies a commit of this process handed over (on the waiter's loop)."""
        if self.replies is None:
            self.replies = replies
        self.wake()


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
    heard: int = 0  # signals heard that may answer any of its messages (see _heard)


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

    def enter(self, url: str, key: str, at: str | None) -> _Waiter:
        """Register a waiter of message ``key`` of ``url`` (at offset ``at``, or ``None`` while
        unknown, e.g. before the message is sent); it hears its own name and the replies a
        commit of this process hands over from now on. :meth:`leave` removes it."""
        entity = self._join(url)
        waiter = _Waiter(url, key, at, entity.heard)
        remove_key = self.store.listen(message_signal(url, key), waiter.wake, broadcast=False)
        forget = RECENT.expect(url, key, waiter.hand)

        def leave() -> None:
            forget()
            remove_key()
            waiter.done = True
            entity.keyed.discard(waiter)
            self._part(url, entity)

        waiter.leave = leave
        return waiter

    def leave(self, waiter: _Waiter) -> None:
        """Remove ``waiter`` (see :meth:`enter`)."""
        leave, waiter.leave = waiter.leave, None
        if leave is not None:
            leave()

    def quiet(self, waiter: _Waiter) -> bool:
        """Whether nothing that could answer ``waiter``'s message without naming it came
        since it entered: no kill of its entity, no look at it for a "wake everything". A
        message sent after its waiter entered, its key known to no one else yet, needs no
        first look while this holds and nothing woke the waiter: every commit that answers
        a message names it (its replies, its status, its being taken; see
        :mod:`entities._replies`), and a commit of this process hands its replies over. A
        "wake everything" heard but not yet acted on does not end the quiet: the look it
        schedules for every entity with waiters (see :meth:`_everything`) sees the waiter
        armed by then; one made already counted as heard."""
        entity = self._entities.get(waiter.url)
        return entity is not None and entity.heard == waiter.heard

    def _join(self, url: str) -> _Entity:
        entity = self._entities.get(url)
        if entity is None:
            entity = self._entities[url] = _Entity()
            listen = self.store.listen
            removers = (
                listen(answered_signal(url), lambda: self._answered(url), broadcast=False),
                listen(stopped_signal(url), lambda: self._heard(url), broadcast=False),
            )

            def remove() -> None:
                for remover in removers:
                    remover()

            entity.remove = remove
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

    def arm(self, waiter: _Waiter) -> asyncio.Future[None]:
        """Make ``waiter`` wakeable by the next answer; returns the future it is woken by."""
        future = waiter.future
        if future is None or future.done():
            future = waiter.future = asyncio.get_running_loop().create_future()
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
        return future

    def _heard(self, url: str) -> None:
        """Something may have answered any message of ``url`` without naming it (a kill, or a
        commit of another process told as "wake everything"): no first look is skipped, and
        the waiters get one now."""
        entity = self._entities.get(url)
        if entity is not None:
            entity.heard += 1
            self._answered(url)

    def _answered(self, url: str) -> None:
        """A commit acknowledged wakes of ``url``: a look for the waiters it may answer."""
        entity = self._entities.get(url)
        if entity is None:
            return
        if entity.looking:
            entity.again = True
            return
        if not self._lookers(entity):
            return  # every waiter was woken already (by its own name, or a hand-over)
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
            self._heard(url)

    @staticmethod
    def _lookers(entity: _Entity) -> bool:
        """Whether a look at ``entity``'s record could wake one of its waiters: one is keyed
        (a kill ends its wait), or one not reading its answer right now waits in its lists."""
        heap = entity.heap
        while heap and (heap[0][2].done or not heap[0][2].queued):
            heapq.heappop(heap)  # woken meanwhile: it looks for itself
        return bool(entity.keyed) or not all(
            w.glancing for w in (*(e[2] for e in heap), *entity.loose)
        )

    async def _look(self, url: str, entity: _Entity) -> None:
        """One read of the entity record per round; wake the waiters it answers. No read when
        every waiter was woken already (by its own name, from the same commit)."""
        try:
            while True:
                entity.again = False
                if not self._lookers(entity):
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
        if idempotency_key is not None:  # it may name a message answered long ago: a look
            receipt = await self._send(
                url, payload, type=type, sender=sender, idempotency_key=idempotency_key,
                mode=mode, attachments=attachments,
            )  # fmt: skip
            found, timed_out = await self.wait_outcome(
                receipt.url, receipt.key, after=receipt.offset, wait=wait
            )
        else:
            # waiting before the send, under a key chosen here: whatever answers the new
            # message (its own name, a commit of this process handing its replies over) comes
            # after this, and a message answered by nothing heard since needs no first look
            hub = waiters_of(self.store)
            key = uuid.uuid4().hex
            waiter = hub.enter(parse_url(url).url, key, None)
            try:
                receipt = await self._send(
                    url, payload, type=type, sender=sender, idempotency_key=None, mode=mode,
                    attachments=attachments, key=key,
                )  # fmt: skip
                waiter.at = receipt.offset
                found, timed_out = await self._wait(waiter, receipt.offset, wait, fresh=True)
            finally:
                hub.leave(waiter)
        return CallResult(
            receipt.url, receipt.key, receipt.offset, found.replies, found.status, found.error,
            timed_out,
        )  # fmt: skip

    async def wait_outcome(
        self, url: str, message_key: str, *, after: str = "-1", wait: float
    ) -> tuple[Outcome, bool]:
        """Wait up to ``wait`` seconds for an answer to message ``message_key`` (at offset
        ``after``, a receipt's, or ``-1``): replies, or a wake given up. Woken by the
        commit that answers it, not by every append (see the module docstring). Returns what
        became of it and whether the wait ran out first. A killed entity ends the wait
        (``cancelled`` while the message was still pending).

        Raises:
            EntityNotFound: no entity at ``url``.
            BadOffset: ``after`` is malformed.
        """
        target = parse_url(url)
        at = None if after == "-1" else after
        if at is not None:
            parse_offset(at)  # a malformed offset is the caller's mistake (BadOffset)
        hub = waiters_of(self.store)
        waiter = hub.enter(target.url, message_key, at)
        try:
            return await self._wait(waiter, after, wait, fresh=False)
        finally:
            hub.leave(waiter)

    async def _wait(
        self, waiter: _Waiter, after: str, wait: float, *, fresh: bool
    ) -> tuple[Outcome, bool]:
        """:meth:`wait_outcome` for a registered ``waiter``; ``fresh``: its message was sent
        after it entered (the first look is skipped while :meth:`ReplyWaiters.quiet` holds)."""
        hub = waiters_of(self.store)
        url, message_key, at = waiter.url, waiter.key, waiter.at
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + wait
        first = True
        while True:
            woken, waiter.woken = waiter.woken, False
            future = hub.arm(waiter)
            if waiter.replies is not None:  # handed over by a commit of this process
                return Outcome(replies=waiter.replies, status="completed"), False
            if first and fresh and not woken and hub.quiet(waiter):
                found, stopped, taken = None, False, False  # just sent, nothing came since
            else:
                waiter.glancing = True
                try:
                    found, stopped, taken = await self._glance(url, message_key, at)
                finally:
                    waiter.glancing = False
            first = False
            if found is not None:  # replies, or a wake given up
                return found, False
            remaining = deadline - time.monotonic()
            if stopped or remaining <= 0:  # killed (no reply can come), or out of time
                answer, stopped = await self._answer(url, message_key, after)
                if stopped and not answer.replies and answer.status == "pending":
                    answer.status = "cancelled"
                return answer, not stopped and not answer.replies and not answer.failed
            # taken without a reply so far: a later commit naming it answers it
            waiter.keyed = taken
            if waiter.woken:  # woken while it looked: look again
                continue
            hub.sleeping += 1
            timer = loop.call_later(min(remaining, RECHECK_SECONDS), resolve, future)
            try:
                await future
            finally:
                timer.cancel()
                hub.sleeping -= 1

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
