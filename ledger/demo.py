"""`ledger demo`: the whole ledger on a fresh machine, with a simulated month of traffic.

    1. the local stack (or LEDGER_KAFKA_BOOTSTRAP / LEDGER_DATABASE_URL), a fresh topic prefix
       `demo-<run>.`, a fresh database `demo_<run>` (migrated) and consumer group per run;
    2. `ledger worker --role ledger --role projections --role relay` as a real subprocess (logs
       in `<home>/demo-worker.log`). No scheduler role: the wall clock has no say here, the
       demo is the clock;
    3. a downstream reader of the status topic that prints every output event it receives;
    4. `simulate()`: ~`accounts` accounts over March 2026 (event clock), produced to Kafka in
       occurred_at order, with a PeriodTick on every partition at each simulated midnight of
       March, one just after the month turns (limit suspensions lifted) and one once the grace
       period after March is over (March closed: invoices issued). Before each tick the demo
       waits until everything sent before it is journaled, so the ticks land in the journal
       where they belong in time (grants expire after the usage that came before them);
    5. progress until the journal, the projection, the outbox and the reader have caught up;
    6. SIGTERM to the worker (it must exit 0), then `summarise()`: a reconciliation of the
       journal against what the simulator sent, invoices against receivables, and the trial
       balance (must be zero).

Exit code 0 on success, 1 if anything failed or does not reconcile, 130 on Ctrl-C. This module
prints to stdout (it is a CLI program), like `ledger/cli.py`.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import structlog
from psycopg import sql
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ledger import db, topics
from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.errors import LedgerError
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.reports import trial_balance
from ledger.settings import Settings

log = structlog.get_logger(__name__)

ZERO = Decimal(0)
CENT = Decimal("0.01")
MONTH_START = datetime(2026, 3, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 4, 1, tzinfo=UTC)
MONTH = MONTH_START.strftime("%Y-%m")
MONTH_TURN_TICK = MONTH_END + timedelta(minutes=1)  # limit suspensions of March are lifted
CLOSE_AFTER_GRACE = timedelta(minutes=5)  # the close tick: end of March + grace + 5 min
IN_FLIGHT = timedelta(seconds=20)  # requests already admitted when a suspension lands
WORKER_ROLES = ("ledger", "projections", "relay")  # no scheduler: the demo sends the ticks

FW = "accounts/fireworks/models/"
# (model, weight, output-length factor)
CHAT_MODELS = (
    (FW + "llama-v3p1-8b-instruct", 25, 1.0),
    (FW + "llama-v3p3-70b-instruct", 25, 1.0),
    (FW + "deepseek-v3", 14, 1.0),
    (FW + "qwen3-235b-a22b", 12, 1.5),
    (FW + "gpt-oss-120b", 12, 1.5),
    (FW + "deepseek-r1", 8, 4.0),
    (FW + "llama-v3p1-405b-instruct", 4, 1.0),
)
# Agents on large models with long contexts: about a dollar every four requests.
SCALEUP_MODELS = (
    (FW + "llama-v3p1-405b-instruct", 50, 1.0),
    (FW + "deepseek-r1", 50, 2.0),
)
# In the price book only from 2026-07: early adopters' March usage is journaled as unpriced.
UNPRICED_MODEL = FW + "kimi-k2-instruct"
UNPRICED_SHARE = 0.005
GLITCH_SHARE = 0.0004  # a meter reporting nonsense (10^12 tokens): the ledger rejects it
SERVICE_TIERS = (("standard", 80), ("batch", 15), ("priority", 5))
GPU_TYPES = (("A100-80GB", 30), ("H100-80GB", 45), ("H200-141GB", 15), ("B200-180GB", 10))
# (model, weight, meter, per-image quantity)
IMAGE_MODELS = (
    (FW + "flux-1-dev-fp8", 35, "steps", 28),
    (FW + "flux-1-schnell-fp8", 35, "steps", 4),
    (FW + "stable-diffusion-xl-1024-v1-0", 20, "steps", 30),
    (FW + "playground-v2-5-1024px-aesthetic", 10, "images", 1),
)
FINE_TUNE_MODELS = ((FW + "llama-v3p1-8b-instruct", 70), (FW + "llama-v3p3-70b-instruct", 30))
MAX_INPUT_TOKENS = 131_072
MAX_OUTPUT_TOKENS = 32_768

# Who the accounts are (shares of all accounts; counts are apportioned exactly, so even a
# small run has each kind).
PERSONAS = (
    ("trial", 0.26),  # tries a few requests, never adds a card, rarely uses up the $1
    ("free_heavy", 0.21),  # no card, uses up the $1 and is suspended; a few get goodwill
    ("upgrade", 0.13),  # no card, suspended when the $1 is gone, then adds a card
    ("prepaid", 0.06),  # no card, suspended, buys credits (and maybe again)
    ("payg", 0.20),  # adds a card early; some payments fail and get fixed
    ("gpu", 0.04),  # on-demand deployments billed hourly in GPU-seconds
    ("fine_tune", 0.03),  # fine-tuning jobs plus serverless use of the tuned model
    ("image", 0.04),  # image generation; half of them add a card
    ("scaleup", 0.03),  # a card and agents on large models: past the tier-1 spend limit
)
# Accounts that can run into their monthly spend limit, and react to it.
HEAVY = ("gpu", "fine_tune", "scaleup")
HOLD_SHARE = 0.02
PROMO_SHARE = 0.10  # accounts opened before PROMO_BEFORE get a launch promotion that expires
PROMO_BEFORE = MONTH_START + timedelta(days=19)
PROMO_DAYS = 7
CONFIGURED_LIMIT_SHARE = 0.25  # of HEAVY accounts: set their own (lower) monthly limit
SUPPORT_GOODWILL_SHARE = 0.05  # of payg accounts: a goodwill credit after an incident
REVOKE_SHARE = 0.3  # of goodwill grants: revoked a day or two later (granted in error)
NICE_AMOUNTS = tuple(Decimal(a) for a in ("50", "100", "250", "500", "1000", "5000", "10000"))


def tick_times(policy: Policy | None = None) -> list[datetime]:
    """The simulated clock's PeriodTicks: every midnight of March, one just after April
    begins (the month turns), one after March's grace period (March closes)."""
    policy = policy or Policy.load()
    days = (MONTH_END - MONTH_START).days
    close = MONTH_END + timedelta(hours=policy.grace_hours) + CLOSE_AFTER_GRACE
    return [MONTH_START + timedelta(days=d) for d in range(days)] + [MONTH_TURN_TICK, close]


