"""The 7-day retention: a background task purging history and admin logs on the clock
(and Energy Saver savings counters older than their longest range and the one before).

simwire.app starts it; tests call `run_once()` after moving a ManualClock.
"""

from __future__ import annotations

import logging

from simwire.clock import Clock
from simwire.metrics import Metrics
from simwire.model import DAY_MS
from simwire.ports import HistoryRepository, SavingsRepository
from simwire.tasks import every

log = logging.getLogger("simwire.inspector.retention")


class Retention:
    def __init__(
        self, repo: HistoryRepository, clock: Clock, metrics: Metrics, days: int,
        interval_s: float, savings: SavingsRepository | None = None, savings_days: int = 60,
    ) -> None:
        self._repo = repo
        self._savings = savings
        self._savings_days = savings_days
        self._clock = clock
        self._metrics = metrics
        self.keep_ms = days * 24 * 3600 * 1000
        self._interval = interval_s

    async def run_once(self) -> int:
        now = self._clock.now_ms()
        removed = await self._repo.purge(now - self.keep_ms)
        if self._savings is not None:
            removed += await self._savings.purge_savings(now // DAY_MS - self._savings_days + 1)
        if removed:
            self._metrics.purged_rows.inc(removed)
            log.info("retention removed %d rows", removed)
        return removed

    async def run_forever(self) -> None:
        await every(self._interval, self.run_once,
                    lambda exc: log.exception("retention purge failed; retrying next interval"))
