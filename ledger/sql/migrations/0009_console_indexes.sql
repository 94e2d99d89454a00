-- The web console's reading paths (`ledger console`): the accounts list is sorted by
-- month-to-date spend, headroom (effective limit − spend; no limit sorts as the most headroom)
-- or receivable and paged by keyset (sort key, account_id), searched by an account id prefix;
-- the rejects are listed per reason in id order. Indexes only: nothing is written differently.
CREATE INDEX account_status_spend ON account_status (month_to_date_spend, account_id);
CREATE INDEX account_status_headroom
    ON account_status ((coalesce(effective_limit, 'Infinity'::numeric) - month_to_date_spend),
                       account_id);
CREATE INDEX account_status_receivable ON account_status (receivable, account_id);
CREATE INDEX account_status_id_prefix ON account_status (account_id text_pattern_ops);
CREATE INDEX rejected_events_reason ON rejected_events (reason, id);
-- The suspensions chart reads the AccountSuspended status events still in the outbox.
CREATE INDEX outbox_suspensions ON outbox (created_at)
    WHERE headers @> '[["event_type", "4163636f756e7453757370656e646564"]]'::jsonb;
