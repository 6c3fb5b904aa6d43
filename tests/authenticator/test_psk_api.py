"""PSK management API and bulk import jobs (spec section 2.3), with tenants and roles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from authenticator.psk import KeyRole
from simwire.app import Simwire
from simwire.clock import ManualClock
from simwire.model import DEFAULT_ORG, Protocol
from tests.support.simwire import Api, eventually, running

ICCIDS = [f"89882806660000002{i:02d}" for i in range(3)]
ISO0 = "2026-01-01T00:00:00.000Z"


@pytest.fixture
async def api(node: Simwire, http: aiohttp.ClientSession) -> Api:
    client = await Api.login(node, http)
    for n, iccid in enumerate(ICCIDS):
        await client.add_sim(iccid, f"9014051000002{n:02d}", f"127.0.1.{n + 1}")
    return client


async def test_set_and_read_keys(api: Api, node: Simwire) -> None:
    status, res = await api.call("POST", f"/v1/integrate/devices/{ICCIDS[0]}/psk", {
        "secretKey": "secret-key-1", "protocol": "COAP", "format": "STRING"})
    assert status == 200, res
    assert res == {"deviceId": ICCIDS[0], "identity": ICCIDS[0], "secretKey": "secret-key-1",
                   "createdAt": ISO0, "updatedAt": ISO0, "protocol": "COAP", "format": "STRING"}
    status, res = await api.call("POST", f"/v1/integrate/devices/{ICCIDS[0]}/presharedkey", {
        "secretKey": "00112233aabbccdd", "protocol": "LWM2M", "format": "HEX"})
    assert status == 200 and res["format"] == "HEX"
    status, coap_key = await api.call("GET", f"/v1/integrate/devices/{ICCIDS[0]}/psk/COAP")
    assert status == 200 and coap_key["secretKey"] == "secret-key-1"
    status, lwm2m = await api.call("GET", f"/v1/integrate/devices/{ICCIDS[0]}/psk/LWM2M")
    assert status == 200 and lwm2m["secretKey"] == "00112233aabbccdd"
    # the DTLS lookups by source IP: identity and key bytes (hex decoded for HEX keys)
    coaps = node.psks.dtls_keys(KeyRole.COAP)
    assert await coaps.psk_for("127.0.1.1") == (ICCIDS[0], b"secret-key-1")
    for role in (KeyRole.LWM2M, KeyRole.LWM2M_BOOTSTRAP):
        assert await node.psks.dtls_keys(role).psk_for("127.0.1.1") == (
            ICCIDS[0], bytes.fromhex("00112233aabbccdd"))
    for role in KeyRole:
        assert await node.psks.dtls_keys(role).psk_for("127.0.1.2") is None  # no key yet
        assert await node.psks.dtls_keys(role).psk_for("127.0.9.9") is None  # no SIM
    for missing in (f"{ICCIDS[1]}/psk/COAP", f"{ICCIDS[0]}/psk/UDP", "89000/psk/COAP"):
        status, _ = await api.call("GET", f"/v1/integrate/devices/{missing}")
        assert status == 404, missing


async def test_port_roles_pick_their_key(api: Api, node: Simwire) -> None:
    """ADR 0008: the CoAPs port falls back to the LWM2M key of a device without a COAP key;
    a bootstrap-only port takes only a key a user set, never a generated server key."""
    sim = await node.store.get(ICCIDS[1])
    assert sim is not None
    issued = await node.psks.issue_lwm2m_server_key(sim)  # as a plain LwM2M bootstrap does
    expected = (ICCIDS[1], issued.secret.encode())
    assert await node.psks.dtls_keys(KeyRole.COAP).psk_for("127.0.1.2") == expected
    assert await node.psks.dtls_keys(KeyRole.LWM2M).psk_for("127.0.1.2") == expected
    assert await node.psks.dtls_keys(KeyRole.LWM2M_BOOTSTRAP).psk_for("127.0.1.2") is None
    status, _ = await api.call("POST", f"/v1/integrate/devices/{ICCIDS[1]}/psk", {
        "secretKey": "coap-key-22", "protocol": "COAP"})
    assert status == 200
    assert await node.psks.dtls_keys(KeyRole.COAP).psk_for("127.0.1.2") == (
        ICCIDS[1], b"coap-key-22")  # the change dropped the cached LWM2M fallback
    assert await node.psks.dtls_keys(KeyRole.LWM2M).psk_for("127.0.1.2") == expected


@pytest.mark.parametrize(("body", "errors"), [
    ({"secretKey": "short", "protocol": "COAP"},
     [("secretKey", "is required: 8 to 256 characters")]),
    ({"secretKey": "with,comma", "protocol": "COAP"},
     [("secretKey", "must be printable and contain no comma (/bootstrap returns it "
                    "comma-separated)")]),
    ({"secretKey": "0011zz33", "protocol": "COAP", "format": "HEX"},
     [("secretKey", "must be hex digits (an even number)")]),
    ({"secretKey": "secret-key", "protocol": "UDP", "format": "BASE64", "x": 1},
     [("x", "unknown property"), ("format", "must be STRING or HEX"),
      ("protocol", "is required: COAP or LWM2M")]),
])
async def test_invalid_keys(api: Api, body: dict[str, Any], errors: list[tuple[str, str]]
                            ) -> None:
    status, res = await api.call("POST", f"/v1/integrate/devices/{ICCIDS[0]}/psk", body)
    assert status == 422
    assert [(e["property"], e["message"]) for e in res["errors"]] == errors


async def test_tenants_and_roles(api: Api, node: Simwire, http: aiohttp.ClientSession) -> None:
    status, _ = await api.call("POST", f"/v1/integrate/devices/{ICCIDS[0]}/psk", {
        "secretKey": "secret-key-1", "protocol": "COAP"})
    assert status == 200
    status, sub = await api.call("POST", "/v1/clients", {
        "clientId": "other-org", "role": "admin", "organisation": "other"})
    other = await Api.login(node, http, "other-org", sub["clientSecret"])
    status, _ = await other.call("GET", f"/v1/integrate/devices/{ICCIDS[0]}/psk/COAP")
    assert status == 404
    status, _ = await other.call("POST", f"/v1/integrate/devices/{ICCIDS[0]}/psk", {
        "secretKey": "hijacked-key", "protocol": "COAP"})
    assert status == 404
    status, viewer = await api.call("POST", "/v1/clients", {
        "clientId": "viewer-1", "role": "viewer", "organisation": DEFAULT_ORG})
    v = await Api.login(node, http, "viewer-1", viewer["clientSecret"])
    status, _ = await v.call("GET", f"/v1/integrate/devices/{ICCIDS[0]}/psk/COAP")
    assert status == 403  # keys are secrets: operator only
    status, _ = await v.call("GET", "/v1/integrate/devices/psk/jobs")
    assert status == 403


async def test_import_job_counts_progress_and_failures(api: Api, node: Simwire) -> None:
    items = [
        {"deviceId": ICCIDS[0], "secretKey": "imported-key-0", "protocol": "COAP"},
        {"deviceId": ICCIDS[1], "secretKey": "0a0b0c0d0e0f", "protocol": "LWM2M",
         "format": "HEX"},
        {"deviceId": "8988280666999999999", "secretKey": "orphan-key", "protocol": "COAP"},
        {"deviceId": ICCIDS[2], "secretKey": "short", "protocol": "COAP"},
    ]
    status, job = await api.call("POST", "/v1/integrate/devices/psk/jobs", items)
    assert status == 202, job
    assert (job["status"], job["amount"]) == ("IN_PROGRESS", 4)

    async def finished() -> dict[str, Any] | None:
        _, j = await api.call("GET", f"/v1/integrate/devices/psk/jobs/{job['id']}")
        return j if j["status"] == "DONE" else None

    done = await eventually(finished)
    assert (done["done"], done["failed"]) == (2, 2)
    assert done["errors"] == ["[2].deviceId: unknown device 8988280666999999999",
                              "[3].secretKey: is required: 8 to 128 characters"]
    key = await node.store.get_psk(ICCIDS[1], Protocol.LWM2M)
    assert key is not None and b"0a0b0c0d0e0f" not in key.sealed
    status, listing = await api.call("GET", "/v1/integrate/devices/psk/jobs")
    assert [j["id"] for j in listing["items"]] == [job["id"]]
    status, res = await api.call("POST", "/v1/integrate/devices/psk/jobs", [])
    assert status == 422
    status, res = await api.call("POST", "/v1/integrate/devices/psk/jobs",
                                 [items[0]] * 5001)
    assert status == 422


async def test_a_job_cut_by_a_restart_ends_done(tmp_path: Path, clock: ManualClock) -> None:
    from authenticator.psk import JOB_STALE_S
    from simwire.model import PskJob, PskJobStatus

    stale = clock.now_ms() - round(JOB_STALE_S * 1000)
    async with running(tmp_path / "r", clock=clock) as first:
        # a job whose process died: its last progress is JOB_STALE_S old
        await first.store.create_job(PskJob("j1", DEFAULT_ORG, stale - 5000, stale,
                                            PskJobStatus.IN_PROGRESS, 10, done=4))
        # a job that recorded progress just after that (another process may be running it)
        await first.store.create_job(PskJob("j2", DEFAULT_ORG, stale, stale + 1,
                                            PskJobStatus.IN_PROGRESS, 10, done=1))
    async with running(tmp_path / "r", clock=clock) as second:
        # the new leader sweeps when it takes the lead
        async def ended() -> PskJob | None:
            job = await second.store.get_job("j1")
            return job if job is not None and job.status is PskJobStatus.DONE else None

        job = await eventually(ended)
        assert (job.status, job.done, job.failed) == (PskJobStatus.DONE, 4, 6)
        assert job.errors == ("interrupted by a restart; import the rest again",)
        running_job = await second.store.get_job("j2")
        assert running_job is not None and running_job.status is PskJobStatus.IN_PROGRESS
        await second.psks.finish_interrupted()  # what the next sweep does: still young
        assert await second.store.get_job("j2") == running_job
        clock.advance(0.001)  # now j2 has not moved for JOB_STALE_S either
        await second.psks.finish_interrupted()
        j2 = await second.store.get_job("j2")
        assert j2 is not None and (j2.status, j2.done, j2.failed) == (PskJobStatus.DONE, 1, 9)
