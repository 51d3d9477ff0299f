"""Workers: the loop that drives the wake pipeline (:mod:`entities._pipeline`).

A running worker fires due timers, scans the pending marks, and runs wakes on up to
``concurrency`` lanes: each lane claims an entity (a fenced lease), loads its wake, runs the
entity type's code with a :class:`~entities.HandlerContext`, and commits the outcome. Heartbeats
renew the leases of running wakes; a stop drains in-flight wakes, then cancels the rest and
gives their leases back so they are redelivered at once.
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Any, Protocol

import anyio
import anyio.abc

from streams import (
    Append,
    ConditionFailed,
    KvCheck,
    Store,
    StreamClosed,
    StreamGone,
    StreamNotFound,
)

from ._calls import call_maybe_async
from ._context import HandlerContext
from ._effects import Effects
from ._errors import LeaseLost
from ._events import encode, event
from ._host import Host
from ._pipeline.affinity import PRESENCE_SECONDS, Affinity
from ._pipeline.claim import Claim, Claimer
from ._pipeline.commit import error_event, retry_commit, run_value, wake_commit, without_path
from ._pipeline.deliver import other_children
from ._pipeline.fire import fire_due, fire_turn
from ._pipeline.load import View, copy_view, read_journal, wake_event
from ._records import ENTITY_NS, PENDING_NS, TIMER_NS, WAKE_TYPES, WORKER_NS
from ._registry import EntityType, Registry
from ._wake import WakeEvent

__all__ = ["Claim", "Worker", "WorkerHost"]

logger = logging.getLogger("entities.worker")

# timers fired per turn of the worker loop: small, so the wakes they cause run in between
FIRE_TURN = 100
# while timers keep coming due, the worker looks at them at most this often (seconds, real time)
TIMER_TICK = 0.002
# wakes one entity may run back to back on its lane while lanes are free (see ``_process``)
FOLLOW_ON = 8


class WorkerHost(Host, Protocol):
    """What a worker runs on (a :class:`~entities.Runtime` is one): the store, the registry,
    its settings, and what handlers may reach (:class:`~entities._context.Host`)."""

    @property
    def store(self) -> Store: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def worker_id(self) -> str: ...

    @property
    def concurrency(self) -> int: ...

    @property
    def lease_seconds(self) -> float: ...

    @property
    def retry_base_seconds(self) -> float: ...

    @property
    def retry_max_seconds(self) -> float: ...

    @property
    def snapshot_every(self) -> int: ...

    @property
    def cache_entities(self) -> int: ...


class _TimerLooks:
    """When a running worker looks at the timers (one scan, see ``fire_turn``): when one comes
    due, when the timer table changed, or every poll interval; and, while timers keep coming
    due, at most once per ``TIMER_TICK`` (real time), so a dense run of them fires in batches
    instead of one scan and one commit per timer."""

    def __init__(self, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self.dirty = True  # the timer table changed since the last look
        self.next: float | None = None  # store-clock time of the next due timer
        self.looked_at = -math.inf  # monotonic time of the last look

    async def turn(self, store: Store, now: float) -> float | None:
        """Look if it is time to; return the seconds until the timers want the next look
        (``None``: only the poll interval). Raises whatever the store raises."""
        tick = time.monotonic()
        wanted = (
            self.dirty
            or (self.next is not None and self.next <= now)
            or tick - self.looked_at >= self.poll_interval
        )
        if wanted and tick - self.looked_at >= TIMER_TICK:
            self.dirty = False
            self.looked_at = tick
            # one batch per look, so wakes of delivered timers interleave with firing the rest
            # (more left due makes the next look come soon)
            _fired, self.next = await fire_turn(store, now, FIRE_TURN)
        if wanted and self.looked_at != tick:
            return self.looked_at + TIMER_TICK - tick  # too soon: wait the tick
        if self.next is not None:
            return max(self.next - now, TIMER_TICK)
        return None


class Worker:
    """Runs wakes for a :class:`~entities.Runtime`: ``await worker.run(stop_event)``.

    ``concurrency`` bounds how many entities run at once; each entity runs at most one wake at a
    time across all workers sharing the store.
    """

    def __init__(
        self,
        runtime: WorkerHost,
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
        self._kick = anyio.Event()
        self._timers = _TimerLooks(poll_interval)
        self._idle = anyio.Event()
        self.wakes = 0
        self.cache_size = runtime.cache_entities if cache_size is None else cache_size
        self.claimer = Claimer(
            runtime.store,
            runtime.clock,
            runtime.worker_id,
            lease_seconds=runtime.lease_seconds,
            cache_size=self.cache_size,
        )
        self._running: dict[str, tuple[Claim, anyio.Lock]] = {}
        self.affinity = Affinity(runtime.store, runtime.worker_id)

    @property
    def claims(self) -> Any:
        """Claim outcomes so far (a ``Counter``): won, lost (another claim committed first),
        held (leased elsewhere), empty (nothing to run by the time it was read)."""
        return self.claimer.counts

    # -- loops ------------------------------------------------------------------------------

    def _poke(self) -> None:
        self._kick.set()

    def _timers_changed(self) -> None:
        self._timers.dirty = True
        self._kick.set()

    async def run(self, stop: anyio.Event) -> None:
        """Process wakes until ``stop`` is set, then finish in-flight wakes (up to
        ``drain_seconds``; the rest are cancelled, their leases released, and redelivered)."""
        store = self.rt.store
        removers = [
            store.listen(f"kv:{PENDING_NS}", self._poke),
            store.listen(f"kv:{TIMER_NS}", self._timers_changed),
            store.listen(f"kv:{WORKER_NS}", self.affinity.changed),
        ]
        await self._announce()  # before the first scan, so the others leave this one its share
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stopper, stop)
                tg.start_soon(self._heartbeats)
                tg.start_soon(self._presence)
                await self._loop(stop, tg)
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
                    await store.commit([self.affinity.absence()])
                except Exception as exc:
                    logger.debug("could not remove the presence record: %r", exc)

    async def _loop(self, stop: anyio.Event, tg: anyio.abc.TaskGroup) -> None:
        """Fire timers and dispatch wakes until ``stop``, sleeping until the next thing is due
        or a notification pokes the loop."""
        clock = self.rt.clock
        failures = 0
        while not stop.is_set():
            self._kick = anyio.Event()
            timeout = self.poll_interval
            try:
                timer_in = await self._timers.turn(self.rt.store, clock.now())
                next_blocked = await self._dispatch(tg)
                failures = 0
            except Exception as exc:  # e.g. the database restarts: retry, backing off
                failures += 1
                logger.warning("worker loop failed (%s: %s); retrying", type(exc).__name__, exc)
                self._timers.next, self._timers.dirty = None, True
                with anyio.move_on_after(min(timeout, 0.05 * 2 ** min(failures, 8))):
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
        self.claimer.forget_unmarked(pending)
        await self.affinity.refresh(now)
        # this worker's share of the pending entities first, then those waiting on others
        for url, token in self.affinity.order(pending):
            if len(self._active) >= self.concurrency:
                break
            until = self.claimer.ready(url, token, now)
            if until is not None:
                next_due = until if next_due is None else min(next_due, until)
                continue
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
            self.claimer.block(url, self.rt.clock.now() + 1.0)
        finally:
            self._active.discard(url)
            self._idle.set()
            self._poke()

    async def run_until_idle(self, *, max_wakes: int | None = None) -> int:
        """Process due wakes until none is left (see :meth:`Runtime.run_until_idle`).

        Raises whatever the store raises.
        """
        store, clock, until = self.rt.store, self.rt.clock, self.claimer.until
        done = 0
        while max_wakes is None or done < max_wakes:
            await fire_due(store, clock.now())
            pending = await store.kv_scan(PENDING_NS)
            if not pending:
                return done
            now = clock.now()
            due = [(u, t) for u, t in pending if until(u) <= now]
            if max_wakes is not None:
                due = due[: max_wakes - done]
            ran = await self._run_batch(due) if due else 0
            done += ran
            if ran == 0:
                waits = [until(u) for u, _ in pending if u in self.claimer.blocked]
                if waits and clock.virtual:
                    clock.set(min(waits))  # type: ignore[attr-defined]
                    continue
                if not due:
                    return done
                # claims found nothing to do (e.g. only empty marks were cleared): rescan once
                if not await store.kv_scan(PENDING_NS):
                    return done
                if all(until(u) > clock.now() for u, _ in pending):
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
                if await self.claimer.release(claim):
                    self._running.pop(claim.url.url, None)
                    logger.info("wake of %s was cancelled; its lease is released", claim.url)
            raise

    async def claim(
        self, url: str, token: bytes | None = None, *, stolen: bool = False
    ) -> Claim | None:
        """Take the lease on ``url`` if it has work and nobody else holds it (see
        :meth:`~entities._pipeline.claim.Claimer.claim`). Raises whatever the store raises."""
        return await self.claimer.claim(url, token, stolen=stolen)

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
                    try:
                        await self.claimer.renew(claim)
                    except Exception as exc:  # e.g. the database restarts: try next round
                        logger.warning("lease renewal of %s failed: %r", claim.url, exc)

    # -- running ----------------------------------------------------------------------------

    async def run_wake(self, claim: Claim) -> None:
        """Run one claimed wake to its commit (or its recorded failure).

        Raises whatever the store raises (the lease then expires and the wake is redelivered).
        """
        rt = self.rt
        entity_type = rt.registry.get(claim.url.type)
        inflight = claim.record.inflight
        assert inflight is not None
        loaded = claim.loaded
        if loaded is None or loaded.to_offset != inflight.to_offset:
            loaded = await self.claimer.load(claim.url, inflight.from_offset, inflight.to_offset)
        view, base, events = loaded.view, loaded.base_offset, loaded.events
        wake_events = [e for e in events if e["type"] in WAKE_TYPES]
        if not wake_events:
            await self._finish(claim, [], [], view, base, empty=True)
            return
        journal = {}
        if inflight.attempt > 1:
            journal = await read_journal(rt.store, claim.url.stream, inflight)
        await self._note_other_children(view, wake_events)
        wake = wake_event(
            claim.url, inflight, events, wake_events, first_wake=not view.get("manifests")
        )
        lock = anyio.Lock()
        scope = anyio.CancelScope()

        async def flush(changes: list[dict[str, Any]]) -> None:
            """Write live progress now, fenced by the claim; once fenced, cancel the wake."""
            async with lock:
                try:
                    await rt.store.commit(
                        [
                            KvCheck(ENTITY_NS, claim.url.url, claim.raw),
                            Append(claim.url.stream, [encode(c) for c in changes]),
                        ]
                    )
                except (ConditionFailed, StreamClosed):
                    scope.cancel()
                    message = f"wake {inflight.wake_id} of {claim.url} lost its lease"
                    raise LeaseLost(message, url=claim.url.url) from None

        ctx = self._context(claim, entity_type, view, wake, events, journal, flush)
        started = rt.clock.now()
        error: BaseException | None = None
        self._running[claim.url.url] = (claim, lock)
        with scope:
            try:
                await entity_type.invoke(ctx, wake)
            except Exception as exc:  # the handler failed: record it
                error = exc
        self._running.pop(claim.url.url, None)
        if scope.cancel_called:  # a write was fenced: another worker owns the entity now
            logger.info("wake %s of %s was fenced", inflight.wake_id, claim.url)
            self.claimer.remember(claim.url.url, None)
            return
        await lock.acquire()  # no heartbeat from here on: the final commit is ours
        duration = rt.clock.now() - started
        if error is not None:
            await self._failed(claim, entity_type, ctx, wake, error, duration, view, base)
            return
        run = run_value(claim.record, wake, "completed", duration)
        run["sends"] = [[s.target.url, s.message_type, s.payload] for s in ctx.effects.sends]
        run["spawns"] = [s.target.url for s in ctx.effects.spawns]
        head = [event("runs", inflight.wake_id, run, rt.clock.now(), txid=inflight.wake_id)]
        await self._finish(claim, head, [ctx.effects], view, base, run_status="completed")

    def _context(
        self,
        claim: Claim,
        entity_type: EntityType,
        view: View,
        wake: WakeEvent,
        events: list[dict[str, Any]],
        journal: dict[str, Any],
        flush: Any,
    ) -> HandlerContext:
        """The context of one run of ``entity_type``'s code in the wake of ``claim``."""
        inflight = claim.record.inflight
        assert inflight is not None
        return HandlerContext(
            host=self.rt,
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

    async def _note_other_children(self, view: View, wake_events: list[dict[str, Any]]) -> None:
        """Add ``other_children`` (with their status) to each ``child_finished`` wake event."""
        finished = [
            e for e in wake_events if (e.get("value") or {}).get("kind") == "child_finished"
        ]
        if finished:
            done = {e["value"]["finished_child"]["url"] for e in finished}
            others = await other_children(self.rt.store, view, done)
            for e in finished:
                e["value"]["other_children"] = others

    async def _failed(
        self,
        claim: Claim,
        entity_type: EntityType,
        ctx: HandlerContext,
        wake: WakeEvent,
        error: BaseException,
        duration: float,
        view: View,
        base: str,
    ) -> None:
        """Record a failed attempt: retried with backoff, or, after ``max_attempts``,
        dead-lettered with the effects of the type's ``on_error`` hook."""
        rt = self.rt
        inflight = claim.record.inflight
        assert inflight is not None
        now = rt.clock.now()
        final = inflight.attempt >= entity_type.max_attempts
        run = run_value(claim.record, wake, "dead_lettered" if final else "failed", duration,
                        error=error)  # fmt: skip
        head = [
            event("runs", inflight.wake_id, run, now, txid=inflight.wake_id),
            error_event(inflight, error, now, final=final),
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
            effects = await self._on_error(claim, entity_type, ctx, wake, error, view, head)
            reason = f"{type(error).__name__}: {error}"
            await self._finish(claim, head, effects, view, base, run_status="failed", error=reason)
            return
        delay = min(rt.retry_max_seconds, rt.retry_base_seconds * 2 ** (inflight.attempt - 1))
        delay *= 0.8 + 0.4 * random.random()
        ops, retry, retry_raw = retry_commit(
            claim.url, claim.record, claim.raw, head, ctx.effects, now, delay
        )
        remembered: bytes | None = retry_raw
        try:
            await rt.store.commit(ops)
        except (ConditionFailed, StreamClosed):
            logger.info("failure record of %s was fenced", claim.url)
            remembered = None
        self.claimer.remember(claim.url.url, remembered)
        self.claimer.block(claim.url.url, retry.retry_at or now)

    async def _on_error(
        self,
        claim: Claim,
        entity_type: EntityType,
        ctx: HandlerContext,
        wake: WakeEvent,
        error: BaseException,
        view: View,
        head: list[bytes],
    ) -> list[Effects]:
        """Run the type's ``on_error`` hook for a dead-lettered wake; its effects are kept. A
        failing hook is recorded in ``head`` instead."""
        if entity_type.on_error is None:
            return []
        inflight = claim.record.inflight
        assert inflight is not None

        async def nowhere(changes: list[dict[str, Any]]) -> None:
            return None

        hook_ctx = self._context(claim, entity_type, view, wake, ctx.events, {}, nowhere)
        try:
            await call_maybe_async(entity_type.on_error, hook_ctx, error)
        except Exception as hook_error:
            logger.exception("on_error hook of %s failed", claim.url)
            now = self.rt.clock.now()
            head.append(error_event(inflight, hook_error, now, final=True, hook=True))
            return []
        return [hook_ctx.effects]

    async def _finish(
        self,
        claim: Claim,
        head: list[bytes],
        effects: list[Effects],
        view: View,
        base: str,
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
            rt.store,
            claim.url,
            claim.record,
            claim.raw,
            claim.token,
            head,
            effects,
            view,
            base,
            rt.clock.now(),
            snapshot_every=rt.snapshot_every,
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
                    self.claimer.remember(claim.url.url, None)
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
                self.claimer.remember(claim.url.url, None)
                return
        self.claimer.remember(claim.url.url, commit.record)
        self.claimer.remember_view(claim.url.url, inflight.to_offset, view)
