"""Rating rules of the price book, checked against hand-computed charges."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from ledger.errors import ConfigError
from ledger.rating import PriceBook

JAN = datetime(2026, 3, 5, 12, 0, tzinfo=UTC)
AUG = datetime(2026, 8, 5, 12, 0, tzinfo=UTC)
LLAMA_8B = "accounts/fireworks/models/llama-v3p1-8b-instruct"


def usage(**fields):
    base = {
        "product": "serverless",
        "model": LLAMA_8B,
        "service_tier": "standard",
        "occurred_at": JAN,
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "output_tokens": 0,
        "gpu_seconds": None,
        "gpu_type": None,
        "training_tokens": 0,
        "images": 0,
        "steps": 0,
    }
    return base | fields


@pytest.fixture(scope="module")
def book():
    return PriceBook.load()


def test_token_usage_is_priced_per_million_tokens_to_nine_decimals(book):
    # 1,234 input + 567 output tokens of Llama 3.1 8B at $0.20 / 1M each:
    # 1234 × 0.20 / 1e6 = 0.0002468 ; 567 × 0.20 / 1e6 = 0.0001134
    rating = book.rate(usage(input_tokens=1234, output_tokens=567))
    assert rating.price_version == "2026-01"
    assert [line.amount for line in rating.lines] == [
        Decimal("0.000246800"),
        Decimal("0.000113400"),
    ]
    assert rating.total == Decimal("0.000360200")


def test_cached_input_costs_half_of_input_unless_the_model_sets_it(book):
    # 1,000,001 cached tokens of 8B: half of $0.20 = $0.10 / 1M → 0.1000001
    default = book.rate(usage(cached_input_tokens=1_000_001))
    assert default.total == Decimal("0.100000100")
    # gpt-oss-120b sets cached input at $0.01 / 1M explicitly.
    explicit = book.rate(
        usage(model="accounts/fireworks/models/gpt-oss-120b", cached_input_tokens=3_000_000)
    )
    assert explicit.total == Decimal("0.030000000")


def test_batch_tier_is_half_price(book):
    standard = book.rate(usage(input_tokens=777_777, output_tokens=333))
    batch = book.rate(usage(input_tokens=777_777, output_tokens=333, service_tier="batch"))
    # 777,777 × 0.20 / 1e6 = 0.1555554 ; 333 × 0.20 / 1e6 = 0.0000666 ; each line halved
    assert standard.total == Decimal("0.155622000")
    assert batch.total == Decimal("0.077811000")


def test_price_version_in_force_at_occurred_at_is_used(book):
    # The 2026-07 revision lowered 8B output to $0.18 and priced priority at 1.5×.
    rating = book.rate(usage(occurred_at=AUG, output_tokens=1_000_000, service_tier="priority"))
    assert rating.price_version == "2026-07"
    assert rating.total == Decimal("0.270000000")


def test_gpu_seconds_are_priced_by_gpu_type_per_hour(book):
    # 90 s of H100 at $5.80 / hour = 0.145
    rating = book.rate(
        usage(
            product="on_demand",
            model="my-deployment",
            gpu_type="H100-80GB",
            gpu_seconds=Decimal("90"),
        )
    )
    assert rating.total == Decimal("0.145000000")
    assert rating.lines[0].unit == "hour"


def test_each_line_rounds_half_even_to_nine_decimals(book):
    # 1 s of H100: 5.80 / 3600 = 0.0016111111… → 0.001611111
    one = book.rate(
        usage(product="on_demand", model="d", gpu_type="H100-80GB", gpu_seconds=Decimal("1"))
    )
    assert one.total == Decimal("0.001611111")
    # 0.5 s of A100: 2.90 / 3600 / 2 = 0.000402777… → 0.000402778
    half = book.rate(
        usage(product="on_demand", model="d", gpu_type="A100-80GB", gpu_seconds=Decimal("0.5"))
    )
    assert half.total == Decimal("0.000402778")


def test_images_are_priced_per_step_or_per_image_whichever_the_model_has(book):
    flux = "accounts/fireworks/models/flux-1-dev-fp8"
    # FLUX is priced per step only: 28 steps × $0.0005; the image count is not a meter for it.
    rating = book.rate(usage(product="image", model=flux, images=2, steps=28))
    assert rating.total == Decimal("0.014000000")
    assert [line.meter for line in rating.lines] == ["steps"]
    playground = "accounts/fireworks/models/playground-v2-5-1024px-aesthetic"
    rating = book.rate(usage(product="image", model=playground, images=3, steps=30))
    assert rating.total == Decimal("0.011700000")  # 3 × $0.0039 per image


def test_image_usage_with_no_priced_meter_is_unpriced(book):
    flux = "accounts/fireworks/models/flux-1-dev-fp8"
    rating = book.rate(usage(product="image", model=flux, images=2))
    assert not rating.priced and "image or step price" in rating.unpriced_reason


def test_unknown_model_is_unpriced_not_charged(book):
    rating = book.rate(usage(model="accounts/acme/models/secret", input_tokens=10))
    assert not rating.priced
    assert rating.lines == ()
    assert "accounts/acme/models/secret" in rating.unpriced_reason


def test_usage_before_the_first_price_version_is_unpriced(book):
    rating = book.rate(usage(occurred_at=datetime(2025, 12, 31, tzinfo=UTC), input_tokens=1))
    assert not rating.priced


def test_price_book_with_a_float_price_is_refused(tmp_path):
    bad = tmp_path / "prices.toml"
    bad.write_text(
        '[[versions]]\nversion = "x"\neffective_from = 2026-01-01T00:00:00Z\n'
        'tier_multipliers = { standard = "1" }\n'
        '[versions.serverless]\n"m" = { input = 0.2 }\n'
    )
    with pytest.raises(ConfigError, match=r"x\.serverless\.m\.input"):
        PriceBook.load(bad)
