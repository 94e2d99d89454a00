"""One regression test per sequence that lost money, invented it or published contradictions
(the project's issue 9, cases 1-9), in the rule harness. Each names the case it pins."""

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from ledger.config_versions import POLICY, ConfigVersion, policy_version
from ledger.policy import Policy
from projections.account_status import (
    CREDITS_EXHAUSTED,
    PAYMENT_FAILED,
    SPEND_LIMIT_REACHED,
    AccountStatusProjection,
    JournalEntry,
    StatusChanged,
)
from projections.fold import fold_entries, output_event
from tests.rules import UNPRICED, Rules, close_of, price_version_with

OCT = datetime(2026, 10, 10, tzinfo=UTC)


def kinds(invoice: dict) -> list[tuple[str, str, Decimal]]:
    return [(x["kind"], x["month"], Decimal(x["amount"])) for x in invoice["lines"]]


def ids(rules: Rules) -> list[str]:
    return [i["invoice_id"] for i in rules.invoices()]


# --- 1. late usage after the month turn ----------------------------------------------------


def test_1_late_usage_after_the_month_turn_goes_on_the_next_invoice_never_a_second_one():
    rules = Rules()
    rules.open("a", card=True, limit="10000", at=OCT)
    rules.use("a", 11, at=OCT)
    rules.close("2026-10")
    rules.tick(datetime(2026, 11, 20, tzinfo=UTC))
    rules.use("a", 2, at=OCT + timedelta(days=5))  # October usage, arriving on 20 November
    rules.tick(datetime(2026, 12, 1, 0, 1, tzinfo=UTC))  # the month turns
    assert ids(rules) == ["INV-2026-10-a"]
    rules.close("2026-11")
    assert ids(rules) == ["INV-2026-10-a", "INV-2026-11-a"]
    assert kinds(rules.invoices()[1]) == [("adjustment", "2026-10", 2)]
    state = rules.state("a")
    assert state.receivable == 12 == state.invoiced_outstanding  # owed = what invoices say
    rules.check()


def test_1b_late_usage_after_the_close_waits_in_the_receivable_until_the_next_invoice():
    rules = Rules()
    rules.open("a", card=True, limit="10000", at=OCT)
    rules.use("a", 11, at=OCT)
    rules.close("2026-10")
    assert (balance(rules, "customer:a:receivable"), balance(rules, "customer:a:invoiced")) == (
        0,
        10,
    )
    rules.use("a", "2.5", at=OCT + timedelta(days=5))  # October usage, after October's close
    # Not invoiced yet: it waits in the receivable, dated October; October's invoice is as
    # issued, and the invoiced receivable still equals it.
    assert balance(rules, "customer:a:receivable") == Decimal("2.5")
    assert balance(rules, "customer:a:invoiced") == 10
    assert rules.book("a").pending == {"2026-10": {"usage": Decimal("2.5")}}
    rules.pay("a", 12, "INV-2026-10-a")  # pays the invoice first, then what waits
    assert balance(rules, "customer:a:invoiced") == 0
    assert balance(rules, "customer:a:receivable") == Decimal("0.5")
    rules.close("2026-11")
    assert ids(rules) == ["INV-2026-10-a", "INV-2026-11-a"]
    november = rules.invoices()[1]
    assert kinds(november) == [
        ("adjustment", "2026-10", Decimal("2.5")),
        ("payments_applied", "2026-11", Decimal(-2)),
    ]
    assert november["amount_due"] == "0.50"
    assert balance(rules, "customer:a:receivable") == 0
    assert balance(rules, "customer:a:invoiced") == Decimal("0.50")
    rules.check()


# --- 2. rounding is posted, never a payment -------------------------------------------------


def balance(rules: Rules, ledger_account: str) -> Decimal:
    return rules.balances().get(ledger_account, Decimal(0))


