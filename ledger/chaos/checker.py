"""Compare what the ledger ended with (Observed, read from PostgreSQL and Kafka) with what the
fault run sent (the Model). Pure: no I/O, so it is tested with fabricated differences.

Checks, in the order their differences are reported (the first one is "the first difference"):
  stuck           a shard with records neither journaled nor quarantined: from which offset
                  of each topic, and the first bad records among them (often what it is
                  stuck on; otherwise look at the first missing offsets)
  lost            an accepted event is not in raw_events (or was quarantined instead)
  duplicated      an event id journaled more than once; an account charged more than sent
  aborted         an event of an aborted Kafka transaction was journaled
  quarantine      a bad record is not in rejected_events (or was journaled), or has no reason
  either          a record that may go either way went both ways, or neither
  unexplained     a journaled or quarantined record that nobody sent
  deadletter      a quarantined record has no dead-letter copy (or reference)
  totals          usage charged / purchases / grants of an account differ from the model
  status          status_version on the status topic: out of order, a changed re-send, a
                  version the projection recorded (outbox) but nobody published, or the last
                  one not the projection's
  verify          `ledger verify` (trial balance, hash chains, rebuilt projection = live,
                  invoices), `ledger projections rebuild` changing no account's row, and
                  `ledger offsets audit` finding every record below the stored offsets
  stall           a shard made no progress for longer than allowed
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from decimal import Decimal

from ledger.chaos.model import EITHER, QUARANTINE, Model, Totals

ZERO = Decimal(0)


@dataclasses.dataclass(frozen=True)
class Difference:
    check: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.subject}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class Reject:
    topic: str
    partition: int
    offset: int
    event_id: str | None
    reason: str
    digest: bytes


@dataclasses.dataclass(frozen=True)
class StatusEvent:
    version: int
    event_type: str
    reasons: tuple[str, ...]


@dataclasses.dataclass
class Observed:
    journaled: dict[str, str]  # raw_events: event id -> event type
    journaled_twice: dict[str, int]  # event id -> rows, where more than one (should be none)
    rejects: list[Reject]
    totals: dict[str, Totals]  # from postings, per customer account
    deadletter: set[tuple[str, int, int]]  # (dlq_topic, dlq_partition, dlq_offset) headers
    status: dict[str, list[StatusEvent]]  # per account, in topic order (suspend/reinstate)
    status_versions: dict[str, int]  # account_status.status_version (the live projection)
    status_recorded: dict[str, list[StatusEvent]]  # what the projection wrote to the outbox
    verify: list[tuple[str, str, str]]  # ledger.verify differences: (check, subject, detail)
    stalls: dict[int, float] = dataclasses.field(default_factory=dict)  # shard -> max seconds


@dataclasses.dataclass
class Result:
    differences: list[Difference]
    counts: Counter[str]

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def first(self) -> Difference | None:
        return self.differences[0] if self.differences else None


def check(model: Model, seen: Observed, *, max_stall_s: float | None = None) -> Result:
    out: list[Difference] = []
    counts: Counter[str] = Counter()
    rejects_at = {(r.topic, r.partition, r.offset): r for r in seen.rejects}
    rejected_ids = Counter(r.event_id for r in seen.rejects if r.event_id)
    records_at = {(r.topic, r.partition, r.offset): r for r in model.records}

    # lost: accepted events that are not journaled, in Kafka order
    missing: list[tuple[str, int, int, str, bool]] = []  # (topic, partition, offset, what, bad)
    lost = []
    for event_id, (event_type, topic, partition, offset) in model.accepted.items():
        if event_id not in seen.journaled:
            counts["lost"] += 1
            where = "quarantined instead" if rejected_ids.get(event_id) else "not journaled"
            lost.append((topic, partition, offset, event_id, event_type, where))
    for topic, partition, offset, event_id, event_type, where in sorted(lost):
        at = f"{topic}[{partition}]@{offset}"
        out.append(Difference("lost", at, f"{event_type} {event_id} was sent, {where}"))
        missing.append((topic, partition, offset, f"{event_type} {event_id}", False))

    # duplicated: the same id journaled more than once
    for event_id, rows in sorted(seen.journaled_twice.items()):
        counts["duplicated"] += 1
        out.append(Difference("duplicated", event_id, f"journaled {rows} times"))

    # aborted transactions
    for event_id in sorted(model.aborted & seen.journaled.keys()):
        counts["aborted_journaled"] += 1
        out.append(Difference("aborted", event_id, "sent in an aborted transaction, but journaled"))

    # quarantine / either
    for sent in model.records:
        where = (sent.topic, sent.partition, sent.offset)
        reject = rejects_at.get(where)
        journaled = sent.event_id is not None and sent.event_id in seen.journaled
        label = f"{sent.kind} at {sent.topic}[{sent.partition}]@{sent.offset}"
        if sent.fate == QUARANTINE:
            if reject is None:
                counts["quarantine_missing"] += 1
                if not journaled:
                    missing.append((sent.topic, sent.partition, sent.offset, sent.kind, True))
                detail = "journaled instead of quarantined" if journaled else "not quarantined"
                if journaled and sent.kind in ("conflict",):
                    detail = "conflicting duplicate overwrote the original"
                out.append(Difference("quarantine", label, detail))
            elif not reject.reason:
                out.append(Difference("quarantine", label, "quarantined without a reason"))
            else:
                counts["quarantined"] += 1
        elif sent.fate == EITHER:
            if reject is not None and journaled and sent.kind != "redelivery":
                out.append(Difference("either", label, "both journaled and quarantined"))
            elif reject is None and not journaled:
                counts["lost"] += 1
                missing.append((sent.topic, sent.partition, sent.offset, sent.kind, True))
                out.append(Difference("either", label, "neither journaled nor quarantined"))
            elif reject is not None:
                counts["quarantined"] += 1
            else:
                counts["either_journaled"] += 1

    # unexplained rows
    uncertain = set(model.uncertain)
    sent_digests = {r.digest for r in model.records}
    for reject in seen.rejects:
        where = (reject.topic, reject.partition, reject.offset)
        if where in records_at:
            continue
        if reject.digest in uncertain or reject.digest in sent_digests:
            counts["quarantined_copies"] += 1  # a retried send's second copy
            continue
        counts["unexplained"] += 1
        what = f"{reject.topic}[{reject.partition}]@{reject.offset}"
        if reject.event_id in model.accepted:
            out.append(
                Difference(
                    "unexplained",
                    what,
                    f"accepted event {reject.event_id} quarantined ({reject.reason})",
                )
            )
        else:
            out.append(Difference("unexplained", what, f"quarantined ({reject.reason}), not sent"))
    either_ids = {r.event_id for r in model.records if r.event_id}
    for event_id, event_type in sorted(seen.journaled.items()):
        if event_id in model.accepted or event_id in model.aborted or event_id in either_ids:
            continue
        if event_type == "PeriodTick":
            counts["scheduler_ticks"] += 1  # the scheduler's own ticks
            continue
        counts["unexplained"] += 1
        out.append(Difference("unexplained", event_id, f"{event_type} journaled, never sent"))

    # dead-letter copies
    for sent in model.records:
        where = (sent.topic, sent.partition, sent.offset)
        if where in rejects_at and where not in seen.deadletter:
            counts["deadletter_missing"] += 1
            out.append(
                Difference(
                    "deadletter",
                    f"{sent.kind} at {sent.topic}[{sent.partition}]@{sent.offset}",
                    "quarantined but no copy or reference on the dead-letter topic",
                )
            )

    # per-account money
    for account in sorted(set(model.totals) | set(seen.totals)):
        want = model.totals.get(account, Totals())
        have = seen.totals.get(account, Totals())
        for name, w, h in zip(
            ("usage charged", "purchases", "grants"), want.as_tuple(), have.as_tuple(), strict=True
        ):
            if w != h:
                counts["totals_mismatch"] += 1
                if h > w:
                    counts["overcharged"] += 1
                out.append(Difference("totals", account, f"{name}: ledger={h} model={w}"))

    out += check_status(seen.status, seen.status_recorded, seen.status_versions, counts)

    for check_name, subject, detail in seen.verify:
        counts["verify"] += 1
        out.append(Difference("verify", f"{check_name}: {subject}", detail))

    if max_stall_s is not None:
        for shard, stalled in sorted(seen.stalls.items()):
            if stalled > max_stall_s:
                counts["stalled_shards"] += 1
                out.append(
                    Difference(
                        "stall",
                        f"shard {shard}",
                        f"no progress for {stalled:.1f}s (allowed {max_stall_s:.0f}s)",
                    )
                )
    return Result(stuck_partitions(missing, counts) + out, counts)


def stuck_partitions(
    missing: list[tuple[str, int, int, str, bool]], counts: Counter[str]
) -> list[Difference]:
    """One line per shard (partition number, across the input topics) with records neither
    journaled nor quarantined: how many, from which offset in each topic (the first missing
    one), and the first bad records among them (a batch spans the shard's topics, so one bad
    record, or one offset gap, can hold them all)."""
    by_shard: dict[int, list[tuple[str, int, str, bool]]] = {}
    for topic, partition, offset, what, bad in missing:
        if offset >= 0:
            by_shard.setdefault(partition, []).append((topic, offset, what, bad))
    out = []
    for shard, items in sorted(by_shard.items()):
        counts["stuck_shards"] += 1
        firsts: dict[str, int] = {}
        for topic, offset, _, _ in items:
            firsts[topic] = min(offset, firsts.get(topic, offset))
        suspects = sorted((offset, topic, what) for topic, offset, what, bad in items if bad)
        where = ", ".join(f"{t}@{o}" for t, o in sorted(firsts.items()))
        if suspects:
            first_bad = "; bad records among them: " + ", ".join(
                f"{what} at {topic}[{shard}]@{offset}" for offset, topic, what in suspects[:3]
            )
        else:
            topic, offset, what, _ = min(items, key=lambda i: (i[1], i[0]))
            first_bad = f"; the first: {what} at {topic}[{shard}]@{offset}"
        out.append(
            Difference(
                "stuck",
                f"shard {shard}",
                f"{len(items)} records neither journaled nor quarantined, from {where}" + first_bad,
            )
        )
    return out


def check_status(
    status: dict[str, list[StatusEvent]],
    recorded: dict[str, list[StatusEvent]],
    live: dict[str, int],
    counts: Counter[str],
) -> list[Difference]:
    """Per account, the first delivery of each status_version must come in increasing order
    (versions need not be consecutive); a re-send (crash between publish and mark) repeats an
    earlier version unchanged; every version the projection recorded in the outbox is
    delivered, and no other; the last one is the live projection's."""
    out = []
    accounts = set(status) | set(recorded) | {a for a, v in live.items() if v > 0}
    for account in sorted(accounts):
        seen: dict[int, StatusEvent] = {}
        top = 0
        for event in status.get(account, []):
            counts["status_events"] += 1
            if event.version in seen:
                counts["status_resent"] += 1
                if seen[event.version] != event:
                    out.append(
                        Difference(
                            "status",
                            account,
                            f"version {event.version} re-sent with other "
                            f"content: {seen[event.version]} then {event}",
                        )
                    )
                continue
            if event.version <= top:
                out.append(
                    Difference(
                        "status", account, f"out of order: version {event.version} after {top}"
                    )
                )
            seen[event.version] = event
            top = max(top, event.version)
        wanted = {e.version: e for e in recorded.get(account, [])}
        for version in sorted(set(wanted) - set(seen)):
            out.append(
                Difference(
                    "status",
                    account,
                    f"gap: version {version} recorded by the projection, never published",
                )
            )
        for version in sorted(set(seen) - set(wanted)):
            out.append(
                Difference("status", account, f"version {version} published, never recorded")
            )
        if top != live.get(account, 0):
            out.append(
                Difference(
                    "status",
                    account,
                    f"topic ends at version {top}, the projection is at {live.get(account, 0)}",
                )
            )
    return out
