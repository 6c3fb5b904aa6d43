"""Storage contract for LwM2M registrations and observations and for Device Controller
requests (each test on SQLite and MongoDB): a client (ICCID) has at most one registration,
a replaced or deleted registration takes its observations with it; a device has at most
`max_scheduled` SCHEDULED requests, enforced atomically by the store, also between two
stores on the same database. The last sections hold adapter-only checks: the upgrade of an
SQLite file written before these tables existed, MongoDB's documents and indexes."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from simwire.errors import Conflict
from simwire.model import (
    DownlinkMode,
    DownlinkRequest,
    DownlinkStatus,
    Lwm2mObservation,
    Lwm2mRegistration,
    Protocol,
)
from simwire.ports import DownlinkQuery, Store
from simwire.storage.mongodb import MongoStore
from simwire.storage.sqlite import SqliteStore
from tests.storage.conftest import StoreOpener
from tests.storage.test_contract import ORG, OTHER_ORG, T0, iccid, ip, make_sim
from tests.storage.test_psk_contract import write_old_file
from tests.support.mongo import drop_database, fresh_database_name, with_database

SCHEDULED, IN_PROGRESS = DownlinkStatus.SCHEDULED, DownlinkStatus.IN_PROGRESS
SUCCEEDED, FAILED, CANCELLED = (
    DownlinkStatus.SUCCEEDED, DownlinkStatus.FAILED, DownlinkStatus.CANCELLED)
SEND_NOW, WHEN_ACTIVE = DownlinkMode.SEND_NOW, DownlinkMode.SEND_WHEN_ACTIVE
MAX = 10
DAY_MS = 86_400_000
LINKS = '</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>;ver=1.1,</3303/0>,</3303/1>;title="°C ✓"'
REQUEST_DATA: dict[str, Any] = {
    "payload": "aGVsbG8=", "payloadType": "BASE64", "port": 3000, "requestMode": "SEND_NOW",
    "sendAttempts": 3, "iccid": iccid(1), "note": "°C ✓ \u0000 \"quoted\"",
    "nested": {"list": [1, 2.5, None, True, False, "x", {"deep": []}], "empty": {}},
    "ratio": 0.1, "big": 2**53 + 1, "negative": -7,
}


def reg(
    n: int = 1, id: str | None = None, at_ms: int = T0, org: str = ORG, **kw: Any,
) -> Lwm2mRegistration:
    fields: dict[str, Any] = {
        "id": id or f"rd-{uuid.uuid4().hex[:10]}", "iccid": iccid(n), "org": org,
        "ip": ip(n), "port": 56830 + n, "secure": True, "lifetime_s": 86_400,
        "version": "1.1", "binding": "UQ", "queue_mode": True, "links": LINKS,
        "registered_ms": at_ms, "updated_ms": at_ms,
    }
    fields.update(kw)
    return Lwm2mRegistration(**fields)


def obs(
    token: bytes, registration: Lwm2mRegistration, at_ms: int = T0,
    path: str = "/3303/0/5700", content_format: int | None = 11543,
) -> Lwm2mObservation:
    return Lwm2mObservation(token=token, iccid=registration.iccid,
                            registration_id=registration.id, path=path, created_ms=at_ms,
                            content_format=content_format)


def downlink(
    n: int = 1, status: DownlinkStatus = SCHEDULED, mode: DownlinkMode = WHEN_ACTIVE,
    org: str = ORG, at_ms: int = T0, id: str | None = None, **kw: Any,
) -> DownlinkRequest:
    fields: dict[str, Any] = {
        "id": id or str(uuid.uuid4()), "org": org, "iccid": iccid(n), "ip": ip(n),
        "protocol": Protocol.UDP, "mode": mode, "status": status,
        "request_data": {"payload": f"request of {n}", "port": 3000}, "send_attempts": 3,
        "attempts_left": 3, "created_ms": at_ms, "updated_ms": at_ms,
        "expires_ms": at_ms + DAY_MS,
    }
    fields.update(kw)
    return DownlinkRequest(**fields)


async def fill(store: Store, n: int, count: int, max_scheduled: int = MAX,
               **kw: Any) -> list[DownlinkRequest]:
    """`count` SCHEDULED requests of device `n`, created one after the other (all accepted)."""
    made = [downlink(n, at_ms=T0 + k, **kw) for k in range(count)]
    for d in made:
        assert await store.create_downlink(d, max_scheduled) is True
    return made


async def scheduled_ids(store: Store, n: int) -> list[str]:
    return [d.id for d in await store.scheduled_downlinks(iccid(n))]


# -- registrations -------------------------------------------------------------------------


async def test_registration_round_trip_keeps_every_field(store: Store) -> None:
    a = reg(1, at_ms=T0)
    b = reg(2, org=OTHER_ORG, port=0, secure=False, lifetime_s=30, version="1.0",
            binding="U", queue_mode=False, links="", registered_ms=T0 - 5, updated_ms=T0 + 9)
    c = reg(3, port=65535, ip="2001:db8::1", binding="UQS", lifetime_s=2**31)
    for r in (c, a, b):
        await store.put_registration(r)
    assert await store.get_registration(a.id) == a
    got_b = await store.get_registration(b.id)
    assert got_b == b
    assert got_b is not None and (got_b.secure, got_b.queue_mode) == (False, False)
    assert type(got_b.secure) is bool and type(got_b.queue_mode) is bool
    assert got_b.expires_ms == T0 + 9 + 30_000
    assert await store.registration_of(iccid(3)) == c
    assert await store.registration_of(iccid(1)) == a
    assert await store.get_registration("missing") is None
    assert await store.registration_of(iccid(4)) is None
    assert await store.all_registrations() == [a, b, c]  # every organisation's, by ICCID


async def test_put_registration_replaces_by_id_and_keeps_its_observations(
    store: Store,
) -> None:
    r = reg(1)
    await store.put_registration(r)
    o = obs(b"\x01\x02", r)
    await store.put_observation(o)
    updated = replace(r, ip=ip(9), port=1, lifetime_s=60, queue_mode=False, links="</3/0>",
                      updated_ms=T0 + 100)
    await store.put_registration(updated)
    assert await store.get_registration(r.id) == updated
    assert await store.registration_of(iccid(1)) == updated
    assert await store.all_registrations() == [updated]
    assert await store.observations_of(r.id) == [o]


async def test_a_new_registration_replaces_the_iccids_previous_one_and_its_observations(
    store: Store,
) -> None:
    old, other = reg(1), reg(2)
    await store.put_registration(old)
    await store.put_registration(other)
    old_obs = [obs(b"\x01", old), obs(b"\x02", old, at_ms=T0 + 1)]
    other_obs = obs(b"\x03", other)
    for o in (*old_obs, other_obs):
        await store.put_observation(o)
    new = reg(1, at_ms=T0 + 50, port=40000)
    await store.put_registration(new)
    assert await store.get_registration(old.id) is None
    assert await store.registration_of(iccid(1)) == new
    assert await store.get_registration(new.id) == new
    assert await store.all_registrations() == [new, other]
    assert await store.observations_of(old.id) == []
    assert await store.observations_of(new.id) == []
    assert await store.delete_observation(b"\x01") is False  # gone, not just hidden
    assert await store.observations_of(other.id) == [other_obs]
    # the new registration starts its own observations
    await store.put_observation(obs(b"\x04", new))
    assert await store.observations_of(new.id) == [obs(b"\x04", new)]


async def test_a_registration_id_written_for_another_iccid_moves(store: Store) -> None:
    """Upsert by id: the id's row now holds the other ICCID; that ICCID's previous
    registration is replaced (with its observations), the id's observations stay."""
    x, y = reg(1), reg(2)
    await store.put_registration(x)
    await store.put_registration(y)
    x_obs, y_obs = obs(b"\x0a", x), obs(b"\x0b", y)
    await store.put_observation(x_obs)
    await store.put_observation(y_obs)
    moved = replace(x, iccid=iccid(2), ip=ip(2), updated_ms=T0 + 1)
    await store.put_registration(moved)
    assert await store.registration_of(iccid(1)) is None
    assert await store.registration_of(iccid(2)) == moved
    assert await store.get_registration(x.id) == moved
    assert await store.get_registration(y.id) is None
    assert await store.all_registrations() == [moved]
    assert await store.observations_of(x.id) == [x_obs]
    assert await store.observations_of(y.id) == []


