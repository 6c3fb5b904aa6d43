"""What the UDP-based endpoints share: socket set-up and the running-server handle."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass

BindUdp = Callable[[str, int, int], socket.socket]
"""How an endpoint gets its socket: `(host, port, rcvbuf)` -> a bound non-blocking UDP
socket. `bind_udp` by default; a worker process (simwire.workers) hands out the socket the
supervisor bound and shares with the other workers."""


@dataclass
class DatagramServer:
    """A bound UDP endpoint. `close()` stops receiving; simwire.app then drains the
    pipeline, so uplinks already received are committed and answered."""

    transport: asyncio.DatagramTransport

    @property
    def port(self) -> int:
        return int(self.transport.get_extra_info("sockname")[1])

    def close(self) -> None:
        self.transport.close()


def bind_udp(host: str, port: int, rcvbuf: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket with a large receive buffer (bursts of devices)."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    sock = socket.socket(info[0], socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind(info[4])
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
