"""Storage contract for Energy Saver templates and savings counters (each test on SQLite and
MongoDB): at most one ACTIVE template of an organisation claims each protocol, enforced by
the store; the ingest write adds each record's saving to the day's counters."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
from pymongo import UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from simwire.errors import Conflict
from simwire.model import (
    DAY_MS,
    Protocol,
    Saving,
    SavingsTotals,
    Template,
    TemplateStatus,
)
from simwire.ports import IngestRecord, Store
from simwire.storage.mongodb import MongoStore
from tests.storage.conftest import StoreOpener
from tests.storage.test_contract import ORG, OTHER_ORG, T0, iccid, registration, telemetry
from tests.support.mongo import drop_database, fresh_database_name, with_database

UDP, COAP = Protocol.UDP, Protocol.COAP
ACTIVE, INACTIVE = TemplateStatus.ACTIVE, TemplateStatus.INACTIVE
DAY = T0 // DAY_MS


def template(
    protocols: tuple[Protocol, ...] = (COAP,), status: TemplateStatus = ACTIVE,
    org: str = ORG, name: str = "tpl", at_ms: int = T0, id: str | None = None,
) -> Template:
    return Template(
        id=id or str(uuid.uuid4()), org=org, name=name,
        template='{ "fields" : [ {"name": "t", "type": "int16"} ],\n  "note": "°C ✓" }',
        protocols=protocols, status=status, created_ms=at_ms, updated_ms=at_ms,
    )


def claimed(protocol: Protocol, holder: Template) -> str:
    return f"an ACTIVE template already translates {protocol.value}: {holder.id}"


async def create_outcome(store: Store, t: Template) -> bool:
    """True if created, False on Conflict."""
    try:
        await store.create_template(t)
    except Conflict:
        return False
    return True


# -- TemplateRepository --------------------------------------------------------------------


async def test_template_round_trip(store: Store) -> None:
    t = template((UDP, COAP), name="weather")
    await store.create_template(t)
    stored = await store.get_template(t.id)
    assert stored == t
    assert stored is not None and stored.template == t.template  # the text, verbatim
    assert await store.get_template("missing") is None
    with pytest.raises(Conflict, match=f"template {t.id} exists"):
        await store.create_template(replace(t, status=INACTIVE, name="again"))
    assert await store.get_template(t.id) == t


async def test_templates_listed_per_org_oldest_first(store: Store) -> None:
    mine = [template(status=INACTIVE, name=f"n{k}", at_ms=T0 + k) for k in range(4)]
    tied = [template(status=INACTIVE, name=f"tie{k}", at_ms=T0 + 10, id=f"id-{k}")
            for k in range(3)]
    for t in reversed(mine + tied):
        await store.create_template(t)
    theirs = template(org=OTHER_ORG)
    await store.create_template(theirs)
    assert await store.list_templates(ORG) == mine + tied  # ties: by id
    assert await store.list_templates(OTHER_ORG) == [theirs]
    assert await store.list_templates("nobody") == []


async def test_active_templates_of_every_org(store: Store) -> None:
    a = template((COAP,), at_ms=T0)
    b = template((UDP,), at_ms=T0 + 1)
    off = template((UDP, COAP), status=INACTIVE)
    c = template((UDP, COAP), org=OTHER_ORG)
    off_other = template((UDP,), status=INACTIVE, org=OTHER_ORG)
    for t in (a, b, off, c, off_other):
        await store.create_template(t)
    active = await store.active_templates()
    assert sorted(active, key=lambda t: t.id) == sorted([a, b, c], key=lambda t: t.id)


async def test_update_replaces_every_field(store: Store) -> None:
    t = template((COAP,))
    await store.create_template(t)
    changed = Template(id=t.id, org=t.org, name="renamed", template='[1, 2,  3]',
                       protocols=(UDP,), status=INACTIVE, created_ms=T0, updated_ms=T0 + 9)
    assert await store.update_template(changed) == changed
    assert await store.get_template(t.id) == changed
    assert await store.active_templates() == []
    assert await store.update_template(replace(t, id="missing")) is None
    assert await store.get_template("missing") is None
    assert await store.list_templates(ORG) == [changed]


async def test_create_conflicts_with_an_active_claim(store: Store) -> None:
    a = template((UDP, COAP))
    await store.create_template(a)
    b = template((COAP,))
    with pytest.raises(Conflict) as exc:
        await store.create_template(b)
    assert str(exc.value) == claimed(COAP, a)
    assert await store.get_template(b.id) is None
    with pytest.raises(Conflict) as exc:
        await store.create_template(template((UDP,)))
    assert str(exc.value) == claimed(UDP, a)
    # INACTIVE never claims; another organisation claims its own protocols
    inactive = template((UDP, COAP), status=INACTIVE, at_ms=T0 + 1)
    await store.create_template(inactive)
    theirs = template((UDP, COAP), org=OTHER_ORG)
    await store.create_template(theirs)
    assert await store.list_templates(ORG) == [a, inactive]


async def test_active_templates_without_protocols_never_conflict(store: Store) -> None:
    empty = [template(()) for _ in range(3)]
    for t in empty:
        await store.create_template(t)
    a = template((COAP,))
    await store.create_template(a)
    assert len(await store.active_templates()) == 4
    assert await store.update_template(replace(empty[0], name="still empty")) is not None


async def test_update_conflicts_with_an_active_claim(store: Store) -> None:
    a = template((COAP,), name="a")
    b = template((UDP, COAP), status=INACTIVE, name="b")
    await store.create_template(a)
    await store.create_template(b)
    with pytest.raises(Conflict) as exc:
        await store.update_template(replace(b, status=ACTIVE, updated_ms=T0 + 1))
    assert str(exc.value) == claimed(COAP, a)
    assert await store.get_template(b.id) == b  # unchanged
    # UDP alone is free
    b_udp = replace(b, protocols=(UDP,), status=ACTIVE, updated_ms=T0 + 2)
    assert await store.update_template(b_udp) == b_udp
    # deactivate a: b may claim COAP now, and a may not come back
    a_off = replace(a, status=INACTIVE, updated_ms=T0 + 3)
    assert await store.update_template(a_off) == a_off
    b_both = replace(b, status=ACTIVE, updated_ms=T0 + 4)
    assert await store.update_template(b_both) == b_both
    with pytest.raises(Conflict) as exc:
        await store.update_template(replace(a, updated_ms=T0 + 5))
    assert str(exc.value) == claimed(COAP, b)
    assert await store.get_template(a.id) == a_off
    # a new ACTIVE template is refused as well, an INACTIVE edit of a is not
    with pytest.raises(Conflict):
        await store.create_template(template((UDP,)))
    a_edit = replace(a_off, name="edited", protocols=(UDP, COAP))
    assert await store.update_template(a_edit) == a_edit


async def test_update_keeping_its_own_claim_is_no_conflict(store: Store) -> None:
    a = template((UDP,))
    await store.create_template(a)
    renamed = replace(a, name="renamed", updated_ms=T0 + 1)
    assert await store.update_template(renamed) == renamed
    widened = replace(a, protocols=(UDP, COAP), updated_ms=T0 + 2)
    assert await store.update_template(widened) == widened
    narrowed = replace(a, protocols=(COAP,), updated_ms=T0 + 3)
    assert await store.update_template(narrowed) == narrowed
    # the claim on UDP was released by the update, COAP is still held
    await store.create_template(template((UDP,)))
    with pytest.raises(Conflict) as exc:
        await store.create_template(template((COAP,)))
    assert str(exc.value) == claimed(COAP, a)


async def test_delete_frees_the_claims(store: Store) -> None:
    a = template((UDP, COAP))
    await store.create_template(a)
    assert await store.delete_template(a.id) is True
    assert await store.delete_template(a.id) is False
    assert await store.get_template(a.id) is None
    assert await store.list_templates(ORG) == []
    b = template((COAP,))
    c = template((UDP,))
    await store.create_template(b)
    await store.create_template(c)
    assert sorted(t.id for t in await store.active_templates()) == sorted([b.id, c.id])


async def test_concurrent_creates_claiming_one_protocol(store: Store) -> None:
    for round_ in range(3):
        racers = [template((COAP,), org=f"race{round_}", name=f"r{k}") for k in range(8)]
        outcomes = await asyncio.gather(*(create_outcome(store, t) for t in racers))
        assert outcomes.count(True) == 1
        winner = racers[outcomes.index(True)]
        assert await store.list_templates(f"race{round_}") == [winner]


async def test_concurrent_creates_between_two_stores(
    store: Store, open_store: StoreOpener
) -> None:
    other = await open_store()
    for round_ in range(5):
        org = f"race{round_}"
        mine, theirs = template((UDP, COAP), org=org), template((COAP,), org=org)
        outcomes = await asyncio.gather(create_outcome(store, mine),
                                        create_outcome(other, theirs))
        assert sorted(outcomes) == [False, True]
        winner = mine if outcomes[0] else theirs
        assert await store.list_templates(org) == [winner]
        assert await other.list_templates(org) == [winner]


async def test_concurrent_activations_between_two_stores(
    store: Store, open_store: StoreOpener
) -> None:
    other = await open_store()
    for round_ in range(5):
        org = f"race{round_}"
        a = template((UDP,), status=INACTIVE, org=org)
        b = template((UDP,), status=INACTIVE, org=org)
        await store.create_template(a)
        await store.create_template(b)

        async def activate(s: Store, t: Template) -> bool:
            try:
                return await s.update_template(replace(t, status=ACTIVE)) is not None
            except Conflict:
                return False

        outcomes = await asyncio.gather(activate(store, a), activate(other, b))
        assert sorted(outcomes) == [False, True]
        winner = (a if outcomes[0] else b).id
        active = [t for t in await other.active_templates() if t.org == org]
        assert [t.id for t in active] == [winner]


async def test_claims_survive_reopen(store: Store, open_store: StoreOpener) -> None:
    a = template((COAP,))
    await store.create_template(a)
    await store.close()
    again = await open_store()
    assert await again.get_template(a.id) == a
    with pytest.raises(Conflict) as exc:
        await again.create_template(template((COAP,)))
    assert str(exc.value) == claimed(COAP, a)


# -- SavingsRepository ---------------------------------------------------------------------


def saving(
    n: int, day: int = DAY, protocol: Protocol = UDP, original: int = 100, optimized: int = 10,
    org: str = ORG,
) -> Saving:
    return Saving(org=org, iccid=iccid(n), protocol=protocol, day=day,
                  original_bytes=original, optimized_bytes=optimized)


def record(s: Saving | None, k: int = 0) -> IngestRecord:
    n = int(s.iccid[-9:]) if s is not None else 99
    org = s.org if s is not None else ORG
    return IngestRecord((telemetry(n, T0 + k, f"m{k}".encode(), org=org),), saving=s)


async def submit_all(store: Store, records: Sequence[IngestRecord]) -> None:
    """`submit` every record at once (they share group commits), then await them all."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[None]] = []
    for r in records:
        fut: asyncio.Future[None] = loop.create_future()

        def done(exc: BaseException | None, fut: asyncio.Future[None] = fut) -> None:
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        store.submit(r, done)
        futures.append(fut)
    await asyncio.gather(*futures)


