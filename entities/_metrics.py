"""The runtime's metrics, as plain numbers (rendered in the Prometheus format by
``entities.server``: ``GET /metrics``, or ``entities worker --metrics-port``).

Counters and histograms are this process's own: each process that runs wakes (``serve``, every
``worker``) exposes what it ran. The pending gauges describe the whole store, so any process
answers them alike; they are read when scraped (:func:`refresh_pending`), not kept up to date
on the wake path.

The wake path pays a few dictionary lookups and list increments per wake (see ``Family``);
``benchmarks/wakes.py`` measures it.

Threads: under ``entities serve`` the worker updates these on its own thread (its event loop,
see ``entities.server._embedded``) while the server's thread renders them for ``/metrics``,
without a lock: each update is a single dictionary or list operation, atomic under the GIL, so
a scrape may at worst see a histogram's count one observation apart from its buckets.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left

import orjson

from streams import Store, StreamsError

from ._errors import EntitiesError
from ._events import from_iso
from ._records import ENTITY_NS, PENDING_NS, EntityRecord
from ._urls import EntityURL, parse_url

__all__ = ["Family", "metrics", "pending", "refresh_pending"]

# seconds: from sub-millisecond trivial handlers to long agent turns
_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
    300, 900,
)  # fmt: skip
_COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class _Histogram:
    """One labelled histogram's buckets (``le`` bounds; the last is ``+Inf``) and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class Family:
    """A counter or histogram family, kept as plain numbers per label values.

    prometheus-client's own metrics take a lock per update (several per histogram
    observation); the wake path runs on one event loop thread and updates these instead,
    several times cheaper, and ``entities.server`` renders them with prometheus-client's
    families when scraped.
    """

    def __init__(
        self, name: str, doc: str, labels: tuple[str, ...], bounds: tuple[float, ...] | None
    ) -> None:
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, bounds
        self.counters: dict[tuple[str, ...], float] = {}
        self.histograms: dict[tuple[str, ...], _Histogram] = {}

    def inc(self, values: tuple[str, ...] = (), amount: float = 1) -> None:
        self.counters[values] = self.counters.get(values, 0) + amount

    def child(self, values: tuple[str, ...] = ()) -> _Histogram:
        """The histogram of ``values`` (made on first use)."""
        histogram = self.histograms.get(values)
        if histogram is None:
            assert self.bounds is not None
            histogram = self.histograms[values] = _Histogram(self.bounds)
        return histogram

    def buckets(self, histogram: _Histogram) -> list[tuple[float, int]]:
        """``(le, cumulative count)`` of ``histogram``, ``+Inf`` last."""
        running, out = 0, []
        assert self.bounds is not None
        for bound, count in zip((*self.bounds, math.inf), histogram.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class _Metrics:
    """The runtime's metrics (see the module docstring)."""

    def __init__(self) -> None:
        def counter(name: str, doc: str, *labels: str) -> Family:
            return Family(name, doc, labels, None)

        def histogram(name: str, doc: str, bounds: tuple[float, ...], *labels: str) -> Family:
            return Family(name, doc, labels, bounds)

        self.wakes = counter(
            "entities_wakes",
            "Wakes run to an end, by entity type and outcome (completed, failed, timeout, "
            "dead_lettered, cancelled).",
            "type", "outcome",
        )  # fmt: skip
        self.wake_duration = histogram(
            "entities_wake_duration_seconds",
            "How long a wake took, from its start to its commit (handler and commit).",
            _DURATION_BUCKETS,
            "type",
        )
        self.send_to_start = histogram(
            "entities_send_to_start_seconds",
            "From a message's arrival in the inbox to the start of the wake that takes it "
            "(the oldest message of a wake; first attempts only).",
            _DURATION_BUCKETS,
            "type",
        )
        self.dead_letters = counter(
            "entities_dead_letters", "Wakes given up after their last attempt, by type.", "type"
        )
        self.timer_lateness = histogram(
            "entities_timer_lateness_seconds",
            "How late timers (delayed sends, schedules, timeouts) fired past their due time.",
            _DURATION_BUCKETS,
        )
        self.lease_steals = counter(
            "entities_lease_steals",
            "Leases this process took over: ``expired`` (the holder stopped renewing it: it "
            "crashed or hung) or ``affinity`` (work stolen from a busy live worker).",
            "reason",
        )
        self.store_commit = histogram(
            "entities_store_commit_seconds",
            "Latency of the store transactions of the wake path: claim, commit.",
            _COMMIT_BUCKETS,
            "op",
        )
        self.model_tokens = counter(
            "entities_model_tokens",
            "Model tokens used by agent runs, by entity type, provider and direction.",
            "type", "provider", "direction",
        )  # fmt: skip
        self.model_calls = counter(
            "entities_model_calls",
            "Model calls made by agent runs, by entity type, provider and outcome.",
            "type", "provider", "outcome",
        )  # fmt: skip
        self.model_limit_waits = counter(
            "entities_model_limit_waits",
            "Model calls that waited for their turn under a provider's rate limit, by provider.",
            "provider",
        )
        self.budget_refusals = counter(
            "entities_budget_refusals",
            "Agent runs ended before a model call because a token budget was used up, by type.",
            "type",
        )
        self.compacted_events = counter(
            "entities_compacted_events",
            "Events compaction removed from entity streams, by entity type and kind "
            "(text_deltas, steps, prefix).",
            "type", "kind",
        )  # fmt: skip
        self.compacted_bytes = counter(
            "entities_compacted_bytes",
            "Bytes of events compaction removed from entity streams, by entity type.",
            "type",
        )
        self.families = [
            self.wakes, self.wake_duration, self.send_to_start, self.dead_letters,
            self.timer_lateness, self.lease_steals, self.store_commit, self.model_tokens,
            self.model_calls, self.model_limit_waits, self.budget_refusals,
            self.compacted_events, self.compacted_bytes,
        ]  # fmt: skip
        self.claim_commit = self.store_commit.child(("claim",))
        self.wake_commit = self.store_commit.child(("commit",))
        self.lateness = self.timer_lateness.child()

    def wake_ended(self, type_: str, outcome: str, seconds: float) -> None:
        """Count a wake of ``type_`` that ended with ``outcome`` after ``seconds``."""
        self.wakes.inc((type_, outcome))
        self.wake_duration.child((type_,)).observe(seconds)

    def wake_started(self, type_: str, waited: float) -> None:
        """Observe the ``waited`` seconds of a wake's oldest message before its start."""
        self.send_to_start.child((type_,)).observe(max(0.0, waited))

    def tokens(self, type_: str, provider: str, input: int, output: int) -> None:
        """Count the tokens of one model call."""
        if input:
            self.model_tokens.inc((type_, provider, "input"), input)
        if output:
            self.model_tokens.inc((type_, provider, "output"), output)


metrics = _Metrics()


class _Pending:
    """Pending entities and the age of their oldest unprocessed event, by type, as last read
    by :func:`refresh_pending`."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.ages: dict[str, float] = {}
        # url -> (acked offset, time of its first unacknowledged event): an entity still
        # pending at the same offset is not read again
        self.since: dict[str, tuple[str, float]] = {}


pending = _Pending()


async def refresh_pending(store: Store, now: float | None = None) -> None:
    """Read the pending marks of ``store`` into the pending gauges. The age of an entity's
    oldest unprocessed event costs one read of one event the first time it is seen pending at
    an acknowledged offset; later scrapes reuse it.

    Raises whatever the store raises.
    """
    now = time.time() if now is None else now
    counts: dict[str, int] = {}
    ages: dict[str, float] = {}
    since: dict[str, tuple[str, float]] = {}
    for url, _token in await store.kv_scan(PENDING_NS):
        try:
            target = parse_url(url)
        except EntitiesError:
            continue
        type_ = target.type
        counts[type_] = counts.get(type_, 0) + 1
        first = await _first_unacked(store, target, pending.since.get(url))
        if first is None:
            continue
        since[url] = first
        ages[type_] = max(ages.get(type_, 0.0), max(0.0, now - first[1]))
    pending.counts, pending.ages, pending.since = counts, ages, since


async def _first_unacked(
    store: Store, target: EntityURL, known: tuple[str, float] | None
) -> tuple[str, float] | None:
    raw = await store.kv_get(ENTITY_NS, target.url)
    if raw is None:
        return None
    record = EntityRecord.load(raw)
    if known is not None and known[0] == record.acked:
        return known
    try:
        result = await store.read(target.stream, record.acked, limit=1, renew_ttl=False)
    except StreamsError:
        return None
    for message in result.messages:
        try:
            stamp = orjson.loads(message.data)["headers"]["timestamp"]
            return record.acked, from_iso(stamp)
        except (ValueError, KeyError, TypeError):
            return None
    return None
