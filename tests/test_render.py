"""How money and quantities read in a bill (pure, no services)."""

from datetime import UTC, datetime
from decimal import Decimal

from ledger.audit import _grants, _payments
from ledger.render import money, quantity
from projections.account_status import JournalEntry


def test_money_shows_cents_and_only_the_decimals_an_amount_has():
    assert money("5.000000000") == "5.00"
    assert money("1234.5") == "1,234.50"
    assert money("0.006220800") == "0.0062208"  # a tiny usage line keeps its precision
    assert money(Decimal("-0.01")) == "-0.01"
    assert money("0") == "0.00"


def test_quantities_read_as_counts_or_at_their_precision():
    assert quantity("1200") == "1,200"
    assert quantity("3600.123456789000") == "3,600.123456789"
    assert quantity("0.5") == "0.5"


def test_a_purchase_that_only_paid_the_receivable_is_a_payment_not_a_grant():
    at = datetime(2026, 3, 5, tzinfo=UTC)
    entry = JournalEntry(
        0, 7, "a", "CreditPurchased", "posted", at, {"payment_reference": "ch"}, ()
    )
    detail = {"grant_id": "b", "paid": "25", "applied_to_receivable": "25", "granted": "0"}
    extra = {7: ("e7", None, detail)}
    assert _grants([entry], extra) == []
    assert [p["amount"] for p in _payments([entry], extra)] == ["25"]
    detail["granted"], detail["applied_to_receivable"] = "5", "20"
    assert [g["amount"] for g in _grants([entry], extra)] == ["5"]
