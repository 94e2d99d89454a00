"""The ledger's database sessions run in UTC whatever the server or client is set to."""

from datetime import UTC, datetime

import psycopg

from ledger import db


def test_connections_pin_the_session_time_zone_to_utc(dsn, owner_dsn):
    with psycopg.connect(owner_dsn, autocommit=True) as admin:  # the database's owner
        database = admin.execute("SELECT current_database()").fetchone()[0]
        admin.execute(f"ALTER DATABASE \"{database}\" SET TimeZone = 'America/Los_Angeles'")
    with psycopg.connect(dsn) as plain:  # an unpinned session gets the database's zone
        assert plain.execute("SHOW TimeZone").fetchone()[0] == "America/Los_Angeles"
    with db.connect(dsn) as conn:
        assert conn.execute("SHOW TimeZone").fetchone()[0] == "UTC"
        at = conn.execute("SELECT timestamptz '2026-03-31 23:30:00+00'").fetchone()[0]
        assert at == datetime(2026, 3, 31, 23, 30, tzinfo=UTC) and at.utcoffset().seconds == 0
        text = conn.execute("SELECT timestamptz '2026-03-31 23:30:00+00'::text").fetchone()[0]
        assert text == "2026-03-31 23:30:00+00"  # the month of a text timestamp is March
