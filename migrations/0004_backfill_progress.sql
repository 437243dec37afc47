-- Backfill progress, so a backfill survives a crash and the CLI and console can show it.
--
-- One row per (bucket, criteria hash) being materialized. Each page of a backfill advances
-- `cursor` (the last user id done, in `contacts` key order) and `users_done` in the same
-- transaction as that page's membership changes: a restarted engine resumes after `cursor`,
-- and a page that rolled back is simply done again. Starting a backfill of one version deletes
-- the rows of every other version of that bucket, so a reverted edit never resumes a cursor
-- whose earlier users were since evaluated with other criteria.
CREATE TABLE backfill_progress (
    bucket_id       text NOT NULL,
    criteria_hash   text NOT NULL,
    cursor          text NOT NULL DEFAULT '',
    users_done      bigint NOT NULL DEFAULT 0,
    -- Known users when the backfill started (users arriving later may push done past it).
    total_estimate  bigint NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    PRIMARY KEY (bucket_id, criteria_hash)
);
