"""The $1-credit lifecycle end to end, on real Kafka and PostgreSQL: the wiring (journal rows,
price versions, published status events). The rules themselves are tested in the in-memory
rule harness (tests/test_rules_*.py)."""

from decimal import Decimal

from projections.account_status import CREDITS_EXHAUSTED

SUSPENDED, REINSTATED = "AccountSuspended", "AccountReinstated"


def test_new_account_gets_one_dollar_and_usage_burns_it_at_exact_rates(ledger):
    ledger.open_account("a1")
    # 1,234 input + 5,678 output tokens of Llama 3.3 70B at $0.90 / 1M:
    # (1234 + 5678) × 0.90 / 1e6 = 0.0062208
    ledger.use("a1", input_tokens=1234, output_tokens=5678)
    ledger.settle(2)
    account = ledger.account("a1")
    assert account["credit_balance"] == Decimal("0.993779200")
    assert account["state"]["grants"] == {"signup": "0.993779200"}
    assert not account["suspended"]
    charge = ledger.db.execute(
        "SELECT p.amount, e.price_version FROM postings p JOIN journal_entries e "
        "USING (shard, shard_seq) WHERE e.event_type = 'UsageRecorded' "
        "AND p.ledger_account = 'revenue:usage'"
    ).fetchone()
    assert charge == (Decimal("-0.006220800"), "2026-01")


def test_exhausted_credit_without_payment_method_suspends_until_one_is_added(ledger):
    ledger.open_account("a2")
    ledger.use("a2", input_tokens=1_000_000)  # $0.90
    ledger.use("a2", input_tokens=200_000)  # $0.18: $0.10 of credit + $0.08 owed
    ledger.settle(3)
    [(kind, reasons, suspended_version)] = ledger.status_of("a2")
    assert (kind, reasons) == (SUSPENDED, (CREDITS_EXHAUSTED,))
    assert ledger.account("a2")["receivable"] == Decimal("0.08")

    ledger.send("PaymentMethodAdded", "a2", payment_method_id="pm_1", kind="card")
    ledger.settle(4)
    # status_version is the journal position of the entry that changed the status: it only
    # grows, and the projection row carries the last one published.
    assert ledger.status_of("a2") == [
        (SUSPENDED, (CREDITS_EXHAUSTED,), suspended_version),
        (REINSTATED, (), ledger.account("a2")["status_version"]),
    ]
    assert ledger.account("a2")["status_version"] > suspended_version


def test_usage_before_account_opened_is_journaled_and_suspends_nothing(ledger):
    ledger.use("a7", input_tokens=500_000)  # $0.45, before the account exists
    ledger.use("a8", input_tokens=5_000_000)  # $4.50, before the account exists
    ledger.settle(2)
    assert ledger.journaled() == 2
    for account_id, owed in (("a7", "0.45"), ("a8", "4.5")):
        account = ledger.account(account_id)
        assert account["receivable"] == Decimal(owed) and not account["suspended"]
    assert ledger.status_of("a7") == ledger.status_of("a8") == []

    # Opened: the sign-up credit pays what was used first, as it would have in order.
    ledger.open_account("a7")
    ledger.open_account("a8")
    ledger.settle(4)
    a7, a8 = ledger.account("a7"), ledger.account("a8")
    assert (a7["credit_balance"], a7["receivable"]) == (Decimal("0.55"), 0)
    assert not a7["suspended"] and ledger.status_of("a7") == []
    # a8 used more than its credit and has no payment method: suspended once it is opened.
    assert (a8["credit_balance"], a8["receivable"]) == (0, Decimal("3.5"))
    assert [(t, r) for t, r, _ in ledger.status_of("a8")] == [(SUSPENDED, (CREDITS_EXHAUSTED,))]
