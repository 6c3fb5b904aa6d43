"""Run Simwire in-process on loopback (real sockets, real store) and talk to its API."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from simwire.app import Simwire
from simwire.clock import Clock
from simwire.config import Config
from simwire.ports import Translator

ADMIN_ID = "test-admin"
ADMIN_SECRET = "test-admin-secret-0123456789"
T0 = 1_767_225_600_000
"""2026-01-01T00:00:00Z: where the shared `clock` fixture starts."""


@asynccontextmanager
async def running(
    data_dir: Path, store: str = "sqlite", clock: Clock | None = None,
    translator: Translator | None = None, **overrides: Any,
) -> AsyncIterator[Simwire]:
    cfg = Config(
        host="127.0.0.1", udp_port=0, coap_port=0, coaps_port=0, http_port=0, data_dir=data_dir,
        store=store,
        sim_cache_ttl_s=0.0, **overrides,
    )
    app = Simwire(cfg, clock=clock, translator=translator)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


class Api:
    """A management-API client holding a bearer token."""

    def __init__(self, base: str, session: aiohttp.ClientSession, token: str | None) -> None:
        self.base = base
        self.session = session
        self.token = token

    @classmethod
    async def login(cls, app: Simwire, session: aiohttp.ClientSession,
                    client_id: str = ADMIN_ID, secret: str = ADMIN_SECRET) -> Api:
        base = f"http://127.0.0.1:{app.ports.http}"
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        async with session.post(f"{base}/oauth/token", json={"grant_type": "client_credentials"},
                                headers={"Authorization": f"Basic {basic}"}) as r:
            body = await r.json()
            assert r.status == 200, body
        return cls(base, session, body["access_token"])

    async def add_sim(self, iccid: str, imsi: str, ip: str, **fields: Any) -> dict[str, Any]:
        """`POST /v1/sims` for a test's setup; asserts 201 and returns the SIM."""
        status, body = await self.call("POST", "/v1/sims",
                                       {"iccid": iccid, "imsi": imsi, "ip": ip, **fields})
        assert status == 201, body
        return dict(body)

    async def call(self, method: str, path: str, json: Any = None,
                   params: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if self.token is not None:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        async with self.session.request(method, self.base + path, json=json, params=params,
                                        headers=hdrs) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()


def envelopes(app: Simwire) -> list[dict[str, Any]]:
    """Every event envelope in an SQLite-backed instance's store, in commit order."""
    db = sqlite3.connect(app.config.data_dir / "simwire.db")
    try:
        rows = db.execute("SELECT envelope FROM events ORDER BY seq").fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


async def eventually(check: Any, timeout: float = 5.0) -> Any:
    """Poll a predicate (sync or async) until it returns a truthy value; returns it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(0.02)
