"""The journal in PostgreSQL, written by LedgerWriter directly (no Kafka): append-only,
balanced, exactly-once against the stored offsets."""

import dataclasses
import gc
import uuid
import weakref
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest
from structlog.testing import capture_logs

from ledger import chain_keys
from ledger.codec import Codec
from ledger.errors import DecodeError
from ledger.journal import OffsetGapError, split_fetched
from ledger.policy import Policy
from ledger.verify import check_journal

T0 = datetime(2026, 3, 1, tzinfo=UTC)
TOPIC = "billing.accounts.v1"


@dataclasses.dataclass
class FakeRecord:
    """The shape of a Kafka record: the writer needs nothing else."""

    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    headers: tuple = ()


def record(
    topic: str, event_type: str, account_id: str, offset: int, partition: int = 0, **fields
) -> FakeRecord:
    """A new event of `account_id` at T0 (with `fields`), as the record Kafka would deliver."""
    event = {"event_id": str(uuid.uuid4()), "account_id": account_id, "occurred_at": T0, **fields}
    value = Codec.default().encode(event_type, event)
    return FakeRecord(topic, partition, offset, value, account_id.encode())


def opened(account_id: str, offset: int, partition: int = 0) -> FakeRecord:
    return record(TOPIC, "AccountOpened", account_id, offset, partition, created_at=T0)


def count(dsn, table):
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.mark.parametrize("table", ["raw_events", "journal_entries", "postings"])
@pytest.mark.parametrize(
    "statement", ["UPDATE {} SET account_id = 'x'", "DELETE FROM {}", "TRUNCATE {} CASCADE"]
)
def test_journal_tables_refuse_update_delete_and_truncate(writer, owner_dsn, table, statement):
    """Even the owner (who may not be refused by privileges) is refused by the triggers; the
    writer has no such privilege at all (tests/test_roles.py)."""
    writer.write_batch([opened("a", 0)])
    with (
        psycopg.connect(owner_dsn) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
    ):
        conn.execute(statement.format(table))
    assert count(owner_dsn, table) >= 1


def test_an_unbalanced_entry_cannot_commit(writer, dsn):
    writer.write_batch([opened("a", 0)])
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO raw_events SELECT 'e2', event_type, account_id, topic, "
            "kafka_partition, 99, fingerprint, content_hash, raw, occurred_at, "
            "recorded_at FROM raw_events LIMIT 1"
        )
        conn.execute(
            "INSERT INTO journal_entries (shard, shard_seq, event_id, account_id, "
            "event_type, status, occurred_at, payload, prev_hash, entry_hash) "
            "VALUES (0, 99, 'e2', 'a', 'X', 'posted', now(), '{}', '', '')"
        )
        # Checked per statement (migration 0010): the insert itself is refused.
        with pytest.raises(psycopg.errors.CheckViolation, match=r"\(0, 99\) is unbalanced"):
            conn.execute("INSERT INTO postings VALUES (0, 99, 0, 'cash', 'a', 5, 'USD')")


def test_postings_of_an_entry_that_does_not_exist_are_refused(writer, dsn):
    """Checked per statement (migration 0012, in place of a per-row foreign key): one posting
    without its entry among postings with theirs fails the whole statement, balanced or not."""
    writer.write_batch([opened("a", 0)])
    with psycopg.connect(dsn) as conn:
        (seq,) = conn.execute(
            "SELECT max(shard_seq) FROM journal_entries WHERE shard = 0"
        ).fetchone()
        with pytest.raises(
            psycopg.errors.ForeignKeyViolation, match=r"\(0, 9999\), which does not"
        ):
            conn.execute(
                "INSERT INTO postings VALUES (0, %s, 7, 'cash', 'a', 5, 'USD'), "
                "(0, %s, 8, 'revenue:usage', 'a', -5, 'USD'), "
                "(0, 9999, 0, 'cash', 'a', 5, 'USD'), "
                "(0, 9999, 1, 'revenue:usage', 'a', -5, 'USD')",
                (seq, seq),
            )
        conn.rollback()
    assert count(dsn, "postings") == 2  # the sign-up's two postings only


