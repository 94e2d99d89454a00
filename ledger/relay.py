"""Outbox relay: publishes outbox rows to Kafka in id order, then marks them published.

One relay is active at a time (a session advisory lock); others wait as standbys. A crash
between the Kafka flush and the mark re-sends those rows: status events carry status_version
and a deterministic event_id so consumers drop the duplicates; the dead-letter topic is
at-least-once (`rejected_events` is the exact record).
"""

from __future__ import annotations

import threading

import structlog
from kafka import KafkaProducer

from ledger import db
from ledger.db import QUERIES
from ledger.settings import Settings

log = structlog.get_logger(__name__)


class OutboxRelay:
    def __init__(self, settings: Settings, bootstrap: str, dsn: str, *, batch_size: int = 1000):
        self.settings = settings
        self.bootstrap = bootstrap
        self.dsn = dsn
        self.batch_size = batch_size

    def run(self, stop: threading.Event) -> None:
        conn = db.connect(self.dsn, autocommit=True)
        producer = None
        try:
            while not stop.is_set():
                (locked,) = conn.execute(QUERIES["relay_lock"]).fetchone()
                if locked:
                    break
                stop.wait(1.0)  # standby: another relay is active
            if stop.is_set():
                return
            conn.execute("LISTEN ledger_outbox")
            producer = KafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                client_id="ledger-relay",
            )
            log.info("relay_started")
            while not stop.is_set():
                if self.publish_once(conn, producer):
                    continue
                for _ in conn.notifies(timeout=self.settings.poll_interval_ms / 1000, stop_after=1):
                    pass
        finally:
            if producer is not None:
                producer.close()
            conn.close()
            log.info("relay_stopped")

    def publish_once(self, conn, producer: KafkaProducer) -> int:
        rows = conn.execute(QUERIES["unpublished"], (self.batch_size,)).fetchall()
        if not rows:
            return 0
        futures = [
            producer.send(
                topic,
                key=key,
                value=bytes(value),
                headers=[(k, bytes.fromhex(v)) for k, v in headers],
            )
            for _, topic, key, value, headers in rows
        ]
        producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises if Kafka refused a message: nothing is marked
        conn.execute(QUERIES["mark_published"], ([row[0] for row in rows],))
        log.info("outbox_published", messages=len(rows))
        return len(rows)
