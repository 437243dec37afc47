//! An evaluation round: one transaction in which an evaluator claims work, reads facts and
//! writes membership changes with their transitions. Nothing a round did is visible until
//! [`Round::commit`], and a round dropped without committing changes nothing.

use std::collections::BTreeMap;

use sqlx::{Postgres, Transaction};

use crate::{Result, Store};

pub struct Round {
    pub(crate) tx: Transaction<'static, Postgres>,
    /// Member-count changes and transition notices of the round, applied at commit: a
    /// bucket's row stays locked only from then until the commit, not for the rest of the
    /// round, so concurrent rounds touching the same buckets do not run one after the other.
    pub(crate) accounts: BTreeMap<String, BucketAccount>,
}

#[derive(Debug, Default)]
pub(crate) struct BucketAccount {
    pub(crate) member_delta: i64,
    pub(crate) transitions: bool,
}

/// A user's claimed queue entries, merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueuedUser {
    pub user_id: String,
    pub event_names: Vec<String>,
    pub prop_keys: Vec<String>,
}

/// Request `i` of a statement that serves several requests (buckets) at once, as its rows
/// carry it (`int4`).
pub(crate) fn request_index(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX)
}

impl Store {
    pub async fn begin_round(&self) -> Result<Round> {
        Ok(Round {
            tx: self.pool().begin().await?,
            accounts: BTreeMap::new(),
        })
    }
}

/// One user's entry in a queue row, as ingest writes it.
#[derive(serde::Deserialize)]
struct QueueEntry {
    #[serde(rename = "u")]
    user_id: String,
    #[serde(rename = "e", default)]
    event_names: Vec<String>,
    #[serde(rename = "p", default)]
    prop_keys: Vec<String>,
}

/// Merges queue entries into one per user, ordered by user id.
fn merge_entries(entries: Vec<sqlx::types::Json<QueueEntry>>) -> Vec<QueuedUser> {
    let mut merged: BTreeMap<String, QueuedUser> = BTreeMap::new();
    for sqlx::types::Json(entry) in entries {
        let user = merged
            .entry(entry.user_id.clone())
            .or_insert_with(|| QueuedUser {
                user_id: entry.user_id,
                ..QueuedUser::default()
            });
        for name in entry.event_names {
            if !user.event_names.contains(&name) {
                user.event_names.push(name);
            }
        }
        for key in entry.prop_keys {
            if !user.prop_keys.contains(&key) {
                user.prop_keys.push(key);
            }
        }
    }
    merged.into_values().collect()
}