def _tick_after(when: datetime) -> datetime:
    """The first simulated midnight tick at or after `when` (March)."""
    day = when.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if day == when else day + timedelta(days=1)


# --- the simulation (pure: no I/O) ------------------------------------------------------------


@dataclasses.dataclass
class Expected:
    """What the ledger must show for the simulated traffic, computed with the same price book
    (order-independent totals only), and what bounds the rest."""

    revenue: Decimal = ZERO  # sum of priced usage charges
    promotional: Decimal = ZERO  # sign-up credits + goodwill and promotional grants − revoked
    cash: Decimal = ZERO  # credit purchases + paid invoices
    unpriced: int = 0  # usage entries journaled as unpriced
    rejected: int = 0  # events the ledger must refuse (meter glitches)
    expiring: Decimal = ZERO  # promotional grants that expire in March: breakage ≤ this
    expiring_grants: int = 0  # GrantExpired entries ≤ this (one per grant with money left)
    revoked: int = 0  # CreditRevoked events
    # Estimates in the simulator's own (occurred_at) order; the ledger applies events in its
    # journal order, which can differ slightly across topics, so these are not checked.
    breakage: Decimal = ZERO
    limit_reached: int = 0  # accounts that reached their monthly spend limit
    # Accounts whose March spend reaches their limit as it stands at the end of March: in any
    # order, the ledger suspends these for SPEND_LIMIT_REACHED at some point in March.
    limit_certain: int = 0


@dataclasses.dataclass
class Simulation:
    events: list[tuple[str, dict[str, Any]]]  # (event type, event), in occurred_at order
    accounts: list[str]
    personas: dict[str, str]  # account id -> persona
    expected: Expected
    ticks: list[datetime] = dataclasses.field(default_factory=list)  # PeriodTick times

    def counts(self) -> Counter[str]:
        return Counter(event_type for event_type, _ in self.events)


def simulate(
    accounts: int = 1000,
    seed: int = 7,
    *,
    pricebook: PriceBook | None = None,
    policy: Policy | None = None,
) -> Simulation:
    """A month of traffic for `accounts` accounts, the same for the same seed."""
    rng = random.Random(seed)
    pricebook = pricebook or PriceBook.load()
    policy = policy or Policy.load()
    width = max(5, len(str(accounts)))
    ids = [f"acct-{i:0{width}d}" for i in range(1, accounts + 1)]
    personas = _apportion(ids, rng)
    held = set(rng.sample(ids, max(1, round(accounts * HOLD_SHARE)) if accounts >= 10 else 0))
    expected = Expected()
    timeline: list[tuple[datetime, int, str, dict]] = []
    for account_id in ids:
        _Account(account_id, personas[account_id], account_id in held, rng, pricebook, policy).run(
            timeline, expected
        )
    timeline.sort(key=lambda item: (item[0], item[1]))
    events = [(event_type, event) for _, _, event_type, event in timeline]
    return Simulation(events, ids, personas, expected, tick_times(policy))


def _apportion(ids: list[str], rng: random.Random) -> dict[str, str]:
    """Persona per account: exact shares (largest remainder), shuffled."""
    n = len(ids)
    quotas = [(name, share * n) for name, share in PERSONAS]
    counts = {name: math.floor(q) for name, q in quotas}
    by_remainder = sorted(quotas, key=lambda nq: nq[1] - math.floor(nq[1]), reverse=True)
    for name, _ in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    names = [name for name, _ in PERSONAS for _ in range(counts[name])]
    rng.shuffle(names)
    return dict(zip(ids, names, strict=True))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _pick(rng: random.Random, options: tuple) -> tuple:
    return rng.choices(options, weights=[o[1] for o in options])[0]


def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, int(rng.lognormvariate(math.log(median), sigma))))


@dataclasses.dataclass
class _Grant:
    """The simulator's own view of one credit grant (the ledger keeps its own)."""

    grant_id: str
    kind: str  # promotional | goodwill | purchased
    granted: Decimal
    remaining: Decimal
    expires_at: datetime | None
    order: int

    def usable_at(self, when: datetime) -> bool:
        return self.remaining > 0 and (self.expires_at is None or when < self.expires_at)


