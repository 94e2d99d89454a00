"""What the ledger must end with, from what the fault run SENT: an independent model.

It shares nothing with the product's fold: the prices are a small table of the round figures
the traffic uses (the `2026-07` version of ledger/pricebook.toml, written out again here), and
the only money rules it knows are the ones whose totals do not depend on order:

    usage charged per account   = Σ tokens × price / 1M × tier multiplier (+ image steps)
    purchases per account       = Σ CreditPurchased.amount            (cash postings)
    grants per account          = $1 sign-up credit + Σ CreditGranted.amount (expense:promotional)

Every sent record has a fate: ACCEPT (journaled exactly once), ABORT (sent in an aborted
Kafka transaction: never journaled), QUARANTINE (a row in rejected_events + a dead-letter copy),
EITHER (journaled once or quarantined, never both, never lost; its money effect is zero either
way), or UNCERTAIN (the client could not tell whether Kafka took it; only counted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

ACCEPT, ABORT, QUARANTINE, EITHER = "accept", "abort", "quarantine", "either"

SIGNUP_CREDIT = Decimal("1")  # policy.toml [signup] amount: every opened account gets $1
PRICED_FROM = datetime(2026, 7, 1, tzinfo=UTC)  # the 2026-07 version is in force from here
FIRST_PRICE = datetime(2026, 1, 1, tzinfo=UTC)  # before the first version: unpriced, $0
MILLION = Decimal(1_000_000)
TOKEN_PRICES = {  # per 1M tokens: (input, output)
    "accounts/fireworks/models/llama-v3p1-8b-instruct": (Decimal("0.20"), Decimal("0.18")),
    "accounts/fireworks/models/llama-v3p3-70b-instruct": (Decimal("0.90"), Decimal("0.90")),
    "accounts/fireworks/models/deepseek-r1": (Decimal("3.00"), Decimal("8.00")),
}
STEP_PRICES = {"accounts/fireworks/models/flux-1-dev-fp8": Decimal("0.0005")}  # per step
TIER_MULTIPLIERS = {"standard": Decimal("1"), "batch": Decimal("0.5"), "priority": Decimal("1.5")}


def usage_charge(event: dict) -> Decimal:
    """The price of one UsageRecorded the traffic sends (no cached input, no GPUs)."""
    at = event["occurred_at"]
    if at < FIRST_PRICE:
        return Decimal(0)
    if at < PRICED_FROM:
        raise ValueError(f"the model has no prices for {at} (traffic is dated from 2026-07)")
    tier = TIER_MULTIPLIERS[event["service_tier"]]
    model = event["model"]
    if model in STEP_PRICES:
        return event["steps"] * STEP_PRICES[model] * tier
    inp, out = TOKEN_PRICES[model]
    return (event["input_tokens"] * inp + event["output_tokens"] * out) / MILLION * tier


@dataclasses.dataclass
class Totals:
    usage: Decimal = Decimal(0)
    purchases: Decimal = Decimal(0)
    grants: Decimal = Decimal(0)

    def as_tuple(self) -> tuple[Decimal, Decimal, Decimal]:
        return (self.usage, self.purchases, self.grants)


@dataclasses.dataclass(frozen=True)
class SentRecord:
    """A malformed or odd record, where Kafka put it, and what must become of it."""

    kind: str
    fate: str  # QUARANTINE or EITHER
    topic: str
    partition: int
    offset: int
    digest: bytes  # sha256 of the value (b"" for a tombstone)
    event_id: str | None = None


Where = tuple[str, str, int, int]  # (event type, topic, partition, offset)


def digest(value: bytes | None) -> bytes:
    return hashlib.sha256(value or b"").digest()


class Model:
    """Filled by the producers as Kafka acknowledges what they send; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accepted: dict[str, Where] = {}  # event id -> (event type, topic, partition, offset)
        self.aborted: set[str] = set()
        self.records: list[SentRecord] = []  # QUARANTINE and EITHER records
        self.uncertain: list[bytes] = []  # digests of records whose send failed for good
        self.totals: dict[str, Totals] = {}
        self.sent_by_kind: Counter[str] = Counter()
        self.transactions: Counter[str] = Counter()  # committed / aborted

    def accept(
        self,
        event_type: str,
        event: dict,
        kind: str = "traffic",
        *,
        topic: str = "",
        partition: int = -1,
        offset: int = -1,
    ) -> None:
        """An event Kafka acknowledged at (topic, partition, offset): it must be journaled."""
        with self._lock:
            self.sent_by_kind[kind] += 1
            self.accepted[event["event_id"]] = (event_type, topic, partition, offset)
            self._apply(event_type, event)

    def redelivered(self, event_id: str) -> None:
        """The same bytes sent again: still journaled once, nothing more to charge."""
        with self._lock:
            self.sent_by_kind["redelivery"] += 1

    def abort(self, event_ids: list[str]) -> None:
        with self._lock:
            self.sent_by_kind["aborted"] += len(event_ids)
            self.aborted.update(event_ids)
            self.transactions["aborted"] += 1

    def committed_transaction(self) -> None:
        with self._lock:
            self.transactions["committed"] += 1

    def record(self, sent: SentRecord) -> None:
        with self._lock:
            self.sent_by_kind[sent.kind] += 1
            self.records.append(sent)

    def lost_in_sending(self, kind: str, value: bytes | None) -> None:
        with self._lock:
            self.sent_by_kind[f"{kind} (send failed)"] += 1
            self.uncertain.append(digest(value))

    def _apply(self, event_type: str, event: dict) -> None:
        totals = self.totals.setdefault(event["account_id"], Totals())
        if event_type == "AccountOpened":
            totals.grants += SIGNUP_CREDIT
        elif event_type == "CreditGranted":
            totals.grants += event["amount"]
        elif event_type == "CreditPurchased":
            totals.purchases += event["amount"]
        elif event_type == "UsageRecorded":
            totals.usage += usage_charge(event)

    @property
    def expected_quarantined(self) -> int:
        return sum(1 for r in self.records if r.fate == QUARANTINE)
