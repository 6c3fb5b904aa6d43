"""LwM2M registration benchmark: registrations/s and RSS per registered client.

    .venv/bin/python bench/lwm2m.py [--clients N] [--step N] [--concurrency N] [--quick]
                                    [--workers N]

One run, on 127.0.0.1 and 127.x.y.z only (Linux routes all of 127.0.0.0/8 to loopback, so
each simulated client registers from an address of its own, as the SIM registry requires):

0. N SIMs (ICCID, IMSI, address 127.a.b.c) written to a CSV and imported into a fresh data
   dir with `simwire sims import` (SQLite synchronous=OFF for the import only);
1. baseline: a minimal asyncio UDP responder (this file, `--role responder`, a subprocess,
   uvloop like `simwire serve`) that decodes each request with Simwire's codec
   (`integrator.coap`) and answers 2.01 with a Location-Path, no store and no SIM lookup;
   the same load generator registers max(N, 60k) clients against it after a warm-up;
2. `simwire serve` on that data dir (SQLite FULL, passive reporting off): idle RSS, then N
   clients register (`POST /rd?ep=ICCID&lt=86400&lwm2m=1.1&b=U`, CON, link-format payload)
   in steps of `--step`; after each step the server's VmRSS (/proc/PID/status), the RSS
   growth per 10k clients, the step's registrations/s and the server's CPU;
3. the registrations are held: a sample of clients sends an update (`POST /rd/<id>`, from
   its own address) that must get 2.04, and after the server stopped the store must hold
   N rows in lwm2m_registrations.

Goal (issue): 100k registrations held in < 1 GiB RSS. With fewer clients the figure is
projected: idle RSS + RSS per registered client x 100k.

The client is one process with non-blocking sockets on an epoll set: each request opens a
socket bound to its client's address, sends, waits for the ACK (CoAP retransmission with
doubling timeouts, failures counted), closes. At most --concurrency requests are
outstanding. Progress goes to stderr; stdout gets the result table, then one JSON line.
Every server subprocess is stopped (SIGTERM, then SIGKILL) whatever happens.

--workers N (default 1) runs `simwire serve --workers N`: the clients' addresses spread
over the workers (`owner_index`: address % N), and every RSS and CPU figure of Simwire is
the sum over the supervisor and its worker processes (found by ppid in /proc): the extra
interpreters raise the idle RSS (and so the RSS at 100k), not the RSS per registered
client. The baseline responder stays one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import os
import platform
import random
import resource
import secrets
import select
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import (
    ADMIN_ID,
    ADMIN_SECRET,
    HOST,
    Phases,
    Server,
    clean_up,
    free_port,
    git_commit,
    note,
    process_tree,
    running,
    simwire_ports,
    uplink_counters,
)
from integrator import coap

BENCH_FILE = Path(__file__).resolve()
LIFETIME_S = 86400
LINKS = "</1/0>,</3/0>,</4/0>,</6/0>"
LINK_FORMAT = 40
GOAL_CLIENTS = 100_000
BASELINE_MIN = 60_000
"""The baseline registers as many clients as Simwire, at least this many (>= ~1 s)."""
GOAL_RSS_KIB = 1024 * 1024  # 1 GiB
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_RESPONDER_READY = "lwm2m-responder ready"


# --- simulated clients -----------------------------------------------------------------------


def client_ip(i: int) -> str:
    """Client i's address: 127.1.0.1, 127.1.0.2, ... (last byte 1-254; never 127.0.x.x)."""
    rest, last = divmod(i, 254)
    return f"127.{1 + rest // 256}.{rest % 256}.{1 + last}"


def client_iccid(i: int) -> str:
    return f"8988280666{i:09d}"


def client_imsi(i: int) -> str:
    return f"901405{i:09d}"


@dataclass(frozen=True, slots=True)
class Job:
    """One request: sent from `ip` (a fresh socket), answered by an ACK with `mid`/`token`."""

    index: int
    ip: str
    datagram: bytes
    mid: int
    token: bytes


