-- membrane schema v1. Postgres is the single source of truth and the coordination point:
-- every table here may be written by any number of engine processes at once.

-- Known users and their merged properties. Ingest upserts a row for every user it sees, so
-- "all known users" is exactly this table.
CREATE TABLE contacts (
    user_id     text PRIMARY KEY,
    properties  jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE events (
    id           bigserial PRIMARY KEY,
    user_id      text NOT NULL,
    name         text NOT NULL,
    occurred_at  timestamptz NOT NULL,
    properties   jsonb NOT NULL DEFAULT '{}'::jsonb,
    received_at  timestamptz NOT NULL DEFAULT now()
);
-- Fact gathering counts one user's events of one name since an instant: this index answers it
-- with a range scan and no heap visit beyond the matching rows.
CREATE INDEX events_user_name_time ON events (user_id, name, occurred_at);

-- Segment messageId idempotency: a message whose id is here was applied already.
CREATE TABLE ingested_messages (
    message_id   text PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now()
);

-- Users with unprocessed changes. Evaluators claim rows with FOR UPDATE SKIP LOCKED and delete
-- them in the same transaction that writes the membership changes they caused.
CREATE TABLE eval_queue (
    id           bigserial PRIMARY KEY,
    user_id      text NOT NULL,
    event_names  text[] NOT NULL DEFAULT '{}',
    prop_keys    text[] NOT NULL DEFAULT '{}',
    enqueued_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Per-bucket state shared by every engine and read by the console.
CREATE TABLE buckets (
    id              text PRIMARY KEY,
    source_path     text NOT NULL,
    description     text NOT NULL DEFAULT '',
    definition      text NOT NULL,
    criteria_hash   text NOT NULL,
    time_based      boolean NOT NULL DEFAULT false,
    enabled         boolean NOT NULL DEFAULT true,
    -- 'ok' | 'error' (the last edit failed; the previous version keeps serving) | 'removed'
    status          text NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'error', 'removed')),
    last_error      text,
    last_error_at   timestamptz,
    -- criteria hash whose current members have been materialized (backfill done)
    backfilled_hash text,
    member_count    bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per (bucket, user, epoch). epoch = 1 + number of earlier rows of that pair.
CREATE TABLE memberships (
    bucket_id   text NOT NULL,
    user_id     text NOT NULL,
    epoch       integer NOT NULL CHECK (epoch >= 1),
    status      text NOT NULL CHECK (status IN ('active', 'left')),
    entered_at  timestamptz NOT NULL,
    left_at     timestamptz,
    PRIMARY KEY (bucket_id, user_id, epoch)
);
-- At most one active row per (bucket, user); also the index for has(), the member pages of a
-- sweep (ordered by user_id) and the active lookups of an evaluation batch.
CREATE UNIQUE INDEX memberships_one_active ON memberships (bucket_id, user_id) WHERE status = 'active';

-- The transactional outbox: every transition, written in the membership change's transaction.
CREATE TABLE transitions (
    id           bigserial PRIMARY KEY,
    key          text NOT NULL,
    bucket_id    text NOT NULL,
    user_id      text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('entered', 'left', 'dwell')),
    epoch        integer NOT NULL,
    label        text,
    source       text NOT NULL CHECK (source IN ('event', 'timer', 'sweep', 'backfill', 'operator')),
    reason       text NOT NULL,
    occurred_at  timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Exactly once: a retried or racing writer hits this and writes nothing.
CREATE UNIQUE INDEX transitions_key ON transitions (key);
-- The console's per-bucket "recent transitions".
CREATE INDEX transitions_bucket_id ON transitions (bucket_id, id);

-- Completed sweeps, for the console's sweep history and engine health.
CREATE TABLE sweep_runs (
    id           bigserial PRIMARY KEY,
    bucket_id    text NOT NULL,
    engine_id    text NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    checked      bigint NOT NULL,
    joined       bigint NOT NULL,
    left_count   bigint NOT NULL
);
CREATE INDEX sweep_runs_bucket ON sweep_runs (bucket_id, id);

-- Liveness and counters of each engine process.
CREATE TABLE engine_heartbeats (
    engine_id     text PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    started_at    timestamptz NOT NULL,
    last_seen_at  timestamptz NOT NULL,
    stats         jsonb NOT NULL DEFAULT '{}'::jsonb
);
