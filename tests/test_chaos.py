"""The fault-injection run (`make chaos`), small: its checker on fabricated outcomes (each
kind of difference must be caught and named), the seeded schedules, and short runs on a real
3-node Kafka cluster + PostgreSQL of their own."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from ledger.chaos import faults
from ledger.chaos.checker import Observed, Reject, StatusEvent, check
from ledger.chaos.malformed import KINDS, Maker, schedule
from ledger.chaos.model import ACCEPT, EITHER, QUARANTINE, Model, SentRecord, Totals, digest
from ledger.chaos.report import render
from ledger.chaos.run import Options, run
from ledger.chaos.traffic import Progress, plan
from ledger.codec import Codec

AT = datetime(2026, 11, 3, tzinfo=UTC)
MODEL_8B = "accounts/fireworks/models/llama-v3p1-8b-instruct"


def usage(event_id: str, account: str, tokens: int = 1_000_000, tier: str = "standard") -> dict:
    return {
        "event_id": event_id,
        "account_id": account,
        "occurred_at": AT,
        "model": MODEL_8B,
        "service_tier": tier,
        "input_tokens": tokens,
        "output_tokens": tokens,
    }


def small_model() -> Model:
    """acct-a opened, $25 bought, 1M+1M tokens of the 8B model (0.20 + 0.18) on batch (×0.5);
    one aborted transaction; one tombstone quarantined; one 1970 usage that may go either way."""
    model = Model()
    model.accept("AccountOpened", {"event_id": "e1", "account_id": "acct-a", "occurred_at": AT})
    model.accept(
        "CreditPurchased",
        {"event_id": "e2", "account_id": "acct-a", "occurred_at": AT, "amount": Decimal("25")},
    )
    model.accept(
        "UsageRecorded", usage("e3", "acct-a", tier="batch"), topic="usage", partition=0, offset=5
    )
    model.abort(["x1", "x2"])
    model.record(SentRecord("tombstone", QUARANTINE, "usage", 0, 7, digest(None)))
    model.record(SentRecord("year1970", EITHER, "usage", 0, 8, digest(b"old"), "e4"))
    return model


def clean_observation() -> Observed:
    return Observed(
        journaled={
            "e1": "AccountOpened",
            "e2": "CreditPurchased",
            "e3": "UsageRecorded",
            "e4": "UsageRecorded",
            "tick-1": "PeriodTick",
        },
        journaled_twice={},
        rejects=[Reject("usage", 0, 7, None, "bad_magic", digest(None))],
        totals={"acct-a": Totals(Decimal("0.19"), Decimal("25"), Decimal("1"))},
        deadletter={("usage", 0, 7)},
        status={
            "acct-a": [
                StatusEvent(1, "AccountSuspended", ("SPEND_LIMIT_REACHED",)),
                StatusEvent(2, "AccountReinstated", ()),
                StatusEvent(1, "AccountSuspended", ("SPEND_LIMIT_REACHED",)),  # a re-send
            ]
        },
        status_versions={"acct-a": 2},
        status_recorded={
            "acct-a": [
                StatusEvent(1, "AccountSuspended", ("SPEND_LIMIT_REACHED",)),
                StatusEvent(2, "AccountReinstated", ()),
            ]
        },
        verify=[],
        stalls={0: 1.5},
    )


def test_the_model_prices_usage_from_its_own_table():
    model = small_model()
    # (1M × 0.20 + 1M × 0.18) / 1M × 0.5 = 0.19
    assert model.totals["acct-a"].as_tuple() == (Decimal("0.19"), Decimal("25"), Decimal("1"))
    assert model.expected_quarantined == 1


def test_checker_passes_a_clean_outcome():
    result = check(small_model(), clean_observation(), max_stall_s=20)
    assert result.ok, [str(d) for d in result.differences]
    assert result.counts["quarantined"] == 1
    assert result.counts["status_resent"] == 1
    assert result.counts["scheduler_ticks"] == 1


@pytest.mark.parametrize(
    ("spoil", "first"),
    [
        (lambda o: o.journaled.pop("e3"), "stuck: shard 0: 1 records neither journaled"),
        (lambda o: o.journaled.update(x2="UsageRecorded"), "aborted: x2"),
        (lambda o: o.journaled_twice.update(e2=2), "duplicated: e2: journaled 2 times"),
        (lambda o: o.rejects.clear(), "stuck: shard 0: 1 records neither journaled nor"),
        (lambda o: o.deadletter.clear(), "deadletter: tombstone at usage[0]@7"),
        (
            lambda o: o.rejects.append(Reject("usage", 0, 8, "e4", "too_old", digest(b"old"))),
            "either: year1970 at usage[0]@8: both journaled and quarantined",
        ),
        (
            lambda o: o.rejects.append(Reject("usage", 1, 3, "e9", "schema_violation", b"?")),
            "unexplained: usage[1]@3",
        ),
        (
            lambda o: (
                o.totals.update(acct_a=None)
                or o.totals.__setitem__(
                    "acct-a", Totals(Decimal("0.38"), Decimal("25"), Decimal("1"))
                )
            ),
            "totals: acct-a: usage charged: ledger=0.38 model=0.19",
        ),
        (
            lambda o: o.status["acct-a"].insert(0, StatusEvent(2, "AccountReinstated", ())),
            "status: acct-a: out of order: version 1 after 2",
        ),
        (
            lambda o: o.status["acct-a"].pop(1),
            "status: acct-a: gap: version 2 recorded by the projection, never published",
        ),
        (lambda o: o.status_versions.update({"acct-a": 3}), "status: acct-a: topic ends at"),
        (
            lambda o: o.verify.append(("trial_balance", "USD", "postings sum to 1, not 0")),
            "verify: trial_balance: USD",
        ),
        (lambda o: o.stalls.update({3: 31.0}), "stall: shard 3: no progress for 31.0s"),
    ],
)
def test_checker_names_the_first_difference(spoil, first):
    seen = clean_observation()
    spoil(seen)
    seen.totals.pop("acct_a", None)
    result = check(small_model(), seen, max_stall_s=20)
    assert not result.ok
    assert str(result.first).startswith(first), str(result.first)


def test_a_deliberately_dropped_event_is_counted_as_lost():
    seen = clean_observation()
    del seen.journaled["e2"]  # the purchase never made it: lost, and the money differs
    seen.totals["acct-a"] = Totals(Decimal("0.19"), Decimal("0"), Decimal("1"))
    result = check(small_model(), seen)
    assert result.counts["lost"] == 1
    assert [d.check for d in result.differences] == ["lost", "totals"]
    assert str(result.first) == "lost: [-1]@-1: CreditPurchased e2 was sent, not journaled"
    assert str(result.differences[1]) == "totals: acct-a: purchases: ledger=0 model=25"


def test_a_stuck_partition_is_named_with_the_record_it_is_stuck_on():
    model, seen = small_model(), clean_observation()
    model.accept("UsageRecorded", usage("e5", "acct-a", 0), topic="usage", partition=0, offset=9)
    seen.rejects.clear()  # the tombstone at offset 7 poisoned the partition: 7, then 9, lost
    seen.deadletter.clear()
    seen.journaled.pop("e3")  # offset 5 made it through? no: also missing
    result = check(model, seen)
    assert str(result.first) == (
        "stuck: shard 0: 3 records neither journaled nor quarantined, from usage@5; "
        "bad records among them: tombstone at usage[0]@7"
    )
    assert result.counts["lost"] == 2 and result.counts["quarantine_missing"] == 1


def test_the_same_seed_gives_the_same_traffic_malformed_records_and_faults():
    def everything(seed: int):
        events = [list(plan(seed, p, 3, 30, 200)) for p in range(3)]
        bad_rng = random.Random(f"{seed}:malformed")
        order = schedule(list(KINDS), 60, bad_rng)
        maker = Maker(bad_rng, 30, Progress(None))
        sample = next(e for t, e in events[0] if t == "UsageRecorded")
        value = Codec.default().encode("UsageRecorded", sample)
        maker.progress.samples.append(("UsageRecorded", sample, value))
        bad = [(b.kind, b.fate, b.key, b.value) for b in map(maker.build, order)]
        counts = {"kill": 20, "broker": 3, "pg": 2, "stop": 1}
        return events, bad, faults.plan(seed, counts, brokers=3, stop_s=30)

    first, again, other = everything(7), everything(7), everything(8)
    assert first == again
    assert first != other
    events, bad, schedule_ = first
    assert sum(len(e) for e in events) == 600
    assert [f.kind for f in schedule_].count("kill") == 20
    assert {kind for kind, *_ in bad} == set(KINDS)
    codec = Codec.default()
    for kind, fate, _, value in bad:
        if fate == QUARANTINE and kind in ("tombstone", "random", "magic", "fingerprint"):
            with pytest.raises(Exception):  # noqa: B017 - any DecodeError
                codec.decode(value)
        if fate == ACCEPT:
            codec.decode(value)


# --- short runs on real services ---------------------------------------------------------------

# A small run: worker SIGKILLs (ledger, projections, relay, restarted), one broker of three
# SIGKILLed and restarted, plain producers and the odd-but-valid records (redeliveries, usage
# of unknown accounts); the full mix below adds the rest.
SMALL = Options(
    events=3_000,
    seed=20261201,
    faults=("kill", "broker"),
    kills=4,
    broker_kills=1,
    pg_restarts=0,
    stops=0,
    malformed=("redelivery", "unknown_account"),
    malformed_count=100,
    transactional=0,
    producers=3,
    rate=400,
    heap="256m",
    partitions=4,
    settle_s=30,
    drain_timeout_s=300,
    # Stalls are measured and printed, not asserted here: on a shared 2-core machine a broker
    # restart alone can take a minute. The full mix below asserts a bound on the frozen holder.
    max_stall_s=None,
)


# The full mix: transactional producers aborting some transactions, every malformed kind, a
# PostgreSQL immediate restart and the shard holder frozen for 60 s. (Before the consumer
# counted a shard as owned only once its partitions were assigned, a standby that took the
# leases while PostgreSQL restarted never consumed them: `stuck: shard 0: 228 records …`.)
FULL_MIX = dataclasses.replace(
    SMALL,
    seed=20261202,
    faults=("kill", "broker", "pg", "stop"),
    pg_restarts=1,
    stops=1,
    # The holder is frozen for 60 s; the shards must move on well before (lease timeout).
    stop_s=60,
    max_stall_s=45,
    malformed=KINDS,
    malformed_count=1_000,
    transactional=2,
    producers=4,
)


@pytest.mark.slow
def test_short_fault_run_with_the_full_mix(tmp_path):
    outcome = run(dataclasses.replace(FULL_MIX, home=tmp_path / "chaos"))
    print(render(outcome))  # the table, with pytest -s
    kinds = [i.fault.kind for i in outcome.injected]
    assert (kinds.count("kill"), kinds.count("broker"), kinds.count("pg"), kinds.count("stop")) == (
        4, 1, 1, 1,
    )  # fmt: skip
    assert all(i.error is None for i in outcome.injected)
    assert outcome.result.ok, "\n".join(str(d) for d in outcome.result.differences[:20])
    assert outcome.model.transactions["aborted"] > 0
    # Of the 1,000 odd records, those that must be quarantined (the rest may be journaled).
    assert outcome.model.expected_quarantined >= 500


def test_the_replay_command_keeps_every_option_but_the_seed():
    from ledger.chaos.__main__ import replay_command

    argv = ["--events", "500", "--seed", "3", "--faults", "kill", "--seed=4", "--home", "/x"]
    assert replay_command(argv, 9) == "python -m ledger.chaos --events 500 --faults kill --seed 9"


def test_an_unknown_kind_is_refused_by_name(capsys):
    from ledger.chaos.__main__ import parser

    with pytest.raises(SystemExit):
        parser().parse_args(["--malformed", "tombstone,gremlin"])
    assert "unknown malformed kind gremlin" in capsys.readouterr().err
    args = parser().parse_args(["--faults", "kill,pg", "--malformed", "none"])
    assert (args.faults, args.malformed) == (("kill", "pg"), ())


def test_stalls_and_recovery_from_commit_times():
    from ledger.chaos.observe import max_stalls, recovery

    times = {0: [10.0, 11.0, 25.0, 26.0], 1: [12.0, 13.0]}
    # From the start of traffic (9.0) to its end (30.0); shard 1 committed nothing after 13.0,
    # shard 2 had traffic and never committed.
    assert max_stalls(times, {0, 1, 2}, 9.0, 30.0) == {0: 14.0, 1: 17.0, 2: 21.0}
    assert recovery(times, 12.5) == (12.5, [])
    assert recovery(times, 20.0) == (5.0, [1])


def test_cluster_nodes_form_one_quorum_with_three_copies_of_everything(tmp_path, base_settings):
    from ledger.stack.cluster import KafkaCluster, Node

    cluster = KafkaCluster(base_settings, tmp_path, size=3)
    for i in (1, 2, 3):
        cluster.nodes[i] = Node(i, 9000 + i, 9100 + i, tmp_path / f"node-{i}")
        cluster.nodes[i].directory.mkdir()
    cluster._write_properties(cluster.nodes[2])
    props = dict(
        line.split("=", 1)
        for line in cluster.nodes[2].props.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == (
        "1@127.0.0.1:9101,2@127.0.0.1:9102,3@127.0.0.1:9103"
    )
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9002"
    for key in ("default.replication.factor", "offsets.topic.replication.factor",
                "transaction.state.log.replication.factor"):  # fmt: skip
        assert props[key] == "3"
    assert props["min.insync.replicas"] == props["transaction.state.log.min.isr"] == "2"
    assert cluster.bootstrap == "127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003"
