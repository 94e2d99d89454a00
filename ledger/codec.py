"""Avro wire format of every billing event: single-object encoding, schemas from `schemas/`.

A Kafka value is `C3 01` + the writer schema's CRC-64-AVRO fingerprint (8 bytes, little-endian)
+ the schemaless Avro body. `fingerprint` values in this module are that 64-bit number as an
int; the `schema_fingerprint` header and error messages show it as 16 hex digits
(`f"{fp:016x}"`, the Java `SchemaNormalization.parsingFingerprint64` value). Note that
`fastavro.schema.fingerprint()` returns the hex of the *little-endian bytes* instead.

Decoding looks the writer schema up by fingerprint (current schemas plus `schemas/history/`)
and reads with the current schema of that event type, so old events get new fields' defaults.
Decoded events hold money as `Decimal`, timestamps as aware UTC datetimes, `event_id` as str.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Context, Decimal, InvalidOperation
from importlib import resources
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import parse_schema, to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

from ledger import bounds
from ledger.errors import (
    BadMagicError,
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

MAGIC = b"\xc3\x01"
HEADER_LEN = 10  # magic + 8-byte fingerprint
_BYTES = (bytes, bytearray, memoryview)  # a tuple: `bytes | ...` would build a union per call
_INT_RANGE = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_MISSING = object()
_DECIMAL_CONTEXT = Context(prec=60, traps=[InvalidOperation])  # independent of the caller's


@dataclass(frozen=True)
class Decoded:
    event_type: str
    fingerprint: int
    event: dict


def schema_fingerprint(parsed: dict) -> int:
    """CRC-64-AVRO fingerprint of a parsed schema's parsing canonical form, as an int."""
    digest = _fastavro_fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
    return int.from_bytes(bytes.fromhex(digest), "little")


@dataclass(frozen=True)
class _Schema:
    event_type: str
    parsed: dict
    named: dict  # full name -> parsed named type, for references inside `parsed`
    fingerprint: int
    prefix: bytes  # MAGIC + fingerprint, the first HEADER_LEN bytes of every value
    # For reading: `parsed` with the uuid logical type taken off its top-level fields (named in
    # `uuid_fields`), which are then read as strings and checked by `_uuid_text`: fastavro
    # would make a uuid.UUID of each, only for the ledger to make it a string again.
    read_parsed: dict
    uuid_fields: tuple[str, ...]

    @classmethod
    def parse(cls, schema: dict) -> _Schema:
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise ValueError("an event schema must be an Avro record")
        named: dict = {}
        parsed = parse_schema(schema, named_schemas=named)
        fp = schema_fingerprint(parsed)
        event_type = parsed["name"].rsplit(".", 1)[-1]
        uuid_fields = tuple(
            f["name"]
            for f in schema.get("fields", ())
            if isinstance(f.get("type"), dict) and f["type"].get("logicalType") == "uuid"
        )
        read_parsed = parsed
        if uuid_fields:
            plain = dict(schema)
            plain["fields"] = [
                {**f, "type": {k: v for k, v in f["type"].items() if k != "logicalType"}}
                if f["name"] in uuid_fields
                else f
                for f in schema["fields"]
            ]
            read_parsed = parse_schema(plain, named_schemas={})
        return cls(
            event_type,
            parsed,
            named,
            fp,
            MAGIC + fp.to_bytes(8, "little"),
            read_parsed,
            uuid_fields,
        )


def _has_float(schema: Any) -> bool:
    """Whether an Avro schema (as JSON) has a float or double anywhere in it."""
    if isinstance(schema, str):
        return schema in ("float", "double")
    if isinstance(schema, list):
        return any(_has_float(branch) for branch in schema)
    if isinstance(schema, dict):
        parts = [schema.get("type"), schema.get("items"), schema.get("values")]
        parts += [field.get("type") for field in schema.get("fields", ())]
        return any(_has_float(part) for part in parts if part is not None)
    return False


