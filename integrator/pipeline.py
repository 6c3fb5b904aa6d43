"""The telemetry path: the one place that knows the order of the steps.

Endpoints call `Pipeline.handle_uplink(raw)` for every framed message and answer the device
from the returned `Ack`: identify (authenticator) -> translate (energy_saver hook) -> build
events (1NCE envelope 1.0.0) -> durable commit -> ACK. Nothing is acknowledged before the
store has committed it.
"""

from __future__ import annotations

import enum
import logging

from authenticator.lookup import SimLookup
from inspector.adminlog import AdminLogWriter
from simwire.clock import Clock
from simwire.logs import RateLimitedLogger
from simwire.metrics import Metrics
from simwire.model import (
    AdminLog,
    Device,
    DeviceIdentity,
    DeviceState,
    Event,
    EventType,
    LogCategory,
    LogType,
    Payload,
    RawUplink,
    Sim,
    new_trace_id,
)
from simwire.ports import (
    DeviceRepository,
    IngestRecord,
    IngestStore,
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
    ) -> None:
        self._lookup = lookup
        self._store = store
        self._devices = devices
        self._translator = translator
        self._admin_logs = admin_logs
        self._clock = clock
        self._metrics = metrics
        self._registered: set[str] = set()
        self._warn = RateLimitedLogger(log)

    async def handle_uplink(self, raw: RawUplink) -> Ack:
        hit, sim = self._lookup.cached(raw.source_ip)
        if not hit:
            sim = await self._lookup.by_ip(raw.source_ip)
        if sim is None or not sim.enabled or (
            raw.dtls_identity is not None and raw.dtls_identity != sim.iccid
        ):
            self._refuse(raw, sim)
            return Ack.UNAUTHORIZED
        record = await self._build(raw, sim)
        try:
            await self._store.append(record)
        except Exception:
            log.exception("store append failed; device %s not acknowledged", sim.iccid)
            self._metrics.uplinks.labels(raw.protocol.value, "error").inc()
            return Ack.FAILED
        if record.registration is not None:
            self._registered.add(sim.iccid)
        self._metrics.uplinks.labels(raw.protocol.value, "stored").inc()
        self._metrics.ingest_seconds.labels(raw.protocol.value).observe(
            max(0, self._clock.now_ms() - raw.received_ms) / 1000
        )
        return Ack.STORED

    async def _build(self, raw: RawUplink, sim: Sim) -> IngestRecord:
        ident = DeviceIdentity(sim.iccid, sim.imsi, sim.ip, sim.org)
        now = raw.received_ms
        events: list[Event] = []
        logs: list[AdminLog] = []
        result = self._translator.translate(sim.org, raw)
        if isinstance(result, TranslationError):
            payload = Payload(raw=raw.payload)
            err_id = new_trace_id(now)
            events.append(Event(
                id=err_id, type=EventType.ERROR, received_ms=now, org=sim.org, device=ident,
                body={"error": {
                    "id": err_id, "type": "DEVICE", "message": "Translator[UserPayloadError]",
                    "description": result.description, "payloadExists": True,
                }},
            ))
            logs.append(AdminLog(
                id=err_id, timestamp_ms=now, org=sim.org, type=LogType.DEVICE,
                category=LogCategory.ERROR, message="Translator[UserPayloadError]",
                description=result.description, trace_id=err_id, iccid=sim.iccid,
                imsi=sim.imsi, ip=sim.ip,
            ))
        else:
            payload = result
        telemetry = Event(
            id=new_trace_id(now), type=EventType.TELEMETRY_DATA, received_ms=now, org=sim.org,
            device=ident, source=raw.protocol, topic=raw.topic, payload=payload,
        )
        events.insert(0, telemetry)
        state = DeviceState(sim.iccid, raw.protocol, payload.history_text(), raw.topic, now)
        registration = None
        if sim.iccid not in self._registered:
            if await self._devices.is_registered(sim.iccid):
                self._registered.add(sim.iccid)
            else:
                registration = first_registration(ident, now)
        return IngestRecord(tuple(events), state, tuple(logs), registration)

    def _refuse(self, raw: RawUplink, sim: Sim | None) -> None:
        if sim is None:
            reason, desc = "unknown", f"Message from unknown device IP {raw.source_ip} dropped"
        elif not sim.enabled:
            reason, desc = "disabled", f"Message from disabled SIM {sim.iccid} dropped"
        else:
            reason = "identity"
            desc = f"DTLS identity {raw.dtls_identity!r} does not match SIM {sim.iccid}"
        self._metrics.uplinks.labels(raw.protocol.value, "unauthorized").inc()
        self._warn.warning(f"{reason}:{raw.source_ip}", "%s uplink refused: %s",
                           raw.protocol.value, desc)
        self._admin_logs.add(
            sim.org if sim else "default", LogType.DEVICE, LogCategory.ERROR,
            "DeviceIntegrator[UnauthorizedDevice]", desc,
            iccid=sim.iccid if sim else None, imsi=sim.imsi if sim else None,
            ip=raw.source_ip, rate_key=f"unauth:{reason}:{raw.source_ip}",
        )


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
