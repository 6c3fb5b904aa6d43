"""LwM2M 1.1 server (OMA LwM2M Core/Transport 1.1 over CoAP, RFC 7252/7641; spec section 1.6).

Shares the CoAP ports: `attach` puts the routes `rd` (registration interface) and `dp`
(Send) on a `CoapServerProtocol`, the plain one and the one behind DTLS, whose endpoint does
dedup, ACK/NON replies and 5.00 on exceptions; requests towards clients (device management,
observe) leave from that same socket through its `requests` (`integrator.coap_client`), so
devices behind NAT get them. Called by `simwire.app` (wiring, start/stop) and by the Device
Controller through `Lwm2mSender` (actions API, `/v1/integrate/devices/{iccid}/actions/LWM2M`).

Registration interface:
- `POST /rd?ep=ICCID&lt=..&lwm2m=..&b=..[&Q]` with the link-format object list -> 2.01
  Created, Location-Path `rd/<id>`. `ep` missing -> 4.00; `lwm2m` other than 1.0 and 1.1
  (absent means 1.0) -> 4.12 Precondition Failed, so newer clients fall back; bad `lt`
  (an integer >= 1, default 86400), `b` or links -> 4.00. Authorisation -> 4.03 Forbidden
  (the Transport spec's code for a registration the server does not allow): the source IP
  must belong to an enabled SIM whose ICCID is `ep`, and behind DTLS the PSK identity must be
  that ICCID too; each refusal writes an admin log `DeviceIntegrator[UnauthorizedDevice]`.
  A new registration of an ICCID replaces its previous one (and that one's observations).
- `POST /rd/<id>` (update: `lt`, `b`, `Q`, links all optional; address and port are those the
  update came from) -> 2.04; `DELETE /rd/<id>` -> 2.02; unknown id -> 4.04; an update or
  deregistration from another SIM's address, or with another DTLS identity -> 4.03.
- Registrations persist in the store (`Lwm2mRepository`) before the reply and are restored
  by `start`; they expire `lt` seconds after the last register/update on the injectable
  clock (`sweep`, run every `sweep_interval_s` of real time by a background task and
  callable by tests after moving a ManualClock).
- Queue mode (`Q`, or 1.0's `b=UQ`) is recorded on the registration; requests are sent at
  once either way (a sleeping client lets them time out): for queue-mode devices the Device
  Controller's SEND_WHEN_ACTIVE mode is the way, fired by the next register/update.
- Each register and update calls `on_activity(iccid)` (the Device Controller fires the
  device's waiting requests) after the reply has been sent. A registration itself produces
  no event: the device appears in the inspector (LIFECYCLE DEVICE_FIRST_TIME_REGISTERED)
  with its first data (Send, passive report, read, notification), which goes through the
  pipeline like any uplink.

Data path: Send (`POST /dp`, SenML JSON 110, SenML CBOR 112 or OMA LwM2M JSON 11543; any
token length including 0; the sender must be registered, else 4.04; unknown/disabled SIM ->
4.01; other formats -> 4.15; malformed or empty payloads -> 4.00), read results, the first
response of an observation and its notifications become TELEMETRY_DATA events (`source:
LWM2M`, `payload {type: JSON, value}`) through the pipeline: `value` is
`formats.to_json(records)`, the flat `{"/3/0/9": 77, "/3/0/7/0": 3800, "_time": ...}` (one
key per resource or resource-instance path; `_time` only when the values carry a time).
A payload holding several measurement times (a SenML time series) becomes one event per
time, oldest first (`formats.split_by_time`). Send is answered 2.04 only once every event
is durably stored (4.01 when the pipeline refuses the SIM, 5.00 when the store fails).

Device state for LWM2M is the merged object tree: a flat path -> value dict that each new
record set updates (`_time` is not kept), stored as the state text of every event. It is
kept in memory per device and loaded from the stored LWM2M state the first time the device
reports after a start, so a restart or a re-registration does not drop what was known.

Positions: when a record set holds `/6/0/0` (latitude) and `/6/0/1` (longitude), the
server reports them to the `PositionSink` (Device Locator) after the event is stored, as
the pipeline does for Energy Saver positions; the message time is the position's time.

Device management (`read`, `write`, `execute`, `discover`, `write_attributes`, `observe`,
`cancel_observation`, `create`, `delete`) by ICCID on the current registration; they raise
`NotRegistered`, or the CoAP errors of `integrator.coap_client` (CoapTimeout, CoapReset,
...), and return the client's answer (`Lwm2mResponse`, any code). Payload format: the one
the client advertised on its root link (`</>;rt="oma.lwm2m";ct=...`; preference SenML CBOR,
SenML JSON, TLV, LwM2M JSON when it names several), else TLV; responses are decoded by their
Content-Format. Observations (RFC 7641) are persisted (`put_observation`) and removed on
cancel, on the end of the observation, on deregistration, expiry and replacement. After a
restart or an address change the client's next update re-establishes them with new tokens
(notifications on the old tokens get RST, which ends them on the client).

Passive reporting (setting LWM2M_PASSIVE_REPORTING; `passive_reporting=True`): after each
register and update the server reads every object instance the client lists, one read per
instance, except objects 1, 2 and 3 and objects without readable resources (Security);
each result becomes an event. Reads stop at the first timeout (the client went to sleep).

Block-wise transfers (RFC 7959): requests from clients (registrations, Send) may come in
Block1 blocks (reassembled by the CoAP endpoint, up to `CoapConfig.max_block_body`);
responses and notifications in Block2 blocks are completed by GETs for the rest
(`CoapRequests.fetch_blocks`, up to 64 KiB). Requests the server sends (Write, Create,
Execute arguments) go in one datagram: 1NCE's Device Controller limits them to 1024 B.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import itertools
import json
import logging
import re
import secrets
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from inspector.adminlog import AdminLogWriter
from integrator import coap
from integrator.coap_client import CoapError, CoapRequests, CoapTimeout
from integrator.controller import Outcome, coap_failure, result_code
from integrator.endpoints.coap import CoapServerProtocol, RouteReply
from integrator.lwm2m.formats import (
    ContentFormat,
    FormatError,
    Link,
    Record,
    decode,
    encode,
    format_path,
    from_json,
    parse_links,
    parse_path,
    split_by_time,
    to_json,
)
from integrator.lwm2m.objects import Registry
from integrator.pipeline import Ack
from simwire.clock import Clock
from simwire.logs import RateLimitedLogger
from simwire.model import (
    DownlinkRequest,
    LogCategory,
    LogType,
    Lwm2mObservation,
    Lwm2mRegistration,
    RawUplink,
    Sim,
)
from simwire.model import Protocol as DeviceProtocol
from simwire.ports import DeviceRepository, Lwm2mRepository, PositionSink

log = logging.getLogger("simwire.integrator.lwm2m")

DELETED = coap.code(2, 2)
FORBIDDEN = coap.code(4, 3)
PRECONDITION_FAILED = coap.code(4, 12)
UNSUPPORTED_CONTENT_FORMAT = coap.code(4, 15)
NOT_ACCEPTABLE = coap.code(4, 6)

VERSIONS = ("1.0", "1.1")
DEFAULT_LIFETIME_S = 86400
MAX_LIFETIME_S = 0xFFFFFFFF
PASSIVE_EXCLUDED = frozenset({1, 2, 3})
BINDING_RE = re.compile(r"[UMHTSNQ]{1,7}")
"""LwM2M 1.1 bindings (U, M, H, T, S, N) and 1.0's queue-mode forms (UQ, SQ, UQS)."""
FORMAT_PREFERENCE = (ContentFormat.SENML_CBOR, ContentFormat.SENML_JSON, ContentFormat.TLV,
                     ContentFormat.LWM2M_JSON)
