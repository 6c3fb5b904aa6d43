"""Ingest benchmark: Simwire's UDP and CoAP endpoints against their natural baselines.

    .venv/bin/python bench/ingest.py [--duration S] [--concurrency N] [--quick]

One run measures, on 127.0.0.1 only, with the shared stdlib load generator
(../shared/tools/coap_load.py, run as a subprocess with --json):

1. the raw asyncio UDP receive ceiling: coap_load --udp with its own sink process, highest
   offered rate with <= --loss-threshold % loss (flat-out probe, then a bounded search);
2. Simwire's lossless UDP ingest rate: same search against `simwire serve` (SIM 127.0.0.1
   registered through the API), counting `simwire_uplinks_total{outcome="stored",
   protocol="UDP"}` from /metrics before and after each probe; ratio vs (1), goal >= 0.8;
3. an aiocoap baseline (bench/aiocoap_server.py, one trivial POST resource): CON POST req/s;
4. Simwire CoAP CON POST on `/` with the durable SQLite store, same generator parameters:
   req/s (2.04 only), p50/p99 latency, ratio vs (3), goal >= 5x.
5. libcoap's `coap-server-notls` as the no-op baseline: ratio (4)/(5), goal >= 1.0x;
6. the durable no-op (bench/durable_server.py): each request flushed to a preallocated file
   (group commit) before its ACK, nothing else; ratio (4)/(6) shows how much of the
   ceiling that "stored before ACKed" leaves Simwire uses.

Progress goes to stderr; stdout gets the result table, then one JSON line. Every server
subprocess is stopped (SIGTERM, then SIGKILL after a timeout) whatever happens.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_LOAD_GEN = REPO.parent / "shared" / "tools" / "coap_load.py"
SOURCES = BENCH_DIR / "sources.py"
if str(REPO) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(REPO))
from bench.sources import source_ips  # noqa: E402

HOST = "127.0.0.1"
ADMIN_ID = "bench-admin"
ADMIN_SECRET = "bench-secret-" + base64.urlsafe_b64encode(os.urandom(12)).decode()
SIM = {"iccid": "8988280666000000001", "imsi": "901405100000001", "ip": HOST}
STORED_UDP = ("UDP", "stored")
STORED_COAP = ("COAP", "stored")
_METRIC_RE = re.compile(r"^simwire_uplinks_total\{([^}]*)\}\s+(\S+)\s*$")
_LABEL_RE = re.compile(r'(\w+)="([^"]*)"')
T = TypeVar("T")


def note(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clean_up(work_dir: Path, keep: bool) -> None:
    """The end of a benchmark's `main()`: keep its temporary directory (--keep, said on
    stderr) or remove it."""
    if keep:
        note(f"kept {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)


# --- processes -------------------------------------------------------------------------------


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess that prints a ready line on stdout; stdout is drained by a thread."""

    def __init__(self, name: str, argv: list[str], ready_prefix: str, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._ready_prefix = ready_prefix
        self._ready = threading.Event()
        self.ready_line = ""
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not self._ready.is_set() and line.startswith(self._ready_prefix):
                self.ready_line = line
                self._ready.set()

    def wait_ready(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.1):
                return self.ready_line
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"{self.name} not ready (exit code {self.proc.poll()}); "
                           f"stderr tail:\n{self.stderr_tail()}")

    def stderr_tail(self, n: int = 20) -> str:
        self._log.flush()
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 15.0) -> int | None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    note(f"{self.name} ignored SIGTERM for {timeout:.0f} s: killing it")
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            self._reader.join(2)
            self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running(server_factory: Callable[[], Server]) -> Iterator[Server]:
    server = server_factory()
    try:
        yield server
    finally:
        code = server.stop()
        if code not in (0, -signal.SIGTERM):
            note(f"{server.name} exited with code {code}; stderr tail:\n{server.stderr_tail()}")


def load_gen(cfg: Config, args: list[str], duration: float) -> dict[str, Any]:
    """Run coap_load.py --json; returns its JSON object."""
    argv = [sys.executable, str(SOURCES), str(cfg.sources), str(cfg.load_gen), "--host", HOST,
            "--json", "--payload-size", str(cfg.payload_size), *args]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                             check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"load generator timed out: {' '.join(argv)}") from exc
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"load generator failed ({out.returncode}): {' '.join(argv)}\n"
                           f"{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- Simwire API -----------------------------------------------------------------------------


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def register_sim(http_port: int, sources: int = 1) -> None:
    """The SIMs of the load generator's source addresses (bench/sources.py)."""
    base = f"http://{HOST}:{http_port}"
    basic = base64.b64encode(f"{ADMIN_ID}:{ADMIN_SECRET}".encode()).decode()
    status, raw = http("POST", f"{base}/oauth/token", {"grant_type": "client_credentials"},
                       {"Authorization": f"Basic {basic}"})
    if status != 200:
        raise RuntimeError(f"POST /oauth/token -> {status}: {raw[:300]!r}")
    token = json.loads(raw)["access_token"]
    for i, ip in enumerate(source_ips(sources)):
        sim = {"iccid": f"{SIM['iccid'][:-3]}{i + 1:03d}", "imsi": f"{SIM['imsi'][:-3]}{i + 1:03d}",
               "ip": ip}
        status, raw = http("POST", f"{base}/v1/sims", sim, {"Authorization": f"Bearer {token}"})
        if status not in (200, 201):
            raise RuntimeError(f"POST /v1/sims -> {status}: {raw[:300]!r}")