async def test_delete_registration_deletes_its_observations(store: Store) -> None:
    a, b = reg(1), reg(2)
    await store.put_registration(a)
    await store.put_registration(b)
    a_obs = [obs(bytes([k]), a, at_ms=T0 + k) for k in range(3)]
    b_obs = obs(b"\xff", b)
    for o in (*a_obs, b_obs):
        await store.put_observation(o)
    assert await store.delete_registration(a.id) is True
    assert await store.get_registration(a.id) is None
    assert await store.registration_of(iccid(1)) is None
    assert await store.observations_of(a.id) == []
    assert [await store.delete_observation(o.token) for o in a_obs] == [False] * 3
    assert await store.delete_registration(a.id) is False
    assert await store.delete_registration("missing") is False
    assert await store.all_registrations() == [b]
    assert await store.observations_of(b.id) == [b_obs]


async def test_concurrent_registrations_of_one_client_leave_one(store: Store) -> None:
    for n in range(3):
        racers = [reg(n, at_ms=T0 + k) for k in range(20)]
        await asyncio.gather(*(store.put_registration(r) for r in racers))
        kept = await store.registration_of(iccid(n))
        assert kept in racers
        assert [await store.get_registration(r.id) for r in racers].count(None) == 19
    assert [r.iccid for r in await store.all_registrations()] == [iccid(n) for n in range(3)]


