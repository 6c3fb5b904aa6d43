"""Store write cost per uplink against the number of distinct devices in the stream.

    .venv/bin/python bench/store_write.py [--devices 8,1000,10000] [--messages 100000]
                                          [--batch 30] [--quick]

bench/ingest.py sends from 8 source addresses, so its commits touch the same few pages
of the per-device structures over and over. A fleet does not. This benchmark runs the
SQLite adapter's own ingest write (`_write_records`, the function the writer thread calls
for a group commit) on a fresh file per device count, with `synchronous=FULL` and WAL as
`simwire serve` opens it, committing `--batch` uplinks at a time (a TELEMETRY_DATA event
and the device state, as the pipeline writes them; devices picked at random). It prints
CPU (user + system, this process) and wall time per uplink, and the ratio to the first
device count: the baseline is the bench/ingest case, measured in the same run.
Nothing but the temporary directory is written.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import clean_up, git_commit
from simwire.model import (
    DeviceIdentity,
    DeviceState,
    Event,
    EventType,
    Payload,
    Protocol,
)
from simwire.ports import IngestRecord
from simwire.storage.sqlite import SCHEMA, _write_records

T0 = 1_767_225_600_000


def records(devices: int, n: int, seed: int) -> list[IngestRecord]:
    """`n` uplinks of 24-byte payloads from `devices` devices at random, 1 ms apart."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = rng.randrange(devices)
        ident = DeviceIdentity(f"89882806660{d:08d}", f"90140510{d:07d}", f"10.{d >> 16}."
                               f"{(d >> 8) & 255}.{d & 255}", "default")
        payload = Payload(raw=rng.randbytes(24))
        ev = Event(id=f"1-{(T0 + i) // 1000:08x}-{rng.getrandbits(96):024x}",
                   type=EventType.TELEMETRY_DATA, received_ms=T0 + i, org="default",
                   device=ident, source=Protocol.UDP, payload=payload)
        out.append(IngestRecord((ev,), DeviceState(ident.iccid, Protocol.UDP, payload.text,
                                                    None, T0 + i)))
    return out


def run(path: Path, recs: list[IngestRecord], batch: int) -> dict[str, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for i in range(0, len(recs), batch):
            conn.execute("BEGIN IMMEDIATE")
            _write_records(conn, recs[i : i + batch])
            conn.execute("COMMIT")
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        conn.close()
    n = len(recs)
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return {"cpu_us": (user + system) / n * 1e6, "user_us": user / n * 1e6,
            "system_us": system / n * 1e6, "wall_us": wall / n * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="8,1000,10000",
                    help="comma-separated device counts; the first is the baseline")
    ap.add_argument("--messages", type=int, help="uplinks per device count (100000, quick 30000)")
    ap.add_argument("--batch", type=int, default=30, help="uplinks per commit (30)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args(argv)
    counts = [int(x) for x in a.devices.split(",")]
    n = a.messages or (30_000 if a.quick else 100_000)
    work = Path(tempfile.mkdtemp(prefix="simwire-store-write-"))
    rows = []
    try:
        for k, devices in enumerate(counts):
            recs = records(devices, n, seed=k)
            rows.append({"devices": devices, **run(work / f"d{devices}.db", recs, a.batch)})
            print(f"[store_write] {devices} devices: {rows[-1]['cpu_us']:.1f} us CPU per uplink",
                  file=sys.stderr)
    finally:
        clean_up(work, a.keep)
    base = rows[0]["cpu_us"]
    print(f"Store write cost per uplink (SQLite FULL, {a.batch} uplinks per commit, {n:,} "
          f"uplinks per row, commit {git_commit()})")
    print(f"{'devices':>8}  {'CPU us':>7}  {'user':>6}  {'system':>6}  {'wall us':>7}  "
          f"{'CPU vs ' + str(counts[0]):>10}")
    for r in rows:
        print(f"{r['devices']:>8}  {r['cpu_us']:>7.1f}  {r['user_us']:>6.1f}  "
              f"{r['system_us']:>6.1f}  {r['wall_us']:>7.1f}  {r['cpu_us'] / base:>9.2f}x")
    print(json.dumps({"rows": [{k: round(v, 2) for k, v in r.items()} for r in rows],
                      "batch": a.batch, "messages": n, "commit": git_commit()},
                     separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
