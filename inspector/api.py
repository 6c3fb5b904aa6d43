"""Device Inspector API (`/v1/inspect/...`, `/v1/administrationLogs`), mounted by simwire.app.

Reads the store only; never calls the pipeline. Every device route first checks that the
device (or its SIM) belongs to the caller's organisation: other tenants get 404.
"""

from __future__ import annotations

from aiohttp import web

from simwire.clock import Clock
from simwire.errors import BadRequest, NotFound
from simwire.http import (
    json_response,
    page_params,
    page_response,
    parse_time,
    principal,
    query_int,
    requires,
)
from simwire.model import ICCID_RE, AdminLog, Device, Protocol, Sim, iso_ms
from simwire.ports import (
    AdminLogQuery,
    AdminLogRepository,
    DeviceQuery,
    DeviceRepository,
    HistoryQuery,
    HistoryRepository,
    SimRepository,
)

RETENTION_MS = 7 * 24 * 3600 * 1000
SORT_FIELDS = frozenset({"iccid", "imsi", "ip"})


def _protocol(request: web.Request, required: bool = False) -> Protocol | None:
    raw = request.query.get("protocol")
    if raw is None or raw == "":
        if required:
            raise BadRequest("protocol is required",
                             [{"property": "protocol", "message": "must be UDP, COAP or LWM2M"}])
        return None
    try:
        return Protocol(raw.upper())
    except ValueError:
        raise BadRequest("bad protocol",
                         [{"property": "protocol", "message": "must be UDP, COAP or LWM2M"}]
                         ) from None


def _parse_q(raw: str | None) -> dict[str, str]:
    """1NCE filter syntax `q=field:value,field:value` (values may contain ':')."""
    out: dict[str, str] = {}
    if not raw:
        return out
    for part in raw.split(","):
        key, sep, value = part.partition(":")
        if not sep or not key.strip():
            raise BadRequest("bad q filter",
                             [{"property": "q", "message": "must be field:value[,field:value]"}])
        out[key.strip()] = value.strip()
    return out


