"""Webhook delivery benchmark: events/s delivered to a local HTTPS receiver, and the
ingest -> delivered latency.

    .venv/bin/python bench/webhook.py [--rate 3000] [--duration 10] [--devices 64]
                                      [--backlog 20000] [--workers N] [--quick]

One run, on 127.0.0.1 only, with the same HTTPS receiver process (bench/webhook_receiver.py,
aiohttp, keep-alive, certificate from a throw-away CA that Simwire is told to trust):

1. baseline: a plain aiohttp client in this process POSTs a same-size envelope with the
   same concurrency as Simwire's per-integration pool (8) for --duration s: the receiver's
   ceiling as seen by an idle client, events/s;
2. sustained: `simwire serve` (SQLite FULL) with one webhook integration; --devices SIMs at
   127.0.0.10.. send UDP datagrams round-robin at --rate/s for --duration s; reports
   delivered events/s, p50/p99 of (arrival at the receiver - `received`), and how long the
   outbox took to drain after the senders stopped. Goal: >= 3000 events/s, p99 < 250 ms;
3. drain: the receiver answers 503 while --backlog events are ingested (retry gap 1 s), then
   recovers: the flat-out delivery rate of a queued backlog, events/s, and its ratio to (1).

--workers N (default 1) runs `simwire serve --workers N`: the devices' addresses spread
over the workers, every worker ingests and stores, worker 0 delivers the outbox for all.
--quick: 4 s phases and a backlog of 6000 events (~25 s).

Progress on stderr; a table and one JSON line on stdout (always the last line, with
`goal_met`). Every process is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import (
    ADMIN_ID,
    ADMIN_SECRET,
    HOST,
    REPO,
    Server,
    free_port,
    http,
    note,
    running,
)
from tests.support.pki import make_pki

CONCURRENCY = 8


def token(base: str) -> str:
    basic = base64.b64encode(f"{ADMIN_ID}:{ADMIN_SECRET}".encode()).decode()
    status, raw = http("POST", f"{base}/oauth/token", {"grant_type": "client_credentials"},
                       {"Authorization": f"Basic {basic}"})
    assert status == 200, raw
    return str(json.loads(raw)["access_token"])


def call(base: str, bearer: str, method: str, path: str, body: Any = None) -> Any:
    status, raw = http(method, base + path, body, {"Authorization": f"Bearer {bearer}"})
    if status >= 300:
        raise RuntimeError(f"{method} {path} -> {status}: {raw[:300]!r}")
    return json.loads(raw) if raw else None


class Receiver:
    """bench/webhook_receiver.py as a subprocess, and its control endpoints."""

    def __init__(self, work: Path, cert: Path, key: Path, ca: Path) -> None:
        self.port = free_port(socket.SOCK_STREAM)
        self.server = Server(
            "receiver",
            [sys.executable, str(REPO / "bench" / "webhook_receiver.py"), str(self.port),
             str(cert), str(key)],
            "receiver ready", work / "receiver.log")
        self.url = f"https://{HOST}:{self.port}"
        self.ca = str(ca)
        self._ctx = ssl.create_default_context(cafile=self.ca)

    def control(self, path: str) -> Any:
        get = path == "/stats"
        req = urllib.request.Request(self.url + path, method="GET" if get else "POST",
                                     data=None if get else b"")
        with urllib.request.urlopen(req, context=self._ctx, timeout=10) as resp:
            return json.loads(resp.read()) if get else None


async def baseline(url: str, ca: str, duration: float, body: bytes) -> float:
    ctx = ssl.create_default_context(cafile=ca)
    done = 0
    stop = time.monotonic() + duration
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY,
                                                                    ssl=ctx)) as s:
        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop:
                async with s.post(url + "/hook", data=body,
                                  headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    assert r.status == 200
                done += 1
        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return done / (time.monotonic() - t0)


def send(udp_port: int, devices: int, rate: float, count: int) -> float:
    """Paced UDP senders from 127.0.0.10.. round-robin; returns the achieved rate."""
    socks = []
    for n in range(devices):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.0.0.{10 + n}", 0))
        socks.append(s)
    payload = b'{"temperature":21.5,"humidity":40,"battery":3.71,"seq":%d}'
    t0 = time.monotonic()
    i = 0
    while i < count:  # paced in 5 ms ticks (a sleep per datagram would cost a core)
        due = min(count, int((time.monotonic() - t0) * rate) + 1)
        while i < due:
            socks[i % devices].sendto(payload % i, (HOST, udp_port))
            i += 1
        time.sleep(0.005)
    elapsed = time.monotonic() - t0
    for s in socks:
        s.close()
    return count / elapsed


def wait_count(receiver: Receiver, n: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    stats = receiver.control("/stats")
    while stats["count"] < n and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = receiver.control("/stats")
    return stats  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=3000, help="offered events/s (3000)")
    ap.add_argument("--duration", type=float, help="seconds per phase (default 10, quick 4)")
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--backlog", type=int, help="events queued for the drain phase "
                                                "(default 20000, quick 6000)")
    ap.add_argument("--workers", type=int, default=1,
                    help="simwire serve --workers N (default 1)")
    ap.add_argument("--quick", action="store_true", help="4 s phases, 6000-event backlog")
    args = ap.parse_args(argv)
    if args.duration is None:
        args.duration = 4.0 if args.quick else 10.0
    if args.backlog is None:
        args.backlog = 6000 if args.quick else 20000
    if not 1 <= args.workers <= 64 or not 1 <= args.devices <= 240:
        ap.error("--workers must be 1..64, --devices 1..240")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="simwire-bench-webhook-"))
    try:
        return run(args, work, started)
    except (RuntimeError, OSError, AssertionError, KeyError, TypeError) as exc:
        note(f"benchmark failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, started: float) -> int:
    pki = make_pki(work / "pki")
    rec = Receiver(work, pki.server_cert, pki.server_key, pki.ca_cert)
    results: dict[str, Any] = {"rate_offered": args.rate, "devices": args.devices,
                               "workers": args.workers}
    with running(lambda: rec.server):
        rec.server.wait_ready()
        sample = json.dumps({
            "id": "1-6393505d-67fa8489fb9c791fcddd43f0", "type": "TELEMETRY_DATA",
            "version": "1.0.0", "received": str(int(time.time() * 1000)),
            "device": {"iccid": "8988280666000000010", "imsi": "901405100000010",
                       "ip": "127.0.0.10"}, "source": "UDP",
            "payload": {"type": "STRING", "encoding": "base64",
                        "value": "eyJ0ZW1wZXJhdHVyZSI6MjEuNSwiaHVtaWRpdHkiOjQwLCJiYXR0ZXJ5Ijoz"
                                 "LjcxLCJzZXEiOjEyMzR9"}}).encode()
        note(f"baseline: aiohttp client -> receiver, {CONCURRENCY} connections")
        results["baseline_per_s"] = asyncio.run(baseline(rec.url, rec.ca, args.duration, sample))
        rec.control("/reset")

        data_dir = work / "data"
        ports = {k: free_port(socket.SOCK_DGRAM if k != "http" else socket.SOCK_STREAM)
                 for k in ("udp", "coap", "http")}
        env = dict(os.environ, SIMWIRE_ADMIN_CLIENT_ID=ADMIN_ID,
                   SIMWIRE_ADMIN_CLIENT_SECRET=ADMIN_SECRET,
                   SIMWIRE_WEBHOOK_CA_FILE=str(pki.ca_cert), SIMWIRE_RETRY_SCHEDULE_S="1,1,1,1")
        env.pop("SIMWIRE_SQLITE_SYNCHRONOUS", None)
        argv_ = [sys.executable, "-m", "simwire.cli", "serve", "--data-dir", str(data_dir),
                 "--host", HOST, "--udp-port", str(ports["udp"]), "--coap-port",
                 str(ports["coap"]), "--http-port", str(ports["http"]), "--log-level", "WARNING",
                 "--workers", str(args.workers)]
        server = Server("simwire", argv_, "simwire ready", work / "simwire.log", env)
        with running(lambda: server):
            server.wait_ready()
            base = f"http://{HOST}:{ports['http']}"
            bearer = token(base)
            for n in range(args.devices):
                call(base, bearer, "POST", "/v1/sims", {
                    "iccid": f"89882806660000{n:05d}", "imsi": f"9014051000{n:05d}",
                    "ip": f"127.0.0.{10 + n}"})
            hook = call(base, bearer, "POST", "/v1/integrate/clouds/webhooks", {
                "name": "bench", "url": rec.url + "/hook", "headers": {},
                "eventTypes": [{"type": "TELEMETRY_DATA"}]})
            # warm-up: first contacts register the devices (LIFECYCLE not subscribed)
            send(ports["udp"], args.devices, 1000, args.devices * 2)
            wait_count(rec, args.devices * 2, 30)
            rec.control("/reset")

            count = int(args.rate * args.duration)
            note(f"sustained: {count} datagrams at {args.rate:.0f}/s from {args.devices} devices")
            t0 = time.time()
            results["rate_sent"] = send(ports["udp"], args.devices, args.rate, count)
            sent_end = time.time()
            stats = wait_count(rec, count, 120)
            if not stats["count"]:
                raise RuntimeError(f"no event delivered within 120 s ({stats})")
            results["sustained_delivered"] = stats["count"]
            results["sustained_per_s"] = stats["count"] / max(1e-9, stats["last"] - t0)
            results["drain_after_send_s"] = max(0.0, stats["last"] - sent_end)
            results["p50_ms"], results["p99_ms"] = stats["p50_ms"], stats["p99_ms"]

            note(f"drain: {args.backlog} events queued while the receiver answers 503")
            rec.control("/pause")
            rec.control("/reset")
            send(ports["udp"], args.devices, 8000, args.backlog)
            time.sleep(1.0)
            call(base, bearer, "GET", f"/v1/integrate/clouds/{hook['id']}")
            rec.control("/resume")
            stats = wait_count(rec, args.backlog, 300)
            if not stats["count"]:
                raise RuntimeError(f"no queued event delivered within 300 s ({stats})")
            results["drain_delivered"] = stats["count"]
            results["drain_per_s"] = stats["count"] / max(1e-9, stats["last"] - stats["first"])
    results["drain_ratio"] = results["drain_per_s"] / results["baseline_per_s"]
    # keeping up: everything delivered at >= 97 % of the offered rate (the rate includes
    # the drain after the last send), p99 ingest -> delivered under 250 ms
    goal = (args.rate >= 3000 and results["sustained_per_s"] >= 0.97 * args.rate
            and (results["p99_ms"] or 1e9) < 250)
    sustained = f"Simwire sustained (offered {args.rate:.0f}/s)"
    results["goal_met"] = goal
    results["params"] = {"rate": args.rate, "duration_s": args.duration,
                         "devices": args.devices, "backlog": args.backlog,
                         "workers": args.workers, "quick": args.quick,
                         "concurrency": CONCURRENCY, "cpus": os.cpu_count()}
    results["wall_s"] = round(time.monotonic() - started, 1)
    print(f"Simwire webhook benchmark: {args.duration:g} s phases, {args.devices} devices, "
          f"backlog {args.backlog}, Simwire workers {args.workers}, {os.cpu_count()} CPUs")
    print(f"{'baseline aiohttp client -> receiver':44} {results['baseline_per_s']:9.0f} events/s")
    print(f"{sustained:44} "
          f"{results['sustained_per_s']:9.0f} events/s  p50 {results['p50_ms']:.1f} ms  "
          f"p99 {results['p99_ms']:.1f} ms  drained {results['drain_after_send_s']:.2f} s "
          f"after the last send  [goal >=3000/s, p99<250ms: {'met' if goal else 'NOT met'}]")
    print(f"{'Simwire backlog drain':44} {results['drain_per_s']:9.0f} events/s  "
          f"({results['drain_ratio']:.2f}x baseline)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
