"""The device-side example talks to a real Simwire exactly like the blueprints."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from pathlib import Path

import pytest

from energy_saver import bcl
from energy_saver.codec import Codec
from sdk_examples.device import coap_post, main, send_coap, send_udp
from sdk_examples.energy_saver import (
    E_CHAR,
    E_FLOAT,
    E_INTEGER,
    E_STRING,
    BinaryPayloadError,
    Element,
    os_energy_save,
)
from simwire.app import Simwire
from simwire.model import Protocol, Sim
from simwire.ports import HistoryQuery
from tests.support.simwire import Api, eventually

ICCID = "8988280666000000091"
SDK_DEMO = next(v["template"] for v in json.loads(
    (Path(__file__).parents[1].parent / "shared/spec/vectors/bcl.json").read_text())["vectors"]
    if v["name"] == "sdk_demo")
DEMO_VALUES = {"battery_level": 99, "signal_strength": 84, "software_version": "2.2.1"}
DEMO_JSON = ('{"data_type":"Energy_Saver","battery_level":99,"signal_strength":84,'
             '"software_version":"2.2.1"}')


def test_coap_post_matches_the_freertos_datagram() -> None:
    assert coap_post(1, bytes.fromhex("016354322e322e31"), "test", True) == bytes.fromhex(
        "40020001d602743d74657374ff016354322e322e31")
    # "t=" + 20 chars = 22 bytes: delta 13+2, length 13+9
    long_topic = coap_post(1, b"x", "a" * 20, True)
    assert long_topic[4:7] == b"\xdd\x02\x09"
    assert long_topic[7:29] == b"t=" + b"a" * 20
    non = coap_post(0x1234, b"p", None, False)
    assert non[0] == 0x58 and non[2:4] == b"\x12\x34" and non[12:] == b"\xffp"


async def test_example_device_sends_udp_and_coap(app: Simwire) -> None:
    await app.store.create(Sim(ICCID, "901405100000091", "127.0.0.1"))
    code = await asyncio.to_thread(send_coap, "127.0.0.1", app.ports.coap, b"c", "t1")
    assert code == "2.04"
    code = await asyncio.to_thread(send_coap, "127.0.0.1", app.ports.coap, b"n", None, False)
    assert code == "2.04"
    await asyncio.to_thread(send_udp, "127.0.0.1", app.ports.udp, b"u")

    async def three() -> list[tuple[str, str | None]] | None:
        page = await app.store.history(HistoryQuery(ICCID, 0, 2**62))
        items = sorted((i.payload, i.topic or "") for i in page.items)
        return items if len(items) == 3 else None

    assert await eventually(three) == [("Yw==", "t1"), ("bg==", ""), ("dQ==", "")]


# -- os_energy_save, the C SDK's encoder ported ---------------------------------------------


def demo_payload() -> bytes:
    """`os_energy_save(buf, 1, 3, {E_INTEGER,99,1}, {E_INTEGER,84,1}, {E_STRING,"2.2.1",5})`
    of the blueprints."""
    return os_energy_save(1, (E_INTEGER, 99, 1), (E_INTEGER, 84, 1), (E_STRING, "2.2.1", 5))


def test_os_energy_save_reproduces_the_sdk_demo_vector() -> None:
    assert demo_payload() == bytes.fromhex("016354322e322e31")
    as_elements = os_energy_save(1, Element(E_INTEGER, 99, 1), Element(E_INTEGER, 84, 1),
                                 Element(E_STRING, b"2.2.1", 5))
    assert as_elements == demo_payload()
    assert os_energy_save(0x1FF, (E_CHAR, "x", 1)) == b"\xffx"  # selector: its low byte


def test_os_energy_save_integers_as_the_sdk() -> None:
    # the SDK's unit test: 128 -> NCE_SDK_BINARY_PAYLOAD_ERROR, whatever template_length
    for length in (1, 2, 4):
        with pytest.raises(BinaryPayloadError, match="Check template length"):
            os_energy_save(1, (E_INTEGER, 128, length))
    with pytest.raises(BinaryPayloadError):
        os_energy_save(1, (E_INTEGER, 99, 1), (E_INTEGER, -129, 2))
    assert os_energy_save(1, (E_INTEGER, 127, 1), (E_INTEGER, -128, 1)) == b"\x01\x7f\x80"
    # native (little-endian) order, template_length bytes of the int, then of the union
    assert os_energy_save(2, (E_INTEGER, -2, 2)) == bytes.fromhex("02feff")
    assert os_energy_save(2, (E_INTEGER, 5, 4)) == bytes.fromhex("0205000000")
    assert os_energy_save(2, (E_INTEGER, -1, 6)) == bytes.fromhex("02ffffffff0000")
    # where char is unsigned (GCC on ARM) the check lets 0..255 pass instead
    assert os_energy_save(1, (E_INTEGER, 200, 1), char_signed=False) == b"\x01\xc8"
    with pytest.raises(BinaryPayloadError):
        os_energy_save(1, (E_INTEGER, -1, 1), char_signed=False)
    with pytest.raises(ValueError, match="C int"):
        os_energy_save(1, (E_INTEGER, 2**31, 4))


def test_os_energy_save_floats_chars_and_strings() -> None:
    assert os_energy_save(0, (E_FLOAT, 50.934544, 4)) == bytes.fromhex("00f9bc4b42")
    assert os_energy_save(0, (E_FLOAT, -1.5, 4)) == b"\x00" + struct.pack("<f", -1.5)
    assert os_energy_save(0, (E_FLOAT, 1, 4)) == bytes.fromhex("000000803f")
    assert os_energy_save(3, (E_CHAR, "A", 1), (E_CHAR, 0xFE, 1), (E_CHAR, b"z", 1)) == (
        b"\x03A\xfez")
    # a string is copied raw, no terminator: NUL-padded or truncated to template_length
    assert os_energy_save(4, (E_STRING, "ab", 4)) == b"\x04ab\0\0"
    assert os_energy_save(4, (E_STRING, "abcdef", 3)) == b"\x04abc"
    assert os_energy_save(4, (E_STRING, "é", 2)) == b"\x04\xc3\xa9"
    assert len(os_energy_save(4, (E_STRING, "s" * 50, 50))) == 51
    with pytest.raises(ValueError, match="NCE_SDK_MAX_STRING_SIZE"):
        os_energy_save(4, (E_STRING, "s" * 51, 50))
    with pytest.raises(ValueError, match="template_length"):
        os_energy_save(4, (E_STRING, "s", 51))
    with pytest.raises(ValueError, match="one byte"):
        os_energy_save(4, (E_CHAR, "ab", 1))
    with pytest.raises(ValueError, match="C float"):
        os_energy_save(4, (E_FLOAT, 1e39, 4))
    with pytest.raises(BinaryPayloadError):  # nothing after the selector (location == 1)
        os_energy_save(4)
    with pytest.raises(BinaryPayloadError):
        os_energy_save(4, (E_STRING, "abc", 0))


def test_os_energy_save_output_is_what_the_templates_decode() -> None:
    codec = Codec(bcl.parse(SDK_DEMO))
    value, _ = codec.decode(demo_payload())
    assert json.dumps(value, separators=(",", ":")) == DEMO_JSON
    assert codec.encode(value) == demo_payload()
    assert codec.encode(DEMO_VALUES) == demo_payload()
    # each element type against the BCL type a template declares for it ("little" order)
    mixed = Codec(bcl.parse({"sense": [{"switch": {"byte": 0, "type": "int"}, "on": [
        {"case": 7, "do": [
            {"asset": "t", "value": {"byte": 1, "bytelength": 4, "type": "float",
                                     "byteorder": "little"}},
            {"asset": "c", "value": {"byte": 5, "type": "string"}},
            {"asset": "n", "value": {"byte": 6, "bytelength": 2, "type": "int",
                                     "byteorder": "little"}},
            {"asset": "v", "value": {"byte": 8, "bytelength": 8, "type": "string"}}]}]}]}))
    payload = os_energy_save(7, (E_FLOAT, 21.5, 4), (E_CHAR, "A", 1), (E_INTEGER, -2, 2),
                             (E_STRING, "v1.0", 8))
    assert mixed.decode(payload) == ({"t": 21.5, "c": "A", "n": -2, "v": "v1.0"}, None)
    assert mixed.encode({"t": 21.5, "c": "A", "n": -2, "v": "v1.0"}) == payload


# -- the example device in Energy Saver mode ------------------------------------------------


async def test_example_device_sends_energy_saver_payloads(
        app: Simwire, api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """End to end: an ACTIVE template, `device.py coap|udp --template --values`, the
    translated JSON in the device's history."""
    await app.store.create(Sim(ICCID, "901405100000091", "127.0.0.1"))
    status, res = await api.call("POST", "/v1/optimize/templates", {
        "name": "sdk demo", "template": json.dumps(SDK_DEMO),
        "protocolFilter": ["COAP", "UDP"], "status": "ACTIVE"})
    assert status == 201, res
    template = tmp_path / "template.json"
    template.write_text(json.dumps(SDK_DEMO))
    args = ["--template", str(template), "--values", json.dumps(DEMO_VALUES)]

    rc = await asyncio.to_thread(main, ["coap", "--port", str(app.ports.coap), *args])
    assert rc == 0 and capsys.readouterr().out == "2.04\n"
    rc = await asyncio.to_thread(main, ["udp", "--port", str(app.ports.udp), *args])
    assert rc == 0

    async def two() -> list[tuple[Protocol, str]] | None:
        page = await app.store.history(HistoryQuery(ICCID, 0, 2**62))
        items = sorted((i.protocol, i.payload) for i in page.items)
        return items if len(items) == 2 else None

    assert await eventually(two) == [(Protocol.COAP, DEMO_JSON), (Protocol.UDP, DEMO_JSON)]