async def test_concurrent_registrations_between_two_stores_leave_one(
    store: Store, open_store: StoreOpener,
) -> None:
    other = await open_store()
    for n in range(5):
        mine = [reg(n, at_ms=T0 + k) for k in range(5)]
        theirs = [reg(n, at_ms=T0 + 10 + k) for k in range(5)]
        await asyncio.gather(*(
            s.put_registration(r) for pair in zip(mine, theirs, strict=True)
            for s, r in ((store, pair[0]), (other, pair[1]))
        ))
        kept = await store.registration_of(iccid(n))
        assert kept in (*mine, *theirs)
        assert await other.registration_of(iccid(n)) == kept
        assert [r for r in await other.all_registrations() if r.iccid == iccid(n)] == [kept]


# -- observations --------------------------------------------------------------------------


async def test_observation_round_trip_and_replace_by_token(store: Store) -> None:
    r = reg(1)
    await store.put_registration(r)
    every_byte = bytes(range(256))
    a = obs(every_byte, r, content_format=None, path="/3/0")
    b = obs(b"\x00", r, at_ms=T0 + 1, content_format=0, path="/3303/0/5700")
    c = obs(b"\x00\x00", r, at_ms=T0 + 2, content_format=65535, path="/")
    for o in (a, b, c):
        await store.put_observation(o)
    got = await store.observations_of(r.id)
    assert got == [a, b, c]
    assert [type(o.token) for o in got] == [bytes] * 3
    assert got[0].token == every_byte and got[0].content_format is None
    # same token again: replaced (and it moves to its new time)
    again = obs(b"\x00", r, at_ms=T0 + 5, path="/3303/1/5700", content_format=11542)
    await store.put_observation(again)
    assert await store.observations_of(r.id) == [a, c, again]
    assert await store.delete_observation(b"\x00") is True
    assert await store.delete_observation(b"\x00") is False
    assert await store.delete_observation(b"\x00\x00\x00") is False
    assert await store.observations_of(r.id) == [a, c]
    assert await store.observations_of("missing") == []


async def test_observations_oldest_first_ties_by_token(store: Store) -> None:
    r, s = reg(1), reg(2)
    await store.put_registration(r)
    await store.put_registration(s)
    # ties on created_ms: shorter token first, then bytewise (MongoDB's binary order)
    tokens = [b"\x00", b"\x01", b"\xff", b"\x00\x00", b"\x00\x01", b"\x01\x00\x00\x00"]
    tied = [obs(t, r, at_ms=T0 + 5) for t in tokens]
    early, late = obs(b"\xff\xff\xff\xff\xff\xff\xff\xff", r, at_ms=T0), obs(b"\x00\x07", r,
                                                                          at_ms=T0 + 9)
    for o in (late, *reversed(tied), early, obs(b"\x42", s, at_ms=T0 - 1)):
        await store.put_observation(o)
    assert await store.observations_of(r.id) == [early, *tied, late]
    assert await store.observations_of(s.id) == [obs(b"\x42", s, at_ms=T0 - 1)]


# -- downlinks: round trip and updates -----------------------------------------------------


async def test_downlink_round_trip_keeps_every_field(store: Store) -> None:
    a = downlink(1, status=IN_PROGRESS, mode=SEND_NOW, request_data=REQUEST_DATA,
                 send_attempts=5, attempts_left=2, created_ms=T0 - 3, updated_ms=T0 + 4,
                 expires_ms=T0 + 7, result_data={"ack": True, "code": "2.04", "n": [1.5]},
                 error="timeout", protocol=Protocol.COAP)
    b = downlink(2, org=OTHER_ORG, request_data={}, protocol=Protocol.LWM2M)
    c = downlink(3, status=SUCCEEDED, result_data={}, send_attempts=1, attempts_left=0)
    for d in (a, b, c):
        assert await store.create_downlink(d, MAX) is True
    got = await store.get_downlink(a.id)
    assert got == a
    assert got is not None and got.request_data == REQUEST_DATA
    assert got.request_data["big"] == 2**53 + 1 and type(got.request_data["ratio"]) is float
    assert await store.get_downlink(b.id) == b
    stored_c = await store.get_downlink(c.id)
    assert stored_c == c and stored_c is not None and stored_c.result_data == {}
    assert b.result_data is None and b.error is None
    assert await store.get_downlink("missing") is None


