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
import time
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc

from streams import Store

from ._compaction import compact_round
from ._errors import EntitiesError
from ._idempotency import prune
from ._pipeline.affinity import PRESENCE_SECONDS, Affinity
from ._pipeline.caps import Caps
from ._pipeline.claim import Claim, Claimer
from ._pipeline.fire import fire_due, fire_turn
from ._records import ENTITY_NS, PAUSED_NS, PENDING_NS, TIMER_NS, WORKER_NS, EntityRecord
from ._run import Running, WakeRunner, WorkerHost
from ._urls import parse_url
from ._watchdog import Watchdog

__all__ = ["Claim", "Worker", "WorkerHost"]


logger = logging.getLogger("entities.worker")

# timers fired per turn of the worker loop: small, so the wakes they cause run in between
FIRE_TURN = 100
# while timers keep coming due, the worker looks at them at most this often (seconds, real time)
TIMER_TICK = 0.002
# wakes one entity may run back to back on its lane while lanes are free (see ``_process``)
FOLLOW_ON = 8
# a running entity's stream changed (another process may have killed it): how soon its record
# is looked at, at the most (seconds)
FENCE_LOOK = 0.1
# how often expired idempotency keys are removed (seconds)
PRUNE_SECONDS = 60.0


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
        self._active: dict[str, object] = {}  # url -> the lane running it
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
            caps=Caps(runtime.store, self._cap_of) if self._capped() else None,
        )
        self.runner = WakeRunner(runtime, self.claimer, self._free_lane)
        self.watchdog = Watchdog(self.runner)  # names a handler that blocks the loop
        self.affinity = Affinity(
            runtime.store,
            runtime.worker_id,
            [t.name for t in runtime.registry.list()],
            runtime.deploy_version,
        )
        self.alive_at: float | None = None  # when the loop last went round (time.monotonic)
        self._suspects: set[str] = set()  # running entities whose stream changed (a kill?)
        self._suspicion = anyio.Event()
        self.compactions = 0  # periodic compaction rounds that removed something
        self._starved = False  # the last scan left pending entities for want of a free lane
        self._lanes: anyio.abc.TaskGroup | None = None  # while it runs and takes new wakes
        self._offered: list[tuple[str, bytes]] = []  # marks handed to :meth:`offer`, not yet taken
        self._offers = anyio.Event()
        self._follow: dict[str, bytes] = {}  # offered while running: its lane takes it next

    def _capped(self) -> bool:
        return any(t.max_concurrency is not None for t in self.rt.registry.list())

    def _cap_of(self, type: str) -> int | None:
        """The concurrency cap of ``type`` (``None``: none, or not a type of this registry)."""
        return self.rt.registry.get(type).max_concurrency if type in self.rt.registry else None

    def alive(self) -> bool:
        """Whether the loop went round lately (it does at least every ``poll_interval`` while it
        runs and its store answers)."""
        limit = max(10.0, 3 * self.poll_interval)
        return self.alive_at is not None and time.monotonic() - self.alive_at < limit

    @property
    def claims(self) -> Any:
        """Claim outcomes so far (a ``Counter``): won, lost (another claim committed first),
        held (leased elsewhere), empty (nothing to run by the time it was read)."""
        return self.claimer.counts

    # -- loops ------------------------------------------------------------------------------

    def _poke(self) -> None:
        self._kick.set()

    def notice(self, *, timers: bool = False) -> None:
        """Look for pending wakes now (and, with ``timers``, at the timer table too). For a
        writer whose commits this worker's store does not signal at once (``entities serve``'s
        HTTP side writes through a store of its own). Call it on the worker's event loop."""
        if timers:
            self._timers.dirty = True
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
                tg.start_soon(self._take_offers, tg)
                tg.start_soon(self._heartbeats)
                tg.start_soon(self._presence)
                tg.start_soon(self._watch_fences)
                tg.start_soon(self._watch_overdue)
                tg.start_soon(self.watchdog.run)
                if self.rt.compact_every:
                    tg.start_soon(self._compact_periodically, self.rt.compact_every)
                await self._loop(stop, tg)
                with anyio.move_on_after(self.drain_seconds):
                    while self._active:
                        self._idle = anyio.Event()
                        await self._idle.wait()
                tg.cancel_scope.cancel()
        finally:
            self._lanes = None
            self.alive_at = None
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
        pruned_at = time.monotonic()
        while not stop.is_set():
            self._kick = anyio.Event()
            timeout = self.poll_interval
            try:
                timer_in = await self._timers.turn(self.rt.store, clock.now())
                if time.monotonic() - pruned_at > PRUNE_SECONDS:
                    pruned_at = time.monotonic()
                    await prune(self.rt.store, clock.now())
                next_blocked = await self._dispatch(tg)
                failures = 0
                self.alive_at = time.monotonic()
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

    async def _compact_periodically(self, every: float) -> None:
        """Every ``every`` seconds, one bounded round of compaction (see
        :func:`~entities._compaction.compact_round`: with several workers, one at a time)."""
        policies = {t.name: t.retention for t in self.rt.registry.list()}
        while True:
            await anyio.sleep(every)
            try:
                report = await compact_round(
                    self.rt.store, policies, self.rt.clock.now(), self.rt.worker_id
                )
            except Exception as exc:  # e.g. the database restarts: the next round retries
                logger.warning("compaction round failed: %r", exc)
                continue
            if report is not None and report.events:
                self.compactions += 1
                logger.info(
                    "compaction removed %d events (%d bytes) from %d entities",
                    report.events, report.bytes, report.entities,
                )  # fmt: skip

    async def _stopper(self, stop: anyio.Event) -> None:
        await stop.wait()
        self._lanes = None  # no new wakes from :meth:`offer`
        self._poke()

    def offer(self, marks: Sequence[tuple[str, bytes]]) -> None:
        """Start the wakes of entities another store of this process just marked pending
        (``(url, token)``: ``entities serve``'s sends, spawns and the rest), without the scan of
        every pending mark, while it has free lanes (the loads of claims made together are read
        together all the same). What it would not take now (no free lane, an entity blocked or
        another worker's share) it leaves to that scan; an entity whose wake is going takes
        the offer as its lane's next wake. Call it on the worker's event loop."""
        if self._lanes is None:
            self._poke()
            return
        self._offered.extend(marks)
        self._offers.set()

    async def _take_offers(self, lanes: anyio.abc.TaskGroup) -> None:
        """Start the wakes :meth:`offer` was handed (a task of the worker's, so that it may
        start lanes; ``offer`` is called back on the loop, outside any task)."""
        self._lanes = lanes
        while True:
            await self._offers.wait()
            self._offers = anyio.Event()
            marks, self._offered = self._offered, []
            now = self.rt.clock.now()
            for url, token in self._ours(marks):
                if url in self._active:  # its lane is finishing a wake: the lane takes it next
                    self._follow[url] = token
                    continue
                if (
                    self._lanes is None
                    or len(self._active) >= self.concurrency
                    or not self.affinity.prefers(url)
                    or self.claimer.ready(url, token, now) is not None
                ):
                    self._poke()  # the scan decides
                    continue
                lane = self._active[url] = object()
                lanes.start_soon(self._process, url, token, False, lane)

    async def _dispatch(self, tg: anyio.abc.TaskGroup) -> float | None:
        if len(self._active) >= self.concurrency:
            self._starved = True  # the next wake to finish pokes this loop
            return None  # no free lane: skip the scan
        self._starved = False
        now = self.rt.clock.now()
        next_due: float | None = None
        pending = await self._pending(unpaused=False)
        self.claimer.forget_unmarked(pending)
        await self.affinity.refresh(now)
        # this worker's share of the pending entities first, then those waiting on others
        for url, token in self.affinity.order(pending):
            if len(self._active) >= self.concurrency:
                self._starved = True
                break
            until = self.claimer.ready(url, token, now)
            if until is not None:
                next_due = until if next_due is None else min(next_due, until)
                continue
            if url in self._active:
                continue
            lane = self._active[url] = object()
            tg.start_soon(self._process, url, token, not self.affinity.prefers(url), lane)
        return next_due

    async def _pending(self, *, unpaused: bool = True) -> list[tuple[str, bytes]]:
        """The pending entities this worker may run: of its types and, with ``unpaused``, not
        paused (the loop leaves that to the claim, which refuses a paused entity in its own
        commit and then leaves it alone until its pending mark changes: no scan per round)."""
        store = self.rt.store
        pending = await store.kv_scan(PENDING_NS)
        if not pending or not unpaused:
            return self._ours(pending)
        paused = await store.kv_scan(PAUSED_NS)
        return self._ours(pending, {url for url, _ in paused} if paused else None)

    def _ours(
        self, pending: list[tuple[str, bytes]], paused: set[str] | None = None
    ) -> list[tuple[str, bytes]]:
        """The pending entities of types this worker's registry defines (workers of other
        apps may share the store: each runs its own types; the rest stay pending for them),
        leaving out those in ``paused``."""
        types = self.rt.registry
        ours = []
        for url, token in pending:
            if paused is not None and url in paused:
                continue
            try:
                if parse_url(url).type in types:
                    ours.append((url, token))
            except EntitiesError:
                continue
        return ours

    def _free_lane(self, run: Running) -> None:
        """A handler given up (it ignored its cancellation): its lane counts as free."""
        url = run.claim.url.url
        if run.lane is not None and self._active.get(url) is run.lane:
            del self._active[url]
            self._idle.set()
            self._poke()

    async def _process(
        self, url: str, token: bytes | None, stolen: bool = False, lane: object | None = None
    ) -> None:
        settled = False  # its last wake committed and removed its pending mark
        try:
            for _ in range(FOLLOW_ON):
                # the scan that found ``url`` may be stale by now (another worker may have run
                # its wake meanwhile): the claim then finds no wake event and only clears the mark
                claim = await self.claimer.claim(url, token, stolen=stolen)
                stolen = False  # a follow-on wake is this worker's own
                if claim is None:
                    break
                await self._run_or_release(claim, lane)
                self.wakes += 1
                settled = claim.settled
                # more arrived while it ran (or was offered since it committed): take the next
                # wake right away, unless other entities wait for a lane (then this one queues
                # behind them, for fairness)
                if not (claim.more or url in self._follow) or len(self._active) >= self.concurrency:
                    break
                token = self._follow.pop(url, None)  # else the claim reads the current mark
        except Exception:
            logger.exception("wake of %s failed in the runtime", url)
            self.claimer.block(url, self.rt.clock.now() + 1.0)
        finally:
            if lane is None or self._active.get(url) is lane:
                self._active.pop(url, None)
            self._idle.set()
            # a scan again if this entity may still be pending (a failed or released wake, a
            # claim that did not happen, more work, an offer this lane did not take) or a scan
            # was cut short for want of a lane
            if self._follow.pop(url, None) is not None or not settled or self._starved:
                self._poke()

    async def run_until_idle(self, *, max_wakes: int | None = None) -> int:
        """Process due wakes until none is left (see :meth:`Runtime.run_until_idle`).

        Raises whatever the store raises.
        """
        store, clock, until = self.rt.store, self.rt.clock, self.claimer.until
        done = 0
        while max_wakes is None or done < max_wakes:
            await fire_due(store, clock.now())
            pending = await self._pending()
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
                if not await self._pending():
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
                claim = await self.claimer.claim(url, token)
                if claim is not None:
                    await self._run_or_release(claim)
                    ran += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_fences)
            tg.start_soon(self._watch_overdue)
            async with anyio.create_task_group() as lanes:
                for _ in range(min(self.concurrency, len(items))):
                    lanes.start_soon(lane)
            tg.cancel_scope.cancel()
        return ran

    async def run_wake(self, claim: Claim) -> None:
        """Run one claimed wake to its commit or its recorded failure (see
        :meth:`~entities._run.WakeRunner.run_wake`). Raises whatever the store raises."""
        await self.runner.run_wake(claim)

    def stop(self, url: str, reason: str = "killed") -> bool:
        """Cancel this worker's running wake of ``url``, if any (it is not committed)."""
        return self.runner.stop(url, reason)

    async def _run_or_release(self, claim: Claim, lane: object | None = None) -> None:
        """Run the wake; if it is cancelled (Ctrl-C, the end of a drain), give the lease back at
        once, keeping the wake's range, so the wake is redelivered now (as its next attempt,
        with its journal) instead of after the lease expires."""
        try:
            await self.runner.run_wake(claim, lane)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                if await self.claimer.release(claim):
                    logger.info("wake of %s was cancelled; its lease is released", claim.url)
            raise

    async def claim(
        self, url: str, token: bytes | None = None, *, stolen: bool = False
    ) -> Claim | None:
        """Take the lease on ``url`` if it has work and nobody else holds it (see
        :meth:`~entities._pipeline.claim.Claimer.claim`); ``None`` for an entity of a type this
        worker's registry lacks (an orphan: it waits for a worker that has its type). Raises
        whatever the store raises."""
        if not self._ours([(url, b"")]):
            return None
        return await self.claimer.claim(url, token, stolen=stolen)

    async def _heartbeats(self) -> None:
        """Renew the leases of running wakes every third of the lease period (one loop for all
        wakes of this worker); a wake whose lease was taken over, or whose entity was killed,
        is cancelled."""
        rt = self.rt
        while True:
            await rt.clock.sleep(rt.lease_seconds / 3)
            for run in list(self.runner.running.values()):
                if run.lock.locked():
                    continue
                async with run.lock:
                    try:
                        if not await self.claimer.renew(run.claim):
                            raw = await self.rt.store.kv_get(ENTITY_NS, run.claim.url.url)
                            run.stop(_why_lost(raw, run.claim))
                    except Exception as exc:  # e.g. the database restarts: try next round
                        logger.warning("lease renewal of %s failed: %r", run.claim.url, exc)

    async def _watch_overdue(self) -> None:
        """Enforce wake deadlines (see ``WakeRunner.sweep``): one sweep for the whole worker,
        when the next deadline comes (at the latest every ``SWEEP_SECONDS``), not a timer per
        wake; handlers that ignore their cancellation are given up."""
        while True:
            late, wait = self.runner.sweep(self._watch)
            for run in late:
                try:
                    await self.runner.give_up(run)
                except Exception:  # the lease then expires: the wake is redelivered
                    logger.exception("could not give up the wake of %s", run.claim.url)
            await anyio.sleep(wait)

    def _watch(self, run: Running) -> None:
        """Watch a running wake's stream (a kill closes it) from now on, and look at its
        record at once (it may have been killed before the watch began)."""
        url = run.claim.url.url
        run.unwatch = self.rt.store.listen(run.claim.url.stream, lambda: self._suspect(url))
        self._suspect(url)

    def _suspect(self, url: str) -> None:
        self._suspects.add(url)
        self._suspicion.set()

    async def _watch_fences(self) -> None:
        """Cancel, within a fraction of a second, a running wake whose entity was killed, here
        or in another process (or whose lease another worker took): a change to a watched
        entity's stream (a kill closes it) makes its record worth a look, at most every
        ``FENCE_LOOK`` s."""
        while True:
            await self._suspicion.wait()
            self._suspicion = anyio.Event()
            suspects, self._suspects = self._suspects, set()
            for url in suspects:
                run = self.runner.running.get(url)
                if run is None or run.reason is not None:
                    continue
                try:
                    raw = await self.rt.store.kv_get(ENTITY_NS, url)
                except Exception as exc:  # the heartbeat will look again
                    logger.debug("fence check of %s failed: %r", url, exc)
                    continue
                if raw != run.claim.raw and self.runner.running.get(url) is run:
                    run.stop(_why_lost(raw, run.claim))
            await anyio.sleep(FENCE_LOOK)


def _why_lost(raw: bytes | None, claim: Claim) -> str:
    """Why the wake of ``claim`` lost its lease, from the entity record as it is now:
    ``killed`` (stopped or gone), ``interrupted`` (its range was acknowledged by someone else:
    an interrupt signal) or ``fenced`` (another worker claimed it)."""
    if raw is None:
        return "killed"
    record = EntityRecord.load(raw)
    if record.status == "stopped":
        return "killed"
    ours = claim.record.inflight
    if (
        record.owner is None
        and record.inflight is None
        and ours is not None
        and record.acked == ours.to_offset
        and record.epoch > claim.record.epoch
    ):
        return "interrupted"
    return "fenced"