def register_job(i: int, links: str) -> Job:
    mid, token = i & 0xFFFF, i.to_bytes(4, "big")
    msg = coap.Message(coap.CON, coap.POST, mid, token, [
        (coap.OPT_URI_PATH, b"rd"),
        (coap.OPT_CONTENT_FORMAT, coap.uint_option(LINK_FORMAT)),
        (coap.OPT_URI_QUERY, f"ep={client_iccid(i)}".encode()),
        (coap.OPT_URI_QUERY, f"lt={LIFETIME_S}".encode()),
        (coap.OPT_URI_QUERY, b"lwm2m=1.1"),
        (coap.OPT_URI_QUERY, b"b=U"),
    ], links.encode())
    return Job(i, client_ip(i), coap.serialize(msg), mid, token)


def update_job(i: int, reg_id: str) -> Job:
    mid, token = (i + 0x8000) & 0xFFFF, b"u" + i.to_bytes(4, "big")
    msg = coap.Message(coap.CON, coap.POST, mid, token, [
        (coap.OPT_URI_PATH, b"rd"), (coap.OPT_URI_PATH, reg_id.encode())])
    return Job(i, client_ip(i), coap.serialize(msg), mid, token)


# --- the load generator ----------------------------------------------------------------------


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    """Answers with the expected code."""
    failed: int = 0
    """Other codes, no answer after the last retransmission, socket errors."""
    retransmissions: int = 0
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    server_main_cpu_s: float | None = None
    """The server's main thread (the event loop) alone; the rest is its helper threads."""
    codes: Counter[int] = field(default_factory=Counter)
    """Response codes (numbers: 65 = 2.01)."""
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    locations: dict[int, str] = field(default_factory=dict)
    """Client index -> registration id (the Location-Path after `rd`)."""

    @property
    def ok_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def ok_per_server_cpu_s(self) -> float | None:
        return self.ok / self.server_cpu_s if self.server_cpu_s else None

    def pct(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        lat = sorted(self.latencies_ms)
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 2)

    def summary(self) -> dict[str, Any]:
        cpu = self.server_cpu_s
        return {
            "sent": self.sent, "ok": self.ok, "failed": self.failed,
            "retransmissions": self.retransmissions, "elapsed_s": round(self.elapsed_s, 3),
            "ok_per_s": round(self.ok_per_s, 1),
            "server_cpu_cores": None if cpu is None or not self.elapsed_s
            else round(cpu / self.elapsed_s, 2),
            "server_main_thread_cores": None
            if self.server_main_cpu_s is None or not self.elapsed_s
            else round(self.server_main_cpu_s / self.elapsed_s, 2),
            "server_cpu_us_per_ok": None if cpu is None or not self.ok
            else round(cpu / self.ok * 1e6, 1),
            "client_cpu_cores": round(self.client_cpu_s / self.elapsed_s, 2)
            if self.elapsed_s else None,
            "ok_per_server_cpu_s": None if self.ok_per_server_cpu_s is None
            else round(self.ok_per_server_cpu_s, 1),
            "p50_ms": self.pct(0.5), "p99_ms": self.pct(0.99),
            "codes": {coap.code_str(c): n for c, n in sorted(self.codes.items())},
            "errors": dict(self.errors),
        }


@dataclass(slots=True)
class _Pending:
    job: Job
    sock: socket.socket
    seq: int
    sent_at: float
    attempt: int = 0