def uplink_counters(http_port: int) -> dict[tuple[str, str], float]:
    """simwire_uplinks_total by (protocol, outcome); a missing series counts as 0."""
    status, raw = http("GET", f"http://{HOST}:{http_port}/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics -> {status}")
    out: dict[tuple[str, str], float] = {}
    for line in raw.decode().splitlines():
        m = _METRIC_RE.match(line)
        if m:
            labels = dict(_LABEL_RE.findall(m.group(1)))
            key = (labels.get("protocol", ""), labels.get("outcome", ""))
            out[key] = out.get(key, 0.0) + float(m.group(2))  # summed over `worker`
    return out


def wait_settled(http_port: int, key: tuple[str, str], timeout: float = 60.0,
                 interval: float = 0.3) -> tuple[dict[tuple[str, str], float], float]:
    """Poll /metrics until `key` stops increasing (two equal reads); returns (counters, s)."""
    t0 = time.monotonic()
    prev = uplink_counters(http_port)
    while time.monotonic() - t0 < timeout:
        time.sleep(interval)
        cur = uplink_counters(http_port)
        if cur.get(key, 0.0) == prev.get(key, 0.0):
            return cur, time.monotonic() - t0
        prev = cur
    note(f"counter {key} still increasing after {timeout:.0f} s")
    return prev, time.monotonic() - t0


def simwire_server(cfg: Config, tag: str) -> Server:
    data_dir = Path(tempfile.mkdtemp(prefix=f"simwire-{tag}-", dir=cfg.work_dir))
    udp, coap, coaps = (free_port(socket.SOCK_DGRAM) for _ in range(3))
    web = free_port(socket.SOCK_STREAM)
    env = dict(os.environ, SIMWIRE_ADMIN_CLIENT_ID=ADMIN_ID,
               SIMWIRE_ADMIN_CLIENT_SECRET=ADMIN_SECRET)
    env.pop("SIMWIRE_SQLITE_SYNCHRONOUS", None)  # the durable default (FULL)
    argv = [sys.executable, "-m", "simwire.cli", "serve", "--data-dir", str(data_dir),
            "--host", HOST, "--udp-port", str(udp), "--coap-port", str(coap),
            "--coaps-port", str(coaps), "--http-port", str(web), "--log-level", "WARNING",
            "--workers", str(cfg.workers)]
    return Server(f"simwire[{tag}]", argv, "simwire ready", cfg.work_dir / f"simwire-{tag}.log",
                  env)


def simwire_ports(server: Server) -> dict[str, int]:
    line = server.wait_ready()
    ports = dict(re.findall(r"(\w+)=(\d+)", line))
    return {k: int(v) for k, v in ports.items()}


# --- kernel UDP counters (diagnostic) ---------------------------------------------------------


def kernel_udp_drops() -> int | None:
    """Linux /proc/net/snmp Udp RcvbufErrors (host-wide): datagrams dropped on full buffers."""
    try:
        lines = Path("/proc/net/snmp").read_text().splitlines()
    except OSError:
        return None
    rows = [ln.split()[1:] for ln in lines if ln.startswith("Udp:")]
    if len(rows) < 2 or "RcvbufErrors" not in rows[0]:
        return None
    return int(rows[1][rows[0].index("RcvbufErrors")])


# --- CPU used by other processes (a shared machine skews every figure) ----------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[int, int, int]] | None:
    """pid -> (ppid, starttime, utime+stime ticks) for every process; None off Linux."""
    root = Path("/proc")
    if not (root / "self" / "stat").exists():
        return None
    table: dict[int, tuple[int, int, int]] = {}
    for d in root.iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        f = raw[raw.rfind(")") + 2:].split()  # fields from 3 (state) on
        table[int(d.name)] = (int(f[1]), int(f[19]), int(f[11]) + int(f[12]))
    return table


def _ours(table: dict[int, tuple[int, int, int]]) -> set[int]:
    """This process, its descendants, and kernel threads (pid 2's children)."""
    keep = {os.getpid(), 2}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in table.items():
            if ppid in keep and pid not in keep:
                keep.add(pid)
                grew = True
    return keep


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (a `simwire serve --workers N` supervisor and its
    workers), from the ppid field of every /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for child, (ppid, _, _) in (_proc_table() or {}).items():
        children.setdefault(ppid, []).append(child)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


