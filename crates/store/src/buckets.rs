//! Per-bucket state shared by every engine: the definition serving now, its criteria hash, the
//! operator's enable switch, the last load error, backfill progress and the member count.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::round::Round;
use crate::{Result, Store};

/// A bucket version that loaded, compiled and test-instantiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketVersion {
    pub id: String,
    pub source_path: String,
    pub description: String,
    pub definition: String,
    pub criteria_hash: String,
    pub time_based: bool,
}

/// What every engine reads before acting on a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSwitch {
    pub enabled: bool,
    pub backfilled_hash: Option<String>,
    /// The version the engines last recorded as serving ("" when none ever loaded).
    pub criteria_hash: String,
    /// Its file was removed: no engine should serve it.
    pub removed: bool,
}

impl Store {
    /// Records the version now serving; clears any earlier load error. The operator's enable
    /// switch is kept as it is.
    pub async fn record_bucket_version(&self, version: &BucketVersion) -> Result<()> {
        sqlx::query(
            "INSERT INTO buckets (id, source_path, description, definition, criteria_hash, time_based) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET source_path = EXCLUDED.source_path, \
               description = EXCLUDED.description, definition = EXCLUDED.definition, \
               criteria_hash = EXCLUDED.criteria_hash, time_based = EXCLUDED.time_based, \
               status = 'ok', last_error = NULL, last_error_at = NULL, updated_at = now()",
        )
        .bind(&version.id)
        .bind(&version.source_path)
        .bind(&version.description)
        .bind(&version.definition)
        .bind(&version.criteria_hash)
        .bind(version.time_based)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records that the latest edit of a bucket failed to load; a version already serving keeps
    /// its definition. A bucket that never loaded gets a row holding the broken text.
    pub async fn record_bucket_error(
        &self,
        id: &str,
        source_path: &str,
        source_text: &str,
        error: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO buckets (id, source_path, definition, criteria_hash, status, last_error, last_error_at) \
             VALUES ($1, $2, $3, '', 'error', $4, now()) \
             ON CONFLICT (id) DO UPDATE SET status = 'error', last_error = EXCLUDED.last_error, \
               last_error_at = now(), updated_at = now()",
        )
        .bind(id)
        .bind(source_path)
        .bind(source_text)
        .bind(error)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Marks buckets whose files are gone; their memberships and transitions stay.
    pub async fn record_buckets_removed(&self, ids: &[String]) -> Result<()> {
        sqlx::query(
            "UPDATE buckets SET status = 'removed', updated_at = now() \
             WHERE id = ANY($1) AND status <> 'removed'",
        )
        .bind(ids)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn bucket_switches(&self) -> Result<HashMap<String, BucketSwitch>> {
        let rows: Vec<(String, bool, Option<String>, String, bool)> = sqlx::query_as(
            "SELECT id, enabled, backfilled_hash, criteria_hash, status = 'removed' FROM buckets",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, enabled, backfilled_hash, criteria_hash, removed)| {
                (
                    id,
                    BucketSwitch {
                        enabled,
                        backfilled_hash,
                        criteria_hash,
                        removed,
                    },
                )
            })
            .collect())
    }

    /// Known users after `after` in user order, `limit` at most: the pages of a backfill.
    pub async fn users_page(&self, after: &str, limit: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT user_id FROM contacts WHERE user_id > $1 ORDER BY user_id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Active members of `bucket_id` after `after` in user order: the pages of a sweep.
    pub async fn members_page(
        &self,
        bucket_id: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT user_id FROM memberships WHERE bucket_id = $1 AND status = 'active' \
             AND user_id > $2 ORDER BY user_id LIMIT $3",
        )
        .bind(bucket_id)
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn record_sweep(&self, run: &SweepRun) -> Result<()> {
        sqlx::query(
            "INSERT INTO sweep_runs (bucket_id, engine_id, started_at, finished_at, checked, joined, left_count) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&run.bucket_id)
        .bind(&run.engine_id)
        .bind(run.started_at)
        .bind(run.finished_at)
        .bind(run.checked)
        .bind(run.joined)
        .bind(run.left_count)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

/// One completed sweep of one bucket.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SweepRun {
    pub bucket_id: String,
    pub engine_id: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub checked: i64,
    pub joined: i64,
    pub left_count: i64,
}

impl Round {
    /// Records that `criteria_hash`'s members are materialized, unless the bucket moved on.
    pub async fn mark_backfilled(&mut self, bucket_id: &str, criteria_hash: &str) -> Result<()> {
        sqlx::query(
            "UPDATE buckets SET backfilled_hash = $2, updated_at = now() \
             WHERE id = $1 AND criteria_hash = $2",
        )
        .bind(bucket_id)
        .bind(criteria_hash)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}
