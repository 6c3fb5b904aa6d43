"""The small CBOR codec: RFC 8949 Appendix A vectors, errors, properties."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integrator.lwm2m import cbor
from integrator.lwm2m.cbor import CborError, Tag

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (value, preferred encoding) from RFC 8949 Appendix A
VECTORS: list[tuple[Any, str]] = [
    (0, "00"), (23, "17"), (24, "1818"), (100, "1864"), (1000, "1903e8"),
    (1000000, "1a000f4240"), (18446744073709551615, "1bffffffffffffffff"),
    (-1, "20"), (-1000, "3903e7"), (-18446744073709551616, "3bffffffffffffffff"),
    (0.0, "f90000"), (-0.0, "f98000"), (1.0, "f93c00"), (1.1, "fb3ff199999999999a"),
    (1.5, "f93e00"), (65504.0, "f97bff"), (100000.0, "fa47c35000"),
    (3.4028234663852886e38, "fa7f7fffff"), (1.0e300, "fb7e37e43c8800759c"),
    (5.960464477539063e-8, "f90001"), (-4.0, "f9c400"), (math.inf, "f97c00"),
    (-math.inf, "f9fc00"), (False, "f4"), (True, "f5"), (None, "f6"),
    (Tag(1, 1363896240), "c11a514b67b0"), (Tag(0, "2013-03-21T20:04:00Z"),
                                          "c074323031332d30332d32315432303a30343a30305a"),
    (b"", "40"), (b"\x01\x02\x03\x04", "4401020304"), ("", "60"), ("a", "6161"),
    ("IETF", "6449455446"), ("\u00fc", "62c3bc"), ("\u6c34", "63e6b0b4"),
    ([], "80"), ([1, [2, 3], [4, 5]], "8301820203820405"), ({}, "a0"),
    ({1: 2, 3: 4}, "a201020304"), ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
]


@pytest.mark.parametrize(("value", "hex_"), VECTORS)
def test_rfc8949_vectors(value: Any, hex_: str) -> None:
    assert cbor.dumps(value).hex() == hex_
    decoded = cbor.loads(bytes.fromhex(hex_))
    assert decoded == value and type(decoded) is type(value)


def test_nan_and_indefinite_lengths() -> None:
    assert cbor.dumps(math.nan).hex() == "f97e00"
    assert math.isnan(cbor.loads(bytes.fromhex("fb7ff8000000000000")))
    assert cbor.loads(bytes.fromhex("5f42010243030405ff")) == b"\x01\x02\x03\x04\x05"
    assert cbor.loads(bytes.fromhex("7f657374726561646d696e67ff")) == "streaming"
    assert cbor.loads(bytes.fromhex("9fff")) == []
    assert cbor.loads(bytes.fromhex("9f018202039f0405ffff")) == [1, [2, 3], [4, 5]]
    assert cbor.loads(bytes.fromhex("bf61610161629f0203ffff")) == {"a": 1, "b": [2, 3]}


@pytest.mark.parametrize(("hex_", "message"), [
    ("", "truncated"),
    ("ff", "unexpected break"),
    ("1c", "reserved additional information"),
    ("0000", "trailing"),
    ("19ff", "truncated"),
    ("62c3", "truncated"),
    ("61ff", "not UTF-8"),
    ("9b00000000ffffffff", "exceeds the payload"),
    ("bb00000000ffffffff", "exceeds the payload"),
    ("a201020103", "repeats the key"),
    ("a18001", "list key"),
    ("81" * 20 + "00", "deeper"),
    ("f7", "unsupported simple value"),
    ("f820", "unsupported simple value"),
    ("1f", "indefinite length"),
    ("5f6161ff", "bad chunk"),
    ("9f01", "without a break"),
])
def test_malformed(hex_: str, message: str) -> None:
    with pytest.raises(CborError, match=message):
        cbor.loads(bytes.fromhex(hex_))


def test_unencodable() -> None:
    for value in (1 << 64, -(1 << 64) - 1, object(), "\ud800", Tag(1 << 64, 0)):
        with pytest.raises(CborError):
            cbor.dumps(value)


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 64), (1 << 64) - 1),
                  st.floats(allow_nan=False), st.binary(max_size=20),
                  st.text(st.characters(codec="utf-8"), max_size=20))
_keys = st.one_of(st.integers(-(1 << 64), (1 << 64) - 1), st.text(max_size=4))
_trees = st.recursive(_leaf, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(_keys, c, max_size=4),
    st.builds(Tag, st.integers(0, 1 << 20), c)), max_leaves=16)


@SETTINGS
@given(_trees)
def test_round_trip(value: Any) -> None:
    assert cbor.loads(cbor.dumps(value)) == value


@SETTINGS
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_cbor_error(data: bytes) -> None:
    with contextlib.suppress(CborError):
        cbor.loads(data)
