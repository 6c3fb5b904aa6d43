"""Device-side senders: one link per protocol (endpoint conformance suite) and
`Device`, which sends UDP and CoAP from 127.0.0.1 and returns once each message is stored."""

from __future__ import annotations

import os
from dataclasses import dataclass

from integrator import coap
from simwire.app import Simwire
from tests.support.dtls import Client
from tests.support.net import UdpClient
from tests.support.simwire import eventually


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


class CoapsLink(DeviceLink):
    """CoAP over DTLS-PSK (:5684): the handshake happens when the link opens."""

    protocol = "COAP"  # stored and counted as COAP
    replies = True

    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    async def open(cls, app: Simwire, local_ip: str, identity: str, key: bytes) -> CoapsLink:
        client = await Client.open(app.ports.coaps, identity, key, local=(local_ip, 0))
        try:
            await client.handshake()
        except BaseException:
            client.close()
            raise
        return cls(client)

    async def uplink(self, payload: bytes) -> Sent:
        return Sent(await self.client.post(payload))

    def close(self) -> None:
        self.client.close()


async def open_link(app: Simwire, protocol: str, local_ip: str = "127.0.0.1",
                    psk: tuple[str, bytes] | None = None) -> DeviceLink:
    """`COAPS` needs the device's (identity, key)."""
    if protocol == "UDP":
        return UdpLink(await UdpClient.open(("127.0.0.1", app.ports.udp), local_ip))
    if protocol == "COAP":
        return CoapLink(await UdpClient.open(("127.0.0.1", app.ports.coap), local_ip))
    if protocol == "COAPS":
        assert psk is not None
        return await CoapsLink.open(app, local_ip, *psk)
    raise ValueError(protocol)


class Device:
    """UDP datagrams and CoAP POSTs from 127.0.0.1; each call returns once stored."""

    def __init__(self, node: Simwire, udp: UdpClient, coap_client: UdpClient) -> None:
        self.node, self.u, self.c, self.mid = node, udp, coap_client, 0

    @classmethod
    async def open(cls, node: Simwire) -> Device:
        return cls(node, await UdpClient.open(("127.0.0.1", node.ports.udp)),
                   await UdpClient.open(("127.0.0.1", node.ports.coap)))

    def close(self) -> None:
        self.u.close()
        self.c.close()

    def stored(self) -> float:
        """`simwire_uplinks_total{outcome="stored"}` over UDP and CoAP."""
        return sum(self.node.metrics.registry.get_sample_value(
            "simwire_uplinks_total", {"protocol": p, "outcome": "stored"}) or 0
            for p in ("UDP", "COAP"))

    async def udp(self, *payloads: bytes) -> None:
        for payload in payloads:
            before = self.stored()
            self.u.send(payload)
            await eventually(lambda before=before: self.stored() == before + 1)

    async def coap(self, payload: bytes, topic: str | None = None) -> None:
        """A CON POST; asserts the 2.04 (sent once the message is stored)."""
        self.mid += 1
        opts = [(coap.OPT_URI_QUERY, b"t=" + topic.encode())] if topic else []
        reply = await self.c.request(coap.serialize(
            coap.Message(coap.CON, coap.POST, self.mid, b"", opts, payload)))
        assert coap.parse(reply).code == coap.CHANGED