class OtherCpu:
    """CPU seconds used by processes outside this benchmark's tree, between two snapshots."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._start = _proc_table()

    def cores(self) -> float | None:
        end = _proc_table()
        wall = time.monotonic() - self._t0
        if self._start is None or end is None or wall <= 0:
            return None
        skip = _ours(self._start) | _ours(end)
        ticks = 0
        for pid, (_, start_time, cpu) in end.items():
            if pid in skip:
                continue
            before = self._start.get(pid)
            if before is None or before[1] != start_time:
                ticks += cpu  # started during the window
            else:
                ticks += cpu - before[2]
        return round(ticks / _CLK_TCK / wall, 2)


class Phases:
    """CPU used by other processes before the run (1 s) and during each phase, for the
    report's "CPU used by other processes" line; warns when the machine is not quiet."""

    def __init__(self) -> None:
        self.other: dict[str, float | None] = {}
        meter = OtherCpu()
        time.sleep(1.0)
        self.other["before"] = before = meter.cores()
        if before is not None and before >= 0.2:
            note(f"other processes use {before} cores: the figures will be skewed")

    def run(self, name: str, fn: Callable[[], T]) -> T:
        meter = OtherCpu()
        out = fn()
        self.other[name] = meter.cores()
        return out


# --- lossless-rate search -------------------------------------------------------------------


@dataclass
class Probe:
    rate: float  # offered datagrams/s; 0 = flat out
    sent: int
    delivered: int
    elapsed_s: float
    send_per_s: float
    kernel_drops: int | None
    extra: dict[str, Any] = field(default_factory=dict)
    backlog: int | None = None
    """Messages still unstored when the sender stopped (Simwire only)."""
    backlog_limit: int | None = None

    @property
    def loss_pct(self) -> float:
        return 100.0 * (self.sent - self.delivered) / self.sent if self.sent else 100.0

    def passed(self, threshold_pct: float) -> bool:
        """Within the loss threshold, and keeping up (not merely buffering the excess)."""
        keeping_up = self.backlog is None or self.backlog_limit is None or (
            self.backlog <= self.backlog_limit)
        return self.loss_pct <= threshold_pct and keeping_up

    @property
    def delivered_per_s(self) -> float:
        return self.delivered / self.elapsed_s if self.elapsed_s else 0.0

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(loss_pct=round(self.loss_pct, 3), delivered_per_s=round(self.delivered_per_s, 1))
        return d


@dataclass
class Search:
    best: Probe | None
    probes: list[Probe]
    sender_bound: bool


def _round_rate(r: float) -> float:
    if r <= 0:
        return 0.0
    step = 10 ** max(0, len(str(int(r))) - 3)  # three significant digits
    return float(max(step, round(r / step) * step))


def find_lossless(probe: Callable[[float], Probe], threshold_pct: float, max_probes: int,
                  tolerance: float = 0.04) -> Search:
    """Flat-out probe, then a bounded search for the highest offered rate within threshold.

    The flat-out goodput estimates the receiver's capacity: the first paced probe offers 90 %
    of it; then up (x1.25) while passing, down (x0.8) while failing, bisection once both a
    passing and a failing rate are known, until they are within `tolerance` or the probe
    budget is spent. Returns the passing probe with the highest goodput.
    """
    flat = probe(0.0)
    probes = [flat]
    if flat.passed(threshold_pct):
        return Search(flat, probes, sender_bound=True)
    ceiling = flat.send_per_s
    lo: float | None = None
    hi: float | None = None
    rate = _round_rate(0.9 * flat.delivered_per_s)
    for _ in range(max_probes - 1):
        p = probe(rate)
        probes.append(p)
        if p.passed(threshold_pct):
            lo = rate
        else:
            hi = rate
        if lo is not None and hi is not None:
            if hi <= lo * (1 + tolerance):
                break
            nxt = _round_rate((lo + hi) / 2)
        elif lo is not None:
            nxt = _round_rate(min(lo * 1.25, ceiling))
        else:
            assert hi is not None
            nxt = _round_rate(hi * 0.8)
        if nxt in (lo, hi) or nxt <= 0:
            break
        rate = nxt
    passing = [p for p in probes if p.passed(threshold_pct)]
    best = max(passing, key=lambda p: p.delivered_per_s) if passing else None
    return Search(best, probes, sender_bound=False)


def _show(tag: str, p: Probe) -> None:
    offered = "max" if not p.rate else f"{p.rate:,.0f}/s"
    kd = "" if p.kernel_drops is None else f" kernel-drops={p.kernel_drops}"
    if p.backlog is not None:
        kd += f" backlog-at-end={p.backlog} (limit {p.backlog_limit})"
    extra = "".join(f" {k}={v}" for k, v in p.extra.items())
    note(f"{tag}: offered {offered:>10} sent {p.sent:>8} ({p.send_per_s:,.0f}/s) delivered "
         f"{p.delivered:>8} ({p.delivered_per_s:,.0f}/s) loss {p.loss_pct:.3f} %{kd}{extra}")


def sink_probe(cfg: Config) -> Callable[[float], Probe]:
    def probe(rate: float) -> Probe:
        port = free_port(socket.SOCK_DGRAM)
        k0 = kernel_udp_drops()
        r = load_gen(cfg, ["--udp", "--port", str(port), "--rate", str(rate), "--duration",
                           str(cfg.probe_s), "--rcvbuf", str(cfg.rcvbuf)], cfg.probe_s)
        k1 = kernel_udp_drops()
        p = Probe(rate, r["sent"], r["received"], r["elapsed_s"], r["send_per_s"],
                  None if k0 is None or k1 is None else k1 - k0,
                  {"recv_per_s": r.get("recv_per_s")})
        _show("raw sink", p)
        return p

    return probe


