"""The simulator's own view of one account: its grants, what it owes, has paid and spent,
its spend limit and whether the ledger would block it now; and the plumbing that queues the
account's timed actions and emits its events. (The ledger keeps its own view.)"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ledger.demo.expected import ZERO, Expected
from ledger.demo.month import MONTH_END
from ledger.demo.traffic_mix import random_uuid
from ledger.policy import Policy
from ledger.rating import PriceBook

IN_FLIGHT = timedelta(seconds=20)  # requests already admitted when a suspension lands


@dataclasses.dataclass
class Grant:
    """The simulator's own view of one credit grant (the ledger keeps its own)."""

    grant_id: str
    kind: str  # promotional | goodwill | purchased
    granted: Decimal
    remaining: Decimal
    expires_at: datetime | None
    order: int

    def usable_at(self, when: datetime) -> bool:
        return self.remaining > 0 and (self.expires_at is None or when < self.expires_at)


class AccountState:
    """An account's money and standing as the simulator tracks them, so it knows when the
    ledger will suspend it (`SimulatedAccount` adds what the account does)."""

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
        self.grants: dict[str, Grant] = {}
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

    # --- plumbing ---------------------------------------------------------------------------

    def at(self, when: datetime, action: str, *args: Any) -> None:
        if when < MONTH_END:
            self._seq += 1
            heapq.heappush(self.queue, (when, self._seq, action, args))

    def emit(self, event_type: str, when: datetime, **fields: Any) -> dict:
        event = {
            "event_id": random_uuid(self.rng),
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

    def served(self, when: datetime) -> bool:
        return self.blocked_since is None or when < self.blocked_since + IN_FLIGHT

    def later(self, when: datetime, median_hours: float, sigma: float = 1.0) -> datetime:
        return when + timedelta(hours=self.rng.lognormvariate(math.log(median_hours), sigma))

    def add_grant(
        self, grant_id: str, kind: str, amount: Decimal, expires_at: datetime | None = None
    ) -> None:
        self.grants[grant_id] = Grant(grant_id, kind, amount, amount, expires_at, self._grants)
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