def run_load(server: tuple[str, int], jobs: Sequence[Job], concurrency: int, *,
             expect: int, timeout_s: float, max_retransmit: int,
             server_pid: int | None = None) -> LoadResult:
    """Send every job's CON request from its own socket, at most `concurrency` outstanding;
    an ACK with `expect` counts as ok (its Location-Path is kept), any other code or no
    answer after `max_retransmit` retransmissions (timeout doubling from `timeout_s`) fails."""
    res = LoadResult()
    ep = select.epoll()
    inflight: dict[int, _Pending] = {}  # fd -> request
    timers: list[tuple[float, int, int, int]] = []  # (deadline, seq, fd, attempt), a heap
    seq = 0
    nxt = 0
    total = len(jobs)
    cpu0 = server_cpu_s(server_pid)
    main0 = server_cpu_s(server_pid, main_thread=True)
    proc0 = time.process_time()
    t0 = now = time.monotonic()

    def finish(fd: int, p: _Pending) -> None:
        del inflight[fd]
        p.sock.close()  # leaves the epoll set with it

    try:
        while nxt < total or inflight:
            while nxt < total and len(inflight) < concurrency:
                job = jobs[nxt]
                nxt += 1
                res.sent += 1
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
                try:
                    sock.bind((job.ip, 0))
                    sock.sendto(job.datagram, server)
                except OSError as exc:
                    sock.close()
                    res.failed += 1
                    res.errors[type(exc).__name__] += 1
                    continue
                fd = sock.fileno()
                ep.register(fd, select.EPOLLIN)
                seq += 1
                inflight[fd] = _Pending(job, sock, seq, now)
                heapq.heappush(timers, (now + timeout_s, seq, fd, 0))
            wait = min(1.0, max(0.0, timers[0][0] - time.monotonic())) if timers else 1.0
            events = ep.poll(wait)
            now = time.monotonic()
            for fd, _ in events:
                p = inflight.get(fd)
                if p is None:
                    continue
                try:
                    data = p.sock.recv(2048)
                except BlockingIOError:
                    continue
                except OSError as exc:  # e.g. ICMP port unreachable: nobody listens
                    res.failed += 1
                    res.errors[type(exc).__name__] += 1
                    finish(fd, p)
                    continue
                try:
                    msg = coap.parse(data)
                except coap.MalformedMessage:
                    res.errors["malformed reply"] += 1
                    continue
                if msg.mtype != coap.ACK or msg.mid != p.job.mid or msg.token != p.job.token:
                    continue  # not the answer to this request (e.g. a server-sent request)
                res.codes[msg.code] += 1
                if msg.code == expect:
                    res.ok += 1
                    res.latencies_ms.append((now - p.sent_at) * 1000.0)
                    where = msg.opt_all(coap.OPT_LOCATION_PATH)
                    if len(where) == 2:
                        res.locations[p.job.index] = where[1].decode()
                else:
                    res.failed += 1
                finish(fd, p)
            while timers and timers[0][0] <= now:
                _, tseq, fd, attempt = heapq.heappop(timers)
                p = inflight.get(fd)
                if p is None or p.seq != tseq or p.attempt != attempt:
                    continue  # answered (or an older timer)
                if attempt >= max_retransmit:
                    res.failed += 1
                    res.errors["timeout"] += 1
                    finish(fd, p)
                    continue
                try:
                    p.sock.sendto(p.job.datagram, server)
                except OSError as exc:
                    res.failed += 1
                    res.errors[type(exc).__name__] += 1
                    finish(fd, p)
                    continue
                p.attempt += 1
                res.retransmissions += 1
                heapq.heappush(timers, (now + timeout_s * 2 ** p.attempt, tseq, fd, p.attempt))
    finally:
        for p in inflight.values():
            p.sock.close()
        ep.close()
    res.elapsed_s = time.monotonic() - t0
    res.client_cpu_s = time.process_time() - proc0
    cpu1 = server_cpu_s(server_pid)
    main1 = server_cpu_s(server_pid, main_thread=True)
    res.server_cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    res.server_main_cpu_s = None if main0 is None or main1 is None else main1 - main0
    return res


# --- process figures -------------------------------------------------------------------------


def server_cpu_s(pid: int | None, main_thread: bool = False) -> float | None:
    """utime + stime of a process and its descendants (all their threads, or only each
    one's main thread), seconds; None if unknown."""
    if pid is None:
        return None
    ticks = 0
    found = False
    for p in process_tree(pid):
        try:
            raw = Path(f"/proc/{p}/task/{p}/stat" if main_thread else f"/proc/{p}/stat"
                       ).read_text()
        except OSError:
            continue
        f = raw[raw.rfind(")") + 2:].split()
        ticks += int(f[11]) + int(f[12])
        found = True
    return ticks / _CLK_TCK if found else None


def proc_status_kib(pid: int, *keys: str) -> dict[str, int]:
    """Memory lines of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...) in KiB, summed over
    the process and its descendants."""
    out = dict.fromkeys(keys, 0)
    for p in process_tree(pid):
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            if p == pid:
                raise
            continue
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name in keys:
                out[name] += int(value.split()[0])
    return out


def rss_kib(pid: int) -> int:
    return proc_status_kib(pid, "VmRSS")["VmRSS"]


