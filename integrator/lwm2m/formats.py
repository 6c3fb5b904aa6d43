"""LwM2M content formats: wire payloads <-> typed `Record`s, link-format, telemetry JSON.

Called by the LwM2M server: Register/Update payloads (`parse_links`), Discover responses
(`format_links`), Read/Observe/Send payloads (`decode`), Write/Create and bootstrap payloads
(`encode`); and by the telemetry pipeline and the Device Controller (`to_json`,
`split_by_time`, `from_json`). Raises only `FormatError` on bad input, in both directions.

Records. A `Record` is (path, value, time): `path` the canonical path of a resource
("/3/0/9") or of a resource instance ("/3/0/7/1"); `value` a str (String, Corelnk), int
(Integer, Unsigned Integer, Time in Unix seconds), float, bool, bytes (Opaque) or `ObjLink`;
`time` the measurement time in absolute Unix seconds or None. SenML `bt`+`t` (and OMA-JSON's
alike) resolve to absolute times; a result below 2**28 is relative to `now` (RFC 8428 4.5.3).

Typing. When the `Registry` knows the resource, values take its type: SenML "v": 21 for a
Float resource decodes to 21.0, a fraction for an Integer or a "vs" for a Float is a
`FormatError`. When it does not, SenML/OMA-JSON/CBOR keep the type they carry (v -> int or
float, vs -> str, vb -> bool, vd -> bytes, vlo -> ObjLink), text/plain stays a str, and
OMA-TLV, which carries no type at all, gives the raw value bytes: no guessing (two bytes are
an int16, a two-character string or opaque data alike); register the object to get typed
values. Encoding unknown resources takes the type from the Python value.

Telemetry JSON (`to_json`), the object published as `payload.value` for source LWM2M:

    {"/3/0/9": 77, "/3/0/7/0": 3800, "/3/0/7/1": 5000, "/3311/0/5850": false,
     "/6/0/0": 52.52, "/0/0/3": "ODk4OA==", "/3/0/22/0": "3303:0", "_time": 1700000000}

Flat: one key per resource path and, for multiple resources, one per resource *instance*
path; no nested arrays or objects, so a partial read or a notification merges into the device
state with `state.update(...)` and a consumer never checks a value's shape. JSON values:
Opaque as standard base64, Objlnk as "obj:inst", Time as integer seconds, non-finite floats as
null. Timestamps never change a value's shape: a message carries at most one "_time", the
newest measurement time of its values (an int when whole); paths start with "/", so it cannot
clash. When a payload holds several times (a SenML time series) `to_json` keeps the newest
value per path (an untimed value counts as the newest); to publish the whole series emit
`[to_json(group) for group in split_by_time(records)]`. `from_json` is the inverse, used for
Device Controller writes: values typed from the registry, strings accepted for every type
(text/plain rules; Opaque as base64).

Content formats (LwM2M 1.1 Transport; legacy 1541-1544 accepted on decode): text/plain 0,
link-format 40, opaque 42, CBOR 60, SenML JSON 110, SenML CBOR 112, OMA-TLV 11542,
OMA-JSON 11543. TLV needs a base path (the request's /obj[/inst[/res[/ri]]]) to name what it
carries; SenML and OMA-JSON name their records (OMA-JSON's "bn" defaults to the base path);
text, opaque and CBOR carry exactly one value, that of the base path.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import re
import struct
import time as _time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

from integrator.lwm2m import cbor
from integrator.lwm2m.objects import Registry, ResourceType

MAX_ID = 65535
RELATIVE_TIME_LIMIT = 1 << 28
"""SenML times below this are relative to now (RFC 8428 4.5.3)."""

_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_F32, _F64 = struct.Struct(">f"), struct.Struct(">d")

_T = ResourceType
_TEXTUAL = (_T.STRING, _T.CORELNK)
_INTEGRAL = (_T.INTEGER, _T.UNSIGNED_INTEGER, _T.TIME)
_NUMERIC = (*_INTEGRAL, _T.FLOAT)


class ContentFormat(enum.IntEnum):
    TEXT = 0
    LINK_FORMAT = 40
    OPAQUE = 42
    CBOR = 60
    SENML_JSON = 110
    SENML_CBOR = 112
    TLV = 11542
    LWM2M_JSON = 11543


_LEGACY_FORMATS = {1541: ContentFormat.TEXT, 1542: ContentFormat.TLV,
                   1543: ContentFormat.LWM2M_JSON, 1544: ContentFormat.OPAQUE}


class FormatError(ValueError):
    """A payload that is not valid in its content format, or values that cannot be encoded in
    it; `str()` says where and why."""


@dataclass(frozen=True, slots=True, order=True)
class ObjLink:
    """An Objlnk value: a reference to object instance /obj/inst ("obj:inst" in text)."""

    obj: int
    inst: int

    def __post_init__(self) -> None:
        if not (0 <= self.obj <= MAX_ID and 0 <= self.inst <= MAX_ID):
            raise FormatError(f"object link {self.obj}:{self.inst} is out of range")

    def __str__(self) -> str:
        return f"{self.obj}:{self.inst}"

    @classmethod
    def parse(cls, text: str) -> ObjLink:
        m = _OBJLNK_RE.fullmatch(text)
        if m is None:
            raise FormatError(f"not an object link (obj:inst): {text!r}")
        return cls(int(m[1]), int(m[2]))


Value: TypeAlias = str | int | float | bool | bytes | ObjLink


@dataclass(frozen=True, slots=True)
class Record:
    path: str
    value: Value
    time: float | None = None


@dataclass(frozen=True, slots=True)
class Link:
    """One link-value of RFC 6690 link-format: `</3/0>;ver=1.1` is Link("/3/0", {"ver": "1.1"});
    a parameter without a value maps to None; quoted values are unquoted."""

    path: str
    attributes: Mapping[str, str | None] = field(default_factory=dict)

    def ids(self, root: str = "/") -> tuple[int, ...] | None:
        """The LwM2M ids of this link below `root` (a registration's alternate path, e.g.
        "/lwm2m"); () for the root link itself, None when not an LwM2M object path."""
        prefix = root.rstrip("/")
        path = self.path
        if prefix:
            if path in (prefix, prefix + "/"):
                return ()
            if not path.startswith(prefix + "/"):
                return None
            path = path[len(prefix):]
        try:
            return parse_path(path)
        except FormatError:
            return None


# -- paths ------------------------------------------------------------------------------------

_OBJLNK_RE = re.compile(r"([0-9]{1,5}):([0-9]{1,5})")
_ID_RE = re.compile(r"[0-9]{1,5}")


def parse_path(path: str) -> tuple[int, ...]:
    """"/3/0/7/1" -> (3, 0, 7, 1); "/" -> (); a trailing "/" is tolerated."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise FormatError(f"not an LwM2M path: {path!r}")
    body = path[1:-1] if path.endswith("/") and len(path) > 1 else path[1:]
    if not body:
        return ()
    parts = body.split("/")
    if len(parts) > 4:
        raise FormatError(f"LwM2M path deeper than /obj/inst/res/ri: {path!r}")
    ids = []
    for part in parts:
        if _ID_RE.fullmatch(part) is None or int(part) > MAX_ID:
            raise FormatError(f"not an LwM2M path: {path!r}")
        ids.append(int(part))
    return tuple(ids)


