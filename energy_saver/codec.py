"""BCL codecs: a validated template (energy_saver.bcl) -> decoder and encoder of payloads.

Called by the translator (hot path: `Codec.decode`), the templates API's test endpoint, the
CLI and sdk_examples (`Codec.encode`, the device side).

Each payload selector gets a `construct` field codec (`FormatField` for numbers, `Flag`,
`Bytes`); they define the wire format once: the encoder builds with them, the reference
decoder parses with them. For speed (ADR 0006) a template is compiled, per execution path
(the cases its switches take), into a plan: the path's fixed-position fields fused into one
`struct.Struct` whose format is derived from those construct codecs, a list of conversions,
and a prebuilt output shape. No user text is ever executed: asset names only become dict
keys. The reference decoder (`decode_reference`) walks the AST in template order; it
produces the exact 1NCE error for a payload too short, and is the oracle of the property
tests. Decoding raises only `DecodeError`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from typing import Any

import construct as cs

from energy_saver.bcl import NUMERIC, Anchor, Case, Constant, Kind, Mapping, Read, Switch
from energy_saver.bcl import Template as Ast

INLINE_CASES = 8
"""A single switch with at most this many cases (+ no case) gets its paths inline."""
MAX_PLANS = 256
"""Compiled execution paths kept per template; beyond, the reference decoder runs."""

_F32 = struct.Struct("<f")
_INT_CODES = {1: "b", 2: "h", 4: "l", 8: "q"}
_FLOAT_CODES = {4: "f", 8: "d"}


class DecodeError(ValueError):
    """A payload the template cannot translate; `str()` is the 1NCE description
    (`Asset path:Humidity, Error: can't extract [2:4] from 2 bytes`)."""


class EncodeError(ValueError):
    """Values the template cannot encode (missing, out of range, conflicting)."""


Position = tuple[float, float]
Decoded = tuple[dict[str, Any], Position | None]
"""`decode`'s result: the translated JSON object and the (lat, long) of the `custom_type`
fields when both were decoded."""


# -- numbers as 1NCE prints them -----------------------------------------------------------


_F32_MIN_NORMAL = 1.1754943508222875e-38


def f32_shortest(x: float) -> float:
    """The float32 `x` (widened) -> the shortest decimal that reads back as the same float32
    (how 1NCE prints float32: 0x424bbcf9 -> 50.934544); among equally short ones, the
    closest.

    For normal numbers two decimals of at most 6 significant digits are farther apart than
    a float32 ulp, so if `%.6g` reads back it is the shortest; otherwise 7, 8, then 9 digits
    (which always read back) are tried, each the closest of its length. Subnormals have
    fewer bits: a binary search over 1..9 digits."""
    if not math.isfinite(x) or x == 0.0:
        return x
    if abs(x) >= _F32_MIN_NORMAL:
        for digits in ("%.6g", "%.7g", "%.8g"):
            y = float(digits % x)
            try:
                if _F32.unpack(_F32.pack(y))[0] == x:
                    return y
            except OverflowError:
                pass
        return float("%.9g" % x)  # noqa: UP031 - %-format: the fastest float formatting
    lo, hi = 1, 9
    while lo < hi:
        mid = (lo + hi) // 2
        if _F32.unpack(_F32.pack(float(f"{x:.{mid}g}")))[0] == x:
            hi = mid
        else:
            lo = mid + 1
    return float(f"{x:.{lo}g}")


def js_number(x: float) -> float | int | None:
    """A float as JSON.stringify renders it: NaN/Infinity -> null, integral values as
    integers (26.0 -> 26, -0.0 -> 0)."""
    if not math.isfinite(x):
        return None
    if x.is_integer() and abs(x) < 1e21:
        return int(x)
    return x


def _f32_value(x: float) -> float | int | None:
    return js_number(f32_shortest(x))


def _text(raw: bytes) -> str:
    """UTF-8, invalid sequences replaced, C padding (trailing NULs) removed."""
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _any_set(raw: bytes) -> bool:
    return raw.count(0) != len(raw)


# -- field codecs --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """One selector's wire codec: the construct object and its conversion to JSON."""

    read: Read
    codec: Any
    """A construct: FormatField, Flag, Bytes(n) or GreedyBytes (variable range)."""
    convert: Callable[[Any], Any] | None
    """Parsed construct value -> JSON value (None: as parsed)."""

    @property
    def code(self) -> str:
        """The `struct` code of this field in a fused format (fixed-size fields only)."""
        if isinstance(self.codec, cs.FormatField):
            return str(self.codec.fmtstr[1:])
        if self.codec is cs.Flag:
            return "?"
        return f"{self.read.length}s"

    @property
    def little(self) -> bool | None:
        """Byte order the field needs in a fused format; None if it has none."""
        if isinstance(self.codec, cs.FormatField) and self.read.length > 1:
            return self.read.little
        return None

    def value(self, payload: bytes, name: str) -> Any:
        """Reference read: bounds-check the span, parse with construct, convert."""
        size = len(payload)
        s, e = self.read.span(size)
        if s < 0 or e > size or e < s:
            raise DecodeError(f"Asset path:{name}, Error: can't extract [{s}:{e}] "
                              f"from {size} bytes")
        parsed = self.codec.parse(payload[s:e])
        return parsed if self.convert is None else self.convert(parsed)

    def build(self, value: Any, name: str) -> bytes:
        """JSON value -> the field's bytes (the encoder)."""
        r = self.read
        try:
            if r.kind in (Kind.INT, Kind.UINT):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                if not isinstance(value, int) or isinstance(value, bool):
                    raise EncodeError(f"{name}: {value!r} is not an integer")
                return bytes(self.codec.build(value))
            if r.kind is Kind.FLOAT:
                if value is None:
                    value = math.nan
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise EncodeError(f"{name}: {value!r} is not a number")
                return bytes(self.codec.build(float(value)))
            if r.kind is Kind.BOOLEAN:
                if not isinstance(value, bool):
                    raise EncodeError(f"{name}: {value!r} is not a boolean")
                n = max(1, r.length)
                return b"\0" * (n - 1) + (b"\1" if value else b"\0")
            if r.kind is Kind.STRING:
                if not isinstance(value, str):
                    raise EncodeError(f"{name}: {value!r} is not a string")
                data = value.encode()
                if r.anchor is Anchor.RANGE:
                    return data
                if len(data) > r.length:
                    raise EncodeError(f"{name}: {len(data)} bytes of UTF-8 do not fit "
                                      f"{r.length}")
                return bytes(cs.PaddedString(r.length, "utf8").build(value))
            if not isinstance(value, str):
                raise EncodeError(f"{name}: {value!r} is not a hex string")
            data = bytes.fromhex(value)
            if r.anchor is not Anchor.RANGE and len(data) != r.length:
                raise EncodeError(f"{name}: hex of {len(data)} bytes, expected {r.length}")
            return data
        except (cs.ConstructError, ValueError, OverflowError, struct.error) as exc:
            if isinstance(exc, EncodeError):
                raise
            raise EncodeError(f"{name}: {value!r} does not fit {r.kind.value} of "
                              f"{r.length} bytes") from None


