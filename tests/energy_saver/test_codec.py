"""BCL codecs: the 1NCE vectors, output formatting, errors, and the encoder."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from energy_saver import bcl
from energy_saver.codec import (
    MAX_PLANS,
    Codec,
    DecodeError,
    EncodeError,
    decode_reference,
    f32_shortest,
    js_number,
)

VECTORS = json.loads(
    (Path(__file__).parents[2].parent / "shared/spec/vectors/bcl.json").read_text())["vectors"]
CASES = [(v["name"], v["template"], c) for v in VECTORS for c in v["cases"]]


def codec(doc: dict[str, Any]) -> Codec:
    return Codec(bcl.parse(doc))


def decode(c: Codec, payload: bytes) -> dict[str, Any]:
    """Decode with the compiled codec, checked against the reference walk."""
    value, position = c.decode(payload)
    assert (value, position) == decode_reference(c.ast, payload)
    return value


def error(c: Codec, payload: bytes) -> str:
    with pytest.raises(DecodeError) as exc:
        c.decode(payload)
    with pytest.raises(DecodeError) as ref:
        decode_reference(c.ast, payload)
    assert str(exc.value) == str(ref.value)
    return str(exc.value)


def roundtrip(doc: dict[str, Any], payload: bytes, values: dict[str, Any],
              switch: list[Any] | None = None) -> None:
    """The one codec check: payload decodes to values, values encode to payload."""
    c = codec(doc)
    assert decode(c, payload) == values
    assert c.encode(values, switch) == payload


@pytest.mark.parametrize(("name", "template", "case"), CASES,
                         ids=[f"{n}-{c['payload']}" for n, _, c in CASES])
def test_1nce_vectors(name: str, template: dict[str, Any], case: dict[str, Any]) -> None:
    c = codec(template)
    payload = bytes.fromhex(case["payload"])
    if "error" in case:
        assert case["error"] in error(c, payload)
    else:
        assert decode(c, payload) == case["expected"]


def test_sdk_demo_exact_json_text_and_encode() -> None:
    (demo,) = [v["template"] for v in VECTORS if v["name"] == "sdk_demo"]
    c = codec(demo)
    value = decode(c, bytes.fromhex("016354322e322e31"))
    assert json.dumps(value, separators=(",", ":")) == (
        '{"data_type":"Energy_Saver","battery_level":99,"signal_strength":84,'
        '"software_version":"2.2.1"}')
    # os_energy_save(buf, 1, 3, {E_INTEGER,99,1}, {E_INTEGER,84,1}, {E_STRING,"2.2.1",5})
    assert c.encode({"battery_level": 99, "signal_strength": 84, "software_version": "2.2.1"}) \
        == bytes.fromhex("016354322e322e31")
    # Zephyr sends 2 garbage bytes more: ignored
    assert decode(c, bytes.fromhex("016354322e322e31aabb")) == value
    # another selector byte: no case, no default -> empty object
    assert decode(c, bytes.fromhex("026354")) == {}


@pytest.mark.parametrize(("bits", "printed"), [
    (0x424BBCF9, 50.934544), (0x40DE981C, 6.956068), (0x3DCCCCCD, 0.1),
    (0x3F800000, 1), (0x80000000, 0), (0x00000001, 1e-45), (0x7F7FFFFF, 3.4028235e38),
    (0x4B189680, 10000000), (0x3EAAAAAB, 0.33333334), (0xC2F6E979, -123.456),
])
def test_float32_prints_in_shortest_round_trip_form(bits: int, printed: float) -> None:
    (x,) = struct.unpack(">f", bits.to_bytes(4, "big"))
    assert js_number(f32_shortest(x)) == printed
    c = codec({"sense": [{"asset": "f", "value": {"byte": 0, "bytelength": 4, "type": "float"}}]})
    out = decode(c, bits.to_bytes(4, "big"))
    assert out == {"f": printed} and type(out["f"]) is type(printed)


def test_float64_non_finite_and_integral_values() -> None:
    doc = {"sense": [{"asset": "d", "value": {"byte": 0, "bytelength": 8, "type": "float"}}]}
    c = codec(doc)
    assert decode(c, bytes.fromhex("73656d6954646574")) == {"d": 7.490929188596135e+247}
    assert json.dumps(decode(c, struct.pack(">d", 26.0))) == '{"d": 26}'
    assert decode(c, struct.pack(">d", float("nan"))) == {"d": None}
    assert decode(c, struct.pack(">d", float("-inf"))) == {"d": None}
    assert decode(c, struct.pack(">d", 1e21)) == {"d": 1e21}


@pytest.mark.parametrize(("kind", "size", "little", "payload", "value"), [
    ("int", 1, False, "ff", -1), ("uint", 1, False, "ff", 255),
    ("int", 2, False, "fffe", -2), ("int", 2, True, "feff", -2),
    ("uint", 4, True, "78563412", 0x12345678), ("int", 4, False, "80000000", -2**31),
    ("uint", 8, False, "ffffffffffffffff", 2**64 - 1), ("int", 8, True, "0000000000000080", -2**63),
])
def test_integers(kind: str, size: int, little: bool, payload: str, value: int) -> None:
    doc = {"sense": [{"asset": "v", "value": {
        "byte": 1, "bytelength": size, "type": kind, "byteorder": "little" if little else "big"}}]}
    roundtrip(doc, bytes.fromhex("00" + payload), {"v": value})


def test_boolean_string_and_hex() -> None:
    doc = {"sense": [
        {"asset": "b1", "value": {"byte": 0, "type": "boolean"}},
        {"asset": "b3", "value": {"byte": 1, "bytelength": 3, "type": "boolean"}},
        {"asset": "s", "value": {"byte": 4, "bytelength": 4, "type": "string"}},
        {"asset": "h", "value": {"byte": 8, "bytelength": 3, "type": "hex"}},
    ]}
    roundtrip(doc, bytes.fromhex("01 000001 41420000 abcdef"),
              {"b1": True, "b3": True, "s": "AB", "h": "abcdef"})
    c = codec(doc)
    assert decode(c, bytes.fromhex("02 000000 41004200 00ff00")) == {
        "b1": True, "b3": False, "s": "A\x00B", "h": "00ff00"}
    assert decode(c, bytes.fromhex("00 000000 c3a9ff41 000000"))["s"] == "é\ufffdA"


def test_endbyte_and_ranges() -> None:
    doc = {"sense": [
        {"asset": "head", "value": {"byte": 0, "type": "uint"}},
        {"asset": "text", "value": {"byte": 1, "endbyte": -2, "type": "string"}},
        {"asset": "crc", "value": {"endbyte": -2, "bytelength": 2, "type": "uint"}},
        {"asset": "all", "value": {"byte": 0, "endbyte": 0, "type": "hex"}},
    ]}
    c = codec(doc)
    assert decode(c, b"\x07hello\x12\x34") == {
        "head": 7, "text": "hello", "crc": 0x1234, "all": "0768656c6c6f1234"}
    assert decode(c, b"\x07\x12\x34") == {"head": 7, "text": "", "crc": 0x1234, "all": "071234"}
    assert error(c, b"\x07\x12") == "Asset path:text, Error: can't extract [1:0] from 2 bytes"
    tail = codec({"sense": [{"asset": "t", "value": {"endbyte": -4, "bytelength": 2,
                                                     "type": "uint"}}]})
    assert decode(tail, b"\x00\x01\x02\x03\x04") == {"t": 0x0102}
    assert error(tail, b"\x00\x01") == "Asset path:t, Error: can't extract [-2:0] from 2 bytes"


def test_dot_paths_nest_and_later_assignments_win() -> None:
    c = codec({"sense": [
        {"asset": "gps.lat", "value": {"byte": 0, "type": "uint"}},
        {"asset": "x", "value": "first"},
        {"asset": "gps.fix.ok", "value": {"byte": 1, "type": "boolean"}},
        {"asset": "a", "value": 1},
        {"asset": "a.b", "value": "object replaces the number"},
        {"asset": "x", "value": "second"},
        {"asset": "c.d", "value": True},
        {"asset": "c", "value": 2.5},
    ]})
    assert json.dumps(decode(c, b"\x05\x01")) == json.dumps({
        "gps": {"lat": 5, "fix": {"ok": True}}, "x": "second",
        "a": {"b": "object replaces the number"}, "c": 2.5})


def test_string_switch_nested_switches_and_defaults() -> None:
    gps = {"switch": {"byte": 1, "type": "string"}, "on": [
        {"case": "T", "do": [{"asset": "temp", "value": {"byte": 2, "type": "int"}}]},
        {"case": "S", "do": [{"switch": {"byte": 2, "type": "uint"}, "on": [
            {"case": 0, "do": [{"asset": "sw", "value": False}]},
            {"default": True, "do": [{"asset": "sw", "value": True}]}]}]}]}
    doc = {"sense": [{"asset": "ver", "value": {"byte": 0, "type": "uint"}}, gps,
                     {"switch": {"endbyte": -1, "type": "boolean"}, "on": [
                         {"case": True, "do": [{"asset": "alarm", "value": "on"}]}]}]}
    c = codec(doc)
    assert decode(c, b"\x01T\xff\x00") == {"ver": 1, "temp": -1}
    assert decode(c, b"\x01S\x00\x01") == {"ver": 1, "sw": False, "alarm": "on"}
    assert decode(c, b"\x01S\x07") == {"ver": 1, "sw": True, "alarm": "on"}
    assert decode(c, b"\x01S\x07\x00") == {"ver": 1, "sw": True}
    assert decode(c, b"\x01X\x00") == {"ver": 1}
    assert error(c, b"\x01") == (
        "Asset path:sense[1].switch, Error: can't extract [1:2] from 1 bytes")
    assert error(c, b"\x01T") == "Asset path:temp, Error: can't extract [2:3] from 2 bytes"
    assert error(c, b"") == "Asset path:ver, Error: can't extract [0:1] from 0 bytes"
    assert c.encode({"ver": 1, "sw": True, "alarm": "on"}) == b"\x01S\x01"  # shares byte 2
    assert c.encode({"ver": 1, "temp": -1}) == b"\x01T\xff\x00"  # grown for the tail
    assert c.encode({"ver": 1}) == b"\x01\x00"


def test_float_switch_and_first_matching_case() -> None:
    c = codec({"sense": [{"switch": {"byte": 0, "bytelength": 4, "type": "float"}, "on": [
        {"case": 0.1, "do": [{"asset": "k", "value": "tenth"}]},
        {"case": 1, "do": [{"asset": "k", "value": "one"}]}]}]})
    assert decode(c, struct.pack(">f", 0.1)) == {"k": "tenth"}
    assert decode(c, struct.pack(">f", 1.0)) == {"k": "one"}
    assert decode(c, struct.pack(">f", float("nan"))) == {}


def test_positions_from_custom_types() -> None:
    c = codec({"sense": [
        {"asset": "pos.lat", "custom_type": "location_lat",
         "value": {"byte": 0, "bytelength": 8, "type": "float", "byteorder": "little"}},
        {"asset": "pos.lng", "custom_type": "location_long",
         "value": {"byte": 8, "bytelength": 8, "type": "float", "byteorder": "little"}},
    ]})
    payload = struct.pack("<dd", 50.9375, 6.9603)
    assert c.decode(payload) == ({"pos": {"lat": 50.9375, "lng": 6.9603}}, (50.9375, 6.9603))
    assert decode_reference(c.ast, payload)[1] == (50.9375, 6.9603)
    assert c.decode(struct.pack("<dd", float("nan"), 6.9603))[1] is None
    lat_only = codec({"sense": [{"asset": "lat", "custom_type": "location_lat",
                                 "value": {"byte": 0, "bytelength": 4, "type": "float"}}]})
    assert lat_only.decode(struct.pack(">f", 1.5)) == ({"lat": 1.5}, None)


def test_asset_names_are_data_never_code() -> None:
    names = ["__import__('os'); system('false')", 'a"b', "x\n    return 1", "{K0}", "b\\"]
    c = codec({"sense": [{"asset": n, "value": {"byte": i, "type": "uint"}}
                         for i, n in enumerate(names)]
                        + [{"asset": "c", "value": "__builtins__"}]})
    assert decode(c, bytes(range(5))) == {**{n: i for i, n in enumerate(names)},
                                          "c": "__builtins__"}


def test_many_execution_paths_fall_back_to_the_reference_walk() -> None:
    sw = {"switch": {"byte": 0, "type": "uint"}, "on": [
        {"case": k, "do": [{"switch": {"byte": 1, "type": "uint"}, "on": [
            {"default": True, "do": [{"asset": "k", "value": {"byte": 0, "type": "uint"}}]}]}]}
        for k in range(256)]}
    c = codec({"sense": [sw]})
    for k in range(256):
        assert decode(c, bytes([k, 0])) == {"k": k}
    assert len(c._plans) == MAX_PLANS


def test_encoder_errors() -> None:
    (demo,) = [v["template"] for v in VECTORS if v["name"] == "sdk_demo"]
    c = codec(demo)
    ok = {"battery_level": 99, "signal_strength": 84, "software_version": "2.2.1"}
    with pytest.raises(EncodeError, match="battery_level: 256 does not fit uint of 1 bytes"):
        c.encode({**ok, "battery_level": 256})
    with pytest.raises(EncodeError, match="software_version: 6 bytes of UTF-8 do not fit 5"):
        c.encode({**ok, "software_version": "2.2.10"})
    with pytest.raises(EncodeError, match=r"not in the template: extra, more\.x"):
        c.encode({**ok, "extra": 1, "more": {"x": 2}})
    with pytest.raises(EncodeError, match="the values fit no branch of the template: "
                       "battery_level, data_type, signal_strength, software_version"):
        c.encode({**ok, "data_type": "other"})
    with pytest.raises(EncodeError, match="battery_level: 'x' is not an integer"):
        c.encode({**ok, "battery_level": "x"})
    assert c.encode({}) == b"\x00"  # no case taken
    with pytest.raises(EncodeError, match="fit no branch"):
        c.encode(ok, exact=True)  # exact: the constant data_type must be given too
    assert c.encode({**ok, "data_type": "Energy_Saver"}, exact=True) == bytes.fromhex(
        "016354322e322e31")
    assert c.encode(ok, switch=[1]) == bytes.fromhex("016354322e322e31")
    assert c.encode({}, switch=[7]) == b"\x07"
    overlap = codec({"sense": [{"asset": "a", "value": {"byte": 0, "type": "uint"}},
                               {"asset": "b", "value": {"byte": 0, "type": "uint"}}]})
    assert overlap.encode({"a": 1, "b": 1}) == b"\x01"
    with pytest.raises(EncodeError, match="b overlaps a with different bytes"):
        overlap.encode({"a": 1, "b": 2})
