"""SIM registry API (`/v1/sims`), mounted by simwire.app. Tenants see only their SIMs."""

from __future__ import annotations

from aiohttp import web

from authenticator.management import SimManagement
from simwire.http import json_response, principal, query_int, read_json, requires


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
            query_int(request, "page", 1, 1, 1_000_000),
            query_int(request, "pageSize", 10, 1, 100),
        )
        return json_response({
            "items": [s.to_api() for s in page.items], "page": page.page,
            "pageAmount": page.page_amount,
        })

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
