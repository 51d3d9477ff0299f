"""The reply index: what became of an inbox message, found without reading the entity's stream
from its start.

A wake's commit writes, beside its ``texts`` events, one row per reply in the ``reply``
namespace, keyed ``{url}\\n{message key}\\n{wake's to_offset}.{n}`` (so a prefix scan returns a
message's replies in order) and holding the reply's value; a dead-lettered wake also writes one
status row per message it took (key ``{url}\\n{message key}\\n``). The rows hold the values
themselves, not offsets, so they answer the same after the stream's prefix is compacted away.

What the index does not hold is read from the entity's *unacknowledged tail* (the events after
its acknowledged offset, bounded by recent work: the last wake's output and what waits): where
a message not yet taken sits, and the ``runs`` rows of a wake in flight, being retried or
cancelled by a kill. A message taken by a wake that completed without replying has no row:
with its offset (a :class:`~entities.SendReceipt`'s) it reads ``completed``; without one it is
indistinguishable from an unknown key and reads ``pending``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from streams import (
    KvPut,
    Notify,
    Op,
    Store,
    StreamGone,
    StreamNotFound,
    format_offset,
    parse_offset,
)

from ._effects import Effects
from ._handoff import soon
from ._records import REPLY_NS, EntityRecord, Outcome
from ._urls import EntityURL

__all__ = [
    "RECENT",
    "RecentReplies",
    "answered_signal",
    "index_replies",
    "indexed_outcome",
    "message_signal",
    "outcome_of",
    "replies_of",
    "reply_ops",
    "resolve",
    "status_ops",
    "stopped_signal",
    "taken_signals",
    "unstatus_ops",
]

_TAIL_BATCH = 2000


def _prefix(url: str, message_key: str) -> str:
    return f"{url}\n{message_key}\n"


def answered_signal(url: str) -> str:
    """The :class:`~streams.Notify` name of a commit that acknowledges wakes of ``url`` (or
    stops it): waiters of messages at or before its acknowledged offset have an answer."""
    return f"reply:{url}"


def stopped_signal(url: str) -> str:
    """The :class:`~streams.Notify` name of the commit that stops ``url`` (a kill): every
    wait for one of its messages ends, whatever its callers heard before."""
    return f"stopped:{url}"


def message_signal(url: str, message_key: str) -> str:
    """The :class:`~streams.Notify` name of a commit that changes what became of one message
    (a reply to it, a status row)."""
    return f"reply:{url}|{message_key}"


def replies_of(effects: Sequence[Effects]) -> list[tuple[str, Any]]:
    """The replies among ``effects``, in order: (message key, value)."""
    found: list[tuple[str, Any]] = []
    for e in effects:
        for change in e.own:
            if change["type"] != "texts":
                continue
            value = change.get("value")
            if not isinstance(value, dict) or value.get("in_reply_to") is None:
                continue
            found.append((str(value["in_reply_to"]), value.get("value")))
    return found


def reply_ops(url: EntityURL, to_offset: str, replies: Sequence[tuple[str, Any]]) -> list[Op]:
    """The index rows of a wake's ``replies`` (:func:`replies_of` its effects; the wake ends
    at ``to_offset``), and the signals that wake their waiters (see
    :mod:`entities._awaiting`)."""
    ops: list[Op] = []
    keys: set[str] = set()
    for n, (message_key, value) in enumerate(replies):
        key = f"{_prefix(url.url, message_key)}{to_offset}.{n:06d}"
        ops.append(KvPut(REPLY_NS, key, orjson.dumps({"value": value})))
        keys.add(message_key)
    ops.extend(Notify(message_signal(url.url, key)) for key in sorted(keys))
    ops.append(Notify(answered_signal(url.url)))
    return ops


Hand = Callable[[list[Any]], None]


class RecentReplies:
    """Replies handed from a wake's commit to the callers waiting in the same process, by
    (entity, message key): ``entities serve`` runs its worker in the same process as its HTTP
    side, so a caller there is answered by the commit itself, without a notification or a read
    of the reply index. Only the messages a caller here waits for are kept, and only committed
    replies (those of the first commit that replied, as in the index); a miss reads the store.

    A caller registers a *hand* (:meth:`expect`): the commit hands the replies to it on the
    caller's event loop (one thread-safe call per commit and loop, however many callers it
    answers). The commit's notification can also reach a caller (through the store) before the
    committing thread has handed the replies over, so a wake *stages* the keys it answers before
    its commit and settles them after it: a caller that finds its key staged waits for the
    settling (:meth:`settled`) instead of reading the index."""

    def __init__(self) -> None:
        # callers waiting, per message: (their loop, what to hand the replies to)
        self._awaited: dict[tuple[str, str], list[tuple[asyncio.AbstractEventLoop, Hand]]] = {}
        self._replies: dict[tuple[str, str], list[Any]] = {}
        # keys a commit of this process is answering right now -> what to call when it ends
        self._staged: dict[tuple[str, str], list[Callable[[], None]]] = {}
        self._lock = threading.Lock()  # the worker's thread publishes, the server's takes

    def expect(self, url: str, message_key: str, hand: Hand) -> Callable[[], None]:
        """A caller here waits for ``message_key`` of ``url``: ``hand(replies)`` is called on
        the running event loop once a commit of this process replies to it. Returns the
        function that stops the waiting."""
        key = (url, message_key)
        entry = (asyncio.get_running_loop(), hand)
        with self._lock:
            self._awaited.setdefault(key, []).append(entry)

        def forget() -> None:
            with self._lock:
                hands = self._awaited.get(key)
                if hands is None:
                    return
                with contextlib.suppress(ValueError):
                    hands.remove(entry)
                if not hands:
                    del self._awaited[key]
                    self._replies.pop(key, None)

        return forget

    def stage(self, url: str, message_keys: Iterable[str]) -> list[tuple[str, str]]:
        """Before a commit that answers ``message_keys`` of ``url``: mark those a caller here
        waits for; returns them, for :meth:`publish` or :meth:`settle` after the commit."""
        if not self._awaited:
            return []
        with self._lock:
            staged = [(url, k) for k in message_keys if (url, k) in self._awaited]
            for key in staged:
                self._staged.setdefault(key, [])
        return staged

    def publish(
        self,
        url: str,
        replies: Sequence[tuple[str, Any]],
        staged: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Hand over ``replies`` ((message key, value), in order), committed by a wake of
        ``url``, to the callers here waiting for them; then settle ``staged``. Call it on an
        event loop's thread."""
        if self._awaited and replies:
            grouped: dict[tuple[str, str], list[Any]] = {}
            for message_key, value in replies:
                grouped.setdefault((url, message_key), []).append(value)
            handed: dict[asyncio.AbstractEventLoop, list[tuple[Hand, list[Any]]]] = {}
            with self._lock:
                for key, values in grouped.items():
                    hands = self._awaited.get(key)
                    if hands is None:
                        continue
                    first = self._replies.setdefault(key, values)  # the first commit's
                    for loop, hand in hands:
                        handed.setdefault(loop, []).append((hand, first))
            for loop, batch in handed.items():
                soon(loop, _hand_over, batch)
        self.settle(staged)

    def settle(self, staged: Sequence[tuple[str, str]]) -> None:
        """The commit that staged these keys ended (committed and published, or not)."""
        if not staged:
            return
        with self._lock:
            wakers = [w for key in staged for w in self._staged.pop(key, ())]
        for wake in wakers:
            wake()

    def take(self, url: str, message_key: str) -> list[Any] | None:
        """The replies to ``message_key`` of ``url`` handed over, if any."""
        with self._lock:
            return self._replies.get((url, message_key))

    async def settled(self, url: str, message_key: str, within: float) -> list[Any] | None:
        """:meth:`take`, after the commit of this process answering ``message_key`` (if one is
        staged) settled, waiting at most ``within`` seconds for it."""
        key = (url, message_key)
        with self._lock:
            found = self._replies.get(key)
            if found is not None or key not in self._staged:
                return found
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            self._staged[key].append(lambda: soon(loop, resolve, done))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, within)
        return self.take(url, message_key)


