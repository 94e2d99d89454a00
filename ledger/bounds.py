"""What the journal can store: bounds on an event's strings, checked before any transaction.

Avro lets through strings that PostgreSQL refuses (a NUL character cannot be held by `text`
or `jsonb`) and identifiers too long for a btree index entry (about 2.7 kB): one such event
would fail its whole batch. Both the producer API (`Codec.encode`) and the ledger
(`Codec.decode`) apply these bounds, so a bad event is refused by name before it is sent and,
if another client sent it anyway, quarantined on its own.

The bounds, in UTF-8 bytes:
  identifiers (`account_id`, `*_id`, `model`, `gpu_type`, `payment_reference`)
                                     at most MAX_ID_BYTES, no control characters at all
  any other string                   at most MAX_TEXT_BYTES, no NUL
  a configuration `document`         no NUL; bounded by the event size only
  a whole Kafka record value         at most MAX_EVENT_BYTES (checked by the ledger writer)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

MAX_ID_BYTES = 256
MAX_TEXT_BYTES = 4096
MAX_EVENT_BYTES = 64 * 1024

IDENTIFIER_FIELDS = frozenset({"model", "gpu_type", "payment_reference"})
DOCUMENT_FIELDS = frozenset({"document"})  # ConfigPublished: a whole price-book version
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # Unicode Cc and Cs


class BoundsViolation(Exception):
    """An event holds a value the journal cannot store. `reason` is the quarantine reason."""

    def __init__(self, reason: str, field: str, message: str):
        self.reason = reason
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def is_identifier(field: str) -> bool:
    name = field.rsplit(".", 1)[-1].split("[", 1)[0]
    return name.endswith("_id") or name in IDENTIFIER_FIELDS


# Values with no string inside: nothing to check (the common case skips _check_value).
_NO_STRINGS = frozenset({int, bool, float, Decimal, datetime, type(None), bytes, UUID})


def check_event(event: Mapping[str, Any]) -> None:
    """Raise BoundsViolation for the first field the journal could not store."""
    for name, value in event.items():
        kind = value.__class__
        if kind is str:
            # Fast path, once per string of every event: printable ASCII is neither NUL nor a
            # control character, and its UTF-8 size is its length, within every bound.
            if len(value) <= MAX_ID_BYTES and value.isascii() and value.isprintable():
                continue
        elif kind in _NO_STRINGS:
            continue
        _check_value(str(name), value)


def _check_value(field: str, value: Any) -> None:
    if isinstance(value, str):
        _check_string(field, value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_value(f"{field}.{key}", item)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(f"{field}[{i}]", item)


def _check_string(field: str, value: str) -> None:
    if "\x00" in value:
        raise BoundsViolation(
            "unstorable_value",
            field,
            f"contains a NUL character at position {value.index(chr(0))}, "
            "which PostgreSQL text cannot hold",
        )
    size = len(value.encode("utf-8", "surrogatepass"))
    if is_identifier(field):
        if size > MAX_ID_BYTES:
            raise BoundsViolation(
                "oversized_field", field, f"identifier of {size} bytes exceeds {MAX_ID_BYTES}"
            )
        control = _CONTROL.search(value)
        if control is not None:
            raise BoundsViolation(
                "unstorable_value",
                field,
                f"identifier contains control character U+{ord(control.group()):04X} "
                f"at position {control.start()}",
            )
    elif size > MAX_TEXT_BYTES and field not in DOCUMENT_FIELDS:
        raise BoundsViolation(
            "oversized_field", field, f"string of {size} bytes exceeds {MAX_TEXT_BYTES}"
        )
