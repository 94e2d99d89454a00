"""The web console over plain HTTP (starlette's TestClient, no browser), on the real
PostgreSQL: it runs as the read-only role, renders hostile bytes harmlessly, answers bad
parameters with 400 and a message, and pages the accounts list by keyset over the indexes.
The browser tests are tests/test_console_browser.py."""

from __future__ import annotations

import re
import unicodedata
import uuid
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

import psycopg
import pytest
from starlette.testclient import TestClient

from ledger import cli
from ledger.audit import audit_bill
from ledger.codec import Codec
from ledger.console import app as console_app
from ledger.console import data
from ledger.console.charts import bar_chart
from ledger.policy import Policy
from projections.worker import ProjectionWorker
from tests.conftest import as_role
from tests.test_journal import FakeRecord, opened

T0 = datetime(2026, 3, 1, tzinfo=UTC)
LLAMA = "accounts/fireworks/models/llama-v3p1-8b-instruct"


@pytest.fixture
def console(stack, dsn, base_settings):
    """The console's app over this test's database, as the reader role."""
    app = console_app.create_app(
        base_settings, as_role(stack, dsn, "reader"), bootstrap=stack.bootstrap
    )
    with TestClient(app) as client:
        yield client


def usage(account_id: str, offset: int, at: datetime, tokens: int) -> FakeRecord:
    event = {
        "event_id": str(uuid.uuid4()),
        "account_id": account_id,
        "occurred_at": at,
        "request_id": str(uuid.uuid4()),
        "product": "serverless",
        "model": LLAMA,
        "service_tier": "standard",
        "input_tokens": tokens,
        "cached_input_tokens": 0,
        "output_tokens": tokens // 10,
    }
    value = Codec.default().encode("UsageRecorded", event)
    return FakeRecord("billing.usage.v1", 0, offset, value, account_id.encode())


def project(settings, dsn) -> None:
    worker = ProjectionWorker(settings, dsn)
    try:
        worker.drain()
    finally:
        worker.close()


