"""The whole billing fold in memory: a fast rule harness (no Kafka, no PostgreSQL).

It runs the production code end to end: each event is validated and round-tripped through the
Avro codec, deduplicated by event_id like the journal writer, posted by `LedgerFold.post` onto
its account book (ticks expire grants with `ledger.book.expiry_events`, the function the
journal writer uses; a tick that closes a month journals the invoices with
`ledger.invoicing.invoice_events`, the writer's month close), numbered in one shard, and folded
by `projections.fold.fold_entries` into the account-status projection, which reads them.
Nothing here re-implements a rule; a rule test takes milliseconds.

    rules = Rules()
    rules.open("a", card=True)                  # given
    rules.use("a", dollars=60)                  # when
    assert rules.state("a").reasons == (...)    # then

`check()` asserts the ledger's invariants on everything done so far (the property tests call it
after every step).
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ledger.book import (
    REVENUE_ROUNDING,
    AccountBook,
    LedgerFold,
    Rejected,
    apply_recorded,
    canonical_json,
    content_hash,
    expiry_events,
    invoiced_account,
    receivable_account,
    rerate_event,
)
from ledger.codec import Codec
from ledger.config_versions import (
    PRICE_BOOK,
    ConfigVersion,
    ShardConfig,
    policy_version,
    price_versions,
)
from ledger.invoicing import INVOICE_ISSUED, invoice_events
from ledger.money import quantize
from ledger.policy import Policy
from ledger.rating import PriceBook
from projections.account_status import (
    AccountStatus,
    AccountStatusProjection,
    Effect,
    InvoiceIssued,
    JournalEntry,
    SpendLimitWarning,
    StatusChanged,
)
from projections.fold import fold_entries, output_event

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
R1 = "accounts/fireworks/models/deepseek-r1"  # $8 per 1M output tokens: 125,000 tokens = $1
UNPRICED = "accounts/acme/models/unpriced"
ZERO = Decimal(0)
_CODEC = Codec.default()
_PRICEBOOK = PriceBook.load()
_POLICY = Policy.load()


def price_version_with(
    model: str, price: str, version: str, effective_from: datetime
) -> ConfigVersion:
    """A new price-book version: the packaged 2026-01 one plus `model` at `price` per 1M
    input and output tokens."""
    content = json.loads(price_versions()[0].document)
    content["serverless"][model] = {"input": price, "output": price}
    content["version"] = version
    content["effective_from"] = effective_from.isoformat()
    return ConfigVersion.of(PRICE_BOOK, version, effective_from, content)


def close_of(month: str, grace_hours: int = 72) -> datetime:
    """The first moment month `month` (YYYY-MM) is due to close."""
    year, mon = map(int, month.split("-"))
    nxt = datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=UTC)
    return nxt + timedelta(hours=grace_hours)


class Rules:
    """One shard of the ledger, in memory: journal, account books, projection, effects."""

    def __init__(self, policy: Policy | None = None, pricebook: PriceBook | None = None):
        self.policy = policy or _POLICY
        self.fold = LedgerFold(pricebook or _PRICEBOOK, self.policy)
        self.configured = self.fold  # the files': used until versions are journaled
        self.config = ShardConfig()
        self.projection = AccountStatusProjection(self.policy)
        self.books: dict[str, AccountBook] = {}
        self.digests: dict[str, bytes] = {}
        self.journal: list[JournalEntry] = []
        self.rejects: list[tuple[str, str, str]] = []  # (event_type, event_id, reason)
        self.duplicates = 0
        self.states: dict[str, AccountStatus] = {}
        self.clock: datetime | None = None  # the projection's (its shard's last tick)
        self.ledger_clock: datetime | None = None  # the writer's: the last tick journaled
        self.details: dict[int, dict] = {}  # shard_seq → the entry's detail
        self.effects: list[Effect] = []
        self.now = T0
        self.seq = 0  # the shard's journal sequence
        self._n = 0

    # --- events ---------------------------------------------------------------------------

    def event(self, event_type: str, account_id: str, at: datetime | None = None, **fields):
        """A valid event of `event_type` (codec defaults filled in), dated `at` or a moment
        after the previous one."""
        if at is None:
            self.now += timedelta(seconds=1)
            at = self.now
        self._n += 1
        event = {
            "event_id": fields.pop("event_id", None) or str(uuid.UUID(int=self._n)),
            "account_id": account_id,
            "occurred_at": at,
            **fields,
        }
        return event_type, _CODEC.decode(_CODEC.encode(event_type, event)).event

    def send(self, event_type: str, account_id: str, at: datetime | None = None, **fields):
        """Journal one event (a batch of one) and project it; returns the effects."""
        return self.deliver(self.event(event_type, account_id, at, **fields))

    def deliver(self, *events: tuple[str, dict]) -> list[Effect]:
        """Journal events as ONE batch, the journal writer's way: deduplicated by event_id
        (a redelivery is a no-op, a different body a `duplicate_conflict` reject), applied in
        occurred_at order (stable), rejects quarantined; then project the new entries."""
        accepted = []
        for event_type, event in events:
            digest = content_hash(event_type, canonical_json(event))
            known = self.digests.get(event["event_id"])
            if known is not None:
                if known == digest:
                    self.duplicates += 1
                else:
                    self.rejects.append((event_type, event["event_id"], "duplicate_conflict"))
                continue
            self.digests[event["event_id"]] = digest
            accepted.append((event_type, event))
        accepted.sort(key=lambda te: te[1]["occurred_at"])
        new: list[JournalEntry] = []
        for event_type, event in accepted:
            if event_type == "PeriodTick":
                new.append(self._entry(event_type, event, "noop", ()))
                for account_id in sorted(self.books):
                    book = self.books[account_id]
                    when = book.next_expiry()
                    if when is None or when > event["tick_at"]:
                        continue
                    for derived, entry in expiry_events(self.fold, event, account_id, book):
                        new.append(self._entry("GrantExpired", derived, entry.status, entry))
                previous, self.ledger_clock = self.ledger_clock, event["tick_at"]
                if previous is not None and event["tick_at"] <= previous:
                    self.ledger_clock = previous  # the writer refuses a tick going back
                    continue
                for account_id in sorted(a for a, b in self.books.items() if b.pending):
                    book = self.books[account_id]
                    for derived, entry in invoice_events(
                        self.fold.policy, event, previous, account_id, book
                    ):
                        new.append(self._entry(INVOICE_ISSUED, derived, entry.status, entry))
                continue
            if event_type == "ConfigPublished":
                new += self._publish(event, new)
                continue
            account_id = event["account_id"]
            book = self.books.get(account_id) or AccountBook(account_id)
            try:
                entry = self.fold.post(book, event_type, event)
            except Rejected as exc:
                self.rejects.append((event_type, event["event_id"], exc.reason))
                continue
            self.books[account_id] = book  # saved only with a journaled entry
            new.append(self._entry(event_type, event, entry.status, entry))
        self.journal += new
        effects, self.clock = fold_entries(self.projection, self.states, new, self.clock)
        self.effects += effects
        return effects

    def _publish(self, event: dict, batch: list[JournalEntry]) -> list[JournalEntry]:
        """A ConfigPublished, as the journal writer handles it: the shard's fold changes; a
        price version re-rates the held usage it now prices (`ledger.book.rerate_event`)."""
        version = ConfigVersion.from_event(event)
        self.config.add(version)
        self.fold = self.config.fold(self.configured)
        out = [self._entry("ConfigPublished", event, "noop", None)]
        if version.kind != PRICE_BOOK:
            return out
        journal = self.journal + batch
        done = {e.payload["usage_event_id"] for e in journal if e.event_type == "UsageRerated"}
        for held in journal:
            if held.event_type != "UsageRecorded" or held.status != "unpriced":
                continue
            if held.payload["event_id"] in done:
                continue
            book = self.books[held.account_id]
            derived = rerate_event(self.fold, event["event_id"], held.payload, book)
            if derived is not None:
                rerated, entry = derived
                out.append(self._entry("UsageRerated", rerated, entry.status, entry))
        return out

    def publish(self, v: ConfigVersion, at=None):
        """Publish a price-book or policy version (`ledger config publish`): journaled on the
        shard as the ledger writer journals it."""
        if at is None:
            self.now += timedelta(seconds=1)
            at = self.now
        event = _CODEC.decode(_CODEC.encode("ConfigPublished", v.event(0, at))).event
        return self.deliver(("ConfigPublished", event))

    def publish_configured(self):
        """What the worker does at start: publish the packaged price book and policy."""
        effects = []
        for v in [*price_versions(), policy_version()]:
            effects += self.publish(v)
        return effects

    def _entry(self, event_type: str, event: dict, status: str, entry: Any) -> JournalEntry:
        postings = tuple(
            (p.ledger_account, quantize(p.amount)) for p in getattr(entry, "postings", ())
        )
        self.seq += 1
        self.details[self.seq] = json.loads(canonical_json(getattr(entry, "detail", {})))
        return JournalEntry(
            0,
            self.seq,
            event.get("account_id", ""),
            event_type,
            status,
            event["occurred_at"],
            json.loads(canonical_json(event)),  # the payload as the journal stores it
            postings,
        )

    # --- the vocabulary of rule tests ------------------------------------------------------

    def open(self, account_id: str, *, card: bool = False, limit: str | None = None, at=None):
        effects = self.send("AccountOpened", account_id, at, created_at=at or self.now)
        if card:
            effects += self.card(account_id)
        if limit is not None:
            effects += self.send("SpendLimitOverridden", account_id, monthly_limit=Decimal(limit))
        return effects

    def card(self, account_id: str, pm: str = "pm", at=None):
        return self.send("PaymentMethodAdded", account_id, at, payment_method_id=pm)

    def use(self, account_id: str, dollars: Any = 1, at=None, model: str = R1, **fields):
        """Usage worth `dollars` (deepseek-r1 output tokens at $8 per 1M)."""
        tokens = int(Decimal(str(dollars)) * 125_000)
        return self.send(
            "UsageRecorded",
            account_id,
            at,
            request_id=fields.pop("request_id", f"req-{self._n}"),
            product="serverless",
            model=model,
            service_tier="standard",
            output_tokens=tokens,
            **fields,
        )

    def buy(self, account_id: str, amount: Any, grant_id: str = "buy", at=None, **fields):
        return self.send(
            "CreditPurchased",
            account_id,
            at,
            grant_id=grant_id,
            amount=Decimal(str(amount)),
            **fields,
        )

    def grant(self, account_id: str, amount: Any, grant_id: str = "promo", at=None, **fields):
        return self.send(
            "CreditGranted",
            account_id,
            at,
            grant_id=grant_id,
            amount=Decimal(str(amount)),
            **fields,
        )

    def revoke(self, account_id: str, grant_id: str, at=None):
        return self.send("CreditRevoked", account_id, at, grant_id=grant_id)

    def pay(self, account_id: str, amount: Any, invoice_id: str = "inv", at=None):
        return self.send(
            "InvoicePaid", account_id, at, invoice_id=invoice_id, amount=Decimal(str(amount))
        )

    def fail_payment(self, account_id: str, at=None):
        return self.send("PaymentFailed", account_id, at)

    def tick(self, at: datetime):
        """A PeriodTick at `at` (the scheduler's; `now` moves there if it is later)."""
        self.now = max(self.now, at)
        return self.send("PeriodTick", "", at, tick_at=at)

    def close(self, month: str):
        """The tick that closes `month`."""
        return self.tick(close_of(month, self.policy.grace_hours))

    # --- reading ----------------------------------------------------------------------------

    def state(self, account_id: str) -> AccountStatus:
        return self.states[account_id]

    def book(self, account_id: str) -> AccountBook:
        return self.books[account_id]

    def invoices(self, account_id: str | None = None) -> list[dict]:
        return [
            e.invoice
            for e in self.effects
            if isinstance(e, InvoiceIssued) and account_id in (None, e.account_id)
        ]

    def changes(self, account_id: str) -> list[StatusChanged]:
        return [
            e for e in self.effects if isinstance(e, StatusChanged) and e.account_id == account_id
        ]

    def warnings(self, account_id: str) -> list[SpendLimitWarning]:
        return [
            e
            for e in self.effects
            if isinstance(e, SpendLimitWarning) and e.account_id == account_id
        ]

    def outputs(self, account_id: str) -> list[tuple[str, dict]]:
        """The status events published for the account, in order."""
        return [output_event(e) for e in self.effects if e.account_id == account_id]

    def balances(self) -> dict[str, Decimal]:
        totals: dict[str, Decimal] = defaultdict(lambda: ZERO)
        for entry in self.journal:
            for account, amount in entry.postings:
                totals[account] += amount
        return dict(totals)

    def recorded_book(self, account_id: str) -> AccountBook:
        """The account's book folded from its journal entries as recorded."""
        book = AccountBook(account_id)
        for entry in self.journal:
            if entry.account_id == account_id:
                detail = self.details[entry.shard_seq]
                apply_recorded(
                    book, entry.event_type, entry.payload, detail, list(entry.postings), self.policy
                )
        return book

    def refold(self) -> tuple[dict[str, AccountStatus], list[Effect]]:
        """The projection folded from scratch over the whole journal (a rebuild, a replay)."""
        states: dict[str, AccountStatus] = {}
        projection = AccountStatusProjection(self.policy)  # nothing journaled known yet
        effects, _ = fold_entries(projection, states, self.journal, None)
        return states, effects

    # --- the invariants ------------------------------------------------------------------------

    def check(self) -> None:
        """Every invariant of the ledger, on everything done so far."""
        balances = self.balances()
        # Trial balance: every entry balances, so all postings sum to zero.
        assert sum(balances.values(), ZERO) == 0, balances
        for entry in self.journal:
            assert sum((a for _, a in entry.postings), ZERO) == 0, entry

        invoices = self.invoices()
        ids = [i["invoice_id"] for i in invoices]
        assert len(ids) == len(set(ids)), f"an invoice id was issued twice: {ids}"
        by_account: dict[str, list[Effect]] = defaultdict(list)
        for effect in self.effects:
            by_account[effect.account_id].append(effect)
        event_ids = [output_event(e)[1]["event_id"] for e in self.effects]
        assert len(event_ids) == len(set(event_ids)), "two output events share an event_id"

        for account_id, effects in by_account.items():
            version = 0
            for effect in effects:
                if isinstance(effect, StatusChanged):
                    assert effect.status_version > version, (account_id, effects)
                    version = effect.status_version
                else:
                    # Warnings and invoices carry the version of the status they follow.
                    assert effect.status_version == version, (account_id, effect, version)

        rounding = sum(
            (Decimal(i["exact_total"]) - Decimal(i["amount_due"]) for i in invoices), ZERO
        )
        assert balances.get(REVENUE_ROUNDING, ZERO) == rounding, "revenue:rounding != invoices"
        paid_invoices: dict[str, Decimal] = defaultdict(lambda: ZERO)
        for entry in self.journal:
            paid_invoices[entry.account_id] += Decimal(
                self.details[entry.shard_seq].get("applied_to_invoiced", "0")
            )
        for account_id, book in self.books.items():
            state = self.states[account_id]
            receivable = balances.get(receivable_account(account_id), ZERO)
            invoiced = balances.get(invoiced_account(account_id), ZERO)
            # The projection's reading of the postings equals the ledger writer's book.
            assert book.receivable == receivable and book.invoiced == invoiced, account_id
            assert state.receivable == receivable + invoiced, account_id
            assert state.invoiced_outstanding == invoiced, account_id
            assert {g: v for g, v in state.grants.items() if v} == {
                g.grant_id: g.remaining for g in book.grants.values() if g.remaining
            }, account_id
            assert all(g.remaining >= 0 for g in book.grants.values()), account_id
            # The journal's accounts: the invoiced receivable is exactly what issued invoices
            # still owe; the receivable exactly what waits for an invoice.
            unpaid = sum(
                (Decimal(i["amount_due"]) for i in invoices if i["account_id"] == account_id),
                ZERO,
            )
            assert invoiced == unpaid - paid_invoices[account_id], (account_id, invoiced)
            waiting = sum((v for kinds in book.pending.values() for v in kinds.values()), ZERO)
            assert receivable == waiting - book.prepaid, (account_id, receivable, book)
            assert receivable >= 0 and invoiced >= 0 and book.prepaid >= 0, book
            assert all(v > 0 for kinds in book.pending.values() for v in kinds.values()), book
            # The book folded from the journal as recorded (what `ledger verify` does).
            recorded = self.recorded_book(account_id)
            for field in ("receivable", "invoiced", "pending", "prepaid", "last_invoice"):
                assert getattr(recorded, field) == getattr(book, field), (account_id, field)

        states, effects = self.refold()
        assert {a: s.to_json() for a, s in states.items()} == {
            a: s.to_json() for a, s in self.states.items()
        }, "a fold from scratch differs from the live state"
        assert effects == self.effects, "a fold from scratch publishes something else"
