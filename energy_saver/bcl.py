"""BCL (1NCE's Binary Conversion Language): template JSON -> validated, typed AST.

Called by the templates service (create/patch/test), the translator's cache and the CLI;
`energy_saver.codec` turns the AST into a codec. Validation never stops at the first
problem: `TemplateError.problems` lists every one, each with the JSON path of its node
(`sense[0].on[1].do[2].value.bytelength: must be 1, 2, 4 or 8 for type int`).

Grammar (spec section 3.2): a template is `{"sense": [statement...]}` plus ignored metadata
(`comment`, `name`, `version`, `description`). A statement is a mapping
`{"asset": "a.b", "value": constant | selector, "custom_type"?}`, a
`{"switch": selector, "on": [{"case": c, "do": [...]} | {"default": true, "do": [...]}]}`
or a comment-only object. A selector is `{"type", "byte" | "endbyte" | both, "bytelength",
"byteorder"}`. ABCL features BCL does not have (calculations, loops, bit fields...) are
rejected by name rather than ignored.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 16
"""Nested switches allowed (the codec walks them recursively)."""
MAX_OFFSET = 65_535
MAX_ASSET = 256
MAX_STATEMENTS = 4096


class Kind(enum.StrEnum):
    INT = "int"
    UINT = "uint"
    FLOAT = "float"
    BOOLEAN = "boolean"
    STRING = "string"
    HEX = "hex"


_KIND_NAMES = frozenset(k.value for k in Kind)
NUMERIC = frozenset({Kind.INT, Kind.UINT, Kind.FLOAT})
SIZES = {Kind.INT: (1, 2, 4, 8), Kind.UINT: (1, 2, 4, 8), Kind.FLOAT: (4, 8)}


class Anchor(enum.Enum):
    START = "byte"
    """`byte` (+ `bytelength`): bytes [byte, byte+n)."""
    END = "endbyte"
    """`endbyte` alone (+ `bytelength`): bytes [len+endbyte, len+endbyte+n)."""
    RANGE = "byte+endbyte"
    """`byte` and `endbyte`: bytes [byte, len+endbyte), variable length."""


@dataclass(frozen=True, slots=True)
class Read:
    """A payload selector. `where` is its JSON path (errors name it for switches)."""

    kind: Kind
    anchor: Anchor
    start: int
    """`byte` for START and RANGE, `endbyte` for END."""
    end: int
    """`endbyte` for RANGE, else 0."""
    length: int
    """`bytelength` for START and END; 0 for RANGE."""
    little: bool
    where: str

    def span(self, size: int) -> tuple[int, int]:
        """[s, e) of this read in a payload of `size` bytes (may lie outside it)."""
        if self.anchor is Anchor.START:
            return self.start, self.start + self.length
        if self.anchor is Anchor.END:
            s = size + self.start
            return s, s + self.length
        return self.start, size + self.end

    @property
    def min_size(self) -> int:
        """The smallest payload this read fits in."""
        if self.anchor is Anchor.START:
            return self.start + self.length
        if self.anchor is Anchor.END:
            return -self.start
        return self.start - self.end


Constant = str | int | float | bool


@dataclass(frozen=True, slots=True)
class Mapping:
    asset: str
    parts: tuple[str, ...]
    """`asset` split at dots: where the value goes in the nested output."""
    value: Read | Constant
    custom_type: str | None
    where: str


@dataclass(frozen=True, slots=True)
class Case:
    match: Constant | None
    """The case constant; None for the default branch."""
    body: tuple[Statement, ...]


@dataclass(frozen=True, slots=True)
class Switch:
    read: Read
    cases: tuple[Case, ...]
    """Explicit cases in template order (first match wins), then the default if any."""
    where: str

    @property
    def default(self) -> Case | None:
        last = self.cases[-1] if self.cases else None
        return last if last is not None and last.match is None else None


Statement = Mapping | Switch


@dataclass(frozen=True, slots=True)
class Template:
    sense: tuple[Statement, ...]
    digest: str
    """sha256 of the canonical template JSON: the codec cache key."""


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class TemplateError(ValueError):
    """An invalid template; `problems` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


UNSUPPORTED = {
    **dict.fromkeys(("calculation", "calc", "formula", "expression", "multiplier", "scale",
                     "divisor", "addend"), "calculations are not supported by BCL"),
    **dict.fromkeys(("loop", "loops", "repeat", "for", "foreach", "while", "count", "array",
                     "items", "index"), "loops and arrays are not supported by BCL"),
    **dict.fromkeys(("bit", "bits", "bitmask", "mask", "shift", "bitlength", "startbit"),
                    "bit fields are not supported by BCL"),
    **dict.fromkeys(("if", "condition", "when", "else"),
                    "conditions are not supported by BCL (use switch)"),
}
TOP_KEYS = frozenset({"sense", "comment", "name", "version", "description"})
MAPPING_KEYS = frozenset({"asset", "value", "custom_type", "comment"})
SWITCH_KEYS = frozenset({"switch", "on", "comment"})
CASE_KEYS = frozenset({"case", "default", "do", "comment"})
SELECTOR_KEYS = frozenset({"type", "byte", "endbyte", "bytelength", "byteorder", "signed",
                           "comment"})
