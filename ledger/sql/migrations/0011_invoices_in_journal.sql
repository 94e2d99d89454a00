-- The month close is journaled by the ledger writer (InvoiceIssued entries). The accounts a
-- closing PeriodTick must visit are those with charges waiting for an invoice: the earliest
-- month they are for, kept with the book and indexed, so the close never scans every account.
ALTER TABLE account_books ADD COLUMN first_pending_month text;
CREATE INDEX account_books_billing ON account_books (shard, first_pending_month)
    WHERE first_pending_month IS NOT NULL;