SEND_FORMATS = frozenset({ContentFormat.SENML_JSON, ContentFormat.SENML_CBOR,
                          ContentFormat.LWM2M_JSON})
_ACK_CODES = {Ack.STORED: coap.CHANGED, Ack.UNAUTHORIZED: coap.UNAUTHORIZED,
              Ack.FAILED: coap.INTERNAL_SERVER_ERROR}
_ACK_RANK = {Ack.STORED: 0, Ack.UNAUTHORIZED: 1, Ack.FAILED: 2}

Submit = Callable[[RawUplink, Callable[[Ack], None] | None], None]
"""The pipeline's `submit` (identify, build events, durable commit, then `done(ack)`)."""


class SimFinder(Protocol):
    """`authenticator.lookup.SimLookup`: the SIM at a source IP (cached)."""

    async def by_ip(self, ip: str) -> Sim | None: ...


class NotRegistered(Exception):
    """The device has no current LwM2M registration."""


@dataclass(frozen=True, slots=True)
class Lwm2mResponse:
    """A client's answer to a device-management request."""

    code: int
    payload: bytes = b""
    content_format: int | None = None
    records: tuple[Record, ...] = ()
    """Decoded values (read, observe)."""
    links: tuple[Link, ...] = ()
    """Discover results."""
    location: str | None = None
    """Create: the new instance's path (Location-Path)."""

    @property
    def ok(self) -> bool:
        return self.code >> 5 == 2

    @property
    def value(self) -> dict[str, Any] | None:
        """The telemetry JSON of `records` (None when there are none)."""
        return to_json(self.records) if self.records else None


@dataclass(slots=True)
class _Client:
    """A current registration and what the server keeps about it in memory."""

    reg: Lwm2mRegistration
    root: tuple[str, ...]
    """Uri-Path segments of the client's alternate root (`</lwm2m>;rt="oma.lwm2m"`)."""
    fmt: int
    """Content format for reads and writes."""
    due: int = 0
    """The expiry time this client's entry in the sweep heap has."""
    state: dict[str, Any] | None = None
    observations: dict[bytes, str] = field(default_factory=dict)
    """Live observations: token -> path."""
    restored: bool = False
    """Restored at start: stored observations are re-established by the next update."""
    passive: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class _Params:
    lifetime: int | None
    binding: str | None
    queue: bool
    links: str | None
    parsed: list[Link] | None
    """`links` parsed (validated once, used for the root path and format)."""


