"""Tamper evidence against someone with database superuser access (but not the chain key):
a rewritten entry with its chain recomputed, a changed account book, a rotated key, a cut
tail. Real Kafka and PostgreSQL; the relay publishes checkpoints every second."""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
from kafka import KafkaAdminClient, KafkaProducer
from psycopg.types.json import Jsonb
from structlog.testing import capture_logs

from ledger import chain_keys, topics
from ledger.audit import journal_book
from ledger.book import (
    AccountBook,
    Entry,
    Posting,
    canonical_json,
    chain_hash,
    chain_link,
    link_header,
)
from ledger.checkpoints import digest, latest, parse_digest, read_topic
from ledger.db import QUERIES
from ledger.policy import Policy
from ledger.verify import verify as verify_once
from projections.rebuild import rebuild
from tests.harness import T0, wait_until
from tests.test_cli import ledger_cli


@pytest.fixture
def settings(settings, tmp_path):
    """Checkpoints every second, and a chain key file of this test's own (k1)."""
    key_file = tmp_path / "chain.keys"
    chain_keys.add_key(key_file, "k1")
    return dataclasses.replace(settings, checkpoint_interval_s=1, chain_key_file=key_file)


def verify(settings, dsn, **options):
    """verify's differences, which must be the same whether one process checks every shard
    or two processes check them side by side, in one snapshot."""
    apart = verify_once(settings, dsn, jobs=2, **options)
    together = verify_once(settings, dsn, jobs=1, **options)
    assert apart == together
    return together


def traffic(ledger, prefix: str = "tp", days: int = 2, accounts: int = 8) -> int:
    """Accounts with sign-up credit, usage past it, a purchase, a promotion that expires at a
    tick `days` after T0; waits until all of it is journaled, projected and published, and
    returns the number of journal entries."""
    already = ledger.journaled()
    sent = 0
    for n in range(accounts):
        a = f"{prefix}-{n}"
        ledger.open_account(a)
        ledger.use(a, output_tokens=400_000 * (n + 1))  # the later ones exhaust the $1
        sent += 2
    ledger.send("CreditPurchased", f"{prefix}-0", grant_id="buy", amount=Decimal("10"),
                payment_reference="ch")  # fmt: skip
    ledger.send("CreditGranted", f"{prefix}-1", grant_id="promo", amount=Decimal("5"),
                kind="promotional", expires_at=T0 + timedelta(days=1), reason="")  # fmt: skip
    sent += 2 + ledger.period_tick(T0 + timedelta(days=days))
    ledger.settle(already + sent + 1, timeout=60)  # + the promotion's expiry
    return already + sent + 1


def wait_journaled(ledger, *events: dict) -> None:
    ids = [e["event_id"] for e in events]
    wait_until(
        lambda: (
            ledger.db.execute(
                "SELECT count(*) FROM journal_entries WHERE event_id = ANY(%s)", (ids,)
            ).fetchone()[0]
            == len(ids)
        ),
        30,
        f"events {ids} journaled",
    )


def current_checkpoints(ledger, keys):
    """The checkpoints on the topic, once they cover every shard's head."""

    def covering():
        found, problems = read_topic(ledger.settings, ledger.bootstrap, keys)
        assert problems == []
        heads = dict(ledger.db.execute("SELECT shard, last_seq FROM shard_heads"))
        have = {shard: cp.seq for shard, cp in latest(found).items()}
        return found if heads and have == heads else None

    return wait_until(covering, 60, "checkpoints covering every shard's head")


def superuser(dsn):
    """A session that bypasses the append-only triggers, as a database superuser can (`dsn`:
    the cluster's superuser on the test's database; the workers' role cannot)."""
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("SET session_replication_role = replica")
    return conn


def relink(conn, shard: int, from_seq: int, link) -> None:
    """What an attacker does after changing entry (shard, from_seq): recompute every link from
    there to the shard's end with `link(prev, row)` and move the shard's head."""
    rows = conn.execute(QUERIES["chain_entries"], (shard,)).fetchall()
    prev = next(bytes(r[9]) for r in rows if r[2] == from_seq - 1) if from_seq > 1 else None
    prev = prev if prev is not None else b"\x00" * 32
    for row in rows:
        if row[2] < from_seq:
            continue
        new = link(prev, row)
        conn.execute(
            "UPDATE journal_entries SET prev_hash = %s, entry_hash = %s "
            "WHERE shard = %s AND shard_seq = %s",
            (prev, new, shard, row[2]),
        )
        prev = new
    conn.execute("UPDATE shard_heads SET head_hash = %s WHERE shard = %s", (prev, shard))


