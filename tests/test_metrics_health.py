"""A running worker serves Prometheus metrics that move with the events it journals, /healthz
and /readyz (503 naming what is not ready: shards held by another worker, PostgreSQL
unreachable); `ledger status` shows lag, lease holders, backlog and rejects."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid

import psycopg
import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from ledger import health, topics
from ledger.runner import start_worker, stop_worker, worker_env
from ledger.settings import Settings
from ledger.worker import start_roles
from tests.harness import Ledger, wait_until
from tests.test_cli import ledger_cli, services_env

CREDITS_EXHAUSTED = "CREDITS_EXHAUSTED_NO_PAYMENT_METHOD"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:  # not listening yet
        return 0, str(error)


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of everything /metrics exports."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: dict, name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for (n, k), v in samples.items() if n == name}


class Worker:
    """`ledger worker` as a child process with metrics on a free port."""

    def __init__(self, settings, stack, dsn, tmp_path, roles, **env):
        self.port = free_port()
        settings_env = worker_env(settings, stack.bootstrap, dsn) | {
            "LEDGER_METRICS_PORT": str(self.port),
            **env,
        }
        self.log = tmp_path / "worker.log"
        self.proc = start_worker(roles, settings_env, self.log)

    def get(self, path: str) -> tuple[int, str]:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return get(self.port, path)

    def ready(self) -> tuple[int, dict]:
        status, body = self.get("/readyz")
        return status, (json.loads(body) if status in (200, 503) else {})

    def stop(self) -> None:
        assert stop_worker(self.proc, 15) == 0, self.log.read_text()[-3000:]


def test_a_worker_serves_metrics_that_move_with_the_events(settings, stack, dsn, tmp_path):
    worker = Worker(
        settings,
        stack,
        dsn,
        tmp_path,
        ("ledger", "projections", "relay", "scheduler"),
        LEDGER_TICK_INTERVAL_S="3600",  # one tick at start, none while the test counts
    )
    feed = Ledger(settings, stack.bootstrap, dsn)
    try:
        wait_until(lambda: worker.ready()[0] == 200, 60, f"worker ready: {worker.ready()}")
        assert worker.get("/healthz") == (200, "ok\n")
        # The scheduler's first tick (and the configuration it brings to each shard) is
        # journaled before the test counts.
        before = wait_until(
            lambda: (
                (now := scrape(worker.port))
                and value(now, "ledger_events_journaled_total", event_type="PeriodTick") == 4
                and now
            ),
            30,
            "the scheduler's first tick journaled on the 4 shards",
        )
        assert value(before, "ledger_scheduler_last_tick_timestamp_seconds") > 0
        assert value(before, "ledger_database_up") == 1
        assert set(labelled(before, "ledger_consumer_lag_records", "shard")) == {"0", "1", "2", "3"}
        assert value(before, "ledger_consumer_shards_held") == 4

        for n in range(3):
            feed.open_account(f"m-{n}")
        feed.use("m-0", output_tokens=2_000_000)  # $1.80 > the $1 credit: suspended
        usage = feed.use("m-1", output_tokens=1000)
        feed.producer.send("UsageRecorded", usage).get(timeout=30)  # the same event again
        raw = KafkaProducer(bootstrap_servers=stack.bootstrap)
        raw.send(settings.topic(topics.USAGE), key=b"m-2", value=b"not avro").get(timeout=30)
        raw.close()
        feed.settle(6)
        [(reason,)] = feed.db.execute("SELECT reason FROM rejected_events").fetchall()

        status_topic = settings.topic(topics.STATUS)
        expected = [
            ("ledger_events_journaled_total", {"event_type": "AccountOpened"}, 3),
            ("ledger_events_journaled_total", {"event_type": "UsageRecorded"}, 2),
            ("ledger_events_duplicate_total", {}, 1),
            ("ledger_events_rejected_total", {"reason": reason}, 1),
            ("ledger_accounts_suspended", {"reason": CREDITS_EXHAUSTED}, 1),
        ]

        def moved() -> dict | None:
            """Counters are counted just after the commits the database already shows."""
            now = scrape(worker.port)
            done = all(
                value(now, name, **labels) - value(before, name, **labels) >= count
                for name, labels, count in expected
            ) and value(now, "ledger_outbox_published_total", topic=status_topic)
            return now if done else None

        after = wait_until(moved, 30, "the counters to move")

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert [delta(name, **labels) for name, labels, _ in expected] == [3, 2, 1, 1, 1]
        assert delta("ledger_journal_batch_records_count") >= 1
        assert delta("ledger_journal_commit_seconds_count") == delta(
            "ledger_journal_batch_records_count"
        )
        assert delta("ledger_journal_batch_records_sum") == 7  # 6 events and the copy
        # The suspension went out through the relay.
        assert delta("ledger_relay_publish_seconds_count") >= 1
        assert ("ledger_outbox_backlog_rows", frozenset()) in after
        assert value(after, "ledger_outbox_parked_rows") == 0
        assert value(after, "ledger_accounts_suspended", reason=CREDITS_EXHAUSTED) == 1
        assert value(after, "ledger_rejects_open", reason=reason) == 1
        assert set(labelled(after, "ledger_projection_lag_entries", "shard")) == {
            "0",
            "1",
            "2",
            "3",
        }
        assert set(labelled(after, "ledger_shard_last_tick_timestamp_seconds", "shard")) == {
            "0",
            "1",
            "2",
            "3",
        }
        assert delta("ledger_projection_entries_applied_total") >= 5
        # Everything read: the lag of every shard and the backlog come back to zero.
        wait_until(
            lambda: (
                not any(
                    labelled(scrape(worker.port), "ledger_consumer_lag_records", "shard").values()
                )
            ),
            30,
            "consumer lag 0",
        )
        assert value(scrape(worker.port), "ledger_outbox_backlog_rows") == 0
    finally:
        feed.close()
        worker.stop()


def test_readyz_is_503_until_the_worker_has_its_shards_or_stands_by(settings, stack, dsn, tmp_path):
    # Its own topics, not created yet: the consumer cannot start, so it has no shards.
    prefix = f"t{uuid.uuid4().hex[:10]}."
    settings = dataclasses.replace(settings, topic_prefix=prefix, consumer_group=f"{prefix}ledger")
    feed = Ledger(settings, stack.bootstrap, dsn)
    feed.db.execute(  # another worker holds every shard, its leases live for an hour
        "INSERT INTO shard_leases (group_id, shard, holder, expires_at) "
        "SELECT %s, s, 'other-host:1:cafe', now() + interval '1 hour' FROM generate_series(0, 3) s",
        (settings.consumer_group,),
    )
    worker = Worker(settings, stack, dsn, tmp_path, ("ledger",))
    try:
        status, body = wait_until(lambda: (r := worker.ready())[0] and r, 60, "readyz answers")
        assert worker.get("/healthz") == (200, "ok\n")
        assert status == 503
        assert set(body["not_ready"]) == {"shards"}, body  # database and broker are fine
        assert "the ledger consumer has not started" in body["not_ready"]["shards"]

        # The topics appear; every shard is held by the other worker: a ready standby.
        topics.create_topics(stack.bootstrap, settings)
        _, body = wait_until(lambda: (r := worker.ready())[0] == 200 and r, 60, "standby")
        assert body == {"ready": True, "roles": ["ledger"], "standby_for_shards": [0, 1, 2, 3]}
        assert value(scrape(worker.port), "ledger_consumer_shards_held") == 0
        report = json.loads(
            ledger_cli("status", "--json", env=services_env(stack, dsn) | _group(settings)).stdout
        )
        assert {row["holder"] for row in report["shards"]} == {"other-host:1:cafe"}

        # The other worker froze: its leases expire, and this one takes the shards over.
        feed.db.execute("UPDATE shard_leases SET expires_at = now() - interval '1 second'")
        _, body = wait_until(
            lambda: (r := worker.ready())[0] == 200 and "standby_for_shards" not in r[1] and r,
            30,
            "ready, holding the shards",
        )
        assert body == {"ready": True, "roles": ["ledger"]}
        assert value(scrape(worker.port), "ledger_consumer_shards_held") == 4
    finally:
        feed.close()
        worker.stop()


def test_readyz_names_an_unreachable_database_and_broker(settings, stack, dsn):
    closed = free_port()
    parts = urllib.parse.urlsplit(dsn)
    bad_dsn = parts._replace(netloc=parts.netloc.replace(f":{parts.port}", f":{closed}")).geturl()
    assert urllib.parse.urlsplit(bad_dsn).port == closed
    stop = threading.Event()
    roles = ("ledger", "projections", "relay")
    threads = start_roles(settings, stack.bootstrap, bad_dsn, roles, stop)
    server = health.MetricsServer(settings, stack.bootstrap, bad_dsn, roles, port=0)
    try:
        status, body = get(server.port, "/readyz")
        assert status == 503
        problems = json.loads(body)["not_ready"]
        assert set(problems) == {"database", "shards"}, problems  # the broker answers
        assert str(closed) in problems["database"]
        assert get(server.port, "/healthz") == (200, "ok\n")
        samples = scrape(server.port)
        assert value(samples, "ledger_database_up") == 0
        assert ("ledger_outbox_backlog_rows", frozenset()) not in samples
    finally:
        stop.set()
        server.close()
        for thread in threads:
            thread.join(timeout=10)
    assert health.broker_problem(stack.bootstrap) is None
    assert "127.0.0.1:" + str(closed) in health.broker_problem(f"127.0.0.1:{closed}")


def test_a_metrics_port_is_validated():
    assert Settings.from_env({}).metrics_port == 0  # off unless set
    with pytest.raises(Exception, match=r"LEDGER_METRICS_PORT=70000: must be in \[0, 65535\]"):
        Settings.from_env({"LEDGER_METRICS_PORT": "70000"})
    with pytest.raises(Exception, match="LEDGER_READY_MAX_LAG='lots': not an integer"):
        Settings.from_env({"LEDGER_READY_MAX_LAG": "lots"})


def test_ledger_status_shows_lag_holders_backlog_and_rejects(settings, stack, dsn):
    env = services_env(stack, dsn) | _group(settings)
    feed = Ledger(settings, stack.bootstrap, dsn)
    try:
        for n in range(5):
            feed.open_account(f"s-{n}")
        raw = KafkaProducer(bootstrap_servers=stack.bootstrap)
        raw.send(settings.topic(topics.USAGE), key=b"s-0", value=b"not avro").get(timeout=30)
        raw.close()
        report = json.loads(ledger_cli("status", "--json", env=env).stdout)
        assert [row["shard"] for row in report["shards"]] == [0, 1, 2, 3]
        assert sum(row["lag"] for row in report["shards"]) == 6  # nothing read yet
        assert {row["holder"] for row in report["shards"]} == {None}

        feed.start()
        feed.settle(6)
        report = json.loads(ledger_cli("status", "--json", env=env).stdout)
        assert [row["lag"] for row in report["shards"]] == [0, 0, 0, 0]
        assert [row["projection_lag"] for row in report["shards"]] == [0, 0, 0, 0]
        holders = {row["holder"] for row in report["shards"]}
        assert len(holders) == 1 and None not in holders
        assert all(row["lease_live"] for row in report["shards"])
        assert report["outbox"] == {"backlog": 0, "oldest_age_s": 0.0, "parked": 0}
        [(reason,)] = feed.db.execute("SELECT reason FROM rejected_events").fetchall()
        assert report["rejects_open"] == {reason: 1}
        assert report["kafka_error"] is None

        table = ledger_cli("status", env=env)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[1].split()[:4] == ["shard", "lag", "projection", "last"]
        assert f"rejects open: 1 ({reason} 1)" in lines
        assert "outbox: 0 unpublished (oldest 0.0 s), 0 parked" in lines
    finally:
        feed.close()


def test_ledger_status_without_kafka_prints_the_rest_and_exits_1(settings, stack, dsn):
    closed = free_port()
    env = (
        services_env(stack, dsn)
        | _group(settings)
        | {"LEDGER_KAFKA_BOOTSTRAP": f"127.0.0.1:{closed}"}
    )
    with psycopg.connect(dsn, autocommit=True) as conn:  # a worker holds shard 2
        conn.execute(
            "INSERT INTO shard_leases (group_id, shard, holder, expires_at) "
            "VALUES (%s, 2, 'w1', now() + interval '1 minute')",
            (settings.consumer_group,),
        )
    result = ledger_cli("status", env=env)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert "outbox: 0 unpublished (oldest 0.0 s), 0 parked" in lines
    assert "rejects open: 0" in lines
    assert lines[-1].startswith("lag unknown: Kafka did not answer (")
    assert f"127.0.0.1:{closed}" in lines[-1]
    assert lines[2].split()[:3] == ["2", "?", "0"]  # shard, lag unknown, projection lag
    assert "w1 (live until" in lines[2]


def _group(settings: Settings) -> dict[str, str]:
    return {
        "LEDGER_TOPIC_PREFIX": settings.topic_prefix,
        "LEDGER_CONSUMER_GROUP": settings.consumer_group,
        "LEDGER_PARTITIONS": str(settings.partitions),
    }
