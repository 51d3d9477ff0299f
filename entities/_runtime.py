"""The Runtime: one object that owns a store, a registry and a clock, and offers the operations
of the control plane (spawn, send, list, inspect, kill, tags) to Python, the CLI and HTTP.

Everything that should wake an entity is appended to the entity's stream first, and the entity is
then marked pending in the side table, in the same transaction. Workers (:mod:`._worker`) claim
pending entities with a compare-and-set lease and run their wakes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from streams import (
    Append,
    AppendResult,
    ConditionFailed,
    KvCheck,
    KvPut,
    Notify,
    Op,
    Operation,
    Store,
    StreamClosed,
    StreamExists,
    StreamGone,
    StreamNotFound,
    open_store,
)

from ._attachments import check_attachments
from ._awaiting import Awaiting
from ._clock import Clock, SystemClock, VirtualClock
from ._compaction import CompactionReport, compact_all, compact_entity
from ._control import Control
from ._dead import dead_letters, discard_ops, find, retry_ops
from ._effects import PendingSpawn
from ._errors import (
    DeadLetterNotFound,
    DuplicateEntity,
    EntityNotFound,
    EntityStopped,
    InvalidSendMode,
)
from ._events import event, iso
from ._idempotency import (
    RETENTION_SECONDS,
    Remembered,
    check_key,
    fingerprint,
    recall,
    remember_ops,
    slot_of,
    store_answer,
)
from ._pipeline.inbox import created_info, message_event, send_ops, spawn_ops
from ._purge import purge
from ._records import (
    APP_NS,
    ENTITY_NS,
    PENDING_NS,
    TAG_NS,
    DeadLetter,
    EntityInfo,
    EntityRecord,
    SendReceipt,
)
from ._registry import EntityType, Registry
from ._replay import ReplayReport, replay
from ._replies import answered_signal, stopped_signal
from ._signals import SEND_MODES, signal_ops
from ._timers import arm_ops, cancel_ops, cron_schedule, next_due, timer_key
from ._urls import EntityURL, parse_url
from ._worker import Worker

__all__ = ["EntityInfo", "Runtime", "SendReceipt"]

logger = logging.getLogger("entities")

# how long a wake may run unless its type says otherwise (seconds): an agent run of many model
# rounds and tool calls fits; a handler that hangs no longer holds its lane for ever
DEFAULT_WAKE_TIMEOUT = 15 * 60.0


class Runtime(Control, Awaiting):
    """A runtime over one store. Use ``async with Runtime(registry, "sqlite:///x.db") as rt``.

    It is also the test kit: with the default ``memory://`` store and a
    :class:`~entities.VirtualClock`, ``await rt.run_until_idle()`` processes every pending wake
    in-process with no disk, network or waiting.
    """

    def __init__(
        self,
        registry: Registry,
        store: str | Store = "memory://",
        *,
        clock: Clock | None = None,
        worker_id: str | None = None,
        concurrency: int = 64,
        lease_seconds: float = 30.0,
        retry_base_seconds: float = 0.5,
        retry_max_seconds: float = 60.0,
        snapshot_every: int = 200,
        cache_entities: int = 1024,
        wake_timeout: float = DEFAULT_WAKE_TIMEOUT,
        compact_every: float | None = 300.0,
        deploy_version: str | None = None,
    ) -> None:
        """``wake_timeout`` (seconds) is how long a wake may run when its type sets none: past
        it, the handler is cancelled and the attempt fails (see ``registry.define``).
        ``compact_every`` (seconds; ``None``: never) is how often workers run a bounded round
        of compaction (see :meth:`compact` and ``Retention``). ``deploy_version`` (e.g. a
        release tag or commit) is announced by this runtime's workers and recorded in the
        ``runs`` row of every wake they run.

        Raises:
            ValueError: a timeout or lease that is not a positive number of seconds.
        """
        if not wake_timeout > 0 or not lease_seconds > 0:
            raise ValueError("wake_timeout and lease_seconds must be positive numbers of seconds")
        self.registry = registry
        self._owns_store = isinstance(store, str)
        self.store: Store = open_store(store) if isinstance(store, str) else store
        self.clock: Clock = clock or SystemClock()
        self.worker_id = worker_id or f"w-{uuid.uuid4().hex[:8]}"
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self.snapshot_every = snapshot_every
        self.cache_entities = cache_entities
        self.wake_timeout = wake_timeout
        self.compact_every = compact_every
        self.deploy_version = deploy_version
        self._opened = False
        self._local_worker: Worker | None = None

    def over(self, store: Store) -> Runtime:
        """A runtime with this one's registry, clock, worker id and settings over ``store``
        (e.g. another connection to the same database, opened on another event loop)."""
        return Runtime(
            self.registry,
            store,
            clock=self.clock,
            worker_id=self.worker_id,
            concurrency=self.concurrency,
            lease_seconds=self.lease_seconds,
            retry_base_seconds=self.retry_base_seconds,
            retry_max_seconds=self.retry_max_seconds,
            snapshot_every=self.snapshot_every,
            cache_entities=self.cache_entities,
            wake_timeout=self.wake_timeout,
            compact_every=self.compact_every,
            deploy_version=self.deploy_version,
        )

    async def __aenter__(self) -> Runtime:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open the store (when the runtime was given a URL)."""
        if self._owns_store and not self._opened:
            await self.store.open()
        self._opened = True
        if self.registry.source:
            source = self.registry.source.encode()
            await self.store.commit([KvPut(APP_NS, t.name, source) for t in self.registry.list()])

    async def aclose(self) -> None:
        """Close the store (when the runtime opened it)."""
        if self._owns_store and self._opened:
            await self.store.aclose()
        self._opened = False

    # -- writes from outside a wake -------------------------------------------------------------

    async def spawn(
        self,
        url: str,
        *,
        args: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        initial_message: Any = None,
        initial_message_type: str | None = None,
        parent: str | None = None,
        idempotency_key: str | None = None,
    ) -> EntityInfo:
        """Create the entity at ``url`` (``/type/id``); its first wake follows.

        With ``idempotency_key``, a second call with the same key (within a day) creates
        nothing and returns what the first returned.

        Raises:
            InvalidEntityURL, UnknownEntityType: a bad URL or type.
            SchemaValidationFailed: ``args`` or the initial message fail their schema.
            DuplicateEntity: an entity exists at ``url``.
            InvalidIdempotencyKey, IdempotencyKeyReused: a bad key, or one first used with
                another request.
        """
        if idempotency_key is not None:
            check_key(idempotency_key)
        target = parse_url(url)
        entity_type = self.registry.get(target.type)
        checked = entity_type.validate_args(args)
        if initial_message is not None:
            initial_message = entity_type.validate_message(initial_message, initial_message_type)
        ops = spawn_ops(
            target,
            checked,
            self.clock.now(),
            tags=tags,
            parent=parent,
            initial_message=initial_message,
            initial_message_type=initial_message_type,
        )
        if idempotency_key is not None:
            request = fingerprint(checked, tags, initial_message, initial_message_type, parent)
            return await self._spawn_once(target, ops, request, idempotency_key)
        await self._create(target, ops)
        return created_info(ops)

    async def _create(self, target: EntityURL, ops: list[Op]) -> None:
        try:
            await self.store.commit(ops)
        except (StreamExists, StreamGone):
            raise DuplicateEntity(f"entity {target.url} already exists", url=target.url) from None

    async def _spawn_once(
        self, target: EntityURL, ops: list[Op], request: str, key: str
    ) -> EntityInfo:
        """A spawn guarded by an idempotency key (see :mod:`entities._idempotency`)."""
        slot = slot_of("spawn", target.url, key)
        while True:
            now = self.clock.now()
            found, current = await recall(self.store, slot, request, now)
            if found is not None:
                if found.answer is None:  # the first request's process died before answering
                    answer = (await self.get(target.url)).to_json()
                    await store_answer(self.store, slot, found, answer)
                    return EntityInfo.from_json(answer)
                return EntityInfo.from_json(found.answer)
            record = Remembered(
                op="spawn", url=target.url, fingerprint=request, expires=now + RETENTION_SECONDS
            )
            try:
                await self._create(target, [*ops, *remember_ops(slot, record, current)])
            except ConditionFailed:
                continue  # the same key, at the same time: answer as that request did
            info = created_info(ops)
            await store_answer(self.store, slot, record, info.to_json())
            return info

    async def check_send(
        self,
        target: EntityURL,
        payload: Any,
        message_type: str | None,
        *,
        pending_spawns: Sequence[PendingSpawn] = (),
        self_url: EntityURL | None = None,
        exists: bool = False,
    ) -> Any:
        """Validate a send before it is buffered or committed; return the checked payload.

        Raises:
            UnknownEntityType, EntityNotFound, EntityStopped, SchemaValidationFailed.
        """
        entity_type = self.registry.get(target.type)
        if (
            not exists
            and target != self_url
            and not any(s.target == target for s in pending_spawns)
        ):
            found = await self.record(target.url)
            if found is None:
                raise EntityNotFound(f"no entity at {target.url}", url=target.url)
            if found[0].status == "stopped":
                raise EntityStopped(f"entity {target.url} was stopped", url=target.url)
        return entity_type.validate_message(payload, message_type)

    def entity_type(self, name: str) -> EntityType:
        """The registered type called ``name``.

        Raises:
            UnknownEntityType: no such type.
        """
        return self.registry.get(name)

    async def send(
        self,
        url: str,
        payload: Any,
        *,
        type: str | None = None,
        sender: str | None = None,
        idempotency_key: str | None = None,
        mode: str = "queued",
        attachments: list[dict[str, Any]] | None = None,
    ) -> SendReceipt:
        """Append a message to the entity's inbox and mark it pending, atomically.

        ``attachments``: files the message carries by reference, each
        ``{"type", "name"?, "mime"?, "url" | "stream"}`` (see :mod:`entities._attachments`).

        ``mode``: ``queued`` (the default) waits for the next wake; ``steer`` is handed to an
        agent run that is going, before its next model round, as a new user turn (else it is
        an ordinary message); ``interrupt`` interrupts the running wake (its run ends
        ``interrupted``, see :meth:`signal`) and is delivered in the next, in one transaction.

        With ``idempotency_key``, a second call with the same key (within a day) appends
        nothing and returns the first call's receipt: a client that lost its answer can send
        again safely.

        Raises:
            InvalidEntityURL, UnknownEntityType: a bad URL or type.
            InvalidSendMode: ``mode`` is none of those.
            EntityNotFound: no entity at ``url``.
            EntityStopped: the entity was killed.
            SchemaValidationFailed: the payload fails the type's inbox schema, or an
                attachment is malformed.
            InvalidIdempotencyKey, IdempotencyKeyReused: a bad key, or one first used with
                another request.
        """
        return await self._send(
            url, payload, type=type, sender=sender, idempotency_key=idempotency_key, mode=mode,
            attachments=attachments,
        )  # fmt: skip

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
    ) -> SendReceipt:
        """:meth:`send`; ``key``: the new message's key, chosen by the caller (a :meth:`call`
        waits for it before the send), unless ``idempotency_key`` names an earlier message.
        Raises what :meth:`send` raises."""
        files = check_attachments(attachments)
        if mode not in SEND_MODES:
            raise InvalidSendMode(f"unknown send mode {mode!r}: one of {', '.join(SEND_MODES)}")
        if idempotency_key is not None:
            check_key(idempotency_key)
        target = parse_url(url)
        # no read of the record first: the commit itself finds an entity that is missing
        # (no stream) or stopped (its stream closed by the kill, in the kill's transaction)
        payload = await self.check_send(target, payload, type, exists=True)
        if idempotency_key is not None:
            extra = [*([mode] if mode != "queued" else []), *([files] if files else [])]
            request = fingerprint(payload, type, sender, *extra)
            return await self._send_once(
                target, payload, type, sender, request, idempotency_key, mode, files
            )
        key = key or uuid.uuid4().hex
        while True:
            ops = await self._message_ops(target, key, payload, type, sender, mode, files)
            try:
                offset = await self._commit_message(target, ops)
            except ConditionFailed:
                continue  # an interrupt met a moving record: read it again
            return SendReceipt(target.url, key, offset)

    async def _message_ops(
        self,
        target: EntityURL,
        key: str,
        payload: Any,
        message_type: str | None,
        sender: str | None,
        mode: str,
        attachments: list[dict[str, Any]] | None = None,
    ) -> list[Op]:
        """The transaction that delivers one message sent with ``mode`` (an interrupt's is
        checked against the entity record: it fails with ``ConditionFailed`` if that moves).

        Raises:
            EntityNotFound, EntityStopped.
        """
        now = self.clock.now()
        if mode != "interrupt":
            return send_ops(target, key, payload, message_type, sender, now, mode, attachments)
        message = message_event(key, payload, message_type, sender, now, mode, attachments)
        ops, _ = await signal_ops(
            self.store, target, "interrupt", now, reason=f"message {key}", sender=sender,
            extra=[message],
        )  # fmt: skip
        return ops

    async def _commit_message(self, target: EntityURL, ops: list[Op]) -> str:
        """Commit a message's transaction; the offset after the message.

        Raises:
            EntityNotFound, EntityStopped; ConditionFailed for a record that moved.
        """
        try:
            results = await self.store.commit(ops)
        except StreamClosed:
            raise EntityStopped(f"entity {target.url} was stopped", url=target.url) from None
        except (StreamNotFound, StreamGone):
            raise EntityNotFound(f"no entity at {target.url}", url=target.url) from None
        return next(r.next_offset for r in results if isinstance(r, AppendResult))

    async def _send_once(
        self,
        target: EntityURL,
        payload: Any,
        message_type: str | None,
        sender: str | None,
        request: str,
        idempotency_key: str,
        mode: str = "queued",
        attachments: list[dict[str, Any]] | None = None,
    ) -> SendReceipt:
        """A send guarded by an idempotency key (see :mod:`entities._idempotency`)."""
        slot = slot_of("send", target.url, idempotency_key)
        while True:
            now = self.clock.now()
            found, current = await recall(self.store, slot, request, now)
            if found is not None:
                return await self._receipt_of(target, slot, found)
            try:
                after = (await self.store.head(target.stream)).next_offset
            except (StreamNotFound, StreamGone):
                raise EntityNotFound(f"no entity at {target.url}", url=target.url) from None
            key = uuid.uuid4().hex
            record = Remembered(
                op="send",
                url=target.url,
                fingerprint=request,
                expires=now + RETENTION_SECONDS,
                message_key=key,
                after=after,
            )
            ops = await self._message_ops(
                target, key, payload, message_type, sender, mode, attachments
            )
            try:
                offset = await self._commit_message(
                    target, [*ops, *remember_ops(slot, record, current)]
                )
            except ConditionFailed:
                continue  # the same key, at the same time (or a moving record): look again
            receipt = SendReceipt(target.url, key, offset)
            await store_answer(self.store, slot, record, receipt.to_json())
            return receipt

    async def _receipt_of(self, target: EntityURL, slot: str, found: Remembered) -> SendReceipt:
        """The receipt a send remembered; rebuilt from its message if its process died before
        writing it (a short read from just before the message)."""
        if found.answer is not None:
            return SendReceipt(**found.answer)
        offset = found.after or "-1"
        while True:
            events, offset = await self.read(target.url, offset, limit=1000)
            for item in events:
                if item["type"] == "inbox" and item["key"] == found.message_key:
                    receipt = SendReceipt(target.url, item["key"], item["offset"])
                    await store_answer(self.store, slot, found, receipt.to_json())
                    return receipt
            if len(events) < 1000:
                raise EntityNotFound(f"the message of this key is not in {target.url}")

    async def kill(self, url: str, *, reason: str = "killed") -> None:
        """Stop the entity for good: close its stream and fence any running wake, which is
        cancelled within a fraction of a second wherever it runs (its run is recorded as
        ``cancelled``, and the type's ``on_stop`` hook runs there). The kill is recorded in the
        ``signals`` collection.

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        target = parse_url(url)
        while True:
            found = await self.record(target.url)
            if found is None:
                raise EntityNotFound(f"no entity at {target.url}", url=target.url)
            record, raw = found
            if record.status == "stopped":
                return
            now = self.clock.now()
            stopped = record.model_copy(
                update={
                    "status": "stopped",
                    "epoch": record.epoch + 1,
                    "owner": None,
                    "inflight": None,
                    "last_active": now,
                }
            )
            ops: list[Op] = [
                KvCheck(ENTITY_NS, target.url, raw),
                Append(target.stream, _stop_events(record, reason, now), close=True),
                KvPut(ENTITY_NS, target.url, stopped.dump()),
                KvPut(PENDING_NS, target.url, None),
                Notify(answered_signal(target.url)),  # its callers wait no more
                Notify(stopped_signal(target.url)),  # nor do those whose message is in flight
            ]
            try:
                await self.store.commit(ops)
                return
            except ConditionFailed:
                continue
            except StreamClosed:
                return

    async def purge(self, url: str, *, recursive: bool = False) -> list[str]:
        """Delete the entity for good: its stream and every side-table row about it (record,
        pending mark, snapshots, tags, dead letters, its schedules and timers, observer
        registrations, idempotency keys, subscription links), in one transaction. A wake of it
        running anywhere is fenced (its commit fails; it is cancelled as for a kill). The URL
        is free afterwards: a spawn there starts a new entity that sees nothing of this one.
        Children are kept (their finish wakes nobody) unless ``recursive``, which purges every
        descendant too. Returns the URLs purged, ``url`` first.

        Raises:
            InvalidEntityURL: ``url`` is not ``/type/id``.
            EntityNotFound: no entity at ``url``.
            ConditionFailed: its records kept changing through every attempt (rare: retry).
        """
        return await purge(self.store, url, recursive=recursive)

    async def schedules(self, url: str) -> list[dict[str, Any]]:
        """The entity's schedules (cron and delayed sends) from its manifest.

        Raises:
            EntityNotFound: no entity at ``url``.
        """
        view = await self.current_view(url)
        return [v for v in view.get("manifests", {}).values() if v.get("kind") == "schedule"]

    async def schedule_cron(
        self,
        url: str,
        id: str,
        expression: str,
        *,
        timezone: str = "UTC",
        payload: Any = None,
    ) -> dict[str, Any]:
        """Create or replace a cron schedule of the entity from outside a wake (what
        ``ctx.schedule_cron`` does inside one). Returns the manifest entry.

        Raises:
            EntityNotFound, EntityStopped: no such (running) entity.
            ContextError: an invalid expression or timezone.
        """
        target = parse_url(url)
        await self.get(target.url)
        current = next(
            (s for s in await self.schedules(target.url) if s["id"] == f"cron:{id}"), None
        )
        timer, replaces, schedule = cron_schedule(
            target.url,
            id,
            expression,
            timezone=timezone,
            payload=payload,
            now=self.clock.now(),
            existing=current,
        )
        entry = schedule.model_dump(mode="json")
        schedule_id = timer.schedule_id
        now = self.clock.now()
        operation: Operation = "update" if current else "insert"
        await self._external(
            target,
            [event("manifests", schedule_id, entry, now, operation)],
            arm_ops(timer, replaces),
        )
        return entry

    async def cancel_schedule(self, url: str, id: str) -> bool:
        """Cancel a cron schedule (by id) or a pending delayed send (by message key) from
        outside a wake; returns whether it existed.

        Raises:
            EntityNotFound, EntityStopped: no such (running) entity.
        """
        target = parse_url(url)
        for entry in await self.schedules(target.url):
            if entry["id"] in (f"cron:{id}", f"send:{id}", id) and entry.get("status") in (
                "active",
                "pending",
            ):
                key = None
                if entry.get("fire_at") is not None:
                    key = timer_key(entry["fire_at"], target.url, entry["id"])
                data = dict(entry, status="cancelled")
                now = self.clock.now()
                await self._external(
                    target,
                    [event("manifests", entry["id"], data, now, "update")],
                    cancel_ops(target.url, entry["id"], key),
                )
                return True
        return False

    async def _external(self, target: EntityURL, events: list[bytes], ops: list[Op]) -> None:
        """Append ``events`` to the entity's stream with ``ops``, from outside a wake.

        Raises:
            EntityNotFound, EntityStopped.
        """
        await self._commit_to(target, [Append(target.stream, events), *ops])

    async def _commit_to(self, target: EntityURL, ops: list[Op]) -> Any:
        """Commit ``ops`` that write to ``target``'s stream; return the first op's result.

        Raises:
            EntityNotFound: no entity at ``target``.
            EntityStopped: the entity was killed (its stream is closed).
        """
        try:
            return (await self.store.commit(ops))[0]
        except StreamClosed:
            raise EntityStopped(f"entity {target.url} was stopped", url=target.url) from None
        except (StreamNotFound, StreamGone):
            raise EntityNotFound(f"no entity at {target.url}", url=target.url) from None

    async def set_tag(self, url: str, key: str, value: str) -> None:
        """Set a tag from outside a wake (recorded in the entity's stream).

        Raises:
            EntityNotFound, EntityStopped.
        """
        await self._tag(url, key, value)

    async def remove_tag(self, url: str, key: str) -> None:
        """Remove a tag from outside a wake. Raises as :meth:`set_tag`."""
        await self._tag(url, key, None)

    async def _tag(self, url: str, key: str, value: str | None) -> None:
        target = parse_url(url)
        now = self.clock.now()
        if value is None:
            change = event("tags", key, None, now, "delete")
        else:
            change = event("tags", key, {"value": value}, now)
        encoded = None if value is None else value.encode()
        await self._external(target, [change], [KvPut(TAG_NS, f"{target.url}\n{key}", encoded)])

    # -- dead letters ---------------------------------------------------------------------------

    async def dead_letters(
        self, *, type: str | None = None, url: str | None = None
    ) -> list[DeadLetter]:
        """Wakes given up after their last attempt (all, of one type, or of one entity),
        oldest first. Raises InvalidEntityURL for a bad ``url``."""
        return await dead_letters(self.store, type=type, url=parse_url(url).url if url else None)

    async def retry_dead_letter(self, id: str) -> DeadLetter:
        """Deliver the events of dead letter ``id`` again, as a new wake (once, however often
        this is called); the row goes. Returns the letter.

        Raises:
            DeadLetterNotFound: no such dead letter (retried or discarded already).
            EntityStopped, EntityNotFound: the entity was killed or is gone.
        """
        letter, raw = await find(self.store, id)
        target = parse_url(letter.url)
        try:
            await self._commit_to(target, await retry_ops(self.store, letter, raw))
        except ConditionFailed:
            raise DeadLetterNotFound(f"no dead letter {id!r}", url=letter.url) from None
        except (StreamNotFound, StreamGone):
            raise EntityNotFound(f"no entity at {letter.url}", url=letter.url) from None
        return letter

    async def discard_dead_letter(self, id: str) -> DeadLetter:
        """Drop dead letter ``id`` for good. Returns the letter.

        Raises:
            DeadLetterNotFound: no such dead letter (retried or discarded already).
        """
        letter, raw = await find(self.store, id)
        try:
            await self.store.commit(discard_ops(letter, raw))
        except ConditionFailed:
            raise DeadLetterNotFound(f"no dead letter {id!r}", url=letter.url) from None
        return letter

    # -- processing -----------------------------------------------------------------------------

    async def run_until_idle(self, *, max_wakes: int | None = None) -> int:
        """Process pending wakes in this task until none is due; return how many ran.

        With a virtual clock, time jumps to the next retry when only retries are left.
        """
        if self._local_worker is None:
            self._local_worker = Worker(self)
        return await self._local_worker.run_until_idle(max_wakes=max_wakes)

    async def replay(self, url: str, *, wake: int | str | None = None) -> ReplayReport:
        """Re-execute recorded wakes of ``url`` against their journal, with no network and no
        writes; returns a :class:`~entities.ReplayReport` (``.ok``, ``.wakes``, divergences
        naming the wake, the step or write, expected and got).

        Raises:
            EntityNotFound: no entity at ``url``.
            EntitiesError: no such wake.
        """
        return await replay(self, url, wake=wake)

    async def compact(self, url: str | None = None) -> CompactionReport:
        """Compact the entity at ``url`` (``None``: every entity whose type this registry
        knows) per its type's :class:`~entities.Retention`, now; returns what was removed.

        Raises:
            EntityNotFound: no entity at ``url``.
            UnknownEntityType: ``url``'s type is not in the registry.
        """
        now = self.clock.now()
        if url is not None:
            target = parse_url(url)
            policy = self.registry.get(target.type).retention
            if await self.lookup(target.url) is None:
                raise EntityNotFound(f"no entity at {target.url}", url=target.url)
            return await compact_entity(self.store, target.url, policy, now)
        policies = {t.name: t.retention for t in self.registry.list()}
        report = CompactionReport()
        after: str | None = None
        while True:
            part, after = await compact_all(self.store, policies, now, after=after, limit=500)
            report.add(part)
            if after is None:
                return report

    async def advance(self, seconds: float) -> int:
        """Move a virtual clock forward by ``seconds``, firing timers in due order and running
        every wake they cause; return how many wakes ran. (Test kit; needs a VirtualClock.)

        Raises:
            TypeError: the runtime's clock is not virtual.
        """
        if not isinstance(self.clock, VirtualClock):
            raise TypeError("advance() needs Runtime(clock=VirtualClock())")
        target = self.clock.now() + seconds
        ran = await self.run_until_idle()
        while True:
            due = await next_due(self.store)
            if due is None or due > target:
                break
            self.clock.set(due)
            ran += await self.run_until_idle()
        self.clock.set(target)
        return ran + await self.run_until_idle()

    def worker(self, **options: Any) -> Worker:
        """A :class:`~entities.Worker` over this runtime (``await worker.run(stop)``)."""
        return Worker(self, **options)


def _stop_events(record: EntityRecord, reason: str, now: float) -> list[bytes]:
    """What a kill records: the signal, the run it cancels (if a wake was in flight), and the
    entity's end."""
    events = [event("signals", f"kill@{now:.6f}", {"signal": "kill", "reason": reason}, now)]
    inflight = record.inflight
    if inflight is not None:
        cancelled = {
            "status": "cancelled",
            "wake_id": inflight.wake_id,
            "attempt": inflight.attempt,
            "from_offset": inflight.from_offset,
            "to_offset": inflight.to_offset,
            "reason": reason,
            "epoch": record.epoch,
            "worker": record.owner,
        }
        events.append(event("runs", inflight.wake_id, cancelled, now, txid=inflight.wake_id))
    stop = {"reason": reason, "timestamp": iso(now)}
    events.append(event("entity_stopped", "entity", stop, now))
    return events