def test_the_console_reads_as_the_reader_role_and_cannot_write(
    console, stack, dsn, monkeypatch, base_settings
):
    reader = as_role(stack, dsn, "reader")
    pool = console.app.state.console.pool
    with pool.connection() as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == base_settings.db_reader_role
        for statement in (
            "INSERT INTO account_status (account_id, opened, suspended, reasons, "
            "status_version, credit_balance, receivable, state) "
            "VALUES ('x', true, false, '{}', 1, 0, 0, '{}')",
            "UPDATE rejected_events SET resolution = 'x'",
            "DELETE FROM outbox",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    # `ledger console` hands the app the reader's URL, never the writer's.
    served = []
    monkeypatch.setattr(console_app, "serve", lambda settings, url: served.append(url) or 0)
    monkeypatch.setenv("LEDGER_DATABASE_URL", dsn)
    monkeypatch.setenv("LEDGER_READER_DATABASE_URL", reader)
    monkeypatch.setenv("LEDGER_OWNER_DATABASE_URL", as_role(stack, dsn, "owner"))
    assert cli.main(["console", "--port", "8999"]) == 0
    assert served == [reader]
    assert cli.COMMAND_ROLES["console"] == "reader"


def test_hostile_reject_payloads_are_escaped_and_huge_ones_cut(console, owner_dsn):
    script = "<script>alert('owned')</script>"
    raw = (b"\x00\x1b[2J" + script.encode() + b"\xff\xfe") * 200_000  # ~8 MB
    detail = f"{script}\x01\x1b]0;title\x07\u202e" + "x" * 100_000  # text: no NUL in PostgreSQL
    with psycopg.connect(owner_dsn) as conn:
        (reject_id,) = conn.execute(
            "INSERT INTO rejected_events (topic, kafka_partition, kafka_offset, event_id, "
            "event_type, reason, detail, raw, message_key) "
            "VALUES (%s, 0, 1, %s, %s, %s, %s, %s, %s) RETURNING id",
            (
                f"<img src=x onerror=alert(1)>{script}",
                '"><svg onload=alert(2)>\x7f',
                script,
                f"bad_magic{script}",
                detail,
                raw,
                b"<b>key\x00",
            ),
        ).fetchone()

    for url in ("/rejects", f"/rejects/{reject_id}", f"/rejects/{reject_id}?bytes=1048576"):
        page = console.get(url)
        assert page.status_code == 200, page.text
        body = page.text
        # Nothing from the record becomes markup: no tag, no attribute break-out.
        assert "<script" not in body and "<img" not in body and "<svg onload" not in body
        assert "&lt;script&gt;" in body
        controls = {c for c in body if unicodedata.category(c)[0] == "C" and c not in "\n\t"}
        assert controls == set(), f"control characters in the page: {controls}"
        assert len(body) < 6_000_000, "an 8 MB payload must not be sent whole"
    detail_page = console.get(f"/rejects/{reject_id}").text
    assert "\\x01\\x1b]0;title\\x07\\u202e" in detail_page  # escapes, visible
    assert f"… {len(detail) - console_app.DETAIL_CHARS} more characters not shown" in detail_page
    assert f"{len(raw)} bytes, the first 4096 shown" in detail_page
    assert (
        "00000000  00 1b 5b 32 4a 3c 73 63 72 69 70 74 3e 61 6c 65  |..[2J&lt;scriptale|"
        not in (detail_page)
    )
    assert (
        "00000000  00 1b 5b 32 4a 3c 73 63 72 69 70 74 3e 61 6c 65  |..[2J&lt;script&gt;ale|"
        in (detail_page)
    )
    assert '<dd data-field="key">hex 3c623e6b657900</dd>' in detail_page  # not text: hex
    assert console.get("/rejects/999999").status_code == 404


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        ("/accounts/a-1/bill?month=2026-13", 400, "month='2026-13': not a month (YYYY-MM"),
        ("/accounts/a-1/bill?month=march", 400, "month='march': not a month"),
        ("/accounts/a-1/bill", 400, "month=None: not a month"),
        ("/accounts/a-1/bill.json?month=2026-3", 400, "month='2026-3': not a month"),
        ("/accounts/a-1/bill?month=2026-03&as_of=yesterday", 400, "as_of='yesterday': not a date"),
        ("/accounts/nobody/bill?month=2026-03", 404, "account 'nobody' has no journal entries"),
        ("/accounts/nobody", 404, "account 'nobody': no events journaled"),
        ("/accounts/a-1", 200, "No status projected for this account yet"),  # journaled only
        ("/accounts?q=a%00b", 400, "q: contains a NUL character"),
        ("/accounts/a%00b/bill?month=2026-03", 400, "account id: contains a NUL character"),
        ("/accounts?sort=evil", 400, "sort='evil': must be one of account, spend, headroom"),
        ("/accounts?dir=sideways", 400, "dir='sideways': must be one of asc, desc"),
        ("/accounts?status=asleep", 400, "status='asleep': must be one of active, suspended"),
        ("/accounts?reason=BORED", 400, "reason='BORED': must be one of"),
        ("/accounts?sort=spend&after=garbage", 400, "after='garbage': not a page cursor"),
        ("/rejects?after=-1", 400, "after=-1: must be in [0,"),
        ("/rejects?after=x", 400, "after='x': not a whole number"),
        ("/rejects?reason=nope", 404, "reason='nope': no rejects with that reason"),
        ("/rejects/1?bytes=lots", 400, "bytes='lots': not a whole number"),
    ],
)
def test_bad_parameters_get_a_clear_answer_not_a_server_error(
    console, writer, url, status, message
):
    writer.write_batch([opened("a-1", 0)])
    page = console.get(url)
    assert page.status_code == status, page.text
    assert message in page.text.replace("&#39;", "'")


