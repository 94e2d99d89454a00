"""The gateway SDK (`ledger.status`) on real Kafka: duplicates and stale versions are dropped;
a follower that bootstraps from the compacted snapshot topic ends with the same suspended
accounts as one that read the whole status history, and misses nothing published after."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from psycopg.types.json import Jsonb

from ledger import db, topics
from ledger.codec import Codec
from ledger.relay import OutboxRelay, retry_parked
from ledger.status import AccountStatusFollower
from tests.harness import read_records, wait_until

CREDITS_EXHAUSTED = "CREDITS_EXHAUSTED_NO_PAYMENT_METHOD"
AT = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def status_event(event_type: str, account_id: str, version: int, *reasons: str) -> dict:
    event = {
        "event_id": str(uuid.uuid4()),
        "account_id": account_id,
        "occurred_at": AT,
        "effective_at": AT,
        "status_version": version,
    }
    return event | ({"reasons": list(reasons)} if event_type == "AccountSuspended" else {})


def settle(ledger, events: int) -> None:
    """Until `events` input events are journaled (ticks and configuration entries aside), and
    projected, published and read downstream."""
    wait_until(
        lambda: (
            ledger.db.execute(
                "SELECT count(*) FROM raw_events "
                "WHERE event_type NOT IN ('ConfigPublished', 'PeriodTick')"
            ).fetchone()[0]
            >= events
        ),
        60,
        f"{events} events journaled",
    )
    ledger.settle(events)


def test_duplicates_and_stale_versions_are_dropped(settings, stack):
    codec = Codec.default()
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
    topic = settings.topic(topics.STATUS)

    def publish(event_type: str, event: dict) -> None:
        producer.send(
            topic,
            key=event["account_id"].encode(),
            value=codec.encode(event_type, event),
            headers=codec.headers(event_type),
        ).get(timeout=30)

    suspended = status_event("AccountSuspended", "g-1", 2, CREDITS_EXHAUSTED, "MANUAL_HOLD")
    publish("AccountSuspended", suspended)
    publish("AccountReinstated", status_event("AccountReinstated", "g-1", 1))  # stale
    publish("AccountSuspended", suspended)  # redelivered
    publish("AccountSuspended", status_event("AccountSuspended", "g-2", 1, "PAYMENT_FAILED"))
    follower = AccountStatusFollower(stack.bootstrap, topic_prefix=settings.topic_prefix)
    try:
        follower.bootstrap(snapshot=False)  # the whole history
        book = follower.book
        wait_until(
            lambda: (
                follower.poll() is not None and book.applied + book.duplicates + book.stale == 4
            ),
            30,
            "4 status events read",
        )
        assert (book.applied, book.duplicates, book.stale) == (2, 1, 1)
        assert follower.is_suspended("g-1")  # the stale reinstatement changed nothing
        assert follower.reasons("g-1") == (CREDITS_EXHAUSTED, "MANUAL_HOLD")
        assert book.state("g-1").status_version == 2
        assert follower.suspended() == {
            "g-1": (CREDITS_EXHAUSTED, "MANUAL_HOLD"),
            "g-2": ("PAYMENT_FAILED",),
        }
        assert not follower.is_suspended("never-seen")

        publish("AccountReinstated", status_event("AccountReinstated", "g-1", 3))
        wait_until(
            lambda: follower.poll() is not None and not follower.is_suspended("g-1"), 30, "g-1"
        )
        assert follower.reasons("g-1") == ()
        assert follower.suspended() == {"g-2": ("PAYMENT_FAILED",)}
    finally:
        follower.close()
        producer.close()


def test_a_new_gateway_bootstraps_from_the_snapshot_and_misses_nothing(ledger, stack):
    # Ten accounts run out of credit; three of them add a card and are reinstated; two are
    # suspended twice (reinstated in between), so the history holds several versions each.
    for n in range(10):
        ledger.open_account(f"gw-{n}")
        ledger.use(f"gw-{n}", output_tokens=2_000_000)  # $1.80 > the $1 credit
    for n in (0, 1, 2):
        ledger.send("PaymentMethodAdded", f"gw-{n}", payment_method_id="pm", kind="card")
    for n in (3, 4):
        ledger.send("PaymentMethodAdded", f"gw-{n}", payment_method_id="pm", kind="card")
        ledger.send("PaymentMethodRemoved", f"gw-{n}", payment_method_id="pm")
    settle(ledger, 10 * 2 + 3 + 2 * 2)
    expected = {
        account_id: tuple(reasons)
        for account_id, reasons in ledger.db.execute(
            "SELECT account_id, reasons FROM account_status WHERE suspended"
        )
    }
    assert sorted(expected) == [f"gw-{n}" for n in range(3, 10)]
    changes = [e for t, e in ledger.read_status_events() if t.startswith("Account")]
    assert len(changes) > len(expected) + 3  # more history than there are accounts

    history = AccountStatusFollower(ledger.bootstrap, topic_prefix=ledger.settings.topic_prefix)
    snapshot = AccountStatusFollower(ledger.bootstrap, topic_prefix=ledger.settings.topic_prefix)
    try:
        history.bootstrap(snapshot=False)
        wait_until(lambda: history.poll() is not None and history.suspended() == expected, 30)
        assert history.book.applied == len(changes)

        assert snapshot.bootstrap() >= len(expected)
        assert snapshot.suspended() == expected  # before any poll: from the snapshot alone
        copies = read_records(
            ledger.bootstrap, [ledger.settings.topic(topics.STATUS_SNAPSHOT)], len(changes)
        )
        # A copy of every status change and nothing else (compaction keeps the last per key).
        assert sorted(Codec.default().decode(r.value).event["event_id"] for r in copies) == sorted(
            e["event_id"] for e in changes
        )
        assert all(
            r.key == Codec.default().decode(r.value).event["account_id"].encode() for r in copies
        )

        # After the bootstrap, new changes arrive on the live topic: none is missed.
        ledger.send("PaymentMethodAdded", "gw-9", payment_method_id="pm", kind="card")
        ledger.open_account("gw-new")
        ledger.use("gw-new", output_tokens=2_000_000)
        settle(ledger, 10 * 2 + 3 + 2 * 2 + 3)
        expected.pop("gw-9")
        expected["gw-new"] = (CREDITS_EXHAUSTED,)
        for follower in (snapshot, history):
            wait_until(lambda f=follower: f.poll() is not None and f.suspended() == expected, 30)
        assert snapshot.book.stale == 0
    finally:
        history.close()
        snapshot.close()


def test_a_status_change_never_reaches_the_status_topic_before_its_snapshot(settings, dsn, stack):
    """Kafka refuses the snapshot copy for good (here: the relay names a topic Kafka does not
    allow): the row is parked, the status event is not published, and the account's next
    change waits behind it, its copy not sent; once the copies can go and the row is retried,
    both rows go out, each copy before its status event, in order."""
    codec = Codec.default()
    status_topic = settings.topic(topics.STATUS)
    headers = Jsonb([[k, v.hex()] for k, v in codec.headers("AccountSuspended")])
    rows = []
    conn = db.connect(dsn, autocommit=True)
    for version in (1, 2):
        event = status_event("AccountSuspended", "p-1", version, "PAYMENT_FAILED")
        rows.append(
            conn.execute(
                "INSERT INTO outbox (topic, message_key, value, headers) VALUES (%s, %s, %s, %s) "
                "RETURNING id",
                (status_topic, b"p-1", codec.encode("AccountSuspended", event), headers),
            ).fetchone()[0]
        )
    relay = OutboxRelay(settings, stack.bootstrap, dsn)
    relay.snapshot_topic = "no such topic!"
    producer = relay._ensure_producer()
    try:
        assert relay.publish_once(conn, producer) == 1  # parked
        first, second = conn.execute(
            "SELECT parked_at IS NOT NULL, park_reason, park_detail, published_at IS NOT NULL "
            "FROM outbox WHERE id = ANY(%s) ORDER BY id",
            (rows,),
        ).fetchall()
        assert first[:2] == (True, "invalid_topic") and first[2].startswith("snapshot copy:")
        assert second == (False, None, None, False)  # waits behind it
        assert topic_end(stack.bootstrap, status_topic) == 0

        relay.snapshot_topic = settings.topic(topics.STATUS_SNAPSHOT)
        assert retry_parked(dsn) == [rows[0]]
        assert relay.publish_once(conn, producer) == 2
        for topic in (relay.snapshot_topic, status_topic):
            records = read_records(stack.bootstrap, [topic], 2)
            versions = [codec.decode(r.value).event["status_version"] for r in records]
            assert versions == [1, 2], topic
        assert topic_end(stack.bootstrap, relay.snapshot_topic) == 2  # no copy of the parked try
    finally:
        relay._close_producer()
        conn.close()


def topic_end(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        return sum(consumer.end_offsets(partitions).values())
    finally:
        consumer.close()
