from __future__ import annotations

from simwire.app import Simwire
from tests.support.net import UdpClient
from tests.support.simwire import Api, eventually

ICCID = "8988280666000000001"


async def test_coap_vector_reaches_history(app: Simwire, api: Api) -> None:
    await api.add_sim(ICCID, "901405100000001", "127.0.0.1")
    c = await UdpClient.open(("127.0.0.1", app.ports.coap))
    reply = await c.request(bytes.fromhex("40020001d602743d74657374ff016354322e322e31"))
    assert reply == bytes.fromhex("60440001")
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}/history")
    assert status == 200
    assert body["items"][0]["payload"] == "AWNUMi4yLjE="
    assert body["items"][0]["topic"] == "test"
    u = await UdpClient.open(("127.0.0.1", app.ports.udp))
    u.send(b"hello\x00")

    async def two() -> object:
        _, b = await api.call("GET", f"/v1/inspect/devices/{ICCID}/history")
        return len(b["items"]) == 2 and b
    body = await eventually(two)
    assert body["items"][0]["protocol"] == "UDP"
    c.close()
    u.close()
