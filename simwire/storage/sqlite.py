"""SQLite adapter (the embedded default): one writer thread with group commit, WAL readers.

`SqliteDatabase` is the engine: `write(fn)` queues `fn(conn)` for the writer thread, which
runs every queued operation in one transaction (each in its own SAVEPOINT, so one failing
operation does not undo the others) and commits once: many uplinks share one fsync.
`read(fn)` runs on a small pool of read-only connections (WAL lets them read while the
writer commits). `SqliteStore` implements every port of `simwire.ports` on top of it.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from simwire.errors import BadRequest, Conflict
from simwire.model import (
    AdminLog,
    ApiClient,
    Device,
    DeviceState,
    DownlinkMode,
    DownlinkRequest,
    DownlinkStatus,
    Event,
    EventType,
    HistoryItem,
    Integration,
    IntegrationState,
    LogCategory,
    LogType,
    Lwm2mObservation,
    Lwm2mRegistration,
    Protocol,
    PskFormat,
    PskJob,
    PskJobStatus,
    PskOrigin,
    SavingsTotals,
    Sim,
    SimStatus,
    StoredPsk,
    Template,
    TemplateStatus,
)
from simwire.ports import (
    AdminLogQuery,
    DeviceQuery,
    DownlinkQuery,
    HistoryPage,
    HistoryQuery,
    IngestRecord,
    OutboxItem,
    Page,
    SimChanges,
)

log = logging.getLogger("simwire.storage.sqlite")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sims (
    iccid TEXT PRIMARY KEY, imsi TEXT NOT NULL, ip TEXT NOT NULL UNIQUE, imei TEXT,
    label TEXT, status TEXT NOT NULL, org TEXT NOT NULL,
    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
    imei_lock INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sims_org ON sims (org, iccid);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, type TEXT NOT NULL, org TEXT NOT NULL,
    iccid TEXT, protocol TEXT, topic TEXT, received_ms INTEGER NOT NULL,
    history TEXT, envelope TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_device ON events (iccid, received_ms, seq, protocol)
    WHERE type = 'TELEMETRY_DATA';
CREATE TABLE IF NOT EXISTS devices (
    iccid TEXT PRIMARY KEY, org TEXT NOT NULL, imsi TEXT NOT NULL, ip TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS devices_org ON devices (org, iccid);
CREATE TABLE IF NOT EXISTS device_state (
    iccid TEXT NOT NULL, protocol TEXT NOT NULL, payload TEXT NOT NULL, topic TEXT,
    updated_ms INTEGER NOT NULL, PRIMARY KEY (iccid, protocol)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS admin_logs (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, org TEXT NOT NULL, timestamp_ms INTEGER NOT NULL,
    type TEXT NOT NULL, category TEXT NOT NULL, message TEXT NOT NULL, description TEXT NOT NULL,
    trace_id TEXT, iccid TEXT, imsi TEXT, ip TEXT);
CREATE INDEX IF NOT EXISTS admin_logs_org ON admin_logs (org, timestamp_ms);
CREATE INDEX IF NOT EXISTS admin_logs_iccid ON admin_logs (iccid, timestamp_ms);
CREATE TABLE IF NOT EXISTS api_clients (
    client_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, role TEXT NOT NULL,
    org TEXT NOT NULL, created_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS api_clients_org ON api_clients (org, client_id);
CREATE TABLE IF NOT EXISTS integrations (
    id TEXT PRIMARY KEY, org TEXT NOT NULL, created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL, state TEXT NOT NULL, error TEXT, first_delivery_ms INTEGER,
    config TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS integrations_org ON integrations (org, created_ms);
CREATE TABLE IF NOT EXISTS subscriptions (
    org TEXT NOT NULL, type TEXT NOT NULL, integration TEXT NOT NULL,
    PRIMARY KEY (org, type, integration)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    integration TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (integration, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS templates (
    id TEXT PRIMARY KEY, org TEXT NOT NULL, name TEXT NOT NULL, template TEXT NOT NULL,
    protocols TEXT NOT NULL, status TEXT NOT NULL, created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS templates_org ON templates (org, created_ms, id);
CREATE TABLE IF NOT EXISTS template_claims (
    org TEXT NOT NULL, protocol TEXT NOT NULL, template TEXT NOT NULL,
    PRIMARY KEY (org, protocol)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS template_claims_template ON template_claims (template);
CREATE TABLE IF NOT EXISTS savings (
    org TEXT NOT NULL, day INTEGER NOT NULL, protocol TEXT NOT NULL, iccid TEXT NOT NULL,
    messages INTEGER NOT NULL, original_bytes INTEGER NOT NULL,
    optimized_bytes INTEGER NOT NULL, PRIMARY KEY (org, day, protocol, iccid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS savings_day ON savings (day);
CREATE TABLE IF NOT EXISTS psks (
    iccid TEXT NOT NULL, protocol TEXT NOT NULL, sealed BLOB NOT NULL, format TEXT NOT NULL,
    origin TEXT NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
    bootstrapped_ms INTEGER, PRIMARY KEY (iccid, protocol)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS psk_jobs (
    id TEXT PRIMARY KEY, org TEXT NOT NULL, created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL, status TEXT NOT NULL, amount INTEGER NOT NULL,
    done INTEGER NOT NULL, failed INTEGER NOT NULL, errors TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS psk_jobs_org ON psk_jobs (org, created_ms, id);
CREATE INDEX IF NOT EXISTS psk_jobs_running ON psk_jobs (created_ms, id)
    WHERE status = 'IN_PROGRESS';
CREATE TABLE IF NOT EXISTS lwm2m_registrations (
    id TEXT PRIMARY KEY, iccid TEXT NOT NULL UNIQUE, org TEXT NOT NULL, ip TEXT NOT NULL,
    port INTEGER NOT NULL, secure INTEGER NOT NULL, lifetime_s INTEGER NOT NULL,
    version TEXT NOT NULL, binding TEXT NOT NULL, queue_mode INTEGER NOT NULL,
    links TEXT NOT NULL, registered_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lwm2m_observations (
    token BLOB PRIMARY KEY, iccid TEXT NOT NULL, registration TEXT NOT NULL,
    path TEXT NOT NULL, created_ms INTEGER NOT NULL, content_format INTEGER) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lwm2m_observations_registration
    ON lwm2m_observations (registration, created_ms);
CREATE TABLE IF NOT EXISTS downlinks (
    id TEXT PRIMARY KEY, org TEXT NOT NULL, iccid TEXT NOT NULL, ip TEXT NOT NULL,
    protocol TEXT NOT NULL, mode TEXT NOT NULL, status TEXT NOT NULL,
    request_data TEXT NOT NULL, send_attempts INTEGER NOT NULL,
    attempts_left INTEGER NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL, result_data TEXT, error TEXT) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS downlinks_org ON downlinks (org, created_ms, id);
CREATE INDEX IF NOT EXISTS downlinks_iccid ON downlinks (iccid, created_ms, id);
CREATE INDEX IF NOT EXISTS downlinks_scheduled ON downlinks (iccid, created_ms, id)
    WHERE status = 'SCHEDULED';
CREATE INDEX IF NOT EXISTS downlinks_expiring ON downlinks (expires_ms)
    WHERE status = 'SCHEDULED';
CREATE INDEX IF NOT EXISTS downlinks_created ON downlinks (created_ms);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_ms INTEGER NOT NULL) WITHOUT ROWID;
"""

ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("sims", "imei_lock", "INTEGER NOT NULL DEFAULT 0"),
)
"""(table, column, definition) added after the table was first released: `SCHEMA` creates
new files with them, `_migrate` adds them to files written by an earlier version."""

