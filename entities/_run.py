"""Running one claimed wake: load it, run the type's code before a deadline, and commit what
happened. Every wake ends, and visibly:

* **completed**: its effects, run record, acknowledged offset and lease release commit together;
* **failed**: the handler raised, ran past its ``wake_timeout`` (it is cancelled: its tasks,
  model calls and subprocesses), or its effects could not be committed (a value that does not
  encode, a child id someone else took...): the attempt is recorded and retried with backoff,
  and after ``max_attempts`` the wake is dead-lettered (recorded, acknowledged, listed under
  ``/_entities/dead-letters``) so the entity goes on with its next messages;
* **cancelled**: the entity was killed, or another worker took the lease; the handler is
  cancelled at its next await and nothing it buffered is committed (``on_stop`` runs after a
  kill, for cleanup).

Deadlines are enforced by one sweep per worker (:meth:`WakeRunner.sweep`), not a timer per
wake, so they cost the fast path nothing; a wake is cancelled within ``SWEEP_SECONDS`` of its
deadline. A handler that ignores its cancellation for ``GRACE`` seconds more is given up: the
failure is recorded for it and its lane is freed; whatever it does later is fenced.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import anyio

from streams import (
    Append,
    ConditionFailed,
    KvCheck,
    StorageFull,
    Store,
    StreamClosed,
    StreamGone,
    StreamNotFound,
    StreamsError,
)

from . import _tracing as tracing
from ._approvals import (
    ApprovalPending,
    Resumption,
    decisions_of,
    pending_ids,
    resumption,
    suspend_records,
)
from ._budgets import BudgetGate, Budgets
from ._calls import call_user
from ._context import HandlerContext
from ._effects import Effects
from ._errors import LeaseLost, WakeTimeout
from ._events import encode, event
from ._host import Host
from ._metrics import metrics
from ._observe import OBSERVER_NS
from ._pipeline.claim import Claim, Claimer
from ._pipeline.commit import (
    WakeCommit,
    dead_letter_op,
    error_event,
    retry_commit,
    run_value,
    wake_commit,
    without_path,
)
from ._pipeline.deliver import ObserverCache, other_children
from ._pipeline.load import View, copy_view, events_between, read_journal, wake_event
from ._records import ENTITY_NS, WAKE_TYPES, Inflight
from ._registry import EntityType, Registry
from ._replies import RECENT, status_ops, taken_signals
from ._wake import WakeEvent

__all__ = ["GRACE", "SWEEP_SECONDS", "Running", "WakeRunner", "WorkerHost"]

logger = logging.getLogger("entities.worker")
wake_log = logging.getLogger("entities.wake")

# seconds a cancelled handler has to end (and ``on_stop`` to clean up) before it is given up
GRACE = 5.0
# the longest a worker waits between two sweeps of its running wakes (seconds): it enforces
# deadlines and starts watching for kills of wakes that run longer than this
SWEEP_SECONDS = 0.25


class WorkerHost(Host, Protocol):
    """What a worker runs on (a :class:`~entities.Runtime` is one): the store, the registry,
    its settings, and what handlers may reach (:class:`~entities._host.Host`)."""

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

    @property
    def compact_every(self) -> float | None: ...

    @property
    def wake_timeout(self) -> float: ...

    @property
    def deploy_version(self) -> str | None: ...


@dataclass(slots=True)
class _Wake:
    """A wake being run: what the commit of its outcome needs."""

    claim: Claim
    entity_type: EntityType
    ctx: HandlerContext
    wake: WakeEvent
    view: View
    base: str
    started: float


@dataclass(eq=False, slots=True)
class Running:
    """One wake's handler while it runs: its claim, how to stop it, and why it stopped."""

    claim: Claim
    lock: anyio.Lock  # held by heartbeats, live writes and the final commit
    scope: anyio.CancelScope  # the handler's
    timeout: float  # seconds it may run
    deadline: float  # when that is over (``time.monotonic()``)
    current: _Wake | None = None  # what a give-up records
    lane: object | None = None  # the worker lane running it (freed if it is given up)
    reason: str | None = None  # "timeout", "killed", "interrupted" or "fenced" once stopped
    abandoned: bool = False  # it ignored its cancellation: given up, its lane freed
    unwatch: Callable[[], None] | None = None  # stops the watch for a kill, once started
    swept: bool = False  # a sweep has seen it running (the next one starts its watch)

    def stop(self, reason: str) -> None:
        """Cancel the handler (at its next await) for ``reason``; the first reason wins."""
        if self.reason is None:
            self.reason = reason
            self.scope.cancel()


