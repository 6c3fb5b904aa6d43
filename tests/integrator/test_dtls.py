"""CoAP over DTLS (:5684): PSK bound to the source IP, cookies before state, limits, and
interop with OpenSSL s_client and libcoap clients (spec section 1.5)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import pytest
from mbedtls.exceptions import TLSError

from integrator import coap
from integrator.endpoints.dtls import (
    MAX_DATAGRAM,
    DtlsConfig,
    DtlsServer,
    DtlsTransport,
    client_hello_random,
    serve,
)
from integrator.endpoints.dtls_mbedtls import SUITES, datagrams
from simwire.clock import ManualClock
from simwire.metrics import Metrics
from tests.support.dtls import CBC_SHA256, ICCID_A, KEY_A, Client
from tests.support.net import UdpClient
from tests.support.tools import require_binary

ICCID_B = "8988280666000000039"
KEY_B = b"An0therSecretKey"
TEST_CONFIG = DtlsConfig(handshake_burst_per_ip=1000)
IANA_CODES = {iana: code for iana, code in SUITES.values()}


class DictPsk:
    """PskLookup over a dict: source IP -> (identity, key)."""

    def __init__(self, keys: dict[str, tuple[str, bytes]]) -> None:
        self.keys = keys
        self.calls: list[str] = []

    async def psk_for(self, ip: str) -> tuple[str, bytes] | None:
        self.calls.append(ip)
        return self.keys.get(ip)


class SlowPsk(DictPsk):
    """A lookup that waits (I/O): 127.0.0.3 fails, `gate` holds lookups until set."""

    def __init__(self, keys: dict[str, tuple[str, bytes]]) -> None:
        super().__init__(keys)
        self.gate: asyncio.Event | None = None
        self.cancelled = 0

    async def psk_for(self, ip: str) -> tuple[str, bytes] | None:
        try:
            await asyncio.sleep(0.005)
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if ip == "127.0.0.3":
            raise RuntimeError("store unavailable")
        return await super().psk_for(ip)


class CoapApp:
    """The application on the transport: records what it got, answers POST with 2.04."""

    def __init__(self) -> None:
        self.transport: DtlsTransport | None = None
        self.got: list[tuple[bytes, str | None, tuple[str, int]]] = []

    def connection_made(self, transport: DtlsTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        identity = self.transport.identity(addr)
        try:
            msg = coap.parse(data)
        except coap.MalformedMessage:
            self.got.append((data, identity, addr))
            return
        self.got.append((msg.payload, identity, addr))
        if msg.code != coap.POST:
            return
        if msg.mtype == coap.CON:
            reply = coap.Message(coap.ACK, coap.CHANGED, msg.mid, msg.token, [], b"stored")
        else:
            reply = coap.Message(coap.NON, coap.CHANGED, msg.mid ^ 0x5555, msg.token, [],
                                 b"stored")
        self.transport.sendto(coap.serialize(reply), addr)


@dataclass
class Node:
    server: DtlsServer
    app: CoapApp
    psk: DictPsk
    metrics: Metrics
    refused: list[tuple[str, str]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    def count(self, outcome: str) -> int:
        text = self.metrics.render().decode()
        line = f'simwire_dtls_total{{outcome="{outcome}",protocol="COAP"}} '
        for row in text.splitlines():
            if row.startswith(line):
                return int(float(row[len(line):]))
        return 0


Start = Callable[..., Awaitable[Node]]


@pytest.fixture
async def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def start(clock: ManualClock) -> AsyncIterator[Start]:
    nodes: list[Node] = []

    async def _start(config: DtlsConfig = TEST_CONFIG, lookup: type[DictPsk] = DictPsk) -> Node:
        app = CoapApp()
        psk = lookup({"127.0.0.1": (ICCID_A, KEY_A), "127.0.0.2": (ICCID_B, KEY_B)})
        metrics = Metrics()
        refused: list[tuple[str, str]] = []
        server = await serve("127.0.0.1", 0, app, psk, clock, metrics, config,
                             on_refused=lambda ip, reason: refused.append((ip, reason)))
        node = Node(server, app, psk, metrics, refused)
        nodes.append(node)
        return node

    yield _start
    for node in nodes:
        node.server.close()
    await asyncio.sleep(0)


@pytest.fixture
async def node(start: Start) -> Node:
    return await start()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    opened: list[Client] = []

    async def _open(port: int, **kw: object) -> Client:
        client = await Client.open(port, **kw)  # type: ignore[arg-type]
        opened.append(client)
        return client

    yield _open
    for client in opened:
        client.close()
    await asyncio.sleep(0)


# -- the Python client: handshake, CoAP, identity --------------------------------------


@pytest.mark.parametrize("suite", [
    CBC_SHA256, "TLS-PSK-WITH-AES-128-CCM-8", "TLS-PSK-WITH-AES-128-GCM-SHA256",
    "TLS-ECDHE-PSK-WITH-AES-128-CBC-SHA256",
])
async def test_post_over_dtls_reaches_the_app_with_the_identity(
        node: Node, clients: Callable[..., Awaitable[Client]], suite: str) -> None:
    dev = await clients(node.port, ciphers=(suite,))
    await dev.handshake()
    reply = await dev.post(b"hello")
    assert (reply.mtype, reply.code, reply.payload) == (coap.ACK, coap.CHANGED, b"stored")
    assert node.app.got == [(b"hello", ICCID_A, dev.addr)]
    assert node.server.endpoint.cipher(dev.addr) == SUITES[suite][0]
    assert node.count("handshake") == 1


async def test_server_prefers_plain_psk_aead(
        node: Node, clients: Callable[..., Awaitable[Client]]) -> None:
    dev = await clients(node.port, ciphers=(
        "TLS-ECDHE-PSK-WITH-AES-128-CBC-SHA256", CBC_SHA256, "TLS-PSK-WITH-AES-128-GCM-SHA256",
        "TLS-PSK-WITH-AES-128-CCM-8"))
    await dev.handshake()
    assert node.server.endpoint.cipher(dev.addr) == "TLS_PSK_WITH_AES_128_CCM_8"


async def test_hello_verify_request_comes_before_any_state(
        node: Node, clients: Callable[..., Awaitable[Client]]) -> None:
    dev = await clients(node.port)
    await dev.handshake(rounds=0)  # sends the first ClientHello only
    assert client_hello_random(dev.sent[0]) is not None
    hvr = dev.held
    assert (hvr[0], hvr[13]) == (22, 3)  # handshake record: hello_verify_request
    await asyncio.sleep(0.05)
    endpoint = node.server.endpoint
    assert not endpoint.has_session(dev.addr)
    assert (endpoint.session_count, endpoint.handshake_count) == (0, 0)
    assert node.count("hello_verify") == 1
    dev.buf.receive_from_network(hvr)
    await dev.handshake()  # the cookie makes the session
    assert endpoint.identity(dev.addr) == ICCID_A


async def test_unknown_ip_gets_no_reply_at_all(
        node: Node, clients: Callable[..., Awaitable[Client]]) -> None:
    for _ in range(2):
        dev = await clients(node.port, local=("127.0.0.3", 0))
        with pytest.raises(TimeoutError):
            await dev.handshake(timeout=0.3)
        assert len(dev.sent) == 1
    assert node.psk.calls == ["127.0.0.3", "127.0.0.3"]
    assert node.server.endpoint.session_count == 0
    assert node.refused == [("127.0.0.3", "no PSK for this IP (unknown or disabled SIM)")]
    assert node.count("unknown_peer") == 2


@pytest.mark.parametrize(("local_ip", "identity", "key", "alert"), [
    ("127.0.0.1", ICCID_A, b"wrong-key-123456", 20),  # bad_record_mac
    ("127.0.0.1", "8988280666000000999", KEY_A, 115),  # unknown_psk_identity
    ("127.0.0.1", ICCID_B, KEY_B, 115),  # another SIM's (IP's) credentials
    ("127.0.0.2", ICCID_A, KEY_A, 115),
])
async def test_wrong_psk_gets_no_session(
        node: Node, clients: Callable[..., Awaitable[Client]], local_ip: str, identity: str,
        key: bytes, alert: int) -> None:
    dev = await clients(node.port, identity=identity, key=key, local=(local_ip, 0))
    with pytest.raises(TLSError, match="fatal alert"):
        await dev.handshake()
    assert dev.received[-1][0] == 21 and dev.received[-1][-2:] == bytes([2, alert])
    assert node.server.endpoint.session_count == 0
    assert node.server.endpoint.identity(dev.addr) is None
    assert node.count("handshake_failed") == 1
    assert [ip for ip, _ in node.refused] == [local_ip]
    assert "handshake failed" in node.refused[0][1]
    assert KEY_A.decode() not in node.refused[0][1]
    ok = await clients(node.port, identity=node.psk.keys[local_ip][0],
                       key=node.psk.keys[local_ip][1], local=(local_ip, 0))
    await ok.handshake()
    assert (await ok.post(b"x")).code == coap.CHANGED


async def test_a_psk_lookup_that_waits_runs_in_a_task(
        start: Start, clients: Callable[..., Awaitable[Client]]) -> None:
    node = await start(lookup=SlowPsk)
    dev = await clients(node.port)
    await dev.handshake()
    assert (await dev.post(b"slow")).code == coap.CHANGED
    failing = await clients(node.port, local=("127.0.0.3", 0))
    with pytest.raises(TimeoutError):
        await failing.handshake(timeout=0.3)
    assert node.count("error") == 1
    psk = node.psk
    assert isinstance(psk, SlowPsk)
    psk.gate = asyncio.Event()
    held = await clients(node.port, local=("127.0.0.2", 0), identity=ICCID_B, key=KEY_B)
    with pytest.raises(TimeoutError):
        await held.handshake(timeout=0.1)
    node.server.close()  # the pending lookup is cancelled with the endpoint
    await until(lambda: psk.cancelled == 1)


# -- robustness ------------------------------------------------------------------------


async def test_garbage_alerts_and_truncated_records_never_break_the_server(
        node: Node, clients: Callable[..., Awaitable[Client]]) -> None:
    dev = await clients(node.port)
    await dev.handshake()
    assert (await dev.post(b"one")).code == coap.CHANGED
    dev.buf.write(b"not sent whole")
    n = len(dev.buf._output_buffer)
    record = dev.buf.peek_outgoing(n)
    dev.buf.consume_outgoing(n)
    junk = [
        b"", os.urandom(1), os.urandom(200), b"\x16\xfe\xfd\x00", record[:-3], record[:13],
        b"\x15\xfe\xfd" + bytes(8) + b"\x00\x02\x02\x28",  # plaintext fatal alert, epoch 0
        b"\x15\xfe\xfd\x00\x01" + bytes(6) + b"\x00\x02\x02\x00",  # forged close_notify
        b"\x17\xfe\xfd\x00\x01" + bytes(6) + b"\x00\x20" + os.urandom(32),  # bad MAC
        dev.sent[0][:40], dev.sent[0][:59] + b"\xff" * 4,  # truncated ClientHellos
        bytes(MAX_DATAGRAM + 1),
    ]
    stranger = await UdpClient.open(("127.0.0.1", node.port))
    try:
        for data in junk:
            dev.send_raw(data)  # into the session
            stranger.send(data)  # no session
        await stranger.expect_silence(0.2)
    finally:
        stranger.close()
    assert node.count("error") == 0
    assert (await dev.post(b"two")).code == coap.CHANGED  # the session survived
    assert [got[0] for got in node.app.got] == [b"one", b"two"]
    other = await clients(node.port, local=("127.0.0.2", 0), identity=ICCID_B, key=KEY_B)
    await other.handshake()
    assert (await other.post(b"three")).code == coap.CHANGED
    dev.shutdown()  # close_notify ends the session
    await until(lambda: not node.server.endpoint.has_session(dev.addr))
    assert node.count("closed") == 1
    assert node.server.endpoint.identity(other.addr) == ICCID_B


async def test_new_hello_from_the_same_address_replaces_the_session(
        node: Node, clients: Callable[..., Awaitable[Client]]) -> None:
    old = await clients(node.port)
    await old.handshake()
    assert (await old.post(b"before reboot")).code == coap.CHANGED
    old.send_raw(old.sent[1])  # a late duplicate of its ClientHello does not disturb it
    assert (await old.post(b"still")).code == coap.CHANGED
    addr = old.addr
    old.close()
    await asyncio.sleep(0)
    rebooted = await clients(node.port, local=addr)  # same (ip, port), fresh DTLS state
    await rebooted.handshake()
    assert (await rebooted.post(b"after reboot")).code == coap.CHANGED
    assert node.server.endpoint.session_count == 1
    assert node.count("replaced") == 1
    assert [got[0] for got in node.app.got] == [b"before reboot", b"still", b"after reboot"]


async def test_forget_drops_the_sessions_of_an_ip(
        node: Node, clients: Callable[..., Awaitable[Client]]) -> None:
    a1, a2 = await clients(node.port), await clients(node.port)
    b = await clients(node.port, local=("127.0.0.2", 0), identity=ICCID_B, key=KEY_B)
    for dev in (a1, a2, b):
        await dev.handshake()
    assert node.server.endpoint.forget("127.0.0.1") == 2
    assert node.server.endpoint.session_count == 1
    assert (await a1.recv())[0] == 21  # close_notify
    assert (await b.post(b"b")).code == coap.CHANGED


async def test_idle_sessions_are_evicted_on_the_clock(
        start: Start, clock: ManualClock, clients: Callable[..., Awaitable[Client]]) -> None:
    node = await start(replace(TEST_CONFIG, idle_timeout_s=100))
    dev = await clients(node.port)
    await dev.handshake()
    clock.advance(60)
    assert (await dev.post(b"a")).code == coap.CHANGED  # activity resets the idle time
    clock.advance(60)
    await asyncio.sleep(0.05)
    assert node.server.endpoint.has_session(dev.addr)
    clock.advance(41)
    await until(lambda: not node.server.endpoint.has_session(dev.addr))
    assert node.count("idle_timeout") == 1
    alert = await dev.recv()  # close_notify
    assert alert[0] == 21
    again = await clients(node.port)
    await again.handshake()
    assert (await again.post(b"b")).code == coap.CHANGED


async def test_stalled_handshakes_are_dropped(
        node: Node, clock: ManualClock, clients: Callable[..., Awaitable[Client]]) -> None:
    dev = await clients(node.port)
    await dev.handshake(rounds=1)  # HelloVerifyRequest; then stop at the server's flight
    endpoint = node.server.endpoint
    assert (endpoint.handshake_count, endpoint.session_count) == (1, 1)
    assert endpoint.identity(dev.addr) is None
    clock.advance(29)
    await asyncio.sleep(0.05)
    assert endpoint.handshake_count == 1
    clock.advance(2)
    await until(lambda: endpoint.session_count == 0)
    assert node.count("handshake_timeout") == 1
    assert node.refused == [("127.0.0.1", "DTLS handshake timed out")]
    dev.buf.receive_from_network(dev.held)
    with pytest.raises((TimeoutError, TLSError)):  # forgotten: no Finished (maybe an alert)
        await dev.handshake(timeout=0.3)


async def test_sessions_are_bounded_least_recently_active_evicted(
        start: Start, clients: Callable[..., Awaitable[Client]]) -> None:
    node = await start(replace(TEST_CONFIG, max_sessions=2))
    first, second, third = [await clients(node.port) for _ in range(3)]
    await first.handshake()
    await second.handshake()
    assert (await first.post(b"1")).code == coap.CHANGED  # `second` is now least active
    await third.handshake()
    endpoint = node.server.endpoint
    assert endpoint.session_count == 2
    assert not endpoint.has_session(second.addr)
    assert node.count("evicted") == 1
    assert (await second.recv())[0] == 21  # close_notify
    for dev in (first, third):
        assert (await dev.post(b"x")).code == coap.CHANGED


async def test_new_handshakes_are_rate_limited_per_ip(
        start: Start, clock: ManualClock, clients: Callable[..., Awaitable[Client]]) -> None:
    node = await start(replace(TEST_CONFIG, handshakes_per_ip_per_s=1.0,
                               handshake_burst_per_ip=2))
    for _ in range(2):
        await (await clients(node.port)).handshake()
    limited = await clients(node.port)
    with pytest.raises(TimeoutError):
        await limited.handshake(timeout=0.4)
    assert node.count("rate_limited") == 1
    assert node.refused == [("127.0.0.1", "too many DTLS handshakes from this IP")]
    other_ip = await clients(node.port, local=("127.0.0.2", 0), identity=ICCID_B, key=KEY_B)
    await other_ip.handshake()
    clock.advance(1.0)
    await (await clients(node.port)).handshake()
    assert node.server.endpoint.session_count == 4


async def test_concurrent_handshakes_are_capped(
        start: Start, clock: ManualClock, clients: Callable[..., Awaitable[Client]]) -> None:
    node = await start(replace(TEST_CONFIG, max_handshakes=1))
    stalled = await clients(node.port)
    await stalled.handshake(rounds=1)
    waiting = await clients(node.port, local=("127.0.0.2", 0), identity=ICCID_B, key=KEY_B)
    with pytest.raises(TimeoutError):
        await waiting.handshake(timeout=0.4)
    assert node.count("overloaded") >= 1
    clock.advance(31)  # the stalled one times out, making room
    await until(lambda: node.server.endpoint.handshake_count == 0)
    late = await clients(node.port, local=("127.0.0.2", 0), identity=ICCID_B, key=KEY_B)
    await late.handshake()
    assert node.server.endpoint.identity(late.addr) == ICCID_B


def test_datagrams_pack_whole_records_up_to_the_mtu() -> None:
    rec = [bytes([22, 0xFE, 0xFD]) + bytes(8) + n.to_bytes(2, "big") + bytes(n)
           for n in (100, 200, 1000, 50)]
    assert datagrams(b"".join(rec), 400) == [rec[0] + rec[1], rec[2], rec[3]]
    assert datagrams(b"".join(rec), 2000) == [b"".join(rec)]
    assert datagrams(b"\x16\xfe", 100) == [b"\x16\xfe"]


# -- interop: OpenSSL s_client, libcoap ------------------------------------------------


async def s_client(port: int, identity: str, key: bytes, cipher: str,
                   node: Node | None = None) -> tuple[int | None, str, str | None]:
    """Runs `openssl s_client -dtls1_2` with PSK; with `node`, sends a line once connected,
    waits until the app got it and notes the server's cipher for the session. Returns
    (exit status, output, cipher). Always stops the process."""
    exe = require_binary("openssl")
    proc = await asyncio.create_subprocess_exec(
        exe, "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}", "-psk", key.hex(),
        "-psk_identity", identity, "-cipher", cipher, "-brief",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    out = bytearray()
    negotiated = None

    async def read_until(marker: bytes | None) -> bool:
        """Reads until `marker` is in the output (None: to EOF); False at EOF."""
        assert proc.stdout is not None
        while marker is None or marker not in out:
            chunk = await proc.stdout.read(4096)
            if not chunk:
                return False
            out.extend(chunk)
        return True

    try:
        if await asyncio.wait_for(read_until(b"CONNECTION ESTABLISHED"), 10) and node:
            await asyncio.wait_for(read_until(b"Ciphersuite"), 5)
            proc.stdin.write(b"ping from s_client\n")
            await proc.stdin.drain()
            await until(lambda: any(g[0] == b"ping from s_client\n" for g in node.app.got))
            negotiated = node.server.endpoint.cipher(node.app.got[-1][2])
        proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read_until(None), 5)
        await asyncio.wait_for(proc.wait(), 5)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(errors="replace"), negotiated


@pytest.mark.interop
@pytest.mark.parametrize(("cipher", "iana", "code"), [
    ("PSK-AES128-CBC-SHA256", "TLS_PSK_WITH_AES_128_CBC_SHA256", 0x00AE),
    ("PSK-AES128-CCM8", "TLS_PSK_WITH_AES_128_CCM_8", 0xC0A8),
    ("PSK-AES128-GCM-SHA256", "TLS_PSK_WITH_AES_128_GCM_SHA256", 0x00A8),
])
async def test_openssl_s_client_handshakes(node: Node, cipher: str, iana: str,
                                           code: int) -> None:
    _, out, negotiated = await s_client(node.port, ICCID_A, KEY_A, cipher, node)
    assert f"Ciphersuite: {cipher}" in out, out
    assert "Protocol version: DTLSv1.2" in out, out
    assert node.app.got[0][:2] == (b"ping from s_client\n", ICCID_A)
    assert negotiated == iana
    assert IANA_CODES[iana] == code
    assert node.count("handshake") == 1


@pytest.mark.interop
@pytest.mark.parametrize(("identity", "key"), [
    (ICCID_A, b"wrong-key-123456"), ("8988280666000000999", KEY_A), (ICCID_B, KEY_B),
])
async def test_openssl_s_client_with_wrong_psk_gets_no_session(
        node: Node, identity: str, key: bytes) -> None:
    code, out, _ = await s_client(node.port, identity, key, "PSK-AES128-CBC-SHA256")
    assert code != 0
    assert "CONNECTION ESTABLISHED" not in out, out
    assert "alert" in out, out
    assert node.server.endpoint.session_count == 0
    assert node.app.got == []
    assert node.count("handshake_failed") == 1


@pytest.mark.interop
@pytest.mark.parametrize("binary", ["coap-client-openssl", "coap-client-gnutls"])
async def test_libcoap_clients_post_over_dtls(node: Node, binary: str) -> None:
    exe = require_binary(binary)
    proc = await asyncio.create_subprocess_exec(
        exe, "-u", ICCID_A, "-k", KEY_A.decode(), "-m", "post", "-e", "hello", "-B", "5",
        f"coaps://127.0.0.1:{node.port}/?t=test",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    assert out.decode().strip() == "stored"  # the 2.04's payload reached the client
    assert [(g[0], g[1]) for g in node.app.got] == [(b"hello", ICCID_A)]