def format_path(ids: Sequence[int]) -> str:
    return "/" + "/".join(map(str, ids))


def _resource_ids(path: str) -> tuple[int, ...]:
    ids = parse_path(path)
    if len(ids) < 3:
        raise FormatError(f"{path}: not a resource or resource instance path")
    return ids


# -- entry points -----------------------------------------------------------------------------


def resolve_format(number: int) -> ContentFormat:
    """The `ContentFormat` for a CoAP Content-Format number (legacy LwM2M 1.0 ids mapped)."""
    try:
        return ContentFormat(number)
    except ValueError:
        legacy = _LEGACY_FORMATS.get(number)
        if legacy is None:
            raise FormatError(f"unsupported content format {number}") from None
        return legacy


def decode(content_format: int, payload: bytes, base_path: str, registry: Registry, *,
           now: float | None = None) -> list[Record]:
    """Records of a Read/Observe/Send/Write payload. `base_path` is the request path (for
    Send: "/"); `now` (default: the clock) resolves relative SenML/JSON times."""
    fmt = resolve_format(content_format)
    base = parse_path(base_path)
    data = bytes(payload)
    ref = _time.time() if now is None else now
    if fmt is ContentFormat.TLV:
        return _tlv_decode(data, base, registry)
    if fmt is ContentFormat.SENML_JSON:
        return _senml_decode(_json_load(data, "SenML JSON"), registry, ref, binary=False)
    if fmt is ContentFormat.SENML_CBOR:
        return _senml_decode(_cbor_load(data, "SenML CBOR"), registry, ref, binary=True)
    if fmt is ContentFormat.LWM2M_JSON:
        return _omajson_decode(_json_load(data, "LwM2M JSON"), base, registry, ref)
    if fmt is ContentFormat.LINK_FORMAT:
        raise FormatError("link-format carries links, not values (use parse_links)")
    if len(base) < 3:
        raise FormatError(f"{fmt.name} carries a single value: {base_path} is not a resource")
    path = format_path(base)
    rtype = _rtype(registry, base)
    if fmt is ContentFormat.TEXT:
        value = _text_value(_utf8_text(data, path), rtype, path)
    elif fmt is ContentFormat.OPAQUE:
        if rtype not in (None, _T.OPAQUE):
            raise FormatError(f"{path}: opaque payload for a {rtype} resource")
        value = data
    else:
        value = _cbor_value(_cbor_load(data, "CBOR"), rtype, path)
    return [Record(path, value)]


def encode(content_format: int, records: Sequence[Record], base_path: str,
           registry: Registry) -> bytes:
    """The payload for `records` (all at or below `base_path`, the request path)."""
    fmt = resolve_format(content_format)
    base = parse_path(base_path)
    if fmt is ContentFormat.TLV:
        return _tlv_encode(records, base, registry)
    if fmt in (ContentFormat.SENML_JSON, ContentFormat.SENML_CBOR, ContentFormat.LWM2M_JSON):
        typed = [_typed(r, registry) for r in records]
        bn, cut = _base_name(base, [ids for ids, _, _ in typed])
        if fmt is ContentFormat.LWM2M_JSON:
            return _omajson_encode(records, typed, bn, cut)
        return _senml_encode(records, typed, bn, cut, binary=fmt is ContentFormat.SENML_CBOR)
    if fmt is ContentFormat.LINK_FORMAT:
        raise FormatError("link-format carries links, not values (use format_links)")
    if len(records) != 1:
        raise FormatError(f"{fmt.name} carries exactly one value, got {len(records)} records")
    ids, rtype, value = _typed(records[0], registry)
    if ids != base:
        raise FormatError(f"{records[0].path} is not the request path {base_path}")
    path = format_path(ids)
    if fmt is ContentFormat.TEXT:
        return _utf8_bytes(_text_out(value, path), path)
    if fmt is ContentFormat.OPAQUE:
        if not isinstance(value, bytes):
            raise FormatError(f"{path}: opaque needs bytes, not a {rtype} value")
        return value
    return _cbor_dump(_cbor_out(value, rtype), path)


