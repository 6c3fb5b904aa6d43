"""History query benchmark: the Device Inspector history page at 10M stored messages.

    .venv/bin/python bench/history.py [--messages N] [--devices N] [--queries N] [--quick]
                                      [--concurrency 8] [--page 5] [--keep] [--json]

Issue #7: history page p99 < 50 ms at 10M stored messages, measured through the real HTTP
API of `simwire serve` on the embedded SQLite store. One run, on 127.0.0.1 only:

0. --devices SIMs (organisation `default`, the admin client's) imported into a fresh data
   dir with `simwire sims import` (SQLite synchronous=OFF for the import only): the
   product creates the schema and writes the SIM rows;
1. --messages TELEMETRY_DATA events generated straight into that file: the exact rows the
   ingest path writes (`_event_row` of raw UDP/CoAP uplinks, checked against the product's
   own `Event`/`_event_row` on a sample), in time order over the 7-day retention window,
   each from a uniformly random device, plus each device's first-contact registration
   (devices row, LIFECYCLE event, admin log) and its device_state. Multi-row INSERTs in
   large transactions with synchronous=OFF; the product's indexes on `events` are dropped
   during the load and recreated afterwards by the store's own `SCHEMA` (sorted build;
   `--index-during-load` keeps them instead). The file must end up with exactly the
   indexes `SCHEMA` creates, no others (no ANALYZE either: the product runs none);
2. `simwire serve` on that data dir (SQLite FULL, free ports, admin client from
   SIMWIRE_ADMIN_CLIENT_ID/SECRET, ready on the `simwire ready` line), a token from
   /oauth/token whose organisation must be the SIMs' one;
3. `GET /v1/inspect/devices/{iccid}/history` for random devices, five kinds of query:
   first page (default pageSize), page --page (nextToken of page --page - 1), a 6-hour
   startDateTime/endDateTime window, protocol=<the device's protocol> and
   protocol=<the other one> (matches nothing: walks the device's whole history). After
   100 warm-up requests: one aiohttp connection, sequential; then --concurrency
   connections. Latency is request sent -> body read, per kind: p50/p95/p99/max;
4. baseline, same run: the same queries as raw SQL with sqlite3 on the same file, in this
   process. The SQL is the store's own, captured by running `SqliteStore.get_device` and
   `SqliteStore.history` against a recording connection (the two statements each API
   request runs: the ownership check and the page), then timed alone (execute+fetchall).

Progress goes to stderr; stdout gets the result table, then one JSON line (`--json`: the
table goes to stderr, stdout gets only the JSON line). The server is stopped (SIGTERM,
then SIGKILL after 15 s) whatever happens; the temporary directory is removed unless
--keep.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import platform
import queue
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from yarl import URL

from bench.ingest import (
    ADMIN_ID,
    ADMIN_SECRET,
    HOST,
    Phases,
    Server,
    clean_up,
    free_port,
    git_commit,
    http,
    note,
    running,
    simwire_ports,
)
from inspector.api import RETENTION_MS
from integrator.pipeline import first_registration
from simwire.model import (
    DeviceIdentity,
    Event,
    EventType,
    Payload,
    Protocol,
    iso_ms,
)
from simwire.ports import HistoryQuery
from simwire.storage.sqlite import (
    _LOG_COLS,
    ROWS_PER_STATEMENT,
    SCHEMA,
    SqliteDatabase,
    SqliteStore,
    _event_row,
    _log_row,
)

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
GOAL_P99_MS = 50.0
DEFAULT_PAGE_SIZE = 10
"""inspector.api's default pageSize (checked: every answer must have the raw query's count)."""
WINDOW_MS = 6 * 3600 * 1000
WARMUP = 100
MARGIN_MS = 30 * 60 * 1000
"""The oldest generated message is this much younger than the retention limit at load time,
so the purge (at startup, then every 10 min) deletes nothing during the run."""
ROWS_PER_BATCH = ROWS_PER_STATEMENT * 200
ROWS_PER_COMMIT = ROWS_PER_BATCH * 4
EVENT_COLS = "id, type, org, iccid, protocol, topic, received_ms, history, envelope"
KINDS = ("first page", "page {page} (nextToken)", "6 h window (start/endDateTime)",
         "protocol = own", "protocol = other (no match)")


# --- data ------------------------------------------------------------------------------------


def iccid_of(i: int) -> str:
    return f"8988280777{i:09d}"


def ip_of(i: int) -> str:
    n = i + 1
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def import_sims(work_dir: Path, data_dir: Path, devices: int) -> float:
    """`simwire sims import` of every device's SIM into a fresh data dir; returns seconds."""
    csv_path = work_dir / "sims.csv"
    with csv_path.open("w") as fh:
        fh.write("iccid,imsi,ip\n")
        for i in range(devices):
            fh.write(f"{iccid_of(i)},901405{i:09d},{ip_of(i)}\n")
    env = dict(os.environ, SIMWIRE_SQLITE_SYNCHRONOUS="OFF")
    argv = [sys.executable, "-m", "simwire.cli", "sims", "import", str(csv_path),
            "--data-dir", str(data_dir)]
    note(f"(0) importing {devices:,} SIMs: {' '.join(argv[1:])} (synchronous=OFF)")
    t0 = time.monotonic()
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1800, check=False)
    took = time.monotonic() - t0
    if out.returncode != 0 or f"imported {devices} of {devices} rows" not in out.stdout:
        raise RuntimeError(f"sims import failed ({out.returncode}): {out.stdout[-500:]}"
                           f"{out.stderr[-1500:]}")
    note(f"imported {devices:,} SIMs in {took:.1f} s")
    return took