def field(read: Read) -> Field:
    """The construct codec of one payload selector."""
    n, kind = read.length, read.kind
    endian = "<" if read.little else ">"
    if kind in (Kind.INT, Kind.UINT):
        code = _INT_CODES[n]
        return Field(read, cs.FormatField(endian, code if kind is Kind.INT else code.upper()),
                     None)
    if kind is Kind.FLOAT:
        return Field(read, cs.FormatField(endian, _FLOAT_CODES[n]),
                     _f32_value if n == 4 else js_number)
    greedy = read.anchor is Anchor.RANGE
    raw = cs.GreedyBytes if greedy else cs.Bytes(n)
    if kind is Kind.BOOLEAN:
        if n == 1 and not greedy:
            return Field(read, cs.Flag, None)
        return Field(read, raw, _any_set)
    if kind is Kind.STRING:
        return Field(read, raw, _text)
    return Field(read, raw, bytes.hex)


# -- output ------------------------------------------------------------------------------


def set_path(out: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    """Write `value` at a dot path; a non-object on the way is replaced by an object
    (later assignments win, like lodash `set`)."""
    d = out
    for p in parts[:-1]:
        nxt = d.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            d[p] = nxt
        d = nxt
    d[parts[-1]] = value


def _match(switch: Switch, value: Any) -> int:
    """Index in `switch.cases` of the case taken for `value`, -1 if none."""
    for i, case in enumerate(switch.cases):
        m = case.match
        if m is None or (m == value and isinstance(m, bool) == isinstance(value, bool)):
            return i
    return -1


def decode_reference(ast: Ast, payload: bytes) -> Decoded:
    """Walk the template in order, reading each field with its construct codec."""
    out: dict[str, Any] = {}
    pos: dict[str, Any] = {}

    def run(block: Sequence[Mapping | Switch]) -> None:
        for st in block:
            if isinstance(st, Mapping):
                v: Any = st.value
                if isinstance(v, Read):
                    v = field(v).value(payload, st.asset)
                set_path(out, st.parts, v)
                if st.custom_type:
                    pos[st.custom_type] = v
            else:
                i = _match(st, field(st.read).value(payload, st.read.where))
                if i >= 0:
                    run(st.cases[i].body)

    run(ast.sense)
    return out, _position(pos.get("location_lat"), pos.get("location_long"))


def _position(lat: Any, lon: Any) -> Position | None:
    if isinstance(lat, int | float) and isinstance(lon, int | float):
        return float(lat), float(lon)
    return None


# -- compiled execution paths ----------------------------------------------------------------


class _Leaf:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


DecodeFn = Callable[[bytes], "Decoded"]


class _Source:
    """Python source for one compiled function, from our own tokens only.

    Everything taken from the template (asset names, constants, conversions, structs) is
    bound as a variable of the namespace (`K3`, `C0`, `S1`...); the source itself holds only
    identifiers made here and integers formatted with `%d`. It runs with no builtins."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ns: dict[str, Any] = {"N": len}
        self.depth = 0
        """Indentation of emitted lines, in blocks."""

    def bind(self, prefix: str, value: Any) -> str:
        name = f"{prefix}{len(self.ns)}"
        self.ns[name] = value
        return name

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def function(self, name: str) -> Any:
        src = f"def {name}(b):\n" + "".join(f"    {line}\n" for line in self.lines)
        scope: dict[str, Any] = {"__builtins__": {}, **self.ns}
        exec(compile(src, f"<bcl {name}>", "exec"), scope)  # noqa: S102 - no user text
        return scope[name]


def _d(n: int) -> str:
    return "%d" % int(n)  # noqa: UP031 - integers only, by construction


def _compile_plan(mappings: list[Mapping], short: DecodeFn) -> DecodeFn:
    """One execution path -> `f(payload) -> (value, position)`; `short(payload)` answers
    payloads too short for it (the reference decoder: it names the field)."""
    src = _Source()
    _emit_plan(src, mappings, src.bind("E", short))
    fn: DecodeFn = src.function("plan")
    return fn


def _emit_plan(src: _Source, mappings: list[Mapping], short: str) -> None:
    """Emit the statements decoding one execution path, ending in its `return`.

    The path's fixed-offset fields are fused into as few `struct.Struct`s as possible; their
    formats are the construct codecs' (`Field.code`). Byte-string conversions are inlined."""
    reads = [(i, field(m.value)) for i, m in enumerate(mappings) if isinstance(m.value, Read)]
    var = {i: f"v{_d(i)}" for i, _ in reads}
    src.emit("n = N(b)")
    min_size = max((f.read.min_size for _, f in reads), default=0)
    if min_size:
        src.emit(f"if n < {_d(min_size)}:")
        src.emit(f"    return {short}(b)")
    for s, off, members in _fuse([(i, f, f.read.start) for i, f in reads
                                  if f.read.anchor is Anchor.START]):
        targets = "".join(var[i] + ", " for i in members)
        src.emit(f"{targets}= {src.bind('S', s)}.unpack_from(b, {_d(off)})")
    back = max((-f.read.start for _, f in reads if f.read.anchor is Anchor.END), default=0)
    for s, off, members in _fuse([(i, f, back + f.read.start) for i, f in reads
                                  if f.read.anchor is Anchor.END]):
        targets = "".join(var[i] + ", " for i in members)
        src.emit(f"{targets}= {src.bind('S', s)}.unpack_from(b, n - {_d(back - off)})")
    for i, f in reads:
        if f.read.anchor is Anchor.RANGE:
            src.emit(f"{var[i]} = b[{_d(f.read.start)}:n - {_d(-f.read.end)}]")
    expr: dict[int, str] = {}
    for i, m in enumerate(mappings):
        if not isinstance(m.value, Read):
            expr[i] = src.bind("C", m.value)
            continue
        expr[i] = _convert_expr(src, field(m.value), var[i])
    shape: dict[str, Any] = {}
    lat = lon = None
    for i, m in enumerate(mappings):
        if m.custom_type is not None and isinstance(m.value, Read):
            src.emit(f"{var[i]} = {expr[i]}")  # converted once: output and position
            expr[i] = var[i]
            if m.custom_type == "location_lat":
                lat = var[i]
            else:
                lon = var[i]
        set_path(shape, m.parts, _Leaf(i))
    position = "None" if lat is None or lon is None else (
        f"{src.bind('P', _position)}({lat}, {lon})")

    def literal(node: dict[str, Any]) -> str:
        items = (f"{src.bind('K', k)}: " + (expr[v.index] if isinstance(v, _Leaf)
                                            else literal(v)) for k, v in node.items())
        return "{" + ", ".join(items) + "}"

    src.emit(f"return {literal(shape)}, {position}")


def _convert_expr(src: _Source, f: Field, v: str) -> str:
    """The expression converting a fused field's raw value `v` to its JSON value."""
    if f.convert is None:
        return v
    if f.convert is _text:
        nul, utf8 = src.bind("Z", b"\0"), src.bind("U", "utf-8")
        return f"{v}.rstrip({nul}).decode({utf8}, {src.bind('R', 'replace')})"
    if f.convert is bytes.hex:
        return f"{v}.hex()"
    if f.convert is _any_set:
        return f"({v}.count(0) != N({v}))"
    return f"{src.bind('F', f.convert)}({v})"


def _fuse(items: list[tuple[int, Field, int]]) -> list[tuple[struct.Struct, int, list[int]]]:
    """Fields at (offset) -> as few non-overlapping, single-byte-order `struct.Struct`s as
    possible: (struct, offset, mapping indexes in unpack order)."""
    groups: list[tuple[bool | None, int, list[tuple[int, Field, int]]]] = []
    for item in sorted(items, key=lambda t: (t[2], t[0])):
        _, f, off = item
        for g, (little, end, members) in enumerate(groups):
            if off >= end and (f.little is None or little is None or f.little == little):
                groups[g] = (little if f.little is None else f.little,
                             off + f.read.length, [*members, item])
                break
        else:
            groups.append((f.little, off + f.read.length, [item]))
    out = []
    for little, _, members in groups:
        fmt = "<" if little else ">"
        cursor = members[0][2]
        for _, f, off in members:
            if off > cursor:
                fmt += f"{off - cursor}x"
            fmt += f.code
            cursor = off + f.read.length
        out.append((struct.Struct(fmt), members[0][2], [i for i, _, _ in members]))
    return out


class _Router:
    """Reads the switches of one block, appending the case index each takes to a key."""

    __slots__ = ("switches",)

    def __init__(self, block: Sequence[Mapping | Switch]) -> None:
        self.switches = [(_switch_reader(sw), _case_index(sw), _fallback(sw),
                          [_Router(c.body) for c in sw.cases])
                         for sw in block if isinstance(sw, Switch)]

    def route(self, payload: bytes, key: list[int]) -> None:
        for read, cases, fallback, routers in self.switches:
            i = cases.get(read(payload), fallback)
            key.append(i)
            if i >= 0:
                routers[i].route(payload, key)


def _case_index(sw: Switch) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for i, c in enumerate(sw.cases):
        if c.match is not None:
            out.setdefault(c.match, i)
    return out


def _fallback(sw: Switch) -> int:
    """The case index taken when no constant matches: the default's, else -1."""
    return len(sw.cases) - 1 if sw.default is not None else -1


_SIGNED8 = tuple(range(128)) + tuple(range(-128, 0))


def _switch_reader(sw: Switch) -> Callable[[bytes], Any]:
    """A fast read of a switch's value; raises IndexError/struct.error/DecodeError when the
    payload is too short."""
    f = field(sw.read)
    r = sw.read
    if r.anchor is Anchor.START and r.kind in (Kind.INT, Kind.UINT) and r.length == 1:
        at = r.start
        if r.kind is Kind.UINT:
            return lambda b: b[at]
        return lambda b: _SIGNED8[b[at]]
    if r.anchor is Anchor.START and not f.code.endswith("s"):
        s = struct.Struct(("<" if f.little else ">") + f.code)
        at, convert = r.start, f.convert
        if convert is None:
            return lambda b: s.unpack_from(b, at)[0]
        return lambda b: convert(s.unpack_from(b, at)[0])
    return lambda b: f.value(b, r.where)


_SHORT = (IndexError, struct.error, DecodeError)


class Codec:
    """A compiled template: `decode` (hot path) and `encode` (device side, tests).

    `decode(payload) -> (value, position)` raises only DecodeError. A template without
    switches is one compiled path; with one switch and none nested, the switch value
    indexes its compiled paths; otherwise the switches are routed and each path is compiled
    on first use (at most `MAX_PLANS`)."""

    def __init__(self, ast: Ast) -> None:
        self.ast = ast
        self.digest = ast.digest
        self._plans: dict[tuple[int, ...], DecodeFn] = {}
        self._router = _Router(ast.sense)
        switches = [st for st in ast.sense if isinstance(st, Switch)]
        self.decode: DecodeFn
        if not switches:
            self.decode = self._path(())
        elif len(switches) == 1 and not any(
                isinstance(st, Switch) for c in switches[0].cases for st in c.body):
            self.decode = self._dispatch(switches[0])
        else:
            self.decode = self._routed

    def _reference(self, payload: bytes) -> Decoded:
        return decode_reference(self.ast, payload)

    def _path(self, key: tuple[int, ...]) -> DecodeFn:
        return _compile_plan(list(_path_mappings(self.ast.sense, iter(key))), self._reference)

    def _dispatch(self, sw: Switch) -> DecodeFn:
        """One switch: its value indexes a list of compiled paths (the last: no case)."""
        src = _Source()
        r = sw.read
        if r.anchor is Anchor.START and r.kind is Kind.UINT and r.length == 1:
            value = f"b[{_d(r.start)}]"
        elif r.anchor is Anchor.START and r.kind is Kind.INT and r.length == 1:
            value = f"{src.bind('T', _SIGNED8)}[b[{_d(r.start)}]]"
        else:
            value = f"{src.bind('R', _switch_reader(sw))}(b)"
        keys = [*range(len(sw.cases)), -1]
        fallback = _fallback(sw) % len(keys)
        cases = src.bind("M", _case_index(sw))
        short = src.bind("E", self._reference)
        src.emit("try:")
        if len(keys) > INLINE_CASES:
            plans = src.bind("P", [self._path((i,)) for i in keys])
            src.emit(f"    plan = {plans}[{cases}.get({value}, {_d(fallback)})]")
        else:
            src.emit(f"    i = {cases}.get({value}, {_d(fallback)})")
        src.emit(f"except {src.bind('X', _SHORT)}:")
        src.emit(f"    return {short}(b)")
        if len(keys) > INLINE_CASES:
            src.emit("return plan(b)")
        else:  # the paths' code inline, one `if` per case: no second call
            for k, key in enumerate(keys):
                mappings = list(_path_mappings(self.ast.sense, iter((key,))))
                if k < len(keys) - 1:
                    src.emit(f"if i == {_d(k)}:")
                    src.depth += 1
                    _emit_plan(src, mappings, short)
                    src.depth -= 1
                else:
                    _emit_plan(src, mappings, short)
        fn: DecodeFn = src.function("decode")
        return fn

    def _routed(self, payload: bytes) -> Decoded:
        key: list[int] = []
        try:
            self._router.route(payload, key)
        except _SHORT:
            return decode_reference(self.ast, payload)  # raises the precise error
        path = tuple(key)
        plan = self._plans.get(path)
        if plan is None:
            if len(self._plans) >= MAX_PLANS:
                return decode_reference(self.ast, payload)
            plan = self._plans[path] = self._path(path)
        return plan(payload)

    def encode(self, values: MappingABC[str, Any],
               switch: Sequence[Constant | None] | None = None, exact: bool = False) -> bytes:
        """Values (shaped like `decode`'s output) -> payload bytes.

        Each switch takes the first case whose branch the values fit (constants equal when
        given, every payload field present), the default last; `switch` forces the case
        constants, in the order the switches are met (None: the default). Unused values,
        missing values, values out of range and fields overlapping with different bytes
        raise EncodeError. Constants may be left out of `values` (the branch is found
        without them) unless `exact`: then `values` must be the whole decoded output."""
        return _Encoder(self.ast, values, list(switch) if switch is not None else None,
                        exact).run()


def _path_mappings(block: Sequence[Mapping | Switch], key: Iterator[int]
                   ) -> Iterator[Mapping]:
    for st in block:
        if isinstance(st, Mapping):
            yield st
        else:
            i = next(key)
            if i >= 0:
                yield from _path_mappings(st.cases[i].body, key)


# -- encoder -------------------------------------------------------------------------------

_MISSING = object()


def _lookup(values: MappingABC[str, Any], parts: Sequence[str]) -> Any:
    d: Any = values
    for p in parts:
        if not isinstance(d, MappingABC) or p not in d:
            return _MISSING
        d = d[p]
    return d


def _leaves(values: MappingABC[str, Any], prefix: tuple[str, ...] = ()
            ) -> Iterator[tuple[str, ...]]:
    for k, v in values.items():
        if isinstance(v, MappingABC) and v:
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k)