class Lwm2mServer:
    def __init__(
        self, store: Lwm2mRepository, devices: DeviceRepository, lookup: SimFinder,
        submit: Submit, clock: Clock, *, registry: Registry | None = None,
        passive_reporting: bool = False, on_activity: Callable[[str], None] | None = None,
        positions: PositionSink | None = None, admin_logs: AdminLogWriter | None = None,
        sweep_interval_s: float = 1.0, owns: Callable[[str], bool] | None = None,
    ) -> None:
        """`submit`: the pipeline's; `on_activity`: the Device Controller's; `admin_logs`:
        where refused registrations and Sends are logged; `passive_reporting`: the
        LWM2M_PASSIVE_REPORTING setting (an attribute: it may change at run time);
        `owns(ip)`: whether this worker process receives that device's datagrams (only
        those registrations are restored and swept here)."""
        self._store = store
        self._devices = devices
        self._lookup = lookup
        self._submit = submit
        self._clock = clock
        self.registry = registry or Registry.default()
        self.passive_reporting = passive_reporting
        self._on_activity = on_activity
        self.positions = positions
        """Device Locator intake for `/6/0/0`, `/6/0/1` (None: positions are dropped)."""
        self._admin_logs = admin_logs
        self._sweep_interval = sweep_interval_s
        self._owns = owns
        self._clients: dict[str, _Client] = {}  # registration id -> client
        self._id_prefix = secrets.token_hex(4)
        self._id_counter = itertools.count(1)
        self._by_iccid: dict[str, _Client] = {}
        self._expiry: list[tuple[int, str]] = []  # (due ms, registration id), a heap
        self._endpoints: dict[bool, CoapServerProtocol] = {}  # secure -> endpoint
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._warn = RateLimitedLogger(log)

    # -- life cycle ------------------------------------------------------------------------

    def attach(self, endpoint: CoapServerProtocol, secure: bool) -> None:
        """Serve `/rd` and `/dp` on `endpoint` (the plain CoAP or the DTLS one); requests
        to clients registered through it leave from its socket."""
        self._endpoints[secure] = endpoint

        async def rd(msg: coap.Message, addr: tuple[str, int], identity: str | None
                     ) -> RouteReply:
            return await self.handle_rd(msg, addr, identity, secure)

        async def dp(msg: coap.Message, addr: tuple[str, int], identity: str | None
                     ) -> RouteReply:
            return await self.handle_send(msg, addr, identity)

        endpoint.routes["rd"] = rd
        endpoint.routes["dp"] = dp

    async def start(self) -> None:
        """Restore the stored registrations (dropping those that expired meanwhile) and
        start the sweeper."""
        for reg in await self._store.all_registrations():
            if self._owns is not None and not self._owns(reg.ip):
                continue
            client = self._install(reg)
            client.restored = True
        await self.sweep()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop(),
                                                               name="lwm2m-sweeper")

    async def stop(self) -> None:
        """Stop the sweeper and the server's background work (idempotent)."""
        tasks = [*self._tasks, *([self._sweeper] if self._sweeper is not None else [])]
        self._sweeper = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- introspection ---------------------------------------------------------------------

    def registration(self, iccid: str) -> Lwm2mRegistration | None:
        client = self._by_iccid.get(iccid)
        return None if client is None else client.reg

    @property
    def registrations(self) -> list[Lwm2mRegistration]:
        return [client.reg for client in self._clients.values()]

    def content_format(self, iccid: str) -> int | None:
        """The content format the server reads and writes the device's values in."""
        client = self._by_iccid.get(iccid)
        return None if client is None else client.fmt

    def observations(self, iccid: str) -> dict[bytes, str]:
        """The device's live observations: token -> path (a copy)."""
        client = self._by_iccid.get(iccid)
        return {} if client is None else dict(client.observations)

    def state(self, iccid: str) -> dict[str, Any] | None:
        """The device's merged object tree as kept in memory (a copy), None if not loaded."""
        client = self._by_iccid.get(iccid)
        return None if client is None or client.state is None else dict(client.state)

    # -- registration interface ------------------------------------------------------------

    async def handle_rd(self, msg: coap.Message, addr: tuple[str, int], identity: str | None,
                        secure: bool) -> RouteReply:
        path = [v.decode("utf-8", "replace") for n, v in msg.options if n == coap.OPT_URI_PATH]
        if len(path) == 1:
            if msg.code != coap.POST:
                return RouteReply(coap.METHOD_NOT_ALLOWED)
            return await self._register(msg, addr, identity, secure)
        if len(path) != 2 or not path[1]:
            return RouteReply(coap.NOT_FOUND, b"Not Found")
        if msg.code == coap.POST:
            return await self._update(path[1], msg, addr, identity, secure)
        if msg.code == coap.DELETE:
            return await self._deregister(path[1], addr, identity)
        return RouteReply(coap.METHOD_NOT_ALLOWED)

    async def _register(self, msg: coap.Message, addr: tuple[str, int], identity: str | None,
                        secure: bool) -> RouteReply:
        query = _query(msg)
        ep = query.get("ep")
        if not ep:
            return _diag(coap.BAD_REQUEST, "missing endpoint name (ep)")
        version = query.get("lwm2m") or "1.0"
        if version not in VERSIONS:
            return _diag(PRECONDITION_FAILED, f"unsupported LwM2M version {version[:16]}")
        try:
            params = _params(query, msg.payload, register=True)
        except ValueError as exc:
            return _diag(coap.BAD_REQUEST, str(exc))
        sim = await self._lookup.by_ip(addr[0])
        refused = _refusal(sim, ep, identity)
        if refused is not None:
            self._refused(addr[0], sim, f"LwM2M registration of endpoint {ep[:40]!r} "
                                        f"refused: {refused}")
            return RouteReply(FORBIDDEN)
        assert sim is not None
        now = self._clock.now_ms()
        reg = Lwm2mRegistration(
            id=self._new_id(), iccid=sim.iccid, org=sim.org, ip=addr[0], port=addr[1],
            secure=secure, lifetime_s=params.lifetime or DEFAULT_LIFETIME_S, version=version,
            binding=params.binding or "U", queue_mode=params.queue, links=params.links or "",
            registered_ms=now, updated_ms=now)
        await self._store.put_registration(reg)
        old = self._by_iccid.get(sim.iccid)
        state = old.state if old is not None else None
        if old is not None:
            self._drop(old)
        client = self._install(reg, params.parsed)
        client.state = state
        log.info("LwM2M client %s registered from %s:%d (id %s, lifetime %d s, binding %s%s)",
                 reg.iccid, reg.ip, reg.port, reg.id, reg.lifetime_s, reg.binding,
                 ", queue mode" if reg.queue_mode else "")
        return RouteReply(coap.CREATED, options=(
            (coap.OPT_LOCATION_PATH, b"rd"), (coap.OPT_LOCATION_PATH, reg.id.encode())),
            after=lambda: self._activated(client, {}))

    async def _update(self, reg_id: str, msg: coap.Message, addr: tuple[str, int],
                      identity: str | None, secure: bool) -> RouteReply:
        client = self._clients.get(reg_id)
        if client is not None and client.reg.expires_ms <= self._clock.now_ms():
            await self.sweep()  # expired (e.g. while the server was down): re-register
        client = self._clients.get(reg_id)
        if client is None:
            return _diag(coap.NOT_FOUND, "unknown registration")
        try:
            params = _params(_query(msg), msg.payload, register=False)
        except ValueError as exc:
            return _diag(coap.BAD_REQUEST, str(exc))
        if not await self._authorized(client, addr, identity, "update"):
            return RouteReply(FORBIDDEN)
        if self._clients.get(reg_id) is not client:  # deregistered or replaced meanwhile
            return _diag(coap.NOT_FOUND, "unknown registration")
        old = client.reg
        reg = replace(
            old, ip=addr[0], port=addr[1], secure=secure,
            lifetime_s=params.lifetime if params.lifetime is not None else old.lifetime_s,
            binding=params.binding if params.binding is not None else old.binding,
            queue_mode=params.queue if params.binding is not None or params.queue
            else old.queue_mode,
            links=params.links if params.links is not None else old.links,
            updated_ms=self._clock.now_ms())
        await self._store.put_registration(reg)
        if self._clients.get(reg_id) is not client:
            return _diag(coap.NOT_FOUND, "unknown registration")
        moved = (reg.ip, reg.port, reg.secure) != (old.ip, old.port, old.secure)
        stale: dict[bytes, str] = {}
        if moved:  # the observations are bound to the old address: make them again
            endpoint = self._endpoints.get(old.secure)
            for token in client.observations:
                if endpoint is not None:
                    endpoint.requests.cancel_observation(token)
            stale.update(client.observations)
            client.observations.clear()
        client.reg = reg
        if params.parsed is not None:
            client.root, client.fmt = _root_and_format(params.parsed)
        self._schedule(client)
        return RouteReply(coap.CHANGED, after=lambda: self._activated(client, stale))

    async def _deregister(self, reg_id: str, addr: tuple[str, int],
                          identity: str | None) -> RouteReply:
        client = self._clients.get(reg_id)
        if client is None:
            return _diag(coap.NOT_FOUND, "unknown registration")
        if not await self._authorized(client, addr, identity, "deregistration"):
            return RouteReply(FORBIDDEN)
        await self._store.delete_registration(reg_id)
        if self._clients.get(reg_id) is client:
            self._drop(client)
        log.info("LwM2M client %s deregistered (id %s)", client.reg.iccid, reg_id)
        return RouteReply(DELETED)

    async def _authorized(self, client: _Client, addr: tuple[str, int], identity: str | None,
                          what: str) -> bool:
        sim = await self._lookup.by_ip(addr[0])
        refused = _refusal(sim, client.reg.iccid, identity)
        if refused is None:
            return True
        self._refused(addr[0], sim, f"LwM2M {what} of registration {client.reg.id} "
                                    f"({client.reg.iccid}) refused: {refused}")
        return False

    def _refused(self, ip: str, sim: Sim | None, description: str) -> None:
        self._warn.warning(f"refused:{ip}", "%s (from %s)", description, ip)
        if self._admin_logs is None:
            return
        self._admin_logs.add(
            sim.org if sim else "default", LogType.DEVICE, LogCategory.ERROR,
            "DeviceIntegrator[UnauthorizedDevice]", description,
            iccid=sim.iccid if sim else None, imsi=sim.imsi if sim else None, ip=ip,
            rate_key=f"lwm2m:{ip}")

    def _new_id(self) -> str:
        """A registration id: this process's random prefix and a counter (unique across
        processes and restarts; not a secret: every request on it is checked against the
        SIM at the source address)."""
        return f"{self._id_prefix}{next(self._id_counter):x}"

    def _install(self, reg: Lwm2mRegistration, links: list[Link] | None = None) -> _Client:
        root, fmt = _root_and_format(_links(reg.links) if links is None else links)
        client = _Client(reg, root, fmt)
        self._clients[reg.id] = client
        self._by_iccid[reg.iccid] = client
        self._schedule(client)
        return client

    def _schedule(self, client: _Client) -> None:
        """Keep one sweep-heap entry per client, never later than its expiry."""
        expires = client.reg.expires_ms
        if client.due == 0 or expires < client.due:
            client.due = expires
            heapq.heappush(self._expiry, (expires, client.reg.id))

    def _drop(self, client: _Client) -> None:
        """Forget a registration (the store is the caller's): its observations are
        cancelled (the next notification gets RST) and its background work stops."""
        reg = client.reg
        if self._clients.get(reg.id) is client:
            del self._clients[reg.id]
        if self._by_iccid.get(reg.iccid) is client:
            del self._by_iccid[reg.iccid]
        endpoint = self._endpoints.get(reg.secure)
        if endpoint is not None:
            for token in client.observations:
                endpoint.requests.cancel_observation(token)
        client.observations.clear()
        if client.passive is not None:
            client.passive.cancel()
            client.passive = None

    def _activated(self, client: _Client, stale: dict[bytes, str]) -> None:
        """After the reply to a register/update: Device Controller, observations to make
        again, passive reporting."""
        if self._on_activity is not None:
            try:
                self._on_activity(client.reg.iccid)
            except Exception:
                log.exception("on_activity failed for %s", client.reg.iccid)
        if client.restored or stale:
            self._spawn(self._reobserve(client, stale))
        if self.passive_reporting:
            if client.passive is not None:
                client.passive.cancel()
            client.passive = self._spawn(self._passive_report(client))

    async def sweep(self) -> int:
        """Expire registrations whose lifetime has passed on the clock; returns how many."""
        now = self._clock.now_ms()
        expired: list[_Client] = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            due, reg_id = heapq.heappop(heap)
            client = self._clients.get(reg_id)
            if client is None or client.due != due:
                continue  # gone, or an older entry
            if client.reg.expires_ms > now:  # updated since: wait for the new expiry
                client.due = client.reg.expires_ms
                heapq.heappush(heap, (client.due, reg_id))
                continue
            expired.append(client)
        for client in expired:
            self._drop(client)
            log.info("LwM2M registration %s of %s expired", client.reg.id, client.reg.iccid)
            try:
                await self._store.delete_registration(client.reg.id)
            except Exception:
                log.exception("deleting expired LwM2M registration %s failed", client.reg.id)
        return len(expired)

    async def _sweep_loop(self) -> None:
        """Housekeeping on real time; what expires is decided on the injectable clock (a
        ManualClock's sleepers stay those of the code under test)."""
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                await self.sweep()
            except Exception:
                self._warn.exception("sweep", "LwM2M registration sweep failed")

    # -- Send ------------------------------------------------------------------------------

    async def handle_send(self, msg: coap.Message, addr: tuple[str, int],
                          identity: str | None) -> RouteReply:
        path = [n for n, _ in msg.options if n == coap.OPT_URI_PATH]
        if len(path) != 1:
            return RouteReply(coap.NOT_FOUND, b"Not Found")
        if msg.code != coap.POST:
            return RouteReply(coap.METHOD_NOT_ALLOWED)
        received = self._clock.now_ms()
        sim = await self._lookup.by_ip(addr[0])
        if sim is None or not sim.enabled or (identity is not None and identity != sim.iccid):
            reason = _refusal(sim, sim.iccid if sim else "", identity)
            self._refused(addr[0], sim, f"LwM2M Send refused: {reason}")
            return RouteReply(coap.UNAUTHORIZED)
        client = self._by_iccid.get(sim.iccid)
        if client is None:
            return _diag(coap.NOT_FOUND, "not registered")
        raw_format = msg.opt(coap.OPT_CONTENT_FORMAT)
        if raw_format is None:
            return _diag(coap.BAD_REQUEST, "Content-Format required")
        fmt = int.from_bytes(raw_format, "big")
        if fmt not in SEND_FORMATS:
            return _diag(UNSUPPORTED_CONTENT_FORMAT, "Send takes SenML JSON/CBOR or LwM2M JSON")
        try:
            records = decode(fmt, msg.payload, "/", self.registry, now=received / 1000)
        except FormatError as exc:
            return _diag(coap.BAD_REQUEST, str(exc))
        if not records:
            return _diag(coap.BAD_REQUEST, "no values")
        ack = await self._report(client, records, msg.payload, addr, identity, received)
        return RouteReply(_ACK_CODES[ack])

    # -- telemetry -------------------------------------------------------------------------

    async def _report(self, client: _Client, records: list[Record], raw: bytes,
                      addr: tuple[str, int], identity: str | None, received_ms: int) -> Ack:
        """Records -> TELEMETRY_DATA events through the pipeline; the worst outcome."""
        if client.state is None:
            loaded = await self._load_state(client.reg.iccid)
            if client.state is None:
                client.state = loaded
        state = client.state
        groups = split_by_time(records) if len({r.time for r in records}) > 1 else [records]
        loop = asyncio.get_running_loop()
        pending: list[tuple[asyncio.Future[Ack], dict[str, Any]]] = []
        for group in groups:
            value = to_json(group)
            state.update((k, v) for k, v in value.items() if k != "_time")
            text = json.dumps(state, separators=(",", ":"), ensure_ascii=False)
            done: asyncio.Future[Ack] = loop.create_future()
            self._submit(RawUplink(DeviceProtocol.LWM2M, addr[0], addr[1], raw, received_ms,
                                   None, identity, json_value=value, state_text=text),
                         done.set_result)
            pending.append((done, value))
        worst = Ack.STORED
        for done, value in pending:
            ack = await done
            if _ACK_RANK[ack] > _ACK_RANK[worst]:
                worst = ack
            if ack is Ack.STORED:
                await self._position(value, addr[0], received_ms)
        return worst

    async def _load_state(self, iccid: str) -> dict[str, Any]:
        try:
            stored = await self._devices.get_state(iccid, DeviceProtocol.LWM2M)
            data = json.loads(stored.payload) if stored is not None else {}
        except Exception:
            log.exception("loading the LwM2M state of %s failed; starting empty", iccid)
            return {}
        return data if isinstance(data, dict) else {}

    async def _position(self, value: Mapping[str, Any], ip: str, received_ms: int) -> None:
        lat, lon = value.get("/6/0/0"), value.get("/6/0/1")
        if (self.positions is None or not isinstance(lat, int | float)
                or not isinstance(lon, int | float) or isinstance(lat, bool)
                or isinstance(lon, bool)):
            return
        sim = await self._lookup.by_ip(ip)
        if sim is not None:
            self.positions.report_position(sim.identity, float(lat), float(lon), received_ms)

    # -- device management -----------------------------------------------------------------

    def _client(self, iccid: str) -> tuple[_Client, CoapRequests]:
        client = self._by_iccid.get(iccid)
        if client is None:
            raise NotRegistered(f"device {iccid} is not registered")
        endpoint = self._endpoints.get(client.reg.secure)
        if endpoint is None:
            raise NotRegistered(f"device {iccid} registered on an endpoint that is not served")
        return client, endpoint.requests

    async def _request(self, iccid: str, code: int, path: str,
                       options: Iterable[tuple[int, bytes]] = (), payload: bytes = b"", *,
                       observe: Callable[[coap.Message], None] | None = None,
                       token: bytes | None = None) -> tuple[_Client, coap.Message]:
        client, requests = self._client(iccid)
        res = await requests.request((client.reg.ip, client.reg.port), code,
                                     _options(client, path, options), payload,
                                     observe=observe, token=token)
        return client, res

    def _decoded(self, res: coap.Message, path: str, accepted: int | None) -> Lwm2mResponse:
        raw = res.opt(coap.OPT_CONTENT_FORMAT)
        fmt = int.from_bytes(raw, "big") if raw is not None else accepted
        records: tuple[Record, ...] = ()
        if res.code >> 5 == 2 and res.payload and fmt is not None:
            records = tuple(decode(fmt, res.payload, path, self.registry,
                                   now=self._clock.now_ms() / 1000))
        return Lwm2mResponse(res.code, res.payload, fmt, records)

    async def read(self, iccid: str, path: str, *, content_format: int | None = None,
                   report: bool = True) -> Lwm2mResponse:
        """Read (GET, Accept: the client's format); with `report` the values become a
        TELEMETRY_DATA event (awaited: stored when this returns). Raises FormatError when
        the client's payload does not decode."""
        fmt = content_format or self._format(iccid)
        client, res = await self._request(iccid, coap.GET, path,
                                          [(coap.OPT_ACCEPT, coap.uint_option(fmt))])
        if content_format is None and self._fall_back(client, fmt, res):
            fmt = ContentFormat.TLV
            client, res = await self._request(iccid, coap.GET, path,
                                              [(coap.OPT_ACCEPT, coap.uint_option(fmt))])
        out = self._decoded(res, path, fmt)
        if report and out.records:
            await self._report(client, list(out.records), res.payload,
                               (client.reg.ip, client.reg.port), None, self._clock.now_ms())
        return out

    async def write(self, iccid: str, path: str, records: Iterable[Record], *,
                    replace: bool = True) -> Lwm2mResponse:
        """Write: PUT (replace) or POST (partial update of an object instance), encoded in
        the client's format."""
        fmt = self._format(iccid)
        payload = encode(fmt, list(records), path, self.registry)
        _, res = await self._request(iccid, coap.PUT if replace else coap.POST, path,
                                     [(coap.OPT_CONTENT_FORMAT, coap.uint_option(fmt))], payload)
        return Lwm2mResponse(res.code, res.payload)

    async def execute(self, iccid: str, path: str, arguments: str = "") -> Lwm2mResponse:
        """Execute (POST on a resource); `arguments` as text (LwM2M `0='x',1`)."""
        args = arguments.encode()
        opts = [(coap.OPT_CONTENT_FORMAT, b"")] if args else []
        _, res = await self._request(iccid, coap.POST, path, opts, args)
        return Lwm2mResponse(res.code, res.payload)

    async def discover(self, iccid: str, path: str) -> Lwm2mResponse:
        """Discover (GET, Accept: link-format): the links and their attributes."""
        _, res = await self._request(
            iccid, coap.GET, path,
            [(coap.OPT_ACCEPT, coap.uint_option(ContentFormat.LINK_FORMAT))])
        links: tuple[Link, ...] = ()
        if res.code >> 5 == 2 and res.payload:
            links = tuple(parse_links(res.payload))
        return Lwm2mResponse(res.code, res.payload, ContentFormat.LINK_FORMAT, links=links)

    async def write_attributes(self, iccid: str, path: str,
                               attributes: Mapping[str, str | int | float | None]
                               ) -> Lwm2mResponse:
        """Write-Attributes (PUT with Uri-Query `pmin=10`...; None clears an attribute)."""
        opts = [(coap.OPT_URI_QUERY, (name if value is None else f"{name}={value}").encode())
                for name, value in attributes.items()]
        _, res = await self._request(iccid, coap.PUT, path, opts)
        return Lwm2mResponse(res.code, res.payload)

    async def create(self, iccid: str, path: str, records: Iterable[Record]) -> Lwm2mResponse:
        """Create (POST on an object, the new instance's values in `records`)."""
        fmt = self._format(iccid)
        payload = encode(fmt, list(records), path, self.registry)
        _, res = await self._request(iccid, coap.POST, path,
                                     [(coap.OPT_CONTENT_FORMAT, coap.uint_option(fmt))], payload)
        where = [v.decode("utf-8", "replace") for v in res.opt_all(coap.OPT_LOCATION_PATH)]
        return Lwm2mResponse(res.code, res.payload,
                             location=("/" + "/".join(where)) if where else None)

    async def delete(self, iccid: str, path: str) -> Lwm2mResponse:
        """Delete (DELETE on an object instance)."""
        _, res = await self._request(iccid, coap.DELETE, path)
        return Lwm2mResponse(res.code, res.payload)

    async def observe(self, iccid: str, path: str, *, content_format: int | None = None,
                      report: bool = True) -> Lwm2mResponse:
        """Observe (GET Observe=0): the first response is returned (and, with `report`,
        stored as an event like every later notification); the observation is persisted
        when the client accepted it (2.05 with Observe). An earlier observation of the
        same path is cancelled."""
        client, requests = self._client(iccid)
        fmt = content_format or client.fmt
        previous = [token for token, p in client.observations.items() if p == path]

        async def register(fmt: int) -> coap.Message:
            def notified(msg: coap.Message) -> None:
                self._notified(client, path, fmt, msg)

            return (await self._request(iccid, coap.GET, path,
                                        [(coap.OPT_ACCEPT, coap.uint_option(fmt))],
                                        observe=notified))[1]

        res = await register(fmt)
        if content_format is None and self._fall_back(client, fmt, res):
            fmt = ContentFormat.TLV
            res = await register(fmt)
        out = self._decoded(res, path, fmt)
        if res.code >> 5 == 2 and res.opt(coap.OPT_OBSERVE) is not None:
            if self._by_iccid.get(iccid) is not client:  # deregistered meanwhile
                requests.cancel_observation(res.token)
            else:
                client.observations[res.token] = path
                await self._store.put_observation(Lwm2mObservation(
                    res.token, client.reg.iccid, client.reg.id, path, self._clock.now_ms(),
                    fmt))
                await self._forget(client, previous)
        if report and out.records:
            await self._report(client, list(out.records), res.payload,
                               (client.reg.ip, client.reg.port), None, self._clock.now_ms())
        return out

    async def cancel_observation(self, iccid: str, path: str) -> Lwm2mResponse | None:
        """Cancel the observations of `path`: explicitly (GET Observe=1 on the token; the
        response is returned, not stored), reactively (RST on the next notification) when
        the client does not answer. None when there was no observation of `path`."""
        client, requests = self._client(iccid)
        tokens = [token for token, p in client.observations.items() if p == path]
        stored = [o.token for o in await self._store.observations_of(client.reg.id)
                  if o.path == path and o.token not in client.observations]
        out: Lwm2mResponse | None = None
        for token in tokens:
            client.observations.pop(token, None)
            try:
                _, res = await self._request(
                    iccid, coap.GET, path,
                    [(coap.OPT_OBSERVE, b"\x01"), (coap.OPT_ACCEPT, coap.uint_option(client.fmt))],
                    token=token)
                out = Lwm2mResponse(res.code, res.payload)
            except CoapError:
                requests.cancel_observation(token)
                raise
            finally:
                await self._store.delete_observation(token)
        for token in stored:
            await self._store.delete_observation(token)
            if out is None:
                out = Lwm2mResponse(DELETED)
        return out

    def _format(self, iccid: str) -> int:
        return self._client(iccid)[0].fmt

    def _fall_back(self, client: _Client, fmt: int, res: coap.Message) -> bool:
        """A client that answers 4.06 Not Acceptable to the format it advertised gets TLV
        (which every LwM2M 1.0/1.1 client supports) from now on for this registration."""
        if res.code != NOT_ACCEPTABLE or fmt == ContentFormat.TLV:
            return False
        log.info("%s refused content format %d: TLV from now on", client.reg.iccid, fmt)
        client.fmt = ContentFormat.TLV
        return True

    def _notified(self, client: _Client, path: str, fmt: int, msg: coap.Message) -> None:
        """A notification (CoapRequests callback: must not block)."""
        ended = msg.opt(coap.OPT_OBSERVE) is None or msg.code >> 5 != 2
        if ended and client.observations.pop(msg.token, None) is not None:
            self._spawn(self._store.delete_observation(msg.token))
        if msg.code >> 5 != 2 or not msg.payload:
            return
        if msg.opt(coap.OPT_BLOCK2) is not None:
            self._spawn(self._notified_in_blocks(client, path, fmt, msg))
            return
        try:
            records = list(self._decoded(msg, path, fmt).records)
        except FormatError as exc:
            self._warn.warning(f"notify:{client.reg.iccid}",
                               "undecodable notification of %s from %s: %s", path,
                               client.reg.iccid, exc)
            return
        if records:
            self._spawn(self._report(client, records, msg.payload,
                                     (client.reg.ip, client.reg.port), None,
                                     self._clock.now_ms()))

    async def _notified_in_blocks(self, client: _Client, path: str, fmt: int,
                                  first: coap.Message) -> None:
        """RFC 7959 section 2.6: a notification in blocks; the rest comes by GET."""
        try:
            _, requests = self._client(client.reg.iccid)
            whole = await requests.fetch_blocks(
                (client.reg.ip, client.reg.port), coap.GET,
                _options(client, path, [(coap.OPT_ACCEPT, coap.uint_option(fmt))]), b"", first)
        except (CoapError, NotRegistered) as exc:
            self._warn.warning(f"notify:{client.reg.iccid}",
                               "the blocks of a notification of %s from %s: %s", path,
                               client.reg.iccid, exc)
            return
        self._notified(client, path, fmt, whole)

    async def _forget(self, client: _Client, tokens: Iterable[bytes]) -> None:
        endpoint = self._endpoints.get(client.reg.secure)
        for token in tokens:
            client.observations.pop(token, None)
            if endpoint is not None:
                endpoint.requests.cancel_observation(token)
            await self._store.delete_observation(token)

    async def _reobserve(self, client: _Client, stale: dict[bytes, str]) -> None:
        """Make observations again, with new tokens: after a restart (the stored ones) or
        an address change (`stale`: token -> path)."""
        try:
            if client.restored:
                client.restored = False
                for obs in await self._store.observations_of(client.reg.id):
                    if obs.token not in client.observations:
                        stale.setdefault(obs.token, obs.path)
            for token in stale:
                await self._store.delete_observation(token)
            for path in dict.fromkeys(stale.values()):
                if self._by_iccid.get(client.reg.iccid) is not client:
                    return
                if path in client.observations.values():
                    continue
                try:
                    await self.observe(client.reg.iccid, path)
                except CoapTimeout:
                    log.info("re-observing %s of %s timed out", path, client.reg.iccid)
                    return
                except (CoapError, NotRegistered, FormatError) as exc:
                    log.info("re-observing %s of %s failed: %s", path, client.reg.iccid, exc)
        except Exception:
            log.exception("re-establishing the observations of %s failed", client.reg.iccid)

    async def _passive_report(self, client: _Client) -> None:
        """LWM2M_PASSIVE_REPORTING: read each listed object instance but those of objects
        1, 2, 3 and unreadable ones."""
        for path in self.passive_paths(client.reg):
            if self._by_iccid.get(client.reg.iccid) is not client:
                return
            try:
                await self.read(client.reg.iccid, path)
            except CoapTimeout:
                log.info("passive reporting of %s stopped: %s timed out", client.reg.iccid,
                         path)
                return
            except (CoapError, NotRegistered, FormatError) as exc:
                log.info("passive reporting: reading %s of %s failed: %s", path,
                         client.reg.iccid, exc)
            except Exception:
                log.exception("passive reporting of %s failed", client.reg.iccid)
                return

    def passive_paths(self, reg: Lwm2mRegistration) -> list[str]:
        """The object instances passive reporting reads, in the order the client lists."""
        links = _links(reg.links)
        root = "/" + "/".join(_root_and_format(links)[0])
        out: list[str] = []
        for link in links:
            ids = link.ids(root)
            if ids is None or len(ids) != 2 or ids[0] in PASSIVE_EXCLUDED:
                continue
            obj = self.registry.get(ids[0])
            if obj is not None and not obj.readable:
                continue
            path = format_path(ids)
            if path not in out:
                out.append(path)
        return out

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class Lwm2mSender:
    """The Device Controller's sender for LWM2M actions (spec section 1.7): read, write,
    execute, observe-start, observe-end on the device's current registration.

    Result data: `{"code": "205", "payload": {...}}`; the payload is the telemetry JSON of
    the values for read and observe-start, else the client's response payload as text
    ("" when empty). Write `data`: an object keyed by LwM2M paths (`{"/3311/0/5850": true}`,
    the telemetry shape) or, for a resource address, the value alone (`true`, `"text"`,
    opaque as base64); typed from the object registry. A resource address is written with
    PUT (replace), an object instance with POST (partial update). Execute `data`: the
    arguments as a string. No registration -> FAILED "not registered"; the client's 4.xx/5.xx
    -> FAILED; no answer -> a failed attempt `sendAttempts` may repeat."""

    def __init__(self, server: Lwm2mServer) -> None:
        self._server = server

    async def send(self, req: DownlinkRequest) -> Outcome:
        data = req.request_data
        action, path = str(data["action"]), str(data["resourceAddress"])
        server = self._server
        records: list[Record] = []
        if action == "write":
            try:
                records = write_records(path, data.get("data"), server.registry)
            except FormatError as exc:
                return Outcome(False, error=f"invalid data: {exc}")
        try:
            if action == "read":
                res = await server.read(req.iccid, path)
            elif action == "write":
                res = await server.write(req.iccid, path, records,
                                         replace=len(parse_path(path)) >= 3)
            elif action == "execute":
                args = data.get("data")
                res = await server.execute(req.iccid, path, "" if args is None else str(args))
            elif action == "observe-start":
                res = await server.observe(req.iccid, path)
            elif action == "observe-end":
                cancelled = await server.cancel_observation(req.iccid, path)
                if cancelled is None:
                    return Outcome(False, error=f"{path} is not observed")
                res = cancelled
            else:
                return Outcome(False, error=f"unknown action {action}")
        except NotRegistered:
            return Outcome(False, error="not registered")
        except FormatError as exc:
            return Outcome(False, error=f"the device's answer does not decode: {exc}")
        except CoapError as exc:
            return coap_failure(exc)
        result = {"code": result_code(res.code), "payload": _result(res)}
        if res.ok:
            return Outcome(True, result)
        return Outcome(False, result, f"the device answered {coap.code_str(res.code)}")


