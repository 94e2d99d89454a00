"""Which principal may do what on the ledger's topics: the Kafka ACLs of a least-privilege
deployment, as `kafka-acls.sh` commands (`ledger kafka-acls`) and as bindings a test applies.

- the **scheduler** alone writes the control topic (a forged far-future PeriodTick would
  close every account's month);
- the **relay** alone writes the status, dead-letter and checkpoint topics (a forged
  `AccountReinstated` would reach every gateway; a forged checkpoint would be reported);
- the **ledger** (its consumer, and `ledger verify` / `ledger checkpoints digest`) reads the
  input topics and the checkpoint topic;
- the **producers** (API servers, the account service, payments) write the event topics.

Every ledger client reads and writes by manual assignment, without a consumer group, so no
Group ACL is needed. Topics are created by an administrator (`ledger topics create` run with
an admin principal). With `allow.everyone.if.no.acl.found=false` on the brokers nothing else
is allowed; on the local SASL stack it is true, so only topics with ACLs are restricted.
"""

from __future__ import annotations

import dataclasses

from ledger import topics
from ledger.settings import Settings

EVENT_TOPICS = (topics.USAGE, topics.ACCOUNTS, topics.CREDITS, topics.PAYMENTS)


@dataclasses.dataclass(frozen=True)
class Grant:
    principal: str  # the SASL user name (User:<name>)
    operations: tuple[str, ...]  # Read, Write, Describe
    topics: tuple[str, ...]  # full topic names


def plan(
    settings: Settings,
    *,
    ledger: str = "ledger",
    relay: str = "relay",
    scheduler: str = "scheduler",
    producer: str = "producer",
) -> list[Grant]:
    """The grants of a least-privilege deployment, for these principals' user names."""
    full = settings.topic
    return [
        Grant(scheduler, ("Write", "Describe"), (full(topics.CONTROL),)),
        Grant(
            relay,
            ("Write", "Describe"),
            (full(topics.STATUS), full(topics.DEADLETTER), full(topics.CHECKPOINTS)),
        ),
        Grant(
            ledger,
            ("Read", "Describe"),
            tuple(full(t) for t in (*topics.INPUTS, topics.CHECKPOINTS)),
        ),
        Grant(producer, ("Write", "Describe"), tuple(full(t) for t in EVENT_TOPICS)),
    ]


def commands(grants: list[Grant], bootstrap: str = "BROKER:9092") -> list[str]:
    """`kafka-acls.sh` commands that add the grants (run as an admin principal)."""
    out = []
    for grant in grants:
        parts = [
            "kafka-acls.sh",
            f"--bootstrap-server {bootstrap}",
            "--command-config admin.properties",
            "--add",
            f"--allow-principal User:{grant.principal}",
            *(f"--operation {op}" for op in grant.operations),
            *(f"--topic {name}" for name in grant.topics),
        ]
        out.append(" ".join(parts))
    return out


def bindings(grants: list[Grant]) -> list:
    """kafka-python ACL objects for the grants (for `KafkaAdminClient.create_acls`)."""
    from kafka.admin import (
        ACL,
        ACLOperation,
        ACLPermissionType,
        ResourcePattern,
        ResourceType,
    )

    return [
        ACL(
            principal=f"User:{grant.principal}",
            host="*",
            operation=ACLOperation[op.upper()],
            permission_type=ACLPermissionType.ALLOW,
            resource_pattern=ResourcePattern(ResourceType.TOPIC, name),
        )
        for grant in grants
        for op in grant.operations
        for name in grant.topics
    ]
