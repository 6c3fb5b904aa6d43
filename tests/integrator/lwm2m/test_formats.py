"""LwM2M content formats: spec vectors, per-type round trips, errors, link-format, telemetry
JSON, and hypothesis properties (round trips; decoding garbage raises only FormatError)."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integrator.lwm2m import cbor
from integrator.lwm2m.formats import (
    ContentFormat,
    FormatError,
    Link,
    ObjLink,
    Record,
    Value,
    decode,
    encode,
    format_links,
    format_path,
    from_json,
    json_value,
    parse_links,
    parse_path,
    resolve_format,
    split_by_time,
    to_json,
)
from integrator.lwm2m.objects import ObjectDef, Registry, ResourceDef, ResourceType

CF = ContentFormat
T = ResourceType
REGISTRY = Registry.default()
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000.0

# -- the LwM2M Core spec's Device object example (/3/0) ---------------------------------------

# OMA-TS-LightweightM2M_Core-V1_1 7.4.3 (TLV), resources of /3/0 without the instance TLV
SPEC_TLV = bytes.fromhex(
    "C800144F70656E204D6F62696C6520416C6C69616E6365"      # 0 Manufacturer
    "C801164C69676874776569676874204D324D20436C69656E74"  # 1 Model Number
    "C80209333435303030313233"                            # 2 Serial Number
    "C303312E30"                                          # 3 Firmware Version
    "86064100014101 05"                                   # 6 Available Power Sources [1, 5]
    "88070842000ED842011388"                              # 7 Power Source Voltage [3800, 5000]
    "870841007D42010384"                                  # 8 Power Source Current [125, 900]
    "C10964"                                              # 9 Battery Level
    "C10A0F"                                              # 10 Memory Free
    "830B410000"                                          # 11 Error Code [0]
    "C40D5182428F"                                        # 13 Current Time
    "C60E2B30323A3030"                                    # 14 UTC Offset
    "C11055")                                             # 16 Binding and Modes
SPEC_TLV_WITH_INSTANCE = bytes.fromhex("080079") + SPEC_TLV

# the same data in SenML JSON (7.4.5) and SenML CBOR (7.4.6, hex from the 1.1.1 spec)
SPEC_SENML_JSON = (
    '[{"bn":"/3/0/","n":"0","vs":"Open Mobile Alliance"},'
    '{"n":"1","vs":"Lightweight M2M Client"},{"n":"2","vs":"345000123"},'
    '{"n":"3","vs":"1.0"},{"n":"6/0","v":1},{"n":"6/1","v":5},{"n":"7/0","v":3800},'
    '{"n":"7/1","v":5000},{"n":"8/0","v":125},{"n":"8/1","v":900},{"n":"9","v":100},'
    '{"n":"10","v":15},{"n":"11/0","v":0},{"n":"13","v":1367491215},'
    '{"n":"14","vs":"+02:00"},{"n":"16","vs":"U"}]')
SPEC_SENML_CBOR = bytes.fromhex(
    "90a321652f332f302f00613003744f70656e204d6f62696c6520416c6c69616e6365a200613103764c"
    "69676874776569676874204d324d20436c69656e74a20061320369333435303030313233a200613303"
    "63312e30a20063362f300201a20063362f310205a20063372f3002190ed8a20063372f3102191388a2"
    "0063382f3002187da20063382f3102190384a2006139021864a200623130020fa2006431312f300200"
    "a200623133021a5182428fa20062313403662b30323a3030a200623136036155")
# LwM2M 1.0 JSON (ct 11543), as Wakaama sends it
SPEC_OMA_JSON = (
    '{"bn":"/3/0/","e":[{"n":"0","sv":"Open Mobile Alliance"},'
    '{"n":"1","sv":"Lightweight M2M Client"},{"n":"2","sv":"345000123"},'
    '{"n":"3","sv":"1.0"},{"n":"6/0","v":1},{"n":"6/1","v":5},{"n":"7/0","v":3800},'
    '{"n":"7/1","v":5000},{"n":"8/0","v":125},{"n":"8/1","v":900},{"n":"9","v":100},'
    '{"n":"10","v":15},{"n":"11/0","v":0},{"n":"13","v":1367491215},'
    '{"n":"14","sv":"+02:00"},{"n":"16","sv":"U"}]}')

DEVICE = [
    Record("/3/0/0", "Open Mobile Alliance"), Record("/3/0/1", "Lightweight M2M Client"),
    Record("/3/0/2", "345000123"), Record("/3/0/3", "1.0"),
    Record("/3/0/6/0", 1), Record("/3/0/6/1", 5), Record("/3/0/7/0", 3800),
    Record("/3/0/7/1", 5000), Record("/3/0/8/0", 125), Record("/3/0/8/1", 900),
    Record("/3/0/9", 100), Record("/3/0/10", 15), Record("/3/0/11/0", 0),
    Record("/3/0/13", 1367491215), Record("/3/0/14", "+02:00"), Record("/3/0/16", "U"),
]


def test_spec_tlv_device_instance() -> None:
    assert decode(CF.TLV, SPEC_TLV, "/3/0", REGISTRY) == DEVICE
    assert decode(CF.TLV, SPEC_TLV_WITH_INSTANCE, "/3/0", REGISTRY) == DEVICE
    assert decode(CF.TLV, SPEC_TLV_WITH_INSTANCE, "/3", REGISTRY) == DEVICE
    assert encode(CF.TLV, DEVICE, "/3/0", REGISTRY) == SPEC_TLV
    assert encode(CF.TLV, DEVICE, "/3", REGISTRY) == SPEC_TLV_WITH_INSTANCE
    # the encoder orders by ids whatever the record order
    assert encode(CF.TLV, DEVICE[::-1], "/3/0", REGISTRY) == SPEC_TLV


def test_spec_tlv_single_and_multiple_resource_reads() -> None:
    assert decode(CF.TLV, bytes.fromhex("C10964"), "/3/0/9", REGISTRY) == [
        Record("/3/0/9", 100)]
    voltage = [Record("/3/0/7/0", 3800), Record("/3/0/7/1", 5000)]
    assert decode(CF.TLV, bytes.fromhex("88070842000ED842011388"), "/3/0/7", REGISTRY) == voltage
    assert encode(CF.TLV, voltage, "/3/0/7", REGISTRY).hex().upper() == "88070842000ED842011388"
    # some clients answer a multiple-resource read with bare resource instances
    assert decode(CF.TLV, bytes.fromhex("42000ED842011388"), "/3/0/7", REGISTRY) == voltage
    assert decode(CF.TLV, bytes.fromhex("42011388"), "/3/0/7/1", REGISTRY) == voltage[1:]
    assert encode(CF.TLV, voltage[1:], "/3/0/7/1", REGISTRY).hex() == "42011388"


def test_spec_tlv_multiple_object_instances() -> None:
    # two Server object instances (/1/0, /1/1), hand-assembled: instance TLVs of 15 and 14 bytes
    servers = [Record("/1/0/0", 1), Record("/1/0/1", 86400), Record("/1/0/6", False),
               Record("/1/0/7", "U"), Record("/1/1/0", 2), Record("/1/1/1", 300),
               Record("/1/1/6", True), Record("/1/1/7", "UQ")]
    payload = encode(CF.TLV, servers, "/1", REGISTRY)
    assert payload.hex().upper() == ("08000F" "C10001" "C40100015180" "C10600" "C10755"
                                     "08010E" "C10002" "C201012C" "C10601" "C2075551")
    assert decode(CF.TLV, payload, "/1", REGISTRY) == servers


def test_spec_senml_json_cbor_and_oma_json() -> None:
    assert decode(CF.SENML_JSON, SPEC_SENML_JSON.encode(), "/3/0", REGISTRY) == DEVICE
    assert encode(CF.SENML_JSON, DEVICE, "/3/0", REGISTRY) == SPEC_SENML_JSON.encode()
    assert decode(CF.SENML_CBOR, SPEC_SENML_CBOR, "/3/0", REGISTRY) == DEVICE
    assert encode(CF.SENML_CBOR, DEVICE, "/3/0", REGISTRY) == SPEC_SENML_CBOR
    assert decode(CF.LWM2M_JSON, SPEC_OMA_JSON.encode(), "/3/0", REGISTRY) == DEVICE
    assert encode(CF.LWM2M_JSON, DEVICE, "/3/0", REGISTRY) == SPEC_OMA_JSON.encode()


def test_freertos_send_dp_payload() -> None:
    # Wakaama (1NCE FreeRTOS blueprint) `POST /dp`, SenML JSON with bn per first record
    payload = (b'[{"bn":"/3/0/","n":"0","vs":"Open Mobile Alliance"},'
               b'{"n":"9","v":100},{"n":"13","v":2985897711},{"n":"15","vs":"Europe/Berlin"},'
               b'{"n":"6/0","v":1},{"n":"16","vs":"U"}]')
    records = decode(CF.SENML_JSON, payload, "/", REGISTRY, now=NOW)
    assert to_json(records) == {"/3/0/0": "Open Mobile Alliance", "/3/0/9": 100,
                                "/3/0/13": 2985897711, "/3/0/15": "Europe/Berlin",
                                "/3/0/6/0": 1, "/3/0/16": "U"}


def test_senml_base_name_and_time_series() -> None:
    # Zephyr-style Send of cached samples: bn on the resource, bt + relative t
    payload = (b'[{"bn":"/3303/0/5700","bt":1700000000,"v":21.5},{"t":60,"v":22},'
               b'{"bn":"/3303/0/","n":"5701","vs":"Cel"}]')
    records = decode(CF.SENML_JSON, payload, "/", REGISTRY, now=NOW)
    assert records == [Record("/3303/0/5700", 21.5, 1700000000.0),
                       Record("/3303/0/5700", 22.0, 1700000060.0),  # Float: 22 -> 22.0
                       Record("/3303/0/5701", "Cel", 1700000000.0)]  # bt persists
    assert isinstance(records[1].value, float)


def test_senml_relative_times_resolve_against_now() -> None:
    payload = b'[{"n":"/3303/0/5700","v":1,"t":-30},{"n":"/3303/0/5700","v":2,"t":0}]'
    records = decode(CF.SENML_JSON, payload, "/", REGISTRY, now=NOW)
    assert [r.time for r in records] == [NOW - 30, NOW]
    assert decode(CF.SENML_JSON, b'[{"n":"/3/0/9","v":1}]', "/", REGISTRY)[0].time is None


def test_oma_json_base_time_and_default_base_name() -> None:
    payload = b'{"bt":1700000000,"e":[{"n":"5700","v":21.5,"t":-5},{"n":"5701","sv":"Cel"}]}'
    assert decode(CF.LWM2M_JSON, payload, "/3303/0", REGISTRY, now=NOW) == [
        Record("/3303/0/5700", 21.5, 1699999995.0), Record("/3303/0/5701", "Cel", 1700000000.0)]
    single = b'{"bn":"/3/0/9","e":[{"v":77}]}'
    assert decode(CF.LWM2M_JSON, single, "/3/0/9", REGISTRY) == [Record("/3/0/9", 77)]
    # ObjLink and Opaque (base64 in "sv") are typed from the model
    links = b'{"bn":"/3/0/","e":[{"n":"22/0","ov":"3303:0"}]}'
    assert decode(CF.LWM2M_JSON, links, "/3/0", REGISTRY) == [
        Record("/3/0/22/0", ObjLink(3303, 0))]
    velocity = b'{"bn":"/6/0/","e":[{"n":"4","sv":"AQID"}]}'
    assert decode(CF.LWM2M_JSON, velocity, "/6/0", REGISTRY) == [Record("/6/0/4", b"\x01\x02\x03")]


def test_legacy_content_format_ids() -> None:
    assert resolve_format(1542) is CF.TLV and resolve_format(1543) is CF.LWM2M_JSON
    assert resolve_format(1541) is CF.TEXT and resolve_format(1544) is CF.OPAQUE
    assert decode(1542, SPEC_TLV, "/3/0", REGISTRY) == DEVICE


# -- every type through every format ------------------------------------------------------------

TEST_OBJECT = ObjectDef(40000, "Test", True, (
    ResourceDef(0, "string", T.STRING), ResourceDef(1, "integer", T.INTEGER),
    ResourceDef(2, "unsigned", T.UNSIGNED_INTEGER), ResourceDef(3, "float", T.FLOAT),
    ResourceDef(4, "boolean", T.BOOLEAN), ResourceDef(5, "opaque", T.OPAQUE),
    ResourceDef(6, "time", T.TIME), ResourceDef(7, "objlnk", T.OBJLNK),
    ResourceDef(8, "corelnk", T.CORELNK), ResourceDef(9, "integers", T.INTEGER, True),
    ResourceDef(10, "strings", T.STRING, True), ResourceDef(11, "execute", T.NONE),
))
TYPED = REGISTRY.with_objects(TEST_OBJECT)

VALUES: list[tuple[int, Value]] = [
    (0, ""), (0, "h\u00e9llo \u2713"), (0, 'a,b;c"d\\'),
    (1, 0), (1, -1), (1, 127), (1, 128), (1, -129), (1, 2**31), (1, -(2**63)), (1, 2**63 - 1),
    (2, 0), (2, 255), (2, 2**64 - 1),
    (3, 0.0), (3, 21.5), (3, -1.25), (3, 0.1), (3, 1e300), (3, -3.4e38),
    (4, True), (4, False),
    (5, b""), (5, b"\x00\xff"), (5, bytes(range(256))),
    (6, 0), (6, 1367491215), (6, -1),
    (7, ObjLink(3, 0)), (7, ObjLink(65535, 65535)),
    (8, "</3/0>;ver=1.1,</3303/0>"),
]
SINGLE_VALUE_FORMATS = [CF.TEXT, CF.CBOR]
ALL_FORMATS = [CF.TLV, CF.SENML_JSON, CF.SENML_CBOR, CF.LWM2M_JSON, *SINGLE_VALUE_FORMATS]


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize(("rid", "value"), VALUES, ids=lambda v: repr(v)[:20])
def test_round_trip_every_type(fmt: ContentFormat, rid: int, value: Value) -> None:
    path = f"/40000/1/{rid}"
    record = Record(path, value)
    payload = encode(fmt, [record], path, TYPED)
    decoded = decode(fmt, payload, path, TYPED)
    assert decoded == [record]
    assert type(decoded[0].value) is type(value)


@pytest.mark.parametrize("fmt", [CF.TLV, CF.SENML_JSON, CF.SENML_CBOR, CF.LWM2M_JSON],
                         ids=lambda f: f.name)
def test_round_trip_instance_with_multiple_resources(fmt: ContentFormat) -> None:
    records = [Record(f"/40000/7/{rid}", value) for rid, value in dict(VALUES).items()]
    records += [Record("/40000/7/9/0", -5), Record("/40000/7/9/300", 70000),
                Record("/40000/7/10/2", "x" * 300)]
    records.sort(key=lambda r: parse_path(r.path))
    for base in ("/40000/7", "/40000", "/"):
        if fmt is CF.TLV and base == "/":
            continue
        assert decode(fmt, encode(fmt, records, base, TYPED), base, TYPED) == records


@pytest.mark.parametrize("fmt", [CF.SENML_JSON, CF.SENML_CBOR, CF.LWM2M_JSON],
                         ids=lambda f: f.name)
def test_round_trip_timestamps(fmt: ContentFormat) -> None:
    records = [Record("/3303/0/5700", 21.5, 1700000000.0),
               Record("/3303/0/5700", 22.0, 1700000060.25), Record("/3303/0/5701", "Cel")]
    assert decode(fmt, encode(fmt, records, "/3303/0", REGISTRY), "/3303/0", REGISTRY) == records


def test_opaque_format() -> None:
    assert encode(CF.OPAQUE, [Record("/5/0/0", b"\x00fw")], "/5/0/0", REGISTRY) == b"\x00fw"
    assert decode(CF.OPAQUE, b"\x00fw", "/5/0/0", REGISTRY) == [Record("/5/0/0", b"\x00fw")]
    assert decode(CF.OPAQUE, b"\x01", "/40000/0/1", REGISTRY) == [Record("/40000/0/1", b"\x01")]
    with pytest.raises(FormatError, match="opaque payload for a INTEGER"):
        decode(CF.OPAQUE, b"\x01", "/3/0/9", REGISTRY)
    with pytest.raises(FormatError, match="opaque needs bytes"):
        encode(CF.OPAQUE, [Record("/3/0/9", 1)], "/3/0/9", REGISTRY)


def test_text_format_details() -> None:
    def text(path: str, payload: bytes) -> Value:
        return decode(CF.TEXT, payload, path, TYPED)[0].value

    assert text("/3/0/9", b"+77") == 77
    assert text("/3/0/13", b"1367491215") == 1367491215
    assert text("/6/0/0", b"52.5") == 52.5 and text("/6/0/0", b"-1e3") == -1000.0
    assert text("/6/0/0", b".5") == 0.5
    assert text("/3311/0/5850", b"1") is True and text("/3311/0/5850", b"false") is False
    assert text("/5/0/0", b"AQID") == b"\x01\x02\x03"
    assert text("/3/0/22/0", b"3303:1") == ObjLink(3303, 1)
    assert text("/40000/0/99", b"anything") == "anything"  # unknown: stays text
    with pytest.raises(FormatError, match="out of range for a Float"):
        text("/6/0/0", b"1e999")
    with pytest.raises(FormatError, match="not a boolean"):
        text("/3311/0/5850", b"yes")
    assert encode(CF.TEXT, [Record("/3311/0/5850", True)], "/3311/0/5850", REGISTRY) == b"1"
    assert encode(CF.TEXT, [Record("/6/0/0", 52)], "/6/0/0", REGISTRY) == b"52.0"
    assert encode(CF.TEXT, [Record("/0/0/5", b"KeyPass123")], "/0/0/5",
                  REGISTRY) == b"S2V5UGFzczEyMw=="


def test_cbor_single_value_details() -> None:
    assert encode(CF.CBOR, [Record("/3/0/13", 1367491215)], "/3/0/13",
                  REGISTRY).hex() == "c11a5182428f"  # Time: tag 1
    assert decode(CF.CBOR, bytes.fromhex("1a5182428f"), "/3/0/13", REGISTRY) == [
        Record("/3/0/13", 1367491215)]
    rfc3339 = cbor.dumps(cbor.Tag(0, "2013-05-02T10:40:15Z"))
    assert decode(CF.CBOR, rfc3339, "/3/0/13", REGISTRY)[0].value == 1367491215
    tagged_unknown = cbor.dumps(cbor.Tag(1, 1367491215.5))
    assert decode(CF.CBOR, tagged_unknown, "/40000/0/99", REGISTRY)[0].value == 1367491215
    assert decode(CF.CBOR, cbor.dumps("3:0"), "/3/0/22/0", REGISTRY)[0].value == ObjLink(3, 0)
    assert decode(CF.CBOR, cbor.dumps(21), "/3303/0/5700", REGISTRY)[0].value == 21.0
    assert encode(CF.CBOR, [Record("/3303/0/5700", 21.5)], "/3303/0/5700",
                  REGISTRY).hex() == "f94d60"


def test_tlv_encoding_details() -> None:
    def tlv(path: str, value: Value) -> str:
        return encode(CF.TLV, [Record(path, value)], path, TYPED).hex().upper()

    assert tlv("/3/0/9", 127) == "C1097F"
    assert tlv("/3/0/9", 128) == "C2090080"
    assert tlv("/3/0/9", -129) == "C209FF7F"
    assert tlv("/3/0/9", 2**31) == "C8090800000000" "80000000"
    assert tlv("/40000/0/2", 255) == "C102FF"              # unsigned: 1 byte
    assert tlv("/3303/0/5700", 21.5) == "E416444" "1AC0000"  # 16-bit id, float32
    assert tlv("/3303/0/5700", 0.1) == "E816440" "83FB999999999999A"  # float64
    assert tlv("/3311/0/5850", True) == "E116DA01"
    assert tlv("/3/0/22/0", ObjLink(7, 3)) == "440000070003"
    assert tlv("/40000/0/5", b"x" * 300)[:8] == "D005012C"     # 16-bit length
    assert tlv("/40000/0/5", b"x" * 70000)[:10] == "D805011170"  # 24-bit length
    assert decode(CF.TLV, bytes.fromhex("E416441" "1AC0000"), "/3303/0/5700",
                  REGISTRY) == [Record("/3303/0/5700", float(struct.unpack(">f", bytes.fromhex(
                      "11AC0000"))[0]))]


def test_tlv_unknown_resources_decode_to_bytes() -> None:
    # no type on the wire: an unknown resource keeps its raw value bytes
    payload = bytes.fromhex("C1056404" "C200" "0102" "8601" "4100" "07" "410108")
    assert decode(CF.TLV, payload[:3], "/40001/0", REGISTRY) == [Record("/40001/0/5", b"\x64")]
    records = decode(CF.TLV, bytes.fromhex("C20001028601410007410108"), "/40001/0", REGISTRY)
    assert records == [Record("/40001/0/0", b"\x01\x02"), Record("/40001/0/1/0", b"\x07"),
                       Record("/40001/0/1/1", b"\x08")]
    assert to_json(records) == {"/40001/0/0": "AQI=", "/40001/0/1/0": "Bw==",
                                "/40001/0/1/1": "CA=="}
    # ... while an unknown object's IPSO resources are typed
    assert decode(CF.TLV, bytes.fromhex("E416444" "1AC0000"), "/3304/0",
                  REGISTRY) == [Record("/3304/0/5700", 21.5)]


def test_typing_from_the_model() -> None:
    def senml(doc: list[dict[str, Any]]) -> list[Record]:
        return decode(CF.SENML_JSON, json.dumps(doc).encode(), "/", REGISTRY)

    assert senml([{"n": "/6/0/0", "v": 52}])[0].value == 52.0      # Float from an integer
    assert senml([{"n": "/3/0/9", "v": 77.0}])[0].value == 77      # Integer from 77.0
    assert senml([{"n": "/3/0/13", "v": 1.7e9}])[0].value == 1700000000  # Time
    assert senml([{"n": "/40000/0/1", "v": 77.0}])[0].value == 77.0  # unknown: as sent
    assert senml([{"n": "/40000/0/1", "vd": "AQID"}])[0].value == b"\x01\x02\x03"
    assert senml([{"n": "/40000/0/1", "vlo": "3:0"}])[0].value == ObjLink(3, 0)
    assert senml([{"n": "/40000/0/1", "vb": False}])[0].value is False
    # vd in base64url without padding (RFC 8428) and standard base64 with padding
    assert senml([{"n": "/5/0/0", "vd": "-_8"}])[0].value == b"\xfb\xff"
    assert senml([{"n": "/5/0/0", "vd": "+/8="}])[0].value == b"\xfb\xff"
    out = encode(CF.SENML_JSON, [Record("/5/0/0", b"\xfb\xff")], "/5/0/0", REGISTRY)
    assert out == b'[{"bn":"/5/0/","n":"0","vd":"-_8"}]'


@pytest.mark.parametrize(("doc", "message"), [
    ([{"n": "/3/0/9", "v": 1.5}], "is not a valid INTEGER"),
    ([{"n": "/3/0/0", "v": 1}], "is not a valid STRING"),
    ([{"n": "/6/0/0", "vs": "52.5"}], "is not a valid FLOAT"),
    ([{"n": "/5/0/0", "vs": "AQID"}], "is not a valid OPAQUE"),
    ([{"n": "/3311/0/5850", "v": 1}], "is not a valid BOOLEAN"),
    ([{"n": "/3/0/9", "v": 2**63}], "out of range for INTEGER"),
    ([{"n": "/40000/0/1", "v": 2**64}], "does not fit in 64 bits"),
    ([{"v": 1}], "no name"),
    ([{"bn": "/3/0/9"}], "no value"),
    ([{"n": "/3/0/9", "v": 1, "vs": "1"}], "several values"),
    ([{"n": "/3/0", "v": 1}], "not a resource"),
    ([{"n": "3/0/9", "v": 1}], "not an LwM2M path"),
    ([{"n": "/3/0/9/1/2", "v": 1}], "deeper"),
    ([{"n": "/3/0/70000", "v": 1}], "not an LwM2M path"),
    ([{"n": 9, "v": 1}], "name is a int"),
    ([{"bn": 3, "n": "/3/0/9", "v": 1}], "bn is a int"),
    ([{"n": "/3/0/9", "v": "1"}], "expected a number"),
    ([{"n": "/3/0/9", "v": True}], "expected a number"),
    ([{"n": "/3311/0/5850", "vb": 1}], "not a boolean"),
    ([{"n": "/5/0/0", "vd": "!!"}], "not base64"),
    ([{"n": "/5/0/0", "vd": "A"}], "truncated base64"),
    ([{"n": "/3/0/22/0", "vlo": "3-0"}], "not an object link"),
    ([{"n": "/3/0/22/0", "vlo": "70000:0"}], "out of range"),
    ([{"n": "/3/0/9", "v": 1, "t": "now"}], "expected a number"),
    ([{"n": "/3/0/9", "v": 1, "x_": 1}], "unsupported field 'x_'"),
    ([{"n": "/3/0/9", "bv": 1, "v": 1}], "unsupported field 'bv'"),
    (["/3/0/9"], "not a map"),
    ({"n": "/3/0/9", "v": 1}, "expected an array"),
])
def test_senml_errors(doc: Any, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        decode(CF.SENML_JSON, json.dumps(doc).encode(), "/", REGISTRY)
    if doc and isinstance(doc, list) and isinstance(doc[0], dict):
        labels = {"bn": -2, "bt": -3, "n": 0, "v": 2, "vs": 3, "vb": 4, "vd": 8, "t": 6}
        binary = [{labels.get(k, k): v for k, v in item.items()} for item in doc]
        try:
            payload = cbor.dumps(binary)
        except cbor.CborError:  # 2**64 does not fit CBOR either
            return
        with pytest.raises(FormatError):
            decode(CF.SENML_CBOR, payload, "/", REGISTRY)


@pytest.mark.parametrize(("fmt", "payload", "message"), [
    (CF.SENML_JSON, b"[{\"n\":\"/3/0/9\",\"v\":NaN}]", "not valid JSON"),
    (CF.SENML_JSON, b'[{"n":"/6/0/0","v":1e999}]', "inf is not a finite number"),
    (CF.LWM2M_JSON, b'{"e":[{"n":"0","v":-1e999}]}', "-inf is not a finite number"),
    (CF.SENML_JSON, b"[" * 100000, "not valid JSON"),
    (CF.SENML_JSON, b"\xff", "not valid JSON"),
    (CF.SENML_CBOR, bytes.fromhex("81a2006139020100"), "trailing"),
    (CF.SENML_CBOR, bytes.fromhex("81a200667e332f302f390264"), "truncated"),
    (CF.SENML_CBOR, cbor.dumps([{0: "/5/0/0", 8: "AQID"}]), "vd is a str, not bytes"),
    (CF.SENML_CBOR, cbor.dumps([{0: "/3/0/9", 2: "x"}]), "expected a number"),
    (CF.SENML_CBOR, cbor.dumps([{0: "/3/0/0", 3: b"x"}]), "vs is a bytes"),
    (CF.LWM2M_JSON, b'[{"n":"9","v":1}]', 'expected an object with an "e" array'),
    (CF.LWM2M_JSON, b'{"bn":"/3/0/","e":[{"n":"9"}]}', "no value"),
    (CF.LWM2M_JSON, b'{"bn":"/3/0/","e":[{"n":"9","v":1,"sv":"1"}]}', "several values"),
    (CF.LWM2M_JSON, b'{"bn":7,"e":[]}', "bn is a int"),
    (CF.LWM2M_JSON, b'{"bn":"/3/0/","e":[{"n":"22/0","ov":"x"}]}', "not an object link"),
    (CF.TEXT, b"12a", "not an integer"),
    (CF.TEXT, b"1e999", "not an integer"),
    (CF.TEXT, b"-", "not an integer"),
    (CF.TEXT, b"\xff", "not UTF-8"),
    (CF.CBOR, b"\xf6", "not a single value"),
    (CF.CBOR, b"\x80", "not a single value"),
    (CF.CBOR, cbor.dumps(cbor.Tag(37, b"x")), "unsupported CBOR tag 37"),
    (CF.CBOR, cbor.dumps(cbor.Tag(0, "yesterday")), "not an RFC 3339 time"),
    (CF.CBOR, cbor.dumps("100"), "is not a valid INTEGER"),
])
def test_payload_errors(fmt: ContentFormat, payload: bytes, message: str) -> None:
    path = "/3/0/9" if fmt in (CF.TEXT, CF.CBOR) else "/3/0"
    with pytest.raises(FormatError, match=message):
        decode(fmt, payload, path, REGISTRY)


@pytest.mark.parametrize(("payload", "path", "message"), [
    ("C80015" + "41" * 20, "/3/0", "length 21 exceeds the 20 bytes left"),
    ("C8", "/3/0", "truncated header"),
    ("E816", "/3/0", "truncated header"),
    ("080003080000", "/3", "object instance cannot be inside a object instance"),
    ("8307C10764", "/3/0", "resource cannot be inside a multiple resource"),
    ("410064", "/3/0", "resource instance 0 does not fit the path /3/0"),
    ("C10A64", "/3/0/9", "resource 10 does not fit the path /3/0/9"),
    ("080100", "/3/0", "object instance 1 does not fit"),
    ("C3090000 64", "/3/0", "3-byte integer"),
    ("C300000000", "/6/0", "3-byte float"),
    ("E116DA02", "/3311/0", "boolean must be one byte 0 or 1"),
    ("C200FFFE", "/3/0", "not UTF-8"),
    ("C3160000 00", "/3/0", "3-byte object link"),
    ("C10964", "/", "TLV needs a request path"),
])
def test_tlv_errors(payload: str, path: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        decode(CF.TLV, bytes.fromhex(payload), path, REGISTRY)


def test_content_format_and_path_errors() -> None:
    with pytest.raises(FormatError, match="unsupported content format 50"):
        decode(50, b"{}", "/3/0", REGISTRY)
    with pytest.raises(FormatError, match="use parse_links"):
        decode(CF.LINK_FORMAT, b"</1/0>", "/", REGISTRY)
    with pytest.raises(FormatError, match="use format_links"):
        encode(CF.LINK_FORMAT, [], "/", REGISTRY)
    with pytest.raises(FormatError, match="single value: /3/0 is not a resource"):
        decode(CF.TEXT, b"1", "/3/0", REGISTRY)
    with pytest.raises(FormatError, match="not an LwM2M path"):
        decode(CF.TLV, b"", "3/0", REGISTRY)
    assert parse_path("/") == () and parse_path("/3/0/") == (3, 0) and format_path(()) == "/"


@pytest.mark.parametrize(("fmt", "records", "base", "message"), [
    (CF.TLV, [Record("/3/0/7", 1)], "/3/0", "resource 7 is multiple-instance"),
    (CF.TLV, [Record("/3/0/9/0", 1)], "/3/0", "resource 9 is single-instance"),
    (CF.TLV, [Record("/3/0/9", 1), Record("/3/0/9", 2)], "/3/0", "duplicate"),
    (CF.TLV, [Record("/3/1/9", 1)], "/3/0", "not under the request path"),
    (CF.SENML_JSON, [Record("/4/0/2", 1)], "/3/0", "not under the request path"),
    (CF.TLV, [Record("/3/0/9", "x")], "/3/0", "a str is not a valid INTEGER"),
    (CF.TLV, [Record("/3/0/9", 2**63)], "/3/0", "out of range for INTEGER"),
    (CF.TLV, [Record("/3/0/0", "\ud800")], "/3/0", "not encodable as UTF-8"),
    (CF.TLV, [Record("/3/0", "x")], "/3", "not a resource or resource instance path"),
    (CF.TLV, [Record("/40001/0/1", [1])],  # type: ignore[arg-type]
     "/40001/0", "a list is not an LwM2M value"),
    (CF.TLV, [Record("/40000/0/1", [1])],  # type: ignore[arg-type]
     "/40000/0", "a list is not a valid INTEGER"),
    (CF.TLV, [("/3/0/9", 1)], "/3/0", "not a Record"),
    (CF.SENML_JSON, [Record("/6/0/0", math.nan)], "/6/0", "cannot be sent in SenML JSON"),
    (CF.LWM2M_JSON, [Record("/6/0/0", math.inf)], "/6/0", "cannot be sent in LwM2M JSON"),
    (CF.SENML_JSON, [Record("/6/0/0", 1.0, math.nan)], "/6/0", "time nan is not finite"),
    (CF.SENML_CBOR, [Record("/3/0/0", "\ud800")], "/3/0", "not encodable as UTF-8"),
    (CF.TEXT, [Record("/6/0/0", math.inf)], "/6/0/0", "no text representation"),
    (CF.TEXT, [Record("/3/0/9", 1), Record("/3/0/10", 1)], "/3/0/9", "exactly one value"),
    (CF.CBOR, [Record("/3/0/10", 1)], "/3/0/9", "not the request path"),
])
def test_encode_errors(fmt: ContentFormat, records: list[Any], base: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        encode(fmt, records, base, TYPED)


def test_unknown_resources_encode_by_python_type() -> None:
    records = [Record("/40001/0/0", "s"), Record("/40001/0/1", -2), Record("/40001/0/2", 2.5),
               Record("/40001/0/3", True), Record("/40001/0/4", b"\x01"),
               Record("/40001/0/5", ObjLink(1, 2)), Record("/40001/0/6", 2**64 - 1)]
    assert encode(CF.TLV, records, "/40001/0", REGISTRY).hex().upper() == (
        "C10073" "C101FE" "C402" "40200000" "C10301" "C10401" "C40500010002"
        "C80608" "FFFFFFFFFFFFFFFF")
    assert decode(CF.SENML_CBOR, encode(CF.SENML_CBOR, records, "/", REGISTRY), "/",
                  REGISTRY) == records
    # executable resources have no value type: values keep their own
    assert encode(CF.TEXT, [Record("/3/0/4", "x")], "/3/0/4", REGISTRY) == b"x"


# -- link-format --------------------------------------------------------------------------------

WAKAAMA_10 = '</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>,</4/0>,</5/0>,</6/0>'
WAKAAMA_11 = ('</>;rt="oma.lwm2m";ct=110,</1>;ver=1.1,</1/0>,</2/0>,</3/0>,</4/0>,</5/0>,'
              '</6/0>,</7/0>,</31024>;ver=1.0,</31024/10>,</31024/11>,</31024/12>')
ZEPHYR = ('</>;ct=110,</1>;ver=1.1,</1/0>,</3>;ver=1.1,</3/0>,</4/0>,</5/0>,</6/0>,'
          '</3303>;ver=1.1,</3303/0>,</3311/0>,</3338/0>,</3347/0>,</3347/1>')
LESHAN_DEMO = ('</>;rt="oma.lwm2m";ct="60 110 112 11542 11543",</1>;ver=1.1,</1/0>,</3>;'
               'ver=1.1,</3/0>,</6/0>,</3303>;ver=1.1,</3303/0>')


def test_parse_registration_payloads() -> None:
    links = parse_links(WAKAAMA_10.encode())
    assert links[0] == Link("/", {"rt": "oma.lwm2m", "ct": "11543"})
    assert [link.path for link in links[1:]] == ["/1/0", "/3/0", "/4/0", "/5/0", "/6/0"]
    assert [link.ids() for link in links] == [(), (1, 0), (3, 0), (4, 0), (5, 0), (6, 0)]

    links = parse_links(WAKAAMA_11)
    assert links[1] == Link("/1", {"ver": "1.1"}) and links[2] == Link("/1/0", {})
    assert links[9] == Link("/31024", {"ver": "1.0"})
    assert links[-1].ids() == (31024, 12)

    zephyr = parse_links(ZEPHYR)
    assert zephyr[0].attributes == {"ct": "110"}
    assert [link.ids() for link in zephyr if link.attributes.get("ver")] == [
        (1,), (3,), (3303,)]

    leshan = parse_links(LESHAN_DEMO)
    ct = leshan[0].attributes["ct"]
    assert ct is not None and ct.split() == ["60", "110", "112", "11542", "11543"]
    assert leshan[-1] == Link("/3303/0", {})


def test_parse_links_details() -> None:
    alt = parse_links('</lwm2m>;rt="oma.lwm2m",</lwm2m/1/0>,</lwm2m/3/0>,</other/1>')
    assert [link.ids("/lwm2m") for link in alt] == [(), (1, 0), (3, 0), None]
    assert Link("/3/x").ids() is None and Link("/lwm2m/").ids("/lwm2m/") == ()
    discover = parse_links('</3/0>;pmin=10;pmax=60,</3/0/1>,</3/0/7>;dim=2,'
                           '</3/0/9>;obs;title="a \\"quoted\\", ;value"')
    assert discover[0].attributes == {"pmin": "10", "pmax": "60"}
    assert discover[2].attributes == {"dim": "2"}
    assert discover[3].attributes == {"obs": None, "title": 'a "quoted", ;value'}
    spaced = parse_links(' </1/0> ;ver=1.1 ,\n </3/0>, ')
    assert spaced == [Link("/1/0", {"ver": "1.1"}), Link("/3/0", {})]
    assert parse_links("") == [] and parse_links(b"  ") == []
    assert parse_links("</1>;a=1;a=2")[0].attributes == {"a": "1"}  # first wins (RFC 8288)


@pytest.mark.parametrize(("text", "message"), [
    ("1/0", "expected '<' at offset 0"),
    ("</1/0", "unterminated '<'"),
    ("</1>;", "expected a parameter name"),
    ("</1>;=1", "expected a parameter name"),
    ("</1>;ct=", "expected a value"),
    ('</1>;rt="oma', "unterminated quoted string"),
    ("</1> </2>", "expected ',' or ';'"),
    ("< >", "bad character in the target"),
    ("<</1>", "bad character in the target"),
    (b"</\xff>", "not UTF-8"),
])
def test_parse_links_errors(text: str | bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_links(text)


def test_format_links() -> None:
    root = Link("/", {"rt": "oma.lwm2m", "ct": "11543"})
    assert format_links([root, Link("/1/0"), Link("/3/0", {"ver": "1.1"})]) == (
        '</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>;ver=1.1')
    discover = [Link("/3/0", {"pmin": "10"}), Link("/3/0/7", {"dim": "2"}),
                Link("/3/0/9", {"obs": None, "title": 'x"y'}), Link("/", {"ct": "60 110"})]
    text = format_links(discover)
    assert text == ('</3/0>;pmin=10,</3/0/7>;dim=2,</3/0/9>;obs;title="x\\"y",'
                    '</>;ct="60 110"')
    assert parse_links(text) == discover
    for parsed in (WAKAAMA_10, WAKAAMA_11, ZEPHYR, LESHAN_DEMO):
        assert format_links(parse_links(parsed)) == parsed
    with pytest.raises(FormatError, match="cannot write the target"):
        format_links([Link("/a>b")])
    with pytest.raises(FormatError, match="bad parameter name"):
        format_links([Link("/1", {"a b": "1"})])


# -- telemetry JSON -----------------------------------------------------------------------------


def test_to_json_shapes() -> None:
    records = [Record("/3/0/9", 77), Record("/3/0/7/0", 3800), Record("/3/0/7/1", 5000),
               Record("/3311/0/5850", False), Record("/6/0/0", 52.52),
               Record("/0/0/3", b"8988"), Record("/3/0/22/0", ObjLink(3303, 0)),
               Record("/3/0/13", 1700000000), Record("/6/0/2", math.nan)]
    assert to_json(records) == {
        "/3/0/9": 77, "/3/0/7/0": 3800, "/3/0/7/1": 5000, "/3311/0/5850": False,
        "/6/0/0": 52.52, "/0/0/3": "ODk4OA==", "/3/0/22/0": "3303:0", "/3/0/13": 1700000000,
        "/6/0/2": None}
    assert json.loads(json.dumps(to_json(records), allow_nan=False))  # strict JSON
    assert to_json([]) == {}
    assert json_value(math.inf) is None and json_value(b"") == ""
    # the 1NCE Action API read result example
    assert to_json(decode(CF.TEXT, b"0", "/3311/0/5850", REGISTRY)) == {"/3311/0/5850": False}


def test_to_json_timestamps() -> None:
    records = [Record("/3303/0/5700", 21.5, 1700000000.0),
               Record("/3303/0/5701", "Cel", 1700000000.0)]
    assert to_json(records) == {"/3303/0/5700": 21.5, "/3303/0/5701": "Cel",
                                "_time": 1700000000}
    series = [Record("/3303/0/5700", 22.0, 1700000060.5),
              Record("/3303/0/5700", 21.5, 1700000000.0), Record("/3303/0/5701", "Cel")]
    # newest value per path; "_time" the newest time among the values kept
    assert to_json(series) == {"/3303/0/5700": 22.0, "/3303/0/5701": "Cel",
                               "_time": 1700000060.5}
    # an untimed (current) value wins over timed ones of the same path
    assert to_json([Record("/3/0/9", 1, 1700000000.0), Record("/3/0/9", 2)]) == {"/3/0/9": 2}
    groups = split_by_time(series)
    assert [[r.time for r in g] for g in groups] == [[1700000000.0], [1700000060.5], [None]]
    assert [to_json(g) for g in groups] == [
        {"/3303/0/5700": 21.5, "_time": 1700000000},
        {"/3303/0/5700": 22.0, "_time": 1700000060.5},
        {"/3303/0/5701": "Cel"}]


def test_from_json() -> None:
    data = {"/3311/0/5850": True, "/3311/0/5706": "0xFF0000", "/3/0/13": "1700000000",
            "/6/0/0": 52, "/0/0/5": "S2V5UGFzczEyMw==", "/3/0/22/0": "3:0",
            "/3338/0/5850": "true", "/40000/0/1": 1.5, "/1/0/1": 86400.0}
    assert from_json(data, REGISTRY) == [
        Record("/3311/0/5850", True), Record("/3311/0/5706", "0xFF0000"),
        Record("/3/0/13", 1700000000), Record("/6/0/0", 52.0),
        Record("/0/0/5", b"KeyPass123"), Record("/3/0/22/0", ObjLink(3, 0)),
        Record("/3338/0/5850", True), Record("/40000/0/1", 1.5), Record("/1/0/1", 86400)]
    timed = from_json({"/3/0/9": 5, "_time": 1700000000}, REGISTRY)
    assert timed == [Record("/3/0/9", 5, 1700000000.0)]
    records = [Record("/3/0/9", 77), Record("/3/0/7/1", 5000), Record("/0/0/3", b"8988"),
               Record("/3/0/22/0", ObjLink(3303, 0))]
    assert from_json(to_json(records), REGISTRY) == records
    for bad, message in (({"/3/0/9": None}, "NoneType is not an LwM2M value"),
                         ({"/3/0/9": [1]}, "list is not an LwM2M value"),
                         ({"/3/0/9": "many"}, "not an integer"),
                         ({"/3/0": 1}, "not a resource"),
                         ({"/3/0/9": 1, "_time": "x"}, "expected a number")):
        with pytest.raises(FormatError, match=message):
            from_json(bad, REGISTRY)
    with pytest.raises(FormatError, match="expected an object"):
        from_json([], REGISTRY)  # type: ignore[arg-type]


# -- properties -----------------------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
_TEXT_LONG = st.one_of(_TEXT, st.text(st.characters(codec="utf-8"),
                                      min_size=250, max_size=300))
_BY_TYPE: dict[ResourceType, st.SearchStrategy[Any]] = {
    T.STRING: _TEXT_LONG, T.CORELNK: _TEXT,
    T.INTEGER: st.integers(-(2**63), 2**63 - 1), T.TIME: st.integers(-(2**63), 2**63 - 1),
    T.UNSIGNED_INTEGER: st.integers(0, 2**64 - 1),
    T.FLOAT: st.floats(allow_nan=False), T.BOOLEAN: st.booleans(),
    T.OPAQUE: st.binary(max_size=300),
    T.OBJLNK: st.builds(ObjLink, st.integers(0, 65535), st.integers(0, 65535)),
}


@st.composite
def typed_object(draw: st.DrawFn) -> tuple[Registry, list[Record], str]:
    """A random object model (40001) and records of one or two of its instances."""
    rids = draw(st.lists(st.integers(0, 2047) | st.integers(0, 300), min_size=1, max_size=6,
                         unique=True))
    defs = tuple(ResourceDef(rid, f"r{rid}", draw(st.sampled_from(list(_BY_TYPE))),
                             draw(st.booleans())) for rid in rids)
    registry = REGISTRY.with_objects(ObjectDef(40001, "Random", True, defs))
    instances = draw(st.lists(st.integers(0, 65534), min_size=1, max_size=2, unique=True))
    records: list[Record] = []
    for inst in sorted(instances):
        for res in sorted(defs, key=lambda r: r.id):
            values = _BY_TYPE[res.type]
            if res.multiple:
                ris = draw(st.lists(st.integers(0, 65535), max_size=3, unique=True))
                records += [Record(f"/40001/{inst}/{res.id}/{ri}", draw(values))
                            for ri in sorted(ris)]
            else:
                records.append(Record(f"/40001/{inst}/{res.id}", draw(values)))
    base = "/40001" if len(instances) > 1 else draw(st.sampled_from(
        ["/40001", f"/40001/{instances[0]}"]))
    return registry, records, base


@SETTINGS
@given(typed_object())
def test_tlv_round_trip(case: tuple[Registry, list[Record], str]) -> None:
    registry, records, base = case
    assert decode(CF.TLV, encode(CF.TLV, records, base, registry), base, registry) == records


@SETTINGS
@given(typed_object(), st.sampled_from([CF.SENML_JSON, CF.SENML_CBOR, CF.LWM2M_JSON]))
def test_typed_round_trip_json_cbor(case: tuple[Registry, list[Record], str],
                                    fmt: ContentFormat) -> None:
    registry, records, base = case
    if fmt is not CF.SENML_CBOR and any(
            isinstance(r.value, float) and not math.isfinite(r.value) for r in records):
        return
    assert decode(fmt, encode(fmt, records, base, registry), base, registry) == records


_NATURAL = st.one_of(_TEXT, st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
                     st.booleans(), st.binary(max_size=20),
                     st.builds(ObjLink, st.integers(0, 65535), st.integers(0, 65535)))
_UNKNOWN_PATHS = st.builds(
    lambda o, i, r, ri: format_path((o, i, r) if ri is None else (o, i, r, ri)),
    st.integers(40002, 40010), st.integers(0, 3), st.integers(0, 2047),
    st.none() | st.integers(0, 3))
_TIMES = st.none() | st.floats(2.0**28, 2.0**33) | st.integers(2**28, 2**33).map(float)


@SETTINGS
@given(st.lists(st.builds(Record, _UNKNOWN_PATHS, _NATURAL, _TIMES), max_size=8),
       st.sampled_from([CF.SENML_JSON, CF.SENML_CBOR, CF.LWM2M_JSON]))
def test_untyped_round_trip_senml(records: list[Record], fmt: ContentFormat) -> None:
    """SenML carries its own types: unknown resources round-trip with theirs (OMA-JSON has no
    opaque type of its own, bytes come back as the base64 string)."""
    if fmt is not CF.SENML_CBOR and any(
            isinstance(r.value, float) and not math.isfinite(r.value) for r in records):
        return
    decoded = decode(fmt, encode(fmt, records, "/", REGISTRY), "/", REGISTRY, now=NOW)
    if fmt is CF.LWM2M_JSON:
        records = [Record(r.path, json_value(r.value), r.time) if isinstance(r.value, bytes)
                   else r for r in records]
    assert decoded == records


_BASES = st.sampled_from(["/", "/3", "/3/0", "/3/0/7", "/3/0/7/1", "/3/0/9", "/6/0/0",
                          "/3311/0/5850", "/40000/0/5", "/40000/0/9/1", "/5/0/0"])


def _decode_only_format_errors(fmt: int, payload: bytes, base: str) -> None:
    try:
        records = decode(fmt, payload, base, TYPED, now=NOW)
    except FormatError:
        return
    for record in records:
        parse_path(record.path)
    json.dumps(to_json(records), allow_nan=False)


@SETTINGS
@given(st.sampled_from([*CF, 1542, 50]), st.binary(max_size=120), _BASES)
def test_random_bytes_raise_only_format_error(fmt: int, payload: bytes, base: str) -> None:
    _decode_only_format_errors(fmt, payload, base)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([0x08, 0x28, 0x41, 0x48, 0x61, 0x86, 0x88, 0xA8,
                                           0xC1, 0xC2, 0xC4, 0xC8, 0xE1, 0xE8, 0x00, 0xC0]),
                          st.binary(min_size=0, max_size=6)), max_size=8).map(
           lambda parts: b"".join(bytes((t,)) + rest for t, rest in parts)), _BASES)
def test_tlv_shaped_bytes_raise_only_format_error(payload: bytes, base: str) -> None:
    _decode_only_format_errors(CF.TLV, payload, base)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["/3/0/9", "/3/0/", "9", "7/1", "3:0", "AQID", "/6/0/0", ""]),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(
        st.sampled_from(["bn", "bt", "n", "v", "vs", "vb", "vd", "vlo", "t", "e", "sv", "bv",
                         "ov", "x_", "u"]), c, max_size=5), max_leaves=20)


@SETTINGS
@given(_JSON, _BASES)
def test_random_json_raises_only_format_error(doc: Any, base: str) -> None:
    for fmt in (CF.SENML_JSON, CF.LWM2M_JSON):
        _decode_only_format_errors(fmt, json.dumps(doc).encode(), base)
    labels = {"bn": -2, "bt": -3, "n": 0, "v": 2, "vs": 3, "vb": 4, "vd": 8, "t": 6}

    def relabel(node: Any) -> Any:
        if isinstance(node, dict):
            return {labels.get(k, k): relabel(v) for k, v in node.items()}
        if isinstance(node, list):
            return [relabel(v) for v in node]
        return node

    try:
        payload = cbor.dumps(relabel(doc))
    except cbor.CborError:
        return
    for fmt in (CF.SENML_CBOR, CF.CBOR):
        _decode_only_format_errors(fmt, payload, base)


@SETTINGS
@given(st.text(alphabet='</>;,="\\ abc019.', max_size=40))
def test_random_link_format_raises_only_format_error(text: str) -> None:
    try:
        links = parse_links(text)
    except FormatError:
        return
    assert parse_links(format_links(links)) == links


_LINKS = st.lists(st.builds(
    Link, st.from_regex(r"/[0-9a-z/]{0,12}", fullmatch=True),
    st.dictionaries(st.from_regex(r"[a-z][a-z0-9]{0,4}", fullmatch=True),
                    st.none() | st.text(st.characters(codec="utf-8"),
                                        max_size=8), max_size=3)), max_size=5)


@SETTINGS
@given(_LINKS)
def test_link_format_round_trip(links: list[Link]) -> None:
    assert parse_links(format_links(links)) == links
