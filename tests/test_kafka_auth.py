"""Authenticated Kafka: the LEDGER_KAFKA_* security settings, the one helper every client takes
its options from, and a local broker with SASL (its own, in a temp dir): every mechanism
authenticates, a client without credentials is refused, the worker runs end to end on it, and
the ACLs `ledger kafka-acls` prints let only the scheduler write ticks and only the relay
write status events."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import UserScramCredentialUpsertion
from kafka.errors import KafkaError

from ledger import chain_keys, kafka_acls, topics
from ledger import stack as local_stack
from ledger.checkpoints import read_topic
from ledger.codec import Codec
from ledger.errors import ConfigError, StackError
from ledger.kafka_auth import client_options
from ledger.producer import EventProducer, new_event
from ledger.runner import start_worker, stop_worker
from ledger.scheduler import send_ticks
from ledger.settings import Settings
from ledger.stack import kafka
from ledger.verify import verify
from tests.conftest import new_database
from tests.harness import wait_until
from tests.test_cli import ledger_cli

PASSWORD = "Tr0ub4dor-and-3"
SASL = {
    "LEDGER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "LEDGER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
    "LEDGER_KAFKA_USERNAME": "ledger",
    "LEDGER_KAFKA_PASSWORD": PASSWORD,
}


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LEDGER_KAFKA_SECURITY_PROTOCOL": "SASL"}, "must be one of PLAINTEXT, SSL, SASL_PLAIN"),
        ({"LEDGER_KAFKA_USERNAME": "x"}, "LEDGER_KAFKA_USERNAME is set but"),
        ({**SASL, "LEDGER_KAFKA_SASL_MECHANISM": "GSSAPI"}, "LEDGER_KAFKA_SASL_MECHANISM='GSSAPI'"),
        ({**SASL, "LEDGER_KAFKA_SASL_MECHANISM": ""}, "needs LEDGER_KAFKA_SASL_MECHANISM"),
        ({**SASL, "LEDGER_KAFKA_USERNAME": ""}, "needs LEDGER_KAFKA_USERNAME"),
        ({**SASL, "LEDGER_KAFKA_PASSWORD": ""}, "exactly one of LEDGER_KAFKA_PASSWORD and"),
        ({**SASL, "LEDGER_KAFKA_PASSWORD_FILE": "/nonexistent"}, "_PASSWORD_FILE='/nonexist"),
        ({"LEDGER_KAFKA_SSL_CAFILE": __file__}, "LEDGER_KAFKA_SSL_CAFILE is set but"),
        (
            {"LEDGER_KAFKA_SECURITY_PROTOCOL": "SSL", "LEDGER_KAFKA_SSL_KEYFILE": __file__},
            "LEDGER_KAFKA_SSL_KEYFILE needs LEDGER_KAFKA_SSL_CERTFILE",
        ),
    ],
)
def test_security_settings_that_do_not_fit_together_fail_at_start_up(env, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert message in str(info.value)
    assert PASSWORD not in str(info.value)


def test_every_client_option_comes_from_the_settings_and_the_password_is_never_shown(tmp_path):
    assert client_options(Settings()) == {}
    settings = Settings.from_env(SASL)
    assert client_options(settings) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "ledger",
        "sasl_plain_password": PASSWORD,
    }
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings)
    secret = tmp_path / "kafka.password"
    secret.write_text(PASSWORD + "\n")
    cert = tmp_path / "client.pem"
    cert.write_text("cert")
    from_file = Settings.from_env(
        {
            **SASL,
            "LEDGER_KAFKA_PASSWORD": "",
            "LEDGER_KAFKA_PASSWORD_FILE": str(secret),
            "LEDGER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "LEDGER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "LEDGER_KAFKA_SSL_CAFILE": str(cert),
            "LEDGER_KAFKA_SSL_CERTFILE": str(cert),
            "LEDGER_KAFKA_SSL_KEYFILE": str(cert),
        }
    )
    assert client_options(from_file) == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "ledger",
        "sasl_plain_password": PASSWORD,  # the file's first line, without the newline
        "ssl_check_hostname": True,
        "ssl_cafile": str(cert),
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(cert),
    }
    # Child processes get it through the environment, never through a printed line.
    assert from_file.to_env()["LEDGER_KAFKA_PASSWORD_FILE"] == str(secret)


# --- a local broker with SASL ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sasl(stack, base_settings):
    """A Kafka broker of this module's own with a SASL_PLAINTEXT listener (SCRAM and PLAIN)
    and ACLs enforced; the ledger's user is `ledger`. PostgreSQL is the session's."""
    home = Path(tempfile.mkdtemp(prefix="ledger-sasl-"))
    settings = dataclasses.replace(
        Settings.from_env(SASL),
        home=home,
        cache_dir=base_settings.cache_dir,
        broker="kafka",
        database_url=stack.dsn,
        partitions=2,
        batch_max_ms=100,
        poll_interval_ms=100,
        checkpoint_interval_s=1,
    )
    info = local_stack.up(settings)
    try:
        yield settings, info
    finally:
        local_stack.down(settings)
        shutil.rmtree(home, ignore_errors=True)


def as_user(settings: Settings, user: str, password: str, mechanism: str = "SCRAM-SHA-256"):
    return dataclasses.replace(
        settings, kafka_username=user, kafka_password=password, kafka_sasl_mechanism=mechanism
    )


def admin(bootstrap: str, options: dict) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=bootstrap, bootstrap_timeout_ms=5000, request_timeout_ms=5000, **options
    )


def test_every_mechanism_authenticates_and_a_client_without_credentials_is_refused(sasl):
    settings, info = sasl
    assert info.broker == "kafka"
    props = kafka.props_path(settings)
    assert props.stat().st_mode & 0o077 == 0  # it holds passwords
    for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        client = admin(
            info.bootstrap, client_options(as_user(settings, "ledger", PASSWORD, mechanism))
        )
        assert isinstance(client.list_topics(), list)
        client.close()
    with pytest.raises(KafkaError):  # no credentials: the SASL listener drops the connection
        admin(info.bootstrap, {}).list_topics()
    with pytest.raises(KafkaError):  # a wrong password
        admin(info.bootstrap, client_options(as_user(settings, "ledger", "guess"))).list_topics()
    with pytest.raises(KafkaError):
        producer = KafkaProducer(bootstrap_servers=info.bootstrap, max_block_ms=5000)
        producer.send("anything", b"x").get(timeout=10)
    # The stack refuses to reuse the broker with other security settings.
    with pytest.raises(StackError, match="listens in SASL_PLAINTEXT"):
        local_stack.up(dataclasses.replace(settings, kafka_security_protocol="PLAINTEXT",
                                           kafka_sasl_mechanism=None, kafka_username=None,
                                           kafka_password=None))  # fmt: skip


def test_the_worker_runs_end_to_end_on_the_sasl_broker(sasl, stack, tmp_path):
    base, info = sasl
    dsn = new_database(stack)
    settings = dataclasses.replace(
        base,
        kafka_bootstrap=info.bootstrap,
        database_url=dsn,
        topic_prefix="e2e.",
        consumer_group="e2e",
    )
    assert topics.create_topics(info.bootstrap, settings)  # authenticated admin client
    log = tmp_path / "worker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env |= settings.to_env()
    worker = start_worker(("ledger", "projections", "relay"), env, log)
    try:
        with EventProducer(info.bootstrap, settings) as producer:
            producer.send("AccountOpened", new_event("AccountOpened", "s-1",
                                                     created_at=datetime.now(UTC)))  # fmt: skip
            producer.send("UsageRecorded", new_event(
                "UsageRecorded", "s-1", request_id="r-1", product="serverless",
                model="accounts/fireworks/models/deepseek-r1", service_tier="standard",
                output_tokens=1_000_000))  # fmt: skip
        reader = KafkaConsumer(
            settings.topic(topics.STATUS),
            bootstrap_servers=info.bootstrap,
            auto_offset_reset="earliest",
            group_id=None,
            enable_incremental_fetch_sessions=False,
            **client_options(settings),
        )
        seen: list = []
        wait_until(
            lambda: (
                seen.extend(r for rs in reader.poll(timeout_ms=200).values() for r in rs) or seen
            ),
            60,
            "a status event on the SASL broker",
        )
        reader.close()
        decoded = Codec.default().decode(seen[0].value)
        assert (decoded.event_type, decoded.event["account_id"]) == ("AccountSuspended", "s-1")
        keys = chain_keys.load(settings)
        found = wait_until(lambda: read_topic(settings, info.bootstrap, keys)[0], 30, "checkpoints")
    finally:
        code = stop_worker(worker, timeout=15)
    output = log.read_text()
    assert code == 0, output
    assert PASSWORD not in output
    assert verify(settings, dsn, checkpoints=found) == []
    with psycopg.connect(dsn) as conn:
        journaled = conn.execute(
            "SELECT count(*) FROM journal_entries WHERE event_type <> 'ConfigPublished'"
        ).fetchone()[0]
    assert journaled == 2
    # The CLI reads the checkpoints with the same credentials, and prints no password.
    printed = ledger_cli("checkpoints", "digest", env=env)
    assert printed.returncode == 0, printed.stderr
    assert "shard " in printed.stdout and PASSWORD not in printed.stdout + printed.stderr


def test_the_printed_acls_let_only_the_scheduler_write_ticks_and_only_the_relay_status(sasl):
    base, info = sasl
    settings = dataclasses.replace(base, topic_prefix="acl.")
    topics.create_topics(info.bootstrap, settings)
    broker = as_user(base, kafka.BROKER_USER, kafka.secret_path(base).read_text().strip())
    root = admin(info.bootstrap, client_options(broker))
    try:
        users = {"scheduler": "sched-Pass-1", "relay": "relay-Pass-1"}
        root.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(u, "SCRAM-SHA-256", p) for u, p in users.items()]
        )
        grants = kafka_acls.plan(settings)
        result = root.create_acls(kafka_acls.bindings(grants))
        assert result["failed"] == []
    finally:
        root.close()
    scheduler = as_user(settings, "scheduler", users["scheduler"])
    relay = as_user(settings, "relay", users["relay"])
    ledger = settings  # the `ledger` user

    def ticks_as(who: Settings) -> int:
        options = {"max_block_ms": 5000, "request_timeout_ms": 5000, "delivery_timeout_ms": 6000}
        with EventProducer(info.bootstrap, who, **options) as producer:
            return send_ticks(producer, datetime.now(UTC), timeout=10)

    assert wait_until(lambda: _succeeds(lambda: ticks_as(scheduler)), 30, "ACLs applied") == 2
    with pytest.raises(KafkaError, match="Authorization"):
        ticks_as(ledger)  # a forged tick from anyone else is refused

    def status_as(who: Settings) -> None:
        producer = KafkaProducer(
            bootstrap_servers=info.bootstrap, max_block_ms=5000, **client_options(who)
        )
        try:
            producer.send(settings.topic(topics.STATUS), b"forged").get(timeout=10)
        finally:
            producer.close(timeout=2)

    status_as(relay)
    with pytest.raises(KafkaError, match="Authorization"):
        status_as(ledger)
    # The ledger reads the ticks the scheduler sent.
    reader = KafkaConsumer(
        settings.topic(topics.CONTROL),
        bootstrap_servers=info.bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        enable_incremental_fetch_sessions=False,
        **client_options(ledger),
    )
    ticks: list = []
    wait_until(
        lambda: (
            ticks.extend(r for rs in reader.poll(timeout_ms=200).values() for r in rs)
            or len(ticks) >= 2
        ),
        30,
        "the scheduler's ticks read by the ledger",
    )
    reader.close()


def _succeeds(action):
    """action()'s result, or None if Kafka refused it (ACLs take a moment to apply)."""
    try:
        return action()
    except KafkaError:
        return None


