//! Statements only `membrane bench` runs: the raw-COPY floor it compares ingest against, and
//! the population generator and readings of the scale benchmark.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::{Result, Store};

/// One event row as it lands in `events`.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub user_id: String,
    pub name: String,
    pub occurred_at: DateTime<Utc>,
    pub properties: Value,
}

impl Store {
    /// Per transition of `kind` (`entered`, `left`, `dwell`) with id above `after`: its
    /// bucket, its user and when the round inserted it (`clock_timestamp()`, just before the
    /// round's commit).
    pub async fn transitions_of_kind_after(
        &self,
        after: i64,
        kind: &str,
    ) -> Result<Vec<(String, String, DateTime<Utc>)>> {
        Ok(sqlx::query_as(
            "SELECT bucket_id, user_id, created_at FROM transitions \
             WHERE id > $1 AND kind = $2 ORDER BY id",
        )
        .bind(after)
        .bind(kind)
        .fetch_all(self.pool())
        .await?)
    }

    /// Writes every dirty page to disk and syncs it (`CHECKPOINT`: superuser or
    /// `pg_checkpoint`), so that a phase following a write burst is not charged for the
    /// burst's write-back; returns how long that took.
    pub async fn checkpoint(&self) -> Result<Duration> {
        let started = Instant::now();
        sqlx::query("CHECKPOINT").execute(self.pool()).await?;
        Ok(started.elapsed())
    }

    /// Whether the evaluation queue is empty: one index probe, cheap enough to poll while a
    /// benchmark runs (counting the queue, as the console does, would compete with it).
    pub async fn queue_is_empty(&self) -> Result<bool> {
        let first: Option<i64> =
            sqlx::query_scalar("SELECT id FROM eval_queue ORDER BY id LIMIT 1")
                .fetch_optional(self.pool())
                .await?;
        Ok(first.is_none())
    }

