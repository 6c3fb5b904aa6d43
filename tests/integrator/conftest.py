"""Fixtures shared by the integrator tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.moto import moto_server


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `moto_server` on loopback for the session; `tests.support.moto.reset` it per
    test."""
    yield from moto_server(tmp_path_factory)