@dataclass(frozen=True)
class DeviceRow:
    iccid: str
    imsi: str
    ip: str
    org: str
    protocol: Protocol
    topic: str | None

    @property
    def envelope_mid(self) -> str:
        """The raw-telemetry envelope between `"received":"<ms>` and the payload text."""
        ident = DeviceIdentity(self.iccid, self.imsi, self.ip, self.org)
        return (f'","device":{ident.envelope_json},"source":"{self.protocol.value}",'
                '"payload":{"type":"STRING","value":"')

    @property
    def envelope_tail(self) -> str:
        topic = "" if self.topic is None else ',"topic":' + json.dumps(self.topic)
        return f'","encoding":"base64"{topic}}}}}'


def read_devices(conn: sqlite3.Connection) -> list[DeviceRow]:
    """The SIMs as the store wrote them; 60 % UDP devices, 40 % CoAP (3/4 with a topic)."""
    rows = conn.execute("SELECT iccid, imsi, ip, org FROM sims ORDER BY iccid").fetchall()
    out = []
    for i, (iccid, imsi, ip, org) in enumerate(rows):
        proto = Protocol.UDP if i % 10 < 6 else Protocol.COAP
        topic = f"sensors/{('temp', 'hum', 'gps')[i % 3]}" if i % 10 in (6, 7, 8) else None
        out.append(DeviceRow(iccid, imsi, ip, org, proto, topic))
    return out


def product_indexes(conn: sqlite3.Connection) -> dict[str, str]:
    return {name: sql for name, sql in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}


def schema_indexes() -> dict[str, str]:
    """Every index the store's SCHEMA creates, by name."""
    mem = sqlite3.connect(":memory:")
    try:
        mem.executescript(SCHEMA)
        return product_indexes(mem)
    finally:
        mem.close()


@dataclass
class Generated:
    messages: int
    devices: int
    t0_ms: int
    t1_ms: int
    gen_s: float
    index_s: float
    index_during_load: bool
    checked_rows: int
    org: str
    per_device_min: int
    per_device_max: int

    def row(self) -> dict[str, Any]:
        return {"messages": self.messages, "devices": self.devices, "t0_ms": self.t0_ms,
                "t1_ms": self.t1_ms, "gen_s": round(self.gen_s, 1),
                "rows_per_s": round(self.messages / self.gen_s) if self.gen_s else None,
                "index_s": round(self.index_s, 1), "index_during_load": self.index_during_load,
                "checked_rows": self.checked_rows,
                "per_device_min": self.per_device_min, "per_device_max": self.per_device_max}


