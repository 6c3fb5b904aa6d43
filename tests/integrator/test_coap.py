"""CoAP endpoint specifics: firmware vectors byte for byte, topics, dedup, NON, routing."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from integrator import coap
from integrator.endpoints import coap as coap_endpoint
from integrator.endpoints.coap import (
    CONTINUE,
    REQUEST_ENTITY_INCOMPLETE,
    BlockTransfers,
    DedupCache,
    Pending,
)
from integrator.pipeline import Ack
from simwire.app import Simwire
from simwire.clock import ManualClock
from simwire.metrics import Metrics
from simwire.model import RawUplink, Sim
from tests.support.net import UdpClient
from tests.support.simwire import running
from tests.support.tools import require_binary

ICCID = "8988280666000000021"
VECTORS = json.loads(
    (Path(__file__).parents[2].parent / "shared/spec/vectors/coap.json").read_text()
)["datagrams"]


def vector(name: str) -> dict[str, str]:
    return next(v for v in VECTORS if v["name"] == name)


@pytest.fixture
async def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def node(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Simwire]:
    async with running(tmp_path / "d", clock=clock) as app:
        await app.store.create(Sim(ICCID, "901405100000021", "127.0.0.1"))
        yield app


@pytest.fixture
async def dev(node: Simwire) -> AsyncIterator[UdpClient]:
    client = await UdpClient.open(("127.0.0.1", node.ports.coap))
    yield client
    client.close()


async def stored(app: Simwire) -> list[tuple[str, str | None]]:
    from simwire.ports import HistoryQuery

    page = await app.store.history(HistoryQuery(ICCID, 0, 2**62, page_size=100))
    return [(i.payload, i.topic) for i in page.items]


def req(mtype: int, code: int, mid: int, token: bytes = b"",
        options: list[tuple[int, bytes]] | None = None, payload: bytes = b"") -> bytes:
    return coap.serialize(coap.Message(mtype, code, mid, token, options or [], payload))


async def test_freertos_con_post_gets_exact_ack(node: Simwire, dev: UdpClient) -> None:
    v = vector("freertos_con_post")
    assert await dev.request(bytes.fromhex(v["hex"])) == bytes.fromhex(v["server_reply_hex"])
    assert await stored(node) == [("AWNUMi4yLjE=", "test")]


async def test_zephyr_non_post_gets_non_changed_with_token(node: Simwire, dev: UdpClient) -> None:
    reply = coap.parse(await dev.request(bytes.fromhex(vector("zephyr_non_post")["hex"])))
    assert (reply.mtype, reply.code) == (coap.NON, coap.CHANGED)
    assert reply.token == bytes.fromhex("0102030405060708")
    assert reply.payload == b"" and reply.options == []
    assert await stored(node) == [("AWNUMi4yLjE=", "test")]


async def test_sdk_bootstrap_request_is_parsed_and_answered(dev: UdpClient) -> None:
    # /bootstrap itself is the Device Authenticator's; the ingest endpoint must parse the
    # SDK's NON GET (Uri-Host + Uri-Path) and answer it in CoAP terms, never crash.
    reply = coap.parse(await dev.request(bytes.fromhex(vector("sdk_bootstrap_request")["hex"])))
    assert reply.mtype == coap.NON
    assert reply.code in (coap.CONTENT, coap.NOT_FOUND)


async def test_device_ack_of_a_downlink_is_ignored(node: Simwire, dev: UdpClient) -> None:
    dev.send(bytes.fromhex(vector("controller_downlink_and_ack")["device_ack_hex"]))
    await dev.expect_silence()
    reply = coap.parse(await dev.request(
        bytes.fromhex(vector("controller_downlink_and_ack")["hex"])))
    assert (reply.mtype, reply.code) == (coap.ACK, coap.NOT_FOUND)  # not an ingest path
    assert await stored(node) == []


@pytest.mark.parametrize("path", [[], [b""], [b"data"]])
async def test_ingest_paths(node: Simwire, dev: UdpClient, path: list[bytes]) -> None:
    opts = [(coap.OPT_URI_PATH, p) for p in path]
    reply = coap.parse(await dev.request(req(coap.CON, coap.POST, 7, b"tk", opts, b"x")))
    assert (reply.mtype, reply.code, reply.mid, reply.token) == (coap.ACK, coap.CHANGED, 7, b"tk")
    assert await stored(node) == [("eA==", None)]


async def test_get_and_unknown_paths(node: Simwire, dev: UdpClient) -> None:
    reply = coap.parse(await dev.request(req(coap.CON, coap.GET, 1)))
    assert (reply.code, reply.payload) == (coap.NOT_FOUND, b"Not Found")
    reply = coap.parse(await dev.request(
        req(coap.CON, coap.POST, 2, options=[(coap.OPT_URI_PATH, b"telemetry")], payload=b"x")))
    assert reply.code == coap.NOT_FOUND
    reply = coap.parse(await dev.request(req(coap.CON, coap.PUT, 3, payload=b"x")))
    assert reply.code == coap.METHOD_NOT_ALLOWED
    assert await stored(node) == []


@pytest.mark.parametrize(
    ("query", "code"),
    [
        (b"t=a/b_C9", coap.CHANGED),
        (b"t=" + b"a" * 253, coap.CHANGED),
        (b"t=" + b"a" * 254, coap.BAD_REQUEST),
        (b"t=a//b", coap.BAD_REQUEST),
        (b"t=", coap.BAD_REQUEST),
        (b"t=temp-1", coap.BAD_REQUEST),
        (b"t=caf\xc3\xa9", coap.BAD_REQUEST),
    ],
)
async def test_topic_validation(node: Simwire, dev: UdpClient, query: bytes, code: int) -> None:
    reply = coap.parse(await dev.request(
        req(coap.CON, coap.POST, 9, options=[(coap.OPT_URI_QUERY, query)], payload=b"p")))
    assert reply.code == code
    expected = [("cA==", query[2:].decode())] if code == coap.CHANGED else []
    assert await stored(node) == expected


async def test_other_query_options_are_ignored(node: Simwire, dev: UdpClient) -> None:
    opts = [(coap.OPT_URI_QUERY, b"x=1"), (coap.OPT_URI_QUERY, b"t=room")]
    reply = coap.parse(await dev.request(req(coap.CON, coap.POST, 4, b"", opts, b"p")))
    assert reply.code == coap.CHANGED
    assert await stored(node) == [("cA==", "room")]


async def test_duplicate_con_gets_same_reply_and_is_stored_once(
    node: Simwire, dev: UdpClient, clock: ManualClock
) -> None:
    datagram = req(coap.CON, coap.POST, 0x4242, b"\x01", payload=b"once")
    first = await dev.request(datagram)
    clock.advance(246)
    assert await dev.request(datagram) == first
    assert await stored(node) == [("b25jZQ==", None)]
    clock.advance(2)  # past EXCHANGE_LIFETIME (247 s): the same MID is a new message
    assert coap.parse(await dev.request(datagram)).code == coap.CHANGED
    assert len(await stored(node)) == 2


async def test_duplicate_non_is_not_stored_twice(node: Simwire, dev: UdpClient) -> None:
    datagram = req(coap.NON, coap.POST, 0x777, b"\x02", payload=b"non")
    first = coap.parse(await dev.request(datagram))
    again = coap.parse(await dev.request(datagram))
    assert (again.code, again.mid, again.token) == (first.code, first.mid, first.token)
    assert await stored(node) == [("bm9u", None)]


async def test_same_mid_from_another_port_is_another_exchange(node: Simwire) -> None:
    a = await UdpClient.open(("127.0.0.1", node.ports.coap))
    b = await UdpClient.open(("127.0.0.1", node.ports.coap))
    try:
        for client in (a, b):
            reply = await client.request(req(coap.CON, coap.POST, 5, payload=b"x"))
            assert coap.parse(reply).code == coap.CHANGED
    finally:
        a.close()
        b.close()
    assert len(await stored(node)) == 2


async def test_unknown_critical_option_is_4_02_and_elective_ignored(
    node: Simwire, dev: UdpClient
) -> None:
    reply = coap.parse(await dev.request(
        req(coap.CON, coap.POST, 1, options=[(coap.OPT_PROXY_URI, b"https://x")], payload=b"x")))
    assert reply.code == coap.BAD_OPTION
    reply = coap.parse(await dev.request(
        req(coap.CON, coap.POST, 2, options=[(coap.OPT_CONTENT_FORMAT, b""), (2048, b"e")],
            payload=b"x")))
    assert reply.code == coap.CHANGED


async def test_oversize_payload_is_4_13_with_size1(node: Simwire, dev: UdpClient) -> None:
    reply = coap.parse(await dev.request(req(coap.CON, coap.POST, 1, payload=b"x" * 1501)))
    assert reply.code == coap.REQUEST_ENTITY_TOO_LARGE
    assert reply.opt(coap.OPT_SIZE1) == (1500).to_bytes(2, "big")
    reply = coap.parse(await dev.request(req(coap.CON, coap.POST, 2, payload=b"x" * 1500)))
    assert reply.code == coap.CHANGED


async def test_ping_gets_reset(dev: UdpClient) -> None:
    assert await dev.request(bytes.fromhex("40000abc")) == bytes.fromhex("70000abc")


async def test_unknown_sim_con_gets_4_01_piggybacked(node: Simwire) -> None:
    other = await UdpClient.open(("127.0.0.1", node.ports.coap), "127.0.0.99")
    try:
        reply = await other.request(bytes.fromhex(vector("freertos_con_post")["hex"]))
    finally:
        other.close()
    assert reply == bytes.fromhex("60810001")


@pytest.mark.interop
@pytest.mark.parametrize("binary", ["coap-client-openssl", "coap-client-gnutls"])
async def test_libcoap_clients(node: Simwire, binary: str) -> None:
    exe = require_binary(binary)
    base = f"coap://127.0.0.1:{node.ports.coap}"

    async def run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            exe, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        return (out + err).decode()

    assert await run("-m", "post", "-e", "hello", "-B", "5", f"{base}/?t=test") == ""
    assert await run("-m", "post", "-N", "-e", "non", "-B", "2", f"{base}/data") == ""
    assert "4.00" in await run("-m", "post", "-e", "x", "-B", "5", f"{base}/?t=a//b")
    assert "4.04" in await run("-m", "get", "-B", "5", f"{base}/")
    items = await stored(node)
    assert sorted(items, key=str) == sorted(
        [(base64.b64encode(b"hello").decode(), "test"), (base64.b64encode(b"non").decode(), None)],
        key=str)


async def test_metrics_count_outcomes_and_latency(node: Simwire, dev: UdpClient) -> None:
    await dev.request(bytes.fromhex(vector("freertos_con_post")["hex"]))
    await dev.request(req(coap.CON, coap.POST, 77, options=[(coap.OPT_URI_QUERY, b"t=a//b")]))
    dev.send(b"\x00")
    await dev.expect_silence(0.2)
    text = node.metrics.render().decode()
    assert 'simwire_uplinks_total{outcome="stored",protocol="COAP"} 1.0' in text
    assert 'simwire_uplinks_total{outcome="bad_request",protocol="COAP"} 1.0' in text
    assert 'simwire_uplinks_total{outcome="malformed",protocol="COAP"} 1.0' in text
    assert 'simwire_ingest_seconds_bucket{le="+Inf",protocol="COAP"} 1.0' in text
    assert 'simwire_ingest_seconds_count{protocol="COAP"} 1.0' in text


def test_block1_transfers_expire_and_are_bounded() -> None:
    """BlockTransfers on the manual clock: a transfer idle for EXCHANGE_LIFETIME is gone
    (its next block gets 4.08); beyond `max_transfers` the least recently active goes."""
    clock = ManualClock()
    blocks = BlockTransfers(clock, 247.0, max_body=1024, max_transfers=2)
    first, second = coap.Block(0, True, 0), coap.Block(1, False, 0)
    assert blocks.add(("a",), first, b"x" * 16, None) == (CONTINUE, "")
    clock.advance(247.5)
    assert blocks.add(("a",), second, b"y", None)[0] == REQUEST_ENTITY_INCOMPLETE
    for key in ("a", "b", "c"):  # "a" is evicted when "c" starts
        clock.advance(1)
        assert blocks.add((key,), first, b"x" * 16, None) == (CONTINUE, "")
    assert len(blocks) == 2
    assert blocks.add(("a",), second, b"y", None)[0] == REQUEST_ENTITY_INCOMPLETE
    assert blocks.add(("b",), second, b"y", None) == b"x" * 16 + b"y"
    assert blocks.add(("c",), coap.Block(1, True, 0), b"z" * 16, None) == (CONTINUE, "")
    assert blocks.add(("c",), coap.Block(2, False, 0), b"!", None) == (
        b"x" * 16 + b"z" * 16 + b"!")
    assert len(blocks) == 0


def test_dedup_cache_holds_answered_replies_as_bytes(clock: ManualClock) -> None:
    cache = DedupCache(clock, 247.0, max_entries=2)
    a, b, c = ("10.0.0.1", 5683, 1), ("10.0.0.1", 5683, 2), ("10.0.0.1", 5683, 3)
    pending = Pending()
    cache.put(a, pending)
    assert cache.get(a) is pending
    cache.settle(a, pending, b"reply")
    assert cache.get(a) == b"reply"
    assert not gc.is_tracked(cache.get(a))  # nothing for the collector per exchange
    cache.settle(a, Pending(), b"other")  # not this entry's marker: ignored
    assert cache.get(a) == b"reply"
    late = Pending()
    cache.put(b, late)
    cache.put(c, b"direct")  # over max_entries: the oldest (a) is forgotten
    assert cache.get(a) is None and len(cache) == 2
    cache.settle(a, pending, b"again")  # an answer for a forgotten exchange stays out
    assert cache.get(a) is None and len(cache) == 2
    cache.settle(b, late, b"late")
    assert cache.get(b) == b"late"
    clock.advance(247)
    assert cache.get(b) is None and cache.get(c) is None and len(cache) == 0


class HeldPipeline:
    """Keeps each uplink's `done` until the test commits it."""

    def __init__(self) -> None:
        self.inflight = 0
        self.got: list[tuple[RawUplink, Callable[[Ack], None] | None]] = []

    def submit(self, raw: RawUplink, done: Callable[[Ack], None] | None = None) -> None:
        self.got.append((raw, done))