def _entry(row) -> tuple[str, Entry, bytes]:
    postings = tuple(Posting(a, Decimal(v)) for a, v in zip(row[11], row[12], strict=True))
    return canonical_json(row[6]), Entry(row[5], postings, detail=row[7]), bytes(row[10] or b"")


def unkeyed(prev: bytes, row) -> bytes:
    """The public, unkeyed hash function (what the chain was before it was keyed)."""
    payload, entry, raw = _entry(row)
    return chain_hash(prev, payload, entry, raw)


def wrong_key(prev: bytes, row) -> bytes:
    """The keyed link, exactly as the writer makes it, but under a key the attacker made up
    (with the entry's own key id)."""
    payload, entry, raw = _entry(row)
    account_id, shard, seq, _, event_type = row[:5]
    header = link_header(row[13], shard, seq, event_type, account_id, row[14], row[15], row[16])
    mac = hmac.new(os.urandom(32), digestmod="sha256")
    return chain_link(mac, prev, header, payload, entry, raw)


@pytest.mark.parametrize("recompute", [unkeyed, wrong_key], ids=["unkeyed", "wrong-key"])
def test_an_amount_moved_by_five_with_the_chain_recomputed_is_reported_at_its_entry(
    ledger, settings, recompute, admin_dsn
):
    traffic(ledger)
    ledger.stop()  # the attacker works on a quiet database
    assert verify(settings, ledger.dsn) == []
    conn = superuser(admin_dsn)
    # A usage entry that charged both credit and receivable, with entries after it.
    shard, seq, event_id, account_id = conn.execute(
        "SELECT e.shard, e.shard_seq, e.event_id, e.account_id FROM journal_entries e "
        "WHERE e.event_type = 'UsageRecorded' AND (SELECT count(*) FROM postings p "
        "  WHERE (p.shard, p.shard_seq) = (e.shard, e.shard_seq)) = 3 "
        "  AND EXISTS (SELECT 1 FROM journal_entries l "
        "              WHERE l.shard = e.shard AND l.shard_seq > e.shard_seq) "
        "ORDER BY e.shard, e.shard_seq LIMIT 1"
    ).fetchone()
    # +5 owed, +5 revenue: still balanced, the trial balance stays zero.
    conn.execute(
        "UPDATE postings SET amount = amount + 5 WHERE shard = %s AND shard_seq = %s "
        "AND ledger_account LIKE 'customer:%%:receivable'",
        (shard, seq),
    )
    conn.execute(
        "UPDATE postings SET amount = amount - 5 WHERE shard = %s AND shard_seq = %s "
        "AND ledger_account = 'revenue:usage'",
        (shard, seq),
    )
    # The writer's book is made to agree (folded from the changed journal, as verify folds
    # it: receivable and the charges waiting for an invoice), the chain recomputed, the
    # projections rebuilt.
    book = journal_book(conn, Policy.load(settings.policy), account_id)
    assert (
        book.receivable
        == Decimal(
            conn.execute(
                "SELECT book->>'receivable' FROM account_books WHERE account_id = %s", (account_id,)
            ).fetchone()[0]
        )
        + 5
    )
    conn.execute(
        "UPDATE account_books SET book = %s WHERE account_id = %s",
        (Jsonb(book.to_json()), account_id),
    )
    relink(conn, shard, seq, recompute)
    conn.close()
    rebuild(settings, ledger.dsn)

    differences = verify(settings, ledger.dsn)
    chain = [d for d in differences if d.check == "hash_chain"]
    assert [d.subject for d in chain] == [
        f"account {account_id!r} entry ({shard}, {seq}) UsageRecorded {event_id}"
    ]
    assert "hash mismatch" in chain[0].detail
    assert [d for d in differences if d.check in ("account_book", "projection")] == []