async def test_savings_add_up_over_appends_and_batches(store: Store) -> None:
    assert await store.savings(ORG, DAY, DAY) == SavingsTotals()
    await store.append(record(saving(1, original=120, optimized=12)))
    await store.append(record(saving(1, original=80, optimized=8), 1))
    assert await store.savings(ORG, DAY, DAY) == SavingsTotals(2, 200, 20)
    # 300 concurrent records: several group commits, many on the same counter, some
    # records without a saving in between
    records = [
        record(saving(k % 3, protocol=COAP if k % 2 else UDP, original=k, optimized=1)
               if k % 5 else None, k)
        for k in range(300)
    ]
    await submit_all(store, records)
    counted = [k for k in range(300) if k % 5]
    assert await store.savings(ORG, DAY, DAY) == SavingsTotals(
        2 + len(counted), 200 + sum(counted), 20 + len(counted))
    await asyncio.gather(*(store.append(record(saving(7, original=3, optimized=2), k))
                           for k in range(50)))
    assert await store.savings(ORG, DAY, DAY, iccid=iccid(7)) == SavingsTotals(50, 150, 100)


async def test_savings_written_with_registration_and_outside_the_saving_day(
    store: Store,
) -> None:
    reg = registration(1, T0)
    await store.append(IngestRecord((telemetry(1, T0),), registration=reg,
                                    saving=saving(1, day=DAY - 3)))
    assert await store.is_registered(iccid(1))
    assert await store.savings(ORG, DAY - 3, DAY - 3) == SavingsTotals(1, 100, 10)
    assert await store.savings(ORG, DAY, DAY) == SavingsTotals()