def test_2_an_invoice_rounded_up_posts_the_difference_to_revenue_rounding_not_a_carry():
    rules = Rules()
    rules.open("a", card=True, limit="10000", at=datetime(2026, 3, 2, tzinfo=UTC))
    rules.use("a", "10.996", at=datetime(2026, 3, 5, tzinfo=UTC))  # $9.996 owed → $10.00
    rules.close("2026-03")
    [march] = rules.invoices()
    assert (march["exact_total"], march["amount_due"], march["rounding"]) == (
        "9.996000000",
        "10.00",
        "-0.004000000",
    )
    [entry] = [e for e in rules.journal if e.event_type == "InvoiceIssued"]
    assert entry.payload["event_id"] == "INV-2026-03-a"
    assert dict(entry.postings) == {
        "customer:a:receivable": Decimal("-9.996"),
        "customer:a:invoiced": Decimal("10.00"),
        "revenue:rounding": Decimal("-0.004"),  # rounded up: revenue (a credit)
    }
    assert balance(rules, "customer:a:receivable") == 0  # nothing waits, no carry
    assert balance(rules, "customer:a:invoiced") == Decimal("10.00") == rules.state("a").receivable
    rules.tick(datetime(2026, 4, 20, tzinfo=UTC))
    rules.close("2026-04")  # nothing waits: no invoice
    rules.tick(datetime(2026, 5, 1, 0, 1, tzinfo=UTC))  # a month turn
    rules.use("a", 5, at=datetime(2026, 5, 5, tzinfo=UTC))
    rules.close("2026-05")
    may = rules.invoices()[-1]
    assert kinds(may) == [("usage", "2026-05", 5)]  # never a carry, never a payment line
    assert Decimal(may["amount_due"]) == Decimal("5.00")
    assert balance(rules, "customer:a:invoiced") == Decimal("15.00")
    rules.check()


def test_2b_an_invoice_rounded_down_posts_the_difference_to_revenue_rounding():
    rules = Rules()
    rules.open("a", card=True, limit="10000", at=datetime(2026, 3, 2, tzinfo=UTC))
    rules.use("a", "8.004", at=datetime(2026, 3, 5, tzinfo=UTC))  # $7.004 owed → $7.00
    rules.close("2026-03")
    [march] = rules.invoices()
    assert (march["amount_due"], march["rounding"]) == ("7.00", "0.004000000")
    assert balance(rules, "revenue:rounding") == Decimal("0.004")  # rounded down: a debit
    assert balance(rules, "customer:a:invoiced") == Decimal("7.00")
    assert balance(rules, "customer:a:receivable") == 0
    rules.pay("a", "7.00", march["invoice_id"])  # paid as invoiced: nothing owed, no credit
    assert balance(rules, "customer:a:invoiced") == 0
    assert rules.state("a").receivable == 0 and rules.book("a").grants.keys() == {"signup"}
    rules.check()


# --- 3. the rounding is credited once -------------------------------------------------------------


