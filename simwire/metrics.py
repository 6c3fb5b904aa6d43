"""Prometheus metrics on a per-application registry (no module-level state).

Counters carry an `outcome` label (stored, unauthorized, malformed, bad_request, duplicate,
error...). Endpoints and the pipeline receive a `Metrics` instance from simwire.app.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

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

        self.shared: SharedMetrics | None = None
        """Set in a worker of `--workers N`: `render` then answers for every worker."""

    def render(self) -> bytes:
        """`GET /metrics`: this process's series, or with `shared`, every worker's."""
        if self.shared is not None:
            return self.shared.render(self.registry)
        return generate_latest(self.registry)


class _Families:
    """A collector yielding fixed metric families (for `generate_latest`)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class SharedMetrics:
    """The metrics of all the workers of one supervisor: each worker writes its series,
    labelled `worker="<index>"`, to `<directory>/w<index>.prom` (`snapshot`, every second
    from simwire.app); a scrape, on whichever worker accepts it, merges its live series
    with the other workers' latest snapshots (at most about a second old). Sum over the
    `worker` label for machine totals."""

    def __init__(self, directory: Path, index: int) -> None:
        self._dir = directory
        self._index = index
        self._label = str(index)

    def _own(self, registry: CollectorRegistry) -> list[Metric]:
        out: list[Metric] = []
        for family in registry.collect():
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = [s._replace(labels={**s.labels, "worker": self._label})
                            for s in family.samples]
            out.append(copy)
        return out

    def snapshot(self, registry: CollectorRegistry) -> None:
        """Write this worker's series (atomically: a reader never sees half a file)."""
        text = generate_latest(_registry(self._own(registry)))
        tmp = self._dir / f".w{self._index}.prom.{os.getpid()}"
        tmp.write_bytes(text)
        tmp.replace(self._dir / f"w{self._index}.prom")

    def render(self, registry: CollectorRegistry) -> bytes:
        merged: dict[str, Metric] = {}
        sources = [self._own(registry)]
        for path in sorted(self._dir.glob("w*.prom")):
            if path.name == f"w{self._index}.prom":
                continue
            try:
                sources.append(list(text_string_to_metric_families(path.read_text())))
            except (OSError, ValueError):
                continue  # a worker being restarted: its next snapshot will do
        for families in sources:
            for family in families:
                into = merged.get(family.name)
                if into is None:
                    merged[family.name] = into = Metric(
                        family.name, family.documentation, family.type, family.unit)
                into.samples.extend(family.samples)
        return generate_latest(_registry(merged.values()))


def _registry(families: Iterable[Metric]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return registry
