"""Rating: turn a usage event's quantities into money with the price book. Pure, no I/O.

Each meter becomes one charge line: quantity × unit price ÷ unit size × service-tier multiplier,
rounded half-even to 9 decimal places (the ledger's internal scale). The charge is the sum of
its lines. Rounding to cents happens only on invoices.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

from ledger.config_files import load_toml
from ledger.errors import ConfigError
from ledger.money import parse_money, quantize

_ZERO = Decimal(0)
MILLION = Decimal(1_000_000)
HOUR = Decimal(3600)

# (meter, price key, unit size) per product.
_TOKEN_METERS = (
    ("input_tokens", "input", MILLION),
    ("cached_input_tokens", "cached_input", MILLION),
    ("output_tokens", "output", MILLION),
)
_FINE_TUNING_METERS = (("training_tokens", "training", MILLION),)
_IMAGE_METERS = (("images", "image", Decimal(1)), ("steps", "step", Decimal(1)))
_UNITS = {MILLION: "1M", HOUR: "hour"}


class ChargeLine(NamedTuple):
    """One meter's charge. A named tuple: made two or three times per usage event (a frozen
    dataclass took three times as long to make)."""

    meter: str
    quantity: Decimal
    unit_price: Decimal
    unit: str
    multiplier: Decimal
    amount: Decimal

    def to_json(self) -> dict[str, str]:
        return {
            "meter": self.meter,
            "quantity": str(self.quantity),
            "unit_price": str(self.unit_price),
            "unit": self.unit,
            "multiplier": str(self.multiplier),
            "amount": str(self.amount),
        }


class Rating(NamedTuple):
    """A priced usage event; `unpriced_reason` is set (and lines empty) when no price applies."""

    price_version: str | None
    lines: tuple[ChargeLine, ...]
    unpriced_reason: str | None = None

    @property
    def total(self) -> Decimal:
        total = _ZERO
        for line in self.lines:
            total += line.amount
        return total

    @property
    def priced(self) -> bool:
        return self.unpriced_reason is None


@dataclasses.dataclass(frozen=True)
class PriceVersion:
    version: str
    effective_from: datetime
    cached_input_share: Decimal
    tier_multipliers: dict[str, Decimal]
    serverless: dict[str, dict[str, Decimal]]
    fine_tuning: dict[str, dict[str, Decimal]]
    on_demand: dict[str, Decimal]
    image: dict[str, dict[str, Decimal]]
    ref: str = ""  # version@sha256 prefix of its published document (ledger.config_versions)


class PriceBook:
    def __init__(self, versions: list[PriceVersion]):
        if not versions:
            raise ConfigError("price book: no versions")
        self.versions = sorted(versions, key=lambda v: v.effective_from)
        names = [v.version for v in self.versions]
        if len(set(names)) != len(names):
            raise ConfigError(f"price book: duplicate version names in {names}")
        self._starts = [v.effective_from for v in self.versions]
        self._refs = {v.version: v.ref or None for v in self.versions}
        # (version, product, model, tier) -> what rating it needs (see `_plan`): the price
        # lookups done once per combination instead of once per event.
        self._plans: dict[tuple[str, str, str, str], tuple[Decimal | None, tuple, str | None]]
        self._plans = {}

    @classmethod
    def load(cls, path: Path | None = None) -> PriceBook:
        """The price book at `path`, or the one shipped with the package."""
        return load_toml(
            "price book",
            "pricebook.toml",
            path,
            lambda data: cls([parse_version(v) for v in data.get("versions", [])]),
        )

    def ref_of(self, name: str | None) -> str | None:
        """The fingerprinted reference (`version@sha`) of version `name`."""
        return self._refs.get(name)  # type: ignore[arg-type]

    def version_at(self, when: datetime) -> PriceVersion | None:
        """The last version whose effective_from is at or before `when` (None: before all)."""
        index = bisect_right(self._starts, when)
        return self.versions[index - 1] if index else None

    def rate(self, usage: dict) -> Rating:
        """Price one UsageRecorded event (fields as decoded by the codec)."""
        version = self.version_at(usage["occurred_at"])
        if version is None:
            return Rating(None, (), f"no price version in force at {usage['occurred_at']}")
        product, model, tier = usage["product"], usage["model"], usage["service_tier"]
        key = (version.version, product, model, tier)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _plan(version, product, model, tier)
        multiplier, meters, unpriced = plan
        if unpriced is not None:
            return Rating(version.version, (), unpriced)
        assert multiplier is not None
        if product == "on_demand":
            return _rate_gpu(version, usage, multiplier)
        lines = []
        for meter, price, unit_size, unit, missing in meters:
            quantity = usage.get(meter)
            if not quantity:
                continue
            if missing is not None:
                if product == "image":
                    continue  # an image model is priced per image or per step, not both
                return Rating(version.version, (), missing)
            quantity = Decimal(quantity)
            amount = quantize(quantity * price / unit_size * multiplier)
            lines.append(ChargeLine(meter, quantity, price, unit, multiplier, amount))
        if product == "image" and not lines and any(usage.get(m[0]) for m in meters):
            return Rating(version.version, (), f"no image or step price for model {model}")
        return Rating(version.version, tuple(lines))


def _plan(
    version: PriceVersion, product: str, model: str, tier: str
) -> tuple[Decimal | None, tuple, str | None]:
    """What rating usage of (product, model, tier) under `version` needs: the tier multiplier,
    per meter (meter, unit price, unit size, unit label, why it is unpriced or None), and why
    nothing of it can be priced (or None). Pure: depends only on the version's tables."""
    multiplier = version.tier_multipliers.get(tier)
    if multiplier is None:
        return None, (), f"no multiplier for tier {tier}"
    if product == "on_demand":
        return multiplier, (), None
    table, meters = {
        "serverless": (version.serverless, _TOKEN_METERS),
        "fine_tuning": (version.fine_tuning, _FINE_TUNING_METERS),
        "image": (version.image, _IMAGE_METERS),
    }[product]
    prices = table.get(model)
    if prices is None:
        return multiplier, (), f"no {product} price for model {model}"
    if product == "serverless" and "cached_input" not in prices and "input" in prices:
        prices = {**prices, "cached_input": prices["input"] * version.cached_input_share}
    planned = tuple(
        (
            meter,
            prices.get(key),
            unit_size,
            _UNITS.get(unit_size, "1"),
            None if key in prices else f"no {key} price for model {model}",
        )
        for meter, key, unit_size in meters
    )
    return multiplier, planned, None