# -- values -----------------------------------------------------------------------------------


def _kind(value: object) -> str:
    return type(value).__name__


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _rtype(registry: Registry, ids: Sequence[int]) -> ResourceType | None:
    rtype = registry.resource_type(ids[0], ids[2])
    return None if rtype is _T.NONE else rtype


def _natural(value: object, path: str) -> Value:
    """`value` if it is a `Value` an untyped resource may hold (64-bit integers)."""
    if isinstance(value, bool | str | bytes | ObjLink | float):
        return value
    if isinstance(value, int):
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
        raise FormatError(f"{path}: integer {value} does not fit in 64 bits")
    raise FormatError(f"{path}: a {_kind(value)} is not an LwM2M value")


def _natural_type(value: Value) -> ResourceType:
    if isinstance(value, bool):
        return _T.BOOLEAN
    if isinstance(value, int):
        return _T.INTEGER if value <= _INT64_MAX else _T.UNSIGNED_INTEGER
    if isinstance(value, float):
        return _T.FLOAT
    if isinstance(value, str):
        return _T.STRING
    if isinstance(value, bytes):
        return _T.OPAQUE
    return _T.OBJLNK


def _coerce(value: object, rtype: ResourceType | None, path: str) -> Value:
    """`value` as a value of type `rtype` (None: keep its own type)."""
    if rtype is None:
        return _natural(value, path)
    if rtype in _TEXTUAL:
        if isinstance(value, str):
            return value
    elif rtype is _T.BOOLEAN:
        if isinstance(value, bool):
            return value
    elif rtype is _T.OPAQUE:
        if isinstance(value, bytes):
            return value
    elif rtype is _T.OBJLNK:
        if isinstance(value, ObjLink):
            return value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if rtype is _T.FLOAT:
            try:
                return float(value)
            except OverflowError:
                raise FormatError(f"{path}: {value} is out of range for a Float") from None
        if isinstance(value, float):
            if not math.isfinite(value) or (rtype is not _T.TIME and not value.is_integer()):
                raise FormatError(f"{path}: {value!r} is not a valid {rtype} value")
            value = int(value)  # Time: truncated to whole seconds
        low = 0 if rtype is _T.UNSIGNED_INTEGER else _INT64_MIN
        high = _UINT64_MAX if rtype is _T.UNSIGNED_INTEGER else _INT64_MAX
        if low <= value <= high:
            return value
        raise FormatError(f"{path}: {value} is out of range for {rtype}")
    raise FormatError(f"{path}: a {_kind(value)} is not a valid {rtype} value")


_Typed: TypeAlias = tuple[tuple[int, ...], ResourceType, Value]


def _typed(record: Record, registry: Registry) -> _Typed:
    """(ids, type, value) of a record to encode: the registry's type, else the value's."""
    if not isinstance(record, Record):
        raise FormatError(f"not a Record: {record!r}")
    ids = _resource_ids(record.path)
    rtype = _rtype(registry, ids)
    value = _coerce(record.value, rtype, record.path)
    return ids, rtype or _natural_type(value), value


