"""/v1/clients: admins create clients (secret shown once), sub-accounts, isolation."""

from __future__ import annotations

import base64

import aiohttp

from simwire.app import Simwire
from tests.support.simwire import ADMIN_ID, Api


async def test_create_login_list_delete(app: Simwire, api: Api, http: aiohttp.ClientSession
                                        ) -> None:
    status, body = await api.call("POST", "/v1/clients", {"clientId": "ops-1", "role": "operator"})
    assert status == 201
    assert (body["clientId"], body["role"], body["organisation"]) == ("ops-1", "operator",
                                                                      "default")
    secret = body["clientSecret"]
    stored = await app.store.get_client("ops-1")
    assert stored is not None and secret not in stored.secret_hash  # only the hash is kept
    ops = await Api.login(app, http, "ops-1", secret)
    assert (await ops.call("GET", "/v1/sims"))[0] == 200
    assert (await ops.call("GET", "/v1/clients"))[0] == 403  # operator is not admin
    status, body = await api.call("GET", "/v1/clients")
    assert [c["clientId"] for c in body["items"]] == ["ops-1", ADMIN_ID]
    assert all("clientSecret" not in c for c in body["items"])
    assert (await api.call("DELETE", "/v1/clients/ops-1"))[0] == 204
    assert (await api.call("DELETE", "/v1/clients/ops-1"))[0] == 404
    status, _ = await api.call("POST", "/v1/clients", {"clientId": "ops-1", "role": "viewer"})
    assert status == 201  # the id is free again; the old secret no longer works
    basic = "Basic " + base64.b64encode(f"ops-1:{secret}".encode()).decode()
    async with http.post(f"{api.base}/oauth/token", json={"grant_type": "client_credentials"},
                         headers={"Authorization": basic}) as r:
        assert r.status == 401


async def test_validation_conflict_and_self_delete(api: Api) -> None:
    status, body = await api.call("POST", "/v1/clients",
                                  {"clientId": "x", "role": "root", "colour": 1})
    assert status == 422
    assert sorted(e["property"] for e in body["errors"]) == ["clientId", "colour", "role"]
    status, body = await api.call("POST", "/v1/clients", {"clientId": ADMIN_ID, "role": "admin"})
    assert status == 409
    status, body = await api.call("DELETE", f"/v1/clients/{ADMIN_ID}")
    assert status == 409
    assert body["errors"] == [{"message": "a client cannot delete itself"}]


async def test_sub_accounts_are_isolated(app: Simwire, api: Api, http: aiohttp.ClientSession
                                         ) -> None:
    status, body = await api.call("POST", "/v1/clients", {
        "clientId": "acme-admin", "role": "admin", "organisation": "acme"})
    assert status == 201
    assert body["organisation"] == "acme"
    acme = await Api.login(app, http, "acme-admin", body["clientSecret"])
    # the sub-account admin manages its own organisation only
    status, body = await acme.call("POST", "/v1/clients", {"clientId": "acme-view",
                                                          "role": "viewer"})
    assert (status, body["organisation"]) == (201, "acme")
    status, _ = await acme.call("POST", "/v1/clients", {
        "clientId": "evil", "role": "admin", "organisation": "default"})
    assert status == 404
    status, body = await acme.call("GET", "/v1/clients")
    assert [c["clientId"] for c in body["items"]] == ["acme-admin", "acme-view"]
    assert (await acme.call("DELETE", f"/v1/clients/{ADMIN_ID}"))[0] == 404
    assert (await acme.call("GET", "/v1/clients", params={"organisation": "default"}))[0] == 404
    # the operator's admin sees and manages the sub-account
    status, body = await api.call("GET", "/v1/clients", params={"organisation": "acme"})
    assert [c["clientId"] for c in body["items"]] == ["acme-admin", "acme-view"]
    assert (await api.call("DELETE", "/v1/clients/acme-view"))[0] == 204