class _Account:
    """One account's month: a queue of timed actions, and what the account (and the serving
    fleet, which stops serving a suspended account) would do next. It keeps its grants, what
    it owes, what it has paid and spent, so it knows when the ledger will suspend it."""

    def __init__(
        self,
        account_id: str,
        persona: str,
        held: bool,
        rng: random.Random,
        pricebook: PriceBook,
        policy: Policy,
    ):
        self.id = account_id
        self.persona = persona
        self.held = held
        self.rng = rng
        self.pricebook = pricebook
        self.policy = policy
        self.grants: dict[str, _Grant] = {}
        self._grants = 0  # grants ever added: their order
        self.receivable = ZERO
        self.paid = ZERO  # credit purchases + paid invoices: the spend-limit tier
        self.spend = ZERO  # usage charged in March (all of the simulated traffic)
        self.configured: Decimal | None = None  # the account's own monthly limit
        self.methods: list[str] = []
        self.failed = False
        self.hold = False
        self.blocked_since: datetime | None = None
        self.exhaustions = 0
        self.limit_hits = 0
        self.purchases = 0
        self.invoices = 0
        self.queue: list[tuple[datetime, int, str, tuple]] = []
        self._seq = 0
        self.out: list[tuple[datetime, int, str, dict]] = []
        self.expected: Expected = Expected()
        # Taste: favourite model, prompt sizes (RAG and agents send long contexts).
        heavy = persona in ("free_heavy", "upgrade", "prepaid")
        if persona == "scaleup":
            self.favourite = _pick(rng, SCALEUP_MODELS)
            self.context = rng.lognormvariate(math.log(80.0), 0.3)
        else:
            self.favourite = _pick(rng, CHAT_MODELS[1:] if heavy else CHAT_MODELS)
            self.context = rng.lognormvariate(math.log(20.0 if heavy else 1.0), 0.5)
        self.cache_rate = rng.choice((0.0, 0.2, 0.5))

    # --- plumbing ---------------------------------------------------------------------------

    def at(self, when: datetime, action: str, *args: Any) -> None:
        if when < MONTH_END:
            self._seq += 1
            heapq.heappush(self.queue, (when, self._seq, action, args))

    def emit(self, event_type: str, when: datetime, **fields: Any) -> dict:
        event = {
            "event_id": _uuid(self.rng),
            "account_id": self.id,
            "occurred_at": when,
            **fields,
        }
        self.out.append((when, 0, event_type, event))
        return event

    @property
    def credit(self) -> Decimal:
        """Grant balances as the ledger's projection sees them (an expired grant counts until
        the tick that expires it)."""
        return sum((g.remaining for g in self.grants.values()), ZERO)

    def limit(self) -> Decimal:
        """The effective monthly limit: min(own limit, the tier that payments reach)."""
        tier = self.policy.tier_for(self.paid).monthly_limit
        return tier if self.configured is None else min(self.configured, tier)

    @property
    def limited(self) -> bool:
        return self.spend >= self.limit()

    def reasons(self) -> tuple[bool, ...]:
        exhausted = self.credit <= 0 and not self.methods
        return exhausted, self.limited, self.failed, self.hold

    def update(self, when: datetime) -> None:
        if any(self.reasons()):
            self.blocked_since = self.blocked_since or when
        else:
            self.blocked_since = None

    def changed(self, when: datetime, was_blocked: bool, was_limited: bool) -> None:
        """After money moved: the account may now be blocked, and react to it."""
        self.update(when)
        if not was_blocked and self.credit <= 0 and not self.methods:
            self.exhausted(when)
        if not was_limited and self.limited:
            self.limit_reached(when)

    def served(self, when: datetime) -> bool:
        return self.blocked_since is None or when < self.blocked_since + IN_FLIGHT

    def later(self, when: datetime, median_hours: float, sigma: float = 1.0) -> datetime:
        return when + timedelta(hours=self.rng.lognormvariate(math.log(median_hours), sigma))

    def add_grant(
        self, grant_id: str, kind: str, amount: Decimal, expires_at: datetime | None = None
    ) -> None:
        self.grants[grant_id] = _Grant(grant_id, kind, amount, amount, expires_at, self._grants)
        self._grants += 1

    def burn(self, charge: Decimal, when: datetime) -> None:
        """Spend `charge` from usable grants in the policy's burn order (kinds in order, then
        the earliest expiry, never-expiring last, then the oldest); the rest is owed."""
        rank = {kind: i for i, kind in enumerate(self.policy.burn_kinds)}
        far = datetime.max.replace(tzinfo=UTC)
        usable = [g for g in self.grants.values() if g.usable_at(when)]
        for grant in sorted(usable, key=lambda g: (rank[g.kind], g.expires_at or far, g.order)):
            take = min(grant.remaining, charge)
            grant.remaining -= take
            charge -= take
            if charge <= 0:
                return
        self.receivable += charge

    def pay(self, amount: Decimal, grant_id: str) -> None:
        """A payment (credit purchase or invoice paid): what is owed first, the rest is a
        purchased credit grant."""
        self.expected.cash += amount
        self.paid += amount
        pays = min(amount, self.receivable)
        self.receivable -= pays
        if amount - pays > 0:
            self.add_grant(grant_id, "purchased", amount - pays)
        self.failed = False

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
        count = _lognormal_int(rng, n[0], n[1], 1, n[2])
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
            model, _, meter, per_image = _pick(rng, IMAGE_MODELS)
            images = rng.choice((1, 1, 1, 2, 4))
            self.usage(when, "image", model, **{meter: images * per_image})
            return
        if self.persona == "scaleup" or rng.random() < 0.75:
            model, _, out_factor = self.favourite
        else:
            model, _, out_factor = _pick(rng, CHAT_MODELS)
        if rng.random() < UNPRICED_SHARE:
            model = UNPRICED_MODEL
        prompt = _lognormal_int(rng, 800 * self.context, 1.1, 1, MAX_INPUT_TOKENS)
        cached = int(prompt * rng.uniform(0.3, 0.9)) if rng.random() < self.cache_rate else 0
        output = _lognormal_int(rng, 250 * out_factor, 0.9, 1, MAX_OUTPUT_TOKENS)
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
        tier = _pick(self.rng, SERVICE_TIERS)[0] if product == "serverless" else "standard"
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
        for _ in range(_lognormal_int(self.rng, 80, 0.6, 5, 400)):
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
            for _ in range(_lognormal_int(self.rng, 60, 0.6, 5, 300)):
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
        self.at(_tick_after(expires), "expire", grant_id)

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
        gpu = _pick(rng, GPU_TYPES)[0]
        gpus = rng.choice((1, 1, 2, 4, 8))
        hours = _lognormal_int(rng, 8, 0.9, 1, 96)
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
        model = _pick(self.rng, FINE_TUNE_MODELS)[0]
        tokens = _lognormal_int(self.rng, 4_000_000, 1.0, 100_000, 60_000_000)
        self.usage(when, "fine_tuning", model, training_tokens=tokens)


