"""What the console's pages show, read from PostgreSQL as the reader role. No page writes.

Everything the CLI already computes is reused, not redone: the account's view is
`reports.account_view` (`ledger account show`), the bill is `audit.audit_bill` (`ledger audit`),
a reject is `rejects.show` (`ledger rejects show`), the pipeline is `overview.overview`
(`ledger status`). What is new here is only what a page needs beyond that: a page of the
accounts list, an account's status history (a fold of its journal entries with the
projection's own code, as `audit` does), its latest entries with their postings, its usage per
day, and the suspensions per day.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
from psycopg import sql

from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.errors import DecodeError
from ledger.policy import Policy
from projections.account_status import (
    REASON_ORDER,
    AccountStatus,
    AccountStatusProjection,
    JournalEntry,
    StatusChanged,
)
from projections.fold import fold_entries

PAGE_SIZE = 50
# sort name → (query of its key expression, the key's SQL type)
SORTS = {
    "account": ("console_sort_account", "text"),
    "spend": ("console_sort_spend", "numeric"),
    "headroom": ("console_sort_headroom", "numeric"),
    "receivable": ("console_sort_receivable", "numeric"),
}
STATUSES = {"active": False, "suspended": True}
REASONS = REASON_ORDER
SUSPENSIONS_READ = 50_000  # status events decoded at most for the suspensions chart


class BadParameter(ValueError):
    """A query parameter the console cannot use; the message names it and says what it takes."""


@dataclasses.dataclass(frozen=True)
class AccountFilter:
    prefix: str | None = None  # account id prefix
    status: str | None = None  # active | suspended
    reason: str | None = None
    sort: str = "account"
    descending: bool = False
    after: tuple[str, str] | None = None  # (sort key, account_id) of the last row shown

    def query_string(self, **changes: Any) -> dict[str, str]:
        """This filter as the page's query parameters (unset ones left out)."""
        f = dataclasses.replace(self, **changes)
        params = {
            "q": f.prefix or "",
            "status": f.status or "",
            "reason": f.reason or "",
            "sort": f.sort,
            "dir": "desc" if f.descending else "asc",
        }
        if f.after is not None:
            params["after"] = encode_cursor(f.after)
        return {k: v for k, v in params.items() if v}


def encode_cursor(after: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(after)).encode()).decode().rstrip("=")


def decode_cursor(text: str, sort: str) -> tuple[str, str]:
    try:
        key, account_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        if not isinstance(key, str) or not isinstance(account_id, str):
            raise ValueError
        if SORTS[sort][1] == "numeric":
            Decimal(key)  # 'Infinity' included: no effective limit
    except (ValueError, TypeError, binascii.Error, InvalidOperation, UnicodeDecodeError):
        raise BadParameter(
            f"after={text!r}: not a page cursor of this list (follow the Next link)"
        ) from None
    return key, account_id


def accounts_query(f: AccountFilter, limit: int = PAGE_SIZE) -> tuple[sql.Composed, dict]:
    """The statement and parameters of one page of the accounts list (`limit` + 1 rows: one
    more tells whether there is a next page)."""
    key_query, key_type = SORTS[f.sort]
    query = sql.SQL(QUERIES["console_accounts"]).format(
        key=sql.SQL(QUERIES[key_query]),
        keytype=sql.SQL(key_type),
        cmp=sql.SQL("<" if f.descending else ">"),
        dir=sql.SQL("DESC" if f.descending else "ASC"),
    )
    prefix = None
    if f.prefix:
        escaped = f.prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        prefix = escaped + "%"
    params = {
        "suspended": STATUSES[f.status] if f.status else None,
        "reason": f.reason,
        "prefix": prefix,
        "after_key": f.after[0] if f.after else None,
        "after_id": f.after[1] if f.after else None,
        "limit": limit + 1,
    }
    return query, params


def accounts_page(
    conn: psycopg.Connection, f: AccountFilter, limit: int = PAGE_SIZE
) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
    """One page of accounts and the cursor of the next page (None: this is the last)."""
    query, params = accounts_query(f, limit)
    rows = conn.execute(query, params).fetchall()
    keys = ("account_id", "suspended", "reasons", "tier", "effective_limit", "month",
            "month_to_date_spend", "receivable", "credit_balance", "sort_key")  # fmt: skip
    accounts = []
    for row in rows[:limit]:
        a = dict(zip(keys, row, strict=True))
        a["status"] = "suspended" if a.pop("suspended") else "active"
        limit_, spend = a["effective_limit"], a["month_to_date_spend"]
        a["headroom"] = None if limit_ is None else limit_ - spend
        accounts.append(a)
    more = len(rows) > limit
    cursor = (accounts[-1]["sort_key"], accounts[-1]["account_id"]) if more else None
    return accounts, cursor


