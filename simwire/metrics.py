"""Prometheus metrics on a per-application registry (no module-level state).

Counters carry an `outcome` label (stored, unauthorized, malformed, bad_request, duplicate,
error...). Endpoints and the pipeline receive a `Metrics` instance from simwire.app.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.uplinks = Counter(
            "simwire_uplinks", "Device datagrams by protocol and outcome",
            ["protocol", "outcome"], registry=self.registry,
        )
        self.ingest_seconds = Histogram(
            "simwire_ingest_seconds", "Pipeline time from receipt to durable commit",
            ["protocol"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.events = Counter(
            "simwire_events_stored", "Events committed to the store", ["type"],
            registry=self.registry,
        )
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
        self.inflight = Gauge(
            "simwire_uplinks_inflight", "Uplinks in the pipeline", registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
