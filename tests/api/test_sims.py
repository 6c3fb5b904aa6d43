"""SIM registry API: create/read/update/delete, validation (422), conflicts (409), paging."""

from __future__ import annotations

import pytest

from tests.support.simwire import Api

SIM = {"iccid": "8988280666000000041", "imsi": "901405100000041", "ip": "10.1.0.41",
       "imei": "356938035643809", "label": "tracker 41", "status": "Enabled"}


async def test_create_get_patch_delete(api: Api) -> None:
    status, body = await api.call("POST", "/v1/sims", SIM)
    assert status == 201
    assert {k: body[k] for k in SIM} == SIM
    assert body["createdAt"].endswith("Z")
    status, body = await api.call("GET", f"/v1/sims/{SIM['iccid']}")
    assert status == 200 and body["label"] == "tracker 41"
    status, body = await api.call("PATCH", f"/v1/sims/{SIM['iccid']}",
                                  {"status": "Disabled", "label": None, "ip": "10.1.0.42"})
    assert status == 200
    assert (body["status"], body["label"], body["ip"]) == ("Disabled", None, "10.1.0.42")
    assert body["imei"] == SIM["imei"]
    assert (await api.call("DELETE", f"/v1/sims/{SIM['iccid']}"))[0] == 204
    status, body = await api.call("GET", f"/v1/sims/{SIM['iccid']}")
    assert status == 404 and body == {"statusCode": 404, "statusText": "Not Found",
                                      "errors": [{"message": f"SIM {SIM['iccid']} not found"}]}
    assert (await api.call("DELETE", f"/v1/sims/{SIM['iccid']}"))[0] == 404


async def test_minimal_sim_defaults_to_enabled(api: Api) -> None:
    status, body = await api.call("POST", "/v1/sims", {
        "iccid": "89882806660000000429", "imsi": "901405100000042", "ip": "10.1.0.43"})
    assert status == 201
    assert (body["status"], body["imei"], body["label"]) == ("Enabled", None, None)


async def test_duplicates_are_409(api: Api) -> None:
    assert (await api.call("POST", "/v1/sims", SIM))[0] == 201
    status, body = await api.call("POST", "/v1/sims", {**SIM, "ip": "10.1.0.99"})
    assert status == 409 and body["statusText"] == "Conflict"
    assert body["errors"] == [{"message": f"SIM {SIM['iccid']} already exists"}]
    other = {**SIM, "iccid": "8988280666000000043"}
    status, body = await api.call("POST", "/v1/sims", other)
    assert status == 409
    assert body["errors"] == [{"message": "a SIM with IP 10.1.0.41 already exists"}]
    assert (await api.call("POST", "/v1/sims", {**other, "ip": "10.1.0.44"}))[0] == 201
    status, _ = await api.call("PATCH", f"/v1/sims/{other['iccid']}", {"ip": SIM["ip"]})
    assert status == 409


async def test_validation_lists_every_problem(api: Api) -> None:
    status, body = await api.call("POST", "/v1/sims", {
        "iccid": "123", "imsi": "abc", "ip": "300.1.1.1", "imei": "1", "status": "On",
        "colour": "red"})
    assert status == 422
    assert body["statusText"] == "Unprocessable Entity"
    assert sorted(e["property"] for e in body["errors"]) == [
        "colour", "iccid", "imei", "imsi", "ip", "status"]
    status, body = await api.call("POST", "/v1/sims", {"iccid": SIM["iccid"]})
    assert status == 422
    assert sorted(e["property"] for e in body["errors"]) == ["imsi", "ip"]
    status, body = await api.call("POST", "/v1/sims", {**SIM, "ip": "::1"})
    assert status == 422 and body["errors"] == [{"property": "ip",
                                                 "message": "must be an IPv4 address"}]


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        ("{not json", {"Content-Type": "application/json"}, 400),
        ("[]", {"Content-Type": "application/json"}, 422),
        ("iccid=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("x" * (65 * 1024), {"Content-Type": "application/json"}, 413),
    ],
)
async def test_bad_bodies(api: Api, body: str, headers: dict[str, str], status: int) -> None:
    async with api.session.post(api.base + "/v1/sims", data=body, headers={
            **headers, "Authorization": f"Bearer {api.token}"}) as r:
        got = await r.json()
        assert r.status == status
        assert got["statusCode"] == status and got["errors"]


async def test_patch_rejects_iccid_and_unknown_fields(api: Api) -> None:
    assert (await api.call("POST", "/v1/sims", SIM))[0] == 201
    status, body = await api.call("PATCH", f"/v1/sims/{SIM['iccid']}", {"iccid": "1", "x": 1})
    assert status == 422 and {e["property"] for e in body["errors"]} == {"iccid", "x"}
    assert (await api.call("PATCH", f"/v1/sims/{SIM['iccid']}", {}))[0] == 422


async def test_list_is_paged(api: Api) -> None:
    for i in range(23):
        sim = {"iccid": f"89882806660000001{i:02d}", "imsi": f"9014051000001{i:02d}",
               "ip": f"10.2.0.{i + 1}"}
        assert (await api.call("POST", "/v1/sims", sim))[0] == 201
    status, body = await api.call("GET", "/v1/sims", params={"pageSize": "10", "page": "3"})
    assert status == 200
    assert (body["page"], body["pageAmount"], len(body["items"])) == (3, 3, 3)
    assert [s["iccid"] for s in body["items"]] == [f"89882806660000001{i}" for i in (20, 21, 22)]
    status, body = await api.call("GET", "/v1/sims", params={"pageSize": "0"})
    assert status == 400 and body["errors"][0]["property"] == "pageSize"


async def test_imei_lock_is_set_read_and_changed(api: Api) -> None:
    status, body = await api.call("POST", "/v1/sims", {**SIM, "imeiLock": True})
    assert status == 201 and body["imeiLock"] is True
    status, body = await api.call("PATCH", f"/v1/sims/{SIM['iccid']}", {"imeiLock": False})
    assert status == 200 and body["imeiLock"] is False
    status, body = await api.call("GET", f"/v1/sims/{SIM['iccid']}")
    assert body["imeiLock"] is False
    status, body = await api.call("PATCH", f"/v1/sims/{SIM['iccid']}", {"imeiLock": "yes"})
    assert status == 422
    assert body["errors"] == [{"property": "imeiLock", "message": "must be true or false"}]
