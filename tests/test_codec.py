"""The Avro wire format (ledger.codec), checked against independent implementations.

Pure: no Kafka. The reference `avro` library decodes what we encode (and vice versa), and
the fingerprint is recomputed here from the Avro spec (canonical form + CRC-64-AVRO).
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
import random
import struct
from decimal import Decimal
from importlib import resources

import avro.io
import avro.schema
import fastavro
import pytest

from ledger import topics
from ledger.codec import HEADER_LEN, MAGIC, Codec, Decoded
from ledger.errors import (
    BadMagicError,
    DecodeError,
    InvalidEventError,
    OversizedEventError,
    OversizedFieldError,
    SchemaViolationError,
    TombstoneError,
    TruncatedBodyError,
    UnknownEnumValueError,
    UnknownFingerprintError,
    UnstorableValueError,
)

UTC = dt.UTC
T0 = dt.datetime(2025, 3, 14, 15, 9, 26, 535897, tzinfo=UTC)
T1 = dt.datetime(2025, 4, 1, tzinfo=UTC)
BASE = {"account_id": "acct-42", "occurred_at": T0}


def ev(n: int, **fields) -> dict:
    return {"event_id": f"00000000-0000-4000-8000-{n:012d}", **BASE, **fields}


# One sample per event type; most set every field, a few rely on defaults.
SAMPLES = {
    "UsageRecorded": ev(
        1,
        request_id="req-1",
        product="on_demand",
        model="llama-70b",
        service_tier="priority",
        input_tokens=1200,
        cached_input_tokens=300,
        output_tokens=456,
        gpu_seconds=Decimal("3600.123456789"),
        gpu_type="H100",
        training_tokens=0,
        images=0,
        steps=0,
    ),
    "AccountOpened": ev(2, created_at=T0),
    "SpendLimitConfigured": ev(3, monthly_limit=Decimal("250.00")),
    "SpendLimitOverridden": ev(4, monthly_limit=None),
    "AccountHoldPlaced": ev(5, reason="fraud review"),
    "AccountHoldReleased": ev(6),
    "CreditPurchased": ev(7, grant_id="g-7", amount=Decimal("100"), payment_reference="pi_1"),
    "CreditGranted": ev(
        8,
        grant_id="g-8",
        amount=Decimal("0.000000001"),
        kind="goodwill",
        expires_at=T1,
        reason="outage",
    ),
    "CreditRevoked": ev(9, grant_id="g-8", reason="abuse"),
    "PaymentMethodAdded": ev(10, payment_method_id="pm-1"),
    "PaymentMethodRemoved": ev(11, payment_method_id="pm-1"),
    "PaymentFailed": ev(
        12, payment_method_id="pm-1", amount=Decimal("-12.5"), failure_code="card_declined"
    ),
    "InvoicePaid": ev(13, invoice_id="inv-2025-03", amount=Decimal("99999999999.999999999")),
    "PeriodTick": ev(14, account_id="", tick_at=T1),
    "AccountSuspended": ev(
        15,
        reasons=["SPEND_LIMIT_REACHED", "MANUAL_HOLD"],
        effective_at=T0,
        status_version=7,
    ),
    "AccountReinstated": ev(16, effective_at=T0, status_version=8),
    "SpendLimitWarning": ev(
        17,
        month="2025-03",
        threshold_percent=80,
        month_to_date_spend=Decimal("200.5"),
        effective_limit=Decimal("250"),
        status_version=9,
    ),
    "InvoiceIssued": ev(
        18, invoice_id="inv-2025-03", month="2025-03", amount_due=Decimal("0"), status_version=10
    ),
    "ConfigPublished": ev(
        19,
        account_id="",
        kind="policy",
        version="2026-01",
        effective_from=T0,
        document='{"signup":{"credit":"1.00"}}' + " " * 5000,  # a document may exceed 4 KiB
        sha256="0" * 64,
    ),
}


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec.default()


def avsc(event_type: str) -> dict:
    return json.loads((resources.files("schemas") / f"{event_type}.avsc").read_text("utf-8"))


def with_defaults(event_type: str, event: dict) -> dict:
    out = {}
    for field in avsc(event_type)["fields"]:
        out[field["name"]] = event.get(field["name"], field.get("default"))
    return out


def test_every_event_type_has_a_sample_and_a_topic(codec):
    assert sorted(SAMPLES) == codec.event_types()
    assert len(codec.event_types()) == 19
    for event_type in codec.event_types():
        if event_type != "ConfigPublished":  # journal-only: published through the database
            assert topics.topic_for(event_type) in topics.ALL
        schema = avsc(event_type)
        assert schema["namespace"] == "billing"
        assert schema["doc"]
        assert all(f.get("doc") for f in schema["fields"])
        assert [f["name"] for f in schema["fields"][:3]] == [
            "event_id",
            "account_id",
            "occurred_at",
        ]


@pytest.mark.parametrize("event_type", sorted(SAMPLES))
def test_round_trip(codec, event_type):
    value = codec.encode(event_type, SAMPLES[event_type])
    fp = codec.fingerprint(event_type)
    assert value[:2] == MAGIC == b"\xc3\x01"
    assert value[2:HEADER_LEN] == struct.pack("<Q", fp)
    assert codec.headers(event_type) == [
        ("event_type", event_type.encode()),
        ("schema_fingerprint", f"{fp:016x}".encode()),
    ]
    decoded = codec.decode(value)
    assert decoded == Decoded(event_type, fp, with_defaults(event_type, SAMPLES[event_type]))
    for name, v in decoded.event.items():
        assert not isinstance(v, float), name
        if isinstance(v, dt.datetime):
            assert v.utcoffset() == dt.timedelta(0), name
    assert isinstance(decoded.event["event_id"], str)


@pytest.mark.parametrize("event_type", sorted(SAMPLES))
def test_reference_avro_library_reads_our_bytes(codec, event_type):
    value = codec.encode(event_type, SAMPLES[event_type])
    schema = avro.schema.parse(json.dumps(avsc(event_type)))
    body = io.BytesIO(value[HEADER_LEN:])
    datum = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(body))
    assert body.tell() == len(value) - HEADER_LEN  # consumed exactly the body
    assert datum == with_defaults(event_type, SAMPLES[event_type])


@pytest.mark.parametrize("event_type", sorted(SAMPLES))
def test_we_read_the_reference_avro_librarys_bytes(codec, event_type):
    schema = avro.schema.parse(json.dumps(avsc(event_type)))
    datum = with_defaults(event_type, SAMPLES[event_type])
    # The reference writer does not rescale a Decimal to the schema's scale (it writes the
    # unscaled digits as they are), so hand it Decimals that already have 9 places.
    datum = {
        k: v.quantize(Decimal("1E-9")) if isinstance(v, Decimal) else v for k, v in datum.items()
    }
    buf = io.BytesIO()
    avro.io.DatumWriter(schema).write(datum, avro.io.BinaryEncoder(buf))
    value = MAGIC + struct.pack("<Q", codec.fingerprint(event_type)) + buf.getvalue()
    assert value == codec.encode(event_type, SAMPLES[event_type])
    assert codec.decode(value).event == datum


# --- fingerprint, from the Avro spec ----------------------------------------------------------

_EMPTY64 = 0xC15D213AA4D7A795
_TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (_EMPTY64 & -(_fp & 1))
    _TABLE.append(_fp)


def crc64_avro(data: bytes) -> int:
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def canonical(schema, namespace: str | None = None, seen: set | None = None) -> str:
    """Parsing Canonical Form (spec: PRIMITIVES, FULLNAMES, STRIP, ORDER, STRINGS, WHITESPACE)
    for the subset of Avro our schemas use."""
    seen = set() if seen is None else seen
    primitives = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
    if isinstance(schema, list):
        return "[" + ",".join(canonical(s, namespace, seen) for s in schema) + "]"
    if isinstance(schema, str):
        if schema in primitives:
            return json.dumps(schema)
        return json.dumps(schema if "." in schema else f"{namespace}.{schema}")
    kind = schema["type"]
    if kind in primitives:  # logicalType and the rest are stripped
        return json.dumps(kind)
    if kind == "array":
        return '{"type":"array","items":' + canonical(schema["items"], namespace, seen) + "}"
    name = schema["name"]
    if "." not in name:
        namespace = schema.get("namespace", namespace)
        name = f"{namespace}.{name}" if namespace else name
    else:
        namespace = name.rsplit(".", 1)[0]
    if name in seen:
        return json.dumps(name)
    seen.add(name)
    head = '{"name":' + json.dumps(name) + ',"type":' + json.dumps(kind)
    if kind == "enum":
        return head + ',"symbols":' + json.dumps(schema["symbols"], separators=(",", ":")) + "}"
    assert kind == "record", kind
    fields = ",".join(
        '{"name":'
        + json.dumps(f["name"])
        + ',"type":'
        + canonical(f["type"], namespace, seen)
        + "}"
        for f in schema["fields"]
    )
    return head + ',"fields":[' + fields + "]}"


@pytest.mark.parametrize("event_type", sorted(SAMPLES))
def test_fingerprint_is_crc64_avro_of_the_parsing_canonical_form(codec, event_type):
    form = canonical(avsc(event_type))
    assert form == fastavro.schema.to_parsing_canonical_form(
        fastavro.parse_schema(avsc(event_type))
    )
    assert codec.fingerprint(event_type) == crc64_avro(form.encode())


def test_fingerprint_byte_order_matches_the_reference_library():
    # avro 1.12's own canonical form keeps {"type":"string"} for logical types (the spec and
    # Java strip it to "string"), so compare with it on a schema without logical types.
    schema = {
        "type": "record",
        "name": "Plain",
        "namespace": "billing",
        "fields": [
            {"name": "a", "type": "string"},
            {"name": "b", "type": ["null", "long"], "default": None},
            {"name": "c", "type": {"type": "enum", "name": "E", "symbols": ["x", "y"]}},
        ],
    }
    fp = Codec().register(schema)
    reference = avro.schema.parse(json.dumps(schema)).fingerprint("CRC-64-AVRO")
    assert struct.pack("<Q", fp) == reference
    assert fp == crc64_avro(canonical(schema).encode())


# --- evolution ------------------------------------------------------------------------------


def payment_method_added_v1() -> dict:
    """What PaymentMethodAdded looked like before `kind` was added."""
    schema = avsc("PaymentMethodAdded")
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "kind"]
    return schema


def test_old_writer_is_read_with_the_current_reader_and_gets_defaults(codec):
    v1 = payment_method_added_v1()
    old = Codec()
    v1_fp = old.register(v1)
    value = old.encode("PaymentMethodAdded", ev(20, payment_method_id="pm-9"))

    current = Codec.load()
    with pytest.raises(UnknownFingerprintError, match=f"{v1_fp:016x}"):
        current.decode(value)
    assert current.register(v1) == v1_fp
    assert current.fingerprint("PaymentMethodAdded") == codec.fingerprint("PaymentMethodAdded")
    decoded = current.decode(value)
    assert decoded.event_type == "PaymentMethodAdded"
    assert decoded.fingerprint == v1_fp
    assert decoded.event == {**ev(20, payment_method_id="pm-9"), "kind": "card"}


def test_old_usage_without_newer_counters_reads_as_zero():
    v1 = avsc("UsageRecorded")
    v1["fields"] = [
        f for f in v1["fields"] if f["name"] not in ("cached_input_tokens", "images", "steps")
    ]
    old = Codec()
    old.register(v1)
    event = ev(21, request_id="r", product="serverless", model="m", service_tier="batch")
    value = old.encode("UsageRecorded", {**event, "input_tokens": 5})
    current = Codec.load()
    current.register(v1)
    got = current.decode(value).event
    assert got["input_tokens"] == 5
    assert got["cached_input_tokens"] == got["images"] == got["steps"] == 0


def test_newer_reader_with_a_defaulted_field_reads_current_data(codec):
    v2 = avsc("PaymentMethodAdded")
    v2["fields"].append(
        {"name": "nickname", "type": "string", "default": "", "doc": "test-only v2 field"}
    )
    newer = Codec.load()
    v2_fp = newer.register(v2, current=True)
    assert (
        newer.fingerprint("PaymentMethodAdded") == v2_fp != codec.fingerprint("PaymentMethodAdded")
    )
    value = codec.encode("PaymentMethodAdded", SAMPLES["PaymentMethodAdded"])
    decoded = newer.decode(value)
    assert decoded.fingerprint == codec.fingerprint("PaymentMethodAdded")
    assert decoded.event == {
        **with_defaults("PaymentMethodAdded", SAMPLES["PaymentMethodAdded"]),
        "nickname": "",
    }
    # and the v2 writer's own data still decodes
    assert newer.decode(newer.encode("PaymentMethodAdded", decoded.event)).event == decoded.event


def test_unknown_enum_symbol_from_a_newer_writer_is_a_schema_violation():
    newer_writer = avsc("UsageRecorded")
    newer_writer["fields"][4]["type"]["symbols"].append("audio")
    newer = Codec()
    newer.register(newer_writer)
    event = ev(22, request_id="r", product="audio", model="m", service_tier="standard")
    value = newer.encode("UsageRecorded", event)
    current = Codec.load()
    current.register(newer_writer, current=False)
    with pytest.raises(UnknownEnumValueError, match="unknown enum value") as info:
        current.decode(value)
    assert isinstance(info.value, SchemaViolationError)
    assert info.value.reason == "unknown_enum_value"


# --- decode failures ------------------------------------------------------------------------


def shadow_body(event_type: str, **overrides) -> bytes:
    """A body written with a doctored copy of the schema (field types replaced), to produce
    bytes the real writer never would."""
    schema = avsc(event_type)
    datum = with_defaults(event_type, SAMPLES[event_type])
    for field in schema["fields"]:
        if field["name"] in overrides:
            field["type"], datum[field["name"]] = overrides[field["name"]]
            field.pop("default", None)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), datum)
    return buf.getvalue()


def header(codec, event_type):
    return MAGIC + struct.pack("<Q", codec.fingerprint(event_type))


@pytest.mark.parametrize(
    "value", [b"", b"\xc3", b"\x00\x01" + bytes(20), b"\xc3\x00" + bytes(20), b"{}"]
)
def test_bad_magic(codec, value):
    with pytest.raises(BadMagicError, match="C3 01"):
        codec.decode(value)


def test_tombstone_has_its_own_reason_and_non_bytes_are_bad_magic(codec):
    with pytest.raises(TombstoneError, match="tombstone") as caught:
        codec.decode(None)
    assert caught.value.reason == "tombstone"
    with pytest.raises(BadMagicError, match="not bytes"):
        codec.decode("\xc3\x01")


def test_bad_magic_on_a_real_value(codec):
    value = bytearray(codec.encode("AccountOpened", SAMPLES["AccountOpened"]))
    value[1] = 0x02
    with pytest.raises(BadMagicError):
        codec.decode(bytes(value))


def test_unknown_fingerprint_names_it_in_hex(codec):
    body = codec.encode("AccountOpened", SAMPLES["AccountOpened"])[HEADER_LEN:]
    with pytest.raises(UnknownFingerprintError, match="0123456789abcdef") as info:
        codec.decode(MAGIC + struct.pack("<Q", 0x0123456789ABCDEF) + body)
    assert info.value.reason == "unknown_fingerprint"


@pytest.mark.parametrize("event_type", sorted(SAMPLES))
def test_every_truncation_is_a_truncated_body(codec, event_type):
    value = codec.encode(event_type, SAMPLES[event_type])
    for cut in range(2, len(value)):
        with pytest.raises(TruncatedBodyError):
            codec.decode(value[:cut])


def test_huge_length_is_truncated(codec):
    body = shadow_body("AccountHoldPlaced", account_id=("long", 2**40))
    with pytest.raises(TruncatedBodyError):
        codec.decode(header(codec, "AccountHoldPlaced") + body)


def test_trailing_bytes_are_a_schema_violation(codec):
    value = codec.encode("AccountOpened", SAMPLES["AccountOpened"])
    with pytest.raises(SchemaViolationError, match="1 trailing byte"):
        codec.decode(value + b"\x00")


def test_enum_index_out_of_range(codec):
    body = shadow_body("UsageRecorded", product=("int", 4))
    with pytest.raises(SchemaViolationError, match="index out of range"):
        codec.decode(header(codec, "UsageRecorded") + body)


def test_enum_index_out_of_range_in_an_array(codec):
    body = shadow_body("AccountSuspended", reasons=({"type": "array", "items": "int"}, [0, 9]))
    with pytest.raises(SchemaViolationError, match="index out of range"):
        codec.decode(header(codec, "AccountSuspended") + body)


def test_union_index_out_of_range(codec):
    body = shadow_body("UsageRecorded", gpu_type=("long", 2))
    with pytest.raises(SchemaViolationError, match="index out of range"):
        codec.decode(header(codec, "UsageRecorded") + body)


def test_invalid_utf8(codec):
    body = shadow_body("AccountHoldPlaced", reason=("bytes", b"\xff\xfe"))
    with pytest.raises(SchemaViolationError, match="UTF-8"):
        codec.decode(header(codec, "AccountHoldPlaced") + body)


def test_negative_length(codec):
    body = shadow_body("AccountHoldPlaced", account_id=("long", -3))
    with pytest.raises(SchemaViolationError, match="negative length"):
        codec.decode(header(codec, "AccountHoldPlaced") + body)


def test_random_corruption_only_raises_decode_errors(codec):
    rng = random.Random(20250314)
    values = [codec.encode(t, e) for t, e in SAMPLES.items()]
    outcomes = set()
    for _ in range(3000):
        value = bytearray(rng.choice(values))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(HEADER_LEN, len(value))
            value[pos] = rng.randrange(256)
        if rng.random() < 0.3:
            value = value[: rng.randrange(HEADER_LEN, len(value) + 1)]
        try:
            codec.decode(bytes(value))
            outcomes.add("ok")
        except DecodeError as exc:
            outcomes.add(type(exc).__name__)
    assert {"TruncatedBodyError", "SchemaViolationError"} <= outcomes


# --- encode validation ----------------------------------------------------------------------


def refuse(codec, event_type, event, field, match=None):
    with pytest.raises(InvalidEventError, match=match) as info:
        codec.encode(event_type, event)
    assert info.value.field == field
    assert info.value.event_type == event_type
    assert str(info.value).startswith(f"{event_type}.{field}: ")


def without(event: dict, name: str) -> dict:
    return {k: v for k, v in event.items() if k != name}


def test_encode_refuses_invalid_events(codec):
    usage = SAMPLES["UsageRecorded"]
    refuse(codec, "UsageRecorded", without(usage, "model"), "model", "missing required field")
    refuse(codec, "UsageRecorded", without(usage, "event_id"), "event_id", "missing")
    refuse(codec, "UsageRecorded", {**usage, "gpu_seconds": 1.5}, "gpu_seconds", "float")
    refuse(codec, "UsageRecorded", {**usage, "product": "audio"}, "product", "audio")
    refuse(codec, "UsageRecorded", {**usage, "service_tier": None}, "service_tier", "null")
    refuse(codec, "UsageRecorded", {**usage, "input_tokens": "12"}, "input_tokens", "str")
    refuse(codec, "UsageRecorded", {**usage, "input_tokens": 1.0}, "input_tokens", "float")
    refuse(codec, "UsageRecorded", {**usage, "input_tokens": True}, "input_tokens", "bool")
    refuse(codec, "UsageRecorded", {**usage, "input_tokens": 2**63}, "input_tokens", "range")
    refuse(codec, "UsageRecorded", {**usage, "model": b"m"}, "model", "bytes")
    refuse(codec, "UsageRecorded", {**usage, "modle": "m"}, "modle", "unknown field")
    refuse(codec, "UsageRecorded", {**usage, "event_id": "x"}, "event_id", "UUID")
    naive = T0.replace(tzinfo=None)
    refuse(codec, "UsageRecorded", {**usage, "occurred_at": naive}, "occurred_at", "naive")
    refuse(codec, "UsageRecorded", {**usage, "occurred_at": 1_700_000_000}, "occurred_at", "int")
    credit = SAMPLES["CreditPurchased"]
    refuse(codec, "CreditPurchased", {**credit, "amount": 100.0}, "amount", "float")
    refuse(codec, "CreditPurchased", {**credit, "amount": 100}, "amount", "Decimal")
    refuse(codec, "CreditPurchased", {**credit, "amount": "100"}, "amount", "Decimal")
    refuse(codec, "CreditPurchased", {**credit, "amount": None}, "amount", "null")
    refuse(codec, "CreditPurchased", {**credit, "amount": Decimal("NaN")}, "amount", "finite")
    refuse(codec, "CreditPurchased", {**credit, "amount": Decimal("1e-10")}, "amount", "places")
    refuse(codec, "CreditPurchased", {**credit, "amount": Decimal("1e11")}, "amount", "fit")
    refuse(codec, "CreditGranted", {**SAMPLES["CreditGranted"], "kind": "gift"}, "kind", "gift")
    suspended = SAMPLES["AccountSuspended"]
    bad = {**suspended, "reasons": ["MANUAL_HOLD", "TIRED"]}
    refuse(codec, "AccountSuspended", bad, "reasons[1]", "TIRED")
    refuse(codec, "AccountSuspended", {**suspended, "reasons": "MANUAL_HOLD"}, "reasons", "list")
    refuse(codec, "NoSuchEvent", {}, "<event_type>", "unknown event type")
    refuse(codec, "AccountOpened", [("account_id", "a")], "<event>", "dict")


def test_encode_refuses_what_the_journal_cannot_store(codec):
    usage = SAMPLES["UsageRecorded"]
    refuse(codec, "UsageRecorded", {**usage, "request_id": "r\x00"}, "request_id", "NUL")
    refuse(codec, "UsageRecorded", {**usage, "account_id": "a\x00b"}, "account_id", "NUL")
    refuse(codec, "UsageRecorded", {**usage, "account_id": "a" * 3000}, "account_id", "3000 bytes")
    refuse(codec, "UsageRecorded", {**usage, "model": "m\x1b[2J"}, "model", "U\\+001B")
    grant = SAMPLES["CreditGranted"]
    refuse(codec, "CreditGranted", {**grant, "grant_id": "g" * 257}, "grant_id", "exceeds 256")
    refuse(codec, "CreditGranted", {**grant, "reason": "x" * 5000}, "reason", "exceeds 4096")
    # Bounds are on UTF-8 bytes: 128 two-byte characters fit, 129 do not.
    codec.encode("CreditGranted", {**grant, "grant_id": "é" * 128})
    refuse(codec, "CreditGranted", {**grant, "grant_id": "é" * 129}, "grant_id", "258 bytes")


@pytest.mark.parametrize(
    ("field", "value", "error", "reason"),
    [
        ("request_id", "req\x00", UnstorableValueError, "unstorable_value"),
        ("account_id", "acct\x00", UnstorableValueError, "unstorable_value"),
        ("account_id", "a" * 3000, OversizedFieldError, "oversized_field"),
        ("model", "m\x07", UnstorableValueError, "unstorable_value"),
    ],
)
def test_decode_quarantines_what_the_journal_cannot_store(codec, field, value, error, reason):
    """Another client's bytes, not refused by our producer: decode names the reason."""
    body = shadow_body("UsageRecorded", **{field: ("string", value)})
    with pytest.raises(error, match=field) as caught:
        codec.decode(header(codec, "UsageRecorded") + body)
    assert caught.value.reason == reason


