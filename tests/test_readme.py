"""The README's producer example runs as printed and its events reach the ledger."""

import re
from decimal import Decimal
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_producer_example_works(ledger, monkeypatch):
    text = README.read_text("utf-8")
    [example] = re.findall(r"```python\n(.*?)```", text, re.S)
    assert "EventProducer(" in example
    monkeypatch.setenv("LEDGER_TOPIC_PREFIX", ledger.settings.topic_prefix)
    exec(compile(example.replace("127.0.0.1:9092", ledger.bootstrap), "README.md", "exec"), {})
    ledger.settle(3)
    account = ledger.account("acct-1")
    # $1 + $25 − (1,200 × $0.20 + 300 × $0.18) / 1M: the example's events happen now, under
    # the 2026-07 price version.
    assert account["credit_balance"] == Decimal("25.999706000")
