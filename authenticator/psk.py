"""Device pre-shared keys: sealed storage, the PSK API, import jobs and /bootstrap.

Callers: authenticator.api (PSK routes), the CoAP endpoint's `GET /bootstrap` (through
`Bootstrap`), the DTLS endpoints' key lookups (`PskService.dtls_keys(role)`, one per port:
`KeyRole` says which stored key the port checks), the LwM2M bootstrap server. Keys are sealed with
AES-256-GCM (`SecretBox`) before they reach a store, bound to their ICCID and protocol, so
a database dump alone does not reveal them; the key of the box lives outside the store.
Secrets are never logged.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from authenticator.lookup import SimLookup
from inspector.adminlog import AdminLogWriter
from simwire.clock import Clock
from simwire.errors import NotFound, Problems, Unprocessable
from simwire.model import (
    ICCID_RE,
    PSK_PROTOCOLS,
    LogCategory,
    LogType,
    PskFormat,
    PskJob,
    PskJobStatus,
    PskOrigin,
    Sim,
    StoredPsk,
    iso_ms,
)
from simwire.model import Protocol as DeviceProtocol
from simwire.ports import Page, PskJobRepository, PskRepository, SimRepository

log = logging.getLogger("simwire.authenticator.psk")

PSK_ALPHABET = string.ascii_letters + string.digits
GENERATED_LENGTH = 16
"""Generated keys: 16 printable alphanumerics (fit every blueprint's buffers, no comma)."""
ROTATE_AFTER_MS = 5 * 60 * 1000
"""/bootstrap regenerates a generated key when called this long after its previous call."""
KEY_MIN, KEY_MAX, IMPORT_KEY_MAX = 8, 256, 128
MAX_IMPORT_ITEMS = 5000
JOB_BATCH = 500
JOB_ERRORS_KEPT = 100
JOB_STALE_S = 60.0
"""A job IN_PROGRESS whose progress is older than this was interrupted (its process died):
the leader ends it (`PskService.finish_interrupted`)."""
JOB_SWEEP_S = 30.0
"""How often the leader looks for interrupted jobs (and when it takes the lead)."""
JOBS_LISTED_DAYS = 30
KEY_CACHE_S = 10.0
"""DTLS key lookups are cached this long (a handshake asks twice); local changes drop the
entry at once, other processes' changes show within this time."""


class SecretBox:
    """AES-256-GCM sealing; the associated data binds a sealed key to its row."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the PSK sealing key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        """Load the key file, creating it (32 random bytes, mode 0600) if absent."""
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        key = os.urandom(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            return cls(path.read_bytes())
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        log.warning("created the PSK sealing key %s: back it up with the store; every "
                    "process sharing the store needs the same file", path)
        return cls(key)

    def seal(self, secret: str, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, secret.encode(), aad)

    def open(self, sealed: bytes, aad: bytes) -> str:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], aad).decode()
        except (InvalidTag, ValueError, UnicodeDecodeError) as exc:
            raise SealError("a stored PSK cannot be opened with this sealing key") from exc


class KeyRole(enum.Enum):
    """Which stored key a DTLS port checks for the device at a source IP (ADR 0008)."""

    COAP = "COAP"
    """The CoAPs port (5684), with LwM2M on it unless LwM2M has ports of its own: the
    device's COAP key; a device without one, its LWM2M key."""
    LWM2M = "LWM2M"
    """A LwM2M-server port of its own (`lwm2m_coaps_port`, possibly shared with the
    bootstrap server): the LWM2M key (the one the bootstrap server writes)."""
    LWM2M_BOOTSTRAP = "LWM2M_BOOTSTRAP"
    """A bootstrap-only port (`lwm2m_bootstrap_coaps_port`): the LWM2M key a user set (API
    or import); generated keys are server keys, never bootstrap credentials."""

    @property
    def protocols(self) -> frozenset[DeviceProtocol]:
        """The stored keys this role reads (a change to one drops the port's sessions)."""
        if self is KeyRole.COAP:
            return frozenset((DeviceProtocol.COAP, DeviceProtocol.LWM2M))
        return frozenset((DeviceProtocol.LWM2M,))


class SealError(Exception):
    """The sealing key does not open a stored PSK (wrong key file, tampered row)."""


@dataclass(frozen=True, slots=True)
class DevicePsk:
    """A device's PSK in clear, as the API and the DTLS endpoint see it."""

    iccid: str
    protocol: DeviceProtocol
    secret: str
    format: PskFormat
    origin: PskOrigin
    created_ms: int
    updated_ms: int
    bootstrapped_ms: int | None = None

    @property
    def key(self) -> bytes:
        """The DTLS key bytes: UTF-8 of a STRING key, decoded hex of a HEX key."""
        if self.format is PskFormat.HEX:
            return bytes.fromhex(self.secret)
        return self.secret.encode()


def generate_psk() -> str:
    return "".join(secrets.choice(PSK_ALPHABET) for _ in range(GENERATED_LENGTH))


class _Repo(PskRepository, PskJobRepository, Protocol):
    pass


class PskService:
    def __init__(self, repo: _Repo, sims: SimRepository, lookup: SimLookup, box: SecretBox,
                 clock: Clock) -> None:
        self._repo = repo
        self._sims = sims
        self._lookup = lookup
        self._box = box
        self._clock = clock
        self._jobs: set[asyncio.Task[None]] = set()
        self._keys: dict[tuple[str, KeyRole], tuple[float, bytes | None]] = {}
        self.on_change: list[Callable[[str, DeviceProtocol], object]] = []
        """Called with a SIM's IP and the protocol whose key changed (the DTLS endpoints
        whose role reads that key drop the sessions made with the old one)."""
        self.publish: Callable[[str, str, DeviceProtocol], object] | None = None
        """Tells the other worker processes (simwire.app); they call `forget`."""

    def _changed(self, sim: Sim, protocol: DeviceProtocol) -> None:
        self.forget(sim.iccid, sim.ip, protocol)
        if self.publish is not None:
            self.publish(sim.iccid, sim.ip, protocol)

    def forget(self, iccid: str, ip: str, protocol: DeviceProtocol) -> None:
        """A key of `iccid` changed (here, or in another worker): drop the cached keys and
        run the `on_change` hooks."""
        for role in KeyRole:
            self._keys.pop((iccid, role), None)
        for hook in self.on_change:
            hook(ip, protocol)

    # -- sealing ---------------------------------------------------------------------------

    def _seal(self, psk: DevicePsk) -> StoredPsk:
        return StoredPsk(psk.iccid, psk.protocol, self._box.seal(psk.secret, _aad(psk)),
                         psk.format, psk.origin, psk.created_ms, psk.updated_ms,
                         psk.bootstrapped_ms)

    def _open(self, stored: StoredPsk) -> DevicePsk:
        secret = self._box.open(stored.sealed, _aad(stored))
        return DevicePsk(stored.iccid, stored.protocol, secret, stored.format, stored.origin,
                         stored.created_ms, stored.updated_ms, stored.bootstrapped_ms)

    # -- API -------------------------------------------------------------------------------

    async def _own_sim(self, iccid: str, org: str) -> Sim:
        sim = await self._sims.get(iccid) if ICCID_RE.match(iccid) else None
        if sim is None or sim.org != org:
            raise NotFound(f"device {iccid} not found")
        return sim

    async def set(self, iccid: str, body: Any, org: str) -> DevicePsk:
        """`POST /v1/integrate/devices/{iccid}/psk`: set a user key (never rotated)."""
        problems = Problems()
        item = _parse_item(body, problems, "", KEY_MAX, need_device=False)
        problems.raise_any()
        assert item is not None
        sim = await self._own_sim(iccid, org)
        secret, protocol, fmt = item
        now = self._clock.now_ms()
        old = await self._repo.get_psk(iccid, protocol)
        psk = DevicePsk(iccid, protocol, secret, fmt, PskOrigin.API,
                        old.created_ms if old else now, now)
        await self._repo.put_psks([self._seal(psk)])
        self._changed(sim, protocol)
        return psk

    async def get(self, iccid: str, protocol: str, org: str) -> DevicePsk:
        await self._own_sim(iccid, org)
        if protocol not in [p.value for p in PSK_PROTOCOLS]:
            raise NotFound(f"no {protocol} key for device {iccid}")
        stored = await self._repo.get_psk(iccid, DeviceProtocol(protocol))
        if stored is None:
            raise NotFound(f"no {protocol} key for device {iccid}")
        return self._open(stored)

    # -- /bootstrap and DTLS -----------------------------------------------------------------

    async def bootstrap(self, sim: Sim) -> DevicePsk:
        """The COAP key `GET /bootstrap` returns: the stored one, a new one if none, or a
        new one when a generated key is asked for >= 5 min after its previous call. Racing
        calls (several processes) agree on one key through the store's compare-and-set."""
        for _ in range(5):
            now = self._clock.now_ms()
            stored = await self._repo.get_psk(sim.iccid, DeviceProtocol.COAP)
            if stored is not None and not (
                stored.origin is PskOrigin.BOOTSTRAP and stored.bootstrapped_ms is not None
                and now - stored.bootstrapped_ms >= ROTATE_AFTER_MS
            ):
                await self._repo.mark_bootstrapped(sim.iccid, DeviceProtocol.COAP, now,
                                                   stored.updated_ms)
                return replace(self._open(stored), bootstrapped_ms=now)
            fresh = DevicePsk(sim.iccid, DeviceProtocol.COAP, generate_psk(), PskFormat.STRING,
                              PskOrigin.BOOTSTRAP, stored.created_ms if stored else now,
                              now, now)
            if await self._repo.swap_psk(self._seal(fresh),
                                         stored.updated_ms if stored else None):
                self._changed(sim, DeviceProtocol.COAP)
                return fresh
        raise RuntimeError(f"PSK of {sim.iccid} kept changing during /bootstrap")

    async def issue_lwm2m_server_key(self, sim: Sim) -> DevicePsk:
        """The key a LwM2M bootstrap writes to Security /0/0/5 (the LwM2M-server account),
        kept as the device's LWM2M key (`GET .../psk/LWM2M`): a fresh generated one on
        every call (1NCE: "the LwM2M-server PSK is regenerated on every bootstrap"), origin
        BOOTSTRAP. A key a user set for LWM2M (origin API) is never replaced: it is
        returned (and marked bootstrapped) instead. Racing bootstraps: compare-and-set."""
        protocol = DeviceProtocol.LWM2M
        for _ in range(5):
            now = self._clock.now_ms()
            stored = await self._repo.get_psk(sim.iccid, protocol)
            if stored is not None and stored.origin is PskOrigin.API:
                await self._repo.mark_bootstrapped(sim.iccid, protocol, now, stored.updated_ms)
                return replace(self._open(stored), bootstrapped_ms=now)
            if stored is not None:
                now = max(now, stored.updated_ms + 1)  # the compare-and-set sees a change
            fresh = DevicePsk(sim.iccid, protocol, generate_psk(), PskFormat.STRING,
                              PskOrigin.BOOTSTRAP, stored.created_ms if stored else now,
                              now, now)
            if await self._repo.swap_psk(self._seal(fresh),
                                         stored.updated_ms if stored else None):
                self._changed(sim, protocol)
                return fresh
        raise RuntimeError(f"LWM2M key of {sim.iccid} kept changing during a bootstrap")

    def dtls_keys(self, role: KeyRole) -> DtlsKeys:
        """The key lookup of a DTLS port (`integrator.endpoints.dtls.PskLookup`)."""
        return DtlsKeys(self, self._lookup, role)

    async def key_for(self, sim: Sim, role: KeyRole) -> bytes | None:
        """The key a DTLS port of `role` checks for `sim` (cached for KEY_CACHE_S; None:
        the device has no such key). Called by DtlsKeys and the LwM2M bootstrap server."""
        now = self._clock.monotonic()
        cached = self._keys.get((sim.iccid, role))
        if cached is not None and cached[0] > now:
            return cached[1]
        stored = await self._repo.get_psk(
            sim.iccid, DeviceProtocol.COAP if role is KeyRole.COAP else DeviceProtocol.LWM2M)
        if stored is None and role is KeyRole.COAP:
            stored = await self._repo.get_psk(sim.iccid, DeviceProtocol.LWM2M)
        if role is KeyRole.LWM2M_BOOTSTRAP and stored is not None \
                and stored.origin is not PskOrigin.API:
            stored = None
        key = None
        if stored is not None:
            try:
                key = self._open(stored).key
            except SealError:
                log.error("the %s key of %s cannot be opened with this sealing key",
                          stored.protocol.value, sim.iccid)
        if len(self._keys) >= 100_000:
            self._keys.clear()
        self._keys[(sim.iccid, role)] = (now + KEY_CACHE_S, key)
        return key

    # -- import jobs -------------------------------------------------------------------------

    async def start_import(self, body: Any, org: str) -> PskJob:
        """`POST /v1/integrate/devices/psk/jobs`: validate the shape, then import in the
        background; per-item problems (unknown device, bad key) count as `failed`."""
        if not isinstance(body, list) or not body:
            raise Unprocessable([{"property": "body", "message":
                                  "must be a non-empty list of {deviceId, secretKey, "
                                  "protocol, format}"}])
        if len(body) > MAX_IMPORT_ITEMS:
            raise Unprocessable([{"property": "body", "message":
                                  f"at most {MAX_IMPORT_ITEMS} items per job"}])
        now = self._clock.now_ms()
        job = PskJob(str(uuid.uuid4()), org, now, now, PskJobStatus.IN_PROGRESS, len(body))
        await self._repo.create_job(job)
        task = asyncio.get_running_loop().create_task(self._run_job(job, body))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return job

    async def _run_job(self, job: PskJob, items: list[Any]) -> None:
        errors: list[str] = []
        done = failed = 0
        try:
            for start in range(0, len(items), JOB_BATCH):
                batch: list[StoredPsk] = []
                for n, raw in enumerate(items[start:start + JOB_BATCH], start):
                    problems = Problems()
                    item = _parse_item(raw, problems, f"[{n}].", IMPORT_KEY_MAX,
                                       need_device=True)
                    device = raw.get("deviceId") if isinstance(raw, dict) else None
                    sim = None
                    if item is not None and isinstance(device, str):
                        sim = await self._sims.get(device) if ICCID_RE.match(device) else None
                        if sim is None or sim.org != job.org:
                            problems.add(f"[{n}].deviceId", f"unknown device {device}")
                    if problems.items or item is None or sim is None:
                        failed += 1
                        if len(errors) < JOB_ERRORS_KEPT:
                            errors.extend(f"{p['property']}: {p['message']}"
                                          for p in problems.items[:1])
                        continue
                    now = self._clock.now_ms()
                    secret, protocol, fmt = item
                    batch.append(self._seal(DevicePsk(sim.iccid, protocol, secret, fmt,
                                                      PskOrigin.API, now, now)))
                if batch:
                    await self._repo.put_psks(batch)
                    done += len(batch)
                job = replace(job, done=done, failed=failed, errors=tuple(errors),
                              updated_ms=self._clock.now_ms())
                await self._repo.update_job(job)
            await self._repo.update_job(replace(job, status=PskJobStatus.DONE,
                                                updated_ms=self._clock.now_ms()))
        except Exception:
            log.exception("PSK import job %s failed", job.id)
            await self._repo.update_job(replace(
                job, status=PskJobStatus.DONE, failed=job.amount - done,
                errors=(*errors, "job stopped by an internal error")[:JOB_ERRORS_KEPT],
                updated_ms=self._clock.now_ms()))

    async def finish_interrupted(self) -> None:
        """The leader, every `JOB_SWEEP_S` (simwire.app): a job IN_PROGRESS that has not
        moved for `JOB_STALE_S` lost the process running it (a running job records its
        progress after each batch); it ends DONE, the rest failed."""
        stale = self._clock.now_ms() - round(JOB_STALE_S * 1000)
        for job in await self._repo.interrupted_jobs():
            if job.updated_ms > stale:
                continue
            await self._repo.update_job(replace(
                job, status=PskJobStatus.DONE, failed=job.amount - job.done,
                errors=(*job.errors, "interrupted by a restart; import the rest again"),
                updated_ms=self._clock.now_ms()))

    async def stop(self) -> None:
        """Shutdown: cancel running imports (they end DONE at the next start)."""
        for task in list(self._jobs):
            task.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)

    async def list_jobs(self, org: str, page: int, page_size: int) -> Page[PskJob]:
        since = self._clock.now_ms() - JOBS_LISTED_DAYS * 86_400_000
        return await self._repo.list_jobs(org, since, page, page_size)

    async def get_job(self, job_id: str, org: str) -> PskJob:
        job = await self._repo.get_job(job_id)
        if job is None or job.org != org:
            raise NotFound(f"job {job_id} not found")
        return job


