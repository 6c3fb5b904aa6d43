"""The telemetry path: the one place that knows the order of the steps.

Endpoints call `Pipeline.submit(raw, done)` for every framed message and answer the device
from the `Ack` passed to `done`: identify (authenticator) -> translate (energy_saver hook)
-> build events (1NCE envelope 1.0.0) -> durable commit -> ACK. `done` runs only after the
store has committed the message.

Hot path: when the source IP's SIM is cached and its device already registered, `submit`
does everything synchronously and hands the record to the store's group commit: no task,
no future per message. Otherwise (cache miss, first contact) a task awaits the lookups.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

from authenticator.lookup import SimLookup
from inspector.adminlog import AdminLogWriter
from simwire.clock import Clock
from simwire.logs import RateLimitedLogger
from simwire.metrics import Metrics
from simwire.model import (
    DAY_MS,
    AdminLog,
    Device,
    DeviceIdentity,
    DeviceState,
    Event,
    EventType,
    LogCategory,
    LogType,
    Payload,
    Protocol,
    RawUplink,
    Saving,
    Sim,
    new_trace_id,
)
from simwire.ports import (
    DeviceRepository,
    IngestRecord,
    IngestStore,
    PositionSink,
    Registration,
    TranslationError,
    Translator,
)

log = logging.getLogger("simwire.integrator.pipeline")


class Ack(enum.Enum):
    """What the endpoint tells the device."""

    STORED = "stored"
    UNAUTHORIZED = "unauthorized"
    FAILED = "error"


Done = Callable[[Ack], None]


class _Counters:
    """Metric children bound once per protocol (label lookups are not free)."""

    def __init__(self, metrics: Metrics, protocol: Protocol) -> None:
        p = protocol.value
        self.stored = metrics.uplinks.labels(p, "stored").inc
        self.unauthorized = metrics.uplinks.labels(p, "unauthorized").inc
        self.error = metrics.uplinks.labels(p, "error").inc
        self.latency = metrics.ingest_seconds.observer(p)


class Pipeline:
    def __init__(
        self,
        lookup: SimLookup,
        store: IngestStore,
        devices: DeviceRepository,
        translator: Translator,
        admin_logs: AdminLogWriter,
        clock: Clock,
        metrics: Metrics,
        positions: PositionSink,
        activity: Callable[[str], None] | None = None,
    ) -> None:
        self._lookup = lookup
        self._store = store
        self._devices = devices
        self._translator = translator
        self._admin_logs = admin_logs
        self._positions = positions
        self._activity = activity
        """Device Controller: a committed uplink fires the device's waiting downlinks."""
        self._clock = clock
        self._counters = {p: _Counters(metrics, p) for p in Protocol}
        self._registered: set[str] = set()
        self._slow: set[asyncio.Task[None]] = set()
        self._warn = RateLimitedLogger(log)
        self.inflight = 0
        """Uplinks submitted and not yet answered; endpoints bound it (back-pressure)."""
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, raw: RawUplink, done: Done | None = None) -> None:
        """Process one uplink; `done(ack)` runs once it is committed (or refused/failed).

        `done` may run before `submit` returns (refusals on the fast path)."""
        self.inflight += 1
        self._idle.clear()
        hit, sim = self._lookup.cached(raw.source_ip)
        if hit and (sim is None or not sim.enabled or sim.iccid in self._registered):
            self._process(raw, sim, None, done)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(raw, done))
        self._slow.add(task)
        task.add_done_callback(self._slow.discard)

    async def handle_uplink(self, raw: RawUplink) -> Ack:
        """`submit` for awaiting callers (tests, tools)."""
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self.submit(raw, fut.set_result)
        return await fut

    async def drain(self) -> None:
        """Shutdown, after the endpoints stopped receiving: wait for in-flight uplinks."""
        await self._idle.wait()

    async def _resolve(self, raw: RawUplink, done: Done | None) -> None:
        """Slow path: SIM cache miss or a device not yet known to be registered."""
        try:
            sim = await self._lookup.by_ip(raw.source_ip)
            registration = None
            if sim is not None and sim.enabled and sim.iccid not in self._registered:
                if await self._devices.is_registered(sim.iccid):
                    self._registered.add(sim.iccid)
                else:
                    registration = first_registration(sim.identity, raw.received_ms)
        except Exception:
            log.exception("identification failed for %s; not acknowledged", raw.source_ip)
            self._counters[raw.protocol].error()
            self._finish(done, Ack.FAILED)
            return
        self._process(raw, sim, registration, done)

    def _process(
        self, raw: RawUplink, sim: Sim | None, registration: Registration | None,
        done: Done | None,
    ) -> None:
        if sim is None or not sim.enabled or (
            raw.dtls_identity is not None and raw.dtls_identity != sim.iccid
        ) or (sim.imei_lock and sim.imei is not None and raw.imei is not None
              and raw.imei != sim.imei):
            self._refuse(raw, sim)
            self._finish(done, Ack.UNAUTHORIZED)
            return
        record = self._build(raw, sim, registration)
        self._store.submit(record, _Committed(self, raw, sim, record, done))

    def _committed(self, c: _Committed, exc: BaseException | None) -> None:
        raw, sim, record = c.raw, c.sim, c.record
        iccid = sim.iccid
        counters = self._counters[raw.protocol]
        if exc is not None:
            log.error("store commit failed (%s); device %s not acknowledged", exc, iccid)
            counters.error()
            self._finish(c.done, Ack.FAILED)
            return
        if record.registration is not None:
            self._registered.add(iccid)
        payload = record.events[0].payload
        position = payload.position if payload else None
        if position is not None:
            self._positions.report_position(sim.identity, *position, raw.received_ms)
        if self._activity is not None:
            self._activity(iccid)
        counters.stored()
        counters.latency(max(0, self._clock.now_ms() - raw.received_ms) / 1000)
        self._finish(c.done, Ack.STORED)

    def _finish(self, done: Done | None, ack: Ack) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()
        if done is not None:
            done(ack)

    def _build(
        self, raw: RawUplink, sim: Sim, registration: Registration | None
    ) -> IngestRecord:
        ident = sim.identity
        now = raw.received_ms
        result = (self._translator.translate(sim.org, raw) if raw.json_value is None
                  else Payload(raw=raw.payload, json_value=raw.json_value, translated=True))
        logs: tuple[AdminLog, ...] = ()
        if isinstance(result, TranslationError):
            payload = Payload(raw=raw.payload)
            err_id = new_trace_id(now)
            error = Event(
                id=err_id, type=EventType.ERROR, received_ms=now, org=sim.org, device=ident,
                body={"error": {
                    "id": err_id, "type": "DEVICE", "message": "Translator[UserPayloadError]",
                    "description": result.description, "payloadExists": True,
                }},
            )
            logs = (AdminLog(
                id=err_id, timestamp_ms=now, org=sim.org, type=LogType.DEVICE,
                category=LogCategory.ERROR, message="Translator[UserPayloadError]",
                description=result.description, trace_id=err_id, iccid=sim.iccid,
                imsi=sim.imsi, ip=sim.ip,
            ),)
        else:
            payload, error = result, None
        saving = None
        if payload.translated and raw.json_value is None:
            text = payload.text
            saving = Saving(sim.org, sim.iccid, raw.protocol, now // DAY_MS,
                            len(text) if text.isascii() else len(text.encode()),
                            len(raw.payload))
        telemetry = Event(
            id=new_trace_id(now), type=EventType.TELEMETRY_DATA, received_ms=now, org=sim.org,
            device=ident, source=raw.protocol, topic=raw.topic, payload=payload,
        )
        events = (telemetry,) if error is None else (telemetry, error)
        state = DeviceState(sim.iccid, raw.protocol,
                            payload.text if raw.state_text is None else raw.state_text,
                            raw.topic, now)
        return IngestRecord(events, state, logs, registration, saving)

    def _refuse(self, raw: RawUplink, sim: Sim | None) -> None:
        if sim is None:
            reason, desc = "unknown", f"Message from unknown device IP {raw.source_ip} dropped"
        elif not sim.enabled:
            reason, desc = "disabled", f"Message from disabled SIM {sim.iccid} dropped"
        elif raw.dtls_identity is not None and raw.dtls_identity != sim.iccid:
            reason = "identity"
            desc = f"DTLS identity {raw.dtls_identity!r} does not match SIM {sim.iccid}"
        else:
            reason = "imei"
            desc = f"IMEI {raw.imei} is not the IMEI {sim.imei} locked to SIM {sim.iccid}"
        self._counters[raw.protocol].unauthorized()
        self._warn.warning(f"{reason}:{raw.source_ip}", "%s uplink refused: %s",
                           raw.protocol.value, desc)
        self._admin_logs.add(
            sim.org if sim else "default", LogType.DEVICE, LogCategory.ERROR,
            "DeviceIntegrator[UnauthorizedDevice]", desc,
            iccid=sim.iccid if sim else None, imsi=sim.imsi if sim else None,
            ip=raw.source_ip, rate_key=f"unauth:{reason}:{raw.source_ip}",
        )


