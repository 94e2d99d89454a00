"""The policy file: the shipped defaults are the business rules; a bad file fails naming it."""

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
