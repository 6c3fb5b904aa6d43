"""The dispatcher: one delivery worker per integration, reading its outbox in order.

simwire.app starts it; the integrations API calls `changed`/`removed` after each write and
`test`/`restart` for those endpoints. The store calls `wake` (through `Outbox.on_outbox`)
after each commit that queued events; a worker also polls every `poll_interval_s` (events
committed by another process).

A worker's cycle: fetch the oldest `batch` items -> deliver them, devices in parallel (at
most `concurrency` requests at once), each device's events one after the other, stopping
at a device's first failure so its order holds -> remove the delivered ones from the
outbox. A cycle with a failure is a failed attempt: the worker waits the next gap of the
retry schedule (150/180/420/1020 s by default, on the injectable clock), then tries again
from the oldest queued event. After `len(schedule) + 1` consecutive failed attempts the
integration becomes INTEGRATION_FAILED, an ERROR event `CloudIntegrator[IntegrationDisabled]`
and an admin log are written, and the worker stops; events keep being queued until
`restart`, which replays them. Delivery is at least once: an event delivered just before a
crash (not yet removed from the outbox) is delivered again, with the same id.

Only one process delivers: the leader (simwire.leadership calls `lead` when this process
takes the leader lease and `follow` when it loses it). In the others `wake`, `changed` and
`removed` become notices (`notify("outbox")`, `notify("integrations")`, which reach the
leader when it is worker 0 of the same machine; another machine's leader finds the work
by its outbox poll). The leader also re-reads the integrations every
`reconcile_interval_s`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from integrator.forwarders.base import Delivery, DeliveryError, Sink
from simwire.clock import Clock
from simwire.metrics import Metrics
from simwire.model import (
    ENVELOPE_VERSION,
    AdminLog,
    Event,
    EventType,
    Integration,
    IntegrationState,
    LogCategory,
    LogType,
    new_trace_id,
)
from simwire.ports import IngestRecord, IngestStore, IntegrationRepository, Outbox, OutboxItem
from simwire.tasks import cancel

log = logging.getLogger("simwire.integrator.forwarders")

DISABLED = "CloudIntegrator[IntegrationDisabled]"
SinkFactory = Callable[[Integration], Sink]


@dataclass(frozen=True, slots=True)
class ForwarderConfig:
    retry_schedule_s: tuple[float, ...] = (150.0, 180.0, 420.0, 1020.0)
    """Gaps between the attempts (1NCE's schedule: 5 attempts in all)."""
    concurrency: int = 8
    """Requests in flight per integration."""
    batch: int = 256
    poll_interval_s: float = 1.0
    reconcile_interval_s: float = 5.0
    """How often the delivering process re-reads integrations changed by other processes."""


class _Store(IntegrationRepository, Outbox, IngestStore, Protocol):
    """What the dispatcher needs of the store."""


def render(integration: Integration, item: OutboxItem) -> Delivery:
    """The body an integration receives for a queued event.

    jsonPayloadEnabled: a raw (base64) TELEMETRY_DATA payload whose bytes parse as JSON is
    sent as `{type: JSON, value}`; trailing NUL bytes and whitespace (C firmware sends its
    string terminator) are ignored for parsing. Otherwise the stored envelope, verbatim."""
    body = item.envelope
    if integration.json_payload and item.type == EventType.TELEMETRY_DATA.value:
        env = json.loads(body)
        payload = env.get("payload") or {}
        if payload.get("encoding") == "base64":
            value = _json_or_none(payload.get("value", ""))
            if value is not None:
                new: dict[str, Any] = {"type": "JSON", "value": value[0]}
                if "topic" in payload:
                    new["topic"] = payload["topic"]
                env["payload"] = new
                body = json.dumps(env, separators=(",", ":"), ensure_ascii=False)
    return Delivery(item.event_id, item.type, item.iccid, item.source, item.topic,
                    body.encode())


def _json_or_none(b64: str) -> tuple[Any] | None:
    try:
        raw = base64.b64decode(b64, validate=True).rstrip(b"\x00 \t\r\n")
        return (json.loads(raw.decode("utf-8")),)
    except (binascii.Error, ValueError):  # UnicodeDecodeError, JSONDecodeError included
        return None


def test_message(integration: Integration, now_ms: int) -> Delivery:
    """TEST_MESSAGE (test and restart endpoints): no device, the integration's id and name."""
    event_id = new_trace_id(now_ms)
    env = {"id": event_id, "type": EventType.TEST_MESSAGE.value, "version": ENVELOPE_VERSION,
           "received": str(now_ms), "integration": {"id": integration.id,
                                                    "name": integration.name}}
    return Delivery(event_id, EventType.TEST_MESSAGE.value, None, None, None,
                    json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode())


class _Worker:
    """Delivers one integration's outbox (see the module docstring)."""

    def __init__(self, dispatcher: Dispatcher, integration: Integration, sink: Sink) -> None:
        self.integration = integration
        self.sink = sink
        self._d = dispatcher
        self.wake = asyncio.Event()
        self.wake.set()
        label = integration.id
        m = dispatcher.metrics
        self._delivered = m.delivered.labels(label)
        self._failures = m.delivery_failures.labels(label)
        self._retrying = m.retrying.labels(label)
        self._depth = m.queue_depth.labels(label)
        self._latency = m.delivery_seconds.labels(label)
        self.task: asyncio.Task[None] | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._acking: set[Any] = set()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"forward-{self.integration.id}")

    async def stop(self) -> None:
        for task in (self.task, self._ack_task):
            await cancel(task)
        await self.sink.close()
        self._retrying.set(0)

    async def _run(self) -> None:
        d, i = self._d, self.integration
        failed_attempts = 0
        while True:
            self.wake.clear()
            try:
                items = await d.store.outbox_fetch(i.id, d.config.batch + len(self._acking))
            except Exception as exc:
                log.error("integration %s: outbox read failed: %s", i.id, exc)
                await d.clock.sleep(d.config.poll_interval_s)
                continue
            if self._acking:  # delivered, removal from the outbox still being committed
                items = [it for it in items if it.key not in self._acking][: d.config.batch]
            if len(items) < d.config.batch:
                self._depth.set(len(items))
            if not items:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), d.config.poll_interval_s)
                continue
            delivered, error = await self._deliver(items)
            if delivered:
                # one removal in flight while the next batch goes out (a commit saved per
                # batch); the next fetch skips the keys being removed
                await self._ack_settled()
                self._acking = {it.key for it in delivered}
                self._ack_task = asyncio.create_task(self._acknowledge(delivered))
            if error is None:
                failed_attempts = 0
                continue
            await self._ack_settled()
            failed_attempts += 1
            self._failures.inc()
            schedule = d.config.retry_schedule_s
            if failed_attempts > len(schedule):
                await d.disable(i, error, failed_attempts)
                return
            gap = schedule[failed_attempts - 1]
            log.warning("integration %s (%s): attempt %d failed: %s; retrying in %g s",
                        i.id, i.name, failed_attempts, error, gap)
            await self._set_status(self.integration.state, f"{error} (attempt "
                                   f"{failed_attempts} of {len(schedule) + 1}; next in {gap:g} s)")
            self._retrying.set(1)
            await d.clock.sleep(schedule[failed_attempts - 1])
            self._retrying.set(0)

    async def _deliver(self, items: list[OutboxItem]) -> tuple[list[OutboxItem], str | None]:
        """Deliver a batch: per-device chains in parallel. Returns the delivered items and
        the first error (None if all were delivered)."""
        chains: dict[str | None, list[OutboxItem]] = {}
        for item in items:
            chains.setdefault(item.iccid, []).append(item)
        delivered: list[OutboxItem] = []
        errors: list[str] = []
        limit = asyncio.Semaphore(self._d.config.concurrency)
        now_ms = self._d.clock.now_ms

        async def chain(queue: list[OutboxItem]) -> None:
            for item in queue:
                async with limit:
                    try:
                        await self.sink.deliver(render(self.integration, item))
                    except DeliveryError as exc:
                        errors.append(str(exc))
                        return
                    except Exception as exc:  # a sink bug must not kill the worker
                        log.exception("integration %s: sink failed", self.integration.id)
                        errors.append(f"internal error: {exc.__class__.__name__}")
                        return
                delivered.append(item)
                self._latency.observe(max(0.0, (now_ms() - item.received_ms) / 1000))

        if len(chains) == 1:
            await chain(items)
        else:
            await asyncio.gather(*(chain(q) for q in chains.values()))
        return delivered, (errors[0] if errors else None)

    async def _ack_settled(self) -> None:
        if self._ack_task is not None:
            await self._ack_task
            self._ack_task = None
        self._acking = set()

    async def _acknowledge(self, delivered: list[OutboxItem]) -> None:
        d, i = self._d, self.integration
        self._delivered.inc(len(delivered))
        try:
            await d.store.outbox_ack(i.id, [item.key for item in delivered])
        except Exception as exc:  # they stay queued and are delivered again (at least once)
            log.error("integration %s: outbox removal failed: %s", i.id, exc)
            return
        device_event = any(it.iccid is not None for it in delivered)
        if (i.state is not IntegrationState.INTEGRATION_ACTIVE or i.error is not None
                or (i.first_delivery_ms is None and device_event)):
            await self._set_status(IntegrationState.INTEGRATION_ACTIVE, None,
                                   d.clock.now_ms() if device_event else None)

    async def _set_status(self, state: IntegrationState, error: str | None,
                          delivered_ms: int | None = None) -> None:
        try:
            stored = await self._d.store.set_integration_status(
                self.integration.id, state, error, delivered_ms)
        except Exception as exc:  # status is informative; delivery goes on
            log.error("integration %s: status update failed: %s", self.integration.id, exc)
            return
        if stored is not None:
            self.integration = stored


