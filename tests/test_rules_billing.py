"""Month close, invoices, late usage, rounding, expiry and revocation, in the rule harness."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from tests.rules import Rules

MARCH = datetime(2026, 3, 10, tzinfo=UTC)


def contract(rules: Rules, account_id: str) -> None:
    """Opened with a card and a contract limit high enough not to get in the way."""
    rules.open(account_id, card=True, limit="10000")


def due(invoice: dict) -> Decimal:
    return Decimal(invoice["amount_due"])


def lines(invoice: dict) -> list[tuple[str, str, Decimal]]:
    return [(x["kind"], x["month"], Decimal(x["amount"])) for x in invoice["lines"]]


def test_twenty_dollars_of_credits_and_83_of_usage_is_an_invoice_of_63():
    rules = Rules()
    contract(rules, "fw")
    rules.buy("fw", 19)
    rules.use("fw", 50, at=MARCH)
    rules.use("fw", 33, at=MARCH + timedelta(days=5))
    rules.tick(datetime(2026, 4, 2, tzinfo=UTC))  # month over, grace not yet
    assert rules.invoices() == []
    rules.close("2026-03")
    [invoice] = rules.invoices("fw")
    assert (invoice["invoice_id"], due(invoice), Decimal(invoice["exact_total"])) == (
        "INV-2026-03-fw",
        63,
        63,
    )
    assert lines(invoice) == [("usage", "2026-03", 63)]
    rules.pay("fw", "63.00", invoice["invoice_id"])
    state = rules.state("fw")
    assert (state.receivable, state.paid_total, state.invoiced_outstanding) == (0, 82, 0)
    rules.check()


def test_late_usage_for_a_closed_month_goes_on_the_next_invoice_as_an_adjustment():
    rules = Rules()
    contract(rules, "late")
    rules.use("late", 10, at=MARCH)
    rules.close("2026-03")
    [march] = rules.invoices("late")
    assert due(march) == Decimal("9.00")
    rules.use("late", "2.5", at=MARCH + timedelta(days=20))  # after the close
    rules.use("late", 4, at=datetime(2026, 4, 15, tzinfo=UTC))
    rules.close("2026-04")
    assert rules.invoices("late")[0] == march  # an issued invoice never changes
    april = rules.invoices("late")[1]
    assert (april["month"], due(april)) == ("2026-04", Decimal("6.50"))
    assert lines(april) == [("adjustment", "2026-03", Decimal("2.5")), ("usage", "2026-04", 4)]
    rules.check()


def test_a_sub_cent_amount_waits_for_the_next_invoice_and_its_rounding_is_posted():
    rules = Rules()
    contract(rules, "c")
    rules.use("c", "1.004", at=MARCH)  # $1 of credit, $0.004 owed: nothing to bill
    rules.close("2026-03")
    assert rules.invoices() == []
    assert rules.balances()["customer:c:receivable"] == Decimal("0.004")  # it waits
    rules.use("c", "0.01", at=datetime(2026, 4, 9, tzinfo=UTC))
    rules.close("2026-04")
    [invoice] = rules.invoices("c")
    assert (invoice["month"], due(invoice), Decimal(invoice["exact_total"])) == (
        "2026-04",
        Decimal("0.01"),
        Decimal("0.014"),
    )
    assert lines(invoice) == [
        ("adjustment", "2026-03", Decimal("0.004")),
        ("usage", "2026-04", Decimal("0.01")),
    ]
    balances = rules.balances()
    assert balances["revenue:rounding"] == Decimal("0.004")  # rounded down: a debit
    assert balances["customer:c:invoiced"] == Decimal("0.01")
    assert "customer:c:receivable" not in balances or balances["customer:c:receivable"] == 0
    rules.check()


def test_a_zero_invoice_is_not_issued():
    rules = Rules()
    contract(rules, "z")
    rules.use("z", "0.5", at=MARCH)
    rules.close("2026-03")
    assert rules.invoices() == []


def test_a_promotional_grant_expires_exactly_at_expires_at():
    rules = Rules()
    expires = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
    rules.open("e", card=True)
    rules.grant("e", 5, "promo", kind="promotional", expires_at=expires)
    rules.use("e", 1, at=MARCH)  # earliest expiry first: promo
    rules.use("e", 1, at=expires - timedelta(microseconds=1))  # last usable moment
    rules.use("e", 1, at=expires)  # expired: the sign-up credit pays
    rules.tick(expires + timedelta(minutes=1))
    [expiry] = [e for e in rules.journal if e.event_type == "GrantExpired"]
    assert expiry.occurred_at == expires
    assert rules.balances()["revenue:breakage"] == -3
    assert rules.state("e").grants == {"promo": 0, "signup": 0}
    rules.check()


def test_a_revoked_spent_grant_leaves_a_receivable_that_is_invoiced():
    rules = Rules()
    contract(rules, "r")
    rules.grant("r", 10, "gw", kind="goodwill")
    rules.use("r", 7, at=MARCH)  # $1 sign-up + $6 of the goodwill grant
    rules.revoke("r", "gw", at=MARCH + timedelta(days=1))
    rules.close("2026-03")
    assert rules.state("r").receivable == 6
    [invoice] = rules.invoices("r")
    assert due(invoice) == Decimal("6.00")
    assert [k for k, _, _ in lines(invoice)] == ["credit_revoked"]
    rules.check()


def test_months_with_nothing_pending_are_skipped_and_each_closed_month_gets_its_own_invoice():
    rules = Rules()
    contract(rules, "m")
    rules.use("m", 11, at=MARCH)
    rules.use("m", 5, at=datetime(2026, 4, 10, tzinfo=UTC))
    rules.tick(datetime(2026, 5, 10, tzinfo=UTC))  # the scheduler was down: two closes at once
    assert [(i["month"], due(i)) for i in rules.invoices("m")] == [("2026-03", 10), ("2026-04", 5)]
    rules.check()