class DtlsKeys:
    """One DTLS port's key lookup (`PskService.dtls_keys`): the enabled SIM at the source
    IP, its ICCID as the identity, its key for the port's role."""

    def __init__(self, service: PskService, lookup: SimLookup, role: KeyRole) -> None:
        self._service = service
        self._lookup = lookup
        self.role = role

    async def psk_for(self, ip: str) -> tuple[str, bytes] | None:
        sim = await self._lookup.by_ip(ip)
        if sim is None or not sim.enabled:
            return None
        key = await self._service.key_for(sim, self.role)
        return None if key is None else (sim.iccid, key)


def _aad(psk: DevicePsk | StoredPsk) -> bytes:
    return f"{psk.iccid}|{psk.protocol.value}".encode()


def _parse_item(body: Any, problems: Problems, prefix: str, key_max: int, need_device: bool
                ) -> tuple[str, DeviceProtocol, PskFormat] | None:
    """Validate `{secretKey, protocol, format}` (+ `deviceId` in imports)."""
    if not isinstance(body, dict):
        problems.add(prefix.rstrip(".") or "body", "must be a JSON object")
        return None
    allowed = {"secretKey", "protocol", "format"} | ({"deviceId"} if need_device else set())
    for key in sorted(body.keys() - allowed):
        problems.add(prefix + key, "unknown property")
    if need_device and not isinstance(body.get("deviceId"), str):
        problems.add(prefix + "deviceId", "is required: the device's ICCID")
    fmt_raw = body.get("format", "STRING")
    fmt = PskFormat(fmt_raw) if fmt_raw in ("STRING", "HEX") else None
    if fmt is None:
        problems.add(prefix + "format", "must be STRING or HEX")
    protocol_raw = body.get("protocol")
    protocol = (DeviceProtocol(protocol_raw)
                if protocol_raw in [p.value for p in PSK_PROTOCOLS] else None)
    if protocol is None:
        problems.add(prefix + "protocol", "is required: COAP or LWM2M")
    secret = body.get("secretKey")
    if not isinstance(secret, str) or not KEY_MIN <= len(secret) <= key_max:
        problems.add(prefix + "secretKey", f"is required: {KEY_MIN} to {key_max} characters")
        return None
    if fmt is PskFormat.HEX:
        try:
            bytes.fromhex(secret)
            if len(secret) % 2 or not all(c in string.hexdigits for c in secret):
                raise ValueError
        except ValueError:
            problems.add(prefix + "secretKey", "must be hex digits (an even number)")
    elif fmt is PskFormat.STRING and ("," in secret or not secret.isprintable()):
        problems.add(prefix + "secretKey", "must be printable and contain no comma "
                     "(/bootstrap returns it comma-separated)")
    if fmt is None or protocol is None or problems.items:
        return None
    return secret, protocol, fmt


