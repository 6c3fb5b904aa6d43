"""Template validation: every problem listed, each with the JSON path of its node."""

from __future__ import annotations

import json
from typing import Any

import pytest

from energy_saver import bcl
from energy_saver.bcl import Anchor, Kind, Mapping, Read, Switch


def problems(doc: Any) -> list[str]:
    with pytest.raises(bcl.TemplateError) as exc:
        bcl.parse(doc)
    return [str(p) for p in exc.value.problems]


def sel(**kw: Any) -> dict[str, Any]:
    return {"byte": 0, "type": "uint", **kw}


def test_the_sdk_demo_template_parses_to_its_ast() -> None:
    t = bcl.parse({"sense": [{"switch": {"byte": 0, "bytelength": 1, "type": "int"}, "on": [
        {"case": 1, "comment": "Energy_saver", "do": [
            {"asset": "data_type", "value": "Energy_Saver"},
            {"asset": "battery_level",
             "value": {"byte": 1, "bytelength": 1, "type": "uint", "byteorder": "little"}},
            {"asset": "v.sw", "value": {"byte": 3, "bytelength": 5, "type": "string"}}]}]}]})
    (sw,) = t.sense
    assert isinstance(sw, Switch)
    assert sw.read == Read(Kind.INT, Anchor.START, 0, 0, 1, False, "sense[0].switch")
    assert sw.default is None
    (case,) = sw.cases
    assert case.match == 1
    assert case.body == (
        Mapping("data_type", ("data_type",), "Energy_Saver", None, "sense[0].on[0].do[0]"),
        Mapping("battery_level", ("battery_level",),
                Read(Kind.UINT, Anchor.START, 1, 0, 1, True, "sense[0].on[0].do[1].value"),
                None, "sense[0].on[0].do[1]"),
        Mapping("v.sw", ("v", "sw"),
                Read(Kind.STRING, Anchor.START, 3, 0, 5, False, "sense[0].on[0].do[2].value"),
                None, "sense[0].on[0].do[2]"),
    )
    assert len(t.digest) == 64


def test_the_digest_ignores_key_order_and_whitespace() -> None:
    a = bcl.parse_text('{"sense": [{"asset": "a", "value": {"type": "int", "byte": 0}}]}')
    b = bcl.parse_text('{"sense":[{"value":{"byte":0,"type":"int"},"asset":"a"}]}')
    c = bcl.parse_text('{"sense":[{"value":{"byte":1,"type":"int"},"asset":"a"}]}')
    assert a.digest == b.digest != c.digest


def test_selector_anchors_and_defaults() -> None:
    t = bcl.parse({"sense": [
        {"asset": "a", "value": {"byte": 2, "type": "int"}},
        {"asset": "b", "value": {"endbyte": -4, "bytelength": 4, "type": "float",
                                 "byteorder": "little"}},
        {"asset": "c", "value": {"byte": 1, "endbyte": 0, "type": "string"}},
        {"comment": "a comment-only statement is a no-op"},
    ], "name": "x", "version": "1.0", "comment": "ignored"})
    a, b, c = t.sense
    assert isinstance(a, Mapping) and isinstance(b, Mapping) and isinstance(c, Mapping)
    assert a.value == Read(Kind.INT, Anchor.START, 2, 0, 1, False, "sense[0].value")
    assert b.value == Read(Kind.FLOAT, Anchor.END, -4, 0, 4, True, "sense[1].value")
    assert c.value == Read(Kind.STRING, Anchor.RANGE, 1, 0, 0, False, "sense[2].value")


def test_every_problem_is_listed_with_its_path() -> None:
    doc = {"sense": [{"switch": sel(type="int"), "on": [
        {"case": 0, "do": []},
        {"case": 1, "do": [
            {"asset": "ok", "value": "constant"},
            {"asset": "t", "value": sel(type="int", bytelength=3)},
            {"asset": "f", "value": sel(type="float")},
        ]},
    ]}, {"asset": "", "value": sel(type="bits")}]}
    assert problems(doc) == [
        "sense[0].on[1].do[1].value.bytelength: must be 1, 2, 4 or 8 for type int",
        "sense[0].on[1].do[2].value.bytelength: must be 4 or 8 for type float",
        "sense[1].asset: must be a non-empty string",
        "sense[1].value.type: must be one of int, uint, float, boolean, string, hex",
    ]


