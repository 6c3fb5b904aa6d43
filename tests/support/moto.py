"""A real `moto_server` (AWS mock) for tests, and what it received.

Reuse from any test package's conftest:

    @pytest.fixture(scope="session")
    def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
        yield from moto_server(tmp_path_factory)

and call `reset(url)` at the start of each test. Point boto3 clients at `url` (any region,
dummy keys: moto's server mode does not check signatures).

Reading back `iot-data publish`: moto keeps published messages in its iot-data backend
(`published_payloads`), but server mode exposes no endpoint for it (`/moto-api/data.json`
lists model instances only: things, certificates, policies, assumed roles, endpoints...).
The server is therefore started with moto's request recorder on (`MOTO_ENABLE_RECORDING`),
and `published(url)` reads `GET /moto-api/recorder/download-recording`: every request moto
received, with its headers and body, from which the `iot-data` publishes (`POST
/topics/{topic}`, signed for service `iotdata`) are decoded exactly as moto's publish handler
does (percent-decoded topic, raw body).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from tests.support.net import free_port

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0


def moto_binary() -> Path:
    """`moto_server`, installed in the venv next to the running interpreter."""
    return Path(sys.executable).parent / "moto_server"


@dataclass(frozen=True, slots=True)
class MotoServer:
    """A running `moto_server` process (`start_moto` returns it, `stop` ends it)."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=0.5) as r:
            r.read()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer will do
    except OSError:
        return False


def start_moto(tmp_path_factory: pytest.TempPathFactory) -> MotoServer:
    """Start `moto_server -H 127.0.0.1 -p PORT` with the request recorder on.

    Retries on another port if the server exits before it answers HTTP (the free port may
    have been taken in between)."""
    binary = moto_binary()
    if not binary.exists():
        pytest.fail(f"{binary} not found: install the test extra (moto[server])")
    errors: list[str] = []
    for _attempt in range(3):
        port = free_port()
        workdir = tmp_path_factory.mktemp("moto")
        log_path = workdir / "moto_server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        env.update(MOTO_ENABLE_RECORDING="true",
                   MOTO_RECORDER_FILEPATH=str(workdir / "recording.jsonl"))
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [str(binary), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=workdir, env=env,
            )
        server = MotoServer(f"http://127.0.0.1:{port}", proc, log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(server.url):
                return server
            time.sleep(0.1)
        server.stop()
        errors.append(f"port {port}: exit {proc.returncode}: "
                      f"{log_path.read_text(errors='replace')[-2000:]}")
    raise RuntimeError("moto_server did not start:\n" + "\n".join(errors))


def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The body of a session fixture: yields the server's base URL, stops it afterwards."""
    server = start_moto(tmp_path_factory)
    try:
        yield server.url
    finally:
        server.stop()


def _post(url: str) -> None:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
        r.read()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
        return bytes(r.read())


def reset(url: str) -> None:
    """Forget all AWS state (`POST /moto-api/reset`) and the requests recorded so far."""
    _post(f"{url}/moto-api/reset")
    _post(f"{url}/moto-api/recorder/reset-recording")


def state(url: str) -> dict[str, Any]:
    """`/moto-api/data.json`: {service: {model class: [instance attributes]}}."""
    data: dict[str, Any] = json.loads(_get(f"{url}/moto-api/data.json"))
    return data


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request moto received, as its recorder logged it."""

    method: str
    path: str
    """Raw (percent-encoded) path."""
    query: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)

    def _credential_scope(self) -> list[str]:
        """`AKID/date/region/service/aws4_request` of a SigV4 Authorization header."""
        auth = self.header("Authorization") or ""
        for part in auth.replace(",", " ").split():
            if part.startswith("Credential="):
                return part.removeprefix("Credential=").split("/")
        return []

    @property
    def service(self) -> str | None:
        scope = self._credential_scope()
        return scope[3] if len(scope) == 5 else None

    @property
    def access_key_id(self) -> str | None:
        scope = self._credential_scope()
        return scope[0] if scope else None


def recorded_requests(url: str) -> list[RecordedRequest]:
    """Every AWS request moto received since the last `reset`, in arrival order (requests to
    `/moto-api/` itself left out)."""
    out: list[RecordedRequest] = []
    for line in _get(f"{url}/moto-api/recorder/download-recording").decode().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        body_field = entry.get("body") or ""
        body = (base64.b64decode(body_field) if entry.get("body_encoded")
                else body_field.encode())
        parts = urlsplit(entry["url"])
        if parts.path.startswith("/moto-api/"):
            continue
        out.append(RecordedRequest(entry["method"], parts.path, parts.query,
                                   dict(entry.get("headers") or {}), body))
    return out


def published(url: str) -> list[tuple[str, bytes]]:
    """(topic, payload) of every `iot-data publish` moto received, in arrival order."""
    return [(unquote(r.path.removeprefix("/topics/")), r.body)
            for r in publish_requests(url)]


def publish_requests(url: str) -> list[RecordedRequest]:
    """The `iot-data publish` requests among `recorded_requests(url)`."""
    return [r for r in recorded_requests(url)
            if r.method == "POST" and r.service == "iotdata" and r.path.startswith("/topics/")]