def test_example_device_energy_saver_arguments(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "template.json"
    template.write_text(json.dumps(SDK_DEMO))
    values = json.dumps(DEMO_VALUES)
    for argv, error in [
        (["--template", str(template)], "go together"),
        (["--values", values], "go together"),
        (["--template", str(template), "--values", values, "hi"], "replace the payload"),
        (["--template", str(template), "--values", values, "--hex", "00"], "replace"),
        (["--switch", "1", "hi"], "--switch needs --template"),
        (["--template", str(template), "--values", "[1]"], "JSON object"),
        (["--template", str(template), "--values", "{"], "error"),
        (["--template", str(template), "--values", '{"battery_level": 300}'], "error"),
        (["--template", str(tmp_path / "absent.json"), "--values", values], "absent.json"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["udp", *argv])
        assert exit_.value.code == 2
        assert error in capsys.readouterr().err


def test_example_device_puts_the_encoded_bytes_on_the_wire(tmp_path: Path) -> None:
    template = tmp_path / "template.json"
    template.write_text(json.dumps(SDK_DEMO))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        port = str(rx.getsockname()[1])
        assert main(["udp", "--port", port, "--template", str(template),
                     "--values", json.dumps(DEMO_VALUES)]) == 0
        assert rx.recv(100) == demo_payload()
        assert main(["udp", "--port", port, "--switch", "1", "--template", str(template),
                     "--values", json.dumps(DEMO_VALUES)]) == 0
        assert rx.recv(100) == demo_payload()
        assert main(["udp", "--port", port, "hello"]) == 0  # the payload after the options
        assert rx.recv(100) == b"hello"
