"""LwM2M server: registration interface, Send, device management, observe, the Device
Controller's LWM2M actions and passive reporting (spec sections 1.6, 1.7, 4.1, 5).

GIVEN SIMs on 127.0.0.x and an in-process Simwire on a ManualClock, WHEN LwM2M clients
talk to it over real sockets (the aiocoap client of sdk_examples, raw CoAP datagrams,
DTLS, libcoap), THEN the replies, the store, the history and the device state are as
1NCE devices and integrations expect.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mbedtls import tls

from integrator import coap
from integrator.lwm2m.formats import ContentFormat, Record, encode
from integrator.lwm2m.objects import Registry
from integrator.lwm2m.server import write_records
from sdk_examples.lwm2m_client import Lwm2mClient, default_values
from simwire.app import Simwire
from simwire.clock import ManualClock
from simwire.config import Config
from simwire.model import DeviceIdentity
from tests.support import lwm2m
from tests.support.dtls import Client as DtlsClient
from tests.support.net import UdpClient
from tests.support.simwire import T0, Api, envelopes, eventually, running
from tests.support.tools import require_binary

ICCID = "8988280666000000411"
IP = "127.0.0.41"
ICCID2 = "8988280666000000412"
IP2 = "127.0.0.42"
DISABLED = "8988280666000000413"
DISABLED_IP = "127.0.0.43"
UNKNOWN_IP = "127.0.0.49"
KEY = b"lwm2m-dtls-key01"
REGISTRY = Registry.default()
FORBIDDEN, PRECONDITION_FAILED = coap.code(4, 3), coap.code(4, 12)
CONTINUE = coap.code(2, 31)
DELETED, UNSUPPORTED = coap.code(2, 2), coap.code(4, 15)
TLV, SENML_JSON, SENML_CBOR = (ContentFormat.TLV, ContentFormat.SENML_JSON,
                               ContentFormat.SENML_CBOR)


async def add_sims(api: Api) -> None:
    for iccid, ip, status in ((ICCID, IP, "Enabled"), (ICCID2, IP2, "Enabled"),
                              (DISABLED, DISABLED_IP, "Disabled")):
        await api.add_sim(iccid, "9014051" + iccid[-8:], ip, status=status)


@pytest.fixture
async def api(node: Simwire, http: aiohttp.ClientSession) -> Api:
    client = await Api.login(node, http)
    await add_sims(client)
    return client


@pytest.fixture
async def device(node: Simwire, api: Api) -> AsyncIterator[Lwm2mClient]:
    """The sdk_examples client of ICCID (SenML JSON advertised), not yet registered."""
    async with Lwm2mClient(ICCID, ("127.0.0.1", node.ports.coap), bind=(IP, 0),
                           lifetime=300) as client:
        yield client


class Raw:
    """Raw CoAP requests from one 127.0.0.x socket."""

    def __init__(self, udp: UdpClient) -> None:
        self.udp = udp
        self.mid = int.from_bytes(os.urandom(2), "big")

    @classmethod
    async def open(cls, node: Simwire, ip: str) -> Raw:
        return cls(await UdpClient.open(("127.0.0.1", node.ports.coap), ip))

    async def call(self, code: int, path: str, query: tuple[str, ...] = (),
                   payload: bytes = b"", cf: int | None = None, token: bytes = b"\x01\x02",
                   mtype: int = coap.CON, extra: tuple[tuple[int, bytes], ...] = ()
                   ) -> coap.Message:
        """`extra`: options after Content-Format (numbers above 12)."""
        self.mid = (self.mid + 1) & 0xFFFF
        opts = [(coap.OPT_URI_PATH, seg.encode()) for seg in path.strip("/").split("/")]
        if cf is not None:
            opts.append((coap.OPT_CONTENT_FORMAT, coap.uint_option(cf)))
        opts += [(coap.OPT_URI_QUERY, q.encode()) for q in query]
        opts += extra
        return coap.parse(await self.udp.request(coap.serialize(
            coap.Message(mtype, code, self.mid, token, opts, payload))))

    async def register(self, ep: str = ICCID, *extra: str,
                       links: bytes = b"</>;rt=\"oma.lwm2m\",</1/0>,</3/0>") -> coap.Message:
        return await self.call(coap.POST, "rd", (f"ep={ep}", *extra), links,
                               ContentFormat.LINK_FORMAT)

    def close(self) -> None:
        self.udp.close()


def location(msg: coap.Message) -> str:
    return "/".join(v.decode() for v in msg.opt_all(coap.OPT_LOCATION_PATH))


async def history(api: Api, iccid: str = ICCID) -> list[dict[str, Any]]:
    return await lwm2m.history(api, iccid)


async def values(api: Api, n: int, iccid: str = ICCID) -> list[dict[str, Any]] | None:
    return await lwm2m.history_values(api, iccid, n)


async def state(api: Api, iccid: str = ICCID) -> dict[str, Any]:
    status, body = await api.call("GET", f"/v1/inspect/devices/{iccid}/telemetry",
                                  params={"protocol": "LWM2M"})
    assert status == 200, body
    assert body["protocol"] == "LWM2M"
    return dict(json.loads(body["state"]["payload"]))


async def action(api: Api, body: dict[str, Any], iccid: str = ICCID) -> str:
    status, res = await api.call("POST", f"/v1/integrate/devices/{iccid}/actions/LWM2M", body)
    assert status == 202, res
    return str(res["id"])


async def final(api: Api, request_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        status, res = await api.call("GET",
                                     f"/v1/integrate/devices/actions/requests/{request_id}")
        assert status == 200, res
        return res if res["status"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None
    return dict(await eventually(done))


@asynccontextmanager
async def running_on(data: Path, store: str, clock: ManualClock,
                     coap_port: int) -> AsyncIterator[Simwire]:
    """`tests.support.simwire.running` on a given CoAP port (a restarted server)."""
    app = Simwire(Config(host="127.0.0.1", udp_port=0, coap_port=coap_port, coaps_port=0,
                         http_port=0, data_dir=data, store=store, sim_cache_ttl_s=0.0),
                  clock=clock)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


# -- registration interface ---------------------------------------------------------------


async def test_register_update_deregister(node: Simwire, api: Api) -> None:
    raw = await Raw.open(node, IP)
    try:
        res = await raw.register(ICCID, "lt=120", "lwm2m=1.1", "b=U", "Q")
        assert (res.mtype, res.code, res.token) == (coap.ACK, coap.CREATED, b"\x01\x02")
        where = location(res)
        assert where.startswith("rd/") and len(where) > 3
        reg_id = where[3:]
        stored = await node.store.registration_of(ICCID)
        assert stored is not None and stored.id == reg_id
        assert (stored.ip, stored.port, stored.lifetime_s, stored.version, stored.binding,
                stored.queue_mode, stored.secure, stored.registered_ms) == (
            IP, raw.udp.local_port, 120, "1.1", "U", True, False, T0)
        assert stored.links == '</>;rt="oma.lwm2m",</1/0>,</3/0>'
        # registration alone is no telemetry
        assert await history(api) == []
        res = await raw.call(coap.POST, where, ("lt=600",))
        assert res.code == coap.CHANGED
        stored = await node.store.registration_of(ICCID)
        assert stored is not None and (stored.lifetime_s, stored.links) == (
            600, '</>;rt="oma.lwm2m",</1/0>,</3/0>')
        res = await raw.call(coap.POST, where, (), b"</3/0>,</6/0>", ContentFormat.LINK_FORMAT)
        assert res.code == coap.CHANGED
        assert node.lwm2m.registration(ICCID).links == "</3/0>,</6/0>"  # type: ignore[union-attr]
        assert (await raw.call(coap.GET, where)).code == coap.METHOD_NOT_ALLOWED
        assert (await raw.call(coap.DELETE, where)).code == DELETED
        assert await node.store.registration_of(ICCID) is None
        assert node.lwm2m.registration(ICCID) is None
        assert (await raw.call(coap.POST, where)).code == coap.NOT_FOUND
        assert (await raw.call(coap.DELETE, where)).code == coap.NOT_FOUND
        assert (await raw.call(coap.GET, "rd")).code == coap.METHOD_NOT_ALLOWED
    finally:
        raw.close()


async def test_update_takes_the_new_address(node: Simwire, api: Api) -> None:
    first, second = await Raw.open(node, IP), await Raw.open(node, IP)
    try:
        where = location(await first.register(ICCID, "lt=300"))
        assert (await second.call(coap.POST, where)).code == coap.CHANGED
        reg = await node.store.registration_of(ICCID)
        assert reg is not None and reg.port == second.udp.local_port
        assert reg.updated_ms == T0
    finally:
        first.close()
        second.close()


async def test_registration_edge_cases(node: Simwire, api: Api) -> None:
    raw, other, disabled, unknown = [await Raw.open(node, ip) for ip in (
        IP, IP2, DISABLED_IP, UNKNOWN_IP)]
    try:
        missing = await raw.call(coap.POST, "rd", ("lt=60",), b"</3/0>", 40)
        assert missing.code == coap.BAD_REQUEST and b"ep" in missing.payload
        newer = await raw.register(ICCID, "lwm2m=1.2")
        assert newer.code == PRECONDITION_FAILED  # a 1.2 client falls back to 1.1
        assert (await raw.register(ICCID, "lt=abc")).code == coap.BAD_REQUEST
        assert (await raw.register(ICCID, "lt=0")).code == coap.BAD_REQUEST
        assert (await raw.register(ICCID, "b=X")).code == coap.BAD_REQUEST
        assert (await raw.register(ICCID, links=b"<3/0")).code == coap.BAD_REQUEST
        # the endpoint name must be the ICCID of the enabled SIM at the source address
        assert (await raw.register(ICCID2)).code == FORBIDDEN
        assert (await other.register(ICCID)).code == FORBIDDEN
        assert (await disabled.register(DISABLED)).code == FORBIDDEN
        assert (await unknown.register(ICCID)).code == FORBIDDEN
        assert await node.store.all_registrations() == []
        await node.admin_logs.flush()
        status, logs = await api.call("GET", "/v1/administrationLogs",
                                      params={"pageSize": "100"})
        refused = [e for e in logs["items"]
                   if e["message"] == "DeviceIntegrator[UnauthorizedDevice]"]
        assert {e["ip"] for e in refused} == {IP, IP2, DISABLED_IP, UNKNOWN_IP}
        # LwM2M 1.0 (or no version), 1.0 queue mode binding, default lifetime
        res = await raw.register(ICCID, "b=UQ")
        assert res.code == coap.CREATED
        reg = await node.store.registration_of(ICCID)
        assert reg is not None and (reg.version, reg.binding, reg.queue_mode,
                                    reg.lifetime_s) == ("1.0", "UQ", True, 86400)
        # a new registration of the ICCID replaces the old one
        again = await raw.register(ICCID, "lwm2m=1.1", "lt=60")
        assert again.code == coap.CREATED and location(again) != location(res)
        assert (await raw.call(coap.POST, location(res))).code == coap.NOT_FOUND
        assert [r.id for r in await node.store.all_registrations()] == [location(again)[3:]]
        # updates and deregistrations only from the SIM's address
        assert (await other.call(coap.POST, location(again))).code == FORBIDDEN
        assert (await other.call(coap.DELETE, location(again))).code == FORBIDDEN
        assert (await raw.call(coap.POST, location(again), ("lt=x",))).code == coap.BAD_REQUEST
        assert (await raw.call(coap.POST, "rd/" + location(again)[3:] + "/x")).code == (
            coap.NOT_FOUND)
    finally:
        for r in (raw, other, disabled, unknown):
            r.close()


async def test_lifetime_expiry_on_the_clock(
        node: Simwire, api: Api, clock: ManualClock) -> None:
    raw = await Raw.open(node, IP)
    try:
        where = location(await raw.register(ICCID, "lt=60"))
        clock.advance(59)
        assert await node.lwm2m.sweep() == 0
        assert (await raw.call(coap.POST, where)).code == coap.CHANGED  # renewed at T0 + 59 s
        clock.advance(59)
        assert await node.lwm2m.sweep() == 0
        assert (await raw.call(coap.POST, where, ("lt=10",))).code == coap.CHANGED  # shorter
        clock.advance(10)
        assert await node.lwm2m.sweep() == 1
        assert await node.store.all_registrations() == []
        assert (await raw.call(coap.POST, where)).code == coap.NOT_FOUND
        # an update after the lifetime, before any sweep: the client must register again
        where = location(await raw.register(ICCID, "lt=30"))
        clock.advance(31)
        assert (await raw.call(coap.POST, where)).code == coap.NOT_FOUND
        assert await node.store.all_registrations() == []
        # the background sweeper runs on real time and decides on the clock
        where = location(await raw.register(ICCID, "lt=5"))
        clock.advance(6)
        await eventually(lambda: node.lwm2m.registration(ICCID) is None)
        assert (await raw.call(coap.POST, where)).code == coap.NOT_FOUND
    finally:
        raw.close()


async def test_restart_keeps_registrations_and_observations(
        tmp_path: Path, store_url: str, http: aiohttp.ClientSession) -> None:
    clock = ManualClock(T0)
    data = tmp_path / "d"
    async with running(data, store=store_url, clock=clock) as first:
        api = await Api.login(first, http)
        await add_sims(api)
        client = Lwm2mClient(ICCID, ("127.0.0.1", first.ports.coap), bind=(IP, 0))
        await client.start()
        assert await client.register() == "2.01"
        assert client.location is not None
        await first.lwm2m.observe(ICCID, "/3/0/9")
        assert [o.path for o in await first.store.observations_of(client.location[1])] == [
            "/3/0/9"]
    try:  # the same CoAP port again: the client's old observation meets the new server
        async with running_on(data, store_url, clock, first.ports.coap) as second:
            api = await Api.login(second, http)
            reg = second.lwm2m.registration(ICCID)
            assert reg is not None and reg.id == client.location[1]
            assert await client.update() == "2.04"
            # the stored observation is made again (new token) after the update
            await eventually(lambda: second.lwm2m.observations(ICCID))
            tokens = list(second.lwm2m.observations(ICCID))
            stored = await second.store.observations_of(reg.id)
            assert [(o.token, o.path) for o in stored] == [(tokens[0], "/3/0/9")]
            client.set("/3/0/9", 12)
            got = await eventually(lambda: values(api, 3))
            assert sorted(got, key=json.dumps) == [{"/3/0/9": 12}, {"/3/0/9": 77},
                                                   {"/3/0/9": 77}]
    finally:
        await client.close()


# -- Send ---------------------------------------------------------------------------------


async def test_send_is_stored_before_the_ack(
        node: Simwire, api: Api, device: Lwm2mClient) -> None:
    assert await device.register() == "2.01"
    assert await device.send(("/3/0",)) == "2.04"
    items = await history(api)  # durable before the 2.04: visible at once
    assert len(items) == 1 and items[0]["protocol"] == "LWM2M"
    sent = json.loads(items[0]["payload"])
    # the client's own values (default_values() again could be a second later: /3/0/13)
    assert sent == {p: v for p, v in device.values.items() if p.startswith("/3/0/")}
    telemetry = [e for e in envelopes(node) if e["type"] == "TELEMETRY_DATA"]
    assert len(telemetry) == 1
    event = telemetry[0]
    assert event["source"] == "LWM2M" and event["version"] == "1.0.0"
    assert event["payload"] == {"type": "JSON", "value": sent}
    assert event["device"] == {"iccid": ICCID, "imsi": "9014051" + ICCID[-8:], "ip": IP}
    lifecycle = [e for e in envelopes(node) if e["type"] == "LIFECYCLE"]
    assert [e["lifecycle"]["type"] for e in lifecycle] == ["DEVICE_FIRST_TIME_REGISTERED"]
    # the state is the merged object tree
    device.set("/3/0/9", 50)
    assert await device.send(("/6/0", "/3/0/9"), SENML_CBOR) == "2.04"
    merged = await state(api)
    assert merged["/3/0/9"] == 50 and merged["/6/0/0"] == 52.52
    assert merged["/3/0/0"] == "Simwire"
    assert "_time" not in merged


async def test_send_edge_cases(node: Simwire, api: Api) -> None:
    raw, unknown = await Raw.open(node, IP), await Raw.open(node, UNKNOWN_IP)
    try:
        pack = encode(SENML_CBOR, [Record("/3/0/9", 80)], "/", REGISTRY)
        # not registered
        res = await raw.call(coap.POST, "dp", (), pack, SENML_CBOR)
        assert res.code == coap.NOT_FOUND
        assert (await unknown.call(coap.POST, "dp", (), pack, SENML_CBOR)).code == (
            coap.UNAUTHORIZED)
        assert (await raw.register(ICCID)).code == coap.CREATED
        # token length 0 (FreeRTOS-style), SenML CBOR
        res = await raw.call(coap.POST, "dp", (), pack, SENML_CBOR, token=b"")
        assert (res.code, res.token) == (coap.CHANGED, b"")
        # OMA LwM2M JSON
        oma = b'{"bn":"/3/0/","e":[{"n":"9","v":81}]}'
        assert (await raw.call(coap.POST, "dp", (), oma, ContentFormat.LWM2M_JSON)).code == (
            coap.CHANGED)
        assert (await raw.call(coap.POST, "dp", (), b"[{", SENML_JSON)).code == (
            coap.BAD_REQUEST)
        assert (await raw.call(coap.POST, "dp", (), b"[]", SENML_JSON)).code == (
            coap.BAD_REQUEST)
        assert (await raw.call(coap.POST, "dp", (), pack)).code == coap.BAD_REQUEST
        assert (await raw.call(coap.POST, "dp", (), b"\x00", TLV)).code == UNSUPPORTED
        assert (await raw.call(coap.GET, "dp")).code == coap.METHOD_NOT_ALLOWED
        # a time series: one event per measurement time, oldest first
        series = (b'[{"bn":"/3303/0/","bt":1767225540,"n":"5700","v":21.5},'
                  b'{"n":"5700","v":22,"t":60}]')
        res = await raw.call(coap.POST, "dp", (), series, SENML_JSON, mtype=coap.NON)
        assert (res.mtype, res.code) == (coap.NON, coap.CHANGED)
        got = await eventually(lambda: values(api, 4))
        assert sorted(got, key=json.dumps) == sorted([
            {"/3/0/9": 80}, {"/3/0/9": 81}, {"/3303/0/5700": 21.5, "_time": 1767225540},
            {"/3303/0/5700": 22.0, "_time": 1767225600}], key=json.dumps)
        assert (await state(api))["/3303/0/5700"] == 22.0
    finally:
        raw.close()
        unknown.close()


async def test_send_in_block1_blocks(node: Simwire, api: Api) -> None:
    """RFC 7959: a Send too large for one datagram arrives in 64-byte blocks; each but the
    last gets 2.31 Continue echoing its Block1, the last the route's 2.04 (echoed too)."""
    raw = await Raw.open(node, IP)
    try:
        assert (await raw.register(ICCID)).code == coap.CREATED
        pack = json.dumps([{"n": "/3/0/0", "vs": "M" * 150}, {"n": "/3/0/9", "v": 55}],
                          separators=(",", ":")).encode()
        chunks = [pack[i:i + 64] for i in range(0, len(pack), 64)]
        assert len(chunks) == 4
        for num, chunk in enumerate(chunks):
            block = coap.Block(num, num < 3, 2).encode()
            res = await raw.call(coap.POST, "dp", (), chunk, SENML_JSON,
                                 extra=((coap.OPT_BLOCK1, block),))
            assert (res.code, res.options) == (
                CONTINUE if num < 3 else coap.CHANGED, [(coap.OPT_BLOCK1, block)])
        assert await values(api, 1) == [{"/3/0/0": "M" * 150, "/3/0/9": 55}]

        def block(num: int, more: bool = True) -> tuple[tuple[int, bytes], ...]:
            return ((coap.OPT_BLOCK1, coap.Block(num, more, 2).encode()),)

        # a block out of order, a short middle block, a body announced too large
        res = await raw.call(coap.POST, "dp", (), chunks[2], SENML_JSON, extra=block(2))
        assert res.code == coap.code(4, 8)
        res = await raw.call(coap.POST, "dp", (), b"short", SENML_JSON, extra=block(0))
        assert res.code == coap.BAD_REQUEST
        res = await raw.call(coap.POST, "dp", (), chunks[0], SENML_JSON,
                             extra=(*block(0), (coap.OPT_SIZE1, coap.uint_option(70_000))))
        assert (res.code, res.opt(coap.OPT_SIZE1)) == (coap.code(4, 13),
                                                         coap.uint_option(65536))
        # the ingest path takes single datagrams only
        res = await raw.call(coap.POST, "data", (), b"x" * 64, extra=block(0))
        assert res.code == coap.BAD_OPTION
        assert await values(api, 1) is not None and len(await history(api)) == 1
    finally:
        raw.close()


