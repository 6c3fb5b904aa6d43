"""Worker processes: `simwire serve --workers N` (ADR 0009).

The supervisor (`supervise`, called by simwire.cli) binds every device port N times with
SO_REUSEPORT plus a classic BPF program that sends each datagram to socket
`source address % N` (`owner_index`), binds one HTTP listening socket, and runs N worker
processes (`python -m simwire.cli serve ...` again, told by `SIMWIRE_WORKER` which
inherited sockets are theirs). It keeps its own reference to every socket, so:

- a source address always reaches the same worker index: DTLS sessions, CoAP
  deduplication and LwM2M registrations stay in one process;
- datagrams that arrive while a worker restarts wait in its socket's receive buffer;
- ports stay bound across restarts (port 0 is resolved once, by the supervisor).

A worker that dies is started again (backoff 0.5 s doubling to 30 s while it keeps dying
within 10 s). Worker 0 is the one that may lead (simwire.leadership: when it holds the
store's leader lease, it delivers the outbox and runs retention); the others send it
notices over `Peers`, Unix datagram sockets the supervisor creates (one inbox per worker).
State is shared through the store; notices only make it fresh sooner.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from integrator.endpoints.datagram import bind_udp
from simwire.config import Config
from simwire.logs import RateLimitedLogger

log = logging.getLogger("simwire.workers")

ENV = "SIMWIRE_WORKER"
RCVBUF = 8 * 1024 * 1024
SO_ATTACH_REUSEPORT_CBPF = 51  # linux/socket.h; not exported by the socket module
_SKF_NET_OFF = -0x100000  # classic BPF: offsets from the network header
_UDP_PORTS = ("udp_port", "coap_port", "coaps_port", "lwm2m_port", "lwm2m_coaps_port",
              "lwm2m_bootstrap_port", "lwm2m_bootstrap_coaps_port")
_BACKOFF_MAX_S = 30.0
_STABLE_S = 10.0
_STOP_GRACE_S = 30.0


def owner_index(ip: str, count: int) -> int:
    """The worker a datagram from `ip` reaches: the IPv4 address (or an IPv6 address's low
    32 bits) modulo the worker count, as `reuseport_program` computes it in the kernel."""
    if count <= 1:
        return 0
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return (int(addr) & 0xFFFFFFFF) % count


def reuseport_program(count: int) -> bytes:
    """A classic BPF program for SO_ATTACH_REUSEPORT_CBPF: returns the index of the
    socket in the SO_REUSEPORT group for the packet's source address (`owner_index`)."""
    def op(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)

    ld_b, ld_w, rsh, jeq, ja, mod, ret_a = 0x30, 0x20, 0x74, 0x15, 0x05, 0x94, 0x16
    return b"".join((
        op(ld_b, 0, 0, _SKF_NET_OFF),       # A = first byte of the IP header
        op(rsh, 0, 0, 4),                   # A = IP version
        op(jeq, 0, 2, 6),                   # IPv6? else skip to the IPv4 load
        op(ld_w, 0, 0, _SKF_NET_OFF + 20),  # A = low 32 bits of the IPv6 source
        op(ja, 0, 0, 1),
        op(ld_w, 0, 0, _SKF_NET_OFF + 12),  # A = IPv4 source
        op(mod, 0, 0, count),
        op(ret_a, 0, 0, 0),
    ))


