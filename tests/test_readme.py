"""The README's examples run as printed: the producer's events reach the ledger, and the
gateway's status follower refuses the account they suspend."""

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
    [example] = examples("EventProducer(")
    monkeypatch.setenv("LEDGER_TOPIC_PREFIX", ledger.settings.topic_prefix)
    exec(compile(example.replace("127.0.0.1:9092", ledger.bootstrap), "README.md", "exec"), {})
    ledger.settle(3)
    account = ledger.account("acct-1")
    # $1 + $25 − (1,200 × $0.20 + 300 × $0.18) / 1M: the example's events happen now, under
    # the 2026-07 price version.
    assert account["credit_balance"] == Decimal("25.999706000")


def test_the_readme_gateway_example_follows_suspensions(ledger):
    [example] = examples("AccountStatusFollower(")
    assert '"kafka-1:9092", topic_prefix=""' in example
    gateway: dict = {}
    exec(
        compile(
            example.replace("kafka-1:9092", ledger.bootstrap).replace(
                'topic_prefix=""', f"topic_prefix={ledger.settings.topic_prefix!r}"
            ),
            "README.md",
            "exec",
        ),
        gateway,
    )
    try:
        assert gateway["admit"]("gw-1")
        ledger.open_account("gw-1")
        ledger.use("gw-1", output_tokens=2_000_000)  # $1.80 > the $1 sign-up credit
        wait_until(lambda: not gateway["admit"]("gw-1"), 30, "the gateway to refuse gw-1")
        assert gateway["statuses"].reasons("gw-1") == ("CREDITS_EXHAUSTED_NO_PAYMENT_METHOD",)
    finally:
        gateway["stop"].set()
