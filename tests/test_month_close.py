"""Month close, invoices, grant expiry and replay end to end: the wiring (invoice rows,
InvoiceIssued events, GrantExpired entries derived from ticks, byte-identical replay). The
billing rules are tested in the rule harness (tests/test_rules_billing.py)."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

R1 = "accounts/fireworks/models/deepseek-r1"  # $8 / 1M output tokens
MARCH = datetime(2026, 3, 10, tzinfo=UTC)
APRIL_CLOSE = datetime(2026, 4, 4, 0, 0, 1, tzinfo=UTC)  # 1 April + 72 h grace, passed
MAY_CLOSE = datetime(2026, 5, 4, 0, 0, 1, tzinfo=UTC)


def spend(ledger, account_id, dollars, at):
    return ledger.use(account_id, model=R1, output_tokens=int(dollars * 125_000), occurred_at=at)


def invoices(ledger, account_id):
    return ledger.db.execute(
        "SELECT invoice_id, month, amount_due, exact_total, lines FROM invoices "
        "WHERE account_id = %s ORDER BY month",
        (account_id,),
    ).fetchall()


def contract_account(ledger, account_id):
    """Opened with a card and a contract limit high enough not to get in the way."""
    ledger.open_account(account_id)
    ledger.send("PaymentMethodAdded", account_id, payment_method_id="pm", kind="card")
    ledger.send("SpendLimitOverridden", account_id, monthly_limit=Decimal("10000"))


def test_twenty_dollars_of_credits_and_83_of_usage_is_an_invoice_of_63(ledger):
    # Fireworks' own example. $1 sign-up credit + $19 bought = $20 of credits.
    contract_account(ledger, "fw")
    ledger.send(
        "CreditPurchased", "fw", grant_id="buy", amount=Decimal("19"), payment_reference="ch"
    )
    spend(ledger, "fw", 50, MARCH)
    spend(ledger, "fw", 33, MARCH + timedelta(days=5))
    ledger.period_tick(datetime(2026, 4, 2, tzinfo=UTC))  # month over, grace not yet
    ledger.settle(6 + 4)
    assert invoices(ledger, "fw") == []

    ledger.period_tick(APRIL_CLOSE)
    ledger.settle(6 + 8)
    [(invoice_id, month, due, exact, lines)] = invoices(ledger, "fw")
    assert (invoice_id, month, due, exact) == (
        "INV-2026-03-fw",
        "2026-03",
        Decimal("63.00"),
        Decimal("63"),
    )
    assert [(line["kind"], Decimal(line["amount"])) for line in lines] == [("usage", 63)]
    [issued] = ledger.outputs_of("fw", "InvoiceIssued")
    assert (issued["invoice_id"], issued["amount_due"]) == ("INV-2026-03-fw", Decimal("63"))
    # The close is a journal entry, derived from the tick: the receivable moves to invoiced.
    postings = ledger.db.execute(
        "SELECT e.event_type, e.cause_event_id IS NOT NULL, p.ledger_account, p.amount "
        "FROM journal_entries e JOIN postings p USING (shard, shard_seq) "
        "WHERE e.event_id = 'INV-2026-03-fw' ORDER BY p.line"
    ).fetchall()
    assert postings == [
        ("InvoiceIssued", True, "customer:fw:receivable", Decimal("-63")),
        ("InvoiceIssued", True, "customer:fw:invoiced", Decimal("63")),
    ]

    # Paying it clears the receivable and counts towards the tier (19 + 63 ≥ 50: tier 2).
    ledger.send(
        "InvoicePaid", "fw", invoice_id=invoice_id, amount=Decimal("63.00"), payment_reference="ch2"
    )
    ledger.settle(6 + 8 + 1)
    row = ledger.db.execute(
        "SELECT receivable, state->>'paid_total' FROM account_status WHERE account_id = 'fw'"
    ).fetchone()
    assert row == (0, "82.000000000")
    (invoiced,) = ledger.db.execute(
        "SELECT sum(amount) FROM postings WHERE ledger_account = 'customer:fw:invoiced'"
    ).fetchone()
    assert invoiced == 0  # the payment paid the invoice


def test_a_promotional_grant_expires_exactly_at_expires_at(ledger):
    expires = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
    ledger.open_account("exp")
    ledger.send("PaymentMethodAdded", "exp", payment_method_id="pm", kind="card")
    ledger.send(
        "CreditGranted",
        "exp",
        grant_id="promo",
        amount=Decimal("5"),
        kind="promotional",
        expires_at=expires,
        reason="launch",
    )
    spend(ledger, "exp", 1, MARCH)  # promotional grants burn earliest expiry first: promo
    spend(ledger, "exp", 1, expires - timedelta(microseconds=1))  # last moment it is usable
    spend(ledger, "exp", 1, expires)  # expired: from the sign-up credit
    ledger.period_tick(expires + timedelta(minutes=1))
    ledger.settle(6 + 4)
    breakage = ledger.db.execute(
        "SELECT e.occurred_at, p.amount FROM postings p JOIN journal_entries e "
        "USING (shard, shard_seq) WHERE p.ledger_account = 'revenue:breakage'"
    ).fetchall()
    assert breakage == [(expires, Decimal("-3"))]
    grants = ledger.account("exp")["state"]["grants"]
    assert grants == {"promo": "0.000000000", "signup": "0.000000000"}


def test_replaying_a_month_into_an_empty_database_gives_byte_identical_invoices(
    ledger, stack, base_settings
):
    import random

    import psycopg

    from ledger.replay import replay
    from ledger.verify import verify
    from tests.conftest import new_database

    rng = random.Random(5)
    sent = 0
    for n in range(12):
        account = f"rp-{n}"
        contract_account(ledger, account)
        if n % 3 == 0:
            ledger.send(
                "CreditPurchased",
                account,
                grant_id="b",
                amount=Decimal("7.77"),
                payment_reference="",
            )
            sent += 1
        if n % 4 == 0:
            ledger.send(
                "CreditGranted",
                account,
                grant_id="promo",
                amount=Decimal("2"),
                kind="promotional",
                expires_at=MARCH + timedelta(days=3),
                reason="",
            )
            sent += 1
        for _ in range(8):
            spend(
                ledger,
                account,
                Decimal(rng.randrange(1, 400)) / 100,
                MARCH + timedelta(hours=rng.randrange(24 * 20)),
            )
        sent += 3 + 8
    ledger.period_tick(MARCH + timedelta(days=5))
    ledger.period_tick(APRIL_CLOSE)
    ledger.settle(sent + 8)  # March is closed before the late usage arrives
    spend(ledger, "rp-1", Decimal("3.21"), MARCH + timedelta(days=15))  # late
    spend(ledger, "rp-2", Decimal("1.50"), datetime(2026, 4, 8, tzinfo=UTC))
    ledger.period_tick(MAY_CLOSE)
    ledger.settle(sent + 2 + 12)

    def snapshot(dsn):
        with psycopg.connect(dsn) as conn:
            return {
                "invoices": conn.execute(
                    "SELECT invoice_id, account_id, month, issued_at, exact_total, amount_due, "
                    "lines::text FROM invoices ORDER BY invoice_id"
                ).fetchall(),
                "journal": conn.execute(
                    "SELECT shard, shard_seq, event_id, entry_hash FROM journal_entries "
                    "ORDER BY shard, shard_seq"
                ).fetchall(),
                "status": conn.execute(
                    "SELECT account_id, suspended, reasons, status_version, credit_balance, "
                    "receivable, state::text FROM account_status ORDER BY 1"
                ).fetchall(),
            }

    original = snapshot(ledger.dsn)
    assert len(original["invoices"]) >= 10
    assert any("adjustment" in row[6] for row in original["invoices"]), original["invoices"]
    copy = new_database(stack)
    # Derived entries (grant expiries, the month close's invoices) are made again, not replayed.
    # Two processes replay a shard each at a time: the copy is the same as the original.
    assert replay(base_settings, ledger.dsn, copy, jobs=2) == sum(
        1 for row in original["journal"] if ":expiry:" not in row[2] and row[2][:4] != "INV-"
    )
    assert snapshot(copy) == original
    # Invoices and their rounding are posted: verify ties the invoiced receivables to the
    # issued invoices and revenue:rounding to their exact − due, in both journals.
    rounding = ledger.db.execute(
        "SELECT coalesce(sum(exact_total - amount_due), 0) FROM invoices"
    ).fetchone()[0]
    posted = ledger.db.execute(
        "SELECT coalesce(sum(amount), 0) FROM postings WHERE ledger_account = 'revenue:rounding'"
    ).fetchone()[0]
    assert posted == rounding
    assert verify(base_settings, ledger.dsn) == []
    assert verify(base_settings, copy) == []