DROPPED_INDEXES: tuple[str, ...] = ("events_history",)
"""Indexes an earlier version created and `SCHEMA` has replaced (`events_history` lacked
`protocol`, which `events_by_device` carries so a protocol filter reads no table rows):
`_migrate` drops them."""

MAX_BATCH = 1024
PURGE_CHUNK = 5000


@dataclass(slots=True)
class _Op:
    """A queued write: a closure (management) or an uplink's record (ingest)."""

    fn: Callable[[sqlite3.Connection], Any] | None
    record: IngestRecord | None
    done: Callable[[bool, Any], None] | None
    """A closure's: called on `loop` after the commit, (True, result) or (False, exception)."""
    loop: asyncio.AbstractEventLoop
    committed: Callable[[BaseException | None], None] | None = None
    """A record's (the `IngestStore.submit` callback itself, no adapter per message):
    called on `loop` after the commit with None, or the exception."""


_STOP = object()


class SqliteDatabase:
    """The writer thread + reader pool. Owned by `SqliteStore`; nothing else touches it."""

    def __init__(self, path: Path, synchronous: str = "FULL", readers: int = 2) -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"bad sqlite synchronous mode {synchronous!r}")
        self.path = path
        self.synchronous = synchronous.upper()
        self._queue: queue.SimpleQueue[_Op | list[_Op] | object] = queue.SimpleQueue()
        self._submitted: list[_Op] = []
        """Records submitted during the current event-loop iteration: handed to the writer
        together by `_flush` (one queue put and one writer wake-up per burst)."""
        self._writer: threading.Thread | None = None
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-read")
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self.outbox_listener: tuple[asyncio.AbstractEventLoop, Callable[[], None]] | None = None
        """Called (on its loop) after a commit that queued outbox items."""

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        return conn

    def open(self) -> None:
        if self._writer is not None or self._closed:
            raise RuntimeError("SqliteDatabase opens once; make a new one to reopen the file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        conn.execute("PRAGMA journal_mode = WAL")
        for name in _present_indexes(conn, DROPPED_INDEXES):
            log.info("sqlite schema: replacing index %s, which takes a while on a large "
                     "store", name)
        conn.executescript(SCHEMA)
        _migrate(conn)
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="sqlite-writer", daemon=True
        )
        self._writer.start()

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._flush()
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in the writer's next transaction; returns after the commit."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._flush()  # records submitted before it stay ahead of it
        self._queue.put(_Op(fn, None, partial(_resolve, fut), loop))
        return await fut

    def submit(
        self, record: IngestRecord, done: Callable[[BaseException | None], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Queue an uplink's record; all records of one commit share one INSERT per table.
        `done(None)` runs on `loop` after the commit, `done(exc)` if it failed. Called on
        `loop`'s thread: the records of one loop iteration (a burst of datagrams) reach the
        writer together, at the end of the iteration, so that it does not wake up (and
        take the GIL from the loop) for the first of them while the loop still parses the
        others."""
        submitted = self._submitted
        submitted.append(_Op(None, record, None, loop, done))
        if len(submitted) == 1:
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._submitted:
            ops, self._submitted = self._submitted, []
            self._queue.put(ops)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, fn)

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return fn(conn)

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch: list[_Op] = []
                nxt = first
                stop = False
                while True:
                    if isinstance(nxt, list):
                        batch += nxt
                    else:
                        batch.append(nxt)  # type: ignore[arg-type]
                    if len(batch) >= MAX_BATCH:
                        break
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stop = True
                        break
                self._run_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        results: list[tuple[_Op, bool, Any]] = []
        queued = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            records = [op for op in batch if op.record is not None]
            if records:
                # the records go first, without a savepoint of their own: if they fail,
                # rolling back the whole (so far records-only) transaction undoes them
                rows = [op.record for op in records if op.record is not None]
                try:
                    queued = _write_records(conn, rows) > 0
                    results += [(op, True, None) for op in records]
                except Exception:  # find the culprit: one savepoint per record
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    for op in records:
                        item = _run_one(conn, op)
                        queued |= item[1] and bool(item[2])
                        results.append((op, item[1], None if item[1] else item[2]))
            results += [_run_one(conn, op) for op in batch if op.record is None]
            conn.execute("COMMIT")
        except Exception as exc:  # commit failed: nobody's write is durable
            log.error("sqlite commit failed: %s", exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            results = [(op, False, exc) for op in batch]
            queued = False
        listener = self.outbox_listener
        if queued and listener is not None and not listener[0].is_closed():
            listener[0].call_soon_threadsafe(listener[1])
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op, bool, Any]]] = {}
        for item in results:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, items)


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the `ADDED_COLUMNS` an older file lacks and drop its `DROPPED_INDEXES`. The
    checks and the changes share one IMMEDIATE transaction, so processes opening the same
    old file at once change it once (the others wait for the lock, then see it)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column, definition in ADDED_COLUMNS:
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                log.info("sqlite schema: added %s.%s", table, column)
        for name in _present_indexes(conn, DROPPED_INDEXES):
            conn.execute(f"DROP INDEX {name}")
            log.info("sqlite schema: dropped index %s (replaced)", name)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _present_indexes(conn: sqlite3.Connection, names: Sequence[str]) -> list[str]:
    """Those of `names` that are indexes in the file."""
    return [n for n in names if conn.execute(
        "SELECT 1 FROM sqlite_schema WHERE type = 'index' AND name = ?", (n,)).fetchone()]


def _isolated(conn: sqlite3.Connection, fn: Callable[[], T]) -> T:
    """Run `fn` in a SAVEPOINT: if it raises, its writes are undone and the rest stays."""
    conn.execute("SAVEPOINT op")
    try:
        result = fn()
    except BaseException:
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        raise
    conn.execute("RELEASE op")
    return result


def _run_one(conn: sqlite3.Connection, op: _Op) -> tuple[_Op, bool, Any]:
    try:
        if op.record is not None:
            record = op.record
            return op, True, _isolated(conn, lambda: _write_records(conn, [record]))
        fn = op.fn
        assert fn is not None
        return op, True, _isolated(conn, lambda: fn(conn))
    except Exception as exc:
        return op, False, exc


def _settle(items: list[tuple[_Op, bool, Any]]) -> None:
    for op, ok, value in items:
        try:
            committed = op.committed
            if committed is not None:
                committed(None if ok else value)
            elif op.done is not None:
                op.done(ok, value)
        except Exception:
            log.exception("write completion callback failed")


def _committed(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


def _resolve(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _sim(row: Sequence[Any]) -> Sim:
    return Sim(
        iccid=row[0], imsi=row[1], ip=row[2], imei=row[3], label=row[4],
        status=SimStatus(row[5]), org=row[6], created_ms=row[7], updated_ms=row[8],
        imei_lock=bool(row[9]),
    )


_SIM_COLS = "iccid, imsi, ip, imei, label, status, org, created_ms, updated_ms, imei_lock"
_LOG_COLS = (
    "id, org, timestamp_ms, type, category, message, description, trace_id, iccid, imsi, ip"
)


def _log_row(e: AdminLog) -> tuple[Any, ...]:
    return (
        e.id, e.org, e.timestamp_ms, e.type.value, e.category.value, e.message,
        e.description, e.trace_id, e.iccid, e.imsi, e.ip,
    )


def _event_row(e: Event) -> tuple[Any, ...]:
    history = e.payload.text if e.type is EventType.TELEMETRY_DATA and e.payload else None
    return (
        e.id, e.type.value, e.org, e.device.iccid if e.device else None,
        e.source.value if e.source else None, e.topic, e.received_ms, history, e.envelope_json(),
    )


def encode_token(values: list[Any]) -> str:
    """Opaque page token (base64url JSON); both adapters use the same encoding."""
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def decode_token(token: str, tiebreak: type[T]) -> tuple[int, T]:
    """Decode `encode_token([received_ms, tiebreak])`; anything else is a 400."""
    bad = BadRequest("invalid nextToken", [{"message": "invalid nextToken"}])
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad from exc
    if (
        not isinstance(data, list) or len(data) != 2
        or type(data[0]) is not int or type(data[1]) is not tiebreak
    ):
        raise bad
    return data[0], data[1]


def page_amount(total: int, page_size: int) -> int:
    return max(1, -(-total // page_size))


class SqliteStore:
    """Every storage port on one SQLite file (`<data-dir>/simwire.db`)."""

    name = "sqlite"

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self.db = SqliteDatabase(path, synchronous)
        self._loop: asyncio.AbstractEventLoop

    async def open(self) -> SqliteStore:
        """Open on the running loop; `submit` answers on this loop (no lookup per call)."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.db.open)
        return self

    async def close(self) -> None:
        await asyncio.to_thread(self.db.close)

    # -- SimRepository ---------------------------------------------------------------

    async def find_by_ip(self, ip: str) -> Sim | None:
        def q(c: sqlite3.Connection) -> Sim | None:
            row = c.execute(f"SELECT {_SIM_COLS} FROM sims WHERE ip = ?", (ip,)).fetchone()
            return _sim(row) if row else None

        return await self.db.read(q)

    async def get(self, iccid: str) -> Sim | None:
        def q(c: sqlite3.Connection) -> Sim | None:
            row = c.execute(f"SELECT {_SIM_COLS} FROM sims WHERE iccid = ?", (iccid,)).fetchone()
            return _sim(row) if row else None

        return await self.db.read(q)

    async def create(self, sim: Sim) -> None:
        def w(c: sqlite3.Connection) -> None:
            try:
                c.execute(
                    f"INSERT INTO sims ({_SIM_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (sim.iccid, sim.imsi, sim.ip, sim.imei, sim.label, sim.status.value,
                     sim.org, sim.created_ms, sim.updated_ms, int(sim.imei_lock)),
                )
            except sqlite3.IntegrityError as exc:
                raise _sim_conflict(exc, sim.iccid, sim.ip) from exc

        await self.db.write(w)

    async def update(self, iccid: str, changes: SimChanges, now_ms: int) -> Sim | None:
        if changes.clear - {"imei", "label"}:
            raise ValueError(f"only imei and label can be cleared, not {sorted(changes.clear)}")
        sets: list[str] = []
        args: list[Any] = []
        for col in ("imsi", "ip", "imei", "label", "status", "imei_lock"):
            val = getattr(changes, col)
            if val is not None:
                sets.append(f"{col} = ?")
                args.append(int(val) if isinstance(val, bool) else val)
            elif col in changes.clear:
                sets.append(f"{col} = NULL")
        sets.append("updated_ms = ?")
        args.append(now_ms)

        def w(c: sqlite3.Connection) -> Sim | None:
            try:
                c.execute(f"UPDATE sims SET {', '.join(sets)} WHERE iccid = ?", (*args, iccid))
            except sqlite3.IntegrityError as exc:
                raise _sim_conflict(exc, iccid, changes.ip or "") from exc
            row = c.execute(f"SELECT {_SIM_COLS} FROM sims WHERE iccid = ?", (iccid,)).fetchone()
            return _sim(row) if row else None

        return await self.db.write(w)

    async def delete(self, iccid: str) -> bool:
        def w(c: sqlite3.Connection) -> bool:
            c.execute("DELETE FROM psks WHERE iccid = ?", (iccid,))  # keys go with the SIM
            return c.execute("DELETE FROM sims WHERE iccid = ?", (iccid,)).rowcount > 0

        return await self.db.write(w)

    async def list(self, org: str, page: int, page_size: int) -> Page[Sim]:
        def q(c: sqlite3.Connection) -> Page[Sim]:
            total = c.execute("SELECT count(*) FROM sims WHERE org = ?", (org,)).fetchone()[0]
            rows = c.execute(
                f"SELECT {_SIM_COLS} FROM sims WHERE org = ? ORDER BY iccid LIMIT ? OFFSET ?",
                (org, page_size, (page - 1) * page_size),
            ).fetchall()
            return Page([_sim(r) for r in rows], page, page_amount(total, page_size))

        return await self.db.read(q)

    # -- IngestStore -------------------------------------------------------------------

    def submit(self, record: IngestRecord, done: Callable[[BaseException | None], None]) -> None:
        self.db.submit(record, done, self._loop)

    async def append(self, record: IngestRecord) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.db.submit(record, partial(_committed, fut), loop)
        await fut

    # -- HistoryRepository ---------------------------------------------------------------

    async def history(self, query: HistoryQuery) -> HistoryPage:
        def q(c: sqlite3.Connection) -> HistoryPage:
            sql = (
                "SELECT iccid, received_ms, protocol, history, topic, seq FROM events "
                "WHERE type = 'TELEMETRY_DATA' AND iccid = ? AND received_ms >= ? "
            )
            args: list[Any] = [query.iccid, query.start_ms]
            if query.token:
                # a row value, so the index range starts at the token (an OR of the two
                # conditions would walk every newer entry first: O(pages read so far))
                t_ms, t_seq = decode_token(query.token, int)
                sql += "AND (received_ms, seq) < (?, ?) "
                args += [t_ms, t_seq]
            sql += "AND received_ms <= ? "
            args.append(query.end_ms)
            if query.protocol is not None:
                sql += "AND protocol = ? "
                args.append(query.protocol.value)
            sql += "ORDER BY received_ms DESC, seq DESC LIMIT ?"
            args.append(query.page_size + 1)
            rows = c.execute(sql, args).fetchall()
            more = len(rows) > query.page_size
            rows = rows[: query.page_size]
            items = [
                HistoryItem(r[0], r[1], Protocol(r[2]), r[3], r[4]) for r in rows
            ]
            token = encode_token([rows[-1][1], rows[-1][5]]) if more else None
            return HistoryPage(items, token)

        return await self.db.read(q)

    async def purge(self, before_ms: int) -> int:
        """Walk the oldest rows by rowid (insertion order, which is time order but for
        clock steps) in chunks and delete those older than `before_ms`; stop at the first
        chunk that starts with a young row. No time index is kept just for this: a row
        inserted after a backward clock step is purged once the rows before it are."""
        total = 0
        for table, col in (("events", "received_ms"), ("admin_logs", "timestamp_ms")):
            while True:
                def w(c: sqlite3.Connection, table: str = table, col: str = col) -> int:
                    rows = c.execute(
                        f"SELECT seq, {col} FROM {table} ORDER BY seq LIMIT ?", (PURGE_CHUNK,)
                    ).fetchall()
                    if not rows or rows[0][1] >= before_ms:
                        return 0
                    old = [(seq,) for seq, ms in rows if ms < before_ms]
                    c.executemany(f"DELETE FROM {table} WHERE seq = ?", old)
                    if table == "events":
                        _expire_outbox(c, old[0][0], old[-1][0])
                    return len(old)

                n = await self.db.write(w)
                total += n
                if n == 0:
                    break
        return total

    # -- DeviceRepository ----------------------------------------------------------------

    async def list_devices(self, query: DeviceQuery) -> Page[Device]:
        order = ", ".join(f"{f} {'DESC' if desc else 'ASC'}" for f, desc in query.sort)

        def q(c: sqlite3.Connection) -> Page[Device]:
            where, args = "org = ?", [query.org]
            if query.iccid is not None:
                where += " AND iccid = ?"
                args.append(query.iccid)
            total = c.execute(f"SELECT count(*) FROM devices WHERE {where}", args).fetchone()[0]
            rows = c.execute(
                f"SELECT iccid, imsi, ip, org, first_seen_ms FROM devices WHERE {where} "
                f"ORDER BY {order} LIMIT ? OFFSET ?",
                (*args, query.page_size, (query.page - 1) * query.page_size),
            ).fetchall()
            return Page([Device(*r) for r in rows], query.page,
                        page_amount(total, query.page_size))

        return await self.db.read(q)

    async def get_device(self, iccid: str) -> Device | None:
        def q(c: sqlite3.Connection) -> Device | None:
            row = c.execute(
                "SELECT iccid, imsi, ip, org, first_seen_ms FROM devices WHERE iccid = ?",
                (iccid,),
            ).fetchone()
            return Device(*row) if row else None

        return await self.db.read(q)

    async def is_registered(self, iccid: str) -> bool:
        return await self.get_device(iccid) is not None

    async def get_state(self, iccid: str, protocol: Protocol) -> DeviceState | None:
        def q(c: sqlite3.Connection) -> DeviceState | None:
            row = c.execute(
                "SELECT payload, topic, updated_ms FROM device_state "
                "WHERE iccid = ? AND protocol = ?", (iccid, protocol.value),
            ).fetchone()
            return DeviceState(iccid, protocol, row[0], row[1], row[2]) if row else None

        return await self.db.read(q)

    # -- AdminLogRepository ----------------------------------------------------------------

    async def append_logs(self, logs: Sequence[AdminLog]) -> None:
        rows = [_log_row(e) for e in logs]

        def w(c: sqlite3.Connection) -> None:
            c.executemany(f"INSERT INTO admin_logs ({_LOG_COLS}) VALUES "
                          "(?,?,?,?,?,?,?,?,?,?,?)", rows)

        await self.db.write(w)

    async def list_logs(self, query: AdminLogQuery) -> Page[AdminLog]:
        where: list[str] = ["org = ?"]
        args: list[Any] = [query.org]
        for col, val in (("iccid", query.iccid), ("type", query.type),
                         ("category", query.category)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if query.start_ms is not None:
            where.append("timestamp_ms >= ?")
            args.append(query.start_ms)
        if query.end_ms is not None:
            where.append("timestamp_ms <= ?")
            args.append(query.end_ms)
        cond = " AND ".join(where)

        def q(c: sqlite3.Connection) -> Page[AdminLog]:
            total = c.execute(f"SELECT count(*) FROM admin_logs WHERE {cond}", args).fetchone()[0]
            rows = c.execute(
                f"SELECT {_LOG_COLS} FROM admin_logs WHERE {cond} "
                "ORDER BY timestamp_ms DESC, seq DESC LIMIT ? OFFSET ?",
                (*args, query.page_size, (query.page - 1) * query.page_size),
            ).fetchall()
            items = [
                AdminLog(r[0], r[2], r[1], LogType(r[3]), LogCategory(r[4]), r[5], r[6],
                         r[7], r[8], r[9], r[10])
                for r in rows
            ]
            return Page(items, query.page, page_amount(total, query.page_size))

        return await self.db.read(q)

    # -- IntegrationRepository -----------------------------------------------------------

    async def create_integration(self, integration: Integration) -> None:
        i = integration

        def w(c: sqlite3.Connection) -> None:
            try:
                c.execute(
                    "INSERT INTO integrations VALUES (?,?,?,?,?,?,?,?)",
                    (i.id, i.org, i.created_ms, i.updated_ms, i.state.value, i.error,
                     i.first_delivery_ms, json.dumps(i.config_doc())),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"integration {i.id} exists") from exc
            _subscribe(c, i)

        await self.db.write(w)

    async def get_integration(self, integration_id: str) -> Integration | None:
        def q(c: sqlite3.Connection) -> Integration | None:
            row = c.execute(f"SELECT {_INTEGRATION_COLS} FROM integrations WHERE id = ?",
                            (integration_id,)).fetchone()
            return _integration(row) if row else None

        return await self.db.read(q)

    async def list_integrations(self, org: str, page: int, page_size: int) -> Page[Integration]:
        def q(c: sqlite3.Connection) -> Page[Integration]:
            total = c.execute("SELECT count(*) FROM integrations WHERE org = ?",
                              (org,)).fetchone()[0]
            rows = c.execute(
                f"SELECT {_INTEGRATION_COLS} FROM integrations WHERE org = ? "
                "ORDER BY created_ms, id LIMIT ? OFFSET ?",
                (org, page_size, (page - 1) * page_size),
            ).fetchall()
            return Page([_integration(r) for r in rows], page, page_amount(total, page_size))

        return await self.db.read(q)

    async def all_integrations(self) -> builtins.list[Integration]:
        def q(c: sqlite3.Connection) -> builtins.list[Integration]:
            rows = c.execute(f"SELECT {_INTEGRATION_COLS} FROM integrations "
                             "ORDER BY created_ms, id").fetchall()
            return [_integration(r) for r in rows]

        return await self.db.read(q)

    async def update_integration(self, integration: Integration) -> Integration | None:
        i = integration

        def w(c: sqlite3.Connection) -> Integration | None:
            if not c.execute(
                "UPDATE integrations SET config = ?, updated_ms = ? WHERE id = ?",
                (json.dumps(i.config_doc()), i.updated_ms, i.id),
            ).rowcount:
                return None
            c.execute("DELETE FROM subscriptions WHERE integration = ?", (i.id,))
            _subscribe(c, i)
            row = c.execute(f"SELECT {_INTEGRATION_COLS} FROM integrations WHERE id = ?",
                            (i.id,)).fetchone()
            return _integration(row)

        return await self.db.write(w)

    async def set_integration_status(
        self, integration_id: str, state: IntegrationState, error: str | None,
        delivered_ms: int | None = None,
    ) -> Integration | None:
        def w(c: sqlite3.Connection) -> Integration | None:
            c.execute(
                "UPDATE integrations SET state = ?, error = ?, "
                "first_delivery_ms = coalesce(first_delivery_ms, ?) WHERE id = ?",
                (state.value, error, delivered_ms, integration_id),
            )
            row = c.execute(f"SELECT {_INTEGRATION_COLS} FROM integrations WHERE id = ?",
                            (integration_id,)).fetchone()
            return _integration(row) if row else None

        return await self.db.write(w)

    async def delete_integration(self, integration_id: str) -> bool:
        def w(c: sqlite3.Connection) -> bool:
            c.execute("DELETE FROM subscriptions WHERE integration = ?", (integration_id,))
            c.execute("DELETE FROM outbox WHERE integration = ?", (integration_id,))
            return c.execute("DELETE FROM integrations WHERE id = ?",
                             (integration_id,)).rowcount > 0

        return await self.db.write(w)

    # -- Outbox --------------------------------------------------------------------------

    async def outbox_fetch(self, integration_id: str, limit: int) -> builtins.list[OutboxItem]:
        def q(c: sqlite3.Connection) -> builtins.list[OutboxItem]:
            rows = c.execute(
                "SELECT o.seq, e.id, e.type, e.iccid, e.protocol, e.topic, e.received_ms, "
                "e.envelope "
                "FROM outbox o JOIN events e ON e.seq = o.seq WHERE o.integration = ? "
                "ORDER BY o.seq LIMIT ?", (integration_id, limit),
            ).fetchall()
            return [OutboxItem(*r) for r in rows]

        return await self.db.read(q)

    async def outbox_ack(self, integration_id: str, keys: Sequence[Any]) -> None:
        seqs = [int(k) for k in keys]

        def w(c: sqlite3.Connection) -> None:
            for i in range(0, len(seqs), ROWS_PER_STATEMENT):
                chunk = seqs[i : i + ROWS_PER_STATEMENT]
                c.execute(
                    f"DELETE FROM outbox WHERE integration = ? AND seq IN "
                    f"({','.join('?' * len(chunk))})", (integration_id, *chunk),
                )

        if seqs:
            await self.db.write(w)

    async def outbox_depth(self, integration_id: str) -> int:
        return int(await self.db.read(lambda c: c.execute(
            "SELECT count(*) FROM outbox WHERE integration = ?", (integration_id,)
        ).fetchone()[0]))

    def on_outbox(self, callback: Callable[[], None]) -> None:
        self.db.outbox_listener = (self._loop, callback)

    # -- TemplateRepository --------------------------------------------------------------
    # `template_claims` holds one row per (org, protocol) an ACTIVE template translates; its
    # primary key is the one-ACTIVE-template-per-protocol invariant, written in the same
    # transaction as the template row.

    async def create_template(self, template: Template) -> None:
        t = template

        def w(c: sqlite3.Connection) -> None:
            try:
                c.execute(f"INSERT INTO templates ({_TEMPLATE_COLS}) VALUES (?,?,?,?,?,?,?,?)",
                          _template_row(t))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"template {t.id} exists") from exc
            _claim(c, t)

        await self.db.write(w)

    async def get_template(self, template_id: str) -> Template | None:
        def q(c: sqlite3.Connection) -> Template | None:
            row = c.execute(f"SELECT {_TEMPLATE_COLS} FROM templates WHERE id = ?",
                            (template_id,)).fetchone()
            return _template(row) if row else None

        return await self.db.read(q)

    async def list_templates(self, org: str) -> builtins.list[Template]:
        def q(c: sqlite3.Connection) -> builtins.list[Template]:
            rows = c.execute(f"SELECT {_TEMPLATE_COLS} FROM templates WHERE org = ? "
                             "ORDER BY created_ms, id", (org,)).fetchall()
            return [_template(r) for r in rows]

        return await self.db.read(q)

    async def update_template(self, template: Template) -> Template | None:
        t = template

        def w(c: sqlite3.Connection) -> Template | None:
            if not c.execute(
                "UPDATE templates SET org = ?, name = ?, template = ?, protocols = ?, "
                "status = ?, created_ms = ?, updated_ms = ? WHERE id = ?",
                (*_template_row(t)[1:], t.id),
            ).rowcount:
                return None
            c.execute("DELETE FROM template_claims WHERE template = ?", (t.id,))
            _claim(c, t)
            row = c.execute(f"SELECT {_TEMPLATE_COLS} FROM templates WHERE id = ?",
                            (t.id,)).fetchone()
            return _template(row)

        return await self.db.write(w)

    async def delete_template(self, template_id: str) -> bool:
        def w(c: sqlite3.Connection) -> bool:
            c.execute("DELETE FROM template_claims WHERE template = ?", (template_id,))
            return c.execute("DELETE FROM templates WHERE id = ?",
                             (template_id,)).rowcount > 0

        return await self.db.write(w)

    async def active_templates(self) -> builtins.list[Template]:
        def q(c: sqlite3.Connection) -> builtins.list[Template]:
            rows = c.execute(f"SELECT {_TEMPLATE_COLS} FROM templates WHERE status = ? "
                             "ORDER BY org, created_ms, id",
                             (TemplateStatus.ACTIVE.value,)).fetchall()
            return [_template(r) for r in rows]

        return await self.db.read(q)

    # -- SavingsRepository ---------------------------------------------------------------

    async def savings(
        self, org: str, first_day: int, last_day: int,
        protocol: Protocol | None = None, iccid: str | None = None,
    ) -> SavingsTotals:
        sql = ("SELECT count(*), sum(messages), sum(original_bytes), sum(optimized_bytes) "
               "FROM savings WHERE org = ? AND day BETWEEN ? AND ?")
        args: builtins.list[Any] = [org, first_day, last_day]
        if protocol is not None:
            sql += " AND protocol = ?"
            args.append(protocol.value)
        if iccid is not None:
            sql += " AND iccid = ?"
            args.append(iccid)

        def q(c: sqlite3.Connection) -> SavingsTotals:
            n, messages, original, optimized = c.execute(sql, args).fetchone()
            return SavingsTotals(messages, original, optimized) if n else SavingsTotals()

        return await self.db.read(q)

    async def purge_savings(self, before_day: int) -> int:
        return await self.db.write(lambda c: c.execute(
            "DELETE FROM savings WHERE day < ?", (before_day,)).rowcount)

    # -- PskRepository -------------------------------------------------------------------
    # `sealed` is opaque (encrypted by the authenticator): stored as a BLOB, never logged.
    # The compare-and-set writes are single statements run by the writer thread inside its
    # BEGIN IMMEDIATE transaction: atomic across threads and processes.

    async def get_psk(self, iccid: str, protocol: Protocol) -> StoredPsk | None:
        def q(c: sqlite3.Connection) -> StoredPsk | None:
            row = c.execute(f"SELECT {_PSK_COLS} FROM psks WHERE iccid = ? AND protocol = ?",
                            (iccid, protocol.value)).fetchone()
            return _psk(row) if row else None

        return await self.db.read(q)

    async def put_psks(self, psks: Sequence[StoredPsk]) -> None:
        rows = [_psk_row(p) for p in psks]

        def w(c: sqlite3.Connection) -> None:  # of one key given twice, the later row wins
            _insert_rows(c, f"INSERT OR REPLACE INTO psks ({_PSK_COLS}) VALUES ", rows)

        if rows:
            await self.db.write(w)

    async def swap_psk(self, psk: StoredPsk, expected_updated_ms: int | None) -> bool:
        row = _psk_row(psk)

        def w(c: sqlite3.Connection) -> bool:
            if expected_updated_ms is None:
                return c.execute(
                    f"INSERT INTO psks ({_PSK_COLS}) VALUES (?,?,?,?,?,?,?,?) "
                    "ON CONFLICT (iccid, protocol) DO NOTHING", row).rowcount == 1
            return c.execute(
                "UPDATE psks SET sealed = ?, format = ?, origin = ?, created_ms = ?, "
                "updated_ms = ?, bootstrapped_ms = ? "
                "WHERE iccid = ? AND protocol = ? AND updated_ms = ?",
                (*row[2:], *row[:2], expected_updated_ms)).rowcount == 1

        return await self.db.write(w)

    async def mark_bootstrapped(self, iccid: str, protocol: Protocol, at_ms: int,
                                expected_updated_ms: int) -> None:
        def w(c: sqlite3.Connection) -> None:
            c.execute("UPDATE psks SET bootstrapped_ms = ? "
                      "WHERE iccid = ? AND protocol = ? AND updated_ms = ?",
                      (at_ms, iccid, protocol.value, expected_updated_ms))

        await self.db.write(w)

    # -- PskJobRepository ----------------------------------------------------------------

    async def create_job(self, job: PskJob) -> None:
        def w(c: sqlite3.Connection) -> None:
            try:
                c.execute(f"INSERT INTO psk_jobs ({_JOB_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                          _job_row(job))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"job {job.id} exists") from exc

        await self.db.write(w)

    async def update_job(self, job: PskJob) -> None:
        def w(c: sqlite3.Connection) -> None:
            c.execute("UPDATE psk_jobs SET status = ?, done = ?, failed = ?, errors = ?, "
                      "updated_ms = ? WHERE id = ?",
                      (job.status.value, job.done, job.failed, json.dumps(list(job.errors)),
                       job.updated_ms, job.id))

        await self.db.write(w)

    async def get_job(self, job_id: str) -> PskJob | None:
        def q(c: sqlite3.Connection) -> PskJob | None:
            row = c.execute(f"SELECT {_JOB_COLS} FROM psk_jobs WHERE id = ?",
                            (job_id,)).fetchone()
            return _job(row) if row else None

        return await self.db.read(q)

    async def list_jobs(self, org: str, since_ms: int, page: int, page_size: int
                        ) -> Page[PskJob]:
        """Newest first: created_ms, then id, both descending."""
        def q(c: sqlite3.Connection) -> Page[PskJob]:
            total = c.execute("SELECT count(*) FROM psk_jobs WHERE org = ? AND created_ms >= ?",
                              (org, since_ms)).fetchone()[0]
            rows = c.execute(
                f"SELECT {_JOB_COLS} FROM psk_jobs WHERE org = ? AND created_ms >= ? "
                "ORDER BY created_ms DESC, id DESC LIMIT ? OFFSET ?",
                (org, since_ms, page_size, max(0, (page - 1) * page_size)),
            ).fetchall()
            return Page([_job(r) for r in rows], page, page_amount(total, page_size))

        return await self.db.read(q)

    async def interrupted_jobs(self) -> builtins.list[PskJob]:
        """Every organisation's IN_PROGRESS jobs, oldest first."""
        def q(c: sqlite3.Connection) -> builtins.list[PskJob]:
            # the status as a literal, so SQLite can use the partial index psk_jobs_running
            rows = c.execute(f"SELECT {_JOB_COLS} FROM psk_jobs "
                             "WHERE status = 'IN_PROGRESS' ORDER BY created_ms, id").fetchall()
            return [_job(r) for r in rows]

        return await self.db.read(q)

    # -- Lwm2mRepository -----------------------------------------------------------------
    # `lwm2m_registrations.iccid` is UNIQUE: one registration per client. `put_registration`
    # deletes the ICCID's other registration and its observations and writes the new row in
    # one write (one transaction of the writer thread), so no reader sees two or none.

    async def put_registration(self, reg: Lwm2mRegistration) -> None:
        row = _registration_row(reg)

        def w(c: sqlite3.Connection) -> None:
            replaced = [r[0] for r in c.execute(
                "SELECT id FROM lwm2m_registrations WHERE iccid = ? AND id != ?",
                (reg.iccid, reg.id))]
            for old in replaced:
                c.execute("DELETE FROM lwm2m_observations WHERE registration = ?", (old,))
                c.execute("DELETE FROM lwm2m_registrations WHERE id = ?", (old,))
            c.execute(f"INSERT OR REPLACE INTO lwm2m_registrations ({_REGISTRATION_COLS}) "
                      "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row)

        await self.db.write(w)

    async def get_registration(self, registration_id: str) -> Lwm2mRegistration | None:
        def q(c: sqlite3.Connection) -> Lwm2mRegistration | None:
            row = c.execute(f"SELECT {_REGISTRATION_COLS} FROM lwm2m_registrations "
                            "WHERE id = ?", (registration_id,)).fetchone()
            return _registration(row) if row else None

        return await self.db.read(q)

    async def registration_of(self, iccid: str) -> Lwm2mRegistration | None:
        def q(c: sqlite3.Connection) -> Lwm2mRegistration | None:
            row = c.execute(f"SELECT {_REGISTRATION_COLS} FROM lwm2m_registrations "
                            "WHERE iccid = ?", (iccid,)).fetchone()
            return _registration(row) if row else None

        return await self.db.read(q)

    async def delete_registration(self, registration_id: str) -> bool:
        def w(c: sqlite3.Connection) -> bool:
            c.execute("DELETE FROM lwm2m_observations WHERE registration = ?",
                      (registration_id,))
            return c.execute("DELETE FROM lwm2m_registrations WHERE id = ?",
                             (registration_id,)).rowcount > 0

        return await self.db.write(w)

    async def all_registrations(self) -> builtins.list[Lwm2mRegistration]:
        """Every organisation's, by ICCID."""
        def q(c: sqlite3.Connection) -> builtins.list[Lwm2mRegistration]:
            rows = c.execute(f"SELECT {_REGISTRATION_COLS} FROM lwm2m_registrations "
                             "ORDER BY iccid").fetchall()
            return [_registration(r) for r in rows]

        return await self.db.read(q)

    async def put_observation(self, obs: Lwm2mObservation) -> None:
        row = _observation_row(obs)

        def w(c: sqlite3.Connection) -> None:
            c.execute(f"INSERT OR REPLACE INTO lwm2m_observations ({_OBSERVATION_COLS}) "
                      "VALUES (?,?,?,?,?,?)", row)

        await self.db.write(w)

    async def delete_observation(self, token: bytes) -> bool:
        def w(c: sqlite3.Connection) -> bool:
            return c.execute("DELETE FROM lwm2m_observations WHERE token = ?",
                             (bytes(token),)).rowcount > 0

        return await self.db.write(w)

    async def observations_of(self, registration_id: str) -> builtins.list[Lwm2mObservation]:
        """Oldest first; ties by token, shorter first, then bytewise (MongoDB's order of
        binary values, so both adapters agree)."""
        def q(c: sqlite3.Connection) -> builtins.list[Lwm2mObservation]:
            rows = c.execute(f"SELECT {_OBSERVATION_COLS} FROM lwm2m_observations "
                             "WHERE registration = ? ORDER BY created_ms, length(token), token",
                             (registration_id,)).fetchall()
            return [_observation(r) for r in rows]

        return await self.db.read(q)

    # -- DownlinkRepository --------------------------------------------------------------
    # The limit of SCHEDULED requests per device is a count and an insert in one write:
    # the writer thread runs it inside its BEGIN IMMEDIATE transaction, and SQLite lets one
    # writer at a time hold the file, so no other thread or process inserts in between.

    async def create_downlink(self, req: DownlinkRequest, max_scheduled: int) -> bool:
        row = _downlink_row(req)
        scheduled = req.status is DownlinkStatus.SCHEDULED

        def w(c: sqlite3.Connection) -> bool:
            # the status as a literal, so SQLite can use the partial index downlinks_scheduled
            if scheduled and c.execute(
                "SELECT count(*) FROM downlinks WHERE iccid = ? AND status = 'SCHEDULED'",
                (req.iccid,),
            ).fetchone()[0] >= max_scheduled:
                return False
            try:
                c.execute(f"INSERT INTO downlinks ({_DOWNLINK_COLS}) "
                          "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"downlink {req.id} exists") from exc
            return True

        return await self.db.write(w)

    async def devices_with_scheduled(self) -> set[str]:
        def q(c: sqlite3.Connection) -> set[str]:
            return {r[0] for r in c.execute(
                "SELECT DISTINCT iccid FROM downlinks WHERE status = 'SCHEDULED'")}

        return await self.db.read(q)

    async def update_downlink(self, req: DownlinkRequest,
                              expected: DownlinkStatus | None = None) -> bool:
        def w(c: sqlite3.Connection) -> bool:
            sql = ("UPDATE downlinks SET status = ?, attempts_left = ?, result_data = ?, "
                   "error = ?, updated_ms = ? WHERE id = ?")
            args: list[Any] = [req.status.value, req.attempts_left,
                               _json_or_none(req.result_data), req.error, req.updated_ms,
                               req.id]
            if expected is not None:
                sql += " AND status = ?"
                args.append(expected.value)
            return c.execute(sql, args).rowcount > 0

        return await self.db.write(w)

    async def get_downlink(self, request_id: str) -> DownlinkRequest | None:
        def q(c: sqlite3.Connection) -> DownlinkRequest | None:
            row = c.execute(f"SELECT {_DOWNLINK_COLS} FROM downlinks WHERE id = ?",
                            (request_id,)).fetchone()
            return _downlink(row) if row else None

        return await self.db.read(q)

    async def list_downlinks(self, query: DownlinkQuery) -> Page[DownlinkRequest]:
        """Newest first: created_ms, then id, both descending."""
        where, args = "org = ?", [query.org]
        if query.iccid is not None:
            where += " AND iccid = ?"
            args.append(query.iccid)
        if query.status is not None:
            where += " AND status = ?"
            args.append(query.status.value)

        def q(c: sqlite3.Connection) -> Page[DownlinkRequest]:
            total = c.execute(f"SELECT count(*) FROM downlinks WHERE {where}",
                              args).fetchone()[0]
            rows = c.execute(
                f"SELECT {_DOWNLINK_COLS} FROM downlinks WHERE {where} "
                "ORDER BY created_ms DESC, id DESC LIMIT ? OFFSET ?",
                (*args, query.page_size, max(0, (query.page - 1) * query.page_size)),
            ).fetchall()
            return Page([_downlink(r) for r in rows], query.page,
                        page_amount(total, query.page_size))

        return await self.db.read(q)

    async def scheduled_downlinks(self, iccid: str) -> builtins.list[DownlinkRequest]:
        """Oldest first: created_ms, then id."""
        def q(c: sqlite3.Connection) -> builtins.list[DownlinkRequest]:
            rows = c.execute(f"SELECT {_DOWNLINK_COLS} FROM downlinks "
                             "WHERE iccid = ? AND status = 'SCHEDULED' ORDER BY created_ms, id",
                             (iccid,)).fetchall()
            return [_downlink(r) for r in rows]

        return await self.db.read(q)

    async def expire_downlinks(self, now_ms: int) -> int:
        def w(c: sqlite3.Connection) -> int:
            return c.execute(
                "UPDATE downlinks SET status = 'FAILED', error = 'expired', updated_ms = ? "
                "WHERE status = 'SCHEDULED' AND expires_ms <= ?", (now_ms, now_ms)).rowcount

        return await self.db.write(w)

    async def purge_downlinks(self, before_ms: int) -> int:
        return await self.db.write(lambda c: c.execute(
            "DELETE FROM downlinks WHERE created_ms < ?", (before_ms,)).rowcount)

    # -- ClientRepository ----------------------------------------------------------------

    async def get_client(self, client_id: str) -> ApiClient | None:
        def q(c: sqlite3.Connection) -> ApiClient | None:
            row = c.execute(
                "SELECT client_id, secret_hash, role, org, created_ms FROM api_clients "
                "WHERE client_id = ?", (client_id,),
            ).fetchone()
            return ApiClient(*row) if row else None

        return await self.db.read(q)

    async def create_client(self, client: ApiClient) -> None:
        def w(c: sqlite3.Connection) -> None:
            try:
                c.execute(
                    "INSERT INTO api_clients VALUES (?,?,?,?,?)",
                    (client.client_id, client.secret_hash, client.role, client.org,
                     client.created_ms),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"client {client.client_id} exists") from exc

        await self.db.write(w)

    async def list_clients(self, org: str) -> builtins.list[ApiClient]:
        def q(c: sqlite3.Connection) -> builtins.list[ApiClient]:
            rows = c.execute(
                "SELECT client_id, secret_hash, role, org, created_ms FROM api_clients "
                "WHERE org = ? ORDER BY client_id", (org,),
            ).fetchall()
            return [ApiClient(*r) for r in rows]

        return await self.db.read(q)

    async def delete_client(self, client_id: str) -> bool:
        def w(c: sqlite3.Connection) -> bool:
            return c.execute("DELETE FROM api_clients WHERE client_id = ?",
                             (client_id,)).rowcount > 0

        return await self.db.write(w)

    async def count_clients(self) -> int:
        return int(await self.db.read(
            lambda c: c.execute("SELECT count(*) FROM api_clients").fetchone()[0]))

    async def get_or_create_meta(self, key: str, value: str) -> str:
        def w(c: sqlite3.Connection) -> str:
            c.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
            return str(c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

        return await self.db.write(w)

    # -- LeaseRepository -------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        def w(c: sqlite3.Connection) -> bool:
            c.execute(
                "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "holder = excluded.holder, expires_ms = excluded.expires_ms "
                "WHERE leases.holder = excluded.holder OR leases.expires_ms <= ?",
                (name, holder, now_ms + ttl_ms, now_ms))
            row = c.execute("SELECT holder FROM leases WHERE name = ?", (name,)).fetchone()
            return bool(row[0] == holder)

        return await self.db.write(w)

    async def release_lease(self, name: str, holder: str) -> None:
        await self.db.write(lambda c: c.execute(
            "DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder)))


def _write_records(c: sqlite3.Connection, records: list[IngestRecord]) -> int:
    """All records of a commit in a few multi-row statements (the group-commit fast path);
    returns the number of outbox items queued.

    The outbox is filled by one INSERT ... SELECT joining the new events with the
    subscriptions table, in this transaction: whatever the integrations are at commit time
    is what the events are queued for, with any number of writer processes (the same read
    that finds the last event before the batch tells whether there is any subscription
    at all: if not, the join is skipped). The records' savings are summed per (org, day,
    protocol, ICCID) first, then upserted once per key.

    Few statements matter more than few rows: the sqlite3 module gives up the GIL around
    every step, and taking it back competes with the event loop thread, so `executemany`
    (one step per row) stalls under load while one multi-row INSERT does not."""
    events: list[tuple[Any, ...]] = []
    states: dict[tuple[str, str], tuple[Any, ...]] = {}
    logs: list[tuple[Any, ...]] = []
    savings: dict[tuple[str, int, str, str], list[int]] = {}
    for record in records:
        reg = record.registration
        if reg is not None:
            d = reg.device
            if c.execute(
                "INSERT OR IGNORE INTO devices VALUES (?,?,?,?,?)",
                (d.iccid, d.org, d.imsi, d.ip, d.first_seen_ms),
            ).rowcount:
                events.append(_event_row(reg.event))
                logs.append(_log_row(reg.log))
        events += [_event_row(e) for e in record.events]
        st = record.state
        if st is not None:
            key = (st.iccid, st.protocol.value)
            kept = states.get(key)
            if kept is None or st.updated_ms >= kept[4]:  # equal times: the later one wins
                states[key] = (st.iccid, st.protocol.value, st.payload, st.topic, st.updated_ms)
        if record.logs:
            logs += [_log_row(e) for e in record.logs]
        sv = record.saving
        if sv is not None:
            counts = savings.setdefault((sv.org, sv.day, sv.protocol.value, sv.iccid), [0, 0, 0])
            counts[0] += 1
            counts[1] += sv.original_bytes
            counts[2] += sv.optimized_bytes
    queued = 0
    if events:
        last, subscribed = c.execute(
            "SELECT max(seq), EXISTS (SELECT 1 FROM subscriptions) FROM events").fetchone()
        _insert_rows(c, "INSERT INTO events (id, type, org, iccid, protocol, topic, "
                        "received_ms, history, envelope) VALUES ", events)
        if subscribed:
            queued = c.execute(
                "INSERT INTO outbox (integration, seq) SELECT s.integration, e.seq FROM "
                "events e JOIN subscriptions s ON s.org = e.org AND s.type = e.type "
                "WHERE e.seq > ?", (last or 0,),
            ).rowcount
    _insert_rows(c, "INSERT INTO device_state VALUES ", list(states.values()),
                 " ON CONFLICT (iccid, protocol) DO UPDATE SET payload = excluded.payload, "
                 "topic = excluded.topic, updated_ms = excluded.updated_ms "
                 "WHERE excluded.updated_ms >= updated_ms")
    _insert_rows(c, f"INSERT INTO admin_logs ({_LOG_COLS}) VALUES ", logs)
    _insert_rows(c, "INSERT INTO savings VALUES ", [(*k, *v) for k, v in savings.items()],
                 " ON CONFLICT (org, day, protocol, iccid) DO UPDATE SET "
                 "messages = messages + excluded.messages, "
                 "original_bytes = original_bytes + excluded.original_bytes, "
                 "optimized_bytes = optimized_bytes + excluded.optimized_bytes")
    return queued


ROWS_PER_STATEMENT = 256


def _insert_rows(
    c: sqlite3.Connection, head: str, rows: list[tuple[Any, ...]], tail: str = ""
) -> None:
    """`head (?,..),(?,..)... tail` in chunks; statements are cached per row count."""
    if not rows:
        return
    group = "(" + ",".join("?" * len(rows[0])) + ")"
    for i in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[i : i + ROWS_PER_STATEMENT]
        c.execute(head + ",".join([group] * len(chunk)) + tail,
                  [v for row in chunk for v in row])


_INTEGRATION_COLS = "id, org, config, created_ms, updated_ms, state, error, first_delivery_ms"


def _integration(row: Sequence[Any]) -> Integration:
    return Integration.from_doc(row[0], row[1], json.loads(row[2]), *row[3:])


def _subscribe(c: sqlite3.Connection, i: Integration) -> None:
    c.executemany("INSERT OR IGNORE INTO subscriptions VALUES (?,?,?)",
                  [(i.org, t, i.id) for t in i.event_types])


_TEMPLATE_COLS = "id, org, name, template, protocols, status, created_ms, updated_ms"


def _template_row(t: Template) -> tuple[Any, ...]:
    return (t.id, t.org, t.name, t.template, json.dumps([p.value for p in t.protocols]),
            t.status.value, t.created_ms, t.updated_ms)


def _template(row: Sequence[Any]) -> Template:
    return Template(
        id=row[0], org=row[1], name=row[2], template=row[3],
        protocols=tuple(Protocol(p) for p in json.loads(row[4])),
        status=TemplateStatus(row[5]), created_ms=row[6], updated_ms=row[7],
    )


def _claim(c: sqlite3.Connection, t: Template) -> None:
    """Insert `t`'s claims; Conflict (undoing the operation) if another template holds one."""
    for p in dict.fromkeys(t.claims):
        try:
            c.execute("INSERT INTO template_claims VALUES (?,?,?)", (t.org, p.value, t.id))
        except sqlite3.IntegrityError as exc:
            other = c.execute("SELECT template FROM template_claims WHERE org = ? AND "
                              "protocol = ?", (t.org, p.value)).fetchone()
            raise Conflict(f"an ACTIVE template already translates {p.value}: "
                           f"{other[0] if other else '?'}") from exc


_PSK_COLS = ("iccid, protocol, sealed, format, origin, created_ms, updated_ms, "
             "bootstrapped_ms")


def _psk_row(p: StoredPsk) -> tuple[Any, ...]:
    return (p.iccid, p.protocol.value, bytes(p.sealed), p.format.value, p.origin.value,
            p.created_ms, p.updated_ms, p.bootstrapped_ms)


def _psk(row: Sequence[Any]) -> StoredPsk:
    return StoredPsk(
        iccid=row[0], protocol=Protocol(row[1]), sealed=bytes(row[2]),
        format=PskFormat(row[3]), origin=PskOrigin(row[4]), created_ms=row[5],
        updated_ms=row[6], bootstrapped_ms=row[7],
    )


_JOB_COLS = "id, org, created_ms, updated_ms, status, amount, done, failed, errors"


def _job_row(j: PskJob) -> tuple[Any, ...]:
    return (j.id, j.org, j.created_ms, j.updated_ms, j.status.value, j.amount, j.done,
            j.failed, json.dumps(list(j.errors)))


def _job(row: Sequence[Any]) -> PskJob:
    return PskJob(
        id=row[0], org=row[1], created_ms=row[2], updated_ms=row[3],
        status=PskJobStatus(row[4]), amount=row[5], done=row[6], failed=row[7],
        errors=tuple(json.loads(row[8])),
    )


_REGISTRATION_COLS = ("id, iccid, org, ip, port, secure, lifetime_s, version, binding, "
                      "queue_mode, links, registered_ms, updated_ms")


def _registration_row(r: Lwm2mRegistration) -> tuple[Any, ...]:
    return (r.id, r.iccid, r.org, r.ip, r.port, int(r.secure), r.lifetime_s, r.version,
            r.binding, int(r.queue_mode), r.links, r.registered_ms, r.updated_ms)


def _registration(row: Sequence[Any]) -> Lwm2mRegistration:
    return Lwm2mRegistration(
        id=row[0], iccid=row[1], org=row[2], ip=row[3], port=row[4], secure=bool(row[5]),
        lifetime_s=row[6], version=row[7], binding=row[8], queue_mode=bool(row[9]),
        links=row[10], registered_ms=row[11], updated_ms=row[12],
    )


_OBSERVATION_COLS = "token, iccid, registration, path, created_ms, content_format"


def _observation_row(o: Lwm2mObservation) -> tuple[Any, ...]:
    return (bytes(o.token), o.iccid, o.registration_id, o.path, o.created_ms,
            o.content_format)


def _observation(row: Sequence[Any]) -> Lwm2mObservation:
    return Lwm2mObservation(
        token=bytes(row[0]), iccid=row[1], registration_id=row[2], path=row[3],
        created_ms=row[4], content_format=row[5],
    )


_DOWNLINK_COLS = ("id, org, iccid, ip, protocol, mode, status, request_data, send_attempts, "
                  "attempts_left, created_ms, updated_ms, expires_ms, result_data, error")


def _json_or_none(data: dict[str, Any] | None) -> str | None:
    return None if data is None else json.dumps(data)


def _downlink_row(d: DownlinkRequest) -> tuple[Any, ...]:
    return (d.id, d.org, d.iccid, d.ip, d.protocol.value, d.mode.value, d.status.value,
            json.dumps(d.request_data), d.send_attempts, d.attempts_left, d.created_ms,
            d.updated_ms, d.expires_ms, _json_or_none(d.result_data), d.error)


def _downlink(row: Sequence[Any]) -> DownlinkRequest:
    return DownlinkRequest(
        id=row[0], org=row[1], iccid=row[2], ip=row[3], protocol=Protocol(row[4]),
        mode=DownlinkMode(row[5]), status=DownlinkStatus(row[6]),
        request_data=json.loads(row[7]), send_attempts=row[8], attempts_left=row[9],
        created_ms=row[10], updated_ms=row[11], expires_ms=row[12],
        result_data=None if row[13] is None else json.loads(row[13]), error=row[14],
    )


def _expire_outbox(c: sqlite3.Connection, first_seq: int, last_seq: int) -> None:
    """Purge: drop the outbox items whose event is gone (never delivered within retention)."""
    n = c.execute(
        "DELETE FROM outbox WHERE seq BETWEEN ? AND ? AND NOT EXISTS "
        "(SELECT 1 FROM events e WHERE e.seq = outbox.seq)", (first_seq, last_seq),
    ).rowcount
    if n:
        log.warning("retention purge dropped %d undelivered outbox items", n)


def _sim_conflict(exc: sqlite3.IntegrityError, iccid: str, ip: str) -> Conflict:
    if "sims.ip" in str(exc):
        return Conflict(f"a SIM with IP {ip} already exists")
    return Conflict(f"SIM {iccid} already exists")