def _hand_over(batch: list[tuple[Hand, list[Any]]]) -> None:
    for hand, replies in batch:
        hand(replies)


def resolve(future: asyncio.Future[None]) -> None:
    """Resolve ``future`` (with ``None``) unless it is done already."""
    if not future.done():
        future.set_result(None)


RECENT = RecentReplies()


def taken_signals(url: str, message_keys: Iterable[str]) -> list[Op]:
    """The signals of a completed wake to the waiters of the messages it took: each looks at
    the index at once (a reply of this commit is there), instead of all of them waiting for
    one look at the entity record."""
    return [Notify(message_signal(url, key)) for key in message_keys]


def status_ops(url: str, message_keys: Iterable[str], status: str, error: str | None) -> list[Op]:
    """The status rows of messages whose wake ended ``status`` (``dead_lettered``,
    ``interrupted``, ``cancelled`` while queued, ``waiting_approval``, or ``completed`` by a
    run resumed after approvals) with ``error``: an acknowledged wake's end is not in the
    unacknowledged tail; with the signals that wake their waiters."""
    data = orjson.dumps({"status": status, "error": error})
    ops: list[Op] = []
    for key in message_keys:
        ops.append(KvPut(REPLY_NS, _prefix(url, key), data))
        ops.append(Notify(message_signal(url, key)))
    return ops


