"""Shard leases with liveness: which worker writes which shard, and for how long.

A lease is a row of `shard_leases`: (consumer group, shard) → holder, expires_at, on the
database's clock. The holder renews its leases every LEASE_REFRESH_S through one long-lived
session, whose backend pid the row records; a standby takes a shard whose lease has expired
(the holder froze, or lost the database), was released (a clean stop), or whose holder's
session is gone although the server has not restarted since the renewal (the holder crashed:
the kernel closed its connection, so its shards move at the standby's next refresh instead of
after the whole timeout; migration 0013). So a crashed holder loses its shards within ~2 s, a
frozen one after `LEDGER_LEASE_TIMEOUT_S` (default 10 s), and a holder that lost a lease
notices at its next batch: every batch transaction checks, after locking its offsets, that
this worker still holds every shard it writes (`fence`), and otherwise writes nothing and
gives the shards up.

A holder that reaches PostgreSQL but hears from no Kafka broker (`ledger.backoff.KafkaContact`)
stops renewing and taking leases, so its shards go to a standby that reaches Kafka; with no
standby it takes them back as soon as a broker answers again.

The lease is about liveness and not doing work twice; exactly-once never depends on it (each
batch locks its stored offsets and drops what another writer already journaled). The writer's
connection sets `idle_in_transaction_session_timeout` to the lease timeout, so a holder frozen
in the middle of a batch transaction has it aborted by the server and its row locks freed.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import psycopg
import structlog

from ledger import db
from ledger.db import QUERIES
from ledger.errors import LedgerError

log = structlog.get_logger(__name__)

LEASE_REFRESH_S = 2.0


class LeaseLostError(LedgerError):
    """This worker no longer holds a shard its batch writes; the batch is refused."""


def holder_id() -> str:
    """Who holds a lease: host, process and a random part (a restarted process is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ShardLeases:
    """The shards this process may write, held as expiring rows of `shard_leases`."""

    def __init__(self, dsn: str, group: str, wanted: list[int], timeout_s: int):
        self.dsn = dsn
        self.group = group
        self.wanted = sorted(wanted)
        self.timeout_s = timeout_s
        self.holder = holder_id()
        self.owned: set[int] = set()
        self.conn: psycopg.Connection | None = None
        self._renewed = time.monotonic()

    def refresh(self, *, renew: bool = True) -> set[int]:
        """Renew the leases held and take every wanted shard that is free or expired;
        returns the shards held now. Without the database for longer than the timeout, every
        lease counts as lost (a standby may have them by now).

        `renew=False` (the worker hears nothing from Kafka) neither renews nor takes: the
        leases run out, so a standby that can reach Kafka takes the shards over, and they
        count as lost here once the timeout passed."""
        if not renew:
            self._lapse("kafka unreachable")
            return set(self.owned)
        try:
            if self.conn is None or self.conn.closed or self.conn.broken:
                self.conn = db.connect(self.dsn, autocommit=True)
            rows = self.conn.execute(
                QUERIES["claim_shards"],
                {
                    "group": self.group,
                    "holder": self.holder,
                    "shards": self.wanted,
                    "ttl": self.timeout_s,
                },
            ).fetchall()
        except (psycopg.Error, LedgerError) as exc:
            self._lapse(str(exc)[:200])
            return set(self.owned)
        self._renewed = time.monotonic()
        held = {shard for (shard,) in rows}
        if held - self.owned:
            log.info("shard_leases_taken", shards=sorted(held - self.owned), holder=self.holder)
        if self.owned - held:
            log.warning("shard_leases_lost", shards=sorted(self.owned - held), holder=self.holder)
        self.owned = held
        return set(held)

    def _lapse(self, reason: str) -> None:
        """Not renewed: once the timeout passed, every lease counts as lost."""
        if self.owned and time.monotonic() - self._renewed > self.timeout_s:
            log.warning("shard_leases_lost", shards=sorted(self.owned), error=reason)
            self.owned = set()

    def fence(self, cur: psycopg.Cursor, shards: set[int]) -> None:
        """Inside a batch transaction: refuse it unless this worker holds every shard."""
        if not shards:
            return
        rows = cur.execute(
            QUERIES["fence_shards"], (self.group, sorted(shards), self.holder)
        ).fetchall()
        missing = shards - {shard for (shard,) in rows}
        if missing:
            self.owned -= missing
            raise LeaseLostError(f"shard lease lost for shards {sorted(missing)}")

    def close(self) -> None:
        """Release every lease (a standby takes over at once) and close the connection."""
        if self.conn is None:
            return
        try:
            if not (self.conn.closed or self.conn.broken):
                self.conn.execute(QUERIES["release_shards"], (self.group, self.holder))
        except psycopg.Error:
            pass  # the leases expire on their own
        finally:
            self.conn.close()
