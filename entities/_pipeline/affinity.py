"""Stage 3 (with :mod:`.claim`), affinity: which live worker should run an entity's wakes.

Every running worker keeps a presence record in the ``worker`` namespace (renewed every
``PRESENCE_SECONDS``, taken for gone ``PRESENCE_TTL`` seconds after its last renewal). Each
entity prefers one live worker, chosen by rendezvous hashing (BLAKE2b) of the entity URL over
the live worker ids, so workers sharing a store split the pending entities between them instead
of all racing for the same ones: claims are rarely lost to another worker, and an entity's wakes
keep landing on the worker whose caches (entity record, folded view) are warm.

Workers announce the entity types they serve (and their deploy version) in the same record, and
an entity prefers only among the live workers that serve its type: during a rolling deploy, old
and new workers with different registries share the store, and a wake of a type only the new
code has is neither preferred by, nor ever claimed by, an old worker (a worker claims only the
types its registry defines, see ``Worker._ours``). A record without ``types`` (a worker of an
earlier version) counts as serving every type.

Affinity is a preference, never a rule: leases and fencing keep correctness whoever runs a wake.
An entity preferred by another worker is taken once it has been seen pending for
``STEAL_AFTER`` seconds (that worker is busy, slow or dead), so no entity waits on one worker;
the claim of such an entity re-reads its pending mark and record first, and stops if that worker
took it meanwhile (see ``Worker.claim``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from streams import ConditionFailed, KvPut, Store

from .._records import WORKER_NS

__all__ = [
    "PRESENCE_SECONDS",
    "PRESENCE_TTL",
    "STEAL_AFTER",
    "Affinity",
    "WorkerInfo",
    "read_presence",
]

# a running worker renews its presence record this often (seconds)
PRESENCE_SECONDS = 1.0
# a worker whose presence was not renewed for this long is taken for gone
PRESENCE_TTL = 5.0
# an entity preferred by another live worker is taken after waiting this long (seconds): long
# enough that a busy worker's last entities are not raced for (a worker stepping in too early
# mostly finds them leased, or loses the claim: measured with two workers, 0.25 s cost ~0.15
# wasted claims per wake and 1 s almost none), short next to the wakes of agents
STEAL_AFTER = 1.0
# how often the list of live workers is re-read (seconds)
REFRESH_SECONDS = 0.5
_MAX_REMEMBERED = 100_000
# presence records expired this long ago (seconds) are removed by the next worker that reads them
_FORGET_AFTER = 3600.0


def _serves(types: tuple[str, ...] | None, type_name: str) -> bool:
    """Whether a worker announcing ``types`` (``None``: it did not say) runs ``type_name``."""
    return types is None or type_name in types


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker as its presence record describes it."""

    id: str
    host: str
    pid: int
    expires: float  # store clock time at which its presence lapses unless renewed
    live: bool  # renewed recently enough to count (``expires`` is in the future)
    types: tuple[str, ...] | None = None  # the entity types it serves (None: not announced)
    deploy_version: str | None = None  # what ``--deploy-version`` it runs with, if any

    def serves(self, type_name: str) -> bool:
        """Whether it runs wakes of ``type_name`` (one that did not say serves every type)."""
        return _serves(self.types, type_name)


async def read_presence(store: Store, now: float) -> list[WorkerInfo]:
    """Every worker that announced itself on ``store``, live or lapsed, by id.

    Records a worker lapsed long ago (``_FORGET_AFTER``) are deleted on the way (a crashed
    worker never withdraws its own). Raises whatever the store raises for a failed read.
    """
    found: list[WorkerInfo] = []
    for key, raw in await store.kv_scan(WORKER_NS):
        try:
            value = orjson.loads(raw)
            expires = float(value["expires"])
            types = value.get("types")
            deploy = value.get("deploy")
            info = WorkerInfo(key, str(value.get("host", "")), int(value.get("pid", 0)),
                              expires, expires > now,
                              None if types is None else tuple(str(t) for t in types),
                              None if deploy is None else str(deploy))  # fmt: skip
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # not a presence record this version understands: ignore it
        if expires < now - _FORGET_AFTER:
            with contextlib.suppress(ConditionFailed):  # renewed or removed meanwhile
                await store.commit([KvPut(WORKER_NS, key, None, only_if=True, expect=raw)])
            continue
        found.append(info)
    return found


