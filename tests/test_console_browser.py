"""The web console in a real headless Chromium (Debian's `chromium` and `chromium-driver`),
over a month of real traffic on Kafka + PostgreSQL: search an account, open its bill, find
every number of `ledger audit --format json` on the page, print the bill to a one-page PDF;
the rejects, a hostile one rendered harmlessly; operations and verify; a phone-sized page that
does not scroll sideways. A screenshot of each page goes to test-output/console/ for a person
to look at. A missing browser FAILS this module (never a skip): `make test` installs them
where it can (Makefile `browser`), the README lists them."""

from __future__ import annotations

import base64
import json
import re
import shutil
import threading
from decimal import Decimal
from pathlib import Path

import pytest
import uvicorn
from kafka import KafkaProducer
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.print_page_options import PrintOptions

from ledger import topics
from ledger.console.app import create_app
from tests.conftest import as_role
from tests.harness import wait_until
from tests.test_audit import month_of_traffic
from tests.test_cli import ledger_cli, services_env

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parent.parent / "test-output" / "console"
MONTH = "2026-03"


def _binary(path: str, name: str) -> str:
    found = path if Path(path).is_file() else shutil.which(Path(path).name)
    if found is None:
        pytest.fail(
            f"the console's browser tests need {name} ({path} not found): install Debian's "
            "packages with `apt-get install chromium chromium-driver` (as root; `make test` "
            "does it when it can); see the README's prerequisites",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = _binary(CHROMIUM, "the chromium browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--lang=en-US"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(_binary(CHROMEDRIVER, "chromedriver")), options=options
    )
    driver.set_page_load_timeout(120)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


class Served:
    """The console under uvicorn in a thread, on a free port."""

    def __init__(self, app):
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the console listening")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def shot(driver, name: str) -> None:
    """The whole page (the window stretched to its height for a moment) as a PNG."""
    path = SHOTS / f"{name}.png"
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], min(max(height + 140, 400), 8000))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(size["width"], size["height"])
    (SHOTS / f"{name}.html").write_text(driver.page_source, "utf-8")
    assert path.stat().st_size > 1000, f"empty screenshot {path}"


def page_has_no_script(driver) -> None:
    assert driver.find_elements(By.TAG_NAME, "script") == [], "the console needs no JavaScript"


NUMERIC = {"quantity", "unit_price", "multiplier", "amount", "requests", "usage_total",
           "usage_to_receivable", "applied_to_receivable", "exact_total", "amount_due"}  # fmt: skip


