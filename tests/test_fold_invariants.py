"""Invariants of the two folds over thousands of random event sequences, without services:
every entry balances, no grant goes negative, and the projection's independent reading of the
postings agrees with the ledger writer's account book."""

import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from ledger.book import AccountBook, LedgerFold, Rejected
from ledger.policy import Policy
from ledger.rating import PriceBook
from projections.account_status import (
    AccountStatus,
    AccountStatusProjection,
    JournalEntry,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)
MODELS = [
    "accounts/fireworks/models/llama-v3p1-8b-instruct",
    "accounts/fireworks/models/deepseek-r1",
    "accounts/acme/models/unpriced",
]


def random_events(rng: random.Random, count: int):
    at = T0
    grants: list[str] = []
    for n in range(count):
        at += timedelta(minutes=rng.randrange(1, 600))
        base = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "account_id": "a",
            "occurred_at": at,
        }
        kind = rng.choices(
            ["open", "use", "buy", "grant", "revoke", "pay", "card", "fail", "expire"],
            weights=[2, 30, 3, 3, 1, 2, 2, 1, 2],
        )[0]
        if kind == "open":
            yield "AccountOpened", base | {"created_at": at}
        elif kind == "use":
            yield (
                "UsageRecorded",
                base
                | {
                    "request_id": str(n),
                    "product": "serverless",
                    "model": rng.choice(MODELS),
                    "service_tier": rng.choice(["standard", "batch", "priority"]),
                    "input_tokens": rng.randrange(0, 3_000_000),
                    "cached_input_tokens": rng.randrange(0, 100_000),
                    "output_tokens": rng.randrange(0, 500_000),
                    "gpu_seconds": None,
                    "gpu_type": None,
                    "training_tokens": 0,
                    "images": 0,
                    "steps": 0,
                },
            )
        elif kind == "buy":
            grants.append(f"b{n}")
            yield (
                "CreditPurchased",
                base
                | {
                    "grant_id": f"b{n}",
                    "payment_reference": "",
                    "amount": Decimal(rng.randrange(1, 5000)) / 100,
                },
            )
        elif kind == "grant":
            grants.append(f"g{n}")
            expires = at + timedelta(days=rng.randrange(1, 20)) if rng.random() < 0.5 else None
            yield (
                "CreditGranted",
                base
                | {
                    "grant_id": f"g{n}",
                    "kind": rng.choice(["promotional", "goodwill"]),
                    "amount": Decimal(rng.randrange(1, 500)) / 100,
                    "expires_at": expires,
                    "reason": "",
                },
            )
        elif kind == "revoke" and grants:
            yield "CreditRevoked", base | {"grant_id": rng.choice(grants), "reason": ""}
        elif kind == "pay":
            yield (
                "InvoicePaid",
                base
                | {
                    "invoice_id": f"i{n}",
                    "payment_reference": "",
                    "amount": Decimal(rng.randrange(1, 3000)) / 100,
                },
            )
        elif kind == "card":
            yield "PaymentMethodAdded", base | {"payment_method_id": f"pm{n}", "kind": "card"}
        elif kind == "fail":
            yield (
                "PaymentFailed",
                base | {"payment_method_id": None, "amount": None, "failure_code": "x"},
            )
        elif kind == "expire":
            yield "tick", at


@pytest.mark.parametrize("seed", range(40))
def test_entries_balance_and_the_projection_agrees_with_the_book(seed):
    rng = random.Random(seed)
    policy = Policy.load()
    fold = LedgerFold(PriceBook.load(), policy)
    projection = AccountStatusProjection(policy)
    book, state = AccountBook("a"), AccountStatus("a")
    seq = 0
    for event_type, event in random_events(rng, 120):
        if event_type == "tick":
            entries = [
                ("GrantExpired", {"occurred_at": at}, entry)
                for _, at, entry in fold.expire_grants(book, event)
            ]
        else:
            try:
                entries = [(event_type, event, fold.post(book, event_type, event))]
            except Rejected:
                continue
        for entry_type, payload, entry in entries:
            total = sum((p.amount for p in entry.postings), Decimal(0))
            assert total == 0, (entry_type, entry.postings)
            seq += 1
            projection.apply(
                state,
                JournalEntry(
                    0,
                    seq,
                    "a",
                    entry_type,
                    entry.status,
                    payload["occurred_at"],
                    payload,
                    tuple((p.ledger_account, p.amount) for p in entry.postings),
                ),
            )
        assert all(g.remaining >= 0 for g in book.grants.values())
        assert book.receivable >= 0
        # The projection read only postings; the book decided them: they must agree.
        assert state.receivable == book.receivable
        assert state.credit_balance == book.credit_balance()
        assert {g: v for g, v in state.grants.items() if v} == {
            g.grant_id: g.remaining for g in book.grants.values() if g.remaining
        }