def test_a_batch_of_postings_with_one_unbalanced_entry_is_refused_whole(writer, dsn):
    """The balance check runs once per statement over every posting it inserts (the writer's
    one COPY per batch): one unbalanced entry among balanced ones fails the whole statement."""
    writer.write_batch([opened("a", 0)])
    with psycopg.connect(dsn) as conn:
        for seq in (98, 99):
            conn.execute(
                "INSERT INTO raw_events SELECT %s, event_type, account_id, topic, "
                "kafka_partition, %s, fingerprint, content_hash, raw, occurred_at, "
                "recorded_at FROM raw_events LIMIT 1",
                (f"e{seq}", seq),
            )
            conn.execute(
                "INSERT INTO journal_entries (shard, shard_seq, event_id, account_id, "
                "event_type, status, occurred_at, payload, prev_hash, entry_hash) "
                "VALUES (0, %s, %s, 'a', 'X', 'posted', now(), '{}', '', '')",
                (seq, f"e{seq}"),
            )
        balanced = "(0, 98, 0, 'cash', 'a', 5, 'USD'), (0, 98, 1, 'revenue:usage', 'a', -5, 'USD')"
        with pytest.raises(psycopg.errors.CheckViolation, match=r"\(0, 99\) is unbalanced"):
            conn.execute(
                f"INSERT INTO postings VALUES {balanced}, (0, 99, 0, 'cash', 'a', 5, 'USD'), "
                "(0, 99, 1, 'revenue:usage', 'a', -4, 'USD')"
            )
        conn.rollback()
    assert count(dsn, "postings") == 2  # the sign-up's two postings only


def test_postings_of_every_entry_sum_to_zero(writer, dsn):
    writer.write_batch([opened(f"acct-{i}", i) for i in range(20)])
    with psycopg.connect(dsn) as conn:
        sums = conn.execute("SELECT shard_seq, sum(amount) FROM postings GROUP BY 1").fetchall()
    assert len(sums) == 20 and all(total == 0 for _, total in sums)


def test_the_books_are_saved_with_their_next_expiry_and_first_pending_month(writer, dsn):
    """The columns the month close and the expiry ticks select books by, exact."""
    expires = datetime(2026, 6, 30, 12, 34, 56, 789000, tzinfo=UTC)
    grant = record(
        "billing.credits.v1",
        "CreditGranted",
        "b1",
        0,
        grant_id="promo-1",
        amount=Decimal("5.00"),
        kind="promotional",
        expires_at=expires,
        reason="test",
    )
    usage = record(
        "billing.usage.v1",
        "UsageRecorded",
        "b2",
        0,
        request_id="r1",
        product="serverless",
        model="accounts/fireworks/models/deepseek-r1",
        service_tier="standard",
        output_tokens=1_000_000,  # $8: beyond the $1 sign-up credit
    )
    writer.write_batch([opened("b1", 0), opened("b2", 1), grant, usage])
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT account_id, shard, next_expiry, first_pending_month, book->'pending' "
            "FROM account_books ORDER BY account_id"
        ).fetchall()
    assert [row[:4] for row in rows] == [("b1", 0, expires, None), ("b2", 0, None, "2026-03")]
    assert rows[0][4] == {} and list(rows[1][4]) == ["2026-03"]


def test_a_record_refused_when_decoded_ahead_is_quarantined_and_holds_no_batch_in_memory(
    writer, dsn
):
    # The consumer decodes the next batch while the previous one is written (`prepare`). An
    # error kept from that, raised again or with its traceback, held the frames it went
    # through, and with them the whole batch, in a reference cycle: memory only the cyclic
    # collector gave back (a worker with a lazier collector grew to 400 MiB).
    good = opened("acct-ahead", 0)
    bad = FakeRecord(TOPIC, 0, 1, b"not avro at all", b"acct-ahead")
    prepared = writer.prepare([good, bad])
    kept = prepared[(TOPIC, 0, 1)][1]
    assert isinstance(kept, DecodeError) and kept.__traceback__ is None
    alive = weakref.ref(good)
    gc.collect()
    gc.disable()
    try:
        result = writer.write_batch([good, bad], prepared=prepared)
        del prepared, good, bad
        assert alive() is None  # freed by reference counting alone
    finally:
        gc.enable()
    assert (result.journaled, result.rejected_by_reason) == (1, {"bad_magic": 1})
    assert kept.__traceback__ is None
    assert count(dsn, "rejected_events") == 1


