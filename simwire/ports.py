"""The contracts between services: every store adapter implements these Protocols.

Who calls what:
- `SimRepository`: authenticator.lookup (hot path, through its cache) and
  authenticator.management (API, CSV import).
- `IngestStore.append`: integrator.pipeline only; the durable write that precedes every ACK.
- `HistoryRepository`, `DeviceRepository`: inspector API (reads) and the retention task.
- `AdminLogRepository`: everybody appends (off the hot path), the inspector API reads.
- `ClientRepository`: simwire.auth (token endpoint, bootstrap of the first admin client).
- `IntegrationRepository`: the integrations API (configuration) and the dispatcher (status).
- `Outbox`: the dispatcher only. The store fills it inside the ingest write: every event
  committed by `IngestStore` is queued for each integration of its organisation that
  subscribes to its type, in the same durable write (ADR 0005).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from simwire.model import (
    AdminLog,
    ApiClient,
    Device,
    DeviceIdentity,
    DeviceState,
    DownlinkRequest,
    DownlinkStatus,
    Event,
    HistoryItem,
    Integration,
    IntegrationState,
    Lwm2mObservation,
    Lwm2mRegistration,
    Payload,
    PskJob,
    RawUplink,
    Saving,
    SavingsTotals,
    Sim,
    StoredPsk,
    Template,
)
from simwire.model import Protocol as DeviceProtocol

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """A page-number page: `{items, page, pageAmount}` in the API."""

    items: list[T]
    page: int
    page_amount: int


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A token page of history; `next_token` is opaque to callers."""

    items: list[HistoryItem]
    next_token: str | None


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    iccid: str
    start_ms: int
    end_ms: int
    protocol: DeviceProtocol | None = None
    page_size: int = 10
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Registration:
    """First contact of a device: written only if the device was not known yet, so the
    LIFECYCLE event and its admin log exist exactly once per device, even with several
    writers racing."""

    device: Device
    event: Event
    log: AdminLog


@dataclass(slots=True)  # hot path: immutable by convention (ADR 0004)
class IngestRecord:
    """Everything one uplink writes, in one durable transaction."""

    events: tuple[Event, ...]
    state: DeviceState | None = None
    logs: tuple[AdminLog, ...] = ()
    registration: Registration | None = None
    saving: Saving | None = None
    """Set when Energy Saver translated the payload: added to the savings counters."""


@dataclass(frozen=True, slots=True)
class AdminLogQuery:
    org: str
    iccid: str | None = None
    type: str | None = None
    category: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    page: int = 1
    page_size: int = 10


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    org: str
    page: int = 1
    page_size: int = 10
    iccid: str | None = None
    sort: tuple[tuple[str, bool], ...] = (("iccid", False),)
    """(field, descending) pairs; fields: iccid, imsi, ip."""


@dataclass(frozen=True, slots=True)
class SimChanges:
    """A PATCH of a SIM: only the fields that are set change."""

    imsi: str | None = None
    ip: str | None = None
    imei: str | None = None
    label: str | None = None
    status: str | None = None
    imei_lock: bool | None = None
    clear: frozenset[str] = field(default_factory=frozenset)
    """Optional fields explicitly set to null (imei, label)."""


class SimRepository(Protocol):
    async def find_by_ip(self, ip: str) -> Sim | None:
        """Hot path (cache miss only). Indexed lookup."""
        ...

    async def get(self, iccid: str) -> Sim | None: ...

    async def create(self, sim: Sim) -> None:
        """Raises Conflict on a duplicate ICCID or IP."""
        ...

    async def update(self, iccid: str, changes: SimChanges, now_ms: int) -> Sim | None:
        """Returns the updated SIM, None if absent; Conflict on a duplicate IP."""
        ...

    async def delete(self, iccid: str) -> bool:
        """Also deletes the SIM's PSKs."""
        ...

    async def list(self, org: str, page: int, page_size: int) -> Page[Sim]: ...