def attach_reuseport_program(sock: socket.socket, count: int) -> None:
    """Attach `reuseport_program(count)` to the SO_REUSEPORT group of `sock`."""
    code = reuseport_program(count)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def bind_group(host: str, port: int, count: int) -> tuple[int, list[socket.socket]]:
    """`count` UDP sockets on one port (port 0: one the kernel picks), in the order the
    BPF program indexes them. Returns the port and the sockets."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = bind_udp(host, port, RCVBUF, reuse_port=True)
            socks.append(sock)
            port = sock.getsockname()[1]
        attach_reuseport_program(socks[0], count)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return port, socks


# -- in a worker ---------------------------------------------------------------------------


class Peers:
    """Notices between the workers of one machine (each is a small JSON datagram to a
    worker's inbox). Sending never blocks: a full inbox drops the notice (the receivers
    also poll the store). simwire.app registers `handlers` by notice type."""

    def __init__(self, index: int, inbox: socket.socket | None,
                 outboxes: Sequence[socket.socket]) -> None:
        self.index = index
        self._inbox = inbox
        self._outboxes = list(outboxes)
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._warn = RateLimitedLogger(log)
        self._pending: set[tuple[int, str]] = set()

    def start(self) -> None:
        if self._inbox is not None:
            asyncio.get_running_loop().add_reader(self._inbox.fileno(), self._read)

    def stop(self) -> None:
        if self._inbox is not None:
            asyncio.get_running_loop().remove_reader(self._inbox.fileno())

    def send(self, index: int, kind: str, **data: Any) -> None:
        """Send notice `kind` to worker `index` (not to this one)."""
        if index == self.index or index >= len(self._outboxes):
            return
        body = json.dumps({"t": kind, **data}, separators=(",", ":")).encode()
        try:
            self._outboxes[index].send(body, socket.MSG_DONTWAIT)
        except OSError as exc:  # full inbox (worker restarting or busy): the store will do
            self._warn.warning(f"peer:{index}", "worker %d: notice %r to worker %d dropped: "
                               "%s", self.index, kind, index, exc)

    def send_soon(self, index: int, kind: str) -> None:
        """Send a notice without data at most once per event-loop iteration (e.g. "the
        outbox has new events" after every commit)."""
        key = (index, kind)
        if key in self._pending or index == self.index:
            return
        self._pending.add(key)

        def flush() -> None:
            self._pending.discard(key)
            self.send(index, kind)

        asyncio.get_running_loop().call_soon(flush)

    def broadcast(self, kind: str, **data: Any) -> None:
        for index in range(len(self._outboxes)):
            self.send(index, kind, **data)

    def _read(self) -> None:
        assert self._inbox is not None
        for _ in range(256):
            try:
                body = self._inbox.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("worker %d: peer inbox: %s", self.index, exc)
                return
            try:
                notice = json.loads(body)
                handler = self.handlers.get(notice.get("t"))
                if handler is not None:
                    handler(notice)
            except Exception:  # a notice must never take the worker down
                log.exception("worker %d: peer notice failed", self.index)


@dataclass
class WorkerContext:
    """What a worker process inherited from the supervisor (`from_env`); simwire.app
    takes its sockets instead of binding, and `owns` tells which devices are its own."""

    index: int
    count: int
    ports: dict[str, int]
    """Config overrides: the ports the supervisor resolved (port 0 -> the bound port)."""
    udp: dict[int, socket.socket]
    http: socket.socket
    peers: Peers
    ready_fd: int
    lifeline_fd: int
    metrics_dir: Path
    """Where the workers' metrics snapshots meet (simwire.metrics.SharedMetrics)."""
    pid: int = field(default_factory=os.getpid)

    @property
    def leader(self) -> bool:
        """May contend for the leader lease (simwire.app): worker 0 only."""
        return self.index == 0

    def owns(self, ip: str) -> bool:
        """Datagrams from `ip` reach this worker (so its DTLS sessions and LwM2M
        registrations are held here)."""
        try:
            return owner_index(ip, self.count) == self.index
        except ValueError:
            return self.index == 0

    def bind_udp(self, host: str, port: int, rcvbuf: int) -> socket.socket:
        """The endpoints' `BindUdp`: the inherited socket of `port`."""
        try:
            return self.udp[port]
        except KeyError:
            raise OSError(f"worker {self.index}: no socket inherited for UDP port {port}"
                          ) from None

    def ready(self) -> None:
        """Tell the supervisor this worker serves (once)."""
        if self.ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, b"1")
                os.close(self.ready_fd)
            self.ready_fd = -1

    def watch_supervisor(self, on_gone: Callable[[], None]) -> None:
        """Call `on_gone` when the supervisor exits (the lifeline pipe reaches EOF)."""
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = os.read(self.lifeline_fd, 64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self.lifeline_fd)
                on_gone()

        os.set_blocking(self.lifeline_fd, False)
        loop.add_reader(self.lifeline_fd, readable)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> WorkerContext | None:
        raw = (os.environ if env is None else env).get(ENV)
        if not raw:
            return None
        spec = json.loads(raw)

        def adopt(fd: int) -> socket.socket:
            sock = socket.socket(fileno=fd)  # family and type are read from the fd
            sock.setblocking(False)
            return sock

        udp = {int(port): adopt(fd) for port, fd in spec["udp"].items()}
        peers = Peers(spec["index"], adopt(spec["inbox"]),
                      [adopt(fd) for fd in spec["outboxes"]])
        return cls(spec["index"], spec["count"], dict(spec["ports"]), udp,
                   adopt(spec["http"]), peers, spec["ready"], spec["lifeline"],
                   Path(spec["metrics"]))


# -- the supervisor ------------------------------------------------------------------------