class _Batches:
    """Producer thread: flat parameter lists for ROWS_PER_STATEMENT-row INSERTs, a batch
    (list of them) at a time, so Python builds rows while SQLite (GIL released) writes."""

    def __init__(self, devices: list[DeviceRow], n: int, t0_ms: int, t1_ms: int,
                 seed: int) -> None:
        self.devices = devices
        self.n = n
        self.t0 = t0_ms
        self.span = t1_ms - t0_ms
        self.rng = random.Random(seed)
        self.pool = [self.rng.randbytes(self.rng.randint(12, 48)) for _ in range(4096)]
        self.texts = [Payload(raw=p).text for p in self.pool]
        self.heads = [(d.org, d.iccid, d.protocol.value, d.topic, d.envelope_mid,
                       d.envelope_tail) for d in devices]
        self.last_ms = [0] * len(devices)
        self.last_text = [""] * len(devices)
        self.counts = [0] * len(devices)
        self.checked = 0
        self.queue: queue.Queue[list[list[Any]] | BaseException | None] = queue.Queue(4)
        self.thread = threading.Thread(target=self._run, name="history-gen", daemon=True)

    def _run(self) -> None:
        try:
            for start in range(0, self.n, ROWS_PER_BATCH):
                self.queue.put(self._batch(start, min(self.n, start + ROWS_PER_BATCH)))
            self.queue.put(None)
        except BaseException as exc:  # handed to the consumer
            self.queue.put(exc)

    def _batch(self, lo: int, hi: int) -> list[list[Any]]:
        rng, texts, n, t0, span = self.rng, self.texts, self.n, self.t0, self.span
        heads = self.heads
        devs = rng.choices(range(len(heads)), k=hi - lo)
        pays = rng.choices(range(len(texts)), k=hi - lo)
        bits = rng.getrandbits
        last_ms, last_text, counts = self.last_ms, self.last_text, self.counts
        out: list[list[Any]] = []
        flat: list[Any] = []
        for j in range(hi - lo):
            ms = t0 + (lo + j) * span // n
            d = devs[j]
            org, iccid, proto, topic, mid, tail = heads[d]
            text = texts[pays[j]]
            eid = f"1-{ms // 1000:08x}-{bits(96):024x}"
            flat += (eid, "TELEMETRY_DATA", org, iccid, proto, topic, ms, text,
                     f'{{"id":"{eid}","type":"TELEMETRY_DATA","version":"1.0.0",'
                     f'"received":"{ms}{mid}{text}{tail}')
            last_ms[d] = ms
            last_text[d] = text
            counts[d] += 1
            if len(flat) == 9 * ROWS_PER_STATEMENT:
                out.append(flat)
                flat = []
        if flat:
            out.append(flat)
        self._check(out[0][:9], self.devices[devs[0]], self.pool[pays[0]])
        return out

    def _check(self, row: list[Any], dev: DeviceRow, raw: bytes) -> None:
        """The generated row must be what the ingest path writes for that uplink."""
        ident = DeviceIdentity(dev.iccid, dev.imsi, dev.ip, dev.org)
        event = Event(id=row[0], type=EventType.TELEMETRY_DATA, received_ms=row[6],
                      org=dev.org, device=ident, source=dev.protocol, topic=dev.topic,
                      payload=Payload(raw=raw))
        expected = _event_row(event)
        if tuple(row) != expected:
            raise RuntimeError(f"generated row differs from the store's:\n{tuple(row)}\n"
                               f"{expected}")
        if json.loads(row[8]) != event.to_envelope():
            raise RuntimeError(f"generated envelope is not the 1NCE envelope: {row[8]}")
        self.checked += 1


def _load(conn: sqlite3.Connection, gen: _Batches, start: float) -> None:
    """Insert the producer's batches, ROWS_PER_STATEMENT rows a statement, committing every
    ROWS_PER_COMMIT rows (the caller's transaction is open)."""
    head = f"INSERT INTO events ({EVENT_COLS}) VALUES "
    full = head + ",".join(["(?,?,?,?,?,?,?,?,?)"] * ROWS_PER_STATEMENT)
    done = in_tx = 0
    next_note = 1_000_000
    while True:
        batch = gen.queue.get()
        if batch is None:
            return
        if isinstance(batch, BaseException):
            raise RuntimeError(f"row generator failed: {batch}") from batch
        for flat in batch:
            rows = len(flat) // 9
            sql = full if rows == ROWS_PER_STATEMENT else head + ",".join(
                ["(?,?,?,?,?,?,?,?,?)"] * rows)
            conn.execute(sql, flat)
            done += rows
            in_tx += rows
        if in_tx >= ROWS_PER_COMMIT:
            conn.execute("COMMIT")
            conn.execute("BEGIN")
            in_tx = 0
        if done >= next_note or done == gen.n:
            el = time.monotonic() - start
            note(f"generated {done:,}/{gen.n:,} messages in {el:.1f} s ({done / el:,.0f} rows/s)")
            next_note += 1_000_000


