-- A lease whose holder's database session is gone may be taken at once, not only when it
-- expires: a holder that crashed (killed, its host lost) leaves its shards idle for the whole
-- lease timeout otherwise, and a second crash of the worker that took them over doubles that.
-- The holder renews through one long-lived session; the lease records that session's backend
-- pid and when it was renewed. A standby may take the lease when that backend is no longer in
-- pg_stat_activity, provided the renewal happened since the server last started (after a
-- server restart every session is gone, and the holders renew their own leases as they
-- reconnect: those leases wait for their expiry as before, so a restart does not hand every
-- shard to whichever worker reconnects first). A reused pid only makes a standby wait for the
-- expiry. Correctness never rests on leases (each batch locks its stored offsets).
ALTER TABLE shard_leases ADD COLUMN holder_pid integer;
ALTER TABLE shard_leases ADD COLUMN renewed_at timestamptz;
