"""Frozen value types shared by every service.

Events follow the 1NCE event envelope 1.0.0 (spec section 4.1); `Event.to_envelope()` is the
one place that renders it.
"""

from __future__ import annotations

import base64
import enum
import json
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

ENVELOPE_VERSION = "1.0.0"
ICCID_RE = re.compile(r"^[0-9]{19,20}$")
IMSI_RE = re.compile(r"^[0-9]{15}$")
IMEI_RE = re.compile(r"^[0-9]{14,16}$")
DEFAULT_ORG = "default"
_SAFE = re.compile(r"[0-9A-Za-z.:\-]*")  # needs no JSON escaping


class Protocol(enum.StrEnum):
    """Device-facing protocols as named in the 1NCE API and events."""

    UDP = "UDP"
    COAP = "COAP"
    LWM2M = "LWM2M"


class SimStatus(enum.StrEnum):
    ENABLED = "Enabled"
    DISABLED = "Disabled"


class EventType(enum.StrEnum):
    TELEMETRY_DATA = "TELEMETRY_DATA"
    LIFECYCLE = "LIFECYCLE"
    ERROR = "ERROR"
    GEOFENCE = "GEOFENCE"
    LOCATION = "LOCATION"
    TEST_MESSAGE = "TEST_MESSAGE"


class LogType(enum.StrEnum):
    """Admin-log `type` (spec section 5)."""

    INTEGRATION = "INTEGRATION"
    DEVICE = "DEVICE"
    GENERAL = "GENERAL"
    LOCATION = "LOCATION"
    LIFECYCLE = "LIFECYCLE"


