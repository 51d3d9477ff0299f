"""Stage 3, the claim: take the lease on a pending entity for one wake.

A claim is a compare-and-set of the entity record that bumps its fencing ``epoch`` and records
the in-flight wake's event range (:class:`~entities._records.Inflight`). Every later write of
that wake (journal flushes, heartbeats, the final commit) is checked against the exact record
bytes the claim wrote, so a worker whose lease was taken over (expiry, kill) can change nothing.
A redelivered wake (its lease expired, or it failed and is retried) keeps its range and counts
one more attempt.

A :class:`Claimer` is one worker's side of this: it keeps a bounded cache of the entity records
it wrote last and of the views its wakes folded (so an entity's next wake on the same worker
costs no record read and folds only new events), and remembers entities to leave alone for a
while (leased elsewhere, or waiting to be retried). Which entities a worker tries first is
:mod:`.affinity`'s business.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from streams import ConditionFailed, KvCheck, KvPut, Op, Store, StreamGone, StreamNotFound

from .._approvals import wake_end
from .._clock import Clock
from .._metrics import metrics
from .._records import ENTITY_NS, PAUSED_NS, PENDING_NS, WAKE_TYPES, EntityRecord, Inflight
from .._urls import EntityURL, parse_url
from .caps import Caps
from .known import KnownTails
from .load import Loaded, View, load_range, wake_id

__all__ = ["Claim", "Claimer"]

logger = logging.getLogger("entities.worker")


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
    # set by the wake's commit: it removed the pending mark (nothing of this entity is left)
    settled: bool = False


_STALE = object()
CAPPED_RETRY = 0.2  # seconds before a claim that found its type's slots busy is tried again
PAUSED_RETRY = 5.0  # the same for a paused entity (a resume's new pending mark ends the wait)


class Claimer:
    """Claims and releases leases for one worker (``worker_id``), with its caches."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        worker_id: str,
        *,
        lease_seconds: float,
        cache_size: int,
        caps: Caps | None = None,
    ) -> None:
        self.store = store
        self.caps = caps
        self.clock = clock
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.cache_size = cache_size
        # claim outcomes: won, lost (another claim committed first), held (leased elsewhere),
        # empty (nothing to run by the time it was read): a measure of contention
        self.counts: Counter[str] = Counter()
        self.records: OrderedDict[str, bytes] = OrderedDict()
        # url -> (offset, view folded up to it, created_at of the entity it is of: a purged
        # entity's view is never the start of a new one's at the same URL, the stream id its
        # next claim may fold known messages of, if any: see .known)
        self.views: OrderedDict[str, tuple[str, View, float, int | None]] = OrderedDict()
        # the newest messages of streams, handed over by the commits of this process (only
        # ``entities serve`` feeds it: its server's commits and its worker's)
        self.tails = KnownTails()
        # url -> the offset of its last stored snapshot, as far as this worker knows (what the
        # next snapshot is counted from while its view comes from the cache)
        self.snapshots: dict[str, str] = {}
        # url -> (not before this time, the pending mark it was found leased elsewhere under)
        self.blocked: dict[str, tuple[float, bytes | None]] = {}

    # -- what this worker remembers -------------------------------------------------------------

    def block(self, url: str, until: float, *, held: bytes | None = None) -> None:
        """Do not try ``url`` again before ``until``; if it is ``held`` (leased elsewhere, under
        that pending mark), try again as soon as its mark changes."""
        self.blocked[url] = (until, held)

    def until(self, url: str) -> float:
        """When ``url`` may be tried again (0 when it is not blocked)."""
        blocked = self.blocked.get(url)
        return 0.0 if blocked is None else blocked[0]

    def ready(self, url: str, token: bytes, now: float) -> float | None:
        """``None`` if ``url`` (pending under ``token``) may be tried now, else when to look
        again: it was leased elsewhere when last tried, worth a new try once the lease ends,
        or as soon as the entity was marked again (its holder finished, or more arrived)."""
        blocked = self.blocked.get(url)
        if blocked is None:
            return None
        until, held = blocked
        if until > now and held in (None, token):
            return until
        del self.blocked[url]
        return None

    def forget_unmarked(self, pending: Sequence[tuple[str, bytes]]) -> None:
        """Drop blocks on entities no longer pending, once they outnumber the pending ones
        (they would otherwise accumulate for the life of the process)."""
        if len(self.blocked) > 2 * len(pending) + 1024:
            marked = {url for url, _token in pending}
            for url in [u for u in self.blocked if u not in marked]:
                del self.blocked[url]

    def remember(self, url: str, raw: bytes | None) -> None:
        """Cache the record bytes this worker just wrote for ``url`` (``None``: forget it)."""
        if raw is None:
            self.records.pop(url, None)
            return
        self.records[url] = raw
        self.records.move_to_end(url)
        while len(self.records) > self.cache_size:
            self.records.popitem(last=False)

    def remember_view(
        self, url: EntityURL, offset: str, view: View, snapshot: str, born: float
    ) -> None:
        """Cache the view of ``url`` (the entity created at ``born``) folded up to ``offset``
        (its last committed wake), and the offset of its last stored snapshot (``-1``: none)."""
        key = url.url
        self.views[key] = (offset, view, born, self.tails.pin(url.stream, offset))
        self.snapshots[key] = snapshot
        self.views.move_to_end(key)
        while len(self.views) > self.cache_size:
            self.snapshots.pop(self.views.popitem(last=False)[0], None)

    async def load(
        self,
        url: EntityURL,
        acked: str,
        to_offset: str | None,
        born: float,
        token: bytes | None = None,
    ) -> Loaded:
        """The view and events of a wake range (see :func:`~.load.load_range`) of the entity
        at ``url`` created at ``born``, folded from its cached view when there is one; then its
        ``base_offset`` is that of the entity's last snapshot (so snapshots keep being written
        every ``snapshot_every`` events while the cache is warm). A new range (no
        ``to_offset``) claimed under the pending mark ``token`` folds the messages this
        process's commits handed over instead of reading them, where they cover it (see
        :mod:`.known`). Raises whatever the store raises."""
        cached = self.views.get(url.url)
        if cached is None or cached[2] != born:
            start, pinned = None, None
            self.tails.forget(url.stream)  # folded from a snapshot or the start: start anew
        else:
            start, pinned = (cached[0], cached[1]), cached[3]
        known = None
        if start is not None and pinned is not None and to_offset is None and token is not None:
            known = self.tails.after(url.stream, start[0], pinned, token)
        loaded = await load_range(self.store, url, acked, to_offset, start, known)
        if start is not None and loaded.base_offset == start[0]:
            loaded.base_offset = self.snapshots.get(url.url, loaded.base_offset)
        return loaded

    # -- claiming -------------------------------------------------------------------------------

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

        Raises whatever the store raises.
        """
        target = parse_url(url)
        if token is None or stolen:
            current = await self.store.kv_get(PENDING_NS, target.url)
            if current is None or (token is not None and current != token):
                return None
            token = current
        for fresh in (stolen, True):  # a stolen claim skips the cache
            raw = None if fresh else self.records.get(target.url)
            if raw is None:
                raw = await self.store.kv_get(ENTITY_NS, target.url)
                fresh = True
            claim = await self._try(target, raw, token)
            if claim is not _STALE:
                if stolen and claim is not None:
                    metrics.lease_steals.inc(("affinity",))
                return claim  # type: ignore[return-value]
            self.remember(target.url, None)
            if fresh:
                return None
        return None

    async def _clear(self, target: EntityURL, token: bytes, raw: bytes | None = None) -> None:
        """Clear the pending mark if it is still ``token`` (and, with ``raw``, the record is
        still that). Raises ConditionFailed when ``raw`` no longer holds."""
        checks = [] if raw is None else [KvCheck(ENTITY_NS, target.url, raw)]
        await self.store.commit(
            [*checks, KvPut(PENDING_NS, target.url, None, only_if=True, expect=token, quiet=True)]
        )

    async def _try(self, target: EntityURL, raw: bytes | None, token: bytes) -> object:
        """One compare-and-set attempt: a :class:`Claim`, ``None`` (nothing to do now), or
        ``_STALE`` (the record read was out of date)."""
        if raw is None:  # an orphan mark: drop it
            await self._clear(target, token)
            return None
        record = EntityRecord.load(raw)
        now = self.clock.now()
        if record.status == "stopped":
            await self._clear(target, token)
            return None
        if record.owner is not None and record.lease_expires > now:
            self.block(target.url, record.lease_expires, held=token)
            self.counts["held"] += 1
            return None
        if record.retry_at is not None and record.retry_at > now:
            self.block(target.url, record.retry_at)
            return None
        self.blocked.pop(target.url, None)
        inflight = record.inflight
        loaded: Loaded | None = None
        if inflight is None:
            try:
                loaded = await self.load(target, record.acked, None, record.created_at, token)
            except (StreamNotFound, StreamGone):
                return None
            if not any(e["type"] in WAKE_TYPES for e in loaded.events):
                self.counts["empty"] += 1
                # nothing to run (another worker ran the wake since the mark was read, or a
                # conservative re-mark): no empty wake; clear the mark if it is still the one
                # read and the record is still the one loaded from
                try:
                    await self._clear(target, token, raw)
                except ConditionFailed:
                    return _STALE
                return None
            to_offset = wake_end(loaded.events) or loaded.to_offset  # a resumed run: alone
            if to_offset != loaded.to_offset:
                token = b""  # more waits after the cut: no mark matches, so the commit keeps it
            inflight = Inflight(
                wake_id=wake_id(record.acked, to_offset),
                from_offset=record.acked,
                to_offset=to_offset,
            )
        else:
            inflight = inflight.model_copy(update={"attempt": inflight.attempt + 1})
        claimed = self._claimed(record, inflight, now)
        claimed_raw = claimed.dump()
        slot: list[Op] = []
        if self.caps is not None:
            taken = await self.caps.take(target.type, target.url, claimed.epoch, now)
            if taken is None:  # every slot of its type is busy: try again shortly
                self.block(target.url, now + CAPPED_RETRY, held=token)
                self.counts["capped"] += 1
                return None
            slot = taken
        began = time.perf_counter()
        try:  # the claimed record (new epoch, lease, range), if ``raw`` still holds
            await self.store.commit(
                [
                    KvCheck(ENTITY_NS, target.url, raw),
                    KvCheck(PAUSED_NS, target.url, None),  # a paused entity starts no wake
                    *slot,  # a slot of its type's concurrency cap, if it has one
                    KvPut(ENTITY_NS, target.url, claimed_raw),
                ]
            )
        except ConditionFailed:
            if await self.store.kv_get(PAUSED_NS, target.url) is not None:
                self.block(target.url, now + PAUSED_RETRY, held=token)  # until a resume marks it
                self.counts["paused"] += 1
                return None
            self.counts["lost"] += 1
            return _STALE
        metrics.claim_commit.observe(time.perf_counter() - began)
        if record.owner is not None and record.owner != self.worker_id:
            metrics.lease_steals.inc(("expired",))  # its worker stopped renewing: crashed or stuck
        self.counts["won"] += 1
        self.remember(target.url, claimed_raw)
        return Claim(target, claimed, claimed_raw, token, loaded)

    def _claimed(self, record: EntityRecord, inflight: Inflight, now: float) -> EntityRecord:
        """``record`` leased to this worker: a new epoch, the lease, the wake's range."""
        return record.model_copy(
            update={
                "owner": self.worker_id,
                "epoch": record.epoch + 1,
                "lease_expires": now + self.lease_seconds,
                "inflight": inflight,
                "status": "running",
                "retry_at": None,
            }
        )

    async def renew(self, claim: Claim) -> bool:
        """Extend the lease of ``claim`` by ``lease_seconds`` from now; ``False`` if it was
        taken over. Raises whatever else the store raises."""
        renewed = claim.record.model_copy(
            update={"lease_expires": self.clock.now() + self.lease_seconds}
        )
        raw = renewed.dump()
        try:
            await self.store.commit(
                [KvCheck(ENTITY_NS, claim.url.url, claim.raw), KvPut(ENTITY_NS, claim.url.url, raw)]
            )
        except ConditionFailed:
            return False
        claim.record, claim.raw = renewed, raw
        return True

    async def release(self, claim: Claim) -> bool:
        """Give the lease of ``claim`` back at once, keeping the wake's range, so the wake is
        redelivered now (as its next attempt) instead of after the lease expires. ``False``
        when it could not be (the wake committed or was fenced after all, or the store
        failed: the lease then expires)."""
        released = claim.record.model_copy(
            update={"owner": None, "status": "idle", "lease_expires": 0.0}
        )
        raw = released.dump()
        try:
            await self.store.commit(
                [KvCheck(ENTITY_NS, claim.url.url, claim.raw), KvPut(ENTITY_NS, claim.url.url, raw)]
            )
        except ConditionFailed:
            self.remember(claim.url.url, None)
            return False
        except Exception as exc:  # e.g. the database is gone: the lease expires instead
            logger.warning("could not release the lease of %s: %r", claim.url, exc)
            self.remember(claim.url.url, None)
            return False
        self.remember(claim.url.url, raw)
        return True