def generate(db_path: Path, messages: int, seed: int, index_during_load: bool) -> Generated:
    """(1) Write the history rows straight into the store's file (see the module doc)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute("PRAGMA cache_size = -1048576")  # 1 GiB, this connection only
        expected = schema_indexes()
        have = product_indexes(conn)
        if have != expected:
            raise RuntimeError(f"the store's file lacks indexes of SCHEMA: "
                               f"{sorted(set(expected) - set(have))}, extra "
                               f"{sorted(set(have) - set(expected))}")
        devices = read_devices(conn)
        orgs = {d.org for d in devices}
        if len(orgs) != 1:
            raise RuntimeError(f"SIMs in several organisations: {sorted(orgs)}")
        org = orgs.pop()
        now = int(time.time() * 1000)
        t0_ms, t1_ms = now - RETENTION_MS + MARGIN_MS, now - 60_000
        events_idx = [name for name, sql in expected.items()
                      if " ON events " in sql.replace("\n", " ")]
        note(f"(1) generating {messages:,} messages over {len(devices):,} devices "
             f"({iso_ms(t0_ms)} .. {iso_ms(t1_ms)}), journal_mode {mode}, synchronous OFF, "
             f"indexes on events ({', '.join(events_idx)}) "
             f"{'kept during the load' if index_during_load else 'rebuilt after the load'}")
        start = time.monotonic()
        conn.execute("BEGIN")
        if not index_during_load:
            for name in events_idx:
                conn.execute(f"DROP INDEX {name}")
        # first contact of every device, just before its first message: what the pipeline
        # writes with the first uplink (devices row, LIFECYCLE event, admin log)
        regs = [first_registration(DeviceIdentity(d.iccid, d.imsi, d.ip, d.org),
                                   t0_ms - len(devices) + i) for i, d in enumerate(devices)]
        conn.executemany("INSERT OR IGNORE INTO devices VALUES (?,?,?,?,?)",
                         [(r.device.iccid, r.device.org, r.device.imsi, r.device.ip,
                           r.device.first_seen_ms) for r in regs])
        conn.executemany(f"INSERT INTO events ({EVENT_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                         [_event_row(r.event) for r in regs])
        conn.executemany(f"INSERT INTO admin_logs ({_LOG_COLS}) VALUES "
                         "(?,?,?,?,?,?,?,?,?,?,?)", [_log_row(r.log) for r in regs])
        gen = _Batches(devices, messages, t0_ms, t1_ms, seed)
        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)  # hand the GIL back to the writer soon after each step
        try:
            gen.thread.start()
            _load(conn, gen, start)
            gen.thread.join()
        finally:
            sys.setswitchinterval(switch)
        conn.executemany("INSERT INTO device_state VALUES (?,?,?,?,?)",
                         [(d.iccid, d.protocol.value, gen.last_text[i], d.topic, gen.last_ms[i])
                          for i, d in enumerate(devices) if gen.counts[i]])
        conn.execute("COMMIT")
        gen_s = time.monotonic() - start
        note(f"generated {messages:,} messages in {gen_s:.1f} s ({messages / gen_s:,.0f} rows/s), "
             f"{gen.checked} sampled rows identical to the store's _event_row")
        t = time.monotonic()
        conn.executescript(SCHEMA)  # what the store runs on open: recreates what was dropped
        index_s = time.monotonic() - t
        if not index_during_load:
            note(f"indexes {', '.join(events_idx)} rebuilt by the store's SCHEMA in "
                 f"{index_s:.1f} s")
        have = product_indexes(conn)
        if have != expected:
            raise RuntimeError(f"indexes differ from the store's SCHEMA: {sorted(have)} vs "
                               f"{sorted(expected)}")
        if conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'"
                        ).fetchone()[0]:
            raise RuntimeError("sqlite_stat1 exists: the product runs no ANALYZE")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return Generated(messages, len(devices), t0_ms, t1_ms, gen_s, index_s, index_during_load,
                     gen.checked, org, min(gen.counts), max(gen.counts))


# --- queries ---------------------------------------------------------------------------------


@dataclass
class Query:
    kind: int
    iccid: str
    params: dict[str, str] = field(default_factory=dict)
    start_ms: int | None = None
    end_ms: int | None = None
    protocol: Protocol | None = None
    token: str | None = None
    sql: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    """The statements the store ran for it (ownership check, page), captured."""
    expected: int = -1
    """Items on the page according to the store's code on this file."""

    def history_query(self, now_ms: int) -> HistoryQuery:
        """What inspector.api._history builds from the request's parameters."""
        end = now_ms if self.end_ms is None else self.end_ms
        start = end - RETENTION_MS if self.start_ms is None else self.start_ms
        return HistoryQuery(iccid=self.iccid, start_ms=max(start, now_ms - RETENTION_MS),
                            end_ms=end, protocol=self.protocol, page_size=DEFAULT_PAGE_SIZE,
                            token=self.token)

    def path(self) -> str:
        qs = urllib.parse.urlencode(self.params)
        return f"/v1/inspect/devices/{self.iccid}/history" + (f"?{qs}" if qs else "")