def raise_fd_limit(concurrency: int) -> int:
    """Make room for `concurrency` sockets (soft RLIMIT_NOFILE up to the hard limit); returns
    the concurrency that fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = concurrency + 128
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < need:
        fitted = max(1, soft - 128)
        note(f"RLIMIT_NOFILE {soft}: concurrency lowered from {concurrency} to {fitted}")
        return fitted
    return concurrency


# --- baseline responder (subprocess: --role responder) ---------------------------------------


class Responder(asyncio.DatagramProtocol):
    """Decode with Simwire's codec; POST /rd -> 2.01 Location-Path rd/<id>, anything else
    -> 4.04. No store, no SIM lookup, nothing remembered."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = coap.parse(data)
        except coap.MalformedMessage:
            return
        if msg.mtype != coap.CON or not msg.is_request:
            return
        path = msg.opt_all(coap.OPT_URI_PATH)
        if msg.code == coap.POST and path == [b"rd"]:
            reply = coap.Message(coap.ACK, coap.CREATED, msg.mid, msg.token, [
                (coap.OPT_LOCATION_PATH, b"rd"),
                (coap.OPT_LOCATION_PATH, secrets.token_hex(5).encode())])
        else:
            reply = coap.Message(coap.ACK, coap.NOT_FOUND, msg.mid, msg.token)
        assert self.transport is not None
        self.transport.sendto(coap.serialize(reply), addr)


