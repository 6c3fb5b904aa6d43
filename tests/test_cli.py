"""`simwire serve` as a process: flags, SIGTERM, restart on the same data dir, config."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest

from simwire.config import Config, load_config
from tests.support.net import UdpClient
from tests.support.serve import clean_env, created, start, stop, token

ICCID = "8988280666000000081"


async def test_serve_restart_keeps_everything(tmp_path: Path) -> None:
    env = clean_env()
    data = tmp_path / "data"
    proc, ports, printed = await start(data, env)
    try:
        # a new store without SIMWIRE_ADMIN_* prints a generated admin secret once
        creds = next(line for line in printed.splitlines() if "client_secret=" in line)
        cid = creds.split("client_id=")[1].split()[0]
        secret = creds.split("client_secret=")[1].split()[0]
        async with aiohttp.ClientSession() as http:
            bearer = {"Authorization": f"Bearer {await token(http, ports['http'], cid, secret)}"}
            await created(http, f"http://127.0.0.1:{ports['http']}/v1/sims", bearer,
                          {"iccid": ICCID, "imsi": "901405100000081", "ip": "127.0.0.1"})
            dev = await UdpClient.open(("127.0.0.1", ports["coap"]))
            reply = await dev.request(bytes.fromhex("40020001d602743d74657374ff016354322e322e31"))
            dev.close()
            assert reply == bytes.fromhex("60440001")
    finally:
        assert await stop(proc) == 0
    proc, ports, printed = await start(data, env)
    try:
        assert "client_secret=" not in printed
        async with aiohttp.ClientSession() as http:
            bearer = {"Authorization": f"Bearer {await token(http, ports['http'], cid, secret)}"}
            async with http.get(f"http://127.0.0.1:{ports['http']}/v1/inspect/devices/"
                                f"{ICCID}/history", headers=bearer) as r:
                body = await r.json()
            assert [(i["payload"], i["topic"]) for i in body["items"]] == [("AWNUMi4yLjE=", "test")]
    finally:
        assert await stop(proc) == 0


async def test_serve_reports_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('udp_port = "many"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simwire.cli", "serve", "--config", str(bad),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "udp_port must be int" in err.decode()


def test_config_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "simwire.toml"
    toml.write_text('[simwire]\nudp_port = 1000\ncoap_port = 2000\nhttp_port = 3000\n'
                    'data_dir = "/var/lib/simwire"\n')
    cfg = load_config(toml, env={"SIMWIRE_COAP_PORT": "2001", "SIMWIRE_HTTP_PORT": "3001"},
                      flags={"http_port": 3002, "host": None})
    assert (cfg.udp_port, cfg.coap_port, cfg.http_port) == (1000, 2001, 3002)
    assert cfg.data_dir == Path("/var/lib/simwire") and cfg.host == Config().host
    defaults = load_config(env={})
    assert (defaults.udp_port, defaults.coap_port, defaults.http_port) == (4445, 5683, 8080)
    with pytest.raises(ValueError, match="unknown setting 'colour'"):
        load_config(env={}, flags={"colour": "red"})


def test_serve_flags_reach_the_config() -> None:
    """Every `serve` flag is a setting (the LwM2M port flags once were parsed and dropped)."""
    from simwire import cli

    args = cli.build_parser().parse_args([
        "serve", "--workers", "3", "--lwm2m-port", "15683", "--lwm2m-coaps-port", "15684",
        "--lwm2m-bootstrap-port", "15685", "--lwm2m-bootstrap-coaps-port", "15686"])
    cfg = cli.serve_config(args)
    assert (cfg.workers, cfg.lwm2m_port, cfg.lwm2m_coaps_port, cfg.lwm2m_bootstrap_port,
            cfg.lwm2m_bootstrap_coaps_port) == (3, 15683, 15684, 15685, 15686)
    with pytest.raises(ValueError, match=r"workers: must be 1\.\.64, got 0"):
        load_config(env={"SIMWIRE_WORKERS": "0"})
    assert not load_config(env={"SIMWIRE_LEADER": "false"}).leader
