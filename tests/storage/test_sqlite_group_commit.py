"""SQLite group commit: records of one commit share INSERTs; one bad record fails alone."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import pytest

from simwire.model import DeviceIdentity, Event, EventType, Payload, Protocol
from simwire.ports import HistoryQuery, IngestRecord
from simwire.storage.sqlite import SqliteStore

ICCID = "8988280666000000101"
T0 = 1_767_225_600_000


def record(n: int) -> IngestRecord:
    ev = Event(id=f"1-00000000-{n:024x}", type=EventType.TELEMETRY_DATA, received_ms=T0 + n,
               org="default", device=DeviceIdentity(ICCID, "901405100000101", "10.0.0.1"),
               source=Protocol.UDP, payload=Payload(raw=bytes([n])))
    return IngestRecord((ev,))


async def test_one_bad_record_fails_alone_in_a_shared_commit(tmp_path: Path) -> None:
    store = await SqliteStore(tmp_path / "s.db").open()
    try:
        loop = asyncio.get_running_loop()
        outcomes: list[asyncio.Future[BaseException | None]] = []
        bad = record(2)
        bad = IngestRecord((dataclasses.replace(bad.events[0], org=None),))  # type: ignore[arg-type]
        gate = threading.Event()
        parked = asyncio.ensure_future(store.db.write(lambda c: gate.wait(10)))
        await asyncio.sleep(0.05)  # the writer thread is now inside the parked operation
        for rec in (record(1), bad, record(3)):
            fut: asyncio.Future[BaseException | None] = loop.create_future()
            store.submit(rec, fut.set_result)
            outcomes.append(fut)
        gate.set()  # all three are queued: the writer takes them as one batch
        assert await parked is True
        results = await asyncio.gather(*outcomes)
        assert results[0] is None and results[2] is None
        assert "NOT NULL" in str(results[1])
        page = await store.history(HistoryQuery(ICCID, 0, 2**62))
        assert [i.payload for i in page.items] == ["Aw==", "AQ=="]
    finally:
        await store.close()


async def test_closed_store_cannot_be_reopened(tmp_path: Path) -> None:
    store = await SqliteStore(tmp_path / "s.db").open()
    await store.close()
    with pytest.raises(RuntimeError, match="opens once"):
        await store.open()


async def test_a_failed_record_leaves_the_batch_writes_of_others(tmp_path: Path) -> None:
    """The records of a batch are written without a savepoint of their own: when one
    fails, the transaction is rolled back and restarted, the records retried one by one,
    and the batch's other operations (management writes) still commit with them."""
    store = await SqliteStore(tmp_path / "s.db").open()
    try:
        loop = asyncio.get_running_loop()
        bad = record(2)
        bad = IngestRecord((dataclasses.replace(bad.events[0], org=None),))  # type: ignore[arg-type]
        gate = threading.Event()
        parked = asyncio.ensure_future(store.db.write(lambda c: gate.wait(10)))
        await asyncio.sleep(0.05)  # the writer thread is now inside the parked operation
        outcomes: list[asyncio.Future[BaseException | None]] = []
        for rec in (record(1), bad):
            fut: asyncio.Future[BaseException | None] = loop.create_future()
            store.submit(rec, fut.set_result)
            outcomes.append(fut)
        meta = asyncio.ensure_future(store.get_or_create_meta("k", "v"))
        await asyncio.sleep(0.05)  # queued behind the two records, in the same batch
        fut = loop.create_future()
        store.submit(record(3), fut.set_result)
        outcomes.append(fut)
        gate.set()
        assert await parked is True
        results = await asyncio.gather(*outcomes)
        assert results[0] is None and results[2] is None
        assert "NOT NULL" in str(results[1])
        assert await meta == "v"
        page = await store.history(HistoryQuery(ICCID, 0, 2**62))
        assert [i.payload for i in page.items] == ["Aw==", "AQ=="]
        assert await store.get_or_create_meta("k", "other") == "v"
    finally:
        await store.close()
