"""Prometheus metrics on a per-application registry (no module-level state).

Counters carry an `outcome` label (stored, unauthorized, malformed, bad_request, duplicate,
error...). Endpoints and the pipeline receive a `Metrics` instance from simwire.app.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0)


class _Increment:
    __slots__ = ("inc",)

    def __init__(self, inc: Callable[[], None]) -> None:
        self.inc = inc


class UplinkCounters:
    """`simwire_uplinks_total{protocol,outcome}` (or another hot-path counter with the same
    labels) as plain ints, read at scrape time.

    The hot path binds `labels(...).inc` once; an increment is a list-cell add (no lock:
    only the event loop thread counts)."""

    def __init__(self, name: str = "simwire_uplinks",
                 documentation: str = "Device datagrams by protocol and outcome") -> None:
        self._name = name
        self._doc = documentation
        self._cells: dict[tuple[str, str], list[int]] = {}

    def labels(self, protocol: str, outcome: str) -> _Increment:
        cell = self._cells.setdefault((protocol, outcome), [0])

        def inc() -> None:
            cell[0] += 1

        return _Increment(inc)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=["protocol", "outcome"])
        for (protocol, outcome), cell in sorted(self._cells.items()):
            family.add_metric([protocol, outcome], cell[0])
        yield family


class LatencyHistogram:
    """`simwire_ingest_seconds{protocol}`: receipt -> durable commit, lock-free like above."""

    def __init__(self) -> None:
        self._series: dict[str, tuple[list[int], list[float]]] = {}

    def observer(self, protocol: str) -> Callable[[float], None]:
        counts, total = self._series.setdefault(
            protocol, ([0] * (len(LATENCY_BUCKETS) + 1), [0.0]))

        def observe(seconds: float) -> None:
            counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            total[0] += seconds

        return observe

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "simwire_ingest_seconds", "Pipeline time from receipt to durable commit",
            labels=["protocol"])
        for protocol, (counts, total) in sorted(self._series.items()):
            cumulative, buckets = 0, []
            for le, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            family.add_metric([protocol], buckets, total[0])
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.uplinks = UplinkCounters()
        self.ingest_seconds = LatencyHistogram()
        self.translations = UplinkCounters(
            "simwire_translations", "Energy Saver translations by protocol and outcome "
            "(translated, failed)")
        self.dtls = UplinkCounters(
            "simwire_dtls", "DTLS handshake and session outcomes (handshake, hello_verify, "
            "handshake_failed, evicted, ...)")
        self.registry.register(self.uplinks)
        self.registry.register(self.dtls)
        self.registry.register(self.translations)
        self.registry.register(self.ingest_seconds)
        self.api_requests = Counter(
            "simwire_api_requests", "Management API requests", ["method", "status"],
            registry=self.registry,
        )
        self.admin_logs_dropped = Counter(
            "simwire_admin_logs_dropped", "Admin logs dropped by rate limiting",
            registry=self.registry,
        )
        self.purged_rows = Counter(
            "simwire_retention_purged_rows", "Rows removed by the 7-day retention",
            registry=self.registry,
        )
        self.delivered = Counter(
            "simwire_integration_delivered", "Events delivered, per integration",
            ["integration"], registry=self.registry,
        )
        self.delivery_failures = Counter(
            "simwire_integration_failed_attempts",
            "Delivery attempts that failed (each is retried on the schedule)",
            ["integration"], registry=self.registry,
        )
        self.retrying = Gauge(
            "simwire_integration_retrying", "1 while an integration waits to retry",
            ["integration"], registry=self.registry,
        )
        self.queue_depth = Gauge(
            "simwire_integration_queue_depth",
            "Events queued for an integration (as of its last outbox read)",
            ["integration"], registry=self.registry,
        )
        self.delivery_seconds = Histogram(
            "simwire_integration_delivery_seconds", "Time from receipt to delivery",
            ["integration"], buckets=DELIVERY_BUCKETS, registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
