"""Spend-limit warnings and the month turn end to end on real services: the wiring of ticks,
warnings and status events. The spend-limit rules are tested in the rule harness
(tests/test_rules_status.py)."""

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
    [(kind, reasons, version)] = ledger.status_of("lim-4")
    assert (kind, reasons) == (SUSPENDED, (SPEND_LIMIT_REACHED,))
    # The 100 % warning follows the suspension and carries its version.
    assert warnings[-1]["status_version"] == version

    # The scheduler's tick at the start of April turns the month: reinstated, MTD reset.
    ledger.period_tick(datetime(2026, 4, 1, 0, 0, 30, tzinfo=UTC))
    ledger.wait_projected()
    ledger.settle(10 + 4)
    assert ledger.status_of("lim-4")[-1][:2] == (REINSTATED, ())
    row = ledger.db.execute(
        "SELECT month, month_to_date_spend FROM account_status WHERE account_id = 'lim-4'"
    ).fetchone()
    assert row == ("2026-04", 0)
    spend(ledger, "lim-4", 26, occurred_at=datetime(2026, 4, 2, tzinfo=UTC))
    ledger.settle(15)
    april = [w for w in ledger.outputs_of("lim-4", "SpendLimitWarning") if w["month"] == "2026-04"]
    assert [w["threshold_percent"] for w in april] == [50]
