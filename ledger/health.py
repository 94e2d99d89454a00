"""The worker's HTTP port (`LEDGER_METRICS_PORT`): Prometheus metrics, liveness and readiness.

- `GET /metrics`: the process's metrics and the database gauges (`ledger.metrics`), in the
  Prometheus text format.
- `GET /healthz`: 200 while the process serves HTTP (it is alive).
- `GET /readyz`: 200 `{"ready": true, ...}` only when every check of the roles this process
  runs passes, otherwise 503 with `{"ready": false, "not_ready": {check: why}}`:
    - `database` (ledger, projections, relay): PostgreSQL answers `SELECT 1` within 2 s;
    - `broker` (ledger, relay, scheduler): a bootstrap broker answers a Kafka ApiVersions
      request within 2 s;
    - `shards` (ledger): the consumer has started and holds at least one shard lease, none
      of its shards stopped for lost offsets; or it is a standby: it holds none because every
      one of its shards is held by another worker's live lease (`standby_for_shards` in the
      body). A shard nobody holds that it has not taken yet makes it not ready;
    - `lag` (ledger): every held shard's lag is known and at most `LEDGER_READY_MAX_LAG`
      records; (projections): no shard's projection lag exceeds it (entries).

The server runs in daemon threads beside the roles; every check gives up within seconds, so a
probe never hangs on a dependency that does not answer.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ledger import db, metrics
from ledger.db import QUERIES
from ledger.errors import ConfigError, LedgerError
from ledger.settings import Settings

log = structlog.get_logger(__name__)

CHECK_TIMEOUT_S = 2
NEEDS_DATABASE = ("ledger", "projections", "relay")
NEEDS_BROKER = ("ledger", "relay", "scheduler")


# --- the checks ------------------------------------------------------------------------------


@dataclasses.dataclass
class DatabaseAnswer:
    problem: str | None = None  # PostgreSQL did not answer: why
    projection_behind: str | None = None  # the projection is too far behind: where
    live_holders: dict[int, str] | None = None  # shard → holder of a lease not expired


def ask_database(
    dsn: str,
    *,
    projection_max_lag: int | None = None,
    lease_group: str | None = None,
    timeout_s: int = CHECK_TIMEOUT_S,
) -> DatabaseAnswer:
    """Whether PostgreSQL answers a query within `timeout_s`; with `projection_max_lag`,
    whether a shard's projection is further behind; with `lease_group`, who holds live shard
    leases. One connection."""
    answer = DatabaseAnswer()
    try:
        with db.connect(dsn, autocommit=True, timeout_s=timeout_s) as conn:
            conn.execute(QUERIES["ping"]).fetchone()
            if lease_group is not None:
                rows = conn.execute(QUERIES["shard_lease_holders"], (lease_group,)).fetchall()
                answer.live_holders = {shard: holder for shard, holder, _, live in rows if live}
            if projection_max_lag is not None:
                rows = conn.execute(QUERIES["shard_progress"], ("account_status",)).fetchall()
                behind = {shard: lag for shard, lag, _ in rows if lag > projection_max_lag}
                if behind:
                    worst = max(behind, key=behind.__getitem__)
                    answer.projection_behind = (
                        f"projection over {projection_max_lag} entries behind on "
                        f"{len(behind)} shard(s) (shard {worst}: {behind[worst]})"
                    )
    except (psycopg.Error, LedgerError) as exc:
        return DatabaseAnswer(problem=_one_line(exc))
    return answer


def broker_problem(bootstrap: str, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """None if some bootstrap broker answers an ApiVersions request (the first request every
    Kafka client sends, allowed before authentication) within `timeout_s`, else why not."""
    problems = []
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            _api_versions(host.strip("[]"), int(port), timeout_s)
            return None
        except (OSError, ValueError) as exc:
            problems.append(f"{address.strip()}: {_one_line(exc)}")
    return "; ".join(problems) or "no bootstrap address"


def _api_versions(host: str, port: int, timeout_s: float) -> None:
    """One ApiVersions v0 round trip; raises unless a Kafka broker answered it."""
    client_id = b"ledger-readyz"
    correlation_id = 0x4C454447
    request = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _receive(sock, 4))
        answer = _receive(sock, min(size, 6))
    if size < 6 or struct.unpack(">i", answer[:4])[0] != correlation_id:
        raise ValueError("the answer is not a Kafka ApiVersions response")
    # Any error code (e.g. UNSUPPORTED_VERSION, 35) still means a broker is answering.


def _receive(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        data += chunk
    return data


def shard_problems(
    views: list[metrics.ShardsView], max_lag: int, live_holders: dict[int, str] | None
) -> tuple[dict[str, str], list[int]]:
    """The `shards` and `lag` checks over this process's ledger consumers: (problems, the
    shards it stands by for). A consumer holding none of its shards is ready only as a standby:
    when every one of them is held by another worker's live lease (`live_holders`); a shard
    nobody holds is one it should have taken."""
    if not views:
        return {"shards": "the ledger consumer has not started (waiting for PostgreSQL?)"}, []
    problems: dict[str, str] = {}
    standby: list[int] = []
    for view in views:
        if not view.held:
            if live_holders is None:
                problems["shards"] = f"holds none of its shards {_ranges(view.wanted)}"
            elif free := [s for s in view.wanted if s not in live_holders]:
                problems["shards"] = (
                    f"holds none of its shards {_ranges(view.wanted)}; {_ranges(free)} held "
                    "by nobody and not taken yet"
                )
            else:
                standby += view.wanted
        elif view.stopped:
            problems["shards"] = (
                f"shards {_ranges(view.stopped)} stopped: Kafka deleted offsets not yet "
                "journaled (`ledger offsets show`)"
            )
        unknown = sorted(view.held - view.stopped - set(view.lag))
        behind = {shard: lag for shard, lag in sorted(view.lag.items()) if lag > max_lag}
        if behind:
            worst = max(behind, key=behind.__getitem__)
            problems["lag"] = (
                f"{len(behind)} shard(s) over {max_lag} records behind (shard {worst}: "
                f"{behind[worst]})"
            )
        elif unknown and "lag" not in problems:
            problems["lag"] = f"not measured yet for shards {_ranges(unknown)}"
    return problems, sorted(set(standby))


class Readiness:
    """The checks of the roles one process runs."""

    def __init__(self, settings: Settings, bootstrap: str, dsn: str, roles: Iterable[str]):
        self.settings = settings
        self.bootstrap = bootstrap
        self.dsn = dsn
        self.roles = tuple(roles)

    def check(self) -> tuple[dict[str, str], list[int]]:
        """({check: why it fails}, shards this process stands by for); ready when the first
        is empty."""
        problems: dict[str, str] = {}
        standby: list[int] = []
        max_lag = self.settings.ready_max_lag
        answer = DatabaseAnswer()
        if any(role in NEEDS_DATABASE for role in self.roles):
            answer = ask_database(
                self.dsn,
                projection_max_lag=max_lag if "projections" in self.roles else None,
                lease_group=self.settings.consumer_group if "ledger" in self.roles else None,
            )
            problems |= {"database": answer.problem} if answer.problem else {}
            problems |= {"lag": answer.projection_behind} if answer.projection_behind else {}
        if any(role in NEEDS_BROKER for role in self.roles):
            problem = broker_problem(self.bootstrap)
            problems |= {"broker": problem} if problem else {}
        if "ledger" in self.roles:
            found, standby = shard_problems(metrics.CONSUMERS.views(), max_lag, answer.live_holders)
            for name, problem in found.items():
                problems[name] = "; ".join(filter(None, (problem, problems.get(name))))
        return problems, standby


# --- the server ------------------------------------------------------------------------------


class _Scrape:
    """What /metrics collects: the process's registry, then the database gauges."""

    def __init__(self, *sources) -> None:
        self.sources = sources

    def collect(self):
        for source in self.sources:
            yield from source.collect()


