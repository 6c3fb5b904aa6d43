"""SIM management: validation, create/update/delete, CSV import. Called by the API and CLI."""

from __future__ import annotations

import csv
import io
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from authenticator.lookup import SimLookup
from simwire.clock import Clock
from simwire.errors import NotFound, SimwireError, Unprocessable
from simwire.model import DEFAULT_ORG, ICCID_RE, IMEI_RE, IMSI_RE, Sim, SimStatus
from simwire.ports import Page, SimChanges, SimRepository

CSV_COLUMNS = ("iccid", "imsi", "ip", "imei", "label", "status")
LABEL_MAX = 128
_FIELDS = frozenset((*CSV_COLUMNS, "imeiLock"))


def _check_field(name: str, value: Any, errors: list[dict[str, Any]]) -> Any:
    """Validate one SIM field; appends `{property, message}` to `errors`; returns the value."""

    def bad(msg: str) -> None:
        errors.append({"property": name, "message": msg})

    if name in ("imei", "label") and value is None:
        return None
    if name == "imeiLock":
        if not isinstance(value, bool):
            bad("must be true or false")
        return value
    if not isinstance(value, str):
        bad("must be a string")
        return None
    if name == "iccid" and not ICCID_RE.match(value):
        bad("must be 19 or 20 digits")
    elif name == "imsi" and not IMSI_RE.match(value):
        bad("must be 15 digits")
    elif name == "imei" and not IMEI_RE.match(value):
        bad("must be 14 to 16 digits")
    elif name == "label" and len(value) > LABEL_MAX:
        bad(f"must be at most {LABEL_MAX} characters")
    elif name == "status" and value not in (SimStatus.ENABLED, SimStatus.DISABLED):
        bad("must be Enabled or Disabled")
    elif name == "ip":
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            bad("must be an IPv4 address")
        else:
            if addr.version != 4:
                bad("must be an IPv4 address")
            else:
                return str(addr)
    return value


def parse_new_sim(body: Any, org: str, now_ms: int) -> Sim:
    """API/CSV body -> Sim, or Unprocessable listing every problem."""
    if not isinstance(body, dict):
        raise Unprocessable([{"message": "body must be a JSON object"}])
    errors: list[dict[str, Any]] = []
    for key in body:
        if key not in _FIELDS:
            errors.append({"property": key, "message": "unknown property"})
    values: dict[str, Any] = {}
    for name in ("iccid", "imsi", "ip"):
        if body.get(name) in (None, ""):
            errors.append({"property": name, "message": "is required"})
        else:
            values[name] = _check_field(name, body[name], errors)
    for name in ("imei", "label"):
        values[name] = _check_field(name, body.get(name) or None, errors)
    values["status"] = _check_field("status", body.get("status") or "Enabled", errors)
    lock = _check_field("imeiLock", body.get("imeiLock", False), errors)
    if errors:
        raise Unprocessable(errors)
    return Sim(
        iccid=values["iccid"], imsi=values["imsi"], ip=values["ip"], imei=values["imei"],
        label=values["label"], status=SimStatus(values["status"]), org=org,
        created_ms=now_ms, updated_ms=now_ms, imei_lock=bool(lock),
    )


def parse_changes(body: Any) -> SimChanges:
    if not isinstance(body, dict) or not body:
        raise Unprocessable([{"message": "body must be a non-empty JSON object"}])
    errors: list[dict[str, Any]] = []
    values: dict[str, Any] = {}
    clear: set[str] = set()
    for key, val in body.items():
        if key == "iccid":
            errors.append({"property": key, "message": "cannot be changed"})
        elif key not in _FIELDS:
            errors.append({"property": key, "message": "unknown property"})
        elif val is None and key in ("imei", "label"):
            clear.add(key)
        elif val is None:
            errors.append({"property": key, "message": "cannot be null"})
        else:
            values[key] = _check_field(key, val, errors)
    if errors:
        raise Unprocessable(errors)
    lock = values.pop("imeiLock", None)
    return SimChanges(**values, imei_lock=lock, clear=frozenset(clear))


class SimManagement:
    """SIM CRUD for one store; keeps the hot-path lookup cache coherent."""

    def __init__(self, repo: SimRepository, lookup: SimLookup, clock: Clock) -> None:
        self._repo = repo
        self._lookup = lookup
        self._clock = clock

    async def create(self, body: Any, org: str = DEFAULT_ORG) -> Sim:
        sim = parse_new_sim(body, org, self._clock.now_ms())
        await self._repo.create(sim)
        self._lookup.invalidate(sim.ip)
        return sim

    async def get(self, iccid: str, org: str) -> Sim:
        sim = await self._repo.get(iccid)
        if sim is None or sim.org != org:
            raise NotFound(f"SIM {iccid} not found")
        return sim

    async def update(self, iccid: str, body: Any, org: str) -> Sim:
        changes = parse_changes(body)
        old = await self.get(iccid, org)
        sim = await self._repo.update(iccid, changes, self._clock.now_ms())
        if sim is None:
            raise NotFound(f"SIM {iccid} not found")
        self._lookup.invalidate(old.ip, sim.ip)
        return sim

    async def delete(self, iccid: str, org: str) -> None:
        old = await self.get(iccid, org)
        if not await self._repo.delete(iccid):
            raise NotFound(f"SIM {iccid} not found")
        self._lookup.invalidate(old.ip)

    async def list(self, org: str, page: int, page_size: int) -> Page[Sim]:
        return await self._repo.list(org, page, page_size)

    async def import_csv(
        self,
        text: str,
        org: str = DEFAULT_ORG,
        progress: Callable[[int, int], None] | None = None,
    ) -> ImportReport:
        """Import rows; bad rows are reported (line, errors) and the valid ones kept."""
        rows = list(_csv_rows(text))
        report = ImportReport(total=len(rows))
        for i, (line, row) in enumerate(rows, 1):
            if isinstance(row, str):
                report.errors.append((line, row))
            else:
                try:
                    await self.create(row, org)
                    report.imported += 1
                except SimwireError as exc:
                    report.errors.append((line, _describe(exc)))
            if progress is not None:
                progress(i, len(rows))
        return report


@dataclass
class ImportReport:
    total: int
    imported: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)


def _describe(exc: SimwireError) -> str:
    parts = []
    for err in exc.errors:
        prop = err.get("property")
        parts.append(f"{prop}: {err['message']}" if prop else str(err["message"]))
    return "; ".join(parts)


def _csv_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row dict or error text) for each data row of a SIM CSV."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    header = next(reader, None)
    if header is None:
        return
    cols = [h.strip().lower() for h in header]
    missing = [c for c in ("iccid", "imsi", "ip") if c not in cols]
    unknown = [c for c in cols if c not in CSV_COLUMNS]
    if missing or unknown:
        raise Unprocessable(
            [{"message": f"CSV header must name {', '.join(CSV_COLUMNS)}; "
                         f"missing {missing or '-'}, unknown {unknown or '-'}"}]
        )
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(cols):
            yield line, f"expected {len(cols)} columns, got {len(row)}"
            continue
        yield line, {c: (v.strip() or None) for c, v in zip(cols, row, strict=True)}
