"""The projection's pure pieces, shared by the live worker, rebuild, verify, audit and the
rule harness: the fold loop over one shard's entries (ticks included), the output event of each
effect, and the row shapes of `account_status` and `invoices` (each written once, here).
No I/O."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from decimal import Decimal

from psycopg.types.json import Jsonb

from ledger.book import jsonb_dumps
from ledger.errors import UnfoldableEntryError
from ledger.money import plain
from projections import billing
from projections.account_status import (
    AccountStatus,
    AccountStatusProjection,
    Effect,
    JournalEntry,
    SpendLimitWarning,
    StatusChanged,
)

STATUS_EVENT_NAMESPACE = uuid.UUID("6f1d2c1e-3b7a-4f51-9a59-1f0f4f3c2b10")


def output_event(effect: Effect) -> tuple[str, dict]:
    """The output event for an effect. Its event_id is derived from what it is about (account
    and status_version, month, limit and threshold, invoice), so a replay produces the same
    event."""

    def base(key: str, at) -> dict:
        return {
            "event_id": str(uuid.uuid5(STATUS_EVENT_NAMESPACE, f"{effect.account_id}:{key}")),
            "account_id": effect.account_id,
            "occurred_at": at,
        }

    if isinstance(effect, StatusChanged):
        event = base(f"status:{effect.status_version}", effect.effective_at) | {
            "effective_at": effect.effective_at,
            "status_version": effect.status_version,
        }
        if effect.suspended:
            return "AccountSuspended", {**event, "reasons": list(effect.reasons)}
        return "AccountReinstated", event
    if isinstance(effect, SpendLimitWarning):
        # Per month AND limit: after a limit change the warnings of the new limit are new events.
        limit = plain(effect.effective_limit)
        key = f"warning:{effect.month}:{limit}:{effect.threshold_percent}"
        return "SpendLimitWarning", base(key, effect.occurred_at) | {
            "month": effect.month,
            "threshold_percent": effect.threshold_percent,
            "month_to_date_spend": effect.month_to_date_spend,
            "effective_limit": effect.effective_limit,
            "status_version": effect.status_version,
        }
    invoice = effect.invoice
    return "InvoiceIssued", base(f"invoice:{invoice['invoice_id']}", effect.issued_at) | {
        "invoice_id": invoice["invoice_id"],
        "month": invoice["month"],
        "amount_due": Decimal(invoice["amount_due"]),
        "currency": invoice["currency"],
        "status_version": effect.status_version,
    }


def fold_entries(
    projection: AccountStatusProjection,
    states: dict[str, AccountStatus],
    entries: Iterable[JournalEntry],
    clock: datetime | None,
    tick_sensitive: Callable[[], Iterable[tuple[str, AccountStatus]]] | None = None,
    visited: set[str] | None = None,
    refolded: list[JournalEntry] | None = None,
) -> tuple[list[Effect], datetime | None]:
    """Apply one shard's entries, in order, to `states` (mutated; accounts are added as they
    appear). The one loop shared by the live worker, rebuild, verify and audit. A
    ConfigPublished entry of a policy version makes it the shard's policy from there on.

    `clock` is the shard's last PeriodTick. Only a tick that turns the month revisits
    accounts, and only those that need it (a limit suspension): `tick_sensitive` supplies
    those not in `states` (the live worker reads them from the database; a fold from scratch
    has them all already). Invoices are journaled entries (InvoiceIssued, the ledger writer's
    month close), read like any other.

    An entry at or below a state's `folded_through` was folded into it already (a position
    moved back): it is skipped, and added to `refolded` when given."""
    effects: list[Effect] = []
    entry: JournalEntry | None = None
    try:  # one try around the loop, not a call per entry: the fold's hottest path
        for entry in entries:
            projection.use(entry.shard)
            if entry.payload is not None and not isinstance(entry.payload, dict):
                raise TypeError(
                    f"its payload is a {type(entry.payload).__name__}, not a JSON object"
                )
            if entry.event_type == "ConfigPublished":
                projection.configure(entry.shard, entry.payload)
                continue
            if entry.event_type == "PeriodTick":
                tick_at = datetime.fromisoformat(entry.payload["tick_at"])
                if clock is not None and tick_at <= clock:
                    continue
                if clock is None or billing.month_of(tick_at) > billing.month_of(clock):
                    for account_id, state in tick_sensitive() if tick_sensitive else ():
                        states.setdefault(account_id, state)
                    for account_id in sorted(states):
                        state = states[account_id]
                        if state.tick_sensitive and state.folded_through < entry.shard_seq:
                            effects += projection.on_tick(state, tick_at, clock, entry.shard_seq)
                            state.folded_through = entry.shard_seq
                            if visited is not None:
                                visited.add(account_id)
                clock = tick_at
                continue
            state = states.setdefault(entry.account_id, AccountStatus(entry.account_id))
            if entry.shard_seq <= state.folded_through:
                if refolded is not None:
                    refolded.append(entry)
                continue
            effects += projection.apply(state, entry, clock)
            state.folded_through = entry.shard_seq
    except (AttributeError, KeyError, TypeError, ValueError, ArithmeticError) as exc:
        if entry is None:
            raise
        # A journal changed behind the writer's back (or a bug): name the entry.
        raise UnfoldableEntryError(
            f"journal entry ({entry.shard}, {entry.shard_seq}) {entry.event_type} of "
            f"account {entry.account_id!r} does not fold: {type(exc).__name__}: {exc}"
            " (`ledger verify` says what changed)"
        ) from exc
    return effects, clock


def status_row(projection: AccountStatusProjection, shard: int, state: AccountStatus) -> tuple:
    """The account_status row of a state (columns in the order of save_account_status). Its
    tier and limit are those of the policy in force on its shard (`use`): a rebuild or verify
    makes the rows after folding every shard, and shards may have journaled different
    policies (one that has not journaled a new version yet)."""
    projection.use(shard)
    tier, _ = projection.tier(state)
    return (
        state.account_id,
        state.opened,
        state.suspended,
        list(state.reasons),
        state.status_version,
        state.credit_balance,
        state.receivable,
        Jsonb(state.to_json(), dumps=jsonb_dumps),
        shard,
        tier,
        projection.effective_limit(state),
        state.month,
        state.month_to_date_spend,
        state.tick_sensitive,
        state.folded_through,
    )


def invoice_row(invoice: dict) -> tuple:
    return (
        invoice["invoice_id"],
        invoice["account_id"],
        invoice["month"],
        datetime.fromisoformat(invoice["issued_at"]),
        invoice["currency"],
        Decimal(invoice["exact_total"]),
        Decimal(invoice["amount_due"]),
        Jsonb(invoice["lines"]),
    )


__all__ = ["fold_entries", "invoice_row", "output_event", "status_row"]