def application(scrape: _Scrape, readiness: Readiness) -> Callable:
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed", b"GET only\n")
        if path == "/metrics":
            return _answer(start_response, "200 OK", generate_latest(scrape), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return _answer(start_response, "200 OK", b"ok\n")
        if path == "/readyz":
            problems, standby = readiness.check()
            body: dict = {"ready": not problems, "roles": list(readiness.roles)}
            if problems:
                body["not_ready"] = problems
            if standby:
                body["standby_for_shards"] = standby
            status = "503 Service Unavailable" if problems else "200 OK"
            return _answer(
                start_response, status, json.dumps(body).encode() + b"\n", "application/json"
            )
        return _answer(start_response, "404 Not Found", b"/metrics, /healthz or /readyz\n")

    return app


def _answer(start_response, status: str, body: bytes, content_type: str = "text/plain"):
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # probes every few seconds: no access log
        pass


class MetricsServer:
    """`/metrics`, `/healthz` and `/readyz` on `port` (all interfaces), in daemon threads."""

    def __init__(
        self, settings: Settings, bootstrap: str, dsn: str, roles: Iterable[str], port: int
    ):
        roles = tuple(roles)
        self.collector = metrics.DatabaseCollector(dsn)
        readiness = Readiness(settings, bootstrap, dsn, roles)
        app = application(_Scrape(metrics.REGISTRY, self.collector), readiness)
        try:
            self.server = make_server(
                "0.0.0.0", port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigError(f"LEDGER_METRICS_PORT={port}: cannot listen: {exc}") from exc
        self.port = self.server.server_port
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="metrics", daemon=True
        )
        self.thread.start()
        log.info("metrics_serving", port=self.port, roles=list(roles))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.collector.close()


def serve(
    settings: Settings, bootstrap: str, dsn: str, roles: Iterable[str]
) -> MetricsServer | None:
    """The metrics server on `LEDGER_METRICS_PORT`, or None when it is 0 (off)."""
    if not settings.metrics_port:
        return None
    return MetricsServer(settings, bootstrap, dsn, roles, settings.metrics_port)


def _ranges(shards: Iterable[int]) -> str:
    """[0, 1, 2, 5] → "0-2,5"."""
    runs: list[list[int]] = []
    for shard in sorted(shards):
        if runs and runs[-1][1] == shard - 1:
            runs[-1][1] = shard
        else:
            runs.append([shard, shard])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
