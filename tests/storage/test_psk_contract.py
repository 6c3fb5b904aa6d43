"""Storage contract for device PSKs and PSK import jobs (each test on SQLite and MongoDB):
keys are stored sealed (opaque bytes, returned identical), keyed by ICCID + protocol;
`swap_psk` and `mark_bootstrapped` are compare-and-sets on `updated_ms`, atomic also
between two stores on the same database. The last sections hold adapter-only checks: the
upgrade of an SQLite file written before these tables existed, MongoDB's documents."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pymongo import ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from simwire.errors import Conflict
from simwire.model import (
    Protocol,
    PskFormat,
    PskJob,
    PskJobStatus,
    PskOrigin,
    SimStatus,
    StoredPsk,
)
from simwire.ports import SimChanges, Store
from simwire.storage.mongodb import MongoStore
from simwire.storage.sqlite import SqliteStore
from tests.storage.conftest import StoreOpener
from tests.storage.test_contract import ORG, OTHER_ORG, T0, iccid, imsi, ip, make_sim
from tests.support.mongo import drop_database, fresh_database_name, with_database

COAP, LWM2M = Protocol.COAP, Protocol.LWM2M
IN_PROGRESS, DONE = PskJobStatus.IN_PROGRESS, PskJobStatus.DONE
EVERY_BYTE = bytes(range(256)) + b"\x00\x00"
"""A sealed key with every byte value (NULs, invalid UTF-8 included)."""


def psk(
    n: int = 1, protocol: Protocol = COAP, sealed: bytes = EVERY_BYTE, at_ms: int = T0,
    origin: PskOrigin = PskOrigin.API, format: PskFormat = PskFormat.HEX,
    bootstrapped_ms: int | None = None, created_ms: int | None = None,
) -> StoredPsk:
    return StoredPsk(
        iccid=iccid(n), protocol=protocol, sealed=sealed, format=format, origin=origin,
        created_ms=at_ms if created_ms is None else created_ms, updated_ms=at_ms,
        bootstrapped_ms=bootstrapped_ms,
    )


def job(
    org: str = ORG, at_ms: int = T0, status: PskJobStatus = IN_PROGRESS, amount: int = 10,
    id: str | None = None,
) -> PskJob:
    return PskJob(id=id or str(uuid.uuid4()), org=org, created_ms=at_ms, updated_ms=at_ms,
                  status=status, amount=amount)


# -- PskRepository -------------------------------------------------------------------------


async def test_psk_round_trip_keeps_every_field_and_the_bytes(store: Store) -> None:
    a = psk(1, COAP, EVERY_BYTE, origin=PskOrigin.API, format=PskFormat.HEX,
            created_ms=T0 - 7, bootstrapped_ms=None)
    b = psk(2, LWM2M, b"\x00", origin=PskOrigin.BOOTSTRAP, format=PskFormat.STRING,
            at_ms=T0 + 3, bootstrapped_ms=T0 + 4)
    await store.put_psks([a, b])
    got_a = await store.get_psk(iccid(1), COAP)
    got_b = await store.get_psk(iccid(2), LWM2M)
    assert got_a == a and got_b == b
    assert got_a is not None and got_b is not None
    assert type(got_a.sealed) is bytes and got_a.sealed == EVERY_BYTE
    assert (got_a.created_ms, got_a.updated_ms) == (T0 - 7, T0)
    assert got_b.sealed == b"\x00" and got_b.bootstrapped_ms == T0 + 4
    assert got_b.format is PskFormat.STRING and got_b.origin is PskOrigin.BOOTSTRAP
    assert await store.get_psk(iccid(1), LWM2M) is None
    assert await store.get_psk(iccid(3), COAP) is None


async def test_put_psks_replaces_by_iccid_and_protocol(store: Store) -> None:
    old = psk(1, bootstrapped_ms=T0 + 1)
    await store.put_psks([old])
    new = StoredPsk(iccid(1), COAP, b"other", PskFormat.STRING, PskOrigin.BOOTSTRAP,
                    created_ms=T0 + 5, updated_ms=T0 + 6, bootstrapped_ms=None)
    await store.put_psks([new])
    assert await store.get_psk(iccid(1), COAP) == new
    await store.put_psks([])  # nothing to write: no-op
    assert await store.get_psk(iccid(1), COAP) == new
    # one key given twice in one call: the later wins
    await store.put_psks([psk(1, sealed=b"first"), psk(1, sealed=b"second")])
    assert await store.get_psk(iccid(1), COAP) == psk(1, sealed=b"second")


async def test_protocols_are_independent(store: Store) -> None:
    coap, lwm2m = psk(1, COAP, b"c"), psk(1, LWM2M, b"l")
    await store.put_psks([coap, lwm2m])
    assert await store.get_psk(iccid(1), COAP) == coap
    assert await store.get_psk(iccid(1), LWM2M) == lwm2m
    await store.put_psks([psk(1, COAP, b"c2", at_ms=T0 + 1)])
    assert await store.swap_psk(psk(1, LWM2M, b"l2", at_ms=T0 + 2), T0) is True
    await store.mark_bootstrapped(iccid(1), COAP, T0 + 9, T0 + 1)
    assert await store.get_psk(iccid(1), COAP) == psk(1, COAP, b"c2", at_ms=T0 + 1,
                                                      bootstrapped_ms=T0 + 9)
    assert await store.get_psk(iccid(1), LWM2M) == psk(1, LWM2M, b"l2", at_ms=T0 + 2)


async def test_put_many_psks_in_one_call(store: Store) -> None:
    keys = [psk(n, p, f"key {n} {p}".encode()) for n in range(300) for p in (COAP, LWM2M)]
    await store.put_psks(keys)
    for k in (keys[0], keys[1], keys[299], keys[-1]):
        assert await store.get_psk(k.iccid, k.protocol) == k
    got = await asyncio.gather(*(store.get_psk(k.iccid, k.protocol) for k in keys))
    assert got == keys


async def test_swap_inserts_only_if_absent(store: Store) -> None:
    first = psk(1, sealed=b"first", origin=PskOrigin.BOOTSTRAP)
    assert await store.swap_psk(first, None) is True
    assert await store.get_psk(iccid(1), COAP) == first
    assert await store.swap_psk(psk(1, sealed=b"second", at_ms=T0 + 1), None) is False
    assert await store.get_psk(iccid(1), COAP) == first
    # the other protocol of the same SIM is another key
    assert await store.swap_psk(psk(1, LWM2M, b"lwm2m"), None) is True
    assert await store.get_psk(iccid(1), LWM2M) == psk(1, LWM2M, b"lwm2m")


async def test_swap_replaces_only_the_expected_version(store: Store) -> None:
    v1 = psk(1, sealed=b"v1", bootstrapped_ms=T0 + 1)
    await store.put_psks([v1])
    v2 = psk(1, sealed=b"v2", at_ms=T0 + 10, created_ms=T0 + 10,
             origin=PskOrigin.BOOTSTRAP, format=PskFormat.STRING)
    assert await store.swap_psk(v2, T0) is True
    assert await store.get_psk(iccid(1), COAP) == v2  # every field, bootstrapped_ms too
    # stale: another writer replaced v1 meanwhile
    assert await store.swap_psk(psk(1, sealed=b"late", at_ms=T0 + 11), T0) is False
    assert await store.get_psk(iccid(1), COAP) == v2
    # a key that exists is not "absent"; a missing key has no version to match
    assert await store.swap_psk(psk(1, sealed=b"x", at_ms=T0 + 12), None) is False
    assert await store.swap_psk(psk(2, sealed=b"x"), T0) is False
    assert await store.get_psk(iccid(2), COAP) is None
    assert await store.get_psk(iccid(1), COAP) == v2


async def test_concurrent_swaps_of_an_absent_key_one_wins(store: Store) -> None:
    for n in range(3):
        racers = [psk(n, sealed=f"racer {k}".encode(), at_ms=T0 + k) for k in range(20)]
        outcomes = await asyncio.gather(*(store.swap_psk(r, None) for r in racers))
        assert outcomes.count(True) == 1
        assert await store.get_psk(iccid(n), COAP) == racers[outcomes.index(True)]


async def test_concurrent_swaps_of_one_version_one_wins(store: Store) -> None:
    await store.put_psks([psk(1, sealed=b"v1")])
    racers = [psk(1, sealed=f"racer {k}".encode(), at_ms=T0 + 1 + k) for k in range(20)]
    outcomes = await asyncio.gather(*(store.swap_psk(r, T0) for r in racers))
    assert outcomes.count(True) == 1
    assert await store.get_psk(iccid(1), COAP) == racers[outcomes.index(True)]


async def test_concurrent_swaps_between_two_stores(
    store: Store, open_store: StoreOpener
) -> None:
    other = await open_store()
    for n in range(5):
        mine = [psk(n, sealed=f"mine {k}".encode(), at_ms=T0 + k) for k in range(5)]
        theirs = [psk(n, sealed=f"theirs {k}".encode(), at_ms=T0 + 10 + k) for k in range(5)]
        outcomes = await asyncio.gather(*(
            s.swap_psk(p, None) for pair in zip(mine, theirs, strict=True)
            for s, p in ((store, pair[0]), (other, pair[1]))
        ))
        assert outcomes.count(True) == 1
        winner = [p for pair in zip(mine, theirs, strict=True) for p in pair][
            outcomes.index(True)]
        assert await store.get_psk(iccid(n), COAP) == winner
        assert await other.get_psk(iccid(n), COAP) == winner
        # then a rotation race on the winner's version
        a = psk(n, sealed=b"rotated a", at_ms=T0 + 100)
        b = psk(n, sealed=b"rotated b", at_ms=T0 + 101)
        rotated = await asyncio.gather(store.swap_psk(a, winner.updated_ms),
                                       other.swap_psk(b, winner.updated_ms))
        assert sorted(rotated) == [False, True]
        assert await other.get_psk(iccid(n), COAP) == (a if rotated[0] else b)


async def test_mark_bootstrapped_applies_to_the_expected_version_only(store: Store) -> None:
    v1 = psk(1, sealed=b"v1")
    await store.put_psks([v1])
    await store.mark_bootstrapped(iccid(1), COAP, T0 + 5, T0 + 1)  # not the stored version
    assert await store.get_psk(iccid(1), COAP) == v1
    await store.mark_bootstrapped(iccid(1), COAP, T0 + 5, T0)
    assert await store.get_psk(iccid(1), COAP) == replace(v1, bootstrapped_ms=T0 + 5)
    await store.mark_bootstrapped(iccid(1), COAP, T0 + 6, T0)  # again: the last call counts
    assert await store.get_psk(iccid(1), COAP) == replace(v1, bootstrapped_ms=T0 + 6)
    # rotated meanwhile: a late mark of the old version changes nothing
    v2 = psk(1, sealed=b"v2", at_ms=T0 + 10)
    assert await store.swap_psk(v2, T0) is True
    await store.mark_bootstrapped(iccid(1), COAP, T0 + 11, T0)
    assert await store.get_psk(iccid(1), COAP) == v2
    # absent key, other protocol: nothing is created
    await store.mark_bootstrapped(iccid(2), COAP, T0 + 1, T0)
    await store.mark_bootstrapped(iccid(1), LWM2M, T0 + 1, T0 + 10)
    assert await store.get_psk(iccid(2), COAP) is None
    assert await store.get_psk(iccid(1), LWM2M) is None


# -- PskJobRepository ----------------------------------------------------------------------


async def test_job_round_trip_and_duplicate(store: Store) -> None:
    j = replace(job(amount=3), done=1, failed=1,
                errors=('item 2: unknown deviceId "8988…"', "item 3: bad key \\x00"))
    await store.create_job(j)
    assert await store.get_job(j.id) == j
    assert await store.get_job("missing") is None
    with pytest.raises(Conflict):
        await store.create_job(replace(j, org=OTHER_ORG))
    assert await store.get_job(j.id) == j


async def test_update_job_replaces_progress_only(store: Store) -> None:
    j = job(amount=5)
    await store.create_job(j)
    assert (await store.get_job(j.id)) == j and j.errors == ()
    step = replace(j, done=2, failed=1, errors=("item 0: bad",), updated_ms=T0 + 1)
    await store.update_job(step)
    assert await store.get_job(j.id) == step
    final = replace(step, status=DONE, done=4, errors=("item 0: bad", "item 3: bad"),
                    updated_ms=T0 + 2)
    # org, amount and created_ms are not progress: kept as created
    await store.update_job(replace(final, org=OTHER_ORG, amount=99, created_ms=0))
    assert await store.get_job(j.id) == final
    # errors back to none; an absent job is not created
    await store.update_job(replace(final, errors=(), updated_ms=T0 + 3))
    assert await store.get_job(j.id) == replace(final, errors=(), updated_ms=T0 + 3)
    await store.update_job(job(id="missing"))
    assert await store.get_job("missing") is None


async def test_jobs_listed_newest_first_and_paged(store: Store) -> None:
    jobs = [job(at_ms=T0 + k) for k in range(5)]
    tied = [job(at_ms=T0 + 10, id=f"tie-{k}") for k in range(3)]
    for j in (*tied, *reversed(jobs)):
        await store.create_job(j)
    await store.create_job(job(OTHER_ORG, at_ms=T0 + 20))
    newest_first = [*reversed(tied), *reversed(jobs)]  # ties: id descending
    page = await store.list_jobs(ORG, 0, 1, 100)
    assert (page.items, page.page, page.page_amount) == (newest_first, 1, 1)
    pages = [await store.list_jobs(ORG, 0, n, 3) for n in (1, 2, 3, 4)]
    assert [p.items for p in pages] == [newest_first[0:3], newest_first[3:6],
                                        newest_first[6:8], []]
    assert [(p.page, p.page_amount) for p in pages] == [(1, 3), (2, 3), (3, 3), (4, 3)]
    exact = await store.list_jobs(ORG, 0, 1, 8)
    assert (len(exact.items), exact.page_amount) == (8, 1)


async def test_jobs_list_per_org_since_inclusive(store: Store) -> None:
    jobs = [job(at_ms=T0 + k) for k in range(5)]
    theirs = [job(OTHER_ORG, at_ms=T0 + k) for k in range(2)]
    for j in (*jobs, *theirs):
        await store.create_job(j)
    since = await store.list_jobs(ORG, T0 + 2, 1, 10)
    assert (since.items, since.page_amount) == ([jobs[4], jobs[3], jobs[2]], 1)
    assert (await store.list_jobs(ORG, T0 + 3, 1, 1)).page_amount == 2
    other = await store.list_jobs(OTHER_ORG, T0, 1, 10)
    assert other.items == [theirs[1], theirs[0]]
    for empty in (await store.list_jobs(ORG, T0 + 5, 1, 10),
                  await store.list_jobs("nobody", 0, 1, 10)):
        assert (empty.items, empty.page, empty.page_amount) == ([], 1, 1)


async def test_interrupted_jobs_are_the_in_progress_ones(store: Store) -> None:
    assert await store.interrupted_jobs() == []
    a = job(at_ms=T0 + 2)
    b = job(OTHER_ORG, at_ms=T0 + 1)
    finished = job(at_ms=T0, status=DONE)
    c = job(at_ms=T0 + 3)
    for j in (a, b, finished, c):
        await store.create_job(j)
    assert await store.interrupted_jobs() == [b, a, c]  # every org, oldest first
    done_a = replace(a, status=DONE, done=10, updated_ms=T0 + 9)
    await store.update_job(done_a)
    assert await store.interrupted_jobs() == [b, c]


async def test_psks_and_jobs_survive_reopen(store: Store, open_store: StoreOpener) -> None:
    key = psk(1, bootstrapped_ms=T0 + 1)
    j = replace(job(), errors=("item 1: x",))
    await store.put_psks([key])
    await store.create_job(j)
    await store.close()
    again = await open_store()
    assert await again.get_psk(iccid(1), COAP) == key
    assert await again.get_job(j.id) == j
    assert await again.interrupted_jobs() == [j]
    assert await again.swap_psk(psk(1, sealed=b"x"), None) is False


# -- SQLite: files written by an earlier version -------------------------------------------

OLD_SIMS = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE sims (
    iccid TEXT PRIMARY KEY, imsi TEXT NOT NULL, ip TEXT NOT NULL UNIQUE, imei TEXT,
    label TEXT, status TEXT NOT NULL, org TEXT NOT NULL,
    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX sims_org ON sims (org, iccid);
"""
"""The `sims` table as the version before `imei_lock` (and the PSK tables) created it."""
OLD_SIM_COLS = "iccid, imsi, ip, imei, label, status, org, created_ms, updated_ms"