def unstatus_ops(url: str, message_keys: Iterable[str]) -> list[KvPut]:
    """The removal of the status rows of messages delivered again (a dead letter retried)."""
    return [KvPut(REPLY_NS, _prefix(url, key), None) for key in message_keys]


async def outcome_of(store: Store, record: EntityRecord, message_key: str, after: str) -> Outcome:
    """The replies to ``message_key`` and how the wake that took it ended so far (see the
    module docstring); ``after`` is the message's own offset (a receipt's), or ``-1``.

    A stream that is gone reads as an empty tail.

    Raises:
        BadOffset: ``after`` is malformed.
    """
    at = None if after == "-1" else after
    if at is not None:
        parse_offset(at)  # a malformed offset is the caller's mistake (BadOffset)
    found = Outcome()
    status: dict[str, Any] | None = None
    for key, raw in await store.kv_scan(REPLY_NS, _prefix(record.url, message_key)):
        if key.endswith("\n"):
            status = orjson.loads(raw)
        else:
            found.replies.append(orjson.loads(raw)["value"])
    if status is not None:
        found.status, found.error = status["status"], status.get("error")
    elif (at is not None and at <= record.acked) or found.replies:
        found.status = "completed"  # its wake was acknowledged, and did not fail
    # the tail: a message not taken yet, its wake in flight, retried or cancelled
    offset = record.acked if at is None or at < record.acked else at
    stream = f"{record.type}/{record.id}/main"
    while True:
        try:
            result = await store.read(stream, offset, limit=_TAIL_BATCH, renew_ttl=False)
        except (StreamNotFound, StreamGone):
            return found
        for message in result.messages:
            item = orjson.loads(message.data)
            type_ = item.get("type")
            if type_ == "inbox" and item.get("key") == message_key:
                operation = (item.get("headers") or {}).get("operation")
                if operation == "delete":  # cancelled while queued
                    found.status, found.error = "cancelled", None
                elif operation == "update":  # edited, or taken by a run it steered
                    if (item.get("value") or {}).get("steered_into"):
                        found.status, found.error = "completed", None
                else:
                    at = message.offset
                    found.status, found.error = "pending", None
            elif type_ == "runs" and at is not None:
                value = item.get("value")
                if isinstance(value, dict) and _covers(value, at):
                    found.status, found.error = value["status"], value.get("error")
        offset = result.next_offset
        if result.up_to_date or not result.messages:
            return found


