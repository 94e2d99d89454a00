-- A journal entry's payload and rating detail are stored as json, the canonical text the
-- writer made (and hashed), not as jsonb. Nothing indexes or searches inside them; they are
-- read whole (verify, audit, projections, the console) or by a key (`->>`, which json has
-- too). jsonb parsed every entry's ~830 bytes of JSON into its binary form on the way in and
-- printed it back on the way out. Measured on 70,614 usage entries of a demo journal: COPY
-- of both columns 10.5 µs per row as jsonb against 5.1 as json (medians of five, alternating),
-- reading them back 23-25 µs against 20, and 1,107 bytes of table per row against 916. The
-- hash chain is unchanged: it covers the canonical JSON of the value, which verify computes
-- again from the value it reads back, whichever text an entry holds (entries written before
-- this migration hold jsonb's output of it).
-- The rewrite takes the journal's ACCESS EXCLUSIVE lock for as long as it copies the table:
-- run it with the workers stopped (README, Operations).
ALTER TABLE journal_entries
    ALTER COLUMN payload TYPE json USING payload::json,
    ALTER COLUMN detail DROP DEFAULT,
    ALTER COLUMN detail TYPE json USING detail::json,
    ALTER COLUMN detail SET DEFAULT '{}'::json;