async def test_duplicate_downlink_id_is_a_conflict(store: Store) -> None:
    scheduled = downlink(1)
    done = downlink(1, status=SUCCEEDED)
    assert await store.create_downlink(scheduled, MAX) is True
    assert await store.create_downlink(done, MAX) is True
    with pytest.raises(Conflict, match=f"downlink {scheduled.id} exists"):
        await store.create_downlink(replace(scheduled, org=OTHER_ORG), MAX)
    with pytest.raises(Conflict, match=f"downlink {done.id} exists"):
        await store.create_downlink(replace(done, iccid=iccid(2), status=SCHEDULED), MAX)
    with pytest.raises(Conflict):
        await store.create_downlink(replace(scheduled, status=FAILED), MAX)
    assert await store.get_downlink(scheduled.id) == scheduled
    assert await store.get_downlink(done.id) == done
    # the refused duplicate took no slot
    await fill(store, 1, MAX - 1)
    assert await store.create_downlink(downlink(1), MAX) is False


async def test_update_downlink_replaces_the_status_fields_only(store: Store) -> None:
    d = downlink(1, request_data=REQUEST_DATA)
    assert await store.create_downlink(d, MAX)
    running = replace(d, status=IN_PROGRESS, attempts_left=2, updated_ms=T0 + 1)
    await store.update_downlink(running)
    assert await store.get_downlink(d.id) == running
    final = replace(running, status=SUCCEEDED, attempts_left=1,
                    result_data={"ack": "2.04", "°C": [1, None]}, error=None,
                    updated_ms=T0 + 2)
    # everything else is kept as created
    await store.update_downlink(replace(
        final, org=OTHER_ORG, iccid=iccid(2), ip=ip(2), protocol=Protocol.COAP,
        mode=SEND_NOW, request_data={"other": 1}, send_attempts=9, created_ms=0,
        expires_ms=1))
    assert await store.get_downlink(d.id) == final
    failed = replace(final, status=FAILED, result_data=None, error="device unreachable",
                     updated_ms=T0 + 3)
    await store.update_downlink(failed)
    assert await store.get_downlink(d.id) == failed
    # an absent request is not created
    await store.update_downlink(downlink(1, id="missing"))
    assert await store.get_downlink("missing") is None


# -- downlinks: the SCHEDULED limit --------------------------------------------------------


async def test_the_eleventh_scheduled_request_is_refused(store: Store) -> None:
    ten = await fill(store, 1, MAX)
    refused = downlink(1, at_ms=T0 + 100)
    assert await store.create_downlink(refused, MAX) is False
    assert await store.get_downlink(refused.id) is None  # nothing inserted
    assert await scheduled_ids(store, 1) == [d.id for d in ten]
    assert (await store.list_downlinks(DownlinkQuery(ORG, page_size=100))).items == ten[::-1]
    # per device: another device, another organisation's device, are not limited by it
    assert await store.create_downlink(downlink(2), MAX) is True
    assert await store.create_downlink(downlink(3, org=OTHER_ORG), MAX) is True
    # the limit is the caller's: a larger one admits more, a smaller one refuses
    assert await store.create_downlink(downlink(2), 1) is False
    assert await store.create_downlink(downlink(1), MAX + 1) is True
    assert await store.create_downlink(downlink(1), MAX + 1) is False
    assert await store.create_downlink(downlink(4), 0) is False


async def test_requests_created_in_another_status_are_never_limited(store: Store) -> None:
    """The limit counts SCHEDULED requests (the port's contract: by status, whatever the
    mode): a request created IN_PROGRESS (a SEND_NOW sent at once) is never refused and
    takes no slot; a SEND_NOW request created SCHEDULED is limited like any other."""
    await fill(store, 1, MAX)
    now = [downlink(1, status=IN_PROGRESS, mode=SEND_NOW, at_ms=T0 + 20 + k)
           for k in range(15)]
    for d in now:
        assert await store.create_downlink(d, MAX) is True
    for status in (SUCCEEDED, FAILED, CANCELLED):
        assert await store.create_downlink(downlink(1, status=status), MAX) is True
    assert await store.create_downlink(downlink(1, mode=SEND_NOW), MAX) is False
    assert len(await scheduled_ids(store, 1)) == MAX
    total = await store.list_downlinks(DownlinkQuery(ORG, iccid=iccid(1), page_size=100))
    assert len(total.items) == MAX + 15 + 3
    # none of them holds a slot: on another device they leave all ten free
    for d in [downlink(2, status=IN_PROGRESS, mode=SEND_NOW) for _ in range(3)]:
        assert await store.create_downlink(d, MAX) is True
    await fill(store, 2, MAX)


