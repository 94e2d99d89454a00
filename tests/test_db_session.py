"""The ledger's database sessions run in UTC whatever the server or client is set to, and
notice a vanished peer at either end."""

import os
import socket
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

from ledger import db
from ledger.book import jsonb_dumps


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


def _tcp(conn) -> tuple[int, int, int, int]:
    """SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT of the client's socket."""
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        )
    finally:
        sock.close()


def test_both_ends_of_a_connection_probe_a_silent_peer_within_half_a_minute(dsn):
    kernel_idle = int(Path("/proc/sys/net/ipv4/tcp_keepalive_time").read_text())
    with psycopg.connect(dsn) as plain:  # the kernel's default, two hours on most machines
        assert _tcp(plain)[:2] == (1, kernel_idle)
        assert plain.execute("SHOW tcp_keepalives_idle").fetchone()[0] == str(kernel_idle)
    with db.connect(dsn) as conn:
        assert _tcp(conn) == (1, 10, 5, 3)  # the worker notices a dead server
        for setting, value in [("idle", "10"), ("interval", "5"), ("count", "3")]:
            # ... and the server a dead worker (its session ends, its locks go)
            shown = conn.execute(f"SHOW tcp_keepalives_{setting}").fetchone()[0]
            assert shown.removesuffix("s") == value
    # A URL that sets its own keepalives keeps them.
    own = dsn + ("&" if "?" in dsn else "?") + "keepalives_idle=60"
    with db.connect(own) as conn:
        assert _tcp(conn)[:2] == (1, 60)


def test_jsonb_dumps_stores_what_json_dumps_stores(dsn):
    # orjson writes UTF-8 where json.dumps writes \u escapes: the same jsonb either way.
    documents = [
        {"grants": {"bon-été 🎁": {"granted": "1.00", "expires_at": None, "order": 2**63 - 1}}},
        {"tab\t": ["\x7f", 'quote"back\\slash', True, False, -(2**63)]},
        [],
        "plain text",
    ]
    with db.connect(dsn) as conn:
        for document in documents:
            pair = (Jsonb(document, dumps=jsonb_dumps), Jsonb(document))
            fast, standard, same = conn.execute(
                "SELECT %s::jsonb, %s::jsonb, %s::jsonb = %s::jsonb", pair + pair
            ).fetchone()
            assert fast == standard == document and same is True
        # What orjson refuses goes to json.dumps, which refuses it as before (a decimal) or
        # writes it (an integer past 64 bits).
        with pytest.raises(TypeError):
            conn.execute(
                "SELECT %s::jsonb", (Jsonb({"amount": Decimal("1.5")}, dumps=jsonb_dumps),)
            )
        big = Jsonb({"big": 2**64}, dumps=jsonb_dumps)
        assert conn.execute("SELECT %s::jsonb", (big,)).fetchone()[0] == {"big": 2**64}
