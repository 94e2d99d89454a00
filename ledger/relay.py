"""Outbox relay: publishes outbox rows to Kafka in id order and marks them published once Kafka
acked them. One bad row never blocks the others, and Kafka or PostgreSQL restarts are ridden
out.

**One active relay.** A session advisory lock; other relays wait as standbys. The lock lives
with the database session, so after a reconnect the relay takes it again (or, if another relay
took it meanwhile, becomes the standby). An active relay that hears from no Kafka broker for
`KAFKA_SILENT_LIMIT_S` (10 s; `ledger.backoff.KafkaContact`) while PostgreSQL still answers
gives the lock up (`relay_handing_over`) and asks again only after HAND_OVER_WAIT_S, so a
standby that reaches Kafka takes over; with no standby it takes the lock back and goes on
trying. Rows it sent and Kafka did not ack are sent again, by whichever relay has the lock.

**Parking.** A row Kafka refuses for good is *parked* (`parked_at`, `park_reason`,
`park_detail`, `attempts`) with one `outbox_parked` error line, and the relay moves on to later
rows. Refusals for good: larger than the producer's max_request_size or the broker's limit
(`message_too_large`), a topic name Kafka does not allow or a topic the broker refuses
(`invalid_topic`, `topic_refused`), a record the broker calls invalid (`invalid_record`), or one
that cannot be turned into a Kafka record (`serialization`). A broker-side refusal fails every
record in flight alike, so rows that were in flight together are sent again one at a time and
only the one refused alone is parked. `ledger outbox parked` lists them;
`ledger outbox retry` un-parks them, and the relay tries them again.

**Order rule.** Kafka keeps order per partition and the key picks the partition, so a later
row with the *same topic and key* as a parked row waits behind it: it is neither sent nor
parked until the parked row is published (after a retry). Rows of other keys and other topics
go ahead, and rows without a key (no order to keep) are never held. So a parked dead-letter
copy holds back only later dead-letter copies of the same account, never a status event; a
parked status event holds back that account's later status events, so a gateway never sees
them out of order. Refusals the client sees before sending (size, topic name, serialization)
are caught before any later row of the key is sent. A refusal the broker returns after later
rows of the same key were already acked in the same batch cannot be undone: those rows stay
published, and the parked row, if retried, arrives late (consumers keep the highest
`status_version`).

**Transient trouble** (broker unavailable, timeouts, not enough replicas, lost connections)
never parks anything. The acked rows before the first failure are marked; the failed row and
every row after it stay unpublished and are sent again, by a new producer, after a capped
exponential backoff (0.5 s doubling to 5 s). While records wait for acks, one
`relay_waiting_for_kafka` line every 5 s. PostgreSQL going away (a restart, a lost connection):
one `relay_database_unavailable` line per attempt, reconnect with the same backoff, take the
lock again, go on. Nothing of this crashes the worker. The `stop` event is looked at at least
every 0.5 s (a connection attempt waits at most 3 s), so the relay stops within 5 s; records
not yet acked then stay unpublished.

**Checkpoints.** The active relay also publishes every shard's hash-chain head to the
checkpoint topic every `LEDGER_CHECKPOINT_INTERVAL_S` (`ledger.checkpoints`), with the same
producer. A round Kafka does not take is logged (`checkpoints_unpublished`) and tried again at
the next interval; it never holds up the outbox.

**The status snapshot.** An `AccountSuspended` or `AccountReinstated` row on the status
topic is also written, same key, value and headers, to the compacted snapshot topic
(`billing.account-status-snapshot.v1`), and its copy goes first: the relay sends the batch's
snapshot copies, waits until Kafka acked every one, and only then sends the batch's rows. So a
status change is never on the status topic before it is in the snapshot, which is what lets a
gateway bootstrap from the snapshot without a gap (`ledger.status`). Crash-safe without a Kafka
transaction: the row is marked published only after both were acked, and anything not marked
is sent again (both copies; at-least-once, in id order, so the last record of a key in the
snapshot is its highest version). A copy Kafka refuses for good parks its row (the status event
is not published without its snapshot); a transient failure of any copy sends nothing of the
batch and is retried like any other. Cost: one more round trip to Kafka for a batch with
status changes.

**At-least-once.** A row is marked published only after Kafka acked it, but a row acked and
not yet marked (a crash, PostgreSQL gone, a stop, a transient failure of an earlier row in
its batch) is sent again. Status events carry `status_version` and a deterministic event_id
so consumers drop the duplicates; the dead-letter topic is at-least-once (`rejected_events`
is the exact record).

**No late copies.** Rows are sent again only by a new producer, after the old one was dropped
with whatever Kafka had not acked (`_close_producer`): after a transient failure, a lost
database session (another relay may hold the lock by the time this one is back) and a
hand-over. A producer left retrying in the background (what kafka-python's own close() does
when its wait for the records in flight times out) could put an account's older status on the
topics after its newer one, and the compacted snapshot keeps a key's last record.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections import Counter

import psycopg
import structlog
from kafka import KafkaProducer
from kafka import errors as kafka_errors

from ledger import chain_keys, db, metrics, topics
from ledger.backoff import METADATA_MAX_AGE_S, KafkaContact
from ledger.checkpoints import Publisher
from ledger.db import QUERIES, DatabaseError
from ledger.kafka_auth import client_options
from ledger.settings import Settings

log = structlog.get_logger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 5.0
STOP_CHECK_S = 0.5
# After giving the lock up for want of Kafka, how long before asking for it again: standbys
# ask every second, so one of them has it by then.
HAND_OVER_WAIT_S = 3.0
# How long a dropped producer's sender thread gets to fail its batches and close.
SENDER_STOP_S = 2.0
CONNECT_TIMEOUT_S = 3
WAITING_NOTE_EVERY_S = 5.0
# How long one checkpoint round waits for Kafka's acks (short: stop is looked at in between).
CHECKPOINT_TIMEOUT_S = 3.0
# After a round Kafka did not take, the next one waits at least this long.
CHECKPOINT_RETRY_S = 10.0

# Kafka's rule for topic names.
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def _legal_topic(name: str) -> bool:
    return bool(_TOPIC_NAME.fullmatch(name)) and name not in (".", "..")


# Errors that are about the row itself: retrying them as they are cannot succeed.
_REFUSALS: tuple[tuple[type[BaseException], str], ...] = (
    (kafka_errors.MessageSizeTooLargeError, "message_too_large"),
    (kafka_errors.RecordListTooLargeError, "message_too_large"),
    (kafka_errors.InvalidTopicError, "invalid_topic"),
    (kafka_errors.TopicAuthorizationFailedError, "topic_refused"),
    (kafka_errors.InvalidRecordError, "invalid_record"),
    (kafka_errors.UnsupportedForMessageFormatError, "invalid_record"),
    (TypeError, "serialization"),
    (ValueError, "serialization"),
)

_DATABASE_TROUBLE = (psycopg.OperationalError, psycopg.InterfaceError, DatabaseError)

# Status events that change whether an account may be served: these go to the snapshot too.
STATUS_CHANGES = (b"AccountSuspended", b"AccountReinstated")


def refusal_reason(exc: BaseException) -> str | None:
    """The park reason when `exc` refuses a row for good; None when it is transient."""
    for kind, reason in _REFUSALS:
        if isinstance(exc, kind):
            return reason
    return None


def brief(exc: BaseException) -> str:
    """One line naming an error, for a log field: no traceback, no locals."""
    name, text = type(exc).__name__, " ".join(str(exc).split())[:300]
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


def _with_connect_timeout(dsn: str) -> str:
    """`dsn` with a connect timeout, so a hung connection attempt cannot hold up `stop`
    (kept in URL form, so error messages still hide a password)."""
    if "connect_timeout" in dsn:
        return dsn
    if "://" in dsn:
        return f"{dsn}{'&' if '?' in dsn else '?'}connect_timeout={CONNECT_TIMEOUT_S}"
    return f"{dsn} connect_timeout={CONNECT_TIMEOUT_S}"


class Backoff:
    """Capped exponential backoff: 0.5 s, 1 s, 2 s, 4 s, 5 s, 5 s, ..."""

    def __init__(self, first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_MAX_S):
        self.first = first
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2**self.attempt)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class KafkaTrouble(Exception):
    """Kafka could not take rows for a transient reason: back off, new producer, try again."""

    def __init__(self, cause: BaseException):
        super().__init__(brief(cause))
        self.cause = cause


class OutboxRelay:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        dsn: str,
        *,
        batch_size: int = 1000,
        producer_options: dict | None = None,
    ):
        self.settings = settings
        self.bootstrap = bootstrap
        self.dsn = dsn
        self.batch_size = batch_size
        self.producer_options = producer_options or {}
        self.producer: KafkaProducer | None = None
        self.kafka_backoff = Backoff()
        self.database_outages = 0  # times the database went away under the relay
        self.kafka_outages = 0  # times Kafka failed transiently
        self.awaiting_acks = 0  # records sent and not yet answered by Kafka
        # Rows up to this id are sent one at a time (see publish_once).
        self.isolate_through = 0
        self.checkpoints = Publisher(settings, chain_keys.load(settings))
        self._next_checkpoint = 0.0  # monotonic time of the next checkpoint round
        self.status_topic = settings.topic(topics.STATUS)
        self.snapshot_topic = settings.topic(topics.STATUS_SNAPSHOT)
        self.contact = KafkaContact("relay")
        self.handovers = 0  # times the lock was given up for want of Kafka

    # --- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        dsn = _with_connect_timeout(self.dsn)
        database_backoff = Backoff()
        started = False
        try:
            while not stop.is_set():
                conn = None
                try:
                    conn = db.connect(dsn, autocommit=True)
                    if not self._take_lock(conn, stop):
                        return
                    conn.execute(QUERIES["relay_listen"])
                    log.info("relay_reconnected" if started else "relay_started")
                    started = True
                    database_backoff.reset()
                    self.contact.reset()
                    if self._serve(conn, stop):
                        continue
                    # No broker answered for KAFKA_SILENT_LIMIT_S: give the lock up (closing
                    # the session releases it) and let a standby that may reach Kafka take it
                    # before this relay asks again.
                    self.handovers += 1
                    self._close_producer()  # before the lock goes
                    log.warning("relay_handing_over", retry_in_s=HAND_OVER_WAIT_S)
                    conn.close()
                    stop.wait(HAND_OVER_WAIT_S)
                except _DATABASE_TROUBLE as exc:
                    # The lock went with the session: another relay may hold it by the time
                    # this one is back, so nothing this producer has in flight may land later.
                    self._close_producer()
                    self.database_outages += 1
                    delay = database_backoff.next()
                    log.warning(
                        "relay_database_unavailable",
                        error=brief(exc),
                        attempt=database_backoff.attempt,
                        retry_in_s=delay,
                    )
                    stop.wait(delay)
                finally:
                    # The producer never outlives the session that holds the lock (a stop, a
                    # crash): another relay may take the lock the moment it is closed.
                    self._close_producer()
                    if conn is not None:
                        conn.close()
        finally:
            log.info("relay_stopped")

    def _take_lock(self, conn: psycopg.Connection, stop: threading.Event) -> bool:
        """Become the active relay; False if stopped first."""
        standby = False
        while not stop.is_set():
            (locked,) = conn.execute(QUERIES["relay_lock"]).fetchone()
            if locked:
                return True
            if not standby:
                log.info("relay_standby")  # another relay is active
                standby = True
            stop.wait(1.0)
        return False

    def _serve(self, conn: psycopg.Connection, stop: threading.Event) -> bool:
        """Relay until `stop` (True) or until no broker answered for KAFKA_SILENT_LIMIT_S
        (False: the caller hands the lock over)."""
        while not stop.is_set():
            if not self.contact.hears(self.producer):
                return False
            try:
                producer = self._ensure_producer()
                self._checkpoint_if_due(conn, producer)
                published = self.publish_once(conn, producer, stop)
                self.kafka_backoff.reset()
            except KafkaTrouble as trouble:
                self.kafka_outages += 1
                self._close_producer()
                delay = self.kafka_backoff.next()
                log.warning(
                    "relay_kafka_unavailable",
                    error=str(trouble),
                    attempt=self.kafka_backoff.attempt,
                    retry_in_s=delay,
                )
                stop.wait(delay)
                continue
            if published:
                continue
            wait = min(self.settings.poll_interval_ms / 1000, STOP_CHECK_S)
            for _ in conn.notifies(timeout=wait, stop_after=1):
                pass
        return True

    def _checkpoint_if_due(self, conn: psycopg.Connection, producer: KafkaProducer) -> None:
        """Publish the shards' chain heads that moved, once per checkpoint interval. A round
        Kafka does not take (down, or no checkpoint topic yet) is logged and tried again at
        the next interval; it never holds up the outbox."""
        if time.monotonic() < self._next_checkpoint:
            return
        self._next_checkpoint = time.monotonic() + self.settings.checkpoint_interval_s
        try:
            self.checkpoints.publish(conn, producer, timeout_s=CHECKPOINT_TIMEOUT_S)
        except kafka_errors.KafkaError as exc:
            retry = max(self.settings.checkpoint_interval_s, CHECKPOINT_RETRY_S)
            self._next_checkpoint = time.monotonic() + retry
            log.warning(
                "checkpoints_unpublished",
                error=brief(exc),
                topic=self.checkpoints.topic,
                retry_in_s=retry,
            )

    def _ensure_producer(self) -> KafkaProducer:
        if self.producer is None:
            options = {
                "bootstrap_servers": self.bootstrap,
                "acks": "all",
                "enable_idempotence": True,
                "linger_ms": 5,
                "client_id": "ledger-relay",
                # Bounded waits for the first broker contact and for metadata (the defaults
                # are 30 s and 60 s), so `stop` is seen within 5 s even with Kafka down.
                "bootstrap_timeout_ms": 2000,
                "max_block_ms": 2000,
                "request_timeout_ms": 10_000,
                "delivery_timeout_ms": 30_000,
                "reconnect_backoff_ms": int(BACKOFF_FIRST_S * 1000),
                "reconnect_backoff_max_ms": int(BACKOFF_MAX_S * 1000),
                # How `contact` knows the brokers still answer.
                "metadata_max_age_ms": int(METADATA_MAX_AGE_S * 1000),
                # Closing a connection drops what the kernel still holds for it (see
                # `_close_producer`).
                "socket_options": [
                    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                    (socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
                ],
                **client_options(self.settings),
                **self.producer_options,
            }
            try:
                self.producer = KafkaProducer(**options)
            except kafka_errors.KafkaError as exc:
                raise KafkaTrouble(exc) from exc
            self._look_up_topics(self.producer)
        return self.producer

    def _look_up_topics(self, producer: KafkaProducer) -> None:
        """Learn the partitions of the topics every round writes to now, in one metadata
        request, instead of at their first send. kafka-python looks a topic up when a record is
        first sent to it and spaces its metadata requests `retry_backoff_ms` (100 ms) apart, so
        a new relay's first suspension waited ~100 ms for the snapshot topic and ~100 ms more
        for the status topic (after every start and every takeover). Best effort: a topic not
        known now is looked up at its first send, as before (and a name Kafka does not allow
        is left to the rows that name it, which are parked as `invalid_topic`)."""
        names = [self.status_topic, self.snapshot_topic, self.checkpoints.topic]
        wanted = [t for t in names if _legal_topic(t)]
        cluster = getattr(producer, "_metadata", None)  # kafka-python's ClusterMetadata
        try:
            if wanted and cluster is not None and hasattr(cluster, "set_topics"):
                cluster.set_topics(wanted)  # one request for all of them
            for topic in wanted:
                if topic != self.checkpoints.topic:  # it may not exist yet: not waited for
                    producer.partitions_for(topic)
        except (kafka_errors.KafkaError, ValueError) as exc:
            log.warning("relay_topics_not_found", topics=wanted, error=brief(exc))

    def _close_producer(self) -> None:
        """Drop the producer at once with whatever Kafka has not acked (those rows are not
        marked: whichever relay holds the lock next sends them again). Nothing of it may go
        out later: records of the old producer landing after a new producer's would put an
        account's older status after its newer one, and on the compacted snapshot topic the
        last record of a key is the one kept. kafka-python's own close() waits for the records
        in flight first and, when that times out, raises and leaves its sender thread running
        and retrying; so the sender is stopped first, and its sockets close with SO_LINGER 0
        (`_ensure_producer`), which makes the kernel drop what it still held for them."""
        if self.producer is None:
            return
        producer, self.producer = self.producer, None
        self.awaiting_acks = 0  # failed with the producer: nothing is awaited any more
        sender = getattr(producer, "_sender", None)
        try:
            if sender is not None:
                sender.force_close()  # fails the batches not acked, closes the connections
                sender.join(SENDER_STOP_S)
            producer.close(timeout=0)
        except Exception as exc:  # closing a producer that lost its broker must not crash
            log.warning("relay_producer_close_failed", error=brief(exc))

    # --- one batch ------------------------------------------------------------------------

    def publish_once(
        self,
        conn: psycopg.Connection,
        producer: KafkaProducer,
        stop: threading.Event | None = None,
    ) -> int:
        """Send the next rows, wait for their acks, mark the acked ones and park the refused
        ones. Returns how many rows were settled (published or parked); raises KafkaTrouble
        after marking what it could when Kafka failed transiently."""
        rows = conn.execute(QUERIES["unpublished"], (self.batch_size,)).fetchall()
        if not rows:
            return 0
        if rows[0][0] <= self.isolate_through:
            rows = rows[:1]  # one at a time: a refusal is then this row's own
        started = time.perf_counter()
        refused = self._publish_snapshots(producer, rows, stop)
        if refused is None:
            return 0  # stopping before the snapshot copies were acked: nothing was sent
        sent: list[tuple[int, object]] = []
        parked: list[tuple[int, str, str, str]] = []  # id, topic, reason, detail
        held: set[tuple[str, bytes]] = set()  # (topic, key) of rows parked in this batch
        trouble: BaseException | None = None
        for row_id, topic, key, value, headers in rows:
            order_key = (topic, bytes(key)) if key is not None else None
            if order_key in held:
                continue  # waits behind a row of its key parked in this batch
            if row_id in refused:  # its snapshot copy was refused for good
                parked.append((row_id, topic, *refused[row_id]))
                held.add(order_key)
                continue
            try:
                if not _legal_topic(topic):
                    raise kafka_errors.InvalidTopicError(f"{topic!r} is not a legal topic name")
                record_headers = [(k, bytes.fromhex(v)) for k, v in headers]
                future = producer.send(
                    topic,
                    key=bytes(key) if key is not None else None,
                    value=bytes(value),
                    headers=record_headers,
                )
                # A future that failed at once (over max_request_size, or the producer already
                # failed by the broker's refusal of an earlier row) is judged with the others
                # below, so that an innocent row is never parked for another row's refusal.
            except Exception as exc:
                reason = refusal_reason(exc)
                if reason is None:
                    trouble = exc
                    break  # Kafka is not taking anything now: settle what was sent
                parked.append((row_id, topic, reason, brief(exc)))
                if order_key is not None:
                    held.add(order_key)
                continue
            sent.append((row_id, future))

        acked: list[int] = []
        self._await_acks(producer, [f for _, f in sent], stop)
        if sent:
            metrics.RELAY_PUBLISH_SECONDS.observe(time.perf_counter() - started)
        by_id = {row[0]: row[1] for row in rows}
        # A refusal from the broker (a record over the topic's `max.message.bytes`) is fatal to
        # kafka-python's idempotent producer: it fails every batch in flight with the same
        # error, so with several rows sent the refusal cannot be pinned on one. Then nothing is
        # parked: the producer is replaced and the rows are sent again one at a time.
        refused_late = [f for _, f in sent if f.is_done and f.failed()]
        refused_late = [f for f in refused_late if refusal_reason(f.exception) is not None]
        ambiguous = bool(refused_late) and len(sent) > 1
        in_order = True  # acked rows are marked only up to the first one that is not
        for row_id, future in sent:
            if not future.is_done:  # stopping: it and every later row are sent again
                in_order = False
            elif future.succeeded():
                if in_order:
                    acked.append(row_id)
            elif not ambiguous and (reason := refusal_reason(future.exception)) is not None:
                parked.append((row_id, by_id[row_id], reason, brief(future.exception)))
            else:
                trouble = trouble or future.exception
                in_order = False
        if refused_late:
            self._close_producer()  # its error is fatal: the next round makes a new one
        if ambiguous:
            self.isolate_through = max(row_id for row_id, _ in sent)
            log.warning(
                "relay_isolating_refusal",
                rows=len(sent),
                through_id=self.isolate_through,
                error=brief(refused_late[0].exception),
            )

        with conn.transaction():
            if acked:
                conn.execute(QUERIES["mark_published"], (acked,))
            for row_id, _, reason, detail in parked:
                conn.execute(QUERIES["park_outbox"], (reason, detail, row_id))
        for row_id, topic, reason, detail in parked:
            log.error("outbox_parked", id=row_id, topic=topic, reason=reason, detail=detail)
            metrics.OUTBOX_PARKED.labels(reason).inc()
        if acked:
            log.info("outbox_published", messages=len(acked))
            for topic, count in Counter(by_id[row_id] for row_id in acked).items():
                metrics.OUTBOX_PUBLISHED.labels(topic).inc(count)
        if trouble is not None:
            raise KafkaTrouble(trouble)
        return len(acked) + len(parked)

    def _publish_snapshots(
        self, producer: KafkaProducer, rows: list, stop: threading.Event | None
    ) -> dict[int, tuple[str, str]] | None:
        """Send the snapshot copy of every status change among `rows` and wait for Kafka's
        answers. Returns the rows whose copy Kafka refused for good ({id: (reason, detail)}:
        they are parked, not sent), or None when `stop` came first. A transient failure raises
        KafkaTrouble before any row of the batch is sent. Rows behind a refused copy's key are
        skipped (they wait behind the parked row, as in the main loop)."""
        refused: dict[int, tuple[str, str]] = {}
        held: set[bytes] = set()
        copies: list[tuple[int, object]] = []
        for row_id, topic, key, value, headers in rows:
            if topic != self.status_topic or key is None or bytes(key) in held:
                continue
            try:
                types = [bytes.fromhex(v) for k, v in headers if k == "event_type"]
            except (TypeError, ValueError):
                continue  # headers that cannot form a record: the row is parked below
            if not any(t in STATUS_CHANGES for t in types):
                continue
            try:
                if not _legal_topic(self.snapshot_topic):
                    raise kafka_errors.InvalidTopicError(
                        f"{self.snapshot_topic!r} is not a legal topic name"
                    )
                future = producer.send(
                    self.snapshot_topic,
                    key=bytes(key),
                    value=bytes(value),
                    headers=[(k, bytes.fromhex(v)) for k, v in headers],
                )
                if future.is_done and future.failed():
                    raise future.exception
            except Exception as exc:
                reason = refusal_reason(exc)
                if reason is None:
                    raise KafkaTrouble(exc) from exc
                refused[row_id] = (reason, f"snapshot copy: {brief(exc)}")
                held.add(bytes(key))
                continue
            copies.append((row_id, future))
        if not copies:
            return refused
        self._await_acks(producer, [f for _, f in copies], stop)
        for row_id, future in copies:
            if not future.is_done:
                return None
            if future.failed():
                reason = refusal_reason(future.exception)
                if reason is None:
                    raise KafkaTrouble(future.exception)
                refused[row_id] = (reason, f"snapshot copy: {brief(future.exception)}")
        return refused

    def _await_acks(
        self, producer: KafkaProducer, futures: list, stop: threading.Event | None
    ) -> None:
        """Wait until Kafka answered for every future (acked or failed), `stop`, or until no
        broker answered for KAFKA_SILENT_LIMIT_S (the rows not acked are sent again, as after
        a stop: by this relay, or by the standby it hands over to)."""
        waited = 0.0
        next_note = WAITING_NOTE_EVERY_S
        while (pending := sum(not f.is_done for f in futures)) > 0:
            self.awaiting_acks = pending
            if (stop is not None and stop.is_set()) or not self.contact.hears(producer):
                return
            try:
                producer.flush(timeout=STOP_CHECK_S)
            except kafka_errors.KafkaTimeoutError:
                waited += STOP_CHECK_S
                if waited >= next_note:
                    log.warning("relay_waiting_for_kafka", pending=pending, seconds=waited)
                    next_note += WAITING_NOTE_EVERY_S
        self.awaiting_acks = 0


# --- operations (`ledger outbox`) -------------------------------------------------------------


def parked_rows(dsn: str) -> list[dict]:
    """Parked outbox rows, oldest first, with how many later rows wait behind each."""
    with db.connect(dsn) as conn:
        rows = conn.execute(QUERIES["parked_outbox"]).fetchall()
    keys = ("id", "topic", "key", "size", "reason", "detail", "parked_at", "attempts", "waiting")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def retry_parked(dsn: str, row_id: int | None = None) -> list[int]:
    """Un-park one row (`row_id`) or all of them; the relay tries them again. Returns the ids."""
    with db.connect(dsn) as conn:
        ids = [i for (i,) in conn.execute(QUERIES["unpark_outbox"], {"id": row_id})]
        if ids:
            conn.execute(QUERIES["notify_outbox"])
        conn.commit()
    for i in ids:
        log.info("outbox_unparked", id=i)
    return ids
