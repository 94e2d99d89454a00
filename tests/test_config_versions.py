"""Price-book and policy versions journaled (real Kafka + PostgreSQL): publication, re-rating of
held usage, refusal of a changed version and of configuration sent over Kafka, and a replay
that does not depend on the files."""

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaProducer

from ledger import topics
from ledger.audit import audit_bill
from ledger.codec import Codec
from ledger.config_versions import event_id
from ledger.configure import configured_versions, publish, published
from ledger.errors import ConfigError
from ledger.policy import Policy
from ledger.replay import replay
from ledger.verify import verify
from projections.rebuild import rebuild
from tests.conftest import new_database
from tests.harness import wait_until
from tests.rules import UNPRICED, price_version_with

MARCH = datetime(2026, 3, 3, tzinfo=UTC)
R1 = "accounts/fireworks/models/deepseek-r1"


def entries(dsn: str, event_type: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT e.event_id, e.account_id, e.payload, e.detail,"
            " array_agg(p.ledger_account ORDER BY p.line), array_agg(p.amount ORDER BY p.line)"
            "  FROM journal_entries e LEFT JOIN postings p USING (shard, shard_seq)"
            " WHERE e.event_type = %s GROUP BY e.shard, e.shard_seq ORDER BY e.shard, e.shard_seq",
            (event_type,),
        ).fetchall()


def snapshot(dsn: str) -> dict:
    with psycopg.connect(dsn) as conn:
        return {
            "journal": conn.execute(
                "SELECT shard, shard_seq, event_id, event_type, entry_hash FROM journal_entries "
                "ORDER BY shard, shard_seq"
            ).fetchall(),
            "invoices": conn.execute(
                "SELECT invoice_id, amount_due, lines::text FROM invoices ORDER BY 1"
            ).fetchall(),
            "status": conn.execute(
                "SELECT account_id, state::text FROM account_status ORDER BY 1"
            ).fetchall(),
        }


