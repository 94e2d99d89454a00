"""Chain-head checkpoints: every shard's hash-chain head, published outside the database.

The keyed chain (`ledger.book.chain_link`) makes a changed entry fail verification, but
someone with database access could still cut a shard's tail (the last entries, their postings
and raw events) and move `shard_heads` back: the rest still verifies. A checkpoint is the
evidence of how far the journal went: (shard, shard_seq, head link, head key id, head event
id, time), published to the checkpoint topic (`billing.checkpoints.v1`, one partition,
retention unlimited) and printable as a digest an auditor keeps elsewhere.

**Flow.** The active relay (`ledger.relay`, one per deployment) reads every shard's last entry
(`shard_heads` joined with `journal_entries`) every `LEDGER_CHECKPOINT_INTERVAL_S` and
publishes a checkpoint for each shard whose head moved since its last one (all of them after
it starts), keyed by shard, with its own producer (acks=all, idempotent), and waits for the
acks. Nothing is decided or stored in the database for it: a checkpoint is a reading of
committed journal state, so a crash before the ack loses nothing (the next relay publishes the
head it finds then) and a resend is a harmless duplicate. `ledger checkpoints publish` does
one round by hand. A tail cut after its entries were checkpointed is caught; one cut within
the interval after they were journaled, before any checkpoint covered them, is not.

**Message.** The record value is canonical JSON, `{"v": 1, "shard", "seq", "head" (hex),
"chain_key_id", "event_id", "at", "mac_key_id", "mac"}`, where `mac` is HMAC-SHA256 under the
chain key `mac_key_id` over the canonical JSON of the other fields: a checkpoint written by
anyone without the key is reported as forged, never trusted.

**Digest.** `ledger checkpoints digest` prints the latest checkpoint of each shard, one line
each, and a SHA-256 over those lines:

    ledger-checkpoints v1 billing.checkpoints.v1 2026-12-03T10:00:00+00:00
    shard 0 seq 1523 head 3f2a… key k20261201 at 2026-12-03T09:59:58+00:00
    …
    sha256 9b1c…

`ledger verify --checkpoints FILE` checks the journal against such a file instead of the topic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog

from ledger import topics
from ledger.book import canonical_json
from ledger.chain_keys import ChainKeys
from ledger.db import QUERIES
from ledger.errors import LedgerError
from ledger.settings import Settings

log = structlog.get_logger(__name__)

VERSION = 1
DIGEST_TITLE = "ledger-checkpoints v1"
_DIGEST_LINE = re.compile(r"shard (\d+) seq (\d+) head ([0-9a-f]{64}) key (\S+) at (\S+)")


class CheckpointError(LedgerError):
    """A checkpoint message or digest that cannot be read or does not verify."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    shard: int
    seq: int
    head: bytes  # the link (entry_hash) of entry (shard, seq)
    key_id: str | None  # the chain key that entry was linked with (None: an unkeyed entry)
    event_id: str | None  # that entry's event id (None when read from a digest)
    at: datetime
    where: str = ""  # where it was read: "topic offset 17", "digest line 3"

    def describe(self) -> str:
        return f"checkpoint of shard {self.shard} at seq {self.seq} ({self.at.isoformat()})"


# --- making them (the relay) ------------------------------------------------------------------


def current_heads(conn: psycopg.Connection) -> list[tuple[int, int, bytes, str | None, str]]:
    """(shard, last seq, head link, key id, event id) of every shard's last entry."""
    return [
        (shard, seq, bytes(head), key_id, event_id)
        for shard, seq, head, key_id, event_id in conn.execute(QUERIES["checkpoint_heads"])
    ]


def message(
    keys: ChainKeys,
    shard: int,
    seq: int,
    head: bytes,
    key_id: str | None,
    event_id: str,
    at: datetime,
) -> bytes:
    """The checkpoint record's value: canonical JSON, MACed with the current chain key."""
    body: dict[str, Any] = {
        "v": VERSION,
        "shard": shard,
        "seq": seq,
        "head": head.hex(),
        "chain_key_id": key_id,
        "event_id": event_id,
        "at": at.astimezone(UTC).isoformat(),
        "mac_key_id": keys.current,
    }
    body["mac"] = _mac(keys, keys.current, body)
    return canonical_json(body).encode()


def _mac(keys: ChainKeys, key_id: str, body: dict[str, Any]) -> str:
    secret = keys.secret(key_id)
    if secret is None:
        raise CheckpointError(f"signed with chain key {key_id!r}, which the key file lacks")
    unsigned = {k: v for k, v in body.items() if k != "mac"}
    return hmac.new(secret, canonical_json(unsigned).encode(), "sha256").hexdigest()


def parse_message(value: bytes, keys: ChainKeys, where: str) -> Checkpoint:
    """A checkpoint record's value, its MAC checked; CheckpointError if it is not one."""
    try:
        body = json.loads(value)
        if body.get("v") != VERSION:
            raise CheckpointError(f"{where}: not a version {VERSION} checkpoint")
        expected = _mac(keys, str(body["mac_key_id"]), body)
        if not hmac.compare_digest(expected, str(body["mac"])):
            raise CheckpointError(
                f"{where}: the checkpoint's MAC does not verify (forged or altered)"
            )
        return Checkpoint(
            int(body["shard"]),
            int(body["seq"]),
            bytes.fromhex(body["head"]),
            body["chain_key_id"],
            body["event_id"],
            datetime.fromisoformat(body["at"]),
            where,
        )
    except CheckpointError as exc:
        if str(exc).startswith(where):
            raise
        raise CheckpointError(f"{where}: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: not a checkpoint ({type(exc).__name__}: {exc})") from None


