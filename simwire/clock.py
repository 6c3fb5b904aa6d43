"""Injectable clock: retention, retry schedules and lifetimes read time only through it."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock source. Called on hot paths: must be cheap and never block."""

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a monotonic scale (timeouts, dedup lifetimes)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on this clock (retry schedules, lifetimes)."""
        ...


class SystemClock:
    """The real clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told to; tests use it instead of sleeping."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._ms = start_ms
        self._mono = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now_ms(self) -> int:
        return self._ms

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        """Returns when `advance` has moved the clock `seconds` on (yields at least once)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self._mono + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    @property
    def sleeping(self) -> list[float]:
        """Seconds left of each pending `sleep`, shortest first (tests wait on this)."""
        return sorted(deadline - self._mono for deadline, fut in self._sleepers
                      if not fut.done())

    def advance(self, seconds: float) -> None:
        """Move time on; wakes the sleeps that are due (call on the sleepers' loop)."""
        self._ms += round(seconds * 1000)
        self._mono += seconds
        for deadline, fut in self._sleepers:
            if deadline <= self._mono + 1e-9 and not fut.done():
                fut.set_result(None)
