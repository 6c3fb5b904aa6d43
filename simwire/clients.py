"""API client management (`/v1/clients`), admin only; mounted by simwire.app.

An admin manages the clients of its own organisation. Admins of the operator's `default`
organisation may also create and manage clients of other organisations: that is how
sub-accounts (tenants) are made. A client secret is returned once, at creation, and only
its scrypt hash is stored.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from aiohttp import web

from simwire.auth import ROLES, Principal, hash_secret
from simwire.clock import Clock
from simwire.errors import Conflict, NotFound, Unprocessable
from simwire.http import json_response, principal, read_json, requires
from simwire.model import DEFAULT_ORG, ApiClient, iso_ms
from simwire.ports import ClientRepository

CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{3,64}")
ORG_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _to_api(client: ApiClient) -> dict[str, Any]:
    return {"clientId": client.client_id, "role": client.role, "organisation": client.org,
            "createdAt": iso_ms(client.created_ms)}


def _target_org(who: Principal, requested: Any) -> str:
    """The organisation an admin may act on: its own, or any when it is the operator's."""
    if requested is None or requested == who.org:
        return who.org
    if who.org != DEFAULT_ORG:
        raise NotFound(f"organisation {requested} not found")
    return str(requested)


def routes(clients: ClientRepository, clock: Clock) -> web.RouteTableDef:
    table = web.RouteTableDef()

    @table.post("/v1/clients")
    @requires("admin")
    async def create(request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise Unprocessable([{"message": "body must be a JSON object"}])
        errors: list[dict[str, Any]] = []
        for key in set(body) - {"clientId", "role", "organisation"}:
            errors.append({"property": key, "message": "unknown property"})
        cid, role, org = body.get("clientId"), body.get("role"), body.get("organisation")
        if not isinstance(cid, str) or not CLIENT_ID_RE.fullmatch(cid):
            errors.append({"property": "clientId",
                           "message": "must be 3-64 characters of A-Z a-z 0-9 _ . -"})
        if role not in ROLES:
            errors.append({"property": "role", "message": f"must be one of {', '.join(ROLES)}"})
        if org is not None and (not isinstance(org, str) or not ORG_RE.fullmatch(org)):
            errors.append({"property": "organisation",
                           "message": "must be 1-64 characters of A-Z a-z 0-9 _ . -"})
        if errors:
            raise Unprocessable(errors)
        target = _target_org(principal(request), org)
        secret = secrets.token_urlsafe(24)
        client = ApiClient(str(cid), hash_secret(secret), str(role), target, clock.now_ms())
        await clients.create_client(client)
        return json_response({**_to_api(client), "clientSecret": secret}, 201)

    @table.get("/v1/clients")
    @requires("admin")
    async def list_clients(request: web.Request) -> web.Response:
        org = _target_org(principal(request), request.query.get("organisation"))
        return json_response({"items": [_to_api(c) for c in await clients.list_clients(org)]})

    @table.delete("/v1/clients/{client_id}")
    @requires("admin")
    async def delete(request: web.Request) -> web.Response:
        who = principal(request)
        cid = request.match_info["client_id"]
        client = await clients.get_client(cid)
        if client is None or (who.org != DEFAULT_ORG and client.org != who.org):
            raise NotFound(f"client {cid} not found")
        if cid == who.client_id:
            raise Conflict("a client cannot delete itself")
        await clients.delete_client(cid)
        return web.Response(status=204)

    return table