class _Capture:
    """Stands in for the store's SqliteDatabase: runs its read closures on one connection in
    this thread and records every statement, so the baseline runs the store's own SQL."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def read(self, fn: Any) -> Any:
        return fn(self)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        self.calls.append((sql, tuple(args)))
        return self.conn.execute(sql, args)


def _drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a store coroutine that never suspends (its db is a _Capture)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return cast(T, stop.value)
    coro.close()
    raise RuntimeError("store call suspended")


class RawStore:
    """The store's SQL on a read-only connection of this process (the baseline)."""

    def __init__(self, db_path: Path) -> None:
        self.conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 10000")
        self.conn.execute("PRAGMA query_only = ON")
        self.capture = _Capture(self.conn)
        self.store = SqliteStore(db_path)  # never opened: its db is replaced
        self.store.db = cast(SqliteDatabase, self.capture)

    def close(self) -> None:
        self.conn.close()

    def capture_query(self, q: Query, now_ms: int) -> None:
        """Run the store's code for `q` (as the API would): records q.sql and q.expected."""
        self.capture.calls = []
        _drive(self.store.get_device(q.iccid))
        page = _drive(self.store.history(q.history_query(now_ms)))
        q.sql, self.capture.calls = self.capture.calls, []
        q.expected = len(page.items)

    def token_for_page(self, iccid: str, page: int, now_ms: int) -> str | None:
        """nextToken of page `page - 1`: the store's code walks the pages."""
        token = None
        for _ in range(page - 1):
            result = _drive(self.store.history(Query(0, iccid, token=token).history_query(now_ms)))
            token = result.next_token
            if token is None:
                break
        self.capture.calls = []
        return token

    def timed(self, q: Query) -> float:
        """Seconds for the captured statements, execute + fetchall each."""
        t = time.perf_counter()
        for sql, args in q.sql:
            self.conn.execute(sql, args).fetchall()
        return time.perf_counter() - t

    def plan(self, q: Query) -> list[str]:
        sql, args = q.sql[-1]
        return [r[3] for r in self.conn.execute("EXPLAIN QUERY PLAN " + sql, args)]


def build_queries(raw: RawStore, devices: list[DeviceRow], gen: Generated, per_kind: int,
                  page: int, seed: int) -> list[Query]:
    """per_kind queries of each kind on random devices, shuffled; SQL captured."""
    rng = random.Random(seed + 1)
    now = int(time.time() * 1000)
    out: list[Query] = []
    for kind in range(len(KINDS)):
        made = tries = 0
        while made < per_kind:
            tries += 1
            if tries > per_kind * 20:
                raise RuntimeError(f"too few devices with {page} pages of history")
            d = devices[rng.randrange(len(devices))]
            q = Query(kind, d.iccid)
            if kind == 1:
                q.token = raw.token_for_page(d.iccid, page, now)
                if q.token is None:
                    continue
                q.params["nextToken"] = q.token
            elif kind == 2:
                q.end_ms = rng.randint(gen.t0_ms + WINDOW_MS, gen.t1_ms)
                q.start_ms = q.end_ms - WINDOW_MS
                q.params["startDateTime"] = iso_ms(q.start_ms)
                q.params["endDateTime"] = iso_ms(q.end_ms)
            elif kind in (3, 4):
                other = Protocol.COAP if d.protocol is Protocol.UDP else Protocol.UDP
                q.protocol = d.protocol if kind == 3 else other
                q.params["protocol"] = q.protocol.value
            raw.capture_query(q, now)
            out.append(q)
            made += 1
    rng.shuffle(out)
    return out


# --- measurement -----------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    latencies_s: list[float]
    wall_s: float
    mismatches: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def _api_run(base: str, token: str, queries: list[Query], concurrency: int,
                   name: str) -> Run:
    lat = [math.nan] * len(queries)
    errors: dict[str, int] = {}
    mismatches = 0
    urls = [URL(base + q.path(), encoded=True) for q in queries]
    conn = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=conn, headers=headers,
                                     timeout=timeout) as session:
        todo = iter(range(len(queries)))

        async def worker() -> None:
            nonlocal mismatches
            for k in todo:
                t = time.perf_counter()
                async with session.get(urls[k]) as resp:
                    body = await resp.read()
                lat[k] = time.perf_counter() - t
                if resp.status != 200:
                    key = f"{resp.status} {body[:120]!r}"
                    errors[key] = errors.get(key, 0) + 1
                    continue
                if len(json.loads(body)["items"]) != queries[k].expected:
                    mismatches += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return Run(name, lat, wall, mismatches, errors)


