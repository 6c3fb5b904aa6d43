"""The 7-day retention: a background task purging history and admin logs on the clock.

simwire.app starts it; tests call `run_once()` after moving a ManualClock.
"""

from __future__ import annotations

import asyncio
import logging

from simwire.clock import Clock
from simwire.metrics import Metrics
from simwire.ports import HistoryRepository

log = logging.getLogger("simwire.inspector.retention")


class Retention:
    def __init__(
        self, repo: HistoryRepository, clock: Clock, metrics: Metrics, days: int,
        interval_s: float,
    ) -> None:
        self._repo = repo
        self._clock = clock
        self._metrics = metrics
        self.keep_ms = days * 24 * 3600 * 1000
        self._interval = interval_s

    async def run_once(self) -> int:
        removed = await self._repo.purge(self._clock.now_ms() - self.keep_ms)
        if removed:
            self._metrics.purged_rows.inc(removed)
            log.info("retention removed %d rows", removed)
        return removed

    async def run_forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("retention purge failed; retrying next interval")
            await asyncio.sleep(self._interval)
