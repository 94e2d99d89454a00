"""The simulated month (pure: no I/O): every account's events in occurred_at order, the
PeriodTick times, and what the ledger must show for them."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from datetime import datetime
from typing import Any

from ledger.demo.account import SimulatedAccount
from ledger.demo.expected import Expected
from ledger.demo.month import tick_times
from ledger.demo.traffic_mix import HOLD_SHARE, PERSONAS
from ledger.policy import Policy
from ledger.rating import PriceBook


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
        SimulatedAccount(
            account_id, personas[account_id], account_id in held, rng, pricebook, policy
        ).run(timeline, expected)
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
