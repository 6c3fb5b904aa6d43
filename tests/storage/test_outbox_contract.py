"""Storage contract for integrations and the outbox (each test on SQLite and MongoDB): the
ingest write queues each event for every subscribed integration of its organisation."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import replace

import pytest

from simwire.errors import Conflict
from simwire.model import (
    Event,
    EventType,
    Integration,
    IntegrationState,
    IntegrationType,
    Protocol,
    new_trace_id,
)
from simwire.ports import IngestRecord, Store
from tests.storage.conftest import StoreOpener
from tests.storage.test_contract import ORG, OTHER_ORG, T0, registration, telemetry

ALL_TYPES = ("TELEMETRY_DATA", "LIFECYCLE", "ERROR")


def integration(
    org: str = ORG, types: tuple[str, ...] = ALL_TYPES, name: str = "hook", at_ms: int = T0,
) -> Integration:
    return Integration(
        id=str(uuid.uuid4()), org=org, type=IntegrationType.WEBHOOK, name=name,
        event_types=types, json_payload=False,
        settings={"url": "https://example.test/hook", "headers": {"X-Key": "v"}},
        secret="s3cret", created_ms=at_ms, updated_ms=at_ms,
    )


def error_event(at_ms: int, org: str = ORG) -> Event:
    return Event(id=new_trace_id(at_ms), type=EventType.ERROR, received_ms=at_ms, org=org,
                 body={"error": {"message": "x"}})


async def test_integration_round_trip(store: Store) -> None:
    i = integration()
    await store.create_integration(i)
    assert await store.get_integration(i.id) == i
    assert await store.get_integration("nope") is None
    with pytest.raises(Conflict):
        await store.create_integration(i)


async def test_integrations_list_per_org_oldest_first(store: Store) -> None:
    mine = [integration(at_ms=T0 + k, name=f"n{k}") for k in range(5)]
    for i in reversed(mine):
        await store.create_integration(i)
    await store.create_integration(integration(OTHER_ORG))
    page = await store.list_integrations(ORG, 1, 3)
    assert [i.name for i in page.items] == ["n0", "n1", "n2"]
    assert page.page_amount == 2
    page2 = await store.list_integrations(ORG, 2, 3)
    assert [i.name for i in page2.items] == ["n3", "n4"]
    assert len(await store.all_integrations()) == 6


async def test_update_replaces_config_and_keeps_status(store: Store) -> None:
    i = integration()
    await store.create_integration(i)
    await store.set_integration_status(i.id, IntegrationState.INTEGRATION_ACTIVE, None, T0 + 5)
    changed = replace(i, name="renamed", settings={"url": "https://b.test", "headers": {}},
                      updated_ms=T0 + 9, state=IntegrationState.ROLLOUT_DONE)
    stored = await store.update_integration(changed)
    assert stored is not None
    assert stored.name == "renamed" and stored.settings["url"] == "https://b.test"
    assert stored.updated_ms == T0 + 9
    assert stored.state is IntegrationState.INTEGRATION_ACTIVE  # status is not config
    assert stored.first_delivery_ms == T0 + 5
    assert await store.update_integration(replace(i, id="missing")) is None


async def test_status_sets_first_delivery_once(store: Store) -> None:
    i = integration()
    await store.create_integration(i)
    s = await store.set_integration_status(i.id, IntegrationState.INTEGRATION_ACTIVE, None, 100)
    assert s is not None and s.first_delivery_ms == 100
    s = await store.set_integration_status(i.id, IntegrationState.INTEGRATION_FAILED, "down", 200)
    assert s is not None
    assert (s.state, s.error, s.first_delivery_ms) == (
        IntegrationState.INTEGRATION_FAILED, "down", 100)
    assert await store.set_integration_status("missing", IntegrationState.ROLLOUT_DONE, None) \
        is None


async def test_events_are_queued_for_subscribed_integrations_of_their_org(store: Store) -> None:
    telemetry_only = integration(types=("TELEMETRY_DATA",))
    errors_only = integration(types=("ERROR",))
    other_org = integration(OTHER_ORG)
    for i in (telemetry_only, errors_only, other_org):
        await store.create_integration(i)
    events = [telemetry(1, T0 + k, f"m{k}".encode(), Protocol.COAP, "t/1") for k in range(3)]
    err = error_event(T0 + 3)
    await store.append(IngestRecord(tuple(events)))
    await store.append(IngestRecord((err,)))

    items = await store.outbox_fetch(telemetry_only.id, 10)
    assert [it.event_id for it in items] == [e.id for e in events]
    first = items[0]
    assert (first.type, first.iccid, first.source, first.topic) == (
        "TELEMETRY_DATA", events[0].device.iccid if events[0].device else None, "COAP", "t/1")
    assert json.loads(first.envelope) == events[0].to_envelope()
    assert [it.event_id for it in await store.outbox_fetch(errors_only.id, 10)] == [err.id]
    assert await store.outbox_fetch(other_org.id, 10) == []
    assert await store.outbox_depth(telemetry_only.id) == 3


async def test_fetch_limit_ack_and_depth(store: Store) -> None:
    i = integration()
    await store.create_integration(i)
    events = [telemetry(k % 3, T0 + k, f"m{k}".encode()) for k in range(10)]
    await asyncio.gather(*(store.append(IngestRecord((e,))) for e in events))
    first = await store.outbox_fetch(i.id, 4)
    assert len(first) == 4
    await store.outbox_ack(i.id, [it.key for it in first])
    await store.outbox_ack(i.id, [it.key for it in first])  # idempotent
    rest = await store.outbox_fetch(i.id, 100)
    assert len(rest) == 6
    assert {it.event_id for it in first + rest} == {e.id for e in events}
    assert await store.outbox_depth(i.id) == 6
    await store.outbox_ack(i.id, [])


async def test_commit_order_is_kept_per_device(store: Store) -> None:
    i = integration()
    await store.create_integration(i)
    for k in range(20):
        await store.append(IngestRecord((telemetry(1, T0 + k, f"{k}".encode()),)))
    items = await store.outbox_fetch(i.id, 100)
    assert [json.loads(it.envelope)["payload"]["value"] for it in items] == [
        telemetry(1, 0, f"{k}".encode()).payload.text for k in range(20)  # type: ignore[union-attr]
    ]


async def test_only_events_after_the_subscription_are_queued(store: Store) -> None:
    before = telemetry(1, T0)
    await store.append(IngestRecord((before,)))
    i = integration(types=("TELEMETRY_DATA",))
    await store.create_integration(i)
    after = telemetry(1, T0 + 1)
    await store.append(IngestRecord((after, error_event(T0 + 1))))
    assert [it.event_id for it in await store.outbox_fetch(i.id, 10)] == [after.id]


async def test_changed_event_types_apply_to_new_events(store: Store) -> None:
    i = integration(types=("TELEMETRY_DATA",))
    await store.create_integration(i)
    await store.update_integration(replace(i, event_types=("ERROR",), updated_ms=T0 + 1))
    err = error_event(T0 + 2)
    await store.append(IngestRecord((telemetry(1, T0 + 2), err)))
    assert [it.event_id for it in await store.outbox_fetch(i.id, 10)] == [err.id]


async def test_registration_lifecycle_is_queued(store: Store) -> None:
    i = integration()
    await store.create_integration(i)
    reg = registration(1, T0)
    first = telemetry(1, T0)
    await store.append(IngestRecord((first,), registration=reg))
    await store.append(IngestRecord((telemetry(1, T0 + 1),), registration=registration(1, T0)))
    types = [it.type for it in await store.outbox_fetch(i.id, 10)]
    assert types == ["LIFECYCLE", "TELEMETRY_DATA", "TELEMETRY_DATA"]


async def test_delete_drops_the_outbox(store: Store) -> None:
    i = integration()
    keep = integration(name="keep")
    await store.create_integration(i)
    await store.create_integration(keep)
    await store.append(IngestRecord((telemetry(1, T0),)))
    assert await store.delete_integration(i.id)
    assert not await store.delete_integration(i.id)
    assert await store.get_integration(i.id) is None
    assert await store.outbox_depth(i.id) == 0
    assert await store.outbox_depth(keep.id) == 1
    await store.append(IngestRecord((telemetry(1, T0 + 1),)))
    assert await store.outbox_depth(i.id) == 0


async def test_purge_drops_items_of_purged_events(store: Store) -> None:
    i = integration()
    await store.create_integration(i)
    old, young = telemetry(1, T0 - 10_000), telemetry(1, T0)
    await store.append(IngestRecord((old,)))
    await store.append(IngestRecord((young,)))
    await store.purge(T0 - 5_000)
    assert [it.event_id for it in await store.outbox_fetch(i.id, 10)] == [young.id]
    assert await store.outbox_depth(i.id) == 1


async def test_on_outbox_runs_after_commits_that_queued(store: Store) -> None:
    calls: list[int] = []
    store.on_outbox(lambda: calls.append(1))
    await store.append(IngestRecord((telemetry(1, T0),)))
    await asyncio.sleep(0.05)
    assert calls == []  # nothing subscribed: nothing queued
    await store.create_integration(integration())
    await store.append(IngestRecord((telemetry(1, T0 + 1),)))
    for _ in range(100):
        if calls:
            break
        await asyncio.sleep(0.01)
    assert calls


async def test_outbox_survives_reopen(store: Store, open_store: StoreOpener) -> None:
    i = integration()
    await store.create_integration(i)
    e = telemetry(1, T0)
    await store.append(IngestRecord((e,)))
    await store.close()
    again = await open_store()
    assert [it.event_id for it in await again.outbox_fetch(i.id, 10)] == [e.id]
    assert await again.get_integration(i.id) == i
