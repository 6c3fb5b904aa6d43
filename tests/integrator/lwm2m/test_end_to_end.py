"""LwM2M end to end, as a device lives it: bootstrap, register with the server the bootstrap
wrote (its URI and key), the server reads /3/0 and observes /3/0/9, a notification becomes
an event in history. Plain CoAP with the aiocoap client of sdk_examples, DTLS with the
scripted mbedtls device; on the shared CoAP ports, on LwM2M ports of their own, and with
the server and the bootstrap server sharing one port of their own (ADR 0008)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from integrator import coap
from integrator.lwm2m.formats import ContentFormat, Record, encode
from integrator.lwm2m.objects import Registry
from sdk_examples.lwm2m_client import Lwm2mClient
from simwire.app import Simwire
from tests.support.dtls import Client as DtlsClient
from tests.support.lwm2m import DtlsDevice, UdpDevice, history_values
from tests.support.net import free_port
from tests.support.simwire import Api, eventually, running

ICCID, IP = "8988280666000000431", "127.0.0.61"
TLV = ContentFormat.TLV
REGISTRY = Registry.default()
OWN_PORTS = ["own ports", "one lwm2m port"]
LAYOUTS = ["shared", *OWN_PORTS]


@pytest.fixture(params=LAYOUTS)
async def node(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Simwire]:
    ports: dict[str, Any] = {}
    if request.param == "own ports":  # four ports of their own, chosen by the kernel
        ports = {"lwm2m_port": 0, "lwm2m_coaps_port": 0, "lwm2m_bootstrap_port": 0,
                 "lwm2m_bootstrap_coaps_port": 0}
    elif request.param == "one lwm2m port":  # like lwm2m.os.1nce.com: /bs and /rd on one
        plain, secure = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
        ports = {"lwm2m_port": plain, "lwm2m_bootstrap_port": plain,
                 "lwm2m_coaps_port": secure, "lwm2m_bootstrap_coaps_port": secure}
    async with running(tmp_path / "d", **ports) as app:
        yield app


@pytest.fixture
async def api(node: Simwire, http: aiohttp.ClientSession) -> Api:
    client = await Api.login(node, http)
    await client.add_sim(ICCID, "901405100000431", IP)
    return client


def port_of(uri: Any) -> int:
    port = urlsplit(str(uri)).port
    assert port is not None
    return port


async def test_plain_bootstrap_register_read_observe_notify(node: Simwire, api: Api) -> None:
    ports = node.ports
    async with Lwm2mClient(ICCID, ("127.0.0.1", 9), bind=(IP, 0)) as device:
        assert await device.bootstrap(("127.0.0.1", ports.lwm2m_bootstrap)) == "2.04"
        account = device.server_account()
        assert account is not None
        assert (account["0"], account["2"], account["3"], account["10"]) == (
            f"coap://127.0.0.1:{ports.lwm2m}", 3, ICCID.encode(), 1111)
        assert device.server == ("127.0.0.1", ports.lwm2m) and device.lifetime == 86400
        assert device.values["/0/1/0"] == f"coap://127.0.0.1:{ports.lwm2m_bootstrap}"

        assert await device.register() == "2.01"
        assert "</0/" not in device.links()  # Security is never registered
        res = await node.lwm2m.read(ICCID, "/3/0")
        assert res.value is not None and res.value["/3/0/9"] == 77
        res = await node.lwm2m.observe(ICCID, "/3/0/9")
        assert res.value == {"/3/0/9": 77}
        device.set("/3/0/9", 42)
        got = await eventually(lambda: history_values(api, ICCID, 3))
        assert {"/3/0/9": 42} in got and {"/3/0/9": 77} in got
        assert any(v.get("/3/0/0") == "Simwire" for v in got)  # the read of /3/0


async def test_dtls_bootstrap_register_read_observe_notify(node: Simwire, api: Api) -> None:
    """The device holds the key it bootstraps with: its COAP key on the shared CoAPs port,
    the LWM2M key a user set (1NCE's bootstrap PSK) on LwM2M ports of their own."""
    ports = node.ports
    shared = ports.lwm2m_bootstrap_coaps == ports.coaps
    protocol, key = ("COAP", b"coap-dtls-key-1") if shared else ("LWM2M", b"Bootstrap-Key-7")
    status, body = await api.call("POST", f"/v1/integrate/devices/{ICCID}/psk", {
        "secretKey": key.decode(), "protocol": protocol})
    assert status == 200, body

    bs = await DtlsDevice.open(ports.lwm2m_bootstrap_coaps, ICCID, key, IP)
    try:
        assert (await bs.bootstrap_request(f"ep={ICCID}")).code == coap.CHANGED
        writes = await bs.serve()
    finally:
        bs.close()
    security = writes[2].values()
    assert security["/0/0/0"] == f"coaps://127.0.0.1:{ports.lwm2m_coaps}"
    assert (security["/0/0/2"], security["/0/0/3"]) == (0, ICCID.encode())
    assert security["/0/0/5"] == key  # the server's port checks this key for the device
    assert writes[3].values()["/0/1/0"] == f"coaps://127.0.0.1:{ports.lwm2m_bootstrap_coaps}"

    dev = await DtlsDevice.open(port_of(security["/0/0/0"]), ICCID, key, IP)
    try:
        assert (await dev.register(ICCID, b"</3/0>")).code == coap.CREATED
        read = asyncio.create_task(node.lwm2m.read(ICCID, "/3/0"))
        req = await dev.request()
        assert (req.code, req.opt(coap.OPT_ACCEPT)) == (coap.GET, coap.uint_option(TLV))
        dev.answer(req, coap.CONTENT, encode(TLV, [Record("/3/0/0", "Simwire"),
                                                   Record("/3/0/9", 77)], "/3/0", REGISTRY),
                   [(coap.OPT_CONTENT_FORMAT, coap.uint_option(TLV))])
        assert (await read).value == {"/3/0/0": "Simwire", "/3/0/9": 77}

        observe = asyncio.create_task(node.lwm2m.observe(ICCID, "/3/0/9"))
        req = await dev.request()
        assert req.opt(coap.OPT_OBSERVE) == b""  # Observe: 0 (register)
        dev.answer(req, coap.CONTENT, encode(TLV, [Record("/3/0/9", 77)], "/3/0/9", REGISTRY),
                   [(coap.OPT_OBSERVE, coap.uint_option(1)),
                    (coap.OPT_CONTENT_FORMAT, coap.uint_option(TLV))])
        assert (await observe).value == {"/3/0/9": 77}
        dev.notify(req.token, 2, encode(TLV, [Record("/3/0/9", 42)], "/3/0/9", REGISTRY), TLV)
        got = await eventually(lambda: history_values(api, ICCID, 3))
        assert {"/3/0/9": 42} in got and {"/3/0/0": "Simwire", "/3/0/9": 77} in got
    finally:
        dev.close()
    reg = node.lwm2m.registration(ICCID)
    assert reg is not None and reg.secure


@pytest.mark.parametrize("node", OWN_PORTS, indirect=True)
async def test_ports_of_their_own_serve_only_lwm2m(node: Simwire, api: Api) -> None:
    ports = node.ports
    on_coap = await UdpDevice.open(ports.coap, IP)
    on_lwm2m = await UdpDevice.open(ports.lwm2m, IP)
    try:
        # /rd and /bs moved: 4.04 on the CoAP port, which still ingests
        assert (await on_coap.register(ICCID)).code == coap.NOT_FOUND
        assert (await on_coap.bootstrap_request(f"ep={ICCID}")).code == coap.NOT_FOUND
        # no CoAP ingest (nor /bootstrap) on a LwM2M port
        assert (await on_lwm2m.call(coap.POST, b"data", payload=b"telemetry")).code == \
            coap.NOT_FOUND
        assert (await on_lwm2m.call(coap.GET, b"bootstrap")).code == coap.NOT_FOUND
        assert (await on_lwm2m.register(ICCID)).code == coap.CREATED
    finally:
        on_coap.close()
        on_lwm2m.close()
    assert await history_values(api, ICCID, 1) is None  # nothing was ingested


@pytest.mark.parametrize("node", OWN_PORTS, indirect=True)
async def test_dtls_ports_check_their_own_keys(node: Simwire, api: Api) -> None:
    """A COAP key opens the CoAPs port only; a generated LWM2M key (written by a plain
    bootstrap) opens a LwM2M server port but never a bootstrap-only port."""
    ports = node.ports
    status, _ = await api.call("POST", f"/v1/integrate/devices/{ICCID}/psk", {
        "secretKey": "coap-only-key-1", "protocol": "COAP"})
    assert status == 200

    async def handshake(port: int, key: bytes) -> bool:
        client = await DtlsClient.open(port, ICCID, key, local=(IP, 0))
        try:
            await client.handshake(timeout=2.0)
            return True
        except Exception:  # a timeout or a fatal alert: no session
            return False
        finally:
            client.close()

    assert await handshake(ports.coaps, b"coap-only-key-1")
    assert not await handshake(ports.lwm2m_coaps, b"coap-only-key-1")
    async with Lwm2mClient(ICCID, ("127.0.0.1", 9), bind=(IP, 0)) as device:
        assert await device.bootstrap(("127.0.0.1", ports.lwm2m_bootstrap)) == "2.04"
        account = device.server_account()
    assert account is not None and isinstance(account["5"], bytes)
    generated = account["5"]
    status, body = await api.call("GET", f"/v1/integrate/devices/{ICCID}/psk/LWM2M")
    assert status == 200 and body["secretKey"].encode() == generated
    assert await handshake(ports.lwm2m_coaps, generated)
    assert await handshake(ports.lwm2m_bootstrap_coaps, generated) is (
        ports.lwm2m_bootstrap_coaps == ports.lwm2m_coaps)