async def test_records_without_savings_write_no_counters(store: Store) -> None:
    await submit_all(store, [record(None, k) for k in range(20)])
    assert await store.savings(ORG, 0, DAY + 365) == SavingsTotals()
    assert await store.purge_savings(DAY + 365) == 0


async def test_savings_filters_and_day_range(store: Store) -> None:
    rows = [
        saving(1, DAY - 2, UDP, 1000, 100),
        saving(1, DAY - 1, UDP, 200, 20),
        saving(1, DAY - 1, COAP, 30, 3),
        saving(2, DAY - 1, UDP, 4, 1),
        saving(2, DAY, COAP, 50_000, 5_000),
        saving(1, DAY, UDP, 600, 60),
        saving(3, DAY + 1, UDP, 7, 7),
        saving(1, DAY - 1, UDP, 9, 9, org=OTHER_ORG),
    ]
    await submit_all(store, [record(s, k) for k, s in enumerate(rows)])
    s = store.savings
    assert await s(ORG, DAY - 2, DAY + 1) == SavingsTotals(7, 51_841, 5_191)
    assert await s(ORG, DAY - 1, DAY) == SavingsTotals(5, 50_834, 5_084)  # inclusive ends
    assert await s(ORG, DAY - 1, DAY - 1) == SavingsTotals(3, 234, 24)
    assert await s(ORG, DAY + 2, DAY + 9) == SavingsTotals()
    assert await s(ORG, DAY, DAY - 1) == SavingsTotals()
    assert await s(ORG, DAY - 2, DAY + 1, protocol=UDP) == SavingsTotals(5, 1_811, 188)
    assert await s(ORG, DAY - 2, DAY + 1, protocol=COAP) == SavingsTotals(2, 50_030, 5_003)
    assert await s(ORG, DAY - 2, DAY + 1, iccid=iccid(1)) == SavingsTotals(4, 1_830, 183)
    assert await s(ORG, DAY - 1, DAY, protocol=UDP, iccid=iccid(1)) == SavingsTotals(2, 800, 80)
    assert await s(ORG, DAY - 2, DAY + 1, protocol=COAP, iccid=iccid(3)) == SavingsTotals()
    assert await s(OTHER_ORG, DAY - 2, DAY + 1) == SavingsTotals(1, 9, 9)
    assert await s(OTHER_ORG, DAY, DAY) == SavingsTotals()
    assert await s("nobody", 0, DAY + 1) == SavingsTotals()


