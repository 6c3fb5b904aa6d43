"""Scripted LwM2M devices over plain UDP and DTLS (mbedtls): they send what a test says
and record what the server asks, byte for byte (the LwM2M bootstrap and end-to-end tests).
`sdk_examples.lwm2m_client` is the full aiocoap client; these stay below it, where a test
needs to see or shape single messages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mbedtls import tls

from integrator import coap
from integrator.lwm2m.formats import Value, decode
from integrator.lwm2m.objects import Registry
from tests.support.dtls import Client as DtlsClient
from tests.support.net import UdpListener
from tests.support.simwire import Api

REGISTRY = Registry.default()


async def history(api: Api, iccid: str) -> list[dict[str, Any]]:
    """The device's LWM2M history items (up to 100)."""
    status, body = await api.call("GET", f"/v1/inspect/devices/{iccid}/history",
                                  params={"pageSize": "100", "protocol": "LWM2M"})
    assert status == 200, body
    return list(body["items"])


async def history_values(api: Api, iccid: str, n: int) -> list[dict[str, Any]] | None:
    """The JSON values of the device's LWM2M history once there are exactly `n` items (in
    no particular order: a test clock gives them all one time), else None."""
    items = await history(api, iccid)
    return [json.loads(i["payload"]) for i in items] if len(items) == n else None
DELETED = coap.code(2, 2)
METHODS = {coap.GET: "GET", coap.POST: "POST", coap.PUT: "PUT", coap.DELETE: "DELETE"}


@dataclass
class Seen:
    """A request the server sent to the client."""

    method: str
    path: str
    content_format: int | None
    payload: bytes
    mid: int

    def values(self) -> dict[str, Value]:
        assert self.content_format is not None
        records = decode(self.content_format, self.payload, self.path, REGISTRY)
        assert all(r.time is None for r in records)
        return {r.path: r.value for r in records}


def default_answer(req: Seen) -> int:
    return DELETED if req.method == "DELETE" else coap.CHANGED