async def test_a_request_leaving_scheduled_frees_a_slot(store: Store) -> None:
    ten = await fill(store, 1, MAX)
    # staying SCHEDULED (attempts changed) frees nothing
    await store.update_downlink(replace(ten[0], attempts_left=1, updated_ms=T0 + 50))
    assert await store.create_downlink(downlink(1), MAX) is False
    for k, status in enumerate((IN_PROGRESS, SUCCEEDED, FAILED, CANCELLED)):
        await store.update_downlink(replace(ten[k], status=status, updated_ms=T0 + 60))
        extra = downlink(1, at_ms=T0 + 100 + k)
        assert await store.create_downlink(extra, MAX) is True
        assert await store.create_downlink(downlink(1), MAX) is False
    assert len(await scheduled_ids(store, 1)) == MAX
    # a later update of a finished request frees nothing more
    await store.update_downlink(replace(ten[1], status=FAILED, updated_ms=T0 + 70))
    assert await store.create_downlink(downlink(1), MAX) is False


async def test_a_request_put_back_to_scheduled_counts_again(store: Store) -> None:
    ten = await fill(store, 1, MAX)
    await store.update_downlink(replace(ten[0], status=IN_PROGRESS))
    assert await store.create_downlink(replace(downlink(1), id="eleventh"), MAX) is True
    await store.update_downlink(replace(ten[0], status=SCHEDULED))  # not refused: no limit
    assert len(await scheduled_ids(store, 1)) == MAX + 1
    assert await store.create_downlink(downlink(1), MAX) is False
    await store.update_downlink(replace(ten[1], status=CANCELLED))
    assert await store.create_downlink(downlink(1), MAX) is False  # still ten
    await store.update_downlink(replace(ten[0], status=SUCCEEDED))
    assert await store.create_downlink(downlink(1), MAX) is True


async def test_expired_and_purged_requests_free_their_slots(store: Store) -> None:
    ten = await fill(store, 1, MAX, expires_ms=T0 + 1000)
    assert await store.expire_downlinks(T0 + 1000) == MAX
    again = await fill(store, 1, MAX, expires_ms=T0 + 5000)
    assert await store.create_downlink(downlink(1), MAX) is False
    # the purge drops the first ten (expired) and the second ten (still SCHEDULED)
    assert await store.purge_downlinks(T0 + MAX) == 2 * MAX
    assert await store.get_downlink(ten[0].id) is None
    assert await store.get_downlink(again[0].id) is None
    await fill(store, 1, MAX)


async def test_concurrent_scheduled_creates_accept_exactly_the_limit(store: Store) -> None:
    for n in range(3):
        await fill(store, n, n)  # some slots taken already
        racers = [downlink(n, at_ms=T0 + 100 + k) for k in range(20)]
        outcomes = await asyncio.gather(*(store.create_downlink(d, MAX) for d in racers))
        assert outcomes.count(True) == MAX - n
        accepted = {d.id for d, ok in zip(racers, outcomes, strict=True) if ok}
        stored = {d.id for d in racers if await store.get_downlink(d.id) is not None}
        assert stored == accepted
        assert len(await scheduled_ids(store, n)) == MAX


async def test_concurrent_creates_on_many_devices(store: Store) -> None:
    racers = [downlink(n, at_ms=T0 + k) for k in range(12) for n in range(5)]
    outcomes = await asyncio.gather(*(store.create_downlink(d, MAX) for d in racers))
    assert outcomes.count(True) == 5 * MAX
    for n in range(5):
        assert len(await scheduled_ids(store, n)) == MAX


async def test_concurrent_creates_between_two_stores(
    store: Store, open_store: StoreOpener,
) -> None:
    other = await open_store()
    for n in range(3):
        mine = [downlink(n, at_ms=T0 + k) for k in range(10)]
        theirs = [downlink(n, at_ms=T0 + 10 + k) for k in range(10)]
        outcomes = await asyncio.gather(*(
            s.create_downlink(d, MAX) for pair in zip(mine, theirs, strict=True)
            for s, d in ((store, pair[0]), (other, pair[1]))
        ))
        assert outcomes.count(True) == MAX
        assert len(await scheduled_ids(other, n)) == MAX
        assert len(await scheduled_ids(store, n)) == MAX


async def test_concurrent_creates_while_requests_leave_scheduled(
    store: Store, open_store: StoreOpener,
) -> None:
    other = await open_store()
    ten = await fill(store, 1, MAX)
    leaving = [other.update_downlink(replace(d, status=SUCCEEDED)) for d in ten[:5]]
    creates = [(store if k % 2 else other).create_downlink(downlink(1, at_ms=T0 + 50 + k), MAX)
               for k in range(20)]
    results = await asyncio.gather(*creates, *leaving)
    accepted = results[:20].count(True)
    assert accepted <= 5
    assert len(await scheduled_ids(store, 1)) == MAX - 5 + accepted
    # whatever the interleaving, the slots left are usable up to the limit
    await fill(store, 1, 5 - accepted)
    assert await store.create_downlink(downlink(1), MAX) is False


