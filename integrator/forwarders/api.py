"""Integrations API (1NCE paths under `/v1/integrate/clouds`), mounted by simwire.app.

Reads need the viewer role; creating, changing, deleting, testing and restarting need
operator. Only the caller's organisation is visible.
"""

from __future__ import annotations

from aiohttp import web

from integrator.forwarders.service import Integrations, event_types, to_api
from simwire.http import (
    json_response,
    page_params,
    page_response,
    principal,
    read_json,
    requires,
)
from simwire.model import IntegrationType


def routes(integrations: Integrations) -> web.RouteTableDef:
    table = web.RouteTableDef()

    @table.get("/v1/integrate/clouds")
    @requires("viewer")
    async def list_all(request: web.Request) -> web.Response:
        page = await integrations.list(
            principal(request).org,
            *page_params(request),
        )
        return page_response(page, to_api)

    @table.get("/v1/integrate/clouds/eventTypes")
    @requires("viewer")
    async def types(request: web.Request) -> web.Response:
        return json_response(event_types())

    @table.post("/v1/integrate/clouds/webhooks")
    @requires("operator")
    async def create_webhook(request: web.Request) -> web.Response:
        i = await integrations.create_webhook(await read_json(request), principal(request).org)
        return json_response(to_api(i, signing_secret=i.secret), 201)

    @table.post("/v1/integrate/clouds/aws")
    @requires("operator")
    async def create_aws(request: web.Request) -> web.Response:
        i = await integrations.create_aws(await read_json(request), principal(request).org)
        return json_response(to_api(i), 201)

    async def _patch(request: web.Request, only: IntegrationType | None) -> web.Response:
        i, secret = await integrations.update(
            request.match_info["id"], await read_json(request), principal(request).org, only)
        return json_response(to_api(i, signing_secret=secret))

    @table.patch("/v1/integrate/clouds/webhooks/{id}")
    @requires("operator")
    async def patch_webhook(request: web.Request) -> web.Response:
        return await _patch(request, IntegrationType.WEBHOOK)

    @table.patch("/v1/integrate/clouds/aws/{id}")
    @requires("operator")
    async def patch_aws(request: web.Request) -> web.Response:
        return await _patch(request, IntegrationType.AWS)

    @table.patch("/v1/integrate/clouds/{id}")
    @requires("operator")
    async def patch_any(request: web.Request) -> web.Response:
        return await _patch(request, None)

    @table.get("/v1/integrate/clouds/{id}")
    @requires("viewer")
    async def get(request: web.Request) -> web.Response:
        i = await integrations.get(request.match_info["id"], principal(request).org)
        return json_response(to_api(i, queue_depth=await integrations.queue_depth(i)))

    @table.delete("/v1/integrate/clouds/{id}")
    @requires("operator")
    async def delete(request: web.Request) -> web.Response:
        await integrations.delete(request.match_info["id"], principal(request).org)
        return web.Response(status=204)

    async def _test(request: web.Request) -> web.Response:
        ok, message = await integrations.test(request.match_info["id"], principal(request).org)
        return json_response({"testStatus": "SUCCESS" if ok else "FAILURE", "message": message})

    async def _restart(request: web.Request) -> web.Response:
        ok, message, i = await integrations.restart(request.match_info["id"],
                                                    principal(request).org)
        return json_response({"integration": to_api(i),
                              "restartStatus": "SUCCESS" if ok else "FAILURE",
                              "message": message})

    for prefix in ("/v1/integrate/clouds", "/v1/integrate/clouds/webhooks",
                   "/v1/integrate/clouds/aws"):
        table.post(prefix + "/{id}/test")(requires("operator")(_test))
        table.post(prefix + "/{id}/restart")(requires("operator")(_restart))

    return table
