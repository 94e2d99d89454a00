"""Suspension, spend-limit and warning rules, in the in-memory rule harness (tests/rules.py).
Each test is given/when/then over the production folds; the wiring (Kafka, PostgreSQL, the
outbox) is covered by the end-to-end tests."""

from datetime import UTC, datetime
from decimal import Decimal

from ledger.book import LedgerFold
from projections.account_status import (
    CREDITS_EXHAUSTED,
    HANDLERS,
    MANUAL_HOLD,
    PAYMENT_FAILED,
    SPEND_LIMIT_REACHED,
    AccountStatus,
)
from tests.rules import _CODEC, Rules

LLAMA_70B = "accounts/fireworks/models/llama-v3p3-70b-instruct"  # $0.90 / 1M tokens


def reasons(rules: Rules, account_id: str) -> list[tuple[bool, tuple[str, ...]]]:
    return [(c.suspended, c.reasons) for c in rules.changes(account_id)]


def test_every_event_type_has_a_handler_in_both_folds():
    """A new event type in the codec without a handler fails here, not silently in production."""
    # Ticks and configuration are the fold loop's and the journal writer's own business.
    inputs = {t for t in _CODEC.event_types() if t not in _OUTPUTS} - {"PeriodTick"}
    inputs -= {"ConfigPublished"}
    # Derived entries the journal writer makes: expiries, re-ratings, the month close.
    assert set(HANDLERS) == inputs | {"GrantExpired", "UsageRerated", "InvoiceIssued"}
    fold = LedgerFold.__dict__
    assert {t for t in inputs if f"_on_{t}" not in fold} == set()


_OUTPUTS = {"AccountSuspended", "AccountReinstated", "SpendLimitWarning", "InvoiceIssued"}


def test_new_account_gets_one_dollar_and_usage_burns_it_at_exact_rates():
    rules = Rules()
    rules.open("a")
    # 1,234 input + 5,678 output tokens of Llama 3.3 70B at $0.90 / 1M = 0.0062208
    rules.send(
        "UsageRecorded", "a", request_id="r", product="serverless", model=LLAMA_70B,
        service_tier="standard", input_tokens=1234, output_tokens=5678,
    )  # fmt: skip
    assert rules.state("a").grants == {"signup": Decimal("0.993779200")}
    assert rules.balances()["revenue:usage"] == Decimal("-0.0062208")
    assert rules.journal[-1].payload["model"] == LLAMA_70B
    assert not rules.state("a").suspended
    rules.check()


def test_exhausted_credit_without_payment_method_suspends_once_and_method_reinstates():
    rules = Rules()
    rules.open("a")
    rules.use("a", "0.6")
    [suspended] = rules.use("a", "0.5")  # $0.40 of credit left, $0.10 owed
    assert suspended.reasons == (CREDITS_EXHAUSTED,)
    assert rules.state("a").receivable == Decimal("0.1")
    assert rules.use("a", "0.2") == []  # still suspended: no second event
    [reinstated] = rules.card("a")
    assert not reinstated.suspended and reinstated.status_version > suspended.status_version
    rules.check()


def test_with_a_payment_method_usage_continues_into_receivable_unsuspended():
    rules = Rules()
    rules.open("a", card=True)
    for _ in range(3):
        rules.use("a", "0.9")
    assert rules.state("a").credit_balance == 0
    assert rules.state("a").receivable == Decimal("1.7")
    assert rules.changes("a") == []
    rules.check()


def test_purchase_pays_the_outstanding_balance_first():
    # $750 owed + $500 bought → $250 owed, $0 credit.
    rules = Rules()
    rules.open("a", card=True, limit="10000")
    rules.use("a", 751)
    rules.buy("a", 500)
    assert (rules.state("a").receivable, rules.state("a").credit_balance) == (250, 0)
    rules.check()


def test_failed_payment_suspends_and_new_method_or_paid_invoice_reinstates():
    rules = Rules()
    rules.open("a", card=True)
    rules.fail_payment("a")
    assert reasons(rules, "a") == [(True, (PAYMENT_FAILED,))]
    rules.card("a", "pm_2")
    rules.fail_payment("a")
    rules.use("a", "1.8")
    rules.pay("a", "0.8")
    assert reasons(rules, "a") == [
        (True, (PAYMENT_FAILED,)),
        (False, ()),
        (True, (PAYMENT_FAILED,)),
        (False, ()),
    ]
    assert rules.state("a").receivable == 0
    rules.check()


def test_manual_hold_suspends_and_release_reinstates_and_reasons_accumulate():
    rules = Rules()
    rules.open("a")
    rules.send("AccountHoldPlaced", "a", reason="risk")
    rules.use("a", 1)
    rules.send("AccountHoldReleased", "a")
    assert reasons(rules, "a") == [
        (True, (MANUAL_HOLD,)),
        (True, (CREDITS_EXHAUSTED, MANUAL_HOLD)),
        (True, (CREDITS_EXHAUSTED,)),
    ]
    versions = [c.status_version for c in rules.changes("a")]
    assert versions == sorted(set(versions))
    rules.check()


