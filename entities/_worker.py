"""Workers: claim pending entities with a fenced lease and run their wakes.

A claim is a compare-and-set of the entity record that bumps its fencing ``epoch`` and records
the in-flight wake's event range. Every later write of that wake (journal flushes, heartbeats,
the final commit) is checked against the exact record bytes the worker wrote, so a worker whose
lease was taken over (expiry, kill) can change nothing. The final commit holds the wake's state
changes, replies, sends, spawns, run record, the new acknowledged offset and the release of the
lease: one transaction.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio
import orjson

from streams import (
    Append,
    ConditionFailed,
    KvCheck,
    KvPut,
    StreamClosed,
    StreamGone,
    StreamNotFound,
)

from ._affinity import PRESENCE_SECONDS, Affinity
from ._commit import wake_commit, without_path
from ._context import HandlerContext, format_exception
from ._delivery import other_children
from ._records import (
    ENTITY_NS,
    PENDING_NS,
    TIMER_NS,
    WAKE_TYPES,
    WORKER_NS,
    EntityRecord,
    Inflight,
)
from ._registry import EntityType, call_maybe_async
from ._runtime import Runtime, event
from ._scheduler import (
    fire_due,
    fire_turn,
)
from ._urls import EntityURL, parse_url
from ._wake import WakeEvent
from ._wakes import Loaded, copy_view, load_range, read_journal, run_value, wake_event, wake_id

__all__ = ["Claim", "Worker"]

logger = logging.getLogger("entities.worker")

# timers fired per turn of the worker loop: small, so the wakes they cause run in between
FIRE_TURN = 100
# while timers keep coming due, the worker looks at them at most this often (seconds, real time)
TIMER_TICK = 0.002
# wakes one entity may run back to back on its lane while lanes are free (see ``_process``)
FOLLOW_ON = 8


@dataclass(slots=True)
class Claim:
    """A lease on one entity, held by this worker for one wake."""

    url: EntityURL
    record: EntityRecord
    raw: bytes
    token: bytes
    loaded: Loaded | None = None
    # set by the wake's commit: the entity has more to do (its pending mark outlived the wake)
    more: bool = False


_STALE = object()


class Worker:
    """Runs wakes for a :class:`Runtime`: ``await worker.run(stop_event)``.

    ``concurrency`` bounds how many entities run at once; each entity runs at most one wake at a
    time across all workers sharing the store.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        concurrency: int | None = None,
        poll_interval: float = 1.0,
        drain_seconds: float = 10.0,
        cache_size: int | None = None,
    ) -> None:
        self.rt = runtime
        self.concurrency = concurrency or runtime.concurrency
        self.poll_interval = poll_interval
        self.drain_seconds = drain_seconds
        self._active: set[str] = set()
        # url -> (not before this time, the pending mark it was found leased elsewhere under)
        self._blocked: dict[str, tuple[float, bytes | None]] = {}
        self._kick = anyio.Event()
        self._timers_dirty = True
        self._idle = anyio.Event()
        self.wakes = 0
        # claim outcomes: won, lost (another claim committed first), held (leased elsewhere),
        # empty (nothing to run by the time it was read): a measure of contention
        self.claims: Counter[str] = Counter()
        self.cache_size = runtime.cache_entities if cache_size is None else cache_size
        self._records: OrderedDict[str, bytes] = OrderedDict()
        self._running: dict[str, tuple[Claim, anyio.Lock]] = {}
        self._views: OrderedDict[str, tuple[str, dict[str, dict[str, Any]]]] = OrderedDict()
        self.affinity = Affinity(runtime.store, runtime.worker_id)

    # -- loops ------------------------------------------------------------------------------

    def _poke(self) -> None:
        self._kick.set()

    def _timers_changed(self) -> None:
        self._timers_dirty = True
        self._kick.set()

    async def run(self, stop: anyio.Event) -> None:
        """Process wakes until ``stop`` is set, then finish in-flight wakes (up to
        ``drain_seconds``; the rest are cancelled, their leases released, and redelivered)."""
        removers = [
            self.rt.store.listen(f"kv:{PENDING_NS}", self._poke),
            self.rt.store.listen(f"kv:{TIMER_NS}", self._timers_changed),
            self.rt.store.listen(f"kv:{WORKER_NS}", self.affinity.changed),
        ]
        clock = self.rt.clock
        # Timers are looked at (one scan, see ``fire_turn``) when one comes due, when the timer
        # table changed, or every poll interval; and, while timers keep coming due, at most
        # once per TIMER_TICK (real time), so a dense run of them fires in batches instead of
        # one scan and one commit per timer.
        next_timer: float | None = None
        looked_at = -math.inf
        await self._announce()  # before the first scan, so the others leave this one its share
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stopper, stop)
                tg.start_soon(self._heartbeats)
                tg.start_soon(self._presence)
                failures = 0
                while not stop.is_set():
                    self._kick = anyio.Event()
                    timeout = self.poll_interval
                    timer_in: float | None = None  # seconds until the timers want a look
                    try:
                        now, tick = clock.now(), time.monotonic()
                        wanted = (
                            self._timers_dirty
                            or (next_timer is not None and next_timer <= now)
                            or tick - looked_at >= self.poll_interval
                        )
                        if wanted and tick - looked_at >= TIMER_TICK:
                            self._timers_dirty = False
                            looked_at = tick
                            # one batch per look, so wakes of delivered timers interleave with
                            # firing the rest (more left due makes the next look come soon)
                            _fired, next_timer = await fire_turn(self.rt.store, now, FIRE_TURN)
                        if wanted and looked_at != tick:
                            timer_in = looked_at + TIMER_TICK - tick  # too soon: wait the tick
                        elif next_timer is not None:
                            timer_in = max(next_timer - clock.now(), TIMER_TICK)
                        next_blocked = await self._dispatch(tg)
                        failures = 0
                    except Exception as exc:  # e.g. the database restarts: retry, backing off
                        failures += 1
                        logger.warning(
                            "worker loop failed (%s: %s); retrying", type(exc).__name__, exc
                        )
                        next_timer = next_blocked = None
                        self._timers_dirty = True
                        timeout = min(timeout, 0.05 * 2 ** min(failures, 8))
                        with anyio.move_on_after(timeout):
                            await stop.wait()
                        continue
                    if timer_in is not None:
                        timeout = max(0.0, min(timeout, timer_in))
                    if next_blocked is not None:
                        timeout = max(0.0, min(timeout, next_blocked - clock.now()))
                    steal_in = self.affinity.next_steal()
                    if steal_in is not None:
                        timeout = min(timeout, steal_in)
                    if clock.virtual:
                        timeout = min(timeout, 0.05)
                    with anyio.move_on_after(timeout):
                        await self._kick.wait()
                with anyio.move_on_after(self.drain_seconds):
                    while self._active:
                        self._idle = anyio.Event()
                        await self._idle.wait()
                tg.cancel_scope.cancel()
        finally:
            for remove in removers:
                remove()
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:  # a clean stop: the others need not wait for the presence to expire
                    await self.rt.store.commit([self.affinity.absence()])
                except Exception as exc:
                    logger.debug("could not remove the presence record: %r", exc)

    async def _announce(self) -> None:
        try:
            await self.rt.store.commit([self.affinity.presence(self.rt.clock.now())])
        except Exception as exc:  # e.g. the database restarts: the next round retries
            logger.warning("presence renewal failed: %r", exc)

    async def _presence(self) -> None:
        """Keep announcing this worker to the others sharing the store."""
        while True:
            await anyio.sleep(PRESENCE_SECONDS)
            await self._announce()

    async def _stopper(self, stop: anyio.Event) -> None:
        await stop.wait()
        self._poke()

    async def _dispatch(self, tg: anyio.abc.TaskGroup) -> float | None:
        if len(self._active) >= self.concurrency:
            return None  # no free lane (a finishing wake pokes this loop): skip the scan
        now = self.rt.clock.now()
        next_due: float | None = None
        pending = await self.rt.store.kv_scan(PENDING_NS)
        if len(self._blocked) > 2 * len(pending) + 1024:  # forget entities no longer pending
            marked = {url for url, _token in pending}
            for url in [u for u in self._blocked if u not in marked]:
                del self._blocked[url]
        await self.affinity.refresh(now)
        # this worker's share of the pending entities first, then those waiting on others
        for url, token in self.affinity.order(pending):
            if len(self._active) >= self.concurrency:
                break
            blocked = self._blocked.get(url)
            if blocked is not None:
                # leased elsewhere when last tried: worth a new try once the lease ends, or as
                # soon as the entity was marked again (its holder finished, or more arrived)
                until, held = blocked
                if until > now and held in (None, token):
                    next_due = until if next_due is None else min(next_due, until)
                    continue
                del self._blocked[url]
            if url in self._active:
                continue
            self._active.add(url)
            tg.start_soon(self._process, url, token, not self.affinity.prefers(url))
        return next_due

    async def _process(self, url: str, token: bytes | None, stolen: bool = False) -> None:
        try:
            for _ in range(FOLLOW_ON):
                # the scan that found ``url`` may be stale by now (another worker may have run
                # its wake meanwhile): the claim then finds no wake event and only clears the mark
                claim = await self.claim(url, token, stolen=stolen)
                stolen = False  # a follow-on wake is this worker's own
                if claim is None:
                    break
                await self._run_or_release(claim)
                self.wakes += 1
                # more arrived while it ran: take the next wake right away, unless other
                # entities wait for a lane (then this one queues behind them, for fairness)
                if not claim.more or len(self._active) >= self.concurrency:
                    break
                token = None  # the claim reads the current mark
        except Exception:
            logger.exception("wake of %s failed in the runtime", url)
            self._block(url, self.rt.clock.now() + 1.0)
        finally:
            self._active.discard(url)
            self._idle.set()
            self._poke()

    async def run_until_idle(self, *, max_wakes: int | None = None) -> int:
        """Process due wakes until none is left (see :meth:`Runtime.run_until_idle`)."""
        done = 0
        while max_wakes is None or done < max_wakes:
            await fire_due(self.rt.store, self.rt.clock.now())
            pending = await self.rt.store.kv_scan(PENDING_NS)
            if not pending:
                return done
            now = self.rt.clock.now()
            due = [(u, t) for u, t in pending if self._until(u) <= now]
            if max_wakes is not None:
                due = due[: max_wakes - done]
            ran = await self._run_batch(due) if due else 0
            done += ran
            if ran == 0:
                waits = [self._until(u) for u, _ in pending if u in self._blocked]
                if waits and self.rt.clock.virtual:
                    self.rt.clock.set(min(waits))  # type: ignore[attr-defined]
                    continue
                if not due:
                    return done
                # claims found nothing to do (e.g. only empty marks were cleared): rescan once
                if not await self.rt.store.kv_scan(PENDING_NS):
                    return done
                if all(self._until(u) > self.rt.clock.now() for u, _ in pending):
                    return done
        return done

    async def _run_batch(self, items: list[tuple[str, bytes]]) -> int:
        """Run the wakes of ``items`` on ``concurrency`` lanes sharing one iterator."""
        queue = iter(items)
        ran = 0

        async def lane() -> None:
            nonlocal ran
            for url, token in queue:
                claim = await self.claim(url, token)
                if claim is not None:
                    await self._run_or_release(claim)
                    ran += 1

        async with anyio.create_task_group() as tg:
            for _ in range(min(self.concurrency, len(items))):
                tg.start_soon(lane)
        return ran

    async def _run_or_release(self, claim: Claim) -> None:
        """:meth:`run_wake`; if it is cancelled (Ctrl-C, a timeout, the end of a drain), give
        the lease back at once, keeping the wake's range, so the wake is redelivered now (as
        its next attempt, with its journal) instead of after the lease expires."""
        try:
            await self.run_wake(claim)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._release(claim)
            raise

    async def _release(self, claim: Claim) -> None:
        released = claim.record.model_copy(
            update={"owner": None, "status": "idle", "lease_expires": 0.0}
        )
        raw = released.dump()
        try:
            await self.rt.store.commit(
                [KvCheck(ENTITY_NS, claim.url.url, claim.raw), KvPut(ENTITY_NS, claim.url.url, raw)]
            )
        except ConditionFailed:  # the wake committed (or was fenced) after all
            self._remember(claim.url.url, None)
            return
        except Exception as exc:  # e.g. the database is gone: the lease expires instead
            logger.warning("could not release the lease of %s: %r", claim.url, exc)
            self._remember(claim.url.url, None)
            return
        self._remember(claim.url.url, raw)
        self._running.pop(claim.url.url, None)
        logger.info("wake of %s was cancelled; its lease is released", claim.url)

    # -- claiming ---------------------------------------------------------------------------

    def _block(self, url: str, until: float, *, held: bytes | None = None) -> None:
        """Do not try ``url`` again before ``until``; if it is ``held`` (leased elsewhere, under
        that pending mark), try again as soon as its mark changes."""
        self._blocked[url] = (until, held)

    def _until(self, url: str) -> float:
        """When ``url`` may be tried again (0 when it is not blocked)."""
        blocked = self._blocked.get(url)
        return 0.0 if blocked is None else blocked[0]

    def _remember(self, url: str, raw: bytes | None) -> None:
        if raw is None:
            self._records.pop(url, None)
            return
        self._records[url] = raw
        self._records.move_to_end(url)
        while len(self._records) > self.cache_size:
            self._records.popitem(last=False)

    async def claim(
        self, url: str, token: bytes | None = None, *, stolen: bool = False
    ) -> Claim | None:
        """Take the lease on ``url`` if it has work and nobody else holds it.

        The entity record may come from this worker's bounded cache: the compare-and-set of the
        claim fails if it is stale, and the claim is then retried once with a fresh read.
        ``stolen``: ``url`` prefers another live worker, which may be running it right now; the
        claim goes ahead only if the pending mark is still ``token`` (else that worker took it
        since the scan) and reads the record fresh, so a collision costs two reads, not a failed
        commit or a load.
        """
        target = parse_url(url)
        if token is None or stolen:
            current = await self.rt.store.kv_get(PENDING_NS, target.url)
            if current is None or (token is not None and current != token):
                return None
            token = current
        for fresh in (stolen, True):  # a stolen claim skips the cache
            raw = None if fresh else self._records.get(target.url)
            if raw is None:
                raw = await self.rt.store.kv_get(ENTITY_NS, target.url)
                fresh = True
            claim = await self._try_claim(target, raw, token)
            if claim is not _STALE:
                return claim  # type: ignore[return-value]
            self._remember(target.url, None)
            if fresh:
                return None
        return None

    async def _try_claim(self, target: EntityURL, raw: bytes | None, token: bytes) -> object:
        rt = self.rt
        if raw is None:  # an orphan mark: drop it
            await rt.store.commit([KvPut(PENDING_NS, target.url, None, only_if=True, expect=token)])
            return None
        record = EntityRecord.load(raw)
        now = rt.clock.now()
        if record.status == "stopped":
            await rt.store.commit([KvPut(PENDING_NS, target.url, None, only_if=True, expect=token)])
            return None
        if record.owner is not None and record.lease_expires > now:
            self._block(target.url, record.lease_expires, held=token)
            self.claims["held"] += 1
            return None
        if record.retry_at is not None and record.retry_at > now:
            self._block(target.url, record.retry_at)
            return None
        self._blocked.pop(target.url, None)
        inflight = record.inflight
        loaded: Loaded | None = None
        if inflight is None:
            try:
                loaded = await self._load(target, record.acked, None)
            except (StreamNotFound, StreamGone):
                return None
            if not any(e["type"] in WAKE_TYPES for e in loaded.events):
                self.claims["empty"] += 1
                # nothing to run (another worker ran the wake since the mark was read, or a
                # conservative re-mark): no empty wake; clear the mark if it is still the one
                # read and the record is still the one loaded from
                try:
                    await rt.store.commit(
                        [
                            KvCheck(ENTITY_NS, target.url, raw),
                            KvPut(PENDING_NS, target.url, None, only_if=True, expect=token),
                        ]
                    )
                except ConditionFailed:
                    return _STALE
                return None
            inflight = Inflight(
                wake_id=wake_id(record.acked, loaded.to_offset),
                from_offset=record.acked,
                to_offset=loaded.to_offset,
            )
        else:
            inflight = inflight.model_copy(update={"attempt": inflight.attempt + 1})
        claimed = record.model_copy(
            update={
                "owner": rt.worker_id,
                "epoch": record.epoch + 1,
                "lease_expires": now + rt.lease_seconds,
                "inflight": inflight,
                "status": "running",
                "retry_at": None,
            }
        )
        claimed_raw = claimed.dump()
        try:
            await rt.store.commit(
                [KvCheck(ENTITY_NS, target.url, raw), KvPut(ENTITY_NS, target.url, claimed_raw)]
            )
        except ConditionFailed:
            self.claims["lost"] += 1
            return _STALE
        self.claims["won"] += 1
        self._remember(target.url, claimed_raw)
        return Claim(target, claimed, claimed_raw, token, loaded)

    # -- running ----------------------------------------------------------------------------

    async def run_wake(self, claim: Claim) -> None:
        """Run one claimed wake to its commit (or its recorded failure)."""
        rt = self.rt
        entity_type = rt.registry.get(claim.url.type)
        inflight = claim.record.inflight
        assert inflight is not None
        loaded = claim.loaded
        if loaded is None or loaded.to_offset != inflight.to_offset:
            loaded = await self._load(claim.url, inflight.from_offset, inflight.to_offset)
        view, snapshot_offset, events = loaded.view, loaded.base_offset, loaded.events
        wake_events = [e for e in events if e["type"] in WAKE_TYPES]
        if not wake_events:
            await self._finish(claim, [], [], view, snapshot_offset, empty=True)
            return
        journal = {}
        if inflight.attempt > 1:
            journal = await read_journal(self.rt.store, claim.url.stream, inflight)
        finished = {
            e["value"]["finished_child"]["url"]
            for e in wake_events
            if e["type"] == "wakes" and (e.get("value") or {}).get("kind") == "child_finished"
        }
        if finished:
            others = await other_children(self.rt, view, finished)
            for e in wake_events:
                if (e.get("value") or {}).get("kind") == "child_finished":
                    e["value"]["other_children"] = others
        wake = wake_event(
            claim.url, inflight, events, wake_events, first_wake=not view.get("manifests")
        )
        lock = anyio.Lock()

        async def flush(changes: list[dict[str, Any]]) -> None:
            async with lock:
                msgs = [orjson.dumps(change) for change in changes]
                try:
                    await rt.store.commit(
                        [
                            KvCheck(ENTITY_NS, claim.url.url, claim.raw),
                            Append(claim.url.stream, msgs),
                        ]
                    )
                except (ConditionFailed, StreamClosed):
                    raise _Fenced() from None

        started = rt.clock.now()
        ctx = HandlerContext(
            runtime=rt,
            entity_type=entity_type,
            url=claim.url,
            view=copy_view(view),
            wake=wake,
            events=events,
            journal=journal,
            run_id=inflight.wake_id,
            flush=flush,
            runs_before=claim.record.runs,
        )
        error: BaseException | None = None
        self._running[claim.url.url] = (claim, lock)
        try:
            await _invoke(entity_type, ctx, wake)
        except _Fenced:
            logger.info("wake %s of %s was fenced", inflight.wake_id, claim.url)
            self._remember(claim.url.url, None)
            self._running.pop(claim.url.url, None)
            return
        except Exception as exc:  # the handler failed: record it
            error = exc
        finally:
            await lock.acquire()  # no heartbeat from here on: the final commit is ours
        self._running.pop(claim.url.url, None)
        duration = rt.clock.now() - started
        if error is None:
            run = run_value(inflight, wake, "completed", duration)
            run["epoch"], run["worker"] = claim.record.epoch, claim.record.owner
            run["sends"] = [[s.target.url, s.message_type, s.payload] for s in ctx.effects.sends]
            run["spawns"] = [s.target.url for s in ctx.effects.spawns]
            await self._finish(
                claim,
                [event("runs", inflight.wake_id, run, rt.clock.now(), txid=inflight.wake_id)],
                [ctx],
                view,
                snapshot_offset,
                run_status="completed",
            )
            return
        await self._failed(claim, entity_type, ctx, wake, error, duration, view, snapshot_offset)

    async def _heartbeats(self) -> None:
        """Renew the leases of running wakes every third of the lease period (one loop for all
        wakes of this worker)."""
        rt = self.rt
        while True:
            await rt.clock.sleep(rt.lease_seconds / 3)
            for claim, lock in list(self._running.values()):
                if lock.locked():
                    continue
                async with lock:
                    renewed = claim.record.model_copy(
                        update={"lease_expires": rt.clock.now() + rt.lease_seconds}
                    )
                    raw = renewed.dump()
                    try:
                        await rt.store.commit(
                            [
                                KvCheck(ENTITY_NS, claim.url.url, claim.raw),
                                KvPut(ENTITY_NS, claim.url.url, raw),
                            ]
                        )
                    except ConditionFailed:
                        continue
                    except Exception as exc:  # e.g. the database restarts: try next round
                        logger.warning("lease renewal of %s failed: %r", claim.url, exc)
                        continue
                    claim.record, claim.raw = renewed, raw

    async def _load(self, url: EntityURL, acked: str, to_offset: str | None) -> Loaded:
        """The view and events of a wake range (see :func:`load_range`), folded from this
        worker's cached view of ``url`` when it has one."""
        return await load_range(self.rt.store, url, acked, to_offset, self._views.get(url.url))

    async def _failed(
        self,
        claim: Claim,
        entity_type: EntityType,
        ctx: HandlerContext,
        wake: WakeEvent,
        error: BaseException,
        duration: float,
        view: dict[str, dict[str, Any]],
        snapshot_offset: str,
    ) -> None:
        rt = self.rt
        inflight = claim.record.inflight
        assert inflight is not None
        now = rt.clock.now()
        final = inflight.attempt >= entity_type.max_attempts
        status = "dead_lettered" if final else "failed"
        run = run_value(inflight, wake, status, duration, error=error)
        run["epoch"], run["worker"] = claim.record.epoch, claim.record.owner
        failure = [
            event("runs", inflight.wake_id, run, now, txid=inflight.wake_id),
            event(
                "errors",
                f"{inflight.wake_id}.{inflight.attempt}",
                {
                    "run_id": inflight.wake_id,
                    "attempt": inflight.attempt,
                    "error": f"{type(error).__name__}: {error}",
                    "type": type(error).__name__,
                    "traceback": format_exception(error),
                    "final": final,
                },
                now,
            ),
        ]
        logger.warning(
            "wake %s of %s failed (attempt %d/%d): %r",
            inflight.wake_id,
            claim.url,
            inflight.attempt,
            entity_type.max_attempts,
            error,
        )
        if final:
            contexts: list[HandlerContext] = []
            if entity_type.on_error is not None:
                hook_ctx = HandlerContext(
                    runtime=rt,
                    entity_type=entity_type,
                    url=claim.url,
                    view=copy_view(view),
                    wake=wake,
                    events=ctx.events,
                    journal={},
                    run_id=inflight.wake_id,
                    flush=lambda entries: None,
                    runs_before=claim.record.runs,
                )
                try:
                    await call_maybe_async(entity_type.on_error, hook_ctx, error)
                    contexts.append(hook_ctx)
                except Exception as hook_error:
                    logger.exception("on_error hook of %s failed", claim.url)
                    failure.append(
                        event(
                            "errors",
                            f"{inflight.wake_id}.on_error",
                            {
                                "run_id": inflight.wake_id,
                                "error": repr(hook_error),
                                "traceback": format_exception(hook_error),
                                "final": True,
                            },
                            now,
                        )
                    )
            await self._finish(
                claim,
                failure,
                contexts,
                view,
                snapshot_offset,
                run_status="failed",
                error=f"{type(error).__name__}: {error}",
            )
            return
        for entry in ctx.effects.journal:  # keep now()/uuid() stable for the next attempt
            failure.append(event("steps", f"{entry['wake_id']}/{entry['name']}", entry, now))
        delay = min(rt.retry_max_seconds, rt.retry_base_seconds * 2 ** (inflight.attempt - 1))
        delay *= 0.8 + 0.4 * random.random()
        retry = claim.record.model_copy(
            update={
                "owner": None,
                "status": "idle",
                "retry_at": now + delay,
                "lease_expires": 0.0,
                "last_active": now,
            }
        )
        retry_raw: bytes | None = retry.dump()
        try:
            await rt.store.commit(
                [
                    KvCheck(ENTITY_NS, claim.url.url, claim.raw),
                    Append(claim.url.stream, failure),
                    KvPut(ENTITY_NS, claim.url.url, retry_raw),
                ]
            )
        except (ConditionFailed, StreamClosed):
            logger.info("failure record of %s was fenced", claim.url)
            retry_raw = None
        self._remember(claim.url.url, retry_raw)
        self._block(claim.url.url, retry.retry_at or now)

    async def _finish(
        self,
        claim: Claim,
        own_head: list[bytes],
        contexts: Sequence[HandlerContext],
        view: dict[str, dict[str, Any]],
        snapshot_offset: str,
        *,
        empty: bool = False,
        run_status: str | None = None,
        error: str | None = None,
    ) -> None:
        """Commit a finished wake: effects, acknowledged offset, lease release, one transaction."""
        rt = self.rt
        inflight = claim.record.inflight
        assert inflight is not None
        commit = await wake_commit(
            rt,
            claim.url,
            claim.record,
            claim.raw,
            claim.token,
            own_head,
            contexts,
            view,
            snapshot_offset,
            rt.clock.now(),
            empty=empty,
            run_status=run_status,
            error=error,
        )
        ops, clear = commit.ops, commit.clear
        claim.more = commit.more
        for _attempt in range(8):
            try:
                results = await rt.store.commit(ops)
                # the mark was not ours to clear: more arrived while the wake ran
                cleared = next(r for op, r in zip(ops, results, strict=True) if op is clear)
                claim.more = claim.more or cleared is False
                break
            except (StreamClosed, StreamNotFound, StreamGone) as exc:
                if exc.path == claim.url.stream or not exc.path:
                    logger.info("commit of %s wake %s was fenced", claim.url, inflight.wake_id)
                    self._remember(claim.url.url, None)
                    return
                # a recipient was killed or deleted after the handler checked it: drop what
                # was addressed to it and commit the rest
                logger.warning(
                    "wake %s of %s: %s is gone; its messages are dropped",
                    inflight.wake_id,
                    claim.url,
                    exc.path,
                )
                ops = without_path(ops, exc.path)
            except ConditionFailed:
                logger.info("commit of %s wake %s was fenced", claim.url, inflight.wake_id)
                self._remember(claim.url.url, None)
                return
        self._remember(claim.url.url, commit.record)
        self._views[claim.url.url] = (inflight.to_offset, view)
        self._views.move_to_end(claim.url.url)
        while len(self._views) > self.cache_size:
            self._views.popitem(last=False)


class _Fenced(BaseException):
    """Raised inside a wake when its lease was lost; derived from BaseException so handler code
    catching ``Exception`` cannot swallow it."""


async def _invoke(entity_type: EntityType, ctx: HandlerContext, wake: WakeEvent) -> None:
    remaining = list(wake.messages)
    if entity_type.on_message is not None and wake.messages:
        remaining = []
        for message in wake.messages:
            ctx.current_message = message
            answer = await call_maybe_async(entity_type.on_message, ctx, message)
            if answer is None:
                remaining.append(message)
            else:
                ctx.reply(answer, to=message)
        ctx.current_message = None
        if not remaining and not wake.wakes:
            return
        wake = replace(wake, messages=tuple(remaining))
        ctx.wake = wake
    await call_maybe_async(entity_type.handler, ctx, wake)