class LogCategory(enum.StrEnum):
    INFO = "info"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Sim:
    """A SIM of the registry; its static private IP identifies the device."""

    iccid: str
    imsi: str
    ip: str
    imei: str | None = None
    label: str | None = None
    status: SimStatus = SimStatus.ENABLED
    org: str = DEFAULT_ORG
    created_ms: int = 0
    updated_ms: int = 0
    imei_lock: bool = False
    """Refuse traffic whose IMEI is known and differs from `imei` (Device Authenticator)."""
    identity: DeviceIdentity = field(init=False, repr=False, compare=False)
    """Built once per SIM (the lookup caches SIMs): the pipeline's hot path reuses it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "identity", DeviceIdentity(self.iccid, self.imsi, self.ip,
                                                            self.org))

    @property
    def enabled(self) -> bool:
        return self.status is SimStatus.ENABLED

    def to_api(self) -> dict[str, Any]:
        return {
            "iccid": self.iccid,
            "imsi": self.imsi,
            "ip": self.ip,
            "imei": self.imei,
            "label": self.label,
            "status": self.status.value,
            "imeiLock": self.imei_lock,
            "createdAt": iso_ms(self.created_ms),
            "updatedAt": iso_ms(self.updated_ms),
        }


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who sent an uplink, established once by the authenticator and carried along."""

    iccid: str
    imsi: str
    ip: str
    org: str = DEFAULT_ORG
    envelope_json: str = field(init=False, repr=False, compare=False)
    """`to_envelope()` as compact JSON, rendered once."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "envelope_json",
                           json.dumps(self.to_envelope(), separators=(",", ":")))

    def to_envelope(self) -> dict[str, str]:
        return {"iccid": self.iccid, "imsi": self.imsi, "ip": self.ip}


@dataclass(slots=True)  # hot path: immutable by convention (ADR 0004)
class RawUplink:
    """One device message as framed by an endpoint, before identification."""

    protocol: Protocol
    source_ip: str
    source_port: int
    payload: bytes
    received_ms: int
    topic: str | None = None
    dtls_identity: str | None = None
    imei: str | None = None
    """The device's IMEI when the network tells it (checked against a SIM's IMEI lock)."""
    json_value: Any = None
    """Already-decoded telemetry (LwM2M: `{"/3/0/9": 77}`): stored as JSON, never
    translated."""
    state_text: str | None = None
    """The device state to keep instead of this message's payload (LwM2M: the merged
    object tree)."""


@dataclass(slots=True)  # hot path: immutable by convention (ADR 0004)
class Payload:
    """Envelope payload: translated JSON, or raw bytes rendered as base64 STRING."""

    raw: bytes
    json_value: Any = None
    translated: bool = False
    position: tuple[float, float] | None = None
    """(lat, long) the translation found (Energy Saver `custom_type`), for the locator."""
    text: str = field(init=False, repr=False, compare=False)
    """What the history API shows: stringified JSON, or base64 of the raw bytes."""

    def __post_init__(self) -> None:
        text = (json.dumps(self.json_value, separators=(",", ":"), ensure_ascii=False)
                if self.translated else b64(self.raw))
        self.text = text

    def to_envelope(self, topic: str | None) -> dict[str, Any]:
        out: dict[str, Any]
        if self.translated:
            out = {"type": "JSON", "value": self.json_value}
        else:
            out = {"type": "STRING", "value": self.text, "encoding": "base64"}
        if topic is not None:
            out["topic"] = topic
        return out


@dataclass(slots=True)  # hot path: immutable by convention (ADR 0004)
class Event:
    """One event of the stream (1NCE envelope 1.0.0) plus the columns stores index on."""

    id: str
    type: EventType
    received_ms: int
    org: str
    device: DeviceIdentity | None = None
    source: Protocol | None = None
    topic: str | None = None
    payload: Payload | None = None
    body: dict[str, Any] = field(default_factory=dict)
    """Type-specific part: `lifecycle`, `error`, `location`... merged into the envelope."""

    def to_envelope(self) -> dict[str, Any]:
        env: dict[str, Any] = {
            "id": self.id,
            "type": self.type.value,
            "version": ENVELOPE_VERSION,
            "received": str(self.received_ms),
        }
        if self.device is not None:
            env["device"] = self.device.to_envelope()
        if self.source is not None:
            env["source"] = self.source.value
        if self.payload is not None:
            env["payload"] = self.payload.to_envelope(self.topic)
        env.update(self.body)
        return env

    def envelope_json(self) -> str:
        """Compact JSON of `to_envelope()`; raw telemetry (the hot case) skips the encoder.

        The fast path interpolates only JSON-safe or pre-encoded text: a checked id, the
        device's cached JSON, base64; the topic goes through `json.dumps`."""
        p = self.payload
        d = self.device
        if (
            self.type is EventType.TELEMETRY_DATA and p is not None and not p.translated
            and d is not None and self.source is not None and not self.body
            and _SAFE.fullmatch(self.id)
        ):
            topic = "" if self.topic is None else ',"topic":' + json.dumps(self.topic)
            return (
                f'{{"id":"{self.id}","type":"TELEMETRY_DATA","version":"{ENVELOPE_VERSION}",'
                f'"received":"{self.received_ms}","device":{d.envelope_json},'
                f'"source":"{self.source.value}",'
                f'"payload":{{"type":"STRING","value":"{p.text}","encoding":"base64"'
                f"{topic}}}}}"
            )
        return json.dumps(self.to_envelope(), separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class AdminLog:
    """An administration-log entry (spec section 5)."""

    id: str
    timestamp_ms: int
    org: str
    type: LogType
    category: LogCategory
    message: str
    description: str
    trace_id: str | None = None
    iccid: str | None = None
    imsi: str | None = None
    ip: str | None = None

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "customerId": self.org,
            "timestamp": iso_ms(self.timestamp_ms),
            "type": self.type.value,
            "category": self.category.value,
            "message": self.message,
            "description": self.description,
            "traceId": self.trace_id,
            "iccid": self.iccid,
            "imsi": self.imsi,
            "ip": self.ip,
        }


@dataclass(frozen=True, slots=True)
class HistoryItem:
    """One stored TELEMETRY_DATA message as the history API returns it."""

    iccid: str
    received_ms: int
    protocol: Protocol
    payload: str
    topic: str | None

    def to_api(self, tz_offset_min: int = 0) -> dict[str, Any]:
        item: dict[str, Any] = {
            "iccid": self.iccid,
            "deviceId": self.iccid,
            "time": iso_ms(self.received_ms, tz_offset_min),
            "payload": self.payload,
            "protocol": self.protocol.value,
        }
        if self.topic is not None:
            item["topic"] = self.topic
        return item


@dataclass(slots=True)  # hot path: immutable by convention (ADR 0004)
class DeviceState:
    """Last message per (device, protocol): the Device Inspector's state."""

    iccid: str
    protocol: Protocol
    payload: str
    topic: str | None
    updated_ms: int


@dataclass(frozen=True, slots=True)
class Device:
    """A device that has talked to Simwire at least once."""

    iccid: str
    imsi: str
    ip: str
    org: str
    first_seen_ms: int

    def to_api(self) -> dict[str, Any]:
        return {"id": self.iccid, "iccid": self.iccid, "imsi1": self.imsi, "ip": self.ip}


