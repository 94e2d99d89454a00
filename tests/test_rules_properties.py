"""Property tests: random interleavings of every event type, ticks (some going backwards),
redeliveries, late and out-of-order events across topics, batches and chargebacks, driven
through the rule harness; after every step `Rules.check()` asserts the ledger's invariants:

- the trial balance is zero and every entry balances;
- from the journal's accounts: every account's invoiced receivable (customer:A:invoiced) = its
  issued invoices less what was paid on them, its receivable (customer:A:receivable) = what is
  not invoiced yet (charges waiting − payments waiting, no carry), the projection's receivable =
  the two; revenue:rounding = Σ (exact − due) of the issued invoices; the writer's book equals
  the book folded from the journal as recorded;
- no invoice id is issued twice, no output event id is published twice;
- status_version strictly increases per account; warnings and invoices carry the version of
  the status they follow;
- the projection (an independent reading of the postings) equals the ledger writer's books;
- a fold of the journal from scratch (a rebuild, a replay) equals the live state and effects.

`make test` runs a bounded number of examples; `make fuzz-rules` runs many more
(HYPOTHESIS_PROFILE=fuzz). Counterexamples Hypothesis shrank became named tests in
test_rules_regressions.py.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ledger.config_versions import POLICY, ConfigVersion, policy_version
from tests.rules import UNPRICED, Rules, price_version_with

settings.register_profile(
    "default",
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    max_examples=2000,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ACCOUNTS = st.sampled_from(["a", "b"])
GRANTS = st.sampled_from(["g1", "g2", "g3"])
PURCHASES = st.sampled_from(["ch1", "ch2", "ch3"])
CENTS = st.integers(min_value=1, max_value=8000).map(lambda c: Decimal(c) / 100)
# Usage in dollars with sub-cent parts, so invoices round both ways.
DOLLARS = st.integers(min_value=1, max_value=40_000).map(lambda m: Decimal(m) / 1000)
# Minutes an event is dated before the machine's clock (negative: dated in the future).
LATENESS = st.sampled_from([0, 0, 0, 1, 30, 24 * 60, 5 * 24 * 60, 40 * 24 * 60, -60, -35 * 24 * 60])


class Billing(RuleBasedStateMachine):
    """One shard, two accounts, a clock that the scheduler's ticks move."""

    @initialize()
    def start(self):
        self.rules = Rules()
        self.rules.publish_configured()
        self.t = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
        self.sent: list[tuple[str, dict]] = []
        self.held: list[tuple[str, dict]] = []  # events delayed on their way (other topics)

    def at(self, late_minutes: int = 0) -> datetime:
        self.t += timedelta(seconds=7)
        return self.t - timedelta(minutes=late_minutes)

    def emit(self, event_type: str, account_id: str, late: int = 0, **fields) -> None:
        event = self.rules.event(event_type, account_id, self.at(late), **fields)
        self.sent.append(event)
        self.rules.deliver(event)

    # --- accounts and payment methods ------------------------------------------------------

    @rule(account=ACCOUNTS, late=LATENESS)
    def open(self, account, late):
        self.emit("AccountOpened", account, late, created_at=self.t)

    @rule(account=ACCOUNTS, pm=st.sampled_from(["pm1", "pm2"]), late=LATENESS)
    def add_card(self, account, pm, late):
        self.emit("PaymentMethodAdded", account, late, payment_method_id=pm)

    @rule(account=ACCOUNTS, pm=st.sampled_from(["pm1", "pm2"]))
    def remove_card(self, account, pm):
        self.emit("PaymentMethodRemoved", account, payment_method_id=pm)

    @rule(account=ACCOUNTS, late=LATENESS)
    def payment_failed(self, account, late):
        self.emit("PaymentFailed", account, late)

    @rule(account=ACCOUNTS, hold=st.booleans())
    def hold(self, account, hold):
        self.emit("AccountHoldPlaced" if hold else "AccountHoldReleased", account)

    @rule(account=ACCOUNTS, limit=st.one_of(st.none(), st.sampled_from([5, 20, 50, 1000])))
    def configure_limit(self, account, limit):
        value = None if limit is None else Decimal(limit)
        self.emit("SpendLimitConfigured", account, monthly_limit=value)

    @rule(account=ACCOUNTS, limit=st.one_of(st.none(), st.sampled_from([10, 100000])))
    def override_limit(self, account, limit):
        value = None if limit is None else Decimal(limit)
        self.emit("SpendLimitOverridden", account, monthly_limit=value)

    # --- usage -----------------------------------------------------------------------------

    @rule(account=ACCOUNTS, dollars=DOLLARS, late=LATENESS, unpriced=st.booleans())
    def use(self, account, dollars, late, unpriced):
        self.emit(
            "UsageRecorded",
            account,
            late,
            request_id=f"r{len(self.sent)}",
            product="serverless",
            model=UNPRICED if unpriced and dollars < 1 else "accounts/fireworks/models/deepseek-r1",
            service_tier="standard",
            output_tokens=int(dollars * 125_000),
        )

    # --- credits and payments ----------------------------------------------------------------

    @rule(account=ACCOUNTS, gid=PURCHASES, amount=CENTS, late=LATENESS)
    def buy(self, account, gid, amount, late):
        self.emit("CreditPurchased", account, late, grant_id=gid, amount=amount)

    @rule(
        account=ACCOUNTS,
        gid=GRANTS,
        amount=CENTS,
        days=st.one_of(st.none(), st.integers(min_value=0, max_value=40)),
    )
    def grant(self, account, gid, amount, days):
        expires = None if days is None else self.t + timedelta(days=days, hours=3)
        kind = "goodwill" if days is None else "promotional"
        self.emit(
            "CreditGranted", account, grant_id=gid, amount=amount, expires_at=expires, kind=kind
        )

    @rule(account=ACCOUNTS, gid=st.one_of(GRANTS, PURCHASES, st.just("signup")))
    def revoke(self, account, gid):
        self.emit("CreditRevoked", account, grant_id=gid)

    @rule(account=ACCOUNTS, amount=st.one_of(st.none(), CENTS))
    def pay(self, account, amount):
        """Pay the account's last invoice in full (None), or some amount."""
        invoices = self.rules.invoices(account)
        if amount is None:
            if not invoices:
                return
            amount = Decimal(invoices[-1]["amount_due"])
        invoice_id = invoices[-1]["invoice_id"] if invoices else "none"
        self.emit("InvoicePaid", account, invoice_id=invoice_id, amount=amount)

    # --- time ------------------------------------------------------------------------------

    @rule(hours=st.sampled_from([1, 20, 24 * 3, 24 * 12, 24 * 31]))
    def tick(self, hours):
        self.t += timedelta(hours=hours)
        self.emit("PeriodTick", "", tick_at=self.t)

    @rule(hours=st.sampled_from([1, 24 * 10, 24 * 40]))
    def tick_backwards(self, hours):
        at = self.t - timedelta(hours=hours)
        self.sent.append(self.rules.event("PeriodTick", "", at, tick_at=at))
        self.rules.deliver(self.sent[-1])

    # --- delivery --------------------------------------------------------------------------

    @precondition(lambda self: self.sent)
    @rule(index=st.integers(min_value=0))
    def redeliver(self, index):
        """Kafka delivers at least once: an event again, same id and body."""
        self.rules.deliver(self.sent[index % len(self.sent)])

    @precondition(lambda self: self.sent)
    @rule(index=st.integers(min_value=0))
    def conflicting_duplicate(self, index):
        """The same event_id with another body is quarantined, never applied."""
        event_type, event = self.sent[index % len(self.sent)]
        if event_type == "PeriodTick":
            return
        changed = {**event, "occurred_at": event["occurred_at"] + timedelta(seconds=1)}
        rejects = len(self.rules.rejects)
        self.rules.deliver((event_type, changed))
        assert self.rules.rejects[rejects:] == [
            (event_type, event["event_id"], "duplicate_conflict")
        ]

    @rule(account=ACCOUNTS, dollars=DOLLARS, amount=CENTS, gid=PURCHASES)
    def batch_across_topics(self, account, dollars, amount, gid):
        """Events of several topics in one batch, in an order that is not their time order:
        the journal writer applies a batch in occurred_at order."""
        first = self.rules.event("PaymentFailed", account, self.at())
        second = self.rules.event(
            "UsageRecorded",
            account,
            self.at(),
            request_id=f"r{len(self.sent)}",
            product="serverless",
            model="accounts/fireworks/models/deepseek-r1",
            service_tier="standard",
            output_tokens=int(dollars * 125_000),
        )
        third = self.rules.event("CreditPurchased", account, self.at(), grant_id=gid, amount=amount)
        self.sent += [first, second, third]
        self.rules.deliver(third, first, second)

    # --- configuration -----------------------------------------------------------------------

    @rule(price=st.sampled_from(["0.5", "8"]), days=st.sampled_from([-40, -1, 30]))
    def publish_price(self, price, days):
        """A price for the held model, effective before or after the usage it may re-rate."""
        name = f"v{len(self.rules.journal)}"
        version = price_version_with(UNPRICED, price, name, self.t + timedelta(days=days))
        self.rules.publish(version, at=self.at())

    @rule(limit=st.sampled_from(["5", "50", "500"]), credit=st.sampled_from(["0", "1.00", "3"]))
    def publish_policy(self, limit, credit):
        """A new policy: tier-1 limit and sign-up credit change from its entry on."""
        content = json.loads(policy_version().document)
        content["tiers"][0]["monthly_limit"] = limit
        content["signup"]["credit"] = credit
        name = f"p{len(self.rules.journal)}"
        self.rules.publish(ConfigVersion.of(POLICY, name, self.t, content), at=self.at())

    # --- the invariants --------------------------------------------------------------------

    @invariant()
    def invariants_hold(self):
        if hasattr(self, "rules"):
            self.rules.check()


TestBilling = Billing.TestCase
