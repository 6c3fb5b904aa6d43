"""Device-side senders used by the endpoint conformance suite (one per protocol)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from integrator import coap
from simwire.app import Simwire
from tests.support.net import UdpClient


@dataclass
class Sent:
    reply: coap.Message | None


class DeviceLink:
    """How a device of one protocol sends an uplink; `replies` says if the protocol answers."""

    protocol: str
    replies: bool

    async def uplink(self, payload: bytes) -> Sent:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class UdpLink(DeviceLink):
    protocol = "UDP"
    replies = False

    def __init__(self, client: UdpClient) -> None:
        self.client = client

    async def uplink(self, payload: bytes) -> Sent:
        self.client.send(payload)
        await self.client.expect_silence(0.2)
        return Sent(None)

    def close(self) -> None:
        self.client.close()


class CoapLink(DeviceLink):
    protocol = "COAP"
    replies = True

    def __init__(self, client: UdpClient) -> None:
        self.client = client
        self.mid = int.from_bytes(os.urandom(2), "big")

    def next_mid(self) -> int:
        self.mid = (self.mid + 1) & 0xFFFF
        return self.mid

    async def request(self, msg: coap.Message) -> coap.Message:
        return coap.parse(await self.client.request(coap.serialize(msg)))

    async def uplink(self, payload: bytes) -> Sent:
        msg = coap.Message(coap.CON, coap.POST, self.next_mid(), os.urandom(4),
                           [(coap.OPT_URI_QUERY, b"t=test")], payload)
        return Sent(await self.request(msg))

    def close(self) -> None:
        self.client.close()


async def open_link(app: Simwire, protocol: str, local_ip: str = "127.0.0.1") -> DeviceLink:
    if protocol == "UDP":
        return UdpLink(await UdpClient.open(("127.0.0.1", app.ports.udp), local_ip))
    if protocol == "COAP":
        return CoapLink(await UdpClient.open(("127.0.0.1", app.ports.coap), local_ip))
    raise ValueError(protocol)
