"""LwM2M bootstrap server (spec section 1.6, OMA LwM2M 1.1 Core 6.1) over real sockets.

GIVEN an in-process Simwire and SIMs on 127.0.0.x WHEN a scripted LwM2M client sends
`POST /bs?ep=<ICCID>` (plain CoAP or DTLS) and answers the server's requests THEN it gets
2.04, then Bootstrap-Delete /0 and /1, Bootstrap-Write /0/0, /0/1, /1/0 with the values 1NCE
documents and Bootstrap-Finish, in that order, in the format the client prefers; the
LwM2M-server key is fresh on every bootstrap and is the device's LWM2M key; refusals and
failures are answered, counted and admin-logged; a duplicate request does not restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from authenticator.psk import KeyRole
from integrator import coap
from integrator.lwm2m.bootstrap import Uris, _route_source
from integrator.lwm2m.formats import ContentFormat, Value
from simwire.app import Simwire
from simwire.clock import ManualClock
from simwire.model import Sim, SimStatus
from tests.support.lwm2m import DtlsDevice, Seen, UdpDevice, default_answer
from tests.support.simwire import Api, eventually, running

ICCID = "8988280666000000411"
IP = "127.0.0.41"
DISABLED_ICCID, DISABLED_IP = "8988280666000000412", "127.0.0.42"
OTHER_ICCID, OTHER_IP = "8988280666000000413", "127.0.0.43"
UNKNOWN_IP = "127.0.0.44"
TLV, SENML_JSON = ContentFormat.TLV, ContentFormat.SENML_JSON
PLAN = [("DELETE", "/0"), ("DELETE", "/1"), ("PUT", "/0/0"), ("PUT", "/0/1"), ("PUT", "/1/0"),
        ("POST", "/bs")]


# -- fixtures and helpers -------------------------------------------------------------------


async def add_sims(app: Simwire) -> None:
    await app.store.create(Sim(ICCID, "901405100000411", IP))
    await app.store.create(Sim(DISABLED_ICCID, "901405100000412", DISABLED_IP,
                               status=SimStatus.DISABLED))
    await app.store.create(Sim(OTHER_ICCID, "901405100000413", OTHER_IP))


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Simwire]:
    async with running(tmp_path / "d") as app:
        await add_sims(app)
        yield app


@pytest.fixture
async def api(node: Simwire, http: aiohttp.ClientSession) -> Api:
    return await Api.login(node, http)


@pytest.fixture
async def dev(node: Simwire) -> AsyncIterator[UdpDevice]:
    device = await UdpDevice.open(node.ports.coap, IP)
    yield device
    device.close()


def count(app: Simwire, outcome: str) -> int:
    prefix = f'simwire_uplinks_total{{outcome="{outcome}",protocol="LWM2M"}} '
    for row in app.metrics.render().decode().splitlines():
        if row.startswith(prefix):
            return int(float(row[len(prefix):]))
    return 0


async def admin_logs(api: Api, message: str, want: int = 1) -> list[dict[str, Any]]:
    async def matching() -> list[dict[str, Any]]:
        status, body = await api.call("GET", "/v1/administrationLogs")
        assert status == 200, body
        items = [e for e in body["items"] if e["message"] == message]
        return items if len(items) >= want else []

    return list(await eventually(matching))


async def lwm2m_key(api: Api, iccid: str = ICCID) -> tuple[int, Any]:
    return await api.call("GET", f"/v1/integrate/devices/{iccid}/psk/LWM2M")


def check_secret(secret: Value) -> bytes:
    """1NCE blueprints copy the key into char[30] and use strlen (spec 1.6)."""
    assert isinstance(secret, bytes)
    assert 8 <= len(secret) <= 29 and b"\x00" not in secret
    assert secret.decode("ascii").isprintable()
    return secret


def check_writes(seen: list[Seen], fmt: int, mode: int, server: str, bootstrap: str
                 ) -> bytes:
    """The documented sequence and values; returns the Secret Key written to /0/0/5."""
    assert [(s.method, s.path) for s in seen] == PLAN
    assert [s.content_format for s in seen] == [None, None, fmt, fmt, fmt, None]
    assert seen[0].payload == seen[1].payload == seen[5].payload == b""
    security = seen[2].values()
    secret = check_secret(security.pop("/0/0/5"))
    assert security == {"/0/0/0": server, "/0/0/1": False, "/0/0/2": mode,
                        "/0/0/3": ICCID.encode(), "/0/0/10": 1111}
    host = urlsplit(server).hostname
    assert host is not None
    ipaddress.ip_address(host)  # an IP literal
    assert seen[3].values() == {"/0/1/0": bootstrap, "/0/1/1": True, "/0/1/2": mode,
                                "/0/1/10": 2222}
    assert seen[4].values() == {"/1/0/0": 1111, "/1/0/1": 86400, "/1/0/2": 1, "/1/0/6": True,
                                "/1/0/7": "U"}
    return secret


# -- the sequence ---------------------------------------------------------------------------


async def test_plain_bootstrap_writes_the_documented_sequence_in_tlv(
        node: Simwire, api: Api, dev: UdpDevice) -> None:
    reply = await dev.bootstrap_request(f"ep={ICCID}")
    assert (reply.mtype, reply.code, reply.token) == (coap.ACK, coap.CHANGED, b"\x0b\x5e")
    seen = await dev.serve()
    url = f"coap://127.0.0.1:{node.ports.coap}"
    secret = check_writes(seen, TLV, 3, url, url)
    await dev.expect_silence()
    status, key = await lwm2m_key(api)
    assert status == 200, key
    assert (key["secretKey"], key["identity"], key["format"]) == (secret.decode(), ICCID,
                                                                  "STRING")
    assert count(node, "bootstrap_ok") == 1 and count(node, "bootstrap_failed") == 0
    assert node.lwm2m_bootstrap.running == frozenset()


@pytest.mark.parametrize("pct", [ContentFormat.SENML_JSON, ContentFormat.SENML_CBOR,
                                 ContentFormat.LWM2M_JSON, ContentFormat.TLV])
async def test_writes_use_the_format_the_client_prefers(
        node: Simwire, dev: UdpDevice, pct: ContentFormat) -> None:
    reply = await dev.bootstrap_request(f"ep={ICCID}", f"pct={int(pct)}")
    assert reply.code == coap.CHANGED
    url = f"coap://127.0.0.1:{node.ports.coap}"
    check_writes(await dev.serve(), pct, 3, url, url)


async def test_the_server_key_is_fresh_on_every_bootstrap(
        tmp_path: Path, store_url: str, http: aiohttp.ClientSession) -> None:
    clock = ManualClock()  # the same millisecond every time: still a fresh key
    async with running(tmp_path / "d", store=store_url, clock=clock) as app:
        await add_sims(app)
        api = await Api.login(app, http)
        dev = await UdpDevice.open(app.ports.coap, IP)
        try:
            secrets = []
            for pct in ("pct=110", "pct=11542", "pct=110"):
                assert (await dev.bootstrap_request(f"ep={ICCID}", pct)).code == coap.CHANGED
                seen = await dev.serve()
                secrets.append(check_secret(seen[2].values()["/0/0/5"]))
                status, key = await lwm2m_key(api)
                assert key["secretKey"] == secrets[-1].decode()  # the device's LWM2M key
        finally:
            dev.close()
        assert len(set(secrets)) == 3
        assert count(app, "bootstrap_ok") == 3


async def test_a_user_set_lwm2m_key_is_kept_and_written(
        node: Simwire, api: Api, dev: UdpDevice) -> None:
    status, body = await api.call("POST", f"/v1/integrate/devices/{ICCID}/psk", {
        "secretKey": "Customer-Key-42", "protocol": "LWM2M", "format": "STRING"})
    assert status == 200, body
    for _ in range(2):
        assert (await dev.bootstrap_request(f"ep={ICCID}")).code == coap.CHANGED
        seen = await dev.serve()
        assert seen[2].values()["/0/0/5"] == b"Customer-Key-42"
    status, key = await lwm2m_key(api)
    assert key["secretKey"] == "Customer-Key-42"
    assert key["updatedAt"] == body["updatedAt"]  # never overwritten


async def test_configured_uris(tmp_path: Path) -> None:
    async with running(tmp_path / "d", lwm2m_server_url="coap://{address}:15683",
                       lwm2m_bootstrap_url="coap://lwm2m.os.1nce.com:5683") as app:
        await add_sims(app)
        dev = await UdpDevice.open(app.ports.coap, IP)
        try:
            assert (await dev.bootstrap_request(f"ep={ICCID}")).code == coap.CHANGED
            check_writes(await dev.serve(), TLV, 3, "coap://127.0.0.1:15683",
                         "coap://lwm2m.os.1nce.com:5683")
        finally:
            dev.close()


@pytest.mark.parametrize(("setting", "value"), [
    ("lwm2m_server_url", "coap://lwm2m.example.com:5683"),  # a name: clients do not resolve
    ("lwm2m_server_url", "coaps://10.0.0.1:5684"),  # NoSec needs coap://
    ("lwm2m_server_coaps_url", "coap://10.0.0.1:5683"),
    ("lwm2m_bootstrap_url", "http://10.0.0.1/"),
    ("lwm2m_bootstrap_coaps_url", "coaps://10.0.0.1:5684/bs?x=1"),
    ("lwm2m_server_url", "coap://10.0.0.1:99999"),
])
async def test_bad_uri_settings_stop_the_start(tmp_path: Path, setting: str, value: str
                                               ) -> None:
    overrides: dict[str, Any] = {setting: value}
    with pytest.raises(ValueError, match=setting):
        async with running(tmp_path / "d", **overrides):
            pass


def test_uri_defaults_and_the_address_seen_by_the_device() -> None:
    uris = Uris.build((5683, 5684), (5683, 5684))
    assert uris == Uris("coap://{address}:5683", "coaps://{address}:5684",
                        "coap://{address}:5683", "coaps://{address}:5684")
    uris.check()
    assert _route_source("127.0.0.77") == "127.0.0.1"


# -- over DTLS ------------------------------------------------------------------------------


async def test_bootstrap_over_dtls_writes_psk_mode_and_coaps_uris(
        node: Simwire, api: Api) -> None:
    """On the shared CoAPs port the server key is the key of that port (the device's COAP
    key): the session the device bootstrapped through stays valid and no LWM2M key is
    issued (ADR 0008)."""
    status, body = await api.call("POST", f"/v1/integrate/devices/{ICCID}/psk", {
        "secretKey": "DtlsBootstrap-1", "protocol": "COAP", "format": "STRING"})
    assert status == 200, body
    dev = await DtlsDevice.open(node.ports.coaps, ICCID, b"DtlsBootstrap-1", IP)
    try:
        reply = await dev.bootstrap_request(f"ep={ICCID}")
        assert (reply.mtype, reply.code) == (coap.ACK, coap.CHANGED)
        url = f"coaps://127.0.0.1:{node.ports.coaps}"
        assert check_writes(await dev.serve(), TLV, 0, url, url) == b"DtlsBootstrap-1"
        await dev.expect_silence()
        # still the same session: it registers with the server the bootstrap named
        assert (await dev.register(ICCID)).code == coap.CREATED
    finally:
        dev.close()
    assert (await lwm2m_key(api))[0] == 404
    assert count(node, "bootstrap_ok") == 1


async def test_dtls_identity_must_be_the_iccid(node: Simwire, api: Api) -> None:
    # The DTLS endpoint already binds identity and key to the SIM at the source IP; the
    # bootstrap server checks again (defence in depth), seen here below the transport.
    secure = node.lwm2m_bootstrap.handler(_NoRequests(),
                                          node.psks.dtls_keys(KeyRole.COAP))
    msg = coap.Message(coap.CON, coap.POST, 1, b"", [(coap.OPT_URI_PATH, b"bs"),
                                                     (coap.OPT_URI_QUERY, f"ep={ICCID}".encode())])
    for identity in (OTHER_ICCID, None):
        assert (await secure(msg, (IP, 5683), identity)).code == coap.code(4, 3)
    logs = await admin_logs(api, "LwM2M[BootstrapRefused]")
    assert "DTLS identity" in logs[0]["description"]
    assert count(node, "bootstrap_refused") == 2
    assert (await lwm2m_key(api))[0] == 404


class _NoRequests:
    @property
    def requests(self) -> Any:
        raise AssertionError("no request expected")


# -- refusals and bad requests --------------------------------------------------------------


@pytest.mark.parametrize(("ip", "ep", "code", "iccid", "why"), [
    (UNKNOWN_IP, ICCID, coap.UNAUTHORIZED, None, "unknown device IP"),
    (DISABLED_IP, DISABLED_ICCID, coap.UNAUTHORIZED, DISABLED_ICCID, "disabled SIM"),
    (OTHER_IP, ICCID, coap.code(4, 3), OTHER_ICCID, "endpoint name"),
])
async def test_refusals_are_answered_and_logged(
        node: Simwire, api: Api, ip: str, ep: str, code: int, iccid: str | None,
        why: str) -> None:
    dev = await UdpDevice.open(node.ports.coap, ip)
    try:
        for _ in range(3):
            assert (await dev.bootstrap_request(f"ep={ep}")).code == code
        await dev.expect_silence()
    finally:
        dev.close()
    logs = await admin_logs(api, "LwM2M[BootstrapRefused]")
    await asyncio.sleep(0.6)  # one flush later: still one (rate-limited per IP)
    logs = await admin_logs(api, "LwM2M[BootstrapRefused]")
    assert len(logs) == 1
    assert (logs[0]["iccid"], logs[0]["ip"], logs[0]["category"]) == (iccid, ip, "error")
    assert why in logs[0]["description"]
    assert count(node, "bootstrap_refused") == 3
    for device in (ICCID, DISABLED_ICCID, OTHER_ICCID):
        assert (await lwm2m_key(api, device))[0] == 404  # no key issued


@pytest.mark.parametrize(("query", "code", "method", "path"), [
    ((), coap.BAD_REQUEST, coap.POST, b"bs"),  # no ep
    (("ep=",), coap.BAD_REQUEST, coap.POST, b"bs"),
    ((f"ep={ICCID}", "pct=json"), coap.BAD_REQUEST, coap.POST, b"bs"),
    ((f"ep={ICCID}", "pct=9999"), coap.BAD_REQUEST, coap.POST, b"bs"),  # not a format
    ((f"ep={ICCID}", "pct=0"), coap.code(4, 15), coap.POST, b"bs"),  # text: one value only
    ((f"ep={ICCID}", "pct=42"), coap.code(4, 15), coap.POST, b"bs"),
    ((f"ep={ICCID}",), coap.METHOD_NOT_ALLOWED, coap.GET, b"bs"),
    ((f"ep={ICCID}",), coap.METHOD_NOT_ALLOWED, coap.PUT, b"bs"),
])
async def test_bad_requests(node: Simwire, api: Api, dev: UdpDevice, query: tuple[str, ...],
                            code: int, method: int, path: bytes) -> None:
    assert (await dev.bootstrap_request(*query, code=method, path=path)).code == code
    await dev.expect_silence()
    assert (await lwm2m_key(api))[0] == 404


async def test_a_path_below_bs_is_not_found(node: Simwire, dev: UdpDevice) -> None:
    dev._mid += 1
    dev._send(coap.serialize(coap.Message(coap.CON, coap.POST, dev._mid, b"", [
        (coap.OPT_URI_PATH, b"bs"), (coap.OPT_URI_PATH, b"x"),
        (coap.OPT_URI_QUERY, f"ep={ICCID}".encode())])))
    assert (await dev.response(dev._mid)).code == coap.NOT_FOUND
    await dev.expect_silence()


# -- failures, duplicates, shutdown ---------------------------------------------------------


@pytest.mark.parametrize("refused", range(6))
async def test_a_refused_request_stops_the_sequence(
        node: Simwire, api: Api, dev: UdpDevice, refused: int) -> None:
    def answer(req: Seen) -> int:
        if (req.method, req.path) == PLAN[refused]:
            return coap.METHOD_NOT_ALLOWED
        return default_answer(req)

    assert (await dev.bootstrap_request(f"ep={ICCID}")).code == coap.CHANGED
    seen = await dev.serve(answer)
    assert [(s.method, s.path) for s in seen] == PLAN[:refused + 1]
    await dev.expect_silence()  # nothing more: no Bootstrap-Finish
    logs = await admin_logs(api, "LwM2M[BootstrapFailed]")
    method, path = PLAN[refused]
    assert logs[0]["description"] == (
        f"LwM2M bootstrap of {ICCID} stopped: {method} {path} answered 4.05")
    assert (logs[0]["iccid"], logs[0]["ip"]) == (ICCID, IP)
    assert (count(node, "bootstrap_failed"), count(node, "bootstrap_ok")) == (1, 0)
    assert node.lwm2m_bootstrap.running == frozenset()
    # the device may try again at once
    assert (await dev.bootstrap_request(f"ep={ICCID}")).code == coap.CHANGED
    assert len(await dev.serve()) == len(PLAN)


async def test_a_duplicate_request_does_not_restart_the_sequence(
        node: Simwire, api: Api, dev: UdpDevice) -> None:
    first_mid = dev.post_bs(f"ep={ICCID}")
    first = await dev.response(first_mid)
    assert first.code == coap.CHANGED
    # the first server request is here, unanswered; the device asks again (new MID) and
    # retransmits its first request (same MID)
    delete = await dev.recv()
    assert (delete.code, delete.opt_all(coap.OPT_URI_PATH)) == (coap.DELETE, [b"0"])
    dev.pending.append(delete)
    assert (await dev.bootstrap_request(f"ep={ICCID}")).code == coap.CHANGED
    dev.post_bs(f"ep={ICCID}", mid=first_mid)
    assert (await dev.response(first_mid)).code == coap.CHANGED
    assert node.lwm2m_bootstrap.running == frozenset({ICCID})
    seen = await dev.serve()
    assert [(s.method, s.path) for s in seen] == PLAN
    await dev.expect_silence(1.0)
    status, key = await lwm2m_key(api)
    assert key["secretKey"] == check_secret(seen[2].values()["/0/0/5"]).decode()
    assert count(node, "bootstrap_duplicate") == 1
    assert count(node, "bootstrap_ok") == 1


async def test_an_unanswered_request_times_out(tmp_path: Path, http: aiohttp.ClientSession
                                               ) -> None:
    clock = ManualClock()
    async with running(tmp_path / "d", clock=clock) as app:
        await add_sims(app)
        api = await Api.login(app, http)
        dev = await UdpDevice.open(app.ports.coap, IP)
        try:
            assert (await dev.bootstrap_request(f"ep={ICCID}")).code == coap.CHANGED
            first = await dev.recv()
            assert first.code == coap.DELETE
            for _ in range(6):  # 4 retransmissions, then the give-up (at most 93 s in all)
                await asyncio.sleep(0.05)
                clock.advance(100)
            await eventually(lambda: not app.lwm2m_bootstrap.running)
            logs = await admin_logs(api, "LwM2M[BootstrapFailed]")
            assert logs[0]["description"].startswith(
                f"LwM2M bootstrap of {ICCID} stopped: DELETE /0: no ACK")
            assert count(app, "bootstrap_failed") == 1
            retransmitted = []
            with contextlib.suppress(TimeoutError):
                while True:
                    retransmitted.append(await dev.recv(0.2))
            assert [m.mid for m in retransmitted] == [first.mid] * 4
        finally:
            dev.close()


async def test_shutdown_cancels_a_running_bootstrap(tmp_path: Path) -> None:
    async with running(tmp_path / "d") as app:
        await add_sims(app)
        dev = await UdpDevice.open(app.ports.coap, IP)
        try:
            assert (await dev.bootstrap_request(f"ep={ICCID}")).code == coap.CHANGED
            assert (await dev.recv()).code == coap.DELETE  # never answered
            started = time.monotonic()
        finally:
            dev.close()
    assert time.monotonic() - started < 2.0
    assert app.lwm2m_bootstrap.running == frozenset()
    assert count(app, "bootstrap_ok") == 0
