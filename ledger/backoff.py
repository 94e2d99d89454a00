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

from ledger import metrics
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
        "metadata_max_age_ms": int(METADATA_MAX_AGE_S * 1000),
    }


METADATA_MAX_AGE_S = 5.0
# A client whose last metadata refresh is older than this has heard from no broker for two
# refresh periods: it counts as cut off from Kafka (`kafka_silent_s`).
KAFKA_SILENT_LIMIT_S = 2 * METADATA_MAX_AGE_S


def kafka_silent_s(client: object) -> float | None:
    """Seconds since a kafka-python 3 client last got an answer to a metadata request from any
    broker; None when the client does not say (another kafka-python version).

    With `kafka_reconnect_options` the client's own I/O thread asks every
    METADATA_MAX_AGE_S, whether or not it has partitions assigned or is polled, so the age
    stays under that while any broker answers. It is the one sign of a cut connection that
    needs no request of its own: a consumer's `poll()` returns nothing, not an error, when no
    broker answers, just as it does when nothing new arrived."""
    # The consumer's cluster metadata is `_cluster`, the producer's `_metadata`.
    cluster = getattr(client, "_cluster", None) or getattr(client, "_metadata", None)
    last_ms = getattr(cluster, "_last_successful_refresh_ms", None)
    if not isinstance(last_ms, (int, float)):
        return None
    return max(0.0, time.monotonic() - last_ms / 1000)


class KafkaContact:
    """Whether a role still hears from Kafka, for roles that hold what another worker could do
    in their place (the ledger's shard leases, the relay's lock). A worker that reaches
    PostgreSQL but no broker (a network partition, a firewall rule, a broker address it alone
    resolves wrongly) would otherwise hold on and stall its work, as its standbys wait
    on PostgreSQL's word that it is alive.

    `hears(client)` is False once no broker answered the client (or the clients, if the role
    made new ones meanwhile; None while it has none) for KAFKA_SILENT_LIMIT_S. The count
    starts again at `reset()` (the role just took something over). One `kafka_unreachable`
    line when contact is lost, one `kafka_reachable` when it is back."""

    def __init__(self, role: str, limit_s: float = KAFKA_SILENT_LIMIT_S):
        self.role = role
        self.limit_s = limit_s
        self.heard_at = time.monotonic()
        self.cut_off = False

    def reset(self) -> None:
        """Count the silence from now (no `kafka_reachable` line: nothing was heard)."""
        self.heard_at = time.monotonic()
        self.cut_off = False

    def hears(self, client: object | None) -> bool:
        now = time.monotonic()
        if client is not None:
            silent = kafka_silent_s(client)
            # A client that does not say is taken at its word: the check is off.
            self.heard_at = max(self.heard_at, now - (silent if silent is not None else 0.0))
        silent_s = now - self.heard_at
        metrics.KAFKA_SILENT.labels(self.role).set(round(silent_s, 1))
        cut_off = silent_s > self.limit_s
        if cut_off and not self.cut_off:
            log.warning(
                "kafka_unreachable",
                role=self.role,
                silent_s=round(silent_s, 1),
                detail="no broker answered; what this worker holds is left to one that reaches "
                "Kafka",
            )
        elif self.cut_off and not cut_off:
            log.info("kafka_reachable", role=self.role)
        self.cut_off = cut_off
        return not cut_off


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
