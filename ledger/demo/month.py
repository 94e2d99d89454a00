"""The demo's calendar: March 2026 on the event clock, and the PeriodTicks that move it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ledger.policy import Policy

MONTH_START = datetime(2026, 3, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 4, 1, tzinfo=UTC)
MONTH = MONTH_START.strftime("%Y-%m")
MONTH_TURN_TICK = MONTH_END + timedelta(minutes=1)  # limit suspensions of March are lifted
CLOSE_AFTER_GRACE = timedelta(minutes=5)  # the close tick: end of March + grace + 5 min


def tick_times(policy: Policy | None = None) -> list[datetime]:
    """The simulated clock's PeriodTicks: every midnight of March, one just after April
    begins (the month turns), one after March's grace period (March closes)."""
    policy = policy or Policy.load()
    days = (MONTH_END - MONTH_START).days
    close = MONTH_END + timedelta(hours=policy.grace_hours) + CLOSE_AFTER_GRACE
    return [MONTH_START + timedelta(days=d) for d in range(days)] + [MONTH_TURN_TICK, close]


def tick_after(when: datetime) -> datetime:
    """The first simulated midnight tick at or after `when` (March)."""
    day = when.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if day == when else day + timedelta(days=1)
