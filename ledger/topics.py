"""The ledger's Kafka topics: which event type goes where, and idempotent creation.

Names here are base names; the full name is `settings.topic(base)` (adds LEDGER_TOPIC_PREFIX).
Every topic has `settings.partitions` partitions so the input topics are co-partitioned by
account id (the record key), the control topic included.
"""

from __future__ import annotations

from ledger.errors import StackError
from ledger.settings import Settings

USAGE = "billing.usage.v1"
ACCOUNTS = "billing.accounts.v1"
CREDITS = "billing.credits.v1"
PAYMENTS = "billing.payment-methods.v1"
CONTROL = "billing.control.v1"
STATUS = "billing.account-status.v1"
# The latest AccountSuspended/AccountReinstated of each account (keyed by account, compacted),
# written by the relay before the event itself goes to STATUS: a new gateway reads it to its
# end instead of the whole status history (`ledger.status`).
STATUS_SNAPSHOT = "billing.account-status-snapshot.v1"
DEADLETTER = "billing.deadletter.v1"
# Every shard's hash-chain head, published by the relay (`ledger.checkpoints`); kept forever.
CHECKPOINTS = "billing.checkpoints.v1"

INPUTS = (USAGE, ACCOUNTS, CREDITS, PAYMENTS, CONTROL)
ALL = (*INPUTS, STATUS, STATUS_SNAPSHOT, DEADLETTER, CHECKPOINTS)

# Topic configs beyond the partition count and the caller's `configs`: checkpoints are kept
# forever; the snapshot keeps the latest record per key, and rolls a segment every hour so that
# the cleaner compacts it within hours rather than days (it never compacts the active segment).
TOPIC_CONFIGS = {
    CHECKPOINTS: {"retention.ms": "-1", "cleanup.policy": "delete"},
    STATUS_SNAPSHOT: {"cleanup.policy": "compact", "segment.ms": "3600000"},
}

_EVENT_TOPICS = {
    USAGE: ("UsageRecorded",),
    ACCOUNTS: (
        "AccountOpened",
        "SpendLimitConfigured",
        "SpendLimitOverridden",
        "AccountHoldPlaced",
        "AccountHoldReleased",
    ),
    CREDITS: ("CreditPurchased", "CreditGranted", "CreditRevoked"),
    PAYMENTS: ("PaymentMethodAdded", "PaymentMethodRemoved", "PaymentFailed", "InvoicePaid"),
    CONTROL: ("PeriodTick",),
    STATUS: ("AccountSuspended", "AccountReinstated", "SpendLimitWarning", "InvoiceIssued"),
}
TOPIC_OF = {event_type: topic for topic, types in _EVENT_TOPICS.items() for event_type in types}


def topic_for(event_type: str) -> str:
    """The base topic name an event type is published to."""
    try:
        return TOPIC_OF[event_type]
    except KeyError:
        raise ValueError(f"no topic for event type {event_type!r}") from None


def event_types_on(topic: str) -> tuple[str, ...]:
    """The event types published to a base topic name (none for the dead-letter topic)."""
    return _EVENT_TOPICS.get(topic, ())


def input_topics(settings: Settings) -> list[str]:
    return [settings.topic(name) for name in INPUTS]


def all_topics(settings: Settings) -> list[str]:
    return [settings.topic(name) for name in ALL]


def create_topics(
    bootstrap: str,
    settings: Settings,
    *,
    timeout_ms: int = 30_000,
    replication_factor: int = 1,
    configs: dict[str, str] | None = None,
) -> list[str]:
    """Create whichever of the ledger's topics are missing; return the names created.
    `replication_factor` copies of each partition (a multi-broker cluster), with the topic
    `configs` given (e.g. `{"min.insync.replicas": "2"}`) and those of TOPIC_CONFIGS."""
    from kafka.errors import KafkaError

    admin = _admin(bootstrap, settings, timeout_ms)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in all_topics(settings) if name not in existing]
        if not missing:
            return []
        own = {settings.topic(base): extra for base, extra in TOPIC_CONFIGS.items()}
        spec = {}
        for name in missing:
            topic_configs = {**(configs or {}), **own.get(name, {})}
            spec[name] = {
                "num_partitions": settings.partitions,
                "replication_factor": replication_factor,
                **({"configs": topic_configs} if topic_configs else {}),
            }
        result = admin.create_topics(spec, timeout_ms=timeout_ms, raise_errors=False)
        created = []
        for topic in result.get("topics", []):
            code = topic.get("error_code", 0)
            if code == 0:
                created.append(topic["name"])
            elif code != 36:  # TOPIC_ALREADY_EXISTS: someone else won the race; fine
                message = topic.get("error_message") or f"error code {code}"
                raise StackError(f"cannot create topic {topic['name']}: {message}")
        admin.wait_for_topics(missing, timeout_ms=timeout_ms)
        return sorted(created, key=all_topics(settings).index)
    except KafkaError as exc:
        raise StackError(f"creating topics on {bootstrap} failed: {exc}") from exc
    finally:
        admin.close()


def delete_topics(bootstrap: str, settings: Settings, names: list[str]) -> list[str]:
    """Delete the topics `names` (a demo's old runs); return those Kafka deleted."""
    from kafka.errors import KafkaError

    if not names:
        return []
    admin = _admin(bootstrap, settings)
    try:
        result = admin.delete_topics(names, timeout_ms=30_000, raise_errors=False)
        return sorted(t["name"] for t in result.get("topics", []) if t.get("error_code") == 0)
    except KafkaError as exc:
        raise StackError(f"deleting topics on {bootstrap} failed: {exc}") from exc
    finally:
        admin.close()


def list_topics(bootstrap: str, settings: Settings) -> list[str]:
    """Every topic on the cluster."""
    admin = _admin(bootstrap, settings)
    try:
        return sorted(admin.list_topics())
    finally:
        admin.close()


def _admin(bootstrap: str, settings: Settings, timeout_ms: int = 30_000):  # -> KafkaAdminClient
    """An admin client for the topic commands, or StackError naming the brokers."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    from ledger.kafka_auth import client_options

    try:
        return KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="ledger-topics",
            request_timeout_ms=timeout_ms,
            **client_options(settings),
        )
    except KafkaError as exc:
        raise StackError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