class _Poison(Exception):
    """A wake's outcome could not be committed for a reason of its own (not the store's)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


# errors of a commit that are the wake's own doing: a value that does not encode, a request
# the store refuses (a child URL someone else took, a message too large...); anything else
# (a lost connection) is the store's, and the lease expiry redelivers the wake
_OWN_FAULTS = (TypeError, ValueError, OverflowError, StreamsError)


class WakeRunner:
    """Runs claimed wakes for a worker (see the module docstring)."""

    def __init__(
        self,
        host: WorkerHost,
        claimer: Claimer,
        give_up: Callable[[Running], None] = lambda run: None,
    ) -> None:
        self.rt = host
        self.claimer = claimer
        # the observers of the entities this worker runs (its commits check they are current)
        self.observers = ObserverCache(claimer.cache_size)
        self.running: dict[str, Running] = {}
        self._give_up = give_up  # frees the lane of a handler given up
        self._budgets: Budgets | None = None  # made for the first type with a token budget

    def stop(self, url: str, reason: str) -> bool:
        """Cancel the running wake of ``url`` (if this runner runs one) for ``reason``."""
        run = self.running.get(url)
        if run is None:
            return False
        run.stop(reason)
        return True

    async def run_wake(self, claim: Claim, lane: object | None = None) -> None:
        """Run one claimed wake to its commit (or its recorded failure).

        Raises whatever the store raises (the lease then expires and the wake is redelivered).
        """
        rt = self.rt
        entity_type = rt.registry.get(claim.url.type)
        inflight = claim.record.inflight
        assert inflight is not None
        loaded = claim.loaded
        if loaded is None or loaded.to_offset != inflight.to_offset:
            loaded = await self.claimer.load(
                claim.url, inflight.from_offset, inflight.to_offset, claim.record.created_at
            )
        view, base, events = loaded.view, loaded.base_offset, loaded.events
        wake_events = [e for e in events if e["type"] in WAKE_TYPES]
        if not wake_events:
            await self._finish(claim, [], [], view, base, empty=True)
            return
        if any(e["type"] == "wakes" for e in wake_events):
            await self._note_other_children(view, wake_events)
        wake = wake_event(
            claim.url, inflight, events, wake_events, first_wake=not view.get("manifests")
        )
        if not wake.messages and not wake.wakes:  # every message was cancelled while queued
            await self._finish(claim, [], [], view, base, empty=True)
            return
        resume = resumption(wake)
        journal = {}
        if resume is not None:  # a run suspended for approvals: its journal is its origin's
            decided = await decisions_of(rt.store, claim.url.url, resume.origin)
            resume = replace(resume, decisions={**resume.decisions, **decided})
            origin = Inflight(wake_id=resume.origin, from_offset=resume.origin_to,
                              to_offset=resume.origin_to)  # fmt: skip
            journal = await read_journal(rt.store, claim.url.stream, origin)
        elif inflight.attempt > 1:
            journal = await read_journal(rt.store, claim.url.stream, inflight)
        timeout = entity_type.wake_timeout or rt.wake_timeout
        begun = time.monotonic()
        run = Running(claim, anyio.Lock(), anyio.CancelScope(), timeout, begun + timeout, lane=lane)
        ctx = self._context(
            claim, entity_type, view, wake, events, journal, self._flush(run), resume
        )
        now = rt.clock.now()
        current = run.current = _Wake(claim, entity_type, ctx, wake, view, base, now)
        if inflight.attempt == 1 and wake.messages and wake.messages[0].timestamp > 0:
            metrics.wake_started(entity_type.name, now - wake.messages[0].timestamp)
        try:
            if tracing.active():
                with tracing.span(
                    f"wake {entity_type.name}",
                    {"entities.url": claim.url.url, "entities.wake_id": inflight.wake_id,
                     "entities.attempt": inflight.attempt},
                    links=[e["value"]["trace"] for e in wake_events
                           if "trace" in e.get("value", ())],
                    kind="consumer",
                ):  # fmt: skip
                    outcome = await self._run(run, current)
            else:
                outcome = await self._run(run, current)
        finally:
            ctx._release()  # no reference cycle outlives the wake
        if outcome is not None:
            self._ended(current, outcome, time.monotonic() - begun)

    async def _run(self, run: Running, current: _Wake) -> str | None:
        """Run the handler of ``current`` and commit its outcome; return the outcome (``None``
        when it was given up: :meth:`give_up` counted it)."""
        claim, ctx, wake = run.claim, current.ctx, current.wake
        self.running[claim.url.url] = run
        error: BaseException | None = None
        suspended: ApprovalPending | None = None
        try:
            with run.scope:
                try:
                    await current.entity_type.invoke(ctx, wake)
                except ApprovalPending as pending:  # an agent waits for a person
                    suspended = pending
                except Exception as exc:  # the handler failed: record it
                    error = exc
        finally:
            if self.running.get(claim.url.url) is run:
                del self.running[claim.url.url]
            run.current = None  # run -> current -> ctx -> flush -> run: let refcounts free it
            if run.unwatch is not None:
                run.unwatch()
        if run.abandoned:
            return None  # given up while it ignored its cancellation: the failure is recorded
        if run.reason is not None and run.reason != "timeout":
            await self._cancelled(run, current)
            return "cancelled"
        await run.lock.acquire()  # no heartbeat from here on: the final commit is ours
        if run.reason == "timeout":
            error = WakeTimeout(
                f"the wake ran past its timeout of {run.timeout:g} s", url=claim.url.url
            )
        if error is None and suspended is not None:
            try:
                return await self._suspend(current, suspended)
            except _Poison as poison:
                error = poison.error
        if error is None:  # commit the outcome (or, if it cannot be committed, fail it)
            try:
                head = self._completed(current)
                keys = [m.key for m in wake.messages]
                if ctx.resumption is None:  # their callers look now, without a record read
                    answered = taken_signals(claim.url.url, keys)
                else:  # a run resumed after approvals: its messages are answered now
                    answered = status_ops(claim.url.url, keys, "completed", None)
                await self._finish(
                    claim, head, [ctx.effects], current.view, current.base,
                    run_status="completed", sleeping=ctx.sleeping, extra=answered,
                )  # fmt: skip
                return "completed"
            except _Poison as poison:
                error = poison.error
                logger.warning("wake of %s could not be committed: %r", claim.url, error)
        return await self._failed(current, error)

    def _ended(self, current: _Wake, outcome: str, seconds: float) -> None:
        """Count a wake's end and log it (one INFO line per wake, on ``entities.wake``)."""
        type_ = current.entity_type.name
        metrics.wake_ended(type_, outcome, seconds)
        if wake_log.isEnabledFor(logging.INFO):
            inflight = current.claim.record.inflight
            attempt = inflight.attempt if inflight is not None else 1
            url = current.claim.url.url
            wake_log.info(
                "wake %s %s attempt %d: %s in %.1f ms",
                url, type_, attempt, outcome, seconds * 1000,
                extra={"url": url, "type": type_, "attempt": attempt, "outcome": outcome,
                       "duration_ms": round(seconds * 1000, 3)},
            )  # fmt: skip

    def sweep(self, watch: Callable[[Running], None]) -> tuple[list[Running], float]:
        """Cancel the handlers past their deadline, and ``watch`` those that were running at
        the last sweep already (a wake shorter than a sweep's interval costs no watch, nor the
        look at its record that starts one: a kill fences its commit all the same). Returns
        the handlers ``GRACE`` seconds past their deadline as well (they ignore their
        cancellation: give them up), and the seconds until the next sweep is due (at most
        ``SWEEP_SECONDS``)."""
        now = time.monotonic()
        late: list[Running] = []
        due = now + SWEEP_SECONDS
        for run in list(self.running.values()):
            if run.unwatch is None:
                if run.swept:
                    watch(run)
                else:
                    run.swept = True
            if run.reason is None:
                if now >= run.deadline:
                    run.stop("timeout")
                else:
                    due = min(due, run.deadline)
            if now >= run.deadline + GRACE:
                late.append(run)
            else:
                due = min(due, run.deadline + GRACE)
        return late, max(due - now, 0.001)

    async def give_up(self, run: Running) -> None:
        """Stop waiting for a handler that ignores its cancellation: record the failure for it
        (a timeout, unless it was stopped from outside) and free its lane; what it does later
        is fenced."""
        url = run.claim.url
        logger.error("wake of %s ignored its cancellation for %g s; it is given up", url, GRACE)
        run.abandoned = True
        if self.running.get(url.url) is run:
            del self.running[url.url]
        if run.reason in (None, "timeout") and run.current is not None:
            message = f"the wake ran past its timeout ({run.timeout:g} s) and ignored it"
            current = run.current
            with anyio.CancelScope(shield=True):
                async with run.lock:
                    outcome = await self._failed(current, WakeTimeout(message, url=url.url))
            self._ended(current, outcome, run.timeout + GRACE)
        self._give_up(run)

    def _flush(self, run: Running) -> Callable[[list[dict[str, Any]]], Awaitable[None]]:
        """The live writer of ``run``: appends now, fenced by its claim; once fenced, it stops
        the wake and raises :class:`LeaseLost`."""
        store, claim = self.rt.store, run.claim

        async def flush(changes: list[dict[str, Any]]) -> None:
            async with run.lock:
                try:
                    await store.commit(
                        [
                            KvCheck(ENTITY_NS, claim.url.url, claim.raw),
                            Append(claim.url.stream, [encode(c) for c in changes]),
                        ]
                    )
                except (ConditionFailed, StreamClosed) as exc:
                    run.stop("killed" if isinstance(exc, StreamClosed) else "fenced")
                    raise LeaseLost(
                        f"wake of {claim.url} lost its lease", url=claim.url.url
                    ) from None

        return flush

    async def _commit_patiently(self, ops: list[Any], claim: Claim) -> list[Any]:
        """Commit ``ops``; while the store's disk is full, try again (every 0.1 s, backing off
        to 2 s) for up to a lease period, so the wake commits as soon as space returns instead
        of being failed for it or waiting out its lease.

        Raises:
            StorageFull: still full after a lease period (the lease then expires).
        """
        give_up = time.monotonic() + self.rt.lease_seconds
        delay = 0.1
        while True:
            try:
                return await self.rt.store.commit(ops)
            except StorageFull:
                if time.monotonic() + delay > give_up:
                    raise
                if delay == 0.1:
                    logger.warning("the disk is full: the commit of %s waits for space", claim.url)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _cancelled(self, run: Running, current: _Wake) -> None:
        """A wake stopped from outside: nothing of it commits; after a kill or an interrupt,
        ``on_stop`` (with ``"killed"`` or ``"interrupted"``)."""
        claim = run.claim
        self.claimer.remember(claim.url.url, None)
        logger.info("wake of %s was cancelled (%s)", claim.url, run.reason)
        hook = current.entity_type.on_stop
        if run.reason not in ("killed", "interrupted") or hook is None:
            return
        with anyio.move_on_after(GRACE):
            try:
                await call_user(hook, current.ctx, run.reason)
            except Exception:
                logger.exception("on_stop hook of %s failed", claim.url)

    def _context(
        self,
        claim: Claim,
        entity_type: EntityType,
        view: View,
        wake: WakeEvent,
        events: list[dict[str, Any]],
        journal: dict[str, Any],
        flush: Callable[[list[dict[str, Any]]], Any],
        resume: Resumption | None = None,
    ) -> HandlerContext:
        """The context of one run of ``entity_type``'s code in the wake of ``claim`` (with
        ``resume``, going on with a run suspended for approvals, as that run)."""
        inflight = claim.record.inflight
        assert inflight is not None
        ctx = HandlerContext(
            host=self.rt,
            entity_type=entity_type,
            url=claim.url,
            view=copy_view(view),
            wake=wake,
            events=events,
            journal=journal,
            run_id=inflight.wake_id if resume is None else resume.origin,
            flush=flush,
            runs_before=claim.record.runs if resume is None else resume.runs_before,
        )
        ctx.resumption = resume
        if entity_type.token_budget is not None:
            if self._budgets is None:
                self._budgets = Budgets(self.rt.store)
            ctx.budget = BudgetGate(
                self._budgets, entity_type.token_budget, claim.url.type, claim.url.id,
                self.rt.clock.now,
            )  # fmt: skip
        return ctx

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

    def _completed(self, current: _Wake) -> list[bytes]:
        """The run record of a completed run (what :meth:`_finish` commits first)."""
        claim, ctx, now = current.claim, current.ctx, self.rt.clock.now()
        inflight = claim.record.inflight
        assert inflight is not None
        ctx.end_open_runs("completed")
        run = run_value(claim.record, current.wake, "completed", now - current.started)
        if self.rt.deploy_version is not None:
            run["deploy"] = self.rt.deploy_version
        run["sends"] = [[s.target.url, s.message_type, s.payload] for s in ctx.effects.sends]
        if ctx.resumption is not None:
            run["resumes"] = ctx.resumption.origin  # the run it finishes began there
        run["spawns"] = [s.target.url for s in ctx.effects.spawns]
        if ctx.tokens != (0, 0):
            run["input_tokens"], run["output_tokens"] = ctx.tokens
        return [event("runs", inflight.wake_id, run, now, txid=inflight.wake_id)]

    async def _suspend(self, current: _Wake, pending: ApprovalPending) -> str:
        """Suspend the run for approvals (see :mod:`entities._approvals`): commit its journal,
        a ``waiting_approval`` run row and the approvals it asks for; acknowledge the range and
        free the lease. Returns the outcome, ``waiting_approval``.

        Raises:
            _Poison: the commit failed for a reason of the wake's own.
        """
        claim, ctx = current.claim, current.ctx
        inflight = claim.record.inflight
        assert inflight is not None
        now, resume = self.rt.clock.now(), ctx.resumption
        origin = inflight.wake_id if resume is None else resume.origin
        origin_to = inflight.to_offset if resume is None else resume.origin_to
        runs_before = claim.record.runs if resume is None else resume.runs_before
        known = await pending_ids(self.rt.store, claim.url.url)
        events, ops, ids = suspend_records(
            claim.url.url, current.wake, origin, origin_to, runs_before, pending.requests,
            known, now,
        )  # fmt: skip
        run = run_value(claim.record, current.wake, "waiting_approval", now - current.started)
        run["approvals"] = ids
        if resume is not None:
            run["resumes"] = origin
        head = [event("runs", inflight.wake_id, run, now, txid=inflight.wake_id), *events]
        journal = Effects(journal=list(ctx.effects.journal))
        keys = [m.key for m in current.wake.messages]
        ops.extend(status_ops(claim.url.url, keys, "waiting_approval", None))
        await self._finish(claim, head, [journal], current.view, current.base, extra=ops)
        logger.info("wake %s of %s waits for approval of %s", inflight.wake_id, claim.url, ids)
        return "waiting_approval"

    async def _failed(self, current: _Wake, error: BaseException) -> str:
        """Record a failed attempt: retried with backoff, or, after ``max_attempts``,
        dead-lettered with the effects of the type's ``on_error`` hook. Returns the outcome:
        ``failed`` (or ``timeout``) or ``dead_lettered``."""
        rt, claim, entity_type = self.rt, current.claim, current.entity_type
        inflight = claim.record.inflight
        assert inflight is not None
        now = rt.clock.now()
        final = inflight.attempt >= entity_type.max_attempts
        status = "dead_lettered" if final else "failed"
        run = run_value(claim.record, current.wake, status, now - current.started, error=error)
        if rt.deploy_version is not None:
            run["deploy"] = rt.deploy_version
        if isinstance(error, WakeTimeout):
            run["reason"] = "timeout"
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
            metrics.dead_letters.inc((entity_type.name,))
            await self._dead_letter(current, error, head)
            return "dead_lettered"
        delay = min(rt.retry_max_seconds, rt.retry_base_seconds * 2 ** (inflight.attempt - 1))
        delay *= 0.8 + 0.4 * random.random()
        ops, retry, retry_raw = retry_commit(
            claim.url, claim.record, claim.raw, head, current.ctx.effects, now, delay
        )
        remembered: bytes | None = retry_raw
        try:
            await rt.store.commit(ops)
        except (ConditionFailed, StreamClosed):
            logger.info("failure record of %s was fenced", claim.url)
            remembered = None
        self.claimer.remember(claim.url.url, remembered)
        self.claimer.block(claim.url.url, retry.retry_at or now)
        return "timeout" if isinstance(error, WakeTimeout) else "failed"

    async def _dead_letter(self, current: _Wake, error: BaseException, head: list[bytes]) -> None:
        """Give the wake up: record it as a dead letter and acknowledge it, with what the
        ``on_error`` hook did (unless that cannot be committed either)."""
        claim = current.claim
        effects = await self._on_error(current, error, head)
        reason = f"{type(error).__name__}: {error}"
        letter = dead_letter_op(claim.url, claim.record, current.wake, error, self.rt.clock.now())
        keys = [m.key for m in current.wake.messages]
        marks = status_ops(claim.url.url, keys, "dead_lettered", reason)
        try:
            await self._finish(
                claim, [*head], effects, current.view, current.base, run_status="failed",
                error=reason, extra=[letter, *marks],
            )  # fmt: skip
        except _Poison as poison:  # the hook's effects do not commit: drop them, keep the rest
            inflight = claim.record.inflight
            assert inflight is not None
            now = self.rt.clock.now()
            head.append(error_event(inflight, poison.error, now, final=True, hook=True))
            await self._finish(
                claim, head, [], current.view, current.base, run_status="failed", error=reason,
                extra=[letter, *marks],
            )  # fmt: skip

    async def _on_error(
        self, current: _Wake, error: BaseException, head: list[bytes]
    ) -> list[Effects]:
        """Run the type's ``on_error`` hook for a dead-lettered wake; its effects are kept. A
        failing hook is recorded in ``head`` instead."""
        claim, entity_type = current.claim, current.entity_type
        if entity_type.on_error is None:
            return []
        inflight = claim.record.inflight
        assert inflight is not None

        async def nowhere(changes: list[dict[str, Any]]) -> None:
            return None

        hook_ctx = self._context(
            claim, entity_type, current.view, current.wake, current.ctx.events, {}, nowhere
        )
        try:
            with anyio.fail_after(GRACE * 2):
                await call_user(entity_type.on_error, hook_ctx, error)
            hook_ctx.end_open_runs("failed")
        except Exception as hook_error:
            logger.exception("on_error hook of %s failed", claim.url)
            now = self.rt.clock.now()
            head.append(error_event(inflight, hook_error, now, final=True, hook=True))
            return []
        finally:
            hook_ctx._release()
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
        sleeping: bool = False,
        extra: list[Any] | None = None,
    ) -> None:
        """Commit a finished wake: effects, acknowledged offset, lease release, one transaction.

        Raises:
            _Poison: the commit failed for a reason of the wake's own.
        """
        rt = self.rt
        inflight = claim.record.inflight
        assert inflight is not None

        async def build() -> WakeCommit:
            try:
                return await wake_commit(
                    rt.store, claim.url, claim.record, claim.raw, claim.token, head, effects,
                    view, base, rt.clock.now(), snapshot_every=rt.snapshot_every, empty=empty,
                    run_status=run_status, error=error, sleeping=sleeping,
                    observers=self.observers,
                )  # fmt: skip
            except _OWN_FAULTS as exc:
                raise _Poison(exc) from exc

        commit = await build()
        ops, clear = (commit.ops + extra if extra else commit.ops), commit.clear
        claim.more = commit.more
        # callers in this process that wait for these replies wait for this commit (see RECENT)
        staged = (
            RECENT.stage(claim.url.url, (key for key, _value in commit.replies))
            if run_status == "completed"
            else []
        )
        try:
            for _attempt in range(8):
                try:
                    began = time.perf_counter()
                    results = await self._commit_patiently(ops, claim)
                    metrics.wake_commit.observe(time.perf_counter() - began)
                    # the mark was not ours to clear: more arrived while the wake ran
                    cleared = next(r for op, r in zip(ops, results, strict=True) if op is clear)
                    claim.more = claim.more or cleared is False
                    claim.settled = not claim.more
                    if run_status == "completed":  # for callers in this process (see RECENT)
                        RECENT.publish(claim.url.url, commit.replies, staged)
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
                except ConditionFailed as exc:
                    if exc.namespace == OBSERVER_NS:  # its observers changed: read them again
                        self.observers.forget_key(exc.key)
                        commit = await build()
                        ops, clear = (commit.ops + extra if extra else commit.ops), commit.clear
                        continue
                    logger.info("commit of %s wake %s was fenced", claim.url, inflight.wake_id)
                    self.claimer.remember(claim.url.url, None)
                    return
                except StorageFull:
                    raise  # the store's trouble, not the wake's: the lease expires, it runs again
                except _OWN_FAULTS as exc:
                    raise _Poison(exc) from exc
            else:  # each attempt met another change (recipients gone, observers moved)
                logger.warning(
                    "commit of %s wake %s gave up: it runs again", claim.url, inflight.wake_id
                )
                self.claimer.remember(claim.url.url, None)
                return  # its lease expires and the wake is redelivered
        finally:
            RECENT.settle(staged)  # published, or the commit failed: nothing is coming
        self.claimer.remember(claim.url.url, commit.record)
        wrote = events_between(base, inflight.to_offset) >= rt.snapshot_every  # a snapshot
        snapshot = inflight.to_offset if wrote else base
        self.claimer.remember_view(
            claim.url, inflight.to_offset, view, snapshot, claim.record.created_at
        )
