//! Reads and operator writes of the terminal console.
//!
//! The console attaches to any database an engine writes to, so it reads only what engines
//! persist. Every read here costs O(buckets + rows shown), never O(members): member counts come
//! from `buckets.member_count`, which the engine maintains in the membership change's
//! transaction, and recent transitions are found through the `transitions` id indexes.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, Row};

pub use crate::buckets::{BackfillProgress, SweepRun};
pub use crate::reads::TransitionRow;
use crate::{Result, Store};

/// Everything the console's overview shows, read at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleSnapshot {
    /// The database server's clock when the snapshot was read. Ages shown by the console are
    /// relative to it, so a console on a machine with a skewed clock still shows true ages.
    pub taken_at: DateTime<Utc>,
    pub database: DatabaseInfo,
    pub buckets: Vec<BucketSummary>,
    /// The newest transitions of all buckets, newest first.
    pub transitions: Vec<TransitionRow>,
    pub engines: Vec<EngineHeartbeat>,
    pub queue: QueueStats,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatabaseInfo {
    pub name: String,
    /// `host:port` of the server, or `local socket` over a Unix socket.
    pub server: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BucketSummary {
    pub id: String,
    pub description: String,
    pub enabled: bool,
    /// `ok`, `error` (the last edit failed; the previous version keeps serving) or `removed`.
    pub status: String,
    /// A multi-line, rustc-style diagnostic when `status` is `error`.
    pub last_error: Option<String>,
    pub time_based: bool,
    pub member_count: i64,
    /// `entered` transitions created in the last minute.
    pub entered_1m: i64,
    /// `left` transitions created in the last minute.
    pub left_1m: i64,
    pub updated_at: DateTime<Utc>,
    pub last_sweep: Option<SweepRun>,
    /// The members of the version serving now are materialized.
    pub backfilled: bool,
    /// The progress of that version's backfill, once one started (kept when it finished).
    pub backfill: Option<BackfillProgress>,
}

#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct EngineHeartbeat {
    #[sqlx(rename = "engine_id")]
    pub id: String,
    #[sqlx(rename = "hostname")]
    pub host: String,
    pub pid: i32,
    pub started_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// Counters the engine publishes (workers, timers due, ...); free-form.
    pub stats: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueStats {
    /// Users waiting for evaluation, summed over at most [`QUEUE_DEPTH_CAP`] queue rows.
    pub depth: i64,
    /// Whether more than [`QUEUE_DEPTH_CAP`] users wait (then `depth` is the cap).
    pub depth_capped: bool,
    /// When the oldest waiting change was enqueued: the evaluation lag is `taken_at` minus this.
    pub oldest_enqueued_at: Option<DateTime<Utc>>,
}

/// One bucket in depth, for the console's detail view.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketDetail {
    pub id: String,
    pub source_path: String,
    /// The bucket file's definition as the engine loaded it (criteria text or plugin reference).
    pub definition: String,
    pub criteria_hash: String,
    /// The criteria hash whose members have been materialized; differs while a backfill runs.
    pub backfilled_hash: Option<String>,
    /// The first page of active members, ordered by user id.
    pub members: Vec<MemberRow>,
    /// The bucket's newest transitions, newest first.
    pub transitions: Vec<TransitionRow>,
    /// The bucket's newest sweeps, newest first.
    pub sweeps: Vec<SweepRun>,
}

#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct MemberRow {
    pub user_id: String,
    pub epoch: i32,
    pub entered_at: DateTime<Utc>,
}

pub use crate::reads::QUEUE_DEPTH_CAP;