def test_a_grant_remaining_changed_in_the_account_book_is_reported(ledger, settings, admin_dsn):
    traffic(ledger)
    ledger.stop()
    with superuser(admin_dsn) as conn:
        conn.execute(
            "UPDATE account_books SET book = jsonb_set(book, '{grants,signup,remaining}', "
            "'\"1000\"') WHERE account_id = 'tp-7'"
        )
    differences = verify(settings, ledger.dsn)
    assert [(d.check, d.subject) for d in differences] == [("account_book", "tp-7")]
    assert "grant 'signup' remaining: book=1000 journal=0" in differences[0].detail


def test_balanced_postings_of_no_entry_are_reported(ledger, settings, admin_dsn):
    """A superuser adds a balanced pair of postings under an entry that does not exist: the
    trial balance stays zero and no entry changed, but verify names them."""
    traffic(ledger)
    ledger.stop()
    with superuser(admin_dsn) as conn:
        conn.execute(
            "INSERT INTO postings VALUES (0, 999999, 0, 'customer:tp-7:credit:signup', 'tp-7', "
            "-1000, 'USD'), (0, 999999, 1, 'expense:promotional', 'tp-7', 1000, 'USD')"
        )
    differences = verify(settings, ledger.dsn)
    assert [(d.check, d.subject) for d in differences] == [("postings", "entry (0, 999999)")]
    assert "2 posting(s) summing to 0" in differences[0].detail


def test_entries_before_and_after_a_key_rotation_verify(ledger, settings, tmp_path):
    traffic(ledger, "before")
    before = current_checkpoints(ledger, chain_keys.load(settings))
    ledger.stop()
    assert chain_keys.add_key(settings.chain_key_file, "k2") == "k2"
    assert chain_keys.load(settings).current == "k2"
    ledger.start()  # the roles load the key file again: k2 links from now on
    traffic(ledger, "after", days=3)
    keys = chain_keys.load(settings)
    found = current_checkpoints(ledger, keys)
    ledger.stop()

    assert verify(settings, ledger.dsn, checkpoints=found) == []
    rows = ledger.db.execute(
        "SELECT shard, shard_seq, chain_key_id, prev_hash, entry_hash FROM journal_entries "
        "ORDER BY shard, shard_seq"
    ).fetchall()
    assert {r[2] for r in rows} == {"k1", "k2"}
    shards_rotated = 0
    for previous, row in itertools.pairwise(rows):
        if previous[0] == row[0] and (previous[2], row[2]) == ("k1", "k2"):
            assert row[3] == previous[4]  # the first k2 link chains on from the last k1 one
            shards_rotated += 1
    assert shards_rotated >= 2
    assert len(found) > len(before)  # checkpoints under k1 and under k2, all verified

    # Without k1, what it linked (and the checkpoints it signed) can no longer be verified.
    k2_only = tmp_path / "k2-only.keys"
    k2_only.write_text(
        "".join(
            line
            for line in settings.chain_key_file.read_text().splitlines(True)
            if line.startswith("k2 ")
        )
    )
    without_k1 = chain_keys.load(dataclasses.replace(settings, chain_key_file=k2_only))
    differences = verify(settings, ledger.dsn, keys=without_k1)
    assert differences and all(d.check == "hash_chain" for d in differences)
    assert all(", 1) " in d.subject for d in differences)  # each shard's first entry
    assert all("chain key 'k1', which the key file does not hold" in d.detail for d in differences)
    _, problems = read_topic(settings, ledger.bootstrap, without_k1)
    assert len(problems) >= len(before)
    assert all("signed with chain key 'k1'" in p for p in problems)