def simwire_udp_probe(cfg: Config, ports: dict[str, int]) -> Callable[[float], Probe]:
    def probe(rate: float) -> Probe:
        before, _ = wait_settled(ports["http"], STORED_UDP)
        k0 = kernel_udp_drops()
        r = load_gen(cfg, ["--udp", "--no-sink", "--port", str(ports["udp"]), "--rate",
                           str(rate), "--duration", str(cfg.probe_s)], cfg.probe_s)
        at_end = uplink_counters(ports["http"])
        after, settle_s = wait_settled(ports["http"], STORED_UDP)
        k1 = kernel_udp_drops()
        stored = int(after.get(STORED_UDP, 0) - before.get(STORED_UDP, 0))
        backlog = int(after.get(STORED_UDP, 0) - at_end.get(STORED_UDP, 0))
        others = {f"{o}": int(after.get(("UDP", o), 0) - before.get(("UDP", o), 0))
                  for (proto, o) in after if proto == "UDP" and o != "stored"}
        p = Probe(rate, r["sent"], stored, r["elapsed_s"], r["send_per_s"],
                  None if k0 is None or k1 is None else k1 - k0,
                  {"settle_s": round(settle_s, 1), **{k: v for k, v in others.items() if v}},
                  backlog=backlog,
                  backlog_limit=int(cfg.drain_grace * (rate or r["send_per_s"])))
        _show("simwire udp", p)
        return p

    return probe


# --- phases ----------------------------------------------------------------------------------


@dataclass
class Config:
    load_gen: Path
    work_dir: Path
    duration: float
    probe_s: float
    concurrency: int
    payload_size: int
    threshold_pct: float
    max_probes: int
    rcvbuf: int
    drain_grace: float
    profile: Path | None = None
    """--profile: py-spy the Simwire server during the CoAP run (4), write the samples here."""
    profile_rate: int = 200
    profile_native: bool = False
    profile_gil: bool = False
    workers: int = 1
    """`simwire serve --workers N`."""
    sources: int = 1
    """Source addresses the load generator sends from (bench/sources.py)."""


def phase_raw_udp(cfg: Config) -> Search:
    note(f"(1) raw asyncio UDP receiver ceiling: {cfg.probe_s:g} s probes")
    return find_lossless(sink_probe(cfg), cfg.threshold_pct, cfg.max_probes)


def phase_simwire_udp(cfg: Config) -> Search:
    note(f"(2) Simwire UDP lossless ingest: {cfg.probe_s:g} s probes")
    with running(lambda: simwire_server(cfg, "udp")) as server:
        ports = simwire_ports(server)
        register_sim(ports["http"], cfg.sources)
        warm_up_udp(ports)
        probe = simwire_udp_probe(cfg, ports)
        search = find_lossless(probe, cfg.threshold_pct, cfg.max_probes)
        if cfg.profile is not None and search.best is not None:
            rate = search.best.rate or search.best.send_per_s
            note(f"(2) profiled probe at the best lossless rate, {rate:,.0f}/s")
            with profiling(cfg, server.proc.pid, "simwire-udp", cfg.probe_s) as prof:
                prof.count = probe(rate).delivered
        return search


def warm_up_udp(ports: dict[str, int]) -> None:
    """One datagram first: proves the SIM is registered (fails fast) and warms the caches."""
    before = uplink_counters(ports["http"]).get(STORED_UDP, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"bench warm-up", (HOST, ports["udp"]))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counters = uplink_counters(ports["http"])
        if counters.get(STORED_UDP, 0) > before:
            return
        time.sleep(0.1)
    raise RuntimeError(f"Simwire did not store the UDP warm-up datagram: {counters}")


def coap_run(cfg: Config, port: int, path: str, duration: float,
             concurrency: int | None = None, expect: str = "2.04") -> dict[str, Any]:
    return load_gen(cfg, ["--port", str(port), "--path", path, "--concurrency",
                          str(concurrency or cfg.concurrency), "--duration", str(duration),
                          "--expect", expect], duration)


LIBCOAP_NOTLS = "coap-server-notls"


def phase_libcoap(cfg: Config) -> dict[str, Any] | None:
    """(5) libcoap's example server as the no-op baseline: CON POST / answered 4.05 (its
    root resource has no POST handler: parse, look up, answer, nothing else)."""
    exe = shutil.which(LIBCOAP_NOTLS)
    if exe is None:
        note(f"(5) {LIBCOAP_NOTLS} not found (apt-get install libcoap3-bin): skipped")
        return None
    note(f"(5) libcoap no-op baseline: concurrency {cfg.concurrency}, {cfg.duration:g} s")
    port = free_port(socket.SOCK_DGRAM)
    argv = [exe, "-A", HOST, "-p", str(port), "-v", "0"]
    with running(lambda: Server("libcoap", argv, "\0", cfg.work_dir / "libcoap.log")):
        for _ in range(20):  # it prints no ready line: warm up until it answers
            warm = coap_run(cfg, port, "", 1.0, concurrency=1, expect="4.05")
            if warm.get("ok"):
                break
        else:
            raise RuntimeError(f"{LIBCOAP_NOTLS} never answered: {warm}")
        r = coap_run(cfg, port, "", cfg.duration, expect="4.05")
    note(f"libcoap: {r['ok_per_s']:,.0f} req/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms "
         f"codes {r['codes']} timeouts {r['timeouts']}")
    return r


