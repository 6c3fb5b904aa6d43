"""Device Controller API (1NCE paths under `/v1/integrate/devices`), mounted by simwire.app.

Sending and cancelling need the operator role, reading viewer. Listing and cancelling
(`/v1/integrate/devices/actions/requests[...]`) are Simwire's paths: 1NCE's are not public.
"""

from __future__ import annotations

from aiohttp import web

from integrator.controller import Controller, to_api
from simwire.errors import BadRequest
from simwire.http import (
    json_response,
    page_params,
    page_response,
    principal,
    read_json,
    requires,
)
from simwire.model import ICCID_RE, DownlinkStatus
from simwire.ports import DownlinkQuery


def routes(controller: Controller) -> web.RouteTableDef:
    table = web.RouteTableDef()

    @table.post("/v1/integrate/devices/actions/{protocol}")
    @requires("operator")
    async def bulk(request: web.Request) -> web.Response:
        res = await controller.create_bulk(request.match_info["protocol"],
                                           await read_json(request), principal(request).org)
        return json_response(res, 202)

    @table.post("/v1/integrate/devices/{iccid}/actions/{protocol}")
    @requires("operator")
    async def create(request: web.Request) -> web.Response:
        req = await controller.create(request.match_info["iccid"],
                                      request.match_info["protocol"],
                                      await read_json(request), principal(request).org)
        return json_response({"id": req.id, "message": "request accepted"}, 202)

    @table.get("/v1/integrate/devices/actions/requests")
    @requires("viewer")
    async def list_requests(request: web.Request) -> web.Response:
        q = request.query
        iccid = q.get("deviceId") or None
        status_raw = q.get("status") or None
        errors = []
        if iccid is not None and not ICCID_RE.match(iccid):
            errors.append({"property": "deviceId", "message": "must be 19 or 20 digits"})
        if status_raw is not None and status_raw not in [s.value for s in DownlinkStatus]:
            errors.append({"property": "status", "message": "must be one of " + ", ".join(
                s.value for s in DownlinkStatus)})
        if errors:
            raise BadRequest("invalid query", errors)
        page = await controller.list_requests(DownlinkQuery(
            principal(request).org, iccid,
            DownlinkStatus(status_raw) if status_raw else None,
            *page_params(request)))
        return page_response(page, to_api)

    @table.get("/v1/integrate/devices/actions/requests/{id}")
    @requires("viewer")
    async def get(request: web.Request) -> web.Response:
        return json_response(to_api(await controller.get(request.match_info["id"],
                                                         principal(request).org)))

    @table.post("/v1/integrate/devices/actions/requests/{id}/cancel")
    @requires("operator")
    async def cancel(request: web.Request) -> web.Response:
        return json_response(to_api(await controller.cancel(request.match_info["id"],
                                                            principal(request).org)))

    return table