async def test_a_notification_in_block2_blocks_is_completed(node: Simwire, api: Api) -> None:
    """RFC 7959 section 2.6: a notification carrying block 0 of 3; the server GETs blocks
    1 and 2 (same path and Accept, Block2, no Observe) and stores the whole value."""
    raw = await Raw.open(node, IP)
    try:
        assert (await raw.register(ICCID, links=b"</3/0>")).code == coap.CREATED
        observe = asyncio.create_task(node.lwm2m.observe(ICCID, "/3/0/0"))
        req = coap.parse(await raw.udp.recv())
        raw.udp.send(coap.serialize(coap.Message(
            coap.ACK, coap.CONTENT, req.mid, req.token,
            [(coap.OPT_OBSERVE, b"\x01"), (coap.OPT_CONTENT_FORMAT, b"")], b"short")))
        assert (await observe).value == {"/3/0/0": "short"}
        pack = json.dumps([{"n": "/3/0/0", "vs": "B" * 120}], separators=(",", ":")).encode()
        raw.udp.send(coap.serialize(coap.Message(
            coap.NON, coap.CONTENT, 0x7001, req.token,
            [(coap.OPT_OBSERVE, b"\x02"), (coap.OPT_CONTENT_FORMAT, b"\x6e"),
             (coap.OPT_BLOCK2, coap.Block(0, True, 2).encode())], pack[:64])))
        for num in (1, 2):
            get = coap.parse(await raw.udp.recv())
            assert get.code == coap.GET and get.opt(coap.OPT_OBSERVE) is None
            assert get.opt_all(coap.OPT_URI_PATH) == [b"3", b"0", b"0"]
            assert get.opt(coap.OPT_BLOCK2) == coap.Block(num, False, 2).encode()
            raw.udp.send(coap.serialize(coap.Message(
                coap.ACK, coap.CONTENT, get.mid, get.token,
                [(coap.OPT_CONTENT_FORMAT, b"\x6e"),
                 (coap.OPT_BLOCK2, coap.Block(num, num < 2, 2).encode())],
                pack[num * 64:(num + 1) * 64])))
        got = await eventually(lambda: values(api, 2))
        assert {"/3/0/0": "B" * 120} in got
    finally:
        raw.close()


