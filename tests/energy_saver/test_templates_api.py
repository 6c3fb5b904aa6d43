"""Energy Saver over the API and the pipeline: templates, tester, savings, translation.

GIVEN a running Simwire (real sockets, SQLite) and a SIM, WHEN templates are managed through
/v1/optimize and the device sends, THEN the stored events, history, admin logs and savings
are those 1NCE users see.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from energy_saver.service import reduction
from simwire.app import Simwire
from simwire.clock import ManualClock
from simwire.model import DAY_MS, DEFAULT_ORG, Protocol, RawUplink
from tests.support.devices import Device
from tests.support.simwire import T0, Api, envelopes, running
from tests.support.tools import require_binary

ICCID = "8988280666000000071"
VECTORS = {v["name"]: v for v in json.loads(
    (Path(__file__).parents[2].parent / "shared/spec/vectors/bcl.json").read_text())["vectors"]}
DEMO = json.dumps(VECTORS["sdk_demo"]["template"])
FEATURES = json.dumps(VECTORS["features"]["template"])
DEMO_PAYLOAD = bytes.fromhex("016354322e322e31")
DEMO_JSON = ('{"data_type":"Energy_Saver","battery_level":99,"signal_strength":84,'
             '"software_version":"2.2.1"}')


@pytest.fixture
async def api(node: Simwire, http: aiohttp.ClientSession) -> Api:
    client = await Api.login(node, http)
    await client.add_sim(ICCID, "901405100000071", "127.0.0.1")
    return client


async def create(api: Api, template: str = DEMO, **fields: Any) -> dict[str, Any]:
    body = {"name": "demo", "template": template, "protocolFilter": ["COAP", "UDP"],
            "status": "ACTIVE", **fields}
    body = {k: v for k, v in body.items() if v is not None}  # None: leave the field out
    status, res = await api.call("POST", "/v1/optimize/templates", body)
    assert status == 201, res
    return dict(res)


async def history(api: Api) -> list[dict[str, Any]]:
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}/history",
                                  params={"pageSize": "100"})
    assert status == 200, body
    return list(body["items"])


async def test_template_crud_and_one_active_template_per_protocol(
        api: Api, clock: ManualClock) -> None:
    a = await create(api, protocolFilter=["COAP"])
    clock.advance(1)  # listed oldest first
    assert a == {"id": a["id"], "name": "demo", "template": DEMO, "status": "ACTIVE",
                 "protocolFilter": ["COAP"]}
    status, res = await api.call("POST", "/v1/optimize/templates", {
        "name": "b", "template": FEATURES, "protocolFilter": ["UDP", "COAP"], "status": "ACTIVE"})
    assert status == 409, res
    assert res["statusText"] == "Conflict" and "COAP" in res["errors"][0]["message"]
    b = await create(api, FEATURES, name="b", protocolFilter=["UDP", "COAP"], status="INACTIVE")
    clock.advance(1)
    status, res = await api.call("PATCH", f"/v1/optimize/templates/{b['id']}",
                                 {"status": "ACTIVE"})
    assert status == 409
    status, res = await api.call("PATCH", f"/v1/optimize/templates/{b['id']}",
                                 {"status": "ACTIVE", "protocolFilter": ["UDP"]})
    assert status == 200, res
    assert res["status"] == "ACTIVE" and res["protocolFilter"] == ["UDP"]
    defaults = await create(api, FEATURES, name="  c  ", protocolFilter=None, status=None)
    assert (defaults["name"], defaults["protocolFilter"], defaults["status"]) == (
        "c", ["COAP"], "INACTIVE")
    status, listing = await api.call("GET", "/v1/optimize/templates")
    assert [t["id"] for t in listing] == [a["id"], b["id"], defaults["id"]]
    status, one = await api.call("GET", f"/v1/optimize/templates/{a['id']}")
    assert status == 200 and one == a
    status, _ = await api.call("DELETE", f"/v1/optimize/templates/{a['id']}")
    assert status == 204
    status, _ = await api.call("GET", f"/v1/optimize/templates/{a['id']}")
    assert status == 404
    status, res = await api.call("PATCH", f"/v1/optimize/templates/{defaults['id']}",
                                 {"status": "ACTIVE"})
    assert status == 200, res  # COAP is free again


async def test_invalid_bodies_list_every_problem(api: Api) -> None:
    bad = json.dumps({"sense": [{"asset": "t", "value": {"byte": 0, "bytelength": 3,
                                                          "type": "int"}},
                                {"asset": "x", "value": {"byte": 0, "type": "float",
                                                         "calculation": "x*2"}}]})
    status, res = await api.call("POST", "/v1/optimize/templates", {
        "name": "", "template": bad, "protocolFilter": ["LWM2M"], "status": "ON", "x": 1})
    assert status == 422
    assert res["statusText"] == "Unprocessable Entity"
    assert res["errors"] == [
        {"property": "x", "message": "unknown property"},
        {"property": "name", "message": "is required: 1 to 64 characters"},
        {"property": "template", "path": "sense[0].value.bytelength",
         "message": "sense[0].value.bytelength: must be 1, 2, 4 or 8 for type int"},
        {"property": "template", "path": "sense[1].value.calculation",
         "message": "sense[1].value.calculation: calculations are not supported by BCL"},
        {"property": "template", "path": "sense[1].value.bytelength",
         "message": "sense[1].value.bytelength: must be 4 or 8 for type float"},
        {"property": "protocolFilter",
         "message": "must be a non-empty list of distinct protocols from UDP, COAP"},
        {"property": "status", "message": "must be ACTIVE or INACTIVE"},
    ]
    status, res = await api.call("POST", "/v1/optimize/templates",
                                 {"name": "n", "template": "{not json"})
    assert status == 422
    assert res["errors"][0]["message"].startswith("template: not valid JSON")
    t = await create(api)
    status, res = await api.call("PATCH", f"/v1/optimize/templates/{t['id']}", {})
    assert status == 422 and res["errors"][0]["property"] == "body"
    status, res = await api.call("PATCH", f"/v1/optimize/templates/{t['id']}",
                                 {"template": {"sense": []}})
    assert status == 422
    status, _ = await api.call("POST", "/v1/optimize/templates", [1])
    assert status == 422


async def test_tenants_and_roles(api: Api, node: Simwire, http: aiohttp.ClientSession) -> None:
    t = await create(api)
    status, sub = await api.call("POST", "/v1/clients", {
        "clientId": "other-org", "role": "admin", "organisation": "other"})
    other = await Api.login(node, http, "other-org", sub["clientSecret"])
    status, listing = await other.call("GET", "/v1/optimize/templates")
    assert (status, listing) == (200, [])
    for method, body in (("GET", None), ("PATCH", {"name": "x"}), ("DELETE", None)):
        status, _ = await other.call(method, f"/v1/optimize/templates/{t['id']}", body)
        assert status == 404, method
    other_t = await create(other)  # its own COAP claim: organisations are independent
    assert other_t["status"] == "ACTIVE"
    status, viewer = await api.call("POST", "/v1/clients", {
        "clientId": "viewer-1", "role": "viewer", "organisation": DEFAULT_ORG})
    v = await Api.login(node, http, "viewer-1", viewer["clientSecret"])
    status, _ = await v.call("GET", "/v1/optimize/templates")
    assert status == 200
    status, _ = await v.call("POST", "/v1/optimize/messages/test", {
        "template": DEMO, "payload": base64.b64encode(DEMO_PAYLOAD).decode()})
    assert status == 200
    for method, path, body in (
            ("POST", "/v1/optimize/templates", {"name": "n", "template": DEMO}),
            ("PATCH", f"/v1/optimize/templates/{t['id']}", {"name": "n"}),
            ("DELETE", f"/v1/optimize/templates/{t['id']}", None)):
        status, _ = await v.call(method, path, body)
        assert status == 403, (method, path)
    status, _ = await Api(api.base, http, None).call("GET", "/v1/optimize/templates")
    assert status == 401


async def test_the_template_tester(api: Api) -> None:
    status, res = await api.call("POST", "/v1/optimize/messages/test", {
        "template": DEMO, "payload": base64.b64encode(DEMO_PAYLOAD).decode()})
    assert status == 200, res
    reduced, percent = reduction(len(DEMO_JSON), 8)
    assert res == {"translatedPayload": DEMO_JSON, "reducedBytes": len(DEMO_JSON) - 8,
                   "energyUsageReduction": percent}
    assert (len(DEMO_JSON), reduced, percent) == (95, 87, 1.19)
    status, res = await api.call("POST", "/v1/optimize/messages/test", {
        "template": FEATURES, "payload": "ABo="})
    assert status == 400
    assert res["errors"] == [{"property": "payload", "message":
                              "Asset path:Humidity, Error: can't extract [2:4] from 2 bytes"}]
    status, res = await api.call("POST", "/v1/optimize/messages/test", {
        "template": "{}", "payload": "%%%"})
    assert status == 422
    assert [e["property"] for e in res["errors"]] == ["template", "payload"]


def test_energy_formula_matches_the_1nce_example() -> None:
    assert reduction(47, 10) == (37, 0.51)  # 0.481 mWh of 94.695 mWh


async def test_sdk_demo_over_coap_and_udp_is_translated(
        api: Api, node: Simwire, device: Device) -> None:
    await create(api)
    await device.coap(DEMO_PAYLOAD, topic="test")
    await device.udp(DEMO_PAYLOAD + b"\xaa\xbb")  # Zephyr's two garbage bytes
    items = await history(api)
    assert [(i["protocol"], i["payload"]) for i in items] == [
        ("UDP", DEMO_JSON), ("COAP", DEMO_JSON)]
    telemetry = [e for e in envelopes(node) if e["type"] == "TELEMETRY_DATA"]
    assert telemetry[0]["payload"] == {"type": "JSON", "value": json.loads(DEMO_JSON),
                                       "topic": "test"}
    assert telemetry[1]["payload"] == {"type": "JSON", "value": json.loads(DEMO_JSON)}
    status, state = await api.call("GET", f"/v1/inspect/devices/{ICCID}/telemetry",
                                   params={"protocol": "COAP"})
    assert status == 200 and state["state"]["payload"] == DEMO_JSON
    text = node.metrics.render().decode()
    assert 'simwire_translations_total{outcome="translated",protocol="COAP"} 1.0' in text
    assert 'simwire_translations_total{outcome="translated",protocol="UDP"} 1.0' in text


async def test_untranslatable_payload_is_an_error_event_and_kept_raw(
        api: Api, node: Simwire, device: Device) -> None:
    await create(api, FEATURES, protocolFilter=["UDP"])
    await device.udp(b"\x00\x1a")
    await device.coap(b"\x00\x1a")  # COAP has no template: stored raw, no error
    items = await history(api)
    raw = base64.b64encode(b"\x00\x1a").decode()
    assert [(i["protocol"], i["payload"]) for i in items] == [("COAP", raw), ("UDP", raw)]
    evs = envelopes(node)
    errors = [e for e in evs if e["type"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["error"] == {
        "id": errors[0]["id"], "type": "DEVICE", "message": "Translator[UserPayloadError]",
        "description": "Asset path:Humidity, Error: can't extract [2:4] from 2 bytes",
        "payloadExists": True}
    status, logs = await api.call("GET", "/v1/administrationLogs")
    assert [(entry["message"], entry["description"]) for entry in logs["items"]
            if entry["category"] == "error"] == [
        ("Translator[UserPayloadError]",
         "Asset path:Humidity, Error: can't extract [2:4] from 2 bytes")]
    text = node.metrics.render().decode()
    assert 'simwire_translations_total{outcome="failed",protocol="UDP"} 1.0' in text


async def test_changes_apply_to_the_next_message(api: Api, device: Device) -> None:
    t = await create(api, status="INACTIVE")
    await device.coap(DEMO_PAYLOAD)
    status, _ = await api.call("PATCH", f"/v1/optimize/templates/{t['id']}",
                               {"status": "ACTIVE"})
    assert status == 200
    await device.coap(DEMO_PAYLOAD)
    status, _ = await api.call("DELETE", f"/v1/optimize/templates/{t['id']}")
    await device.coap(DEMO_PAYLOAD)
    raw = base64.b64encode(DEMO_PAYLOAD).decode()
    assert [i["payload"] for i in await history(api)] == [raw, DEMO_JSON, raw]


async def test_lwm2m_is_never_translated(api: Api, node: Simwire) -> None:
    await create(api)
    raw = RawUplink(Protocol.LWM2M, "127.0.0.1", 5683, DEMO_PAYLOAD, T0)
    payload = node.translator.translate(DEFAULT_ORG, raw)
    assert payload.translated is False and payload.raw == DEMO_PAYLOAD  # type: ignore[union-attr]


async def test_another_process_change_is_picked_up_by_refresh(
        tmp_path: Path, node: Simwire, api: Api, clock: ManualClock) -> None:
    async with running(tmp_path / "d", clock=clock) as second:  # same SQLite file
        await create(api)
        raw = RawUplink(Protocol.COAP, "127.0.0.1", 5683, DEMO_PAYLOAD, T0)
        assert not second.translator.translate(DEFAULT_ORG, raw).translated  # type: ignore[union-attr]
        await second.translator.refresh()
        assert second.translator.translate(DEFAULT_ORG, raw).translated  # type: ignore[union-attr]


async def test_savings_per_day_range_with_delta(
        api: Api, node: Simwire, http: aiohttp.ClientSession, device: Device,
        clock: ManualClock) -> None:
    await create(api)
    await device.coap(DEMO_PAYLOAD)          # day 0
    clock.advance(DAY_MS / 1000)
    api.token = (await Api.login(node, http)).token  # the old one expired
    await device.coap(DEMO_PAYLOAD)          # day 1
    await device.udp(DEMO_PAYLOAD + b"\0\0")  # day 1, 10 bytes on the air
    await device.udp(b"\x05")                # no case: {} translated, JSON "{}" (2 bytes)
    saved = len(DEMO_JSON) - 8
    status, res = await api.call("GET", "/v1/optimize/savings", params={"range": "1"})
    assert status == 200, res
    total = saved + (len(DEMO_JSON) - 10) + (2 - 1)
    assert res == {
        "messagesTranslated": {"value": 3, "delta": 2},
        "averageBytesReducedPerMessage": {"value": round(total / 3, 2),
                                          "delta": round(total / 3 - saved, 2)},
        "bytesSaved": {"value": total, "delta": total - saved},
    }
    status, res = await api.call("GET", "/v1/optimize/savings",
                                 params={"range": "7", "protocol": "COAP", "iccid": ICCID})
    assert res["messagesTranslated"] == {"value": 2, "delta": 2}
    assert res["bytesSaved"] == {"value": 2 * saved, "delta": 2 * saved}
    status, res = await api.call("GET", "/v1/optimize/savings", params={"iccid": "8988" + "0" * 15})
    assert res["messagesTranslated"]["value"] == 0
    status, res = await api.call("GET", "/v1/optimize/savings",
                                 params={"range": "2", "protocol": "LWM2M", "iccid": "x"})
    assert status == 400
    assert [e["property"] for e in res["errors"]] == ["range", "protocol", "iccid"]


@pytest.mark.interop
async def test_coap_client_posting_the_sdk_demo_payload(
        api: Api, node: Simwire, tmp_path: Path) -> None:
    """End to end: a real CoAP client, the SDK demo payload, the template ACTIVE."""
    exe = require_binary("coap-client-openssl")
    await create(api)
    payload_file = tmp_path / "payload.bin"
    payload_file.write_bytes(DEMO_PAYLOAD)
    proc = await asyncio.create_subprocess_exec(
        exe, "-m", "post", "-f", str(payload_file), "-B", "5",
        f"coap://127.0.0.1:{node.ports.coap}/?t=test",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    items = await history(api)
    assert [(i["protocol"], i["payload"], i.get("topic")) for i in items] == [
        ("COAP", DEMO_JSON, "test")]


def test_cli_templates_test(tmp_path: Path) -> None:
    import subprocess
    template = tmp_path / "t.json"
    template.write_text(DEMO)
    run = subprocess.run([sys.executable, "-m", "simwire.cli", "templates", "test", str(template),
                          "016354322e322e31"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"translatedPayload": DEMO_JSON,
                                      "reducedBytes": len(DEMO_JSON) - 8,
                                      "energyUsageReduction": 1.19}
    run = subprocess.run([sys.executable, "-m", "simwire.cli", "templates", "test", str(template),
                          "01"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip() == (
        "Asset path:battery_level, Error: can't extract [1:2] from 1 bytes")
    template.write_text('{"sense": [{"asset": "a", "value": {"byte": 0, "type": "int", '
                        '"bytelength": 3}}, {"asset": ""}]}')
    run = subprocess.run([sys.executable, "-m", "simwire.cli", "templates", "test", str(template),
                          "00"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "sense[0].value.bytelength: must be 1, 2, 4 or 8 for type int",
        "sense[1].asset: must be a non-empty string",
        "sense[1].value: is required (a constant or a payload selector)",
    ]


class Positions:
    """A PositionSink that remembers what the pipeline hands to the locator."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float, float, int]] = []

    def report_position(self, device: Any, lat: float, lon: float, received_ms: int) -> None:
        self.seen.append((device.iccid, lat, lon, received_ms))


async def test_custom_type_positions_go_to_the_locator_after_commit(
        api: Api, node: Simwire, device: Device) -> None:
    positions = Positions()
    node.pipeline._positions = positions
    template = {"sense": [
        {"asset": "lat", "custom_type": "location_lat",
         "value": {"byte": 0, "bytelength": 8, "type": "float", "byteorder": "little"}},
        {"asset": "lng", "custom_type": "location_long",
         "value": {"byte": 8, "bytelength": 8, "type": "float", "byteorder": "little"}}]}
    await create(api, json.dumps(template), protocolFilter=["UDP"])
    await device.udp(struct.pack("<dd", 50.9375, 6.9603))
    await device.udp(b"\x00")  # too short: no translation, no position
    assert positions.seen == [(ICCID, 50.9375, 6.9603, T0)]
    assert [i["payload"] for i in await history(api)][1] == '{"lat":50.9375,"lng":6.9603}'