MAX_ENCODE_STEPS = 10_000
"""Execution paths the encoder may try before giving up."""

_Path = tuple[list[Mapping], list[tuple[Switch, Any]]]


class _Encoder:
    """Finds the first execution path whose output the values are, then lays it out.

    A path fits when every field that survives in its output (later assignments win) has a
    value, every surviving constant equals the given value (if given) and no value is left
    over. Fields overwritten on the path are left zero."""

    def __init__(self, ast: Ast, values: MappingABC[str, Any],
                 forced: list[Constant | None] | None, exact: bool = False) -> None:
        self.exact = exact
        self.ast = ast
        self.values = values
        self.forced = forced
        self.steps = 0
        self.leaves = set(_leaves(values))

    def run(self) -> bytes:
        known = {m.parts[:n] for m in _all_mappings(self.ast.sense)
                 for n in range(1, len(m.parts) + 1)}
        unknown = sorted(".".join(p) for p in self.leaves - known)
        if unknown:
            raise EncodeError("not in the template: " + ", ".join(unknown))
        first: EncodeError | None = None
        loose: list[tuple[list[tuple[Field, Any, str]], list[Mapping]]] = []
        try:
            for maps, switches in self._walk(self.ast.sense, 0, [], []):
                fit = self._fit(maps, switches)
                if fit is None:
                    continue
                writes, strict = fit
                if not strict:  # constants left out of the values: only if nothing else fits
                    if not self.exact:
                        loose.append((writes, maps))
                    continue
                try:
                    return _layout(writes, maps)
                except EncodeError as exc:
                    first = first or exc
        except RecursionError:
            raise EncodeError("too many switches to choose cases for") from None
        for writes, maps in loose:
            try:
                return _layout(writes, maps)
            except EncodeError as exc:
                first = first or exc
        if first is not None:
            raise first
        raise EncodeError("the values fit no branch of the template: "
                          + ", ".join(sorted(".".join(p) for p in self.leaves)))

    def _walk(self, block: Sequence[Mapping | Switch], at: int, maps: list[Mapping],
              switches: list[tuple[Switch, Any]]) -> Iterator[_Path]:
        """Every execution path through `block[at:]`, first cases first."""
        for k in range(at, len(block)):
            st = block[k]
            if isinstance(st, Mapping):
                maps = [*maps, st]
                continue
            for value, case in self._options(st):
                self.steps += 1
                if self.steps > MAX_ENCODE_STEPS:
                    raise EncodeError("too many branch combinations to choose from")
                body = case.body if case is not None else ()
                for m2, s2 in self._walk(body, 0, maps, [*switches, (st, value)]):
                    yield from self._walk(block, k + 1, m2, s2)
            return
        yield maps, switches

    def _options(self, st: Switch) -> list[tuple[Any, Case | None]]:
        """(switch value, case taken) pairs to try, in order."""
        if self.forced is None:
            out: list[tuple[Any, Case | None]] = [
                (c.match, c) for c in st.cases if c.match is not None]
            value = _default_value(st)  # no case matches: the default, or nothing
            if value is not _MISSING:
                out.append((value, st.default))
            return out
        if not self.forced:
            raise EncodeError("fewer switch values given than switches met")
        value = self.forced.pop(0)
        if value is None:
            value = _default_value(st)
            if value is _MISSING:
                raise EncodeError(f"{st.where}: every value has a case")
        i = _match(st, value)
        return [(value, st.cases[i] if i >= 0 else None)]

    def _fit(self, maps: list[Mapping], switches: list[tuple[Switch, Any]]
             ) -> tuple[list[tuple[Field, Any, str]], bool] | None:
        """The writes of a path if the values are its output (strict: with every constant
        given), else None."""
        shape: dict[str, Any] = {}
        for i, m in enumerate(maps):
            set_path(shape, m.parts, _Leaf(i))
        live = list(_leaf_indexes(shape))
        paths = {maps[i].parts for i in live}
        if not self.leaves <= {p[:n] for p in paths for n in range(1, len(p) + 1)}:
            return None
        writes = [(field(sw.read), value, sw.where) for sw, value in switches]
        strict = True
        for i in live:
            m = maps[i]
            given = _lookup(self.values, m.parts)
            if isinstance(m.value, Read):
                if given is _MISSING:
                    return None
                writes.append((field(m.value), given, m.asset))
            elif given is _MISSING:
                strict = False
            elif not _same(given, m.value):
                return None
        return writes, strict


