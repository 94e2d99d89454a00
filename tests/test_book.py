"""The ledger's fold, without a database: how each event moves money between accounts."""

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from ledger.book import AccountBook, LedgerFold, Rejected
from ledger.policy import Policy
from ledger.rating import PriceBook

T0 = datetime(2026, 3, 1, tzinfo=UTC)
LLAMA_70B = "accounts/fireworks/models/llama-v3p3-70b-instruct"


@pytest.fixture(scope="module")
def fold():
    return LedgerFold(PriceBook.load(), Policy.load())


def ev(**fields):
    return {"event_id": str(uuid.uuid4()), "account_id": "acct-1", "occurred_at": T0} | fields


def usage(tokens, **fields):
    return (
        ev(
            request_id="r",
            product="serverless",
            model=LLAMA_70B,
            service_tier="standard",
            input_tokens=tokens,
            cached_input_tokens=0,
            output_tokens=0,
            gpu_seconds=None,
            gpu_type=None,
            training_tokens=0,
            images=0,
            steps=0,
        )
        | fields
    )


def balances(entry):
    return {p.ledger_account: p.amount for p in entry.postings}


def opened(fold):
    book = AccountBook("acct-1")
    fold.post(book, "AccountOpened", ev(created_at=T0))
    return book


def test_new_account_gets_exactly_one_dollar_of_promotional_credit(fold):
    book = AccountBook("acct-1")
    entry = fold.post(book, "AccountOpened", ev(created_at=T0))
    assert balances(entry) == {
        "expense:promotional": Decimal("1.00"),
        "customer:acct-1:credit:signup": Decimal("-1.00"),
    }
    assert book.credit_balance() == Decimal("1.00")
    # A second AccountOpened (a new event id for the same account) grants nothing more.
    again = fold.post(book, "AccountOpened", ev(created_at=T0))
    assert again.status == "noop" and again.postings == ()
    assert book.credit_balance() == Decimal("1.00")


def test_sign_up_credit_pays_usage_journaled_before_the_account_opened(fold):
    book = AccountBook("acct-1")
    fold.post(book, "UsageRecorded", usage(400_000))  # $0.36 before AccountOpened
    entry = fold.post(book, "AccountOpened", ev(created_at=T0))
    assert balances(entry) == {
        "expense:promotional": Decimal("1.00"),
        "customer:acct-1:receivable": Decimal("-0.36"),
        "customer:acct-1:credit:signup": Decimal("-0.64"),
    }
    assert (book.receivable, book.credit_balance()) == (0, Decimal("0.64"))


def test_usage_burns_credit_then_goes_to_receivable(fold):
    book = opened(fold)
    # 1,000,000 tokens of 70B at $0.90 / 1M = $0.90, all from the $1 credit.
    first = fold.post(book, "UsageRecorded", usage(1_000_000))
    assert balances(first) == {
        "customer:acct-1:credit:signup": Decimal("0.900000000"),
        "revenue:usage": Decimal("-0.900000000"),
    }
    # The next $0.90: $0.10 of credit left, $0.80 to receivable.
    second = fold.post(book, "UsageRecorded", usage(1_000_000))
    assert balances(second) == {
        "customer:acct-1:credit:signup": Decimal("0.100000000"),
        "customer:acct-1:receivable": Decimal("0.800000000"),
        "revenue:usage": Decimal("-0.900000000"),
    }
    assert book.credit_balance() == 0
    assert book.receivable == Decimal("0.8")


def test_purchase_pays_outstanding_balance_first(fold):
    # The rule: a $750 unpaid balance plus a $500 purchase leaves $250 owed and $0 credit.
    book = opened(fold)
    # 93,875,000 output tokens of DeepSeek R1 at $8 / 1M = $751: $1 of credit, $750 owed.
    fold.post(
        book,
        "UsageRecorded",
        usage(0, model="accounts/fireworks/models/deepseek-r1", output_tokens=93_875_000),
    )
    assert book.receivable == Decimal("750")
    entry = fold.post(
        book, "CreditPurchased", ev(grant_id="p1", amount=Decimal("500"), payment_reference="ch_1")
    )
    assert balances(entry) == {
        "cash": Decimal("500"),
        "customer:acct-1:receivable": Decimal("-500"),
    }
    assert book.receivable == Decimal("250")
    assert book.credit_balance() == 0