# -- downlinks: queries, expiry, purge -----------------------------------------------------


async def test_downlinks_listed_newest_first_filtered_and_paged(store: Store) -> None:
    mine = [downlink(1 + k % 2, status=SCHEDULED if k % 3 else SUCCEEDED, at_ms=T0 + k)
            for k in range(7)]
    tied = [downlink(1, status=FAILED, at_ms=T0 + 10, id=f"tie-{k}") for k in range(3)]
    theirs = [downlink(1, org=OTHER_ORG, at_ms=T0 + k) for k in range(4)]
    for d in (*tied, *reversed(mine), *theirs):
        assert await store.create_downlink(d, MAX)
    newest_first = [*reversed(tied), *reversed(mine)]  # ties: id descending
    page = await store.list_downlinks(DownlinkQuery(ORG, page_size=100))
    assert (page.items, page.page, page.page_amount) == (newest_first, 1, 1)
    pages = [await store.list_downlinks(DownlinkQuery(ORG, page=p, page_size=4))
             for p in (1, 2, 3, 4)]
    assert [p.items for p in pages] == [newest_first[0:4], newest_first[4:8],
                                        newest_first[8:10], []]
    assert [(p.page, p.page_amount) for p in pages] == [(1, 3), (2, 3), (3, 3), (4, 3)]
    exact = await store.list_downlinks(DownlinkQuery(ORG, page_size=10))
    assert (len(exact.items), exact.page_amount) == (10, 1)
    # filters: device, status, both; always within the organisation
    by_device = await store.list_downlinks(DownlinkQuery(ORG, iccid=iccid(1), page_size=100))
    assert by_device.items == [d for d in newest_first if d.iccid == iccid(1)]
    by_status = await store.list_downlinks(DownlinkQuery(ORG, status=SCHEDULED,
                                                         page_size=100))
    assert by_status.items == [d for d in newest_first if d.status is SCHEDULED]
    both = await store.list_downlinks(DownlinkQuery(ORG, iccid=iccid(1), status=SUCCEEDED,
                                                    page_size=1))
    expected = [d for d in newest_first if d.iccid == iccid(1) and d.status is SUCCEEDED]
    assert len(expected) == 2 and (both.items, both.page_amount) == (expected[:1], 2)
    other = await store.list_downlinks(DownlinkQuery(OTHER_ORG, iccid=iccid(1),
                                                     page_size=100))
    assert other.items == theirs[::-1]
    for empty in (await store.list_downlinks(DownlinkQuery("nobody")),
                  await store.list_downlinks(DownlinkQuery(ORG, iccid=iccid(9))),
                  await store.list_downlinks(DownlinkQuery(ORG, status=CANCELLED))):
        assert (empty.items, empty.page, empty.page_amount) == ([], 1, 1)


async def test_scheduled_downlinks_of_a_device_oldest_first(store: Store) -> None:
    tied = [downlink(1, at_ms=T0 + 5, id=f"tie-{k}") for k in (2, 0, 1)]
    early, late = downlink(1, at_ms=T0), downlink(1, at_ms=T0 + 9)
    for d in (late, *tied, early):
        assert await store.create_downlink(d, MAX)
    elsewhere = downlink(1, org=OTHER_ORG, at_ms=T0 + 2)  # a device is its ICCID
    for d in (downlink(1, status=IN_PROGRESS, at_ms=T0 + 1),
              downlink(1, status=SUCCEEDED, at_ms=T0 + 1), downlink(2, at_ms=T0 + 1),
              elsewhere):
        assert await store.create_downlink(d, MAX)
    got = await store.scheduled_downlinks(iccid(1))
    assert [d.id for d in got] == [early.id, elsewhere.id, "tie-0", "tie-1", "tie-2", late.id]
    assert got[0] == early and got[1] == elsewhere
    assert await store.scheduled_downlinks(iccid(9)) == []