CUSTOM_TYPES = ("location_lat", "location_long")


def parse_text(text: str | bytes) -> Template:
    """Parse a template given as JSON text (the API's `template` string, a file)."""
    try:
        doc = json.loads(text)
    except RecursionError:
        raise TemplateError([Problem("template", "nested too deeply")]) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TemplateError([Problem("template", f"not valid JSON: {exc}")]) from None
    return parse(doc)


def parse(doc: Any) -> Template:
    """Validate a decoded template; raises TemplateError listing every problem."""
    v = _Validator()
    sense = v.template(doc)
    if v.problems:
        raise TemplateError(v.problems)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Template(sense, hashlib.sha256(canonical.encode()).hexdigest())


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


class _Validator:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.statements = 0

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def keys(self, obj: dict[str, Any], allowed: frozenset[str], path: str, what: str) -> None:
        for key in obj:
            if key in allowed:
                continue
            sub = f"{path}.{key}" if path else key
            if key in UNSUPPORTED:
                self.add(sub, UNSUPPORTED[key])
            else:
                self.add(sub, f"unknown key; {what} has {', '.join(sorted(allowed))}")

    def template(self, doc: Any) -> tuple[Statement, ...]:
        if not isinstance(doc, dict):
            self.add("template", "must be a JSON object with a sense list")
            return ()
        self.keys(doc, TOP_KEYS, "", "a template")
        if "sense" not in doc:
            self.add("sense", "is required (a list of statements)")
            return ()
        return self.block(doc["sense"], "sense", 0)

    def block(self, items: Any, path: str, depth: int) -> tuple[Statement, ...]:
        if not isinstance(items, list):
            self.add(path, "must be a list of statements")
            return ()
        out: list[Statement] = []
        for i, item in enumerate(items):
            st = self.statement(item, f"{path}[{i}]", depth)
            if st is not None:
                out.append(st)
        return tuple(out)

    def statement(self, item: Any, path: str, depth: int) -> Statement | None:
        self.statements += 1
        if self.statements == MAX_STATEMENTS + 1:
            self.add(path, f"too many statements (at most {MAX_STATEMENTS})")
        if not isinstance(item, dict):
            self.add(path, "must be an object (a mapping, a switch or a comment)")
            return None
        if "switch" in item:
            return self.switch(item, path, depth)
        if "asset" in item or "value" in item:
            return self.mapping(item, path)
        if set(item) <= {"comment"}:
            return None
        self.keys(item, MAPPING_KEYS | SWITCH_KEYS, path, "a statement")
        self.add(path, "a statement needs asset and value, or switch and on")
        return None

    def mapping(self, item: dict[str, Any], path: str) -> Mapping | None:
        self.keys(item, MAPPING_KEYS, path, "a mapping")
        asset = item.get("asset")
        parts: tuple[str, ...] = ()
        if "asset" not in item:
            self.add(f"{path}.asset", "is required")
        elif not isinstance(asset, str) or not asset:
            self.add(f"{path}.asset", "must be a non-empty string")
        elif len(asset) > MAX_ASSET:
            self.add(f"{path}.asset", f"longer than {MAX_ASSET} characters")
        else:
            parts = tuple(asset.split("."))
            if "" in parts:
                self.add(f"{path}.asset", f"empty path segment in {asset!r}")
        value: Read | Constant | None = None
        if "value" not in item:
            self.add(f"{path}.value", "is required (a constant or a payload selector)")
        else:
            raw = item["value"]
            if isinstance(raw, dict):
                value = self.selector(raw, f"{path}.value")
            elif isinstance(raw, str | int | float):  # bool is an int
                value = raw
            else:
                self.add(f"{path}.value", "must be a constant (string, number, boolean) or "
                         "a payload selector object")
        custom = item.get("custom_type")
        if custom is not None:
            if custom not in CUSTOM_TYPES:
                self.add(f"{path}.custom_type", f"must be one of {', '.join(CUSTOM_TYPES)}")
            elif not (isinstance(value, Read) and value.kind in NUMERIC):
                self.add(f"{path}.custom_type", "needs a numeric payload selector "
                         "(int, uint or float)")
        if value is None or not parts or "" in parts:
            return None
        return Mapping(str(asset), parts, value, custom, path)

    def switch(self, item: dict[str, Any], path: str, depth: int) -> Switch | None:
        self.keys(item, SWITCH_KEYS, path, "a switch")
        if depth >= MAX_DEPTH:
            self.add(path, f"switches nested deeper than {MAX_DEPTH}")
            return None
        raw = item["switch"]
        read = None
        if isinstance(raw, dict):
            read = self.selector(raw, f"{path}.switch")
        else:
            self.add(f"{path}.switch", "must be a payload selector object")
        on = item.get("on")
        if not isinstance(on, list):
            self.add(f"{path}.on", "is required (a list of cases)")
            return None
        cases: list[Case] = []
        default: Case | None = None
        seen: dict[Any, int] = {}
        for i, c in enumerate(on):
            cpath = f"{path}.on[{i}]"
            if not isinstance(c, dict):
                self.add(cpath, "must be an object with case (or default) and do")
                continue
            self.keys(c, CASE_KEYS, cpath, "a case")
            body = self.block(c.get("do"), f"{cpath}.do", depth + 1) if "do" in c else ()
            if "do" not in c:
                self.add(f"{cpath}.do", "is required (a list of statements)")
            if "default" in c:
                if "case" in c:
                    self.add(cpath, "has both case and default")
                elif c["default"] is not True:
                    self.add(f"{cpath}.default", "must be true")
                elif default is not None:
                    self.add(cpath, "a second default")
                else:
                    default = Case(None, body)
                continue
            if "case" not in c:
                self.add(cpath, "needs case (or default: true)")
                continue
            match = c["case"]
            if not isinstance(match, str | int | float):
                self.add(f"{cpath}.case", "must be a number, a string or a boolean")
                continue
            if read is not None and not _comparable(read.kind, match):
                self.add(f"{cpath}.case", f"{json.dumps(match)} can never match a "
                         f"{read.kind.value} switch")
                continue
            key = (type(match) is bool, match)
            if key in seen:
                self.add(f"{cpath}.case", f"duplicate of on[{seen[key]}]")
                continue
            seen[key] = i
            cases.append(Case(match, body))
        if read is None:
            return None
        if default is not None:
            cases.append(default)
        return Switch(read, tuple(cases), path)

    def selector(self, sel: dict[str, Any], path: str) -> Read | None:
        self.keys(sel, SELECTOR_KEYS, path, "a payload selector")
        ok = True
        kind: Kind | None = None
        t = sel.get("type")
        if t is None:
            self.add(f"{path}.type", "is required (" + ", ".join(k.value for k in Kind) + ")")
            ok = False
        elif not isinstance(t, str) or t not in _KIND_NAMES:
            self.add(f"{path}.type", "must be one of " + ", ".join(k.value for k in Kind))
            ok = False
        else:
            kind = Kind(t)
        byte: Any = sel.get("byte")
        endbyte: Any = sel.get("endbyte")
        if "byte" in sel and not (_is_int(byte) and 0 <= byte <= MAX_OFFSET):
            self.add(f"{path}.byte", f"must be an integer from 0 to {MAX_OFFSET}")
            ok = False
        if "endbyte" in sel and not (_is_int(endbyte) and -MAX_OFFSET <= endbyte <= 0):
            self.add(f"{path}.endbyte", f"must be an integer from -{MAX_OFFSET} to 0")
            ok = False
        if "byte" not in sel and "endbyte" not in sel:
            self.add(path, "needs byte, endbyte or both")
            ok = False
        length = sel.get("bytelength", 1)
        if "bytelength" in sel and not (_is_int(length) and 1 <= length <= MAX_OFFSET):
            self.add(f"{path}.bytelength", f"must be an integer from 1 to {MAX_OFFSET}")
            ok = False
        order = sel.get("byteorder", "big")
        if order not in ("big", "little"):
            self.add(f"{path}.byteorder", "must be big or little")
            ok = False
        if "signed" in sel and not isinstance(sel["signed"], bool):
            self.add(f"{path}.signed", "must be a boolean (ignored: int is signed)")
        if not ok or kind is None:
            return None
        if "byte" in sel and "endbyte" in sel:
            if "bytelength" in sel:
                self.add(f"{path}.bytelength", "cannot be combined with byte and endbyte")
                return None
            if kind in NUMERIC:
                self.add(f"{path}.type", f"type {kind.value} needs a fixed bytelength; "
                         "byte with endbyte selects a variable length (string, hex, boolean)")
                return None
            return Read(kind, Anchor.RANGE, byte, endbyte, 0, order == "little", path)
        if kind in SIZES and length not in SIZES[kind]:
            sizes = SIZES[kind]
            listed = ", ".join(str(s) for s in sizes[:-1]) + f" or {sizes[-1]}"
            self.add(f"{path}.bytelength", f"must be {listed} for type {kind.value}")
            return None
        if "byte" in sel:
            return Read(kind, Anchor.START, byte, 0, length, order == "little", path)
        if endbyte == 0:
            self.add(f"{path}.endbyte", "must be negative when byte is not given")
            return None
        if length > -endbyte:
            self.add(f"{path}.bytelength", f"{length} bytes from endbyte {endbyte} run past "
                     "the end of the payload")
            return None
        return Read(kind, Anchor.END, endbyte, 0, length, order == "little", path)


def _comparable(kind: Kind, match: Constant) -> bool:
    if kind is Kind.BOOLEAN:
        return isinstance(match, bool)
    if kind in NUMERIC:
        return _is_number(match)
    return isinstance(match, str)
