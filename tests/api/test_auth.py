"""Token endpoint, bearer auth on every /v1 route, roles and tenant isolation."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import aiohttp
import pytest

from simwire.app import Simwire
from simwire.auth import hash_secret
from simwire.clock import ManualClock
from simwire.model import ApiClient
from tests.support.simwire import ADMIN_ID, ADMIN_SECRET, Api, running


def basic(user: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


async def token_call(app: Simwire, http: aiohttp.ClientSession, headers: dict[str, str],
                     body: object) -> tuple[int, dict[str, object]]:
    async with http.post(f"http://127.0.0.1:{app.ports.http}/oauth/token", json=body,
                         headers=headers) as r:
        return r.status, await r.json()


async def test_token_issued_for_client_credentials(app: Simwire, http: aiohttp.ClientSession
                                                   ) -> None:
    status, body = await token_call(app, http, {"Authorization": basic(ADMIN_ID, ADMIN_SECRET)},
                                    {"grant_type": "client_credentials"})
    assert status == 200
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    assert isinstance(body["access_token"], str) and body["access_token"].count(".") == 2


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Authorization": basic(ADMIN_ID, "wrong")}, {"grant_type": "client_credentials"}, 401),
        ({"Authorization": basic("nobody", "x")}, {"grant_type": "client_credentials"}, 401),
        ({}, {"grant_type": "client_credentials"}, 401),
        ({"Authorization": "Basic !!!"}, {"grant_type": "client_credentials"}, 401),
        ({"Authorization": basic(ADMIN_ID, ADMIN_SECRET)}, {"grant_type": "password"}, 400),
        ({"Authorization": basic(ADMIN_ID, ADMIN_SECRET)}, ["x"], 400),
    ],
)
async def test_token_errors_use_the_1nce_body(
    app: Simwire, http: aiohttp.ClientSession, headers: dict[str, str], body: object, status: int
) -> None:
    got, err = await token_call(app, http, headers, body)
    assert got == status
    assert err["statusCode"] == status
    assert err["statusText"] == {401: "Unauthorized", 400: "Bad Request"}[status]
    assert isinstance(err["errors"], list) and err["errors"]


def v1_routes(app: Simwire) -> list[tuple[str, str]]:
    out = []
    for route in app.http_app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if path and path.startswith("/v1/") and route.method != "HEAD":
            out.append((route.method, re.sub(r"\{[^}]+\}", "8988280666000000001", path)))
    return out


async def test_every_v1_route_requires_a_valid_token(app: Simwire, http: aiohttp.ClientSession
                                                     ) -> None:
    routes = v1_routes(app)
    assert len(routes) >= 11
    anon = Api(f"http://127.0.0.1:{app.ports.http}", http, None)
    forged = Api(anon.base, http, "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.e30.c2ln")
    for method, path in routes:
        for client in (anon, forged):
            status, body = await client.call(method, path, json={})
            assert status == 401, (method, path, body)
            assert body["statusText"] == "Unauthorized"


async def test_expired_token_is_refused(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    clock = ManualClock()
    async with running(tmp_path / "d", clock=clock) as app:
        api = await Api.login(app, http)
        assert (await api.call("GET", "/v1/sims"))[0] == 200
        clock.advance(3601)
        status, body = await api.call("GET", "/v1/sims")
        assert status == 401 and body["errors"] == [{"message": "token expired"}]


async def test_tokens_survive_a_restart(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(tmp_path / "d") as app:
        token = (await Api.login(app, http)).token
    async with running(tmp_path / "d") as app:
        api = Api(f"http://127.0.0.1:{app.ports.http}", http, token)
        assert (await api.call("GET", "/v1/sims"))[0] == 200


async def add_client(app: Simwire, client_id: str, role: str, org: str) -> None:
    await app.store.create_client(
        ApiClient(client_id, hash_secret("secret-" + client_id), role, org, 0))


async def test_roles(app: Simwire, api: Api, http: aiohttp.ClientSession) -> None:
    await add_client(app, "viewer1", "viewer", "default")
    viewer = await Api.login(app, http, "viewer1", "secret-viewer1")
    sim = {"iccid": "8988280666000000031", "imsi": "901405100000031", "ip": "10.0.0.31"}
    status, body = await viewer.call("POST", "/v1/sims", sim)
    assert status == 403 and body["statusText"] == "Forbidden"
    assert (await api.call("POST", "/v1/sims", sim))[0] == 201
    assert (await viewer.call("GET", f"/v1/sims/{sim['iccid']}"))[0] == 200
    assert (await viewer.call("DELETE", f"/v1/sims/{sim['iccid']}"))[0] == 403


async def test_tenants_never_see_each_other(app: Simwire, api: Api, http: aiohttp.ClientSession
                                            ) -> None:
    await add_client(app, "acme", "admin", "acme")
    acme = await Api.login(app, http, "acme", "secret-acme")
    sim = {"iccid": "8988280666000000032", "imsi": "901405100000032", "ip": "10.0.0.32"}
    assert (await api.call("POST", "/v1/sims", sim))[0] == 201
    status, body = await acme.call("GET", "/v1/sims")
    assert status == 200 and body["items"] == []
    for method, path in [("GET", f"/v1/sims/{sim['iccid']}"),
                         ("PATCH", f"/v1/sims/{sim['iccid']}"),
                         ("DELETE", f"/v1/sims/{sim['iccid']}"),
                         ("GET", f"/v1/inspect/devices/{sim['iccid']}"),
                         ("GET", f"/v1/inspect/devices/{sim['iccid']}/history")]:
        status, _ = await acme.call(method, path, json={"label": "x"})
        assert status == 404, (method, path)
    status, body = await acme.call("GET", "/v1/inspect/devices/history",
                                   params={"iccid": sim["iccid"]})
    assert status == 404
    assert (await api.call("GET", f"/v1/sims/{sim['iccid']}"))[1]["label"] is None


async def test_unknown_route_and_method_use_the_1nce_body(api: Api) -> None:
    status, body = await api.call("GET", "/v1/nothing-here")
    assert status == 404 and body["statusText"] == "Not Found"
    status, body = await api.call("PUT", "/v1/sims")
    assert status == 405 and body["statusCode"] == 405


async def test_health_and_metrics_need_no_token(app: Simwire, http: aiohttp.ClientSession
                                                ) -> None:
    base = f"http://127.0.0.1:{app.ports.http}"
    async with http.get(base + "/healthz") as r:
        assert r.status == 200
        assert await r.json() == {"status": "ok", "store": "sqlite", "leader": True}
    async with http.get(base + "/metrics") as r:
        text = await r.text()
        assert r.status == 200 and "simwire_uplinks_total" in text