def api_run(base: str, token: str, queries: list[Query], concurrency: int, name: str) -> Run:
    note(f"{name}: {len(queries):,} requests, {concurrency} connection(s)")
    r = asyncio.run(_api_run(base, token, queries, concurrency, name))
    note(f"{name}: {len(queries) / r.wall_s:,.0f} req/s, mismatches {r.mismatches}, "
         f"errors {r.errors or 0}")
    if r.errors:
        raise RuntimeError(f"{name}: API errors {r.errors}")
    return r


def raw_run(raw: RawStore, queries: list[Query]) -> Run:
    note(f"raw SQL baseline: {len(queries):,} queries, sequential, this process")
    t0 = time.perf_counter()
    lat = [raw.timed(q) for q in queries]
    return Run("raw", lat, time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile of `values` (ms in, ms out)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def stats(run: Run, queries: list[Query], kind: int | None) -> dict[str, Any]:
    ms = [run.latencies_s[i] * 1000 for i, q in enumerate(queries)
          if kind is None or q.kind == kind]
    return {"count": len(ms), "p50_ms": round(pct(ms, 50), 3), "p95_ms": round(pct(ms, 95), 3),
            "p99_ms": round(pct(ms, 99), 3), "max_ms": round(max(ms), 3)}


def token_for(http_port: int) -> tuple[str, str]:
    """(access token, its organisation claim) for the admin client."""
    basic = base64.b64encode(f"{ADMIN_ID}:{ADMIN_SECRET}".encode()).decode()
    status, raw = http("POST", f"http://{HOST}:{http_port}/oauth/token",
                       {"grant_type": "client_credentials"}, {"Authorization": f"Basic {basic}"})
    if status != 200:
        raise RuntimeError(f"POST /oauth/token -> {status}: {raw[:300]!r}")
    token = str(json.loads(raw)["access_token"])
    body = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return token, str(claims["org"])


def simwire_server(work_dir: Path, data_dir: Path, workers: int = 1) -> Server:
    udp, coap_port, coaps = (free_port(socket.SOCK_DGRAM) for _ in range(3))
    web = free_port(socket.SOCK_STREAM)
    env = dict(os.environ, SIMWIRE_ADMIN_CLIENT_ID=ADMIN_ID,
               SIMWIRE_ADMIN_CLIENT_SECRET=ADMIN_SECRET)
    env.pop("SIMWIRE_SQLITE_SYNCHRONOUS", None)  # the durable default (FULL)
    argv = [sys.executable, "-m", "simwire.cli", "serve", "--data-dir", str(data_dir),
            "--host", HOST, "--udp-port", str(udp), "--coap-port", str(coap_port),
            "--coaps-port", str(coaps), "--http-port", str(web), "--log-level", "WARNING",
            "--workers", str(workers)]
    return Server("simwire", argv, "simwire ready", work_dir / "simwire.log", env)


@dataclass
class Measured:
    queries: list[Query]
    raw: Run
    c1: Run
    cn: Run
    plans: dict[str, list[str]]
    server_stderr: str


def measure(work_dir: Path, data_dir: Path, gen: Generated, per_kind: int, page: int,
            concurrency: int, seed: int, workers: int = 1) -> Measured:
    db_path = data_dir / "simwire.db"
    raw = RawStore(db_path)
    try:
        conn = sqlite3.connect(db_path)
        try:
            devices = read_devices(conn)
        finally:
            conn.close()
        note(f"(2) starting simwire serve on {data_dir}")
        with running(lambda: simwire_server(work_dir, data_dir, workers)) as server:
            t = time.monotonic()
            ports = simwire_ports(server)
            note(f"simwire ready in {time.monotonic() - t:.1f} s: {ports}")
            token, org = token_for(ports["http"])
            if org != gen.org:
                raise RuntimeError(f"the admin client's organisation is {org!r}, the SIMs' "
                                   f"{gen.org!r}: the API would not see them")
            note(f"(3) {per_kind:,} queries per kind, SQL captured from the store's code")
            queries = build_queries(raw, devices, gen, per_kind, page, seed)
            plans = {_kind_name(k, page): raw.plan(next(q for q in queries if q.kind == k))
                     for k in range(len(KINDS))}
            base = f"http://{HOST}:{ports['http']}"
            rng = random.Random(seed + 2)
            warm = [Query(0, devices[rng.randrange(len(devices))].iccid)
                    for _ in range(WARMUP)]
            for q in warm:
                raw.capture_query(q, int(time.time() * 1000))
            api_run(base, token, warm, 1, "API warm-up")
            raw_s = raw_run(raw, queries)
            c1 = api_run(base, token, queries, 1, "API sequential")
            cn = api_run(base, token, queries, concurrency, f"API concurrency {concurrency}")
            if server.proc.poll() is not None:
                raise RuntimeError(f"simwire exited: {server.stderr_tail()}")
            tail = server.stderr_tail(10)
    finally:
        raw.close()
    return Measured(queries, raw_s, c1, cn, plans, tail)


def _kind_name(kind: int, page: int) -> str:
    return KINDS[kind].format(page=page)


def disk_usage(data_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(data_dir.glob("simwire.db*"))}


# --- report ----------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def report(a: argparse.Namespace, gen: Generated, import_s: float, m: Measured,
           disk: dict[str, int], wall_s: float, other: dict[str, float | None],
           out: Any) -> dict[str, Any]:
    names = [_kind_name(k, a.page) for k in range(len(KINDS))]
    per: dict[str, dict[str, Any]] = {}
    for k, name in enumerate([*names, "all kinds"]):
        kind = None if k == len(names) else k
        api, raw, cn = (stats(r, m.queries, kind) for r in (m.c1, m.raw, m.cn))
        per[name] = {"api": api, "raw": raw, f"api_c{a.concurrency}": cn,
                     "ratio_p99": round(api["p99_ms"] / raw["p99_ms"], 1) if raw["p99_ms"]
                     else None}
    worst = max(names, key=lambda n: per[n]["api"]["p99_ms"])
    p99 = per[worst]["api"]["p99_ms"]
    p99_cn = max(per[n][f"api_c{a.concurrency}"]["p99_ms"] for n in names)
    goal_met = p99 < GOAL_P99_MS
    total_disk = sum(disk.values())
    per_dev = gen.messages / max(1, gen.devices)

    def line(s: str = "") -> None:
        print(s, file=out)

    line(f"Simwire history benchmark: {gen.messages:,} messages over {gen.devices:,} devices "
         f"(~{per_dev:,.0f} per device, {gen.per_device_min:,}-{gen.per_device_max:,}; 7 days), "
         f"{a.queries:,} queries per kind, {os.cpu_count()} CPUs, Python "
         f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}, wall {wall_s:.0f} s, "
         f"commit {git_commit()}")
    line(f"Data: SIM import {import_s:.1f} s; {gen.messages:,} rows generated in "
         f"{gen.gen_s:.1f} s ({gen.messages / gen.gen_s:,.0f} rows/s), indexes "
         f"{'maintained during the load' if gen.index_during_load else 'rebuilt after'} "
         f"({gen.index_s:.1f} s); database on disk {_gib(total_disk)} ("
         + ", ".join(f"{k} {_gib(v)}" for k, v in disk.items()) + ")")
    line("CPU used by other processes during each phase (cores): "
         + ", ".join(f"{k} {'n/a' if v is None else v}" for k, v in other.items()))
    c = a.concurrency
    head = (f"{'query (ms)':<32} {'API p50':>8} {'p95':>7} {'p99':>7} {'max':>7} | "
            f"{'raw p50':>8} {'p95':>7} {'p99':>7} {'max':>7} | {'p99 API/raw':>11} | "
            f"{f'c={c} p50':>9} {'p95':>7} {'p99':>7} {'max':>7}")
    line(head)
    for name, r in per.items():
        api, raw, cn = r["api"], r["raw"], r[f"api_c{c}"]
        line(f"{name:<32} {api['p50_ms']:>8.2f} {api['p95_ms']:>7.2f} {api['p99_ms']:>7.2f} "
             f"{api['max_ms']:>7.2f} | {raw['p50_ms']:>8.3f} {raw['p95_ms']:>7.3f} "
             f"{raw['p99_ms']:>7.3f} {raw['max_ms']:>7.3f} | {r['ratio_p99']:>10.1f}x | "
             f"{cn['p50_ms']:>9.2f} {cn['p95_ms']:>7.2f} {cn['p99_ms']:>7.2f} "
             f"{cn['max_ms']:>7.2f}")
    n = len(m.queries)
    line(f"throughput: API sequential {n / m.c1.wall_s:,.0f} req/s, API c={c} "
         f"{n / m.cn.wall_s:,.0f} req/s, raw SQL {n / m.raw.wall_s:,.0f} queries/s; "
         f"answers with another item count than the store's code: {m.c1.mismatches} "
         f"(c=1), {m.cn.mismatches} (c={c})")
    line(f"goal: history p99 (sequential, worst kind: {worst}) {p99:.2f} ms < "
         f"{GOAL_P99_MS:.0f} ms: {'MET' if goal_met else 'NOT MET'} "
         f"(worst p99 at c={c}: {p99_cn:.2f} ms)")
    line("query plans (EXPLAIN QUERY PLAN of the store's history SQL):")
    for name, plan in m.plans.items():
        line(f"  {name}: {'; '.join(plan)}")
    result = {
        "history_p99_ms": p99, "goal_p99_ms": GOAL_P99_MS, "goal_met": goal_met,
        "worst_kind": worst, f"history_p99_ms_c{c}": p99_cn,
        "kinds": per,
        "api_req_per_s": round(n / m.c1.wall_s, 1),
        f"api_c{c}_req_per_s": round(n / m.cn.wall_s, 1),
        "raw_queries_per_s": round(n / m.raw.wall_s, 1),
        "mismatches": {"c1": m.c1.mismatches, f"c{c}": m.cn.mismatches},
        "plans": m.plans, "data": gen.row(), "sim_import_s": round(import_s, 1),
        "disk_bytes": disk, "disk_total_bytes": total_disk,
        "params": {"messages": a.messages, "devices": a.devices, "workers": a.workers,
                   "queries_per_kind": a.queries,
                   "page": a.page, "concurrency": c, "page_size": DEFAULT_PAGE_SIZE,
                   "window_h": WINDOW_MS // 3_600_000, "seed": a.seed,
                   "cpus": os.cpu_count(), "python": platform.python_version(),
                   "sqlite": sqlite3.sqlite_version, "commit": git_commit()},
        "other_cpu_cores": other, "wall_s": round(wall_s, 1),
    }
    print(json.dumps(result, separators=(",", ":")))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--messages", type=int, help="stored messages (default 10M, quick 1M)")
    ap.add_argument("--devices", type=int, default=10_000, help="devices/SIMs (default 10000)")
    ap.add_argument("--queries", type=int,
                    help="measured queries per kind (default 2000, quick 300)")
    ap.add_argument("--quick", action="store_true", help="1M messages, 300 queries per kind")
    ap.add_argument("--concurrency", type=int, default=8,
                    help="connections of the concurrent run (default 8)")
    ap.add_argument("--page", type=int, default=5, help="the deeper page measured (default 5)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--index-during-load", action="store_true",
                    help="keep the store's indexes while loading (slower; organically grown "
                         "index pages instead of a sorted build)")
    ap.add_argument("--workers", type=int, default=1,
                    help="simwire serve --workers N (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dir and log")
    ap.add_argument("--json", action="store_true",
                    help="stdout: only the JSON line (the table goes to stderr)")
    a = ap.parse_args(argv)
    a.messages = a.messages or (1_000_000 if a.quick else 10_000_000)
    a.queries = a.queries or (300 if a.quick else 2000)
    if a.messages < 1 or a.queries < 1 or a.concurrency < 1 or a.page < 2:
        ap.error("--messages, --queries, --concurrency must be >= 1, --page >= 2")
    if not 1 <= a.devices < 2**24 - 1:
        ap.error("--devices must be from 1 to 16777214")
    work_dir = Path(tempfile.mkdtemp(prefix="simwire-bench-history-"))
    data_dir = work_dir / "data"
    phases = Phases()
    t0 = time.monotonic()
    try:
        import_s = phases.run("(0)", lambda: import_sims(work_dir, data_dir, a.devices))
        gen = phases.run("(1)", lambda: generate(data_dir / "simwire.db", a.messages, a.seed,
                                                 a.index_during_load))
        m = phases.run("(2-4)", lambda: measure(work_dir, data_dir, gen, a.queries, a.page,
                                                a.concurrency, a.seed, a.workers))
        disk = disk_usage(data_dir)
        note("database on disk: " + ", ".join(f"{k} {_gib(v)}" for k, v in disk.items()))
        report(a, gen, import_s, m, disk, time.monotonic() - t0, phases.other,
               sys.stderr if a.json else sys.stdout)
    except (RuntimeError, OSError, subprocess.SubprocessError, sqlite3.Error,
            aiohttp.ClientError) as exc:
        note(f"benchmark failed: {exc}")
        return 1
    finally:
        clean_up(work_dir, a.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
