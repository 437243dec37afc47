//! Statements only `membrane bench` runs: the raw-COPY floor it compares ingest against.

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
    /// Per `entered` transition with id above `after`: its user and when the round inserted it
    /// (`clock_timestamp()`, just before the round's commit).
    pub async fn entries_after(&self, after: i64) -> Result<Vec<(String, DateTime<Utc>)>> {
        Ok(sqlx::query_as(
            "SELECT user_id, created_at FROM transitions \
             WHERE id > $1 AND kind = 'entered' ORDER BY id",
        )
        .bind(after)
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
