"""`os_energy_save` of the 1NCE C SDK, ported to Python (stdlib only; copy freely).

Firmware built on the 1NCE SDK (`source/nce_iot_c_sdk.c`, `NCE_ENERGY_SAVER`) packs an
Energy Saver payload with

    Element2byte_gen_t battery = { .type = E_INTEGER, .value.i = 99, .template_length = 1 };
    ...
    n = os_energy_save(buf, 1, 3, battery, signal, version);   /* 01 63 54 32 2e 32 2e 31 */

This module does the same on a PC, byte for byte, so a firmware developer can check what
the device will send against a BCL template (`simwire templates test TEMPLATE.json HEX`,
or the template tester) before flashing:

    >>> os_energy_save(1, (E_INTEGER, 99, 1), (E_INTEGER, 84, 1), (E_STRING, "2.2.1", 5)).hex()
    '016354322e322e31'

What the C code does, and so this port:

* byte 0 is the low byte of `selector` (`memcpy(packet, &selector, 1)`);
* then, per element, `memcpy(packet + location, &e.value.bytes, e.template_length)`: the
  first `template_length` bytes of the element's value union (`char c; float f; int i;
  char s[50]`) in the CPU's native order, little-endian on the ARM and x86 targets the SDK
  runs on. Hence 1NCE's templates declare `"byteorder": "little"`. The union is modelled as
  the value's bytes followed by NUL bytes up to its 50 bytes (`NCE_SDK_MAX_STRING_SIZE`):
  a string shorter than `template_length` is NUL-padded (C zero-fills the rest of a
  `char s[50]` initialised from a literal; the BCL `string` type strips trailing NULs),
  a longer one is truncated to `template_length` bytes, without terminator either way;
  an int or float whose `template_length` exceeds its 4 bytes gets NUL bytes after them
  (in C, whatever the union holds there: zero when the element was brace-initialised);
* E_INTEGER: the SDK rejects a value whose first byte, read as `char`, differs from the
  int (`e.value.i != *(e.value.bytes)`), whatever `template_length` is: only -128..127
  pass where `char` is signed (x86, the SDK's unit tests: 128 fails), 0..255 where it is
  unsigned (GCC's default on ARM); `char_signed` picks which;
* no element bytes at all (`location == 1`) is an error too.

Where the C function returns `NCE_SDK_BINARY_PAYLOAD_ERROR` this raises
`BinaryPayloadError` (a ValueError). It also raises ValueError for what C cannot even
express (a value that is not a C int, float or 50-byte string, a `template_length`
outside 0..50, a selector that is not a C int), where C would misbehave silently.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

NCE_SDK_MAX_STRING_SIZE = 50
"""Size of the element's value union (`char s[NCE_SDK_MAX_STRING_SIZE]`)."""

INT_MIN, INT_MAX = -(2**31), 2**31 - 1


class EType(enum.IntEnum):
    """`enum E_Type` of the SDK header, same order."""

    E_CHAR = 0
    E_FLOAT = 1
    E_INTEGER = 2
    E_STRING = 3


E_CHAR = EType.E_CHAR
E_FLOAT = EType.E_FLOAT
E_INTEGER = EType.E_INTEGER
E_STRING = EType.E_STRING


class BinaryPayloadError(ValueError):
    """The SDK's `NCE_SDK_BINARY_PAYLOAD_ERROR`."""


@dataclass(frozen=True, slots=True)
class Element:
    """`Element2byte_gen_t`: the type, the value (`value.c`/`.f`/`.i`/`.s`) and
    `template_length`, the bytes it takes in the payload (as declared in the template).

    E_CHAR takes an int (-128..255) or a one-byte str/bytes, E_FLOAT a number, E_INTEGER an
    int, E_STRING a str (UTF-8) or bytes of at most 50 bytes."""

    type: EType
    value: int | float | str | bytes
    template_length: int


ElementLike = Element | tuple[EType, int | float | str | bytes, int]


def value_bytes(e: Element) -> bytes:
    """The element's value union as the 50 bytes C would hold (little-endian)."""
    v = e.value
    if e.type is EType.E_CHAR:
        if isinstance(v, str):
            v = v.encode("latin-1")
        if isinstance(v, bytes):
            if len(v) != 1:
                raise ValueError(f"E_CHAR value must be one byte, got {e.value!r}")
            raw = v
        elif isinstance(v, int) and not isinstance(v, bool) and -128 <= v <= 255:
            raw = bytes([v & 0xFF])
        else:
            raise ValueError(f"E_CHAR value must be one byte or an int -128..255, "
                             f"got {e.value!r}")
    elif e.type is EType.E_FLOAT:
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise ValueError(f"E_FLOAT value must be a number, got {v!r}")
        try:
            raw = struct.pack("<f", v)
        except OverflowError:
            raise ValueError(f"E_FLOAT value {v!r} does not fit a C float") from None
    elif e.type is EType.E_INTEGER:
        if not isinstance(v, int) or isinstance(v, bool) or not INT_MIN <= v <= INT_MAX:
            raise ValueError(f"E_INTEGER value must be a C int, got {v!r}")
        raw = struct.pack("<i", v)
    elif e.type is EType.E_STRING:
        if not isinstance(v, str | bytes):
            raise ValueError(f"E_STRING value must be str or bytes, got {v!r}")
        raw = v.encode("utf-8") if isinstance(v, str) else v
        if len(raw) > NCE_SDK_MAX_STRING_SIZE:
            raise ValueError(f"E_STRING value is {len(raw)} bytes, at most "
                             f"{NCE_SDK_MAX_STRING_SIZE} fit (NCE_SDK_MAX_STRING_SIZE)")
    else:  # pragma: no cover - EType is closed
        raise ValueError(f"unknown element type {e.type!r}")
    return raw.ljust(NCE_SDK_MAX_STRING_SIZE, b"\0")


def os_energy_save(selector: int, *elements: ElementLike, char_signed: bool = True) -> bytes:
    """The payload `os_energy_save(packet, selector, len(elements), elements...)` writes
    (its return value is the length). Elements are `Element`s or
    `(type, value, template_length)` tuples. `char_signed`: whether the target's `char` is
    signed (it decides which E_INTEGER values the SDK accepts, see the module docstring).
    Raises BinaryPayloadError where the SDK returns NCE_SDK_BINARY_PAYLOAD_ERROR."""
    if isinstance(selector, bool) or not INT_MIN <= selector <= INT_MAX:
        raise ValueError(f"selector must be a C int, got {selector!r}")
    packet = bytearray([selector & 0xFF])
    for i, item in enumerate(elements):
        e = item if isinstance(item, Element) else Element(EType(item[0]), item[1], item[2])
        if not 0 <= e.template_length <= NCE_SDK_MAX_STRING_SIZE:
            raise ValueError(f"element {i}: template_length {e.template_length} is outside "
                             f"0..{NCE_SDK_MAX_STRING_SIZE} (the value union's size)")
        raw = value_bytes(e)
        if e.type is EType.E_INTEGER:
            first = raw[0] - 256 if char_signed and raw[0] > 127 else raw[0]
            if first != e.value:  # e.value.i != *(e.value.bytes)
                raise BinaryPayloadError(
                    f"element {i}: Conversion Error, Check template length. (E_INTEGER "
                    f"{e.value!r} is not {'-128..127' if char_signed else '0..255'})")
        packet += raw[:e.template_length]
    if len(packet) == 1:
        raise BinaryPayloadError("Conversion Error. (no element bytes)")
    return bytes(packet)
