"""Suspension rules of the account-status projection, as a pure fold over journal entries."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from ledger.policy import Policy
from projections.account_status import (
    CREDITS_EXHAUSTED,
    MANUAL_HOLD,
    PAYMENT_FAILED,
    AccountStatus,
    AccountStatusProjection,
    JournalEntry,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)
A = "acct-1"
SIGNUP = f"customer:{A}:credit:signup"
RECEIVABLE = f"customer:{A}:receivable"


class Feed:
    """Feeds entries to the projection the way the worker does, numbering them."""

    def __init__(self):
        self.projection = AccountStatusProjection(Policy.load())
        self.state = AccountStatus(A)
        self.seq = 0
        self.published = []

    def __call__(self, event_type, payload=None, postings=()):
        self.seq += 1
        entry = JournalEntry(
            0,
            self.seq,
            A,
            event_type,
            "posted",
            T0 + timedelta(minutes=self.seq),
            payload or {},
            tuple((acct, Decimal(amount)) for acct, amount in postings),
        )
        changes = self.projection.apply(self.state, entry)
        self.published += changes
        return changes


def open_account(feed):
    return feed("AccountOpened", {}, [("expense:promotional", "1"), (SIGNUP, "-1")])


def use(feed, from_credit="0", to_receivable="0"):
    total = Decimal(from_credit) + Decimal(to_receivable)
    postings = [(SIGNUP, from_credit), (RECEIVABLE, to_receivable), ("revenue:usage", -total)]
    return feed("UsageRecorded", {}, [p for p in postings if Decimal(p[1]) != 0])


def test_opened_account_with_credit_is_not_suspended():
    feed = Feed()
    assert open_account(feed) == []
    assert feed.state.credit_balance == Decimal("1")
    assert not feed.state.suspended


def test_exhausted_credit_without_payment_method_suspends_once_and_method_reinstates():
    feed = Feed()
    open_account(feed)
    use(feed, "0.6")
    [suspended] = use(feed, "0.4")
    assert suspended.suspended and suspended.reasons == (CREDITS_EXHAUSTED,)
    assert suspended.status_version == 1
    assert use(feed, "0", "0.2") == []  # still suspended: no second event
    [reinstated] = feed("PaymentMethodAdded", {"payment_method_id": "pm_1"})
    assert not reinstated.suspended and reinstated.status_version == 2


def test_with_payment_method_usage_continues_into_receivable_without_suspension():
    feed = Feed()
    open_account(feed)
    feed("PaymentMethodAdded", {"payment_method_id": "pm_1"})
    assert use(feed, "1", "5") == []
    assert feed.state.receivable == Decimal("5")
    assert feed.published == []


def test_usage_before_account_opened_suspends_nothing():
    feed = Feed()
    assert use(feed, "0", "3") == []  # the ledger put it on receivable, account not opened
    assert not feed.state.suspended
    # When the account opens, the $1 does not cover the $3 owed… but the balance is what counts:
    # credit $1 > 0, so it stays active.
    assert open_account(feed) == []


def test_payment_failure_suspends_and_paid_invoice_reinstates():
    feed = Feed()
    open_account(feed)
    feed("PaymentMethodAdded", {"payment_method_id": "pm_1"})
    [change] = feed("PaymentFailed", {"payment_method_id": "pm_1"})
    assert change.reasons == (PAYMENT_FAILED,)
    [change] = feed("InvoicePaid", {"invoice_id": "inv_1", "amount": "1"})
    assert not change.suspended


def test_reasons_accumulate_and_each_change_bumps_the_version():
    feed = Feed()
    open_account(feed)
    [held] = feed("AccountHoldPlaced", {"reason": "risk"})
    assert held.reasons == (MANUAL_HOLD,)
    [both] = use(feed, "1")
    assert both.reasons == (CREDITS_EXHAUSTED, MANUAL_HOLD) and both.suspended
    [one] = feed("AccountHoldReleased", {})
    assert one.reasons == (CREDITS_EXHAUSTED,) and one.suspended
    assert [c.status_version for c in feed.published] == [1, 2, 3]


def test_state_survives_its_json_round_trip():
    feed = Feed()
    open_account(feed)
    feed("PaymentMethodAdded", {"payment_method_id": "pm_1"})
    use(feed, "1", "2.5")
    assert AccountStatus.from_json(A, feed.state.to_json()) == feed.state