def old_sim_row(n: int) -> tuple[Any, ...]:
    s = make_sim(n)
    return (s.iccid, s.imsi, s.ip, s.imei, s.label, s.status.value, s.org, s.created_ms,
            s.updated_ms)


def write_old_file(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(OLD_SIMS)
        conn.execute(f"INSERT INTO sims ({OLD_SIM_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                     old_sim_row(1))
        conn.execute("INSERT INTO meta VALUES ('k', 'v')")
        conn.commit()
    finally:
        conn.close()


def columns(path: Path, table: str) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


async def test_sqlite_old_file_is_upgraded_on_open(tmp_path: Path) -> None:
    path = tmp_path / "simwire.db"
    write_old_file(path)
    assert "imei_lock" not in columns(path, "sims")
    store = await SqliteStore(path).open()
    try:
        assert columns(path, "sims")[-1] == "imei_lock"
        assert await store.get(iccid(1)) == make_sim(1)  # imei_lock False
        assert await store.get_or_create_meta("k", "other") == "v"
        locked = await store.update(iccid(1), SimChanges(imei_lock=True), T0 + 1)
        assert locked == make_sim(1, imei_lock=True, updated_ms=T0 + 1)
        await store.put_psks([psk(1)])
        await store.create_job(job())
        # a process still running the old version writes SIMs without the column
        conn = sqlite3.connect(path)
        with conn:
            conn.execute(f"INSERT INTO sims ({OLD_SIM_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                         old_sim_row(2))
        conn.close()
        assert await store.get(iccid(2)) == make_sim(2)
    finally:
        await store.close()
    again = await SqliteStore(path).open()  # already upgraded: opens as is
    try:
        assert columns(path, "sims").count("imei_lock") == 1
        assert await again.get(iccid(1)) == make_sim(1, imei_lock=True, updated_ms=T0 + 1)
        assert await again.get_psk(iccid(1), COAP) == psk(1)
        assert len(await again.interrupted_jobs()) == 1
    finally:
        await again.close()


async def test_sqlite_old_file_opened_by_several_stores_at_once(tmp_path: Path) -> None:
    for round_ in range(5):
        path = tmp_path / f"simwire{round_}.db"
        write_old_file(path)
        stores = await asyncio.gather(*(SqliteStore(path).open() for _ in range(4)))
        try:
            assert columns(path, "sims").count("imei_lock") == 1
            for s in stores:
                assert await s.get(iccid(1)) == make_sim(1)
        finally:
            for s in stores:
                await s.close()


# -- MongoDB adapter only ------------------------------------------------------------------


@pytest.fixture
async def mongo(mongo_url: str) -> AsyncIterator[tuple[str, str]]:
    """(server URL, fresh database name); the database is dropped afterwards."""
    database = fresh_database_name()
    yield mongo_url, database
    await drop_database(mongo_url, database)


async def test_mongo_psk_documents_and_job_indexes(mongo: tuple[str, str]) -> None:
    server, database = mongo
    store = await MongoStore(with_database(server, database)).open()
    try:
        info = await store.db.psk_jobs.index_information()
        assert info["org"]["key"] == [("org", 1), ("created_ms", 1), ("_id", 1)]
        assert info["status"]["key"] == [("status", 1)]
        await store.put_psks([psk(1, LWM2M)])
        doc = await store.db.psks.find_one({"_id": f"{iccid(1)}|LWM2M"})
        assert doc is not None
        assert type(doc["sealed"]) is bytes  # BSON binary (subtype 0), not a string
        assert doc["sealed"] == EVERY_BYTE
        j = replace(job(), errors=("a", "b"))
        await store.create_job(j)
        stored = await store.db.psk_jobs.find_one({"_id": j.id})
        assert stored is not None and stored["errors"] == ["a", "b"]
        # SIMs written before imei_lock existed read as unlocked
        await store.db.sims.insert_one({
            "_id": iccid(5), "imsi": imsi(5), "ip": ip(5), "imei": None, "label": None,
            "status": SimStatus.ENABLED.value, "org": ORG, "created_ms": T0,
            "updated_ms": T0})
        old = await store.get(iccid(5))
        assert old is not None and old.imei_lock is False
    finally:
        await store.close()


async def test_mongo_put_psks_resumes_after_a_lost_upsert_race(
    mongo: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upsert that loses the insert to another writer fails with a duplicate key: the
    ordered bulk is resumed from that key, so every key is written."""
    server, database = mongo
    store = await MongoStore(with_database(server, database)).open()
    coll = store._coll
    calls: list[int] = []

    class LosesSecondUpsert:
        def __init__(self, real: AsyncCollection[dict[str, Any]]) -> None:
            self.real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        async def bulk_write(self, ops: list[ReplaceOne[Any]], ordered: bool) -> object:
            calls.append(len(ops))
            if len(calls) > 1:
                return await self.real.bulk_write(ops, ordered=ordered)
            await self.real.bulk_write(ops[:1], ordered=ordered)
            raise BulkWriteError({"writeErrors": [{"index": 1, "code": 11000}],
                                  "writeConcernErrors": []})

    def patched(name: str) -> Any:
        return LosesSecondUpsert(coll(name)) if name == "psks" else coll(name)

    monkeypatch.setattr(store, "_coll", patched)
    try:
        keys = [psk(n) for n in range(4)]
        await store.put_psks(keys)
        assert calls == [4, 3]
        assert [await store.get_psk(k.iccid, COAP) for k in keys] == keys
    finally:
        await store.close()


async def test_deleting_a_sim_deletes_its_keys(store: Store) -> None:
    await store.create(make_sim(1))
    await store.create(make_sim(2))
    await store.put_psks([psk(1, COAP), psk(1, LWM2M), psk(2, COAP)])
    assert await store.delete(iccid(1))
    assert await store.get_psk(iccid(1), COAP) is None
    assert await store.get_psk(iccid(1), LWM2M) is None
    assert await store.get_psk(iccid(2), COAP) is not None