@dataclass(frozen=True, slots=True)
class ApiClient:
    """An OAuth2 client (client-credentials grant) with its role and organisation."""

    client_id: str
    secret_hash: str
    role: str
    org: str
    created_ms: int


class IntegrationType(enum.StrEnum):
    WEBHOOK = "WEBHOOK"
    AWS = "AWS"


class IntegrationState(enum.StrEnum):
    """1NCE integration states (spec 4.3/4.4): created -> ROLLOUT_DONE; the first delivered
    device event -> INTEGRATION_ACTIVE; the retry schedule exhausted -> INTEGRATION_FAILED
    (until a restart)."""

    ROLLOUT_DONE = "ROLLOUT_DONE"
    INTEGRATION_ACTIVE = "INTEGRATION_ACTIVE"
    INTEGRATION_FAILED = "INTEGRATION_FAILED"


@dataclass(frozen=True, slots=True)
class Integration:
    """A cloud integration (webhook or AWS IoT Core) and the event types it subscribes to.

    Configuration (`name` .. `secret`) changes through the API; status (`state`, `error`,
    `first_delivery_ms`) only through the dispatcher, so neither overwrites the other."""

    id: str
    org: str
    type: IntegrationType
    name: str
    event_types: tuple[str, ...]
    """Subscribed envelope types (all of version 1.0.0)."""
    json_payload: bool
    settings: dict[str, Any]
    """Type-specific: webhook `{url, headers}`; AWS `{region, transport, ...}` (secrets
    included: never returned by the API as stored)."""
    secret: str
    """Signing secret of `X-Simwire-Signature` (webhooks)."""
    created_ms: int
    updated_ms: int
    state: IntegrationState = IntegrationState.ROLLOUT_DONE
    error: str | None = None
    first_delivery_ms: int | None = None
    """`lastSuccessfulMessageDelivery`: the first delivered device event (1NCE semantics)."""

    def config_doc(self) -> dict[str, Any]:
        """The configuration part as stored (JSON-safe)."""
        return {
            "type": self.type.value, "name": self.name, "eventTypes": list(self.event_types),
            "jsonPayload": self.json_payload, "settings": self.settings, "secret": self.secret,
        }

    @staticmethod
    def from_doc(
        id: str, org: str, doc: dict[str, Any], created_ms: int, updated_ms: int,
        state: str, error: str | None, first_delivery_ms: int | None,
    ) -> Integration:
        """Rebuild from `config_doc()` and the status columns (store adapters)."""
        return Integration(
            id=id, org=org, type=IntegrationType(doc["type"]), name=doc["name"],
            event_types=tuple(doc["eventTypes"]), json_payload=bool(doc["jsonPayload"]),
            settings=doc["settings"], secret=doc["secret"], created_ms=created_ms,
            updated_ms=updated_ms, state=IntegrationState(state), error=error,
            first_delivery_ms=first_delivery_ms,
        )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def new_trace_id(now_ms: int) -> str:
    """Event/trace id in 1NCE's (AWS X-Ray) format: `1-<epoch s, 8 hex>-<24 hex>`.

    96 random bits make collisions negligible; ids are unique, not secret (the module's
    generator is reseeded in forked workers)."""
    return f"1-{now_ms // 1000:08x}-{random.getrandbits(96):024x}"


