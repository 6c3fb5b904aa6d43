"""SIM registry API (`/v1/sims`) and device PSK API (`/v1/integrate/devices/...psk`),
mounted by simwire.app. Tenants see only their SIMs and keys."""

from __future__ import annotations

from aiohttp import web

from authenticator.management import SimManagement
from authenticator.psk import PskService, job_to_api
from authenticator.psk import to_api as psk_to_api
from simwire.http import (
    MAX_BULK_BODY,
    json_response,
    page_params,
    page_response,
    principal,
    read_json,
    requires,
)
from simwire.model import Sim


def routes(sims: SimManagement) -> web.RouteTableDef:
    table = web.RouteTableDef()

    @table.post("/v1/sims")
    @requires("operator")
    async def create(request: web.Request) -> web.Response:
        sim = await sims.create(await read_json(request), principal(request).org)
        return json_response(sim.to_api(), 201)

    @table.get("/v1/sims")
    @requires("viewer")
    async def list_sims(request: web.Request) -> web.Response:
        page = await sims.list(
            principal(request).org,
            *page_params(request),
        )
        return page_response(page, Sim.to_api)

    @table.get("/v1/sims/{iccid}")
    @requires("viewer")
    async def get(request: web.Request) -> web.Response:
        sim = await sims.get(request.match_info["iccid"], principal(request).org)
        return json_response(sim.to_api())

    @table.patch("/v1/sims/{iccid}")
    @requires("operator")
    async def patch(request: web.Request) -> web.Response:
        body = await read_json(request)
        sim = await sims.update(request.match_info["iccid"], body, principal(request).org)
        return json_response(sim.to_api())

    @table.delete("/v1/sims/{iccid}")
    @requires("operator")
    async def delete(request: web.Request) -> web.Response:
        await sims.delete(request.match_info["iccid"], principal(request).org)
        return web.Response(status=204)

    return table


def psk_routes(psks: PskService) -> web.RouteTableDef:
    """Device PSKs (1NCE paths under `/v1/integrate/devices`). Keys are secrets: reading
    one needs the operator role, like setting it."""
    table = web.RouteTableDef()

    async def _set(request: web.Request) -> web.Response:
        psk = await psks.set(request.match_info["iccid"], await read_json(request),
                             principal(request).org)
        return json_response(psk_to_api(psk))

    table.post("/v1/integrate/devices/{iccid}/psk")(requires("operator")(_set))
    table.post("/v1/integrate/devices/{iccid}/presharedkey")(requires("operator")(_set))

    @table.get("/v1/integrate/devices/{iccid}/psk/{protocol}")
    @requires("operator")
    async def get(request: web.Request) -> web.Response:
        psk = await psks.get(request.match_info["iccid"], request.match_info["protocol"],
                             principal(request).org)
        return json_response(psk_to_api(psk))

    @table.post("/v1/integrate/devices/psk/jobs")
    @requires("operator")
    async def start_job(request: web.Request) -> web.Response:
        job = await psks.start_import(await read_json(request, MAX_BULK_BODY),
                                      principal(request).org)
        return json_response(job_to_api(job), 202)

    @table.get("/v1/integrate/devices/psk/jobs")
    @requires("operator")
    async def list_jobs(request: web.Request) -> web.Response:
        page = await psks.list_jobs(principal(request).org, *page_params(request))
        return page_response(page, job_to_api)

    @table.get("/v1/integrate/devices/psk/jobs/{id}")
    @requires("operator")
    async def get_job(request: web.Request) -> web.Response:
        return json_response(job_to_api(await psks.get_job(request.match_info["id"],
                                                           principal(request).org)))

    return table
