"""The metrics page, in the Prometheus text format or OpenMetrics, written by prometheus-client.

Each scrape builds a fresh registry holding one collector that yields the master's figures as they
are at that moment (:class:`~mpnet.metrics.Family`): no per-process files (prometheus-client's
multiprocess mode would leave some behind each reload) and no state kept between scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from .metrics import Family
from .pure.metrics import DURATION_BUCKETS

_BOUNDS = [*(f"{bound:g}" for bound in DURATION_BUCKETS), "+Inf"]


class _Snapshot:
    """A collector of figures computed before the scrape (prometheus-client's Collector)."""

    def __init__(self, families: list[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            labels = list(family.labels)
            metric: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
            if family.kind == "counter":
                name = family.name.removesuffix("_total")
                metric = CounterMetricFamily(name, family.help, labels=labels)
            elif family.kind == "gauge":
                metric = GaugeMetricFamily(family.name, family.help, labels=labels)
            else:
                metric = HistogramMetricFamily(family.name, family.help, labels=labels)
            for values, sample in sorted(family.samples.items()):
                if isinstance(metric, HistogramMetricFamily):
                    counts, total = sample
                    buckets = list(zip(_BOUNDS, counts, strict=True))
                    metric.add_metric(list(values), buckets, total)
                else:
                    metric.add_metric(list(values), sample)
            yield metric


def render(families: list[Family], accept: str) -> tuple[bytes, str]:
    """The page and its content type: OpenMetrics if *accept* (the request's Accept header)
    asks for it, else the Prometheus text format 0.0.4."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))  # type: ignore[arg-type]
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
