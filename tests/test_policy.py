"""The policy file: the shipped defaults are the business rules; a bad file fails naming it."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources

import pytest

from ledger.errors import ConfigError
from ledger.policy import Policy

SHIPPED = resources.files("ledger").joinpath("policy.toml").read_text("utf-8")


def test_shipped_policy_is_fireworks_rules():
    policy = Policy.load()
    assert policy.signup_credit == Decimal("1.00")
    assert [(t.paid_at_least, t.monthly_limit) for t in policy.tiers] == [
        (0, 50),
        (50, 500),
        (500, 5000),
        (5000, 50000),
    ]
    assert policy.tier_for(Decimal("49.99")).monthly_limit == 50
    assert policy.tier_for(Decimal("50")).monthly_limit == 500
    assert policy.warning_thresholds == (50, 80, 100)
    assert policy.grace_hours == 72
    assert policy.burn_kinds[-1] == "purchased"
    assert policy.max_clock_skew == timedelta(minutes=5)
    assert policy.earliest_event == datetime(2020, 1, 1, tzinfo=UTC)
    assert policy.max_tick_step == timedelta(days=31)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('credit = "1.00"', "credit = 1.0"), "signup.credit: money must be a quoted decimal"),
        (('paid_at_least = "50"', 'paid_at_least = "5000000"'), "increasing paid_at_least"),
        (
            ('kinds = ["promotional", "goodwill", "purchased"]', 'kinds = ["purchased"]'),
            "burn_order.kinds",
        ),
        (("grace_hours = 72", "grace = 72"), "grace_hours"),
        (("max_clock_skew_seconds = 300", "max_clock_skew_seconds = -1"), "max_clock_skew"),
        (
            ('earliest_event = "2020-01-01T00:00:00+00:00"', 'earliest_event = "2020-01-01"'),
            "time.earliest_event: needs a UTC offset",
        ),
        (("max_tick_step_hours = 744", "max_tick_step_hours = 0"), "max_tick_step_hours"),
        (('tier = "2"', 'tier = "gold"'), "tiers.tier: tier 2 must be numbered 2, not 'gold'"),
    ],
)
def test_a_bad_policy_file_is_refused_naming_the_file_and_the_key(tmp_path, change, message):
    old, new = change
    assert old in SHIPPED
    path = tmp_path / "policy.toml"
    path.write_text(SHIPPED.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        Policy.load(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)