class IngestStore(Protocol):
    def submit(self, record: IngestRecord, done: Callable[[BaseException | None], None]) -> None:
        """Hot path (integrator.pipeline): queue one uplink's writes for the next group
        commit and return at once. `done(None)` runs on the caller's event loop after the
        commit, `done(exc)` if it failed. Never blocks, never raises."""
        ...

    async def append(self, record: IngestRecord) -> None:
        """`submit` for awaiting callers: returns after the commit, raises on failure."""
        ...


class HistoryRepository(Protocol):
    async def history(self, query: HistoryQuery) -> HistoryPage:
        """Indexed by (iccid, received); newest first."""
        ...

    async def purge(self, before_ms: int) -> int:
        """Delete events and admin logs received before `before_ms`; returns rows deleted."""
        ...


class DeviceRepository(Protocol):
    async def list_devices(self, query: DeviceQuery) -> Page[Device]: ...

    async def get_device(self, iccid: str) -> Device | None: ...

    async def is_registered(self, iccid: str) -> bool:
        """Pipeline, on the first message a process sees from a device (then cached)."""
        ...

    async def get_state(self, iccid: str, protocol: DeviceProtocol) -> DeviceState | None: ...


class AdminLogRepository(Protocol):
    async def append_logs(self, logs: Sequence[AdminLog]) -> None:
        """Off the hot path: bad-input logs are batched and rate-limited by callers."""
        ...

    async def list_logs(self, query: AdminLogQuery) -> Page[AdminLog]: ...


class ClientRepository(Protocol):
    async def get_client(self, client_id: str) -> ApiClient | None: ...

    async def create_client(self, client: ApiClient) -> None: ...

    async def count_clients(self) -> int: ...

    async def list_clients(self, org: str) -> list[ApiClient]:
        """The clients of one organisation, by client id."""
        ...

    async def delete_client(self, client_id: str) -> bool: ...

    async def get_or_create_meta(self, key: str, value: str) -> str:
        """Store-wide settings (the token signing key): first writer wins."""
        ...


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One queued event of one integration, in delivery order."""

    key: Any
    """Adapter-specific position (`outbox_ack` takes it back)."""
    event_id: str
    type: str
    iccid: str | None
    source: str | None
    topic: str | None
    received_ms: int
    envelope: str
    """The event's JSON envelope as stored."""


class IntegrationRepository(Protocol):
    async def create_integration(self, integration: Integration) -> None: ...

    async def get_integration(self, integration_id: str) -> Integration | None: ...

    async def list_integrations(self, org: str, page: int, page_size: int) -> Page[Integration]:
        """One organisation's integrations, oldest first."""
        ...

    async def all_integrations(self) -> list[Integration]:
        """Every organisation's (the dispatcher, at start)."""
        ...

    async def update_integration(self, integration: Integration) -> Integration | None:
        """Replace the configuration (name, event types, settings...) and the subscriptions;
        status fields are kept as stored. Returns the stored result, None if absent."""
        ...

    async def set_integration_status(
        self, integration_id: str, state: IntegrationState, error: str | None,
        delivered_ms: int | None = None,
    ) -> Integration | None:
        """The dispatcher's status change; `delivered_ms` sets `first_delivery_ms` if unset."""
        ...

    async def delete_integration(self, integration_id: str) -> bool:
        """Also drops the integration's outbox."""
        ...


class Outbox(Protocol):
    async def outbox_fetch(self, integration_id: str, limit: int) -> list[OutboxItem]:
        """The oldest queued events of an integration (at most `limit`), in commit order."""
        ...

    async def outbox_ack(self, integration_id: str, keys: Sequence[Any]) -> None:
        """Remove delivered items (idempotent)."""
        ...

    async def outbox_depth(self, integration_id: str) -> int: ...

    def on_outbox(self, callback: Callable[[], None]) -> None:
        """Have `callback` run (on the store's loop) after each commit that queued items."""
        ...