def _number(value: object, what: str, *, finite: bool = True) -> int | float:
    """A JSON/CBOR number that fits LwM2M (64-bit integers; floats finite unless not
    `finite`: CBOR can carry a Float resource's inf and NaN, JSON cannot)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FormatError(f"{what}: expected a number, got {_kind(value)}")
    if isinstance(value, float):
        if finite and not math.isfinite(value):
            raise FormatError(f"{what}: {value} is not a finite number")
    elif not _INT64_MIN <= value <= _UINT64_MAX:
        raise FormatError(f"{what}: integer {value} does not fit in 64 bits")
    return value


def _resolve_time(base: int | float | None, offset: int | float | None,
                  now: float) -> float | None:
    if base is None and offset is None:
        return None
    total = float((base or 0) + (offset or 0))
    return total + now if total < RELATIVE_TIME_LIMIT else total


def _time_out(value: float, path: str) -> int | float:
    if not math.isfinite(value):
        raise FormatError(f"{path}: time {value} is not finite")
    return int(value) if value.is_integer() else value


_URLSAFE = str.maketrans("-_", "+/")
_B64_RE = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")


def _b64decode(text: str, path: str) -> bytes:
    """Base64 or base64url, padded or not (devices and servers disagree: OMA issue 553)."""
    if _B64_RE.fullmatch(text) is None:
        raise FormatError(f"{path}: not base64: {text[:40]!r}")
    body = text.rstrip("=").translate(_URLSAFE)
    if len(body) % 4 == 1:
        raise FormatError(f"{path}: truncated base64: {text[:40]!r}")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except binascii.Error as exc:
        raise FormatError(f"{path}: not base64: {exc}") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _utf8_text(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{path}: string is not UTF-8") from None


def _utf8_bytes(text: str, path: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{path}: string is not encodable as UTF-8") from None


# -- text/plain (0) ---------------------------------------------------------------------------

_INT_TEXT = re.compile(r"[+-]?[0-9]{1,20}")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")
_BOOL_TEXT = {"0": False, "1": True, "false": False, "true": True}


def _text_value(text: str, rtype: ResourceType | None, path: str) -> Value:
    """A text/plain value (LwM2M Core Appendix C)."""
    if rtype is None or rtype in _TEXTUAL:
        return text
    if rtype in _INTEGRAL:
        if _INT_TEXT.fullmatch(text) is None:
            raise FormatError(f"{path}: not an integer: {text[:40]!r}")
        return _coerce(int(text), rtype, path)
    if rtype is _T.FLOAT:
        if len(text) > 400 or _FLOAT_TEXT.fullmatch(text) is None:
            raise FormatError(f"{path}: not a decimal number: {text[:40]!r}")
        number = float(text)
        if not math.isfinite(number):
            raise FormatError(f"{path}: {text[:40]!r} is out of range for a Float")
        return number
    if rtype is _T.BOOLEAN:
        flag = _BOOL_TEXT.get(text)
        if flag is None:
            raise FormatError(f"{path}: not a boolean (0/1): {text[:40]!r}")
        return flag
    if rtype is _T.OPAQUE:
        return _b64decode(text, path)
    return ObjLink.parse(text)


def _text_out(value: Value, path: str) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FormatError(f"{path}: {value} has no text representation")
        return repr(value)
    if isinstance(value, bytes):
        return _b64(value)
    return str(value)


# -- OMA-TLV (11542) --------------------------------------------------------------------------

_OBJECT_INSTANCE, _RESOURCE_INSTANCE, _MULTIPLE_RESOURCE, _RESOURCE = 0, 1, 2, 3
_TLV_NAMES = ("object instance", "resource instance", "multiple resource", "resource")
_TLV_CHILDREN = {None: (0, 1, 2, 3), _OBJECT_INSTANCE: (_RESOURCE, _MULTIPLE_RESOURCE),
                 _MULTIPLE_RESOURCE: (_RESOURCE_INSTANCE,)}


@dataclass(slots=True)
class _Tlv:
    kind: int
    ident: int
    value: bytes
    children: list[_Tlv]


def _tlv_parse(data: bytes, start: int, end: int, parent: int | None) -> list[_Tlv]:
    items: list[_Tlv] = []
    allowed = _TLV_CHILDREN[parent]
    pos = start
    while pos < end:
        at = pos
        type_byte = data[pos]
        kind = type_byte >> 6
        if kind not in allowed:
            raise FormatError(f"TLV at offset {at}: a {_TLV_NAMES[kind]} cannot be inside a "
                              f"{_TLV_NAMES[parent] if parent is not None else 'payload'}")
        id_size = 2 if type_byte & 0x20 else 1
        len_size = (type_byte >> 3) & 3
        pos += 1
        if pos + id_size + len_size > end:
            raise FormatError(f"TLV at offset {at}: truncated header")
        ident = int.from_bytes(data[pos:pos + id_size], "big")
        pos += id_size
        length = int.from_bytes(data[pos:pos + len_size], "big") if len_size else type_byte & 7
        pos += len_size
        if pos + length > end:
            raise FormatError(f"TLV at offset {at}: length {length} exceeds the "
                              f"{end - pos} bytes left")
        if kind in (_OBJECT_INSTANCE, _MULTIPLE_RESOURCE):
            items.append(_Tlv(kind, ident, b"", _tlv_parse(data, pos, pos + length, kind)))
        else:
            items.append(_Tlv(kind, ident, data[pos:pos + length], []))
        pos += length
    return items


def _tlv_anchor(base: tuple[int, ...], parent_depth: int, item: _Tlv) -> tuple[int, ...]:
    """The ids of a top-level `item` (whose parent sits at `parent_depth`) for a request on
    `base`: below it, or `base` itself when the TLV repeats the last id."""
    if len(base) == parent_depth:
        return (*base, item.ident)
    if len(base) == parent_depth + 1 and base[-1] == item.ident:
        return base
    raise FormatError(f"TLV {_TLV_NAMES[item.kind]} {item.ident} does not fit the path "
                      f"{format_path(base)}")


def _tlv_value(raw: bytes, rtype: ResourceType | None, path: str) -> Value:
    """A TLV value (LwM2M Core Appendix C); an unknown resource's is the raw bytes."""
    size = len(raw)
    if rtype is None or rtype is _T.OPAQUE:
        return raw
    if rtype in _TEXTUAL:
        return _utf8_text(raw, path)
    if rtype in _INTEGRAL:
        if size not in (1, 2, 4, 8):
            raise FormatError(f"{path}: {size}-byte integer (expected 1, 2, 4 or 8 bytes)")
        return int.from_bytes(raw, "big", signed=rtype is not _T.UNSIGNED_INTEGER)
    if rtype is _T.FLOAT:
        if size == 4:
            return float(_F32.unpack(raw)[0])
        if size == 8:
            return float(_F64.unpack(raw)[0])
        raise FormatError(f"{path}: {size}-byte float (expected 4 or 8 bytes)")
    if rtype is _T.BOOLEAN:
        if size != 1 or raw[0] > 1:
            raise FormatError(f"{path}: boolean must be one byte 0 or 1, got {raw.hex()}")
        return raw[0] == 1
    if size != 4:
        raise FormatError(f"{path}: {size}-byte object link (expected 4 bytes)")
    return ObjLink(int.from_bytes(raw[:2], "big"), int.from_bytes(raw[2:], "big"))