def phase_aiocoap(cfg: Config) -> dict[str, Any]:
    note(f"(3) aiocoap baseline: concurrency {cfg.concurrency}, {cfg.duration:g} s")
    return python_baseline(cfg, "aiocoap", "aiocoap_server.py", "telemetry",
                           ["--path", "telemetry"])


def phase_durable(cfg: Config) -> dict[str, Any]:
    """(6) The durable no-op (bench/durable_server.py): the same CON POSTs, each flushed
    to a file (group commit) before its 2.04 ACK and nothing else: what bounds (4)."""
    note(f"(6) durable no-op ceiling: concurrency {cfg.concurrency}, {cfg.duration:g} s")
    return python_baseline(cfg, "durable", "durable_server.py", "",
                           ["--log", str(cfg.work_dir / "durable.ring")])


def python_baseline(cfg: Config, name: str, script: str, path: str,
                    args: list[str]) -> dict[str, Any]:
    """Run bench/`script` (prints "`name` ready" once bound), warm it up on `path` (2.04s
    expected), then measure it with the run's generator parameters."""
    port = free_port(socket.SOCK_DGRAM)
    argv = [sys.executable, str(BENCH_DIR / script), "--host", HOST, "--port", str(port),
            *args]
    with running(lambda: Server(name, argv, f"{name} ready",
                                cfg.work_dir / f"{name}.log")) as server:
        server.wait_ready()
        check_coap(coap_run(cfg, port, path, 1.0, concurrency=1), name)
        r = coap_run(cfg, port, path, cfg.duration)
    note(f"{name}: {r['ok_per_s']:,.0f} req/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms "
         f"codes {r['codes']} timeouts {r['timeouts']}")
    return r


def phase_simwire_coap(cfg: Config) -> dict[str, Any]:
    note(f"(4) Simwire CoAP CON POST /: concurrency {cfg.concurrency}, {cfg.duration:g} s")
    with running(lambda: simwire_server(cfg, "coap")) as server:
        ports = simwire_ports(server)
        register_sim(ports["http"], cfg.sources)
        check_coap(coap_run(cfg, ports["coap"], "", 1.0, concurrency=1), "Simwire")
        before = uplink_counters(ports["http"])
        with profiling(cfg, server.proc.pid, "simwire-coap") as prof:
            r = coap_run(cfg, ports["coap"], "", cfg.duration)
            prof.count = int(r.get("ok", 0))
        after, _ = wait_settled(ports["http"], STORED_COAP)
        r["stored_delta"] = int(after.get(STORED_COAP, 0) - before.get(STORED_COAP, 0))
    note(f"simwire coap: {r['ok_per_s']:,.0f} req/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms "
         f"codes {r['codes']} timeouts {r['timeouts']} stored {r['stored_delta']}")
    return r


def check_coap(r: dict[str, Any], name: str) -> None:
    if not r.get("ok"):
        raise RuntimeError(f"{name} gave no 2.04 to the warm-up run: {r}")


def git_commit() -> str | None:
    """The checked-out commit, `+dirty` with uncommitted changes to tracked files."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=5,
                               check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.strip() else "")


# --- profiling (--profile) -------------------------------------------------------------------

PROFILE_CATEGORIES: tuple[tuple[str, str, str], ...] = (
    # (category, path fragment, function name or "" for any); the first rule matched by a
    # sample's frames, from the innermost frame outwards, names the sample's category.
    ("event loop / syscalls", "endpoints/coap.py", "_send"),
    ("event loop / syscalls", "endpoints/datagram.py", ""),
    ("event loop / syscalls", "endpoints/udp.py", "_send"),
    ("metrics", "simwire/metrics.py", ""),
    ("logging", "logging/", ""),
    ("logging", "simwire/logs.py", ""),
    ("SIM lookup", "authenticator/", ""),
    ("translate", "energy_saver/", ""),
    ("event build", "simwire/model.py", ""),
    ("event build", "integrator/pipeline.py", "_build"),
    ("event build", "integrator/pipeline.py", "first_registration"),
    ("store / commit", "simwire/storage/", ""),
    ("store / commit", "sqlite3/", ""),
    ("pipeline (submit, ack)", "integrator/pipeline.py", ""),
    ("CoAP parse / reply", "integrator/coap.py", ""),
    ("CoAP parse / reply", "integrator/endpoints/coap.py", ""),
    ("UDP endpoint", "integrator/endpoints/udp.py", ""),
    ("outbox / dispatcher", "integrator/forwarders/", ""),
    ("event loop / syscalls", "asyncio/", ""),
    ("event loop / syscalls", "uvloop", ""),
    ("event loop / syscalls", "selectors.py", ""),
    ("threads / queue", "threading.py", ""),
    ("threads / queue", "queue.py", ""),
    ("threads / queue", "concurrent/", ""),
)
_FRAME_RE = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


class _Profile:
    def __init__(self) -> None:
        self.count = 0
        """Requests answered during the recording (set by the caller), for CPU per request."""


def _thread_cpu(pid: int) -> dict[int, float]:
    """Thread id -> CPU seconds (utime + stime) of every thread of `pid` (Linux)."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        f = raw[raw.rfind(")") + 2:].split()
        out[int(task.name)] = (int(f[11]) + int(f[12])) / _CLK_TCK
    return out