def test_the_readme_shows_the_acls_that_ledger_kafka_acls_prints(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    # A local stack whose current run is a demo's (as `make demo` leaves it) changes nothing:
    # the ACLs are a deployment's, on the topics LEDGER_TOPIC_PREFIX names.
    local_stack.set_current_run(
        Settings(home=tmp_path),
        {
            "run_id": "20261202_205631_2219",
            "database": "demo_20261202_205631_2219",
            "topic_prefix": "demo-20261202-205631-2219.",
            "consumer_group": "demo-20261202-205631-2219.ledger",
        },
    )
    assert local_stack.current_run(Settings(home=tmp_path)) is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    printed = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "kafka-acls"],
        capture_output=True,
        text=True,
        env=env | {"LEDGER_HOME": str(tmp_path)},
        timeout=60,
    )
    assert printed.returncode == 0
    expected = kafka_acls.commands(kafka_acls.plan(Settings()))
    assert printed.stdout.splitlines() == expected
    for command in expected:
        assert command in readme


def test_a_client_configuration_logged_at_debug_shows_no_password():
    """kafka-python logs a client's whole configuration at DEBUG; the ledger's log handler
    masks the password in it."""
    script = (
        "from kafka import KafkaAdminClient\n"
        "from ledger.kafka_auth import client_options\n"
        "from ledger.log import configure_logging\n"
        "from ledger.settings import Settings\n"
        "settings = Settings.from_env()\n"
        "configure_logging(settings)\n"
        "try:\n"
        "    KafkaAdminClient(bootstrap_servers='127.0.0.1:1', bootstrap_timeout_ms=300,\n"
        "                     **client_options(settings))\n"
        "except Exception:\n"
        "    pass\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env |= SASL | {"LEDGER_LOG_LEVEL": "DEBUG", "LEDGER_LOG_FORMAT": "json"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert "sasl_plain_password" in result.stderr  # the configuration was logged ...
    assert PASSWORD not in result.stdout + result.stderr  # ... masked


def test_readiness_ledger_status_and_the_gateway_sdk_use_the_kafka_credentials(sasl, stack):
    from ledger import health
    from ledger.status import AccountStatusFollower

    base, info = sasl
    settings = dataclasses.replace(
        base,
        kafka_bootstrap=info.bootstrap,
        database_url=new_database(stack),
        topic_prefix="ops.",
        consumer_group="ops",
    )
    topics.create_topics(info.bootstrap, settings)
    assert health.broker_problem(info.bootstrap, settings) is None  # ApiVersions before SASL
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    report = ledger_cli("status", "--json", env=env | settings.to_env())
    assert report.returncode == 0, report.stderr
    assert PASSWORD not in report.stdout + report.stderr
    shards = json.loads(report.stdout)["shards"]
    assert [row["lag"] for row in shards] == [0] * settings.partitions
    follower = AccountStatusFollower.from_settings(settings)
    try:
        assert follower.bootstrap(timeout_s=30) == 0  # an empty snapshot, read with the SASL user
        assert follower.poll() == []
    finally:
        follower.close()