# --- the run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class DemoSummary:
    produced: int  # events and PeriodTicks sent to Kafka
    journaled: int  # journal entries (derived GrantExpired entries included)
    rejected: int
    entries_by_status: dict[str, int]  # posted / unpriced / noop
    rejected_by_reason: dict[str, int]
    accounts_by_status: list[tuple[str, int]]  # ("active", n), ("suspended: A+B", n), ...
    revenue: Decimal
    credits_outstanding: Decimal
    receivable: Decimal
    promotional_expense: Decimal
    cash: Decimal
    trial_balance: dict[str, Decimal]
    postings: int
    ledger_seconds: float  # produce start → last event journaled (or rejected)
    status_events: int  # suspensions and reinstatements seen downstream (deduplicated)
    suspended_ever: int  # accounts with at least one AccountSuspended downstream
    reinstated_ever: int  # accounts with at least one AccountReinstated downstream
    expected: Expected
    # Billing periods.
    derived: int = 0  # journal entries derived from a tick (GrantExpired)
    ticks_sent: int = 0  # PeriodTicks sent (one per partition per tick time)
    ticks_journaled: int = 0
    breakage: Decimal = ZERO  # revenue:breakage
    expired_left: Decimal = ZERO  # balance left on grants whose expires_at has passed
    suspended_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)  # ever
    limit_suspended_now: int = 0  # accounts with SPEND_LIMIT_REACHED after the month turned
    warnings: dict[int, int] = dataclasses.field(default_factory=dict)  # threshold → seen
    invoices: int = 0  # issued for MONTH
    invoiced: Decimal = ZERO  # their total amount due
    invoices_downstream: int = 0  # InvoiceIssued events for MONTH seen downstream
    accounts_owing: int = 0  # accounts whose receivable is at least half a cent
    invoice_mismatches: int = 0  # accounts whose invoice does not equal their receivable

    @property
    def unpriced(self) -> int:
        return self.entries_by_status.get("unpriced", 0)

    @property
    def balanced(self) -> bool:
        return all(total == 0 for total in self.trial_balance.values())

    @property
    def events_per_second(self) -> float:
        return self.produced / self.ledger_seconds if self.ledger_seconds > 0 else 0.0

    def checks(self) -> list[tuple[str, str, str, bool]]:
        """(what, ledger, expected, ok) for everything that must reconcile."""
        e = self.expected
        return [
            (
                "journaled + rejected = produced + derived",
                f"{self.journaled + self.rejected:,}",
                f"{self.produced:,} + {self.derived:,} GrantExpired",
                self.journaled + self.rejected == self.produced + self.derived,
            ),
            (
                "period ticks journaled",
                f"{self.ticks_journaled:,}",
                f"{self.ticks_sent:,}",
                self.ticks_journaled == self.ticks_sent,
            ),
            (
                "rejected (meter glitches)",
                f"{self.rejected:,}",
                f"{e.rejected:,}",
                self.rejected == e.rejected,
            ),
            (
                "unpriced usage",
                f"{self.unpriced:,}",
                f"{e.unpriced:,}",
                self.unpriced == e.unpriced,
            ),
            ("revenue (usage)", _usd(self.revenue), _usd(e.revenue), self.revenue == e.revenue),
            (
                "promotional expense (grants − revoked)",
                _usd(self.promotional_expense),
                _usd(e.promotional),
                self.promotional_expense == e.promotional,
            ),
            ("cash received", _usd(self.cash), _usd(e.cash), self.cash == e.cash),
            (
                "breakage ≤ promotions expiring in March",
                _usd(self.breakage),
                f"0 … {_usd(e.expiring)}",
                ZERO <= self.breakage <= e.expiring,
            ),
            (
                "GrantExpired entries ≤ expiring grants",
                f"{self.derived:,}",
                f"≤ {e.expiring_grants:,}",
                self.derived <= e.expiring_grants,
            ),
            (
                "balance left on expired grants",
                _usd(self.expired_left),
                _usd(ZERO),
                self.expired_left == 0,
            ),
            (
                f"invoices {MONTH} = receivable ≥ ½¢, per account",
                f"{self.invoices:,}  ({self.invoice_mismatches:,} differ)",
                f"{self.accounts_owing:,}",
                self.invoices == self.accounts_owing and self.invoice_mismatches == 0,
            ),
            (
                "InvoiceIssued seen downstream",
                f"{self.invoices_downstream:,}",
                f"{self.invoices:,}",
                self.invoices_downstream == self.invoices,
            ),
            (
                "accounts suspended for SPEND_LIMIT_REACHED",
                f"{self.suspended_by_reason.get('SPEND_LIMIT_REACHED', 0):,}",
                f"≥ {e.limit_certain:,} (March spend ≥ final limit)",
                self.suspended_by_reason.get("SPEND_LIMIT_REACHED", 0) >= e.limit_certain,
            ),
            (
                "SPEND_LIMIT_REACHED after the month turned",
                f"{self.limit_suspended_now:,}",
                "0",
                self.limit_suspended_now == 0,
            ),
            (
                "trial balance",
                ", ".join(f"{c} {t:.9f}" for c, t in sorted(self.trial_balance.items())) or "0",
                "0",
                self.balanced,
            ),
        ]

    @property
    def ok(self) -> bool:
        return all(ok for *_, ok in self.checks())


def _usd(amount: Decimal) -> str:
    return f"${amount:,.9f}"


def summarise(
    conn: psycopg.Connection,
    sim: Simulation,
    *,
    produced: int,
    ledger_seconds: float,
    downstream: StatusReader | None = None,
    ticks_sent: int = 0,
) -> DemoSummary:
    """Read the demo database back: what was journaled, balances, statuses, invoices, trial
    balance; and what the downstream reader saw."""
    journaled, rejected = conn.execute(QUERIES["demo_counts"]).fetchone()
    by_status = dict(conn.execute(QUERIES["demo_entries_by_status"]).fetchall())
    by_reason = dict(conn.execute(QUERIES["demo_rejected_by_reason"]).fetchall())
    accounts = [
        ("suspended: " + " + ".join(reasons) if suspended else "active", n)
        for suspended, reasons, n in conn.execute(QUERIES["demo_accounts_by_status"])
    ]
    revenue, credits, receivable, promotional, cash = conn.execute(
        QUERIES["demo_balances"]
    ).fetchone()
    derived, ticks = conn.execute(QUERIES["demo_journal_kinds"]).fetchone()
    breakage, expired_left = conn.execute(
        QUERIES["demo_breakage"], (max(sim.ticks, default=MONTH_END),)
    ).fetchone()
    invoices, invoiced = conn.execute(QUERIES["demo_invoices_of_month"], (MONTH,)).fetchone()
    owing, mismatches = conn.execute(QUERIES["demo_invoice_check"], (MONTH,)).fetchone()
    (limited_now,) = conn.execute(QUERIES["demo_limit_suspended_now"]).fetchone()
    tb = trial_balance(conn)
    conn.commit()
    return DemoSummary(
        produced=produced,
        journaled=journaled,
        rejected=rejected,
        entries_by_status=by_status,
        rejected_by_reason=by_reason,
        accounts_by_status=accounts,
        revenue=Decimal(revenue),
        credits_outstanding=Decimal(credits),
        receivable=Decimal(receivable),
        promotional_expense=Decimal(promotional),
        cash=Decimal(cash),
        trial_balance=tb.totals,
        postings=tb.postings,
        ledger_seconds=ledger_seconds,
        status_events=downstream.status_events if downstream else 0,
        suspended_ever=len(downstream.suspended_accounts) if downstream else 0,
        reinstated_ever=len(downstream.reinstated_accounts) if downstream else 0,
        expected=sim.expected,
        derived=derived,
        ticks_sent=ticks_sent,
        ticks_journaled=ticks,
        breakage=Decimal(breakage),
        expired_left=Decimal(expired_left),
        suspended_by_reason=(
            {r: len(a) for r, a in sorted(downstream.reasons_ever.items())} if downstream else {}
        ),
        limit_suspended_now=limited_now,
        warnings=dict(sorted(downstream.warnings.items())) if downstream else {},
        invoices=invoices,
        invoiced=Decimal(invoiced),
        invoices_downstream=(
            sum(1 for month in downstream.invoices.values() if month == MONTH) if downstream else 0
        ),
        accounts_owing=owing,
        invoice_mismatches=mismatches,
    )


