"""MongoDB adapter (PyMongo's `AsyncMongoClient`): the same ports as `SqliteStore`.

Collections (in the database named by the URL path, else the `database` argument, else
`simwire`):

- `sims`: `_id` = ICCID; unique index on `ip`, index `(org, _id)`.
- `events`: `_id` = an ObjectId that grows with every insert of this store (the history
  tiebreak); history index `(iccid, type, received_ms desc, _id desc, protocol)` (protocol
  last: a protocol filter is checked on the index keys, no document fetched), an index on
  `received_ms` for `purge`, and a TTL index on `expire_at` (= received + retention) so
  MongoDB also purges by itself.
- `devices`: `_id` = ICCID, index `(org, _id)`.
- `device_state`: `_id` = `"<iccid>|<protocol>"`.
- `admin_logs`: `_id` = a growing ObjectId (the list tiebreak); indexes
  `(org, timestamp_ms, _id)`, `(iccid, timestamp_ms, _id)`, `timestamp_ms`, TTL on `expire_at`.
- `api_clients`: `_id` = client id; `meta`: `_id` = key.
- `leases`: `_id` = lease name, `holder`, `expires_ms`.
- `integrations`: `_id` = integration id, index `(org, created_ms, _id)`.
- `outbox`: one document per (queued event, integration): `_id` = a growing ObjectId (the
  delivery order), `i` = integration id, the event's id, type, ICCID, source, topic and
  envelope; index `(i, _id)`, TTL on `expire_at` like the events. The flush that inserts
  the events inserts their outbox documents, for the subscriptions it knows: a cache of
  the integrations, reloaded when older than `SUBSCRIPTIONS_TTL_S` and at once after this
  store changed one (another process's new integration is seen within that time).
- `templates`: `_id` = template id, index `(org, created_ms, _id)`, index `status`. An
  ACTIVE template also carries `claims` (its protocols; absent otherwise), and the unique
  index `(org, claims)`, partial on ACTIVE documents that have `claims`, is the invariant
  "one ACTIVE template per organisation and protocol": a multikey unique index keys every
  element, so no two documents of an organisation share a claimed protocol, and the server
  checks it atomically with the insert/replace (also between processes). Empty claims are
  left out, not stored as `[]`, which a multikey index would key (as `undefined`) too.
- `savings`: one counter document per (org, UTC day, protocol, ICCID), `_id` =
  `"<org>|<day>|<protocol>|<iccid>"`; indexes `(org, day)` and `day`.
- `psks`: `_id` = `"<iccid>|<protocol>"`; `sealed` (BSON binary, opaque: encrypted by the
  authenticator, never logged). The compare-and-set of /bootstrap is one single-document
  write: an insert that fails on the `_id` (none expected) or a replace filtered on
  `updated_ms`.
- `psk_jobs`: `_id` = job id, `errors` an array; indexes `(org, created_ms, _id)`, `status`.
- `lwm2m_registrations`: `_id` = ICCID (a client has at most one registration: writing one
  is a single-document replace), unique index `id` (the `/rd/<id>` lookups).
- `lwm2m_observations`: `_id` = token (BSON binary), index
  `(registration_id, created_ms, _id)`.
- `downlinks`: `_id` = request id, `request_data`/`result_data` embedded documents; a
  request created SCHEDULED holds `slot` (0 .. max - 1) until it leaves SCHEDULED, and the
  unique index `(iccid, slot)`, partial on documents that have a slot, is the limit of
  SCHEDULED requests per device (see `create_downlink`); indexes `(org, created_ms, _id)`,
  `(iccid, status, created_ms, _id)`, `(status, expires_ms)`, `created_ms`.

SIMs written before `imei_lock` existed lack the field: they read as `imei_lock = False`.

`append` groups concurrent calls (group commit, like the SQLite writer): the records queued
while a flush is in flight are written by the next flush with one `bulk_write`/`insert_many`
per collection (the records' savings summed per counter, then one `$inc` upsert each);
every caller of a flush gets its outcome (a failure fails only that flush's
callers). MongoDB gives no multi-collection transaction here, so one uplink's writes are not
atomic: a flush that fails half-way may leave some of its documents written (the caller was
not acknowledged and the device retries, as with any failed write).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import (
    ASCENDING,
    DESCENDING,
    AsyncMongoClient,
    IndexModel,
    ReplaceOne,
    ReturnDocument,
    UpdateOne,
)
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError
from pymongo.write_concern import WriteConcern

from simwire.errors import BadRequest, Conflict
from simwire.model import (
    PSK_PROTOCOLS,
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
from simwire.storage.sqlite import decode_token, encode_token, page_amount

log = logging.getLogger("simwire.storage.mongodb")

Doc = dict[str, Any]
DEFAULT_DATABASE = "simwire"
DEFAULT_RETENTION_DAYS = 7
MAX_BATCH = 1024
SUBSCRIPTIONS_TTL_S = 1.0
DUPLICATE_KEY = 11000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TELEMETRY = EventType.TELEMETRY_DATA.value
_DEVICE_SORT = {"iccid": "_id", "imsi": "imsi", "ip": "ip"}
_OPTIONAL_SIM_FIELDS = frozenset({"imei", "label"})
_HISTORY_INDEX = "device_history"
"""The history query names its index: SecantusDB 0.7.0b3 (the test server) picks the same
index by itself but then drops the keys equal to the range's inclusive far bound when a
field follows the ranged one in the index (e.g. `received_ms >= start` misses the events at
exactly `start`); with a hint it scans correctly. On MongoDB the hint changes nothing."""
_DROPPED_INDEXES = (("events", "history"),)
"""(collection, index) an earlier version created and a new index replaced (`history`
lacked `protocol`): `open` drops them."""
_OUTBOX_INDEX = "integration"
_LOGS_BY_ORG_INDEX = "org"
_LOGS_BY_ICCID_INDEX = "iccid"
_CLAIMS_INDEX = "claims"
_SAVINGS_INDEX = "org"
_JOBS_INDEX = "org"
_REGISTRATION_ID_INDEX = "id"
_SLOT_INDEX = "slot"
MAX_SLOT_ATTEMPTS = 100
"""`create_downlink`: each failed try means another request took the slot tried (or has
not become visible yet), so this bounds only pathological churn."""


class _Ids:
    """ObjectIds that strictly grow with every call on this store (the ordering tiebreak).

    `ObjectId()` alone is not enough: its 3-byte counter wraps and the wall clock may step
    back; then the next id is the previous one plus one."""

    def __init__(self) -> None:
        self._last = ObjectId(b"\x00" * 12)

    def next(self) -> ObjectId:
        oid = ObjectId()
        if oid <= self._last:
            oid = ObjectId((int.from_bytes(self._last.binary, "big") + 1).to_bytes(12, "big"))
        self._last = oid
        return oid


@dataclass(slots=True)
class _Pending:
    """One `append` call waiting for its flush; documents are built (and ids assigned)
    when the call is made, so ids follow the order of the calls."""

    record: IngestRecord
    future: asyncio.Future[None]
    events: list[Doc]
    logs: list[Doc]
    reg_event: Doc | None = None
    reg_log: Doc | None = None
    registered: bool = field(default=False)


class MongoStore:
    """Every storage port on one MongoDB database.

    `url`: a `mongodb://` or `mongodb+srv://` URL; its path names the database, else
    `database`, else `simwire`.

    `write_concern`: the write concern of every write. When `None` (the default) and the URL
    sets no `w`/`journal` option, the store asks the server at `open()`: a replica-set member
    gets `WriteConcern(w="majority", j=True)` (an acknowledged uplink survives a fail-over and
    a crash), anything else (standalone, mongos) the server's default write concern. A URL
    with `w=`/`journal=` options keeps those.

    `retention_days`: documents of `events` and `admin_logs` carry `expire_at` = their time +
    this many days, and a TTL index makes MongoDB delete them by itself; `None` writes no
    `expire_at` (only `purge` deletes). `purge(before_ms)` works either way.
    """

    name = "mongodb"

    def __init__(
        self,
        url: str,
        database: str | None = None,
        *,
        write_concern: WriteConcern | None = None,
        retention_days: int | None = DEFAULT_RETENTION_DAYS,
    ) -> None:
        self._url = url
        self._database = database
        self._write_concern = write_concern
        self._retention = timedelta(days=retention_days) if retention_days is not None else None
        self._ids = _Ids()
        self._pending: list[_Pending] = []
        self._submitted: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._client: AsyncMongoClient[Doc] | None = None
        self._db: AsyncDatabase[Doc] | None = None
        self._subs: dict[str, builtins.list[tuple[str, frozenset[str]]]] | None = None
        self._subs_loaded = 0.0
        self._outbox_listener: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def client(self) -> AsyncMongoClient[Doc]:
        if self._client is None:
            raise RuntimeError("MongoStore is not open")
        return self._client

    @property
    def db(self) -> AsyncDatabase[Doc]:
        if self._db is None:
            raise RuntimeError("MongoStore is not open")
        return self._db

    async def open(self) -> MongoStore:
        """Connect, settle the write concern and create the indexes (if absent)."""
        if self._client is not None:
            raise RuntimeError("MongoStore is already open")
        client: AsyncMongoClient[Doc] = AsyncMongoClient(self._url)
        try:
            wc = self._write_concern
            if wc is None and not client.write_concern.document:
                hello = await client.admin.command("hello")
                wc = WriteConcern(w="majority", j=True) if "setName" in hello else None
            self._client = client
            self._db = client.get_default_database(
                self._database or DEFAULT_DATABASE, write_concern=wc
            )
            await self._create_indexes()
        except BaseException:
            self._client = self._db = None
            await client.close()
            raise
        self._closed = False
        log.info("mongodb store open: database %s, write concern %s",
                 self.db.name, self.db.write_concern.document or "server default")
        return self

    async def _create_indexes(self) -> None:
        db = self.db
        for collection, name in _DROPPED_INDEXES:
            if name in await db[collection].index_information():
                await db[collection].drop_index(name)
                log.info("mongodb: dropped index %s.%s (replaced)", collection, name)
        ttl = IndexModel([("expire_at", ASCENDING)], name="ttl", expireAfterSeconds=0)
        await db.sims.create_indexes([
            IndexModel([("ip", ASCENDING)], name="ip", unique=True),
            IndexModel([("org", ASCENDING), ("_id", ASCENDING)], name="org"),
        ])
        await db.events.create_indexes([
            IndexModel(
                [("iccid", ASCENDING), ("type", ASCENDING), ("received_ms", DESCENDING),
                 ("_id", DESCENDING), ("protocol", ASCENDING)],
                name=_HISTORY_INDEX,
            ),
            IndexModel([("received_ms", ASCENDING)], name="received"),
            ttl,
        ])
        await db.devices.create_indexes([
            IndexModel([("org", ASCENDING), ("_id", ASCENDING)], name="org"),
        ])
        await db.admin_logs.create_indexes([
            IndexModel([("org", ASCENDING), ("timestamp_ms", ASCENDING), ("_id", ASCENDING)],
                       name=_LOGS_BY_ORG_INDEX),
            IndexModel([("iccid", ASCENDING), ("timestamp_ms", ASCENDING), ("_id", ASCENDING)],
                       name=_LOGS_BY_ICCID_INDEX),
            IndexModel([("timestamp_ms", ASCENDING)], name="timestamp"),
            ttl,
        ])
        await db.api_clients.create_indexes([
            IndexModel([("org", ASCENDING), ("_id", ASCENDING)], name="org"),
        ])
        await db.integrations.create_indexes([
            IndexModel([("org", ASCENDING), ("created_ms", ASCENDING), ("_id", ASCENDING)],
                       name="org"),
        ])
        await db.outbox.create_indexes([
            IndexModel([("i", ASCENDING), ("_id", ASCENDING)], name=_OUTBOX_INDEX),
            IndexModel([("r", ASCENDING)], name="received"),
            ttl,
        ])
        await db.templates.create_indexes([
            IndexModel([("org", ASCENDING), ("created_ms", ASCENDING), ("_id", ASCENDING)],
                       name="org"),
            IndexModel([("status", ASCENDING)], name="status"),
            IndexModel(
                [("org", ASCENDING), ("claims", ASCENDING)], name=_CLAIMS_INDEX, unique=True,
                partialFilterExpression={"status": TemplateStatus.ACTIVE.value,
                                         "claims": {"$exists": True}},
            ),
        ])
        await db.savings.create_indexes([
            IndexModel([("org", ASCENDING), ("day", ASCENDING)], name=_SAVINGS_INDEX),
            IndexModel([("day", ASCENDING)], name="day"),
        ])
        await db.psk_jobs.create_indexes([
            IndexModel([("org", ASCENDING), ("created_ms", ASCENDING), ("_id", ASCENDING)],
                       name=_JOBS_INDEX),
            IndexModel([("status", ASCENDING)], name="status"),
        ])
        await db.lwm2m_registrations.create_indexes([
            IndexModel([("id", ASCENDING)], name=_REGISTRATION_ID_INDEX, unique=True),
        ])
        await db.lwm2m_observations.create_indexes([
            IndexModel([("registration_id", ASCENDING), ("created_ms", ASCENDING),
                        ("_id", ASCENDING)], name="registration"),
        ])
        await db.downlinks.create_indexes([
            IndexModel([("org", ASCENDING), ("created_ms", ASCENDING), ("_id", ASCENDING)],
                       name="org"),
            IndexModel([("iccid", ASCENDING), ("status", ASCENDING), ("created_ms", ASCENDING),
                        ("_id", ASCENDING)], name="iccid"),
            IndexModel([("iccid", ASCENDING), ("slot", ASCENDING)], name=_SLOT_INDEX,
                       unique=True, partialFilterExpression={"slot": {"$exists": True}}),
            IndexModel([("status", ASCENDING), ("expires_ms", ASCENDING)], name="expiring"),
            IndexModel([("created_ms", ASCENDING)], name="created"),
        ])

    async def close(self) -> None:
        """Let the queued appends finish, then disconnect."""
        self._closed = True
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            await asyncio.wait([flusher])
        self._flusher = None
        if self._client is not None:
            await self._client.close()
        self._client = self._db = None

    def _coll(self, name: str) -> AsyncCollection[Doc]:
        return self.db[name]

    def _expire_at(self, ms: int) -> datetime | None:
        if self._retention is None:
            return None
        return _EPOCH + timedelta(milliseconds=ms) + self._retention

    # -- SimRepository ---------------------------------------------------------------

    async def find_by_ip(self, ip: str) -> Sim | None:
        doc = await self._coll("sims").find_one({"ip": ip})
        return _sim(doc) if doc else None

    async def get(self, iccid: str) -> Sim | None:
        doc = await self._coll("sims").find_one({"_id": iccid})
        return _sim(doc) if doc else None

    async def create(self, sim: Sim) -> None:
        doc = {
            "_id": sim.iccid, "imsi": sim.imsi, "ip": sim.ip, "imei": sim.imei,
            "label": sim.label, "status": sim.status.value, "org": sim.org,
            "created_ms": sim.created_ms, "updated_ms": sim.updated_ms,
            "imei_lock": sim.imei_lock,
        }
        try:
            await self._coll("sims").insert_one(doc)
        except DuplicateKeyError as exc:
            raise _sim_conflict(exc, sim.iccid, sim.ip) from exc

    async def update(self, iccid: str, changes: SimChanges, now_ms: int) -> Sim | None:
        if changes.clear - _OPTIONAL_SIM_FIELDS:
            raise ValueError(f"only imei and label can be cleared, not {sorted(changes.clear)}")
        sets: Doc = {}
        for name in ("imsi", "ip", "imei", "label", "status"):
            val = getattr(changes, name)
            if val is not None:
                sets[name] = str(val)
            elif name in changes.clear:
                sets[name] = None
        if changes.imei_lock is not None:
            sets["imei_lock"] = bool(changes.imei_lock)
        sets["updated_ms"] = now_ms
        try:
            doc = await self._coll("sims").find_one_and_update(
                {"_id": iccid}, {"$set": sets}, return_document=ReturnDocument.AFTER
            )
        except DuplicateKeyError as exc:
            raise _sim_conflict(exc, iccid, changes.ip or "") from exc
        return _sim(doc) if doc else None

    async def delete(self, iccid: str) -> bool:
        res = await self._coll("sims").delete_one({"_id": iccid})
        # keys go with the SIM (a SIM re-created with this ICCID starts without keys)
        await self._coll("psks").delete_many({"_id": {"$in": [
            _psk_id(iccid, p) for p in PSK_PROTOCOLS]}})
        return res.deleted_count > 0

    async def list(self, org: str, page: int, page_size: int) -> Page[Sim]:
        sims = self._coll("sims")
        total = await sims.count_documents({"org": org})
        cursor = (
            sims.find({"org": org})
            .sort("_id", ASCENDING)
            .skip(max(0, (page - 1) * page_size))
            .limit(page_size)
        )
        return Page([_sim(d) async for d in cursor], page, page_amount(total, page_size))

    # -- IngestStore -------------------------------------------------------------------

    def submit(self, record: IngestRecord, done: Callable[[BaseException | None], None]) -> None:
        """Hot-path form of `append`: `done` runs on this loop after the flush."""
        task = asyncio.get_running_loop().create_task(self.append(record))
        self._submitted.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self._submitted.discard(t)
            done(asyncio.CancelledError() if t.cancelled() else t.exception())

        task.add_done_callback(finished)

    async def append(self, record: IngestRecord) -> None:
        """Durably write one uplink's documents; returns after its flush was acknowledged.

        Registration as `SqliteStore`: the device document is inserted only if absent
        (`$setOnInsert` upsert) and only the caller whose upsert inserted it writes the
        registration's LIFECYCLE event and admin log."""
        if self._closed or self._db is None:
            raise RuntimeError("MongoStore is closed")
        pending = self._prepare(record)
        self._pending.append(pending)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="mongodb-flush")
        await pending.future

    def _prepare(self, record: IngestRecord) -> _Pending:
        loop = asyncio.get_running_loop()
        reg = record.registration
        # ids in the order SQLite gives seq numbers: the LIFECYCLE event before the
        # record's events, the registration log after the record's logs
        reg_event = self._event_doc(reg.event) if reg is not None else None
        events = [self._event_doc(e) for e in record.events]
        logs = [self._log_doc(e) for e in record.logs]
        reg_log = self._log_doc(reg.log) if reg is not None else None
        return _Pending(record, loop.create_future(), events, logs, reg_event, reg_log)

    async def _flush_loop(self) -> None:
        while self._pending:
            batch = self._pending[:MAX_BATCH]
            del self._pending[:MAX_BATCH]
            try:
                await self._write_batch(batch)
            except asyncio.CancelledError:
                for p in (*batch, *self._pending):
                    p.future.cancel()
                self._pending.clear()
                raise
            except Exception as exc:
                log.error("mongodb append of %d records failed: %s", len(batch), exc)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
            else:
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(None)

    async def _write_batch(self, batch: builtins.list[_Pending]) -> None:
        await self._register(batch)
        events: list[Doc] = []
        logs: list[Doc] = []
        states: dict[str, DeviceState] = {}
        for p in batch:
            if p.registered and p.reg_event is not None:
                events.append(p.reg_event)
            events.extend(p.events)
            logs.extend(p.logs)
            if p.registered and p.reg_log is not None:
                logs.append(p.reg_log)
            s = p.record.state
            if s is not None:
                key = _state_id(s.iccid, s.protocol)
                kept = states.get(key)
                if kept is None or s.updated_ms >= kept.updated_ms:
                    states[key] = s
        writes: builtins.list[Coroutine[Any, Any, object]] = []
        outbox = self._outbox_docs(events, await self._subscriptions()) if events else []
        if events:
            writes.append(self._coll("events").insert_many(events, ordered=False))
        if outbox:
            writes.append(self._coll("outbox").insert_many(outbox, ordered=False))
        if logs:
            writes.append(self._coll("admin_logs").insert_many(logs, ordered=False))
        if states:
            writes.append(self._write_states(list(states.values())))
        savings = _savings_ops(batch)
        if savings:
            writes.append(self._write_savings(savings))
        results = await asyncio.gather(*writes, return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            # Not one transaction: undo this flush's registrations so the devices' retried
            # (un-ACKed) messages register them again with their LIFECYCLE event and log.
            ours = [p.record.registration.device.iccid for p in batch
                    if p.registered and p.record.registration is not None]
            if ours:
                try:
                    await self._coll("devices").delete_many({"_id": {"$in": ours}})
                except Exception as exc:
                    log.error("could not undo registration of %s: %s", ours, exc)
            raise failed
        if outbox and self._outbox_listener is not None:
            self._outbox_listener()

    async def _subscriptions(self) -> dict[str, builtins.list[tuple[str, frozenset[str]]]]:
        """org -> [(integration id, subscribed types)], cached (see the module docstring)."""
        if self._subs is None or time.monotonic() - self._subs_loaded > SUBSCRIPTIONS_TTL_S:
            subs: dict[str, builtins.list[tuple[str, frozenset[str]]]] = {}
            async for d in self._coll("integrations").find({}, {"org": 1, "config": 1}):
                subs.setdefault(d["org"], []).append(
                    (d["_id"], frozenset(d["config"]["eventTypes"])))
            self._subs, self._subs_loaded = subs, time.monotonic()
        return self._subs

    def _outbox_docs(
        self, events: builtins.list[Doc],
        subs: dict[str, builtins.list[tuple[str, frozenset[str]]]],
    ) -> builtins.list[Doc]:
        if not subs:
            return []
        docs: builtins.list[Doc] = []
        for e in events:
            for iid, types in subs.get(e["org"], ()):
                if e["type"] in types:
                    doc: Doc = {
                        "_id": self._ids.next(), "i": iid, "e": e["id"], "t": e["type"],
                        "c": e["iccid"], "s": e["protocol"], "p": e["topic"],
                        "v": e["envelope"], "r": e["received_ms"],
                    }
                    if "expire_at" in e:
                        doc["expire_at"] = e["expire_at"]
                    docs.append(doc)
        return docs

    async def _register(self, batch: builtins.list[_Pending]) -> None:
        """Insert the absent devices; mark the records whose upsert inserted one."""
        owners: list[_Pending] = []
        ops: list[UpdateOne] = []
        seen: set[str] = set()
        for p in batch:
            reg = p.record.registration
            if reg is None or reg.device.iccid in seen:
                continue  # a later record of the same new device in this batch loses
            seen.add(reg.device.iccid)
            d = reg.device
            owners.append(p)
            ops.append(UpdateOne(
                {"_id": d.iccid},
                {"$setOnInsert": {"org": d.org, "imsi": d.imsi, "ip": d.ip,
                                  "first_seen_ms": d.first_seen_ms}},
                upsert=True,
            ))
        if not ops:
            return
        try:
            result = await self._coll("devices").bulk_write(ops, ordered=False)
            upserted = result.upserted_ids or {}
        except BulkWriteError as exc:
            # a duplicate key: another writer inserted the device first (not ours)
            _raise_unless_duplicates(exc)
            upserted = {u["index"]: u["_id"] for u in exc.details.get("upserted", [])}
        for index in upserted:
            owners[index].registered = True

    async def _write_states(self, states: Sequence[DeviceState]) -> None:
        """Upsert each state unless the stored one is newer (then the upsert's insert hits
        the `_id` and fails with a duplicate key: nothing to do)."""
        ops = [
            UpdateOne(
                {"_id": _state_id(s.iccid, s.protocol), "updated_ms": {"$lte": s.updated_ms}},
                {"$set": {"iccid": s.iccid, "protocol": s.protocol.value, "payload": s.payload,
                          "topic": s.topic, "updated_ms": s.updated_ms}},
                upsert=True,
            )
            for s in states
        ]
        try:
            await self._coll("device_state").bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            _raise_unless_duplicates(exc)

    async def _write_savings(self, ops: builtins.list[UpdateOne]) -> None:
        """Upsert the counters; an upsert that lost an insert race to another writer fails
        with a duplicate key (the document now exists), so it is retried as an update."""
        for _attempt in range(5):
            try:
                await self._coll("savings").bulk_write(ops, ordered=False)
                return
            except BulkWriteError as exc:
                _raise_unless_duplicates(exc)
                ops = [ops[err["index"]] for err in exc.details["writeErrors"]]
        raise RuntimeError(f"savings upsert of {len(ops)} counters kept failing")

    def _event_doc(self, e: Event) -> Doc:
        history = (
            e.payload.text if e.type is EventType.TELEMETRY_DATA and e.payload else None
        )
        doc: Doc = {
            "_id": self._ids.next(), "id": e.id, "type": e.type.value, "org": e.org,
            "iccid": e.device.iccid if e.device else None,
            "protocol": e.source.value if e.source else None, "topic": e.topic,
            "received_ms": e.received_ms, "history": history, "envelope": e.envelope_json(),
        }
        expire_at = self._expire_at(e.received_ms)
        if expire_at is not None:
            doc["expire_at"] = expire_at
        return doc

    def _log_doc(self, e: AdminLog) -> Doc:
        doc: Doc = {
            "_id": self._ids.next(), "id": e.id, "org": e.org, "timestamp_ms": e.timestamp_ms,
            "type": e.type.value, "category": e.category.value, "message": e.message,
            "description": e.description, "trace_id": e.trace_id, "iccid": e.iccid,
            "imsi": e.imsi, "ip": e.ip,
        }
        expire_at = self._expire_at(e.timestamp_ms)
        if expire_at is not None:
            doc["expire_at"] = expire_at
        return doc

    # -- HistoryRepository ---------------------------------------------------------------

    async def history(self, query: HistoryQuery) -> HistoryPage:
        flt = history_filter(query)
        cursor = (
            self._coll("events")
            .find(flt, {"iccid": 1, "received_ms": 1, "protocol": 1, "history": 1, "topic": 1})
            .sort([("received_ms", DESCENDING), ("_id", DESCENDING)])
            .limit(query.page_size + 1)
            .hint(_HISTORY_INDEX)  # see _HISTORY_INDEX
        )
        docs = [d async for d in cursor]
        more = len(docs) > query.page_size
        docs = docs[: query.page_size]
        items = [
            HistoryItem(d["iccid"], d["received_ms"], Protocol(d["protocol"]), d["history"],
                        d.get("topic"))
            for d in docs
        ]
        token = encode_token([docs[-1]["received_ms"], str(docs[-1]["_id"])]) if more else None
        return HistoryPage(items, token)

    async def purge(self, before_ms: int) -> int:
        events = await self._coll("events").delete_many({"received_ms": {"$lt": before_ms}})
        logs = await self._coll("admin_logs").delete_many({"timestamp_ms": {"$lt": before_ms}})
        outbox = await self._coll("outbox").delete_many({"r": {"$lt": before_ms}})
        if outbox.deleted_count:
            log.warning("retention purge dropped %d undelivered outbox items",
                        outbox.deleted_count)
        return events.deleted_count + logs.deleted_count

    # -- DeviceRepository ----------------------------------------------------------------

    async def list_devices(self, query: DeviceQuery) -> Page[Device]:
        flt: Doc = {"org": query.org}
        if query.iccid is not None:
            flt["_id"] = query.iccid
        sort: dict[str, int] = {}
        for name, desc in query.sort:
            if name not in _DEVICE_SORT:
                raise ValueError(f"cannot sort devices by {name!r}")
            # a repeated field changes nothing (as in SQL's ORDER BY)
            sort.setdefault(_DEVICE_SORT[name], DESCENDING if desc else ASCENDING)
        sort.setdefault("_id", ASCENDING)  # a total order, so pages do not overlap
        devices = self._coll("devices")
        total = await devices.count_documents(flt)
        cursor = (
            devices.find(flt)
            .sort(list(sort.items()))
            .skip(max(0, (query.page - 1) * query.page_size))
            .limit(query.page_size)
        )
        return Page([_device(d) async for d in cursor], query.page,
                    page_amount(total, query.page_size))

    async def get_device(self, iccid: str) -> Device | None:
        doc = await self._coll("devices").find_one({"_id": iccid})
        return _device(doc) if doc else None

    async def is_registered(self, iccid: str) -> bool:
        return await self._coll("devices").find_one({"_id": iccid}, {"_id": 1}) is not None

    async def get_state(self, iccid: str, protocol: Protocol) -> DeviceState | None:
        doc = await self._coll("device_state").find_one({"_id": _state_id(iccid, protocol)})
        if doc is None:
            return None
        return DeviceState(iccid, protocol, doc["payload"], doc.get("topic"), doc["updated_ms"])

    # -- AdminLogRepository ----------------------------------------------------------------

    async def append_logs(self, logs: Sequence[AdminLog]) -> None:
        if logs:
            await self._coll("admin_logs").insert_many(
                [self._log_doc(e) for e in logs], ordered=True
            )

    async def list_logs(self, query: AdminLogQuery) -> Page[AdminLog]:
        flt: Doc = {"org": query.org}
        for name, val in (("iccid", query.iccid), ("type", query.type),
                          ("category", query.category)):
            if val is not None:
                flt[name] = val
        span: Doc = {}
        if query.start_ms is not None:
            span["$gte"] = query.start_ms
        if query.end_ms is not None:
            span["$lte"] = query.end_ms
        if span:
            flt["timestamp_ms"] = span
        # hinted: see _HISTORY_INDEX
        index = _LOGS_BY_ICCID_INDEX if query.iccid is not None else _LOGS_BY_ORG_INDEX
        coll = self._coll("admin_logs")
        total = await coll.count_documents(flt, hint=index)
        cursor = (
            coll.find(flt)
            .sort([("timestamp_ms", DESCENDING), ("_id", DESCENDING)])
            .skip(max(0, (query.page - 1) * query.page_size))
            .limit(query.page_size)
            .hint(index)
        )
        items = [_admin_log(d) async for d in cursor]
        return Page(items, query.page, page_amount(total, query.page_size))

    # -- IntegrationRepository -----------------------------------------------------------

    async def create_integration(self, integration: Integration) -> None:
        i = integration
        try:
            await self._coll("integrations").insert_one({
                "_id": i.id, "org": i.org, "config": i.config_doc(), "created_ms": i.created_ms,
                "updated_ms": i.updated_ms, "state": i.state.value, "error": i.error,
                "first_delivery_ms": i.first_delivery_ms,
            })
        except DuplicateKeyError as exc:
            raise Conflict(f"integration {i.id} exists") from exc
        self._subs = None

    async def get_integration(self, integration_id: str) -> Integration | None:
        doc = await self._coll("integrations").find_one({"_id": integration_id})
        return _integration(doc) if doc else None

    async def list_integrations(self, org: str, page: int, page_size: int) -> Page[Integration]:
        coll = self._coll("integrations")
        total = await coll.count_documents({"org": org})
        cursor = (
            coll.find({"org": org}).sort([("created_ms", ASCENDING), ("_id", ASCENDING)])
            .skip(max(0, (page - 1) * page_size)).limit(page_size)
        )
        return Page([_integration(d) async for d in cursor], page,
                    page_amount(total, page_size))

    async def all_integrations(self) -> builtins.list[Integration]:
        cursor = self._coll("integrations").find({}).sort(
            [("created_ms", ASCENDING), ("_id", ASCENDING)])
        return [_integration(d) async for d in cursor]

    async def update_integration(self, integration: Integration) -> Integration | None:
        doc = await self._coll("integrations").find_one_and_update(
            {"_id": integration.id},
            {"$set": {"config": integration.config_doc(),
                      "updated_ms": integration.updated_ms}},
            return_document=ReturnDocument.AFTER,
        )
        self._subs = None
        return _integration(doc) if doc else None

    async def set_integration_status(
        self, integration_id: str, state: IntegrationState, error: str | None,
        delivered_ms: int | None = None,
    ) -> Integration | None:
        coll = self._coll("integrations")
        sets: Doc = {"state": state.value, "error": error}
        doc = await coll.find_one_and_update(
            {"_id": integration_id}, {"$set": sets}, return_document=ReturnDocument.AFTER)
        if doc is not None and delivered_ms is not None and doc.get("first_delivery_ms") is None:
            doc = await coll.find_one_and_update(
                {"_id": integration_id, "first_delivery_ms": None},
                {"$set": {"first_delivery_ms": delivered_ms}},
                return_document=ReturnDocument.AFTER,
            ) or await coll.find_one({"_id": integration_id})
        return _integration(doc) if doc else None

    async def delete_integration(self, integration_id: str) -> bool:
        result = await self._coll("integrations").delete_one({"_id": integration_id})
        self._subs = None
        await self._coll("outbox").delete_many({"i": integration_id})
        return result.deleted_count > 0

    # -- Outbox --------------------------------------------------------------------------

    async def outbox_fetch(self, integration_id: str, limit: int) -> builtins.list[OutboxItem]:
        cursor = (
            self._coll("outbox").find({"i": integration_id}).sort("_id", ASCENDING)
            .limit(limit).hint(_OUTBOX_INDEX)
        )
        return [OutboxItem(d["_id"], d["e"], d["t"], d["c"], d["s"], d["p"], d["r"], d["v"])
                async for d in cursor]

    async def outbox_ack(self, integration_id: str, keys: Sequence[Any]) -> None:
        if keys:
            await self._coll("outbox").delete_many(
                {"i": integration_id, "_id": {"$in": list(keys)}})

    async def outbox_depth(self, integration_id: str) -> int:
        return await self._coll("outbox").count_documents({"i": integration_id})

    def on_outbox(self, callback: Callable[[], None]) -> None:
        self._outbox_listener = callback

    # -- TemplateRepository --------------------------------------------------------------

    async def create_template(self, template: Template) -> None:
        try:
            await self._coll("templates").insert_one(_template_doc(template))
        except DuplicateKeyError as exc:
            raise await self._template_conflict(template, exc) from exc

    async def get_template(self, template_id: str) -> Template | None:
        doc = await self._coll("templates").find_one({"_id": template_id})
        return _template(doc) if doc else None

    async def list_templates(self, org: str) -> builtins.list[Template]:
        cursor = self._coll("templates").find({"org": org}).sort(
            [("created_ms", ASCENDING), ("_id", ASCENDING)])
        return [_template(d) async for d in cursor]

    async def update_template(self, template: Template) -> Template | None:
        doc = _template_doc(template)
        del doc["_id"]
        try:
            stored = await self._coll("templates").find_one_and_replace(
                {"_id": template.id}, doc, return_document=ReturnDocument.AFTER)
        except DuplicateKeyError as exc:
            raise await self._template_conflict(template, exc) from exc
        return _template(stored) if stored else None

    async def delete_template(self, template_id: str) -> bool:
        result = await self._coll("templates").delete_one({"_id": template_id})
        return result.deleted_count > 0

    async def active_templates(self) -> builtins.list[Template]:
        cursor = self._coll("templates").find({"status": TemplateStatus.ACTIVE.value}).sort(
            [("org", ASCENDING), ("created_ms", ASCENDING), ("_id", ASCENDING)])
        return [_template(d) async for d in cursor]

    async def _template_conflict(self, t: Template, exc: DuplicateKeyError) -> Conflict:
        """The Conflict for a duplicate key: the template's id, or a claimed protocol (named
        by the error's `keyValue`; else any of `t`'s) with the template holding it."""
        details: Mapping[str, Any] = exc.details or {}
        pattern = details.get("keyPattern") or {}
        if "claims" not in pattern and (pattern or f"index: {_CLAIMS_INDEX} " not in str(exc)):
            return Conflict(f"template {t.id} exists")
        value = (details.get("keyValue") or {}).get("claims")
        wanted = [value] if isinstance(value, str) else [p.value for p in t.claims]
        other = await self._coll("templates").find_one(
            {"org": t.org, "status": TemplateStatus.ACTIVE.value, "claims": {"$in": wanted},
             "_id": {"$ne": t.id}}, {"claims": 1})
        if other is None:  # released meanwhile: still this write's conflict
            return Conflict(f"an ACTIVE template already translates {'/'.join(wanted)}")
        protocol = next(p for p in wanted if p in other["claims"])
        return Conflict(f"an ACTIVE template already translates {protocol}: {other['_id']}")

    # -- SavingsRepository ---------------------------------------------------------------

    async def savings(
        self, org: str, first_day: int, last_day: int,
        protocol: Protocol | None = None, iccid: str | None = None,
    ) -> SavingsTotals:
        flt: Doc = {"org": org, "day": {"$gte": first_day, "$lte": last_day}}
        if protocol is not None:
            flt["protocol"] = protocol.value
        if iccid is not None:
            flt["iccid"] = iccid
        cursor = await self._coll("savings").aggregate([
            {"$match": flt},
            {"$group": {"_id": None, "m": {"$sum": "$messages"},
                        "o": {"$sum": "$original_bytes"}, "p": {"$sum": "$optimized_bytes"}}},
        ], hint=_SAVINGS_INDEX)  # hinted: see _HISTORY_INDEX
        docs = await cursor.to_list()
        if not docs:
            return SavingsTotals()
        return SavingsTotals(docs[0]["m"], docs[0]["o"], docs[0]["p"])

    async def purge_savings(self, before_day: int) -> int:
        result = await self._coll("savings").delete_many({"day": {"$lt": before_day}})
        return result.deleted_count

    # -- PskRepository -------------------------------------------------------------------

    async def get_psk(self, iccid: str, protocol: Protocol) -> StoredPsk | None:
        doc = await self._coll("psks").find_one({"_id": _psk_id(iccid, protocol)})
        return _psk(doc) if doc else None

    async def put_psks(self, psks: Sequence[StoredPsk]) -> None:
        """One ordered bulk of upserts (of one key given twice, the later wins). An upsert
        that loses an insert race to another writer fails with a duplicate key: the bulk is
        resumed from it (ordered: nothing after it ran)."""
        ops = [ReplaceOne({"_id": _psk_id(p.iccid, p.protocol)}, _psk_doc(p), upsert=True)
               for p in psks]
        for _attempt in range(5):
            if not ops:
                return
            try:
                await self._coll("psks").bulk_write(ops, ordered=True)
                return
            except BulkWriteError as exc:
                _raise_unless_duplicates(exc)
                ops = ops[exc.details["writeErrors"][0]["index"]:]
        raise RuntimeError(f"psk upsert of {len(ops)} keys kept failing")

    async def swap_psk(self, psk: StoredPsk, expected_updated_ms: int | None) -> bool:
        coll = self._coll("psks")
        key = _psk_id(psk.iccid, psk.protocol)
        if expected_updated_ms is None:
            try:
                await coll.insert_one({"_id": key, **_psk_doc(psk)})
            except DuplicateKeyError:
                return False
            return True
        result = await coll.replace_one({"_id": key, "updated_ms": expected_updated_ms},
                                        _psk_doc(psk))
        return result.matched_count == 1

    async def mark_bootstrapped(self, iccid: str, protocol: Protocol, at_ms: int,
                                expected_updated_ms: int) -> None:
        await self._coll("psks").update_one(
            {"_id": _psk_id(iccid, protocol), "updated_ms": expected_updated_ms},
            {"$set": {"bootstrapped_ms": at_ms}})

    # -- PskJobRepository ----------------------------------------------------------------

    async def create_job(self, job: PskJob) -> None:
        try:
            await self._coll("psk_jobs").insert_one({
                "_id": job.id, "org": job.org, "created_ms": job.created_ms,
                "amount": job.amount, **_job_progress(job),
            })
        except DuplicateKeyError as exc:
            raise Conflict(f"job {job.id} exists") from exc

    async def update_job(self, job: PskJob) -> None:
        await self._coll("psk_jobs").update_one({"_id": job.id}, {"$set": _job_progress(job)})

    async def get_job(self, job_id: str) -> PskJob | None:
        doc = await self._coll("psk_jobs").find_one({"_id": job_id})
        return _job(doc) if doc else None

    async def list_jobs(self, org: str, since_ms: int, page: int, page_size: int
                        ) -> Page[PskJob]:
        """Newest first: created_ms, then id, both descending."""
        coll = self._coll("psk_jobs")
        flt: Doc = {"org": org, "created_ms": {"$gte": since_ms}}
        total = await coll.count_documents(flt, hint=_JOBS_INDEX)  # hinted as the other ranges
        cursor = (
            coll.find(flt).sort([("created_ms", DESCENDING), ("_id", DESCENDING)])
            .skip(max(0, (page - 1) * page_size)).limit(page_size).hint(_JOBS_INDEX)
        )
        return Page([_job(d) async for d in cursor], page, page_amount(total, page_size))

    async def interrupted_jobs(self) -> builtins.list[PskJob]:
        """Every organisation's IN_PROGRESS jobs, oldest first."""
        cursor = self._coll("psk_jobs").find({"status": PskJobStatus.IN_PROGRESS.value}).sort(
            [("created_ms", ASCENDING), ("_id", ASCENDING)])
        return [_job(d) async for d in cursor]

    # -- Lwm2mRepository -----------------------------------------------------------------

    async def put_registration(self, reg: Lwm2mRegistration) -> None:
        """One document per client: `_id` = ICCID, so writing a registration is one atomic
        replace (upsert) of the client's document: readers see the previous registration or
        this one, never two and never none. The replaced registration's observations are
        deleted afterwards (a crash in between leaves them orphaned: never read again).

        The replace fails with a duplicate key when it loses an insert race for the ICCID
        (retried: it then replaces), or when the registration id is stored under another
        ICCID (a client re-registering under another name, not expected): that document is
        deleted (its observations are this registration's and stay), then it is retried."""
        coll = self._coll("lwm2m_registrations")
        doc = _registration_doc(reg)
        for attempt in range(20):
            try:
                old = await coll.find_one_and_replace(
                    {"_id": reg.iccid}, doc, upsert=True, return_document=ReturnDocument.BEFORE)
            except DuplicateKeyError as exc:
                pattern = (exc.details or {}).get("keyPattern") or {}
                if "id" in pattern or (not pattern and f"index: {_REGISTRATION_ID_INDEX} "
                                       in str(exc)):
                    await coll.delete_one({"id": reg.id, "_id": {"$ne": reg.iccid}})
                else:  # see get_or_create_meta: the winner may not be visible yet
                    await asyncio.sleep(0.005 * attempt)
                continue
            if old is not None and old["id"] != reg.id:
                await self._coll("lwm2m_observations").delete_many(
                    {"registration_id": old["id"]})
            return
        raise RuntimeError(f"registration {reg.id} of {reg.iccid}: upsert kept failing")

    async def get_registration(self, registration_id: str) -> Lwm2mRegistration | None:
        doc = await self._coll("lwm2m_registrations").find_one({"id": registration_id})
        return _registration(doc) if doc else None

    async def registration_of(self, iccid: str) -> Lwm2mRegistration | None:
        doc = await self._coll("lwm2m_registrations").find_one({"_id": iccid})
        return _registration(doc) if doc else None

    async def delete_registration(self, registration_id: str) -> bool:
        result = await self._coll("lwm2m_registrations").delete_one({"id": registration_id})
        await self._coll("lwm2m_observations").delete_many({"registration_id": registration_id})
        return result.deleted_count > 0

    async def all_registrations(self) -> builtins.list[Lwm2mRegistration]:
        """Every organisation's, by ICCID."""
        cursor = self._coll("lwm2m_registrations").find({}).sort("_id", ASCENDING)
        return [_registration(d) async for d in cursor]

    async def put_observation(self, obs: Lwm2mObservation) -> None:
        """A replace upsert by token (`_id`); one that loses an insert race to another
        writer fails with a duplicate key and is retried (then it replaces)."""
        coll = self._coll("lwm2m_observations")
        doc = _observation_doc(obs)
        for attempt in range(20):
            try:
                await coll.replace_one({"_id": bytes(obs.token)}, doc, upsert=True)
                return
            except DuplicateKeyError:  # see get_or_create_meta
                await asyncio.sleep(0.005 * attempt)
        raise RuntimeError(f"observation {obs.token.hex()}: upsert kept failing")

    async def delete_observation(self, token: bytes) -> bool:
        result = await self._coll("lwm2m_observations").delete_one({"_id": bytes(token)})
        return result.deleted_count > 0

    async def observations_of(self, registration_id: str) -> builtins.list[Lwm2mObservation]:
        """Oldest first; ties by token (MongoDB orders binary values by length, then
        bytewise; `SqliteStore` sorts the same way)."""
        cursor = self._coll("lwm2m_observations").find({"registration_id": registration_id}).sort(
            [("created_ms", ASCENDING), ("_id", ASCENDING)])
        return [_observation(d) async for d in cursor]

    # -- DownlinkRepository --------------------------------------------------------------
    # The limit of SCHEDULED requests per device without a multi-document transaction: a
    # request created SCHEDULED claims a slot, `slot` = 0 .. max_scheduled - 1, in its own
    # document, and the unique index (iccid, slot), partial on documents that have a slot,
    # lets no two requests of a device hold the same one. The insert of the request is the
    # claim (one atomic single-document write, checked by the server also between
    # processes); any write that takes a request out of SCHEDULED unsets its slot in the
    # same single-document update, and a deleted request frees it with its document. So
    # nothing can drift (no counter to keep in step) and at most `max_scheduled` created
    # requests of a device are SCHEDULED at once.

    async def create_downlink(self, req: DownlinkRequest, max_scheduled: int) -> bool:
        """Refused when `max_scheduled` requests of the device are SCHEDULED; else insert
        with a free slot (picked at random among the free ones, so concurrent creates rarely
        pick the same); a duplicate key on the slot index means another request took it
        meanwhile: read again and retry. Duplicate request id: Conflict."""
        coll = self._coll("downlinks")
        doc = _downlink_doc(req)
        if req.status is not DownlinkStatus.SCHEDULED:
            return await self._insert_downlink(doc)
        # slots seen taken by a duplicate key (SecantusDB may report one before the
        # winner's document is visible to the next read)
        lost: set[int] = set()
        for attempt in range(MAX_SLOT_ATTEMPTS):
            scheduled = [d.get("slot") async for d in coll.find(
                {"iccid": req.iccid, "status": DownlinkStatus.SCHEDULED.value}, {"slot": 1})]
            if len(scheduled) >= max_scheduled:
                return False
            free = [s for s in range(max_scheduled) if s not in scheduled and s not in lost]
            if not free:  # the winners are not visible yet: read again
                lost.clear()
                await asyncio.sleep(0.005 * attempt)
                continue
            slot = random.choice(free)
            try:
                return await self._insert_downlink({**doc, "slot": slot})
            except _SlotTaken:
                lost.add(slot)
        raise RuntimeError(f"downlink {req.id}: no free slot after {MAX_SLOT_ATTEMPTS} tries")

    async def _insert_downlink(self, doc: Doc) -> bool:
        try:
            await self._coll("downlinks").insert_one(doc)
        except DuplicateKeyError as exc:
            pattern = (exc.details or {}).get("keyPattern") or {}
            if "slot" in pattern or (not pattern and f"index: {_SLOT_INDEX} " in str(exc)):
                raise _SlotTaken from exc
            raise Conflict(f"downlink {doc['_id']} exists") from exc
        return True

    async def devices_with_scheduled(self) -> set[str]:
        values = await self._coll("downlinks").distinct(
            "iccid", {"status": DownlinkStatus.SCHEDULED.value})
        return {str(v) for v in values}

    async def update_downlink(self, req: DownlinkRequest,
                              expected: DownlinkStatus | None = None) -> bool:
        """Leaving SCHEDULED frees the slot in the same update. A request put back to
        SCHEDULED (the controller does not) is counted by later creates but holds no slot.
        With `expected`, a single-document compare-and-set on the status."""
        update: Doc = {"$set": _downlink_status(req)}
        if req.status is not DownlinkStatus.SCHEDULED:
            update["$unset"] = {"slot": ""}
        flt: Doc = {"_id": req.id}
        if expected is not None:
            flt["status"] = expected.value
        res = await self._coll("downlinks").update_one(flt, update)
        return res.matched_count > 0

    async def get_downlink(self, request_id: str) -> DownlinkRequest | None:
        doc = await self._coll("downlinks").find_one({"_id": request_id})
        return _downlink(doc) if doc else None

    async def list_downlinks(self, query: DownlinkQuery) -> Page[DownlinkRequest]:
        """Newest first: created_ms, then id, both descending."""
        flt: Doc = {"org": query.org}
        if query.iccid is not None:
            flt["iccid"] = query.iccid
        if query.status is not None:
            flt["status"] = query.status.value
        coll = self._coll("downlinks")
        total = await coll.count_documents(flt)
        cursor = (
            coll.find(flt).sort([("created_ms", DESCENDING), ("_id", DESCENDING)])
            .skip(max(0, (query.page - 1) * query.page_size)).limit(query.page_size)
        )
        return Page([_downlink(d) async for d in cursor], query.page,
                    page_amount(total, query.page_size))

    async def scheduled_downlinks(self, iccid: str) -> builtins.list[DownlinkRequest]:
        """Oldest first: created_ms, then id."""
        cursor = self._coll("downlinks").find(
            {"iccid": iccid, "status": DownlinkStatus.SCHEDULED.value}).sort(
            [("created_ms", ASCENDING), ("_id", ASCENDING)])
        return [_downlink(d) async for d in cursor]

    async def expire_downlinks(self, now_ms: int) -> int:
        """One `update_many`: each document changes atomically (status and slot together);
        a concurrent `update_downlink` of the same request is applied before or after."""
        result = await self._coll("downlinks").update_many(
            {"status": DownlinkStatus.SCHEDULED.value, "expires_ms": {"$lte": now_ms}},
            {"$set": {"status": DownlinkStatus.FAILED.value, "error": "expired",
                      "updated_ms": now_ms},
             "$unset": {"slot": ""}},
        )
        return result.modified_count

    async def purge_downlinks(self, before_ms: int) -> int:
        result = await self._coll("downlinks").delete_many({"created_ms": {"$lt": before_ms}})
        return result.deleted_count

    # -- ClientRepository ----------------------------------------------------------------

    async def get_client(self, client_id: str) -> ApiClient | None:
        doc = await self._coll("api_clients").find_one({"_id": client_id})
        if doc is None:
            return None
        return ApiClient(doc["_id"], doc["secret_hash"], doc["role"], doc["org"],
                         doc["created_ms"])

    async def create_client(self, client: ApiClient) -> None:
        try:
            await self._coll("api_clients").insert_one({
                "_id": client.client_id, "secret_hash": client.secret_hash,
                "role": client.role, "org": client.org, "created_ms": client.created_ms,
            })
        except DuplicateKeyError as exc:
            raise Conflict(f"client {client.client_id} exists") from exc

    async def count_clients(self) -> int:
        return await self._coll("api_clients").count_documents({})

    async def list_clients(self, org: str) -> builtins.list[ApiClient]:
        cursor = self._coll("api_clients").find({"org": org}).sort("_id", 1)
        return [ApiClient(d["_id"], d["secret_hash"], d["role"], d["org"], d["created_ms"])
                async for d in cursor]

    async def delete_client(self, client_id: str) -> bool:
        result = await self._coll("api_clients").delete_one({"_id": client_id})
        return result.deleted_count > 0

    async def get_or_create_meta(self, key: str, value: str) -> str:
        """First writer wins. A racing upsert that loses gets DuplicateKeyError; it reads
        again, retrying briefly: SecantusDB can report the duplicate before the winner's
        document is visible (real MongoDB returns it on the first read)."""
        meta = self._coll("meta")
        for attempt in range(20):
            try:
                doc = await meta.find_one_and_update(
                    {"_id": key}, {"$setOnInsert": {"value": value}}, upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:  # a concurrent upsert inserted it first
                doc = await meta.find_one({"_id": key})
            if doc is not None:
                return str(doc["value"])
            await asyncio.sleep(0.005 * (attempt + 1))
        raise RuntimeError(f"meta {key}: neither inserted nor readable after 20 attempts")

    # -- LeaseRepository -------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        """One conditional upsert: it matches the lease if it is ours or expired; if
        another holder's is running, the upsert's insert hits the `_id` and fails."""
        try:
            await self._coll("leases").update_one(
                {"_id": name, "$or": [{"holder": holder}, {"expires_ms": {"$lte": now_ms}}]},
                {"$set": {"holder": holder, "expires_ms": now_ms + ttl_ms}}, upsert=True)
        except DuplicateKeyError:
            return False
        return True

    async def release_lease(self, name: str, holder: str) -> None:
        await self._coll("leases").delete_one({"_id": name, "holder": holder})


def _integration(d: Mapping[str, Any]) -> Integration:
    return Integration.from_doc(d["_id"], d["org"], d["config"], d["created_ms"],
                                d["updated_ms"], d["state"], d.get("error"),
                                d.get("first_delivery_ms"))


def _template_doc(t: Template) -> Doc:
    doc: Doc = {
        "_id": t.id, "org": t.org, "name": t.name, "template": t.template,
        "protocols": [p.value for p in t.protocols], "status": t.status.value,
        "created_ms": t.created_ms, "updated_ms": t.updated_ms,
    }
    if t.claims:  # see the module docstring: absent, never []
        doc["claims"] = [p.value for p in dict.fromkeys(t.claims)]
    return doc


def _template(d: Mapping[str, Any]) -> Template:
    return Template(
        id=d["_id"], org=d["org"], name=d["name"], template=d["template"],
        protocols=tuple(Protocol(p) for p in d["protocols"]),
        status=TemplateStatus(d["status"]), created_ms=d["created_ms"],
        updated_ms=d["updated_ms"],
    )


def _psk_id(iccid: str, protocol: Protocol) -> str:
    return f"{iccid}|{protocol.value}"


def _psk_doc(p: StoredPsk) -> Doc:
    """The document without `_id` (a replacement keeps it)."""
    return {
        "iccid": p.iccid, "protocol": p.protocol.value, "sealed": bytes(p.sealed),
        "format": p.format.value, "origin": p.origin.value, "created_ms": p.created_ms,
        "updated_ms": p.updated_ms, "bootstrapped_ms": p.bootstrapped_ms,
    }


def _psk(d: Mapping[str, Any]) -> StoredPsk:
    return StoredPsk(
        iccid=d["iccid"], protocol=Protocol(d["protocol"]), sealed=bytes(d["sealed"]),
        format=PskFormat(d["format"]), origin=PskOrigin(d["origin"]),
        created_ms=d["created_ms"], updated_ms=d["updated_ms"],
        bootstrapped_ms=d.get("bootstrapped_ms"),
    )


def _job_progress(j: PskJob) -> Doc:
    """The fields `update_job` replaces."""
    return {"updated_ms": j.updated_ms, "status": j.status.value, "done": j.done,
            "failed": j.failed, "errors": list(j.errors)}


def _job(d: Mapping[str, Any]) -> PskJob:
    return PskJob(
        id=d["_id"], org=d["org"], created_ms=d["created_ms"], updated_ms=d["updated_ms"],
        status=PskJobStatus(d["status"]), amount=d["amount"], done=d["done"],
        failed=d["failed"], errors=tuple(d["errors"]),
    )


class _SlotTaken(Exception):
    """`create_downlink`: another request of the device holds the slot tried."""


def _registration_doc(r: Lwm2mRegistration) -> Doc:
    return {
        "_id": r.iccid, "id": r.id, "org": r.org, "ip": r.ip, "port": r.port,
        "secure": r.secure, "lifetime_s": r.lifetime_s, "version": r.version,
        "binding": r.binding, "queue_mode": r.queue_mode, "links": r.links,
        "registered_ms": r.registered_ms, "updated_ms": r.updated_ms,
    }


def _registration(d: Mapping[str, Any]) -> Lwm2mRegistration:
    return Lwm2mRegistration(
        id=d["id"], iccid=d["_id"], org=d["org"], ip=d["ip"], port=d["port"],
        secure=bool(d["secure"]), lifetime_s=d["lifetime_s"], version=d["version"],
        binding=d["binding"], queue_mode=bool(d["queue_mode"]), links=d["links"],
        registered_ms=d["registered_ms"], updated_ms=d["updated_ms"],
    )


def _observation_doc(o: Lwm2mObservation) -> Doc:
    return {
        "_id": bytes(o.token), "iccid": o.iccid, "registration_id": o.registration_id,
        "path": o.path, "created_ms": o.created_ms, "content_format": o.content_format,
    }


def _observation(d: Mapping[str, Any]) -> Lwm2mObservation:
    return Lwm2mObservation(
        token=bytes(d["_id"]), iccid=d["iccid"], registration_id=d["registration_id"],
        path=d["path"], created_ms=d["created_ms"], content_format=d.get("content_format"),
    )


def _downlink_status(r: DownlinkRequest) -> Doc:
    """The fields `update_downlink` replaces."""
    return {"status": r.status.value, "attempts_left": r.attempts_left,
            "result_data": r.result_data, "error": r.error, "updated_ms": r.updated_ms}


def _downlink_doc(r: DownlinkRequest) -> Doc:
    return {
        "_id": r.id, "org": r.org, "iccid": r.iccid, "ip": r.ip, "protocol": r.protocol.value,
        "mode": r.mode.value, "request_data": r.request_data, "send_attempts": r.send_attempts,
        "created_ms": r.created_ms, "expires_ms": r.expires_ms, **_downlink_status(r),
    }


def _downlink(d: Mapping[str, Any]) -> DownlinkRequest:
    return DownlinkRequest(
        id=d["_id"], org=d["org"], iccid=d["iccid"], ip=d["ip"],
        protocol=Protocol(d["protocol"]), mode=DownlinkMode(d["mode"]),
        status=DownlinkStatus(d["status"]), request_data=d["request_data"],
        send_attempts=d["send_attempts"], attempts_left=d["attempts_left"],
        created_ms=d["created_ms"], updated_ms=d["updated_ms"], expires_ms=d["expires_ms"],
        result_data=d.get("result_data"), error=d.get("error"),
    )


def _savings_ops(batch: Sequence[_Pending]) -> builtins.list[UpdateOne]:
    """One `$inc` upsert per counter touched by the batch's savings (none: no ops)."""
    sums: dict[tuple[str, int, str, str], list[int]] = {}
    for p in batch:
        sv = p.record.saving
        if sv is not None:
            counts = sums.setdefault((sv.org, sv.day, sv.protocol.value, sv.iccid), [0, 0, 0])
            counts[0] += 1
            counts[1] += sv.original_bytes
            counts[2] += sv.optimized_bytes
    return [
        UpdateOne(
            {"_id": f"{org}|{day}|{protocol}|{iccid}"},
            {"$inc": {"messages": m, "original_bytes": o, "optimized_bytes": b},
             "$setOnInsert": {"org": org, "day": day, "protocol": protocol, "iccid": iccid}},
            upsert=True,
        )
        for (org, day, protocol, iccid), (m, o, b) in sums.items()
    ]


def _state_id(iccid: str, protocol: Protocol) -> str:
    return f"{iccid}|{protocol.value}"


def history_filter(query: HistoryQuery) -> Doc:
    """The `events` filter of one history page (`MongoStore.history`; the tests explain it).
    The token also bounds the scanned range, so a later page starts at the token instead of
    walking every newer key; the `$or` only skips the keys of the token's own ms."""
    flt: Doc = {
        "iccid": query.iccid,
        "type": _TELEMETRY,
        "received_ms": {"$gte": query.start_ms, "$lte": query.end_ms},
    }
    if query.token:
        t_ms, t_id = _decode_history_token(query.token)
        flt["received_ms"]["$lte"] = min(query.end_ms, t_ms)
        flt["$or"] = [{"received_ms": {"$lt": t_ms}}, {"_id": {"$lt": t_id}}]
    if query.protocol is not None:
        flt["protocol"] = query.protocol.value
    return flt


def _decode_history_token(token: str) -> tuple[int, ObjectId]:
    t_ms, t_id = decode_token(token, str)
    try:
        return t_ms, ObjectId(t_id)
    except InvalidId as exc:
        raise BadRequest("invalid nextToken", [{"message": "invalid nextToken"}]) from exc


def _raise_unless_duplicates(exc: BulkWriteError) -> None:
    details: Mapping[str, Any] = exc.details
    if details.get("writeConcernErrors") or any(
        err.get("code") != DUPLICATE_KEY for err in details.get("writeErrors", [])
    ):
        raise exc


def _sim_conflict(exc: DuplicateKeyError, iccid: str, ip: str) -> Conflict:
    details = exc.details or {}
    pattern = details.get("keyPattern") or {}
    if "ip" in pattern or (not pattern and "index: ip " in str(exc)):
        return Conflict(f"a SIM with IP {ip} already exists")
    return Conflict(f"SIM {iccid} already exists")


def _sim(d: Mapping[str, Any]) -> Sim:
    return Sim(
        iccid=d["_id"], imsi=d["imsi"], ip=d["ip"], imei=d.get("imei"), label=d.get("label"),
        status=SimStatus(d["status"]), org=d["org"], created_ms=d["created_ms"],
        updated_ms=d["updated_ms"], imei_lock=bool(d.get("imei_lock", False)),
    )


def _device(d: Mapping[str, Any]) -> Device:
    return Device(d["_id"], d["imsi"], d["ip"], d["org"], d["first_seen_ms"])


def _admin_log(d: Mapping[str, Any]) -> AdminLog:
    return AdminLog(
        d["id"], d["timestamp_ms"], d["org"], LogType(d["type"]), LogCategory(d["category"]),
        d["message"], d["description"], d.get("trace_id"), d.get("iccid"), d.get("imsi"),
        d.get("ip"),
    )