async def test_purge_savings_drops_days_before(store: Store) -> None:
    rows = [
        saving(1, DAY - 2), saving(1, DAY - 2), saving(2, DAY - 2, COAP),
        saving(1, DAY - 1), saving(1, DAY - 1, org=OTHER_ORG),
        saving(1, DAY), saving(2, DAY),
    ]
    await submit_all(store, [record(s, k) for k, s in enumerate(rows)])
    # counters: (DAY-2: 1/UDP, 2/COAP), (DAY-1: 1/UDP, other org 1/UDP), (DAY: 1, 2)
    assert await store.purge_savings(DAY - 2) == 0
    assert await store.purge_savings(DAY - 1) == 2
    assert await store.savings(ORG, 0, DAY + 1) == SavingsTotals(3, 300, 30)
    assert await store.purge_savings(DAY) == 2
    assert await store.savings(ORG, 0, DAY + 1) == SavingsTotals(2, 200, 20)
    assert await store.savings(OTHER_ORG, 0, DAY + 1) == SavingsTotals()
    # a purged day's counter starts again from zero
    await store.append(record(saving(1, DAY - 1)))
    assert await store.savings(ORG, DAY - 1, DAY - 1) == SavingsTotals(1, 100, 10)


async def test_savings_from_two_stores_add_up(store: Store, open_store: StoreOpener) -> None:
    other = await open_store()
    for round_ in range(3):
        await asyncio.gather(
            submit_all(store, [record(saving(1, original=1, optimized=1), k)
                               for k in range(40)]),
            submit_all(other, [record(saving(1, original=2, optimized=1), k)
                               for k in range(40)]),
        )
        n = 80 * (round_ + 1)
        assert await store.savings(ORG, DAY, DAY) == SavingsTotals(n, 120 * (round_ + 1), n)