/// Reads the overview: every bucket, the `feed_limit` newest transitions, engines and the queue.
pub async fn snapshot(store: &Store, feed_limit: i64) -> Result<ConsoleSnapshot> {
    let pool = store.pool();
    let (taken_at, name, server): (DateTime<Utc>, String, String) = sqlx::query_as(
        "SELECT now(), current_database(),
                coalesce(host(inet_server_addr()) || ':' || inet_server_port(), 'local socket')",
    )
    .fetch_one(pool)
    .await?;

    let first_recent_transition: Option<i64> = sqlx::query_scalar(FIRST_TRANSITION_OF_LAST_MINUTE)
        .fetch_one(pool)
        .await?;
    let buckets = sqlx::query(BUCKETS_WITH_RATES_AND_LAST_SWEEP)
        .bind(first_recent_transition)
        .fetch_all(pool)
        .await?
        .iter()
        .map(bucket_summary_from_row)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;

    let transitions = sqlx::query_as::<_, TransitionRow>(
        "SELECT id, key, bucket_id, user_id, kind, epoch, label, source, reason, occurred_at
         FROM transitions ORDER BY id DESC LIMIT $1",
    )
    .bind(feed_limit)
    .fetch_all(pool)
    .await?;

    let engines = sqlx::query_as::<_, EngineHeartbeat>(
        "SELECT engine_id, hostname, pid, started_at, last_seen_at, stats
         FROM engine_heartbeats ORDER BY engine_id",
    )
    .fetch_all(pool)
    .await?;

    // Users waiting, counted over at most the cap's number of queue rows (each holds one or
    // more users), and the oldest of those rows' changes.
    let (depth, oldest_enqueued_at): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT coalesce(sum(users), 0)::int8, min(enqueued_at)
         FROM (SELECT users, enqueued_at FROM eval_queue ORDER BY id LIMIT $1) AS capped",
    )
    .bind(QUEUE_DEPTH_CAP + 1)
    .fetch_one(pool)
    .await?;

    Ok(ConsoleSnapshot {
        taken_at,
        database: DatabaseInfo { name, server },
        buckets,
        transitions,
        engines,
        queue: QueueStats {
            depth: depth.min(QUEUE_DEPTH_CAP),
            depth_capped: depth > QUEUE_DEPTH_CAP,
            oldest_enqueued_at,
        },
    })
}

/// The id of the first transition created in the last minute, if any.
///
/// `transitions` has no index on `created_at`, and scanning it would grow with history. Ids are
/// assigned in creation order, so a binary search over the primary key (about 40 index probes)
/// finds the boundary, and the rate query then reads only the last minute's rows.
const FIRST_TRANSITION_OF_LAST_MINUTE: &str = "
WITH RECURSIVE
cutoff AS (SELECT now() - interval '1 minute' AS at),
search (lo, hi) AS (
    SELECT min(id), max(id) + 1 FROM transitions
  UNION ALL
    SELECT CASE WHEN probe.recent THEN search.lo ELSE probe.id + 1 END,
           CASE WHEN probe.recent THEN (search.lo + search.hi) / 2 ELSE search.hi END
    FROM search
    CROSS JOIN LATERAL (
        SELECT t.id, t.created_at > (SELECT at FROM cutoff) AS recent
        FROM transitions t
        WHERE t.id >= (search.lo + search.hi) / 2
        ORDER BY t.id
        LIMIT 1
    ) AS probe
    WHERE search.lo < search.hi
)
SELECT max(lo) FROM search";

/// Buckets with their last-minute entered/left counts (from transition id `$1` on), their
/// latest sweep and the backfill of the version serving now.
const BUCKETS_WITH_RATES_AND_LAST_SWEEP: &str = "
WITH recent AS (
    SELECT bucket_id,
           count(*) FILTER (WHERE kind = 'entered') AS entered_1m,
           count(*) FILTER (WHERE kind = 'left') AS left_1m
    FROM transitions
    WHERE id >= $1 AND created_at > now() - interval '1 minute'
    GROUP BY bucket_id
)
SELECT b.id, b.description, b.enabled, b.status, b.last_error, b.time_based, b.member_count,
       b.updated_at,
       coalesce(recent.entered_1m, 0) AS entered_1m,
       coalesce(recent.left_1m, 0) AS left_1m,
       sweep.id AS sweep_id, sweep.engine_id AS sweep_engine_id,
       sweep.started_at AS sweep_started_at, sweep.finished_at AS sweep_finished_at,
       sweep.checked AS sweep_checked, sweep.joined AS sweep_joined,
       sweep.left_count AS sweep_left_count,
       b.backfilled_hash IS NOT DISTINCT FROM b.criteria_hash AS backfilled,
       fill.criteria_hash AS fill_hash, fill.cursor AS fill_cursor,
       fill.users_done AS fill_users_done, fill.total_estimate AS fill_total_estimate,
       fill.started_at AS fill_started_at, fill.finished_at AS fill_finished_at
FROM buckets b
LEFT JOIN recent ON recent.bucket_id = b.id
LEFT JOIN backfill_progress fill
       ON fill.bucket_id = b.id AND fill.criteria_hash = b.criteria_hash
