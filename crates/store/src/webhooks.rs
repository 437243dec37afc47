//! Webhook endpoints and their delivery queue.
//!
//! Deliveries are created by a trigger in the transaction that writes their transitions (see
//! `migrations/0002_webhooks.sql`). A deliverer claims one endpoint at a time by locking its
//! row (`FOR UPDATE SKIP LOCKED`) and keeps the lock for the whole attempt, so no endpoint
//! ever has two requests in flight, and it records the outcome in that same transaction: a
//! crash between the request and the commit leaves the delivery pending, and it is sent again
//! (at least once; receivers dedupe by `webhook-id`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{Postgres, Transaction};

use crate::{Result, Store, TransitionRow};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EndpointSummary {
    pub id: i64,
    pub url: String,
    pub enabled: bool,
    /// Whether the endpoint trusts its own CA certificates (`--ca-file`) for HTTPS.
    pub custom_ca: bool,
    pub pending: i64,
    pub dead: i64,
    pub delivered: i64,
    pub last_delivered_at: Option<DateTime<Utc>>,
    /// The error of the endpoint's head-of-line delivery, when it has failed.
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadDelivery {
    pub id: i64,
    pub endpoint_id: i64,
    pub transition_key: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Which dead deliveries to send again.
#[derive(Debug, Clone, Copy)]
pub enum Replay {
    One { delivery_id: i64 },
    AllDead,
}

/// What a failed attempt leads to.
#[derive(Debug, Clone, Copy)]
pub enum Retry {
    After(std::time::Duration),
    /// Attempts are exhausted: the delivery becomes a visible dead letter and the endpoint
    /// moves on to its next delivery.
    GiveUp,
}

/// The head-of-line delivery of one endpoint, claimed under that endpoint's row lock. Dropping
/// it without [`delivered`](Self::delivered) or [`failed`](Self::failed) rolls back: the
/// delivery stays pending and is sent again.
pub struct ClaimedDelivery {
    tx: Transaction<'static, Postgres>,
    pub endpoint_id: i64,
    pub url: String,
    pub secret: String,
    /// The endpoint's own trust anchors (PEM), if it has any.
    pub ca_pem: Option<String>,
    pub delivery_id: i64,
    /// Attempts made before this one.
    pub attempts: i32,
    pub transition: TransitionRow,
}

#[derive(sqlx::FromRow)]
struct HeadOfLine {
    delivery_id: i64,
    attempts: i32,
    due: bool,
    #[sqlx(flatten)]
    transition: TransitionRow,
}

impl ClaimedDelivery {
    pub async fn delivered(mut self) -> Result<()> {
        sqlx::query("DELETE FROM webhook_deliveries WHERE id = $1")
            .bind(self.delivery_id)
            .execute(&mut *self.tx)
            .await?;
        sqlx::query(
            "UPDATE webhook_endpoints SET delivered_count = delivered_count + 1, \
             last_delivered_at = now() WHERE id = $1",
        )
        .bind(self.endpoint_id)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }

    pub async fn failed(mut self, error: &str, status: Option<u16>, retry: Retry) -> Result<()> {
        let (state, delay) = match retry {
            Retry::After(delay) => ("pending", delay),
            Retry::GiveUp => ("dead", std::time::Duration::ZERO),
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, state = $2, last_error = $3, \
             last_status = $4, next_attempt_at = now() + make_interval(secs => $5) WHERE id = $1",
        )
        .bind(self.delivery_id)
        .bind(state)
        .bind(error)
        .bind(status.map(i32::from))
        .bind(delay.as_secs_f64())
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// What removing an endpoint dropped with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemovedEndpoint {
    pub pending: i64,
    pub dead: i64,
}

impl Store {
    /// Registers an endpoint; `ca_pem` adds trust anchors for its HTTPS certificate.
    pub async fn add_webhook_endpoint(
        &self,
        url: &str,
        secret: &str,
        ca_pem: Option<&str>,
    ) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO webhook_endpoints (url, secret, ca_pem) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(url)
        .bind(secret)
        .bind(ca_pem)
        .fetch_one(self.pool())
        .await?)
    }

    /// Enables or disables an endpoint; `false` when there is no such endpoint. A disabled
    /// endpoint is sent nothing, and transitions committed meanwhile are not queued for it;
    /// what was pending waits, in order, until it is enabled again.
    pub async fn set_webhook_enabled(&self, endpoint_id: i64, enabled: bool) -> Result<bool> {
        let updated = sqlx::query("UPDATE webhook_endpoints SET enabled = $2 WHERE id = $1")
            .bind(endpoint_id)
            .bind(enabled)
            .execute(self.pool())
            .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Deletes an endpoint with its pending deliveries and dead letters (nobody could receive
    /// them any more); `None` when there is no such endpoint. Waits for a delivery in flight to
    /// that endpoint to finish.
    pub async fn remove_webhook_endpoint(
        &self,
        endpoint_id: i64,
    ) -> Result<Option<RemovedEndpoint>> {
        let mut tx = self.pool().begin().await?;
        let locked: Option<i64> =
            sqlx::query_scalar("SELECT id FROM webhook_endpoints WHERE id = $1 FOR UPDATE")
                .bind(endpoint_id)
                .fetch_optional(&mut *tx)
                .await?;
        if locked.is_none() {
            return Ok(None);
        }
        let (pending, dead): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'dead') \
             FROM webhook_deliveries WHERE endpoint_id = $1",
        )
        .bind(endpoint_id)
        .fetch_one(&mut *tx)
        .await?;
        // The deliveries go with it (ON DELETE CASCADE).
        sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1")
            .bind(endpoint_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(RemovedEndpoint { pending, dead }))
    }

    pub async fn webhook_endpoints(&self) -> Result<Vec<EndpointSummary>> {
        Ok(sqlx::query_as(
            "SELECT e.id, e.url, e.enabled, e.ca_pem IS NOT NULL AS custom_ca, e.delivered_count AS delivered, e.last_delivered_at, \
                    e.created_at, \
                    count(*) FILTER (WHERE d.state = 'pending') AS pending, \
                    count(*) FILTER (WHERE d.state = 'dead') AS dead, \
                    (SELECT h.last_error FROM webhook_deliveries h \
                     WHERE h.endpoint_id = e.id AND h.state = 'pending' \
                     ORDER BY h.transition_id LIMIT 1) AS last_error \
             FROM webhook_endpoints e LEFT JOIN webhook_deliveries d ON d.endpoint_id = e.id \
             GROUP BY e.id ORDER BY e.id",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// Dead letters, oldest transition first; of one endpoint or of all.
    pub async fn dead_webhook_deliveries(
        &self,
        endpoint_id: Option<i64>,
    ) -> Result<Vec<DeadDelivery>> {
        Ok(sqlx::query_as(
            "SELECT d.id, d.endpoint_id, t.key AS transition_key, d.attempts, d.last_status, \
                    d.last_error, d.created_at \
             FROM webhook_deliveries d JOIN transitions t ON t.id = d.transition_id \
             WHERE d.state = 'dead' AND ($1::bigint IS NULL OR d.endpoint_id = $1) \
             ORDER BY d.endpoint_id, d.transition_id",
        )
        .bind(endpoint_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Makes dead deliveries pending again with fresh attempts. A replayed delivery rejoins its
    /// endpoint's line at its transition's place, ahead of any later pending ones, but after
    /// those already delivered. Returns how many were replayed.
    pub async fn replay_webhook_deliveries(&self, which: Replay) -> Result<u64> {
        let delivery_id = match which {
            Replay::One { delivery_id } => Some(delivery_id),
            Replay::AllDead => None,
        };
        let replayed = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = now() \
             WHERE state = 'dead' AND ($1::bigint IS NULL OR id = $1)",
        )
        .bind(delivery_id)
        .execute(self.pool())
        .await?;
        Ok(replayed.rows_affected())
    }

    /// Claims an endpoint whose head-of-line delivery is due, unless every such endpoint is
    /// being delivered by someone else.
    pub async fn claim_webhook_delivery(&self) -> Result<Option<ClaimedDelivery>> {
        let mut tx = self.pool().begin().await?;
        let endpoint: Option<(i64, String, String, Option<String>)> = sqlx::query_as(
            "SELECT e.id, e.url, e.secret, e.ca_pem FROM webhook_endpoints e \
             WHERE e.enabled AND (SELECT d.next_attempt_at FROM webhook_deliveries d \
                                  WHERE d.endpoint_id = e.id AND d.state = 'pending' \
                                  ORDER BY d.transition_id LIMIT 1) <= now() \
             ORDER BY e.id LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some((endpoint_id, url, secret, ca_pem)) = endpoint else {
            return Ok(None);
        };
        // Read again under the lock: the choice above used a snapshot from before it, when
        // another deliverer may still have been finishing this endpoint's head.
        let head: Option<HeadOfLine> = sqlx::query_as(
            "SELECT d.id AS delivery_id, d.attempts, d.next_attempt_at <= now() AS due, \
                    t.id, t.key, t.bucket_id, t.user_id, t.kind, t.epoch, t.label, t.source, \
                    t.reason, t.occurred_at \
             FROM webhook_deliveries d JOIN transitions t ON t.id = d.transition_id \
             WHERE d.endpoint_id = $1 AND d.state = 'pending' \
             ORDER BY d.transition_id LIMIT 1",
        )
        .bind(endpoint_id)
        .fetch_optional(&mut *tx)
        .await?;
        Ok(head.filter(|head| head.due).map(|head| ClaimedDelivery {
            tx,
            endpoint_id,
            url,
            secret,
            ca_pem,
            delivery_id: head.delivery_id,
            attempts: head.attempts,
            transition: head.transition,
        }))
    }
}
