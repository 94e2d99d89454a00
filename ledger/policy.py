"""The billing policy (`policy.toml`): sign-up credit, burn order, tiers, limits. One place."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from ledger.config_files import load_toml
from ledger.money import parse_money

EARLIEST_EVENT = datetime.fromisoformat("2020-01-01T00:00:00+00:00")


@dataclasses.dataclass(frozen=True)
class Tier:
    name: str  # its number, "1" for the first: tiers are a numbered ladder
    paid_at_least: Decimal
    monthly_limit: Decimal


@dataclasses.dataclass(frozen=True)
class Policy:
    signup_credit: Decimal
    signup_grant_id: str
    signup_expires_after_days: int
    burn_kinds: tuple[str, ...]
    tiers: tuple[Tier, ...]
    warning_thresholds: tuple[int, ...]
    grace_hours: int
    max_tokens_per_event: int
    max_gpu_seconds_per_event: Decimal
    max_images_per_event: int
    max_steps_per_event: int
    max_amount: Decimal
    max_clock_skew: timedelta = timedelta(minutes=5)
    earliest_event: datetime = EARLIEST_EVENT
    max_tick_step: timedelta = timedelta(days=31)
    ref: str = ""  # version@sha256 prefix of its published document (ledger.config_versions)

    @classmethod
    def load(cls, path: Path | None = None) -> Policy:
        """The policy at `path`, or the one shipped with the package."""
        return load_toml("policy", "policy.toml", path, _parse)

    @classmethod
    def from_document(cls, data: dict, ref: str = "") -> Policy:
        """A policy from its published document (the TOML tables as JSON)."""
        return dataclasses.replace(_parse(data), ref=ref)

    def tier_for(self, paid: Decimal) -> Tier:
        """The highest tier whose payment threshold `paid` reaches (the first tier, which
        starts at 0, for anything below)."""
        for tier in reversed(self.tiers):
            if paid >= tier.paid_at_least:
                return tier
        return self.tiers[0]


def _tier_number(value: object, position: int) -> str:
    """A tier is named by its number on the ladder (1, 2, ...; an integer or a quoted one)."""
    if str(value) != str(position):
        raise ValueError(f"tiers.tier: tier {position} must be numbered {position}, not {value!r}")
    return str(position)


def _parse(data: dict) -> Policy:
    tiers = tuple(
        Tier(
            _tier_number(t["tier"], position),
            parse_money(t["paid_at_least"], "tiers.paid_at_least"),
            parse_money(t["monthly_limit"], "tiers.monthly_limit"),
        )
        for position, t in enumerate(data["tiers"], start=1)
    )
    if not tiers or tiers[0].paid_at_least != 0:
        raise ValueError('tiers: the first tier must start at paid_at_least = "0"')
    if list(tiers) != sorted(tiers, key=lambda t: t.paid_at_least):
        raise ValueError("tiers: must be in increasing paid_at_least order")
    kinds = tuple(data["burn_order"]["kinds"])
    if sorted(kinds) != sorted(("promotional", "goodwill", "purchased")):
        raise ValueError("burn_order.kinds: must order exactly promotional, goodwill, purchased")
    limits = data["limits"]
    return Policy(
        signup_credit=parse_money(data["signup"]["credit"], "signup.credit"),
        signup_grant_id=str(data["signup"]["grant_id"]),
        signup_expires_after_days=int(data["signup"]["expires_after_days"]),
        burn_kinds=kinds,
        tiers=tiers,
        warning_thresholds=tuple(int(t) for t in data["warnings"]["thresholds_percent"]),
        grace_hours=int(data["month_close"]["grace_hours"]),
        max_tokens_per_event=int(limits["max_tokens_per_event"]),
        max_gpu_seconds_per_event=parse_money(limits["max_gpu_seconds_per_event"], "limits.gpu"),
        max_images_per_event=int(limits["max_images_per_event"]),
        max_steps_per_event=int(limits["max_steps_per_event"]),
        max_amount=parse_money(limits["max_amount"], "limits.max_amount"),
        **_time_bounds(data.get("time", {})),
    )


def _time_bounds(time: dict) -> dict:
    """The [time] table: clock skew, the earliest plausible event, the largest tick step."""
    out: dict = {}
    if "max_clock_skew_seconds" in time:
        skew = int(time["max_clock_skew_seconds"])
        if not 0 <= skew <= 86_400:
            raise ValueError("time.max_clock_skew_seconds: must be in [0, 86400]")
        out["max_clock_skew"] = timedelta(seconds=skew)
    if "earliest_event" in time:
        try:
            earliest = datetime.fromisoformat(str(time["earliest_event"]))
        except ValueError:
            raise ValueError(
                f"time.earliest_event: not an ISO date-time: {time['earliest_event']!r}"
            ) from None
        if earliest.tzinfo is None:
            raise ValueError("time.earliest_event: needs a UTC offset, e.g. +00:00")
        out["earliest_event"] = earliest
    if "max_tick_step_hours" in time:
        step = int(time["max_tick_step_hours"])
        if step < 1:
            raise ValueError("time.max_tick_step_hours: must be at least 1")
        out["max_tick_step"] = timedelta(hours=step)
    return out