def test_the_bill_page_and_downloads_are_the_audit_and_as_of_is_a_day(
    console, writer, dsn, base_settings
):
    writer.write_batch(
        [opened("a-1", 0)]
        + [usage("a-1", n, T0 + timedelta(days=n, hours=1), 20_000 * n) for n in range(1, 6)]
    )
    project(base_settings, dsn)
    day = datetime.now(UTC).date()
    with psycopg.connect(dsn) as conn:
        expected = audit_bill(conn, Policy.load(), "a-1", "2026-03")
        earlier = audit_bill(
            conn, Policy.load(), "a-1", "2026-03", datetime.combine(day, time.max, tzinfo=UTC)
        )
        nothing = audit_bill(
            conn, Policy.load(), "a-1", "2026-03", datetime(2025, 12, 31, 23, 59, 59, 999999, UTC)
        )
    assert len(expected["usage"]) >= 1 and Decimal(expected["usage_total"]) > 0
    page = console.get("/accounts/a-1/bill?month=2026-03")
    assert page.status_code == 200
    assert expected["checksum"] in page.text
    assert console.get("/accounts/a-1/bill.json?month=2026-03").json() == expected
    csv = console.get("/accounts/a-1/bill.csv?month=2026-03")
    assert csv.headers["content-type"].startswith("text/csv")
    assert 'filename="bill-a-1-2026-03.csv"' in csv.headers["content-disposition"]
    assert csv.text.splitlines()[-1].startswith(f"checksum,{expected['checksum']}")
    as_of = console.get(f"/accounts/a-1/bill.json?month=2026-03&as_of={day.isoformat()}").json()
    assert as_of == earlier and as_of["checksum"] == expected["checksum"]
    before = console.get("/accounts/a-1/bill.json?month=2026-03&as_of=2025-12-31").json()
    assert before == nothing and before["usage"] == [] and before["checksum"] != as_of["checksum"]

    account = console.get("/accounts/a-1")
    assert account.status_code == 200
    assert "Usage charged per day, 2026-03" in account.text  # the SVG chart
    assert account.text.count('<rect class="bar"') == 31
    assert 'data-bill="2026-03"' in account.text


def insert_accounts(owner_dsn: str, count: int) -> None:
    """`count` account_status rows with spread-out, tied and missing figures."""
    with psycopg.connect(owner_dsn) as conn:
        conn.execute(
            "INSERT INTO account_status (account_id, opened, suspended, reasons, status_version,"
            " credit_balance, receivable, state, shard, tier, effective_limit, month,"
            " month_to_date_spend) "
            "SELECT format('acct-%%s', lpad(n::text, 7, '0')), true, n %% 7 = 0,"
            " CASE WHEN n %% 7 = 0 THEN ARRAY['SPEND_LIMIT_REACHED'] ELSE ARRAY[]::text[] END,"
            " 1, 0, (n %% 13) * 1.5, '{}', 0, '1',"
            " CASE WHEN n %% 5 = 0 THEN NULL ELSE 50 END, '2026-03', (n * 37 %% 101) / 4.0"
            " FROM generate_series(1, %s) AS n",
            (count,),
        )
        conn.execute("ANALYZE account_status")


@pytest.mark.parametrize("sort", list(data.SORTS))
@pytest.mark.parametrize("descending", [False, True])
def test_pages_of_the_accounts_list_cover_every_account_once_in_order(
    console, owner_dsn, sort, descending
):
    insert_accounts(owner_dsn, 137)
    seen, params = [], {"sort": sort, "dir": "desc" if descending else "asc"}
    pages = 0
    while True:
        page = console.get("/accounts", params=params)
        assert page.status_code == 200
        seen += re.findall(r'<tr data-account="([^"]+)">', page.text)
        pages += 1
        found = re.search(r'<a rel="next" href="/accounts\?([^"]+)"', page.text)
        if found is None:
            break
        params = dict(p.split("=", 1) for p in found.group(1).replace("&amp;", "&").split("&"))
    assert pages == 3  # 50 + 50 + 37
    key = {
        "account": "account_id",
        "spend": "month_to_date_spend",
        "headroom": "coalesce(effective_limit, 'Infinity'::numeric) - month_to_date_spend",
        "receivable": "receivable",
    }[sort]
    order = "DESC" if descending else "ASC"
    with psycopg.connect(owner_dsn) as conn:
        expected = [
            a
            for (a,) in conn.execute(
                f"SELECT account_id FROM account_status ORDER BY {key} {order}, account_id {order}"
            )
        ]
    assert seen == expected

    # Filters and the search keep the keyset: every suspended account once, and a prefix.
    suspended = console.get("/accounts", params={"status": "suspended", "sort": sort}).text
    rows = re.findall(r'<tr data-account="([^"]+)">', suspended)
    assert len(rows) == 137 // 7 and all(int(a[5:]) % 7 == 0 for a in rows)
    found = console.get("/accounts", params={"q": "acct-000012", "sort": sort}).text
    assert sorted(re.findall(r'<tr data-account="([^"]+)">', found)) == [
        f"acct-{n:07d}" for n in range(120, 130)
    ]
    assert re.findall(r'<tr data-account="([^"]+)">', console.get("/accounts?q=acct_").text) == []