def to_api(psk: DevicePsk) -> dict[str, Any]:
    return {"deviceId": psk.iccid, "identity": psk.iccid, "secretKey": psk.secret,
            "createdAt": iso_ms(psk.created_ms), "updatedAt": iso_ms(psk.updated_ms),
            "protocol": psk.protocol.value, "format": psk.format.value}


def job_to_api(job: PskJob) -> dict[str, Any]:
    return {"id": job.id, "createdAt": iso_ms(job.created_ms),
            "updatedAt": iso_ms(job.updated_ms), "status": job.status.value,
            "amount": job.amount, "done": job.done, "failed": job.failed,
            "errors": list(job.errors)}


class Bootstrap:
    """`GET /bootstrap` on the plain CoAP port (spec section 2.2), called by the CoAP
    endpoint with the source IP: the payload `<iccid>,<psk>,<coaps url>` (what the 1NCE SDK
    parses with strstr "89" then strtok ","), or None for an unknown or disabled SIM
    (4.01, admin log at most once a minute per IP)."""

    def __init__(self, psks: PskService, lookup: SimLookup, admin_logs: AdminLogWriter,
                 coaps_url: str) -> None:
        self._psks = psks
        self._lookup = lookup
        self._admin_logs = admin_logs
        self._url = coaps_url

    async def answer(self, ip: str) -> bytes | None:
        sim = await self._lookup.by_ip(ip)
        if sim is None or not sim.enabled:
            why = "unknown device IP" if sim is None else f"disabled SIM {sim.iccid}"
            self._admin_logs.add(
                sim.org if sim else "default", LogType.DEVICE, LogCategory.ERROR,
                "DeviceAuthenticator[UnauthorizedDevice]",
                f"Bootstrap request from {why} {ip} refused",
                iccid=sim.iccid if sim else None, imsi=sim.imsi if sim else None, ip=ip,
                rate_key=f"bootstrap:{ip}")
            return None
        psk = await self._psks.bootstrap(sim)
        return f"{psk.iccid},{psk.secret},{self._url}".encode()
