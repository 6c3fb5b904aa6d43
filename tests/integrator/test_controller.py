"""Device Controller: UDP and CoAP downlinks, SEND_WHEN_ACTIVE, limits, expiry, cancel.

GIVEN SIMs whose devices listen on real sockets (127.0.0.x), WHEN actions are posted to
/v1/integrate/devices/.../actions, THEN the devices receive the exact downlinks and the
request records follow 1NCE's lifecycle.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from integrator import coap
from simwire.app import Simwire
from simwire.clock import ManualClock
from simwire.model import DEFAULT_ORG
from tests.support.devices import Device
from tests.support.net import UdpListener
from tests.support.simwire import Api, eventually

ICCID = "8988280666000000301"
ICCID2 = "8988280666000000302"
IP = "127.0.0.1"  # the Device sender sends from 127.0.0.1
IP2 = "127.0.0.52"


@pytest.fixture
async def api(node: Simwire, http: aiohttp.ClientSession) -> Api:
    client = await Api.login(node, http)
    for iccid, ip in ((ICCID, IP), (ICCID2, IP2)):
        await client.add_sim(iccid, "9014051" + iccid[-8:], ip)
    return client


@pytest.fixture
async def listener(node: Simwire) -> AsyncIterator[UdpListener]:
    """The device's downlink socket (blueprints listen on port 3000; here a free port)."""
    sock = await UdpListener.open(IP)
    yield sock
    sock.close()


async def act(api: Api, protocol: str, body: dict[str, Any], iccid: str = ICCID) -> str:
    status, res = await api.call("POST", f"/v1/integrate/devices/{iccid}/actions/{protocol}",
                                 body)
    assert status == 202, res
    assert res["message"] == "request accepted"
    return str(res["id"])


async def record(api: Api, request_id: str) -> dict[str, Any]:
    status, res = await api.call("GET", f"/v1/integrate/devices/actions/requests/{request_id}")
    assert status == 200, res
    return dict(res)