def write_records(path: str, data: Any, registry: Registry) -> list[Record]:
    """A write action's `data` -> records (see `Lwm2mSender`)."""
    if isinstance(data, Mapping):
        values = dict(data)
    elif len(parse_path(path)) >= 3 and isinstance(data, str | int | float | bool):
        values = {path: data}
    else:
        raise FormatError("data must be an object keyed by LwM2M paths, or a single value "
                          "for a resource address")
    records = from_json(values, registry)
    if not records:
        raise FormatError("data holds no values")
    return records


def _result(res: Lwm2mResponse) -> Any:
    value = res.value
    if value is not None:
        return value
    try:
        text = res.payload.decode()
        if text.isprintable():
            return text
    except UnicodeDecodeError:
        pass
    return base64.b64encode(res.payload).decode()


# -- helpers ---------------------------------------------------------------------------------


def _diag(code: int, text: str) -> RouteReply:
    """A reply with a diagnostic payload (RFC 7252 5.5.2)."""
    return RouteReply(code, text.encode())


def _query(msg: coap.Message) -> dict[str, str]:
    """Uri-Query options as a dict (`Q` -> ""); the first of a repeated name wins."""
    out: dict[str, str] = {}
    for value in msg.opt_all(coap.OPT_URI_QUERY):
        name, _, text = value.decode("utf-8", "replace").partition("=")
        out.setdefault(name, text)
    return out