async def test_a_refused_format_falls_back_to_tlv(node: Simwire, api: Api) -> None:
    """A client advertising SenML JSON that answers 4.06 to it is read in TLV from then on
    (the read retried at once, later reads and observations in TLV)."""
    raw = await Raw.open(node, IP)

    async def answer_tlv(req: coap.Message, value: int) -> None:
        assert req.opt(coap.OPT_ACCEPT) == coap.uint_option(TLV)
        raw.udp.send(coap.serialize(coap.Message(
            coap.ACK, coap.CONTENT, req.mid, req.token,
            [(coap.OPT_CONTENT_FORMAT, coap.uint_option(TLV))],
            encode(TLV, [Record("/3/0/9", value)], "/3/0/9", REGISTRY))))

    try:
        res = await raw.register(ICCID, links=b"</>;rt=\"oma.lwm2m\";ct=110,</3/0>")
        assert res.code == coap.CREATED
        read = asyncio.create_task(node.lwm2m.read(ICCID, "/3/0/9"))
        req = coap.parse(await raw.udp.recv())
        assert req.opt(coap.OPT_ACCEPT) == coap.uint_option(SENML_JSON)
        raw.udp.send(coap.serialize(coap.Message(coap.ACK, coap.code(4, 6), req.mid,
                                                 req.token)))
        await answer_tlv(coap.parse(await raw.udp.recv()), 70)
        assert (await read).value == {"/3/0/9": 70}
        assert node.lwm2m.content_format(ICCID) == TLV
        read = asyncio.create_task(node.lwm2m.read(ICCID, "/3/0/9"))
        await answer_tlv(coap.parse(await raw.udp.recv()), 71)
        assert (await read).value == {"/3/0/9": 71}
    finally:
        raw.close()