def test_a_cut_tail_is_caught_by_the_checkpoints_that_covered_it(
    ledger, settings, tmp_path, admin_dsn
):
    traffic(ledger)
    # The last two entries of tp-3's shard: payment method changes (the book does not move).
    first = ledger.send("PaymentMethodAdded", "tp-3", payment_method_id="pm-1", kind="card")
    last = ledger.send("PaymentMethodRemoved", "tp-3", payment_method_id="pm-1")
    wait_journaled(ledger, first, last)
    ledger.wait_projected()
    keys = chain_keys.load(settings)
    found = current_checkpoints(ledger, keys)
    env = {
        "LEDGER_KAFKA_BOOTSTRAP": ledger.bootstrap,
        "LEDGER_DATABASE_URL": ledger.dsn,
        "LEDGER_TOPIC_PREFIX": settings.topic_prefix,
        "LEDGER_CHAIN_KEY_FILE": str(settings.chain_key_file),
    }
    printed = ledger_cli("checkpoints", "digest", env=env)
    assert printed.returncode == 0, printed.stderr
    expected = digest(found, settings.topic(topics.CHECKPOINTS)).splitlines()
    assert printed.stdout.splitlines()[1:-1] == expected[1:-1]  # the shards' lines
    kept = tmp_path / "auditor-digest.txt"
    kept.write_text(printed.stdout)
    ledger.stop()

    shard, seq = ledger.db.execute(
        "SELECT shard, max(shard_seq) FROM journal_entries WHERE shard = "
        "(SELECT shard FROM account_books WHERE account_id = 'tp-3') GROUP BY shard"
    ).fetchone()
    (event_id,) = ledger.db.execute(
        "SELECT event_id FROM journal_entries WHERE shard = %s AND shard_seq = %s", (shard, seq)
    ).fetchone()
    assert event_id == last["event_id"]
    with superuser(admin_dsn) as conn:  # cut the last two entries, cover the tracks
        cut = (shard, seq - 1)
        conn.execute("DELETE FROM postings WHERE shard = %s AND shard_seq >= %s", cut)
        gone = conn.execute(
            "DELETE FROM journal_entries WHERE shard = %s AND shard_seq >= %s RETURNING event_id",
            cut,
        ).fetchall()
        conn.execute("DELETE FROM raw_events WHERE event_id = ANY(%s)", ([e for (e,) in gone],))
        conn.execute(
            "UPDATE shard_heads SET last_seq = %s, head_hash = (SELECT entry_hash FROM "
            "journal_entries WHERE shard = %s AND shard_seq = %s) WHERE shard = %s",
            (seq - 2, shard, seq - 2, shard),
        )
        conn.execute(
            "UPDATE projection_positions SET position = least(position, %s) WHERE shard = %s",
            (seq - 2, shard),
        )
    rebuild(settings, ledger.dsn)

    # Without checkpoints nothing shows: what is left is a consistent journal.
    assert verify(settings, ledger.dsn) == []
    want = f"entry ({shard}, {seq - 1})"
    [from_topic] = verify(settings, ledger.dsn, checkpoints=found)
    assert (from_topic.check, from_topic.subject) == ("checkpoint", want)
    assert f"ends at seq {seq - 2}" in from_topic.detail
    assert f"covers entries up to seq {seq}" in from_topic.detail
    assert event_id in from_topic.detail
    [from_digest] = verify(settings, ledger.dsn, checkpoints=parse_digest(kept.read_text(), "k"))
    assert (from_digest.check, from_digest.subject) == ("checkpoint", want)

    for args, code in (((), 1), (("--checkpoints", str(kept)), 1), (("--no-checkpoints",), 0)):
        result = ledger_cli("verify", *args, env=env)
        assert result.returncode == code, result.stdout + result.stderr
        if code:
            assert f"checkpoint: {want}: missing" in result.stdout
    # An edited digest is refused, not trusted.
    kept.write_text(kept.read_text().replace(f"seq {seq} ", f"seq {seq - 2} "))
    edited = ledger_cli("verify", "--checkpoints", str(kept), env=env)
    assert edited.returncode == 1 and "the digest was altered" in edited.stderr


def test_a_checkpoint_forged_without_the_key_is_reported_not_trusted(ledger, settings):
    ledger.open_account("f-1")
    ledger.settle(1)
    keys = chain_keys.load(settings)
    genuine = current_checkpoints(ledger, keys)
    forged = canonical_json(
        {
            "v": 1,
            "shard": genuine[0].shard,
            "seq": 10**6,
            "head": "00" * 32,
            "chain_key_id": "k1",
            "event_id": "x",
            "at": T0.isoformat(),
            "mac_key_id": "k1",
            "mac": "00" * 32,
        }
    ).encode()
    producer = KafkaProducer(bootstrap_servers=ledger.bootstrap, acks="all")
    producer.send(settings.topic(topics.CHECKPOINTS), key=b"0", value=forged).get(timeout=30)
    producer.close()
    found, problems = read_topic(settings, ledger.bootstrap, keys)
    assert [cp.seq for cp in found if cp.seq == 10**6] == []
    assert len(problems) == 1 and "MAC does not verify (forged or altered)" in problems[0]
    assert verify(settings, ledger.dsn, checkpoints=found) == []