impl Round {
    /// Claims the oldest queue rows no other round holds, up to about `limit` users, and
    /// locks those users, skipping users another round is evaluating, so concurrent rounds
    /// never wait for each other. The claimed rows are deleted as part of this round; the
    /// entries of skipped users go back to the queue in one new row (with the oldest
    /// `enqueued_at` claimed), to be evaluated after the round holding them. Returns one merged
    /// entry per locked user, ordered by user id: every user a round evaluates is locked by it.
    ///
    /// An entry whose contact is gone is dropped, neither evaluated nor queued again (nothing
    /// can be locked for it, and it would otherwise stay queued for ever): an ingest that
    /// commits while its user is being erased leaves one. Its events wait for the user's next
    /// ingest, which creates the contact again and queues the user.
    pub async fn claim_queue(&mut self, limit: i64) -> Result<Vec<QueuedUser>> {
        let entries: Vec<sqlx::types::Json<QueueEntry>> = sqlx::query_scalar(
            // Claimed rows are deleted by their tuple ids: joined to the candidates, the
            // delete was planned as a hash join over a scan of the whole queue.
            //
            // `claim_queue_rows` is volatile, so its cursor may see a row that committed after
            // this statement's snapshot, whose new contacts this statement cannot see: such a
            // row's users are not locked (or, when locked by another round, may be queued
            // again), and the delete, which reads with this statement's snapshot, leaves the
            // row itself in the queue. Nothing is lost: the row is claimed again after this
            // round commits, and its users at worst evaluated twice.
            "WITH candidates AS MATERIALIZED ( \
                 SELECT tid, entries, enqueued_at FROM claim_queue_rows($1)), \
             entries AS MATERIALIZED ( \
                 SELECT e.entry->>'u' AS user_id, e.entry \
                 FROM candidates c CROSS JOIN LATERAL jsonb_array_elements(c.entries) AS e(entry)), \
             locked AS MATERIALIZED ( \
                 SELECT c.user_id FROM (SELECT DISTINCT user_id FROM entries) AS u \
                 CROSS JOIN LATERAL ( \
                     SELECT user_id FROM contacts WHERE user_id = u.user_id \
                     FOR UPDATE SKIP LOCKED) AS c), \
             claimed AS ( \
                 DELETE FROM eval_queue WHERE ctid = ANY(ARRAY(SELECT tid FROM candidates))), \
             requeued AS ( \
                 INSERT INTO eval_queue (entries, users, enqueued_at) \
                 SELECT jsonb_agg(e.entry), count(*), (SELECT min(enqueued_at) FROM candidates) \
                 FROM entries e \
                 WHERE e.user_id NOT IN (SELECT user_id FROM locked) \
                   AND EXISTS (SELECT 1 FROM contacts WHERE user_id = e.user_id OFFSET 0) \
                 HAVING count(*) > 0) \
             SELECT entry FROM entries WHERE user_id IN (SELECT user_id FROM locked)",
        )
        .bind(i32::try_from(limit).unwrap_or(i32::MAX))
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(merge_entries(entries))
    }

    /// The unprocessed changes of `users`, merged per user. Rows a round has claimed but not
    /// committed are still here, so with `users` locked every change not yet evaluated shows,
    /// including those committed after this round's earlier reads.
    pub async fn pending_changes(&mut self, users: &[String]) -> Result<Vec<QueuedUser>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<sqlx::types::Json<QueueEntry>> = sqlx::query_scalar(
            "SELECT e.entry FROM eval_queue q \
             CROSS JOIN LATERAL jsonb_array_elements(q.entries) AS e(entry) \
             WHERE e.entry->>'u' = ANY($1)",
        )
        .bind(users)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(merge_entries(entries))
    }

    /// Locks the contact rows of `users` in user order: rounds touching the same user run one
    /// after the other, and each then reads the facts the previous one committed.
    pub async fn lock_users(&mut self, users: &[String]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        sqlx::query("SELECT 1 FROM contacts WHERE user_id = ANY($1) ORDER BY user_id FOR UPDATE")
            .bind(users)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Applies the round's member counts (in bucket order, so concurrent rounds cannot
    /// deadlock on them), announces its transitions, and commits.
    pub async fn commit(mut self) -> Result<()> {
        let (counted, deltas): (Vec<&str>, Vec<i64>) = self
            .accounts
            .iter()
            .filter(|(_, account)| account.member_delta != 0)
            .map(|(bucket, account)| (bucket.as_str(), account.member_delta))
            .unzip();
        if !counted.is_empty() {
            sqlx::query(
                "UPDATE buckets b SET member_count = b.member_count + d.delta \
                 FROM (SELECT * FROM unnest($1::text[], $2::int8[]) AS d(id, delta) ORDER BY id) d \
                 WHERE b.id = d.id",
            )
            .bind(&counted)
            .bind(&deltas)
            .execute(&mut *self.tx)
            .await?;
        }
        let announced: Vec<&str> = self
            .accounts
            .iter()
            .filter(|(_, account)| account.transitions)
            .map(|(bucket, _)| bucket.as_str())
            .collect();
        if !announced.is_empty() {
            sqlx::query("SELECT pg_notify($1, id) FROM unnest($2::text[]) AS b(id)")
                .bind(crate::TRANSITIONS_CHANNEL)
                .bind(&announced)
                .execute(&mut *self.tx)
                .await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}
