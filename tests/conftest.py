"""Shared fixtures: an in-process Simwire on loopback with a logged-in API client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from simwire.app import Simwire
from tests.support.simwire import ADMIN_ID, ADMIN_SECRET, Api, running


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