def account_extras(
    conn: psycopg.Connection, policy: Policy, account_id: str, entries: int = 20
) -> dict[str, Any]:
    """What the account page shows beyond `account_view`: grant expiries, how the tier was
    reached, the status history and the latest entries with postings and chain links."""
    row = conn.execute(QUERIES["console_account_state"], (account_id,)).fetchone()
    state = row[0] if row else {}
    paid = Decimal(state.get("paid_total", "0"))
    tier = policy.tier_for(paid)
    return {
        "grant_expiry": state.get("grant_expiry", {}),
        "paid_total": paid,
        "tier_reached": tier,
        "tiers": policy.tiers,
        "custom_limit": state.get("custom_limit"),
        "configured_limit": state.get("configured_limit"),
        "history": status_history(conn, policy, account_id),
        "entries": latest_entries(conn, account_id, entries),
    }


def status_history(
    conn: psycopg.Connection, policy: Policy, account_id: str
) -> list[StatusChanged]:
    """Every change of the account's status (version, when, reasons), newest first: its
    journal entries and its shard's ticks folded with the projection's code, as `audit` does."""
    row = conn.execute(QUERIES["account_shard"], (account_id,)).fetchone()
    if row is None:
        return []
    params = {"shard": row[0], "account_id": account_id, "as_of": None}
    rows = conn.execute(QUERIES["audit_entries"], params).fetchall()
    entries = [JournalEntry(*r[:7], tuple(zip(r[7], r[8], strict=True))) for r in rows]
    effects, _ = fold_entries(
        AccountStatusProjection(policy), {account_id: AccountStatus(account_id)}, entries, None
    )
    changes = [e for e in effects if isinstance(e, StatusChanged) and e.account_id == account_id]
    return changes[::-1]


ENTRY_KEYS = ("shard", "seq", "occurred_at", "recorded_at", "event_type", "status",
              "price_version", "event_id", "chain_key_id", "entry_hash", "linked")  # fmt: skip


def latest_entries(conn: psycopg.Connection, account_id: str, last: int) -> list[dict[str, Any]]:
    out = []
    for row in conn.execute(QUERIES["console_account_entries"], (account_id, last)):
        entry = dict(zip(ENTRY_KEYS, row[:-2], strict=True))
        entry["postings"] = list(zip(row[-2], row[-1], strict=True))
        out.append(entry)
    return out


def month_bounds(month: str) -> tuple[datetime, datetime]:
    year, mon = int(month[:4]), int(month[5:7])
    start = datetime(year, mon, 1, tzinfo=UTC)
    end = datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=UTC)
    return start, end


def daily_spend(conn: psycopg.Connection, account_id: str, month: str) -> list[tuple[str, Decimal]]:
    """(day, usage charged that day) for every day of the month, 0 included."""
    start, end = month_bounds(month)
    found = dict(
        conn.execute(
            QUERIES["console_daily_spend"], {"account_id": account_id, "start": start, "end": end}
        ).fetchall()
    )
    days = (end - start).days
    out = []
    for n in range(days):
        day = (start + timedelta(days=n)).date()
        out.append((day.isoformat(), Decimal(found.get(day, 0))))
    return out


def suspensions_per_day(
    conn: psycopg.Connection, codec: Codec, days: int = 31
) -> list[tuple[str, Decimal]]:
    """Accounts suspended per UTC day (by the status event's effective time), over the `days`
    days up to the latest suspension still in the outbox."""
    counts: Counter[date] = Counter()
    for (value,) in conn.execute(QUERIES["console_suspensions"], (SUSPENSIONS_READ,)):
        try:
            event = codec.decode(bytes(value)).event
        except DecodeError:
            continue  # not ours to judge here: the relay parks what it cannot send
        effective = event.get("effective_at") or event.get("occurred_at")
        if isinstance(effective, datetime):
            counts[effective.astimezone(UTC).date()] += 1
    if not counts:
        return []
    last = max(counts)
    first = last - timedelta(days=days - 1)
    return [
        ((first + timedelta(days=n)).isoformat(), Decimal(counts[first + timedelta(days=n)]))
        for n in range(days)
    ]


def rejects_page(
    conn: psycopg.Connection, reason: str | None, after: int | None, limit: int = PAGE_SIZE
) -> tuple[list[dict[str, Any]], int | None]:
    rows = conn.execute(
        QUERIES["console_rejects"], {"reason": reason, "after": after, "limit": limit + 1}
    ).fetchall()
    keys = ("id", "reason", "topic", "partition", "offset", "event_type", "rejected_at",
            "resolved_at", "size", "detail")  # fmt: skip
    rejects = [dict(zip(keys, row, strict=True)) for row in rows[:limit]]
    return rejects, (rejects[-1]["id"] if len(rows) > limit else None)
