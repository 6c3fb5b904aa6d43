"""Leadership: which process runs the once-per-deployment duties (outbox delivery,
retention, ending interrupted PSK jobs) — the holder of the store's `leader` lease.

simwire.app creates one `Leadership` in every process allowed to lead (`Config.leader`,
and worker 0 of `--workers N`); all of them contend for the same lease in the shared store,
so when the leader dies (or loses the store) another machine takes over by itself.

- `start()` tries once before returning, so a lone process leads before it serves; then
  every `ttl / 3` (real time, like the other loops that look for other processes' work)
  `attempt()` renews (the holder) or tries (the others). The lease's end and the holder's
  deadline are read from the injectable clock.
- A holder that could not renew for `ttl - interval` steps down (`on_loss`) before its
  lease runs out in the store; a contender takes the lease only once it has run out. With
  clocks that agree, the two never lead at once; clock skew between machines shortens that
  margin (delivery is at least once anyway, with the event id as the idempotency key).
- `stop()` steps down and releases the lease, so a clean shutdown hands over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable

from simwire.clock import Clock
from simwire.logs import RateLimitedLogger
from simwire.ports import LeaseRepository
from simwire.tasks import cancel

log = logging.getLogger("simwire.leadership")

LEASE = "leader"
DEFAULT_TTL_S = 15.0


def holder_id() -> str:
    """This process, as the lease names it: host, pid and a random part (pids repeat)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leadership:
    """Holds or waits for the `leader` lease; calls `on_gain`/`on_loss` on each change."""

    def __init__(
        self, leases: LeaseRepository, clock: Clock, on_gain: Callable[[], Awaitable[None]],
        on_loss: Callable[[], Awaitable[None]], ttl_s: float = DEFAULT_TTL_S,
        holder: str | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("leader lease: ttl must be positive")
        self._leases = leases
        self._clock = clock
        self._on_gain = on_gain
        self._on_loss = on_loss
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / 3
        self.holder = holder or holder_id()
        self.leading = False
        self._renewed = 0.0
        """`clock.monotonic()` of the last renewal that succeeded."""
        self._task: asyncio.Task[None] | None = None
        self._warn = RateLimitedLogger(log)

    async def start(self) -> None:
        await self.attempt()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="leadership")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
        if self.leading:
            await self._step_down("shutting down", logging.INFO)
            try:
                await self._leases.release_lease(LEASE, self.holder)
            except Exception as exc:  # the lease then runs out by itself
                log.warning("could not release the leader lease: %s", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.attempt()

    async def attempt(self) -> None:
        """One renewal (holder) or try (the others); never raises. The loop calls it every
        `interval_s`; tests call it after moving a manual clock."""
        now = self._clock.monotonic()
        try:
            held = await self._leases.acquire_lease(
                LEASE, self.holder, self._clock.now_ms(), round(self.ttl_s * 1000))
        except Exception as exc:
            self._warn.warning("lease", "leader lease: the store failed: %s", exc)
            if self.leading and now - self._renewed >= self.ttl_s - self.interval_s:
                await self._step_down("could not renew the lease in time")
            return
        if held:
            self._renewed = now
            if not self.leading:
                self.leading = True
                log.info("leader: this process (%s) took the leader lease", self.holder)
                try:
                    await self._on_gain()
                except Exception:
                    # e.g. the store failed while the dispatcher read the integrations: let
                    # go, so this process (next attempt) or another one starts them afresh
                    log.exception("leader: starting the leader's duties failed")
                    await self._step_down("its duties failed to start")
                    with contextlib.suppress(Exception):
                        await self._leases.release_lease(LEASE, self.holder)
        elif self.leading:
            await self._step_down("another process holds the lease")

    async def _step_down(self, why: str, level: int = logging.WARNING) -> None:
        self.leading = False
        log.log(level, "leader: %s no longer leads: %s", self.holder, why)
        try:
            await self._on_loss()
        except Exception:
            log.exception("leader: stopping the leader's duties failed")
