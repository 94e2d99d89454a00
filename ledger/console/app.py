"""The console's ASGI application: routes, parameters, templates. Server-rendered HTML, plain
forms and links (works with JavaScript off); one stylesheet, with a print layout for bills.

It connects as the READER role only (`ledger console` hands it the reader's URL), so no page
can write to the database even by mistake: PostgreSQL refuses. Bad parameters are answered
400 with a message that names the parameter and what it takes, an unknown id 404.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import jinja2
import psycopg
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ledger import chain_keys, render
from ledger.audit import audit_bill, bill_as_csv
from ledger.codec import Codec
from ledger.console import data
from ledger.console.charts import bar_chart
from ledger.errors import ConfigError, LedgerError, StackError
from ledger.metrics import DatabaseCollector
from ledger.policy import Policy
from ledger.rejects import hex_dump, printable, show, shown_key
from ledger.reports import account_view
from ledger.settings import Settings

log = structlog.get_logger(__name__)

MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")
DETAIL_CHARS = 4_000  # a reject's detail shown up to this many characters
DUMP_BYTES = 4_096  # raw bytes of a reject shown as hex unless ?bytes= asks for more
MAX_DUMP_BYTES = 1_048_576


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def text_param(value: str, name: str) -> str:
    """Text for a query: PostgreSQL text cannot hold a NUL character."""
    if "\x00" in value:
        raise BadRequest(f"{name}: contains a NUL character (\\x00); no account id does")
    return value


def month_param(text: str | None, name: str = "month") -> str:
    if text is None or MONTH.fullmatch(text) is None:
        raise BadRequest(f"{name}={text!r}: not a month (YYYY-MM, e.g. 2026-03)")
    return text


def as_of_param(text: str | None) -> datetime | None:
    """A date (YYYY-MM-DD): what the ledger had recorded by the end of that UTC day."""
    if not text:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"as_of={text!r}: not a date (YYYY-MM-DD, e.g. 2026-04-02)") from None
    return datetime.combine(day, time.max, tzinfo=UTC)


def choice_param(request: Request, name: str, choices, default: str | None = None) -> str | None:
    value = request.query_params.get(name) or default
    if value is not None and value not in choices:
        raise BadRequest(f"{name}={value!r}: must be one of {', '.join(choices)}")
    return value


def int_param(request: Request, name: str, low: int, high: int) -> int | None:
    text = request.query_params.get(name)
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name}={text!r}: not a whole number") from None
    if not low <= value <= high:
        raise BadRequest(f"{name}={value}: must be in [{low}, {high}]")
    return value


def percent(part: Decimal, whole: Decimal | None) -> Decimal | None:
    if whole is None or whole <= 0:
        return None
    return (Decimal(part) * 100 / Decimal(whole)).quantize(Decimal("0.1"))


class VerifyResult(Collector):
    """The last `verify` run from the Operations page (kept in memory: the console writes
    nothing), also exported on the console's /metrics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: dict[str, Any] | None = None

    def collect(self):
        if self.last is None:
            return
        yield GaugeMetricFamily(
            "ledger_console_verify_last_run_timestamp_seconds",
            "When the console last ran verify (Unix time)",
            value=self.last["finished_at"].timestamp(),
        )
        yield GaugeMetricFamily(
            "ledger_console_verify_differences",
            "Differences the console's last verify found (0: verified)",
            value=len(self.last["differences"]),
        )


class Console:
    """The application's state: settings, the reader's connection pool, the policy."""

    def __init__(self, settings: Settings, dsn: str, *, bootstrap: str | None = None):
        self.settings = settings
        self.dsn = dsn
        self.bootstrap = bootstrap
        self.policy = Policy.load(settings.policy)
        self.codec = Codec.default()
        # prepare_threshold=None: every query is planned with its values (the list's optional
        # filters fold away), never as a generic prepared plan.
        self.pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=4,
            open=False,
            kwargs={
                "autocommit": True,
                "prepare_threshold": None,
                "application_name": "ledger-console",
                "options": "-c TimeZone=UTC -c statement_timeout=60000",
            },
        )
        self.verify_result = VerifyResult()
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(DatabaseCollector(dsn))
        self.metrics.register(self.verify_result)

    def connection(self):
        return self.pool.connection()

    def kafka_bootstrap(self) -> tuple[str | None, str | None]:
        if self.bootstrap is not None:
            return self.bootstrap, None
        from ledger import stack

        try:
            return stack.kafka_bootstrap(self.settings), None
        except StackError as exc:
            return None, str(exc)


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ledger.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["money"] = lambda v: "" if v is None else render.money(v)
    env.filters["quantity"] = lambda v: "" if v is None else render.quantity(v)
    env.filters["printable"] = lambda v: printable(v or "")
    env.filters["iso"] = lambda v: "" if v is None else v.isoformat(timespec="seconds")
    env.filters["plain"] = lambda v: "" if v is None else format(Decimal(v).normalize(), "f")
    env.globals["percent"] = percent
    env.globals["url_for"] = _path_for  # links relative to the host: right behind a proxy too
    return Jinja2Templates(env=env)