def test_the_key_file_is_private_and_its_secret_never_printed(settings):
    path = settings.chain_key_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = chain_keys.load(settings).secret("k1")
    assert secret is not None and len(secret) == 32
    shown = repr(chain_keys.load(settings))
    assert secret.hex() not in shown and "k1" in shown
    listed = ledger_cli("keys", "list", env={"LEDGER_CHAIN_KEY_FILE": str(path)})
    added = ledger_cli("keys", "new", "--id", "k9", env={"LEDGER_CHAIN_KEY_FILE": str(path)})
    assert listed.returncode == 0 and added.returncode == 0, listed.stderr + added.stderr
    assert "k1  (current)" in listed.stdout
    assert "added chain key k9" in added.stdout
    for out in (listed.stdout + listed.stderr, added.stdout + added.stderr):
        for key_id in ("k1", "k9"):
            hexed = chain_keys.load(settings).secret(key_id).hex()
            assert hexed not in out
    assert chain_keys.load(settings).current == "k9"


def test_status_events_are_published_even_when_checkpoints_cannot_be(ledger, settings):
    """No checkpoint topic (an upgrade that did not run `ledger topics create`): the relay
    logs it and goes on publishing the outbox."""
    admin = KafkaAdminClient(bootstrap_servers=ledger.bootstrap)
    admin.delete_topics([settings.topic(topics.CHECKPOINTS)])
    admin.close()
    with capture_logs() as logs:
        ledger.open_account("nc-1")
        ledger.use("nc-1", model="accounts/fireworks/models/deepseek-r1", output_tokens=1_000_000)
        ledger.settle(2, timeout=60)
        wait_until(
            lambda: any(line["event"] == "checkpoints_unpublished" for line in logs),
            30,
            "the relay to say it could not publish checkpoints",
        )
    assert [t for t, *_ in ledger.status_of("nc-1")] == ["AccountSuspended"]


def test_text_left_to_the_standard_encoder_is_journaled_verified_and_guarded(
    ledger, settings, admin_dsn
):
    """Non-ASCII text and DEL, which canonical JSON escapes and orjson would not (ledger.book
    leaves such values to the standard encoder), in an event, its rating detail and its
    postings' account names: journaled, verified, and a change to that text is caught."""
    already = ledger.journaled()
    ledger.open_account("ü-1")
    grant = ledger.send(
        "CreditGranted",
        "ü-1",
        grant_id="été-🎁",
        amount=Decimal("2"),
        kind="goodwill",
        expires_at=None,
        reason="geste \x7f commercial é",
    )
    ledger.use("ü-1", output_tokens=4_000_000)  # past both grants: burns the one named é
    ledger.use("ü-1", model="modèle-é", output_tokens=10)  # unpriced: its detail names it
    ledger.settle(already + 4)
    ledger.stop()
    assert verify(settings, ledger.dsn) == []
    reason = ledger.db.execute(
        "SELECT payload->>'reason' FROM journal_entries WHERE event_id = %s", (grant["event_id"],)
    ).fetchone()[0]
    assert reason == "geste \x7f commercial é"
    burned = ledger.db.execute(
        "SELECT count(*) FROM postings WHERE ledger_account LIKE %s", ("%:été-🎁",)
    ).fetchone()[0]
    assert burned == 2  # granted, then burned by the usage

    conn = superuser(admin_dsn)
    conn.execute(
        "UPDATE journal_entries SET payload = "
        "jsonb_set(payload::jsonb, '{reason}', to_jsonb(%s::text)) WHERE event_id = %s",
        ("geste \x7f commercial e", grant["event_id"]),
    )
    conn.close()
    chain = [d for d in verify(settings, ledger.dsn) if d.check == "hash_chain"]
    assert len(chain) == 1 and grant["event_id"] in chain[0].subject