def _params(query: Mapping[str, str], payload: bytes, *, register: bool) -> _Params:
    """lt, b, Q and the links of a register/update; ValueError says what is wrong."""
    lifetime: int | None = None
    if "lt" in query:
        text = query["lt"]
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIFETIME_S:
            raise ValueError(f"invalid lifetime lt={text[:16]}")
        lifetime = int(text)
    binding = query.get("b")
    if binding is not None and BINDING_RE.fullmatch(binding) is None:
        raise ValueError(f"invalid binding b={binding[:16]}")
    queue = "Q" in query or (binding is not None and "Q" in binding)
    links: str | None = None
    parsed: list[Link] | None = None
    if payload or register:
        try:
            links = payload.decode("utf-8")
            parsed = parse_links(links)
        except (UnicodeDecodeError, FormatError) as exc:
            raise ValueError(f"invalid object links: {exc}") from None
    return _Params(lifetime, binding, queue, links, parsed)


def _refusal(sim: Sim | None, iccid: str, identity: str | None) -> str | None:
    """Why the peer may not act as endpoint `iccid`; None if it may."""
    if sim is None:
        return "no SIM has this address"
    if not sim.enabled:
        return f"SIM {sim.iccid} is disabled"
    if sim.iccid != iccid:
        return f"the endpoint name is not the ICCID {sim.iccid} of the SIM at this address"
    if identity is not None and identity != iccid:
        return f"DTLS identity {identity[:40]!r} is not the endpoint name"
    return None


