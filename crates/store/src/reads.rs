//! Reads for applications and the CLI (bucket status, count, has, member pages, a user's
//! buckets, transitions since a cursor), and engine heartbeats.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::console::MemberRow;
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

/// What applications and the CLI see of a bucket: its switch, the version the engines recorded,
/// whether its members are materialized, its last error and its member count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct BucketStatus {
    pub id: String,
    pub description: String,
    pub enabled: bool,
    /// `ok`, `error` (the last edit failed; the previous version keeps serving) or `removed`.
    pub status: String,
    /// The criteria hash the engines recorded as serving ("" when no version ever loaded).
    pub criteria_hash: String,
    /// Whether the members of that version have been materialized (its backfill finished).
    pub backfilled: bool,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub member_count: i64,
    /// Membership can change with the clock alone (a window or a comparison with `now()`).
    pub time_based: bool,
    pub updated_at: DateTime<Utc>,
}

const BUCKET_STATUS_COLUMNS: &str = "id, description, enabled, status, criteria_hash, \
     coalesce(backfilled_hash = criteria_hash AND criteria_hash <> '', false) AS backfilled, \
     last_error, last_error_at, member_count, time_based, updated_at";

/// One page of a bucket's active members, ordered by user id.
#[derive(Debug, Clone, PartialEq)]
pub struct MembersPage {
    pub members: Vec<MemberRow>,
    /// The cursor of the next page; `None` on the last one.
    pub next: Option<MemberCursor>,
}

/// A position in a bucket's member list: members after it come next.
///
/// Pages are keyset-paged on the user id (unique among a bucket's active members), so a user
/// joining or leaving between two pages never makes another member repeat or go missing.
/// Rendered as an opaque token (the user id's bytes in hex) so clients do not build their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberCursor(String);

/// A member cursor that is not one this API handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a member cursor: pass the `next` value of a previous page")]
pub struct BadCursor(pub String);

impl MemberCursor {
    pub fn after_user(user_id: &str) -> MemberCursor {
        MemberCursor(user_id.to_owned())
    }

    pub fn user_id(&self) -> &str {
        &self.0
    }

    pub fn token(&self) -> String {
        self.0.bytes().map(|byte| format!("{byte:02x}")).collect()
    }

    pub fn parse(token: &str) -> Result<MemberCursor, BadCursor> {
        let bad = || BadCursor(token.to_owned());
        let digit = |c: u8| char::from(c).to_digit(16);
        let bytes = token
            .as_bytes()
            .chunks(2)
            .map(|pair| match pair {
                [high, low] => Some(u8::try_from(digit(*high)? * 16 + digit(*low)?).ok()?),
                _ => None,
            })
            .collect::<Option<Vec<u8>>>()
            .filter(|bytes| !bytes.is_empty())
            .ok_or_else(bad)?;
        String::from_utf8(bytes)
            .map(MemberCursor)
            .map_err(|_| bad())
    }
}

/// A user's active membership of one bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct UserMembership {
    pub bucket_id: String,
    /// How many times the user has entered this bucket, this time included.
    pub epoch: i32,
    pub entered_at: DateTime<Utc>,
}

/// Transitions since a cursor, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionsPage {
    pub transitions: Vec<TransitionRow>,
    /// The cursor to pass next: the id of the last transition returned, or the cursor given
    /// when there was none.
    pub next: i64,
}

/// How long a transitions read waits for in-flight writers of the outbox before giving up.
pub const OUTBOX_SETTLE_LIMIT: Duration = Duration::from_secs(5);

