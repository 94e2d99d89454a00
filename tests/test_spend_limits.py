"""Spend limits, tiers and warnings (DESIGN §5, §7), end to end on real services."""

from datetime import UTC, datetime
from decimal import Decimal

from projections.account_status import SPEND_LIMIT_REACHED

SUSPENDED, REINSTATED = "AccountSuspended", "AccountReinstated"
R1 = "accounts/fireworks/models/deepseek-r1"  # $8 / 1M output tokens: easy round numbers


def spend(ledger, account_id: str, dollars: int, **fields) -> dict:
    return ledger.use(account_id, model=R1, output_tokens=dollars * 125_000, **fields)


def with_goodwill(ledger, account_id: str, amount: str = "100") -> None:
    """Opened, a card on file, and credits that are not payments (the tier stays at 1)."""
    ledger.open_account(account_id)
    ledger.send("PaymentMethodAdded", account_id, payment_method_id="pm", kind="card")
    ledger.send(
        "CreditGranted",
        account_id,
        grant_id="gw",
        amount=Decimal(amount),
        kind="goodwill",
        expires_at=None,
        reason="",
    )


def test_tier_one_account_reaching_fifty_dollars_is_suspended_with_credits_left(ledger):
    with_goodwill(ledger, "lim-1")
    spend(ledger, "lim-1", 30)
    spend(ledger, "lim-1", 20)  # $50 this month = the tier-1 limit
    ledger.settle(5)
    account = ledger.account("lim-1")
    assert account["credit_balance"] == Decimal("51")  # credits left, still suspended
    assert ledger.status_of("lim-1") == [(SUSPENDED, (SPEND_LIMIT_REACHED,), 1)]

    # Buying $50 of credits: $50 paid in total reaches tier 2 ($500): reinstated.
    ledger.send(
        "CreditPurchased", "lim-1", grant_id="buy", amount=Decimal("50"), payment_reference="ch"
    )
    ledger.settle(6)
    assert ledger.status_of("lim-1")[-1] == (REINSTATED, (), 2)
    row = ledger.db.execute(
        "SELECT tier, effective_limit, month_to_date_spend "
        "FROM account_status WHERE account_id = 'lim-1'"
    ).fetchone()
    assert row == ("2", Decimal("500"), Decimal("50"))


def test_configured_limit_below_the_tier_wins_and_raising_it_reinstates(ledger):
    with_goodwill(ledger, "lim-2")
    ledger.send("SpendLimitConfigured", "lim-2", monthly_limit=Decimal("10"))
    spend(ledger, "lim-2", 10)
    ledger.settle(5)
    assert ledger.status_of("lim-2") == [(SUSPENDED, (SPEND_LIMIT_REACHED,), 1)]
    ledger.send("SpendLimitConfigured", "lim-2", monthly_limit=Decimal("25"))
    ledger.settle(6)
    assert ledger.status_of("lim-2")[-1] == (REINSTATED, (), 2)
    # A configured limit above the tier does not lift it: min(configured, tier).
    ledger.send("SpendLimitConfigured", "lim-2", monthly_limit=Decimal("1000"))
    spend(ledger, "lim-2", 40)  # $50 this month
    ledger.settle(8)
    assert ledger.status_of("lim-2")[-1] == (SUSPENDED, (SPEND_LIMIT_REACHED,), 3)


def test_contract_override_sets_a_custom_tier(ledger):
    with_goodwill(ledger, "lim-3", "500")
    ledger.send("SpendLimitOverridden", "lim-3", monthly_limit=Decimal("300"))
    spend(ledger, "lim-3", 299)
    ledger.settle(5)
    assert ledger.status_of("lim-3") == []
    spend(ledger, "lim-3", 1)
    ledger.settle(6)
    assert ledger.status_of("lim-3") == [(SUSPENDED, (SPEND_LIMIT_REACHED,), 1)]


def test_warnings_fire_once_each_and_the_month_turn_reinstates_and_resets(ledger):
    with_goodwill(ledger, "lim-4")
    march = datetime(2026, 3, 10, tzinfo=UTC)
    for dollars in (20, 6, 2, 13, 1, 9):  # 20, 26 (50 %), 28, 41 (80 %), 42, 51 (100 %)
        spend(ledger, "lim-4", dollars, occurred_at=march)
    spend(ledger, "lim-4", 1, occurred_at=march)  # past 100 %: no further warning
    ledger.settle(10)
    warnings = ledger.outputs_of("lim-4", "SpendLimitWarning")
    assert [(w["month"], w["threshold_percent"], w["month_to_date_spend"]) for w in warnings] == [
        ("2026-03", 50, Decimal("26")),
        ("2026-03", 80, Decimal("41")),
        ("2026-03", 100, Decimal("51")),
    ]
    assert all(w["effective_limit"] == Decimal("50") for w in warnings)
    assert ledger.status_of("lim-4") == [(SUSPENDED, (SPEND_LIMIT_REACHED,), 1)]

    # The scheduler's tick at the start of April turns the month: reinstated, MTD reset.
    ledger.period_tick(datetime(2026, 4, 1, 0, 0, 30, tzinfo=UTC))
    ledger.wait_projected()
    ledger.settle(10 + 4)
    assert ledger.status_of("lim-4")[-1] == (REINSTATED, (), 2)
    row = ledger.db.execute(
        "SELECT month, month_to_date_spend FROM account_status WHERE account_id = 'lim-4'"
    ).fetchone()
    assert row == ("2026-04", 0)
    spend(ledger, "lim-4", 26, occurred_at=datetime(2026, 4, 2, tzinfo=UTC))
    ledger.settle(15)
    april = [w for w in ledger.outputs_of("lim-4", "SpendLimitWarning") if w["month"] == "2026-04"]
    assert [w["threshold_percent"] for w in april] == [50]


def test_usage_before_the_account_opened_never_suspends_on_the_limit(ledger):
    spend(ledger, "lim-5", 60)
    ledger.settle(1)
    assert ledger.status_of("lim-5") == []