def numbers_of(value, path: str = "") -> dict[str, str]:
    """Every number of the audit's JSON bill, by its path (usage.0.amount, ...)."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("events", "as_of"):
                continue
            out |= numbers_of(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out |= numbers_of(v, f"{path}.{i}")
    elif path.rsplit(".", 1)[-1] in NUMERIC:
        out[path] = str(value)
    return out


def shown_decimal(text: str) -> Decimal:
    """A number as the page shows it (1,234.5678, −0.10) as a Decimal."""
    return Decimal(text.replace(",", "").replace("−", "-").strip())


def test_search_an_account_open_its_bill_and_find_every_number_of_the_audit(
    ledger, stack, browser, base_settings
):
    events = month_of_traffic(ledger, accounts=30, usage=1_500, seed=11)
    hostile = b"\x00\x1b[2J<script>alert('owned')</script>" + bytes(range(256))
    raw = KafkaProducer(bootstrap_servers=ledger.bootstrap, acks="all")
    raw.send(ledger.settings.topic(topics.USAGE), key=b"au-<b>", value=hostile).get(timeout=30)
    raw.close()
    ledger.settle(events + 1, timeout=180)
    (account,) = ledger.db.execute(
        "SELECT account_id FROM invoices WHERE month = %s "
        "ORDER BY jsonb_array_length(lines) DESC, amount_due DESC, account_id LIMIT 1",
        (MONTH,),
    ).fetchone()
    env = services_env(stack, ledger.dsn)
    audit = ledger_cli("audit", "--account", account, "--month", MONTH, "--format", "json", env=env)
    assert audit.returncode == 0, audit.stderr
    expected = json.loads(audit.stdout)
    assert expected["status"] == "issued" and len(expected["usage"]) >= 2

    app = create_app(
        ledger.settings, as_role(stack, ledger.dsn, "reader"), bootstrap=stack.bootstrap
    )
    with Served(app) as base:
        d = browser
        # Accounts: search by id with the keyboard.
        d.get(f"{base}/accounts")
        assert d.find_element(By.TAG_NAME, "h1").text == "Accounts"
        page_has_no_script(d)
        shot(d, "1-accounts")
        search = d.find_element(By.ID, "q")
        assert d.find_element(By.CSS_SELECTOR, "label[for=q]").text.startswith("Account id")
        search.send_keys(account, Keys.ENTER)
        wait_until(lambda: "q=" in d.current_url, 30, "the search")
        rows = d.find_elements(By.CSS_SELECTOR, "tr[data-account]")
        assert [r.get_attribute("data-account") for r in rows] == [account]
        rows[0].find_element(By.TAG_NAME, "a").click()

        # Account: status, spend bar with its marks, chart, invoices.
        wait_until(lambda: "/accounts/" in d.current_url, 30, "the account page")
        assert account in d.find_element(By.TAG_NAME, "h1").text
        view = ledger.account(account)
        assert d.find_element(By.CSS_SELECTOR, "[data-status]").text == (
            "suspended" if view["suspended"] else "active"
        )
        marks = [m.text for m in d.find_elements(By.CSS_SELECTOR, ".meter .mark span")]
        assert marks == ["50 %", "80 %", "100 %"]
        # The month turned at the close: the chart shows March, the latest month with usage.
        caption = d.find_element(By.CSS_SELECTOR, "figure.chart figcaption").text
        assert caption.startswith(f"Usage charged per day, {MONTH} (total ")
        assert len(d.find_elements(By.CSS_SELECTOR, "figure.chart svg rect.bar")) == 31
        page_has_no_script(d)
        shot(d, "2-account")
        d.find_element(By.CSS_SELECTOR, f'a[data-bill="{MONTH}"]').click()

        # Bill: every number of the audit, the same checksum.
        wait_until(lambda: "/bill" in d.current_url, 30, "the bill page")
        shown = {
            e.get_attribute("data-field"): (e.get_attribute("data-value"), e.text)
            for e in d.find_elements(By.CSS_SELECTOR, "[data-field]")
        }
        numbers = numbers_of(expected)
        assert len(numbers) >= 10
        for path, value in numbers.items():
            assert path in shown, f"{path} = {value} is not on the page"
            data_value, text = shown[path]
            assert data_value == value, path
            assert shown_decimal(text) == Decimal(value), f"{path}: shows {text!r}, audit {value}"
        bill_fields = {p for p in shown if p not in ("checksum", "status", "invoice.invoice_id")}
        assert bill_fields == set(numbers), "the page shows a number the audit does not have"
        assert shown["checksum"] == (expected["checksum"], expected["checksum"])
        assert shown["invoice.invoice_id"][0] == expected["invoice"]["invoice_id"]
        assert shown["status"][0] == "issued"
        page_has_no_script(d)
        shot(d, "3-bill")

        # Print: a clean invoice on one A4 page.
        options = PrintOptions()
        options.page_width, options.page_height = 21.0, 29.7
        pdf = base64.b64decode(d.print_page(options))
        (SHOTS / "3-bill.pdf").write_bytes(pdf)
        assert pdf.startswith(b"%PDF-")
        pages = len(re.findall(rb"/Type\s*/Page(?!s)", pdf))
        assert pages == 1, f"the printed bill has {pages} pages"

        # Rejects: the hostile record, escaped.
        d.get(f"{base}/rejects")
        reject_rows = d.find_elements(By.CSS_SELECTOR, "tr[data-reject]")
        assert len(reject_rows) == 1
        shot(d, "4-rejects")
        reject_rows[0].find_element(By.TAG_NAME, "a").click()
        wait_until(lambda: "/rejects/" in d.current_url, 30, "the reject page")
        assert d.find_element(By.CSS_SELECTOR, "[data-field=reason]").text == "bad_magic"
        assert d.find_element(By.CSS_SELECTOR, "[data-field=key]").text == "'au-<b>'"  # text
        assert d.find_elements(By.CSS_SELECTOR, "[data-field=key] b") == []  # not markup
        dump = d.find_element(By.CSS_SELECTOR, "[data-field=dump]").text
        assert dump.startswith("00000000  00 1b 5b 32 4a 3c 73 63 72 69 70 74 3e 61 6c 65")
        assert "|..[2J<scriptale" not in dump and "|..[2J<script>ale|" in dump
        page_has_no_script(d)  # the <script> in the payload is text, not an element
        shot(d, "5-reject")

        # Operations: lag per shard, outbox, verify run from the page.
        d.get(f"{base}/operations")
        shards = d.find_elements(By.CSS_SELECTOR, "table.shards tbody tr")
        assert len(shards) == ledger.settings.partitions
        d.find_element(By.XPATH, "//button[text()='Run verify now']").click()

        def verify_text() -> str:
            """The verify cell's text; "" while the page is being replaced (the form's POST
            navigates, so an element found on the old page goes stale)."""
            try:
                return d.find_element(By.CSS_SELECTOR, "[data-field=verify]").text
            except (StaleElementReferenceException, NoSuchElementException):
                return ""

        wait_until(lambda: "Last run" in verify_text(), 300, "verify")
        assert "OK" in d.find_element(By.CSS_SELECTOR, "[data-field=verify]").text
        assert d.find_elements(By.CSS_SELECTOR, "#suspensions-title") or "No suspension" in (
            d.page_source
        )
        shot(d, "6-operations")

        # A phone: the account page fits the width (tables scroll inside their own box).
        d.set_window_size(390, 844)
        try:
            phone_pages = {
                "7-account-phone": f"{base}/accounts/{account}",
                "8-bill-phone": f"{base}/accounts/{account}/bill?month={MONTH}",
            }
            for name, url in phone_pages.items():
                d.get(url)
                width = d.execute_script("return document.documentElement.scrollWidth")
                viewport = d.execute_script("return window.innerWidth")
                assert width <= viewport, f"{name}: {width}px wide in a {viewport}px window"
                shot(d, name)
        finally:
            d.set_window_size(1280, 1000)
    print(f"console screenshots and the printed bill: {SHOTS}")
