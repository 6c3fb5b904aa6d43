"""A real aiohttp HTTPS webhook receiver on 127.0.0.1 (certificate from tests.support.pki).

It records every request and answers according to a script of behaviours: by default 200;
`fail_next(n, status)`, `fail_always(status)`, `hang()` (never answers: the sender's
timeout), `slow(seconds)` change that. Used by the integrator webhook tests and the bench.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support.pki import Pki


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.accepted: list[Received] = []
        self.status = 200
        self._failures: list[int] = []
        self.delay_s = 0.0
        self.hanging = False
        self.port = 0
        self.scheme = "https"
        self._arrived = asyncio.Event()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def fail_next(self, n: int, status: int = 500) -> None:
        self._failures += [status] * n

    def fail_always(self, status: int = 503) -> None:
        self.status = status

    def recover(self) -> None:
        self.status, self._failures, self.hanging, self.delay_s = 200, [], False, 0.0

    def hang(self) -> None:
        self.hanging = True

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Until `n` requests were accepted (2xx); returns them."""
        return await self._until(self.accepted, n, timeout)

    async def wait_requests(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Until `n` requests arrived (any answer)."""
        return await self._until(self.requests, n, timeout)

    async def _until(self, seen: list[Received], n: int, timeout: float) -> list[Received]:
        async def grown() -> None:
            while len(seen) < n:
                self._arrived.clear()
                await self._arrived.wait()
        await asyncio.wait_for(grown(), timeout)
        return seen[:n]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        got = Received(request.method, request.path, dict(request.query),
                       dict(request.headers), body)
        self.requests.append(got)
        self._arrived.set()
        if self.hanging:
            await asyncio.sleep(3600)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self._failures.pop(0) if self._failures else self.status
        if 200 <= status < 300:
            self.accepted.append(got)
            self._arrived.set()
        return web.Response(status=status, text="ok" if status < 300 else "nope")


@asynccontextmanager
async def receiver(pki: Pki | None) -> AsyncIterator[Receiver]:
    """Serve on a free port; HTTPS with the PKI's server certificate, plain HTTP if None."""
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    ctx = pki.server_ssl_context() if pki is not None else None
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    rec.port = runner.addresses[0][1]
    rec.scheme = "https" if ctx is not None else "http"
    try:
        yield rec
    finally:
        await runner.cleanup()
