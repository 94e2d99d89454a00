"""The demo's downstream consumer of the status topic: it prints every output event as it
arrives and counts what it saw, for the summary."""

from __future__ import annotations

import threading
from collections import Counter

import structlog
from rich.console import Console

from ledger import topics
from ledger.codec import Codec
from ledger.kafka_auth import client_options
from ledger.settings import Settings

log = structlog.get_logger(__name__)


class StatusReader(threading.Thread):
    """The downstream consumer: reads the status topic from the start (no group) and prints
    one line per output event (suspended, reinstated, spend-limit warning, invoice issued);
    the relay may send an event twice, so events are counted once by event_id."""

    def __init__(self, settings: Settings, bootstrap: str, console: Console):
        super().__init__(name="status-reader", daemon=True)
        self.settings = settings
        self.bootstrap = bootstrap
        self.console = console
        self.codec = Codec.default()
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.seen: set[str] = set()  # event ids
        self.by_type: Counter[str] = Counter()
        self.versions: dict[str, int] = {}
        self.suspended_accounts: set[str] = set()
        self.reinstated_accounts: set[str] = set()
        self.reasons_ever: dict[str, set[str]] = {}  # reason → accounts suspended for it
        self.warnings: Counter[int] = Counter()  # threshold percent → warnings
        self.invoices: dict[str, str] = {}  # invoice id → month
        self.error: BaseException | None = None

    @property
    def unique(self) -> int:
        return len(self.seen)

    @property
    def status_events(self) -> int:
        return self.by_type["AccountSuspended"] + self.by_type["AccountReinstated"]

    def run(self) -> None:
        from kafka import KafkaConsumer

        try:
            consumer = KafkaConsumer(
                self.settings.topic(topics.STATUS),
                bootstrap_servers=self.bootstrap,
                enable_incremental_fetch_sessions=False,
                group_id=None,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                client_id="ledger-demo-status-reader",
                **client_options(self.settings),
            )
        except Exception as exc:
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        try:
            while not self.stop.is_set():
                for records in consumer.poll(timeout_ms=200).values():
                    for record in records:
                        self._show(record.value)
        except Exception as exc:
            self.error = exc
            log.exception("demo.status_reader_failed")
        finally:
            consumer.close()

    def _show(self, value: bytes) -> None:
        decoded = self.codec.decode(value)
        event, event_type = decoded.event, decoded.event_type
        if event["event_id"] in self.seen:
            return  # a relay re-send: same event_id, already handled
        self.seen.add(event["event_id"])
        self.by_type[event_type] += 1
        account, version = event["account_id"], event["status_version"]
        when = event.get("effective_at", event["occurred_at"]).strftime("%m-%d %H:%M")
        head = f"[dim]{when}[/]  {account}  "
        if event_type == "AccountSuspended":
            self.versions[account] = max(version, self.versions.get(account, 0))
            self.suspended_accounts.add(account)
            for reason in event["reasons"]:
                self.reasons_ever.setdefault(reason, set()).add(account)
            reasons = ", ".join(event["reasons"])
            line = f"{head}[bold red]suspended [/]  v{version:<2} {reasons}"
        elif event_type == "AccountReinstated":
            self.versions[account] = max(version, self.versions.get(account, 0))
            self.reinstated_accounts.add(account)
            line = f"{head}[bold green]reinstated[/]  v{version:<2}"
        elif event_type == "SpendLimitWarning":
            self.warnings[event["threshold_percent"]] += 1
            line = (
                f"{head}[yellow]limit {event['threshold_percent']:>3} %[/] "
                f"${event['month_to_date_spend']:,.2f} of ${event['effective_limit']:,.0f} "
                f"in {event['month']}"
            )
        elif event_type == "InvoiceIssued":
            self.invoices[event["invoice_id"]] = event["month"]
            line = (
                f"{head}[cyan]invoice   [/]  {event['invoice_id']}  "
                f"{event['currency']} {event['amount_due']:,.2f}"
            )
        else:
            line = f"{head}{event_type}  v{version}"
        self.console.print(line, highlight=False, soft_wrap=True)