def _tlv_decode(data: bytes, base: tuple[int, ...], registry: Registry) -> list[Record]:
    if not base:
        raise FormatError("TLV needs a request path of at least an object (/3)")
    out: list[Record] = []

    def leaf(ids: tuple[int, ...], raw: bytes) -> None:
        path = format_path(ids)
        out.append(Record(path, _tlv_value(raw, _rtype(registry, ids), path)))

    def resource(ids: tuple[int, ...], item: _Tlv) -> None:
        if item.kind == _MULTIPLE_RESOURCE:
            for inst in item.children:
                leaf((*ids, inst.ident), inst.value)
        else:
            leaf(ids, item.value)

    for item in _tlv_parse(data, 0, len(data), None):
        if item.kind == _OBJECT_INSTANCE:
            inst_ids = _tlv_anchor(base, 1, item)
            for child in item.children:
                resource((*inst_ids, child.ident), child)
        elif item.kind == _RESOURCE_INSTANCE:
            leaf(_tlv_anchor(base, 3, item), item.value)
        else:
            resource(_tlv_anchor(base, 2, item), item)
    return out


def _tlv(kind: int, ident: int, body: bytes) -> bytes:
    type_byte = kind << 6
    ident_bytes = ident.to_bytes(2 if ident > 0xFF else 1, "big")
    if ident > 0xFF:
        type_byte |= 0x20
    size = len(body)
    if size < 8:
        type_byte |= size
        size_bytes = b""
    elif size < 1 << 24:
        len_size = 1 if size < 1 << 8 else 2 if size < 1 << 16 else 3
        type_byte |= len_size << 3
        size_bytes = size.to_bytes(len_size, "big")
    else:
        raise FormatError(f"TLV value of {size} bytes exceeds the 24-bit length field")
    return bytes((type_byte,)) + ident_bytes + size_bytes + body


def _tlv_bytes(value: Value, rtype: ResourceType, path: str) -> bytes:
    if isinstance(value, str):
        return _utf8_bytes(value, path)
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        signed = rtype is not _T.UNSIGNED_INTEGER
        for size in (1, 2, 4, 8):
            try:
                return value.to_bytes(size, "big", signed=signed)
            except OverflowError:
                continue
        raise FormatError(f"{path}: integer {value} does not fit in 8 bytes")
    if isinstance(value, float):
        try:
            packed = _F32.pack(value)
        except OverflowError:
            return _F64.pack(value)
        return packed if _F32.unpack(packed)[0] == value else _F64.pack(value)
    if isinstance(value, ObjLink):
        return value.obj.to_bytes(2, "big") + value.inst.to_bytes(2, "big")
    return value


@dataclass(slots=True)
class _TlvResource:
    multiple: bool
    value: bytes = b""
    instances: dict[int, bytes] = field(default_factory=dict)

    def encode(self, rid: int) -> bytes:
        if not self.multiple:
            return _tlv(_RESOURCE, rid, self.value)
        body = b"".join(_tlv(_RESOURCE_INSTANCE, ri, raw)
                        for ri, raw in sorted(self.instances.items()))
        return _tlv(_MULTIPLE_RESOURCE, rid, body)


def _tlv_encode(records: Sequence[Record], base: tuple[int, ...], registry: Registry) -> bytes:
    if not base:
        raise FormatError("TLV needs a request path of at least an object (/3)")
    instances: dict[int, dict[int, _TlvResource]] = {}
    for record in records:
        ids, rtype, value = _typed(record, registry)
        if ids[:len(base)] != base:
            raise FormatError(f"{record.path} is not under the request path "
                              f"{format_path(base)}")
        multiple = len(ids) == 4
        rdef = registry.resource(ids[0], ids[2])
        if rdef is not None and rdef.multiple != multiple:
            kind = "multiple" if rdef.multiple else "single"
            raise FormatError(f"{record.path}: resource {ids[2]} is {kind}-instance")
        raw = _tlv_bytes(value, rtype, record.path)
        resources = instances.setdefault(ids[1], {})
        res = resources.get(ids[2])
        if res is None:
            res = resources[ids[2]] = _TlvResource(multiple)
        elif not (multiple and res.multiple) or ids[3] in res.instances:
            raise FormatError(f"{record.path}: duplicate or conflicting record")
        if multiple:
            res.instances[ids[3]] = raw
        else:
            res.value = raw
    if len(base) == 1:
        return b"".join(
            _tlv(_OBJECT_INSTANCE, iid,
                 b"".join(res.encode(rid) for rid, res in sorted(resources.items())))
            for iid, resources in sorted(instances.items()))
    resources = instances.get(base[1], {})
    if len(base) == 2:
        return b"".join(res.encode(rid) for rid, res in sorted(resources.items()))
    res = resources.get(base[2])
    if res is None:
        return b""
    if len(base) == 3:
        return res.encode(base[2])
    return _tlv(_RESOURCE_INSTANCE, base[3], res.instances[base[3]])


# -- SenML JSON (110) / SenML CBOR (112) / OMA-JSON (11543) -----------------------------------

