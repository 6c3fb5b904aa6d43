"""Durable no-op CoAP server for bench/ingest.py: the ceiling of "flush before the ACK".

    python bench/durable_server.py --host 127.0.0.1 --port 5683 --log FILE

Every Confirmable request is written to FILE and flushed (`fdatasync`) before its
piggybacked 2.04 ACK goes out, with the least work any durable server can do around
that: no routing, no SIM lookup, no decoding, no database. The event loop collects
requests; one writer thread writes everything collected so far with one `pwrite` and one
`fdatasync` (group commit, like Simwire's SQLite writer), then hands the replies back to
the loop. FILE is preallocated (64 MiB) and written as a ring: overwriting allocated
blocks is the cheapest flush ext4 offers (no journal commit for the file's size), so
this is an upper bound for a durable server on the machine, not a design to copy (a real
log needs framing, checksums and recovery). Anything other than a well-formed CON
request is dropped. Uses uvloop when installed, as `simwire serve` does. Prints
"durable ready <port>" once bound; exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import signal
import socket
import threading
from pathlib import Path
from typing import Any

RING = 64 * 1024 * 1024
_ACK_CHANGED = 0x44  # 2.04


class Durable(asyncio.DatagramProtocol):
    """Called by the loop per datagram; `Writer` calls `replied` back on the loop."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[tuple[bytes, bytes, Any]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 4 or data[0] >> 4 != 0x4:  # version 1, type CON
            return
        tkl = data[0] & 0x0F
        if tkl > 8 or len(data) < 4 + tkl:
            return
        reply = bytes((0x60 | tkl, _ACK_CHANGED)) + data[2:4 + tkl]
        pending = self.pending
        pending.append((data, reply, addr))
        if len(pending) == 1:
            asyncio.get_running_loop().call_soon(self.hand_off)

    def hand_off(self) -> None:
        batch, self.pending = self.pending, []
        self.writer.queue.put(batch)

    def replied(self, batch: list[tuple[bytes, bytes, Any]]) -> None:
        transport = self.transport
        if transport is None:
            return
        for _, reply, addr in batch:
            transport.sendto(reply, addr)


class Writer:
    """The flush thread: one `pwrite` + `fdatasync` per batch of whatever is queued."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.posix_fallocate(self.fd, 0, RING)
        os.fsync(self.fd)
        self.loop = loop
        self.queue: queue.SimpleQueue[list[tuple[bytes, bytes, Any]] | None] = (
            queue.SimpleQueue())
        self.protocol: Durable | None = None
        self.thread = threading.Thread(target=self.run, name="durable-writer", daemon=True)

    def run(self) -> None:
        offset = 0
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = first
            while True:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.queue.put(None)
                    break
                batch += more
            blob = b"".join(data for data, _, _ in batch)
            if offset + len(blob) > RING:
                offset = 0
            os.pwrite(self.fd, blob, offset)
            offset += len(blob)
            os.fdatasync(self.fd)
            protocol = self.protocol
            if protocol is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(protocol.replied, batch)

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()
        os.close(self.fd)


async def main(host: str, port: int, log: Path) -> None:
    loop = asyncio.get_running_loop()
    writer = Writer(log, loop)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind((host, port))
    transport, protocol = await loop.create_datagram_endpoint(lambda: Durable(writer), sock=sock)
    writer.protocol = protocol
    writer.thread.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"durable ready {sock.getsockname()[1]}", flush=True)
    try:
        await stop.wait()
    finally:
        transport.close()
        writer.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5683)
    ap.add_argument("--log", type=Path, required=True, help="the ring file (created, 64 MiB)")
    a = ap.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(a.host, a.port, a.log))
    else:
        uvloop.run(main(a.host, a.port, a.log))
