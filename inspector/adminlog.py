"""Admin-log writer: batches entries off the hot path and rate-limits floods per key.

Endpoints and the pipeline call `add()` (never blocks, never raises); a background task
flushes to the store every `flush_interval_s`. Unknown-device floods therefore cost one
stored entry per (message, ip) per `per_key_interval_s`, and a dict update otherwise.
"""

from __future__ import annotations

import asyncio
import logging

from simwire.clock import Clock
from simwire.metrics import Metrics
from simwire.model import AdminLog, LogCategory, LogType, new_trace_id
from simwire.ports import AdminLogRepository
from simwire.tasks import cancel

log = logging.getLogger("simwire.inspector.adminlog")


class AdminLogWriter:
    def __init__(
        self,
        repo: AdminLogRepository,
        clock: Clock,
        metrics: Metrics,
        per_key_interval_s: float = 60.0,
        flush_interval_s: float = 0.5,
        max_pending: int = 10_000,
    ) -> None:
        self._repo = repo
        self._clock = clock
        self._metrics = metrics
        self._per_key = per_key_interval_s
        self._flush_interval = flush_interval_s
        self._max_pending = max_pending
        self._pending: list[AdminLog] = []
        self._last: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def add(
        self,
        org: str,
        type: LogType,
        category: LogCategory,
        message: str,
        description: str,
        *,
        iccid: str | None = None,
        imsi: str | None = None,
        ip: str | None = None,
        rate_key: str | None = None,
    ) -> None:
        """Queue one entry; with `rate_key`, at most one per key per interval is kept."""
        now = self._clock.monotonic()
        if rate_key is not None:
            last = self._last.get(rate_key)
            if last is not None and now - last < self._per_key:
                self._metrics.admin_logs_dropped.inc()
                return
            if len(self._last) > 100_000:
                self._last.clear()
            self._last[rate_key] = now
        if len(self._pending) >= self._max_pending:
            self._metrics.admin_logs_dropped.inc()
            return
        ms = self._clock.now_ms()
        self._pending.append(
            AdminLog(
                id=new_trace_id(ms), timestamp_ms=ms, org=org, type=type, category=category,
                message=message, description=description, trace_id=new_trace_id(ms),
                iccid=iccid, imsi=imsi, ip=ip,
            )
        )

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            try:
                await self._repo.append_logs(batch)
            except Exception:
                log.exception("could not store %d admin log entries", len(batch))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="admin-log-writer")

    async def stop(self) -> None:
        await cancel(self._task)
        await self.flush()
