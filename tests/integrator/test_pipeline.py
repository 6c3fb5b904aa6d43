"""Pipeline: the envelope it stores, translation failures, registration once, no ACK on
store failure. GIVEN / WHEN / THEN against a real SQLite store."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from integrator.pipeline import Ack
from simwire.clock import ManualClock
from simwire.model import Payload, Protocol, RawUplink, Sim
from simwire.ports import AdminLogQuery, TranslationError
from tests.support.simwire import envelopes, running

ICCID = "8988280666000002864"
SIM = Sim(ICCID, "901405100002864", "100.91.200.24")
T0 = 1_670_598_749_915


def uplink(payload: bytes, protocol: Protocol = Protocol.UDP, topic: str | None = None,
           ip: str = SIM.ip) -> RawUplink:
    return RawUplink(protocol, ip, 40000, payload, T0, topic)


async def test_telemetry_and_lifecycle_envelopes(tmp_path: Path) -> None:
    async with running(tmp_path / "d", clock=ManualClock(T0)) as app:
        await app.store.create(SIM)
        # WHEN a device sends twice
        assert await app.pipeline.handle_uplink(uplink(b"\x01\x02")) is Ack.STORED
        assert await app.pipeline.handle_uplink(
            uplink(b"hi", Protocol.COAP, "test")) is Ack.STORED
        events = envelopes(app)
    # THEN one LIFECYCLE precedes the first TELEMETRY_DATA, in the 1NCE 1.0.0 envelope
    assert [e["type"] for e in events] == ["LIFECYCLE", "TELEMETRY_DATA", "TELEMETRY_DATA"]
    device = {"iccid": ICCID, "imsi": "901405100002864", "ip": "100.91.200.24"}
    life, udp, coap_ev = events
    assert life == {
        "id": life["id"], "type": "LIFECYCLE", "version": "1.0.0", "received": str(T0),
        "device": device,
        "lifecycle": {
            "type": "DEVICE_FIRST_TIME_REGISTERED",
            "message": f"New Device successfully registered for the first time - {ICCID}",
        },
    }
    assert udp == {
        "id": udp["id"], "type": "TELEMETRY_DATA", "version": "1.0.0", "received": str(T0),
        "device": device, "source": "UDP",
        "payload": {"type": "STRING", "value": "AQI=", "encoding": "base64"},
    }
    assert coap_ev["payload"] == {"type": "STRING", "value": "aGk=", "encoding": "base64",
                                  "topic": "test"}
    assert coap_ev["source"] == "COAP"
    # ids are 1NCE/X-Ray style: 1-<receive time in epoch seconds>-<24 hex>
    for e in events:
        prefix, seconds, rand = str(e["id"]).split("-")
        assert (prefix, int(seconds, 16), len(rand)) == ("1", T0 // 1000, 24)
    assert len({e["id"] for e in events}) == 3


class FailingTranslator:
    def translate(self, org: str, raw: RawUplink) -> Payload | TranslationError:
        if raw.payload.startswith(b"\x01"):
            return Payload(raw=raw.payload, json_value={"ok": True}, translated=True)
        return TranslationError("Asset path:Humidity, Error: can't extract [2:4] from 2 bytes")


async def test_translation_failure_is_an_error_event_and_raw_is_kept(tmp_path: Path) -> None:
    async with running(tmp_path / "d", clock=ManualClock(T0),
                       translator=FailingTranslator()) as app:
        await app.store.create(SIM)
        assert await app.pipeline.handle_uplink(uplink(b"\x01")) is Ack.STORED
        assert await app.pipeline.handle_uplink(uplink(b"\x00\x1a")) is Ack.STORED
        events = envelopes(app)
        from simwire.ports import HistoryQuery

        page = await app.store.history(HistoryQuery(ICCID, 0, 2**62))
    assert [e["type"] for e in events] == [
        "LIFECYCLE", "TELEMETRY_DATA", "TELEMETRY_DATA", "ERROR"]
    assert events[1]["payload"] == {"type": "JSON", "value": {"ok": True}}
    err = events[3]
    assert err["error"] == {
        "id": err["id"], "type": "DEVICE", "message": "Translator[UserPayloadError]",
        "description": "Asset path:Humidity, Error: can't extract [2:4] from 2 bytes",
        "payloadExists": True,
    }
    assert [i.payload for i in page.items] == ["ABo=", '{"ok":true}']


async def test_nothing_is_acked_when_the_store_fails(tmp_path: Path) -> None:
    async with running(tmp_path / "d", clock=ManualClock(T0)) as app:
        await app.store.create(SIM)

        def broken(record: object, done: Callable[[BaseException | None], None]) -> None:
            done(sqlite3.OperationalError("disk I/O error"))  # as a failed COMMIT reports

        app.pipeline._store.submit = broken  # type: ignore[method-assign]
        assert await app.pipeline.handle_uplink(uplink(b"x")) is Ack.FAILED
        assert app.metrics.registry.get_sample_value(
            "simwire_uplinks_total", {"protocol": "UDP", "outcome": "error"}) == 1


async def test_dtls_identity_must_match_the_sim_of_the_source_ip(tmp_path: Path) -> None:
    async with running(tmp_path / "d", clock=ManualClock(T0)) as app:
        await app.store.create(SIM)
        good = RawUplink(Protocol.COAP, SIM.ip, 1, b"x", T0, dtls_identity=ICCID)
        bad = RawUplink(Protocol.COAP, SIM.ip, 1, b"x", T0, dtls_identity="8988280666000000000")
        assert await app.pipeline.handle_uplink(good) is Ack.STORED
        assert await app.pipeline.handle_uplink(bad) is Ack.UNAUTHORIZED


def test_fast_envelope_equals_the_generic_encoder() -> None:
    """The hot path's fixed-shape JSON must be byte-identical to json.dumps of the dict."""
    from simwire.model import DeviceIdentity, Event, EventType

    ident = DeviceIdentity(ICCID, "901405100002864", "100.91.200.24")
    for topic in (None, "test", "a/b_c", 'quo"te\\'):
        for payload in (b"", b"\x00\xff" * 40, "é".encode()):
            ev = Event(id="1-6393505d-67fa8489fb9c791fcddd43f0", type=EventType.TELEMETRY_DATA,
                       received_ms=T0, org="default", device=ident, source=Protocol.COAP,
                       topic=topic, payload=Payload(raw=payload))
            generic = json.dumps(ev.to_envelope(), separators=(",", ":"), ensure_ascii=False)
            assert ev.envelope_json() == generic
    odd = Event(id='1-"x', type=EventType.TELEMETRY_DATA, received_ms=T0, org="default",
                device=ident, source=Protocol.UDP, payload=Payload(raw=b"x"))
    assert json.loads(odd.envelope_json())["id"] == '1-"x'  # unsafe id: generic encoder


async def test_imei_lock_refuses_another_imei(tmp_path: Path) -> None:
    """GIVEN a SIM locked to its IMEI, WHEN the network reports another IMEI, THEN the
    message is refused (CoAP 4.01) and logged; the locked IMEI or an unknown one passes."""
    async with running(tmp_path / "d", clock=ManualClock(T0)) as app:
        locked = Sim(ICCID, "901405100002864", SIM.ip, imei="356938035643809", imei_lock=True)
        await app.store.create(locked)
        for imei, ack in (("356938035643809", Ack.STORED), (None, Ack.STORED),
                          ("356938035643817", Ack.UNAUTHORIZED)):
            raw = RawUplink(Protocol.UDP, SIM.ip, 40000, b"x", T0, imei=imei)
            assert await app.pipeline.handle_uplink(raw) is ack, imei
        await app.admin_logs.flush()
        page = await app.store.list_logs(AdminLogQuery(org="default"))
    assert [e.description for e in page.items if e.message.startswith("DeviceIntegrator")] == [
        f"IMEI 356938035643817 is not the IMEI 356938035643809 locked to SIM {ICCID}"]
