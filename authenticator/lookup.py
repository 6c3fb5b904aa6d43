"""Hot-path identification: source IP -> SIM, cached (Hono's Credentials API idea).

Called by integrator.pipeline for every uplink. A hit is a dict lookup; a miss costs one
indexed store read, and concurrent misses for the same IP share it. Management
(authenticator.management) invalidates entries it changes; entries also expire after
`ttl_s` so changes made by another process are seen within that time.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

from simwire.clock import Clock
from simwire.model import Sim
from simwire.ports import SimRepository


class SimLookup:
    def __init__(
        self, repo: SimRepository, clock: Clock, ttl_s: float = 30.0, max_entries: int = 200_000
    ) -> None:
        self._repo = repo
        self._clock = clock
        self._ttl = ttl_s
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[float, Sim | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Sim | None]] = {}
        self.publish: Callable[[tuple[str, ...]], object] | None = None
        """Tells the other worker processes about `invalidate` (simwire.app); they call
        `forget`."""

    def cached(self, ip: str) -> tuple[bool, Sim | None]:
        """(hit, sim) without awaiting: the pipeline's fast path."""
        entry = self._cache.get(ip)
        if entry is None or entry[0] < self._clock.monotonic():
            return False, None
        return True, entry[1]

    async def by_ip(self, ip: str) -> Sim | None:
        hit, sim = self.cached(ip)
        if hit:
            return sim
        pending = self._inflight.get(ip)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Sim | None] = asyncio.get_running_loop().create_future()
        self._inflight[ip] = fut
        try:
            sim = await self._repo.find_by_ip(ip)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise, nobody logs it as lost
            raise
        finally:
            self._inflight.pop(ip, None)
        self._remember(ip, sim)
        fut.set_result(sim)
        return sim

    def _remember(self, ip: str, sim: Sim | None) -> None:
        self._cache[ip] = (self._clock.monotonic() + self._ttl, sim)
        self._cache.move_to_end(ip)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)

    def invalidate(self, *ips: str) -> None:
        """Management calls this after changing or deleting a SIM (old and new IPs)."""
        self.forget(*ips)
        if self.publish is not None:
            self.publish(ips)

    def forget(self, *ips: str) -> None:
        """Drop cached entries (`invalidate` here, or another worker's)."""
        for ip in ips:
            self._cache.pop(ip, None)
