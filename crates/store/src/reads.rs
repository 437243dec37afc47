//! Reads for applications and the CLI, and engine heartbeats.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{Result, Store};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct TransitionRow {
    pub id: i64,
    pub key: String,
    pub bucket_id: String,
    pub user_id: String,
    pub kind: String,
    pub epoch: i32,
    pub label: Option<String>,
    pub source: String,
    pub reason: String,
    pub occurred_at: DateTime<Utc>,
}

impl Store {
    /// `None` when the bucket is unknown.
    pub async fn member_count(&self, bucket_id: &str) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT member_count FROM buckets WHERE id = $1")
                .bind(bucket_id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    pub async fn is_member(&self, bucket_id: &str, user_id: &str) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM memberships \
             WHERE bucket_id = $1 AND user_id = $2 AND status = 'active')",
        )
        .bind(bucket_id)
        .bind(user_id)
        .fetch_one(self.pool())
        .await?)
    }

    /// Transitions with id greater than `after`, oldest first.
    pub async fn transitions_after(&self, after: i64, limit: i64) -> Result<Vec<TransitionRow>> {
        Ok(sqlx::query_as(
            "SELECT id, key, bucket_id, user_id, kind, epoch, label, source, reason, occurred_at \
             FROM transitions WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn heartbeat(
        &self,
        engine_id: &str,
        hostname: &str,
        pid: i32,
        started_at: DateTime<Utc>,
        stats: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO engine_heartbeats (engine_id, hostname, pid, started_at, last_seen_at, stats) \
             VALUES ($1, $2, $3, $4, now(), $5) \
             ON CONFLICT (engine_id) DO UPDATE SET last_seen_at = now(), stats = EXCLUDED.stats",
        )
        .bind(engine_id)
        .bind(hostname)
        .bind(pid)
        .bind(started_at)
        .bind(stats)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

/// How far behind the real-time path is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueLag {
    /// Unprocessed entries, counted up to [`QUEUE_DEPTH_CAP`].
    pub depth: i64,
    /// Age of the oldest unprocessed entry, in seconds (0 when the queue is empty).
    pub oldest_seconds: f64,
}

/// Counting stops here, so that a huge backlog does not make every scrape slow.
pub const QUEUE_DEPTH_CAP: i64 = 100_000;

impl Store {
    pub async fn queue_lag(&self) -> Result<QueueLag> {
        let (depth, oldest_seconds): (i64, f64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM eval_queue LIMIT $1) capped), \
                    coalesce(extract(epoch FROM clock_timestamp() - \
                        (SELECT enqueued_at FROM eval_queue ORDER BY id LIMIT 1))::float8, 0)",
        )
        .bind(QUEUE_DEPTH_CAP)
        .fetch_one(self.pool())
        .await?;
        Ok(QueueLag {
            depth,
            oldest_seconds,
        })
    }
}

/// An engine whose heartbeat is older than this is presumed gone.
pub const ENGINE_ALIVE_SECS: f64 = 10.0;

impl Store {
    /// Whether an engine other than `engine_id` sent a heartbeat recently.
    pub async fn other_engines_alive(&self, engine_id: &str) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM engine_heartbeats WHERE engine_id <> $1 \
             AND last_seen_at > now() - make_interval(secs => $2))",
        )
        .bind(engine_id)
        .bind(ENGINE_ALIVE_SECS)
        .fetch_one(self.pool())
        .await?)
    }
}

impl Store {
    /// Removes an engine's heartbeat when it stops cleanly.
    pub async fn forget_engine(&self, engine_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM engine_heartbeats WHERE engine_id = $1")
            .bind(engine_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