def _links(text: str) -> list[Link]:
    try:
        return parse_links(text)
    except FormatError:
        return []


def _root_and_format(links: list[Link]) -> tuple[tuple[str, ...], int]:
    """The alternate root path (`rt="oma.lwm2m"`) and the format to use: the client's
    advertised `ct` on its root link (by FORMAT_PREFERENCE), else TLV."""
    root = "/"
    for link in links:
        if link.attributes.get("rt") == "oma.lwm2m":
            root = link.path
            break
    advertised: set[int] = set()
    for link in links:
        if link.path.rstrip("/") == root.rstrip("/") and link.attributes.get("ct"):
            for part in re.split(r"[\s,]+", link.attributes["ct"] or ""):
                if part.isdigit():
                    advertised.add(int(part))
    fmt = next((f for f in FORMAT_PREFERENCE if f in advertised), ContentFormat.TLV)
    return tuple(seg for seg in root.split("/") if seg), int(fmt)


def _options(client: _Client, path: str, extra: Iterable[tuple[int, bytes]] = ()
             ) -> list[tuple[int, bytes]]:
    """A request's options for `path` on `client` (its root path first), sorted."""
    opts = [(coap.OPT_URI_PATH, seg.encode()) for seg in client.root]
    opts += [(coap.OPT_URI_PATH, str(i).encode()) for i in parse_path(path)]
    opts += list(extra)
    opts.sort(key=lambda o: o[0])
    return opts