def test_a_redelivered_batch_is_dropped_against_the_stored_offsets(writer, dsn):
    batch = [opened("a", 0), opened("b", 1)]
    first = writer.write_batch(batch)
    assert (first.journaled, first.next_offsets) == (2, {(TOPIC, 0): 2})
    # A zombie consumer (or a crash before Kafka learned of the commit) delivers it again.
    again = writer.write_batch([*batch, opened("c", 2)])
    assert (again.stale, again.journaled) == (2, 1)
    assert count(dsn, "journal_entries") == 3


def test_a_batch_that_would_skip_records_is_refused(writer, dsn):
    writer.write_batch([opened("a", 0)])
    with pytest.raises(OffsetGapError, match="stored next offset is 1"):
        writer.write_batch([opened("b", 5)])
    assert count(dsn, "journal_entries") == 1


def test_shard_sequences_are_gapless_per_shard(writer, dsn):
    writer.write_batch([opened(f"x{i}", i // 2, partition=i % 2) for i in range(10)])
    writer.write_batch([opened(f"y{i}", 5 + i // 2, partition=i % 2) for i in range(6)])
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT shard, array_agg(shard_seq ORDER BY shard_seq) "
            "FROM journal_entries GROUP BY shard ORDER BY shard"
        ).fetchall()
    assert rows == [(0, list(range(1, 9))), (1, list(range(1, 9)))]


def test_each_entry_links_to_the_previous_entry_of_its_shard_with_the_chain_key(
    writer, dsn, base_settings
):
    writer.write_batch([opened("a", 0), opened("b", 1), opened("c", 0, partition=1)])
    purchase = record(
        "billing.credits.v1",
        "CreditPurchased",
        "a",
        0,
        grant_id="g",
        amount=Decimal("3"),
        payment_reference="",
    )
    writer.write_batch([purchase])
    keys = chain_keys.load(base_settings)
    with psycopg.connect(dsn) as conn:
        chain = conn.execute(
            "SELECT account_id, prev_hash, entry_hash, chain_key_id FROM journal_entries "
            "WHERE shard = 0 ORDER BY shard_seq"
        ).fetchall()
        heads = dict(conn.execute("SELECT shard, head_hash FROM shard_heads"))
        differences = check_journal(conn, keys, Policy.load())
    # One chain per shard, across accounts: a, b, then a again.
    assert [a for a, *_ in chain] == ["a", "b", "a"]
    assert chain[0][1] == b"\x00" * 32
    assert chain[1][1] == chain[0][2] and chain[2][1] == chain[1][2]
    assert heads[0] == chain[-1][2] and heads[1] != chain[-1][2]
    assert {k for *_, k in chain} == {keys.current}
    assert differences == []
    # Linked with another key, the same journal does not verify.
    other = chain_keys.parse(f"{keys.current} {'ab' * 32}\n", source="another key file")
    with psycopg.connect(dsn) as conn:
        [first] = [d for d in check_journal(conn, other, Policy.load()) if "(0, 1)" in d.subject]
    assert first.check == "hash_chain" and "keyed link does not verify" in first.detail


def test_each_batch_logs_one_canonical_line_with_its_counts(writer):
    from structlog.testing import capture_logs

    bad = FakeRecord(TOPIC, 0, 2, b"garbage")
    with capture_logs() as logs:
        writer.write_batch([opened("a", 0), opened("b", 1), bad])
    [line] = [entry for entry in logs if entry["event"] == "batch_committed"]
    assert (line["records"], line["journaled"], line["rejected"], line["duplicates"]) == (
        3,
        2,
        1,
        0,
    )
    [rejected] = [entry for entry in logs if entry["event"] == "event_rejected"]
    assert (rejected["reason"], rejected["offset"]) == ("bad_magic", 2)


def test_a_split_batch_hands_each_half_the_offsets_it_fetched():
    """Bisecting a failed batch: the left half ends after its last record of a partition,
    the right half starts there; a partition with nothing but markers goes with the left."""
    a, b, c = (FakeRecord(TOPIC, 0, o, b"") for o in (3, 5, 9))
    d = FakeRecord(TOPIC, 1, 4, b"")
    fetched = {(TOPIC, 0): (2, 12), (TOPIC, 1): (4, 6), (TOPIC, 2): (7, 8)}
    left, right = split_fetched(fetched, [a, b], [c, d])
    assert left == {(TOPIC, 0): (2, 6), (TOPIC, 2): (7, 8)}
    assert right == {(TOPIC, 0): (6, 12), (TOPIC, 1): (4, 6)}
    assert split_fetched(None, [a], [b]) == (None, None)


def test_a_tick_passes_by_an_account_whose_month_close_raises_and_keeps_its_book(
    writer, dsn, monkeypatch
):
    """One account's invoice cannot be derived (a bug, or a book that reads but holds what
    the fold never wrote): the closing tick is journaled, the other account is invoiced, and
    the failing account is passed by with its book as it was before the attempt (which had
    already moved it), instead of the tick being quarantined and the shard's clock stopped."""
    from ledger import journal

    def usage(account_id: str, offset: int) -> FakeRecord:
        return record(
            "billing.usage.v1", "UsageRecorded", account_id, offset, request_id=f"r{offset}",
            product="serverless", model="accounts/fireworks/models/deepseek-r1",
            service_tier="standard", output_tokens=1_000_000,
        )  # fmt: skip

    writer.write_batch([opened("c1", 0), opened("c2", 1), usage("c1", 0), usage("c2", 1)])
    real = journal.invoice_events

    def failing_for_c1(policy, tick, previous, account_id, book):
        if account_id == "c1":
            book.receivable += 1  # moved before it raises: must not be kept
            raise ArithmeticError("no invoice for c1")
        return real(policy, tick, previous, account_id, book)

    monkeypatch.setattr(journal, "invoice_events", failing_for_c1)
    with psycopg.connect(dsn) as conn:
        (before,) = conn.execute(
            "SELECT book FROM account_books WHERE account_id = 'c1'"
        ).fetchone()
    close = datetime(2026, 4, 4, 0, 0, 1, tzinfo=UTC)
    tick = record("billing.control.v1", "PeriodTick", "", 0, tick_at=close, occurred_at=close)
    with capture_logs() as logs:
        result = writer.write_batch([tick])
    assert result.rejected == 0
    with psycopg.connect(dsn) as conn:
        journaled = conn.execute(
            "SELECT event_type, account_id FROM journal_entries WHERE shard_seq > 4 "
            "ORDER BY shard_seq"
        ).fetchall()
        (after,) = conn.execute("SELECT book FROM account_books WHERE account_id = 'c1'").fetchone()
    assert journaled == [("PeriodTick", ""), ("InvoiceIssued", "c2")]
    assert after == before
    [skipped] = [e for e in logs if e["event"] == "account_skipped"]
    assert (skipped["account_id"], skipped["entry"]) == ("c1", "InvoiceIssued")
    assert skipped["error"] == "ArithmeticError: no invoice for c1"


@pytest.mark.parametrize(
    "change",
    ["DELETE FROM shard_heads WHERE shard = 0", "UPDATE shard_heads SET last_seq = 1"],
    ids=["deleted", "moved-back"],
)
def test_a_shard_head_left_behind_its_journal_by_hand_is_repaired_not_every_event_quarantined(
    writer, dsn, admin_dsn, base_settings, change
):
    """shard_heads is the writer's working state. A head behind the journal would hand out
    sequence numbers already taken: every batch of the shard would fail on the journal's
    primary key and each of its events be quarantined, for good. The writer numbers on from
    the journal's last entry and links to it, with one error line per repair, and the
    journal still verifies."""
    writer.write_batch([opened("a", 0), opened("b", 1)])
    with psycopg.connect(admin_dsn, autocommit=True) as su:
        su.execute(change)
    with capture_logs() as logs:
        result = writer.write_batch([opened("c", 2), opened("d", 3)])
        again = writer.write_batch([opened("e", 4)])
    assert (result.journaled, result.rejected, again.journaled) == (2, 0, 1)
    [repaired] = [e for e in logs if e["event"] == "shard_head_repaired"]
    assert (repaired["shard"], repaired["journal_seq"]) == (0, 2)
    assert repaired["head_seq"] == (0 if change.startswith("DELETE") else 1)
    with psycopg.connect(dsn) as conn:
        seqs = conn.execute(
            "SELECT account_id, shard_seq FROM journal_entries ORDER BY shard_seq"
        ).fetchall()
        assert conn.execute("SELECT last_seq FROM shard_heads").fetchall() == [(5,)]
        differences = check_journal(conn, chain_keys.load(base_settings), Policy.load())
    assert seqs == [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)]
    assert differences == []


def test_a_configuration_entry_changed_by_hand_is_read_from_its_publication(
    writer, dsn, admin_dsn, tmp_path
):
    """The versions a shard prices and bills by are read back from its ConfigPublished
    entries (after a restart, or when another writer held the shard). One whose payload no
    longer reads is taken from the publication it was made from (sha256 checked), with an
    error line, so the shard goes on as journaled; with that row gone too, the batch fails
    (the consumer retries it) rather than price anything by guess or quarantine it."""
    from ledger.config_versions import policy_version
    from ledger.configure import publish
    from tests.test_projection_workers import raised_policy

    with psycopg.connect(dsn) as conn:
        publish(conn, [policy_version(raised_policy(tmp_path))])
    writer.write_batch([opened("a", 0)])  # journals the version on shard 0 first
    with psycopg.connect(admin_dsn, autocommit=True) as su:
        su.execute("SET session_replication_role = replica")  # past the append-only guard
        su.execute(
            'UPDATE journal_entries SET payload = \'{"kind": "policy"}\' '
            "WHERE event_type = 'ConfigPublished'"
        )
    writer._configs.clear()  # as after a restart
    with capture_logs() as logs:
        result = writer.write_batch([opened("b", 1)])
    assert (result.journaled, result.rejected) == (1, 0)
    [unreadable] = [e for e in logs if e["event"] == "config_entry_unreadable"]
    assert unreadable["event_id"] == "config:policy:2026-02:0"
    assert unreadable["using"] == "config_publications"
    assert writer._configs[0][1].policy.version == "2026-02"

    with psycopg.connect(admin_dsn, autocommit=True) as su:
        su.execute("DELETE FROM config_publications")
    writer._configs.clear()
    with pytest.raises(KeyError):
        writer.write_batch([opened("c", 2)])
    assert count(dsn, "rejected_events") == 0 and count(dsn, "journal_entries") == 3


def test_an_account_whose_book_was_deleted_is_held_not_started_afresh(
    writer, dsn, admin_dsn, base_settings
):
    """An account with journal entries but no book (its row deleted by hand) is not a new
    account: a fresh book would forget its grants and bill what they should pay. Its events
    are quarantined, saying why, until `ledger books restore` writes the book anew."""
    from ledger.audit import restore_book

    def use(offset: int) -> FakeRecord:
        return record(
            "billing.usage.v1", "UsageRecorded", "gone", offset, request_id=f"r{offset}",
            product="serverless", model="accounts/fireworks/models/deepseek-r1",
            service_tier="standard", output_tokens=10_000,
        )  # fmt: skip

    writer.write_batch([opened("gone", 0), use(0)])
    with psycopg.connect(admin_dsn, autocommit=True) as su:
        su.execute("DELETE FROM account_books WHERE account_id = 'gone'")
    held = writer.write_batch([use(1)])
    assert (held.journaled, held.rejected_by_reason) == (0, {"processing_error": 1})
    with psycopg.connect(dsn) as conn:
        (detail,) = conn.execute("SELECT detail FROM rejected_events").fetchone()
        assert "no book, yet the journal has entries of it" in detail
        done = restore_book(conn, Policy.load(), "gone")
    assert (done.changed, done.was) == (True, "missing")
    assert writer.write_batch([use(2)]).journaled == 1
    with psycopg.connect(dsn) as conn:
        assert check_journal(conn, chain_keys.load(base_settings), Policy.load()) == []