LEFT JOIN LATERAL (
    SELECT * FROM sweep_runs s WHERE s.bucket_id = b.id ORDER BY s.id DESC LIMIT 1
) AS sweep ON true
ORDER BY b.id";

fn bucket_summary_from_row(row: &PgRow) -> Result<BucketSummary, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let last_sweep = match row.try_get::<Option<i64>, _>("sweep_id")? {
        None => None,
        Some(_) => Some(SweepRun {
            bucket_id: id.clone(),
            engine_id: row.try_get("sweep_engine_id")?,
            started_at: row.try_get("sweep_started_at")?,
            finished_at: row.try_get("sweep_finished_at")?,
            checked: row.try_get("sweep_checked")?,
            joined: row.try_get("sweep_joined")?,
            left_count: row.try_get("sweep_left_count")?,
        }),
    };
    let backfill = match row.try_get::<Option<String>, _>("fill_hash")? {
        None => None,
        Some(criteria_hash) => Some(BackfillProgress {
            bucket_id: id.clone(),
            criteria_hash,
            cursor: row.try_get("fill_cursor")?,
            users_done: row.try_get("fill_users_done")?,
            total_estimate: row.try_get("fill_total_estimate")?,
            started_at: row.try_get("fill_started_at")?,
            finished_at: row.try_get("fill_finished_at")?,
        }),
    };
    Ok(BucketSummary {
        id,
        description: row.try_get("description")?,
        enabled: row.try_get("enabled")?,
        status: row.try_get("status")?,
        last_error: row.try_get("last_error")?,
        time_based: row.try_get("time_based")?,
        member_count: row.try_get("member_count")?,
        entered_1m: row.try_get("entered_1m")?,
        left_1m: row.try_get("left_1m")?,
        updated_at: row.try_get("updated_at")?,
        last_sweep,
        backfilled: row.try_get("backfilled")?,
        backfill,
    })
}