def test_a_deep_page_of_the_accounts_list_reads_an_index_from_its_cursor(console, owner_dsn):
    """The plan, not a timing: at 200,000 accounts every sort reads its index from the cursor
    on (an Index Cond on the keyset, no Sort node), so page N costs what page 1 does."""
    insert_accounts(owner_dsn, 200_000)
    pool = console.app.state.console.pool
    with pool.connection() as conn:
        for sort in data.SORTS:
            for descending in (False, True):
                first = data.AccountFilter(sort=sort, descending=descending)
                rows, cursor = data.accounts_page(conn, first)
                assert len(rows) == data.PAGE_SIZE and cursor is not None
                deep = data.AccountFilter(sort=sort, descending=descending, after=cursor)
                for f in (first, deep):
                    query, params = data.accounts_query(f)
                    plan = "\n".join(
                        r[0] for r in conn.execute(psycopg.sql.SQL("EXPLAIN ") + query, params)
                    )
                    assert "Sort" not in plan and "Index Scan" in plan, (sort, plan)
                    if f.after is not None:
                        assert "Index Cond" in plan, (sort, plan)
                page, _ = data.accounts_page(conn, deep)
                assert page[0]["account_id"] != rows[-1]["account_id"]


def test_operations_shows_the_status_overview_and_runs_verify(console, writer, base_settings):
    writer.write_batch([opened("a-1", 0), opened("a-2", 1)])
    page = console.get("/operations")
    assert page.status_code == 200
    assert "Consumer lag (records)" in page.text and "Not run from this console" in page.text
    ran = console.post("/operations/verify", follow_redirects=True)
    assert ran.status_code == 200
    assert "OK</strong>: trial balance zero" in ran.text
    metrics = console.get("/metrics").text
    assert "ledger_console_verify_differences 0.0" in metrics
    assert "ledger_database_up 1.0" in metrics


def test_a_chart_scales_its_bars_to_the_highest_day_and_keeps_the_values_exact():
    days = [("2026-03-01", Decimal("0.0000001")), ("2026-03-02", Decimal("0")),
            ("2026-03-03", Decimal("2.5")), ("2026-03-04", Decimal("5"))]  # fmt: skip
    chart = bar_chart("spend", "USD", days)
    heights = [b.height for b in chart.bars]
    assert heights[3] == chart.base - chart.top and heights[2] == heights[3] / 2
    assert heights[1] == 0 and heights[0] == 0  # a ten-millionth: too small to draw
    assert [b.value for b in chart.bars] == [v for _, v in days]  # exact, not drawn values
    assert chart.total == Decimal("7.5000001") and chart.peak == Decimal("5")
    assert all(b.y + b.height == chart.base for b in chart.bars)
    assert bar_chart("nothing", "USD", [("2026-03-01", Decimal(0))]).bars[0].height == 0


def test_an_account_whose_book_cannot_be_read_is_shown_with_its_charges_unknown(
    console, writer, base_settings, dsn, admin_dsn
):
    at = datetime(2026, 3, 2, tzinfo=UTC)
    writer.write_batch([opened("unread-1", 0), usage("unread-1", 1, at, 5_000_000)])
    project(base_settings, dsn)
    assert "Not yet invoiced" in console.get("/accounts/unread-1").text
    with psycopg.connect(admin_dsn, autocommit=True) as su:
        su.execute(
            "UPDATE account_books SET book = jsonb_set(book, '{pending}', '[\"<b>x\"]') "
            "WHERE account_id = 'unread-1'"
        )
    page = console.get("/accounts/unread-1")
    assert page.status_code == 200, page.text
    assert "the account book cannot be read (TypeError: pending [&#39;&lt;b&gt;x&#39;]" in page.text
    assert "<b>x" not in page.text