class TemplateRepository(Protocol):
    """Energy Saver templates: the templates API writes, the translator's cache reads."""

    async def create_template(self, template: Template) -> None:
        """Raises Conflict if an ACTIVE template of the same organisation already claims one
        of `template.claims` (checked atomically with the write)."""
        ...

    async def get_template(self, template_id: str) -> Template | None: ...

    async def list_templates(self, org: str) -> list[Template]:
        """One organisation's templates, oldest first."""
        ...

    async def update_template(self, template: Template) -> Template | None:
        """Replace a stored template (same id); None if absent; Conflict as on create."""
        ...

    async def delete_template(self, template_id: str) -> bool: ...

    async def active_templates(self) -> list[Template]:
        """Every organisation's ACTIVE templates (the translator's periodic refresh)."""
        ...


class SavingsRepository(Protocol):
    """Energy Saver savings counters, filled by `IngestStore` from `IngestRecord.saving` in
    the ingest write itself; read by the savings API."""

    async def savings(
        self, org: str, first_day: int, last_day: int,
        protocol: DeviceProtocol | None = None, iccid: str | None = None,
    ) -> SavingsTotals:
        """Totals over UTC days `first_day..last_day` (inclusive), optionally filtered."""
        ...

    async def purge_savings(self, before_day: int) -> int:
        """Drop counters of days before `before_day`; returns rows deleted."""
        ...


class PskRepository(Protocol):
    """Device PSKs (sealed). Written by the authenticator's PSK API and import jobs and by
    /bootstrap; read by /bootstrap and the DTLS endpoint's key lookup."""

    async def get_psk(self, iccid: str, protocol: DeviceProtocol) -> StoredPsk | None: ...

    async def put_psks(self, psks: Sequence[StoredPsk]) -> None:
        """Insert or replace (by iccid + protocol), in one write."""
        ...

    async def swap_psk(self, psk: StoredPsk, expected_updated_ms: int | None) -> bool:
        """Compare-and-set for /bootstrap: write `psk` only if the stored key's `updated_ms`
        is `expected_updated_ms` (None: only if there is none). False if another writer
        won; atomic across processes."""
        ...

    async def mark_bootstrapped(self, iccid: str, protocol: DeviceProtocol, at_ms: int,
                                expected_updated_ms: int) -> None:
        """Record a /bootstrap call that returned the key stored at `expected_updated_ms`
        (no-op if the key changed meanwhile)."""
        ...


class PskJobRepository(Protocol):
    async def create_job(self, job: PskJob) -> None: ...

    async def update_job(self, job: PskJob) -> None:
        """Replace progress fields (status, done, failed, errors, updated_ms)."""
        ...

    async def get_job(self, job_id: str) -> PskJob | None: ...

    async def list_jobs(self, org: str, since_ms: int, page: int, page_size: int
                        ) -> Page[PskJob]:
        """One organisation's jobs created at or after `since_ms`, newest first."""
        ...

    async def interrupted_jobs(self) -> list[PskJob]:
        """Jobs still IN_PROGRESS (at start: left by a process that died)."""
        ...


class Lwm2mRepository(Protocol):
    """LwM2M registrations and observations: written by the LwM2M server, read back at
    start so a restart does not forget registered clients."""

    async def put_registration(self, reg: Lwm2mRegistration) -> None:
        """Insert or replace by id; a client (ICCID) has at most one registration: a new
        one replaces the previous registration of that ICCID (and its observations)."""
        ...

    async def get_registration(self, registration_id: str) -> Lwm2mRegistration | None: ...

    async def registration_of(self, iccid: str) -> Lwm2mRegistration | None: ...

    async def delete_registration(self, registration_id: str) -> bool:
        """Also deletes its observations."""
        ...

    async def all_registrations(self) -> list[Lwm2mRegistration]: ...

    async def put_observation(self, obs: Lwm2mObservation) -> None:
        """Insert or replace by token."""
        ...

    async def delete_observation(self, token: bytes) -> bool: ...

    async def observations_of(self, registration_id: str) -> list[Lwm2mObservation]:
        """Oldest first."""
        ...


