"""The runtime's metrics (``entities._metrics``) in the Prometheus text format, through
prometheus-client's metric families and exposition."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .._metrics import Family, metrics, pending

__all__ = ["CONTENT_TYPE", "REGISTRY", "family_metric", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def family_metric(family: Family) -> Metric:
    """``family`` as a prometheus-client counter or histogram family."""
    if family.bounds is None:
        counter = CounterMetricFamily(family.name, family.doc, labels=family.labels)
        for values, amount in sorted(family.counters.items()):
            counter.add_metric(list(values), amount)
        return counter
    histogram = HistogramMetricFamily(family.name, family.doc, labels=family.labels)
    for values, child in sorted(family.histograms.items()):
        buckets = [(_le(bound), count) for bound, count in family.buckets(child)]
        histogram.add_metric(list(values), buckets, child.sum)
    return histogram


class _Runtime(Collector):
    """The runtime's counters and histograms, and the pending gauges as last read."""

    def collect(self) -> Iterator[Metric]:
        for family in metrics.families:
            yield family_metric(family)
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
        for type_, n in sorted(pending.counts.items()):
            count.add_metric([type_], n)
            age.add_metric([type_], pending.ages.get(type_, 0.0))
        yield count
        yield age


REGISTRY = CollectorRegistry(auto_describe=True)
REGISTRY.register(_Runtime())


def render() -> bytes:
    """The metrics in the Prometheus text format."""
    return generate_latest(REGISTRY)