def _weight(worker: str, url: str) -> int:
    """The rendezvous weight of ``url`` on ``worker``: a cryptographic hash, not CRC-32. CRC is
    linear: for two worker ids of one length, the XOR of their weights is the same for every
    URL of one length, so which one wins hangs on a single bit (with ``bench-0``/``bench-1``
    and 1,000 URLs, 452/548 instead of about 500/500)."""
    digest = hashlib.blake2b(f"{worker}|{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _rotated(items: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """``items`` from a random place on (then from the start), so none is always last."""
    if not items:
        return []
    shift = random.randrange(len(items))
    return [*items[shift:], *items[:shift]]


class Affinity:
    """One worker's view of the live workers, and the order it takes pending entities in.

    ``types`` are the entity types this worker serves (announced; ``None``: not announced, as a
    worker of an earlier version), ``deploy_version`` the version it announces."""

    def __init__(
        self,
        store: Store,
        worker_id: str,
        types: Iterable[str] | None = None,
        deploy_version: str | None = None,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.types = None if types is None else tuple(sorted(types))
        self.deploy_version = deploy_version
        self.live: tuple[str, ...] = (worker_id,)
        # live worker id -> the types it serves (None: every type); ``live`` is its key set
        self._serving: dict[str, tuple[str, ...] | None] = {worker_id: self.types}
        self._read_at = -float("inf")
        self._changed = True  # the presence records changed since they were read
        self._mine: dict[str, bool] = {}  # url -> preferred by this worker (for ``live``)
        # others' entities: the pending mark seen, and when it was first seen
        self._waiting: dict[str, tuple[bytes, float]] = {}
        self._next_steal: float | None = None  # when the next of them may be taken (monotonic)

    def presence(self, now: float) -> KvPut:
        """The write that announces (or renews) this worker until ``now + PRESENCE_TTL``."""
        value: dict[str, object] = {
            "expires": now + PRESENCE_TTL,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        if self.types is not None:
            value["types"] = list(self.types)
        if self.deploy_version is not None:
            value["deploy"] = self.deploy_version
        return KvPut(WORKER_NS, self.worker_id, orjson.dumps(value))

    def absence(self) -> KvPut:
        """The write that removes this worker's presence record (a clean stop)."""
        return KvPut(WORKER_NS, self.worker_id, None)

    def changed(self) -> None:
        """Note that the presence records changed (a store notification): read them again."""
        self._changed = True

    async def refresh(self, now: float) -> None:
        """Re-read the live workers if they changed or the last read is older than
        ``REFRESH_SECONDS`` (so expired ones drop out).

        Raises whatever the store raises for a failed read.
        """
        tick = time.monotonic()
        if not self._changed and tick - self._read_at < REFRESH_SECONDS:
            return
        self._read_at, self._changed = tick, False
        serving = {w.id: w.types for w in await read_presence(self.store, now) if w.live}
        serving[self.worker_id] = self.types
        ordered = tuple(sorted(serving))
        if ordered != self.live or serving != self._serving:
            self.live, self._serving = ordered, serving
            self._mine.clear()

    def prefers(self, url: str) -> bool:
        """Whether ``url`` prefers this worker among the live ones that serve its type
        (rendezvous hashing)."""
        mine = self._mine.get(url)
        if mine is None:
            if len(self._mine) >= _MAX_REMEMBERED:
                self._mine.clear()
            candidates = self.live
            if len(candidates) > 1:
                type_name = url.split("/", 2)[1] if url.count("/") >= 2 else ""
                candidates = tuple(
                    w for w in self.live if _serves(self._serving.get(w), type_name)
                ) or (self.worker_id,)
            best = max(candidates, key=lambda worker: (_weight(worker, url), worker))
            mine = self._mine[url] = best == self.worker_id
        return mine

    def order(self, pending: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """``pending`` in the order this worker should try them: its own entities first
        (from a random place, so none is always last), then the entities of other workers
        that have waited at least ``STEAL_AFTER`` seconds (oldest first)."""
        self._next_steal = None
        if len(self.live) == 1:
            self._waiting.clear()
            return _rotated(pending)
        tick = time.monotonic()
        mine: list[tuple[str, bytes]] = []
        theirs: list[tuple[float, str, bytes]] = []
        waiting: dict[str, tuple[bytes, float]] = {}
        for url, token in pending:
            if self.prefers(url):
                mine.append((url, token))
                continue
            seen = self._waiting.get(url)
            since = seen[1] if seen is not None and seen[0] == token else tick
            waiting[url] = (token, since)
            if tick - since >= STEAL_AFTER:
                theirs.append((since, url, token))
            elif self._next_steal is None or since + STEAL_AFTER < self._next_steal:
                self._next_steal = since + STEAL_AFTER
        self._waiting = waiting
        theirs.sort()
        return [*_rotated(mine), *((url, token) for _since, url, token in theirs)]

    def next_steal(self) -> float | None:
        """Seconds until the next entity of another worker, seen waiting (at the last
        :meth:`order`) but not yet for ``STEAL_AFTER``, may be taken; ``None`` when there is
        none. Computed by :meth:`order`, so this is cheap on every turn of the worker loop."""
        if self._next_steal is None:
            return None
        left = self._next_steal - time.monotonic()
        return left if left > 0 else None  # passed: the next look at the pending marks says