def _all_mappings(block: Sequence[Mapping | Switch]) -> Iterator[Mapping]:
    for st in block:
        if isinstance(st, Mapping):
            yield st
        else:
            for c in st.cases:
                yield from _all_mappings(c.body)


def _leaf_indexes(shape: dict[str, Any]) -> Iterator[int]:
    for v in shape.values():
        if isinstance(v, _Leaf):
            yield v.index
        else:
            yield from _leaf_indexes(v)


def _layout(writes: list[tuple[Field, Any, str]], maps: list[Mapping]) -> bytes:
    """Place the fields' bytes in the shortest payload every field on the path fits in;
    fields counted from the end move back (a longer payload) when they would collide."""
    encoded = [(f, f.build(v, name), name) for f, v, name in writes]
    size = max([f.read.min_size for f, _, _ in encoded]
               + [m.value.min_size for m in maps if isinstance(m.value, Read)], default=0)
    ranged = {f.read.start + len(data) - f.read.end for f, data, _ in encoded
              if f.read.anchor is Anchor.RANGE}
    if len(ranged) > 1:
        raise EncodeError("variable-length fields imply different payload lengths")
    sizes: Iterable[int]
    if ranged:
        (fixed,) = ranged
        if fixed < size:
            raise EncodeError("a variable-length field is too short for the fixed fields "
                              "after it")
        sizes = (fixed,)
    else:
        tail = max((-f.read.start for f, _, _ in encoded if f.read.anchor is Anchor.END),
                   default=0)
        sizes = range(size, size + tail + 1)
    problem = ""
    for n in sizes:
        buf = bytearray(n)
        owner: list[str | None] = [None] * n
        problem = ""
        for f, data, name in encoded:
            s, _ = f.read.span(n)
            for k, byte in enumerate(data):
                if owner[s + k] is not None and buf[s + k] != byte:
                    problem = f"{name} overlaps {owner[s + k]} with different bytes"
                    break
                buf[s + k] = byte
                owner[s + k] = name
            if problem:
                break
        if not problem:
            return bytes(buf)
    raise EncodeError(problem)


def _same(a: Any, b: Any) -> bool:
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


def _default_value(sw: Switch) -> Any:
    """A switch value that matches none of the explicit cases (to take the default)."""
    r = sw.read
    candidates: Iterator[Any]
    if r.kind is Kind.BOOLEAN:
        candidates = iter((False, True))
    elif r.kind in NUMERIC:
        candidates = iter(range(1 << 16))
    elif r.kind is Kind.HEX:
        n = r.length if r.anchor is not Anchor.RANGE else 1
        candidates = (f"{k:0{2 * n}x}" for k in range(min(1 << (8 * n), 1 << 16)))
    else:
        candidates = iter([""] + [chr(c) for c in range(0x21, 0x7f)])
    f = field(r)
    for c in candidates:
        if _match(sw, c) >= 0 and sw.cases[_match(sw, c)].match is not None:
            continue
        try:
            f.build(c, sw.where)
        except EncodeError:
            continue
        return c
    return _MISSING