# str(uuid.UUID(s)) == s exactly for these; other spellings uuid.UUID accepts (upper case,
# braces, "urn:uuid:", no hyphens) are made this one, as fastavro's uuid type + str() did.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid_text(value: str) -> str:
    """`value` as the canonical text of a UUID; ValueError if it is none."""
    if _CANONICAL_UUID.fullmatch(value):
        return value
    return str(uuid.UUID(value))


class Codec:
    def __init__(self) -> None:
        self._current: dict[str, _Schema] = {}  # event type -> reader (and writer) schema
        self._writers: dict[int, _Schema] = {}  # fingerprint -> any known version

    @classmethod
    def load(cls) -> Codec:
        """A new codec with the schemas shipped in the `schemas` package."""
        codec = cls()
        root = resources.files("schemas")
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".avsc"):
                codec.register(json.loads(entry.read_text("utf-8")), current=True)
        history = root / "history"
        if history.is_dir():
            for entry in sorted(history.iterdir(), key=lambda e: e.name):
                if entry.name.endswith(".avsc"):
                    codec.register(json.loads(entry.read_text("utf-8")))
        return codec

    @classmethod
    @functools.cache
    def default(cls) -> Codec:
        """The shared codec for the shipped schemas (do not `register` on it in tests)."""
        return cls.load()

    def register(self, schema: dict, *, current: bool = False) -> int:
        """Add a schema version. It becomes the reader for its event type if `current` is true
        or the type has none yet; otherwise it is only known as a writer. Returns its fingerprint.
        """
        s = _Schema.parse(schema)
        reader = current or s.event_type not in self._current
        if reader and _has_float(schema):
            # Amounts are decimals; and the journal's canonical JSON (ledger.book) takes no
            # float. A writer schema with one is fine: its field is skipped or refused on read.
            raise ValueError(f"{s.event_type}: a reader schema may not have a float or double")
        self._writers[s.fingerprint] = s
        if reader:
            self._current[s.event_type] = s
        return s.fingerprint

    def event_types(self) -> list[str]:
        return sorted(self._current)

    def fingerprint(self, event_type: str) -> int:
        return self._schema(event_type).fingerprint

    def schema(self, event_type: str) -> dict:
        """The current (parsed) schema of an event type."""
        return self._schema(event_type).parsed

    def headers(self, event_type: str) -> list[tuple[str, bytes]]:
        fp = self._schema(event_type).fingerprint
        return [("event_type", event_type.encode()), ("schema_fingerprint", f"{fp:016x}".encode())]

    # --- encode ----------------------------------------------------------------------------

    def encode(self, event_type: str, event: Mapping[str, Any]) -> bytes:
        """Validate `event` against the current schema and return its single-object encoding.
        Raises InvalidEventError naming the offending field."""
        s = self._schema(event_type)
        datum = self._prepare(s, event)
        buf = io.BytesIO()
        buf.write(s.prefix)
        try:
            fastavro.schemaless_writer(buf, s.parsed, datum)
        except Exception as exc:  # validated above, so this is a bug or a gap in validation
            raise InvalidEventError(event_type, "?", f"cannot encode: {exc}") from exc
        value = buf.getvalue()
        if len(value) > bounds.MAX_EVENT_BYTES:
            raise InvalidEventError(
                event_type,
                "<event>",
                f"encoded event of {len(value)} bytes exceeds {bounds.MAX_EVENT_BYTES}",
            )
        return value

    def _prepare(self, s: _Schema, event: Mapping[str, Any]) -> dict:
        if not isinstance(event, Mapping):
            raise InvalidEventError(s.event_type, "<event>", f"expected a dict, got {_t(event)}")
        fields = {f["name"]: f for f in s.parsed["fields"]}
        for name in event:
            if name not in fields:
                raise InvalidEventError(s.event_type, str(name), "unknown field")
        datum: dict[str, Any] = {}
        for name, field in fields.items():
            value = event.get(name, _MISSING)
            if value is _MISSING:
                if "default" not in field:
                    raise InvalidEventError(s.event_type, name, "missing required field")
                value = field["default"]
                value = list(value) if isinstance(value, list) else value
            try:
                datum[name] = _check(value, field["type"], s.named)
            except _Invalid as exc:
                raise InvalidEventError(s.event_type, name + exc.path, exc.message) from None
        try:  # second opinion from fastavro itself
            validate(datum, s.parsed, raise_errors=True)
        except ValidationError as exc:
            path = exc.errors[0].field if exc.errors else ""
            field = path.removeprefix(s.parsed["name"] + ".") or "?"
            raise InvalidEventError(s.event_type, field, _oneline(exc)) from None
        except (ValueError, TypeError) as exc:
            raise InvalidEventError(s.event_type, "?", _oneline(exc)) from None
        try:  # what the journal could not store is refused here too, by field
            bounds.check_event(datum)
        except bounds.BoundsViolation as exc:
            raise InvalidEventError(s.event_type, exc.field, exc.message) from None
        return datum

    # --- decode ----------------------------------------------------------------------------

    def decode(self, value: bytes) -> Decoded:
        """Decode a Kafka value. Raises a DecodeError subclass, never anything else."""
        if value is None:
            raise TombstoneError("no value (tombstone)")
        if not isinstance(value, _BYTES):
            raise BadMagicError(f"value is {_t(value)}, not bytes")
        value = bytes(value)
        if len(value) > bounds.MAX_EVENT_BYTES:
            raise OversizedEventError(
                f"value of {len(value)} bytes exceeds {bounds.MAX_EVENT_BYTES} bytes"
            )
        if value[:2] != MAGIC:
            raise BadMagicError(
                "value does not start with the Avro single-object marker C3 01 "
                f"(starts with {value[:2].hex() or 'nothing'})"
            )
        if len(value) < HEADER_LEN:
            raise TruncatedBodyError(
                f"value is {len(value)} bytes, shorter than the 10-byte header"
            )
        fp = int.from_bytes(value[2:HEADER_LEN], "little")
        writer = self._writers.get(fp)
        if writer is None:
            raise UnknownFingerprintError(f"unknown schema fingerprint {fp:016x}")
        reader = self._current[writer.event_type]
        fo = io.BytesIO(value)
        fo.seek(HEADER_LEN)
        what = f"{writer.event_type} (schema {fp:016x})"
        try:
            event = fastavro.schemaless_reader(
                fo, writer.read_parsed, None if reader is writer else reader.read_parsed
            )
            uuid_fields = (
                reader.uuid_fields
                if reader is writer
                else (*writer.uuid_fields, *reader.uuid_fields)
            )
            for name in uuid_fields:
                text = event.get(name)
                if isinstance(text, str):
                    event[name] = _uuid_text(text)
        except EOFError as exc:
            if _NEGATIVE_LENGTH.search(str(exc)):
                raise SchemaViolationError(f"{what}: negative length in body") from None
            raise TruncatedBodyError(f"{what}: body ends early ({exc or 'EOF'})") from None
        except IndexError as exc:
            if "string index" in str(exc):  # the C reader ran off the end of the buffer
                raise TruncatedBodyError(f"{what}: body ends early") from None
            raise SchemaViolationError(f"{what}: enum or union index out of range") from None
        except SchemaResolutionError as exc:
            if "symbol" in str(exc):
                raise UnknownEnumValueError(f"{what}: unknown enum value: {exc}") from None
            raise SchemaViolationError(f"{what}: cannot resolve to reader: {exc}") from None
        except UnicodeDecodeError as exc:
            raise SchemaViolationError(f"{what}: invalid UTF-8 in a string: {exc}") from None
        except Exception as exc:
            raise SchemaViolationError(f"{what}: {type(exc).__name__}: {exc}") from None
        trailing = len(value) - fo.tell()
        if trailing:
            raise SchemaViolationError(f"{what}: {trailing} trailing bytes after the body")
        if not isinstance(event, dict):
            raise SchemaViolationError(f"{what}: body is not a record")
        try:
            bounds.check_event(event)
        except bounds.BoundsViolation as exc:
            error = OversizedFieldError if exc.reason == "oversized_field" else UnstorableValueError
            raise error(f"{what}: {exc}") from None
        return Decoded(reader.event_type, fp, event)

    def _schema(self, event_type: str) -> _Schema:
        try:
            return self._current[event_type]
        except KeyError:
            known = ", ".join(self.event_types())
            raise InvalidEventError(
                str(event_type), "<event_type>", f"unknown event type (known: {known})"
            ) from None