/// Reads one bucket in depth: its definition, the first `limit` active members and its `limit`
/// newest transitions and sweeps. `None` when no such bucket exists.
pub async fn bucket_detail(
    store: &Store,
    bucket_id: &str,
    limit: i64,
) -> Result<Option<BucketDetail>> {
    let pool = store.pool();
    let Some((source_path, definition, criteria_hash, backfilled_hash)) =
        sqlx::query_as::<_, (String, String, String, Option<String>)>(
            "SELECT source_path, definition, criteria_hash, backfilled_hash
             FROM buckets WHERE id = $1",
        )
        .bind(bucket_id)
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };

    // Served by the partial unique index on active memberships.
    let members = sqlx::query_as::<_, MemberRow>(
        "SELECT user_id, epoch, entered_at FROM memberships
         WHERE bucket_id = $1 AND status = 'active'
         ORDER BY user_id LIMIT $2",
    )
    .bind(bucket_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;

    let transitions = sqlx::query_as::<_, TransitionRow>(
        "SELECT id, key, bucket_id, user_id, kind, epoch, label, source, reason, occurred_at
         FROM transitions WHERE bucket_id = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(bucket_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;

    let sweeps = sqlx::query_as::<_, SweepRun>(
        "SELECT id, bucket_id, engine_id, started_at, finished_at, checked, joined, left_count
         FROM sweep_runs WHERE bucket_id = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(bucket_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;

    Ok(Some(BucketDetail {
        id: bucket_id.to_owned(),
        source_path,
        definition,
        criteria_hash,
        backfilled_hash,
        members,
        transitions,
        sweeps,
    }))
}

/// The operator's enable/disable switch. Engines read `enabled` on their hot path, so a disabled
/// bucket stops evaluating at once and keeps its data. Returns whether the bucket exists.
pub async fn set_bucket_enabled(store: &Store, bucket_id: &str, enabled: bool) -> Result<bool> {
    let updated = sqlx::query("UPDATE buckets SET enabled = $2, updated_at = now() WHERE id = $1")
        .bind(bucket_id)
        .bind(enabled)
        .execute(store.pool())
        .await?;
    Ok(updated.rows_affected() > 0)
}

/// Test fixture only: fills an empty, migrated database with a small, fixed scene for console
/// tests — three buckets (healthy, failing with a diagnostic, disabled), members, transitions,
/// a sweep, an engine heartbeat and queued changes. Instants the console prints as times are
/// fixed; those it prints as ages are placed relative to the database clock, which is returned
/// so a test can render ages as of the seeding instant.
#[doc(hidden)]
pub async fn seed_demo_rows_for_tests(store: &Store) -> Result<DateTime<Utc>> {
    let mut tx = store.pool().begin().await?;
    for statement in DEMO_ROWS {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    // now() is the transaction's start, the instant every relative row above was placed at.
    let seeded_at = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(seeded_at)
}

const DEMO_ROWS: &[&str] = &[
    "INSERT INTO buckets
         (id, source_path, description, definition, criteria_hash, time_based, enabled, status,
          last_error, backfilled_hash, member_count, updated_at)
     VALUES
         ('active-users', 'buckets/active-users.toml', 'Had a session in the last 7 days',
          'criteria = ''event(\"session_start\").within(7d).exists()''', 'h1', true, true, 'ok',
          NULL, 'h1', 2, now() - interval '1 hour'),
         ('big-spenders', 'buckets/big-spenders.toml', 'Lifetime value over 1000',
          'criteria = ''prop(\"ltv\") > 1000''', 'h2', false, true, 'error',
          E'error: expected a comparison operator\\n --> buckets/big-spenders.toml:3:14\\n  |\\n3 |   prop(\"ltv\") >> 1000\\n  |              ^^ expected one of ==, !=, <, <=, >, >=',
          'h2', 1, now() - interval '5 minutes'),
         ('newsletter', 'buckets/newsletter.toml', 'Subscribed to the newsletter',
          'criteria = ''prop(\"newsletter\") == true''', 'h3', false, false, 'ok',
          NULL, 'h3', 0, now() - interval '2 days')",
    "INSERT INTO memberships (bucket_id, user_id, epoch, status, entered_at, left_at) VALUES
         ('active-users', 'alice', 1, 'active', now() - interval '1 day', NULL),
         ('active-users', 'bob', 2, 'active', now() - interval '20 seconds', NULL),
         ('active-users', 'carol', 1, 'left', now() - interval '2 days',
          now() - interval '10 seconds'),
         ('big-spenders', 'alice', 1, 'active', now() - interval '25 seconds', NULL)",
    "INSERT INTO transitions (key, bucket_id, user_id, kind, epoch, label, source, reason,
                              occurred_at, created_at) VALUES
         ('bucket:active-users:alice:entered:1', 'active-users', 'alice', 'entered', 1, NULL,
          'event', 'criteria', '2025-01-01T11:00:00Z', now() - interval '30 seconds'),
         ('bucket:big-spenders:alice:entered:1', 'big-spenders', 'alice', 'entered', 1, NULL,
          'event', 'criteria', '2025-01-01T11:05:00Z', now() - interval '25 seconds'),
         ('bucket:active-users:bob:entered:2', 'active-users', 'bob', 'entered', 2, NULL,
          'event', 'criteria', '2025-01-01T11:30:00Z', now() - interval '20 seconds'),
         ('bucket:active-users:carol:left:1', 'active-users', 'carol', 'left', 1, NULL,
          'timer', 'criteria', '2025-01-01T11:45:00Z', now() - interval '10 seconds'),
         ('bucket:active-users:alice:dwell:1:1d', 'active-users', 'alice', 'dwell', 1, '1d',
          'timer', 'dwell', '2025-01-01T11:50:00Z', now() - interval '5 seconds')",
    "INSERT INTO sweep_runs (bucket_id, engine_id, started_at, finished_at, checked, joined,
                             left_count)
     VALUES ('active-users', 'engine-a', now() - interval '42.25 seconds',
             now() - interval '42 seconds', 3, 0, 1)",
    "INSERT INTO engine_heartbeats (engine_id, hostname, pid, started_at, last_seen_at, stats)
     VALUES ('engine-a', 'worker-1', 4242, now() - interval '1 hour', now(),
             '{\"workers\": 4, \"timers_due\": 2}')",
    "INSERT INTO eval_queue (entries, users, enqueued_at) VALUES
         ('[{\"u\": \"dave\", \"e\": [\"session_start\"], \"p\": []}]', 1,
          now() - interval '3 seconds'),
         ('[{\"u\": \"erin\", \"e\": [\"purchase\"], \"p\": []}]', 1,
          now() - interval '1 second')",
];