@jinja2.pass_context
def _path_for(context: Any, name: str, /, **params: Any) -> str:
    return str(context["request"].app.url_path_for(name, **params))


def create_app(settings: Settings, dsn: str, *, bootstrap: str | None = None) -> Starlette:
    """The console over the database at `dsn` (the reader's URL); `bootstrap`: the Kafka to
    ask for the lag (default: LEDGER_KAFKA_BOOTSTRAP or the local stack's, when running)."""
    console = Console(settings, dsn, bootstrap=bootstrap)
    templates = _templates()

    def page(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def index(request: Request) -> Response:
        return RedirectResponse(request.app.url_path_for("accounts"), status_code=302)

    def accounts(request: Request) -> Response:
        sort = choice_param(request, "sort", tuple(data.SORTS), "account")
        direction = choice_param(request, "dir", ("asc", "desc"), "asc")
        after = request.query_params.get("after")
        prefix = text_param((request.query_params.get("q") or "").strip(), "q")
        if len(prefix) > 200:
            raise BadRequest(
                f"q: an account id prefix of at most 200 characters, not {len(prefix)}"
            )
        f = data.AccountFilter(
            prefix=prefix or None,
            status=choice_param(request, "status", tuple(data.STATUSES)),
            reason=choice_param(request, "reason", data.REASONS),
            sort=sort,
            descending=direction == "desc",
            after=data.decode_cursor(after, sort) if after else None,
        )
        with console.connection() as conn:
            rows, cursor = data.accounts_page(conn, f)
        return page(
            request,
            "accounts.html",
            rows=rows,
            f=f,
            next_params=f.query_string(after=cursor) if cursor else None,
            first_params=f.query_string(after=None) if f.after else None,
            sorts=data.SORTS,
            statuses=data.STATUSES,
            reasons=data.REASONS,
        )

    def account(request: Request) -> Response:
        account_id = text_param(request.path_params["account_id"], "account id")
        with console.connection() as conn:
            view = account_view(conn, account_id, last=0)
            if not view["known"]:
                raise BadRequest(f"account {account_id!r}: no events journaled", 404)
            extras = data.account_extras(conn, console.policy, account_id)
            month = view.get("month")
            months = sorted({i["month"] for i in view["invoices"]} | ({month} if month else set()))
            chart_month = request.query_params.get("chart")
            if chart_month is not None:
                chart_month = month_param(chart_month, "chart")
            spend: list = []
            # The chart: the month asked for, else the latest month with usage (the current
            # month may have none yet, e.g. just after the month turned).
            for candidate in [chart_month] if chart_month else months[::-1][:3]:
                spend = data.daily_spend(conn, account_id, candidate)
                chart_month = candidate
                if any(v for _, v in spend):
                    break
        limit = Decimal(view["effective_limit"]) if view.get("effective_limit") else None
        mtd = Decimal(view.get("month_to_date_spend") or 0)
        used = percent(mtd, limit)
        scale = max(Decimal(120), used or Decimal(0))  # the 100 % mark, and what lies beyond
        marks = console.policy.warning_thresholds
        return page(
            request,
            "account.html",
            view=view,
            x=extras,
            limit=limit,
            mtd=mtd,
            used=used,
            bar={
                "fill": (min(used or Decimal(0), scale) * 100 / scale).quantize(Decimal("0.1")),
                "marks": [
                    {"percent": m, "at": (Decimal(m) * 100 / scale).quantize(Decimal("0.1"))}
                    for m in marks
                ],
            },
            chart=bar_chart(f"Usage charged per day, {chart_month}", "USD", spend)
            if spend
            else None,
            chart_month=chart_month,
            months=months[::-1],
        )

    def _bill(request: Request) -> tuple[dict[str, Any], str | None]:
        account_id = text_param(request.path_params["account_id"], "account id")
        month = month_param(request.query_params.get("month"))
        as_of_text = request.query_params.get("as_of") or None
        as_of = as_of_param(as_of_text)
        with console.connection() as conn:
            try:
                bill = audit_bill(conn, console.policy, account_id, month, as_of)
            except LedgerError as exc:
                raise BadRequest(str(exc), 404) from None
        return bill, as_of_text

    def bill(request: Request) -> Response:
        bill, as_of_text = _bill(request)
        return page(request, "bill.html", bill=bill, as_of_date=as_of_text or "")

    def bill_json(request: Request) -> Response:
        bill, _ = _bill(request)
        return Response(
            json.dumps(bill, indent=2) + "\n",
            media_type="application/json",
            headers=_attachment(bill, "json"),
        )

    def bill_csv(request: Request) -> Response:
        bill, _ = _bill(request)
        return Response(
            bill_as_csv(bill),
            media_type="text/csv; charset=utf-8",
            headers=_attachment(bill, "csv"),
        )

    def rejects(request: Request) -> Response:
        with console.connection() as conn:
            reasons = conn.execute(data.QUERIES["rejects_by_reason"]).fetchall()
            known = tuple(r for r, _, _ in reasons)
            reason = request.query_params.get("reason") or None
            if reason is not None and reason not in known:
                raise BadRequest(f"reason={reason!r}: no rejects with that reason", 404)
            after = int_param(request, "after", 0, 2**63 - 1)
            rows, cursor = data.rejects_page(conn, reason, after)
        return page(
            request,
            "rejects.html",
            reasons=reasons,
            reason=reason,
            rows=rows,
            next_after=cursor,
            after=after,
        )

    def reject(request: Request) -> Response:
        reject_id = request.path_params["reject_id"]
        limit = int_param(request, "bytes", 0, MAX_DUMP_BYTES) or DUMP_BYTES
        found = show(console.dsn, reject_id)
        if found is None:
            raise BadRequest(f"reject {reject_id}: no such rejected event", 404)
        raw = found["raw"]
        detail = found["detail"] or ""
        return page(
            request,
            "reject.html",
            r=found,
            key=shown_key(found["key"]),
            detail=detail[:DETAIL_CHARS],
            detail_cut=max(0, len(detail) - DETAIL_CHARS),
            dump=hex_dump(raw[:limit]),
            size=len(raw),
            shown=min(limit, len(raw)),
            more=min(len(raw), MAX_DUMP_BYTES),
        )

    def operations(request: Request) -> Response:
        from ledger.overview import overview

        bootstrap, kafka_unknown = console.kafka_bootstrap()
        report = overview(settings, bootstrap, console.dsn, kafka_unknown=kafka_unknown)
        with console.connection() as conn:
            suspensions = data.suspensions_per_day(conn, console.codec)
        chart = bar_chart("Accounts suspended per day", "accounts", suspensions)
        return page(
            request,
            "operations.html",
            report=report,
            verify=console.verify_result.last,
            chart=chart if suspensions else None,
        )

    def run_verify(request: Request) -> Response:
        from ledger.verify import verify

        result = console.verify_result
        if not result.lock.acquire(blocking=False):
            raise BadRequest("verify is already running; reload Operations in a while", 409)
        try:
            notes: list[str] = ["the chains were not checked against checkpoints (the console "
                                "reads no Kafka topic); `ledger verify` does"]  # fmt: skip
            try:
                keys = chain_keys.load(settings)
            except ConfigError as exc:
                keys = chain_keys.ChainKeys({}, "no key file")
                notes.append(f"no chain keys ({exc})")
            started = datetime.now(UTC)
            # In the server's own process: a click must not start a process per core.
            differences = verify(settings, console.dsn, keys=keys, notes=notes, jobs=1)
            result.last = {
                "started_at": started,
                "finished_at": datetime.now(UTC),
                "differences": [str(d) for d in differences],
                "notes": notes,
            }
            log.info("console_verify", differences=len(differences))
        finally:
            result.lock.release()
        return RedirectResponse(request.app.url_path_for("operations"), status_code=303)

    def metrics(request: Request) -> Response:
        return Response(generate_latest(console.metrics), media_type="text/plain; version=0.0.4")

    async def bad_request(request: Request, exc: BadRequest | data.BadParameter) -> Response:
        status = getattr(exc, "status", 400)
        if request.url.path.endswith((".csv", ".json")):
            return PlainTextResponse(str(exc) + "\n", status_code=status)
        return page(request, "error.html", status=status, code=status, message=str(exc))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return page(
            request, "error.html", status=exc.status_code, code=exc.status_code, message=exc.detail
        )

    async def database_error(request: Request, exc: psycopg.Error) -> Response:
        log.error("console_database_error", error=" ".join(str(exc).split())[:300])
        return page(
            request,
            "error.html",
            status=503,
            code=503,
            message="the database did not answer; try again",
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        console.pool.open()
        try:
            yield
        finally:
            console.pool.close()

    routes = [
        Route("/", index),
        Route("/accounts", accounts, name="accounts"),
        Route("/accounts/{account_id}", account, name="account"),
        Route("/accounts/{account_id}/bill", bill, name="bill"),
        Route("/accounts/{account_id}/bill.json", bill_json, name="bill_json"),
        Route("/accounts/{account_id}/bill.csv", bill_csv, name="bill_csv"),
        Route("/rejects", rejects, name="rejects"),
        Route("/rejects/{reject_id:int}", reject, name="reject"),
        Route("/operations", operations, name="operations"),
        Route("/operations/verify", run_verify, methods=["POST"], name="verify"),
        Route("/metrics", metrics, name="metrics"),
        Mount("/static", StaticFiles(packages=[("ledger.console", "static")]), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            BadRequest: bad_request,
            data.BadParameter: bad_request,
            HTTPException: http_error,
            psycopg.Error: database_error,
        },
    )
    app.state.console = console
    return app


def _attachment(bill: dict[str, Any], ext: str) -> dict[str, str]:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"bill-{bill['account_id']}-{bill['month']}")
    return {"content-disposition": f'attachment; filename="{name}.{ext}"'}


def serve(settings: Settings, dsn: str) -> int:
    """Run the console until interrupted (`ledger console`)."""
    import uvicorn

    app = create_app(settings, dsn)
    host, port = settings.console_host, settings.console_port
    log.info("console_started", host=host, port=port, url=settings.console_url)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0