def test_purchase_beyond_the_balance_owed_becomes_credit(fold):
    book = opened(fold)
    book.grants["signup"].remaining = Decimal(0)
    book.receivable = Decimal("30")
    entry = fold.post(
        book, "CreditPurchased", ev(grant_id="p1", amount=Decimal("100"), payment_reference="")
    )
    assert balances(entry) == {
        "cash": Decimal("100"),
        "customer:acct-1:receivable": Decimal("-30"),
        "customer:acct-1:credit:p1": Decimal("-70"),
    }
    assert book.credit_balance() == Decimal("70")


def test_promotional_credit_burns_before_purchased_then_earliest_expiry(fold):
    book = opened(fold)
    fold.post(
        book, "CreditPurchased", ev(grant_id="bought", amount=Decimal("5"), payment_reference="")
    )
    fold.post(
        book,
        "CreditGranted",
        ev(
            grant_id="late",
            amount=Decimal("1"),
            kind="promotional",
            expires_at=T0 + timedelta(days=60),
            reason="",
        ),
    )
    fold.post(
        book,
        "CreditGranted",
        ev(
            grant_id="soon",
            amount=Decimal("1"),
            kind="promotional",
            expires_at=T0 + timedelta(days=10),
            reason="",
        ),
    )
    # $2.70 of usage: soon ($1, earliest expiry) → late ($1) → signup ($1, never expires) …
    entry = fold.post(book, "UsageRecorded", usage(3_000_000))
    burned = [(k.rsplit(":", 1)[1], v) for k, v in balances(entry).items() if ":credit:" in k]
    assert burned == [("soon", Decimal("1")), ("late", Decimal("1")), ("signup", Decimal("0.7"))]
    assert book.grants["bought"].remaining == Decimal("5")


def test_expired_grant_is_not_burned(fold):
    book = opened(fold)
    book.grants["signup"].expires_at = T0 + timedelta(hours=1)
    entry = fold.post(book, "UsageRecorded", usage(1_000_000, occurred_at=T0 + timedelta(hours=1)))
    assert balances(entry)["customer:acct-1:receivable"] == Decimal("0.9")


def test_revoked_spent_grant_leaves_a_receivable(fold):
    book = opened(fold)
    fold.post(
        book,
        "CreditGranted",
        ev(grant_id="g", amount=Decimal("10"), kind="goodwill", expires_at=None, reason=""),
    )
    book.grants["signup"].remaining = Decimal(0)
    fold.post(book, "UsageRecorded", usage(4_000_000))  # $3.60 from g
    entry = fold.post(book, "CreditRevoked", ev(grant_id="g", reason="chargeback"))
    assert balances(entry) == {
        "customer:acct-1:credit:g": Decimal("6.400000000"),
        "customer:acct-1:receivable": Decimal("3.600000000"),
        "expense:promotional": Decimal("-10.000000000"),
    }
    assert book.receivable == Decimal("3.6")


@pytest.mark.parametrize(
    ("event_type", "event", "reason"),
    [
        ("UsageRecorded", usage(-5), "negative_quantity"),
        ("UsageRecorded", usage(10**12), "absurd_quantity"),
        ("UsageRecorded", usage(5, product="on_demand", gpu_seconds=None), "missing_meter"),
        (
            "CreditPurchased",
            ev(grant_id="x", amount=Decimal("-1"), payment_reference=""),
            "invalid_amount",
        ),
        (
            "CreditPurchased",
            ev(grant_id="signup", amount=Decimal("1"), payment_reference=""),
            "duplicate_grant",
        ),
        ("CreditRevoked", ev(grant_id="nope", reason=""), "unknown_grant"),
        ("UsageRecorded", usage(5, account_id=""), "missing_account"),
    ],
)
def test_rule_breaking_events_are_rejected_and_leave_the_book_unchanged(
    fold, event_type, event, reason
):
    book = opened(fold)
    before = book.to_json()
    with pytest.raises(Rejected) as info:
        fold.post(book, event_type, event)
    assert info.value.reason == reason
    assert book.to_json() == before


def test_unpriced_usage_is_held_not_charged(fold):
    book = opened(fold)
    entry = fold.post(book, "UsageRecorded", usage(1000, model="accounts/x/models/unknown"))
    assert entry.status == "unpriced" and entry.postings == ()
    assert "unknown" in entry.detail["unpriced_reason"]
    assert book.credit_balance() == Decimal("1.00")


