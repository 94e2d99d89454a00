"""The chain key file: its format, what a bad one says (never its secret), rotation order,
and a worker that has no key stops at start-up instead of journaling unkeyed."""

import os
import stat

import pytest

from ledger import chain_keys
from ledger.errors import ConfigError
from ledger.settings import Settings
from tests.test_cli import ledger_cli

SECRET = "ab" * 32


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no chain key in the file"),
        ("# only a comment\n", "no chain key in the file"),
        (f"k1 {SECRET} extra\n", "line 1: expected `<key id> <hex secret>`"),
        (f"-k {SECRET}\n", "key id '-k' must be 1-64 of A-Za-z0-9._-"),
        (f"k1 {SECRET}\nk1 {SECRET}\n", "line 2: key id 'k1' appears twice"),
        ("k1 zz\n", "the secret of key 'k1' is not hex"),
        ("k1 " + "ab" * 31 + "\n", "has 31 bytes; at least 32 (64 hex digits) are needed"),
    ],
)
def test_a_bad_key_file_is_refused_naming_the_line_never_the_secret(text, message):
    with pytest.raises(ConfigError) as info:
        chain_keys.parse(text, source="keys.txt")
    assert message in str(info.value)
    assert SECRET not in str(info.value) and "ab" * 31 not in str(info.value)


def test_the_last_key_links_new_entries_and_every_key_stays_for_verifying(tmp_path):
    path = tmp_path / "keys"
    assert chain_keys.add_key(path, "k1") == "k1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    generated = chain_keys.add_key(path)  # an id from the time
    keys = chain_keys.parse(path.read_text(), source=str(path))
    assert list(keys.secrets) == ["k1", generated] and keys.current == generated
    assert keys.mac("k1") is not None and keys.mac("nope") is None
    assert keys.secret("k1") != keys.secret(generated)
    with pytest.raises(ConfigError, match="key id 'k1' exists already"):
        chain_keys.add_key(path, "k1")


def test_the_local_stack_key_is_made_once_and_a_configured_file_is_never_made(tmp_path):
    local = Settings(home=tmp_path / "home")
    made = chain_keys.ensure_local(local)
    assert made == tmp_path / "home" / "chain.keys" and made.is_file()
    before = made.read_text()
    assert chain_keys.ensure_local(local) is None and made.read_text() == before
    configured = Settings(chain_key_file=tmp_path / "elsewhere.keys")
    assert chain_keys.ensure_local(configured) is None
    with pytest.raises(ConfigError, match="LEDGER_CHAIN_KEY_FILE: no chain key file at"):
        chain_keys.load(configured)


def test_a_worker_without_a_chain_key_stops_at_start_up(tmp_path):
    env = {
        "LEDGER_CHAIN_KEY_FILE": str(tmp_path / "missing.keys"),
        "LEDGER_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "LEDGER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
    }
    result = ledger_cli("worker", env=env)
    assert result.returncode == 2
    assert "no chain key file at" in result.stderr and "ledger keys new" in result.stderr
    # The relay signs checkpoints with the current key: a bad key file stops it too.
    short = tmp_path / "short.keys"
    short.write_text("k1 abcd\n")
    os.chmod(short, 0o600)
    bad = ledger_cli("worker", "--role", "relay", env=env | {"LEDGER_CHAIN_KEY_FILE": str(short)})
    assert bad.returncode == 2 and "has 2 bytes" in bad.stderr
