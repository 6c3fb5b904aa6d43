"""Energy Saver API (1NCE paths under `/v1/optimize`), mounted by simwire.app.

Reads and the template tester need the viewer role; creating, changing and deleting
templates need operator. Only the caller's organisation is visible.
"""

from __future__ import annotations

from aiohttp import web

from energy_saver.service import Templates, savings_query, to_api
from simwire.http import json_response, principal, read_json, requires


def routes(templates: Templates) -> web.RouteTableDef:
    table = web.RouteTableDef()

    @table.get("/v1/optimize/templates")
    @requires("viewer")
    async def list_all(request: web.Request) -> web.Response:
        return json_response([to_api(t) for t in
                              await templates.list_all(principal(request).org)])

    @table.post("/v1/optimize/templates")
    @requires("operator")
    async def create(request: web.Request) -> web.Response:
        t = await templates.create(await read_json(request), principal(request).org)
        return json_response(to_api(t), 201)

    @table.get("/v1/optimize/templates/{id}")
    @requires("viewer")
    async def get(request: web.Request) -> web.Response:
        return json_response(to_api(await templates.get(request.match_info["id"],
                                                        principal(request).org)))

    @table.patch("/v1/optimize/templates/{id}")
    @requires("operator")
    async def patch(request: web.Request) -> web.Response:
        t = await templates.update(request.match_info["id"], await read_json(request),
                                   principal(request).org)
        return json_response(to_api(t))

    @table.delete("/v1/optimize/templates/{id}")
    @requires("operator")
    async def delete(request: web.Request) -> web.Response:
        await templates.delete(request.match_info["id"], principal(request).org)
        return web.Response(status=204)

    @table.post("/v1/optimize/messages/test")
    @requires("viewer")
    async def test(request: web.Request) -> web.Response:
        return json_response(templates.test(await read_json(request)))

    @table.get("/v1/optimize/savings")
    @requires("viewer")
    async def savings(request: web.Request) -> web.Response:
        q = request.query
        days, protocol, iccid = savings_query(q.get("range"), q.get("protocol"), q.get("iccid"))
        return json_response(await templates.savings(principal(request).org, days, protocol,
                                                     iccid))

    return table