@dataclasses.dataclass
class DemoResult:
    exit_code: int
    run_id: str = ""
    dsn: str = ""
    settings: Settings | None = None
    summary: DemoSummary | None = None
    worker_exit: int | None = None
    error: str | None = None
    external_services: bool = False
    limit_account: str | None = None  # an account suspended for SPEND_LIMIT_REACHED


class StatusReader(threading.Thread):
    """The downstream consumer: reads the status topic from the start (no group) and prints
    one line per output event (suspended, reinstated, spend-limit warning, invoice issued);
    the relay may send an event twice, so events are counted once by event_id."""

    def __init__(self, settings: Settings, bootstrap: str, console: Console):
        super().__init__(name="status-reader", daemon=True)
        self.settings = settings
        self.bootstrap = bootstrap
        self.console = console
        self.codec = Codec.default()
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.seen: set[str] = set()  # event ids
        self.by_type: Counter[str] = Counter()
        self.versions: dict[str, int] = {}
        self.suspended_accounts: set[str] = set()
        self.reinstated_accounts: set[str] = set()
        self.reasons_ever: dict[str, set[str]] = {}  # reason → accounts suspended for it
        self.warnings: Counter[int] = Counter()  # threshold percent → warnings
        self.invoices: dict[str, str] = {}  # invoice id → month
        self.error: BaseException | None = None

    @property
    def unique(self) -> int:
        return len(self.seen)

    @property
    def status_events(self) -> int:
        return self.by_type["AccountSuspended"] + self.by_type["AccountReinstated"]

    def run(self) -> None:
        from kafka import KafkaConsumer

        try:
            consumer = KafkaConsumer(
                self.settings.topic(topics.STATUS),
                bootstrap_servers=self.bootstrap,
                enable_incremental_fetch_sessions=False,
                group_id=None,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                client_id="ledger-demo-status-reader",
            )
        except Exception as exc:
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        try:
            while not self.stop.is_set():
                for records in consumer.poll(timeout_ms=200).values():
                    for record in records:
                        self._show(record.value)
        except Exception as exc:
            self.error = exc
            log.exception("demo.status_reader_failed")
        finally:
            consumer.close()

    def _show(self, value: bytes) -> None:
        decoded = self.codec.decode(value)
        event, event_type = decoded.event, decoded.event_type
        if event["event_id"] in self.seen:
            return  # a relay re-send: same event_id, already handled
        self.seen.add(event["event_id"])
        self.by_type[event_type] += 1
        account, version = event["account_id"], event["status_version"]
        when = event.get("effective_at", event["occurred_at"]).strftime("%m-%d %H:%M")
        head = f"[dim]{when}[/]  {account}  "
        if event_type == "AccountSuspended":
            self.versions[account] = max(version, self.versions.get(account, 0))
            self.suspended_accounts.add(account)
            for reason in event["reasons"]:
                self.reasons_ever.setdefault(reason, set()).add(account)
            reasons = ", ".join(event["reasons"])
            line = f"{head}[bold red]suspended [/]  v{version:<2} {reasons}"
        elif event_type == "AccountReinstated":
            self.versions[account] = max(version, self.versions.get(account, 0))
            self.reinstated_accounts.add(account)
            line = f"{head}[bold green]reinstated[/]  v{version:<2}"
        elif event_type == "SpendLimitWarning":
            self.warnings[event["threshold_percent"]] += 1
            line = (
                f"{head}[yellow]limit {event['threshold_percent']:>3} %[/] "
                f"${event['month_to_date_spend']:,.2f} of ${event['effective_limit']:,.0f} "
                f"in {event['month']}"
            )
        elif event_type == "InvoiceIssued":
            self.invoices[event["invoice_id"]] = event["month"]
            line = (
                f"{head}[cyan]invoice   [/]  {event['invoice_id']}  "
                f"{event['currency']} {event['amount_due']:,.2f}"
            )
        else:
            line = f"{head}{event_type}  v{version}"
        self.console.print(line, highlight=False, soft_wrap=True)


def run_demo(settings: Settings, *, accounts: int = 1000, seed: int = 7) -> int:
    """`ledger demo`: see the module docstring. Returns the process exit code."""
    return run(settings, accounts=accounts, seed=seed).exit_code


