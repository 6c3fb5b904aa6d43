"""Server-initiated CoAP requests (integrator.coap_client): RFC 7252 messaging (piggy-backed
and separate responses, NON, RST, the retransmission schedule on the manual clock,
duplicates, NSTART, caps, cancellation, close) and RFC 7641 observations, over real
loopback sockets with a scripted "device"; then through CoapServerProtocol (plain and
behind DTLS) and against libcoap's coap-server as the device."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from integrator import coap
from integrator.coap_client import (
    CoapClosed,
    CoapError,
    CoapOverloaded,
    CoapRequests,
    CoapReset,
    CoapTimeout,
)
from integrator.endpoints import coap as coap_endpoint
from integrator.endpoints import dtls as dtls_endpoint
from integrator.pipeline import Ack
from simwire.clock import ManualClock, SystemClock
from simwire.metrics import Metrics
from simwire.model import RawUplink
from tests.support.dtls import ICCID_A, KEY_A, Client
from tests.support.net import UdpClient, free_port
from tests.support.tools import require_binary

SEED = 7
URI_3_0_0 = [(coap.OPT_URI_PATH, b"3"), (coap.OPT_URI_PATH, b"0"), (coap.OPT_URI_PATH, b"0")]
URI_3_0_0_BYTES = b"\xb13\x010\x010"  # Uri-Path "3" (delta 11), "0", "0"
ACK_TIMEOUT, RANDOM_FACTOR = 2.0, 1.5


class Host(asyncio.DatagramProtocol):
    """A socket with a CoapRequests on it, as the endpoint has: what `handle` does not take
    is kept in `unhandled` (the endpoint would ignore it)."""

    def __init__(self, clock: Any, **kw: Any) -> None:
        self.clock = clock
        self.kw = kw
        self.unhandled: list[coap.Message] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.requests: CoapRequests

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.kw.setdefault("rng", random.Random(SEED))
        self.requests = CoapRequests(self.transport.sendto, self.clock, **self.kw)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        msg = coap.parse(data)
        if not self.requests.handle(msg, addr):
            self.unhandled.append(msg)

    @property
    def addr(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port


@pytest.fixture
async def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def opened() -> AsyncIterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in things:
        thing.close()
    await asyncio.sleep(0)


@pytest.fixture
async def make_host(clock: ManualClock, opened: list[Any]) -> Callable[..., Any]:
    async def make(**kw: Any) -> Host:
        loop = asyncio.get_running_loop()
        transport, host = await loop.create_datagram_endpoint(
            lambda: Host(clock, **kw), local_addr=("127.0.0.1", 0))
        opened.append(transport)
        return host

    return make


@pytest.fixture
async def host(make_host: Callable[..., Any]) -> Host:
    h: Host = await make_host()
    return h


@pytest.fixture
async def make_dev(host: Host, opened: list[Any]) -> Callable[..., Any]:
    async def make(local_ip: str = "127.0.0.1") -> UdpClient:
        dev = await UdpClient.open(host.addr, local_ip)
        opened.append(dev)
        return dev

    return make


@pytest.fixture
async def dev(make_dev: Callable[..., Any]) -> UdpClient:
    d: UdpClient = await make_dev()
    return d


def addr_of(dev: UdpClient) -> tuple[str, int]:
    host, port = dev._transport.get_extra_info("sockname")[:2]
    return host, port


def msg(mtype: int, code: int, mid: int, token: bytes = b"",
        options: list[tuple[int, bytes]] | None = None, payload: bytes = b"") -> bytes:
    return coap.serialize(coap.Message(mtype, code, mid, token, options or [], payload))


def empty(mtype: int, mid: int) -> bytes:
    return bytes((0x40 | mtype << 4, 0, mid >> 8, mid & 0xFF))


async def until(cond: Callable[[], object], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def sent_get(dev: UdpClient) -> tuple[bytes, coap.Message]:
    """The next request at the device: checks the exact bytes of a CON GET /3/0/0."""
    data = await dev.recv()
    got = coap.parse(data)
    assert len(got.token) == 8
    assert data == bytes((0x48, coap.GET, got.mid >> 8, got.mid & 0xFF)) + got.token + \
        URI_3_0_0_BYTES
    return data, got


async def timers(clock: ManualClock, n: int = 1) -> list[float]:
    await until(lambda: len(clock.sleeping) == n)
    return clock.sleeping


# -- responses -------------------------------------------------------------------------


async def test_piggybacked_response(host: Host, dev: UdpClient, clock: ManualClock) -> None:
    task = asyncio.create_task(host.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
    _, req = await sent_get(dev)
    dev.send(msg(coap.ACK, coap.CONTENT, req.mid, req.token,
                 [(coap.OPT_CONTENT_FORMAT, b"")], b"Simwire"))
    res = await asyncio.wait_for(task, 2)
    assert (res.mtype, res.code, res.mid, res.token, res.payload) == (
        coap.ACK, coap.CONTENT, req.mid, req.token, b"Simwire")
    assert res.options == [(coap.OPT_CONTENT_FORMAT, b"")]
    await until(lambda: clock.sleeping == [])  # no retransmission timer left
    assert host.requests.outstanding == 0 and host.unhandled == []


async def test_seeded_rng_gives_exact_first_datagram_and_schedule(
        host: Host, dev: UdpClient, clock: ManualClock) -> None:
    """With a seeded rng the token, MID and first timeout are reproducible (draw order:
    token, MID start, first timeout); then RFC 7252 4.2: the timeout doubles after each of
    the 4 retransmissions, and the request fails one (doubled) timeout after the last."""
    draws = random.Random(SEED)
    token, mid = draws.randbytes(8), draws.randrange(0x10000)
    t0 = draws.uniform(ACK_TIMEOUT, ACK_TIMEOUT * RANDOM_FACTOR)
    assert 2.0 <= t0 <= 3.0
    start = clock.monotonic()
    task = asyncio.create_task(host.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
    first = await dev.recv()
    assert first == bytes((0x48, 0x01, mid >> 8, mid & 0xFF)) + token + URI_3_0_0_BYTES
    resent_at = []
    for n in range(4):
        [wait] = await timers(clock)
        assert wait == pytest.approx(t0 * 2**n)
        clock.advance(wait - 0.01)
        await dev.expect_silence(0.05)
        clock.advance(0.01)
        assert await dev.recv() == first  # the same datagram: same MID and token
        resent_at.append(clock.monotonic() - start)
    assert resent_at == pytest.approx([t0, 3 * t0, 7 * t0, 15 * t0])
    [wait] = await timers(clock)
    assert wait == pytest.approx(16 * t0)
    clock.advance(wait - 0.01)
    await asyncio.sleep(0.02)
    assert not task.done()
    clock.advance(0.01)
    with pytest.raises(CoapTimeout):
        await asyncio.wait_for(task, 2)
    assert clock.monotonic() - start == pytest.approx(31 * t0)
    assert 62.0 <= 31 * t0 <= 93.0  # within MAX_TRANSMIT_WAIT
    await dev.expect_silence(0.05)
    assert clock.sleeping == [] and host.requests.outstanding == 0


async def test_separate_response_is_acked(host: Host, dev: UdpClient, clock: ManualClock
                                          ) -> None:
    task = asyncio.create_task(host.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
    _, req = await sent_get(dev)
    await timers(clock)
    dev.send(empty(coap.ACK, req.mid))  # empty ACK: stop retransmitting, wait for the response
    await until(lambda: clock.sleeping == [pytest.approx(247.0)])
    clock.advance(60)
    await dev.expect_silence(0.05)
    assert not task.done()
    response = msg(coap.CON, coap.CONTENT, 0x1234, req.token, [], b"later")
    dev.send(response)
    assert await dev.recv() == b"\x60\x00\x12\x34"  # our empty ACK with the device's MID
    res = await asyncio.wait_for(task, 2)
    assert (res.mtype, res.code, res.mid, res.payload) == (coap.CON, coap.CONTENT, 0x1234,
                                                           b"later")
    dev.send(response)  # our ACK got lost: the device retransmits
    assert await dev.recv() == b"\x60\x00\x12\x34"  # ACKed again, not delivered twice
    await until(lambda: clock.sleeping == [])
    assert host.unhandled == []


async def test_separate_response_times_out(host: Host, dev: UdpClient, clock: ManualClock
                                           ) -> None:
    task = asyncio.create_task(host.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
    _, req = await sent_get(dev)
    dev.send(empty(coap.ACK, req.mid))
    await until(lambda: clock.sleeping == [pytest.approx(247.0)])
    clock.advance(247)
    with pytest.raises(CoapTimeout):
        await asyncio.wait_for(task, 2)
    dev.send(msg(coap.CON, coap.CONTENT, 0x0101, req.token))  # too late: rejected
    assert await dev.recv() == b"\x70\x00\x01\x01"


async def test_non_request_and_response(host: Host, dev: UdpClient, clock: ManualClock
                                        ) -> None:
    task = asyncio.create_task(host.requests.request(
        addr_of(dev), coap.PUT, URI_3_0_0, b"x", confirmable=False))
    data = await dev.recv()
    req = coap.parse(data)
    assert data == bytes((0x58, coap.PUT, req.mid >> 8, req.mid & 0xFF)) + req.token + \
        URI_3_0_0_BYTES + b"\xffx"
    assert await timers(clock) == [pytest.approx(93.0)]  # non_timeout_s: MAX_TRANSMIT_WAIT
    dev.send(msg(coap.NON, coap.CHANGED, 0x4242, req.token))
    res = await asyncio.wait_for(task, 2)
    assert (res.mtype, res.code, res.mid) == (coap.NON, coap.CHANGED, 0x4242)
    await dev.expect_silence(0.05)  # nothing to ACK, nothing retransmitted
    dev.send(msg(coap.NON, coap.CHANGED, 0x4242, req.token))  # duplicate: not ours any more
    await until(lambda: len(host.unhandled) == 1)
    await dev.expect_silence(0.05)


async def test_non_request_times_out(make_host: Callable[..., Any], opened: list[Any],
                                     clock: ManualClock) -> None:
    host: Host = await make_host(non_timeout_s=10.0)
    dev = await UdpClient.open(host.addr)
    opened.append(dev)
    task = asyncio.create_task(host.requests.request(
        addr_of(dev), coap.GET, URI_3_0_0, confirmable=False))
    await dev.recv()
    assert await timers(clock) == [pytest.approx(10.0)]
    clock.advance(10)
    with pytest.raises(CoapTimeout):
        await asyncio.wait_for(task, 2)
    await dev.expect_silence(0.05)  # NON is never retransmitted


@pytest.mark.parametrize("confirmable", [True, False])
async def test_reset_raises(host: Host, dev: UdpClient, clock: ManualClock,
                            confirmable: bool) -> None:
    task = asyncio.create_task(host.requests.request(
        addr_of(dev), coap.GET, URI_3_0_0, confirmable=confirmable))
    req = coap.parse(await dev.recv())
    dev.send(empty(coap.RST, req.mid ^ 1))  # another MID: not ours
    await until(lambda: len(host.unhandled) == 1)
    dev.send(empty(coap.RST, req.mid))
    with pytest.raises(CoapReset):
        await asyncio.wait_for(task, 2)
    await until(lambda: clock.sleeping == [])


async def test_duplicates_and_mismatches_are_ignored(host: Host, dev: UdpClient,
                                                     clock: ManualClock) -> None:
    task = asyncio.create_task(host.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
    _, req = await sent_get(dev)
    dev.send(msg(coap.ACK, coap.CONTENT, req.mid, b"other", [], b"wrong token"))
    await until(lambda: len(host.unhandled) == 1)
    assert not task.done()
    piggy = msg(coap.ACK, coap.CONTENT, req.mid, req.token, [], b"one")
    dev.send(piggy)
    assert (await asyncio.wait_for(task, 2)).payload == b"one"
    dev.send(piggy)  # duplicate ACK: ignored (left to the endpoint), never RST
    await until(lambda: len(host.unhandled) == 2)
    await dev.expect_silence(0.05)


async def test_response_from_another_address_does_not_match(
        host: Host, make_dev: Callable[..., Any], clock: ManualClock) -> None:
    dev = await make_dev()
    other = await make_dev("127.0.0.2")
    task = asyncio.create_task(host.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
    _, req = await sent_get(dev)
    other.send(msg(coap.ACK, coap.CONTENT, req.mid, req.token))
    other.send(msg(coap.NON, coap.CONTENT, 7, req.token))
    await until(lambda: len(host.unhandled) == 2)
    other.send(msg(coap.CON, coap.CONTENT, 8, req.token))  # unexpected CON: RST
    assert await other.recv() == b"\x70\x00\x00\x08"
    assert not task.done()
    dev.send(msg(coap.ACK, coap.CONTENT, req.mid, req.token))
    await asyncio.wait_for(task, 2)


async def test_unknown_con_response_gets_rst(host: Host, dev: UdpClient) -> None:
    dev.send(msg(coap.CON, coap.CONTENT, 0xBEEF, b"nope"))
    assert await dev.recv() == b"\x70\x00\xbe\xef"
    dev.send(msg(coap.NON, coap.CONTENT, 0xBEF0, b"nope"))  # NON: ignored (MAY reject)
    dev.send(empty(coap.CON, 0xBEF1))  # a ping is the endpoint's business
    await until(lambda: len(host.unhandled) == 2)
    await dev.expect_silence(0.05)


# -- cancellation, close, NSTART, caps ---------------------------------------------------


async def test_cancelled_request_stops_retransmitting(
        host: Host, dev: UdpClient, clock: ManualClock) -> None:
    task = asyncio.create_task(host.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
    _, req = await sent_get(dev)
    await timers(clock)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: clock.sleeping == [])
    clock.advance(100)
    await dev.expect_silence(0.1)
    assert host.requests.outstanding == 0
    dev.send(msg(coap.CON, coap.CONTENT, 0x0707, req.token))  # a late separate response
    assert await dev.recv() == b"\x70\x00\x07\x07"


async def test_close_fails_outstanding_and_queued(
        host: Host, make_dev: Callable[..., Any], clock: ManualClock) -> None:
    a, b = await make_dev(), await make_dev("127.0.0.2")
    r = host.requests
    tasks = [asyncio.create_task(r.request(addr_of(a), coap.GET, URI_3_0_0)),
             asyncio.create_task(r.request(addr_of(a), coap.GET, URI_3_0_0)),  # queued
             asyncio.create_task(r.request(addr_of(b), coap.GET, URI_3_0_0,
                                           confirmable=False))]
    await a.recv()
    await b.recv()
    await until(lambda: len(clock.sleeping) == 2)
    r.close()
    for task in tasks:
        with pytest.raises(CoapClosed):
            await asyncio.wait_for(task, 2)
    await until(lambda: clock.sleeping == [])
    await a.expect_silence(0.05)  # the queued one never went out
    with pytest.raises(CoapClosed):
        await r.request(addr_of(a), coap.GET)
    assert r.outstanding == 0
    a.send(msg(coap.CON, coap.CONTENT, 1, b"x"))  # closed: nothing is handled
    await until(lambda: len(host.unhandled) == 1)


async def test_nstart_one_outstanding_interaction_per_peer(
        host: Host, make_dev: Callable[..., Any], clock: ManualClock) -> None:
    a, b = await make_dev(), await make_dev("127.0.0.2")
    r = host.requests
    first = asyncio.create_task(r.request(addr_of(a), coap.GET, URI_3_0_0))
    second = asyncio.create_task(r.request(addr_of(a), coap.GET, URI_3_0_0))
    third = asyncio.create_task(r.request(addr_of(a), coap.GET, URI_3_0_0))
    other = asyncio.create_task(r.request(addr_of(b), coap.GET, URI_3_0_0))
    _, req1 = await sent_get(a)
    await sent_get(b)  # another peer is not held up
    await a.expect_silence(0.05)
    third.cancel()  # a queued request can go away
    dev_ack = empty(coap.ACK, req1.mid)  # the empty ACK ends the outstanding interaction
    a.send(dev_ack)
    _, req2 = await sent_get(a)
    assert req2.mid == (req1.mid + 1) & 0xFFFF and req2.token != req1.token
    await a.expect_silence(0.05)
    a.send(msg(coap.ACK, coap.CONTENT, req2.mid, req2.token))
    assert (await asyncio.wait_for(second, 2)).mid == req2.mid
    a.send(msg(coap.NON, coap.CONTENT, 9, req1.token))
    assert (await asyncio.wait_for(first, 2)).mid == 9
    with pytest.raises(asyncio.CancelledError):
        await third
    other.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await other
    assert r.outstanding == 0


async def test_caps_raise_overloaded(make_host: Callable[..., Any], opened: list[Any]
                                     ) -> None:
    host: Host = await make_host(max_per_peer=2, max_total=3)
    r = host.requests
    a, b, c = ("127.0.0.1", free_port(2)), ("127.0.0.2", free_port(2)), ("127.0.0.3", 9)
    tasks = [asyncio.create_task(r.request(a, coap.GET)),
             asyncio.create_task(r.request(a, coap.GET))]  # the second waits (NSTART)
    await asyncio.sleep(0)
    with pytest.raises(CoapOverloaded):
        await r.request(a, coap.GET)
    tasks.append(asyncio.create_task(r.request(b, coap.GET)))
    await asyncio.sleep(0)
    assert r.outstanding == 3
    with pytest.raises(CoapOverloaded):
        await r.request(c, coap.GET)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert r.outstanding == 0
    tasks = [asyncio.create_task(r.request(c, coap.GET))]  # room again
    await asyncio.sleep(0)
    assert r.outstanding == 1
    tasks[0].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_observation_cap(make_host: Callable[..., Any], opened: list[Any]) -> None:
    host: Host = await make_host(max_observations=1)
    dev = await UdpClient.open(host.addr)
    opened.append(dev)
    await observe(host, dev, lambda m: None)
    with pytest.raises(CoapOverloaded):
        await host.requests.request(addr_of(dev), coap.GET, observe=lambda m: None)


async def test_bad_arguments(host: Host) -> None:
    with pytest.raises(ValueError, match="not a request code"):
        await host.requests.request(("127.0.0.1", 9), coap.CONTENT)
    with pytest.raises(ValueError, match="at most 8"):
        await host.requests.request(("127.0.0.1", 9), coap.GET, token=b"123456789")
    assert host.requests.outstanding == 0


# -- block-wise responses (RFC 7959) ------------------------------------------------------


def block2(num: int, more: bool, szx: int = 0) -> list[tuple[int, bytes]]:
    return [(coap.OPT_BLOCK2, coap.Block(num, more, szx).encode())]


async def test_block2_response_is_fetched_to_the_end(host: Host, dev: UdpClient) -> None:
    """The device answers in 16-byte blocks; the server asks for each next one with the
    same options plus Block2 and gets one response with the whole body."""
    body = b"0123456789abcdef" * 2 + b"tail"
    task = asyncio.create_task(host.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
    _, req = await sent_get(dev)
    dev.send(msg(coap.ACK, coap.CONTENT, req.mid, req.token, block2(0, True), body[:16]))
    for num, more in ((1, True), (2, False)):
        data = await dev.recv()
        got = coap.parse(data)
        assert got.code == coap.GET and got.token != req.token
        assert got.options == [*URI_3_0_0, *block2(num, False)]
        dev.send(msg(coap.ACK, coap.CONTENT, got.mid, got.token, block2(num, more),
                     body[num * 16:(num + 1) * 16]))
    res = await asyncio.wait_for(task, 2)
    assert (res.code, res.payload, res.options) == (coap.CONTENT, body, [])


@pytest.mark.parametrize(("second", "error"), [
    (lambda m: msg(coap.ACK, coap.NOT_FOUND, m.mid, m.token), "block 1 of the response "
                                                               "answered 4.04"),
    (lambda m: msg(coap.ACK, coap.CONTENT, m.mid, m.token, block2(2, False), b"x"),
     "asked for the block at byte 16, got the one at 32"),
    (lambda m: msg(coap.ACK, coap.CONTENT, m.mid, m.token, [], b"x"),
     "block 1 came without a valid Block2 option"),
])
async def test_broken_block2_transfers_fail(host: Host, dev: UdpClient,
                                            second: Callable[[coap.Message], bytes],
                                            error: str) -> None:
    task = asyncio.create_task(host.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
    _, req = await sent_get(dev)
    dev.send(msg(coap.ACK, coap.CONTENT, req.mid, req.token, block2(0, True), b"x" * 16))
    dev.send(second(coap.parse(await dev.recv())))
    with pytest.raises(CoapError, match=error):
        await asyncio.wait_for(task, 2)
    assert host.requests.outstanding == 0


async def test_block2_limits(make_host: Callable[..., Any], opened: list[Any]) -> None:
    host: Host = await make_host(max_body=32)
    dev = await UdpClient.open(host.addr)
    opened.append(dev)
    for first, error in ((block2(0, True), None), (block2(1, True), "starting at block 1"),
                         (block2(0, True), "a block of 15 bytes")):
        task = asyncio.create_task(host.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
        _, req = await sent_get(dev)
        payload = b"x" * (15 if error and "15" in error else 16)
        dev.send(msg(coap.ACK, coap.CONTENT, req.mid, req.token, first, payload))
        if error is None:  # 16 + 16 bytes, more to come: beyond max_body
            nxt = coap.parse(await dev.recv())
            dev.send(msg(coap.ACK, coap.CONTENT, nxt.mid, nxt.token, block2(1, True),
                         b"y" * 16))
            error = "larger than 32 bytes"
        with pytest.raises(CoapError, match=error):
            await asyncio.wait_for(task, 2)


# -- observe (RFC 7641) --------------------------------------------------------------------


async def observe(host: Host, dev: UdpClient, callback: Callable[[coap.Message], None],
                  seq: int = 5) -> coap.Message:
    """Registers on /3/0/13 and answers with Observe=`seq`; returns the request."""
    task = asyncio.create_task(host.requests.request(
        addr_of(dev), coap.GET, [(coap.OPT_URI_PATH, b"3"), (coap.OPT_URI_PATH, b"0"),
                                 (coap.OPT_URI_PATH, b"13")], observe=callback))
    data = await dev.recv()
    req = coap.parse(data)
    # Observe=0 (option 6, empty) is added before Uri-Path (delta 5): 0x60, 0x51 "3"...
    assert data == bytes((0x48, 0x01, req.mid >> 8, req.mid & 0xFF)) + req.token + \
        b"\x60\x513\x010\x0213"
    dev.send(msg(coap.ACK, coap.CONTENT, req.mid, req.token,
                 [(coap.OPT_OBSERVE, coap.uint_option(seq))], b"t0"))
    res = await asyncio.wait_for(task, 2)
    assert res.payload == b"t0"
    assert host.requests.observations == {req.token: addr_of(dev)}
    return req


async def test_observe_notifications_in_order_and_reactive_cancel(
        host: Host, dev: UdpClient, clock: ManualClock) -> None:
    got: list[bytes] = []
    req = await observe(host, dev, lambda m: got.append(m.payload))
    tok = req.token

    def note(mtype: int, mid: int, seq: int, payload: bytes) -> bytes:
        return msg(mtype, coap.CONTENT, mid, tok, [(coap.OPT_OBSERVE, coap.uint_option(seq))],
                   payload)

    dev.send(note(coap.CON, 0x2000, 6, b"t6"))
    assert await dev.recv() == b"\x60\x00\x20\x00"  # CON notification: ACKed
    dev.send(note(coap.NON, 0x2001, 8, b"t8"))
    dev.send(note(coap.NON, 0x2002, 7, b"t7"))  # older than 8: dropped
    dev.send(note(coap.CON, 0x2003, 7, b"t7 again"))  # older: dropped, but ACKed
    assert await dev.recv() == b"\x60\x00\x20\x03"
    dev.send(note(coap.CON, 0x2000, 6, b"t6"))  # a retransmission: re-ACKed only
    assert await dev.recv() == b"\x60\x00\x20\x00"
    await until(lambda: len(got) == 2)
    clock.advance(129)  # RFC 7641 3.4: after 128 s any sequence number is fresh
    dev.send(note(coap.NON, 0x2004, 3, b"t3"))
    await until(lambda: len(got) == 3)
    assert got == [b"t6", b"t8", b"t3"]
    assert host.requests.cancel_observation(tok) is True
    assert host.requests.cancel_observation(tok) is False
    assert host.requests.observations == {}
    dev.send(note(coap.NON, 0x2005, 4, b"t4"))  # the next one, even NON, gets RST
    assert await dev.recv() == b"\x70\x00\x20\x05"
    dev.send(note(coap.NON, 0x2006, 5, b"t5"))  # then forgotten: NON ignored
    await until(lambda: len(host.unhandled) == 1)
    dev.send(note(coap.CON, 0x2007, 6, b"t6"))  # CON: RST (unknown token)
    assert await dev.recv() == b"\x70\x00\x20\x07"
    assert got == [b"t6", b"t8", b"t3"]


async def test_observe_sequence_wraps_and_final_response_ends(
        host: Host, dev: UdpClient) -> None:
    got: list[coap.Message] = []
    req = await observe(host, dev, got.append, seq=0xFFFFFE)
    dev.send(msg(coap.NON, coap.CONTENT, 1, req.token, [(coap.OPT_OBSERVE, b"\xff\xff\xff")]))
    dev.send(msg(coap.NON, coap.CONTENT, 2, req.token, [(coap.OPT_OBSERVE, b"\x01")]))  # wrap
    await until(lambda: len(got) == 2)
    dev.send(msg(coap.NON, coap.NOT_FOUND, 3, req.token))  # the resource went away
    await until(lambda: len(got) == 3)
    assert [m.code for m in got] == [coap.CONTENT, coap.CONTENT, coap.NOT_FOUND]
    assert host.requests.observations == {}
    dev.send(msg(coap.CON, coap.CONTENT, 4, req.token, [(coap.OPT_OBSERVE, b"\x02")]))
    assert await dev.recv() == b"\x70\x00\x00\x04"  # no longer observed: RST


async def test_observe_refused_registers_nothing(host: Host, dev: UdpClient) -> None:
    task = asyncio.create_task(host.requests.request(
        addr_of(dev), coap.GET, URI_3_0_0, observe=lambda m: None))
    req = coap.parse(await dev.recv())
    assert req.opt(coap.OPT_OBSERVE) == b""
    dev.send(msg(coap.ACK, coap.CONTENT, req.mid, req.token))  # no Observe: not added
    await asyncio.wait_for(task, 2)
    assert host.requests.observations == {}


async def test_explicit_deregistration_reuses_the_token(host: Host, dev: UdpClient) -> None:
    got: list[bytes] = []
    req = await observe(host, dev, lambda m: got.append(m.payload))
    with pytest.raises(ValueError, match="another peer"):
        await host.requests.request(("127.0.0.9", 5683), coap.GET, token=req.token)
    task = asyncio.create_task(host.requests.request(
        addr_of(dev), coap.GET, [(coap.OPT_OBSERVE, b"\x01"), (coap.OPT_URI_PATH, b"3")],
        token=req.token))
    data = await dev.recv()
    dereg = coap.parse(data)
    assert dereg.token == req.token and dereg.mid != req.mid
    assert data == bytes((0x48, 0x01, dereg.mid >> 8, dereg.mid & 0xFF)) + req.token + \
        b"\x61\x01\x513"
    assert host.requests.observations == {}
    dev.send(msg(coap.CON, coap.CONTENT, 0x3000, req.token, [(coap.OPT_OBSERVE, b"\x09")],
                 b"crossing"))  # a notification crossing the deregistration
    assert await dev.recv() == b"\x60\x00\x30\x00"  # ACKed, not taken as the response
    dev.send(msg(coap.ACK, coap.CONTENT, dereg.mid, req.token, [], b"final"))
    assert (await asyncio.wait_for(task, 2)).payload == b"final"
    assert got == [] and host.requests.observations == {}


# -- through CoapServerProtocol ----------------------------------------------------------


class FakePipeline:
    """Commits at once and records what it got."""

    def __init__(self) -> None:
        self.inflight = 0
        self.got: list[RawUplink] = []

    def submit(self, raw: RawUplink, done: Callable[[Ack], None] | None = None) -> None:
        self.got.append(raw)
        if done is not None:
            done(Ack.STORED)


async def test_endpoint_ingests_and_completes_server_initiated_requests(
        clock: ManualClock) -> None:
    pipeline = FakePipeline()
    proto = coap_endpoint.CoapServerProtocol(
        pipeline, clock, Metrics(), coap_endpoint.CoapConfig())  # type: ignore[arg-type]
    server = await coap_endpoint.serve("127.0.0.1", 0, proto)
    dev = await UdpClient.open(("127.0.0.1", server.port))  # replies only from that port
    try:
        post = msg(coap.CON, coap.POST, 0x0101, b"tk", [(coap.OPT_URI_QUERY, b"t=test")], b"hi")
        assert await dev.request(post) == b"\x62\x44\x01\x01tk"  # 2.04 piggy-backed
        assert [(u.payload, u.topic) for u in pipeline.got] == [(b"hi", "test")]

        task = asyncio.create_task(proto.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
        _, req = await sent_get(dev)  # came from the endpoint's port
        dev.send(msg(coap.ACK, coap.CONTENT, req.mid, req.token, [], b"Simwire"))
        assert (await asyncio.wait_for(task, 2)).payload == b"Simwire"

        task = asyncio.create_task(proto.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
        _, req = await sent_get(dev)
        dev.send(empty(coap.ACK, req.mid))
        dev.send(msg(coap.CON, coap.CONTENT, 0x0505, req.token, [], b"sep"))
        assert await dev.recv() == b"\x60\x00\x05\x05"
        assert (await asyncio.wait_for(task, 2)).payload == b"sep"

        assert await dev.request(empty(coap.CON, 0x0606)) == b"\x70\x00\x06\x06"  # ping
        dev.send(msg(coap.ACK, coap.CONTENT, 0x0707, b"zz"))  # stray ACK: ignored
        await dev.expect_silence(0.05)
        assert await dev.request(post) == b"\x62\x44\x01\x01tk"  # dedup still works
        assert len(pipeline.got) == 1

        task = asyncio.create_task(proto.requests.request(addr_of(dev), coap.GET, URI_3_0_0))
        await sent_get(dev)
    finally:
        server.close()
        dev.close()
    with pytest.raises(CoapClosed):  # connection_lost closed the requester
        await asyncio.wait_for(task, 2)
    assert proto.requests.closed


async def test_endpoint_requests_behind_dtls_are_encrypted(clock: ManualClock) -> None:
    class Psk:
        async def psk_for(self, ip: str) -> tuple[str, bytes] | None:
            return (ICCID_A, KEY_A) if ip == "127.0.0.1" else None

    pipeline = FakePipeline()
    proto = coap_endpoint.CoapServerProtocol(pipeline, clock, Metrics(),  # type: ignore[arg-type]
                                             coap_endpoint.CoapConfig())
    server = await dtls_endpoint.serve("127.0.0.1", 0, proto, Psk(), clock, Metrics(),
                                       dtls_endpoint.DtlsConfig(handshake_burst_per_ip=100))
    dev = await Client.open(server.port)
    try:
        await dev.handshake()
        assert (await dev.post(b"up")).code == coap.CHANGED
        task = asyncio.create_task(proto.requests.request(dev.addr, coap.GET, URI_3_0_0))
        record = await dev.recv()
        assert URI_3_0_0_BYTES not in record  # encrypted on the wire
        dev.buf.receive_from_network(record)
        data = dev.buf.read(2048)
        req = coap.parse(data)
        assert data == bytes((0x48, 0x01, req.mid >> 8, req.mid & 0xFF)) + req.token + \
            URI_3_0_0_BYTES
        dev.send_app(msg(coap.ACK, coap.CONTENT, req.mid, req.token, [], b"over dtls"))
        assert (await asyncio.wait_for(task, 2)).payload == b"over dtls"
        assert [u.dtls_identity for u in pipeline.got] == [ICCID_A]
    finally:
        server.close()
        dev.close()
        proto.requests.close()  # the DTLS endpoint does not forward connection_lost


# -- interop: libcoap's coap-server as the device --------------------------------------


@pytest.mark.interop
async def test_libcoap_server_as_device(opened: list[Any]) -> None:
    exe = require_binary("coap-server-openssl")
    port = free_port(2)
    proc = await asyncio.create_subprocess_exec(
        exe, "-A", "127.0.0.1", "-p", str(port), "-d", "2",  # -d: resources made by PUT
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        loop = asyncio.get_running_loop()
        transport, host = await loop.create_datagram_endpoint(
            lambda: Host(SystemClock(), rng=None), local_addr=("127.0.0.1", 0))
        opened.append(transport)
        r = host.requests
        device = ("127.0.0.1", port)
        res = None
        for _ in range(50):  # until the server listens
            with contextlib.suppress(TimeoutError):
                res = await asyncio.wait_for(r.request(device, coap.GET), 0.2)
                break
            await asyncio.sleep(0.05)
        assert res is not None and res.code == coap.CONTENT
        assert b"This is a test server made with libcoap" in res.payload

        res = await r.request(device, coap.GET, [(coap.OPT_URI_PATH, b"nothing-here")])
        assert res.code == coap.NOT_FOUND

        res = await r.request(device, coap.GET, confirmable=False)
        assert res.mtype == coap.NON and res.code == coap.CONTENT

        # block-wise (RFC 7959): a 1000-byte resource read in 64-byte blocks
        body = bytes(range(250)) * 4
        big = [(coap.OPT_URI_PATH, b"big")]
        assert (await r.request(device, coap.PUT, big, body)).code == coap.code(2, 1)
        res = await r.request(device, coap.GET, [*big, (coap.OPT_BLOCK2, b"\x02")])
        assert (res.code, res.payload, res.opt(coap.OPT_BLOCK2)) == (coap.CONTENT, body, None)

        ticks: list[coap.Message] = []
        first = await r.request(device, coap.GET, [(coap.OPT_URI_PATH, b"time")],
                                observe=ticks.append)
        assert first.code == coap.CONTENT and first.opt(coap.OPT_OBSERVE) is not None
        [token] = r.observations
        await until(lambda: len(ticks) >= 2, timeout=10)  # it notifies every second
        seqs = [int.from_bytes(m.opt(coap.OPT_OBSERVE) or b"", "big") for m in ticks]
        assert seqs == sorted(seqs) and all(m.token == token for m in ticks)
        assert r.cancel_observation(token)
        await until(lambda: token not in r._rejected, timeout=10)  # the next one got RST
        seen = len(ticks)
        await asyncio.sleep(2.5)
        assert len(ticks) == seen  # the server dropped us
        assert r.outstanding == 0 and r.observations == {}
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)