async def final(api: Api, request_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        r = await record(api, request_id)
        return r if r["status"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None
    return await eventually(done)


async def test_udp_downlink_is_sent_to_the_device_port(
        api: Api, listener: UdpListener) -> None:
    rid = await act(api, "UDP", {"payload": "aGVsbG8=", "payloadType": "BASE64",
                                 "port": listener.local_port})
    assert await listener.recv() == b"hello"
    r = await final(api, rid)
    assert (r["status"], r["resultData"], r["mode"], r["protocol"]) == (
        "SUCCEEDED", {"message": "sent"}, "SEND_NOW", "UDP")
    assert r["requestData"] == {
        "payload": "aGVsbG8=", "payloadType": "BASE64", "port": listener.local_port,
        "requestMode": "SEND_NOW", "iccid": ICCID, "imsi1": "9014051" + ICCID[-8:],
        "deviceId": ICCID, "requestId": rid, "customerId": DEFAULT_ORG,
        "deviceIpAddress": IP}
    assert (r["sendAttempts"], r["sendAttemptsLeft"], r["deviceId"], r["ip"]) == (
        1, 0, ICCID, IP)


async def test_send_when_active_waits_for_the_next_uplink(
        api: Api, node: Simwire, listener: UdpListener) -> None:
    rid = await act(api, "UDP", {"payload": "wake up", "port": listener.local_port,
                                 "requestMode": "SEND_WHEN_ACTIVE"})
    await listener.expect_silence(0.3)
    assert (await record(api, rid))["status"] == "SCHEDULED"
    device = await Device.open(node)
    try:
        await device.udp(b"I am awake")  # any uplink of the device fires it
    finally:
        device.close()
    assert await listener.recv() == b"wake up"
    assert (await final(api, rid))["status"] == "SUCCEEDED"


async def test_coap_downlink_and_the_device_ack(api: Api, listener: UdpListener) -> None:
    rid = await act(api, "COAP", {
        "payload": "Data to send to the device\n", "payloadType": "STRING",
        "port": listener.local_port, "path": "example?param1=query_example1",
        "requestType": "POST"})
    raw = await listener.recv()
    msg = coap.parse(raw)
    assert (msg.mtype, msg.code, len(msg.token)) == (coap.CON, coap.POST, 8)
    assert msg.options == [(coap.OPT_URI_PATH, b"example"), (coap.OPT_CONTENT_FORMAT, b""),
                           (coap.OPT_URI_QUERY, b"param1=query_example1")]
    assert msg.payload == b"Data to send to the device\n"
    # the 1NCE wire example's layout: Uri-Path, zero-length Content-Format, Uri-Query
    assert raw[4 + 8:4 + 8 + 8] == b"\xb7example" and raw[20] == 0x10
    ack = coap.Message(coap.ACK, coap.CHANGED, msg.mid, msg.token)
    listener.send_to(coap.serialize(ack), listener.last_sender)
    r = await final(api, rid)
    assert (r["status"], r["resultData"]) == (
        "SUCCEEDED", {"code": "204", "payload": "", "payloadType": "BASE64"})


async def test_coap_error_answer_and_retransmissions(
        api: Api, listener: UdpListener, clock: ManualClock) -> None:
    rid = await act(api, "COAP", {"port": listener.local_port, "path": "missing",
                                  "requestType": "GET"})
    msg = coap.parse(await listener.recv())
    listener.send_to(coap.serialize(coap.Message(
        coap.ACK, coap.NOT_FOUND, msg.mid, msg.token,
        [(coap.OPT_CONTENT_FORMAT, b"")], b"no such resource")), listener.last_sender)
    r = await final(api, rid)
    assert (r["status"], r["errorMessage"], r["resultData"]) == (
        "FAILED", "the device answered 4.04",
        {"code": "404", "payload": "no such resource", "payloadType": "TEXT"})
    # a silent device: RFC 7252 retransmissions, then the next attempt
    rid = await act(api, "COAP", {"port": listener.local_port, "path": "x",
                                  "requestType": "GET", "sendAttempts": 2})
    first = coap.parse(await listener.recv())
    seen = [first.mid]
    while len(seen) < 10:  # 2 attempts x (1 + 4 retransmissions)
        await eventually(lambda: clock.sleeping)
        clock.advance(max(clock.sleeping))
        seen.append(coap.parse(await listener.recv()).mid)
    assert len(set(seen)) == 2  # retransmissions repeat the MID; the 2nd attempt is new
    await eventually(lambda: clock.sleeping)
    clock.advance(max(clock.sleeping))
    r = await final(api, rid)
    assert (r["status"], r["errorMessage"], r["sendAttemptsLeft"]) == (
        "FAILED", "no answer from the device", 0)


async def test_waiting_limit_expiry_and_cancel(
        api: Api, node: Simwire, clock: ManualClock, http: aiohttp.ClientSession) -> None:
    body = {"payload": "x", "port": 3000, "requestMode": "SEND_WHEN_ACTIVE"}
    ids = [await act(api, "UDP", body) for _ in range(10)]
    status, res = await api.call("POST", f"/v1/integrate/devices/{ICCID}/actions/UDP", body)
    assert status == 409
    await act(api, "UDP", {"payload": "x", "port": 3000})  # SEND_NOW is not limited
    status, res = await api.call("POST", f"/v1/integrate/devices/actions/requests/{ids[0]}"
                                 "/cancel")
    assert status == 200 and res["status"] == "CANCELLED"
    status, res = await api.call("POST", f"/v1/integrate/devices/actions/requests/{ids[0]}"
                                 "/cancel")
    assert status == 409
    await act(api, "UDP", body)  # the cancel freed a place
    clock.advance(24 * 3600)
    await node.controller.housekeeping()
    api.token = (await Api.login(node, http)).token
    r = await record(api, ids[1])
    assert (r["status"], r["errorMessage"]) == ("FAILED", "expired")
    status, listing = await api.call("GET", "/v1/integrate/devices/actions/requests",
                                     params={"deviceId": ICCID, "status": "FAILED",
                                             "pageSize": "100"})
    assert len(listing["items"]) == 10


async def test_bulk_validation_tenants_and_roles(
        api: Api, node: Simwire, http: aiohttp.ClientSession) -> None:
    status, res = await api.call("POST", "/v1/integrate/devices/actions/UDP", {
        "deviceIds": [ICCID, ICCID2, "8988280666000000399"], "payload": "x", "port": 3000})
    assert status == 202
    assert [a["deviceId"] for a in res["acceptedRequests"]] == [ICCID, ICCID2]
    assert res["rejectedDevices"] == [{"deviceId": "8988280666000000399",
                                       "reason": "unknown device"}]
    status, res = await api.call("POST", f"/v1/integrate/devices/{ICCID}/actions/COAP", {
        "port": 0, "path": "a b", "requestType": "FETCH", "sendAttempts": 9, "x": 1})
    assert status == 422
    assert [e["property"] for e in res["errors"]] == [
        "x", "sendAttempts", "port", "path", "requestType"]
    status, res = await api.call("POST", f"/v1/integrate/devices/{ICCID}/actions/LWM2M", {
        "action": "reboot", "resourceAddress": "3/0"})
    assert status == 422
    assert [e["property"] for e in res["errors"]] == ["action", "resourceAddress"]
    status, sub = await api.call("POST", "/v1/clients", {
        "clientId": "other-org", "role": "admin", "organisation": "other"})
    other = await Api.login(node, http, "other-org", sub["clientSecret"])
    status, _ = await other.call("POST", f"/v1/integrate/devices/{ICCID}/actions/UDP",
                                 {"payload": "x", "port": 3000})
    assert status == 404
    status, listing = await other.call("GET", "/v1/integrate/devices/actions/requests")
    assert listing["items"] == []
    status, viewer = await api.call("POST", "/v1/clients", {
        "clientId": "viewer-1", "role": "viewer", "organisation": DEFAULT_ORG})
    v = await Api.login(node, http, "viewer-1", viewer["clientSecret"])
    status, _ = await v.call("POST", f"/v1/integrate/devices/{ICCID}/actions/UDP",
                             {"payload": "x", "port": 3000})
    assert status == 403
    status, _ = await v.call("GET", "/v1/integrate/devices/actions/requests")
    assert status == 200