def run(
    settings: Settings,
    *,
    accounts: int = 1000,
    seed: int = 7,
    console: Console | None = None,
) -> DemoResult:
    console = console or Console()
    result = DemoResult(exit_code=1)
    handles = _Handles()
    restore = _sigterm_as_interrupt()
    try:
        result.exit_code = _run(settings, accounts, seed, console, result, handles)
    except KeyboardInterrupt:
        console.print("\n[bold yellow]interrupted[/]: stopping the worker …")
        result.exit_code = 130
    except LedgerError as exc:
        result.error = str(exc)
        console.print(f"[bold red]demo failed:[/] {exc}")
        result.exit_code = 1
    except Exception as exc:  # a bug or a service that went away: still stop the worker
        log.exception("demo.failed")
        result.error = repr(exc)
        console.print(f"[bold red]demo failed:[/] {exc!r}")
        result.exit_code = 1
    finally:
        worker, reader = handles.worker, handles.reader
        if handles.producer is not None:
            handles.producer.close(timeout=10)
        if worker is not None and worker.poll() is None:
            code = _stop_worker(worker, timeout=60)
            console.print(f"worker stopped (exit {code})")
            if result.worker_exit is None:
                result.worker_exit = code
        if reader is not None:
            reader.stop.set()
            reader.join(timeout=10)
        if handles.monitor is not None:
            handles.monitor.close()
        restore()
    return result


@dataclasses.dataclass
class _Handles:
    """What `run` must clean up however `_run` ends."""

    worker: subprocess.Popen | None = None
    reader: StatusReader | None = None
    producer: Any = None
    monitor: psycopg.Connection | None = None


def _run(
    settings: Settings,
    accounts: int,
    seed: int,
    console: Console,
    result: DemoResult,
    handles: _Handles,
) -> int:
    from ledger import stack
    from ledger.producer import EventProducer
    from ledger.scheduler import send_ticks

    # 1. Services, and this run's own topics, consumer group and database.
    with console.status("starting Kafka and PostgreSQL …"):
        info = stack.up(settings)
    run_id = datetime.now(UTC).strftime("%Y%m%d_%H%M%S") + f"_{os.getpid() % 10000:04d}"
    prefix = f"{settings.topic_prefix}demo-{run_id.replace('_', '-')}."
    demo_settings = dataclasses.replace(
        settings,
        kafka_bootstrap=info.bootstrap,
        topic_prefix=prefix,
        consumer_group=f"{prefix}ledger",
    )
    dsn = _create_database(info.dsn, f"demo_{run_id}")
    demo_settings = dataclasses.replace(demo_settings, database_url=dsn)
    result.run_id, result.dsn, result.settings = run_id, dsn, demo_settings
    result.external_services = settings.uses_existing_services
    created = topics.create_topics(info.bootstrap, demo_settings)
    db.migrate(dsn)
    console.print(
        f"[bold]ledger demo[/] run {run_id}: {accounts:,} accounts, seed {seed}, "
        f"broker {info.broker} at {info.bootstrap}"
    )
    console.print(f"  database  {dsn}")
    console.print(
        f"  topics    {prefix}* ({len(created)} created, {settings.partitions} partitions)"
    )

    # 2. The worker, as a real process, without the scheduler: the demo is the clock.
    log_path = settings.home.resolve() / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handles.worker = _start_worker(demo_settings, info.bootstrap, dsn, log_path)
    console.print(
        f"  worker    pid {handles.worker.pid} (roles {', '.join(WORKER_ROLES)}), log {log_path}"
    )

    # 3. The downstream reader of the status topic.
    handles.reader = reader = StatusReader(demo_settings, info.bootstrap, console)
    reader.start()
    reader.ready.wait(30)
    if reader.error is not None:
        raise LedgerError(f"status reader could not start: {reader.error}")

    # 4. The simulated month.
    with console.status("simulating a month of traffic …"):
        sim = simulate(
            accounts,
            seed,
            pricebook=PriceBook.load(settings.price_book),
            policy=Policy.load(settings.policy),
        )
    counts = sim.counts()
    console.print(
        f"  simulated {len(sim.events):,} events: "
        + ", ".join(f"{t} {n:,}" for t, n in counts.most_common())
    )
    console.print(
        f"  clock     {len(sim.ticks)} PeriodTicks on every partition: each midnight of March, "
        f"{sim.ticks[-2]:%m-%d %H:%M} (the month turns), {sim.ticks[-1]:%m-%d %H:%M} "
        f"(March closes)"
    )
    _wait_for_assignment(handles.worker, log_path, timeout=60)

    handles.monitor = monitor = db.connect(dsn, autocommit=True)
    status_topic = demo_settings.topic(topics.STATUS)
    handles.producer = producer = EventProducer(info.bootstrap, demo_settings)
    partitions = len(producer.partitions("PeriodTick")) or demo_settings.partitions
    produced = len(sim.events) + len(sim.ticks) * partitions
    progress = Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(bar_width=36),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        t_produce = progress.add_task("produced to Kafka", total=produced, note="")
        t_journal = progress.add_task("journaled + rejected", total=produced, note="")
        t_project = progress.add_task("projected", total=None, note="")
        t_relay = progress.add_task("status events out", total=None, note="")
        started_wall = datetime.now(UTC)
        last_poll = 0.0
        derived = 0  # GrantExpired entries known so far (they only grow)

        def poll() -> tuple[int, int, int, int, int, int]:
            """Progress (cheap): journal entries (derived ones included), rejected, ..."""
            row = monitor.execute(QUERIES["demo_progress"], (status_topic,)).fetchone()
            journaled, rejected, projected, heads, unpublished, published = row
            progress.update(
                t_journal,
                completed=journaled - derived + rejected,
                note=f"rejected {rejected:,}, expired grants {derived:,}",
            )
            progress.update(t_project, completed=projected, total=max(heads, 1), note="")
            progress.update(
                t_relay,
                completed=reader.unique,
                total=max(published + unpublished, 1),
                note=f"outbox unpublished {unpublished:,}",
            )
            if reader.error is not None:
                raise LedgerError(f"the status reader failed: {reader.error!r}")
            if handles.worker is not None and handles.worker.poll() is not None:
                raise LedgerError(
                    f"the worker exited early (code {handles.worker.returncode}); "
                    f"see {log_path}:\n{_tail(log_path)}"
                )
            return journaled, rejected, projected, heads, unpublished, published

        def sources_done(journaled: int, rejected: int, target: int) -> bool:
            """Whether `target` sent events (and ticks) are all journaled or rejected. The
            cheap count includes derived entries, so it is checked exactly when it could be."""
            nonlocal derived
            if journaled - derived + rejected < target:
                return False
            sources, derived = monitor.execute(QUERIES["demo_journal_sources"]).fetchone()
            return sources + rejected >= target

        def wait_journaled(target: int) -> None:
            last_change, last_state = time.monotonic(), None
            while True:
                state = poll()
                if sources_done(state[0], state[1], target):
                    return
                if state != last_state:
                    last_change, last_state = time.monotonic(), state
                elif time.monotonic() - last_change > 120:
                    raise LedgerError(f"no progress for 120 s: {state}; see {log_path}")
                time.sleep(0.03)

        futures: list = []
        sent = checked = ticks_sent = 0

        def check_sends() -> None:
            nonlocal checked
            producer.flush(timeout=120)
            failed = [f for f in futures[checked:] if f.failed()]
            if failed:
                raise LedgerError(f"{len(failed)} sends failed, e.g. {failed[0].exception!r}")
            checked = len(futures)

        def tick(at: datetime) -> None:
            """A PeriodTick on every partition at `at`, once everything sent before it is
            journaled: the demo's clock moves only when the ledger has caught up with it."""
            nonlocal sent, ticks_sent
            check_sends()
            wait_journaled(sent)
            n = send_ticks(producer, at)
            sent += n
            ticks_sent += n
            progress.update(t_produce, completed=sent, note=f"clock {at:%m-%d %H:%M}")

        pending_ticks = list(sim.ticks)
        for event_type, event in sim.events:
            while pending_ticks and pending_ticks[0] <= event["occurred_at"]:
                tick(pending_ticks.pop(0))
            futures.append(producer.send(event_type, event))
            sent += 1
            if sent % 500 == 0:
                progress.update(t_produce, completed=sent)
                now = time.monotonic()
                if now - last_poll > 0.5:
                    last_poll = now
                    poll()
        for at in pending_ticks:  # the month turns, then March closes
            tick(at)
        check_sends()
        progress.update(t_produce, completed=sent)
        producer.close(timeout=10)
        handles.producer = None

        # 5. Until the journal, the projection, the outbox and the reader have caught up.
        last_change, last_state = time.monotonic(), None
        while True:
            state = (*poll(), reader.unique)
            journaled, rejected, projected, heads, unpublished, published, downstream = state
            if (
                sources_done(journaled, rejected, produced)
                and projected >= heads
                and unpublished == 0
                and downstream >= published
            ):
                break
            if state != last_state:
                last_change, last_state = time.monotonic(), state
            elif time.monotonic() - last_change > 120:
                raise LedgerError(f"no progress for 120 s: {state}; see {log_path}")
            time.sleep(0.2)
    last_at = monitor.execute(QUERIES["demo_last_recorded"]).fetchone()[0]
    ledger_seconds = (last_at - started_wall).total_seconds() if last_at else 0.0

    # 6. Stop the worker; it must exit 0.
    console.print("stopping the worker (SIGTERM) …")
    result.worker_exit = _stop_worker(handles.worker, timeout=60)
    handles.worker = None
    reader.stop.set()
    reader.join(timeout=10)
    handles.reader = None
    with db.connect(dsn) as conn:
        summary = summarise(
            conn,
            sim,
            produced=produced,
            ledger_seconds=ledger_seconds,
            downstream=reader,
            ticks_sent=ticks_sent,
        )
    result.summary = summary
    limited = reader.reasons_ever.get("SPEND_LIMIT_REACHED", set())
    result.limit_account = min(limited) if limited else None
    _print_summary(console, summary, result.worker_exit)
    _print_next_steps(console, result, conn_dsn=dsn)
    ok = summary.ok and result.worker_exit == 0
    if result.worker_exit != 0:
        console.print(f"[bold red]worker exited {result.worker_exit}[/]; see {log_path}")
    console.print("[bold green]demo OK[/]" if ok else "[bold red]demo FAILED[/]")
    return 0 if ok else 1