async def test_positions_go_to_the_locator(node: Simwire, api: Api,
                                           device: Lwm2mClient) -> None:
    seen: list[tuple[str, float, float, int]] = []

    class Spy:
        def report_position(self, dev: DeviceIdentity, lat: float, lon: float,
                            received_ms: int) -> None:
            seen.append((dev.iccid, lat, lon, received_ms))

    node.lwm2m.positions = Spy()
    assert await device.register() == "2.01"
    assert await device.send(("/3/0",)) == "2.04"
    assert seen == []
    assert await device.send(("/6/0",)) == "2.04"
    assert seen == [(ICCID, 52.52, 13.405, T0)]


# -- device management --------------------------------------------------------------------


async def test_read_observe_notification_end_to_end(node: Simwire, api: Api) -> None:
    """A client that advertises no format gets TLV; bootstrap is the other engineer's."""
    async with Lwm2mClient(ICCID, ("127.0.0.1", node.ports.coap), bind=(IP, 0),
                           content_format=None) as device:
        assert await device.register() == "2.01"
        assert node.lwm2m.content_format(ICCID) == TLV
        res = await node.lwm2m.read(ICCID, "/3/0")
        assert (res.code, res.content_format) == (coap.CONTENT, TLV)
        assert res.value is not None and res.value["/3/0/9"] == 77
        assert res.value["/3/0/7/0"] == 3800 and res.value["/3/0/0"] == "Simwire"
        assert ("GET", "/3/0") in device.requests
        res = await node.lwm2m.observe(ICCID, "/3/0/9")
        assert (res.code, res.value) == (coap.CONTENT, {"/3/0/9": 77})
        (token, path), = node.lwm2m.observations(ICCID).items()
        assert path == "/3/0/9" and device.observed == {"/3/0/9"}
        reg = node.lwm2m.registration(ICCID)
        assert reg is not None
        assert [(o.token, o.path, o.iccid) for o in await node.store.observations_of(reg.id)
                ] == [(token, "/3/0/9", ICCID)]
        device.set("/3/0/9", 42)
        got = await eventually(lambda: values(api, 3))
        assert {"/3/0/9": 77} in got and {"/3/0/9": 42} in got
        assert (await state(api))["/3/0/9"] == 42
        telemetry = [e for e in envelopes(node) if e["type"] == "TELEMETRY_DATA"]
        assert telemetry[-1]["source"] == "LWM2M"
        assert telemetry[-1]["payload"] == {"type": "JSON", "value": {"/3/0/9": 42}}
        # cancel: explicit (GET Observe=1 with the token), removed from the store
        res = await node.lwm2m.cancel_observation(ICCID, "/3/0/9")
        assert res is not None and res.code == coap.CONTENT
        assert node.lwm2m.observations(ICCID) == {}
        assert await node.store.observations_of(reg.id) == []
        assert await node.lwm2m.cancel_observation(ICCID, "/3/0/9") is None
        # deregistration ends observations too
        await node.lwm2m.observe(ICCID, "/3/0/9", report=False)
        assert await device.deregister() == "2.02"
        assert node.lwm2m.observations(ICCID) == {}
        assert await node.store.observations_of(reg.id) == []


