"""The device-side example talks to a real Simwire exactly like the blueprints."""

from __future__ import annotations

import asyncio

from sdk_examples.device import coap_post, send_coap, send_udp
from simwire.app import Simwire
from simwire.model import Sim
from simwire.ports import HistoryQuery
from tests.support.simwire import eventually

ICCID = "8988280666000000091"


def test_coap_post_matches_the_freertos_datagram() -> None:
    assert coap_post(1, bytes.fromhex("016354322e322e31"), "test", True) == bytes.fromhex(
        "40020001d602743d74657374ff016354322e322e31")
    # "t=" + 20 chars = 22 bytes: delta 13+2, length 13+9
    long_topic = coap_post(1, b"x", "a" * 20, True)
    assert long_topic[4:7] == b"\xdd\x02\x09"
    assert long_topic[7:29] == b"t=" + b"a" * 20
    non = coap_post(0x1234, b"p", None, False)
    assert non[0] == 0x58 and non[2:4] == b"\x12\x34" and non[12:] == b"\xffp"


async def test_example_device_sends_udp_and_coap(app: Simwire) -> None:
    await app.store.create(Sim(ICCID, "901405100000091", "127.0.0.1"))
    code = await asyncio.to_thread(send_coap, "127.0.0.1", app.ports.coap, b"c", "t1")
    assert code == "2.04"
    code = await asyncio.to_thread(send_coap, "127.0.0.1", app.ports.coap, b"n", None, False)
    assert code == "2.04"
    await asyncio.to_thread(send_udp, "127.0.0.1", app.ports.udp, b"u")

    async def three() -> list[tuple[str, str | None]] | None:
        page = await app.store.history(HistoryQuery(ICCID, 0, 2**62))
        items = sorted((i.payload, i.topic or "") for i in page.items)
        return items if len(items) == 3 else None

    assert await eventually(three) == [("Yw==", "t1"), ("bg==", ""), ("dQ==", "")]