async def test_expire_downlinks(store: Store) -> None:
    now = T0 + 1000
    past = downlink(1, expires_ms=now - 1, attempts_left=2, result_data={"x": 1})
    exactly = downlink(2, expires_ms=now)
    future = downlink(1, expires_ms=now + 1)
    other_org = downlink(3, org=OTHER_ORG, expires_ms=now - 500)
    running = downlink(1, status=IN_PROGRESS, expires_ms=now - 1)
    done = downlink(1, status=SUCCEEDED, expires_ms=now - 1)
    for d in (past, exactly, future, other_org, running, done):
        assert await store.create_downlink(d, MAX)
    assert await store.expire_downlinks(now) == 3
    for d in (past, exactly, other_org):
        assert await store.get_downlink(d.id) == replace(
            d, status=FAILED, error="expired", updated_ms=now)
    for d in (future, running, done):
        assert await store.get_downlink(d.id) == d
    assert await store.expire_downlinks(now) == 0
    assert [d.id for d in await store.scheduled_downlinks(iccid(1))] == [future.id]
    assert await store.expire_downlinks(now + 1) == 1
    assert await store.scheduled_downlinks(iccid(1)) == []


async def test_purge_downlinks(store: Store) -> None:
    old = [downlink(1, status=s, at_ms=T0 - 10 + k)
           for k, s in enumerate((SCHEDULED, IN_PROGRESS, SUCCEEDED, FAILED, CANCELLED))]
    kept = [downlink(1, at_ms=T0), downlink(2, org=OTHER_ORG, at_ms=T0 + 1)]
    for d in (*old, *kept):
        assert await store.create_downlink(d, MAX)
    assert await store.purge_downlinks(T0) == len(old)  # created before: strictly
    assert [await store.get_downlink(d.id) for d in old] == [None] * len(old)
    assert [await store.get_downlink(d.id) for d in kept] == kept
    assert await store.purge_downlinks(T0) == 0
    assert await store.purge_downlinks(T0 + 2) == 2


# -- persistence ---------------------------------------------------------------------------


async def test_everything_survives_reopen(store: Store, open_store: StoreOpener) -> None:
    r = reg(1)
    await store.put_registration(r)
    o = obs(b"\x00\xfe", r)
    await store.put_observation(o)
    ten = await fill(store, 1, MAX, request_data=REQUEST_DATA)
    done = downlink(2, status=SUCCEEDED, result_data={"ok": True})
    assert await store.create_downlink(done, MAX)
    await store.close()
    again = await open_store()
    assert await again.all_registrations() == [r]
    assert await again.get_registration(r.id) == r
    assert await again.observations_of(r.id) == [o]
    assert await again.scheduled_downlinks(iccid(1)) == ten
    assert await again.get_downlink(done.id) == done
    assert await again.create_downlink(downlink(1), MAX) is False  # the limit holds
    await again.update_downlink(replace(ten[0], status=CANCELLED))
    assert await again.create_downlink(downlink(1), MAX) is True


# -- SQLite adapter only -------------------------------------------------------------------


async def test_sqlite_old_file_gets_the_new_tables(tmp_path: Path) -> None:
    path = tmp_path / "simwire.db"
    write_old_file(path)
    store = await SqliteStore(path).open()
    try:
        assert await store.get(iccid(1)) == make_sim(1)
        r = reg(1)
        await store.put_registration(r)
        await store.put_observation(obs(b"\x01", r))
        await fill(store, 1, MAX)
        assert await store.create_downlink(downlink(1), MAX) is False
    finally:
        await store.close()
    again = await SqliteStore(path).open()
    try:
        assert await again.registration_of(iccid(1)) == r
        assert len(await again.scheduled_downlinks(iccid(1))) == MAX
    finally:
        await again.close()


# -- MongoDB adapter only ------------------------------------------------------------------


@pytest.fixture
async def mongo(mongo_url: str) -> AsyncIterator[MongoStore]:
    """A MongoStore on a fresh database, dropped afterwards."""
    database = fresh_database_name()
    store = await MongoStore(with_database(mongo_url, database)).open()
    try:
        yield store
    finally:
        await store.close()
        await drop_database(mongo_url, database)