def test_3_paying_a_rounded_up_invoice_credits_the_rounding_once_over_eleven_months():
    rules = Rules()
    rules.open("a", card=True, limit="10000", at=datetime(2026, 1, 2, tzinfo=UTC))
    month = "2026-01"
    for n in range(11):
        year, mon = 2026 + (n // 12), n % 12 + 1
        rules.use("a", "9.996", at=datetime(year, mon, 10, tzinfo=UTC))
        rules.close(f"{year}-{mon:02d}")
        invoice = rules.invoices()[-1]
        assert invoice["month"] == f"{year}-{mon:02d}"
        rules.pay("a", invoice["amount_due"], invoice["invoice_id"])
        month = invoice["month"]
    assert month == "2026-11"
    billed = sum(Decimal(i["amount_due"]) for i in rules.invoices())
    owed = 11 * Decimal("9.996") - 1  # the $1 sign-up credit paid the first dollar
    # Every invoice rounded up by $0.004: posted as revenue:rounding, each once; paying the
    # rounded amounts makes no overpayment credit and leaves nothing owed.
    assert billed - owed == Decimal("0.044") == -balance(rules, "revenue:rounding")
    state = rules.state("a")
    assert (state.receivable, state.credit_balance) == (0, 0)
    assert rules.book("a").grants.keys() == {"signup"}
    rules.check()


# --- 4. chargebacks -------------------------------------------------------------------------------


def test_4a_charging_back_a_purchase_that_paid_the_receivable_makes_the_debt_owed_again():
    rules = Rules()
    rules.open("a", card=True, limit="10000")
    rules.use("a", 31)  # $30 owed
    rules.buy("a", 20, "ch_1")  # all of it pays the receivable
    assert rules.state("a").receivable == 10
    rules.revoke("a", "ch_1")
    assert rules.rejects == []
    assert rules.state("a").receivable == 30
    assert rules.balances()["cash"] == 0
    rules.check()


def test_4b_a_purchase_retried_under_the_same_grant_id_counts_once():
    rules = Rules()
    rules.open("a", card=True, limit="10000")
    rules.use("a", 31)
    rules.buy("a", 20, "ch_1")
    rules.buy("a", 20, "ch_1")  # a new event_id, the same purchase
    assert [r[2] for r in rules.rejects] == ["duplicate_grant"]
    assert rules.state("a").receivable == 10
    assert rules.state("a").paid_total == 20
    rules.check()


def test_4c_the_tier_drops_when_the_purchase_that_reached_it_is_charged_back():
    rules = Rules()
    rules.open("a", card=True)
    rules.buy("a", 5000, "big")
    assert rules.projection.tier(rules.state("a")) == ("4", Decimal("50000"))
    rules.use("a", 60)
    rules.revoke("a", "big")
    assert rules.projection.tier(rules.state("a")) == ("1", Decimal("50"))
    assert rules.changes("a")[-1].reasons == (SPEND_LIMIT_REACHED,)
    rules.check()


# --- 5. a future-dated event cannot turn the month -------------------------------------------


def test_5_an_event_dated_next_month_does_not_reset_the_spend_limit():
    rules = Rules()
    rules.open("a", card=True, at=datetime(2026, 3, 2, tzinfo=UTC))
    rules.tick(datetime(2026, 3, 20, tzinfo=UTC))
    rules.use("a", 51, at=datetime(2026, 3, 20, tzinfo=UTC))
    assert rules.state("a").reasons == (SPEND_LIMIT_REACHED,)
    rules.card("a", "pm_2", at=datetime(2026, 4, 15, tzinfo=UTC))  # stamped a month ahead
    state = rules.state("a")
    assert (state.month, state.reasons) == ("2026-03", (SPEND_LIMIT_REACHED,))
    assert state.last_event_at <= datetime(2026, 3, 20, tzinfo=UTC) + timedelta(minutes=15)
    rules.tick(datetime(2026, 4, 1, 0, 1, tzinfo=UTC))  # the real turn reinstates
    assert rules.state("a").reasons == ()
    rules.check()


# --- 6. order across topics --------------------------------------------------------------------


def test_6_a_failure_dated_before_a_later_success_does_not_suspend():
    rules = Rules()
    at = datetime(2026, 3, 5, 10, 0, tzinfo=UTC)
    rules.open("a", card=True, at=at - timedelta(days=1))
    rules.buy("a", 10, at=at + timedelta(minutes=5))  # 10:05, journaled first
    rules.fail_payment("a", at=at)  # 10:00, journaled after it
    assert PAYMENT_FAILED not in rules.state("a").reasons
    rules.fail_payment("a", at=at + timedelta(minutes=6))  # a failure after the success
    assert rules.state("a").reasons == (PAYMENT_FAILED,)
    rules.check()


# --- 7. warnings -------------------------------------------------------------------------------


def test_7a_the_100_percent_warning_follows_the_suspension_it_goes_with():
    rules = Rules()
    rules.open("a", card=True)
    rules.use("a", 51)
    suspended, warnings = rules.changes("a")[0], rules.warnings("a")
    assert [w.threshold_percent for w in warnings] == [50, 80, 100]
    assert all(w.status_version == suspended.status_version for w in warnings)
    published = [t for t, _ in rules.outputs("a")]
    assert published[0] == "AccountSuspended"
    rules.check()


def test_7b_a_raised_limit_warns_again_before_suspending_at_the_new_limit():
    rules = Rules()
    rules.open("a", card=True)
    rules.use("a", 49)  # 50 % and 80 % of $50
    rules.buy("a", 50)  # tier 2: $500 (the $50 is credit)
    rules.use("a", 400)  # 449 + 1 signup... ≥ 80 % of $500
    rules.use("a", 60)  # ≥ 100 %
    by_limit = [(w.effective_limit, w.threshold_percent) for w in rules.warnings("a")]
    assert by_limit == [(50, 50), (50, 80), (500, 50), (500, 80), (500, 100)]
    assert rules.state("a").reasons == (SPEND_LIMIT_REACHED,)
    rules.check()


# --- 8. time and rebuilds ------------------------------------------------------------------------


def test_8a_a_tick_that_goes_backwards_closes_nothing_again():
    rules = Rules()
    rules.open("a", card=True, limit="10000", at=datetime(2026, 3, 2, tzinfo=UTC))
    rules.use("a", 11, at=datetime(2026, 3, 5, tzinfo=UTC))
    rules.close("2026-03")
    rules.close("2026-04")
    rules.use("a", 3, at=datetime(2026, 3, 9, tzinfo=UTC))  # late
    rules.tick(datetime(2026, 4, 20, tzinfo=UTC))  # backwards
    assert ids(rules) == ["INV-2026-03-a"]
    assert rules.clock == close_of("2026-04")
    rules.close("2026-05")
    assert ids(rules) == ["INV-2026-03-a", "INV-2026-05-a"]
    rules.check()


def test_8b_a_month_turn_tick_marks_the_accounts_it_revisited_for_the_rebuild_swap():
    rules = Rules()
    rules.open("a", card=True, limit="5")
    rules.use("a", 6)  # suspended at its limit: tick-sensitive (the month turn lifts it)
    assert rules.state("a").reasons == (SPEND_LIMIT_REACHED,)
    tick = rules.event("PeriodTick", "", datetime(2026, 4, 1, tzinfo=UTC), tick_at=datetime(
        2026, 4, 1, tzinfo=UTC))  # fmt: skip
    before = len(rules.journal)
    rules.deliver(tick)
    visited: set[str] = set()
    states, _ = rules.refold()
    states_before: dict = {}
    _, clock = fold_entries(rules.projection, states_before, rules.journal[:before], None)
    effects, _ = fold_entries(
        rules.projection, states_before, rules.journal[before:], clock, visited=visited
    )
    assert [type(e).__name__ for e in effects] == ["StatusChanged"] and visited == {"a"}
    assert states_before["a"].month == "2026-04" == states["a"].month


def test_8c_a_rebuild_under_another_policy_never_reuses_a_published_status_version():
    rules = Rules()
    rules.open("a", card=True)
    rules.use("a", 30)
    rules.send("AccountHoldPlaced", "a")
    rules.send("AccountHoldReleased", "a")
    rules.use("a", 25)  # $55: limit reached under the shipped policy
    published = {c.status_version for c in rules.changes("a")}
    assert len(published) == 3
    # The same journal under a policy without spend limits: fewer changes.
    policy = Policy.load()
    lenient = AccountStatusProjection(
        type(policy)(**{**policy.__dict__, "tiers": tuple(
            type(t)(t.name, t.paid_at_least, Decimal("100000")) for t in policy.tiers)})
    )  # fmt: skip
    states: dict = {}
    _, clock = fold_entries(lenient, states, rules.journal, None)
    assert states["a"].status_version < max(published)
    entry = JournalEntry(
        0, len(rules.journal) + 1, "a", "AccountHoldPlaced", "noop",
        datetime(2026, 3, 3, tzinfo=UTC), {"reason": ""}, (),
    )  # fmt: skip
    [change] = [e for e in lenient.apply(states["a"], entry, clock) if isinstance(e, StatusChanged)]
    assert change.status_version > max(published)
    assert output_event(change)[1]["event_id"] not in {
        output_event(c)[1]["event_id"] for c in rules.changes("a")
    }


def test_8d_expired_credit_counts_for_nothing_before_the_tick_that_expires_it():
    rules = Rules()
    expires = datetime(2026, 3, 10, tzinfo=UTC)
    rules.open("a", at=datetime(2026, 3, 2, tzinfo=UTC))
    rules.grant("a", 5, "promo", expires_at=expires, at=datetime(2026, 3, 3, tzinfo=UTC))
    rules.use("a", 1, at=datetime(2026, 3, 4, tzinfo=UTC))  # from the promo (expires first)
    rules.use("a", "1.5", at=expires + timedelta(hours=1))  # sign-up $1, $0.50 owed
    assert rules.state("a").credit_balance == 4  # not expired in the journal yet
    assert rules.state("a").reasons == (CREDITS_EXHAUSTED,)
    rules.tick(expires + timedelta(hours=2))
    assert rules.state("a").credit_balance == 0
    assert [c.reasons for c in rules.changes("a")] == [(CREDITS_EXHAUSTED,)]
    rules.check()


# --- 9. prices and policy are journaled; held usage is re-rated -------------------------------

MAR = datetime(2026, 3, 2, tzinfo=UTC)


def test_9a_usage_of_an_unpriced_model_is_held_then_rerated_when_its_price_is_published():
    rules = Rules()
    rules.publish_configured()
    rules.open("a", card=True, at=MAR)
    rules.use("a", 3, at=MAR + timedelta(days=1), model=UNPRICED)  # 375,000 output tokens
    held = rules.journal[-1]
    assert (held.event_type, held.status, held.postings) == ("UsageRecorded", "unpriced", ())
    assert rules.state("a").month_to_date_spend == 0
    rules.publish(
        price_version_with(UNPRICED, "8", "2026-03-acme", datetime(2026, 3, 1, tzinfo=UTC))
    )
    [rerated] = [e for e in rules.journal if e.event_type == "UsageRerated"]
    assert rerated.payload["usage_event_id"] == held.payload["event_id"]
    assert rerated.occurred_at == held.occurred_at  # it counts in the usage's month
    assert dict(rerated.postings) == {
        "customer:a:credit:signup": Decimal(1),
        "customer:a:receivable": Decimal(2),
        "revenue:usage": Decimal(-3),
    }
    assert rules.state("a").month_to_date_spend == 3
    # Another publication does not charge it again.
    rules.publish(
        price_version_with(UNPRICED, "9", "2026-03-acme-2", datetime(2026, 3, 1, tzinfo=UTC))
    )
    assert len([e for e in rules.journal if e.event_type == "UsageRerated"]) == 1
    rules.check()


def test_9b_held_usage_of_a_closed_month_is_billed_as_an_adjustment_once_priced():
    rules = Rules()
    rules.publish_configured()
    rules.open("a", card=True, at=datetime(2026, 2, 1, tzinfo=UTC))
    rules.use("a", 5, at=datetime(2026, 2, 10, tzinfo=UTC), model=UNPRICED)
    rules.close("2026-02")
    assert rules.invoices("a") == []  # held usage is not billed
    rules.publish(
        price_version_with(UNPRICED, "8", "2026-02-acme", datetime(2026, 2, 1, tzinfo=UTC))
    )
    rules.close("2026-03")
    [invoice] = rules.invoices("a")
    assert invoice["invoice_id"] == "INV-2026-03-a"
    assert kinds(invoice) == [("adjustment", "2026-02", Decimal(4))]  # $5 less the $1 credit
    rules.check()


def test_9c_a_price_effective_after_the_usage_does_not_price_it():
    rules = Rules()
    rules.publish_configured()
    rules.open("a", card=True, at=MAR)
    rules.use("a", 2, at=MAR + timedelta(days=1), model=UNPRICED)
    rules.publish(
        price_version_with(UNPRICED, "8", "2026-04-acme", datetime(2026, 4, 1, tzinfo=UTC))
    )
    assert [e for e in rules.journal if e.event_type == "UsageRerated"] == []
    assert rules.state("a").month_to_date_spend == 0
    rules.check()


def test_9d_a_journaled_policy_applies_from_its_entry_on_whatever_the_files_say():
    """The policy comes from the journal: accounts opened after a published policy get its
    sign-up credit, earlier ones keep theirs, and a fold from scratch under a different
    configured policy (an edited file) reproduces the live state exactly."""
    rules = Rules()
    rules.publish_configured()
    rules.open("early", at=MAR)
    generous = json.loads(policy_version().document)
    generous["signup"]["credit"] = "5.00"
    generous["tiers"][0]["monthly_limit"] = "20"
    rules.publish(ConfigVersion.of(POLICY, "2026-03-generous", MAR, generous))
    rules.open("late", card=True)
    assert rules.book("early").credit_balance() == 1
    assert rules.book("late").credit_balance() == 5
    assert rules.journal[-2].payload["event_id"]  # AccountOpened under the new policy
    rules.use("late", 25)  # the published tier-1 limit is $20
    assert rules.state("late").reasons == (SPEND_LIMIT_REACHED,)
    edited = dataclasses.replace(Policy.load(), signup_credit=Decimal("100"))
    states: dict = {}
    fold_entries(AccountStatusProjection(edited), states, rules.journal, None)
    assert {a: s.to_json() for a, s in states.items()} == {
        a: s.to_json() for a, s in rules.states.items()
    }
    rules.check()