def test_book_survives_its_json_round_trip(fold):
    book = opened(fold)
    fold.post(
        book,
        "CreditGranted",
        ev(
            grant_id="g",
            amount=Decimal("2.5"),
            kind="goodwill",
            expires_at=T0 + timedelta(days=3),
            reason="",
        ),
    )
    fold.post(book, "UsageRecorded", usage(123_457))
    assert AccountBook.from_json("acct-1", book.to_json()) == book


def test_revoking_an_expired_grant_bills_only_what_was_spent(fold):
    book = opened(fold)
    book.grants["signup"].remaining = Decimal(0)
    fold.post(
        book,
        "CreditGranted",
        ev(
            grant_id="p",
            amount=Decimal("5"),
            kind="promotional",
            expires_at=T0 + timedelta(days=1),
            reason="",
        ),
    )
    fold.post(book, "UsageRecorded", usage(1_000_000))  # $0.90 spent from p
    [(_, _, expiry)] = fold.expire_grants(book, T0 + timedelta(days=2))
    assert balances(expiry) == {
        "customer:acct-1:credit:p": Decimal("4.1"),
        "revenue:breakage": Decimal("-4.1"),
    }
    entry = fold.post(book, "CreditRevoked", ev(grant_id="p", reason="abuse"))
    assert balances(entry) == {
        "customer:acct-1:receivable": Decimal("0.9"),
        "expense:promotional": Decimal("-0.9"),
    }
    assert book.receivable == Decimal("0.9")


def test_hashes_are_taken_over_the_documented_canonical_forms(fold):
    import hashlib

    from ledger.book import canonical_json, chain_hash, content_hash

    event = usage(123_456, occurred_at=T0 + timedelta(microseconds=7))
    book = opened(fold)
    entry = fold.post(book, "UsageRecorded", event)
    postings = [
        [p.ledger_account, format(p.amount.quantize(Decimal("1e-9")), "f")] for p in entry.postings
    ]
    body = canonical_json([event, entry.status, postings, entry.detail]).encode()
    raw = b"\xc3\x01raw"
    expected = hashlib.sha256(b"p" * 32 + body + hashlib.sha256(raw).digest()).digest()
    assert chain_hash(b"p" * 32, canonical_json(event), entry, raw) == expected
    assert (
        content_hash("UsageRecorded", canonical_json(event))
        == hashlib.sha256(canonical_json(["UsageRecorded", event]).encode()).digest()
    )
    assert '"occurred_at":"2026-03-01T00:00:00.000007+00:00"' in canonical_json(event)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda b: b["grants"]["g"].update(remaining="NaN"), "'NaN' is not a finite number"),
        (lambda b: b.update(receivable="-Infinity"), "'-Infinity' is not a finite number"),
        (lambda b: b["grants"]["g"].update(expires_at="2026-04-01T00:00:00"), "no UTC offset"),
        (lambda b: b.update(pending={"2026-03": {"usage": "sNaN"}}), "not a finite number"),
        (lambda b: b["grants"]["g"].update(remaining=0.1), "0.1 is a float, not str"),
        (lambda b: b["grants"]["g"].update(order="0"), "order '0' is a str, not int"),
        (lambda b: b["grants"]["g"].update(kind=7), "kind 7 is a int, not str"),
        (lambda b: b["grants"]["g"].update(revoked="no"), "revoked 'no' is a str, not bool"),
        (lambda b: b.update(opened=1), "opened 1 is a int, not bool"),
        (lambda b: b.update(next_order=True), "next_order True is a bool, not int"),
        (lambda b: b.update(last_invoice=5), "last_invoice 5 is a int, not str or null"),
        (lambda b: b.update(pending=[]), "pending .. is a list, not dict"),
        (lambda b: b.update(pending={"2026-03": "5"}), "pending month '5' is a str, not dict"),
    ],
)
def test_a_stored_book_with_what_no_writer_writes_does_not_read(change, error):
    """Decimal() reads NaN and Infinity and fromisoformat a time without an offset; in a book
    they would stop a comparison later (a tick's expiry check), far from the cause. The book
    refuses them when read, so the writer can pass that one account by."""
    book = AccountBook("acct-1")
    book.add_grant("g", "promotional", Decimal("5"), T0 + timedelta(days=30))
    data = book.to_json()
    assert AccountBook.from_json("acct-1", data) == book
    change(data)
    with pytest.raises((ValueError, TypeError), match=error):
        AccountBook.from_json("acct-1", data)
