"""Prometheus metrics of the runtime (``GET /metrics``, or ``entities worker --metrics-port``).

Counters and histograms are this process's own: each process that runs wakes (``serve``, every
``worker``) exposes what it ran. The pending gauges describe the whole store, so any process
answers them alike; they are read when scraped (:func:`refresh_pending`), not kept up to date
on the wake path.

The wake path pays a few label-child lookups (cached per type) and histogram observations:
see ``benchmarks/wakes.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from streams import Store, StreamsError

from ._errors import EntitiesError
from ._events import from_iso
from ._records import ENTITY_NS, PENDING_NS, EntityRecord
from ._urls import EntityURL, parse_url

__all__ = ["CONTENT_TYPE", "REGISTRY", "metrics", "refresh_pending", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REGISTRY = CollectorRegistry(auto_describe=True)

# seconds: from sub-millisecond trivial handlers to long agent turns
_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
    300, 900,
)  # fmt: skip
_COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class _Metrics:
    """The runtime's metrics, with the label children of the wake path cached per type."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.wakes = Counter(
            "entities_wakes",
            "Wakes run to an end, by entity type and outcome (completed, failed, timeout, "
            "dead_lettered, cancelled).",
            ["type", "outcome"],
            registry=registry,
        )
        self.wake_duration = Histogram(
            "entities_wake_duration_seconds",
            "How long a wake took, from its start to its commit (handler and commit).",
            ["type"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.send_to_start = Histogram(
            "entities_send_to_start_seconds",
            "From a message's arrival in the inbox to the start of the wake that takes it "
            "(the oldest message of a wake; first attempts only).",
            ["type"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.dead_letters = Counter(
            "entities_dead_letters",
            "Wakes given up after their last attempt, by entity type.",
            ["type"],
            registry=registry,
        )
        self.timer_lateness = Histogram(
            "entities_timer_lateness_seconds",
            "How late timers (sleeps, schedules, timeouts) fired past their due time.",
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.lease_steals = Counter(
            "entities_lease_steals",
            "Leases this process took over: ``expired`` (the holder stopped renewing it: it "
            "crashed or hung) or ``affinity`` (work stolen from a busy live worker).",
            ["reason"],
            registry=registry,
        )
        self.store_commit = Histogram(
            "entities_store_commit_seconds",
            "Latency of the store transactions of the wake path: claim, commit.",
            ["op"],
            buckets=_COMMIT_BUCKETS,
            registry=registry,
        )
        self.model_tokens = Counter(
            "entities_model_tokens",
            "Model tokens used by agent runs, by entity type, provider and direction.",
            ["type", "provider", "direction"],
            registry=registry,
        )
        self.model_calls = Counter(
            "entities_model_calls",
            "Model calls made by agent runs, by entity type, provider and outcome.",
            ["type", "provider", "outcome"],
            registry=registry,
        )
        self._ends: dict[tuple[str, str], Any] = {}
        self._durations: dict[str, Any] = {}
        self._waits: dict[str, Any] = {}
        self.expired_steals = self.lease_steals.labels("expired")
        self.affinity_steals = self.lease_steals.labels("affinity")
        self.claim_commit = self.store_commit.labels("claim")
        self.wake_commit = self.store_commit.labels("commit")

    def wake_ended(self, type_: str, outcome: str, seconds: float) -> None:
        """Count a wake of ``type_`` that ended with ``outcome`` after ``seconds``."""
        counter = self._ends.get((type_, outcome))
        if counter is None:
            counter = self._ends[type_, outcome] = self.wakes.labels(type_, outcome)
        counter.inc()
        histogram = self._durations.get(type_)
        if histogram is None:
            histogram = self._durations[type_] = self.wake_duration.labels(type_)
        histogram.observe(seconds)

    def wake_started(self, type_: str, waited: float) -> None:
        """Observe the ``waited`` seconds of a wake's oldest message before its start."""
        histogram = self._waits.get(type_)
        if histogram is None:
            histogram = self._waits[type_] = self.send_to_start.labels(type_)
        histogram.observe(max(0.0, waited))

    def tokens(self, type_: str, provider: str, input: int, output: int) -> None:
        """Count the tokens of one model call."""
        if input:
            self.model_tokens.labels(type_, provider, "input").inc(input)
        if output:
            self.model_tokens.labels(type_, provider, "output").inc(output)


metrics = _Metrics(REGISTRY)


class _Pending(Collector):
    """``entities_pending_entities`` and ``entities_oldest_pending_age_seconds`` by type, as
    last read by :func:`refresh_pending`."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.ages: dict[str, float] = {}
        # url -> (acked offset, time of its first unacknowledged event): an entity still
        # pending at the same offset is not read again
        self.since: dict[str, tuple[str, float]] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        count = GaugeMetricFamily(
            "entities_pending_entities",
            "Entities with unprocessed events (a pending mark), by type.",
            labels=["type"],
        )
        age = GaugeMetricFamily(
            "entities_oldest_pending_age_seconds",
            "Age of the oldest unprocessed event among pending entities, by type.",
            labels=["type"],
        )
        for type_, n in sorted(self.counts.items()):
            count.add_metric([type_], n)
            age.add_metric([type_], self.ages.get(type_, 0.0))
        yield count
        yield age


_pending = _Pending()
REGISTRY.register(_pending)


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
        first = await _first_unacked(store, target, _pending.since.get(url))
        if first is None:
            continue
        since[url] = first
        ages[type_] = max(ages.get(type_, 0.0), max(0.0, now - first[1]))
    _pending.counts, _pending.ages, _pending.since = counts, ages, since


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


def render() -> bytes:
    """The metrics in the Prometheus text format."""
    return generate_latest(REGISTRY)
