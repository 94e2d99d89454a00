"""`ledger rejects`: what was quarantined, and feeding it again once it is fixed.

An event is rejected for a reason that may go away: its writer schema was unknown (add it
to `schemas/history/`), a bound in the policy was too tight, a bug raised a processing error.
`replay` feeds each open reject, one at a time and in rejection order, through the same writer
as the live consumer (its own transaction, no Kafka offsets, no second dead-letter copy). One
that is now accepted is journaled, and the projections pick it up like any entry; its reject
row is marked resolved. One still refused stays open, with the reason it gets now.
`dismiss` resolves one by hand, with a note. Resolved rejects are pruned after
LEDGER_REJECTS_RETENTION_DAYS (`ledger prune`, `ledger.retention`).

`show` gives one reject as data; `reject_lines` renders it for a terminal without ever writing
a control character from the record (bytes as a hex dump, text with escapes).
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections import Counter
from datetime import datetime

import structlog

from ledger import chain_keys, db, topics
from ledger.book import LedgerFold
from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.errors import DecodeError
from ledger.journal import LedgerWriter
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.replay import StoredRecord
from ledger.settings import Settings

log = structlog.get_logger(__name__)


@dataclasses.dataclass
class RejectsReplayed:
    journaled: list[int] = dataclasses.field(default_factory=list)
    duplicates: list[int] = dataclasses.field(default_factory=list)
    still_rejected: Counter = dataclasses.field(default_factory=Counter)


def summary(dsn: str) -> list[tuple[str, int, int]]:
    """(reason, open, resolved) per rejection reason."""
    with db.connect(dsn) as conn:
        return conn.execute(QUERIES["rejects_by_reason"]).fetchall()


def replay_rejects(
    settings: Settings,
    dsn: str,
    *,
    reason: str | None = None,
    limit: int = 100_000,
    codec: Codec | None = None,
) -> RejectsReplayed:
    codec = codec or Codec.default()
    fold = LedgerFold(PriceBook.load(settings.price_book), Policy.load(settings.policy))
    outcome = RejectsReplayed()
    with db.connect(dsn) as conn:
        writer = LedgerWriter(
            conn,
            fold,
            keys=chain_keys.load(settings),
            group_id=settings.consumer_group,
            deadletter_topic=settings.topic(topics.DEADLETTER),
            codec=codec,
        )
        rows = conn.execute(QUERIES["open_rejects"], {"reason": reason, "limit": limit})
        for reject_id, topic, partition, offset, key, raw, old_reason in rows.fetchall():
            record = StoredRecord(topic, partition, offset, key, bytes(raw))
            result = writer.write_batch([record], replay=True)
            if result.journaled:
                outcome.journaled.append(reject_id)
                resolution = "journaled"
            elif result.duplicates:
                outcome.duplicates.append(reject_id)
                resolution = "already journaled (same event_id and body)"
            else:
                outcome.still_rejected[_reason_now(codec, raw, old_reason)] += 1
                continue
            conn.execute(QUERIES["resolve_reject"], (resolution, reject_id))
            conn.commit()
            log.info("reject_resolved", id=reject_id, was=old_reason, resolution=resolution)
    return outcome


def dismiss(dsn: str, reject_id: int, note: str) -> bool:
    """Mark an open reject resolved by an operator (it will never be journaled: garbage
    bytes, a test record, ...), with `note` saying why; its bytes stay until retention
    prunes it. False if there is no open reject with that id."""
    with db.connect(dsn) as conn:
        row = conn.execute(QUERIES["dismiss_reject"], (f"dismissed: {note}", reject_id))
        done = row.fetchone() is not None
        conn.commit()
    if done:
        log.info("reject_resolved", id=reject_id, resolution="dismissed")
    return done


DUMP_BYTES = 256  # raw bytes shown by `ledger rejects show` unless --bytes says otherwise


def show(dsn: str, reject_id: int) -> dict | None:
    """One reject, every column (the raw bytes in full); None if there is no such id."""
    with db.connect(dsn) as conn:
        row = conn.execute(QUERIES["reject_row"], (reject_id,)).fetchone()
    if row is None:
        return None
    keys = (
        "id",
        "reason",
        "detail",
        "topic",
        "partition",
        "offset",
        "key",
        "event_id",
        "event_type",
        "rejected_at",
        "resolved_at",
        "resolution",
        "raw",
    )
    reject = dict(zip(keys, row, strict=True))
    reject["raw"] = bytes(reject["raw"])
    reject["key"] = bytes(reject["key"]) if reject["key"] is not None else None
    return reject


def printable(text: str, *, newlines: bool = False) -> str:
    """`text` with every control, format or unassigned character (C0, DEL, C1, bidi
    overrides, ...) written as an escape such as \\x1b, so it cannot drive a terminal."""
    out = []
    for ch in text:
        if (newlines and ch == "\n") or unicodedata.category(ch)[0] != "C":
            out.append(ch)
        elif ord(ch) <= 0xFF:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def hex_dump(data: bytes, *, width: int = 16) -> list[str]:
    """`offset  hex bytes  |ascii|` lines; anything outside printable ASCII shows as `.`."""
    lines = []
    for start in range(0, len(data), width):
        chunk = data[start : start + width]
        hexed = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{start:08x}  {hexed:<{width * 3 - 1}}  |{text}|")
    return lines


def shown_key(key: bytes | None) -> str:
    """A record key for a terminal: quoted text when it is printable UTF-8, else hex."""
    if key is None:
        return "(none)"
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return f"hex {key.hex()}"
    return repr(text) if printable(text) == text else f"hex {key.hex()}"


def reject_json(reject: dict, *, limit: int = DUMP_BYTES) -> dict:
    """The reject as JSON-ready data: the first `limit` raw bytes as hex (0: all of them)."""
    raw = reject["raw"]
    shown = raw if limit == 0 else raw[:limit]
    key = reject["key"]
    return {
        "id": reject["id"],
        "reason": reject["reason"],
        "detail": reject["detail"],
        "origin": {
            "topic": reject["topic"],
            "partition": reject["partition"],
            "offset": reject["offset"],
            "key_hex": key.hex() if key is not None else None,
        },
        "event_id": reject["event_id"],
        "event_type": reject["event_type"],
        "rejected_at": _iso(reject["rejected_at"]),
        "resolved_at": _iso(reject["resolved_at"]),
        "resolution": reject["resolution"],
        "size": len(raw),
        "raw_hex": shown.hex(),
        "raw_truncated": len(shown) < len(raw),
    }


def reject_lines(reject: dict, *, limit: int = DUMP_BYTES) -> list[str]:
    """The reject for a terminal; every value from the record goes through `printable`."""
    raw = reject["raw"]
    shown = raw if limit == 0 else raw[:limit]
    if reject["resolved_at"] is None:
        state = "open"
    else:
        state = f"resolved {_iso(reject['resolved_at'])}: {printable(reject['resolution'] or '')}"
    event = (
        f"{printable(reject['event_id'] or '?')} ({printable(reject['event_type'] or '?')})"
        if reject["event_id"] or reject["event_type"]
        else "(not decoded)"
    )
    detail = printable(reject["detail"], newlines=True).splitlines() or [""]
    lines = [
        f"reject {reject['id']} ({state})",
        f"reason:    {printable(reject['reason'])}",
        f"detail:    {detail[0]}",
        *(f"           {line}" for line in detail[1:]),
        f"origin:    {printable(reject['topic'])} partition {reject['partition']} "
        f"offset {reject['offset']}, key {shown_key(reject['key'])}",
        f"event:     {event}",
        f"rejected:  {_iso(reject['rejected_at'])}",
        f"raw bytes: {len(raw)}"
        + (f", the first {len(shown)}:" if len(shown) < len(raw) else (":" if raw else "")),
        *hex_dump(shown),
    ]
    if len(shown) < len(raw):
        lines.append(f"... {len(raw) - len(shown)} more bytes (--bytes 0 shows all)")
    return lines


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _reason_now(codec: Codec, raw: bytes, old_reason: str) -> str:
    try:
        codec.decode(bytes(raw))
    except DecodeError as exc:
        return exc.reason
    return old_reason