class Dispatcher:
    """Owns the workers; see the module docstring for who calls what."""

    def __init__(
        self, store: _Store, sinks: SinkFactory, clock: Clock, metrics: Metrics,
        config: ForwarderConfig | None = None, delivers: bool = True,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.sinks = sinks
        self.clock = clock
        self.metrics = metrics
        self.config = config or ForwarderConfig()
        self.delivers = delivers
        self._notify = notify or (lambda kind: None)
        self._workers: dict[str, _Worker] = {}
        self._lock = asyncio.Lock()
        self._reconciler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.store.on_outbox(self.wake)
        if self.delivers:
            self.delivers = False
            await self.lead()

    async def lead(self) -> None:
        """Start delivering: a worker per stored integration, and the reconcile loop."""
        if self.delivers:
            return
        self.delivers = True
        await self.reconcile()
        self._reconciler = asyncio.create_task(self._reconcile_forever(),
                                               name="integrations-reconcile")

    async def follow(self) -> None:
        """Stop delivering (another process leads now); what is queued stays queued."""
        self.delivers = False
        await self.stop()

    async def stop(self) -> None:
        await cancel(self._reconciler)
        self._reconciler = None
        async with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
            await asyncio.gather(*(w.stop() for w in workers))

    def wake(self) -> None:
        if not self.delivers:
            self._notify("outbox")
            return
        for worker in self._workers.values():
            worker.wake.set()

    async def reconcile(self) -> None:
        """Match the running workers to the stored integrations: start new ones, restart
        reconfigured (`updated_ms`) or restarted (no longer failed) ones, stop deleted
        ones. Called on another process's notice and every `reconcile_interval_s`."""
        if not self.delivers:
            return
        async with self._lock:
            stored = {i.id: i for i in await self.store.all_integrations()}
            for iid, worker in list(self._workers.items()):
                now = stored.get(iid)
                if (now is None or now.updated_ms != worker.integration.updated_ms
                        or (worker.task is not None and worker.task.done()
                            and now.state is not IntegrationState.INTEGRATION_FAILED)):
                    del self._workers[iid]
                    await worker.stop()
            for iid, integration in stored.items():
                if iid not in self._workers:
                    self._spawn(integration)

    async def _reconcile_forever(self) -> None:
        while True:  # real time, like the outbox poll: it looks for other processes' work
            await asyncio.sleep(self.config.reconcile_interval_s)
            try:
                await self.reconcile()
            except Exception as exc:
                log.error("integrations reconcile failed: %s", exc)

    def worker_state(self, integration_id: str) -> Integration | None:
        """The integration as its running worker knows it (tests, status)."""
        w = self._workers.get(integration_id)
        return w.integration if w is not None else None

    async def changed(self, integration: Integration) -> None:
        """Created or reconfigured: (re)start its worker with the new settings."""
        if not self.delivers:
            self._notify("integrations")
            return
        async with self._lock:
            old = self._workers.pop(integration.id, None)
            if old is not None:
                await old.stop()
            self._spawn(integration)

    async def removed(self, integration_id: str) -> None:
        if not self.delivers:
            self._notify("integrations")
            return
        async with self._lock:
            old = self._workers.pop(integration_id, None)
            if old is not None:
                await old.stop()

    async def test(self, integration: Integration) -> tuple[bool, str]:
        """Send a TEST_MESSAGE now, with a sink of its own; state is not changed."""
        sink = self.sinks(integration)
        try:
            await sink.deliver(test_message(integration, self.clock.now_ms()))
        except DeliveryError as exc:
            return False, str(exc)
        finally:
            await sink.close()
        return True, "Test message delivered"

    async def restart(self, integration: Integration) -> tuple[bool, str, Integration]:
        """Send a TEST_MESSAGE; if it was delivered, clear a failure and replay the queue."""
        ok, message = await self.test(integration)
        if not ok:
            return False, message, integration
        state = (IntegrationState.INTEGRATION_ACTIVE if integration.first_delivery_ms
                 else IntegrationState.ROLLOUT_DONE)
        stored = await self.store.set_integration_status(integration.id, state, None)
        if stored is None:
            return False, "integration was deleted", integration
        await self.changed(stored)
        return True, "Integration restarted; queued events are being delivered", stored

    async def disable(self, integration: Integration, error: str, attempts: int) -> None:
        """The schedule is exhausted: INTEGRATION_FAILED, an ERROR event and an admin log."""
        now = self.clock.now_ms()
        description = (f"Integration {integration.name} ({integration.id}) was disabled after "
                       f"{attempts} failed delivery attempts; last error: {error}")
        log.error("%s", description)
        await self.store.set_integration_status(
            integration.id, IntegrationState.INTEGRATION_FAILED, error)
        trace = new_trace_id(now)
        event = Event(
            id=trace, type=EventType.ERROR, received_ms=now, org=integration.org,
            body={"error": {"id": trace, "type": "INTEGRATION", "message": DISABLED,
                            "description": description, "payloadExists": False}},
        )
        entry = AdminLog(
            id=new_trace_id(now), timestamp_ms=now, org=integration.org,
            type=LogType.INTEGRATION, category=LogCategory.ERROR, message=DISABLED,
            description=description, trace_id=trace,
        )
        try:
            await self.store.append(IngestRecord((event,), logs=(entry,)))
        except Exception as exc:
            log.error("could not store the %s event: %s", DISABLED, exc)
        self.metrics.retrying.labels(integration.id).set(0)

    def _spawn(self, integration: Integration) -> None:
        if integration.state is IntegrationState.INTEGRATION_FAILED:
            return  # waits for a restart; its outbox keeps filling
        worker = _Worker(self, integration, self.sinks(integration))
        self._workers[integration.id] = worker
        worker.start()