async def test_device_management_operations(node: Simwire, api: Api,
                                            device: Lwm2mClient) -> None:
    lw = node.lwm2m
    device.values["/3311/0/5850"] = False
    device.values["/3311/0/5706"] = "red"
    assert await device.register() == "2.01"
    assert lw.content_format(ICCID) == SENML_JSON
    res = await lw.write(ICCID, "/3311/0/5850", [Record("/3311/0/5850", True)])
    assert res.code == coap.CHANGED and device.values["/3311/0/5850"] is True
    res = await lw.write(ICCID, "/3311/0", write_records("/3311/0", {"/3311/0/5706": "blue"},
                                                         REGISTRY), replace=False)
    assert res.code == coap.CHANGED and device.values["/3311/0/5706"] == "blue"
    assert device.requests[-2:] == [("PUT", "/3311/0/5850"), ("POST", "/3311/0")]
    res = await lw.execute(ICCID, "/3/0/4", "0='now'")
    assert res.code == coap.CHANGED and device.executed == [("/3/0/4", "0='now'")]
    res = await lw.discover(ICCID, "/3/0")
    assert res.code == coap.CONTENT
    assert {link.path for link in res.links} >= {"/3/0", "/3/0/9", "/3/0/7"}
    res = await lw.write_attributes(ICCID, "/3/0/9", {"pmin": 10, "pmax": 60, "gt": None})
    assert res.code == coap.CHANGED
    assert device.attributes["/3/0/9"] == {"pmin": "10", "pmax": "60", "gt": None}
    res = await lw.create(ICCID, "/3303", [Record("/3303/1/5700", 19.5)])
    assert (res.code, res.location) == (coap.CREATED, "/3303/1")
    assert device.values["/3303/1/5700"] == 19.5
    read = await lw.read(ICCID, "/3303/1", report=False)
    assert read.value == {"/3303/1/5700": 19.5}
    res = await lw.delete(ICCID, "/3303/1")
    assert res.code == DELETED and "/3303/1/5700" not in device.values
    assert (await lw.read(ICCID, "/3303/1")).code == coap.NOT_FOUND
    # reads in the other formats the client speaks
    cbor = await lw.read(ICCID, "/6/0", content_format=SENML_CBOR, report=False)
    assert cbor.content_format == SENML_CBOR and cbor.value is not None
    assert cbor.value["/6/0/0"] == 52.52
    assert (await lw.read(ICCID, "/3/0/9", content_format=ContentFormat.TEXT,
                          report=False)).value == {"/3/0/9": 77}
    # the history got the reported reads only: /3/0/9 text read was not reported
    assert len(await history(api)) == 0


