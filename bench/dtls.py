"""DTLS benchmark: PSK handshakes/s and CoAP-over-DTLS requests/s, Simwire's endpoint
(integrator.endpoints.dtls + python-mbedtls) next to libcoap's `coap-server-openssl`.

    .venv/bin/python bench/dtls.py [--duration 4] [--concurrency 16] [--rounds 3]
                                   [--suite TLS-PSK-WITH-AES-128-CCM-8] [--workers N]
                                   [--sources 4] [--quick]

One run, on loopback only (servers on 127.0.0.1, clients from 127.0.0.1-127.0.0.<--sources>),
the same client for both servers: a python-mbedtls DTLS 1.2 PSK client process (asyncio,
--concurrency workers, one UDP socket each):

1. handshakes: each worker does full handshakes in a loop (ClientHello, HelloVerifyRequest,
   ClientHello with cookie, ..., Finished), then close_notify so neither server keeps the
   session; handshakes/s completed. After a 1 s warm-up each, rounds alternate libcoap,
   Simwire (--rounds times); the figure is the mean. Goal: Simwire >= 1.0x libcoap.
2. requests: each worker keeps one session and sends CON requests one at a time: Simwire
   `POST /?t=test` answered 2.04 by a trivial CoAP app (integrator.coap parse/serialize),
   libcoap `PUT /example_data` (its default resources have no POST; the PUT handler
   answers 2.04 after storing the payload); 2.xx replies/s and p50/p99 latency.

Servers: `coap-server-openssl -A 127.0.0.1 -p P -k KEY -h ""` (DTLS on P+1, no identity
hint, any identity) and this file with `--role simwire` (uvloop if installed; the per-IP
handshake rate limit lifted, since all load comes from a few addresses). Both use --suite,
default TLS_PSK_WITH_AES_128_CCM_8 (0xC0A8): libcoap 4.3.1 + OpenSSL 3 answers the
FreeRTOS suite 0x00AE with "no shared cipher". Server CPU seconds per phase are read from
/proc, so "per server CPU-second" figures stay meaningful when the client is the
bottleneck (2-core machines). Progress on stderr; a table and one JSON line on stdout
(always the last line). Every process is stopped (SIGTERM, then SIGKILL).

--workers N (default 1): the Simwire server runs as N processes sharing the port the way
`simwire serve --workers N` does (simwire.workers.bind_group: N SO_REUSEPORT sockets with
the classic BPF program steering each datagram by `source address % N`, so a DTLS session
always stays in one process), each serving the same endpoint and trivial app as with N = 1;
server CPU is summed over the parent and its worker processes. It is not `simwire serve`
itself because serve's DTLS endpoints keep the deployed per-IP handshake limit (1/s, burst
5, not configurable) and answer POSTs through the durable ingest pipeline. The client's
sockets are bound to --sources addresses 127.0.0.1, 127.0.0.2, ... (round-robin, default 4)
so that the steering spreads them over the workers; libcoap stays one process (the
reference) and sees the same addresses. --quick: 2 s phases, 2 handshake rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import HOST, Server, note, process_tree, running

ICCID = "8988280666000000021"
KEY = b"Sup3rSecretKey12"
LIBCOAP = "coap-server-openssl"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# --- the Simwire server (--role simwire) ------------------------------------------------


async def serve_simwire(fd: int | None = None) -> None:
    """One Simwire DTLS endpoint; on the inherited socket `fd` (a worker of
    `supervise_simwire`) or on a port of its own."""
    from integrator import coap
    from integrator.endpoints.datagram import bind_udp
    from integrator.endpoints.dtls import DtlsConfig, DtlsTransport, serve
    from simwire.clock import SystemClock
    from simwire.metrics import Metrics

    class App:
        """Answers every CoAP POST with 2.04 (piggy-backed for CON)."""

        transport: DtlsTransport

        def connection_made(self, transport: DtlsTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            try:
                msg = coap.parse(data)
            except coap.MalformedMessage:
                return
            if msg.code == coap.POST:
                mtype = coap.ACK if msg.mtype == coap.CON else coap.NON
                self.transport.sendto(coap.serialize(
                    coap.Message(mtype, coap.CHANGED, msg.mid, msg.token)), addr)

    class Psk:
        async def psk_for(self, ip: str) -> tuple[str, bytes] | None:
            return (ICCID, KEY) if ip.startswith("127.") else None

    def inherited(host: str, port: int, rcvbuf: int) -> socket.socket:
        assert fd is not None
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return sock

    metrics = Metrics()
    config = DtlsConfig(handshakes_per_ip_per_s=1e9, handshake_burst_per_ip=10**9,
                        max_handshakes=100_000, max_sessions=100_000)
    server = await serve(HOST, 0, App(), Psk(), SystemClock(), metrics, config,
                         bind=bind_udp if fd is None else inherited)
    print(f"ready {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    for line in metrics.render().decode().splitlines():
        if line.startswith(("simwire_uplinks_total", "simwire_dtls_total")):
            print(line, file=sys.stderr)


def supervise_simwire(workers: int) -> int:
    """--role simwire --workers N: bind the port N times as `simwire serve --workers N`
    does (SO_REUSEPORT + BPF steering by source address), run one `serve_simwire` process
    per socket, print `ready PORT workers=N pids=...` once all are ready, stop them on
    SIGTERM/SIGINT."""
    from simwire.workers import bind_group

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port, socks = bind_group(HOST, 0, workers)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for sock in socks:
            fd = sock.fileno()
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--role", "simwire-worker", "--fd", str(fd)],
                pass_fds=[fd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))
        for proc in procs:
            assert proc.stdout is not None
            if not proc.stdout.readline().startswith(b"ready"):
                print(f"worker pid {proc.pid} failed to start", file=sys.stderr)
                return 1
        pids = ",".join(str(p.pid) for p in procs)
        print(f"ready {port} workers={workers} pids={pids}", flush=True)
        while not stop.wait(0.5):
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                print(f"worker pid {dead[0].pid} exited ({dead[0].returncode})",
                      file=sys.stderr)
                return 1
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sock in socks:
            sock.close()


# --- the client (--role client) ----------------------------------------------------------


class _Conn(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


def _flush(buf: Any, conn: _Conn) -> None:
    n = len(buf._output_buffer)
    if n and conn.transport is not None:
        conn.transport.sendto(buf.peek_outgoing(n))
        buf.consume_outgoing(n)


async def _handshake(buf: Any, conn: _Conn, limit_s: float) -> bool:
    from mbedtls import tls
    from mbedtls.exceptions import TLSError

    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while buf._handshake_state.name != "HANDSHAKE_OVER":
        try:
            buf.do_handshake()
        except (tls.HelloVerifyRequest, tls.RaggedEOF):
            return False
        except tls.WantWriteError:
            _flush(buf, conn)
        except tls.WantReadError:
            _flush(buf, conn)
            try:
                data = await asyncio.wait_for(conn.queue.get(), deadline - loop.time())
            except TimeoutError:
                return False
            buf.receive_from_network(data)
        except TLSError:  # a fatal alert
            _flush(buf, conn)
            return False
    _flush(buf, conn)
    return True


async def client(port: int, mode: str, duration: float, concurrency: int, suite: str,
                 method: str, path: str, sources: int = 1) -> dict[str, Any]:
    from mbedtls import tls

    from integrator import coap

    ctx = tls.ClientContext(tls.DTLSConfiguration(
        pre_shared_key=(ICCID, KEY), ciphers=(suite,), validate_certificates=False,
        lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
        highest_supported_version=tls.DTLSVersion.DTLSv1_2))
    loop = asyncio.get_running_loop()
    done = [0]
    errors = [0]
    latencies: list[float] = []
    code = coap.PUT if method == "put" else coap.POST
    options = [(coap.OPT_URI_PATH, p.encode()) for p in path.strip("/").split("/") if p]
    options.append((coap.OPT_URI_QUERY, b"t=test"))

    async def worker(i: int, stop_at: float) -> None:
        _, conn = await loop.create_datagram_endpoint(
            _Conn, local_addr=(source_ip(i, sources), 0), remote_addr=(HOST, port))
        try:
            if mode == "handshake":
                while loop.time() < stop_at:
                    buf = ctx.wrap_buffers(None)
                    if await _handshake(buf, conn, 2.0):
                        done[0] += 1
                        buf.shutdown()  # close_notify: the server forgets the session
                        _flush(buf, conn)
                    else:
                        errors[0] += 1
                    while not conn.queue.empty():
                        conn.queue.get_nowait()
                return
            buf = ctx.wrap_buffers(None)
            while not await _handshake(buf, conn, 2.0):
                errors[0] += 1
                buf = ctx.wrap_buffers(None)
            mid = i * 1000
            while loop.time() < stop_at:
                mid = (mid + 1) & 0xFFFF
                t0 = time.perf_counter()
                buf.write(coap.serialize(coap.Message(coap.CON, code, mid, b"\x2a", options,
                                                      b"bench payload 0123456789")))
                _flush(buf, conn)
                reply = None
                while reply is None:
                    try:
                        data = await asyncio.wait_for(conn.queue.get(), 1.0)
                    except TimeoutError:
                        break
                    buf.receive_from_network(data)
                    try:
                        reply = coap.parse(buf.read(4096))
                    except (tls.WantReadError, coap.MalformedMessage):
                        continue
                if reply is not None and reply.mid == mid and reply.code >> 5 == 2:
                    done[0] += 1
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[0] += 1
        finally:
            if conn.transport is not None:
                conn.transport.close()

    t0 = time.monotonic()
    cpu0 = time.process_time()
    stop_at = loop.time() + duration
    await asyncio.gather(*(worker(i, stop_at) for i in range(concurrency)))
    elapsed = time.monotonic() - t0
    latencies.sort()

    def pct(q: float) -> float | None:
        return round(latencies[int(q * (len(latencies) - 1))] * 1000, 2) if latencies else None

    return {"done": done[0], "errors": errors[0], "elapsed_s": round(elapsed, 3),
            "per_s": round(done[0] / elapsed, 1), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "client_cpu_s": round(time.process_time() - cpu0, 2)}


# --- orchestration -------------------------------------------------------------------------


def source_ip(i: int, sources: int) -> str:
    """The address client socket `i` is bound to: 127.0.0.1 .. 127.0.0.<sources>."""
    return f"127.0.0.{1 + i % max(1, sources)}"


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its descendants (a server's worker processes)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def free_port_pair() -> int:
    """A UDP port P with P+1 also free (libcoap listens for DTLS on P+1)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
            a.bind((HOST, 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                try:
                    b.bind((HOST, port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free UDP port pair")


def run_client(args: argparse.Namespace, port: int, mode: str, method: str, path: str,
               duration: float) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--role", "client", "--port", str(port), "--mode", mode,
            "--duration", str(duration), "--concurrency", str(args.concurrency),
            "--suite", args.suite, "--method", method, "--path", path,
            "--sources", str(args.sources)]
    proc = subprocess.run(argv, capture_output=True, timeout=duration + 60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"client failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return dict(json.loads(proc.stdout.decode().strip().splitlines()[-1]))


def measure(args: argparse.Namespace, pid: int, port: int, mode: str, method: str, path: str,
            duration: float) -> dict[str, Any]:
    cpu0 = cpu_seconds(pid)
    result = run_client(args, port, mode, method, path, duration)
    server_cpu = cpu_seconds(pid) - cpu0
    result["server_cpu_s"] = round(server_cpu, 2)
    result["server_cores"] = round(server_cpu / result["elapsed_s"], 2)
    result["per_server_cpu_s"] = round(result["done"] / server_cpu, 1) if server_cpu else None
    return result


def wait_handshake(args: argparse.Namespace, port: int, name: str) -> None:
    """Until one handshake from each source address (so from every worker) completes."""
    deadline = time.monotonic() + 15
    n = max(1, args.sources)
    while time.monotonic() < deadline:
        r = run_client(argparse.Namespace(concurrency=n, suite=args.suite, sources=n), port,
                       "handshake", "post", "", 0.3)
        if r["done"] >= n and not r["errors"]:
            return
    raise RuntimeError(f"{name}: no DTLS handshake within 15 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["bench", "simwire", "simwire-worker", "client"],
                    default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--duration", type=float,
                    help="seconds per phase (default 4, quick 2)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, help="handshake rounds per server (default 3, "
                                               "quick 2)")
    ap.add_argument("--suite", default="TLS-PSK-WITH-AES-128-CCM-8")
    ap.add_argument("--workers", type=int, default=1,
                    help="Simwire server processes sharing the port (SO_REUSEPORT steered "
                         "by source address, as simwire serve --workers N); default 1")
    ap.add_argument("--sources", type=int, default=4,
                    help="client source addresses 127.0.0.1..N, round-robin (default 4)")
    ap.add_argument("--quick", action="store_true", help="2 s phases, 2 rounds (~25 s)")
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["handshake", "request"], default="handshake",
                    help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=["post", "put"], default="post",
                    help=argparse.SUPPRESS)
    ap.add_argument("--path", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "simwire":
        if args.workers > 1:
            return supervise_simwire(args.workers)
        run_loop(serve_simwire())
        return 0
    if args.role == "simwire-worker":
        run_loop(serve_simwire(args.fd))
        return 0
    if args.duration is None:
        args.duration = 2.0 if args.quick else 4.0
    if args.role == "client":
        print(json.dumps(run_loop(client(args.port, args.mode, args.duration, args.concurrency,
                                         args.suite, args.method, args.path, args.sources))))
        return 0
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if not 1 <= args.workers <= 64 or args.sources < 1 or args.rounds < 1:
        ap.error("--workers must be 1..64, --sources and --rounds >= 1")
    if args.sources < args.workers:
        note(f"--sources {args.sources} < --workers {args.workers}: some workers get no load")

    exe = shutil.which(LIBCOAP)
    if exe is None:
        note(f"{LIBCOAP} not found (apt-get install libcoap3-bin)")
        return 1
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="simwire-dtls-bench-"))
    base = free_port_pair()
    libcoap_argv = [exe, "-A", HOST, "-p", str(base), "-k", KEY.decode(), "-h", "", "-v", "0"]
    simwire_argv = [sys.executable, __file__, "--role", "simwire", "--workers",
                    str(args.workers)]
    note(f"{os.cpu_count()} CPUs; {args.duration:g} s phases, concurrency "
         f"{args.concurrency} from {args.sources} source addresses, suite {args.suite}, "
         f"Simwire workers {args.workers}")
    try:
        with running(lambda: Server("libcoap", libcoap_argv, "\0", work / "libcoap.log")
                     ) as lib, running(lambda: Server("simwire", simwire_argv, "ready",
                                                      work / "simwire.log")) as sim:
            sim_port = int(sim.wait_ready().split()[1])
            lib_port = base + 1
            wait_handshake(args, lib_port, "libcoap")
            wait_handshake(args, sim_port, "simwire")
            targets = {"libcoap": (lib.proc.pid, lib_port, "put", "example_data"),
                       "simwire": (sim.proc.pid, sim_port, "post", "")}
            for pid, port, _, _ in targets.values():  # warm-up, not counted
                measure(args, pid, port, "handshake", "post", "", 1.0)
            hs: dict[str, list[dict[str, Any]]] = {"libcoap": [], "simwire": []}
            for rnd in range(args.rounds):
                for name, (pid, port, _, _) in targets.items():
                    r = measure(args, pid, port, "handshake", "post", "", args.duration)
                    hs[name].append(r)
                    note(f"handshakes round {rnd + 1} {name}: {r['per_s']:,.0f}/s "
                         f"(errors {r['errors']}, server {r['server_cores']} cores, client "
                         f"{r['client_cpu_s']} CPU-s)")
            req: dict[str, dict[str, Any]] = {}
            for name, (pid, port, method, path) in targets.items():
                req[name] = r = measure(args, pid, port, "request", method, path,
                                        args.duration)
                note(f"requests {name}: {r['per_s']:,.0f}/s p50 {r['p50_ms']} ms p99 "
                     f"{r['p99_ms']} ms (errors {r['errors']}, server {r['server_cores']} "
                     f"cores)")
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
        note(f"benchmark failed: {exc}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def mean(name: str, key: str) -> float:
        values = [r[key] or 0.0 for r in hs[name]]
        return sum(values) / len(values)

    hs_lib, hs_sim = mean("libcoap", "per_s"), mean("simwire", "per_s")
    hs_cpu_lib = mean("libcoap", "per_server_cpu_s")
    hs_cpu_sim = mean("simwire", "per_server_cpu_s")
    ratio = hs_sim / hs_lib if hs_lib else 0.0
    cpu_ratio = hs_cpu_sim / hs_cpu_lib if hs_cpu_lib else 0.0
    rq_lib, rq_sim = req["libcoap"], req["simwire"]
    rq_ratio = rq_sim["per_s"] / rq_lib["per_s"] if rq_lib["per_s"] else 0.0
    print(f"Simwire DTLS benchmark: {args.duration:g} s phases, {args.rounds} handshake "
          f"rounds, client concurrency {args.concurrency} from {args.sources} addresses, "
          f"suite {args.suite}, Simwire workers {args.workers}, {os.cpu_count()} CPUs")
    print(f"{'measurement':<34}{'libcoap':>14}{'Simwire':>14}{'ratio':>9}")
    print(f"{'PSK handshakes/s':<34}{hs_lib:>14,.0f}{hs_sim:>14,.0f}{ratio:>8.2f}x"
          f"   goal >= 1.0x: {'MET' if ratio >= 1.0 else 'NOT MET'}")
    print(f"{'  per server CPU-second':<34}{hs_cpu_lib:>14,.0f}{hs_cpu_sim:>14,.0f}"
          f"{cpu_ratio:>8.2f}x")
    print(f"{'  server cores busy':<34}{mean('libcoap', 'server_cores'):>14.2f}"
          f"{mean('simwire', 'server_cores'):>14.2f}")
    print(f"{'CoAP requests/s (one session each)':<34}{rq_lib['per_s']:>14,.0f}"
          f"{rq_sim['per_s']:>14,.0f}{rq_ratio:>8.2f}x")
    lat_lib = f"{rq_lib['p50_ms']} / {rq_lib['p99_ms']}"
    lat_sim = f"{rq_sim['p50_ms']} / {rq_sim['p99_ms']}"
    print(f"{'  p50 / p99 ms':<34}{lat_lib:>14}{lat_sim:>14}")
    print(f"{'  per server CPU-second':<34}{rq_lib['per_server_cpu_s'] or 0:>14,.0f}"
          f"{rq_sim['per_server_cpu_s'] or 0:>14,.0f}")
    print(json.dumps({
        "handshakes_per_s": {"libcoap": round(hs_lib, 1), "simwire": round(hs_sim, 1)},
        "handshake_ratio": round(ratio, 3), "handshake_goal_met": ratio >= 1.0,
        "handshakes_per_server_cpu_s": {"libcoap": round(hs_cpu_lib, 1),
                                        "simwire": round(hs_cpu_sim, 1)},
        "handshake_cpu_ratio": round(cpu_ratio, 3),
        "requests_per_s": {"libcoap": rq_lib["per_s"], "simwire": rq_sim["per_s"]},
        "request_ratio": round(rq_ratio, 3),
        "requests_per_server_cpu_s": {"libcoap": rq_lib["per_server_cpu_s"],
                                      "simwire": rq_sim["per_server_cpu_s"]},
        "workers": args.workers,
        "handshake_runs": hs, "request_runs": req,
        "params": {"duration_s": args.duration, "concurrency": args.concurrency,
                   "rounds": args.rounds, "suite": args.suite, "cpus": os.cpu_count(),
                   "workers": args.workers, "sources": args.sources, "quick": args.quick},
        "wall_s": round(time.monotonic() - started, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
