"""The README's producer example runs as printed and its events reach the ledger."""

import dataclasses
import re
from decimal import Decimal
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_producer_example_works(ledger, monkeypatch):
    text = README.read_text("utf-8")
    [example] = re.findall(r"```python\n(.*?)```", text, re.S)
    assert "EventProducer.from_settings()" in example
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