def _rate_gpu(version: PriceVersion, usage: dict, multiplier: Decimal) -> Rating:
    gpu_type, seconds = usage.get("gpu_type"), usage.get("gpu_seconds")
    price = version.on_demand.get(gpu_type or "")
    if price is None:
        return Rating(version.version, (), f"no on_demand price for gpu type {gpu_type}")
    if not seconds:
        return Rating(version.version, ())
    return Rating(version.version, (_line("gpu_seconds", seconds, price, HOUR, multiplier),))


def _line(
    meter: str, quantity: Decimal, price: Decimal, unit_size: Decimal, multiplier: Decimal
) -> ChargeLine:
    unit = _UNITS.get(unit_size, "1")
    amount = quantize(quantity * price / unit_size * multiplier)
    return ChargeLine(meter, quantity, price, unit, multiplier, amount)


def parse_version(raw: dict, ref: str = "") -> PriceVersion:
    """One `[[versions]]` table of the price book (from TOML, or from a published document
    where `effective_from` is ISO text)."""
    name = raw["version"]
    effective = raw["effective_from"]
    if isinstance(effective, str):
        try:
            effective = datetime.fromisoformat(effective)
        except ValueError:
            raise ValueError(f"version {name}: effective_from is not a date-time") from None
    if not isinstance(effective, datetime) or effective.tzinfo is None:
        raise ValueError(f"version {name}: effective_from must be a UTC offset date-time")

    def models(section: str) -> dict[str, dict[str, Decimal]]:
        return {
            model: {k: parse_money(v, f"{name}.{section}.{model}.{k}") for k, v in prices.items()}
            for model, prices in raw.get(section, {}).items()
        }

    return PriceVersion(
        version=name,
        effective_from=effective,
        cached_input_share=parse_money(raw.get("cached_input_share", "0.5"), f"{name}.share"),
        tier_multipliers={
            k: parse_money(v, f"{name}.tier_multipliers.{k}")
            for k, v in raw["tier_multipliers"].items()
        },
        serverless=models("serverless"),
        fine_tuning=models("fine_tuning"),
        on_demand={
            k: parse_money(v, f"{name}.on_demand.{k}") for k, v in raw.get("on_demand", {}).items()
        },
        image=models("image"),
        ref=ref,
    )
