//! Whole-database reads for audits that recompute everything from scratch (`membrane bench
//! chaos`, end-to-end tests): every contact, event, membership and transition. They cost
//! O(database) and never run on an engine's path.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::{Result, Store};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AuditEvent {
    pub user_id: String,
    pub name: String,
    pub occurred_at: DateTime<Utc>,
    pub properties: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditMembership {
    pub bucket_id: String,
    pub user_id: String,
    pub epoch: i32,
    pub active: bool,
    pub entered_at: DateTime<Utc>,
    pub left_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditTransition {
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

/// One bucket's recorded state, with its member count recounted from the memberships.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditBucket {
    pub id: String,
    pub status: String,
    pub enabled: bool,
    pub criteria_hash: String,
    pub backfilled_hash: Option<String>,
    pub member_count: i64,
    pub active_rows: i64,
    /// Users the backfill of the serving version counted, when one ran.
    pub backfill_users_done: Option<i64>,
}

impl Store {
    /// The database clock: audits evaluate "now" as the engines' rounds saw it.
    pub async fn database_now(&self) -> Result<DateTime<Utc>> {
        Ok(sqlx::query_scalar("SELECT now()")
            .fetch_one(self.pool())
            .await?)
    }

    pub async fn audit_contacts(&self) -> Result<Vec<(String, Value)>> {
        Ok(
            sqlx::query_as("SELECT user_id, properties FROM contacts ORDER BY user_id")
                .fetch_all(self.pool())
                .await?,
        )
    }

    pub async fn audit_events(&self) -> Result<Vec<AuditEvent>> {
        Ok(sqlx::query_as(
            "SELECT user_id, name, occurred_at, properties FROM events ORDER BY user_id, id",
        )
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn audit_memberships(&self) -> Result<Vec<AuditMembership>> {
        Ok(sqlx::query_as(
            "SELECT bucket_id, user_id, epoch, status = 'active' AS active, entered_at, left_at \
             FROM memberships ORDER BY bucket_id, user_id, epoch",
        )
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn audit_transitions(&self) -> Result<Vec<AuditTransition>> {
        Ok(sqlx::query_as(
            "SELECT key, bucket_id, user_id, kind, epoch, label, source, reason, occurred_at \
             FROM transitions ORDER BY id",
        )
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn audit_buckets(&self) -> Result<Vec<AuditBucket>> {
        Ok(sqlx::query_as(
            "SELECT b.id, b.status, b.enabled, b.criteria_hash, b.backfilled_hash, b.member_count, \
                    (SELECT count(*) FROM memberships m \
                     WHERE m.bucket_id = b.id AND m.status = 'active') AS active_rows, \
                    (SELECT p.users_done FROM backfill_progress p \
                     WHERE p.bucket_id = b.id AND p.criteria_hash = b.criteria_hash) \
                      AS backfill_users_done \
             FROM buckets b ORDER BY b.id",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// Unprocessed changes left in the evaluation queue.
    pub async fn queued_changes(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(sum(users), 0)::int8 FROM eval_queue")
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Whether the database has no contacts and no buckets yet: a bench only runs in one.
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM contacts) AND NOT EXISTS (SELECT 1 FROM buckets)",
        )
        .fetch_one(self.pool())
        .await?)
    }
}