# -- MongoDB adapter only ------------------------------------------------------------------


@pytest.fixture
async def mongo(mongo_url: str) -> AsyncIterator[tuple[str, str]]:
    """(server URL, fresh database name); the database is dropped afterwards."""
    database = fresh_database_name()
    yield mongo_url, database
    await drop_database(mongo_url, database)


async def test_mongo_claims_index(mongo: tuple[str, str]) -> None:
    server, database = mongo
    store = await MongoStore(with_database(server, database)).open()
    try:
        info = await store.db.templates.index_information()
        claims = info["claims"]
        assert claims["key"] == [("org", 1), ("claims", 1)]
        assert claims["unique"] is True
        assert dict(claims["partialFilterExpression"]) == {
            "status": "ACTIVE", "claims": {"$exists": True}}
        await store.create_template(template((UDP, COAP)))
        await store.create_template(template((UDP,), status=INACTIVE))
        await store.create_template(template(()))
        docs = [d async for d in store.db.templates.find({}).sort("created_ms", 1)]
        assert [d.get("claims") for d in docs] == [["UDP", "COAP"], None, None]
        assert (await store.db.savings.index_information())["org"]["key"] == [
            ("org", 1), ("day", 1)]
    finally:
        await store.close()


async def test_mongo_savings_upsert_retries_a_lost_insert_race(
    mongo: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upsert that loses the insert to another writer fails with a duplicate key
    (possible on MongoDB): it is retried, so no increment is lost."""
    server, database = mongo
    store = await MongoStore(with_database(server, database)).open()
    coll = store._coll
    failed: list[int] = []

    class LosesFirstUpsert:
        def __init__(self, real: AsyncCollection[dict[str, Any]]) -> None:
            self.real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        async def bulk_write(self, ops: list[UpdateOne], ordered: bool) -> object:
            if failed:
                return await self.real.bulk_write(ops, ordered=ordered)
            failed.append(len(ops))
            if ops[1:]:
                await self.real.bulk_write(ops[1:], ordered=ordered)
            raise BulkWriteError({"writeErrors": [{"index": 0, "code": 11000}],
                                  "writeConcernErrors": []})

    def patched(name: str) -> Any:
        return LosesFirstUpsert(coll(name)) if name == "savings" else coll(name)

    monkeypatch.setattr(store, "_coll", patched)
    try:
        await store.append(record(saving(1, original=5, optimized=1)))
        await submit_all(store, [record(saving(n, original=5, optimized=1), n)
                                 for n in (1, 2, 3)])
        assert failed == [1]
        assert await store.savings(ORG, DAY, DAY) == SavingsTotals(4, 20, 4)
        assert await store.savings(ORG, DAY, DAY, iccid=iccid(1)) == SavingsTotals(2, 10, 2)
    finally:
        await store.close()
