"""Loopback helpers for tests: free ports, a UDP client that waits for replies."""

from __future__ import annotations

import asyncio
import socket


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


class UdpClient:
    """One UDP socket bound to `local_ip` (any 127.0.0.x acts as a distinct device)."""

    def __init__(self, transport: asyncio.DatagramTransport, proto: _Receiver) -> None:
        self._transport = transport
        self._proto = proto

    @classmethod
    async def open(cls, server: tuple[str, int], local_ip: str = "127.0.0.1") -> UdpClient:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            _Receiver, local_addr=(local_ip, 0), remote_addr=server
        )
        return cls(transport, proto)

    @property
    def local_port(self) -> int:
        return int(self._transport.get_extra_info("sockname")[1])

    def send(self, data: bytes) -> None:
        self._transport.sendto(data)

    async def recv(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self._proto.queue.get(), timeout)

    async def request(self, data: bytes, timeout: float = 5.0) -> bytes:
        self.send(data)
        return await self.recv(timeout)

    async def expect_silence(self, seconds: float = 0.3) -> None:
        try:
            data = await asyncio.wait_for(self._proto.queue.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no reply, got {data.hex()}")

    def close(self) -> None:
        self._transport.close()


class _FromReceiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, (addr[0], addr[1])))


class UdpListener:
    """An unconnected socket on `local_ip` (a device's downlink port): receives from
    anyone and remembers who sent last (to answer a CoAP downlink)."""

    def __init__(self, transport: asyncio.DatagramTransport, proto: _FromReceiver) -> None:
        self._transport = transport
        self._proto = proto
        self.last_sender: tuple[str, int] = ("", 0)

    @classmethod
    async def open(cls, local_ip: str = "127.0.0.1") -> UdpListener:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            _FromReceiver, local_addr=(local_ip, 0))
        return cls(transport, proto)

    @property
    def local_port(self) -> int:
        return int(self._transport.get_extra_info("sockname")[1])

    async def recv(self, timeout: float = 5.0) -> bytes:
        data, self.last_sender = await asyncio.wait_for(self._proto.queue.get(), timeout)
        return data

    def send_to(self, data: bytes, addr: tuple[str, int]) -> None:
        self._transport.sendto(data, addr)

    async def expect_silence(self, seconds: float = 0.3) -> None:
        try:
            data, _ = await asyncio.wait_for(self._proto.queue.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected nothing, got {data.hex()}")

    def close(self) -> None:
        self._transport.close()
