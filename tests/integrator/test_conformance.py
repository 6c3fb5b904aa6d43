"""The endpoint conformance suite: the same scenarios on every device protocol.

GIVEN a SIM registry, WHEN a device sends over <protocol>, THEN the store, the reply and
the admin logs are as 1NCE devices expect. New endpoints (CoAPs, LwM2M) join by adding a
`DeviceLink` in tests/support/devices.py and a parameter below.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from integrator import coap
from simwire.app import Simwire
from tests.support.devices import CoapLink, CoapsLink, DeviceLink, open_link
from tests.support.simwire import Api, eventually, running

KNOWN = {"iccid": "8988280666000000011", "imsi": "901405100000011", "ip": "127.0.0.11"}
OTHER_IP = "127.0.0.12"

KEY = b"conformance-key1"
pytestmark = pytest.mark.parametrize("protocol", ["UDP", "COAP", "COAPS"])


def stored(protocol: str) -> str:
    """The protocol history and metrics name: CoAP over DTLS is COAP."""
    return "COAP" if protocol == "COAPS" else protocol


@pytest.fixture
async def app(tmp_path: Path, store_url: str) -> AsyncIterator[Simwire]:
    """The conformance scenarios run on both stores (SQLite, MongoDB wire protocol)."""
    async with running(tmp_path / "data", store=store_url) as instance:
        yield instance


@pytest.fixture
async def sim(api: Api) -> dict[str, str]:
    status, body = await api.call("POST", "/v1/sims", KNOWN)
    assert status == 201, body
    status, body = await api.call("POST", f"/v1/integrate/devices/{KNOWN['iccid']}/psk", {
        "secretKey": KEY.decode(), "protocol": "COAP"})
    assert status == 200, body
    return KNOWN


@pytest.fixture
async def link(app: Simwire, sim: dict[str, str], protocol: str) -> AsyncIterator[DeviceLink]:
    dev = await open_link(app, protocol, KNOWN["ip"], (KNOWN["iccid"], KEY))
    yield dev
    dev.close()


async def history(api: Api, iccid: str = KNOWN["iccid"]) -> list[dict[str, str]]:
    status, body = await api.call("GET", f"/v1/inspect/devices/{iccid}/history",
                                  params={"pageSize": "100"})
    assert status == 200, body
    return list(body["items"])


async def history_len(api: Api, n: int) -> list[dict[str, str]] | None:
    items = await history(api)
    return items if len(items) == n else None


async def logs(api: Api, message: str) -> list[dict[str, str]]:
    status, body = await api.call("GET", "/v1/administrationLogs", params={"pageSize": "100"})
    assert status == 200
    return [e for e in body["items"] if e["message"] == message]


def uplinks(app: Simwire, protocol: str, outcome: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "simwire_uplinks_total", {"protocol": stored(protocol), "outcome": outcome})
    return value or 0.0


def dtls(app: Simwire, outcome: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "simwire_dtls_total", {"protocol": "COAP", "outcome": outcome})
    return value or 0.0


async def test_known_sim_message_is_stored_before_ack(
    app: Simwire, api: Api, sim: dict[str, str], link: DeviceLink, protocol: str
) -> None:
    sent = await link.uplink(b"\x01\x63\x54hello")
    if link.replies:
        assert sent.reply is not None and sent.reply.code == coap.CHANGED
        items = await history(api)  # stored before the 2.04 left: visible at once
    else:
        items = await eventually(lambda: history(api))
    assert len(items) == 1
    item = items[0]
    assert item["iccid"] == item["deviceId"] == KNOWN["iccid"]
    assert item["protocol"] == stored(protocol)
    assert base64.b64decode(item["payload"]) == b"\x01\x63\x54hello"
    assert uplinks(app, protocol, "stored") == 1


async def test_first_contact_registers_device_once(
    app: Simwire, api: Api, sim: dict[str, str], link: DeviceLink, protocol: str
) -> None:
    for i in range(3):
        await link.uplink(bytes([i]))
    await eventually(lambda: history_len(api, 3))
    await app.admin_logs.flush()
    entries = await logs(api, "Lifecycle[DeviceFirstTimeRegistered]")
    assert len(entries) == 1
    assert entries[0]["iccid"] == KNOWN["iccid"]
    assert entries[0]["type"] == "LIFECYCLE"
    assert entries[0]["description"] == (
        f"New Device successfully registered for the first time - {KNOWN['iccid']}")
    status, body = await api.call("GET", "/v1/inspect/devices")
    assert body["items"] == [{"id": KNOWN["iccid"], "iccid": KNOWN["iccid"],
                              "imsi1": KNOWN["imsi"], "ip": KNOWN["ip"]}]


async def test_unknown_sim_is_refused_and_logged(
    app: Simwire, api: Api, sim: dict[str, str], protocol: str
) -> None:
    if protocol == "COAPS":  # no SIM, no key: no session, no reply, counted, not logged
        with pytest.raises(TimeoutError):
            await open_link(app, protocol, OTHER_IP, (KNOWN["iccid"], KEY))
        assert dtls(app, "unknown_peer") >= 1
        await app.admin_logs.flush()
        assert await logs(api, "DeviceAuthenticator[DtlsHandshakeFailed]") == []
        return
    stranger = await open_link(app, protocol, OTHER_IP)
    try:
        sent = await stranger.uplink(b"who am i")
        if stranger.replies:
            assert sent.reply is not None and sent.reply.code == coap.UNAUTHORIZED
        await eventually(lambda: uplinks(app, protocol, "unauthorized") == 1)
        await app.admin_logs.flush()
        entries = await logs(api, "DeviceIntegrator[UnauthorizedDevice]")
        assert len(entries) == 1 and entries[0]["ip"] == OTHER_IP
        # a flood from the same IP is counted but logged once per minute
        for _ in range(5):
            await stranger.uplink(b"again")
        await eventually(lambda: uplinks(app, protocol, "unauthorized") == 6)
        await app.admin_logs.flush()
        assert len(await logs(api, "DeviceIntegrator[UnauthorizedDevice]")) == 1
    finally:
        stranger.close()
    status, body = await api.call("GET", "/v1/inspect/devices")
    assert body["items"] == []


async def test_disabled_sim_is_refused_until_enabled(
    app: Simwire, api: Api, sim: dict[str, str], link: DeviceLink, protocol: str
) -> None:
    status, _ = await api.call("PATCH", f"/v1/sims/{KNOWN['iccid']}", {"status": "Disabled"})
    assert status == 200
    sent = await link.uplink(b"off")
    if link.replies:
        assert sent.reply is not None and sent.reply.code == coap.UNAUTHORIZED
    await eventually(lambda: uplinks(app, protocol, "unauthorized") == 1)
    assert await history(api) == []
    status, _ = await api.call("PATCH", f"/v1/sims/{KNOWN['iccid']}", {"status": "Enabled"})
    await link.uplink(b"on")
    items = await eventually(lambda: history(api))
    assert [base64.b64decode(i["payload"]) for i in items] == [b"on"]


async def test_trailing_nul_and_garbage_bytes_are_kept_verbatim(
    app: Simwire, api: Api, sim: dict[str, str], link: DeviceLink
) -> None:
    zephyr = b"Hi, this is a test message!\x00"
    energy_saver = bytes.fromhex("016354322e322e31") + b"\xde\xad"
    await link.uplink(zephyr)
    await link.uplink(energy_saver)
    items = await eventually(lambda: history_len(api, 2))
    assert sorted(base64.b64decode(i["payload"]) for i in items) == sorted([zephyr, energy_saver])


async def test_malformed_frames_never_stop_the_endpoint(
    app: Simwire, api: Api, sim: dict[str, str], link: DeviceLink, protocol: str
) -> None:
    port = {"UDP": app.ports.udp, "COAP": app.ports.coap, "COAPS": app.ports.coaps}[protocol]
    from tests.support.net import UdpClient

    raw = await UdpClient.open(("127.0.0.1", port), KNOWN["ip"])
    try:
        bad = [b"\x00", b"\xff" * 3, b"\x4f\x02\x00\x01", b"\x40\x02\x00\x01\xff",
               b"\x40\x02\x00\x01\xf0", b"\x50\x01\xe9"]
        if protocol == "UDP":
            bad = [b"x" * 1501]  # UDP treats any bytes as payload; only size is bad
        for datagram in bad:
            raw.send(datagram)  # over DTLS: garbage records, dropped by the DTLS layer
            if isinstance(link, CoapsLink):
                link.client.send_app(datagram)  # and malformed CoAP inside the session
        await raw.expect_silence(0.3)
    finally:
        raw.close()
    outcome = "too_large" if protocol == "UDP" else "malformed"
    await eventually(lambda: uplinks(app, protocol, outcome) == len(bad))
    sent = await link.uplink(b"still alive")
    if link.replies:
        assert sent.reply is not None and sent.reply.code == coap.CHANGED
    items = await eventually(lambda: history(api))
    assert [base64.b64decode(i["payload"]) for i in items] == [b"still alive"]




async def test_template_active_translates_and_failures_keep_the_raw_message(
    app: Simwire, api: Api, sim: dict[str, str], link: DeviceLink, protocol: str
) -> None:
    demo = {"sense": [{"switch": {"byte": 0, "type": "uint"}, "on": [{"case": 1, "do": [
        {"asset": "data_type", "value": "Energy_Saver"},
        {"asset": "battery", "value": {"byte": 1, "type": "uint"}},
        {"asset": "version", "value": {"byte": 3, "bytelength": 5, "type": "string"}}]}]}]}
    status, res = await api.call("POST", "/v1/optimize/templates", {
        "name": "demo", "template": json.dumps(demo), "protocolFilter": [stored(protocol)],
        "status": "ACTIVE"})
    assert status == 201, res
    sent = await link.uplink(bytes.fromhex("016354322e322e31dead"))  # trailing bytes ignored
    if link.replies:
        assert sent.reply is not None and sent.reply.code == coap.CHANGED
    await link.uplink(b"\x01\x63")  # too short for version: ERROR event, raw kept
    items = await eventually(lambda: history_len(api, 2))
    by_payload = sorted(i["payload"] for i in items)
    assert by_payload == sorted([
        '{"data_type":"Energy_Saver","battery":99,"version":"2.2.1"}',
        base64.b64encode(b"\x01\x63").decode()])
    errors = await eventually(lambda: logs(api, "Translator[UserPayloadError]"))
    assert [e["description"] for e in errors] == [
        "Asset path:version, Error: can't extract [3:8] from 2 bytes"]


async def test_retransmissions_get_the_same_reply_and_are_stored_once(
    app: Simwire, api: Api, sim: dict[str, str], link: DeviceLink, protocol: str
) -> None:
    if isinstance(link, CoapsLink):
        first = await link.client.post(b"once", mid=4242)
        again = await link.client.post(b"once", mid=4242)
    elif isinstance(link, CoapLink):
        msg = coap.Message(coap.CON, coap.POST, 4242, b"\x07", [], b"once")
        first, again = await link.request(msg), await link.request(msg)
    else:
        pytest.skip("UDP has no message IDs")
    assert first.code == again.code == coap.CHANGED and first.mid == again.mid == 4242
    await link.uplink(b"next")
    items = await eventually(lambda: history_len(api, 2))
    assert sorted(base64.b64decode(i["payload"]) for i in items) == [b"next", b"once"]
    assert uplinks(app, protocol, "duplicate") == 1