async def test_advertised_formats_pick_the_preferred(node: Simwire, api: Api) -> None:
    raw = await Raw.open(node, IP)
    try:
        res = await raw.register(ICCID, links=b'</>;rt="oma.lwm2m";ct="60 110 112",</3/0>')
        assert res.code == coap.CREATED
        assert node.lwm2m.content_format(ICCID) == SENML_CBOR
        res = await raw.register(ICCID, links=b'</lwm2m>;rt="oma.lwm2m";ct=11543,'
                                               b'</lwm2m/3/0>,</lwm2m/4/0>')
        assert node.lwm2m.content_format(ICCID) == ContentFormat.LWM2M_JSON
        reg = node.lwm2m.registration(ICCID)
        assert reg is not None and node.lwm2m.passive_paths(reg) == ["/4/0"]
        # requests go below the alternate root
        task = asyncio.create_task(node.lwm2m.read(ICCID, "/4/0"))
        req = coap.parse(await raw.udp.recv())
        assert [v for n, v in req.options if n == coap.OPT_URI_PATH] == [b"lwm2m", b"4", b"0"]
        assert req.opt(coap.OPT_ACCEPT) == coap.uint_option(ContentFormat.LWM2M_JSON)
        raw.udp.send(coap.serialize(coap.Message(
            coap.ACK, coap.CONTENT, req.mid, req.token,
            [(coap.OPT_CONTENT_FORMAT, coap.uint_option(ContentFormat.LWM2M_JSON))],
            b'{"bn":"/4/0/","e":[{"n":"2","v":-95}]}')))
        res = await task
        assert res.value == {"/4/0/2": -95}
    finally:
        raw.close()


