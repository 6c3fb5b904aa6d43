"""Device Authenticator `GET /bootstrap` on the plain CoAP port, byte-compatible with the
1NCE C SDK (spec section 2.2, vector `sdk_bootstrap_request`).

GIVEN SIMs (enabled, disabled, unknown) WHEN the SDK's exact datagram arrives THEN the reply
parses the way the SDK parses it, the key follows 1NCE's lifecycle, and nothing of the key
is readable in the store file.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from integrator import coap
from integrator.endpoints.coap import _sdk_safe_mid
from simwire.app import Simwire
from simwire.clock import ManualClock
from tests.support.net import UdpClient
from tests.support.simwire import Api, eventually, running
from tests.support.tools import require_binary

VECTORS = {d["name"]: d for d in json.loads(
    (Path(__file__).parents[2].parent / "shared/spec/vectors/coap.json").read_text())["datagrams"]}
SDK_REQUEST = bytes.fromhex(VECTORS["sdk_bootstrap_request"]["hex"])
ICCID = "8988280666000000101"
IP = "127.0.0.31"


@pytest.fixture
async def node(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Simwire]:
    async with running(tmp_path / "d", clock=clock,
                       coaps_url="coaps://10.60.2.219:5684") as app:
        yield app


@pytest.fixture
async def api(node: Simwire, http: aiohttp.ClientSession) -> Api:
    client = await Api.login(node, http)
    for iccid, ip, status in ((ICCID, IP, "Enabled"),
                              ("8988280666000000102", "127.0.0.32", "Disabled")):
        await client.add_sim(iccid, "9014051" + iccid[-8:], ip, status=status)
    return client


async def ask(node: Simwire, ip: str = IP, datagram: bytes = SDK_REQUEST) -> bytes:
    client = await UdpClient.open(("127.0.0.1", node.ports.coap), ip)
    try:
        return await client.request(datagram)
    finally:
        client.close()


def sdk_parse(reply: bytes) -> list[str]:
    """What `_get_psk` does: strstr(reply, "89"), then strtok(","); C strings end at NUL."""
    text = reply.split(b"\x00", 1)[0]
    start = text.find(b"89")
    assert start >= 0
    return text[start:].decode().split(",")


async def test_the_sdk_datagram_gets_a_reply_the_sdk_can_parse(node: Simwire, api: Api) -> None:
    reply = await ask(node)
    msg = coap.parse(reply)
    assert (msg.mtype, msg.code, msg.token) == (coap.NON, coap.CONTENT, b"")
    assert msg.options == [(coap.OPT_CONTENT_FORMAT, b"")]  # text/plain, zero-length form
    assert len(reply) < 150
    head = reply[:reply.index(ICCID.encode())]
    assert b"\x00" not in head and b"89" not in head
    identity, psk, url = sdk_parse(reply)
    assert identity == ICCID and url == "coaps://10.60.2.219:5684"
    assert re.fullmatch(r"[A-Za-z0-9]{16}", psk)
    assert msg.payload == f"{ICCID},{psk},coaps://10.60.2.219:5684".encode()
    status, stored = await api.call("GET", f"/v1/integrate/devices/{ICCID}/psk/COAP")
    assert status == 200
    assert (stored["secretKey"], stored["format"], stored["identity"]) == (psk, "STRING", ICCID)


def test_non_reply_mids_never_confuse_the_sdk_parser() -> None:
    safe = [m for m in range(1 << 16) if _sdk_safe_mid(m)]
    assert len(safe) > 60_000
    for mid in safe:
        head = bytes((0x50, coap.CONTENT, mid >> 8, mid & 0xFF, 0xC0, 0xFF))
        assert b"\x00" not in head and b"89" not in head


async def test_key_lifecycle_reuse_rotation_and_user_keys(
        node: Simwire, api: Api, clock: ManualClock) -> None:
    first = sdk_parse(await ask(node))[1]
    clock.advance(299)
    assert sdk_parse(await ask(node))[1] == first  # < 5 min after the previous call
    clock.advance(299)
    assert sdk_parse(await ask(node))[1] == first  # counted from the previous call
    clock.advance(300)
    rotated = sdk_parse(await ask(node))[1]
    assert rotated != first
    api.token = (await Api.login(node, api.session)).token
    status, res = await api.call("POST", f"/v1/integrate/devices/{ICCID}/psk", {
        "secretKey": "user-chosen-key", "protocol": "COAP", "format": "STRING"})
    assert status == 200, res
    clock.advance(3600)
    assert sdk_parse(await ask(node))[1] == "user-chosen-key"
    clock.advance(3600)
    assert sdk_parse(await ask(node))[1] == "user-chosen-key"  # user keys never rotate


async def test_con_get_without_uri_host_is_answered_piggybacked(node: Simwire, api: Api) -> None:
    req = coap.serialize(coap.Message(coap.CON, coap.GET, 0x3839, b"\x01",
                                      [(coap.OPT_URI_PATH, b"bootstrap")]))
    msg = coap.parse(await ask(node, datagram=req))
    assert (msg.mtype, msg.code, msg.mid, msg.token) == (coap.ACK, coap.CONTENT, 0x3839, b"\x01")
    assert msg.payload.startswith(ICCID.encode() + b",")


@pytest.mark.parametrize("ip", ["127.0.0.32", "127.0.0.33"])  # disabled SIM, unknown IP
async def test_unknown_or_disabled_sims_get_4_01(node: Simwire, api: Api, ip: str) -> None:
    msg = coap.parse(await ask(node, ip))
    assert msg.code == coap.UNAUTHORIZED and msg.payload == b""
    async def logged() -> list[str]:
        status, logs = await api.call("GET", "/v1/administrationLogs")
        return [e["message"] for e in logs["items"]]

    assert await eventually(logged) == ["DeviceAuthenticator[UnauthorizedDevice]"]


async def test_other_methods_and_duplicates(node: Simwire, api: Api) -> None:
    post = coap.serialize(coap.Message(coap.CON, coap.POST, 7, b"",
                                       [(coap.OPT_URI_PATH, b"bootstrap")], b"x"))
    assert coap.parse(await ask(node, datagram=post)).code == coap.METHOD_NOT_ALLOWED
    client = await UdpClient.open(("127.0.0.1", node.ports.coap), IP)
    try:
        first = await client.request(SDK_REQUEST)
        again = await client.request(SDK_REQUEST)  # same MID from the same peer: same reply
    finally:
        client.close()
    assert again == first


async def test_concurrent_first_calls_agree_on_one_key(node: Simwire, api: Api) -> None:
    sim = await node.store.get(ICCID)
    assert sim is not None
    keys = await asyncio.gather(*(node.psks.bootstrap(sim) for _ in range(8)))
    assert len({k.secret for k in keys}) == 1


async def test_keys_are_sealed_at_rest(node: Simwire, api: Api) -> None:
    psk = sdk_parse(await ask(node))[1]
    raw = b"".join(p.read_bytes() for p in (node.config.data_dir).glob("simwire.db*"))
    assert psk.encode() not in raw
    assert (node.config.data_dir / "psk-seal.key").stat().st_mode & 0o777 == 0o600


async def coap_client(binary: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        require_binary(binary), *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, (out + err).decode(errors="replace")


@pytest.mark.interop
@pytest.mark.parametrize("binary", ["coap-client-openssl", "coap-client-gnutls"])
async def test_bootstrap_then_post_over_dtls_with_libcoap(
        node: Simwire, api: Api, binary: str) -> None:
    """End to end: the SDK's /bootstrap, then a real DTLS client with that key -> 2.04 ->
    stored as COAP; the wrong key gets no session and stores nothing."""
    identity, psk, _ = sdk_parse(await ask(node))
    url = f"coaps://127.0.0.1:{node.ports.coaps}/?t=test"
    code, out = await coap_client(binary, "-a", IP, "-u", identity, "-k", psk, "-m", "post",
                                  "-e", "over dtls", "-B", "10", url)
    assert code == 0, out
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}/history")
    assert [(i["protocol"], i["payload"], i.get("topic")) for i in body["items"]] == [
        ("COAP", "b3ZlciBkdGxz", "test")]
    code, out = await coap_client(binary, "-a", IP, "-u", identity, "-k", "wrong-key-123",
                                  "-m", "post", "-e", "nope", "-B", "5", url)
    status, body = await api.call("GET", f"/v1/inspect/devices/{ICCID}/history")
    assert len(body["items"]) == 1
