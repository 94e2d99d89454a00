"""Following account status from a gateway: which accounts must not be served, and why.

    statuses = AccountStatusFollower("kafka-1:9092,kafka-2:9092")   # or .from_settings()
    statuses.bootstrap()              # the snapshot to its end, then the live topic from there
    threading.Thread(target=statuses.run, args=(stop,), daemon=True).start()
    ...
    if statuses.is_suspended(account_id): refuse(statuses.reasons(account_id))

**What it follows.** The ledger publishes every change of an account's status to
`billing.account-status.v1` (`AccountSuspended` with its reasons, `AccountReinstated`), each
with the account's `status_version`, which strictly increases per account. Delivery is
at-least-once (the relay re-sends what it had not marked when it was interrupted), so a
follower keeps, per account, the change with the highest version: a version it already has is
a duplicate, a lower one is stale, and both are dropped (`StatusBook.apply`). Spend-limit
warnings and invoices on the same topic carry the version of the status they follow and change
nothing here.

**Bootstrap without reading the whole history.** The relay keeps a log-compacted topic keyed
by account, `billing.account-status-snapshot.v1`, holding each account's latest status change:
before it sends a batch of status changes to the status topic, it writes their copies to the
snapshot and waits until Kafka has acknowledged every copy (`ledger.relay`). `bootstrap()`:

  1. takes the status topic's end offsets E (before anything else);
  2. reads the snapshot topic from its beginning to its end offsets, taken after step 1;
  3. follows the status topic from E.

No change can be missed. A change at an offset below E was on the status topic when step 1
ran, so its snapshot copy had been acknowledged before that, hence before the snapshot's end
was taken in step 2: step 2 reads it, or a later record of the same account that compaction
kept instead (a higher version, since the relay writes an account's changes in version
order; or a record beyond the end taken in step 2, whose own status event is then at or
after E, so step 3 reads it). A change at or after E is read in step 3. The two overlap
(a change can be read in both, the snapshot can be ahead of the status topic), which is
harmless: the lower or equal version is dropped. An account that never changed status has no
record anywhere and is not suspended.

The snapshot covers the changes the relay published since it began writing it (an
installation that had status changes before the snapshot topic existed should let its new
gateways read the status topic from the beginning once: `bootstrap(snapshot=False)`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable
from datetime import datetime

import structlog
from kafka import KafkaConsumer, TopicPartition

from ledger import topics
from ledger.backoff import kafka_reconnect_options
from ledger.codec import Codec
from ledger.errors import DecodeError, LedgerError
from ledger.settings import Settings

log = structlog.get_logger(__name__)

STATUS_CHANGES = ("AccountSuspended", "AccountReinstated")


@dataclasses.dataclass(frozen=True)
class AccountState:
    """An account's latest status change."""

    account_id: str
    status_version: int
    suspended: bool
    reasons: tuple[str, ...]  # why it is suspended (empty when it is not)
    effective_at: datetime


class StatusBook:
    """Per account, the status change with the highest `status_version` seen (pure: no I/O)."""

    def __init__(self) -> None:
        self._accounts: dict[str, AccountState] = {}
        self.applied = 0
        self.duplicates = 0  # the same (account_id, status_version) again
        self.stale = 0  # a lower status_version than the one kept
        self.ignored = 0  # other event types (warnings, invoices)

    def apply(self, event_type: str, event: dict) -> AccountState | None:
        """Keep the change if it is newer than what is kept; returns it, or None when it was
        a duplicate, stale, or not a status change."""
        if event_type not in STATUS_CHANGES:
            self.ignored += 1
            return None
        account_id, version = event["account_id"], event["status_version"]
        current = self._accounts.get(account_id)
        if current is not None and version <= current.status_version:
            if version == current.status_version:
                self.duplicates += 1
            else:
                self.stale += 1
            return None
        suspended = event_type == "AccountSuspended"
        state = AccountState(
            account_id,
            version,
            suspended,
            tuple(event.get("reasons", ())) if suspended else (),
            event["effective_at"],
        )
        self._accounts[account_id] = state  # one assignment: readers in other threads are safe
        self.applied += 1
        return state

    def is_suspended(self, account_id: str) -> bool:
        state = self._accounts.get(account_id)
        return state is not None and state.suspended

    def reasons(self, account_id: str) -> tuple[str, ...]:
        state = self._accounts.get(account_id)
        return state.reasons if state is not None else ()

    def state(self, account_id: str) -> AccountState | None:
        return self._accounts.get(account_id)

    def suspended(self) -> dict[str, tuple[str, ...]]:
        """{account_id: reasons} of every suspended account."""
        return {a: s.reasons for a, s in list(self._accounts.items()) if s.suspended}