async def serve_responder(port: int, rcvbuf: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((HOST, port))
    transport, _ = await loop.create_datagram_endpoint(Responder, sock=sock)
    print(f"{_RESPONDER_READY} port={sock.getsockname()[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        transport.close()


def run_loop(coro: Any) -> Any:
    """uvloop when installed, as `simwire serve` does (simwire.cli._run)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# --- phases ----------------------------------------------------------------------------------


@dataclass
class Params:
    work_dir: Path
    clients: int
    step: int
    concurrency: int
    links: str
    timeout_s: float
    max_retransmit: int
    verify: int
    warmup: int
    rcvbuf: int
    settle_s: float
    workers: int = 1


def load(p: Params, server: tuple[str, int], jobs: Sequence[Job], expect: int,
         pid: int | None) -> LoadResult:
    return run_load(server, jobs, p.concurrency, expect=expect, timeout_s=p.timeout_s,
                    max_retransmit=p.max_retransmit, server_pid=pid)


def _show(tag: str, r: LoadResult, extra: str = "") -> None:
    s = r.summary()
    note(f"{tag}: {r.ok:,}/{r.sent:,} ok in {r.elapsed_s:.2f} s = {r.ok_per_s:,.0f}/s, "
         f"failed {r.failed} (codes {s['codes'] or '-'}, errors {s['errors'] or '-'}), "
         f"retransmissions "
         f"{r.retransmissions}, p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms, server "
         f"{s['server_cpu_cores']} cores (main thread {s['server_main_thread_cores']}, "
         f"{s['server_cpu_us_per_ok']} us CPU each), client {s['client_cpu_cores']} "
         f"cores{extra}")


def import_sims(p: Params, data_dir: Path) -> float:
    """`simwire sims import` of every client's SIM (a fresh data dir); returns seconds."""
    csv_path = p.work_dir / "sims.csv"
    with csv_path.open("w") as fh:
        fh.write("iccid,imsi,ip\n")
        for i in range(p.clients):
            fh.write(f"{client_iccid(i)},{client_imsi(i)},{client_ip(i)}\n")
    env = dict(os.environ, SIMWIRE_SQLITE_SYNCHRONOUS="OFF")
    argv = [sys.executable, "-m", "simwire.cli", "sims", "import", str(csv_path),
            "--data-dir", str(data_dir)]
    note(f"(0) importing {p.clients:,} SIMs: {' '.join(argv[1:])} (synchronous=OFF)")
    t0 = time.monotonic()
    out = subprocess.run(argv, cwd=BENCH_FILE.parent.parent, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    took = time.monotonic() - t0
    if out.returncode != 0 or f"imported {p.clients} of {p.clients} rows" not in out.stdout:
        raise RuntimeError(f"sims import failed ({out.returncode}): {out.stdout[-500:]}"
                           f"{out.stderr[-1500:]}")
    note(f"imported {p.clients:,} SIMs in {took:.1f} s")
    return took


def phase_baseline(p: Params) -> dict[str, Any]:
    n = max(p.clients, BASELINE_MIN)  # the responder checks no SIM: any 127.x address does
    note(f"(1) baseline responder: {n:,} registrations, concurrency {p.concurrency}")
    argv = [sys.executable, str(BENCH_FILE), "--role", "responder", "--rcvbuf", str(p.rcvbuf)]
    with running(lambda: Server("responder", argv, _RESPONDER_READY,
                                p.work_dir / "responder.log")) as server:
        port = int(server.wait_ready().rsplit("=", 1)[1])
        target = (HOST, port)
        warm = [register_job(i, p.links) for i in range(p.warmup)]
        w = load(p, target, warm, coap.CREATED, server.proc.pid)
        if w.ok != len(warm):
            raise RuntimeError(f"baseline responder warm-up: {w.summary()}")
        jobs = [register_job(i, p.links) for i in range(n)]
        r = load(p, target, jobs, coap.CREATED, server.proc.pid)
        rss = rss_kib(server.proc.pid)
    _show("baseline", r)
    if r.failed:
        raise RuntimeError(f"the baseline responder failed {r.failed} registrations")
    return {**r.summary(), "rss_kib": rss}


@dataclass
class Step:
    clients: int
    rss_kib: int
    delta_kib: int
    run: LoadResult


def simwire_server(p: Params, data_dir: Path) -> Server:
    udp, coap_port, coaps = (free_port(socket.SOCK_DGRAM) for _ in range(3))
    web = free_port(socket.SOCK_STREAM)
    env = dict(os.environ, SIMWIRE_LWM2M_PASSIVE_REPORTING="false",
               SIMWIRE_ADMIN_CLIENT_ID=ADMIN_ID, SIMWIRE_ADMIN_CLIENT_SECRET=ADMIN_SECRET)
    env.pop("SIMWIRE_SQLITE_SYNCHRONOUS", None)  # the durable default (FULL)
    argv = [sys.executable, "-m", "simwire.cli", "serve", "--data-dir", str(data_dir),
            "--host", HOST, "--udp-port", str(udp), "--coap-port", str(coap_port),
            "--coaps-port", str(coaps), "--http-port", str(web), "--log-level", "WARNING",
            "--workers", str(p.workers)]
    return Server("simwire", argv, "simwire ready", p.work_dir / "simwire.log", env)


def phase_simwire(p: Params, data_dir: Path) -> dict[str, Any]:
    note(f"(2) Simwire: {p.clients:,} registrations in steps of {p.step:,}, concurrency "
         f"{p.concurrency}")
    with running(lambda: simwire_server(p, data_dir)) as server:
        ports = simwire_ports(server)
        pid = server.proc.pid
        target = (HOST, ports.get("lwm2m", ports["coap"]))  # its own port if it has one
        time.sleep(p.settle_s)
        idle = proc_status_kib(pid, "VmRSS", "RssAnon")
        note(f"Simwire idle: VmRSS {idle['VmRSS'] / 1024:.1f} MiB (pids "
             f"{','.join(map(str, process_tree(pid)))}, ports {ports})")
        steps: list[Step] = []
        locations: dict[int, str] = {}
        prev = idle["VmRSS"]
        done = 0
        while done < p.clients:
            end = min(p.clients, done + p.step)
            jobs = [register_job(i, p.links) for i in range(done, end)]
            r = load(p, target, jobs, coap.CREATED, pid)
            locations.update(r.locations)
            time.sleep(0.2)
            rss = rss_kib(pid)
            steps.append(Step(end, rss, rss - prev, r))
            per10k = (rss - prev) / 1024 * 10_000 / max(1, end - done)
            _show(f"simwire {done:,}-{end:,}", r,
                  f"; VmRSS {rss / 1024:.1f} MiB (+{per10k:.1f} MiB per 10k)")
            if server.proc.poll() is not None:
                raise RuntimeError(f"Simwire exited ({server.proc.returncode}):\n"
                                   f"{server.stderr_tail()}")
            prev = rss
            done = end
        time.sleep(p.settle_s)
        final = proc_status_kib(pid, "VmRSS", "VmHWM", "RssAnon")
        note(f"Simwire with {p.clients:,} registrations: VmRSS {final['VmRSS'] / 1024:.1f} MiB, "
             f"VmHWM {final['VmHWM'] / 1024:.1f} MiB")
        verify = verify_updates(p, target, locations, pid)
        counters = uplink_counters(ports["http"])
        duplicates = int(counters.get(("COAP", "duplicate"), 0))
        stderr_tail = server.stderr_tail(5)
    rows = count_registrations(data_dir)
    note(f"store after stop: {rows:,} rows in lwm2m_registrations")
    return {"idle": idle, "final": final, "steps": steps, "verify": verify,
            "stored_registrations": rows, "server_duplicates": duplicates,
            "registered": len(locations), "stderr_tail": stderr_tail}


def verify_updates(p: Params, target: tuple[str, int], locations: dict[int, str],
                   pid: int) -> dict[str, Any]:
    """A random sample of clients updates its registration from its own address: 2.04."""
    sample = sorted(random.Random(7).sample(sorted(locations), min(p.verify, len(locations))))
    r = load(p, target, [update_job(i, locations[i]) for i in sample], coap.CHANGED, pid)
    _show(f"verify: {len(sample):,} updates POST /rd/<id>", r)
    return {"sampled": len(sample), **r.summary()}


def count_registrations(data_dir: Path) -> int:
    dbs = sorted(data_dir.glob("*.db")) + sorted(data_dir.glob("*.sqlite*"))
    dbs = [d for d in dbs if not d.name.endswith(("-wal", "-shm"))]
    if not dbs:
        raise RuntimeError(f"no SQLite file in {data_dir}")
    with contextlib.closing(sqlite3.connect(f"file:{dbs[0]}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT count(*) FROM lwm2m_registrations").fetchone()
    return int(row[0])


# --- report ----------------------------------------------------------------------------------


def mib(kib: float) -> str:
    return f"{kib / 1024:,.1f} MiB"


def report(p: Params, import_s: float, base: dict[str, Any], sw: dict[str, Any],
           other_cpu: dict[str, float | None], wall_s: float) -> dict[str, Any]:
    steps: list[Step] = sw["steps"]
    idle_kib = sw["idle"]["VmRSS"]
    final_kib = sw["final"]["VmRSS"]
    ok = sum(s.run.ok for s in steps)
    failed = sum(s.run.failed for s in steps)
    retrans = sum(s.run.retransmissions for s in steps)
    elapsed = sum(s.run.elapsed_s for s in steps)
    srv_cpu = sum(s.run.server_cpu_s or 0.0 for s in steps)
    main_cpu = sum(s.run.server_main_cpu_s or 0.0 for s in steps)
    cli_cpu = sum(s.run.client_cpu_s for s in steps)
    rate = ok / elapsed if elapsed else 0.0
    ratio = rate / base["ok_per_s"] if base["ok_per_s"] else None
    per_cpu = ok / srv_cpu if srv_cpu else None
    base_per_cpu = base["ok_per_server_cpu_s"]
    per_client_kib = (final_kib - idle_kib) / ok if ok else None
    later = steps[1:]
    later_n = sum(s.clients - prev.clients for prev, s in zip(steps, later, strict=False))
    steady_kib = (sum(s.delta_kib for s in later) / later_n) if later_n else None
    at_goal = next((s for s in steps if s.clients == GOAL_CLIENTS), None)
    if at_goal is not None:
        goal_kib: float | None = at_goal.rss_kib
        goal_how = f"measured at {GOAL_CLIENTS:,}"
    elif per_client_kib is not None:
        goal_kib = idle_kib + per_client_kib * GOAL_CLIENTS
        goal_how = f"projected: idle + {per_client_kib:.2f} KiB x {GOAL_CLIENTS:,}"
    else:
        goal_kib, goal_how = None, "n/a"
    goal_met = goal_kib is not None and goal_kib < GOAL_RSS_KIB and failed == 0
    verify = sw["verify"]
    held = verify["ok"] == verify["sampled"] and sw["stored_registrations"] == p.clients

    lat = sorted(x for s in steps for x in s.run.latencies_ms)
    p50 = round(lat[len(lat) // 2], 2) if lat else None
    p99 = round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2) if lat else None
    base_n = base["sent"]
    rows = [
        ("1", f"baseline responder POST /rd ({base_n:,} clients)",
         f"{base['ok_per_s']:,.0f} reg/s",
         f"p50 {base['p50_ms']} ms, p99 {base['p99_ms']} ms, server {base['server_cpu_cores']} "
         f"cores ({'n/a' if base_per_cpu is None else f'{base_per_cpu:,.0f}'} per server "
         f"CPU-s), client {base['client_cpu_cores']} cores"),
        ("2", f"Simwire POST /rd ({ok:,} clients, SQLite FULL)", f"{rate:,.0f} reg/s",
         f"p50 {p50} ms, p99 {p99} ms, server {srv_cpu / elapsed:.2f} cores (main thread "
         f"{main_cpu / elapsed:.2f}; {'n/a' if per_cpu is None else f'{per_cpu:,.0f}'} per "
         f"server CPU-s), client {cli_cpu / elapsed:.2f} cores, failed {failed}, "
         f"retransmissions {retrans}"),
        ("", "  ratio (2)/(1)", "n/a" if ratio is None else f"{ratio:.2f}",
         "per server CPU-s: " + ("n/a" if not per_cpu or not base_per_cpu
                                 else f"{per_cpu / base_per_cpu:.2f}")),
        ("3", "Simwire RSS idle (SIMs in the store)", mib(idle_kib),
         f"baseline responder {mib(base['rss_kib'])}"),
        ("4", f"Simwire RSS with {ok:,} registrations", mib(final_kib),
         f"VmHWM {mib(sw['final']['VmHWM'])}, RssAnon {mib(sw['final']['RssAnon'])}"),
        ("5", "RSS per registered client",
         "n/a" if per_client_kib is None else f"{per_client_kib:.2f} KiB",
         f"{'n/a' if per_client_kib is None else mib(per_client_kib * 10_000)} per 10k; "
         f"after the first step {'n/a' if steady_kib is None else f'{steady_kib:.2f} KiB'}"),
        ("6", f"RSS at {GOAL_CLIENTS:,} registrations",
         "n/a" if goal_kib is None else mib(goal_kib),
         f"{goal_how}; goal < 1 GiB: {'MET' if goal_met else 'NOT MET'}"),
        ("7", "registrations held",
         f"{verify['ok']:,}/{verify['sampled']:,}",
         f"updates answered 2.04 (codes {verify['codes']}); {sw['stored_registrations']:,} "
         f"rows in the store: {'OK' if held else 'MISSING'}"),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"Simwire LwM2M registration benchmark: {p.clients:,} clients in steps of {p.step:,}, "
          f"concurrency {p.concurrency}, Simwire workers {p.workers} (RSS and CPU summed "
          f"over its processes), lt={LIFETIME_S}, links {p.links!r}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, wall {wall_s:.0f} s, "
          f"commit {git_commit()}")
    print(f"SIM import (simwire sims import, synchronous=OFF): {p.clients:,} SIMs in "
          f"{import_s:.1f} s")
    print("CPU used by other processes during each phase (cores): "
          + ", ".join(f"{k} {'n/a' if v is None else v}" for k, v in other_cpu.items()))
    print(f"{'#':<{w[0]}}  {'measurement':<{w[1]}}  {'result':>{w[2]}}  detail")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}")
    print(f"{'clients':>9}  {'VmRSS MiB':>9}  {'+MiB/10k':>8}  {'reg/s':>7}  {'p99 ms':>7}  "
          f"{'failed':>6}  {'retrans':>7}  {'server cores':>12}  {'main thread':>11}  "
          f"{'client cores':>12}")
    for s in steps:
        n = s.run.sent
        sm = s.run.summary()
        print(f"{s.clients:>9,}  {s.rss_kib / 1024:>9.1f}  "
              f"{s.delta_kib / 1024 * 10_000 / max(1, n):>8.1f}  {s.run.ok_per_s:>7,.0f}  "
              f"{sm['p99_ms']!s:>7}  {s.run.failed:>6}  {s.run.retransmissions:>7}  "
              f"{sm['server_cpu_cores']!s:>12}  {sm['server_main_thread_cores']!s:>11}  "
              f"{sm['client_cpu_cores']!s:>12}")
    result = {
        "baseline_reg_per_s": base["ok_per_s"],
        "simwire_reg_per_s": round(rate, 1),
        "ratio": None if ratio is None else round(ratio, 3),
        "baseline_reg_per_server_cpu_s": base_per_cpu,
        "simwire_reg_per_server_cpu_s": None if per_cpu is None else round(per_cpu, 1),
        "simwire_server_cores": round(srv_cpu / elapsed, 2) if elapsed else None,
        "simwire_main_thread_cores": round(main_cpu / elapsed, 2) if elapsed else None,
        "simwire_p50_ms": p50, "simwire_p99_ms": p99,
        "registered": ok, "failed": failed, "retransmissions": retrans,
        "rss_idle_kib": idle_kib, "rss_final_kib": final_kib,
        "vm_hwm_kib": sw["final"]["VmHWM"], "baseline_rss_kib": base["rss_kib"],
        "kib_per_client": None if per_client_kib is None else round(per_client_kib, 3),
        "kib_per_client_after_first_step": None if steady_kib is None
        else round(steady_kib, 3),
        "mib_per_10k": None if per_client_kib is None
        else round(per_client_kib * 10_000 / 1024, 2),
        "rss_at_100k_kib": None if goal_kib is None else round(goal_kib),
        "rss_at_100k_measured": at_goal is not None,
        "goal_met": goal_met, "held": held, "workers": p.workers,
        "verify": verify, "stored_registrations": sw["stored_registrations"],
        "server_duplicates": sw["server_duplicates"],
        "steps": [{"clients": s.clients, "rss_kib": s.rss_kib, "delta_kib": s.delta_kib,
                   **s.run.summary()} for s in steps],
        "baseline": base, "import_s": round(import_s, 1),
        "params": {"clients": p.clients, "step": p.step, "concurrency": p.concurrency,
                   "links": p.links, "timeout_s": p.timeout_s,
                   "max_retransmit": p.max_retransmit, "verify": p.verify,
                   "workers": p.workers,
                   "lifetime_s": LIFETIME_S, "cpus": os.cpu_count(),
                   "python": platform.python_version(), "commit": git_commit()},
        "other_cpu_cores": other_cpu, "wall_s": round(wall_s, 1),
    }
    print(json.dumps(result, separators=(",", ":")))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--clients", type=int, help="registrations (default 100000, quick 20000)")
    ap.add_argument("--step", type=int, default=10_000,
                    help="clients per step; RSS is read after each (default 10000)")
    ap.add_argument("--concurrency", type=int, default=256,
                    help="requests outstanding at once (default 256)")
    ap.add_argument("--quick", action="store_true", help="20000 clients (< 90 s)")
    ap.add_argument("--links", default=LINKS, help=f"register payload (default {LINKS!r})")
    ap.add_argument("--timeout", type=float, default=2.0,
                    help="first retransmission timeout, s, doubling (default 2 = ACK_TIMEOUT)")
    ap.add_argument("--retransmits", type=int, default=4,
                    help="retransmissions before a request fails (default 4 = MAX_RETRANSMIT)")
    ap.add_argument("--verify", type=int, default=2000,
                    help="clients sampled for the update check (default 2000)")
    ap.add_argument("--warmup", type=int, default=1000,
                    help="baseline warm-up registrations (default 1000)")
    ap.add_argument("--rcvbuf", type=int, default=4 * 1024 * 1024,
                    help="responder SO_RCVBUF, bytes (default 4 MiB = Simwire's CoAP port)")
    ap.add_argument("--workers", type=int, default=1,
                    help="simwire serve --workers N (default 1); RSS and CPU are summed over "
                         "the supervisor and its workers")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dir and logs")
    ap.add_argument("--role", choices=["bench", "responder"], default="bench",
                    help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.role == "responder":
        run_loop(serve_responder(a.port, a.rcvbuf))
        return 0
    clients = a.clients or (20_000 if a.quick else 100_000)
    if clients < 1 or a.step < 1 or a.concurrency < 1 or not 1 <= a.workers <= 64:
        ap.error("--clients, --step and --concurrency must be >= 1, --workers 1..64")
    if clients > 254 * 256 * 254:
        ap.error("at most 16,516,096 clients (addresses 127.1.0.1 to 127.254.255.254)")
    work_dir = Path(tempfile.mkdtemp(prefix="simwire-bench-lwm2m-"))
    p = Params(work_dir=work_dir, clients=clients, step=a.step,
               concurrency=raise_fd_limit(a.concurrency), links=a.links, timeout_s=a.timeout,
               max_retransmit=a.retransmits, verify=a.verify, warmup=a.warmup,
               rcvbuf=a.rcvbuf, settle_s=2.0, workers=a.workers)
    phases = Phases()
    t0 = time.monotonic()
    try:
        data_dir = work_dir / "data"
        import_s = phases.run("(0)", lambda: import_sims(p, data_dir))
        base = phases.run("(1)", lambda: phase_baseline(p))
        sw = phases.run("(2)", lambda: phase_simwire(p, data_dir))
        report(p, import_s, base, sw, phases.other, time.monotonic() - t0)
    except (RuntimeError, OSError, subprocess.SubprocessError, sqlite3.Error) as exc:
        note(f"benchmark failed: {exc}")
        return 1
    finally:
        clean_up(work_dir, a.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