@contextlib.contextmanager
def profiling(cfg: Config, pid: int, tag: str, seconds: float | None = None
              ) -> Iterator[_Profile]:
    """With --profile: `py-spy record` on `pid` for `seconds` (default: the CoAP run's
    duration) while the body runs (collapsed stacks with
    thread names: load into speedscope or flamegraph.pl), then a text summary next to it
    (threads, CPU per request, categories, top functions by own and inclusive samples)."""
    prof = _Profile()
    if cfg.profile is None:
        yield prof
        return
    cfg.profile.mkdir(parents=True, exist_ok=True)
    raw_path = cfg.profile / f"{tag}.collapsed.txt"
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    seconds = cfg.duration if seconds is None else seconds
    argv = [spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", str(cfg.profile_rate), "--format", "raw", "--threads",
            "--output", str(raw_path)]
    if cfg.profile_native:
        argv.append("--native")
    if cfg.profile_gil:
        argv.append("--gil")
    cpu0, t0 = _thread_cpu(pid), time.monotonic()
    rec = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield prof
    finally:
        cpu1, wall = _thread_cpu(pid), time.monotonic() - t0
        try:
            _, err = rec.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            rec.kill()
            _, err = rec.communicate()
        if rec.returncode != 0 or not raw_path.exists():
            note(f"py-spy failed ({rec.returncode}): {err.decode(errors='replace')[-500:]}")
        else:
            cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
            text = profile_summary(raw_path.read_text(), cpu, wall, prof.count,
                                   " ".join(argv))
            summary = cfg.profile / f"{tag}.summary.txt"
            summary.write_text(text)
            note(f"profile: {raw_path} (collapsed stacks) and {summary}:\n"
                 + "\n".join(text.splitlines()[:40]))


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        m = _FRAME_RE.match(frame)
        fn, file = (m.group("fn"), m.group("file")) if m else (frame, "")
        for cat, frag, func in PROFILE_CATEGORIES:
            if frag in file and (not func or fn.endswith(func)):
                return cat
    return "other"


