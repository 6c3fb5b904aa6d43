"""A DTLS 1.2 PSK client for tests: python-mbedtls on an asyncio UDP socket (sans-I/O),
used by the DTLS endpoint tests and the endpoint conformance suite."""

from __future__ import annotations

import asyncio

from mbedtls import tls

from integrator import coap
from integrator.endpoints.dtls_mbedtls import datagrams

ICCID_A = "8988280666000000021"
KEY_A = b"Sup3rSecretKey12"
CBC_SHA256 = "TLS-PSK-WITH-AES-128-CBC-SHA256"  # the only suite FreeRTOS devices offer


class Client(asyncio.DatagramProtocol):
    """A python-mbedtls DTLS 1.2 PSK client on an asyncio UDP socket (sans-I/O)."""

    def __init__(self, identity: str, key: bytes, ciphers: tuple[str, ...]) -> None:
        ctx = tls.ClientContext(tls.DTLSConfiguration(
            pre_shared_key=(identity, key), ciphers=ciphers, validate_certificates=False,
            lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
            highest_supported_version=tls.DTLSVersion.DTLSv1_2))
        self.buf = ctx.wrap_buffers(None)
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        self.held = b""
        self.transport: asyncio.DatagramTransport | None = None
        self._mid = 0

    @classmethod
    async def open(cls, port: int, identity: str = ICCID_A, key: bytes = KEY_A,
                   ciphers: tuple[str, ...] = (CBC_SHA256,), local: tuple[str, int] = (
                       "127.0.0.1", 0)) -> Client:
        """A client bound to `local` (a 127.0.0.x address picks the device's SIM).
        Defaults: the test identity/key of tests/integrator/test_dtls.py."""
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(
            lambda: cls(identity, key, ciphers), local_addr=local,
            remote_addr=("127.0.0.1", port))
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        self.queue.put_nowait(data)

    @property
    def addr(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def send_raw(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    def _flush(self) -> None:
        n = len(self.buf._output_buffer)
        if n:
            data = self.buf.peek_outgoing(n)
            self.buf.consume_outgoing(n)
            for datagram in datagrams(data, 1400):
                self.sent.append(datagram)
                self.send_raw(datagram)

    async def recv(self, timeout: float = 2.0) -> bytes:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def handshake(self, timeout: float = 3.0, rounds: int | None = None) -> None:
        """Runs the handshake. With `rounds`, returns on receiving datagram `rounds + 1`,
        kept unprocessed in `held` (0: after sending the first ClientHello)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        received = 0
        while self.buf._handshake_state.name != "HANDSHAKE_OVER":
            try:
                self.buf.do_handshake()
            except tls.WantWriteError:
                self._flush()
            except tls.WantReadError:
                self._flush()
                data = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                received += 1
                if rounds is not None and received > rounds:
                    self.held = data
                    return
                self.buf.receive_from_network(data)
        self._flush()

    def send_app(self, plaintext: bytes) -> None:
        """Send one application record (any bytes: also malformed CoAP)."""
        self.buf.write(plaintext)
        self._flush()

    async def post(self, payload: bytes, timeout: float = 2.0, mid: int | None = None
                   ) -> coap.Message:
        """A CON POST `?t=test`; `mid` repeats a message ID (a retransmission)."""
        if mid is None:
            self._mid += 1
            mid = self._mid
        self.send_app(coap.serialize(coap.Message(
            coap.CON, coap.POST, mid, b"\x01", [(coap.OPT_URI_QUERY, b"t=test")], payload)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.buf.receive_from_network(
                await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
            try:
                return coap.parse(self.buf.read(2048))
            except tls.WantReadError:
                continue

    def shutdown(self) -> None:
        self.buf.shutdown()
        self._flush()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


