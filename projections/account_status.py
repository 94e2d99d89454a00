"""Account status projection: balances, payment-method state, suspension flag and reasons.

A pure fold over journal entries: `apply(state, entry) -> effects`, one small handler per event
type, no I/O. Balances are recomputed from the entry's postings (not from the ledger writer's
book), so the projection is an independent reading of the journal.

Suspension reasons (suspended ⇔ any holds), decided only once the account is opened:
  CREDITS_EXHAUSTED_NO_PAYMENT_METHOD  credit balance ≤ 0 and no payment method on file
  PAYMENT_FAILED                       a payment failed; cleared by a new payment method, a paid
                                       invoice or a credit purchase (a payment that succeeded)
  MANUAL_HOLD                          between AccountHoldPlaced and AccountHoldReleased
Every change of (suspended, reasons) bumps `status_version` and yields a StatusChanged effect.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from decimal import Decimal
from typing import Any

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

    @property
    def credit_balance(self) -> Decimal:
        return sum(self.grants.values(), ZERO)

    def to_json(self) -> dict[str, Any]:
        return {
            "opened": self.opened,
            "grants": {gid: str(v) for gid, v in sorted(self.grants.items())},
            "receivable": str(self.receivable),
            "payment_methods": self.payment_methods,
            "payment_failed": self.payment_failed,
            "manual_hold": self.manual_hold,
            "suspended": self.suspended,
            "reasons": list(self.reasons),
            "status_version": self.status_version,
            "last_event_at": self.last_event_at.isoformat() if self.last_event_at else None,
        }

    @classmethod
    def from_json(cls, account_id: str, data: dict[str, Any]) -> AccountStatus:
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
        )


class AccountStatusProjection:
    name = "account_status"

    def apply(self, state: AccountStatus, entry: JournalEntry) -> list[StatusChanged]:
        self._apply_postings(state, entry)
        handler = getattr(self, f"_on_{entry.event_type}", None)
        if handler is not None:
            handler(state, entry.payload)
        if state.last_event_at is None or entry.occurred_at > state.last_event_at:
            state.last_event_at = entry.occurred_at
        return self._decide(state, entry)

    # --- balances from postings -------------------------------------------------------------

    @staticmethod
    def _apply_postings(state: AccountStatus, entry: JournalEntry) -> None:
        credit_prefix = f"customer:{state.account_id}:credit:"
        receivable = f"customer:{state.account_id}:receivable"
        for ledger_account, amount in entry.postings:
            if ledger_account.startswith(credit_prefix):
                gid = ledger_account[len(credit_prefix) :]
                # Credit-normal: a grant's balance is the negated sum of its postings.
                state.grants[gid] = state.grants.get(gid, ZERO) - amount
            elif ledger_account == receivable:
                state.receivable += amount

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

    def _payment_succeeded(self, state: AccountStatus, event: dict) -> None:
        state.payment_failed = False

    _on_InvoicePaid = _on_CreditPurchased = _payment_succeeded

    def _on_AccountHoldPlaced(self, state: AccountStatus, event: dict) -> None:
        state.manual_hold = True

    def _on_AccountHoldReleased(self, state: AccountStatus, event: dict) -> None:
        state.manual_hold = False

    # --- the decision -----------------------------------------------------------------------

    @staticmethod
    def suspension_reasons(state: AccountStatus) -> tuple[str, ...]:
        if not state.opened:
            return ()  # never suspend an account the ledger has not seen opened
        held = {
            CREDITS_EXHAUSTED: state.credit_balance <= 0 and not state.payment_methods,
            PAYMENT_FAILED: state.payment_failed,
            MANUAL_HOLD: state.manual_hold,
        }
        return tuple(r for r in REASON_ORDER if held.get(r))

    def _decide(self, state: AccountStatus, entry: JournalEntry) -> list[StatusChanged]:
        reasons = self.suspension_reasons(state)
        suspended = bool(reasons)
        if (suspended, reasons) == (state.suspended, state.reasons):
            return []
        state.suspended, state.reasons = suspended, reasons
        state.status_version += 1
        return [
            StatusChanged(
                # Never earlier than a status already published for the account, even when
                # events arrive out of order (the latest occurred_at seen so far).
                state.account_id,
                suspended,
                reasons,
                state.status_version,
                state.last_event_at,
            )
        ]