def profile_summary(collapsed: str, cpu_by_tid: dict[int, float], wall: float, count: int,
                    command: str, top: int = 25) -> str:
    """Text summary of py-spy's raw (collapsed) output recorded with --threads; the CPU
    seconds of each thread (by id, from /proc) are named after py-spy's thread names."""
    names: dict[int, str] = {}
    threads: dict[str, int] = {}
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    cats: dict[str, dict[str, int]] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        parts = stack.split(";")
        head, _, thread = parts[0].partition(": ")
        frames = parts[1:]
        thread = "main" if thread == "MainThread" else re.sub(r"_\d+$", "", thread)
        m = re.search(r"\((\d+)\)", head)
        if m:
            names[int(m.group(1))] = thread
        total += n
        threads[thread] = threads.get(thread, 0) + n
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
        per = cats.setdefault(thread, {})
        cat = _category(frames)
        per[cat] = per.get(cat, 0) + n
    if not total:
        return f"no samples ({command})\n"

    def pct(n: int) -> str:
        return f"{100.0 * n / total:5.1f} %"

    cpu: dict[str, float] = {}
    for tid, seconds in cpu_by_tid.items():
        name = names.get(tid, "other threads")
        cpu[name] = cpu.get(name, 0.0) + seconds
    busy = sum(cpu.values())
    lines = [f"py-spy: {command}",
             f"{total} samples; {count:,} requests in {wall:.1f} s; "
             f"server CPU {busy:.2f} s = {busy / wall:.2f} cores"
             + (f" = {1e6 * busy / count:.1f} us per request" if count else ""),
             "CPU by thread (/proc): " + ", ".join(
                 f"{k} {v:.2f} s" + (f" ({1e6 * v / count:.1f} us/req)" if count else "")
                 for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v > 0),
             "", "samples by thread and category:"]
    for thread, per in sorted(cats.items(), key=lambda kv: -threads[kv[0]]):
        lines.append(f"  {thread:<24} {pct(threads[thread])}")
        for cat, n in sorted(per.items(), key=lambda kv: -kv[1]):
            lines.append(f"      {cat:<28} {pct(n)}")
    lines += ["", f"top {top} functions by own samples (innermost frame):"]
    lines += [f"  {pct(n)}  {f}" for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    lines += ["", f"top {top} functions by inclusive samples:"]
    lines += [f"  {pct(n)}  {f}" for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines) + "\n"


# --- report ----------------------------------------------------------------------------------


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _goal(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report(cfg: Config, raw: Search, sw: Search, aio: dict[str, Any],
           swc: dict[str, Any], lib: dict[str, Any] | None, dur: dict[str, Any], wall_s: float,
           other_cpu: dict[str, float | None]) -> dict[str, Any]:
    raw_rate = raw.best.delivered_per_s if raw.best else None
    sw_rate = sw.best.delivered_per_s if sw.best else None
    udp_ratio = sw_rate / raw_rate if sw_rate is not None and raw_rate else None
    coap_ratio = swc["ok_per_s"] / aio["ok_per_s"] if aio["ok_per_s"] else None
    lib_ratio = swc["ok_per_s"] / lib["ok_per_s"] if lib and lib["ok_per_s"] else None
    dur_ratio = swc["ok_per_s"] / dur["ok_per_s"] if dur["ok_per_s"] else None

    def search_note(s: Search) -> str:
        if s.best is None:
            return f"no probe within {cfg.threshold_pct:g} % loss ({len(s.probes)} probes)"
        at = "flat out (sender-bound)" if s.sender_bound else f"{s.best.rate:,.0f}/s offered"
        failing = [p.rate or p.send_per_s for p in s.probes
                   if not p.passed(cfg.threshold_pct)]
        fail = f", fails from {min(failing):,.0f}/s" if failing else ""
        return f"at {at}, loss {s.best.loss_pct:.3f} %{fail} ({len(s.probes)} probes)"

    rows = [
        ("1", "raw asyncio UDP receiver (coap_load sink)", f"{_rate(raw_rate)} msg/s",
         search_note(raw)),
        ("2", "Simwire UDP lossless ingest (stored)", f"{_rate(sw_rate)} msg/s",
         search_note(sw)),
        ("", "  ratio (2)/(1)", "n/a" if udp_ratio is None else f"{udp_ratio:.2f}",
         f"goal >= 0.8: {_goal(udp_ratio is not None and udp_ratio >= 0.8)}"),
        ("3", f"aiocoap CON POST /telemetry (c={cfg.concurrency})",
         f"{_rate(aio['ok_per_s'])} req/s",
         f"p50 {aio['p50_ms']} ms, p99 {aio['p99_ms']} ms, timeouts {aio['timeouts']}"),
        ("4", f"Simwire CON POST / (c={cfg.concurrency}, SQLite FULL)",
         f"{_rate(swc['ok_per_s'])} req/s",
         f"p50 {swc['p50_ms']} ms, p99 {swc['p99_ms']} ms, timeouts {swc['timeouts']}"),
        ("", "  ratio (4)/(3)", "n/a" if coap_ratio is None else f"{coap_ratio:.2f}x",
         f"goal >= 5x: {_goal(coap_ratio is not None and coap_ratio >= 5)}"),
        ("5", f"libcoap {LIBCOAP_NOTLS} CON POST / (c={cfg.concurrency}, no-op 4.05)",
         "n/a" if lib is None else f"{_rate(lib['ok_per_s'])} req/s",
         "not installed" if lib is None else
         f"p50 {lib['p50_ms']} ms, p99 {lib['p99_ms']} ms, timeouts {lib['timeouts']}"),
        ("", "  ratio (4)/(5)", "n/a" if lib_ratio is None else f"{lib_ratio:.2f}x",
         f"goal >= 1.0x: {_goal(lib_ratio is not None and lib_ratio >= 1.0)}"),
        ("6", f"durable no-op CON POST / (c={cfg.concurrency}, fdatasync before ACK)",
         f"{_rate(dur['ok_per_s'])} req/s",
         f"p50 {dur['p50_ms']} ms, p99 {dur['p99_ms']} ms, timeouts {dur['timeouts']}"),
        ("", "  ratio (4)/(6)", "n/a" if dur_ratio is None else f"{dur_ratio:.2f}x",
         "the share of the durable ceiling Simwire reaches"),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"Simwire ingest benchmark: payload {cfg.payload_size} B, UDP probes {cfg.probe_s:g} s "
          f"(loss threshold {cfg.threshold_pct:g} %, rcvbuf {cfg.rcvbuf}), CoAP runs "
          f"{cfg.duration:g} s, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"wall {wall_s:.0f} s, commit {git_commit()}")
    print("CPU used by other processes during each phase (cores): "
          + ", ".join(f"{k} {'n/a' if v is None else v}" for k, v in other_cpu.items()))
    print(f"{'#':<{w[0]}}  {'measurement':<{w[1]}}  {'result':>{w[2]}}  detail")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}")
    result = {
        "raw_udp_per_s": None if raw_rate is None else round(raw_rate, 1),
        "simwire_udp_per_s": None if sw_rate is None else round(sw_rate, 1),
        "udp_ratio": None if udp_ratio is None else round(udp_ratio, 3),
        "udp_goal_met": udp_ratio is not None and udp_ratio >= 0.8,
        "aiocoap_req_per_s": aio["ok_per_s"],
        "simwire_coap_req_per_s": swc["ok_per_s"],
        "coap_ratio": None if coap_ratio is None else round(coap_ratio, 3),
        "coap_goal_met": coap_ratio is not None and coap_ratio >= 5,
        "libcoap_req_per_s": None if lib is None else lib["ok_per_s"],
        "libcoap_ratio": None if lib_ratio is None else round(lib_ratio, 3),
        "libcoap_goal_met": lib_ratio is not None and lib_ratio >= 1.0,
        "durable_req_per_s": dur["ok_per_s"],
        "durable_ratio": None if dur_ratio is None else round(dur_ratio, 3),
        "simwire_coap_p50_ms": swc["p50_ms"], "simwire_coap_p99_ms": swc["p99_ms"],
        "aiocoap_p50_ms": aio["p50_ms"], "aiocoap_p99_ms": aio["p99_ms"],
        "params": {"duration_s": cfg.duration, "probe_s": cfg.probe_s,
                   "concurrency": cfg.concurrency, "payload_size": cfg.payload_size,
                   "loss_threshold_pct": cfg.threshold_pct, "rcvbuf": cfg.rcvbuf,
                   "drain_grace_s": cfg.drain_grace, "cpus": os.cpu_count(),
                   "workers": cfg.workers, "sources": cfg.sources,
                   "python": platform.python_version(), "commit": git_commit()},
        "other_cpu_cores": other_cpu,
        "raw_udp_probes": [p.row() for p in raw.probes],
        "simwire_udp_probes": [p.row() for p in sw.probes],
        "aiocoap_run": aio, "simwire_coap_run": swc, "libcoap_run": lib,
        "durable_run": dur, "wall_s": round(wall_s, 1),
    }
    print(json.dumps(result, separators=(",", ":")))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, help="seconds per CoAP run (default 10, quick 4)")
    ap.add_argument("--probe-duration", type=float,
                    help="seconds per UDP rate probe (default 4, quick 2)")
    ap.add_argument("--concurrency", type=int, default=32, help="CoAP requests in flight")
    ap.add_argument("--quick", action="store_true", help="shorter runs, fewer probes (< 60 s)")
    ap.add_argument("--max-probes", type=int, help="UDP probes per search (default 6, quick 4)")
    ap.add_argument("--loss-threshold", type=float, default=0.1, help="percent (default 0.1)")
    ap.add_argument("--payload-size", type=int, default=64, help="bytes (default 64)")
    ap.add_argument("--rcvbuf", type=int, default=8 * 1024 * 1024,
                    help="sink SO_RCVBUF, bytes (default 8 MiB = Simwire's UDP endpoint)")
    ap.add_argument("--drain-grace", type=float, default=0.5,
                    help="a Simwire probe also fails if more than this many seconds of offered "
                         "traffic is still unstored when the sender stops (default 0.5 = the "
                         "drain time coap_load gives its sink)")
    ap.add_argument("--load-gen", type=Path, default=DEFAULT_LOAD_GEN,
                    help=f"coap_load.py (default {DEFAULT_LOAD_GEN})")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dir and logs")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="py-spy the Simwire server during the CoAP run (4) and one more UDP "
                         "probe at (2)'s best lossless rate: collapsed stacks (speedscope / "
                         "flamegraph.pl input) and a text summary each in DIR")
    ap.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s (200)")
    ap.add_argument("--profile-native", action="store_true",
                    help="py-spy --native (C frames of uvloop, sqlite3, the kernel calls)")
    ap.add_argument("--profile-gil", action="store_true",
                    help="py-spy --gil: only samples holding the GIL (Python CPU; without it "
                         "py-spy also counts threads blocked in C calls such as fsync)")
    ap.add_argument("--workers", type=int, default=1, help="simwire serve --workers N (1)")
    ap.add_argument("--sources", type=int, default=8,
                    help="source addresses 127.0.0.1..N the load comes from, in every phase "
                         "(8; --workers steers by source address)")
    a = ap.parse_args(argv)
    if not a.load_gen.is_file():
        ap.error(f"load generator not found: {a.load_gen}")
    work_dir = Path(tempfile.mkdtemp(prefix="simwire-bench-"))
    cfg = Config(
        load_gen=a.load_gen.resolve(), work_dir=work_dir,
        duration=a.duration or (4.0 if a.quick else 10.0),
        probe_s=a.probe_duration or (2.0 if a.quick else 4.0),
        concurrency=a.concurrency, payload_size=a.payload_size,
        threshold_pct=a.loss_threshold,
        max_probes=max(1, a.max_probes or (4 if a.quick else 6)), rcvbuf=a.rcvbuf,
        drain_grace=a.drain_grace, profile=a.profile, profile_rate=a.profile_rate,
        profile_native=a.profile_native, profile_gil=a.profile_gil,
        workers=a.workers, sources=a.sources,
    )
    phases = Phases()
    t0 = time.monotonic()
    try:
        raw = phases.run("(1)", lambda: phase_raw_udp(cfg))
        sw = phases.run("(2)", lambda: phase_simwire_udp(cfg))
        aio = phases.run("(3)", lambda: phase_aiocoap(cfg))
        swc = phases.run("(4)", lambda: phase_simwire_coap(cfg))
        lib = phases.run("(5)", lambda: phase_libcoap(cfg))
        dur = phases.run("(6)", lambda: phase_durable(cfg))
        report(cfg, raw, sw, aio, swc, lib, dur, time.monotonic() - t0, phases.other)
    except (RuntimeError, OSError) as exc:
        note(f"benchmark failed: {exc}")
        return 1
    finally:
        clean_up(work_dir, a.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