@pytest.mark.parametrize(("doc", "expected"), [
    ([], ["template: must be a JSON object with a sense list"]),
    ({}, ["sense: is required (a list of statements)"]),
    ({"sense": {}}, ["sense: must be a list of statements"]),
    ({"sense": [1]}, ["sense[0]: must be an object (a mapping, a switch or a comment)"]),
    ({"sense": [{"asset": "a"}]},
     ["sense[0].value: is required (a constant or a payload selector)"]),
    ({"sense": [{"value": "x"}]}, ["sense[0].asset: is required"]),
    ({"sense": [{"asset": "a..b", "value": "x"}]},
     ["sense[0].asset: empty path segment in 'a..b'"]),
    ({"sense": [{"asset": "a", "value": [1]}]},
     ["sense[0].value: must be a constant (string, number, boolean) or a payload selector object"]),
    ({"sense": [{"asset": "a", "value": {"type": "int"}}]},
     ["sense[0].value: needs byte, endbyte or both"]),
    ({"sense": [{"asset": "a", "value": {"byte": 0}}]},
     ["sense[0].value.type: is required (int, uint, float, boolean, string, hex)"]),
    ({"sense": [{"asset": "a", "value": sel(byte=-1)}]},
     ["sense[0].value.byte: must be an integer from 0 to 65535"]),
    ({"sense": [{"asset": "a", "value": sel(byte=1.0)}]},
     ["sense[0].value.byte: must be an integer from 0 to 65535"]),
    ({"sense": [{"asset": "a", "value": {"endbyte": 1, "type": "int"}}]},
     ["sense[0].value.endbyte: must be an integer from -65535 to 0"]),
    ({"sense": [{"asset": "a", "value": {"endbyte": 0, "type": "int"}}]},
     ["sense[0].value.endbyte: must be negative when byte is not given"]),
    ({"sense": [{"asset": "a", "value": {"endbyte": -2, "bytelength": 4, "type": "int"}}]},
     ["sense[0].value.bytelength: 4 bytes from endbyte -2 run past the end of the payload"]),
    ({"sense": [{"asset": "a", "value": sel(endbyte=-1, bytelength=2, type="string")}]},
     ["sense[0].value.bytelength: cannot be combined with byte and endbyte"]),
    ({"sense": [{"asset": "a", "value": sel(endbyte=-1, type="int")}]},
     ["sense[0].value.type: type int needs a fixed bytelength; byte with endbyte selects a "
      "variable length (string, hex, boolean)"]),
    ({"sense": [{"asset": "a", "value": sel(bytelength=0, type="string")}]},
     ["sense[0].value.bytelength: must be an integer from 1 to 65535"]),
    ({"sense": [{"asset": "a", "value": sel(byteorder="middle")}]},
     ["sense[0].value.byteorder: must be big or little"]),
    ({"sense": [{"asset": "a", "value": sel(signed="yes")}]},
     ["sense[0].value.signed: must be a boolean (ignored: int is signed)"]),
    ({"sense": [{"asset": "a", "value": sel(type="string"), "custom_type": "location_lat"}]},
     ["sense[0].custom_type: needs a numeric payload selector (int, uint or float)"]),
    ({"sense": [{"asset": "a", "value": sel(), "custom_type": "altitude"}]},
     ["sense[0].custom_type: must be one of location_lat, location_long"]),
    ({"sense": [{"foo": 1}]}, [
        "sense[0].foo: unknown key; a statement has asset, comment, custom_type, on, switch, value",
        "sense[0]: a statement needs asset and value, or switch and on"]),
    ({"sense": [], "extra": 1},
     ["extra: unknown key; a template has comment, description, name, sense, version"]),
])
def test_invalid_templates(doc: Any, expected: list[str]) -> None:
    assert problems(doc) == expected


