"""One simulated account's month: what it does (requests, cards, payments, purchases, limits,
promotions, deployments, fine-tuning) and how it reacts when the ledger would block it."""

from __future__ import annotations

import heapq
import math
import random
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

from ledger.demo.account_state import AccountState
from ledger.demo.expected import ZERO, Expected
from ledger.demo.month import MONTH_END, MONTH_START, tick_after
from ledger.demo.traffic_mix import (
    CHAT_MODELS,
    CONFIGURED_LIMIT_SHARE,
    FINE_TUNE_MODELS,
    FW,
    GLITCH_SHARE,
    GPU_TYPES,
    HEAVY,
    IMAGE_MODELS,
    MAX_INPUT_TOKENS,
    MAX_OUTPUT_TOKENS,
    NICE_AMOUNTS,
    PROMO_BEFORE,
    PROMO_DAYS,
    PROMO_SHARE,
    REVOKE_SHARE,
    SCALEUP_MODELS,
    SERVICE_TIERS,
    SUPPORT_GOODWILL_SHARE,
    UNPRICED_MODEL,
    UNPRICED_SHARE,
    lognormal_int,
    pick,
)
from ledger.policy import Policy
from ledger.rating import PriceBook

CENT = Decimal("0.01")


class SimulatedAccount(AccountState):
    """One account's month: a queue of timed actions, and what the account (and the serving
    fleet, which stops serving a suspended account) would do next. Its grants, what it owes,
    has paid and spent (`AccountState`) tell it when the ledger will suspend it."""

    def __init__(
        self,
        account_id: str,
        persona: str,
        held: bool,
        rng: random.Random,
        pricebook: PriceBook,
        policy: Policy,
    ):
        super().__init__(account_id, persona, held, rng, pricebook, policy)
        # Taste: favourite model, prompt sizes (RAG and agents send long contexts).
        heavy = persona in ("free_heavy", "upgrade", "prepaid")
        if persona == "scaleup":
            self.favourite = pick(rng, SCALEUP_MODELS)
            self.context = rng.lognormvariate(math.log(80.0), 0.3)
        else:
            self.favourite = pick(rng, CHAT_MODELS[1:] if heavy else CHAT_MODELS)
            self.context = rng.lognormvariate(math.log(20.0 if heavy else 1.0), 0.5)
        self.cache_rate = rng.choice((0.0, 0.2, 0.5))

    def changed(self, when: datetime, was_blocked: bool, was_limited: bool) -> None:
        """After money moved: the account may now be blocked, and react to it."""
        self.update(when)
        if not was_blocked and self.credit <= 0 and not self.methods:
            self.exhausted(when)
        if not was_limited and self.limited:
            self.limit_reached(when)

    # --- the month --------------------------------------------------------------------------

    def run(self, timeline: list, expected: Expected) -> None:
        self.expected = expected
        rng = self.rng
        t0 = MONTH_START + timedelta(seconds=rng.uniform(0, 26 * 86400))
        self.emit("AccountOpened", t0, created_at=t0)
        self.add_grant(self.policy.signup_grant_id, "promotional", self.policy.signup_credit)
        expected.promotional += self.policy.signup_credit
        end = MONTH_END - timedelta(minutes=1)
        n = {
            "trial": (12, 1.0, 200),
            "free_heavy": (150, 0.5, 600),
            "upgrade": (100, 0.5, 400),
            "prepaid": (80, 0.5, 400),
            "payg": (40, 1.0, 1000),
            "gpu": (20, 0.8, 200),
            "fine_tune": (30, 0.8, 300),
            "image": (40, 1.0, 600),
            "scaleup": (400, 0.4, 1200),
        }[self.persona]
        count = lognormal_int(rng, n[0], n[1], 1, n[2])
        span = (end - t0).total_seconds()
        for _ in range(count):
            self.at(t0 + timedelta(seconds=rng.uniform(60, span)), "request")
        p = self.persona
        if p in ("payg", *HEAVY) or (p == "image" and rng.random() < 0.5):
            self.at(t0 + timedelta(minutes=rng.uniform(2, 90)), "add_method")
            if rng.random() < 0.25:
                self.at(t0 + timedelta(seconds=rng.uniform(86400, max(86401, span))), "fail")
        if p in HEAVY and rng.random() < CONFIGURED_LIMIT_SHARE:
            limit = Decimal(rng.choice(("10", "20", "25", "30")))
            self.at(t0 + timedelta(minutes=rng.uniform(5, 120)), "configure", limit)
        if p == "payg" and rng.random() < SUPPORT_GOODWILL_SHARE:
            self.at(t0 + timedelta(seconds=rng.uniform(3600, max(3601, span))), "goodwill")
        if t0 < PROMO_BEFORE and rng.random() < PROMO_SHARE:
            self.at(t0 + timedelta(seconds=rng.uniform(1, 30)), "promo")
        if p == "gpu":
            for _ in range(rng.randint(1, 3)):
                self.at(t0 + timedelta(seconds=rng.uniform(3600, span)), "deploy")
        if p == "fine_tune":
            for _ in range(rng.randint(1, 4)):
                self.at(t0 + timedelta(seconds=rng.uniform(600, span)), "train")
        if self.held:
            self.at(t0 + timedelta(seconds=rng.uniform(600, span)), "hold")
        while self.queue:
            when, _, action, args = heapq.heappop(self.queue)
            getattr(self, f"_{action}")(when, *args)
        if self.limit_hits:
            expected.limit_reached += 1
        if self.limited:
            expected.limit_certain += 1
        timeline.extend(self.out)

    # --- actions ----------------------------------------------------------------------------

    def _request(self, when: datetime) -> None:
        if not self.served(when):
            return
        rng = self.rng
        if self.persona == "image" and rng.random() < 0.8:
            model, _, meter, per_image = pick(rng, IMAGE_MODELS)
            images = rng.choice((1, 1, 1, 2, 4))
            self.usage(when, "image", model, **{meter: images * per_image})
            return
        if self.persona == "scaleup" or rng.random() < 0.75:
            model, _, out_factor = self.favourite
        else:
            model, _, out_factor = pick(rng, CHAT_MODELS)
        if rng.random() < UNPRICED_SHARE:
            model = UNPRICED_MODEL
        prompt = lognormal_int(rng, 800 * self.context, 1.1, 1, MAX_INPUT_TOKENS)
        cached = int(prompt * rng.uniform(0.3, 0.9)) if rng.random() < self.cache_rate else 0
        output = lognormal_int(rng, 250 * out_factor, 0.9, 1, MAX_OUTPUT_TOKENS)
        if rng.random() < GLITCH_SHARE:
            output = 10**12  # a broken meter; rejected as absurd_quantity
        self.usage(
            when,
            "serverless",
            model,
            input_tokens=prompt - cached,
            cached_input_tokens=cached,
            output_tokens=output,
        )

    def usage(self, when: datetime, product: str, model: str, **meters: Any) -> None:
        tier = pick(self.rng, SERVICE_TIERS)[0] if product == "serverless" else "standard"
        event = self.emit(
            "UsageRecorded",
            when,
            request_id=f"req_{self.rng.getrandbits(64):016x}",
            product=product,
            model=model,
            service_tier=tier,
            **meters,
        )
        if any(
            isinstance(v, int) and v > self.policy.max_tokens_per_event for v in meters.values()
        ):
            self.expected.rejected += 1
            return
        rating = self.pricebook.rate(event)
        if not rating.priced:
            self.expected.unpriced += 1
            return
        charge = rating.total
        self.expected.revenue += charge
        was_blocked, was_limited = self.blocked_since is not None, self.limited
        self.spend += charge
        self.burn(charge, when)
        self.changed(when, was_blocked, was_limited)

    def exhausted(self, when: datetime) -> None:
        """The account just used up its credit without a card on file."""
        self.exhaustions += 1
        rng = self.rng
        if self.persona == "upgrade":
            self.at(self.later(when, 4.0, 1.5), "add_method")
        elif self.persona == "prepaid" and (self.exhaustions == 1 or rng.random() < 0.5):
            self.at(self.later(when, 6.0, 1.5), "purchase")
        elif self.persona == "free_heavy" and self.exhaustions == 1 and rng.random() < 0.08:
            self.at(self.later(when, 48.0, 0.7), "goodwill")

    def limit_reached(self, when: datetime) -> None:
        """Month-to-date spend just reached the effective limit: SPEND_LIMIT_REACHED. An
        account held back by its own limit may raise it; one held back by its tier may buy
        credits to reach the next tier; the others wait for the month to turn."""
        self.limit_hits += 1
        tier_limit = self.policy.tier_for(self.paid).monthly_limit
        if self.configured is not None and self.configured < tier_limit:
            if self.rng.random() < 0.6:
                self.at(self.later(when, 2.0, 1.0), "raise_limit")
        elif self.persona in HEAVY and self.limit_hits <= 3 and self.rng.random() < 0.65:
            self.at(self.later(when, 3.0, 1.0), "raise_tier")

    def _add_method(self, when: datetime) -> None:
        method = f"pm_{self.rng.getrandbits(48):012x}"
        self.emit("PaymentMethodAdded", when, payment_method_id=method, kind="card")
        self.methods.append(method)
        self.failed = False
        self.update(when)
        if self.persona == "upgrade" and self.rng.random() < 0.05:
            self.at(self.later(when, 120.0, 0.5), "remove_method")

    def _remove_method(self, when: datetime) -> None:
        if self.methods:
            method = self.methods.pop()
            self.emit("PaymentMethodRemoved", when, payment_method_id=method)
            self.update(when)

    def _fail(self, when: datetime) -> None:
        if not self.methods:
            return
        rng = self.rng
        owed = self.receivable.quantize(CENT, rounding=ROUND_CEILING)
        self.emit(
            "PaymentFailed",
            when,
            payment_method_id=self.methods[-1],
            amount=owed if owed > 0 else None,
            failure_code=rng.choice(("card_declined", "insufficient_funds", "expired_card")),
        )
        self.failed = True
        self.update(when)
        fix = rng.random()
        if fix < 0.5:
            self.at(self.later(when, 8.0, 1.2), "add_method")
        elif fix < 0.85:
            self.at(self.later(when, 24.0, 1.0), "pay_invoice")
        # else: never fixed this month

    def _pay_invoice(self, when: datetime) -> None:
        self.invoices += 1
        owed = self.receivable.quantize(CENT, rounding=ROUND_CEILING)
        amount = owed if owed > 0 else Decimal("5.00")
        invoice_id = f"inv-{self.id}-{self.invoices}"
        self.emit(
            "InvoicePaid",
            when,
            invoice_id=invoice_id,
            amount=amount,
            payment_reference=f"ch_{self.rng.getrandbits(64):016x}",
        )
        self.pay(amount, f"overpayment:{invoice_id}")
        self.update(when)

    def buy(self, when: datetime, amount: Decimal) -> None:
        self.purchases += 1
        grant_id = f"purchase-{self.purchases}"
        self.emit(
            "CreditPurchased",
            when,
            grant_id=grant_id,
            amount=amount,
            payment_reference=f"ch_{self.rng.getrandbits(64):016x}",
        )
        self.pay(amount, grant_id)
        self.update(when)

    def _purchase(self, when: datetime) -> None:
        self.buy(when, Decimal(self.rng.choice(("10", "25", "25", "50", "100"))))
        # More traffic now that they have paid.
        for _ in range(lognormal_int(self.rng, 80, 0.6, 5, 400)):
            self.at(when + timedelta(seconds=self.rng.uniform(60, 5 * 86400)), "request")

    def _raise_tier(self, when: datetime) -> None:
        """Buy enough credits for the payments to reach the next tier (a higher limit)."""
        above = [t for t in self.policy.tiers if t.paid_at_least > self.paid]
        if not above:
            return
        need = above[0].paid_at_least - self.paid
        amounts = [a for a in NICE_AMOUNTS if a >= need] or [need]
        self.buy(when, amounts[0] if self.rng.random() < 0.7 else amounts[min(1, len(amounts) - 1)])
        if self.persona == "gpu" and self.rng.random() < 0.8:
            self.at(self.later(when, 1.0, 0.5), "deploy")

    def _configure(self, when: datetime, limit: Decimal | None) -> None:
        self.emit("SpendLimitConfigured", when, monthly_limit=limit)
        was_limited = self.limited
        self.configured = limit
        self.update(when)
        if not was_limited and self.limited:
            self.limit_reached(when)

    def _raise_limit(self, when: datetime) -> None:
        if self.configured is not None:
            raised = None if self.rng.random() < 0.5 else self.configured * self.rng.choice((3, 5))
            self._configure(when, raised)

    def _goodwill(self, when: datetime) -> None:
        amount = Decimal("5") if self.persona == "free_heavy" else Decimal("10")
        grant_id = "goodwill-1"
        if grant_id in self.grants:
            return
        self.emit(
            "CreditGranted",
            when,
            grant_id=grant_id,
            amount=amount,
            kind="goodwill",
            expires_at=None,
            reason=(
                "support ticket: first project"
                if self.persona == "free_heavy"
                else "support ticket: latency incident"
            ),
        )
        self.expected.promotional += amount
        self.add_grant(grant_id, "goodwill", amount)
        self.update(when)
        if self.persona == "free_heavy":
            for _ in range(lognormal_int(self.rng, 60, 0.6, 5, 300)):
                self.at(when + timedelta(seconds=self.rng.uniform(60, 5 * 86400)), "request")
        if self.rng.random() < REVOKE_SHARE:
            self.at(self.later(when, 36.0, 0.5), "revoke", grant_id)

    def _revoke(self, when: datetime, grant_id: str) -> None:
        """A grant revoked: what is left of it is removed, what was spent becomes owed."""
        grant = self.grants.pop(grant_id)
        self.emit("CreditRevoked", when, grant_id=grant_id, reason="granted in error")
        self.expected.promotional -= grant.granted
        self.expected.revoked += 1
        was_blocked, was_limited = self.blocked_since is not None, self.limited
        self.receivable += grant.granted - grant.remaining
        self.changed(when, was_blocked, was_limited)

    def _promo(self, when: datetime) -> None:
        """A launch promotion that expires within March: what is left of it is breakage."""
        amount = Decimal(self.rng.choice(("5", "10")))
        expires = (when + timedelta(days=PROMO_DAYS)).replace(second=0, microsecond=0)
        grant_id = "launch-promo"
        self.emit(
            "CreditGranted",
            when,
            grant_id=grant_id,
            amount=amount,
            kind="promotional",
            expires_at=expires,
            reason=f"March launch promotion, valid {PROMO_DAYS} days",
        )
        self.expected.promotional += amount
        self.expected.expiring += amount
        self.expected.expiring_grants += 1
        self.add_grant(grant_id, "promotional", amount, expires)
        self.update(when)
        self.at(tick_after(expires), "expire", grant_id)

    def _expire(self, when: datetime, grant_id: str) -> None:
        """The first tick at or after the grant's expires_at: the rest leaves the balance."""
        grant = self.grants[grant_id]
        was_blocked, was_limited = self.blocked_since is not None, self.limited
        self.expected.breakage += grant.remaining
        grant.remaining = ZERO
        self.changed(when, was_blocked, was_limited)

    def _hold(self, when: datetime) -> None:
        self.emit("AccountHoldPlaced", when, reason="risk review")
        self.hold = True
        self.update(when)
        if self.rng.random() < 0.85:
            self.at(self.later(when, 6.0, 1.0), "release")

    def _release(self, when: datetime) -> None:
        self.emit("AccountHoldReleased", when, reason="review cleared")
        self.hold = False
        self.update(when)

    def _deploy(self, when: datetime) -> None:
        """An on-demand deployment, metered hourly in GPU-seconds until it is torn down (or
        the account is suspended: the fleet stops it)."""
        rng = self.rng
        gpu = pick(rng, GPU_TYPES)[0]
        gpus = rng.choice((1, 1, 2, 4, 8))
        hours = lognormal_int(rng, 8, 0.9, 1, 96)
        self.at(when + timedelta(hours=1), "gpu_hour", gpu, gpus, 0, hours)

    def _gpu_hour(self, when: datetime, gpu: str, gpus: int, hour: int, hours: int) -> None:
        if not self.served(when):
            return
        seconds = 3600 if hour < hours - 1 else self.rng.randint(60, 3600)
        self.usage(
            when,
            "on_demand",
            f"{FW}deployment-{self.id}",
            gpu_type=gpu,
            gpu_seconds=Decimal(seconds * gpus),
        )
        if hour + 1 < hours:
            self.at(when + timedelta(hours=1), "gpu_hour", gpu, gpus, hour + 1, hours)

    def _train(self, when: datetime) -> None:
        if not self.served(when):
            return
        model = pick(self.rng, FINE_TUNE_MODELS)[0]
        tokens = lognormal_int(self.rng, 4_000_000, 1.0, 100_000, 60_000_000)
        self.usage(when, "fine_tuning", model, training_tokens=tokens)
