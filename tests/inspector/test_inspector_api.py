"""Inspector API over real ingest: history paging and filters, retention, state, logs."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import aiohttp
import pytest

from integrator import coap
from simwire.app import Simwire
from simwire.clock import ManualClock
from tests.support.devices import Device
from tests.support.net import UdpClient
from tests.support.simwire import T0, Api

ICCID = "8988280666000000061"


@pytest.fixture
async def api(node: Simwire, http: aiohttp.ClientSession) -> Api:
    client = await Api.login(node, http)
    await client.add_sim(ICCID, "901405100000061", "127.0.0.1", label="pump 7")
    return client


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def history(api: Api, **params: str) -> dict[str, object]:
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}/history", params=params)
    assert status == 200, body
    return dict(body)


async def test_history_newest_first_with_filters(
    api: Api, device: Device, clock: ManualClock
) -> None:
    for i in range(6):
        if i % 2:
            await device.udp(f"u{i}".encode())
        else:
            await device.coap(f"c{i}".encode(), topic="t1")
        clock.advance(60)
    body = await history(api)
    items = body["items"]
    assert isinstance(items, list)
    assert [base64.b64decode(i["payload"]) for i in items] == [
        b"u5", b"c4", b"u3", b"c2", b"u1", b"c0"]
    assert items[1] == {"iccid": ICCID, "deviceId": ICCID, "time": iso(T0 + 240_000),
                        "payload": base64.b64encode(b"c4").decode(), "protocol": "COAP",
                        "topic": "t1"}
    assert "topic" not in items[0] and "nextToken" not in body
    coap_only = await history(api, protocol="COAP")
    assert [i["protocol"] for i in coap_only["items"]] == ["COAP"] * 3  # type: ignore[union-attr]
    window = await history(api, startDateTime=iso(T0 + 60_000), endDateTime=iso(T0 + 180_000))
    assert [i["time"] for i in window["items"]] == [  # type: ignore[union-attr]
        iso(T0 + 180_000), iso(T0 + 120_000), iso(T0 + 60_000)]
    only_end = await history(api, endDateTime=iso(T0 + 60_000))
    assert len(only_end["items"]) == 2  # type: ignore[arg-type]
    by_query = await api.call("GET", "/v1/inspect/devices/history",
                              params={"iccid": ICCID, "protocol": "udp"})
    assert [i["protocol"] for i in by_query[1]["items"]] == ["UDP"] * 3


async def test_history_pages_with_next_token(api: Api, device: Device, clock: ManualClock) -> None:
    for i in range(7):
        await device.coap(bytes([i]))
        if i % 3 == 0:
            clock.advance(1)  # several messages share one millisecond: order must still hold
    seen: list[bytes] = []
    params = {"pageSize": "3"}
    pages = 0
    while True:
        body = await history(api, **params)
        pages += 1
        seen += [base64.b64decode(i["payload"]) for i in body["items"]]  # type: ignore[union-attr]
        if "nextToken" not in body:
            break
        params["nextToken"] = str(body["nextToken"])
    assert pages == 3
    assert seen == [bytes([i]) for i in reversed(range(7))]


async def test_history_echoes_the_requested_offset(api: Api, device: Device) -> None:
    await device.coap(b"x")
    body = await history(api, startDateTime="2025-12-31T20:00:00+02:00")
    assert body["items"][0]["time"] == "2026-01-01T02:00:00.000+02:00"  # type: ignore[index]


@pytest.mark.parametrize(
    ("params", "prop"),
    [
        ({"startDateTime": "yesterday"}, "startDateTime"),
        ({"startDateTime": "2026-01-02T00:00:00Z", "endDateTime": "2026-01-01T00:00:00Z"},
         "startDateTime"),
        ({"protocol": "SMS"}, "protocol"),
        ({"pageSize": "101"}, "pageSize"),
    ],
)
async def test_history_bad_queries_are_400(api: Api, params: dict[str, str], prop: str) -> None:
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}/history", params=params)
    assert status == 400 and body["errors"][0]["property"] == prop


async def test_bad_next_token_is_400(api: Api) -> None:
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}/history",
                                  params={"nextToken": "garbage!"})
    assert status == 400 and body["statusText"] == "Bad Request"


async def test_unknown_device_is_404(api: Api) -> None:
    status, _ = await api.call("GET", "/v1/inspect/devices/8988280666000009999/history")
    assert status == 404
    status, _ = await api.call("GET", "/v1/inspect/devices/history")
    assert status == 400


async def test_retention_purges_after_seven_days(
    node: Simwire, api: Api, device: Device, clock: ManualClock
) -> None:
    await device.coap(b"old")
    await node.admin_logs.flush()
    clock.advance(3 * 24 * 3600)
    await device.coap(b"new")
    clock.advance(4 * 24 * 3600 + 1)  # "old" is now 7 days + 1 s old
    api = await Api.login(node, api.session)  # the old token expired meanwhile
    assert [i["payload"] for i in (await history(api))["items"]] == [  # type: ignore[union-attr]
        base64.b64encode(b"new").decode()]  # hidden at once, even before the purge runs
    removed = await node.retention.run_once()
    assert removed == 3  # the old TELEMETRY_DATA, its LIFECYCLE event and the lifecycle log
    assert await node.retention.run_once() == 0
    body = await history(api, startDateTime=iso(T0 - 1000))
    assert len(body["items"]) == 1  # type: ignore[arg-type]
    status, logs = await api.call("GET", "/v1/administrationLogs")
    assert logs["items"] == []
    status, devices = await api.call("GET", "/v1/inspect/devices")
    assert [d["iccid"] for d in devices["items"]] == [ICCID]  # devices and state are permanent


async def test_state_is_the_last_message_per_protocol(
    api: Api, device: Device, clock: ManualClock
) -> None:
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}/telemetry",
                                  params={"protocol": "COAP"})
    assert status == 404
    await device.coap(b"first", topic="a")
    clock.advance(1)
    await device.coap(b"second", topic="b")
    await device.udp(b"udp")
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}/telemetry",
                                  params={"protocol": "COAP"})
    assert status == 200
    assert body == {"id": ICCID, "protocol": "COAP", "state": {
        "payload": base64.b64encode(b"second").decode(), "topic": "b", "time": iso(T0 + 1000)}}
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}/telemetry",
                                  params={"protocol": "UDP"})
    assert body["state"]["payload"] == base64.b64encode(b"udp").decode()
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}/telemetry")
    assert status == 400


async def test_device_list_and_detail(node: Simwire, api: Api, device: Device) -> None:
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}")
    assert status == 200 and body["name"] == "pump 7"  # a SIM that never talked
    await device.coap(b"hi")
    others = [("8988280666000000062", "127.0.0.62"), ("8988280666000000063", "127.0.0.63")]
    for iccid, ip in others:
        await api.add_sim(iccid, "9014051000000" + iccid[-2:], ip)
        client = await UdpClient.open(("127.0.0.1", node.ports.coap), ip)
        reply = await client.request(coap.serialize(coap.Message(coap.CON, coap.POST, 1)))
        assert coap.parse(reply).code == coap.CHANGED
        client.close()
    status, body = await api.call("GET", "/v1/inspect/devices",
                                  params={"sort": "-iccid", "pageSize": "2"})
    assert [d["iccid"] for d in body["items"]] == ["8988280666000000063", "8988280666000000062"]
    assert (body["page"], body["pageAmount"]) == (1, 2)
    status, body = await api.call("GET", "/v1/inspect/devices", params={"q": f"iccid:{ICCID}"})
    assert body["items"] == [{"id": ICCID, "iccid": ICCID, "imsi1": "901405100000061",
                              "ip": "127.0.0.1"}]
    status, body = await api.call("GET", "/v1/inspect/devices", params={"sort": "colour"})
    assert status == 400


async def test_admin_log_filters(node: Simwire, api: Api, device: Device) -> None:
    await device.coap(b"hi")
    stranger = await UdpClient.open(("127.0.0.1", node.ports.coap), "127.0.0.70")
    await stranger.request(coap.serialize(coap.Message(coap.CON, coap.POST, 1)))
    stranger.close()
    await node.admin_logs.flush()
    status, body = await api.call("GET", "/v1/administrationLogs")
    assert [e["message"] for e in body["items"]] == [
        "DeviceIntegrator[UnauthorizedDevice]", "Lifecycle[DeviceFirstTimeRegistered]"]
    status, body = await api.call("GET", "/v1/administrationLogs",
                                  params={"q": "type:LIFECYCLE,category:info"})
    assert [e["iccid"] for e in body["items"]] == [ICCID]
    assert body["items"][0]["customerId"] == "default"
    status, body = await api.call("GET", "/v1/administrationLogs", params={"iccid": ICCID})
    assert len(body["items"]) == 1
    status, body = await api.call("GET", "/v1/administrationLogs",
                                  params={"q": f"startDateTime:{iso(T0 + 1)}"})
    assert body["items"] == []
    status, body = await api.call("GET", "/v1/administrationLogs", params={"q": "colour:red"})
    assert status == 400