class _Committed:
    """The store's `done` for one uplink (`Pipeline._committed`): a slotted object rather
    than a closure and its cells, fewer objects for the garbage collector per message in
    flight."""

    __slots__ = ("done", "pipeline", "raw", "record", "sim")

    def __init__(self, pipeline: Pipeline, raw: RawUplink, sim: Sim, record: IngestRecord,
                 done: Done | None) -> None:
        self.pipeline = pipeline
        self.raw = raw
        self.sim = sim
        self.record = record
        self.done = done

    def __call__(self, exc: BaseException | None) -> None:
        self.pipeline._committed(self, exc)


def first_registration(ident: DeviceIdentity, now_ms: int) -> Registration:
    """The LIFECYCLE event + admin log of a device's first contact (spec section 2.4)."""
    ev_id = new_trace_id(now_ms)
    text = f"New Device successfully registered for the first time - {ident.iccid}"
    event = Event(
        id=ev_id, type=EventType.LIFECYCLE, received_ms=now_ms, org=ident.org, device=ident,
        body={"lifecycle": {"type": "DEVICE_FIRST_TIME_REGISTERED", "message": text}},
    )
    entry = AdminLog(
        id=ev_id, timestamp_ms=now_ms, org=ident.org, type=LogType.LIFECYCLE,
        category=LogCategory.INFO, message="Lifecycle[DeviceFirstTimeRegistered]",
        description=text, trace_id=ev_id, iccid=ident.iccid, imsi=ident.imsi, ip=ident.ip,
    )
    device = Device(ident.iccid, ident.imsi, ident.ip, ident.org, now_ms)
    return Registration(device, event, entry)
