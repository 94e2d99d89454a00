"""The `ledger` command line: bad settings and arguments fail fast naming what is wrong; the
reports tell the truth about the journal."""

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from ledger.errors import ConfigError
from ledger.settings import Settings, default_home


def ledger_cli(*args, env=None, check=False):
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", *args],
        capture_output=True,
        text=True,
        env=os.environ | (env or {}),
        check=check,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LEDGER_PARTITIONS", "eight", "LEDGER_PARTITIONS='eight': not an integer"),
        ("LEDGER_PARTITIONS", "0", "LEDGER_PARTITIONS=0: must be in [1, 10000]"),
        # Batches beyond what the worker's memory budget was measured at are refused.
        (
            "LEDGER_BATCH_MAX_EVENTS",
            "20000",
            "LEDGER_BATCH_MAX_EVENTS=20000: must be in [1, 10000]",
        ),
        ("LEDGER_BROKER", "rabbitmq", "LEDGER_BROKER='rabbitmq': must be one of"),
        ("LEDGER_DATABASE_URL", "mysql://x", "LEDGER_DATABASE_URL='mysql://x'"),
        ("LEDGER_KAFKA_BOOTSTRAP", "localhost", "LEDGER_KAFKA_BOOTSTRAP='localhost'"),
        ("LEDGER_PRICE_BOOK", "/nonexistent.toml", "LEDGER_PRICE_BOOK='/nonexistent.toml'"),
        ("LEDGER_PARTITONS", "8", "LEDGER_PARTITONS: unknown setting"),
    ],
)
def test_a_bad_setting_fails_at_start_up_naming_the_variable(variable, value, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert message in str(info.value)
    result = ledger_cli("trial-balance", env={variable: value})
    assert result.returncode == 2
    assert message in result.stderr


def test_a_near_miss_is_refused_as_a_typo_and_other_programs_variables_are_ignored():
    with pytest.raises(ConfigError, match="did you mean LEDGER_PARTITIONS"):
        Settings.from_env({"LEDGER_PARTITONS": "8"})
    assert Settings.from_env({"LEDGER_FILE": "~/finance.journal"}) == Settings.from_env({})


def test_the_default_home_is_one_place_per_user_whatever_the_directory():
    assert Settings.from_env({}).home.is_absolute()
    env = {"XDG_STATE_HOME": "/srv/state"}
    assert default_home(env) == Path("/srv/state/billing-ledger")


def test_read_only_commands_need_only_the_database(stack, dsn, tmp_path):
    # A home with no stack at all: no Kafka to find, the database given by URL.
    env = {"LEDGER_HOME": str(tmp_path), "LEDGER_DATABASE_URL": dsn, "LEDGER_FILE": "x"}
    for args, code in (
        (("trial-balance",), 0),
        (("invoices", "list", "--month", "2026-03"), 0),
        (("verify",), 0),
        (("config", "list"), 0),
        (("audit", "--account", "nobody", "--month", "2026-03"), 1),  # no such account
    ):
        result = ledger_cli(*args, env=env)
        assert result.returncode == code, (args, result.stderr)
        assert "Kafka" not in result.stderr, (args, result.stderr)


def test_every_ledger_command_collects_garbage_with_the_ledgers_thresholds():
    from ledger import gc_tuning

    code = (
        "import contextlib, gc, io\n"
        "from ledger.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "print(list(gc.get_threshold()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == list(gc_tuning.FOLD)


def test_a_bad_argument_fails_fast_naming_it():
    result = ledger_cli("account", "show", "a1", "--last", "-3")
    assert result.returncode == 2
    assert "--last: must be positive: -3" in result.stderr
    for month in ("2026-3", "2026-13", "26-03", "2026-03-01"):
        result = ledger_cli("invoices", "list", "--month", month)
        assert result.returncode == 2
        assert f"not a month (YYYY-MM, e.g. 2026-03): {month!r}" in result.stderr


def services_env(stack, dsn):
    """The CLI's environment for `dsn`'s database: each role's URL, as in production."""
    from tests.conftest import as_role

    return {
        "LEDGER_KAFKA_BOOTSTRAP": stack.bootstrap,
        "LEDGER_DATABASE_URL": dsn,
        "LEDGER_OWNER_DATABASE_URL": as_role(stack, dsn, "owner"),
        "LEDGER_READER_DATABASE_URL": as_role(stack, dsn, "reader"),
    }


def test_trial_balance_exits_zero_when_balanced_and_one_when_not(ledger, stack, dsn, admin_dsn):
    ledger.open_account("tb")
    ledger.use("tb", output_tokens=2_000_000)
    ledger.settle(2)
    result = ledger_cli("trial-balance", env=services_env(stack, dsn))
    assert result.returncode == 0, result.stderr
    assert "USD" in result.stdout and "balanced" in result.stdout

    # Force an unbalanced journal (as a superuser: the constraint trigger is bypassed).
    with psycopg.connect(admin_dsn) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "INSERT INTO postings SELECT shard, shard_seq, 99, 'cash', account_id, 1 "
            "FROM postings LIMIT 1"
        )
    result = ledger_cli("trial-balance", env=services_env(stack, dsn))
    assert result.returncode == 1
    assert "UNBALANCED" in result.stdout
    with psycopg.connect(admin_dsn) as conn:  # put it back so the fixture's own check passes
        conn.execute("SET session_replication_role = replica")
        conn.execute("DELETE FROM postings WHERE line = 99")


def test_account_show_prints_balances_status_and_entries(ledger, stack, dsn, admin_dsn):
    ledger.open_account("show-1")
    ledger.use("show-1", output_tokens=2_000_000)  # $1.80: $1 credit, $0.80 owed
    ledger.settle(2)
    result = ledger_cli("account", "show", "show-1", "--json", env=services_env(stack, dsn))
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["status"] == "suspended"
    assert view["reasons"] == ["CREDITS_EXHAUSTED_NO_PAYMENT_METHOD"]
    assert Decimal(view["receivable"]) == Decimal("0.80")
    assert [e["event_type"] for e in view["last_entries"]] == ["UsageRecorded", "AccountOpened"]
    assert Decimal(view["last_entries"][0]["charge"]) == Decimal("1.80")
    assert (view["tier"], view["limit_source"]) == (1, "tier")  # a number, not the string "1"

    table = ledger_cli("account", "show", "show-1", env=services_env(stack, dsn))
    assert table.returncode == 0
    assert "CREDITS_EXHAUSTED_NO_PAYMENT_METHOD" in table.stdout
    unknown = ledger_cli("account", "show", "nobody", env=services_env(stack, dsn))
    assert unknown.returncode == 4

    # The book's waiting charges changed by hand into what the writer never writes: the rest
    # of the account is shown, and the charges are said to be unknown.
    with psycopg.connect(admin_dsn, autocommit=True) as su:
        su.execute(
            "UPDATE account_books SET book = jsonb_set(book, '{pending}', %s::jsonb) "
            "WHERE account_id = 'show-1'",
            ('{"2026-03": {"usage": 5}}',),
        )
    result = ledger_cli("account", "show", "show-1", "--json", env=services_env(stack, dsn))
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["open_charges"] == {}
    assert view["book_unreadable"] == "TypeError: amount 5 is a int, not str"
    assert view["status"] == "suspended"
    table = ledger_cli("account", "show", "show-1", env=services_env(stack, dsn))
    assert table.returncode == 0, table.stderr
    assert "the account book cannot be read (TypeError: amount 5 is a int" in table.stdout
    assert "ledger books restore show-1" in table.stdout


def test_account_show_and_invoices_list_give_limits_and_invoices(ledger, stack, dsn):
    from datetime import UTC, datetime

    ledger.open_account("inv-1")
    ledger.send("PaymentMethodAdded", "inv-1", payment_method_id="pm", kind="card")
    ledger.use(
        "inv-1",
        model="accounts/fireworks/models/deepseek-r1",
        output_tokens=1_000_000,
        occurred_at=datetime(2026, 3, 5, tzinfo=UTC),
    )  # $8: $1 credit, $7 owed
    march = datetime(2026, 3, 6, tzinfo=UTC)
    ledger.send("AccountOpened", "idle-1", occurred_at=march, created_at=march)
    ledger.period_tick(datetime(2026, 4, 4, 1, tzinfo=UTC))
    ledger.settle(4 + 4)
    env = services_env(stack, dsn)
    # An account nobody touched since March: the shard's clock says it is April now.
    idle = json.loads(ledger_cli("account", "show", "idle-1", "--json", env=env).stdout)
    assert (idle["month"], idle["month_to_date_spend"]) == ("2026-04", "0")
    view = json.loads(ledger_cli("account", "show", "inv-1", "--json", env=env).stdout)
    assert (view["tier"], view["effective_limit"], view["month"]) == (
        1,
        "50.000000000",
        "2026-04",
    )
    assert (view["month_to_date_spend"], view["headroom"]) == ("0.000000000", "50.000000000")
    assert [(i["invoice_id"], i["amount_due"]) for i in view["invoices"]] == [
        ("INV-2026-03-inv-1", "7.00")
    ]
    listed = ledger_cli("invoices", "list", "--month", "2026-03", "--json", env=env)
    assert [(i["account_id"], i["amount_due"]) for i in json.loads(listed.stdout)] == [
        ("inv-1", "7.00")
    ]
    table = ledger_cli("invoices", "list", "--month", "2026-03", env=env)
    assert "INV-2026-03-inv-1" in table.stdout and "7.00" in table.stdout
    bad = ledger_cli("invoices", "list", "--month", "March", env=env)
    assert bad.returncode == 2 and "not a month (YYYY-MM, e.g. 2026-03): 'March'" in bad.stderr


def test_a_database_without_the_current_schema_is_refused_with_the_fix(stack):
    from ledger.runner import on_server, with_database

    name = "cli_unmigrated"
    on_server(stack.owner_dsn, "drop_database", name)
    on_server(stack.owner_dsn, "create_database", name)
    env = services_env(stack, with_database(stack.dsn, name))
    refused = ledger_cli("trial-balance", env=env)
    assert refused.returncode == 1
    assert "has no ledger schema" in refused.stderr
    assert "run `ledger db migrate`" in refused.stderr
    assert ledger_cli("db", "migrate", env=env).returncode == 0
    accepted = ledger_cli("trial-balance", env=env)
    assert accepted.returncode == 0
    assert accepted.stdout.split() == ["USD", "0", "balanced", "0", "postings"]


def test_config_publish_lists_and_refuses_a_changed_version_naming_it(stack, dsn, tmp_path):
    env = services_env(stack, dsn)
    first = ledger_cli("config", "publish", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(" published") == 3  # two price versions and the policy
    again = ledger_cli("config", "publish", env=env)
    assert again.stdout.count("already published") == 3
    listed = ledger_cli("config", "list", "--json", env=env)
    rows = json.loads(listed.stdout)
    assert [(r["kind"], r["version"]) for r in rows] == [
        ("price_book", "2026-01"),
        ("price_book", "2026-07"),
        ("policy", "2026-01"),
    ]
    policy = Path(__file__).parents[1] / "ledger" / "policy.toml"
    edited = tmp_path / "policy.toml"
    edited.write_text(policy.read_text().replace('credit = "1.00"', 'credit = "2.00"'))
    refused = ledger_cli("config", "publish", "--only", "policy", "--policy", str(edited), env=env)
    assert refused.returncode == 2
    assert "policy version '2026-01' is already published" in refused.stderr
    missing = ledger_cli("config", "publish", "--prices", "/nonexistent.toml", env=env)
    assert missing.returncode == 2 and "no such file: /nonexistent.toml" in missing.stderr


def test_small_things_a_new_user_meets(stack, dsn):
    env = services_env(stack, dsn)
    version = ledger_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("ledger ")
    helped = ledger_cli("--help")
    assert "billing ledger" in helped.stdout and "Parses arguments" not in helped.stdout
    assert "default: all four" in ledger_cli("worker", "--help").stdout
    assert ledger_cli("rejects", "list", env=env).stdout.strip() == "no rejected events"
    empty = ledger_cli("invoices", "list", "--month", "2026-03", env=env)
    assert "no invoices for 2026-03 yet" in empty.stdout
    # The reader of a pipe goes away (`ledger ... | head`): no traceback, exit 0.
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledger.cli", "rejects", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ | env,
    )
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