class AccountStatusFollower:
    """A `StatusBook` kept current from Kafka. `bootstrap()` once, then `poll()` in a loop (or
    `run(stop)` in a thread); `is_suspended` and `reasons` may be called from any thread."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topic_prefix: str = "",
        codec: Codec | None = None,
        **consumer_options,
    ):
        self.status_topic = topic_prefix + topics.STATUS
        self.snapshot_topic = topic_prefix + topics.STATUS_SNAPSHOT
        self.codec = codec or Codec.default()
        self.book = StatusBook()
        self.undecodable = 0
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            enable_incremental_fetch_sessions=False,
            client_id="ledger-status-follower",
            # The workers' reconnect and metadata options, unless given: a follower catching
            # up right after a partition leader moved otherwise waits for its metadata's
            # 5-minute refresh (kafka-python retries "not leader" against cached leaders).
            **(kafka_reconnect_options() | consumer_options),
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **consumer_options):
        """A follower for the configured brokers, credentials and topic prefix:
        LEDGER_KAFKA_BOOTSTRAP (else the local stack's Kafka), the LEDGER_KAFKA_* security
        settings and LEDGER_TOPIC_PREFIX."""
        from ledger import stack
        from ledger.kafka_auth import client_options

        settings = settings or Settings.from_env()
        return cls(
            stack.kafka_bootstrap(settings),
            topic_prefix=settings.topic_prefix,
            **(client_options(settings) | consumer_options),
        )

    # --- reading --------------------------------------------------------------------------

    def is_suspended(self, account_id: str) -> bool:
        return self.book.is_suspended(account_id)

    def reasons(self, account_id: str) -> tuple[str, ...]:
        return self.book.reasons(account_id)

    def suspended(self) -> dict[str, tuple[str, ...]]:
        return self.book.suspended()

    # --- following ------------------------------------------------------------------------

    def bootstrap(self, *, snapshot: bool = True, timeout_s: float = 60.0) -> int:
        """Get ready to follow: with `snapshot`, read the snapshot topic to its end and place
        the status topic at its end as of before that read (module docstring: why nothing is
        missed); without, follow the status topic from its beginning (the whole history).
        Returns the records applied from the snapshot."""
        deadline = time.monotonic() + timeout_s
        status = self._partitions(self.status_topic, deadline)
        if not snapshot:
            self.consumer.assign(status)
            self.consumer.seek_to_beginning(*status)
            return 0
        ends = self.consumer.end_offsets(status)  # 1. before the snapshot is read
        parts = self._partitions(self.snapshot_topic, deadline)
        snapshot_ends = self.consumer.end_offsets(parts)  # 2. after step 1
        self.consumer.assign(parts)
        self.consumer.seek_to_beginning(*parts)
        before = self.book.applied
        while any(self.consumer.position(tp) < end for tp, end in snapshot_ends.items()):
            if time.monotonic() > deadline:
                raise LedgerError(
                    f"{self.snapshot_topic}: not read to its end within {timeout_s} s"
                )
            self._apply(r for rs in self.consumer.poll(timeout_ms=200).values() for r in rs)
        applied = self.book.applied - before
        self.consumer.assign(status)  # 3. the live topic from where step 1 found its end
        for tp in status:
            self.consumer.seek(tp, ends[tp])
        log.info("status_snapshot_read", accounts=applied, suspended=len(self.suspended()))
        return applied

    def poll(self, timeout_ms: int = 200) -> list[AccountState]:
        """Apply what arrived on the status topic; returns the changes kept."""
        if not self.consumer.assignment():
            raise LedgerError("call bootstrap() before poll(): it places the follower")
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        return self._apply(r for rs in polled.values() for r in rs)

    def run(self, stop: threading.Event) -> None:
        """`poll()` until `stop` is set (call `bootstrap()` first)."""
        while not stop.is_set():
            self.poll()

    def close(self) -> None:
        self.consumer.close(autocommit=False)

    def _apply(self, records: Iterable) -> list[AccountState]:
        kept = []
        for record in records:
            if record.value is None:
                continue  # a tombstone: nothing to learn
            try:
                decoded = self.codec.decode(record.value)
            except DecodeError as exc:
                self.undecodable += 1
                log.warning(
                    "status_record_undecodable",
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    reason=exc.reason,
                )
                continue
            state = self.book.apply(decoded.event_type, decoded.event)
            if state is not None:
                kept.append(state)
        return kept

    def _partitions(self, topic: str, deadline: float) -> list[TopicPartition]:
        while True:
            found = self.consumer.partitions_for_topic(topic)
            if found:
                return [TopicPartition(topic, p) for p in sorted(found)]
            if time.monotonic() > deadline:
                raise LedgerError(f"topic {topic} not found (run `ledger topics create`)")
            time.sleep(0.2)