@pytest.mark.parametrize(("key", "message"), [
    ("calculation", "calculations are not supported by BCL"),
    ("loop", "loops and arrays are not supported by BCL"),
    ("bitmask", "bit fields are not supported by BCL"),
])
def test_unsupported_abcl_features_are_rejected_by_name(key: str, message: str) -> None:
    doc = {"sense": [{"asset": "a", "value": {**sel(), key: "x * 2"}}]}
    assert problems(doc) == [f"sense[0].value.{key}: {message}"]
    stmt = {"sense": [{"asset": "a", "value": "c", key: {}}]}
    assert problems(stmt) == [f"sense[0].{key}: {message}"]


def test_switch_problems() -> None:
    doc = {"sense": [{"switch": sel(type="int"), "on": [
        {"case": "T", "do": []},
        {"case": 1, "do": []},
        {"case": 1.0, "do": []},
        {"default": True, "do": []},
        {"default": True, "do": []},
        {"default": False, "do": []},
        {"case": 2, "default": True, "do": []},
        {"do": []},
        {"case": 3},
        {"case": [3], "do": []},
        "x",
    ]}, {"switch": "byte0", "on": []}, {"switch": sel(), "on": {}}]}
    assert problems(doc) == [
        'sense[0].on[0].case: "T" can never match a int switch',
        "sense[0].on[2].case: duplicate of on[1]",
        "sense[0].on[4]: a second default",
        "sense[0].on[5].default: must be true",
        "sense[0].on[6]: has both case and default",
        "sense[0].on[7]: needs case (or default: true)",
        "sense[0].on[8].do: is required (a list of statements)",
        "sense[0].on[9].case: must be a number, a string or a boolean",
        "sense[0].on[10]: must be an object with case (or default) and do",
        "sense[1].switch: must be a payload selector object",
        "sense[2].on: is required (a list of cases)",
    ]


def test_string_and_boolean_switch_cases() -> None:
    t = bcl.parse({"sense": [
        {"switch": sel(type="string"), "on": [{"case": "T", "do": []}, {"case": "S", "do": []}]},
        {"switch": sel(type="boolean"), "on": [{"case": True, "do": []}]},
    ]})
    s1, s2 = t.sense
    assert isinstance(s1, Switch) and [c.match for c in s1.cases] == ["T", "S"]
    assert isinstance(s2, Switch) and [c.match for c in s2.cases] == [True]
    assert problems({"sense": [{"switch": sel(type="boolean"), "on": [{"case": 1, "do": []}]}]}) \
        == ["sense[0].on[0].case: 1 can never match a boolean switch"]


def test_nesting_is_bounded() -> None:
    doc: dict[str, Any] = {"asset": "a", "value": "x"}
    for _ in range(bcl.MAX_DEPTH + 1):
        doc = {"switch": sel(), "on": [{"case": 0, "do": [doc]}]}
    assert problems({"sense": [doc]}) == [
        "sense[0]" + ".on[0].do[0]" * bcl.MAX_DEPTH + ": switches nested deeper than 16"]


def test_text_that_is_not_json() -> None:
    with pytest.raises(bcl.TemplateError) as exc:
        bcl.parse_text('{"sense": [}')
    assert str(exc.value).startswith("template: not valid JSON: Expecting value: line 1")
    with pytest.raises(bcl.TemplateError, match="template: nested too deeply"):
        bcl.parse_text("[" * 100_000 + "]" * 100_000)


def test_too_many_statements() -> None:
    doc = {"sense": [{"asset": f"a{i}", "value": "c"} for i in range(bcl.MAX_STATEMENTS + 1)]}
    assert problems(doc) == [f"sense[{bcl.MAX_STATEMENTS}]: too many statements (at most 4096)"]
    assert json.dumps(doc)  # the doc itself is fine JSON