def test_decode_refuses_an_oversized_record_before_parsing_it(codec):
    value = header(codec, "UsageRecorded") + bytes(1024 * 1024)
    with pytest.raises(OversizedEventError, match="exceeds") as caught:
        codec.decode(value)
    assert caught.value.reason == "oversized_event"


def test_encode_normalizes_what_it_safely_can(codec):
    tz = dt.timezone(dt.timedelta(hours=-5))
    event = {
        **SAMPLES["CreditPurchased"],
        "amount": Decimal("12.340000000000"),  # 12 places, but exact at 9
        "occurred_at": T0.astimezone(tz),
        "event_id": SAMPLES["CreditPurchased"]["event_id"].upper(),
    }
    got = codec.decode(codec.encode("CreditPurchased", event)).event
    assert got["amount"] == Decimal("12.34")
    assert got["occurred_at"] == T0
    assert got["occurred_at"].tzinfo == UTC


def test_encode_does_not_mutate_its_input(codec):
    event = copy.deepcopy(SAMPLES["AccountSuspended"])
    codec.encode("AccountSuspended", event)
    assert event == SAMPLES["AccountSuspended"]


def test_default_codec_is_shared():
    assert Codec.default() is Codec.default()


def test_load_reads_history_as_extra_writer_versions(tmp_path, monkeypatch):
    root = resources.files("schemas")
    for entry in root.iterdir():
        if entry.name.endswith(".avsc"):
            (tmp_path / entry.name).write_text(entry.read_text("utf-8"))
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "PaymentMethodAdded.v1.avsc").write_text(
        json.dumps(payment_method_added_v1())
    )
    monkeypatch.setattr("ledger.codec.resources.files", lambda package: tmp_path)
    loaded = Codec.load()
    old = Codec()
    old.register(payment_method_added_v1())
    value = old.encode("PaymentMethodAdded", ev(30, payment_method_id="pm"))
    assert loaded.decode(value).event["kind"] == "card"
    assert loaded.fingerprint("PaymentMethodAdded") == Codec.default().fingerprint(
        "PaymentMethodAdded"
    )


