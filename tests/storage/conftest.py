"""The `store` fixture: every contract test runs against each adapter.

MongoDB comes from `SIMWIRE_TEST_MONGODB_URL` when set, else from a SecantusDB server started
once per session (tests.support.mongo). Each MongoDB test gets a fresh database, dropped
afterwards; each SQLite test a fresh file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from simwire.ports import Store
from simwire.storage.mongodb import MongoStore
from simwire.storage.sqlite import SqliteStore
from tests.support.mongo import drop_database, fresh_database_name, with_database

StoreOpener = Callable[[], Awaitable[Store]]
"""Opens another store on the same file / database as the test's `store`."""


@pytest.fixture(params=["sqlite", "mongodb"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreOpener]:
    opened: list[Store] = []
    if request.param == "sqlite":
        path = tmp_path / "simwire.db"

        async def opener() -> Store:
            store = await SqliteStore(path).open()
            opened.append(store)
            return store

        yield opener
        for store in opened:
            await store.close()
        return

    server: str = request.getfixturevalue("mongo_url")
    database = fresh_database_name()
    url = with_database(server, database)

    async def mongo_opener() -> Store:
        store = await MongoStore(url).open()
        opened.append(store)
        return store

    try:
        yield mongo_opener
    finally:
        for store in opened:
            await store.close()
        await drop_database(server, database)


@pytest.fixture
async def store(open_store: StoreOpener) -> Store:
    return await open_store()
