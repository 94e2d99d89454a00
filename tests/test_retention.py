"""Retention without loss: `ledger prune` deletes published outbox rows and resolved rejects
past their retention, only those, and never a journal row."""

from __future__ import annotations

import dataclasses

import psycopg
import pytest
from psycopg import errors

from ledger.rejects import dismiss
from ledger.replay import StoredRecord
from ledger.retention import prune
from tests.test_cli import ledger_cli, services_env
from tests.test_journal import opened
from tests.test_roles import JOURNAL, journal_state

# What prune may never touch: the journal (rejected_events is what it prunes).
KEPT = tuple(t for t in JOURNAL if t != "rejected_events")


def bad(offset: int) -> StoredRecord:
    return StoredRecord("billing.usage.v1", 0, offset, b"acct-r", b"not avro %d" % offset)


def test_prune_removes_only_what_is_old_and_done_and_never_a_journal_row(
    writer, dsn, admin_dsn, base_settings
):
    settings = dataclasses.replace(
        base_settings, outbox_retention_days=7, rejects_retention_days=30
    )
    # Rejects 10..14 (each with its dead-letter copy) and a journal.
    writer.write_batch([opened("acct-1", 0), opened("acct-2", 1), *(bad(o) for o in range(10, 15))])
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = dict(conn.execute("SELECT kafka_offset, id FROM rejected_events"))
        copies = dict(conn.execute("SELECT value_of_reject, id FROM outbox"))
        old_done, recent_done, old_open, old_waiting, old_parked = (ids[o] for o in range(10, 15))
        for reject in (old_done, recent_done, old_waiting, old_parked):
            assert dismiss(dsn, reject, "test record")
        assert not dismiss(dsn, old_open + 1000, "no such reject")
        # Dead-letter copies: published, except one still waiting and one parked.
        conn.execute(
            "UPDATE outbox SET published_at = now() WHERE value_of_reject <> ALL(%s)",
            ([old_waiting, old_parked],),
        )
        conn.execute(
            "UPDATE outbox SET parked_at = now(), park_reason = 'x' WHERE id = %s",
            (copies[old_parked],),
        )
        status = {
            name: conn.execute(
                "INSERT INTO outbox (topic, value, published_at) VALUES ('status', 'v', "
                f"now() - interval '{age}') RETURNING id"
            ).fetchone()[0]
            for name, age in (("old", "8 days"), ("recent", "6 days"))
        }
        (unpublished,) = conn.execute(
            "INSERT INTO outbox (topic, value, created_at) VALUES ('status', 'v', "
            "now() - interval '90 days') RETURNING id"
        ).fetchone()
    with psycopg.connect(admin_dsn) as admin:  # time passes
        admin.execute(
            "UPDATE rejected_events SET rejected_at = now() - interval '60 days', "
            "resolved_at = CASE WHEN id = %s THEN now() - interval '29 days' "
            "ELSE now() - interval '31 days' END WHERE resolved_at IS NOT NULL",
            (recent_done,),
        )
        admin.execute(
            "UPDATE rejected_events SET rejected_at = now() - interval '60 days' WHERE id = %s",
            (old_open,),
        )
        # The copy of the pruned reject was published only yesterday: it goes with it.
        admin.execute(
            "UPDATE outbox SET published_at = now() - interval '1 day' WHERE id = %s",
            (copies[old_done],),
        )
        before = journal_state(admin, KEPT)

    pruned = prune(settings, dsn)

    with psycopg.connect(admin_dsn) as admin:
        assert journal_state(admin, KEPT) == before
        rejects_left = {i for (i,) in admin.execute("SELECT id FROM rejected_events")}
        outbox_left = {i for (i,) in admin.execute("SELECT id FROM outbox")}
    # The only reject old and done, with every copy published, is gone with its copy.
    assert rejects_left == {recent_done, old_open, old_waiting, old_parked}
    assert outbox_left == {
        copies[recent_done],
        copies[old_open],
        copies[old_waiting],
        copies[old_parked],
        status["recent"],
        unpublished,
    }
    assert (pruned.outbox_rows, pruned.rejects) == (2, 1)
    assert prune(settings, dsn) == type(pruned)(0, 0)  # nothing more to do


def test_prune_refuses_a_retention_under_a_day_and_the_cli_prints_what_it_pruned(
    dsn, stack, owner_dsn
):
    with psycopg.connect(dsn) as conn, pytest.raises(errors.InvalidParameterValue):
        conn.execute("SELECT * FROM ledger_prune('1 hour', '30 days')")
    result = ledger_cli("prune", env=services_env(stack, dsn))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "pruned 0 outbox rows published over 7 days ago, 0 rejects resolved over 90 days ago; "
        "the journal keeps everything\n"
    )
    bad_setting = ledger_cli(
        "prune", env=services_env(stack, dsn) | {"LEDGER_OUTBOX_RETENTION_DAYS": "0"}
    )
    assert bad_setting.returncode == 2
    assert "LEDGER_OUTBOX_RETENTION_DAYS=0: must be in [1, 36500]" in bad_setting.stderr


def test_rejects_resolve_dismisses_an_open_reject_with_a_note(writer, dsn, stack):
    writer.write_batch([bad(3)])
    with psycopg.connect(dsn) as conn:
        (reject,) = conn.execute("SELECT id FROM rejected_events").fetchone()
    env = services_env(stack, dsn)
    no_note = ledger_cli("rejects", "resolve", str(reject), env=env)
    assert no_note.returncode == 1 and "--note" in no_note.stderr
    done = ledger_cli("rejects", "resolve", str(reject), "--note", "garbage from a test", env=env)
    assert (done.returncode, done.stdout) == (0, f"reject {reject} resolved (dismissed)\n")
    again = ledger_cli("rejects", "resolve", str(reject), "--note", "again", env=env)
    assert (again.returncode, again.stdout) == (4, f"no open rejected event with id {reject}\n")
    with psycopg.connect(dsn) as conn:
        (resolution,) = conn.execute("SELECT resolution FROM rejected_events").fetchone()
    assert resolution == "dismissed: garbage from a test"