_NEGATIVE_LENGTH = re.compile(r"Expected -\d+ bytes")


class _Invalid(Exception):
    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.message = message
        self.path = path


def _check(value: Any, schema: Any, named: dict) -> Any:
    """Strictly check one value against a (parsed) field schema; return it ready for fastavro
    (decimals quantized to the schema's scale, UUIDs as str). Raises _Invalid."""
    if isinstance(schema, str) and schema in named:
        schema = named[schema]
    if isinstance(schema, list):  # union: our schemas only use ["null", X]
        if value is None:
            if "null" in schema:
                return None
            raise _Invalid("null is not allowed")
        problems = []
        for branch in schema:
            if branch == "null":
                continue
            try:
                return _check(value, branch, named)
            except _Invalid as exc:
                problems.append(exc)
        raise problems[0] if problems else _Invalid(f"{_t(value)} does not match {schema}")
    kind = schema if isinstance(schema, str) else schema["type"]
    logical = None if isinstance(schema, str) else schema.get("logicalType")
    if value is None and kind != "null":
        raise _Invalid("null is not allowed")
    if logical == "decimal":
        return _check_decimal(value, schema["precision"], schema.get("scale", 0))
    if logical in ("timestamp-micros", "timestamp-millis"):
        if not isinstance(value, dt.datetime):
            raise _Invalid(f"expected an aware datetime, got {_t(value)}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise _Invalid("naive datetime; use an aware datetime (e.g. tzinfo=UTC)")
        return value
    if logical == "uuid":
        if isinstance(value, uuid.UUID):
            return str(value)
        if not isinstance(value, str):
            raise _Invalid(f"expected a UUID string, got {_t(value)}")
        try:
            uuid.UUID(value)
        except ValueError:
            raise _Invalid(f"not a UUID: {value!r}") from None
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise _Invalid(f"expected str, got {_t(value)}")
        return value
    if kind in _INT_RANGE:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected int ({kind}), got {_t(value)}")
        low, high = _INT_RANGE[kind]
        if not low <= value <= high:
            raise _Invalid(f"{value} is out of range for {kind}")
        return value
    if kind == "enum":
        if value not in schema["symbols"]:
            raise _Invalid(
                f"unknown enum symbol {value!r} for {schema['name']} "
                f"(expected one of {', '.join(schema['symbols'])})"
            )
        return value
    if kind == "array":
        if not isinstance(value, list | tuple):
            raise _Invalid(f"expected a list, got {_t(value)}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_check(item, schema["items"], named))
            except _Invalid as exc:
                raise _Invalid(exc.message, f"[{i}]{exc.path}") from None
        return out
    if kind == "boolean" and not isinstance(value, bool):
        raise _Invalid(f"expected bool, got {_t(value)}")
    return value  # anything else is left to fastavro's validate


def _check_decimal(value: Any, precision: int, scale: int) -> Decimal:
    if isinstance(value, float):
        raise _Invalid(f"float {value!r} is not allowed for money; use decimal.Decimal")
    if isinstance(value, bool) or not isinstance(value, Decimal):
        raise _Invalid(f"expected decimal.Decimal, got {_t(value)}")
    if not value.is_finite():
        raise _Invalid(f"{value} is not a finite decimal")
    try:
        quantized = value.quantize(Decimal(1).scaleb(-scale), context=_DECIMAL_CONTEXT)
    except InvalidOperation:
        raise _Invalid(f"{value} does not fit decimal({precision},{scale})") from None
    if quantized != value:
        raise _Invalid(f"{value} has more than {scale} decimal places")
    if len(quantized.as_tuple().digits) > precision:
        raise _Invalid(f"{value} does not fit decimal({precision},{scale})")
    return quantized


def _t(value: Any) -> str:
    return type(value).__name__


def _oneline(exc: Exception) -> str:
    return " ".join(str(exc).split())