# --- helpers -------------------------------------------------------------------------------------


def _create_database(admin_dsn: str, name: str) -> str:
    with db.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL(QUERIES["demo_create_database"]).format(sql.Identifier(name)))
    return urlsplit(admin_dsn)._replace(path=f"/{name}").geturl()


def _worker_env(settings: Settings, bootstrap: str, dsn: str) -> dict[str, str]:
    """The environment of the worker process: every setting as a LEDGER_* variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if value is None:
            continue
        if isinstance(value, Path):
            value = value.resolve()
        env[f"LEDGER_{field.name.upper()}"] = str(value)
    env["LEDGER_KAFKA_BOOTSTRAP"] = bootstrap
    env["LEDGER_DATABASE_URL"] = dsn
    env["LEDGER_LOG_FORMAT"] = "json"  # to a file; the demo reads it for the assignment
    return env


def _worker_argv() -> list[str]:
    return [
        sys.executable,
        "-m",
        "ledger.cli",
        "worker",
        *(arg for role in WORKER_ROLES for arg in ("--role", role)),
    ]


def _start_worker(settings: Settings, bootstrap: str, dsn: str, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as logfile:
        return subprocess.Popen(
            _worker_argv(),
            env=_worker_env(settings, bootstrap, dsn),
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops the worker itself
        )


def _stop_worker(proc: subprocess.Popen, timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("demo.worker_kill", pid=proc.pid)
            proc.kill()
            proc.wait()
    return proc.returncode


def _wait_for_assignment(proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Until the worker's ledger consumer has its partitions (so the clock measures the
    ledger, not the consumer group's start-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LedgerError(
                f"the worker exited at start-up (code {proc.returncode}):\n{_tail(log_path)}"
            )
        if _partitions_assigned(log_path):
            return
        time.sleep(0.2)
    log.warning("demo.worker_not_assigned", waited_s=timeout)


def _partitions_assigned(log_path: Path) -> bool:
    """Whether the worker's log (JSON lines) shows a non-empty partition assignment."""
    for line in log_path.read_bytes().splitlines():
        if b"partitions_assigned" not in line or not line.startswith(b"{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "partitions_assigned" and entry.get("partitions"):
            return True
    return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _sigterm_as_interrupt():
    """SIGTERM to the demo is handled like Ctrl-C (the worker is stopped cleanly)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _print_summary(console: Console, s: DemoSummary, worker_exit: int | None) -> None:
    accounts = Table(title="accounts by status (after the month turned)", title_justify="left")
    accounts.add_column("status")
    accounts.add_column("accounts", justify="right")
    for label, n in s.accounts_by_status:
        accounts.add_row(label, f"{n:,}", style="red" if label != "active" else None)
    accounts.add_row("suspended at some point", f"{s.suspended_ever:,}", style="dim")
    for reason, n in s.suspended_by_reason.items():
        accounts.add_row(f"  for {reason}", f"{n:,}", style="dim")
    accounts.add_row("reinstated at some point", f"{s.reinstated_ever:,}", style="dim")
    console.print(accounts)

    billing = Table(title=f"billing period {MONTH}", title_justify="left")
    billing.add_column("")
    billing.add_column("", justify="right")
    for threshold, n in s.warnings.items():
        billing.add_row(f"spend-limit warnings {threshold} % (downstream)", f"{n:,}")
    if not s.warnings:
        billing.add_row("spend-limit warnings (downstream)", "0")
    billing.add_row(
        "accounts that reached their spend limit",
        f"{s.suspended_by_reason.get('SPEND_LIMIT_REACHED', 0):,}",
    )
    billing.add_row(f"invoices issued for {MONTH}", f"{s.invoices:,}")
    billing.add_row("  total amount due", f"${s.invoiced:,.2f}")
    billing.add_row("breakage (promotional credit expired unused)", _usd(s.breakage))
    console.print(billing)

    money = Table(title="the books (USD)", title_justify="left")
    money.add_column("")
    money.add_column("amount", justify="right")
    money.add_row("revenue (usage)", _usd(s.revenue))
    money.add_row("revenue (breakage)", _usd(s.breakage))
    money.add_row("credits outstanding (grant balances)", _usd(s.credits_outstanding))
    money.add_row("receivable", _usd(s.receivable))
    money.add_row("promotional expense", _usd(s.promotional_expense))
    money.add_row("cash received", _usd(s.cash))
    for currency, total in sorted(s.trial_balance.items()) or [("USD", ZERO)]:
        money.add_row(
            f"trial balance {currency} ({s.postings:,} postings)",
            f"[green]{total:.9f}[/]" if total == 0 else f"[bold red]{total:.9f}[/]",
        )
    console.print(money)

    flow = Table(title="events", title_justify="left")
    flow.add_column("")
    flow.add_column("", justify="right")
    flow.add_row("produced", f"{s.produced:,}  (PeriodTicks {s.ticks_sent:,})")
    flow.add_row(
        "journaled",
        f"{s.journaled:,}  ("
        + ", ".join(f"{k} {v:,}" for k, v in sorted(s.entries_by_status.items()))
        + f"; GrantExpired {s.derived:,})",
    )
    flow.add_row(
        "rejected",
        f"{s.rejected:,}"
        + (
            "  (" + ", ".join(f"{k} {v:,}" for k, v in sorted(s.rejected_by_reason.items())) + ")"
            if s.rejected_by_reason
            else ""
        ),
    )
    flow.add_row("unpriced entries", f"{s.unpriced:,}")
    flow.add_row(
        "status events downstream",
        f"{s.status_events:,}  (+ warnings {sum(s.warnings.values()):,}, "
        f"invoices {s.invoices_downstream:,})",
    )
    flow.add_row(
        "ledger throughput",
        f"{s.events_per_second:,.0f} events/s  ({s.produced:,} in {s.ledger_seconds:.1f} s, "
        "produce start → all journaled, waiting for the journal at each tick)",
    )
    flow.add_row("worker exit code", str(worker_exit))
    console.print(flow)

    checks = Table(title="reconciliation: ledger vs simulator", title_justify="left")
    for col in ("check", "ledger", "expected", ""):
        checks.add_column(col, justify="left" if col == "check" else "right")
    for what, got, want, ok in s.checks():
        checks.add_row(what, got, want, "[green]✓[/]" if ok else "[bold red]✗[/]")
    console.print(checks)


def _print_next_steps(console: Console, result: DemoResult, conn_dsn: str) -> None:
    s, settings = result.summary, result.settings
    assert s is not None and settings is not None
    ledger = _ledger_command()
    env = f"LEDGER_DATABASE_URL={conn_dsn}"
    with db.connect(conn_dsn) as conn:
        suspended = conn.execute(QUERIES["demo_sample_account"], (True, True)).fetchone()
        reinstated = conn.execute(QUERIES["demo_sample_account"], (False, False)).fetchone()
        invoiced = conn.execute(QUERIES["demo_sample_invoiced"], (MONTH,)).fetchone()

    def hint(what: str, command: str) -> None:
        console.print(f"  # {what}\n  {command}", highlight=False, soft_wrap=True)

    console.print("\n[bold]next[/]:")
    hint(f"the invoices issued for {MONTH}", f"{env} {ledger} invoices list --month {MONTH}")
    samples = (
        (invoiced, f"an invoiced account (the most invoice lines for {MONTH})"),
        ((result.limit_account,), "an account that reached its spend limit in March"),
        (suspended, "an account suspended now"),
        (reinstated, "a reinstated account"),
    )
    shown: set[str] = set()
    for row, what in samples:
        if row and row[0] and row[0] not in shown:
            shown.add(row[0])
            hint(what, f"{env} {ledger} account show {row[0]}")
    hint("the trial balance", f"{env} {ledger} trial-balance")
    roles = " ".join(f"--role {role}" for role in WORKER_ROLES)
    hint(
        "run the worker on the demo's topics again (it resumes from the stored offsets; "
        "without the scheduler, whose wall clock would close every month since March)",
        f"{env} LEDGER_TOPIC_PREFIX={settings.topic_prefix} "
        f"LEDGER_CONSUMER_GROUP={settings.consumer_group} {ledger} worker {roles}",
    )
    if not result.external_services:
        hint("stop Kafka and PostgreSQL", f"{ledger} stack down")


def _ledger_command() -> str:
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "ledger":
        try:
            return str(argv0.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(argv0)
    return "ledger"
