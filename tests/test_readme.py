"""The README's examples run as printed: the producer's events reach the ledger, and the
gateway's status follower refuses the account they suspend."""

import dataclasses
import re
from decimal import Decimal
from pathlib import Path

from tests.harness import wait_until

README = Path(__file__).resolve().parent.parent / "README.md"


def examples(containing: str) -> list[str]:
    """The README's Python examples that contain `containing`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text("utf-8"), re.S)
    return [block for block in blocks if containing in block]


def test_the_readme_producer_example_works(ledger, monkeypatch):
    [example] = examples("EventProducer.from_settings()")
    # As a user runs it: the settings come from the environment (here: this test's topics and
    # the test stack's brokers, which the local stack would otherwise supply).
    monkeypatch.setenv("LEDGER_TOPIC_PREFIX", ledger.settings.topic_prefix)
    monkeypatch.setenv("LEDGER_KAFKA_BOOTSTRAP", ledger.bootstrap)
    exec(compile(example, "README.md", "exec"), {})
    ledger.settle(3)
    account = ledger.account("acct-1")
    # $1 + $25 − (1,200 × $0.20 + 300 × $0.18) / 1M: the example's events happen now, under
    # the 2026-07 price version.
    assert account["credit_balance"] == Decimal("25.999706000")


def test_a_producer_from_settings_finds_the_local_stack_wherever_its_port(stack, base_settings):
    from ledger import stack as local_stack
    from ledger.producer import EventProducer

    local = dataclasses.replace(base_settings, kafka_bootstrap=None, database_url=None)
    assert local_stack.kafka_bootstrap(local) == stack.bootstrap
    with EventProducer.from_settings(local) as producer:
        assert producer.topic("UsageRecorded").endswith("billing.usage.v1")


def test_the_readme_gateway_example_follows_suspensions(ledger, monkeypatch):
    [example] = examples("AccountStatusFollower.from_settings()")
    monkeypatch.setenv("LEDGER_TOPIC_PREFIX", ledger.settings.topic_prefix)
    monkeypatch.setenv("LEDGER_KAFKA_BOOTSTRAP", ledger.bootstrap)
    gateway: dict = {}
    exec(compile(example, "README.md", "exec"), gateway)
    try:
        assert gateway["admit"]("gw-1")
        ledger.open_account("gw-1")
        ledger.use("gw-1", output_tokens=2_000_000)  # $1.80 > the $1 sign-up credit
        wait_until(lambda: not gateway["admit"]("gw-1"), 30, "the gateway to refuse gw-1")
        assert gateway["statuses"].reasons("gw-1") == ("CREDITS_EXHAUSTED_NO_PAYMENT_METHOD",)
    finally:
        gateway["stop"].set()
