"""The worker's HTTP port (`LEDGER_METRICS_PORT`): Prometheus metrics, liveness and readiness.

- `GET /metrics`: the process's metrics and the database gauges (`ledger.metrics`), in the
  Prometheus text format.
- `GET /healthz`: 200 while the process serves HTTP (it is alive).
- `GET /readyz`: 200 `{"ready": true, ...}` only when every check of the roles this process
  runs passes, otherwise 503 with `{"ready": false, "not_ready": {check: why}}`:
    - `database` (ledger, projections, relay): PostgreSQL answers `SELECT 1` within 2 s;
    - `broker` (ledger, relay, scheduler): a bootstrap broker answers a Kafka ApiVersions
      request within 2 s;
    - `shards` (ledger): the consumer holds at least one shard lease and none of its shards
      is stopped for lost offsets (a standby, which holds none, is not ready);
    - `lag` (ledger): every held shard's lag is known and at most `LEDGER_READY_MAX_LAG`
      records; (projections): no shard's projection lag exceeds it (entries).

The server runs in daemon threads beside the roles; every check gives up within seconds, so a
probe never hangs on a dependency that does not answer.
"""

from __future__ import annotations

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


def database_problem(
    dsn: str, *, projection_max_lag: int | None = None, timeout_s: int = CHECK_TIMEOUT_S
) -> tuple[str | None, str | None]:
    """(why PostgreSQL did not answer a query within `timeout_s`, why the projection is too far
    behind), each None when fine; the projection is looked at only with `projection_max_lag`."""
    try:
        with db.connect(dsn, autocommit=True, timeout_s=timeout_s) as conn:
            conn.execute(QUERIES["ping"]).fetchone()
            if projection_max_lag is None:
                return None, None
            rows = conn.execute(QUERIES["shard_progress"], ("account_status",)).fetchall()
    except (psycopg.Error, LedgerError) as exc:
        return _one_line(exc), None
    behind = {shard: lag for shard, lag, _ in rows if lag > projection_max_lag}
    if not behind:
        return None, None
    worst = max(behind, key=behind.__getitem__)
    return None, (
        f"projection over {projection_max_lag} entries behind on {len(behind)} shard(s) "
        f"(shard {worst}: {behind[worst]})"
    )


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


def shard_problems(views: list[metrics.ShardsView], max_lag: int) -> dict[str, str]:
    """The `shards` and `lag` checks over this process's ledger consumers."""
    if not views:
        return {"shards": "the ledger consumer has not started (waiting for PostgreSQL?)"}
    problems: dict[str, str] = {}
    for view in views:
        if not view.held:
            problems["shards"] = (
                f"holds none of its shards {_ranges(view.wanted)} (standby: another worker "
                "holds them)"
            )
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
    return problems


class Readiness:
    """The checks of the roles one process runs."""

    def __init__(self, settings: Settings, bootstrap: str, dsn: str, roles: Iterable[str]):
        self.settings = settings
        self.bootstrap = bootstrap
        self.dsn = dsn
        self.roles = tuple(roles)

    def problems(self) -> dict[str, str]:
        """{check: why it fails}; empty when the process is ready."""
        problems: dict[str, str] = {}
        max_lag = self.settings.ready_max_lag
        if any(role in NEEDS_DATABASE for role in self.roles):
            down, behind = database_problem(
                self.dsn, projection_max_lag=max_lag if "projections" in self.roles else None
            )
            problems |= {"database": down} if down else {}
            problems |= {"lag": behind} if behind else {}
        if any(role in NEEDS_BROKER for role in self.roles):
            problem = broker_problem(self.bootstrap)
            problems |= {"broker": problem} if problem else {}
        if "ledger" in self.roles:
            for name, problem in shard_problems(metrics.CONSUMERS.views(), max_lag).items():
                problems[name] = "; ".join(filter(None, (problem, problems.get(name))))
        return problems


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
            problems = readiness.problems()
            body = {"ready": not problems, "roles": list(readiness.roles)}
            if problems:
                body["not_ready"] = problems
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