@dataclass
class _Sockets:
    """Everything the supervisor bound, kept open for the workers' whole life."""

    ports: dict[str, int]
    udp: dict[int, list[socket.socket]]
    http: socket.socket
    inboxes: list[tuple[socket.socket, socket.socket]]
    """Per worker: (the end it reads, the end others write)."""

    @classmethod
    def bind(cls, cfg: Config, count: int) -> _Sockets:
        ports: dict[str, int] = {}
        udp: dict[int, list[socket.socket]] = {}
        for name in _UDP_PORTS:
            want = getattr(cfg, name)
            if want is None:
                continue
            if want and want in udp:
                ports[name] = want
                continue
            port, socks = bind_group(cfg.host, want, count)
            udp[port] = socks
            ports[name] = port
        http = socket.create_server((cfg.http_host or cfg.host, cfg.http_port), backlog=1024)
        ports["http_port"] = http.getsockname()[1]
        inboxes = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(count)]
        return cls(ports, udp, http, inboxes)

    def spec(self, index: int, count: int, ready_fd: int, lifeline_fd: int) -> dict[str, Any]:
        return {
            "index": index, "count": count, "ports": self.ports,
            "udp": {str(port): socks[index].fileno() for port, socks in self.udp.items()},
            "http": self.http.fileno(), "inbox": self.inboxes[index][0].fileno(),
            "outboxes": [pair[1].fileno() for pair in self.inboxes],
            "ready": ready_fd, "lifeline": lifeline_fd,
        }

    def fds(self, index: int) -> list[int]:
        return [socks[index].fileno() for socks in self.udp.values()] + [
            self.http.fileno(), self.inboxes[index][0].fileno(),
            *(pair[1].fileno() for pair in self.inboxes)]

    def close(self) -> None:
        for socks in self.udp.values():
            for sock in socks:
                sock.close()
        self.http.close()
        for a, b in self.inboxes:
            a.close()
            b.close()


class Supervisor:
    """Runs and restarts the workers of `simwire serve --workers N`."""

    def __init__(self, cfg: Config, argv: Sequence[str]) -> None:
        self.cfg = cfg
        self.count = cfg.workers
        self.argv = list(argv)
        self.sockets = _Sockets.bind(cfg, self.count)
        self.procs: list[asyncio.subprocess.Process | None] = [None] * self.count
        self._stopping = False
        self._lifeline_r, self._lifeline_w = os.pipe()
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="simwire-metrics-"))

    async def _spawn(self, index: int) -> tuple[asyncio.subprocess.Process, bool]:
        """Start worker `index`; returns once it is ready (True) or has died (False)."""
        ready_r, ready_w = os.pipe()
        spec = {**self.sockets.spec(index, self.count, ready_w, self._lifeline_r),
                "metrics": str(self.metrics_dir)}
        env = {**os.environ, ENV: json.dumps(spec)}
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "simwire.cli", *self.argv, env=env,
                pass_fds=[*self.sockets.fds(index), ready_w, self._lifeline_r])
        finally:
            os.close(ready_w)
        self.procs[index] = proc
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[bool] = loop.create_future()

        def readable() -> None:  # b"1" once ready; EOF if it died first
            if not ready.done():
                ready.set_result(os.read(ready_r, 1) == b"1")

        loop.add_reader(ready_r, readable)
        try:
            return proc, await ready
        finally:
            loop.remove_reader(ready_r)
            os.close(ready_r)

    async def _keep(self, index: int, first: asyncio.subprocess.Process) -> None:
        """Restart worker `index` whenever it exits, until shutdown."""
        proc, backoff = first, 0.5
        while True:
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping:
                return
            log.error("worker %d (pid %d) exited with %s; restarting", index, proc.pid,
                      f"signal {-code}" if code < 0 else f"code {code}")
            if time.monotonic() - started < _STABLE_S:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
            else:
                backoff = 0.5
            if self._stopping:
                return
            proc, ready = await self._spawn(index)
            if ready:
                log.info("worker %d restarted (pid %d)", index, proc.pid)

    async def run(self) -> int:
        """Start worker 0 (it creates the store and the first admin client), then the
        others; print the ready line; restart the dead; stop all on SIGINT/SIGTERM."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        keepers: list[asyncio.Task[None]] = []
        try:
            for index in range(self.count):
                proc, ready = await self._spawn(index)
                if not ready:
                    log.error("worker %d failed to start (exit code %s)", index,
                              await proc.wait())
                    return 1
                keepers.append(asyncio.create_task(self._keep(index, proc)))
            ports = self.sockets.ports
            pids = ",".join(str(p.pid) for p in self.procs if p is not None)
            print(f"simwire ready {describe_ports(ports)} http={ports['http_port']} "
                  f"workers={self.count} pids={pids}", flush=True)
            await stop.wait()
            return 0
        finally:
            self._stopping = True
            await self._stop_all()
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            os.close(self._lifeline_w)
            os.close(self._lifeline_r)
            self.sockets.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _stop_all(self) -> None:
        live = [p for p in self.procs if p is not None and p.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), _STOP_GRACE_S)
        except TimeoutError:
            for proc in live:
                if proc.returncode is None:
                    log.error("worker pid %d did not stop in %g s; killing it", proc.pid,
                              _STOP_GRACE_S)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*(p.wait() for p in live))


def describe_ports(ports: dict[str, int]) -> str:
    """The ready line's port list, as `BoundPorts.describe` prints it."""
    text = f"udp={ports['udp_port']} coap={ports['coap_port']} coaps={ports['coaps_port']}"
    for name in _UDP_PORTS[3:]:
        port = ports.get(name)
        if port is not None and port not in (ports["coap_port"], ports["coaps_port"]):
            text += f" {name.removesuffix('_port')}={port}"
    return text
