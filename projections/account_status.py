"""Account status projection: balances, spend limits, suspension flag and reasons, invoices.

Invoices are decided by the ledger writer at the month close (`ledger.invoicing`) and journaled
as InvoiceIssued entries; the projection reads them (stores the invoice, publishes it).

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
Every change of (suspended, reasons) yields a StatusChanged effect with a new `status_version`:
the journal position (shard sequence) of the entry or tick that caused it (or one more than the
previous version, if that is higher). Journal positions only grow and are the same on every
replay and rebuild, so versions strictly increase per account and a rebuild, even under a
changed policy, can never hand out a version that was already published.
Spend-limit warnings (50/80/100 %) fire at most once per account, month and effective limit
(a raised limit warns again), after the status decision of the same entry, carrying the
status_version they follow.

Time: the projection's clock is its shard's last PeriodTick. An entry's time counts as at most
clock + CLOCK_SKEW (before the first tick, as stated), so an event dated in the future can never
turn the month, reset spend limits or date an effect ahead of the shard's clock.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from ledger.book import invoiced_account, receivable_account
from ledger.config_versions import POLICY, ConfigVersion
from ledger.invoicing import INVOICE_ISSUED, invoice_of
from ledger.policy import Policy
from projections import billing

ZERO = Decimal(0)

CREDITS_EXHAUSTED = "CREDITS_EXHAUSTED_NO_PAYMENT_METHOD"
SPEND_LIMIT_REACHED = "SPEND_LIMIT_REACHED"
PAYMENT_FAILED = "PAYMENT_FAILED"
MANUAL_HOLD = "MANUAL_HOLD"
REASON_ORDER = (CREDITS_EXHAUSTED, SPEND_LIMIT_REACHED, PAYMENT_FAILED, MANUAL_HOLD)

# How far ahead of its shard's last PeriodTick an entry's occurred_at may count (the scheduler
# ticks every LEDGER_TICK_INTERVAL_S, 60 s by default; producers' clocks drift a little).
CLOCK_SKEW = timedelta(minutes=15)


class JournalEntry(NamedTuple):
    """One journal entry as the projections read it (a named tuple: made for every entry a
    projection reads, and a frozen dataclass takes six times as long to make)."""

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
    payment_failed_at: datetime | None = None  # the latest failure
    payment_ok_at: datetime | None = None  # the latest success (payment, new method)
    manual_hold: bool = False
    suspended: bool = False
    reasons: tuple[str, ...] = ()
    status_version: int = 0
    last_event_at: datetime | None = None
    # Spend limits.
    paid_total: Decimal = ZERO
    purchases: dict[str, Decimal] = dataclasses.field(default_factory=dict)  # grant → paid
    grant_expiry: dict[str, datetime] = dataclasses.field(default_factory=dict)
    configured_limit: Decimal | None = None
    custom_limit: Decimal | None = None
    month: str | None = None
    spend: dict[str, Decimal] = dataclasses.field(default_factory=dict)
    warned: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # Billing, from the postings: `receivable` is all the account owes (its receivable and
    # invoiced ledger accounts), `invoiced_outstanding` what its issued invoices still owe
    # (customer:A:invoiced); the invoices journaled for it.
    invoiced_outstanding: Decimal = ZERO
    invoices: list[str] = dataclasses.field(default_factory=list)
    # The shard_seq of the last entry folded into this state (0: not known): the fold skips
    # entries at or below it, so nothing is folded twice. Bookkeeping, kept in its own column
    # (account_status.folded_through), not in the state document, and not compared.
    folded_through: int = dataclasses.field(default=0, compare=False)

    @property
    def credit_balance(self) -> Decimal:
        return sum(self.grants.values(), ZERO)

    def usable_credit(self, at: datetime) -> Decimal:
        """Credit that can still pay for usage at `at`: a grant past its expires_at counts for
        nothing even before the tick that expires it is journaled."""
        return sum(
            (
                v
                for gid, v in self.grants.items()
                if v > 0 and (gid not in self.grant_expiry or at < self.grant_expiry[gid])
            ),
            ZERO,
        )

    @property
    def unbilled(self) -> Decimal:
        """What the account owes beyond issued invoices (customer:A:receivable)."""
        return self.receivable - self.invoiced_outstanding

    @property
    def month_to_date_spend(self) -> Decimal:
        return self.spend.get(self.month, ZERO) if self.month else ZERO

    @property
    def tick_sensitive(self) -> bool:
        """Whether a PeriodTick crossing a month must revisit this account (the month close
        is the ledger writer's: it journals the invoices)."""
        return SPEND_LIMIT_REACHED in self.reasons

    def to_json(self) -> dict[str, Any]:
        """The stored state (every field but account_id, the row's key), JSON-ready; read
        field by field (`dataclasses.asdict` deep-copies every value first: it was a tenth of
        the live projection's CPU)."""
        return {name: _to_json(getattr(self, name)) for name in _STATE_FIELDS}

    @classmethod
    def from_json(cls, account_id: str, data: dict[str, Any]) -> AccountStatus:
        def dec(value: str | None) -> Decimal | None:
            return None if value is None else Decimal(value)

        def when(value: str | None) -> datetime | None:
            return datetime.fromisoformat(value) if value else None

        last = data.get("last_event_at")
        return cls(
            account_id=account_id,
            opened=data["opened"],
            grants={gid: Decimal(v) for gid, v in data["grants"].items()},
            receivable=Decimal(data["receivable"]),
            payment_methods=list(data["payment_methods"]),
            payment_failed=data["payment_failed"],
            payment_failed_at=when(data.get("payment_failed_at")),
            payment_ok_at=when(data.get("payment_ok_at")),
            manual_hold=data["manual_hold"],
            suspended=data["suspended"],
            reasons=tuple(data["reasons"]),
            status_version=data["status_version"],
            last_event_at=datetime.fromisoformat(last) if last else None,
            paid_total=Decimal(data.get("paid_total", "0")),
            purchases={g: Decimal(v) for g, v in data.get("purchases", {}).items()},
            grant_expiry={
                g: datetime.fromisoformat(v) for g, v in data.get("grant_expiry", {}).items()
            },
            configured_limit=dec(data.get("configured_limit")),
            custom_limit=dec(data.get("custom_limit")),
            month=data.get("month"),
            spend={m: Decimal(v) for m, v in data.get("spend", {}).items()},
            warned={m: list(v) for m, v in data.get("warned", {}).items()},
            invoiced_outstanding=Decimal(data.get("invoiced_outstanding", "0")),
            invoices=list(data.get("invoices", [])),
        )


_STATE_FIELDS = tuple(
    sorted(
        f.name
        for f in dataclasses.fields(AccountStatus)
        if f.name not in ("account_id", "folded_through")
    )
)


def _to_json(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


class AccountStatusProjection:
    name = "account_status"

    def __init__(self, policy: Policy):
        self.default_policy = policy  # for shards with no policy journaled (yet)
        self.policies: dict[int, Policy] = {}  # shard -> the latest policy journaled there
        self.policy = policy  # the one in force for the shard being folded (`use`)

    def use(self, shard: int) -> None:
        """Fold `shard` next: apply the policy journaled there."""
        self.policy = self.policies.get(shard, self.default_policy)

    def configure(self, shard: int, payload: dict) -> None:
        """A ConfigPublished entry of `shard`: a policy version applies from here on."""
        version = ConfigVersion.from_event(payload)
        if version.kind == POLICY:
            self.policies[shard] = version.parsed()
            self.use(shard)

    # --- the fold ---------------------------------------------------------------------------

    def bounded(self, occurred_at: datetime, clock: datetime | None) -> datetime:
        """The time an entry counts at: its occurred_at, but never beyond clock + CLOCK_SKEW."""
        if clock is None:
            return occurred_at
        return min(occurred_at, clock + CLOCK_SKEW)

    def apply(
        self, state: AccountStatus, entry: JournalEntry, clock: datetime | None = None
    ) -> list[Effect]:
        at = self.bounded(entry.occurred_at, clock)
        month = billing.month_of(at)
        self._advance_month(state, month)
        self._apply_postings(state, entry.postings, month)
        handler = HANDLERS.get(entry.event_type, _NO_HANDLER)
        if handler is _NO_HANDLER:
            raise ValueError(f"account_status has no handler for {entry.event_type}")
        if handler is not None:
            handler(self, state, entry.payload, at)
        # The month close is the shard clock's doing, not the account's: it dates nothing.
        if entry.event_type != INVOICE_ISSUED and (
            state.last_event_at is None or at > state.last_event_at
        ):
            state.last_event_at = at
        limit = self.effective_limit(state)  # the decision changes nothing it depends on
        effects: list[Effect] = self._decide(state, state.last_event_at, entry.shard_seq, limit)
        if entry.event_type == INVOICE_ISSUED:
            effects += self._invoice_issued(state, entry)
        # Warnings after the decision: they carry the version of the status they follow.
        warnings = self._warnings(state, at, limit)
        return effects + warnings if warnings else effects

    def on_tick(
        self, state: AccountStatus, tick_at: datetime, previous: datetime | None, seq: int = 0
    ) -> list[Effect]:
        """A PeriodTick (journal position `seq`) in the account's shard: the month may turn."""
        self._advance_month(state, billing.month_of(tick_at))
        at = max(tick_at, state.last_event_at or tick_at)
        return self._decide(state, at, seq)

    # --- time -------------------------------------------------------------------------------

    @staticmethod
    def _advance_month(state: AccountStatus, current: str) -> None:
        """The account's month only moves forward, to `current` (the month of a bounded
        time)."""
        if state.month is not None and current <= state.month:
            return
        state.month = current
        state.spend = {m: v for m, v in state.spend.items() if m >= current}
        state.warned = {k: v for k, v in state.warned.items() if k[:7] >= current}

    @staticmethod
    def _invoice_issued(state: AccountStatus, entry: JournalEntry) -> list[Effect]:
        """An InvoiceIssued entry (the ledger writer's month close): publish the invoice, once
        per invoice id."""
        invoice = invoice_of(entry.payload)
        if invoice["invoice_id"] in state.invoices:
            return []
        state.invoices.append(invoice["invoice_id"])
        issued_at = _time(invoice["issued_at"])
        return [InvoiceIssued(state.account_id, invoice, state.status_version, issued_at)]

    # --- money from postings ------------------------------------------------------------------

    @staticmethod
    def _apply_postings(
        state: AccountStatus, postings: tuple[tuple[str, Decimal], ...], month: str
    ) -> None:
        credit_prefix, receivable, invoiced = _ledger_accounts(state.account_id)
        for ledger_account, amount in postings:
            if ledger_account.startswith(credit_prefix):
                gid = ledger_account[len(credit_prefix) :]
                # Credit-normal: a grant's balance is the negated sum of its postings.
                state.grants[gid] = state.grants.get(gid, ZERO) - amount
            elif ledger_account == receivable:
                state.receivable += amount
            elif ledger_account == invoiced:
                state.receivable += amount
                state.invoiced_outstanding += amount
            elif ledger_account == "revenue:usage":
                # Month-to-date spend counts usage whether credits or the invoice pay for it.
                state.spend[month] = state.spend.get(month, ZERO) - amount

    # --- one handler per event type (the table HANDLERS below) ------------------------------

    def _on_AccountOpened(self, state: AccountStatus, event: dict, at: datetime) -> None:
        state.opened = True
        days = self.policy.signup_expires_after_days
        if days and self.policy.signup_grant_id not in state.grant_expiry:
            opened_at = _time(event["occurred_at"])
            state.grant_expiry[self.policy.signup_grant_id] = opened_at + timedelta(days=days)

    def _on_PaymentMethodAdded(self, state: AccountStatus, event: dict, at: datetime) -> None:
        if event["payment_method_id"] not in state.payment_methods:
            state.payment_methods = sorted([*state.payment_methods, event["payment_method_id"]])
        self._payment_ok(state, at)

    def _on_PaymentMethodRemoved(self, state: AccountStatus, event: dict, at: datetime) -> None:
        state.payment_methods = [
            m for m in state.payment_methods if m != event["payment_method_id"]
        ]

    @staticmethod
    def _payment_ok(state: AccountStatus, at: datetime) -> None:
        """A success clears a failure that happened before it (topics are not ordered with each
        other: a failure journaled later but dated earlier stays cleared)."""
        if state.payment_ok_at is None or at > state.payment_ok_at:
            state.payment_ok_at = at
        if state.payment_failed_at is None or state.payment_ok_at >= state.payment_failed_at:
            state.payment_failed = False

    def _on_PaymentFailed(self, state: AccountStatus, event: dict, at: datetime) -> None:
        if state.payment_failed_at is None or at > state.payment_failed_at:
            state.payment_failed_at = at
        if state.payment_ok_at is None or state.payment_failed_at > state.payment_ok_at:
            state.payment_failed = True

    def _on_CreditPurchased(self, state: AccountStatus, event: dict, at: datetime) -> None:
        self._payment_ok(state, at)
        state.paid_total += Decimal(event["amount"])
        state.purchases[event["grant_id"]] = Decimal(event["amount"])

    def _on_InvoicePaid(self, state: AccountStatus, event: dict, at: datetime) -> None:
        self._payment_ok(state, at)
        state.paid_total += Decimal(event["amount"])

    def _on_CreditGranted(self, state: AccountStatus, event: dict, at: datetime) -> None:
        if event.get("expires_at"):
            state.grant_expiry[event["grant_id"]] = _time(event["expires_at"])

    def _on_CreditRevoked(self, state: AccountStatus, event: dict, at: datetime) -> None:
        """A charged-back purchase no longer counts towards the tier."""
        state.paid_total -= state.purchases.pop(event["grant_id"], ZERO)

    def _on_AccountHoldPlaced(self, state: AccountStatus, event: dict, at: datetime) -> None:
        state.manual_hold = True

    def _on_AccountHoldReleased(self, state: AccountStatus, event: dict, at: datetime) -> None:
        state.manual_hold = False

    def _on_SpendLimitConfigured(self, state: AccountStatus, event: dict, at: datetime) -> None:
        limit = event.get("monthly_limit")
        state.configured_limit = None if limit is None else Decimal(limit)

    def _on_SpendLimitOverridden(self, state: AccountStatus, event: dict, at: datetime) -> None:
        limit = event.get("monthly_limit")
        state.custom_limit = None if limit is None else Decimal(limit)

    # --- spend limits -------------------------------------------------------------------------

    def tier(self, state: AccountStatus) -> tuple[str, Decimal]:
        """(tier name, tier limit): a contract override, else the tier that the account's
        historical payments reach (charged-back purchases do not count)."""
        if state.custom_limit is not None:
            return "custom", state.custom_limit
        tier = self.policy.tier_for(state.paid_total)
        return tier.name, tier.monthly_limit

    def effective_limit(self, state: AccountStatus) -> Decimal:
        _, tier_limit = self.tier(state)
        if state.configured_limit is None:
            return tier_limit
        return min(state.configured_limit, tier_limit)

    def _warnings(self, state: AccountStatus, at: datetime, limit: Decimal) -> list[Effect]:
        """The thresholds of `limit` that the month's spend has reached and that were not
        warned of yet for this month and limit."""
        if not state.opened or state.month is None:
            return []
        spend = state.month_to_date_spend
        reached = [
            t for t, amount in _levels(limit, self.policy.warning_thresholds) if spend >= amount
        ]
        if not reached:
            return []
        key = warned_key(state.month, limit)
        new = [t for t in reached if t not in state.warned.get(key, ())]
        if new:
            state.warned.setdefault(key, []).extend(new)
        return [
            SpendLimitWarning(
                state.account_id, state.month, t, spend, limit, state.status_version, at
            )
            for t in new
        ]

    # --- the decision -----------------------------------------------------------------------

    def suspension_reasons(
        self, state: AccountStatus, at: datetime, limit: Decimal | None = None
    ) -> tuple[str, ...]:
        """The reasons that hold, in REASON_ORDER; `limit` is the account's effective limit
        (computed if not given)."""
        if not state.opened:
            return ()  # never suspend an account the ledger has not seen opened
        if limit is None:
            limit = self.effective_limit(state)
        held = (
            not state.payment_methods and state.usable_credit(at) <= 0,
            state.month_to_date_spend >= limit,
            state.payment_failed,
            state.manual_hold,
        )
        return tuple(r for r, holds in zip(REASON_ORDER, held, strict=True) if holds)

    def _decide(
        self, state: AccountStatus, effective_at: datetime, seq: int, limit: Decimal | None = None
    ) -> list[Effect]:
        reasons = self.suspension_reasons(state, effective_at, limit)
        suspended = bool(reasons)
        if (suspended, reasons) == (state.suspended, state.reasons):
            return []
        state.suspended, state.reasons = suspended, reasons
        state.status_version = max(state.status_version + 1, seq)
        # effective_at never goes back: the latest time seen for the account so far.
        return [
            StatusChanged(state.account_id, suspended, reasons, state.status_version, effective_at)
        ]


def _time(value: str | datetime) -> datetime:
    """A time from an entry's payload (ISO text as journaled, or a datetime)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


@functools.lru_cache(maxsize=256)
def warned_key(month: str, limit: Decimal) -> str:
    """Warnings are kept per month and effective limit: `2026-03@500`."""
    return f"{month}@{format(limit.normalize(), 'f')}"


@functools.lru_cache(maxsize=256)
def _levels(limit: Decimal, thresholds: tuple[int, ...]) -> tuple[tuple[int, Decimal], ...]:
    """Each warning threshold (percent, once, in the policy's order) with the spend that
    reaches it under `limit`."""
    return tuple((t, limit * t / 100) for t in dict.fromkeys(thresholds))


@functools.lru_cache(maxsize=4096)
def _ledger_accounts(account_id: str) -> tuple[str, str, str]:
    """The prefix of the account's grant ledger accounts, its receivable and its invoiced
    ledger account: the names its postings are sorted by, made once per account."""
    return (
        f"customer:{account_id}:credit:",
        receivable_account(account_id),
        (invoiced_account(account_id)),
    )


_NO_HANDLER = object()


Handler = Callable[[AccountStatusProjection, AccountStatus, dict, datetime], None]
P = AccountStatusProjection
# Every journal entry type and what the projection does with it beyond reading its postings
# (None: postings only). PeriodTick entries are the shard clock (projections.fold); a type
# missing here is an error, never silently skipped (a test checks this against the codec).
HANDLERS: dict[str, Handler | None] = {
    "AccountOpened": P._on_AccountOpened,
    "SpendLimitConfigured": P._on_SpendLimitConfigured,
    "SpendLimitOverridden": P._on_SpendLimitOverridden,
    "AccountHoldPlaced": P._on_AccountHoldPlaced,
    "AccountHoldReleased": P._on_AccountHoldReleased,
    "UsageRecorded": None,
    "UsageRerated": None,
    "CreditPurchased": P._on_CreditPurchased,
    "CreditGranted": P._on_CreditGranted,
    "CreditRevoked": P._on_CreditRevoked,
    "GrantExpired": None,
    "PaymentMethodAdded": P._on_PaymentMethodAdded,
    "PaymentMethodRemoved": P._on_PaymentMethodRemoved,
    "PaymentFailed": P._on_PaymentFailed,
    "InvoicePaid": P._on_InvoicePaid,
    "InvoiceIssued": None,  # the writer's month close: published by `apply`
}
del P
# Folded from their postings alone: the projection never reads these entries' payloads.
POSTINGS_ONLY = sorted(
    t for t, handler in HANDLERS.items() if handler is None and t != INVOICE_ISSUED
)