_SENML_LABELS = {-1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs", 0: "n", 1: "u",
                 2: "v", 3: "vs", 4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd"}
_SENML_CBOR_KEYS = {name: label for label, name in _SENML_LABELS.items()}
_SENML_VALUES = ("v", "vs", "vb", "vd", "vlo")
_SENML_UNSUPPORTED = ("bv", "bs", "s")
_OMAJSON_VALUES = ("v", "sv", "bv", "ov")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_load(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what}: not valid JSON ({exc})") from None


def _json_dump(doc: Any, path: str) -> bytes:
    try:
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise FormatError(f"{path}: {exc}") from None
    return _utf8_bytes(text, path)


def _cbor_load(data: bytes, what: str) -> Any:
    try:
        return cbor.loads(data)
    except cbor.CborError as exc:
        raise FormatError(f"{what}: {exc}") from None


def _cbor_dump(doc: Any, path: str) -> bytes:
    try:
        return cbor.dumps(doc)
    except cbor.CborError as exc:
        raise FormatError(f"{path}: {exc}") from None


def _name(prefix: str, name: object, what: str) -> tuple[int, ...]:
    if not isinstance(name, str):
        raise FormatError(f"{what}: name is a {_kind(name)}, not a string")
    full = prefix + name
    if not full:
        raise FormatError(f"{what}: no name (bn/n)")
    try:
        return _resource_ids(full)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None


def _field(key: str, item: object, what: str, path: str, *, binary: bool = False,
           opaque_text: bool = False) -> object:
    """The value of a SenML (v vs vb vd vlo) or OMA-JSON (v sv bv ov) value field;
    `opaque_text`: an OMA-JSON "sv" holding base64 for an Opaque resource."""
    if key == "v":
        return _number(item, f"{what} v", finite=not binary)
    if key in ("vb", "bv"):
        if isinstance(item, bool):
            return item
        raise FormatError(f"{what}: {key} is a {_kind(item)}, not a boolean")
    if key == "vd" and binary:
        if isinstance(item, bytes):
            return item
        raise FormatError(f"{what}: vd is a {_kind(item)}, not bytes")
    if not isinstance(item, str):
        raise FormatError(f"{what}: {key} is a {_kind(item)}, not a string")
    if key == "vd" or (key == "sv" and opaque_text):
        return _b64decode(item, path)
    if key in ("vlo", "ov"):
        return ObjLink.parse(item)
    return item


def _senml_decode(pack: Any, registry: Registry, now: float, *, binary: bool) -> list[Record]:
    if not isinstance(pack, list):
        raise FormatError(f"SenML: expected an array of records, got {_kind(pack)}")
    base_name: str = ""
    base_time: int | float | None = None
    out: list[Record] = []
    for index, raw in enumerate(pack):
        what = f"SenML record {index}"
        if not isinstance(raw, dict):
            raise FormatError(f"{what}: not a map")
        rec: dict[str, Any] = {}
        for key, item in raw.items():
            if binary and isinstance(key, int) and not isinstance(key, bool):
                key = _SENML_LABELS.get(key, key)
            if isinstance(key, str):
                if key.endswith("_") or key in _SENML_UNSUPPORTED:
                    raise FormatError(f"{what}: unsupported field {key!r}")
                rec[key] = item
        if "bn" in rec:
            if not isinstance(rec["bn"], str):
                raise FormatError(f"{what}: bn is a {_kind(rec['bn'])}, not a string")
            base_name = rec["bn"]
        if "bt" in rec:
            base_time = _number(rec["bt"], f"{what} bt")
        ids = _name(base_name, rec.get("n", ""), what)
        path = format_path(ids)
        present = [key for key in _SENML_VALUES if key in rec]
        if len(present) != 1:
            raise FormatError(f"{what} ({path}): " + (
                "no value (v, vs, vb, vd or vlo)" if not present else
                f"several values ({', '.join(present)})"))
        value = _field(present[0], rec[present[0]], f"{what} ({path})", path, binary=binary)
        offset = _number(rec["t"], f"{what} t") if "t" in rec else None
        time = _resolve_time(base_time, offset, now)
        out.append(Record(path, _coerce(value, _rtype(registry, ids), path), time))
    return out


def _base_name(base: tuple[int, ...], all_ids: list[tuple[int, ...]]) -> tuple[str, int]:
    """SenML/OMA-JSON base name for records below `base` and how many ids it covers: the
    request path, or its parent when a record is the request path itself."""
    for ids in all_ids:
        if ids[:len(base)] != base:
            raise FormatError(f"{format_path(ids)} is not under the request path "
                              f"{format_path(base)}")
    cut = len(base) if all(len(ids) > len(base) for ids in all_ids) else len(base) - 1
    return ("/" if cut == 0 else format_path(base[:cut]) + "/"), cut


def _senml_encode(records: Sequence[Record], typed: list[_Typed], bn: str, cut: int, *,
                  binary: bool) -> bytes:
    pack: list[dict[Any, Any]] = []
    for index, (record, (ids, _, value)) in enumerate(zip(records, typed, strict=True)):
        item: dict[str, Any] = {}
        if index == 0:
            item["bn"] = bn
        item["n"] = "/".join(map(str, ids[cut:]))
        if record.time is not None:
            item["t"] = _time_out(record.time, record.path)
        if isinstance(value, bool):
            item["vb"] = value
        elif isinstance(value, int | float):
            if not binary and isinstance(value, float) and not math.isfinite(value):
                raise FormatError(f"{record.path}: {value} cannot be sent in SenML JSON")
            item["v"] = value
        elif isinstance(value, str):
            item["vs"] = value
        elif isinstance(value, bytes):
            item["vd"] = value if binary else (
                base64.urlsafe_b64encode(value).decode("ascii").rstrip("="))
        else:
            item["vlo"] = str(value)
        pack.append({_SENML_CBOR_KEYS.get(k, k): v for k, v in item.items()} if binary
                    else {**item})
    path = format_path(typed[0][0]) if typed else "/"
    return _cbor_dump(pack, path) if binary else _json_dump(pack, path)


def _omajson_decode(doc: Any, base: tuple[int, ...], registry: Registry,
                    now: float) -> list[Record]:
    if not isinstance(doc, dict) or not isinstance(doc.get("e"), list):
        raise FormatError('LwM2M JSON: expected an object with an "e" array')
    bn = doc.get("bn", "/" if not base else format_path(base) + "/")
    if not isinstance(bn, str):
        raise FormatError(f"LwM2M JSON: bn is a {_kind(bn)}, not a string")
    base_time = _number(doc["bt"], "LwM2M JSON bt") if "bt" in doc else None
    out: list[Record] = []
    for index, entry in enumerate(doc["e"]):
        what = f"LwM2M JSON entry {index}"
        if not isinstance(entry, dict):
            raise FormatError(f"{what}: not an object")
        ids = _name(bn, entry.get("n", ""), what)
        path = format_path(ids)
        rtype = _rtype(registry, ids)
        present = [key for key in _OMAJSON_VALUES if key in entry]
        if len(present) != 1:
            raise FormatError(f"{what} ({path}): " + (
                "no value (v, sv, bv or ov)" if not present else
                f"several values ({', '.join(present)})"))
        value = _field(present[0], entry[present[0]], f"{what} ({path})", path,
                       opaque_text=rtype is _T.OPAQUE)
        offset = _number(entry["t"], f"{what} t") if "t" in entry else None
        time = _resolve_time(base_time, offset, now)
        out.append(Record(path, _coerce(value, rtype, path), time))
    return out


def _omajson_encode(records: Sequence[Record], typed: list[_Typed], bn: str,
                    cut: int) -> bytes:
    entries: list[dict[str, Any]] = []
    for record, (ids, _, value) in zip(records, typed, strict=True):
        entry: dict[str, Any] = {"n": "/".join(map(str, ids[cut:]))}
        if isinstance(value, bool):
            entry["bv"] = value
        elif isinstance(value, int | float):
            if isinstance(value, float) and not math.isfinite(value):
                raise FormatError(f"{record.path}: {value} cannot be sent in LwM2M JSON")
            entry["v"] = value
        elif isinstance(value, str):
            entry["sv"] = value
        elif isinstance(value, bytes):
            entry["sv"] = _b64(value)
        else:
            entry["ov"] = str(value)
        if record.time is not None:
            entry["t"] = _time_out(record.time, record.path)
        entries.append(entry)
    return _json_dump({"bn": bn, "e": entries}, bn)


# -- CBOR single value (60) -------------------------------------------------------------------


def _cbor_value(item: Any, rtype: ResourceType | None, path: str) -> Value:
    """LwM2M 1.1 CBOR: Time may be tagged (1: epoch seconds, 0: RFC 3339 text), Objlnk and
    Corelnk are text strings."""
    if isinstance(item, cbor.Tag):
        if item.number == 1 and _is_number(item.value):
            item = _number(item.value, path)
        elif item.number == 0 and isinstance(item.value, str):
            try:
                stamp = datetime.fromisoformat(item.value)
                if stamp.tzinfo is None:
                    stamp = stamp.replace(tzinfo=UTC)
                item = int(stamp.timestamp())
            except (ValueError, OverflowError, OSError):
                raise FormatError(f"{path}: not an RFC 3339 time: {item.value[:40]!r}") from None
        else:
            raise FormatError(f"{path}: unsupported CBOR tag {item.number}")
        rtype = rtype or _T.TIME
    elif item is None or isinstance(item, list | dict):
        raise FormatError(f"{path}: a CBOR {_kind(item)} is not a single value")
    elif isinstance(item, int) and not isinstance(item, bool):
        item = _number(item, path)
    if isinstance(item, str) and rtype is _T.OBJLNK:
        item = ObjLink.parse(item)
    return _coerce(item, rtype, path)


def _cbor_out(value: Value, rtype: ResourceType) -> Any:
    if rtype is _T.TIME:
        return cbor.Tag(1, value)
    if isinstance(value, ObjLink):
        return str(value)
    return value


# -- link-format (40) -------------------------------------------------------------------------

_PARMNAME = re.compile(r"[A-Za-z0-9!#$&+\-.^_`|~*]+")
_PTOKEN = re.compile(r"[!#$%&'()*+\-./0-9:<=>?@A-Z\[\]^_`a-z{|}~]+")
_QUOTED_ATTRIBUTES = frozenset({"rt", "if", "rel", "rev", "anchor", "title"})
_SPACE = " \t\r\n"
_NOT_IN_TARGET = frozenset(_SPACE + '<>"')


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _SPACE:
        pos += 1
    return pos


def _quoted(text: str, pos: int) -> tuple[str, int]:
    """The quoted-string starting at text[pos] == '"', unescaped, and the offset after it."""
    out: list[str] = []
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == '"':
            return "".join(out), pos + 1
        if char == "\\":
            pos += 1
            if pos == len(text):
                break
            char = text[pos]
        out.append(char)
        pos += 1
    raise FormatError("link-format: unterminated quoted string")


def parse_links(payload: str | bytes) -> list[Link]:
    """RFC 6690 link-format (Register/Update payloads, Discover responses). Whitespace between
    links and parameters and a trailing comma are tolerated; a repeated parameter keeps its
    first value."""
    text = _utf8_text(bytes(payload), "link-format") if not isinstance(payload, str) else payload
    links: list[Link] = []
    pos = _skip_space(text, 0)
    while pos < len(text):
        if text[pos] != "<":
            raise FormatError(f"link-format: expected '<' at offset {pos}")
        end = text.find(">", pos + 1)
        if end < 0:
            raise FormatError(f"link-format: unterminated '<' at offset {pos}")
        path = text[pos + 1:end]
        if any(c in _NOT_IN_TARGET for c in path):
            raise FormatError(f"link-format: bad character in the target at offset {pos}")
        attributes: dict[str, str | None] = {}
        pos = _skip_space(text, end + 1)
        while pos < len(text) and text[pos] == ";":
            pos = _skip_space(text, pos + 1)
            m = _PARMNAME.match(text, pos)
            if m is None:
                raise FormatError(f"link-format: expected a parameter name at offset {pos}")
            name, pos = m.group(), m.end()
            value: str | None = None
            if pos < len(text) and text[pos] == "=":
                pos += 1
                if pos < len(text) and text[pos] == '"':
                    value, pos = _quoted(text, pos)
                else:
                    m = _PTOKEN.match(text, pos)
                    if m is None:
                        raise FormatError(f"link-format: expected a value at offset {pos}")
                    value, pos = m.group(), m.end()
            attributes.setdefault(name, value)
            pos = _skip_space(text, pos)
        links.append(Link(path, attributes))
        if pos < len(text):
            if text[pos] != ",":
                raise FormatError(f"link-format: expected ',' or ';' at offset {pos}")
            pos = _skip_space(text, pos + 1)
    return links


def format_links(links: Iterable[Link]) -> str:
    """Link-format text for `links`; values are quoted when they are not tokens and for rt,
    if, rel, rev, anchor and title (`</>;rt="oma.lwm2m";ct=11543`)."""
    parts: list[str] = []
    for link in links:
        if any(c in _NOT_IN_TARGET for c in link.path):
            raise FormatError(f"link-format: cannot write the target {link.path!r}")
        part = f"<{link.path}>"
        for name, value in link.attributes.items():
            if _PARMNAME.fullmatch(name) is None:
                raise FormatError(f"link-format: bad parameter name {name!r}")
            if value is None:
                part += f";{name}"
            elif name in _QUOTED_ATTRIBUTES or _PTOKEN.fullmatch(value) is None:
                escaped = value.replace("\\", "\\\\").replace('"', '\\"')
                part += f';{name}="{escaped}"'
            else:
                part += f";{name}={value}"
        parts.append(part)
    return ",".join(parts)


# -- telemetry JSON ---------------------------------------------------------------------------


def json_value(value: Value) -> Any:
    """A value as telemetry JSON: Opaque -> base64, Objlnk -> "obj:inst", inf/NaN -> None."""
    if isinstance(value, bytes):
        return _b64(value)
    if isinstance(value, ObjLink):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(records: Iterable[Record]) -> dict[str, Any]:
    """The flat telemetry object (module docstring): newest value per path, "_time"."""
    values: dict[str, Any] = {}
    ranks: dict[str, float] = {}
    for record in records:
        rank = math.inf if record.time is None else record.time
        if rank < ranks.get(record.path, -math.inf):
            continue
        values[record.path] = json_value(record.value)
        ranks[record.path] = rank
    times = [rank for rank in ranks.values() if rank != math.inf]
    if times:
        newest = max(times)
        values["_time"] = int(newest) if newest.is_integer() else newest
    return values


def split_by_time(records: Iterable[Record]) -> list[list[Record]]:
    """`records` grouped by measurement time, oldest first, untimed (current) values last."""
    groups: dict[float | None, list[Record]] = {}
    for record in records:
        groups.setdefault(record.time, []).append(record)
    return [groups[t] for t in sorted(groups, key=lambda t: (t is None, t or 0.0))]


def from_json(data: Mapping[str, Any], registry: Registry) -> list[Record]:
    """Records from a telemetry-shaped object ({"/3311/0/5850": true, ...}, optional "_time"):
    values typed from the registry; a string is parsed by the text/plain rules for non-string
    resources (Opaque as base64, Objlnk as "obj:inst", booleans also as "true"/"false")."""
    if not isinstance(data, Mapping):
        raise FormatError(f"expected an object keyed by LwM2M paths, got {_kind(data)}")
    time: float | None = None
    if "_time" in data:
        time = float(_number(data["_time"], "_time"))
    out: list[Record] = []
    for key, raw in data.items():
        if key == "_time":
            continue
        ids = _resource_ids(key)
        path = format_path(ids)
        rtype = _rtype(registry, ids)
        value: object = raw
        if isinstance(raw, str) and rtype is not None and rtype not in _TEXTUAL:
            value = _text_value(raw, rtype, path)
        elif isinstance(raw, int) and not isinstance(raw, bool):
            value = _number(raw, path)
        elif not isinstance(raw, bool | float | str):
            raise FormatError(f"{path}: a JSON {_kind(raw)} is not an LwM2M value")
        out.append(Record(path, _coerce(value, rtype, path), time))
    return out
