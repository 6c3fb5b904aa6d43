"""A MongoDB for tests: `SIMWIRE_TEST_MONGODB_URL` when set, else a SecantusDB server.

Reuse from any test package's conftest:

    @pytest.fixture(scope="session")
    def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
        yield from mongo_server(tmp_path_factory)

and give each test its own database (`with_database(url, fresh_database_name())`), dropped
afterwards with `drop_database`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from pymongo import AsyncMongoClient

from tests.support.net import free_port

ENV_URL = "SIMWIRE_TEST_MONGODB_URL"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0

_servers: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}


def secantus_binary() -> Path:
    """`secantusd-py`, installed in the venv next to the running interpreter."""
    return Path(sys.executable).parent / "secantusd-py"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_secantus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Start a SecantusDB server on a free loopback port; returns its `mongodb://` URL.

    Stop it with `stop_secantus(url)`. Retries on another port if the server dies before it
    accepts connections (the free port may have been taken in between)."""
    binary = secantus_binary()
    if not binary.exists():
        pytest.fail(f"{binary} not found: install the test extra (secantusdb)")
    errors: list[str] = []
    for _attempt in range(3):
        port = free_port()
        workdir = tmp_path_factory.mktemp("secantus")
        log_path = workdir / "secantusd.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [str(binary), "--host", "127.0.0.1", "--port", str(port),
                 "--storage-path", str(workdir / "data"), "--log-level", "WARNING"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=workdir,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _accepts(port):
                url = f"mongodb://127.0.0.1:{port}"
                _servers[url] = (proc, log_path)
                return url
            time.sleep(0.05)
        _stop(proc)
        errors.append(f"port {port}: exit {proc.returncode}: "
                      f"{log_path.read_text(errors='replace')[-2000:]}")
    raise RuntimeError("secantusd-py did not start:\n" + "\n".join(errors))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_secantus(url: str) -> None:
    """Terminate the server `start_secantus` returned `url` for and wait for it."""
    proc, _log = _servers.pop(url)
    _stop(proc)


def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The body of a session fixture: yields a server URL (no database in its path)."""
    external = os.environ.get(ENV_URL)
    if external:
        yield external
        return
    url = start_secantus(tmp_path_factory)
    try:
        yield url
    finally:
        stop_secantus(url)


def fresh_database_name() -> str:
    return f"simwire_test_{uuid.uuid4().hex}"


def with_database(url: str, database: str) -> str:
    """`url` with its path (the database) replaced, options kept."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def drop_database(url: str, database: str) -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(url)
    try:
        await client.drop_database(database)
    finally:
        await client.close()