    /// The id of the latest transition, 0 when there is none.
    pub async fn last_transition_id(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM transitions")
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Time to `COPY` `rows` into a scratch table shaped like `events` (same columns, defaults
    /// and indexes), in one transaction: the fastest way Postgres can take these rows, and so
    /// the floor for ingest. The scratch table is dropped afterwards.
    pub async fn copy_events_floor(&self, rows: &[EventRow]) -> Result<Duration> {
        let mut text = String::with_capacity(rows.len() * 96);
        for row in rows {
            push_copy_field(&mut text, &row.user_id);
            text.push('\t');
            push_copy_field(&mut text, &row.name);
            text.push('\t');
            text.push_str(&row.occurred_at.to_rfc3339());
            text.push('\t');
            push_copy_field(&mut text, &row.properties.to_string());
            text.push('\n');
        }
        let mut connection = self.pool().acquire().await?;
        sqlx::query("DROP TABLE IF EXISTS bench_copy_floor")
            .execute(&mut *connection)
            .await?;
        sqlx::query("CREATE TABLE bench_copy_floor (LIKE events INCLUDING ALL)")
            .execute(&mut *connection)
            .await?;
        let started = Instant::now();
        let mut copy = connection
            .copy_in_raw(
                "COPY bench_copy_floor (user_id, name, occurred_at, properties) FROM STDIN",
            )
            .await?;
        copy.send(text.as_bytes()).await?;
        copy.finish().await?;
        let elapsed = started.elapsed();
        sqlx::query("DROP TABLE bench_copy_floor")
            .execute(&mut *connection)
            .await?;
        Ok(elapsed)
    }
}

/// The generated population of the scale benchmark: `users` contacts and `events_per_user`
/// events each, reproducible from `seed`.
///
/// Users are `u0000000`, `u0000001`, … (so at most 10M); each has a `plan` (40% free, 30%
/// team, 30% pro), a `country` and an RFC 3339 `signup_at` up to a year back. Their first event is a `visit` in
/// the last 23 hours (so a one-day window of it ends in 1 to 24 hours); the rest fall in the
/// last 30 days: `page_view` (with a `path`), `click`, `search` (with a one-letter `query`),
/// `purchase` (with an `amount` up to 300) and `support`. One user in six is a buyer, a quarter
/// of whose events are `checkout`s.
#[derive(Debug, Clone, Copy)]
pub struct Population {
    pub users: i64,
    pub events_per_user: i64,
    pub seed: f64,
}

/// When one bucket's backfill started and finished, and over how many users.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BackfillTiming {
    pub bucket_id: String,
    pub users_done: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Writes `population` into `contacts` and `events` with two set-based statements (rows in
    /// user order), then vacuums and analyzes both tables, as autovacuum would have by the time
    /// a table this size is swept: until a vacuum sets the visibility map, every index-only
    /// scan (the sweep's pages, fact gathering) also reads each row's heap page.
    pub async fn generate_population(&self, population: Population) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("SELECT setseed($1)")
            .bind(population.seed)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO contacts (user_id, properties) \
             SELECT 'u' || lpad(u::text, 7, '0'), jsonb_build_object( \
                 'plan', (ARRAY['free', 'free', 'free', 'free', 'team', 'team', 'team', \
                                'pro', 'pro', 'pro'])[1 + (u * 37) % 10], \
                 'country', (ARRAY['us', 'de', 'fr', 'gb', 'br'])[1 + (u * 13) % 5], \
                 'signup_at', to_char((now() - random() * interval '365 days') AT TIME ZONE 'UTC', \
                                      'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')) \
             FROM generate_series(0, $1 - 1) u",
        )
        .bind(population.users)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO events (user_id, name, occurred_at, properties) \
             SELECT 'u' || lpad(u::text, 7, '0'), name, \
                    now() - age * CASE WHEN name = 'visit' THEN interval '23 hours' \
                                       ELSE interval '30 days' END, \
                    CASE name \
                        WHEN 'page_view' THEN jsonb_build_object('path', '/p/' || floor(p * 50)) \
                        WHEN 'search' THEN jsonb_build_object('query', chr(97 + floor(p * 26)::int)) \
                        WHEN 'purchase' THEN jsonb_build_object('amount', floor(p * 300)) \
                        ELSE '{}'::jsonb END \
             FROM ( \
                 SELECT u, age, p, \
                        CASE WHEN k = 1 THEN 'visit' \
                             WHEN (u * 7919) % 6 = 0 AND r < 0.25 THEN 'checkout' \
                             WHEN r < 0.50 THEN 'page_view' \
                             WHEN r < 0.68 THEN 'click' \
                             WHEN r < 0.82 THEN 'search' \
                             WHEN r < 0.93 THEN 'purchase' \
                             ELSE 'support' END AS name \
                 FROM (SELECT u, k, random() AS r, random() AS age, random() AS p \
                       FROM generate_series(0, $1 - 1) u, generate_series(1, $2) k) draws \
             ) drawn",
        )
        .bind(population.users)
        .bind(population.events_per_user)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        sqlx::query("VACUUM (ANALYZE) contacts, events")
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Every bucket's latest backfill, by bucket id.
    pub async fn backfill_timings(&self) -> Result<Vec<BackfillTiming>> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT ON (bucket_id) bucket_id, users_done, started_at, finished_at \
             FROM backfill_progress ORDER BY bucket_id, started_at DESC",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// How many timers are armed, in every bucket.
    pub async fn armed_timer_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM timers")
            .fetch_one(self.pool())
            .await?)
    }
}

/// A value in COPY's text format: backslash, tab, newline and carriage return escaped.
fn push_copy_field(text: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => text.push_str("\\\\"),
            '\t' => text.push_str("\\t"),
            '\n' => text.push_str("\\n"),
            '\r' => text.push_str("\\r"),
            c => text.push(c),
        }
    }
}