async def indexed_outcome(store: Store, url: str, message_key: str) -> Outcome | None:
    """What the reply index alone says of ``message_key`` (one read): its replies and how
    its wake ended, when it holds replies or a given-up status; else ``None`` (the entity
    record and tail tell the rest, see :func:`outcome_of`). A waiter's shortcut: a message
    delivered again after a dead letter (:mod:`entities._dead`) is not looked for."""
    found = Outcome()
    status: dict[str, Any] | None = None
    for key, raw in await store.kv_scan(REPLY_NS, _prefix(url, message_key)):
        if key.endswith("\n"):
            status = orjson.loads(raw)
        else:
            found.replies.append(orjson.loads(raw)["value"])
    if status is not None:
        found.status, found.error = status["status"], status.get("error")
    elif found.replies:
        found.status = "completed"
    return found if found.replies or found.failed else None


def _covers(run: dict[str, Any], offset: str) -> bool:
    """Whether the wake of ``run`` (a ``runs`` row of a wake) took the event at ``offset``."""
    low, high = run.get("from_offset"), run.get("to_offset")
    return isinstance(low, str) and isinstance(high, str) and low < offset <= high


async def index_replies(store: Store, url: EntityURL, *, batch: int = 500) -> int:
    """Write the reply index of an entity whose history predates it, from one pass over its
    stream (a one-time migration, not a request path): the same rows its wakes' commits would
    have written, so running it again, or on an entity already indexed, changes nothing.
    Returns how many rows were written (or removed: the statuses of messages delivered again).

    Raises whatever the store raises (``StreamNotFound``, ...).
    """
    keys_at: dict[str, str] = {}  # inbox offset -> message key
    counts: dict[str, int] = {}  # wake id -> replies indexed so far
    pending: list[Op] = []
    written = 0
    offset = "-1"
    while True:
        result = await store.read(url.stream, offset, limit=2000, renew_ttl=False)
        for message in result.messages:
            item = orjson.loads(message.data)
            type_, value = item.get("type"), item.get("value")
            if type_ == "inbox" and isinstance(item.get("key"), str):
                keys_at[message.offset] = item["key"]
                if isinstance(value, dict) and value.get("redelivered"):  # a retried letter
                    pending.extend(unstatus_ops(url.url, [item["key"]]))
            elif type_ == "texts" and isinstance(value, dict):
                wake, high = _wake_of(str(value.get("run_id") or ""))
                if value.get("in_reply_to") is None or high is None:
                    continue
                n = counts[wake] = counts.get(wake, -1) + 1
                key = f"{_prefix(url.url, str(value['in_reply_to']))}{high}.{n:06d}"
                pending.append(KvPut(REPLY_NS, key, orjson.dumps({"value": value.get("value")})))
            elif type_ == "runs" and isinstance(value, dict):
                if value.get("status") == "dead_lettered":
                    taken = [k for o, k in keys_at.items() if _covers(value, o)]
                    pending.extend(status_ops(url.url, taken, "dead_lettered", value.get("error")))
        if len(pending) >= batch:
            await store.commit(pending)
            written, pending = written + len(pending), []
        offset = result.next_offset
        if result.up_to_date or not result.messages:
            break
    if pending:
        await store.commit(pending)
        written += len(pending)
    return written


def _wake_of(run_id: str) -> tuple[str, str | None]:
    """The wake id ``w{low}-{high}`` a run id starts with, and the offset it ends at."""
    head = run_id.split(".", 1)[0]
    low, _, high = head[1:].partition("-")
    if not head.startswith("w") or not low.isdigit() or not high.isdigit():
        return head, None
    return head, format_offset(int(high))