@pytest.mark.parametrize(
    "text",
    [
        '{"reason": "a \\u0000 NUL"}',  # json keeps what jsonb refuses
        '{"reason": "a lone \\ud800 surrogate"}',
        '{"reason": "one", "reason": "two"}',  # a duplicate key
        "[1, 2]",  # not an object at all
    ],
)
def test_a_payload_changed_to_any_json_is_reported_not_a_crash(ledger, settings, admin_dsn, text):
    """A superuser can store any JSON value as a payload, also one the writer never makes (an
    array where an object belongs), and since payloads are json (the canonical text as
    written), whose input checks syntax only, also text jsonb would refuse (NUL, a lone
    surrogate). verify reports the entry; it does not stop on it."""
    already = ledger.journaled()
    ledger.open_account("js-1")
    grant = ledger.send(
        "CreditGranted", "js-1", grant_id="g", amount=Decimal("2"), kind="goodwill",
        expires_at=None, reason="plain",
    )  # fmt: skip
    ledger.open_account("js-2")
    ledger.settle(already + 3)
    ledger.stop()
    assert verify(settings, ledger.dsn) == []
    stored = ledger.db.execute(
        "SELECT payload::text FROM journal_entries WHERE event_id = %s", (grant["event_id"],)
    ).fetchone()[0]
    assert json.loads(stored)["reason"] == "plain"
    assert stored == canonical_json(json.loads(stored))  # the text the writer hashed, as is

    conn = superuser(admin_dsn)
    conn.execute(
        "UPDATE journal_entries SET payload = %s::json WHERE event_id = %s",
        (text, grant["event_id"]),
    )
    conn.close()
    differences = verify(settings, ledger.dsn)
    chain = [d for d in differences if d.check == "hash_chain"]
    assert len(chain) == 1 and grant["event_id"] in chain[0].subject, differences
    rest = [d for d in differences if d.check != "hash_chain"]
    if text.startswith("["):  # neither the writer's books nor the projection can fold it
        shard = ledger.db.execute(
            "SELECT shard FROM journal_entries WHERE event_id = %s", (grant["event_id"],)
        ).fetchone()[0]
        assert [(d.check, d.subject) for d in rest] == [
            ("account_book", "js-1"),
            ("projection", f"shard {shard}"),
        ], rest
        assert "payload of JSON type array" in rest[0].detail
        assert "CreditGranted of account 'js-1' does not fold" in rest[1].detail
    else:  # the reason is only text: the folds do not read it
        assert rest == []


def test_an_account_book_changed_into_json_no_fold_reads_stops_only_that_account(ledger, admin_dsn):
    """A superuser turns an account's book into a JSON array. The writer cannot fold that
    account's events: each is quarantined (processing_error, the record alone), and the other
    accounts of the batch and the shard are journaled as before."""
    already = ledger.journaled()
    ledger.open_account("bk-1")
    ledger.open_account("bk-2")
    ledger.settle(already + 2)
    with superuser(admin_dsn) as conn:
        conn.execute("UPDATE account_books SET book = '[]' WHERE account_id = 'bk-1'")
    rejected = len(ledger.rejected())
    broken = ledger.use("bk-1", output_tokens=10)
    fine = ledger.use("bk-2", output_tokens=10)
    ledger.wait_journaled(already + 4)
    ids = {row[0] for row in ledger.db.execute("SELECT event_id FROM journal_entries")}
    assert fine["event_id"] in ids and broken["event_id"] not in ids
    [(topic, _, event_id, reason, detail)] = ledger.rejected()[rejected:]
    assert (event_id, reason) == (broken["event_id"], "processing_error")
    assert topic.endswith("billing.usage.v1") and "TypeError" in detail


