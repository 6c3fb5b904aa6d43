"""Shared fixtures: an in-process Simwire on loopback with a logged-in API client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from simwire.app import Simwire
from simwire.clock import ManualClock
from tests.support.devices import Device
from tests.support.mongo import drop_database, fresh_database_name, mongo_server, with_database
from tests.support.simwire import ADMIN_ID, ADMIN_SECRET, T0, Api, running


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB server for the session: SIMWIRE_TEST_MONGODB_URL, else SecantusDB."""
    yield from mongo_server(tmp_path_factory)


@pytest.fixture(params=["sqlite", "mongodb"])
async def store_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """Run a test on each store: `sqlite`, or a fresh MongoDB database (dropped after)."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    server: str = request.getfixturevalue("mongo_url")
    database = fresh_database_name()
    try:
        yield with_database(server, database)
    finally:
        await drop_database(server, database)


@pytest.fixture(autouse=True)
def _admin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMWIRE_ADMIN_CLIENT_ID", ADMIN_ID)
    monkeypatch.setenv("SIMWIRE_ADMIN_CLIENT_SECRET", ADMIN_SECRET)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Simwire]:
    async with running(tmp_path / "data") as instance:
        yield instance


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def api(app: Simwire, http: aiohttp.ClientSession) -> Api:
    return await Api.login(app, http)


@pytest.fixture
def clock() -> ManualClock:
    """A clock tests move by hand, starting at T0."""
    return ManualClock(T0)


@pytest.fixture
async def device(node: Simwire, api: Api) -> AsyncIterator[Device]:
    """UDP and CoAP uplinks from 127.0.0.1 (the module's `api` registers its SIM)."""
    d = await Device.open(node)
    yield d
    d.close()


@pytest.fixture
async def node(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Simwire]:
    """An in-process Simwire on SQLite driven by `clock`."""
    async with running(tmp_path / "d", clock=clock) as instance:
        yield instance