@dataclass(frozen=True, slots=True)
class DownlinkQuery:
    org: str
    iccid: str | None = None
    status: DownlinkStatus | None = None
    page: int = 1
    page_size: int = 10


class DownlinkRepository(Protocol):
    """Device Controller requests: the actions API writes them, the controller updates
    their status."""

    async def create_downlink(self, req: DownlinkRequest, max_scheduled: int) -> bool:
        """Insert; for a SCHEDULED request only if the device has fewer than
        `max_scheduled` SCHEDULED ones (atomic); False when refused by that limit."""
        ...

    async def update_downlink(self, req: DownlinkRequest,
                              expected: DownlinkStatus | None = None) -> bool:
        """Replace the status fields (status, attempts_left, result_data, error,
        updated_ms); with `expected`, only if the stored status is that one (a
        compare-and-set: a cancel and a delivery cannot both win). False if not applied."""
        ...

    async def get_downlink(self, request_id: str) -> DownlinkRequest | None: ...

    async def list_downlinks(self, query: DownlinkQuery) -> Page[DownlinkRequest]:
        """Newest first."""
        ...

    async def scheduled_downlinks(self, iccid: str) -> list[DownlinkRequest]:
        """A device's SCHEDULED requests, oldest first (fired by its next uplink)."""
        ...

    async def devices_with_scheduled(self) -> set[str]:
        """ICCIDs that have SCHEDULED requests (the controller's hot-path filter)."""
        ...

    async def expire_downlinks(self, now_ms: int) -> int:
        """SCHEDULED requests past `expires_ms` become FAILED ("expired"); returns how
        many."""
        ...

    async def purge_downlinks(self, before_ms: int) -> int:
        """Delete requests created before `before_ms` (7-day retention)."""
        ...


class LeaseRepository(Protocol):
    """Named leases in the store, shared by every process using it (simwire.leadership)."""

    async def acquire_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        """Take or renew lease `name` for `holder` until `now_ms + ttl_ms`: True if it was
        free, expired (its end <= `now_ms`) or already `holder`'s; False (nothing changed)
        while another holder's is running. Atomic across processes."""
        ...

    async def release_lease(self, name: str, holder: str) -> None:
        """End `holder`'s lease `name` now (another holder may take it at once); nothing
        if someone else holds it."""
        ...


class Store(
    SimRepository,
    IngestStore,
    HistoryRepository,
    DeviceRepository,
    AdminLogRepository,
    ClientRepository,
    IntegrationRepository,
    Outbox,
    TemplateRepository,
    SavingsRepository,
    PskRepository,
    PskJobRepository,
    Lwm2mRepository,
    DownlinkRepository,
    LeaseRepository,
    Protocol,
):
    """One storage backend; `simwire.storage.open_store` picks the adapter."""

    name: str

    async def close(self) -> None: ...


class PositionSink(Protocol):
    """Device Locator's intake. The pipeline calls it after committing an uplink whose
    translation carried a position (Energy Saver `custom_type`); must not block."""

    def report_position(
        self, device: DeviceIdentity, lat: float, lon: float, received_ms: int,
    ) -> None: ...


class Translator(Protocol):
    """Energy Saver hook, called by the pipeline for UDP/CoAP payloads (hot path)."""

    def translate(self, org: str, uplink: RawUplink) -> Payload | TranslationError:
        """Return the payload (translated, or raw when no template applies) or an error."""
        ...


@dataclass(frozen=True, slots=True)
class TranslationError:
    """A translation failure: becomes an ERROR event `Translator[UserPayloadError]`."""

    description: str

