"""Webhook integrations end to end: a real HTTPS receiver (aiohttp, test CA trusted by
Simwire), real device datagrams, the retry schedule on the manual clock."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from simwire.app import Simwire
from simwire.clock import ManualClock
from simwire.model import DEFAULT_ORG
from tests.support.devices import Device
from tests.support.net import UdpClient, free_port
from tests.support.pki import Pki, make_pki
from tests.support.simwire import Api, eventually, running
from tests.support.webhook import Receiver, receiver

T0 = 1_767_225_600_000
ICCID = "8988280666000000071"
IMSI = "901405100000071"
TELEMETRY = [{"type": "TELEMETRY_DATA"}]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def hook(pki: Pki) -> AsyncIterator[Receiver]:
    async with receiver(pki) as rec:
        yield rec


@pytest.fixture
async def node(tmp_path: Path, pki: Pki, clock: ManualClock) -> AsyncIterator[Simwire]:
    async with running(tmp_path / "d", clock=clock, webhook_ca_file=pki.ca_cert,
                       delivery_timeout_s=1.0) as app:
        yield app


@pytest.fixture
async def api(node: Simwire, http: aiohttp.ClientSession) -> Api:
    client = await Api.login(node, http)
    await client.add_sim(ICCID, IMSI, "127.0.0.1")
    return client


async def create(api: Api, url: str, **kw: Any) -> dict[str, Any]:
    body = {"name": kw.pop("name", "hook"), "url": url, "headers": kw.pop("headers", {}),
            "eventTypes": kw.pop("eventTypes", TELEMETRY), **kw}
    status, created = await api.call("POST", "/v1/integrate/clouds/webhooks", body)
    assert status == 201, created
    return created  # type: ignore[no-any-return]


async def get(api: Api, integration_id: str) -> dict[str, Any]:
    status, body = await api.call("GET", f"/v1/integrate/clouds/{integration_id}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def payloads(requests: list[Any]) -> list[bytes]:
    return [base64.b64decode(r.json["payload"]["value"]) for r in requests]


async def wait_sleeping(clock: ManualClock, gap: float) -> None:
    await eventually(lambda: clock.sleeping == [gap])


# -- delivery -------------------------------------------------------------------------------


async def test_delivers_signed_envelope_with_placeholders(
    api: Api, device: Device, hook: Receiver, clock: ManualClock,
) -> None:
    created = await create(
        api, hook.url + "/in/:iccid:?imsi=:imsi:&x=:nope:",
        headers={"Authorization": "Bearer abc", "X-Device-Ip": ":ip:", "X-Keep": ":nope:"},
        eventTypes=[{"type": "TELEMETRY_DATA", "version": "1.0.0"}, {"type": "LIFECYCLE"}],
    )
    assert created["state"] == "ROLLOUT_DONE"
    assert created["type"] == "WEBHOOK"
    secret = created["signingSecret"]
    await device.udp(b"hello")

    lifecycle, telemetry = await hook.wait_for(2)
    assert lifecycle.json["type"] == "LIFECYCLE"
    assert lifecycle.json["lifecycle"]["type"] == "DEVICE_FIRST_TIME_REGISTERED"
    got = telemetry
    assert got.method == "POST"
    assert got.path == f"/in/{ICCID}"
    assert got.query == {"imsi": IMSI, "x": ":nope:"}
    assert got.headers["Authorization"] == "Bearer abc"
    assert got.headers["X-Device-Ip"] == "127.0.0.1"
    assert got.headers["X-Keep"] == ":nope:"
    assert got.headers["Content-Type"] == "application/json"
    env = got.json
    assert env == {
        "id": env["id"], "type": "TELEMETRY_DATA", "version": "1.0.0", "received": str(T0),
        "device": {"iccid": ICCID, "imsi": IMSI, "ip": "127.0.0.1"}, "source": "UDP",
        "payload": {"type": "STRING", "value": base64.b64encode(b"hello").decode(),
                    "encoding": "base64"},
    }
    assert got.headers["Idempotency-Key"] == env["id"] == got.headers["X-Simwire-Event-Id"]
    ts = got.headers["X-Simwire-Timestamp"]
    assert ts == str(T0 // 1000)
    expected = hmac.new(secret.encode(), ts.encode() + b"." + got.body, hashlib.sha256)
    assert got.headers["X-Simwire-Signature"] == "v1=" + expected.hexdigest()

    state = await eventually(lambda: _active(api, created["id"]))
    assert state["lastSuccessfulMessageDelivery"] == "2026-01-01T00:00:00.000Z"
    assert state["queueDepth"] == 0
    assert "signingSecret" not in state


async def _active(api: Api, integration_id: str) -> dict[str, Any] | None:
    body = await get(api, integration_id)
    return body if body["state"] == "INTEGRATION_ACTIVE" else None


async def test_coap_topic_and_json_payload(api: Api, device: Device, hook: Receiver) -> None:
    await create(api, hook.url + "/json", jsonPayloadEnabled=True)
    await device.coap(b'{"t": 21.5}\x00', topic="sensors/temp")
    await device.coap(b"\xff\x00not json")
    first, second = await hook.wait_for(2)
    assert first.json["source"] == "COAP"
    assert first.json["payload"] == {"type": "JSON", "value": {"t": 21.5},
                                     "topic": "sensors/temp"}
    assert second.json["payload"] == {
        "type": "STRING", "value": base64.b64encode(b"\xff\x00not json").decode(),
        "encoding": "base64"}


async def test_per_device_order_with_many_devices(
    tmp_path: Path, pki: Pki, clock: ManualClock, http: aiohttp.ClientSession, hook: Receiver,
) -> None:
    hook.delay_s = 0.002
    async with running(tmp_path / "d", clock=clock, webhook_ca_file=pki.ca_cert) as node:
        api = await Api.login(node, http)
        devices = []
        for n in range(5):
            iccid = f"89882806660000001{n:02d}"
            await api.add_sim(iccid, f"9014051000001{n:02d}", f"127.0.0.{n + 10}")
            devices.append(await UdpClient.open(("127.0.0.1", node.ports.udp), f"127.0.0.{n + 10}"))
        await create(api, hook.url)
        for k in range(20):
            for d in devices:
                d.send(f"{k}".encode())
        got = await hook.wait_for(100, timeout=20)
        by_device: dict[str, list[int]] = {}
        for r in got:
            by_device.setdefault(r.json["device"]["iccid"], []).append(
                int(base64.b64decode(r.json["payload"]["value"])))
        assert len(by_device) == 5
        # UDP may reorder on the way in, never on the way out: the stream per device is
        # the order of the history (stored order)
        for iccid, seen in by_device.items():
            status, hist = await api.call("GET", f"/v1/inspect/devices/{iccid}/history",
                                          params={"pageSize": "100"})
            stored = [int(base64.b64decode(i["payload"])) for i in hist["items"]][::-1]
            assert seen == stored
        for d in devices:
            d.close()


# -- failures, retries, restart ---------------------------------------------------------------


async def test_retry_schedule_and_recovery(
    api: Api, device: Device, hook: Receiver, clock: ManualClock, node: Simwire,
) -> None:
    created = await create(api, hook.url)
    hook.fail_always(503)
    await device.udp(b"one", b"two")
    await hook.wait_requests(1)
    await wait_sleeping(clock, 150.0)
    assert len(hook.requests) == 1  # one device: its second event waits behind the first
    clock.advance(149)
    await asyncio.sleep(0.05)
    assert len(hook.requests) == 1
    clock.advance(1)
    await hook.wait_requests(2)
    await wait_sleeping(clock, 180.0)
    body = await get(api, created["id"])
    assert body["state"] == "ROLLOUT_DONE"
    assert body["queueDepth"] == 2
    hook.recover()
    clock.advance(180)
    got = await hook.wait_for(2)
    assert payloads(got) == [b"one", b"two"]
    assert got[0].json["id"] == hook.requests[0].json["id"]  # a retry repeats the event id
    await eventually(lambda: _active(api, created["id"]))
    sample = node.metrics.registry.get_sample_value
    assert sample("simwire_integration_failed_attempts_total",
                  {"integration": created["id"]}) == 2
    assert sample("simwire_integration_delivered_total", {"integration": created["id"]}) == 2


async def fail_five_times(clock: ManualClock, hook: Receiver) -> None:
    for n, gap in enumerate((150.0, 180.0, 420.0, 1020.0), start=1):
        await hook.wait_requests(n)
        await wait_sleeping(clock, gap)
        clock.advance(gap)
    await hook.wait_requests(5)


async def test_failed_after_five_attempts_then_restart_replays(
    api: Api, device: Device, hook: Receiver, clock: ManualClock, node: Simwire,
) -> None:
    created = await create(api, hook.url, eventTypes=[{"type": "TELEMETRY_DATA"},
                                                      {"type": "ERROR"}])
    iid = created["id"]
    hook.fail_always(500)
    await device.udp(b"a", b"b")
    await fail_five_times(clock, hook)
    failed = await eventually(lambda: _state(api, iid, "INTEGRATION_FAILED"))
    assert failed["error"] == "HTTP 500 Internal Server Error: nope"
    async def disabled_logs() -> list[dict[str, Any]]:  # admin logs are written in batches
        status, logs = await api.call("GET", "/v1/administrationLogs")
        return [e for e in logs["items"]
                if e["message"] == "CloudIntegrator[IntegrationDisabled]"]

    disabled = await eventually(disabled_logs)
    assert len(disabled) == 1
    assert iid in disabled[0]["description"] and "hook" in disabled[0]["description"]
    assert disabled[0]["type"] == "INTEGRATION" and disabled[0]["category"] == "error"

    # nothing is dropped while failed: new events queue up (the ERROR event too)
    await device.udp(b"c")
    await eventually(lambda: _depth(api, iid, 4))
    clock.advance(1000)  # (the API token lives 3600 s of this clock)
    await asyncio.sleep(0.1)
    assert len(hook.requests) == 5

    # restart against a receiver still failing: FAILURE, state unchanged
    status, res = await api.call("POST", f"/v1/integrate/clouds/webhooks/{iid}/restart")
    assert status == 200
    assert res["restartStatus"] == "FAILURE"
    assert res["integration"]["state"] == "INTEGRATION_FAILED"

    hook.recover()
    status, res = await api.call("POST", f"/v1/integrate/clouds/webhooks/{iid}/restart")
    assert res["restartStatus"] == "SUCCESS", res
    got = await hook.wait_for(5)
    assert got[0].json["type"] == "TEST_MESSAGE"
    assert got[0].json["integration"] == {"id": iid, "name": "hook"}
    # the device's events in order; the ERROR event (no device) is a chain of its own
    assert payloads([r for r in got[1:] if r.json["type"] == "TELEMETRY_DATA"]) == [
        b"a", b"b", b"c"]
    (error,) = [r.json for r in got[1:] if r.json["type"] == "ERROR"]
    assert error["error"]["message"] == "CloudIntegrator[IntegrationDisabled]"
    assert error["error"]["type"] == "INTEGRATION"
    assert "device" not in error
    await eventually(lambda: _state(api, iid, "INTEGRATION_ACTIVE"))


async def _state(api: Api, iid: str, state: str) -> dict[str, Any] | None:
    body = await get(api, iid)
    return body if body["state"] == state else None


async def _depth(api: Api, iid: str, depth: int) -> bool:
    return (await get(api, iid))["queueDepth"] == depth


@pytest.mark.parametrize(("behaviour", "error"), [
    ("404", "HTTP 404 Not Found: nope"),
    ("timeout", "no answer within 1 s"),
    ("refused", "ClientConnectorError"),
])
async def test_failures_are_retried(
    api: Api, device: Device, hook: Receiver, clock: ManualClock, behaviour: str, error: str,
) -> None:
    url = hook.url
    if behaviour == "404":
        hook.fail_always(404)
    elif behaviour == "timeout":
        hook.hang()
    else:
        url = f"https://127.0.0.1:{free_port()}"
    created = await create(api, url)
    await device.udp(b"x")
    await wait_sleeping(clock, 150.0)
    body = await get(api, created["id"])
    assert body["queueDepth"] == 1
    assert body["state"] == "ROLLOUT_DONE"
    assert body["error"].startswith(error)
    assert body["error"].endswith("(attempt 1 of 5; next in 150 s)")
    hook.recover()
    clock.advance(150)
    if behaviour != "refused":
        await hook.wait_for(1)
        done = await eventually(lambda: _state(api, created["id"], "INTEGRATION_ACTIVE"))
        assert done["error"] is None


async def test_untrusted_certificate_fails(
    tmp_path: Path, clock: ManualClock, http: aiohttp.ClientSession, hook: Receiver,
) -> None:
    async with running(tmp_path / "d", clock=clock) as node:  # the test CA is not trusted
        api = await Api.login(node, http)
        status, created = await api.call("POST", "/v1/integrate/clouds/webhooks", {
            "name": "h", "url": hook.url, "headers": {}, "eventTypes": TELEMETRY})
        status, res = await api.call("POST", f"/v1/integrate/clouds/{created['id']}/test")
        assert res["testStatus"] == "FAILURE"
        assert "certificate" in res["message"].lower() or "TLS" in res["message"]
        assert hook.requests == []


async def test_slow_webhook_does_not_slow_ingest_or_other_integrations(
    api: Api, device: Device, pki: Pki, clock: ManualClock,
) -> None:
    async with receiver(pki) as slow, receiver(pki) as fast:
        slow.hang()
        await create(api, slow.url, name="slow")
        await create(api, fast.url, name="fast")
        for k in range(20):
            await device.coap(f"m{k}".encode())  # every POST answered 2.04 once stored
        got = await fast.wait_for(20)
        assert payloads(got) == [f"m{k}".encode() for k in range(20)]
        assert len(slow.requests) == 1


# -- test endpoint and API -----------------------------------------------------------------


async def test_test_message(api: Api, hook: Receiver) -> None:
    created = await create(api, hook.url + "/t/:iccid:", headers={"X-Imsi": ":imsi:"})
    status, res = await api.call("POST", f"/v1/integrate/clouds/webhooks/{created['id']}/test")
    assert (status, res) == (200, {"testStatus": "SUCCESS", "message": "Test message delivered"})
    (got,) = await hook.wait_for(1)
    assert got.path == "/t/none"
    assert got.headers["X-Imsi"] == "none"
    assert got.json["type"] == "TEST_MESSAGE"
    assert got.json["integration"] == {"id": created["id"], "name": "hook"}
    assert "device" not in got.json
    assert (await get(api, created["id"]))["state"] == "ROLLOUT_DONE"  # unchanged
    hook.fail_always(502)
    status, res = await api.call("POST", f"/v1/integrate/clouds/{created['id']}/test")
    assert res == {"testStatus": "FAILURE", "message": "HTTP 502 Bad Gateway: nope"}


@pytest.mark.parametrize(("body", "prop"), [
    ({"url": "https://a.test", "eventTypes": TELEMETRY}, "name"),
    ({"name": "x" * 129, "url": "https://a.test", "eventTypes": TELEMETRY}, "name"),
    ({"name": "n", "url": "http://a.test", "eventTypes": TELEMETRY}, "url"),
    ({"name": "n", "url": "ftp://a.test", "eventTypes": TELEMETRY}, "url"),
    ({"name": "n", "url": "https://", "eventTypes": TELEMETRY}, "url"),
    ({"name": "n", "url": "https://a.test:99999/", "eventTypes": TELEMETRY}, "url"),
    ({"name": "n", "url": "https://a.test", "eventTypes": []}, "eventTypes"),
    ({"name": "n", "url": "https://a.test", "eventTypes": [{"type": "NOPE"}]},
     "eventTypes[0].type"),
    ({"name": "n", "url": "https://a.test", "eventTypes": [{"type": "TEST_MESSAGE"}]},
     "eventTypes[0].type"),
    ({"name": "n", "url": "https://a.test",
      "eventTypes": [{"type": "ERROR", "version": "2.0.0"}]}, "eventTypes[0].version"),
    ({"name": "n", "url": "https://a.test", "eventTypes": TELEMETRY, "headers": {"a": {"b": 1}}},
     "headers.a"),
    ({"name": "n", "url": "https://a.test", "eventTypes": TELEMETRY,
      "headers": {"Content-Type": "x"}}, "headers.Content-Type"),
    ({"name": "n", "url": "https://a.test", "eventTypes": TELEMETRY,
      "headers": {"X-Simwire-Signature": "x"}}, "headers.X-Simwire-Signature"),
    ({"name": "n", "url": "https://a.test", "eventTypes": TELEMETRY,
      "headers": {"bad name": "x"}}, "headers.bad name"),
    ({"name": "n", "url": "https://a.test", "eventTypes": TELEMETRY,
      "headers": {"X-A": "a\r\nb"}}, "headers.X-A"),
    ({"name": "n", "url": "https://a.test", "eventTypes": TELEMETRY,
      "jsonPayloadEnabled": "yes"}, "jsonPayloadEnabled"),
])
async def test_create_rejects_bad_bodies(api: Api, body: dict[str, Any], prop: str) -> None:
    status, res = await api.call("POST", "/v1/integrate/clouds/webhooks", body)
    assert status == 422, res
    assert res["statusText"] == "Unprocessable Entity"
    assert prop in [e["property"] for e in res["errors"]]


async def test_create_reports_every_problem(api: Api) -> None:
    status, res = await api.call("POST", "/v1/integrate/clouds/webhooks", {"url": "http://x"})
    assert status == 422
    assert {e["property"] for e in res["errors"]} == {"name", "url", "eventTypes"}
    status, res = await api.call("POST", "/v1/integrate/clouds/webhooks", ["x"])
    assert status == 422


async def test_crud_unique_url_and_tenancy(
    api: Api, node: Simwire, http: aiohttp.ClientSession, clock: ManualClock,
) -> None:
    a = await create(api, "https://a.test/hook", name="a")
    clock.advance(0.001)  # listed oldest first
    status, res = await api.call("POST", "/v1/integrate/clouds/webhooks", {
        "name": "dup", "url": "https://a.test/hook", "headers": {}, "eventTypes": TELEMETRY})
    assert status == 409, res
    b = await create(api, "https://b.test/hook", name="b")
    status, listing = await api.call("GET", "/v1/integrate/clouds", params={"pageSize": "1"})
    assert status == 200
    assert [i["id"] for i in listing["items"]] == [a["id"]]
    assert listing["pageAmount"] == 2

    status, patched = await api.call("PATCH", f"/v1/integrate/clouds/webhooks/{b['id']}", {
        "url": "https://a.test/hook"})
    assert status == 409
    status, patched = await api.call("PATCH", f"/v1/integrate/clouds/webhooks/{b['id']}", {
        "name": "b2", "headers": {"X-A": "1"}, "eventTypes": [{"type": "ERROR"}],
        "rotateSigningSecret": True})
    assert status == 200, patched
    assert patched["name"] == "b2" and patched["headers"] == {"X-A": "1"}
    assert patched["eventTypes"] == [{"type": "ERROR", "version": "1.0.0"}]
    assert patched["url"] == "https://b.test/hook"
    assert len(patched["signingSecret"]) >= 40
    status, _ = await api.call("PATCH", f"/v1/integrate/clouds/{b['id']}", {"name": ""})
    assert status == 422

    # another organisation sees none of it
    status, sub = await api.call("POST", "/v1/clients", {
        "clientId": "other-org", "role": "admin", "organisation": "other"})
    assert status == 201, sub
    other = await Api.login(node, http, "other-org", sub["clientSecret"])
    status, listing = await other.call("GET", "/v1/integrate/clouds")
    assert listing["items"] == []
    for method, path in (("GET", ""), ("DELETE", ""), ("PATCH", ""), ("POST", "/test"),
                         ("POST", "/restart")):
        status, res = await other.call(method, f"/v1/integrate/clouds/{a['id']}{path}",
                                       {} if method == "PATCH" else None)
        assert status == 404, (method, path, res)

    status, _ = await api.call("DELETE", f"/v1/integrate/clouds/{a['id']}")
    assert status == 204
    status, _ = await api.call("GET", f"/v1/integrate/clouds/{a['id']}")
    assert status == 404
    assert node.dispatcher.worker_state(a["id"]) is None
    assert node.dispatcher.worker_state(b["id"]) is not None


async def test_roles_and_tokens(api: Api, node: Simwire, http: aiohttp.ClientSession) -> None:
    status, viewer = await api.call("POST", "/v1/clients", {
        "clientId": "viewer-1", "role": "viewer", "organisation": DEFAULT_ORG})
    assert status == 201
    v = await Api.login(node, http, "viewer-1", viewer["clientSecret"])
    status, _ = await v.call("GET", "/v1/integrate/clouds")
    assert status == 200
    status, res = await v.call("POST", "/v1/integrate/clouds/webhooks", {
        "name": "n", "url": "https://a.test", "headers": {}, "eventTypes": TELEMETRY})
    assert status == 403, res
    anonymous = Api(api.base, http, None)
    status, _ = await anonymous.call("GET", "/v1/integrate/clouds")
    assert status == 401


async def test_event_types(api: Api) -> None:
    status, res = await api.call("GET", "/v1/integrate/clouds/eventTypes")
    assert status == 200
    names = [t["name"] for t in res["eventTypes"]]
    assert names == ["TELEMETRY_DATA", "LIFECYCLE", "ERROR", "GEOFENCE", "LOCATION",
                     "TEST_MESSAGE"]
    assert all(t["version"] == "1.0.0" and t["description"] for t in res["eventTypes"])
    assert json.dumps(res)  # payload examples are JSON


async def test_http_only_when_allowed(
    tmp_path: Path, clock: ManualClock, http: aiohttp.ClientSession,
) -> None:
    async with receiver(None) as plain, running(tmp_path / "d", clock=clock,
                                                 webhook_allow_http=True) as node:
        api = await Api.login(node, http)
        created = await create(api, plain.url)
        status, res = await api.call("POST", f"/v1/integrate/clouds/{created['id']}/test")
        assert res["testStatus"] == "SUCCESS"
        assert (await plain.wait_for(1))[0].json["type"] == "TEST_MESSAGE"
