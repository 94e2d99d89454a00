-- Rejected events can be fed again once fixed (`ledger rejects replay`): keep the record key
-- (for the dead-letter copy and the partitioning), and record how each was resolved.
ALTER TABLE rejected_events ADD COLUMN message_key bytea;
ALTER TABLE rejected_events ADD COLUMN resolved_at timestamptz;
ALTER TABLE rejected_events ADD COLUMN resolution text;
CREATE INDEX rejected_events_open ON rejected_events (id) WHERE resolved_at IS NULL;
