"""UDP ingest endpoint (:4445): one datagram = one message, identified by source IP.

Nothing is ever sent back (1NCE devices never read a reply). Unknown or disabled SIMs
are dropped by the pipeline (counted, admin log); oversize datagrams are dropped here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from integrator.endpoints.datagram import BindUdp, DatagramServer, bind_udp
from integrator.pipeline import Pipeline
from simwire.clock import Clock
from simwire.logs import RateLimitedLogger
from simwire.metrics import Metrics
from simwire.model import Protocol, RawUplink

log = logging.getLogger("simwire.integrator.udp")


@dataclass(frozen=True, slots=True)
class UdpConfig:
    max_payload: int = 1500
    max_inflight: int = 20_000
    """Datagrams in the pipeline at once; beyond, new ones are dropped and counted."""
    rcvbuf: int = 8 * 1024 * 1024


class UdpIngestProtocol(asyncio.DatagramProtocol):
    def __init__(
        self, pipeline: Pipeline, clock: Clock, metrics: Metrics, config: UdpConfig
    ) -> None:
        self._pipeline = pipeline
        self._clock = clock
        self._config = config
        self._warn = RateLimitedLogger(log)
        self._count_too_large = metrics.uplinks.labels("UDP", "too_large").inc
        self._count_overloaded = metrics.uplinks.labels("UDP", "overloaded").inc

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > self._config.max_payload:
            self._count_too_large()
            self._warn.warning(f"large:{addr[0]}", "UDP datagram of %d bytes from %s dropped",
                               len(data), addr[0])
            return
        if self._pipeline.inflight >= self._config.max_inflight:
            self._count_overloaded()
            return
        self._pipeline.submit(
            RawUplink(Protocol.UDP, addr[0], addr[1], data, self._clock.now_ms())
        )

    def error_received(self, exc: Exception) -> None:
        self._warn.warning("socket", "UDP socket error: %s", exc)


async def serve(
    host: str, port: int, pipeline: Pipeline, clock: Clock, metrics: Metrics,
    config: UdpConfig | None = None, bind: BindUdp = bind_udp,
) -> DatagramServer:
    """Start the UDP endpoint; called by simwire.app."""
    cfg = config or UdpConfig()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: UdpIngestProtocol(pipeline, clock, metrics, cfg),
        sock=bind(host, port, cfg.rcvbuf),
    )
    return DatagramServer(transport)
