-- Billing periods: grant expiry and month close driven by PeriodTick events, spend limits,
-- and issued invoices.

-- Entries derived from another event (a grant expiring at a PeriodTick) name that event as
-- their cause; their own event_id is derived from it, so it has no raw_events row.
ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_event_id_fkey;
ALTER TABLE journal_entries ADD COLUMN cause_event_id text REFERENCES raw_events (event_id);

-- The ledger writer finds the books with grants due to expire in a shard at each tick.
ALTER TABLE account_books ADD COLUMN shard integer;
ALTER TABLE account_books ADD COLUMN next_expiry timestamptz;
UPDATE account_books b SET shard = (SELECT e.shard FROM journal_entries e
                                     WHERE e.account_id = b.account_id LIMIT 1);
CREATE INDEX account_books_expiry ON account_books (shard, next_expiry)
    WHERE next_expiry IS NOT NULL;

-- Spend-limit figures for queries, and the accounts a PeriodTick must revisit (limit
-- suspensions to lift at the month turn, amounts waiting for the month close).
ALTER TABLE account_status ADD COLUMN shard integer;
ALTER TABLE account_status ADD COLUMN tier text NOT NULL DEFAULT '1';
ALTER TABLE account_status ADD COLUMN effective_limit numeric(38, 9);
ALTER TABLE account_status ADD COLUMN month text;
ALTER TABLE account_status ADD COLUMN month_to_date_spend numeric(38, 9) NOT NULL DEFAULT 0;
ALTER TABLE account_status ADD COLUMN tick_sensitive boolean NOT NULL DEFAULT false;
CREATE INDEX account_status_tick ON account_status (shard) WHERE tick_sensitive;

-- The time of the last PeriodTick a projection applied in each shard: its billing clock.
ALTER TABLE projection_positions ADD COLUMN last_tick_at timestamptz;

-- Issued invoices never change: corrections go on the next invoice as adjustment lines.
CREATE TABLE invoices (
    invoice_id     text           PRIMARY KEY,
    account_id     text           NOT NULL,
    month          text           NOT NULL,
    issued_at      timestamptz    NOT NULL,
    currency       text           NOT NULL DEFAULT 'USD',
    exact_total    numeric(38, 9) NOT NULL,
    amount_due     numeric(38, 2) NOT NULL CHECK (amount_due > 0),
    lines          jsonb          NOT NULL,
    UNIQUE (account_id, month)
);
CREATE INDEX invoices_month ON invoices (month);
CREATE TRIGGER invoices_append_only BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER invoices_no_truncate BEFORE TRUNCATE ON invoices
    FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change();