def test_a_published_price_rerates_held_usage_and_a_replay_ignores_edited_files(
    ledger, stack, base_settings, tmp_path: Path
):
    def settle(more: int) -> None:
        ledger.settle(ledger.journaled() + len(ledger.rejected()) + more)

    with psycopg.connect(ledger.dsn) as conn:
        outcomes = publish(conn, configured_versions(None, None))
    assert [o for _, o in outcomes] == ["published"] * 3  # two price versions, one policy
    ledger.period_tick(datetime(2026, 3, 1, tzinfo=UTC))  # each shard journals them first
    shards = ledger.settings.partitions
    wait_until(
        lambda: all(r["shards"] == shards for r in published(psycopg.connect(ledger.dsn))),
        what="every shard journaled the configured versions",
    )

    # March: an account on a card, usage of a model nobody priced yet (held), priced usage,
    # a purchase charged back.
    base = ledger.journaled() + len(ledger.rejected())
    ledger.open_account("acme")
    ledger.send("PaymentMethodAdded", "acme", payment_method_id="pm", kind="card")
    ledger.send("SpendLimitOverridden", "acme", monthly_limit=Decimal("10000"))
    ledger.use("acme", model=UNPRICED, output_tokens=500_000, occurred_at=MARCH)  # $4 at $8/1M
    ledger.use("acme", model=R1, output_tokens=250_000, occurred_at=MARCH)  # $2
    ledger.send("CreditPurchased", "acme", grant_id="b1", amount=Decimal("3"), payment_reference="")
    ledger.send("CreditRevoked", "acme", grant_id="b1")  # the chargeback
    ledger.settle(base + 7)
    [(held_id, _, held, _, _, _)] = [
        row for row in entries(ledger.dsn, "UsageRecorded") if row[2]["model"] == UNPRICED
    ]
    ledger.period_tick(datetime(2026, 3, 20, tzinfo=UTC))
    ledger.period_tick(datetime(2026, 4, 4, 1, tzinfo=UTC))  # March closes
    wait_until(
        lambda: ledger.db.execute(
            "SELECT 1 FROM invoices WHERE invoice_id = 'INV-2026-03-acme'"
        ).fetchone(),
        what="March's invoice (the month closed before the late usage is sent)",
    )
    # Late usage after the close: on April's invoice as an adjustment.
    base = ledger.journaled() + len(ledger.rejected())
    ledger.use("acme", model=R1, output_tokens=125_000, occurred_at=MARCH + timedelta(days=9))
    ledger.settle(base + 1)  # the ticks before are journaled already (March closed)

    # A price for the held model, effective before the usage: re-rated once, as new entries.
    version = price_version_with(UNPRICED, "8", "2026-03-acme", datetime(2026, 3, 1, tzinfo=UTC))
    with psycopg.connect(ledger.dsn) as conn:
        assert publish(conn, [version]) == [(f"price_book {version.ref}", "published")]
    ledger.period_tick(datetime(2026, 4, 10, tzinfo=UTC))
    wait_until(lambda: entries(ledger.dsn, "UsageRerated"), what="the held usage re-rated")
    [(rerated_id, account, payload, detail, accounts, amounts)] = entries(
        ledger.dsn, "UsageRerated"
    )
    assert (rerated_id, account, payload["usage_event_id"]) == (
        f"{held_id}:rerated",
        "acme",
        held["event_id"],
    )
    assert dict(zip(accounts, amounts, strict=True)) == {
        "customer:acme:receivable": Decimal(4),
        "revenue:usage": Decimal(-4),
    }
    assert detail["price_ref"] == version.ref  # the version it used, fingerprinted

    # Publishing the same name with other content is refused, naming it; nothing changes.
    changed = price_version_with(UNPRICED, "9", "2026-03-acme", datetime(2026, 3, 1, tzinfo=UTC))
    with psycopg.connect(ledger.dsn) as conn, pytest.raises(ConfigError, match="2026-03-acme"):
        publish(conn, [changed])

    # Configuration sent over Kafka is quarantined, never applied.
    forged = changed.event(0, datetime.now(UTC)) | {"event_id": event_id("price_book", "x", 0)}
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap)
    producer.send(
        ledger.settings.topic(topics.CONTROL), Codec.default().encode("ConfigPublished", forged)
    )
    producer.flush()
    producer.close()
    wait_until(
        lambda: [r for r in ledger.rejected() if "never from Kafka" in (r[4] or "")],
        what="the forged publication quarantined",
    )
    assert published(psycopg.connect(ledger.dsn))[-1]["version"] == "2026-03-acme"

    ledger.period_tick(datetime(2026, 5, 4, 1, tzinfo=UTC))  # April closes
    wait_until(
        lambda: ledger.db.execute(
            "SELECT lines FROM invoices WHERE invoice_id = 'INV-2026-04-acme'"
        ).fetchone(),
        what="April's invoice",
    )
    [april] = ledger.db.execute(
        "SELECT lines FROM invoices WHERE invoice_id = 'INV-2026-04-acme'"
    ).fetchone()
    # The late $1 and the re-rated $4, both March usage, on April's invoice.
    assert [(x["kind"], x["month"], Decimal(x["amount"])) for x in april] == [
        ("adjustment", "2026-03", Decimal(5))
    ]
    ledger.wait_projected()
    calls: list[tuple[int, int]] = []
    rebuild(ledger.settings, ledger.dsn, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] > 0  # the progress bar ends at its total
    assert verify(ledger.settings, ledger.dsn) == []
    # March's bill: the re-rated usage is a priced line, no longer held.
    with psycopg.connect(ledger.dsn) as conn:
        bill = audit_bill(conn, Policy.load(), "acme", "2026-03", None)
    assert bill["unpriced_usage"] == []
    [line] = [u for u in bill["usage"] if u["model"] == UNPRICED]
    assert (Decimal(line["amount"]), line["price_version"]) == (Decimal(4), "2026-03-acme")

    # A replay under edited files (prices doubled, a different sign-up credit) gives the
    # same journal, invoices and states: it follows the journaled versions.
    root = Path(__file__).parents[1] / "ledger"
    edited_prices = tmp_path / "pricebook.toml"
    edited_prices.write_text(
        (root / "pricebook.toml").read_text().replace('output = "8.00"', 'output = "16.00"')
    )
    edited_policy = tmp_path / "policy.toml"
    edited_policy.write_text(
        (root / "policy.toml").read_text().replace('credit = "1.00"', 'credit = "7.00"')
    )
    edited = dataclasses.replace(base_settings, price_book=edited_prices, policy=edited_policy)
    copy = new_database(stack)
    replay(edited, ledger.dsn, copy)
    assert snapshot(copy) == snapshot(ledger.dsn)
