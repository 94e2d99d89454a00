"""canonical_json writes exactly the bytes the standard library's encoder writes.

Every hash in the journal (content hashes, chain links, bill checksums) is taken over these
bytes, and entries written before the faster encoder (orjson) must verify after it: so the
two are compared on arbitrary values, text from all of Unicode (lone surrogates, control
characters and DEL included), integers past 64 bits, decimals and date-times."""

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.book import _json_default, canonical_json
from ledger.codec import Codec

STANDARD = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_json_default)

text = st.text(st.characters(exclude_categories=()), max_size=12) | st.text(
    st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=12
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | text
    | st.decimals(allow_nan=True, allow_infinity=True)
    | st.datetimes(timezones=st.just(UTC) | st.timezones())
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(text, inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=2000, deadline=None)
@given(values)
def test_the_same_bytes_as_the_standard_encoder(value):
    assert canonical_json(value) == STANDARD.encode(value)


@pytest.mark.parametrize(
    "value",
    [
        "\x7f",  # orjson leaves DEL as it is; the standard encoder escapes it
        {"k\x7f": 1},
        "é",
        "\U0001f600",
        "\ud800",  # a lone surrogate: orjson refuses it
        2**64,
        -(2**63) - 1,
        {"b": 1, "a": {"d": [1, (2, 3)], "c": None}},
        [Decimal("0E-9"), Decimal("-1.000000000"), Decimal("NaN")],
        datetime(2026, 3, 1, tzinfo=UTC) + timedelta(microseconds=7),
        datetime(2026, 3, 1, tzinfo=timezone(timedelta(hours=-5))),
        '\x00\x1f"\\/\n\t\b\f\r',
        {10: "non-text keys", 9: "sorted as numbers"},
    ],
)
def test_where_the_fast_encoder_differs_or_refuses_the_standard_one_writes(value):
    deep = value
    for _ in range(300):  # deeper than orjson nests
        deep = [deep]
    for v in (value, deep):
        assert canonical_json(v) == STANDARD.encode(v)


@pytest.mark.parametrize("wrong", [b"bytes", {"a": object()}, {1.5}, {(1, 2): "a tuple key"}])
def test_what_the_standard_encoder_refuses_is_refused(wrong):
    with pytest.raises(TypeError):
        STANDARD.encode(wrong)
    with pytest.raises(TypeError):
        canonical_json(wrong)


@pytest.mark.parametrize("number", [1e16, 1e-7, 0.1, float("nan"), float("inf")])
def test_floats_are_written_by_the_standard_encoder_when_asked(number):
    # orjson writes 1e16 and 1e-7 (the standard encoder 1e+16, 1e-07) and NaN as null: a
    # float is only for canonical_json(floats=True) (TOML documents), never in an event.
    assert canonical_json({"x": number}, floats=True) == STANDARD.encode({"x": number})


def test_a_reader_schema_with_a_float_is_refused():
    schema = {
        "type": "record",
        "name": "Floaty",
        "namespace": "billing.test",
        "fields": [
            {"name": "event_id", "type": "string"},
            {"name": "ratio", "type": ["null", {"type": "array", "items": "double"}]},
        ],
    }
    with pytest.raises(ValueError, match="Floaty: a reader schema may not have a float"):
        Codec().register(schema)
    codec = Codec()
    plain = {**schema, "fields": schema["fields"][:1]}
    codec.register(plain)
    codec.register(schema, current=False)  # as a writer only: its float is never read
    with pytest.raises(ValueError, match="float"):
        codec.register(schema, current=True)
