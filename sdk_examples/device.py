"""Send telemetry to Simwire the way 1NCE firmware does (stdlib only; copy freely).

    python -m sdk_examples.device udp  --host 127.0.0.1 --port 4445 "hello"
    python -m sdk_examples.device coap --host 127.0.0.1 --port 5683 --topic test "hello"
    python -m sdk_examples.device coap --non --hex 016354322e322e31
    python -m sdk_examples.device coap --template template.json \
        --values '{"battery_level": 99, "signal_strength": 84, "software_version": "2.2.1"}'

UDP: one datagram, no reply (the UDP demo of blueprint-zephyr). CoAP: a CON POST with
Uri-Query `t=<topic>` and no token, retransmitted per RFC 7252 (ACK_TIMEOUT 2 s, up to
4 retransmissions) until the piggy-backed ACK arrives, like the FreeRTOS blueprint; or a
NON POST with an 8-byte token, like the Zephyr blueprint.

Energy Saver: `--template FILE --values JSON` (instead of a payload) encodes the values,
shaped like the translated JSON, into the compact binary payload the BCL template (a JSON
file) decodes, and sends that (`--switch` forces a switch's case, as for `simwire templates
encode`). This mode needs the simwire package (`energy_saver.codec`); the rest is stdlib
only. To build payloads the way firmware does, with the C SDK's `os_energy_save`, see
`sdk_examples/energy_saver.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
from typing import Any

CON, NON, ACK = 0, 1, 2
POST = 2
URI_QUERY = 15


def coap_post(mid: int, payload: bytes, topic: str | None, confirmable: bool) -> bytes:
    token = b"" if confirmable else os.urandom(8)
    head = struct.pack("!BBH", 0x40 | (CON if confirmable else NON) << 4 | len(token), POST, mid)
    opts = b""
    if topic:  # option 15 = delta nibble 13 + one extension byte (15 - 13)
        value = f"t={topic}".encode()
        if len(value) < 13:
            opts = bytes([0xD0 | len(value), URI_QUERY - 13]) + value
        else:
            opts = bytes([0xDD, URI_QUERY - 13, len(value) - 13]) + value
    return head + token + opts + (b"\xff" + payload if payload else b"")


def send_udp(host: str, port: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(payload, (host, port))


def send_coap(host: str, port: int, payload: bytes, topic: str | None = None,
              confirmable: bool = True, ack_timeout: float = 2.0, retries: int = 4) -> str:
    """Returns the response code as "c.dd" ("2.04" when stored), or "timeout"."""
    mid = int.from_bytes(os.urandom(2), "big")
    datagram = coap_post(mid, payload, topic, confirmable)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        timeout = ack_timeout
        for _ in range(retries + 1):
            s.sendto(datagram, (host, port))
            s.settimeout(timeout)
            try:
                while True:
                    reply, _ = s.recvfrom(1500)
                    ours = reply[2:4] == datagram[2:4] if confirmable else (
                        reply[4:12] == datagram[4:12])
                    if len(reply) >= 4 and ours:
                        return f"{reply[1] >> 5}.{reply[1] & 31:02d}"
            except TimeoutError:
                timeout *= 2
    return "timeout"


def energy_saver_payload(template: str, values: Any, switch: list[Any] | None = None
                         ) -> bytes:
    """The payload the BCL `template` (JSON text) decodes to `values` (a dict shaped like the
    translated JSON); `switch`: the case constant of each switch met, in order (None: the
    default). Needs the simwire package; raises ValueError for an invalid template or
    values it cannot encode."""
    try:  # imported here: only this mode depends on simwire
        from energy_saver import bcl
        from energy_saver.codec import Codec
    except ImportError as exc:
        raise ValueError(  # run as a script, sdk_examples/energy_saver.py shadows it
            f"--template needs the simwire package ({exc}); install it and run "
            "`python -m sdk_examples.device`") from exc
    if not isinstance(values, dict):
        raise ValueError("the values must be a JSON object")
    return Codec(bcl.parse_text(template)).encode(values, switch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("protocol", choices=["udp", "coap"])
    ap.add_argument("payload", nargs="?", default="")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--topic")
    ap.add_argument("--hex", help="payload as hex instead of text")
    ap.add_argument("--template", metavar="FILE",
                    help="Energy Saver: a BCL template (JSON file) to encode --values with")
    ap.add_argument("--values", metavar="JSON",
                    help="Energy Saver: the values, shaped like the translated JSON")
    ap.add_argument("--switch", action="append", metavar="JSON",
                    help="with --template: force the case constant of each switch met, "
                    "in order (JSON value; null: the default)")
    ap.add_argument("--non", action="store_true", help="CoAP NON instead of CON")
    a = ap.parse_intermixed_args(argv)  # the payload may follow the options
    if a.template is not None or a.values is not None:
        if a.template is None or a.values is None:
            ap.error("--template and --values go together")
        if a.payload or a.hex:
            ap.error("--template/--values replace the payload and --hex")
        try:
            with open(a.template, encoding="utf-8") as f:
                template = f.read()
            switch = None if a.switch is None else [json.loads(s) for s in a.switch]
            payload = energy_saver_payload(template, json.loads(a.values), switch)
        except (OSError, ValueError) as exc:  # JSON, template and encode errors
            ap.error(str(exc))
    elif a.switch is not None:
        ap.error("--switch needs --template")
    else:
        payload = bytes.fromhex(a.hex) if a.hex else a.payload.encode()
    if a.protocol == "udp":
        send_udp(a.host, a.port or 4445, payload)
        return 0
    code = send_coap(a.host, a.port or 5683, payload, a.topic, not a.non)
    print(code)
    return 0 if code == "2.04" else 1


if __name__ == "__main__":
    sys.exit(main())