# -- Device Controller --------------------------------------------------------------------


async def test_controller_actions(node: Simwire, api: Api, device: Lwm2mClient) -> None:
    rid = await action(api, {"action": "read", "resourceAddress": "/3/0/9"})
    r = await final(api, rid)
    assert (r["status"], r["errorMessage"]) == ("FAILED", "not registered")
    device.values["/3311/0/5850"] = False
    assert await device.register() == "2.01"
    r = await final(api, await action(api, {"action": "read", "resourceAddress": "/3/0"}))
    assert r["status"] == "SUCCEEDED", r
    assert r["resultData"]["code"] == "205"
    assert r["resultData"]["payload"]["/3/0/9"] == 77
    assert r["requestData"]["action"] == "read" and r["protocol"] == "LWM2M"
    assert (await values(api, 1)) == [r["resultData"]["payload"]]  # the read is telemetry
    r = await final(api, await action(api, {"action": "write", "resourceAddress": "/3311/0/5850",
                                            "data": "true"}))
    assert (r["status"], r["resultData"]) == ("SUCCEEDED", {"code": "204", "payload": ""})
    assert device.values["/3311/0/5850"] is True
    r = await final(api, await action(api, {"action": "write", "resourceAddress": "/3/0/9",
                                            "data": "many"}))
    assert r["status"] == "FAILED" and r["errorMessage"].startswith("invalid data")
    r = await final(api, await action(api, {"action": "execute", "resourceAddress": "/3/0/4"}))
    assert r["status"] == "SUCCEEDED" and device.executed == [("/3/0/4", "")]
    r = await final(api, await action(api, {"action": "observe-start",
                                            "resourceAddress": "/3/0/9"}))
    assert (r["status"], r["resultData"]) == (
        "SUCCEEDED", {"code": "205", "payload": {"/3/0/9": 77}})
    device.set("/3/0/9", 33)
    await eventually(lambda: values(api, 3))
    r = await final(api, await action(api, {"action": "observe-end",
                                            "resourceAddress": "/3/0/9"}))
    assert r["status"] == "SUCCEEDED" and node.lwm2m.observations(ICCID) == {}
    r = await final(api, await action(api, {"action": "observe-end",
                                            "resourceAddress": "/3/0/9"}))
    assert (r["status"], r["errorMessage"]) == ("FAILED", "/3/0/9 is not observed")
    r = await final(api, await action(api, {"action": "read", "resourceAddress": "/9/0"}))
    assert (r["status"], r["errorMessage"], r["resultData"]["code"]) == (
        "FAILED", "the device answered 4.04", "404")


async def test_send_when_active_fired_by_a_registration_update(
        node: Simwire, api: Api, device: Lwm2mClient) -> None:
    assert await device.register() == "2.01"
    rid = await action(api, {"action": "read", "resourceAddress": "/3/0/9",
                             "requestMode": "SEND_WHEN_ACTIVE"})
    await asyncio.sleep(0.2)
    status, r = await api.call("GET", f"/v1/integrate/devices/actions/requests/{rid}")
    assert r["status"] == "SCHEDULED" and ("GET", "/3/0/9") not in device.requests
    assert await device.update() == "2.04"
    r = await final(api, rid)
    assert (r["status"], r["resultData"]) == (
        "SUCCEEDED", {"code": "205", "payload": {"/3/0/9": 77}})


# -- passive reporting --------------------------------------------------------------------


async def test_passive_reporting_reads_all_objects_but_1_2_3(
        node: Simwire, api: Api) -> None:
    node.lwm2m.passive_reporting = True  # the LWM2M_PASSIVE_REPORTING setting
    extra: dict[str, Any] = {"/3303/0/5700": 21.5, "/3303/1/5700": 22.5, "/2/0/0": 3}
    async with Lwm2mClient(ICCID, ("127.0.0.1", node.ports.coap), bind=(IP, 0),
                           values={**default_values(IP), **extra}) as device:
        assert await device.register() == "2.01"
        expected = [("GET", p) for p in ("/4/0", "/6/0", "/3303/0", "/3303/1")]
        await eventually(lambda: device.requests == expected)
        got = await eventually(lambda: values(api, 4))
        assert {"/3303/1/5700": 22.5} in got and any("/6/0/0" in v for v in got)
        assert not any(k.startswith(("/1/", "/2/", "/3/")) for v in got for k in v)
        assert await device.update() == "2.04"
        await eventually(lambda: device.requests == expected * 2)
        await eventually(lambda: values(api, 8))


# -- DTLS ---------------------------------------------------------------------------------


async def dtls_message(client: DtlsClient, timeout: float = 3.0) -> coap.Message:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        client.buf.receive_from_network(
            await asyncio.wait_for(client.queue.get(), deadline - loop.time()))
        try:
            return coap.parse(client.buf.read(2048))
        except tls.WantReadError:
            continue


