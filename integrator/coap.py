"""RFC 7252 message codec: a small hand-written parser/serializer for the hot path.

Used by integrator.endpoints.coap (server side) and sdk_examples / tests (client side).
`parse` raises `MalformedMessage` for anything RFC 7252 section 3 calls a format error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CON, NON, ACK, RST = 0, 1, 2, 3
EMPTY = 0
GET, POST, PUT, DELETE = 1, 2, 3, 4

OPT_IF_MATCH = 1
OPT_URI_HOST = 3
OPT_ETAG = 4
OPT_IF_NONE_MATCH = 5
OPT_OBSERVE = 6
OPT_URI_PORT = 7
OPT_LOCATION_PATH = 8
OPT_URI_PATH = 11
OPT_CONTENT_FORMAT = 12
OPT_MAX_AGE = 14
OPT_URI_QUERY = 15
OPT_ACCEPT = 17
OPT_LOCATION_QUERY = 20
OPT_BLOCK2 = 23
OPT_BLOCK1 = 27
OPT_SIZE2 = 28
OPT_PROXY_URI = 35
OPT_PROXY_SCHEME = 39
OPT_SIZE1 = 60
OPT_NO_RESPONSE = 258


def code(cls: int, detail: int) -> int:
    return (cls << 5) | detail


CREATED = code(2, 1)
CHANGED = code(2, 4)
CONTENT = code(2, 5)
BAD_REQUEST = code(4, 0)
UNAUTHORIZED = code(4, 1)
BAD_OPTION = code(4, 2)
NOT_FOUND = code(4, 4)
METHOD_NOT_ALLOWED = code(4, 5)
REQUEST_ENTITY_TOO_LARGE = code(4, 13)
INTERNAL_SERVER_ERROR = code(5, 0)
SERVICE_UNAVAILABLE = code(5, 3)


def code_str(c: int) -> str:
    return f"{c >> 5}.{c & 31:02d}"


class MalformedMessage(ValueError):
    """Not a valid CoAP message (RFC 7252 section 3 / 4.2: silently ignore or RST)."""


@dataclass(slots=True)
class Message:
    mtype: int
    code: int
    mid: int
    token: bytes = b""
    options: list[tuple[int, bytes]] = field(default_factory=list)
    payload: bytes = b""

    def opt_all(self, number: int) -> list[bytes]:
        return [v for n, v in self.options if n == number]

    def opt(self, number: int) -> bytes | None:
        for n, v in self.options:
            if n == number:
                return v
        return None

    @property
    def is_request(self) -> bool:
        return 1 <= self.code <= 31


def parse(data: bytes) -> Message:
    n = len(data)
    if n < 4:
        raise MalformedMessage("shorter than the 4-byte header")
    b0 = data[0]
    if b0 >> 6 != 1:
        raise MalformedMessage("version is not 1")
    tkl = b0 & 0x0F
    if tkl > 8:
        raise MalformedMessage("token length > 8")
    mcode = data[1]
    pos = 4 + tkl
    if pos > n:
        raise MalformedMessage("truncated token")
    msg = Message((b0 >> 4) & 3, mcode, (data[2] << 8) | data[3], data[4:pos])
    if mcode == EMPTY:
        if n != 4 or tkl:
            raise MalformedMessage("empty message with token, options or payload")
        return msg
    number = 0
    options = msg.options
    while pos < n:
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            if pos == n:
                raise MalformedMessage("payload marker without payload")
            msg.payload = data[pos:]
            return msg
        delta, length = byte >> 4, byte & 0x0F
        if delta == 13:
            if pos >= n:
                raise MalformedMessage("truncated option delta")
            delta = data[pos] + 13
            pos += 1
        elif delta == 14:
            if pos + 1 >= n:
                raise MalformedMessage("truncated option delta")
            delta = ((data[pos] << 8) | data[pos + 1]) + 269
            pos += 2
        elif delta == 15:
            raise MalformedMessage("reserved option delta 15")
        if length == 13:
            if pos >= n:
                raise MalformedMessage("truncated option length")
            length = data[pos] + 13
            pos += 1
        elif length == 14:
            if pos + 1 >= n:
                raise MalformedMessage("truncated option length")
            length = ((data[pos] << 8) | data[pos + 1]) + 269
            pos += 2
        elif length == 15:
            raise MalformedMessage("reserved option length 15")
        number += delta
        end = pos + length
        if end > n:
            raise MalformedMessage("option value runs past the datagram")
        options.append((number, data[pos:end]))
        pos = end
    return msg


def _ext(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    return 14, (value - 269).to_bytes(2, "big")


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    """Options must be sorted by number (stable for repeated options)."""
    out = bytearray()
    prev = 0
    for number, value in options:
        dn, dx = _ext(number - prev)
        ln, lx = _ext(len(value))
        out.append(dn << 4 | ln)
        out += dx
        out += lx
        out += value
        prev = number
    return bytes(out)


def serialize(msg: Message) -> bytes:
    head = bytes((0x40 | (msg.mtype << 4) | len(msg.token), msg.code, msg.mid >> 8, msg.mid & 0xFF))
    out = head + msg.token
    if msg.options:
        out += encode_options(sorted(msg.options, key=lambda o: o[0]))
    if msg.payload:
        out += b"\xff" + msg.payload
    return out


def uint_option(value: int) -> bytes:
    """CoAP uint option value: minimal big-endian, 0 as the zero-length form."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


@dataclass(frozen=True, slots=True)
class Block:
    """A Block1/Block2 option value (RFC 7959 section 2.2): block number, more flag and
    size exponent (size = 2 ** (szx + 4), 16..1024 bytes)."""

    num: int
    more: bool
    szx: int

    @property
    def size(self) -> int:
        return 1 << (self.szx + 4)

    @classmethod
    def parse(cls, value: bytes) -> Block:
        """MalformedMessage for a value longer than 3 bytes or the reserved szx 7."""
        if len(value) > 3:
            raise MalformedMessage("block option longer than 3 bytes")
        raw = int.from_bytes(value, "big")
        if raw & 7 == 7:
            raise MalformedMessage("block size exponent 7 is reserved")
        return cls(raw >> 4, bool(raw & 8), raw & 7)

    def encode(self) -> bytes:
        return uint_option(self.num << 4 | (8 if self.more else 0) | self.szx)
