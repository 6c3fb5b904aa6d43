"""LwM2M bootstrap server (spec section 1.6; OMA LwM2M 1.1 Core 6.1, Transport 6.4).

A route of the CoAP endpoints (`bs`, on the plain port and behind DTLS): the client sends
`POST /bs?ep=<ICCID>[&pct=<content format>]`; the server answers 2.04 and then, from the
same socket (`CoapServerProtocol.requests`), in this order, each awaited and stopping at
the first failure:

    DELETE /0              Bootstrap-Delete (the client keeps its bootstrap account)
    DELETE /1
    PUT /0/0               Security: LwM2M server URI (an IP literal), Bootstrap-Server
                           false, Security Mode, Identity = ICCID, Secret Key, SSID 1111
    PUT /0/1               Security: this bootstrap server, Bootstrap-Server true, the same
                           mode, SSID 2222
    PUT /1/0               Server: SSID 1111, Lifetime 86400, Default Minimum Period 1,
                           Notification Storing true, Binding "U"
    POST /bs               Bootstrap-Finish

Any 2.xx answer counts as success (OMA: 2.02 for Delete, 2.04 for Write and Finish); a 4.xx/
5.xx, RST or timeout stops the sequence: admin log `LwM2M[BootstrapFailed]` (at most one a
minute per device) and `simwire_uplinks_total{protocol="LWM2M",outcome="bootstrap_failed"}`;
a finished one counts `bootstrap_ok`.

Security Mode: 0 (PSK) when the request came over DTLS, 3 (NoSec) over plain CoAP; both
accounts get the same mode (1NCE: "If bootstrapping over DTLS, the secure LwM2M server is
given priority"). /0/1 carries no keys: Bootstrap-Delete spares the bootstrap account and
Bootstrap-Write keeps the resources it does not name, so the client keeps the credentials
it bootstrapped with (the values 1NCE documents for /0/1).

Write payloads: the client's `pct=` when it names a format that can carry an object
instance (OMA-TLV 11542, SenML JSON 110, SenML CBOR 112, OMA-JSON 11543; the 1.0 numbers
too), else OMA-TLV, which every 1.0/1.1 client accepts; each PUT carries its Content-Format.
A `pct` that is not a content format number gets 4.00, one that cannot carry an object
instance (text, opaque, CBOR, link-format) 4.15 (OMA Core table 6.1.7.1-1).

The Secret Key /0/0/5 (the Identity is the ICCID, what the 1NCE blueprints use) is the
key the LwM2M server's DTLS port will check for the device (ADR 0008):
- after a bootstrap over DTLS, when the server shares the CoAPs port (the default,
  `KeyRole.COAP`) or the port the bootstrap came through: that port's key for the device,
  unchanged (the session it bootstrapped through stays valid);
- otherwise (plain bootstraps, a LwM2M server port of its own) the device's LWM2M key from
  `PskService.issue_lwm2m_server_key` (`GET /v1/integrate/devices/{iccid}/psk/LWM2M`): a
  fresh 16-character alphanumeric key on every bootstrap (printable, no NUL, <= 29 bytes:
  FreeRTOS copies it into `char[30]` and uses strlen), stored with origin BOOTSTRAP; a key
  a user set for LWM2M through the API (1NCE: the customer's bootstrap PSK) is kept and
  written as the server key too (Simwire keeps one LWM2M key per device), its key bytes as
  they are (a HEX key decoded). Deviation from 1NCE, which then still writes a fresh
  server key.

Authorisation (before the 2.04): the enabled SIM at the source IP, whose ICCID is `ep`
(and, over DTLS, the PSK identity). Unknown IP or disabled SIM: 4.01 (as the CoAP ingest);
a known SIM claiming another endpoint name or identity: 4.03. Both log
`LwM2M[BootstrapRefused]` (at most one a minute per IP) and count `bootstrap_refused`.
Missing `ep`: 4.00. The key is issued before the 2.04, so a store failure is a 5.00, not a
sequence that cannot start.

A device has at most one bootstrap running: another `POST /bs` from it meanwhile (new MID;
an exact retransmission is answered by the endpoint's dedup) gets 2.04 without a second
sequence (`bootstrap_duplicate`). `stop()` cancels the running sequences (shutdown).

URIs: `{address}` in a configured URI (and in the defaults, `coap://{address}:<port>`)
becomes this host's address as the device reaches it: the bind address, or, when bound to
a wildcard, the local address the kernel routes to the device from.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from authenticator.lookup import SimLookup
from authenticator.psk import DtlsKeys, KeyRole, PskService
from inspector.adminlog import AdminLogWriter
from integrator import coap
from integrator.coap_client import CoapError, CoapRequests
from integrator.endpoints.coap import RouteHandler, RouteReply
from integrator.lwm2m.formats import ContentFormat, Record, encode, resolve_format
from integrator.lwm2m.objects import Registry
from simwire.clock import Clock
from simwire.metrics import Metrics
from simwire.model import LogCategory, LogType, Sim
from simwire.model import Protocol as DeviceProtocol

log = logging.getLogger("simwire.integrator.lwm2m.bootstrap")

ROUTE = "bs"
SERVER_SSID = 1111
BOOTSTRAP_SSID = 2222
LIFETIME_S = 86400
DEFAULT_PMIN_S = 1
BINDING = "U"
MODE_PSK, MODE_NOSEC = 0, 3
ADDRESS = "{address}"
FORBIDDEN = coap.code(4, 3)
UNSUPPORTED_FORMAT = coap.code(4, 15)
WRITE_FORMATS = frozenset({ContentFormat.TLV, ContentFormat.SENML_JSON,
                           ContentFormat.SENML_CBOR, ContentFormat.LWM2M_JSON})
STALE_START_S = 30.0
"""A device marked running whose sequence never started (its 2.04 was not sent) is free
again after this."""
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - compared, never bound


class _Endpoint(Protocol):
    """What a bootstrap needs of the CoAP endpoint it came through (CoapServerProtocol)."""

    @property
    def requests(self) -> CoapRequests: ...


@dataclass(frozen=True, slots=True)
class Uris:
    """URI templates for Security /0/0/0 (`server*`, IP literals) and /0/1/0
    (`bootstrap*`), for NoSec (plain CoAP) and PSK (DTLS) bootstraps; `{address}` is
    replaced per device (module docstring)."""

    server: str
    server_secure: str
    bootstrap: str
    bootstrap_secure: str

    @classmethod
    def build(cls, server_ports: tuple[int, int], bootstrap_ports: tuple[int, int],
              server: str = "", server_secure: str = "", bootstrap: str = "",
              bootstrap_secure: str = "") -> Uris:
        """Empty settings default to this host's ports (plain coap://, DTLS coaps://) of
        the LwM2M server and of the bootstrap server."""
        return cls(server or f"coap://{ADDRESS}:{server_ports[0]}",
                   server_secure or f"coaps://{ADDRESS}:{server_ports[1]}",
                   bootstrap or f"coap://{ADDRESS}:{bootstrap_ports[0]}",
                   bootstrap_secure or f"coaps://{ADDRESS}:{bootstrap_ports[1]}")

    def check(self) -> None:
        """ValueError unless each is a coap:// (NoSec) or coaps:// (PSK) URI and the server
        URIs name an IP literal (1NCE clients do not resolve names)."""
        for what, uri, scheme, ip in (
                ("lwm2m_server_url", self.server, "coap", True),
                ("lwm2m_server_coaps_url", self.server_secure, "coaps", True),
                ("lwm2m_bootstrap_url", self.bootstrap, "coap", False),
                ("lwm2m_bootstrap_coaps_url", self.bootstrap_secure, "coaps", False)):
            _check_uri(what, uri, scheme, ip)


@dataclass(frozen=True, slots=True)
class Step:
    """One request of the sequence."""

    code: int
    path: tuple[str, ...]
    content_format: int | None = None
    payload: bytes = b""

    @property
    def options(self) -> list[tuple[int, bytes]]:
        opts = [(coap.OPT_URI_PATH, p.encode()) for p in self.path]
        if self.content_format is not None:
            opts.append((coap.OPT_CONTENT_FORMAT, coap.uint_option(self.content_format)))
        return opts

    def __str__(self) -> str:
        method = {coap.POST: "POST", coap.PUT: "PUT", coap.DELETE: "DELETE"}.get(
            self.code, coap.code_str(self.code))
        return f"{method} /{'/'.join(self.path)}"


@dataclass(slots=True)
class _Session:
    started: float
    task: asyncio.Task[None] | None = None
    steps: list[Step] = field(default_factory=list)


class BootstrapServer:
    def __init__(self, lookup: SimLookup, psks: PskService, admin_logs: AdminLogWriter,
                 metrics: Metrics, clock: Clock, uris: Uris, host: str,
                 server_keys: DtlsKeys, registry: Registry | None = None) -> None:
        """`server_keys`: the key lookup of the LwM2M server's DTLS port."""
        uris.check()
        self._server_keys = server_keys
        self._lookup = lookup
        self._psks = psks
        self._admin_logs = admin_logs
        self._clock = clock
        self._uris = uris
        self._host = host
        self._registry = registry or Registry.default()
        self._running: dict[str, _Session] = {}
        self._stopped = False
        c = metrics.uplinks
        p = DeviceProtocol.LWM2M.value
        self._count_ok = c.labels(p, "bootstrap_ok").inc
        self._count_failed = c.labels(p, "bootstrap_failed").inc
        self._count_refused = c.labels(p, "bootstrap_refused").inc
        self._count_duplicate = c.labels(p, "bootstrap_duplicate").inc
        self._count_bad = c.labels(p, "bad_request").inc

    @property
    def running(self) -> frozenset[str]:
        """ICCIDs with a bootstrap in progress."""
        return frozenset(self._running)

    def handler(self, endpoint: _Endpoint, keys: DtlsKeys | None = None) -> RouteHandler:
        """The `bs` route of one CoAP endpoint; `keys`: its DTLS port's key lookup (None:
        plain CoAP)."""

        async def handle(msg: coap.Message, addr: tuple[str, int], identity: str | None
                         ) -> RouteReply:
            return await self._request(endpoint, keys, msg, (addr[0], addr[1]), identity)

        return handle

    async def stop(self) -> None:
        """Shutdown: cancel the running sequences; later requests start none."""
        self._stopped = True
        tasks = [s.task for s in self._running.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- Bootstrap-Request ------------------------------------------------------------------

    async def _request(self, endpoint: _Endpoint, keys: DtlsKeys | None, msg: coap.Message,
                       addr: tuple[str, int], identity: str | None) -> RouteReply:
        secure = keys is not None
        path = [v.decode("utf-8", "replace") for v in msg.opt_all(coap.OPT_URI_PATH)]
        if path != [ROUTE]:
            return RouteReply(coap.NOT_FOUND, b"Not Found")
        if msg.code != coap.POST:
            return RouteReply(coap.METHOD_NOT_ALLOWED)
        query: dict[str, str] = {}
        for raw in msg.opt_all(coap.OPT_URI_QUERY):
            name, _, value = raw.decode("utf-8", "replace").partition("=")
            query.setdefault(name, value)
        ep = query.get("ep")
        if not ep:
            self._count_bad()
            return RouteReply(coap.BAD_REQUEST, b"missing ep")
        fmt = ContentFormat.TLV
        if "pct" in query:
            try:
                fmt = resolve_format(int(query["pct"]))
            except ValueError:  # not a number, or FormatError: not a content format
                self._count_bad()
                return RouteReply(coap.BAD_REQUEST, b"bad pct")
            if fmt not in WRITE_FORMATS:
                self._count_bad()
                return RouteReply(UNSUPPORTED_FORMAT, b"pct cannot carry bootstrap writes")
        ip = addr[0]
        sim = await self._lookup.by_ip(ip)
        if sim is None or not sim.enabled:
            why = "unknown device IP" if sim is None else f"disabled SIM {sim.iccid}"
            return self._refuse(sim, ip, coap.UNAUTHORIZED,
                                f"LwM2M bootstrap request from {why} {ip} refused")
        if ep != sim.iccid:
            return self._refuse(sim, ip, FORBIDDEN,
                                f"LwM2M bootstrap refused: endpoint name {ep[:64]!r} is not "
                                f"the ICCID of the SIM at {ip}")
        if secure and identity != sim.iccid:
            return self._refuse(sim, ip, FORBIDDEN,
                                f"LwM2M bootstrap refused: DTLS identity {identity!r:.64} is "
                                f"not the ICCID of the SIM at {ip}")
        now = self._clock.monotonic()
        session = self._running.get(sim.iccid)
        if session is not None and (session.task is not None
                                    or now - session.started < STALE_START_S):
            self._count_duplicate()
            return RouteReply(coap.CHANGED)  # already running: not started twice
        session = self._running[sim.iccid] = _Session(now)
        try:
            session.steps = self._plan(sim, await self._server_key(sim, keys), secure, fmt, ip)
        except BaseException:
            if self._running.get(sim.iccid) is session:
                del self._running[sim.iccid]
            raise

        def start() -> None:  # once the 2.04 is sent
            if self._running.get(sim.iccid) is not session:
                return
            if self._stopped:
                del self._running[sim.iccid]
                return
            session.task = asyncio.get_running_loop().create_task(
                self._run(endpoint, sim, addr, session), name=f"lwm2m-bootstrap-{sim.iccid}")

        return RouteReply(coap.CHANGED, after=start)

    def _refuse(self, sim: Sim | None, ip: str, code: int, description: str) -> RouteReply:
        self._count_refused()
        self._admin_logs.add(
            sim.org if sim else "default", LogType.DEVICE, LogCategory.ERROR,
            "LwM2M[BootstrapRefused]", description, iccid=sim.iccid if sim else None,
            imsi=sim.imsi if sim else None, ip=ip, rate_key=f"lwm2m-bs:{ip}")
        return RouteReply(code)

    # -- the write sequence -----------------------------------------------------------------

    async def _server_key(self, sim: Sim, via: DtlsKeys | None) -> bytes:
        """The Secret Key /0/0/5 (module docstring); `via`: the bootstrap's DTLS port."""
        server = self._server_keys
        if via is not None and (server.role is KeyRole.COAP or server is via):
            key = await self._psks.key_for(sim, server.role)
            if key is not None:
                return key
        return (await self._psks.issue_lwm2m_server_key(sim)).key

    def _plan(self, sim: Sim, key: bytes, secure: bool, fmt: ContentFormat, ip: str
              ) -> list[Step]:
        uris = self._uris
        address = self._address(ip)
        server = (uris.server_secure if secure else uris.server).replace(ADDRESS, address)
        bootstrap = (uris.bootstrap_secure if secure else uris.bootstrap).replace(ADDRESS,
                                                                                   address)
        mode = MODE_PSK if secure else MODE_NOSEC

        def write(path: str, records: Sequence[Record]) -> Step:
            payload = encode(fmt, records, path, self._registry)
            return Step(coap.PUT, tuple(path.strip("/").split("/")), int(fmt), payload)

        return [
            Step(coap.DELETE, ("0",)),
            Step(coap.DELETE, ("1",)),
            write("/0/0", [
                Record("/0/0/0", server),
                Record("/0/0/1", False),
                Record("/0/0/2", mode),
                Record("/0/0/3", sim.iccid.encode()),
                Record("/0/0/5", key),
                Record("/0/0/10", SERVER_SSID),
            ]),
            write("/0/1", [
                Record("/0/1/0", bootstrap),
                Record("/0/1/1", True),
                Record("/0/1/2", mode),
                Record("/0/1/10", BOOTSTRAP_SSID),
            ]),
            write("/1/0", [
                Record("/1/0/0", SERVER_SSID),
                Record("/1/0/1", LIFETIME_S),
                Record("/1/0/2", DEFAULT_PMIN_S),
                Record("/1/0/6", True),
                Record("/1/0/7", BINDING),
            ]),
            Step(coap.POST, (ROUTE,)),
        ]

    def _address(self, peer_ip: str) -> str:
        """This host's address as `peer_ip` reaches it, as a URI host."""
        host = self._host
        if host in _WILDCARDS:
            host = _route_source(peer_ip) or "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    async def _run(self, endpoint: _Endpoint, sim: Sim, addr: tuple[str, int],
                   session: _Session) -> None:
        step: Step | None = None
        try:
            for step in session.steps:
                try:
                    reply = await endpoint.requests.request(addr, step.code, step.options,
                                                            step.payload)
                except CoapError as exc:
                    self._failed(sim, addr, f"{step}: {exc}")
                    return
                if reply.code >> 5 != 2:
                    self._failed(sim, addr, f"{step} answered {coap.code_str(reply.code)}")
                    return
            self._count_ok()
            log.info("LwM2M bootstrap of %s (%s) finished", sim.iccid, addr[0])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("LwM2M bootstrap of %s failed", sim.iccid)
            self._failed(sim, addr, f"{step}: internal error")
        finally:
            if self._running.get(sim.iccid) is session:
                del self._running[sim.iccid]

    def _failed(self, sim: Sim, addr: tuple[str, int], why: str) -> None:
        self._count_failed()
        log.info("LwM2M bootstrap of %s (%s) stopped: %s", sim.iccid, addr[0], why)
        self._admin_logs.add(
            sim.org, LogType.DEVICE, LogCategory.ERROR, "LwM2M[BootstrapFailed]",
            f"LwM2M bootstrap of {sim.iccid} stopped: {why}", iccid=sim.iccid, imsi=sim.imsi,
            ip=addr[0], rate_key=f"lwm2m-bs-failed:{sim.iccid}")


def _route_source(peer_ip: str) -> str | None:
    """The local address the kernel would send to `peer_ip` from (no packet is sent)."""
    try:
        family = socket.AF_INET6 if ":" in peer_ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((peer_ip, 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


def _check_uri(what: str, uri: str, scheme: str, need_ip: bool) -> None:
    parts = urlsplit(uri.replace(ADDRESS, "192.0.2.1"))
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError(f"{what}: bad port in {uri!r}") from None
    if parts.scheme != scheme or not parts.hostname:
        raise ValueError(f"{what}: not a {scheme}://host[:port] URI: {uri!r}")
    if need_ip:
        try:
            ipaddress.ip_address(parts.hostname)
        except ValueError:
            raise ValueError(f"{what}: the host must be an IP literal or {ADDRESS} "
                             f"(LwM2M clients do not resolve names): {uri!r}") from None
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError(f"{what}: no path, query or fragment allowed: {uri!r}")

