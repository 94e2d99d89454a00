"""Waiting out a dependency: capped exponential backoff, and the one line a role logs every few
seconds while PostgreSQL or Kafka is down.

    outage = Outage("projections", "postgresql")
    while not stop.is_set():
        try:
            work()
        except psycopg.OperationalError as exc:
            stop.wait(outage.failed(exc))   # logs dependency_down (rate-limited), returns delay
            continue
        outage.ok()                         # logs dependency_back once, resets the backoff
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from ledger.log import describe_error

log = structlog.get_logger(__name__)

# A role reconnecting to its dependency: 0.2 s doubling to 2 s, so it is back within ~2 s of
# the dependency's return.
RECONNECT_INITIAL_S = 0.2
RECONNECT_MAX_S = 2.0
# While a dependency is down, one `dependency_down` line per this many seconds per role.
OUTAGE_LOG_EVERY_S = 5.0


def kafka_reconnect_options() -> dict[str, int]:
    """kafka-python options for every long-lived client (consumer or producer), so it rides
    out a broker restart: reconnect attempts back off from 100 ms to 1 s at most (the
    default grows to 30 s, which kept clients away for ~50 s after the broker was back),
    requests time out after 10 s, the first contact gives up after 10 s, and metadata is
    refreshed every 5 s.

    The short metadata age is for leader moves between live brokers (a broker's preferred
    leader election ~5 min after it restarted, a reassignment): kafka-python 3.0 retries a
    ListOffsets answered "not leader" against its cached leaders without refreshing them (the
    Java client had the same bug, KAFKA-9159), so `beginning_offsets` / `end_offsets` fail
    until the background refresh. At 60 s, a ledger worker taking shards over right after
    such a move timed out twice (`make chaos`: every shard stalled 44 s)."""
    return {
        "reconnect_backoff_ms": 100,
        "reconnect_backoff_max_ms": 1000,
        "request_timeout_ms": 10_000,
        "bootstrap_timeout_ms": 10_000,
        "metadata_max_age_ms": 5_000,
    }


class Backoff:
    """Delays `initial_s`, ×`factor` each time, at most `max_s`, until `reset()`."""

    def __init__(self, initial_s: float, max_s: float, factor: float = 2.0):
        if not 0 < initial_s <= max_s or factor < 1:
            raise ValueError(f"bad backoff: initial {initial_s}s, max {max_s}s, ×{factor}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self._next = initial_s

    def next(self) -> float:
        """The delay to wait now; the following one is longer (up to `max_s`)."""
        delay = self._next
        self._next = min(delay * self.factor, self.max_s)
        return delay

    def reset(self) -> None:
        self._next = self.initial_s


class Outage:
    """One role's view of one dependency. `failed(exc)` after each failed attempt returns
    how long to wait before the next one and logs `dependency_down` (warning) at the first
    failure and then at most once per `log_every_s`, with how long it has been down and how
    many attempts failed; `ok()` after a success logs `dependency_back` once and resets."""

    def __init__(
        self,
        role: str,
        dependency: str,
        *,
        backoff: Backoff | None = None,
        log_every_s: float = OUTAGE_LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.role = role
        self.dependency = dependency
        self.backoff = backoff or Backoff(RECONNECT_INITIAL_S, RECONNECT_MAX_S)
        self.log_every_s = log_every_s
        self.clock = clock
        self.since: float | None = None
        self.attempts = 0
        self._logged_at: float | None = None

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException, **fields: object) -> float:
        """Count a failed attempt; the delay to wait before the next. `fields` go on the
        log line (what is waiting, e.g. the tick in hand)."""
        now = self.clock()
        if self.since is None:
            self.since = now
            self.attempts = 0
            self._logged_at = None
        self.attempts += 1
        delay = self.backoff.next()
        if self._logged_at is None or now - self._logged_at >= self.log_every_s:
            self._logged_at = now
            log.warning(
                "dependency_down",
                role=self.role,
                dependency=self.dependency,
                error=describe_error(exc),
                down_s=round(now - self.since, 1),
                attempts=self.attempts,
                retry_in_s=round(delay, 2),
                **fields,
            )
        else:
            log.debug(
                "dependency_retry",
                role=self.role,
                dependency=self.dependency,
                error=describe_error(exc),
                attempts=self.attempts,
                **fields,
            )
        return delay

    def ok(self) -> None:
        if self.since is None:
            return
        log.info(
            "dependency_back",
            role=self.role,
            dependency=self.dependency,
            down_s=round(self.clock() - self.since, 1),
            attempts=self.attempts,
        )
        self.since = None
        self._logged_at = None
        self.backoff.reset()