def _with_event_id(codec: Codec, event_type: str, event_id: str) -> bytes:
    """SAMPLES[event_type] written with any string as its event_id (no UUID check on the way)."""
    schema = avsc(event_type)
    for field in schema["fields"]:
        if field["name"] == "event_id":
            field["type"] = "string"
    datum = with_defaults(event_type, SAMPLES[event_type]) | {"event_id": event_id}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), datum)
    return MAGIC + struct.pack("<Q", codec.fingerprint(event_type)) + buf.getvalue()


@pytest.mark.parametrize(
    "spelling",
    [
        "12345678-9abc-4def-8123-456789abcdef",
        "12345678-9ABC-4DEF-8123-456789ABCDEF",
        "{12345678-9abc-4def-8123-456789abcdef}",
        "urn:uuid:12345678-9abc-4def-8123-456789abcdef",
        "123456789abc4def8123456789abcdef",
    ],
)
def test_an_event_id_is_read_as_the_canonical_text_of_its_uuid(codec, spelling):
    # Every spelling of one UUID is one event_id (so one event for the dedupe), in lower case.
    decoded = codec.decode(_with_event_id(codec, "UsageRecorded", spelling))
    assert decoded.event["event_id"] == "12345678-9abc-4def-8123-456789abcdef"


@pytest.mark.parametrize("bad", ["x", "", "12345678-9abc-4def-8123-456789abcdeg", "1" * 40])
def test_an_event_id_that_is_no_uuid_is_a_schema_violation(codec, bad):
    with pytest.raises(SchemaViolationError, match=": ValueError: "):
        codec.decode(_with_event_id(codec, "UsageRecorded", bad))


def test_a_config_publication_keeps_its_event_id_as_written(codec):
    # Its event_id is no UUID (config:{kind}:{version}:{shard}), and its schema says so.
    value = _with_event_id(codec, "ConfigPublished", "config:policy:2026-01:3")
    assert codec.decode(value).event["event_id"] == "config:policy:2026-01:3"
