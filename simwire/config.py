"""Configuration: documented defaults < TOML file (`--config`) < environment < CLI flags.

Environment variables are the upper-cased field names prefixed with `SIMWIRE_`
(`SIMWIRE_UDP_PORT=4445`). Stores and clients are never config fields: simwire.app builds
them from these values.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "0.0.0.0"  # noqa: S104 - devices reach the endpoints from the operator network
    """Address every endpoint binds to (device ports and the API)."""
    http_host: str | None = None
    """API address when it differs from `host` (e.g. 127.0.0.1 behind a reverse proxy)."""
    udp_port: int = 4445
    coap_port: int = 5683
    coaps_port: int = 5684
    """CoAP over DTLS-PSK (identity = ICCID, key = the device's COAP PSK)."""
    coaps_url: str = "coaps://coap.os.1nce.com:5684"
    """Third field of the `/bootstrap` answer: where devices reach CoAP over DTLS (the 1NCE
    SDK ignores it and uses its compiled endpoint; other clients may use it)."""
    lwm2m_port: int | None = None
    """A plain CoAP port of its own for the LwM2M server (`/rd`, `/dp`); unset: it shares
    the CoAP port, told apart by path. Ports equal to another LwM2M port share one socket
    (0: a port of its own chosen by the kernel)."""
    lwm2m_coaps_port: int | None = None
    """The same behind DTLS; its key is the device's LWM2M key (ADR 0008). Unset: the
    CoAPs port, whose key is the COAP key (the LWM2M key for devices without one)."""
    lwm2m_bootstrap_port: int | None = None
    """A plain CoAP port of its own for the LwM2M bootstrap server (`/bs`); unset: the
    CoAP port."""
    lwm2m_bootstrap_coaps_port: int | None = None
    """The same behind DTLS; unless it is also the LwM2M server's port, its key is the
    LWM2M key a user set (API or import). Unset: the CoAPs port."""
    lwm2m_passive_reporting: bool = False
    """1NCE's LWM2M_PASSIVE_REPORTING: read every object instance except 1, 2, 3 on each
    registration and update (the results become telemetry)."""
    lwm2m_server_url: str = ""
    """LwM2M server URI the bootstrap server writes to Security /0/0/0 after a NoSec
    bootstrap: `coap://<IP literal>:<port>`; `{address}` stands for this host's address as
    seen from the device. Empty: `coap://{address}:<CoAP port>`."""
    lwm2m_server_coaps_url: str = ""
    """The same after a bootstrap over DTLS (Security Mode PSK); empty:
    `coaps://{address}:<CoAPs port>`."""
    lwm2m_bootstrap_url: str = ""
    """Bootstrap-server URI written to Security /0/1/0 after a NoSec bootstrap (a host name
    is allowed); empty: `coap://{address}:<CoAP port>`."""
    lwm2m_bootstrap_coaps_url: str = ""
    """The same after a bootstrap over DTLS; empty: `coaps://{address}:<CoAPs port>`."""
    psk_key_file: Path | None = None
    """The 32-byte key sealing device PSKs at rest; default `<data_dir>/psk-seal.key`,
    created on first start. Every process sharing a store needs the same file; keep it
    out of database backups' reach."""
    http_port: int = 8080
    workers: int = 1
    """Worker processes sharing the ports (SO_REUSEPORT, a device's source address always
    reaching the same one) under one supervisor that restarts a dead one (ADR 0009).
    At most 64; 1 runs everything in this process."""
    leader: bool = True
    """This machine may lead (its worker 0): the leader, one per store, delivers the outbox
    (webhooks, AWS), runs retention and ends interrupted PSK jobs. Machines sharing a
    MongoDB store contend for a lease in it; when the leader dies, another takes over
    within `leader_lease_s`. False: never lead (e.g. ingest-only machines)."""
    leader_lease_s: float = 15.0
    """The leader lease's term: renewed every third of it; a dead leader's duties resume
    elsewhere at most this long after its last renewal."""
    data_dir: Path = Path("data")
    """Where the embedded SQLite store lives (`simwire.db`)."""
    store: str = "sqlite"
    """`sqlite` or a MongoDB URL (`mongodb://host/simwire`)."""
    sqlite_synchronous: str = "FULL"
    """FULL: an ACKed message survives power loss; NORMAL: survives a process crash only."""
    max_payload: int = 1500
    """Largest UDP/CoAP payload accepted (bytes)."""
    retention_days: int = 7
    purge_interval_s: float = 600.0
    log_level: str = "INFO"
    log_format: str = "text"
    """`text` or `json` (one object per line)."""
    sim_cache_ttl_s: float = 30.0
    """How long a SIM lookup is cached; changes from another process show after this."""
    delivery_timeout_s: float = 20.0
    """A webhook/AWS receiver must answer within this (1NCE: 20 s)."""
    delivery_concurrency: int = 8
    """Requests in flight per integration (also its connection pool size)."""
    retry_schedule_s: str = "150,180,420,1020"
    """Gaps between delivery attempts, seconds; attempts in all = gaps + 1."""
    template_refresh_s: float = 2.0
    """How often Energy Saver templates are reloaded from the store (changes made through
    this process's API apply at once; other processes' after at most this)."""
    webhook_ca_file: Path | None = None
    """PEM file of extra CAs trusted for webhook URLs (e.g. a private CA)."""
    webhook_allow_http: bool = False
    """Accept plain-http webhook URLs: development only."""

    def retry_schedule(self) -> tuple[float, ...]:
        try:
            gaps = tuple(float(g) for g in self.retry_schedule_s.split(",") if g.strip())
        except ValueError as exc:
            raise ValueError(f"retry_schedule_s: not a list of seconds: "
                             f"{self.retry_schedule_s!r}") from exc
        if any(g < 0 for g in gaps):
            raise ValueError("retry_schedule_s: gaps must not be negative")
        return gaps

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers: must be 1..64, got {self.workers}")
        if not 0.3 <= self.leader_lease_s <= 3600:
            raise ValueError(f"leader_lease_s: must be 0.3..3600 s, got {self.leader_lease_s}")

    def with_overrides(self, values: Mapping[str, Any]) -> Config:
        return dataclasses.replace(self, **_coerce(values, "override"))


_TYPES = {f.name: f.type for f in fields(Config)}


def _coerce(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in values.items():
        if val is None:
            continue
        typ = _TYPES.get(key)
        if typ is None:
            raise ValueError(f"{source}: unknown setting {key!r}")
        try:
            if typ in ("int", "int | None"):
                out[key] = int(val)
            elif typ == "float":
                out[key] = float(val)
            elif typ in ("Path", "Path | None"):
                out[key] = Path(val)
            elif typ == "bool":
                out[key] = _bool(val)
            else:
                out[key] = str(val)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {key} must be {typ}, got {val!r}") from exc
    return out


def _bool(val: Any) -> bool:
    if isinstance(val, bool):
        return val
    text = str(val).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {val!r}")


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective configuration; raises ValueError with the offending source."""
    cfg = Config()
    if path is not None:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        cfg = dataclasses.replace(cfg, **_coerce(data.get("simwire", data), str(path)))
    env = os.environ if env is None else env
    from_env = {
        name: env[f"SIMWIRE_{name.upper()}"] for name in _TYPES if f"SIMWIRE_{name.upper()}" in env
    }
    cfg = dataclasses.replace(cfg, **_coerce(from_env, "environment"))
    if flags:
        cfg = dataclasses.replace(cfg, **_coerce(flags, "command line"))
    return cfg
