-- Identifiers compare byte by byte (collation "C"). Under a database's linguistic collation
-- (C.UTF-8, en_US.UTF-8, ...) every index comparison of a user id, bucket id or transition key
-- went through strcoll: a fifth of Postgres's CPU in `membrane bench ingest`. Bytewise order is
-- also the order the engine sorts ids in (Rust's string order), so the lock order it chooses and
-- the `ORDER BY user_id` Postgres follows are one order, and cursors (`user_id > $1`) page the
-- same way on every server whatever its locale.
ALTER TABLE contacts ALTER COLUMN user_id TYPE text COLLATE "C";
ALTER TABLE events
    ALTER COLUMN user_id TYPE text COLLATE "C",
    ALTER COLUMN name TYPE text COLLATE "C";
ALTER TABLE ingested_messages ALTER COLUMN message_id TYPE text COLLATE "C";
ALTER TABLE eval_queue ALTER COLUMN user_id TYPE text COLLATE "C";
ALTER TABLE buckets
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN criteria_hash TYPE text COLLATE "C",
    ALTER COLUMN backfilled_hash TYPE text COLLATE "C";
ALTER TABLE memberships
    ALTER COLUMN bucket_id TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C";
ALTER TABLE transitions
    ALTER COLUMN key TYPE text COLLATE "C",
    ALTER COLUMN bucket_id TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C";
ALTER TABLE timers
    ALTER COLUMN bucket_id TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C";
ALTER TABLE backfill_progress
    ALTER COLUMN bucket_id TYPE text COLLATE "C",
    ALTER COLUMN criteria_hash TYPE text COLLATE "C",
    ALTER COLUMN cursor TYPE text COLLATE "C";
ALTER TABLE sweep_runs ALTER COLUMN bucket_id TYPE text COLLATE "C";
ALTER TABLE engine_heartbeats ALTER COLUMN engine_id TYPE text COLLATE "C";
