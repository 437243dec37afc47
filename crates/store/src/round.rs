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

impl Store {
    pub async fn begin_round(&self) -> Result<Round> {
        Ok(Round {
            tx: self.pool().begin().await?,
            accounts: BTreeMap::new(),
        })
    }
}

/// Merges queue rows into one entry per user, ordered by user id.
fn merge_entries(rows: Vec<(String, Vec<String>, Vec<String>)>) -> Vec<QueuedUser> {
    let mut merged: BTreeMap<String, QueuedUser> = BTreeMap::new();
    for (user_id, event_names, prop_keys) in rows {
        let entry = merged.entry(user_id.clone()).or_insert_with(|| QueuedUser {
            user_id,
            ..QueuedUser::default()
        });
        for name in event_names {
            if !entry.event_names.contains(&name) {
                entry.event_names.push(name);
            }
        }
        for key in prop_keys {
            if !entry.prop_keys.contains(&key) {
                entry.prop_keys.push(key);
            }
        }
    }
    merged.into_values().collect()
}

impl Round {
    /// Claims up to `limit` queue entries and locks their users, skipping entries another
    /// round holds and users another round is evaluating (their entries wait for a later
    /// round), so concurrent rounds never wait for each other. The claimed entries are
    /// deleted as part of this round. Returns one merged entry per locked user, ordered by
    /// user id: every user a round evaluates is locked by it.
    ///
    /// An entry whose contact is gone is deleted too, and not returned (nothing can be locked
    /// for it, and it would otherwise stay queued for ever): an ingest that commits while its
    /// user is being erased leaves one. Its events wait for the user's next ingest, which
    /// creates the contact again and queues the user.
    pub async fn claim_queue(&mut self, limit: i64) -> Result<Vec<QueuedUser>> {
        let rows: Vec<(String, Vec<String>, Vec<String>)> = sqlx::query_as(
            // Claimed rows are deleted by their tuple ids: joined to the candidates, the
            // delete was planned as a hash join over a scan of the whole queue, 60 ms of a
            // 90 ms claim with 100k entries queued.
            "WITH candidates AS MATERIALIZED ( \
                 SELECT ctid AS tid, user_id FROM eval_queue ORDER BY id LIMIT $1 \
                 FOR UPDATE SKIP LOCKED), \
             locked AS MATERIALIZED ( \
                 SELECT c.user_id FROM (SELECT DISTINCT user_id FROM candidates) AS u \
                 CROSS JOIN LATERAL ( \
                     SELECT user_id FROM contacts WHERE user_id = u.user_id \
                     FOR UPDATE SKIP LOCKED) AS c), \
             claimed AS ( \
                 DELETE FROM eval_queue WHERE ctid = ANY(ARRAY( \
                     SELECT c.tid FROM candidates c \
                     WHERE c.user_id IN (SELECT user_id FROM locked) \
                        OR NOT EXISTS (SELECT 1 FROM contacts WHERE user_id = c.user_id OFFSET 0))) \
                 RETURNING user_id, event_names, prop_keys) \
             SELECT user_id, event_names, prop_keys FROM claimed \
             WHERE user_id IN (SELECT user_id FROM locked)",
        )
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?;
        let merged = merge_entries(rows);
        Ok(merged)
    }

    /// The unprocessed changes of `users`, merged per user. Entries a round has claimed but
    /// not committed are still here, so with `users` locked every change not yet evaluated
    /// shows, including those committed after this round's earlier reads.
    pub async fn pending_changes(&mut self, users: &[String]) -> Result<Vec<QueuedUser>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, Vec<String>, Vec<String>)> = sqlx::query_as(
            "SELECT user_id, event_names, prop_keys FROM eval_queue WHERE user_id = ANY($1)",
        )
        .bind(users)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(merge_entries(rows))
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
