"""The storage contract: every adapter behaves exactly the same (`store` runs each test on
SQLite and on MongoDB). The last section holds the MongoDB adapter's own checks."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.write_concern import WriteConcern

from simwire.errors import BadRequest, Conflict
from simwire.model import (
    AdminLog,
    ApiClient,
    Device,
    DeviceIdentity,
    DeviceState,
    Event,
    EventType,
    LogCategory,
    LogType,
    Payload,
    Protocol,
    Sim,
    SimStatus,
    new_trace_id,
)
from simwire.ports import (
    AdminLogQuery,
    DeviceQuery,
    HistoryQuery,
    IngestRecord,
    Registration,
    SimChanges,
    Store,
)
from simwire.storage.mongodb import MongoStore, history_filter
from simwire.storage.sqlite import encode_token
from tests.storage.conftest import StoreOpener
from tests.support.mongo import drop_database, fresh_database_name, with_database

# An hour ago: real time, so MongoDB's TTL monitor (received + 7 days) never interferes.
T0 = time.time_ns() // 1_000_000 - 3_600_000
ORG = "acme"
OTHER_ORG = "globex"


# -- builders ----------------------------------------------------------------------------


def iccid(n: int) -> str:
    return f"8988228066{n:09d}"


def imsi(n: int) -> str:
    return f"90140{n:010d}"


def ip(n: int) -> str:
    return f"10.0.{n // 256}.{n % 256}"


def make_sim(n: int, org: str = ORG, **kw: object) -> Sim:
    fields: dict[str, object] = {
        "iccid": iccid(n), "imsi": imsi(n), "ip": ip(n), "imei": f"3534{n:010d}",
        "label": f"sim {n}", "status": SimStatus.ENABLED, "org": org,
        "created_ms": T0, "updated_ms": T0,
    }
    fields.update(kw)
    return Sim(**fields)  # type: ignore[arg-type]


def identity(n: int, org: str = ORG) -> DeviceIdentity:
    return DeviceIdentity(iccid(n), imsi(n), ip(n), org)


def telemetry(
    n: int, received_ms: int, body: bytes = b"hello", protocol: Protocol = Protocol.UDP,
    topic: str | None = None, org: str = ORG,
) -> Event:
    return Event(
        id=new_trace_id(received_ms), type=EventType.TELEMETRY_DATA, received_ms=received_ms,
        org=org, device=identity(n, org), source=protocol, topic=topic, payload=Payload(body),
    )


def admin_log(
    timestamp_ms: int, org: str = ORG, n: int | None = None, type_: LogType = LogType.DEVICE,
    category: LogCategory = LogCategory.INFO, message: str = "m",
) -> AdminLog:
    return AdminLog(
        id=new_trace_id(timestamp_ms), timestamp_ms=timestamp_ms, org=org, type=type_,
        category=category, message=message, description=f"{message} description",
        trace_id=new_trace_id(timestamp_ms), iccid=iccid(n) if n is not None else None,
        imsi=imsi(n) if n is not None else None, ip=ip(n) if n is not None else None,
    )


def registration(n: int, at_ms: int, org: str = ORG, tag: str = "reg") -> Registration:
    device = Device(iccid(n), imsi(n), ip(n), org, at_ms)
    event = Event(
        id=new_trace_id(at_ms), type=EventType.LIFECYCLE, received_ms=at_ms, org=org,
        device=identity(n, org), body={"lifecycle": {"type": "REGISTERED"}},
    )
    log = admin_log(at_ms, org, n, LogType.LIFECYCLE, message=tag)
    return Registration(device, event, log)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def all_logs(store: Store, **kw: object) -> list[AdminLog]:
    page = await store.list_logs(AdminLogQuery(ORG, page_size=1000, **kw))  # type: ignore[arg-type]
    return page.items


async def walk_history(store: Store, query: HistoryQuery) -> list[str]:
    """Follow next_token to the end; returns the payloads in order."""
    out: list[str] = []
    token: str | None = None
    for _ in range(1000):
        page = await store.history(
            HistoryQuery(query.iccid, query.start_ms, query.end_ms, query.protocol,
                         query.page_size, token)
        )
        assert len(page.items) <= query.page_size
        if page.next_token is not None:
            assert len(page.items) == query.page_size
        out += [item.payload for item in page.items]
        token = page.next_token
        if token is None:
            return out
    raise AssertionError("history pages never end")


# -- SimRepository -------------------------------------------------------------------------


async def test_store_name(store: Store) -> None:
    assert store.name in {"sqlite", "mongodb"}


async def test_sim_create_get_find_by_ip(store: Store) -> None:
    sim = make_sim(1)
    await store.create(sim)
    await store.create(make_sim(2, imei=None, label=None, status=SimStatus.DISABLED))

    assert await store.get(sim.iccid) == sim
    assert await store.find_by_ip(sim.ip) == sim
    assert await store.get(iccid(2)) == make_sim(
        2, imei=None, label=None, status=SimStatus.DISABLED
    )
    assert await store.get(iccid(3)) is None
    assert await store.find_by_ip(ip(3)) is None


async def test_sim_create_duplicate_iccid_conflicts(store: Store) -> None:
    await store.create(make_sim(1))
    with pytest.raises(Conflict) as exc:
        await store.create(make_sim(1, ip=ip(2)))
    assert exc.value.message == f"SIM {iccid(1)} already exists"
    assert await store.get(iccid(1)) == make_sim(1)
    assert await store.find_by_ip(ip(2)) is None


async def test_sim_create_duplicate_ip_conflicts(store: Store) -> None:
    await store.create(make_sim(1))
    with pytest.raises(Conflict) as exc:
        await store.create(make_sim(2, ip=ip(1)))
    assert exc.value.message == f"a SIM with IP {ip(1)} already exists"
    assert await store.get(iccid(2)) is None
    assert await store.find_by_ip(ip(1)) == make_sim(1)


async def test_sim_update_sets_fields(store: Store) -> None:
    await store.create(make_sim(1))
    changes = SimChanges(imsi=imsi(9), ip=ip(9), imei="353400000000099", label="renamed",
                         status=SimStatus.DISABLED.value)
    updated = await store.update(iccid(1), changes, T0 + 5)
    expected = make_sim(1, imsi=imsi(9), ip=ip(9), imei="353400000000099", label="renamed",
                        status=SimStatus.DISABLED, updated_ms=T0 + 5)
    assert updated == expected
    assert await store.get(iccid(1)) == expected
    assert await store.find_by_ip(ip(9)) == expected
    assert await store.find_by_ip(ip(1)) is None


async def test_sim_update_only_touches_given_fields(store: Store) -> None:
    await store.create(make_sim(1))
    updated = await store.update(iccid(1), SimChanges(label="x"), T0 + 1)
    assert updated == make_sim(1, label="x", updated_ms=T0 + 1)
    updated = await store.update(iccid(1), SimChanges(), T0 + 2)
    assert updated == make_sim(1, label="x", updated_ms=T0 + 2)


async def test_sim_update_clears_imei_and_label(store: Store) -> None:
    await store.create(make_sim(1))
    updated = await store.update(
        iccid(1), SimChanges(clear=frozenset({"imei", "label"})), T0 + 1
    )
    assert updated == make_sim(1, imei=None, label=None, updated_ms=T0 + 1)
    assert await store.get(iccid(1)) == updated
    # a value wins over a clear of the same field
    updated = await store.update(
        iccid(1), SimChanges(label="back", clear=frozenset({"label"})), T0 + 2
    )
    assert updated == make_sim(1, imei=None, label="back", updated_ms=T0 + 2)


async def test_sim_update_cannot_clear_required_fields(store: Store) -> None:
    await store.create(make_sim(1))
    with pytest.raises(ValueError, match="imei and label"):
        await store.update(iccid(1), SimChanges(clear=frozenset({"ip"})), T0 + 1)
    assert await store.get(iccid(1)) == make_sim(1)


async def test_sim_update_missing_returns_none(store: Store) -> None:
    await store.create(make_sim(1))
    assert await store.update(iccid(2), SimChanges(label="x"), T0) is None
    # even with an IP another SIM has: nothing is updated, so nothing conflicts
    assert await store.update(iccid(2), SimChanges(ip=ip(1)), T0) is None
    assert await store.get(iccid(2)) is None


async def test_sim_update_duplicate_ip_conflicts(store: Store) -> None:
    await store.create(make_sim(1))
    await store.create(make_sim(2))
    with pytest.raises(Conflict) as exc:
        await store.update(iccid(2), SimChanges(ip=ip(1), label="lost"), T0 + 1)
    assert exc.value.message == f"a SIM with IP {ip(1)} already exists"
    assert await store.get(iccid(2)) == make_sim(2)
    assert await store.find_by_ip(ip(1)) == make_sim(1)
    # keeping its own IP is no conflict
    assert await store.update(iccid(2), SimChanges(ip=ip(2)), T0 + 2) == make_sim(
        2, updated_ms=T0 + 2
    )


async def test_sim_imei_lock_stored_and_returned_by_every_read(store: Store) -> None:
    locked = make_sim(1, imei_lock=True)
    await store.create(locked)
    await store.create(make_sim(2))
    assert await store.get(iccid(1)) == locked
    assert await store.find_by_ip(ip(1)) == locked
    assert (await store.list(ORG, 1, 10)).items == [locked, make_sim(2)]
    unlocked = await store.get(iccid(2))
    assert unlocked is not None and unlocked.imei_lock is False


async def test_sim_update_sets_and_clears_imei_lock(store: Store) -> None:
    await store.create(make_sim(1))
    updated = await store.update(iccid(1), SimChanges(imei_lock=True), T0 + 1)
    assert updated == make_sim(1, imei_lock=True, updated_ms=T0 + 1)
    assert await store.find_by_ip(ip(1)) == updated
    # other changes keep it
    updated = await store.update(iccid(1), SimChanges(label="x", ip=ip(9)), T0 + 2)
    assert updated == make_sim(1, imei_lock=True, label="x", ip=ip(9), updated_ms=T0 + 2)
    updated = await store.update(iccid(1), SimChanges(imei_lock=False), T0 + 3)
    assert updated == make_sim(1, label="x", ip=ip(9), updated_ms=T0 + 3)
    assert await store.get(iccid(1)) == updated


async def test_sim_delete(store: Store) -> None:
    await store.create(make_sim(1))
    assert await store.delete(iccid(1)) is True
    assert await store.delete(iccid(1)) is False
    assert await store.get(iccid(1)) is None
    assert await store.find_by_ip(ip(1)) is None
    # the ICCID and the IP are free again
    await store.create(make_sim(1))
    await store.delete(iccid(1))
    await store.create(make_sim(2, ip=ip(1)))
    assert await store.find_by_ip(ip(1)) == make_sim(2, ip=ip(1))


async def test_sim_list_pages_by_iccid_within_org(store: Store) -> None:
    numbers = [7, 3, 21, 15, 1, 9, 12, 25, 4, 18, 2, 11, 20, 5, 23, 8, 14, 6, 24, 10, 13, 17,
               22, 16, 19]
    for n in numbers:
        await store.create(make_sim(n))
    for n in (100, 101, 102):
        await store.create(make_sim(n, org=OTHER_ORG))

    pages = [await store.list(ORG, page, 10) for page in (1, 2, 3, 4)]
    assert [p.page for p in pages] == [1, 2, 3, 4]
    assert [p.page_amount for p in pages] == [3, 3, 3, 3]
    assert [len(p.items) for p in pages] == [10, 10, 5, 0]
    listed = [s for p in pages for s in p.items]
    assert listed == [make_sim(n) for n in sorted(numbers)]

    other = await store.list(OTHER_ORG, 1, 2)
    assert (other.items, other.page, other.page_amount) == (
        [make_sim(100, org=OTHER_ORG), make_sim(101, org=OTHER_ORG)], 1, 2
    )
    empty = await store.list("nobody", 1, 10)
    assert (empty.items, empty.page, empty.page_amount) == ([], 1, 1)
    exact = await store.list(ORG, 1, 25)
    assert (len(exact.items), exact.page_amount) == (25, 1)


# -- IngestStore, DeviceRepository ---------------------------------------------------------


async def test_append_registers_device_once(store: Store) -> None:
    assert await store.is_registered(iccid(1)) is False
    assert await store.get_device(iccid(1)) is None
    first = registration(1, T0, tag="first")
    await store.append(IngestRecord((telemetry(1, T0, b"a"),), registration=first))
    again = registration(1, T0 + 10, tag="again")
    await store.append(IngestRecord((telemetry(1, T0 + 10, b"b"),), registration=again))

    assert await store.is_registered(iccid(1)) is True
    assert await store.get_device(iccid(1)) == first.device
    logs = await all_logs(store, iccid=iccid(1))
    assert logs == [first.log]
    page = await store.history(HistoryQuery(iccid(1), T0, T0 + 10, page_size=10))
    assert [i.payload for i in page.items] == [b64(b"b"), b64(b"a")]
    # rows: 2 telemetry + 1 LIFECYCLE event + 1 admin log
    assert await store.purge(T0 + 1_000) == 4


async def test_append_registration_race_writes_one_lifecycle(store: Store) -> None:
    regs = [registration(1, T0, tag=f"racer {i}") for i in range(2)]
    await asyncio.gather(*(
        store.append(IngestRecord((telemetry(1, T0, f"m{i}".encode()),), registration=reg))
        for i, reg in enumerate(regs)
    ))
    assert await all_logs(store, type=LogType.LIFECYCLE.value) == [regs[0].log]
    assert await store.get_device(iccid(1)) == regs[0].device
    page = await store.history(HistoryQuery(iccid(1), T0, T0, page_size=10))
    assert sorted(i.payload for i in page.items) == [b64(b"m0"), b64(b"m1")]
    # rows: 2 telemetry + exactly 1 LIFECYCLE event + exactly 1 admin log
    assert await store.purge(T0 + 1) == 4


async def test_append_registration_race_between_two_stores(
    store: Store, open_store: StoreOpener
) -> None:
    other = await open_store()
    for n in range(1, 6):
        regs = [registration(n, T0, tag=f"racer {i}") for i in range(2)]
        await asyncio.gather(
            store.append(IngestRecord((), registration=regs[0])),
            other.append(IngestRecord((), registration=regs[1])),
        )
        logs = await all_logs(store, iccid=iccid(n))
        assert len(logs) == 1
        assert logs[0] in (regs[0].log, regs[1].log)
        assert await store.is_registered(iccid(n))
        assert await other.is_registered(iccid(n))
    # rows: per device exactly 1 LIFECYCLE event + 1 admin log
    assert await store.purge(T0 + 1) == 10


async def test_registered_devices_listed_per_org(store: Store) -> None:
    await store.append(IngestRecord((telemetry(1, T0),), registration=registration(1, T0)))
    other = registration(2, T0 + 1, org=OTHER_ORG)
    await store.append(IngestRecord((), registration=other))

    mine = await store.list_devices(DeviceQuery(ORG))
    assert (mine.items, mine.page, mine.page_amount) == (
        [Device(iccid(1), imsi(1), ip(1), ORG, T0)], 1, 1
    )
    theirs = await store.list_devices(DeviceQuery(OTHER_ORG))
    assert theirs.items == [other.device]
    assert (await store.list_devices(DeviceQuery(ORG, iccid=iccid(2)))).items == []
    assert (await store.list_devices(DeviceQuery(OTHER_ORG, iccid=iccid(2)))).items == [
        other.device
    ]
    nobody = await store.list_devices(DeviceQuery("nobody"))
    assert (nobody.items, nobody.page_amount) == ([], 1)


async def test_list_devices_sorts_and_pages(store: Store) -> None:
    # imsi order is the reverse of the iccid order; ip order differs from both
    specs = {n: (imsi(100 - n), f"10.1.0.{(n * 7) % 13}") for n in range(1, 8)}
    for n, (dev_imsi, dev_ip) in specs.items():
        device = Device(iccid(n), dev_imsi, dev_ip, ORG, T0 + n)
        reg = registration(n, T0 + n)
        await store.append(
            IngestRecord((), registration=Registration(device, reg.event, reg.log))
        )

    def devices(order: list[int]) -> list[Device]:
        return [Device(iccid(n), *specs[n], ORG, T0 + n) for n in order]

    by_iccid = [await store.list_devices(DeviceQuery(ORG, page=p, page_size=3))
                for p in (1, 2, 3)]
    assert [d for p in by_iccid for d in p.items] == devices([1, 2, 3, 4, 5, 6, 7])
    assert [p.page_amount for p in by_iccid] == [3, 3, 3]
    desc = await store.list_devices(DeviceQuery(ORG, page_size=10, sort=(("iccid", True),)))
    assert desc.items == devices([7, 6, 5, 4, 3, 2, 1])
    by_imsi = await store.list_devices(DeviceQuery(ORG, page_size=10, sort=(("imsi", False),)))
    assert by_imsi.items == devices([7, 6, 5, 4, 3, 2, 1])
    by_ip = await store.list_devices(DeviceQuery(ORG, page_size=10, sort=(("ip", True),)))
    assert by_ip.items == sorted(devices(list(specs)), key=lambda d: d.ip, reverse=True)
    repeated = await store.list_devices(
        DeviceQuery(ORG, page_size=10, sort=(("imsi", True), ("iccid", False), ("imsi", False)))
    )
    assert repeated.items == devices([1, 2, 3, 4, 5, 6, 7])


async def test_device_state_keeps_newest(store: Store) -> None:
    def state(t: int, payload: str, protocol: Protocol = Protocol.UDP) -> DeviceState:
        return DeviceState(iccid(1), protocol, payload, "t/1" if protocol is Protocol.COAP
                           else None, t)

    assert await store.get_state(iccid(1), Protocol.UDP) is None
    await store.append(IngestRecord((), state=state(T0 + 100, "first")))
    assert await store.get_state(iccid(1), Protocol.UDP) == state(T0 + 100, "first")
    await store.append(IngestRecord((), state=state(T0 + 50, "older")))
    assert await store.get_state(iccid(1), Protocol.UDP) == state(T0 + 100, "first")
    await store.append(IngestRecord((), state=state(T0 + 100, "same time")))
    assert await store.get_state(iccid(1), Protocol.UDP) == state(T0 + 100, "same time")
    await store.append(IngestRecord((), state=state(T0 + 200, "newer")))
    assert await store.get_state(iccid(1), Protocol.UDP) == state(T0 + 200, "newer")

    # concurrent appends (one group commit): the newest wins whatever the order
    await asyncio.gather(
        store.append(IngestRecord((), state=state(T0 + 300, "newest"))),
        store.append(IngestRecord((), state=state(T0 + 250, "late"))),
        store.append(IngestRecord((), state=state(T0 + 300, "newest, later call"))),
        store.append(IngestRecord((), state=state(T0 + 10, "coap", Protocol.COAP))),
    )
    assert await store.get_state(iccid(1), Protocol.UDP) == state(T0 + 300, "newest, later call")
    # one state per protocol
    assert await store.get_state(iccid(1), Protocol.COAP) == state(T0 + 10, "coap",
                                                                   Protocol.COAP)
    assert await store.get_state(iccid(1), Protocol.LWM2M) is None
    assert await store.get_state(iccid(2), Protocol.UDP) is None


async def test_append_writes_logs_and_events_of_many_concurrent_records(store: Store) -> None:
    await asyncio.gather(*(
        store.append(IngestRecord(
            (telemetry(1, T0 + i, f"m{i}".encode()), telemetry(2, T0 + i, f"n{i}".encode())),
            logs=(admin_log(T0 + i, n=1, message=f"log {i}"),),
        ))
        for i in range(50)
    ))
    page = await store.history(HistoryQuery(iccid(1), T0, T0 + 100, page_size=100))
    assert [i.payload for i in page.items] == [b64(f"m{i}".encode()) for i in reversed(range(50))]
    page = await store.history(HistoryQuery(iccid(2), T0, T0 + 100, page_size=100))
    assert len(page.items) == 50
    assert [log.message for log in await all_logs(store)] == [
        f"log {i}" for i in reversed(range(50))
    ]


# -- HistoryRepository ---------------------------------------------------------------------


async def test_history_item_fields(store: Store) -> None:
    translated = Event(
        id=new_trace_id(T0), type=EventType.TELEMETRY_DATA, received_ms=T0 + 1, org=ORG,
        device=identity(1), source=Protocol.COAP, topic="sensors/1",
        payload=Payload(b"\x01\x02", {"temp": 21.5, "name": "k\u00fche"}, translated=True),
    )
    await store.append(IngestRecord((telemetry(1, T0, b"\x00\xffraw"), translated)))
    page = await store.history(HistoryQuery(iccid(1), T0, T0 + 1))
    assert [(i.iccid, i.received_ms, i.protocol, i.payload, i.topic) for i in page.items] == [
        (iccid(1), T0 + 1, Protocol.COAP, '{"temp":21.5,"name":"k\u00fche"}', "sensors/1"),
        (iccid(1), T0, Protocol.UDP, b64(b"\x00\xffraw"), None),
    ]
    assert page.next_token is None


async def test_history_time_range_is_inclusive_and_per_device(store: Store) -> None:
    for t in range(10):
        await store.append(IngestRecord((
            telemetry(1, T0 + t, f"m{t}".encode()),
            telemetry(2, T0 + t, f"other{t}".encode()),
        )))
    # non-telemetry events of the same device never show up
    await store.append(IngestRecord((), registration=registration(1, T0 + 3)))
    error = Event(id=new_trace_id(T0), type=EventType.ERROR, received_ms=T0 + 4, org=ORG,
                  device=identity(1), source=Protocol.UDP, body={"error": {"x": 1}})
    await store.append(IngestRecord((error,)))

    page = await store.history(HistoryQuery(iccid(1), T0 + 2, T0 + 5))
    assert [(i.received_ms, i.payload) for i in page.items] == [
        (T0 + t, b64(f"m{t}".encode())) for t in (5, 4, 3, 2)
    ]
    assert page.next_token is None
    single = await store.history(HistoryQuery(iccid(1), T0 + 9, T0 + 9))
    assert [i.received_ms for i in single.items] == [T0 + 9]
    assert (await store.history(HistoryQuery(iccid(1), T0 + 10, T0 + 20))).items == []
    assert (await store.history(HistoryQuery(iccid(3), T0, T0 + 20))).items == []


async def test_history_protocol_filter(store: Store) -> None:
    protocols = [Protocol.UDP, Protocol.COAP, Protocol.LWM2M] * 4
    for t, protocol in enumerate(protocols):
        await store.append(IngestRecord((telemetry(1, T0 + t, f"m{t}".encode(), protocol),)))
    for protocol in Protocol:
        got = await walk_history(
            store, HistoryQuery(iccid(1), T0, T0 + 100, protocol, page_size=3)
        )
        assert got == [b64(f"m{t}".encode()) for t in reversed(range(len(protocols)))
                       if protocols[t] is protocol]
    everything = await store.history(HistoryQuery(iccid(1), T0, T0 + 100, page_size=100))
    assert len(everything.items) == len(protocols)


@pytest.mark.parametrize("page_size", [1, 4, 5, 7, 24, 25, 100])
async def test_history_token_walks_all_pages(store: Store, page_size: int) -> None:
    # 24 events on 6 distinct times, 4 per time; inserted in shuffled time order, some
    # in one record: newest first, same time -> the later insert first
    times = [3, 1, 3, 0, 5, 2, 4, 1, 0, 5, 2, 3, 4, 0, 1, 5, 2, 4, 3, 0, 1, 5, 2, 4]
    inserted: list[tuple[int, str]] = []
    i = 0
    while i < len(times):
        chunk = times[i:i + (3 if i % 2 else 1)]
        events = []
        for t in chunk:
            body = f"e{len(inserted)}".encode()
            events.append(telemetry(1, T0 + t * 1000, body))
            inserted.append((t, b64(body)))
        await store.append(IngestRecord(tuple(events)))
        i += len(chunk)
    expected = [
        payload for _, _, payload in sorted(
            ((t, seq, payload) for seq, (t, payload) in enumerate(inserted)), reverse=True
        )
    ]
    got = await walk_history(store, HistoryQuery(iccid(1), T0, T0 + 10_000,
                                                 page_size=page_size))
    assert got == expected
    assert len(set(got)) == len(times)

    # the range still applies on later pages
    got = await walk_history(store, HistoryQuery(iccid(1), T0 + 1000, T0 + 3000,
                                                 page_size=page_size))
    assert got == [p for p in expected if inserted[int(base64.b64decode(p)[1:])][0] in (1, 2, 3)]


async def test_history_many_events_with_the_same_time(store: Store) -> None:
    await store.append(IngestRecord(tuple(telemetry(1, T0, f"{i:03d}".encode())
                                          for i in range(60))))
    await asyncio.gather(*(
        store.append(IngestRecord((telemetry(1, T0, f"{i:03d}".encode()),)))
        for i in range(60, 120)
    ))
    got = await walk_history(store, HistoryQuery(iccid(1), T0, T0, page_size=7))
    assert got == [b64(f"{i:03d}".encode()) for i in reversed(range(120))]


async def test_history_page_size_and_last_page(store: Store) -> None:
    for t in range(6):
        await store.append(IngestRecord((telemetry(1, T0 + t, f"m{t}".encode()),)))
    first = await store.history(HistoryQuery(iccid(1), T0, T0 + 10, page_size=3))
    assert [i.received_ms for i in first.items] == [T0 + 5, T0 + 4, T0 + 3]
    assert first.next_token is not None
    second = await store.history(
        HistoryQuery(iccid(1), T0, T0 + 10, page_size=3, token=first.next_token)
    )
    assert [i.received_ms for i in second.items] == [T0 + 2, T0 + 1, T0]
    assert second.next_token is None  # exactly full last page: no empty page after it
    # a token stays valid while newer events arrive
    await store.append(IngestRecord((telemetry(1, T0 + 9, b"new"),)))
    again = await store.history(
        HistoryQuery(iccid(1), T0, T0 + 10, page_size=3, token=first.next_token)
    )
    assert again.items == second.items


BAD_TOKENS = [
    "not a token!",
    "abc",
    "e30",  # {}
    base64.urlsafe_b64encode(b'"text"').decode(),
    encode_token([1, 2, 3]),
    encode_token([1]),
]


@pytest.mark.parametrize("token", BAD_TOKENS)
async def test_history_bad_token_is_bad_request(store: Store, token: str) -> None:
    await store.append(IngestRecord((telemetry(1, T0),)))
    with pytest.raises(BadRequest) as exc:
        await store.history(HistoryQuery(iccid(1), T0, T0, token=token))
    assert exc.value.message == "invalid nextToken"


@pytest.mark.parametrize("values", [[[1], [2]], [{"a": 1}, None], ["x", "y"], [True, None]])
async def test_history_token_with_wrong_types_is_bad_request(
    store: Store, values: list[object]
) -> None:
    await store.append(IngestRecord((telemetry(1, T0),)))
    with pytest.raises(BadRequest):
        await store.history(HistoryQuery(iccid(1), T0, T0, token=encode_token(values)))


async def test_purge_removes_only_older_rows(store: Store) -> None:
    cut = T0 + 1000
    await store.append(IngestRecord(
        (telemetry(1, cut - 2, b"old1"), telemetry(2, cut - 1, b"old2"),
         telemetry(1, cut, b"edge"), telemetry(1, cut + 1, b"new")),
        logs=(admin_log(cut - 5), admin_log(cut)),
    ))
    await store.append_logs([admin_log(cut - 1, n=1), admin_log(cut + 5, n=1)])

    assert await store.purge(cut) == 2 + 2
    assert await store.purge(cut) == 0
    page = await store.history(HistoryQuery(iccid(1), T0, cut + 10))
    assert [i.payload for i in page.items] == [b64(b"new"), b64(b"edge")]
    assert (await store.history(HistoryQuery(iccid(2), T0, cut + 10))).items == []
    assert [log.timestamp_ms for log in await all_logs(store)] == [cut + 5, cut]
    assert await store.purge(cut + 10) == 2 + 2
    assert await all_logs(store) == []


# -- AdminLogRepository --------------------------------------------------------------------


async def test_admin_logs_filters_and_paging(store: Store) -> None:
    logs = [
        admin_log(T0 + 10, n=1, type_=LogType.DEVICE, message="a"),
        admin_log(T0 + 20, n=2, type_=LogType.INTEGRATION, category=LogCategory.ERROR,
                  message="b"),
        admin_log(T0 + 30, n=1, type_=LogType.INTEGRATION, message="c"),
        admin_log(T0 + 30, n=None, type_=LogType.GENERAL, category=LogCategory.ERROR,
                  message="d"),
        admin_log(T0 + 40, n=1, type_=LogType.DEVICE, category=LogCategory.ERROR, message="e"),
        admin_log(T0 + 5, org=OTHER_ORG, n=1, message="other org"),
    ]
    await store.append_logs(logs[:3])
    await store.append_logs([])
    await store.append(IngestRecord((), logs=tuple(logs[3:5])))
    await store.append_logs(logs[5:])

    async def messages(**kw: object) -> list[str]:
        return [log.message for log in await all_logs(store, **kw)]

    assert await all_logs(store) == [logs[4], logs[3], logs[2], logs[1], logs[0]]
    assert await messages(iccid=iccid(1)) == ["e", "c", "a"]
    assert await messages(type=LogType.INTEGRATION.value) == ["c", "b"]
    assert await messages(category=LogCategory.ERROR.value) == ["e", "d", "b"]
    assert await messages(iccid=iccid(1), category="error") == ["e"]
    assert await messages(start_ms=T0 + 20) == ["e", "d", "c", "b"]
    assert await messages(end_ms=T0 + 30) == ["d", "c", "b", "a"]
    assert await messages(start_ms=T0 + 20, end_ms=T0 + 30) == ["d", "c", "b"]
    assert await messages(start_ms=T0 + 31, end_ms=T0 + 39) == []
    other = await store.list_logs(AdminLogQuery(OTHER_ORG))
    assert other.items == [logs[5]]

    pages = [await store.list_logs(AdminLogQuery(ORG, page=p, page_size=2)) for p in (1, 2, 3)]
    assert [[log.message for log in p.items] for p in pages] == [["e", "d"], ["c", "b"], ["a"]]
    assert [(p.page, p.page_amount) for p in pages] == [(1, 3), (2, 3), (3, 3)]
    filtered = await store.list_logs(AdminLogQuery(ORG, iccid=iccid(1), page=2, page_size=2))
    assert ([log.message for log in filtered.items], filtered.page_amount) == (["a"], 2)
    none = await store.list_logs(AdminLogQuery(ORG, type="LOCATION"))
    assert (none.items, none.page, none.page_amount) == ([], 1, 1)


async def test_admin_logs_same_time_newest_insert_first(store: Store) -> None:
    await store.append_logs([admin_log(T0, message=f"{i}") for i in range(5)])
    await store.append(IngestRecord((), logs=(admin_log(T0, message="5"),)))
    await store.append_logs([admin_log(T0, message="6")])
    assert [log.message for log in await all_logs(store)] == ["6", "5", "4", "3", "2", "1", "0"]


# -- ClientRepository ----------------------------------------------------------------------


async def test_clients(store: Store) -> None:
    assert await store.count_clients() == 0
    admin = ApiClient("admin", "hash-1", "admin", ORG, T0)
    reader = ApiClient("reader", "hash-2", "reader", OTHER_ORG, T0 + 1)
    await store.create_client(admin)
    await store.create_client(reader)
    assert await store.get_client("admin") == admin
    assert await store.get_client("reader") == reader
    assert await store.get_client("nobody") is None
    assert await store.count_clients() == 2
    with pytest.raises(Conflict) as exc:
        await store.create_client(ApiClient("admin", "other", "reader", ORG, T0 + 2))
    assert exc.value.message == "client admin exists"
    assert await store.get_client("admin") == admin
    assert await store.count_clients() == 2


async def test_list_and_delete_clients(store: Store) -> None:
    for cid, org in (("b", ORG), ("a", ORG), ("c", OTHER_ORG)):
        await store.create_client(ApiClient(cid, "h", "viewer", org, T0))
    assert [c.client_id for c in await store.list_clients(ORG)] == ["a", "b"]
    assert [c.client_id for c in await store.list_clients(OTHER_ORG)] == ["c"]
    assert await store.delete_client("a") is True
    assert await store.delete_client("a") is False
    assert [c.client_id for c in await store.list_clients(ORG)] == ["b"]
    assert await store.get_client("a") is None


async def test_meta_first_writer_wins(store: Store) -> None:
    assert await store.get_or_create_meta("signing-key", "first") == "first"
    assert await store.get_or_create_meta("signing-key", "second") == "first"
    values = await asyncio.gather(*(store.get_or_create_meta("race", f"v{i}")
                                    for i in range(10)))
    assert len(set(values)) == 1
    assert values[0] in {f"v{i}" for i in range(10)}
    assert await store.get_or_create_meta("race", "late") == values[0]


# -- LeaseRepository -----------------------------------------------------------------------


async def test_lease_taken_renewed_refused_and_expired(store: Store) -> None:
    assert await store.acquire_lease("leader", "a", T0, 15_000)
    assert not await store.acquire_lease("leader", "b", T0 + 14_999, 15_000)
    assert await store.acquire_lease("leader", "a", T0 + 10_000, 15_000)  # renewed: to +25 s
    assert not await store.acquire_lease("leader", "b", T0 + 24_999, 15_000)
    assert await store.acquire_lease("other", "b", T0, 15_000)  # leases are per name
    assert await store.acquire_lease("leader", "b", T0 + 25_000, 15_000)  # a's expired
    assert not await store.acquire_lease("leader", "a", T0 + 26_000, 15_000)


async def test_lease_release_frees_only_the_holders(store: Store) -> None:
    assert await store.acquire_lease("leader", "a", T0, 15_000)
    await store.release_lease("leader", "b")  # not b's: nothing happens
    assert not await store.acquire_lease("leader", "b", T0 + 1, 15_000)
    await store.release_lease("leader", "a")
    assert await store.acquire_lease("leader", "b", T0 + 2, 15_000)
    await store.release_lease("missing", "b")


async def test_lease_race_between_two_stores_has_one_winner(
    store: Store, open_store: StoreOpener
) -> None:
    other = await open_store()
    for n in range(10):
        name = f"race{n}"
        won = await asyncio.gather(store.acquire_lease(name, "a", T0, 15_000),
                                   other.acquire_lease(name, "b", T0, 15_000))
        assert sorted(won) == [False, True], won
        # and once it has expired, exactly one of two contenders takes it over
        won = await asyncio.gather(store.acquire_lease(name, "c", T0 + 15_000, 15_000),
                                   other.acquire_lease(name, "d", T0 + 15_000, 15_000))
        assert sorted(won) == [False, True], won


# -- durability ----------------------------------------------------------------------------


async def test_reopen_keeps_data(store: Store, open_store: StoreOpener) -> None:
    sim = make_sim(1)
    locked = make_sim(3, imei_lock=True)
    reg = registration(1, T0)
    state = DeviceState(iccid(1), Protocol.UDP, "payload", None, T0)
    client = ApiClient("admin", "hash", "admin", ORG, T0)
    await store.create(sim)
    await store.create(locked)
    await store.append(IngestRecord((telemetry(1, T0, b"kept"),), state=state,
                                    logs=(admin_log(T0 + 1, n=1),), registration=reg))
    await store.create_client(client)
    assert await store.get_or_create_meta("k", "v") == "v"
    await store.close()

    again = await open_store()
    assert await again.get(iccid(1)) == sim
    assert await again.find_by_ip(ip(1)) == sim
    assert await again.get(iccid(3)) == locked
    assert await again.get_device(iccid(1)) == reg.device
    assert await again.get_state(iccid(1), Protocol.UDP) == state
    page = await again.history(HistoryQuery(iccid(1), T0, T0))
    assert [i.payload for i in page.items] == [b64(b"kept")]
    assert len(await all_logs(again)) == 2
    assert await again.get_client("admin") == client
    assert await again.get_or_create_meta("k", "other") == "v"
    # constraints survive too
    with pytest.raises(Conflict):
        await again.create(make_sim(2, ip=ip(1)))
    # and the registration is not repeated
    await again.append(IngestRecord((), registration=registration(1, T0 + 5)))
    assert len(await all_logs(again, type=LogType.LIFECYCLE.value)) == 1


# -- MongoDB adapter only ------------------------------------------------------------------


@pytest.fixture
async def mongo(mongo_url: str) -> AsyncIterator[tuple[str, str]]:
    """(server URL, fresh database name); the database is dropped afterwards."""
    database = fresh_database_name()
    yield mongo_url, database
    await drop_database(mongo_url, database)


async def test_mongo_database_name_from_url_then_argument(mongo: tuple[str, str]) -> None:
    server, database = mongo
    by_arg = await MongoStore(with_database(server, ""), database).open()
    try:
        assert by_arg.db.name == database
    finally:
        await by_arg.close()
    by_url = await MongoStore(with_database(server, database), "ignored").open()
    try:
        assert by_url.db.name == database
    finally:
        await by_url.close()


async def test_mongo_indexes_and_ttl(mongo: tuple[str, str]) -> None:
    server, database = mongo
    await (await MongoStore(with_database(server, database)).open()).close()
    store = await MongoStore(with_database(server, database)).open()  # indexes exist: fine
    try:
        with pytest.raises(RuntimeError, match="already open"):
            await store.open()
        events = await store.db.events.index_information()
        assert events["device_history"]["key"] == [
            ("iccid", 1), ("type", 1), ("received_ms", -1), ("_id", -1), ("protocol", 1)]
        assert "history" not in events
        assert events["ttl"]["expireAfterSeconds"] == 0
        sims = await store.db.sims.index_information()
        assert sims["ip"]["unique"] is True
        logs = await store.db.admin_logs.index_information()
        assert logs["ttl"]["expireAfterSeconds"] == 0

        await store.append(IngestRecord((telemetry(1, T0),), logs=(admin_log(T0 + 1),)))
        week = timedelta(days=7)
        event = await store.db.events.find_one({})
        assert event is not None
        expire = event["expire_at"].replace(tzinfo=UTC)
        assert expire == datetime.fromtimestamp(T0 / 1000, UTC) + week
        log = await store.db.admin_logs.find_one({})
        assert log is not None
        expire = log["expire_at"].replace(tzinfo=UTC)
        assert expire == datetime.fromtimestamp((T0 + 1) / 1000, UTC) + week
    finally:
        await store.close()


async def test_mongo_earlier_history_index_is_replaced(mongo: tuple[str, str]) -> None:
    server, database = mongo
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server)
    try:
        await client[database].events.create_index(
            [("iccid", 1), ("type", 1), ("received_ms", -1), ("_id", -1)], name="history")
    finally:
        await client.close()
    store = await MongoStore(with_database(server, database)).open()
    try:
        events = await store.db.events.index_information()
        assert "history" not in events
        assert "device_history" in events
    finally:
        await store.close()


async def test_mongo_history_page_scans_from_its_token(mongo: tuple[str, str]) -> None:
    server, database = mongo
    store = await MongoStore(with_database(server, database)).open()
    try:
        await store.append(IngestRecord(tuple(
            telemetry(n, T0 + t, f"m{t}".encode()) for t in range(300) for n in (1, 2))))
        query = HistoryQuery(iccid(1), T0, T0 + 1000, page_size=10)
        page = await store.history(query)
        for _ in range(20):
            page = await store.history(dataclasses.replace(query, token=page.next_token))
        assert [i.payload for i in page.items] == [
            b64(f"m{t}".encode()) for t in range(99, 89, -1)]
        deep = dataclasses.replace(query, token=page.next_token)
        # the index range ends at the token's time: 91 keys left instead of 301
        assert history_filter(deep)["received_ms"] == {"$gte": T0, "$lte": T0 + 90}
        explained = await store.db.command("explain", {
            "find": "events", "filter": history_filter(deep),
            "sort": {"received_ms": -1, "_id": -1}, "limit": 11, "hint": "device_history",
        }, verbosity="executionStats")
        if explained["serverInfo"]["host"] != "secantus":  # SecantusDB sorts, then limits
            assert explained["executionStats"]["totalKeysExamined"] <= 12, explained
    finally:
        await store.close()


async def test_mongo_write_concern(mongo: tuple[str, str], monkeypatch: pytest.MonkeyPatch
                                   ) -> None:
    server, database = mongo
    url = with_database(server, database)
    store = await MongoStore(url).open()
    try:
        hello = await store.client.admin.command("hello")
        expected = {"w": "majority", "j": True} if "setName" in hello else {}
        assert store.db.write_concern.document == expected
    finally:
        await store.close()
    store = await MongoStore(url, write_concern=WriteConcern(w=1)).open()
    try:
        assert store.db.write_concern.document == {"w": 1}
        await store.create(make_sim(1))
    finally:
        await store.close()
    store = await MongoStore(url + ("&" if "?" in url else "?") + "w=1").open()
    try:
        assert store.db.write_concern.document == {"w": 1}
    finally:
        await store.close()


async def test_mongo_append_groups_concurrent_calls(
    mongo: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, database = mongo
    store = await MongoStore(with_database(server, database)).open()
    batches: list[int] = []
    write_batch = store._write_batch
    entered = asyncio.Event()
    release = asyncio.Event()

    async def spy(batch: list[object]) -> None:
        batches.append(len(batch))
        if len(batches) == 1:
            entered.set()
            await release.wait()
            raise RuntimeError("injected")
        await write_batch(batch)  # type: ignore[arg-type]

    def record(i: int) -> IngestRecord:
        return IngestRecord((telemetry(1, T0 + i, f"m{i}".encode()),))

    monkeypatch.setattr(store, "_write_batch", spy)
    try:
        first = asyncio.create_task(store.append(record(0)))
        await entered.wait()
        rest = [asyncio.create_task(store.append(record(i))) for i in range(1, 100)]
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(RuntimeError, match="injected"):
            await first
        # the calls queued during the failed flush went in the next one, and succeeded
        assert await asyncio.gather(*rest) == [None] * 99
        assert batches == [1, 99]
        await asyncio.gather(*(store.append(record(i)) for i in range(100, 150)))
        assert batches == [1, 99, 50]
        page = await store.history(HistoryQuery(iccid(1), T0, T0 + 200, page_size=200))
        assert [i.received_ms for i in page.items] == [T0 + i for i in range(149, 0, -1)]
    finally:
        await store.close()
