"""Account status projection: balances, spend limits, suspension flag and reasons, invoices.

A pure fold over journal entries: `apply(state, entry, clock) -> effects`, one small handler per
event type, no I/O. Balances are recomputed from the entry's postings (not from the ledger
writer's book), so the projection is an independent reading of the journal. `clock` is the time
of the last PeriodTick applied in the entry's shard: time only ever comes from the journal.

Suspension reasons (suspended ⇔ any holds), decided only once the account is opened:
  CREDITS_EXHAUSTED_NO_PAYMENT_METHOD  credit balance ≤ 0 and no payment method on file
  SPEND_LIMIT_REACHED                  month-to-date spend ≥ effective limit; clears when the
                                       limit rises or the month turns
  PAYMENT_FAILED                       a payment failed; cleared by a new payment method, a paid
                                       invoice or a credit purchase (a payment that succeeded)
  MANUAL_HOLD                          between AccountHoldPlaced and AccountHoldReleased
Every change of (suspended, reasons) bumps `status_version` and yields a StatusChanged effect.
Spend-limit warnings (50/80/100 %) fire at most once per account per month and carry the
current status_version without bumping it.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from decimal import Decimal
from typing import Any

from ledger.policy import Policy
from projections import billing

ZERO = Decimal(0)

CREDITS_EXHAUSTED = "CREDITS_EXHAUSTED_NO_PAYMENT_METHOD"
SPEND_LIMIT_REACHED = "SPEND_LIMIT_REACHED"
PAYMENT_FAILED = "PAYMENT_FAILED"
MANUAL_HOLD = "MANUAL_HOLD"
REASON_ORDER = (CREDITS_EXHAUSTED, SPEND_LIMIT_REACHED, PAYMENT_FAILED, MANUAL_HOLD)


@dataclasses.dataclass(frozen=True)
class JournalEntry:
    """One journal entry as the projections read it."""

    shard: int
    shard_seq: int
    account_id: str
    event_type: str
    status: str
    occurred_at: datetime
    payload: dict[str, Any]
    postings: tuple[tuple[str, Decimal], ...]


@dataclasses.dataclass(frozen=True)
class StatusChanged:
    account_id: str
    suspended: bool
    reasons: tuple[str, ...]
    status_version: int
    effective_at: datetime


@dataclasses.dataclass(frozen=True)
class SpendLimitWarning:
    account_id: str
    month: str
    threshold_percent: int
    month_to_date_spend: Decimal
    effective_limit: Decimal
    status_version: int
    occurred_at: datetime


@dataclasses.dataclass(frozen=True)
class InvoiceIssued:
    account_id: str
    invoice: dict[str, Any]
    status_version: int
    issued_at: datetime


Effect = StatusChanged | SpendLimitWarning | InvoiceIssued


@dataclasses.dataclass
class AccountStatus:
    account_id: str
    opened: bool = False
    grants: dict[str, Decimal] = dataclasses.field(default_factory=dict)
    receivable: Decimal = ZERO
    payment_methods: list[str] = dataclasses.field(default_factory=list)
    payment_failed: bool = False
    manual_hold: bool = False
    suspended: bool = False
    reasons: tuple[str, ...] = ()
    status_version: int = 0
    last_event_at: datetime | None = None
    # Spend limits.
    paid_total: Decimal = ZERO
    configured_limit: Decimal | None = None
    custom_limit: Decimal | None = None
    month: str | None = None
    spend: dict[str, Decimal] = dataclasses.field(default_factory=dict)
    warned: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # Billing: receivable charges not yet invoiced, by month and kind; payments beyond what
    # issued invoices owed; what issued invoices still owe; the rounding carry.
    pending: dict[str, dict[str, Decimal]] = dataclasses.field(default_factory=dict)
    prepaid: Decimal = ZERO
    invoiced_outstanding: Decimal = ZERO
    rounding_carry: Decimal = ZERO
    invoices: list[str] = dataclasses.field(default_factory=list)

    @property
    def credit_balance(self) -> Decimal:
        return sum(self.grants.values(), ZERO)

    @property
    def month_to_date_spend(self) -> Decimal:
        return self.spend.get(self.month, ZERO) if self.month else ZERO

    @property
    def tick_sensitive(self) -> bool:
        """Whether a PeriodTick crossing a month or a close must revisit this account."""
        return (
            SPEND_LIMIT_REACHED in self.reasons
            or any(v for kinds in self.pending.values() for v in kinds.values())
            or bool(self.prepaid)
            or bool(self.rounding_carry)
        )

    def to_json(self) -> dict[str, Any]:
        return _to_json(dataclasses.asdict(self) | {"reasons": list(self.reasons)})

    @classmethod
    def from_json(cls, account_id: str, data: dict[str, Any]) -> AccountStatus:
        def dec(value: str | None) -> Decimal | None:
            return None if value is None else Decimal(value)

        last = data.get("last_event_at")
        return cls(
            account_id=account_id,
            opened=data["opened"],
            grants={gid: Decimal(v) for gid, v in data["grants"].items()},
            receivable=Decimal(data["receivable"]),
            payment_methods=list(data["payment_methods"]),
            payment_failed=data["payment_failed"],
            manual_hold=data["manual_hold"],
            suspended=data["suspended"],
            reasons=tuple(data["reasons"]),
            status_version=data["status_version"],
            last_event_at=datetime.fromisoformat(last) if last else None,
            paid_total=Decimal(data.get("paid_total", "0")),
            configured_limit=dec(data.get("configured_limit")),
            custom_limit=dec(data.get("custom_limit")),
            month=data.get("month"),
            spend={m: Decimal(v) for m, v in data.get("spend", {}).items()},
            warned={m: list(v) for m, v in data.get("warned", {}).items()},
            pending={
                m: {k: Decimal(v) for k, v in kinds.items()}
                for m, kinds in data.get("pending", {}).items()
            },
            prepaid=Decimal(data.get("prepaid", "0")),
            invoiced_outstanding=Decimal(data.get("invoiced_outstanding", "0")),
            rounding_carry=Decimal(data.get("rounding_carry", "0")),
            invoices=list(data.get("invoices", [])),
        )


def _to_json(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in sorted(value.items()) if k != "account_id"}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


class AccountStatusProjection:
    name = "account_status"

    def __init__(self, policy: Policy):
        self.policy = policy

    # --- the fold ---------------------------------------------------------------------------

    def apply(
        self, state: AccountStatus, entry: JournalEntry, clock: datetime | None = None
    ) -> list[Effect]:
        self._advance_month(state, entry.occurred_at, clock)
        self._apply_postings(state, entry)
        handler = getattr(self, f"_on_{entry.event_type}", None)
        if handler is not None:
            handler(state, entry.payload)
        if state.last_event_at is None or entry.occurred_at > state.last_event_at:
            state.last_event_at = entry.occurred_at
        effects: list[Effect] = list(self._warnings(state, entry.occurred_at))
        return self._decide(state, state.last_event_at) + effects

    def on_tick(
        self, state: AccountStatus, tick_at: datetime, previous: datetime | None
    ) -> list[Effect]:
        """A PeriodTick in the account's shard: the month may turn, months may close."""
        self._advance_month(state, tick_at, tick_at)
        effects: list[Effect] = []
        effects += self._decide(state, max(tick_at, state.last_event_at or tick_at))
        effects += self._close_months(state, tick_at, previous)
        return effects

    # --- time -------------------------------------------------------------------------------

    @staticmethod
    def _advance_month(state: AccountStatus, occurred_at: datetime, clock: datetime | None):
        months = [m for m in (state.month, billing.month_of(occurred_at)) if m]
        if clock is not None:
            months.append(billing.month_of(clock))
        current = max(months)
        if current != state.month:
            state.month = current
            keep = {m for m in state.spend if m >= current} | {current}
            state.spend = {m: v for m, v in state.spend.items() if m in keep}
            state.warned = {m: v for m, v in state.warned.items() if m in keep}

    def _close_months(
        self, state: AccountStatus, tick_at: datetime, previous: datetime | None
    ) -> list[Effect]:
        grace = self.policy.grace_hours
        upto = billing.closed_through(tick_at, grace)
        if upto is None or (not state.pending and not state.prepaid and not state.rounding_carry):
            return []
        before = billing.closed_through(previous, grace)
        first = billing.next_month(before) if before else min(state.pending, default=upto)
        effects: list[Effect] = []
        for month in billing.months_between(min(first, upto), upto):
            if not state.pending and not state.prepaid and not state.rounding_carry:
                break
            close = billing.close_month(
                state.account_id,
                month,
                state.pending,
                state.prepaid,
                state.rounding_carry,
                tick_at,
            )
            state.pending, state.prepaid = close.pending, close.prepaid
            state.rounding_carry = close.rounding_carry
            if close.invoice is None:
                continue
            state.invoiced_outstanding += Decimal(close.invoice["amount_due"])
            state.invoices.append(close.invoice["invoice_id"])
            effects.append(
                InvoiceIssued(state.account_id, close.invoice, state.status_version, tick_at)
            )
        return effects

    # --- money from postings ------------------------------------------------------------------

    def _apply_postings(self, state: AccountStatus, entry: JournalEntry) -> None:
        credit_prefix = f"customer:{state.account_id}:credit:"
        receivable = f"customer:{state.account_id}:receivable"
        month = billing.month_of(entry.occurred_at)
        for ledger_account, amount in entry.postings:
            if ledger_account.startswith(credit_prefix):
                gid = ledger_account[len(credit_prefix) :]
                # Credit-normal: a grant's balance is the negated sum of its postings.
                state.grants[gid] = state.grants.get(gid, ZERO) - amount
            elif ledger_account == receivable:
                state.receivable += amount
                if amount > 0:
                    kind = "usage" if entry.event_type == "UsageRecorded" else "credit_revoked"
                    kinds = state.pending.setdefault(month, {})
                    kinds[kind] = kinds.get(kind, ZERO) + amount
                else:
                    self._receivable_paid(state, -amount)
            elif ledger_account == "revenue:usage":
                # Month-to-date spend counts usage whether credits or the invoice pay for it.
                state.spend[month] = state.spend.get(month, ZERO) - amount

    @staticmethod
    def _receivable_paid(state: AccountStatus, amount: Decimal) -> None:
        """A payment (or credit) that reduced the receivable pays issued invoices first; the
        rest is applied on the next invoice."""
        to_invoices = min(amount, state.invoiced_outstanding)
        state.invoiced_outstanding -= to_invoices
        state.prepaid += amount - to_invoices

    # --- one handler per event type -----------------------------------------------------------

    def _on_AccountOpened(self, state: AccountStatus, event: dict) -> None:
        state.opened = True

    def _on_PaymentMethodAdded(self, state: AccountStatus, event: dict) -> None:
        if event["payment_method_id"] not in state.payment_methods:
            state.payment_methods = sorted([*state.payment_methods, event["payment_method_id"]])
        state.payment_failed = False

    def _on_PaymentMethodRemoved(self, state: AccountStatus, event: dict) -> None:
        state.payment_methods = [
            m for m in state.payment_methods if m != event["payment_method_id"]
        ]

    def _on_PaymentFailed(self, state: AccountStatus, event: dict) -> None:
        state.payment_failed = True

    def _on_CreditPurchased(self, state: AccountStatus, event: dict) -> None:
        state.payment_failed = False
        state.paid_total += Decimal(event["amount"])

    _on_InvoicePaid = _on_CreditPurchased

    def _on_AccountHoldPlaced(self, state: AccountStatus, event: dict) -> None:
        state.manual_hold = True

    def _on_AccountHoldReleased(self, state: AccountStatus, event: dict) -> None:
        state.manual_hold = False

    def _on_SpendLimitConfigured(self, state: AccountStatus, event: dict) -> None:
        limit = event.get("monthly_limit")
        state.configured_limit = None if limit is None else Decimal(limit)

    def _on_SpendLimitOverridden(self, state: AccountStatus, event: dict) -> None:
        limit = event.get("monthly_limit")
        state.custom_limit = None if limit is None else Decimal(limit)

    # --- spend limits -------------------------------------------------------------------------

    def tier(self, state: AccountStatus) -> tuple[str, Decimal]:
        """(tier name, tier limit): a contract override, else the tier that the account's
        historical payments reach."""
        if state.custom_limit is not None:
            return "custom", state.custom_limit
        tier = self.policy.tier_for(state.paid_total)
        return tier.name, tier.monthly_limit

    def effective_limit(self, state: AccountStatus) -> Decimal:
        _, tier_limit = self.tier(state)
        if state.configured_limit is None:
            return tier_limit
        return min(state.configured_limit, tier_limit)

    def _warnings(self, state: AccountStatus, at: datetime) -> list[SpendLimitWarning]:
        if not state.opened or state.month is None:
            return []
        limit, spend = self.effective_limit(state), state.month_to_date_spend
        warned = state.warned.setdefault(state.month, [])
        out = []
        for threshold in self.policy.warning_thresholds:
            if threshold in warned or spend < limit * threshold / 100:
                continue
            warned.append(threshold)
            out.append(
                SpendLimitWarning(
                    state.account_id, state.month, threshold, spend, limit, state.status_version, at
                )
            )
        if not warned:
            del state.warned[state.month]
        return out

    # --- the decision -----------------------------------------------------------------------

    def suspension_reasons(self, state: AccountStatus) -> tuple[str, ...]:
        if not state.opened:
            return ()  # never suspend an account the ledger has not seen opened
        held = {
            CREDITS_EXHAUSTED: state.credit_balance <= 0 and not state.payment_methods,
            SPEND_LIMIT_REACHED: state.month_to_date_spend >= self.effective_limit(state),
            PAYMENT_FAILED: state.payment_failed,
            MANUAL_HOLD: state.manual_hold,
        }
        return tuple(r for r in REASON_ORDER if held[r])

    def _decide(self, state: AccountStatus, effective_at: datetime) -> list[Effect]:
        reasons = self.suspension_reasons(state)
        suspended = bool(reasons)
        if (suspended, reasons) == (state.suspended, state.reasons):
            return []
        state.suspended, state.reasons = suspended, reasons
        state.status_version += 1
        # effective_at never goes back: the latest time seen for the account so far.
        return [
            StatusChanged(state.account_id, suspended, reasons, state.status_version, effective_at)
        ]