async def test_mongo_documents_and_indexes(mongo: MongoStore) -> None:
    db = mongo.db
    regs = await db.lwm2m_registrations.index_information()
    assert regs["id"]["key"] == [("id", 1)] and regs["id"]["unique"] is True
    observations = await db.lwm2m_observations.index_information()
    assert observations["registration"]["key"] == [
        ("registration_id", 1), ("created_ms", 1), ("_id", 1)]
    info = await db.downlinks.index_information()
    assert info["slot"]["key"] == [("iccid", 1), ("slot", 1)]
    assert info["slot"]["unique"] is True
    assert dict(info["slot"]["partialFilterExpression"]) == {"slot": {"$exists": True}}
    assert info["org"]["key"] == [("org", 1), ("created_ms", 1), ("_id", 1)]
    r = reg(1)
    await mongo.put_registration(r)
    doc = await db.lwm2m_registrations.find_one({"_id": iccid(1)})
    assert doc is not None and doc["id"] == r.id
    await mongo.put_observation(obs(b"\x00\xff", r))
    o = await db.lwm2m_observations.find_one({})
    assert o is not None and type(o["_id"]) is bytes and o["_id"] == b"\x00\xff"
    d = downlink(1, request_data=REQUEST_DATA)
    assert await mongo.create_downlink(d, MAX)
    stored = await db.downlinks.find_one({"_id": d.id})
    assert stored is not None and stored["request_data"] == REQUEST_DATA  # a document
    assert stored["slot"] in range(MAX)
    await mongo.update_downlink(replace(d, attempts_left=1))
    kept = await db.downlinks.find_one({"_id": d.id})
    assert kept is not None and kept["slot"] == stored["slot"]
    await mongo.update_downlink(replace(d, status=IN_PROGRESS))
    assert "slot" not in (await db.downlinks.find_one({"_id": d.id}) or {"slot": 0})
    e = downlink(1, expires_ms=T0)
    assert await mongo.create_downlink(e, MAX)
    assert await mongo.expire_downlinks(T0) == 1
    assert "slot" not in (await db.downlinks.find_one({"_id": e.id}) or {"slot": 0})
    now = downlink(1, status=IN_PROGRESS)
    assert await mongo.create_downlink(now, MAX)
    assert "slot" not in (await db.downlinks.find_one({"_id": now.id}) or {"slot": 0})


async def test_mongo_creates_racing_for_the_same_slot(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every racer tries the lowest free slot: most inserts hit the unique index and retry,
    and still exactly `MAX` are accepted, in slots 0 .. MAX - 1."""
    monkeypatch.setattr(random, "choice", min)  # the adapter's pick of a free slot
    racers = [downlink(1, at_ms=T0 + k) for k in range(20)]
    outcomes = await asyncio.gather(*(mongo.create_downlink(d, MAX) for d in racers))
    assert outcomes.count(True) == MAX
    slots = sorted([d["slot"] async for d in mongo.db.downlinks.find({})])
    assert slots == list(range(MAX))


async def test_mongo_create_retries_after_a_stale_read(
    mongo: MongoStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read that does not show the requests holding slots yet (SecantusDB may report a
    duplicate key before the winner is visible): the create learns the slots from the
    duplicate keys and still finds the free one, or refuses once the read shows the limit."""
    monkeypatch.setattr(random, "choice", min)  # the adapter's pick of a free slot
    await fill(mongo, 1, MAX - 1)
    real = mongo._coll
    stale_reads: list[int] = []

    class StaleFind:
        def __init__(self, coll: Any) -> None:
            self.real = coll

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        def find(self, *args: Any, **kw: Any) -> Any:
            if len(stale_reads) < 4:
                stale_reads.append(1)
                return self.real.find({"_id": "none"})
            return self.real.find(*args, **kw)

    monkeypatch.setattr(mongo, "_coll",
                        lambda name: StaleFind(real(name)) if name == "downlinks" else real(name))
    last = downlink(1, at_ms=T0 + 50)
    assert await mongo.create_downlink(last, MAX) is True
    assert len(stale_reads) == 4
    stored = await mongo.db.downlinks.find_one({"_id": last.id})
    assert stored is not None and stored["slot"] == MAX - 1
    stale_reads.clear()
    assert await mongo.create_downlink(downlink(1), MAX) is False
    assert len(await mongo.scheduled_downlinks(iccid(1))) == MAX


async def test_update_downlink_compare_and_set_on_status(store: Store) -> None:
    d = downlink(1)
    assert await store.create_downlink(d, MAX)
    claimed = replace(d, status=DownlinkStatus.IN_PROGRESS, updated_ms=T0 + 1)
    cancelled = replace(d, status=DownlinkStatus.CANCELLED, updated_ms=T0 + 2)
    # a delivery and a cancel race for the SCHEDULED request: exactly one wins
    results = await asyncio.gather(store.update_downlink(claimed, SCHEDULED),
                                   store.update_downlink(cancelled, SCHEDULED))
    assert sorted(results) == [False, True]
    stored = await store.get_downlink(d.id)
    assert stored is not None
    assert stored.status is (DownlinkStatus.IN_PROGRESS if results[0]
                             else DownlinkStatus.CANCELLED)
    assert await store.update_downlink(replace(d, status=DownlinkStatus.FAILED)) is True
    assert await store.update_downlink(replace(d, id="absent")) is False


async def test_devices_with_scheduled(store: Store) -> None:
    await fill(store, 1, 2)
    await fill(store, 2, 1)
    done = downlink(3)
    assert await store.create_downlink(done, MAX)
    await store.update_downlink(replace(done, status=DownlinkStatus.SUCCEEDED))
    assert await store.devices_with_scheduled() == {iccid(1), iccid(2)}