def routes(
    devices: DeviceRepository, history: HistoryRepository, logs: AdminLogRepository,
    sims: SimRepository, clock: Clock,
) -> web.RouteTableDef:
    table = web.RouteTableDef()

    async def owned(
        iccid: str, org: str, with_sim: bool = False
    ) -> tuple[Device | None, Sim | None]:
        """404 unless the device or its SIM belongs to `org`; returns what it read of them
        (the SIM only when asked or needed to decide), never another tenant's."""
        if not ICCID_RE.match(iccid):
            raise NotFound(f"device {iccid} not found")
        device = await devices.get_device(iccid)
        if device is not None and device.org != org:
            device = None
        if device is not None and not with_sim:
            return device, None
        sim = await sims.get(iccid)
        if sim is not None and sim.org != org:
            sim = None
        if device is None and sim is None:
            raise NotFound(f"device {iccid} not found")
        return device, sim

    @table.get("/v1/inspect/devices")
    @requires("viewer")
    async def list_devices(request: web.Request) -> web.Response:
        q = _parse_q(request.query.get("q"))
        unknown = set(q) - {"iccid"}
        if unknown:
            raise BadRequest("bad q filter",
                             [{"property": "q", "message": f"unknown field {sorted(unknown)[0]}"}])
        sort: list[tuple[str, bool]] = []
        for part in (request.query.get("sort") or "iccid").split(","):
            name = part.strip().lstrip("-")
            if name not in SORT_FIELDS:
                raise BadRequest("bad sort", [{"property": "sort",
                                               "message": "fields: iccid, imsi, ip"}])
            sort.append((name, part.strip().startswith("-")))
        number, size = page_params(request, 50)
        page = await devices.list_devices(DeviceQuery(
            org=principal(request).org,
            page=number,
            page_size=size,
            iccid=q.get("iccid"),
            sort=tuple(sort),
        ))
        return page_response(page, Device.to_api)

    @table.get("/v1/inspect/devices/history")
    @requires("viewer")
    async def history_by_query(request: web.Request) -> web.Response:
        iccid = request.query.get("iccid") or request.query.get("deviceId")
        if not iccid:
            raise BadRequest("iccid is required",
                             [{"property": "iccid", "message": "is required"}])
        return await _history(request, iccid)

    @table.get("/v1/inspect/devices/{iccid}")
    @requires("viewer")
    async def get_device(request: web.Request) -> web.Response:
        iccid = request.match_info["iccid"]
        device, sim = await owned(iccid, principal(request).org, with_sim=True)
        if device is not None:
            body = device.to_api()
        else:
            assert sim is not None  # owned() found one of them
            body = {"id": iccid, "iccid": iccid, "imsi1": sim.imsi, "ip": sim.ip}
        if sim is not None and sim.label:
            body["name"] = sim.label
        return json_response(body)

    @table.get("/v1/inspect/devices/{iccid}/history")
    @requires("viewer")
    async def history_by_path(request: web.Request) -> web.Response:
        return await _history(request, request.match_info["iccid"])

    async def _history(request: web.Request, iccid: str) -> web.Response:
        await owned(iccid, principal(request).org)
        now = clock.now_ms()
        start_raw = request.query.get("startDateTime")
        end_raw = request.query.get("endDateTime")
        offset = 0
        end = now
        if end_raw:
            end, offset = parse_time("endDateTime", end_raw)
        start = end - RETENTION_MS
        if start_raw:
            start, offset = parse_time("startDateTime", start_raw)
        if start > end:
            raise BadRequest("startDateTime is after endDateTime",
                             [{"property": "startDateTime",
                               "message": "must not be after endDateTime"}])
        page = await history.history(HistoryQuery(
            iccid=iccid,
            start_ms=max(start, now - RETENTION_MS),
            end_ms=end,
            protocol=_protocol(request),
            page_size=query_int(request, "pageSize", 10, 1, 100),
            token=request.query.get("nextToken") or None,
        ))
        body: dict[str, object] = {"items": [i.to_api(offset) for i in page.items]}
        if page.next_token:
            body["nextToken"] = page.next_token
        return json_response(body)

    @table.get("/v1/inspect/devices/{iccid}/telemetry")
    @requires("viewer")
    async def telemetry(request: web.Request) -> web.Response:
        iccid = request.match_info["iccid"]
        await owned(iccid, principal(request).org)
        protocol = _protocol(request, required=True)
        assert protocol is not None
        state = await devices.get_state(iccid, protocol)
        if state is None:
            raise NotFound(f"no {protocol.value} state for device {iccid}")
        body: dict[str, object] = {"payload": state.payload, "time": iso_ms(state.updated_ms)}
        if state.topic is not None:
            body["topic"] = state.topic
        return json_response({"id": iccid, "protocol": protocol.value, "state": body})

    @table.get("/v1/administrationLogs")
    @requires("viewer")
    async def admin_logs(request: web.Request) -> web.Response:
        q = _parse_q(request.query.get("q"))
        for key in ("iccid", "type", "category", "startDateTime", "endDateTime"):
            if key in request.query:
                q.setdefault(key, request.query[key])
        unknown = set(q) - {"iccid", "type", "category", "startDateTime", "endDateTime"}
        if unknown:
            raise BadRequest("bad q filter",
                             [{"property": "q", "message": f"unknown field {sorted(unknown)[0]}"}])
        start = parse_time("startDateTime", q["startDateTime"])[0] if "startDateTime" in q else None
        end = parse_time("endDateTime", q["endDateTime"])[0] if "endDateTime" in q else None
        number, size = page_params(request)
        page = await logs.list_logs(AdminLogQuery(
            org=principal(request).org, iccid=q.get("iccid"),
            type=q["type"].upper() if "type" in q else None,
            category=q["category"].lower() if "category" in q else None,
            start_ms=start, end_ms=end, page=number, page_size=size,
        ))
        return page_response(page, AdminLog.to_api)

    return table