@pytest.mark.parametrize("mtype", [coap.CON, coap.NON])
async def test_duplicate_while_in_the_pipeline_waits_then_gets_the_same_reply(
        clock: ManualClock, mtype: int) -> None:
    pipeline = HeldPipeline()
    proto = coap_endpoint.CoapServerProtocol(
        pipeline, clock, Metrics(), coap_endpoint.CoapConfig())  # type: ignore[arg-type]
    server = await coap_endpoint.serve("127.0.0.1", 0, proto)
    dev = await UdpClient.open(("127.0.0.1", server.port))
    try:
        post = req(mtype, coap.POST, 0x1234, b"\x0a\x0b", [(coap.OPT_URI_QUERY, b"t=x")], b"p")
        dev.send(post)
        await dev.expect_silence(0.05)  # not committed yet: no reply
        dev.send(post)  # a retransmission while in the pipeline: no second submit, no reply
        await dev.expect_silence(0.05)
        assert len(pipeline.got) == 1
        raw, done = pipeline.got[0]
        assert (raw.payload, raw.topic) == (b"p", "x") and done is not None
        done(Ack.UNAUTHORIZED)
        first = await dev.recv()
        reply = coap.parse(first)
        assert (reply.code, reply.token, reply.payload, reply.options) == (
            coap.UNAUTHORIZED, b"\x0a\x0b", b"", [])
        if mtype == coap.CON:
            assert first == b"\x62\x81\x12\x34\x0a\x0b"  # piggy-backed ACK 4.01
        else:
            assert reply.mtype == coap.NON and reply.mid != 0x1234
        assert await dev.request(post) == first  # the duplicate gets the very same bytes
        assert len(pipeline.got) == 1
    finally:
        server.close()
        dev.close()
