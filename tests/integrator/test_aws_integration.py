"""AWS IoT Core integrations end to end: device datagrams -> 1NCE topics, over MQTT/TLS with
a client certificate (real Mosquitto, `require_certificate true`) and over HTTPS
`iot-data publish` (real `moto_server`)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from integrator import coap
from simwire.app import Simwire
from tests.support.moto import published, reset
from tests.support.mqtt import Broker, Subscriber, start_mosquitto
from tests.support.net import UdpClient
from tests.support.pki import Pki, make_pki
from tests.support.simwire import Api, eventually, running

ICCID = "8988280666000000091"
IMSI = "901405100000091"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    with start_mosquitto(tmp_path / "mosquitto", pki) as b:
        yield b


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Simwire]:
    async with running(tmp_path / "d") as app:
        yield app


@pytest.fixture
async def api(node: Simwire, http: aiohttp.ClientSession) -> Api:
    client = await Api.login(node, http)
    await client.add_sim(ICCID, IMSI, "127.0.0.1")
    return client


async def send(node: Simwire) -> None:
    """A UDP datagram, a CoAP POST with `t=sensors/temp` and one without a topic."""
    u = await UdpClient.open(("127.0.0.1", node.ports.udp))
    u.send(b"udp-1")
    u.close()
    c = await UdpClient.open(("127.0.0.1", node.ports.coap))
    for mid, (topic, payload) in enumerate(((b"sensors/temp", b"coap-t"), (None, b"coap"))):
        opts = [(coap.OPT_URI_QUERY, b"t=" + topic)] if topic else []
        reply = await c.request(coap.serialize(
            coap.Message(coap.CON, coap.POST, mid + 1, b"", opts, payload)))
        assert coap.parse(reply).code == coap.CHANGED
    c.close()


def raw(envelope: dict[str, Any]) -> bytes:
    return base64.b64decode(envelope["payload"]["value"])


async def test_mqtt_topics_and_payloads(api: Api, node: Simwire, broker: Broker, pki: Pki
                                        ) -> None:
    cert, key = pki.client("simwire-integration")
    status, created = await api.call("POST", "/v1/integrate/clouds/aws", {
        "name": "iot core", "transport": "MQTT", "region": "eu-central-1",
        "endpoint": broker.host, "port": broker.port, "certificate": cert.read_text(),
        "privateKey": key.read_text(), "caCertificate": pki.ca_cert.read_text(),
        "connections": 2,
        "eventTypes": [{"type": "TELEMETRY_DATA"}, {"type": "LIFECYCLE"}],
    })
    assert status == 201, created
    assert created["type"] == "AWS" and created["state"] == "ROLLOUT_DONE"
    assert created["privateKey"] == "********"
    assert "BEGIN CERTIFICATE" in created["certificate"]
    async with Subscriber(broker, pki) as sub:
        await send(node)
        got = await sub.wait_for(4)
        by_topic = {topic: json.loads(body) for topic, body in got}
        assert set(by_topic) == {"lifecycle", f"{ICCID}/messages", f"{ICCID}/sensors/temp",
                                 ICCID}
        assert by_topic["lifecycle"]["type"] == "LIFECYCLE"
        assert raw(by_topic[f"{ICCID}/messages"]) == b"udp-1"
        assert by_topic[f"{ICCID}/messages"]["source"] == "UDP"
        assert raw(by_topic[f"{ICCID}/sensors/temp"]) == b"coap-t"
        assert by_topic[f"{ICCID}/sensors/temp"]["payload"]["topic"] == "sensors/temp"
        assert raw(by_topic[ICCID]) == b"coap"
        assert by_topic[ICCID]["device"] == {"iccid": ICCID, "imsi": IMSI, "ip": "127.0.0.1"}

        status, res = await api.call("POST", f"/v1/integrate/clouds/aws/{created['id']}/test")
        assert res["testStatus"] == "SUCCESS", res
        got = await sub.wait_for(5)
        assert got[-1][0] == "integration-status"
        assert json.loads(got[-1][1])["type"] == "TEST_MESSAGE"

    async def active() -> bool:
        _, body = await api.call("GET", f"/v1/integrate/clouds/{created['id']}")
        return bool(body["state"] == "INTEGRATION_ACTIVE")

    await eventually(active)


async def test_mqtt_certificate_from_another_ca_fails_the_test(
    api: Api, broker: Broker, tmp_path: Path,
) -> None:
    stranger = make_pki(tmp_path / "stranger")
    status, created = await api.call("POST", "/v1/integrate/clouds/aws", {
        "name": "wrong cert", "transport": "MQTT", "region": "eu-central-1",
        "endpoint": broker.host, "port": broker.port,
        "certificate": stranger.client_cert.read_text(),
        "privateKey": stranger.client_key.read_text(),
        "caCertificate": stranger.ca_cert.read_text(),
        "eventTypes": [{"type": "TELEMETRY_DATA"}],
    })
    assert status == 201
    status, res = await api.call("POST", f"/v1/integrate/clouds/{created['id']}/test")
    assert res["testStatus"] == "FAILURE"
    assert "PRIVATE" not in res["message"]


async def test_https_publish_through_moto(api: Api, node: Simwire, moto_url: str) -> None:
    reset(moto_url)
    status, created = await api.call("POST", "/v1/integrate/clouds/aws", {
        "name": "iot https", "transport": "HTTPS", "region": "eu-central-1",
        "endpointUrl": moto_url, "accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "s3cret-key",
        "eventTypes": [{"type": "TELEMETRY_DATA"}],
    })
    assert status == 201, created
    assert created["secretAccessKey"] == "********"
    await send(node)

    def got() -> list[tuple[str, bytes]]:
        return published(moto_url) if len(published(moto_url)) >= 3 else []

    messages = await eventually(got, timeout=10)
    topics = sorted(t for t, _ in messages)
    assert topics == sorted([f"{ICCID}/messages", f"{ICCID}/sensors/temp", ICCID])
    bodies = {t: json.loads(b) for t, b in messages}
    assert raw(bodies[f"{ICCID}/messages"]) == b"udp-1"


@pytest.mark.parametrize(("body", "props"), [
    ({"transport": "MQTT", "region": "r"}, {"endpoint", "certificate", "privateKey"}),
    ({"transport": "MQTT", "region": "r", "endpoint": "h", "certificate": "nope",
      "privateKey": "nope"}, {"certificate", "privateKey"}),
    ({"transport": "CARRIER_PIGEON", "region": "r"}, {"transport"}),
    ({"transport": "HTTPS"}, {"region"}),
    ({"transport": "HTTPS", "region": "r", "accessKeyId": "a"}, {"secretAccessKey"}),
    ({"transport": "HTTPS", "region": "r", "externalId": "x"}, {"externalId"}),
    ({"transport": "MQTT", "region": "r", "endpoint": "h", "certificate": "c",
      "privateKey": "k", "port": 0, "connections": 99}, {"port", "connections"}),
])
async def test_aws_validation(api: Api, body: dict[str, Any], props: set[str]) -> None:
    status, res = await api.call("POST", "/v1/integrate/clouds/aws", {
        "name": "n", "eventTypes": [{"type": "ERROR"}], **body})
    assert status == 422, res
    assert props <= {e["property"] for e in res["errors"]}