async def test_registration_and_read_over_dtls(node: Simwire, api: Api) -> None:
    status, body = await api.call("POST", f"/v1/integrate/devices/{ICCID}/psk", {
        "secretKey": KEY.decode(), "protocol": "COAP"})
    assert status == 200, body
    client = await DtlsClient.open(node.ports.coaps, ICCID, KEY, local=(IP, 0))
    try:
        await client.handshake()
        client.send_app(coap.serialize(coap.Message(
            coap.CON, coap.POST, 1, b"\x07",
            [(coap.OPT_URI_PATH, b"rd"), (coap.OPT_CONTENT_FORMAT, b"\x28"),
             (coap.OPT_URI_QUERY, f"ep={ICCID}".encode()), (coap.OPT_URI_QUERY, b"lt=300"),
             (coap.OPT_URI_QUERY, b"lwm2m=1.1")], b"</3/0>")))
        res = await dtls_message(client)
        assert res.code == coap.CREATED and location(res).startswith("rd/")
        reg = node.lwm2m.registration(ICCID)
        assert reg is not None and reg.secure
        task = asyncio.create_task(node.lwm2m.read(ICCID, "/3/0/9"))
        req = await dtls_message(client)
        assert (req.code, req.opt(coap.OPT_ACCEPT)) == (coap.GET, coap.uint_option(TLV))
        payload = encode(TLV, [Record("/3/0/9", 64)], "/3/0/9", REGISTRY)
        client.send_app(coap.serialize(coap.Message(
            coap.ACK, coap.CONTENT, req.mid, req.token,
            [(coap.OPT_CONTENT_FORMAT, coap.uint_option(TLV))], payload)))
        assert (await task).value == {"/3/0/9": 64}
        assert await values(api, 1) == [{"/3/0/9": 64}]
        # Send over DTLS
        client.send_app(coap.serialize(coap.Message(
            coap.CON, coap.POST, 2, b"", [(coap.OPT_URI_PATH, b"dp"),
                                          (coap.OPT_CONTENT_FORMAT, coap.uint_option(110))],
            b'[{"n":"/3/0/9","v":63}]')))
        assert (await dtls_message(client)).code == coap.CHANGED
        assert (await state(api))["/3/0/9"] == 63
    finally:
        client.close()


# -- interop ------------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize(("binary", "secure"), [
    ("coap-client-openssl", False), ("coap-client-openssl", True),
    ("coap-client-gnutls", True)])
async def test_libcoap_registration(node: Simwire, api: Api, binary: str, secure: bool
                                    ) -> None:
    exe = require_binary(binary)
    base = f"coap://127.0.0.1:{node.ports.coap}"
    credentials: tuple[str, ...] = ()
    if secure:
        status, body = await api.call("POST", f"/v1/integrate/devices/{ICCID}/psk", {
            "secretKey": KEY.decode(), "protocol": "COAP"})
        assert status == 200, body
        base = f"coaps://127.0.0.1:{node.ports.coaps}"
        credentials = ("-u", ICCID, "-k", KEY.decode())

    async def run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            exe, "-a", IP, *credentials, *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        return (out + err).decode()

    await run("-m", "post", "-t", "40", "-e", "</3/0>,</4/0>", "-B", "5",
              f"{base}/rd?ep={ICCID}&lt=300&lwm2m=1.1&b=U")
    reg = await eventually(lambda: node.lwm2m.registration(ICCID))
    assert (reg.ip, reg.lifetime_s, reg.links, reg.secure) == (IP, 300, "</3/0>,</4/0>",
                                                                secure)
    assert "4.12" in await run("-m", "post", "-t", "40", "-e", "</3/0>", "-B", "5",
                               f"{base}/rd?ep={ICCID}&lwm2m=1.2")
    assert "4.03" in await run("-m", "post", "-t", "40", "-e", "</3/0>", "-B", "5",
                               f"{base}/rd?ep={ICCID2}&lwm2m=1.1")
    await run("-m", "post", "-t", "110", "-e", '[{"n":"/3/0/9","v":5}]', "-B", "5",
              f"{base}/dp")
    assert await values(api, 1) == [{"/3/0/9": 5}]
    # a Send in 64-byte Block1 blocks (-b 64)
    big = json.dumps([{"n": "/3/0/0", "vs": "S" * 300}, {"n": "/3/0/9", "v": 6}])
    await run("-m", "post", "-t", "110", "-e", big, "-b", "64", "-B", "5", f"{base}/dp")
    got = await eventually(lambda: values(api, 2))
    assert {"/3/0/0": "S" * 300, "/3/0/9": 6} in got


def test_write_records_shapes() -> None:
    assert write_records("/3311/0/5850", "true", REGISTRY) == [Record("/3311/0/5850", True)]
    assert write_records("/3311/0/5850", True, REGISTRY) == [Record("/3311/0/5850", True)]
    assert write_records("/3311/0", {"/3311/0/5706": "red", "/3311/0/5851": "5"},
                         REGISTRY) == [Record("/3311/0/5706", "red"),
                                       Record("/3311/0/5851", 5)]
    with pytest.raises(ValueError, match="single value"):
        write_records("/3311/0", True, REGISTRY)
    with pytest.raises(ValueError, match="no values"):
        write_records("/3311/0", {}, REGISTRY)