def iso_ms(epoch_ms: int, tz_offset_min: int = 0) -> str:
    """ISO 8601 with milliseconds: `Z` for UTC, else the given offset (echoed back)."""
    if tz_offset_min == 0:
        dt = datetime.fromtimestamp(epoch_ms / 1000, UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"
    tz = timezone(timedelta(minutes=tz_offset_min))
    dt = datetime.fromtimestamp(epoch_ms / 1000, tz)
    return dt.isoformat(timespec="milliseconds")


class TemplateStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"


TRANSLATED_PROTOCOLS = (Protocol.UDP, Protocol.COAP)
"""The protocols an Energy Saver template can claim; LwM2M is never translated."""


@dataclass(frozen=True, slots=True)
class Template:
    """An Energy Saver (BCL) template of one organisation (spec section 3.3).

    `template` is the JSON text as the user sent it (the API returns it unchanged); at most
    one ACTIVE template of an organisation claims each protocol, which the stores enforce."""

    id: str
    org: str
    name: str
    template: str
    protocols: tuple[Protocol, ...]
    status: TemplateStatus
    created_ms: int
    updated_ms: int

    @property
    def claims(self) -> tuple[Protocol, ...]:
        """The protocols this template translates now (none unless ACTIVE)."""
        return self.protocols if self.status is TemplateStatus.ACTIVE else ()


DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Saving:
    """One translated message's contribution to the Energy Saver savings counters.

    `day` is the UTC day number (`received_ms // DAY_MS`); `original_bytes` is the length of
    the translated JSON (what the device would have sent), `optimized_bytes` the binary
    payload's length (spec section 3.3, energy formula)."""

    org: str
    iccid: str
    protocol: Protocol
    day: int
    original_bytes: int
    optimized_bytes: int


@dataclass(frozen=True, slots=True)
class SavingsTotals:
    messages: int = 0
    original_bytes: int = 0
    optimized_bytes: int = 0


class PskFormat(enum.StrEnum):
    """How a PSK's text gives the DTLS key bytes: UTF-8 of the text, or hex-decoded."""

    STRING = "STRING"
    HEX = "HEX"


class PskOrigin(enum.StrEnum):
    API = "API"
    """Set by a user (API, import): never rotated by /bootstrap."""
    BOOTSTRAP = "BOOTSTRAP"
    """Generated by /bootstrap: rotated when it is called again >= 5 min after the last call."""


PSK_PROTOCOLS = (Protocol.COAP, Protocol.LWM2M)


@dataclass(frozen=True, slots=True)
class StoredPsk:
    """A device's pre-shared key as stores keep it: `sealed` is the secret encrypted by the
    authenticator (AES-GCM, key from config; stores never see it in clear)."""

    iccid: str
    protocol: Protocol
    sealed: bytes = field(repr=False)
    format: PskFormat
    origin: PskOrigin
    created_ms: int
    updated_ms: int
    bootstrapped_ms: int | None = None
    """The last /bootstrap call that returned this key (rotation counts from it)."""


class PskJobStatus(enum.StrEnum):
    IN_PROGRESS = "IN_PROGRESS"
    DONE = "DONE"


@dataclass(frozen=True, slots=True)
class PskJob:
    """A bulk PSK import (`POST /v1/integrate/devices/psk/jobs`) and its progress."""

    id: str
    org: str
    created_ms: int
    updated_ms: int
    status: PskJobStatus
    amount: int
    done: int = 0
    failed: int = 0
    errors: tuple[str, ...] = ()
    """The first problems met (bounded), e.g. `item 3: unknown deviceId 8988...`."""


@dataclass(frozen=True, slots=True)
class Lwm2mRegistration:
    """A registered LwM2M client (endpoint name = ICCID), kept across restarts."""

    id: str
    """The registration's location (`/rd/<id>`)."""
    iccid: str
    org: str
    ip: str
    port: int
    secure: bool
    """Registered over DTLS."""
    lifetime_s: int
    version: str
    binding: str
    queue_mode: bool
    links: str
    """The object links as the client sent them (CoRE link format)."""
    registered_ms: int
    updated_ms: int

    @property
    def expires_ms(self) -> int:
        return self.updated_ms + self.lifetime_s * 1000


@dataclass(frozen=True, slots=True)
class Lwm2mObservation:
    """An observation the server holds on a client's resource (RFC 7641 token)."""

    token: bytes
    iccid: str
    registration_id: str
    path: str
    created_ms: int
    content_format: int | None = None


class DownlinkStatus(enum.StrEnum):
    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class DownlinkMode(enum.StrEnum):
    SEND_NOW = "SEND_NOW"
    SEND_WHEN_ACTIVE = "SEND_WHEN_ACTIVE"


@dataclass(frozen=True, slots=True)
class DownlinkRequest:
    """A Device Controller request (spec section 1.7) and its outcome."""

    id: str
    org: str
    iccid: str
    ip: str
    protocol: Protocol
    mode: DownlinkMode
    status: DownlinkStatus
    request_data: dict[str, Any]
    """The request body as accepted, plus the device fields 1NCE echoes."""
    send_attempts: int
    attempts_left: int
    created_ms: int
    updated_ms: int
    expires_ms: int
    """A SCHEDULED request not sent by then ends FAILED (24 h)."""
    result_data: dict[str, Any] | None = None
    error: str | None = None