class Device:
    """A LwM2M client's CoAP side on some datagram transport (`_send`, `_recv`)."""

    def __init__(self) -> None:
        self._mid = 0x4200
        self.responses: list[coap.Message] = []
        self.pending: list[coap.Message] = []  # server requests read while awaiting a response
        self.seen: list[Seen] = []

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    async def _recv(self, timeout: float) -> bytes:
        raise NotImplementedError

    async def recv(self, timeout: float = 5.0) -> coap.Message:
        return coap.parse(await self._recv(timeout))

    def post_bs(self, *query: str, mid: int | None = None) -> int:
        """Send the Bootstrap-Request (CON POST /bs?...); returns its MID."""
        if mid is None:
            self._mid += 1
            mid = self._mid
        options = [(coap.OPT_URI_PATH, b"bs"), *((coap.OPT_URI_QUERY, q.encode()) for q in query)]
        self._send(coap.serialize(coap.Message(coap.CON, coap.POST, mid, b"\x0b\x5e",
                                               options)))
        return mid

    async def bootstrap_request(self, *query: str, code: int = coap.POST,
                                path: bytes = b"bs") -> coap.Message:
        """A request to the bootstrap route; returns the server's response to it."""
        return await self.call(code, path, *query)

    async def call(self, code: int, path: bytes, *query: str, payload: bytes = b""
                   ) -> coap.Message:
        """A CON request to the one-segment `path`; returns the server's response."""
        self._mid += 1
        options = [(coap.OPT_URI_PATH, path), *((coap.OPT_URI_QUERY, q.encode()) for q in query)]
        self._send(coap.serialize(coap.Message(coap.CON, code, self._mid, b"\x0b\x5e",
                                               options, payload)))
        return await self.response(self._mid)

    async def register(self, ep: str, links: bytes = b"</3/0>", lifetime: int = 300
                       ) -> coap.Message:
        """`POST /rd?ep=..&lt=..&lwm2m=1.1` with link-format `links`; the response."""
        self._mid += 1
        self._send(coap.serialize(coap.Message(
            coap.CON, coap.POST, self._mid, b"\x07",
            [(coap.OPT_URI_PATH, b"rd"), (coap.OPT_CONTENT_FORMAT, b"\x28"),
             (coap.OPT_URI_QUERY, f"ep={ep}".encode()),
             (coap.OPT_URI_QUERY, f"lt={lifetime}".encode()),
             (coap.OPT_URI_QUERY, b"lwm2m=1.1")], links)))
        return await self.response(self._mid)

    async def request(self, timeout: float = 5.0) -> coap.Message:
        """The server's next request (responses meanwhile are kept)."""
        while True:
            msg = self.pending.pop(0) if self.pending else await self.recv(timeout)
            if msg.is_request:
                return msg
            self.responses.append(msg)

    def answer(self, req: coap.Message, code: int, payload: bytes = b"",
               options: list[tuple[int, bytes]] | None = None) -> None:
        """A piggy-backed ACK to the server's request `req`."""
        self._send(coap.serialize(coap.Message(coap.ACK, code, req.mid, req.token,
                                               options or [], payload)))

    def notify(self, token: bytes, observe: int, payload: bytes, content_format: int) -> None:
        """A NON notification of the observation `token`."""
        self._mid += 1
        self._send(coap.serialize(coap.Message(
            coap.NON, coap.CONTENT, self._mid, token,
            [(coap.OPT_OBSERVE, coap.uint_option(observe)),
             (coap.OPT_CONTENT_FORMAT, coap.uint_option(content_format))], payload)))

    async def response(self, mid: int, timeout: float = 5.0) -> coap.Message:
        """The ACK to our request `mid` (server requests meanwhile are kept, unanswered)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for msg in self.responses:
                if msg.mid == mid:
                    self.responses.remove(msg)
                    return msg
            msg = await self.recv(deadline - loop.time())
            if msg.is_request:
                self.pending.append(msg)
            else:
                self.responses.append(msg)

    async def serve(self, answer: Callable[[Seen], int] = default_answer,
                    timeout: float = 5.0) -> list[Seen]:
        """Answer the server's requests (piggy-backed ACKs) until Bootstrap-Finish or the
        first non-2.xx answer; returns them (retransmissions are ACKed, not listed)."""
        got: list[Seen] = []
        while True:
            msg = self.pending.pop(0) if self.pending else await self.recv(timeout)
            if not msg.is_request:
                self.responses.append(msg)
                continue
            assert msg.mtype == coap.CON
            path = "/" + "/".join(v.decode() for v in msg.opt_all(coap.OPT_URI_PATH))
            cf = msg.opt(coap.OPT_CONTENT_FORMAT)
            req = Seen(METHODS[msg.code], path, None if cf is None else int.from_bytes(cf),
                       msg.payload, msg.mid)
            known = next((r for r in self.seen if r.mid == req.mid), None)
            code = answer(req) if known is None else answer(known)
            self._send(coap.serialize(coap.Message(coap.ACK, code, msg.mid, msg.token)))
            if known is not None:
                continue  # a retransmission
            self.seen.append(req)
            got.append(req)
            if code >> 5 != 2 or (req.method, req.path) == ("POST", "/bs"):
                return got

    async def expect_silence(self, seconds: float = 0.5) -> None:
        try:
            data = await self._recv(seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected nothing, got {coap.parse(data)}")


class UdpDevice(Device):
    def __init__(self, sock: UdpListener, server: tuple[str, int]) -> None:
        super().__init__()
        self.sock = sock
        self.server = server

    @classmethod
    async def open(cls, port: int, ip: str) -> UdpDevice:
        """A device at `ip` talking to 127.0.0.1:`port`."""
        return cls(await UdpListener.open(ip), ("127.0.0.1", port))

    def _send(self, data: bytes) -> None:
        self.sock.send_to(data, self.server)

    async def _recv(self, timeout: float) -> bytes:
        return await self.sock.recv(timeout)

    def close(self) -> None:
        self.sock.close()


class DtlsDevice(Device):
    def __init__(self, client: DtlsClient) -> None:
        super().__init__()
        self.client = client

    @classmethod
    async def open(cls, port: int, identity: str, key: bytes, ip: str) -> DtlsDevice:
        """A DTLS session from `ip` to 127.0.0.1:`port` (handshake done)."""
        client = await DtlsClient.open(port, identity, key, local=(ip, 0))
        await client.handshake()
        return cls(client)

    def _send(self, data: bytes) -> None:
        self.client.send_app(data)

    async def _recv(self, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                data = bytes(self.client.buf.read(2048))
            except tls.WantReadError:
                data = b""
            if data:
                return data
            self.client.buf.receive_from_network(
                await asyncio.wait_for(self.client.queue.get(), deadline - loop.time()))

    def close(self) -> None:
        assert self.client.transport is not None
        self.client.transport.close()
