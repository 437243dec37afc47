-- One evaluation-queue row per ingest transaction instead of per user: a row holds every
-- user the transaction changed, as `entries` = [{"u": user id, "e": [event names],
-- "p": [property keys]}, ...], and `users` = their number. Writing, locking and deleting one row
-- per user wrote a fifth of the WAL under `membrane bench ingest`.
ALTER TABLE eval_queue
    ADD COLUMN entries jsonb,
    ADD COLUMN users integer;
UPDATE eval_queue
SET entries = jsonb_build_array(jsonb_build_object(
        'u', user_id, 'e', to_jsonb(event_names), 'p', to_jsonb(prop_keys))),
    users = 1;
ALTER TABLE eval_queue
    DROP COLUMN user_id,
    DROP COLUMN event_names,
    DROP COLUMN prop_keys,
    ALTER COLUMN entries SET NOT NULL,
    ALTER COLUMN users SET NOT NULL,
    ADD CONSTRAINT eval_queue_users_counted CHECK (users = jsonb_array_length(entries) AND users > 0);
-- Fewer, larger rows churn: vacuum after fewer dead ones.
ALTER TABLE eval_queue SET (autovacuum_vacuum_threshold = 1000, autovacuum_analyze_threshold = 1000);

-- The oldest queue rows no other round holds, locked one by one until they hold `max_users`
-- users (at least one row): a plain `LIMIT` counts rows, not users, and locking rows a round
-- will not take would hold them from other rounds until it commits. An explicit cursor
-- fetches (and so locks) exactly one row at a time. `ROWS 10` is what a round takes: with the
-- default guess of 1000 the planner costed a claim high enough to compile it (JIT, 240 ms).
CREATE FUNCTION claim_queue_rows(max_users integer)
RETURNS TABLE (tid tid, entries jsonb, enqueued_at timestamptz)
LANGUAGE plpgsql ROWS 10 AS $$
DECLARE
    oldest CURSOR FOR
        SELECT q.ctid, q.entries, q.users, q.enqueued_at FROM eval_queue q
        ORDER BY q.id FOR UPDATE SKIP LOCKED;
    claimed integer := 0;
    row_users integer;
BEGIN
    OPEN oldest;
    LOOP
        FETCH oldest INTO tid, entries, row_users, enqueued_at;
        EXIT WHEN NOT FOUND;
        RETURN NEXT;
        claimed := claimed + row_users;
        EXIT WHEN claimed >= max_users;
    END LOOP;
    CLOSE oldest;
END
$$;