impl Store {
    /// Every bucket the engines recorded, by id.
    pub async fn bucket_statuses(&self) -> Result<Vec<BucketStatus>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {BUCKET_STATUS_COLUMNS} FROM buckets ORDER BY id"
        ))
        .fetch_all(self.pool())
        .await?)
    }

    /// `None` when the bucket is unknown.
    pub async fn bucket_status(&self, bucket_id: &str) -> Result<Option<BucketStatus>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {BUCKET_STATUS_COLUMNS} FROM buckets WHERE id = $1"
        ))
        .bind(bucket_id)
        .fetch_optional(self.pool())
        .await?)
    }

    /// Up to `limit` active members after `after`, by user id (a range scan of
    /// `memberships_one_active`). `None` when the bucket is unknown.
    pub async fn bucket_members(
        &self,
        bucket_id: &str,
        after: Option<&MemberCursor>,
        limit: i64,
    ) -> Result<Option<MembersPage>> {
        let known: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM buckets WHERE id = $1)")
            .bind(bucket_id)
            .fetch_one(self.pool())
            .await?;
        if !known {
            return Ok(None);
        }
        // One row more than asked tells whether another page follows.
        let mut members: Vec<MemberRow> = sqlx::query_as(
            "SELECT user_id, epoch, entered_at FROM memberships \
             WHERE bucket_id = $1 AND status = 'active' AND ($2::text IS NULL OR user_id > $2) \
             ORDER BY user_id LIMIT $3",
        )
        .bind(bucket_id)
        .bind(after.map(MemberCursor::user_id))
        .bind(limit.saturating_add(1))
        .fetch_all(self.pool())
        .await?;
        let more = members.len() as i64 > limit;
        members.truncate(usize::try_from(limit).unwrap_or(0));
        let next = more
            .then(|| members.last())
            .flatten()
            .map(|last| MemberCursor::after_user(&last.user_id));
        Ok(Some(MembersPage { members, next }))
    }

    /// The buckets `user_id` is in now, by bucket id. One probe of the active-membership index
    /// per bucket, so it costs O(buckets) however many memberships there are.
    pub async fn user_memberships(&self, user_id: &str) -> Result<Vec<UserMembership>> {
        Ok(sqlx::query_as(
            "SELECT b.id AS bucket_id, m.epoch, m.entered_at FROM buckets b \
             JOIN LATERAL (SELECT epoch, entered_at FROM memberships \
                           WHERE bucket_id = b.id AND user_id = $1 AND status = 'active') m ON true \
             ORDER BY b.id",
        )
        .bind(user_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Up to `limit` transitions with id greater than `after` (of one bucket, if given), oldest
    /// first, that no later read can precede.
    ///
    /// Transition ids come from a sequence, and transactions commit out of id order: a plain
    /// `id > after` read could return id 8 while id 7 is still uncommitted, and a consumer
    /// advancing its cursor to 8 would never see 7. So the read first notes the highest id
    /// handed out, then waits until every transaction that might hold a smaller one has ended
    /// (each holds a `RowExclusiveLock` on `transitions` from before it draws an id), and reads
    /// only up to that id. When writers do not finish within [`OUTBOX_SETTLE_LIMIT`] it returns
    /// an empty page with the cursor unchanged.
    pub async fn transitions_since(
        &self,
        after: i64,
        limit: i64,
        bucket_id: Option<&str>,
    ) -> Result<TransitionsPage> {
        let empty = TransitionsPage {
            transitions: Vec::new(),
            next: after,
        };
        let Some(settled) = self.settled_transition_id().await? else {
            return Ok(empty);
        };
        if settled <= after {
            return Ok(empty);
        }
        let transitions: Vec<TransitionRow> = sqlx::query_as(
            "SELECT id, key, bucket_id, user_id, kind, epoch, label, source, reason, occurred_at \
             FROM transitions WHERE id > $1 AND id <= $2 AND ($3::text IS NULL OR bucket_id = $3) \
             ORDER BY id LIMIT $4",
        )
        .bind(after)
        .bind(settled)
        .bind(bucket_id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let next = transitions.last().map_or(after, |last| last.id);
        Ok(TransitionsPage { transitions, next })
    }

    /// The highest transition id below which every transition is committed or never will be,
    /// or `None` when in-flight writers did not end within [`OUTBOX_SETTLE_LIMIT`].
    async fn settled_transition_id(&self) -> Result<Option<i64>> {
        // The order matters: an id drawn before this read belongs to a transaction that holds
        // its lock when the lock table is read next (or has ended).
        let drawn: i64 = sqlx::query_scalar(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM transitions_id_seq",
        )
        .fetch_one(self.pool())
        .await?;
        let mut writers: Vec<String> = sqlx::query_scalar(
            "SELECT virtualtransaction FROM pg_locks \
             WHERE locktype = 'relation' AND relation = 'transitions'::regclass \
               AND mode = 'RowExclusiveLock' AND granted AND pid <> pg_backend_pid()",
        )
        .fetch_all(self.pool())
        .await?;
        let give_up = tokio::time::Instant::now() + OUTBOX_SETTLE_LIMIT;
        let mut pause = Duration::from_millis(2);
        while !writers.is_empty() {
            if tokio::time::Instant::now() >= give_up {
                return Ok(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
            writers = sqlx::query_scalar(
                "SELECT virtualtransaction FROM pg_locks \
                 WHERE locktype = 'relation' AND relation = 'transitions'::regclass \
                   AND virtualtransaction = ANY($1)",
            )
            .bind(&writers)
            .fetch_all(self.pool())
            .await?;
        }
        Ok(Some(drawn))
    }
}

/// How far behind the real-time path is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueLag {
    /// Users with unprocessed changes, summed over at most [`QUEUE_DEPTH_CAP`] queue rows.
    pub depth: i64,
    /// Age of the oldest unprocessed entry, in seconds (0 when the queue is empty).
    pub oldest_seconds: f64,
}

/// Counting stops here, so that a huge backlog does not make every scrape slow.
pub const QUEUE_DEPTH_CAP: i64 = 100_000;

impl Store {
    pub async fn queue_lag(&self) -> Result<QueueLag> {
        let (depth, oldest_seconds): (i64, f64) = sqlx::query_as(
            // Over at most the cap's number of queue rows, each holding one or more users.
            "SELECT coalesce(sum(users), 0)::int8, \
                    coalesce(extract(epoch FROM clock_timestamp() - min(enqueued_at))::float8, 0) \
             FROM (SELECT users, enqueued_at FROM eval_queue ORDER BY id LIMIT $1) AS capped",
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
