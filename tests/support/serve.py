"""`simwire serve` as a child process on free loopback ports (CLI and crash tests)."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.net import free_port


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without SIMWIRE_* settings, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMWIRE_")}
    env.update(settings)
    return env


async def start(data_dir: Path, env: dict[str, str], *extra: str
                ) -> tuple[asyncio.subprocess.Process, dict[str, int], str]:
    """Start (`extra`: more `serve` flags) and wait for its ready line; returns (process,
    ports, what it printed)."""
    ports = {"udp": free_port(2), "coap": free_port(2), "coaps": free_port(2),
             "http": free_port()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simwire.cli", "serve", "--data-dir", str(data_dir),
        "--host", "127.0.0.1", "--udp-port", str(ports["udp"]),
        "--coap-port", str(ports["coap"]), "--coaps-port", str(ports["coaps"]),
        "--http-port", str(ports["http"]), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    assert proc.stdout is not None
    printed = ""
    while "simwire ready" not in printed:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line:
            err = await proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"simwire exited: {err.decode()}")
        printed += line.decode()
    return proc, ports, printed


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 30)


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.kill()
    await asyncio.wait_for(proc.wait(), 30)


async def token(http: aiohttp.ClientSession, port: int, cid: str, secret: str) -> str:
    basic = base64.b64encode(f"{cid}:{secret}".encode()).decode()
    async with http.post(f"http://127.0.0.1:{port}/oauth/token",
                         json={"grant_type": "client_credentials"},
                         headers={"Authorization": f"Basic {basic}"}) as r:
        assert r.status == 200
        return str((await r.json())["access_token"])


async def created(http: aiohttp.ClientSession, url: str, bearer: dict[str, str],
                  body: Any) -> Any:
    """POST `body` (JSON) to a running server's API; it must answer 201 Created. Returns
    the created resource."""
    async with http.post(url, headers=bearer, json=body) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def telemetry_webhook(http: aiohttp.ClientSession, base: str, bearer: dict[str, str],
                            name: str, url: str) -> Any:
    """Create a webhook integration sending TELEMETRY_DATA events to `url` (a test
    receiver) through the API at `base`."""
    return await created(http, f"{base}/v1/integrate/clouds/webhooks", bearer, {
        "name": name, "url": url, "headers": {}, "eventTypes": [{"type": "TELEMETRY_DATA"}]})