def test_usage_before_account_opened_is_journaled_and_suspends_nothing():
    rules = Rules()
    rules.use("a7", "0.45")
    rules.use("a8", "4.5")
    assert rules.changes("a7") == rules.changes("a8") == []
    rules.open("a7")
    rules.open("a8")
    a7, a8 = rules.state("a7"), rules.state("a8")
    assert (a7.credit_balance, a7.receivable) == (Decimal("0.55"), 0)
    assert (a8.credit_balance, a8.receivable) == (0, Decimal("3.5"))
    assert reasons(rules, "a7") == [] and reasons(rules, "a8") == [(True, (CREDITS_EXHAUSTED,))]
    rules.check()


def with_goodwill(rules: Rules, account_id: str, amount: str = "100") -> None:
    """Opened, a card on file, credits that are not payments (the tier stays at 1)."""
    rules.open(account_id, card=True)
    rules.grant(account_id, amount, "gw", kind="goodwill")


def test_tier_one_account_reaching_fifty_dollars_is_suspended_with_credits_left():
    rules = Rules()
    with_goodwill(rules, "a")
    rules.use("a", 30)
    rules.use("a", 20)
    assert rules.state("a").credit_balance == 51
    assert reasons(rules, "a") == [(True, (SPEND_LIMIT_REACHED,))]
    rules.buy("a", 50)  # $50 paid: tier 2 ($500)
    assert reasons(rules, "a")[-1] == (False, ())
    state = rules.state("a")
    assert rules.projection.tier(state) == ("2", Decimal("500"))
    assert state.month_to_date_spend == 50
    rules.check()


def test_configured_limit_below_the_tier_wins_and_raising_it_reinstates():
    rules = Rules()
    with_goodwill(rules, "a")
    rules.send("SpendLimitConfigured", "a", monthly_limit=Decimal("10"))
    rules.use("a", 10)
    rules.send("SpendLimitConfigured", "a", monthly_limit=Decimal("25"))
    rules.send("SpendLimitConfigured", "a", monthly_limit=Decimal("1000"))  # above the tier
    rules.use("a", 40)
    assert reasons(rules, "a") == [
        (True, (SPEND_LIMIT_REACHED,)),
        (False, ()),
        (True, (SPEND_LIMIT_REACHED,)),
    ]
    rules.check()


def test_contract_override_sets_a_custom_tier():
    rules = Rules()
    with_goodwill(rules, "a", "500")
    rules.send("SpendLimitOverridden", "a", monthly_limit=Decimal("300"))
    rules.use("a", 299)
    assert rules.changes("a") == []
    rules.use("a", 1)
    assert reasons(rules, "a") == [(True, (SPEND_LIMIT_REACHED,))]
    assert rules.projection.tier(rules.state("a"))[0] == "custom"


def test_warnings_fire_once_each_and_the_month_turn_reinstates_and_resets():
    rules = Rules()
    with_goodwill(rules, "a")
    march = datetime(2026, 3, 10, tzinfo=UTC)
    for dollars in (20, 6, 2, 13, 1, 9, 1):  # 26 (50 %), 41 (80 %), 51 (100 %), 52
        rules.use("a", dollars, at=march)
    assert [(w.month, w.threshold_percent, w.month_to_date_spend) for w in rules.warnings("a")] == [
        ("2026-03", 50, 26),
        ("2026-03", 80, 41),
        ("2026-03", 100, 51),
    ]
    assert reasons(rules, "a") == [(True, (SPEND_LIMIT_REACHED,))]
    rules.tick(datetime(2026, 4, 1, 0, 0, 30, tzinfo=UTC))
    assert reasons(rules, "a")[-1] == (False, ())
    assert (rules.state("a").month, rules.state("a").month_to_date_spend) == ("2026-04", 0)
    rules.use("a", 26, at=datetime(2026, 4, 2, tzinfo=UTC))
    april = [w.threshold_percent for w in rules.warnings("a") if w.month == "2026-04"]
    assert april == [50]
    rules.check()


def test_usage_before_the_account_opened_never_suspends_on_the_limit():
    rules = Rules()
    rules.use("a", 60)
    assert rules.changes("a") == []


def test_state_survives_its_json_round_trip():
    rules = Rules()
    rules.open("a", card=True)
    rules.grant("a", 5, "p", expires_at=datetime(2026, 3, 20, tzinfo=UTC))
    rules.buy("a", 60)
    rules.fail_payment("a")
    rules.use("a", 70)
    rules.close("2026-03")
    state = rules.state("a")
    assert AccountStatus.from_json("a", state.to_json()) == state


def test_a_grant_named_account_id_survives_the_json_round_trip():
    """The stored state leaves out the row's key, account_id, and only that: a grant whose id
    happens to be "account_id" was once dropped from the stored grants with it."""
    rules = Rules()
    rules.open("a")
    rules.grant("a", 5, "account_id")
    state = rules.state("a")
    assert state.grants["account_id"] == 5
    stored = state.to_json()
    assert "account_id" not in stored and Decimal(stored["grants"]["account_id"]) == 5
    assert AccountStatus.from_json("a", stored) == state
