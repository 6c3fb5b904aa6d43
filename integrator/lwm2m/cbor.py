"""A small RFC 8949 CBOR codec for the LwM2M formats (SenML CBOR 112, single-value CBOR 60).

Called by `integrator.lwm2m.formats` only. Hand-written rather than a dependency so that
malformed device payloads raise exactly one error type (`CborError`) and tags never turn
into surprise Python objects: a tag decodes to `Tag(number, value)` and the caller decides.

Decoding: unsigned/negative integers, byte and text strings (definite or indefinite),
arrays and maps (definite or indefinite, nesting depth <= MAX_DEPTH, duplicate or
unhashable map keys rejected), tags, false/true/null, half/single/double floats; nothing
may follow the top-level item. Encoding uses the preferred serialization: shortest heads,
definite lengths, the shortest float that keeps the value.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 16
_BREAK = 0xFF
_HALF, _SINGLE, _DOUBLE = struct.Struct(">e"), struct.Struct(">f"), struct.Struct(">d")
_FLOATS = {25: _HALF, 26: _SINGLE, 27: _DOUBLE}
_HASHABLE = (int, str, bytes, float, bool, type(None))


class CborError(ValueError):
    """Not well-formed CBOR, or outside the subset above."""


@dataclass(frozen=True, slots=True)
class Tag:
    number: int
    value: Any


def loads(data: bytes) -> Any:
    """The single CBOR item in `data`."""
    dec = _Decoder(data)
    value = dec.item(0)
    if dec.pos != len(data):
        raise CborError(f"{len(data) - dec.pos} trailing bytes after the CBOR item")
    return value


class _Decoder:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise CborError(f"truncated: need {n} bytes at offset {self.pos}")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def head(self) -> tuple[int, int, int | None]:
        """(major type, additional info, argument or None for indefinite length)."""
        ib = self.take(1)[0]
        major, info = ib >> 5, ib & 31
        if info < 24:
            return major, info, info
        if info <= 27:
            return major, info, int.from_bytes(self.take(1 << (info - 24)), "big")
        if info == 31:
            return major, info, None
        raise CborError(f"reserved additional information {info} at offset {self.pos - 1}")

    def item(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CborError(f"nested deeper than {MAX_DEPTH}")
        start = self.pos
        major, info, arg = self.head()
        if major == 7:
            return self.simple(info, arg, start)
        if arg is None and major not in (2, 3, 4, 5):
            raise CborError(f"indefinite length for major type {major} at offset {start}")
        if major == 0:
            return arg
        if major == 1:
            assert arg is not None
            return -1 - arg
        if major in (2, 3):
            raw = self.string(major, arg)
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CborError(f"text string at offset {start} is not UTF-8") from exc
        if major == 4:
            return self.array(arg, depth)
        if major == 5:
            return self.map(arg, depth, start)
        assert arg is not None  # major 6
        return Tag(arg, self.item(depth + 1))

    def simple(self, info: int, arg: int | None, start: int) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if arg is not None and 25 <= info <= 27:
            codec = _FLOATS[info]
            return codec.unpack(arg.to_bytes(codec.size, "big"))[0]
        if info == 31:
            raise CborError(f"unexpected break at offset {start}")
        raise CborError(f"unsupported simple value at offset {start}")

    def string(self, major: int, arg: int | None) -> bytes:
        if arg is not None:
            return self.take(arg)
        chunks = bytearray()
        while True:
            if self.pos < len(self.data) and self.data[self.pos] == _BREAK:
                self.pos += 1
                return bytes(chunks)
            at = self.pos
            cmajor, _, carg = self.head()
            if cmajor != major or carg is None:
                raise CborError(f"bad chunk in an indefinite-length string at offset {at}")
            chunks += self.take(carg)

    def array(self, arg: int | None, depth: int) -> list[Any]:
        items: list[Any] = []
        if arg is None:
            while not self.at_break():
                items.append(self.item(depth + 1))
            return items
        if arg > len(self.data) - self.pos:
            raise CborError(f"array of {arg} items exceeds the payload")
        for _ in range(arg):
            items.append(self.item(depth + 1))
        return items

    def map(self, arg: int | None, depth: int, start: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        if arg is not None and 2 * arg > len(self.data) - self.pos:
            raise CborError(f"map of {arg} pairs exceeds the payload")
        count = 0
        while (arg is None and not self.at_break()) or (arg is not None and count < arg):
            key = self.item(depth + 1)
            if not isinstance(key, _HASHABLE):
                raise CborError(f"map at offset {start} has a {type(key).__name__} key")
            if key in out:
                raise CborError(f"map at offset {start} repeats the key {key!r}")
            out[key] = self.item(depth + 1)
            count += 1
        return out

    def at_break(self) -> bool:
        if self.pos >= len(self.data):
            raise CborError("truncated: indefinite-length item without a break")
        if self.data[self.pos] == _BREAK:
            self.pos += 1
            return True
        return False


def dumps(value: Any) -> bytes:
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def _head(major: int, arg: int, out: bytearray) -> None:
    if arg < 24:
        out.append(major << 5 | arg)
    elif arg < 0x100:
        out += bytes((major << 5 | 24, arg))
    elif arg < 0x10000:
        out.append(major << 5 | 25)
        out += arg.to_bytes(2, "big")
    elif arg < 0x100000000:
        out.append(major << 5 | 26)
        out += arg.to_bytes(4, "big")
    else:
        out.append(major << 5 | 27)
        out += arg.to_bytes(8, "big")


def _float(value: float, out: bytearray) -> None:
    if math.isnan(value):
        out += b"\xf9\x7e\x00"
        return
    for info, codec in ((25, _HALF), (26, _SINGLE)):
        try:
            packed = codec.pack(value)
        except OverflowError:
            continue
        if codec.unpack(packed)[0] == value:
            out.append(0xE0 | info)
            out += packed
            return
    out.append(0xFB)
    out += _DOUBLE.pack(value)


def _encode(value: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CborError(f"nested deeper than {MAX_DEPTH}")
    if value is False or value is True:
        out.append(0xF5 if value else 0xF4)
    elif value is None:
        out.append(0xF6)
    elif isinstance(value, int):
        if 0 <= value < 1 << 64:
            _head(0, value, out)
        elif -(1 << 64) <= value < 0:
            _head(1, -1 - value, out)
        else:
            raise CborError(f"integer {value} does not fit in 64 bits")
    elif isinstance(value, float):
        _float(value, out)
    elif isinstance(value, str):
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CborError("text is not encodable as UTF-8") from exc
        _head(3, len(raw), out)
        out += raw
    elif isinstance(value, bytes | bytearray):
        _head(2, len(value), out)
        out += value
    elif isinstance(value, Tag):
        if not 0 <= value.number < 1 << 64:
            raise CborError(f"tag number {value.number} does not fit in 64 bits")
        _head(6, value.number, out)
        _encode(value.value, out, depth + 1)
    elif isinstance(value, Mapping):
        _head(5, len(value), out)
        for key, item in value.items():
            _encode(key, out, depth + 1)
            _encode(item, out, depth + 1)
    elif isinstance(value, Sequence):
        _head(4, len(value), out)
        for item in value:
            _encode(item, out, depth + 1)
    else:
        raise CborError(f"cannot encode a {type(value).__name__}")