class Publisher:
    """Publishes the heads that moved since its last round, with any KafkaProducer."""

    def __init__(self, settings: Settings, keys: ChainKeys):
        self.topic = settings.topic(topics.CHECKPOINTS)
        self.keys = keys
        self.published: dict[int, int] = {}  # shard → seq of its last acked checkpoint

    def due(self, conn: psycopg.Connection) -> list[tuple[int, int, bytes]]:
        """(shard, seq, value) of a checkpoint for every shard whose head moved."""
        now = datetime.now(UTC)
        return [
            (shard, seq, message(self.keys, shard, seq, head, key_id, event_id, now))
            for shard, seq, head, key_id, event_id in current_heads(conn)
            if self.published.get(shard) != seq
        ]

    def publish(self, conn: psycopg.Connection, producer, timeout_s: float = 10.0) -> int:
        """One round: send the due checkpoints and wait for their acks (raises the Kafka
        error of one that was not acked). Returns how many were published."""
        due = self.due(conn)
        futures = [
            (shard, seq, producer.send(self.topic, key=str(shard).encode(), value=value))
            for shard, seq, value in due
        ]
        if not futures:
            return 0
        producer.flush(timeout=timeout_s)
        for shard, seq, future in futures:
            future.get(timeout=timeout_s)
            self.published[shard] = seq
        log.info(
            "checkpoints_published",
            shards={shard: seq for shard, seq, _ in futures},
            topic=self.topic,
        )
        return len(futures)


# --- reading them back ------------------------------------------------------------------------


def read_topic(
    settings: Settings, bootstrap: str, keys: ChainKeys, timeout_s: float = 30.0
) -> tuple[list[Checkpoint], list[str]]:
    """Every checkpoint on the topic, from the beginning, and the problems found (records
    that are not checkpoints or whose MAC does not verify)."""
    from kafka import KafkaConsumer, TopicPartition

    from ledger.consumer import kafka_consumer_options
    from ledger.kafka_auth import client_options

    topic = settings.topic(topics.CHECKPOINTS)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        client_id="ledger-checkpoints",
        enable_auto_commit=False,
        **kafka_consumer_options(settings),
        **client_options(settings),
    )
    found: list[Checkpoint] = []
    problems: list[str] = []
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        if not partitions:
            raise CheckpointError(
                f"the checkpoint topic {topic} does not exist (`ledger topics create`)"
            )
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps, timeout_ms=int(timeout_s * 1000))
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise CheckpointError(f"reading {topic} timed out after {timeout_s:.0f}s")
            for tp, records in consumer.poll(timeout_ms=500).items():
                for record in records:
                    if record.offset >= end[tp]:
                        continue
                    where = f"{topic}[{tp.partition}] offset {record.offset}"
                    try:
                        found.append(parse_message(record.value or b"", keys, where))
                    except CheckpointError as exc:
                        problems.append(str(exc))
    finally:
        consumer.close()
    return found, problems


def latest(checkpoints: list[Checkpoint]) -> dict[int, Checkpoint]:
    """The highest checkpoint of each shard."""
    out: dict[int, Checkpoint] = {}
    for cp in checkpoints:
        if cp.shard not in out or cp.seq > out[cp.shard].seq:
            out[cp.shard] = cp
    return out


def digest(checkpoints: list[Checkpoint], source: str, now: datetime | None = None) -> str:
    """The short text an auditor keeps: the latest checkpoint per shard and a SHA-256."""
    now = now or datetime.now(UTC)
    lines = [f"{DIGEST_TITLE} {source} {now.astimezone(UTC).isoformat(timespec='seconds')}"]
    for shard, cp in sorted(latest(checkpoints).items()):
        lines.append(
            f"shard {shard} seq {cp.seq} head {cp.head.hex()} key {cp.key_id or '-'} "
            f"at {cp.at.isoformat()}"
        )
    body = "\n".join(lines) + "\n"
    return body + f"sha256 {hashlib.sha256(body.encode()).hexdigest()}\n"


def parse_digest(text: str, source: str) -> list[Checkpoint]:
    """The checkpoints of a digest; CheckpointError if it was edited (the SHA-256 line does
    not match) or a line is not a checkpoint."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith(DIGEST_TITLE):
        raise CheckpointError(f"{source}: not a checkpoint digest (no `{DIGEST_TITLE}` line)")
    try:
        end = next(i for i, line in enumerate(lines) if line.startswith("sha256 "))
    except StopIteration:
        raise CheckpointError(f"{source}: no `sha256` line") from None
    body = "\n".join(lines[:end]) + "\n"
    if hashlib.sha256(body.encode()).hexdigest() != lines[end].split()[1]:
        raise CheckpointError(f"{source}: the digest was altered (its sha256 does not match)")
    found = []
    for number, line in enumerate(lines[1:end], 2):
        match = _DIGEST_LINE.fullmatch(line.strip())
        if match is None:
            raise CheckpointError(f"{source} line {number}: not a checkpoint line")
        shard, seq, head, key_id, at = match.groups()
        found.append(
            Checkpoint(
                int(shard),
                int(seq),
                bytes.fromhex(head),
                None if key_id == "-" else key_id,
                None,
                datetime.fromisoformat(at),
                f"{source} line {number}",
            )
        )
    return found