def test_ticks_and_a_month_close_pass_an_unreadable_book_by_until_it_is_restored(
    ledger, settings, admin_dsn
):
    """One account's book is made unreadable while a grant of it is due to expire and its
    March charges wait for their invoice. The shard's ticks are still journaled (not
    quarantined, which would stop the shard's clock, every expiry and every month close in
    it): the other account's grant expires and its March invoice is issued, the broken one is
    passed by with an error line, and its own usage is quarantined saying why. `ledger books
    restore` writes its book back from the journal; the next tick expires its grant and the
    next month close bills its March charges, as late usage is billed."""
    r1 = "accounts/fireworks/models/deepseek-r1"  # $8 / 1M output tokens
    already = ledger.journaled()
    for a in ("ub-1", "ub-2"):
        ledger.open_account(a)
        ledger.send("PaymentMethodAdded", a, payment_method_id="pm", kind="card")
        ledger.use(a, model=r1, output_tokens=1_250_000)  # $10: $1 of credit, $9 receivable
        ledger.send("CreditGranted", a, grant_id="promo", amount=Decimal("5"),
                    kind="promotional", expires_at=T0 + timedelta(days=1), reason="")  # fmt: skip
    ledger.settle(already + 8)
    (saved,) = ledger.db.execute(
        "SELECT book FROM account_books WHERE account_id = 'ub-1'"
    ).fetchone()
    with superuser(admin_dsn) as conn:
        conn.execute("UPDATE account_books SET book = '[]' WHERE account_id = 'ub-1'")
    rejected = len(ledger.rejected())

    def entries(event_type, account_id):
        return ledger.db.execute(
            "SELECT event_id FROM journal_entries WHERE event_type = %s AND account_id = %s",
            (event_type, account_id),
        ).fetchall()

    def ticks():
        sql = "SELECT count(*) FROM journal_entries WHERE event_type = 'PeriodTick'"
        return ledger.db.execute(sql).fetchone()[0]

    april_close = datetime(2026, 4, 4, 0, 0, 1, tzinfo=UTC)
    with capture_logs() as logs:
        sent = ledger.period_tick(T0 + timedelta(days=2))
        wait_until(lambda: ticks() == sent and entries("GrantExpired", "ub-2"), 30, "the tick")
        sent += ledger.period_tick(april_close)
        wait_until(lambda: ticks() == sent and entries("InvoiceIssued", "ub-2"), 30, "the close")
    assert entries("GrantExpired", "ub-1") == [] and entries("InvoiceIssued", "ub-1") == []
    assert ledger.rejected()[rejected:] == []  # no tick was quarantined
    unreadable = [e for e in logs if e["event"] == "account_book_unreadable"]
    assert {e["account_id"] for e in unreadable} == {"ub-1"}, unreadable
    assert unreadable[0]["error"].startswith("TypeError"), unreadable
    late = ledger.use("ub-1", model=r1, output_tokens=10, occurred_at=april_close)
    wait_until(lambda: len(ledger.rejected()) == rejected + 1, 30, "ub-1's usage quarantined")
    [(_, _, event_id, reason, detail)] = ledger.rejected()[rejected:]
    assert (event_id, reason) == (late["event_id"], "processing_error")
    assert "account book of ub-1 cannot be read" in detail and "books restore" in detail

    about = [d for d in verify(settings, ledger.dsn) if "ub-" in d.subject]
    assert [(d.check, d.subject, d.detail) for d in about] == [
        ("account_book", "ub-1", f"the book cannot be read: {unreadable[0]['error']}")
    ]

    env = {"LEDGER_DATABASE_URL": ledger.dsn}
    restored = ledger_cli("books", "restore", "ub-1", "ub-2", env=env)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.splitlines() == [
        "ub-1: restored from its journal entries (the book was unreadable: "
        + unreadable[0]["error"]
        + ")",
        "ub-2: unchanged (the book already is what the journal records)",
    ]
    (book,) = ledger.db.execute(
        "SELECT book FROM account_books WHERE account_id = 'ub-1'"
    ).fetchone()
    assert AccountBook.from_json("ub-1", book) == AccountBook.from_json("ub-1", saved)
    unknown = ledger_cli("books", "restore", "nobody", env=env)
    assert unknown.returncode == 1 and "account 'nobody' has no journal entries" in unknown.stderr

    sent += ledger.period_tick(april_close + timedelta(minutes=1))
    wait_until(lambda: ticks() == sent and entries("GrantExpired", "ub-1"), 30, "the expiry")
    sent += ledger.period_tick(datetime(2026, 5, 4, 0, 0, 1, tzinfo=UTC))
    wait_until(lambda: entries("InvoiceIssued", "ub-1"), 30, "ub-1's invoice")
    ledger.wait_projected()
    ledger.stop()
    invoices = ledger.db.execute(
        "SELECT account_id, month, amount_due, lines FROM invoices ORDER BY account_id"
    ).fetchall()
    assert [row[:3] for row in invoices] == [
        ("ub-1", "2026-04", Decimal("9.00")),  # March's $9, on the next invoice
        ("ub-2", "2026-03", Decimal("9.00")),
    ]
    assert [(line["kind"], line["month"]) for line in invoices[0][3]] == [("adjustment", "2026-03")]
    assert verify(settings, ledger.dsn) == []
