"""Run the shared load generator with its datagrams coming from several loopback source
addresses, unchanged: `simwire serve --workers N` steers each source address to one worker
(ADR 0009), so load from one address would reach one worker only.

    python bench/sources.py N path/to/coap_load.py [its arguments]

Sources are 127.0.0.1 .. 127.0.0.N. CoAP mode: each socket the generator opens (one per
worker coroutine) is bound to the next source in turn. UDP mode: the generator's one
sender socket sends round-robin through one connected socket per source. The raw
receiver baseline (UDP mode without --no-sink) runs the generator as is: its sink
process must import the generator as the main module, and a receiver does not care
where datagrams come from. bench/ingest.py runs every phase through this with the same N,
so baselines and Simwire see the same load.
"""

from __future__ import annotations

import asyncio
import itertools
import runpy
import socket
import sys
from typing import Any


def source_ips(n: int) -> list[str]:
    return [f"127.0.0.{i}" for i in range(1, n + 1)]


def spread(n: int) -> None:
    """Patch socket creation in this process so the generator uses `n` sources."""
    sources = itertools.cycle(source_ips(n))
    real_socket = socket.socket

    class SpreadSocket(socket.socket):
        """A UDP sender that `connect`s one socket per source and `send`s round-robin."""

        _spread: list[socket.socket]
        _next: Any

        def connect(self, address: Any) -> None:
            if self.type != socket.SOCK_DGRAM:
                super().connect(address)
                return
            self._spread = []
            for _ in range(n):
                sock = real_socket(self.family, self.type)
                sock.setblocking(False)
                sock.bind((next(sources), 0))
                sock.connect(address)
                self._spread.append(sock)
            self._next = itertools.cycle(self._spread).__next__

        def send(self, data: Any, flags: int = 0) -> int:
            return int(self._next().send(data, flags))

    socket.socket = SpreadSocket  # type: ignore[misc]
    loop_cls = asyncio.base_events.BaseEventLoop
    create = loop_cls.create_datagram_endpoint

    async def bound(self: Any, factory: Any, local_addr: Any = None,
                    remote_addr: Any = None, **kw: Any) -> Any:
        if local_addr is None and remote_addr is not None and kw.get("sock") is None:
            local_addr = (next(sources), 0)
        return await create(self, factory, local_addr=local_addr, remote_addr=remote_addr,
                            **kw)

    loop_cls.create_datagram_endpoint = bound  # type: ignore[method-assign,assignment]


def main() -> None:
    n, tool, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if n > 1 and not ("--udp" in args and "--no-sink" not in args):
        spread(n)
    sys.argv = [tool, *args]
    runpy.run_path(tool, run_name="__main__")


if __name__ == "__main__":
    main()
