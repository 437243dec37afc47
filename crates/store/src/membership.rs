//! Memberships and the transitions outbox. A join inserts the next epoch's active row; a leave
//! flips the active row with a compare-and-swap; each emitted transition is inserted in the same
//! statement under its unique key, so retries and racing writers neither lose nor duplicate one.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::round::Round;
use crate::Result;

/// Channel notified (on commit) when transitions were written; the payload is the bucket id.
pub const TRANSITIONS_CHANNEL: &str = "membrane_transitions";

/// What caused a membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Event,
    Timer,
    Sweep,
    Backfill,
    Operator,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Event => "event",
            Source::Timer => "timer",
            Source::Sweep => "sweep",
            Source::Backfill => "backfill",
            Source::Operator => "operator",
        }
    }
}

/// Which joins emit `entered` (the row is written and the epoch advances either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryRule {
    Unlimited,
    /// Only the first epoch emits.
    Once,
    /// Emits when this many seconds have passed since the user last left (or never left).
    OncePerPeriod(i64),
    /// Nothing emits: backfills and silent criteria changes.
    Silent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveMember {
    pub user_id: String,
    pub epoch: i32,
    pub entered_at: DateTime<Utc>,
}

/// A `dwell` transition that has come due: `label` is the `dwell` duration as written (`1d`)
/// or `every:<n>`; `at` is its exact instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DwellDue {
    pub user_id: String,
    pub epoch: i32,
    pub label: String,
    pub at: DateTime<Utc>,
}

/// Rows changed and transitions written by one join or leave statement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub memberships: i64,
    pub transitions: i64,
}

impl Round {
    /// The active memberships of `users` in `bucket_id`, keyed by user.
    pub async fn active_members(
        &mut self,
        bucket_id: &str,
        users: &[String],
    ) -> Result<HashMap<String, ActiveMember>> {
        let rows: Vec<(String, i32, DateTime<Utc>)> = sqlx::query_as(
            // One index probe per user, whatever the statistics say: on a table that grew
            // since it was last analyzed, the planner scans the bucket's whole active set and
            // filters it by user. (`LIMIT` keeps the subquery from being flattened into a
            // join the planner could reorder; there is at most one active row anyway.)
            "SELECT m.user_id, m.epoch, m.entered_at FROM unnest($2::text[]) AS u(user_id) \
             CROSS JOIN LATERAL (SELECT user_id, epoch, entered_at FROM memberships \
                 WHERE bucket_id = $1 AND user_id = u.user_id AND status = 'active' \
                 LIMIT 1) AS m",
        )
        .bind(bucket_id)
        .bind(users)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user_id, epoch, entered_at)| {
                (
                    user_id.clone(),
                    ActiveMember {
                        user_id,
                        epoch,
                        entered_at,
                    },
                )
            })
            .collect())
    }

    /// Admits `users` to `bucket_id` at `at`. The caller holds the users' locks and has seen
    /// none of them active.
    ///
    /// The inserts have no `ON CONFLICT`: every writer of a user's memberships holds the
    /// user's lock, so no one else can write the next epoch meanwhile, and membership rows are
    /// never deleted, so the next epoch and its `entered` key are new. A conflict would be a
    /// broken invariant, and fails the round rather than passing unseen; skipping the
    /// speculative insertion spares two unique-index probes and a WAL record per join.
    pub async fn join(
        &mut self,
        bucket_id: &str,
        users: &[String],
        rule: EntryRule,
        source: Source,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<Applied> {
        if users.is_empty() {
            return Ok(Applied::default());
        }
        let (rule_name, period_secs) = match rule {
            EntryRule::Unlimited => ("unlimited", 0),
            EntryRule::Once => ("once", 0),
            EntryRule::OncePerPeriod(secs) => ("once_per_period", secs),
            EntryRule::Silent => ("silent", 0),
        };
        let (memberships, transitions): (i64, i64) = sqlx::query_as(
            "WITH joining AS ( \
                 SELECT j.user_id, earlier.epochs + 1 AS epoch, earlier.last_left \
                 FROM unnest($2::text[]) AS j(user_id) \
                 CROSS JOIN LATERAL (SELECT count(*) AS epochs, max(m.left_at) AS last_left \
                     FROM memberships m WHERE m.bucket_id = $1 AND m.user_id = j.user_id) AS earlier), \
             inserted AS ( \
                 INSERT INTO memberships (bucket_id, user_id, epoch, status, entered_at) \
                 SELECT $1, user_id, epoch, 'active', $6 FROM joining \
                 RETURNING user_id, epoch), \
             emitted AS ( \
                 INSERT INTO transitions (key, bucket_id, user_id, kind, epoch, source, reason, occurred_at) \
                 SELECT 'bucket:' || $1 || ':' || i.user_id || ':entered:' || i.epoch, \
                        $1, i.user_id, 'entered', i.epoch, $4, $5, $6 \
                 FROM inserted i JOIN joining j USING (user_id) \
                 WHERE CASE $3 \
                     WHEN 'unlimited' THEN true \
                     WHEN 'once' THEN i.epoch = 1 \
                     WHEN 'once_per_period' THEN j.last_left IS NULL \
                          OR j.last_left <= $6 - make_interval(secs => $7) \
                     ELSE false END \
                 RETURNING 1) \
             SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM emitted)",
        )
        .bind(bucket_id)
        .bind(users)
        .bind(rule_name)
        .bind(source.as_str())
        .bind(reason)
        .bind(at)
        .bind(period_secs as f64)
        .fetch_one(&mut *self.tx)
        .await?;
        let applied = Applied {
            memberships,
            transitions,
        };
        self.account(bucket_id, applied.memberships, applied);
        Ok(applied)
    }

    /// Closes the given (user, epoch) memberships of `bucket_id` at `at`, each only if it is
    /// still active in that epoch: the loser of a race changes and emits nothing.
    pub async fn leave(
        &mut self,
        bucket_id: &str,
        members: &[(String, i32)],
        source: Source,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<Applied> {
        if members.is_empty() {
            return Ok(Applied::default());
        }
        let (users, epochs): (Vec<String>, Vec<i32>) = members.iter().cloned().unzip();
        let (memberships, transitions): (i64, i64) = sqlx::query_as(
            // The rows are found by one primary-key probe each and updated by their tuple
            // ids: joined to the list, the planner may scan the bucket's whole active set
            // when its statistics are stale. A row changed meanwhile no longer matches its
            // tuple id and is left alone, as the compare-and-swap wants.
            "WITH targets AS MATERIALIZED ( \
                 SELECT m.ctid AS tid FROM unnest($2::text[], $3::int[]) AS l(user_id, epoch) \
                 CROSS JOIN LATERAL (SELECT ctid FROM memberships \
                     WHERE bucket_id = $1 AND user_id = l.user_id AND epoch = l.epoch \
                       AND status = 'active' LIMIT 1) AS m), \
             closed AS ( \
                 UPDATE memberships SET status = 'left', left_at = $6 \
                 WHERE ctid = ANY(ARRAY(SELECT tid FROM targets)) AND status = 'active' \
                 RETURNING user_id, epoch), \
             emitted AS ( \
                 INSERT INTO transitions (key, bucket_id, user_id, kind, epoch, source, reason, occurred_at) \
                 SELECT 'bucket:' || $1 || ':' || user_id || ':left:' || epoch, \
                        $1, user_id, 'left', epoch, $4, $5, $6 \
                 FROM closed \
                 ON CONFLICT (key) DO NOTHING \
                 RETURNING 1) \
             SELECT (SELECT count(*) FROM closed), (SELECT count(*) FROM emitted)",
        )
        .bind(bucket_id)
        .bind(&users)
        .bind(&epochs)
        .bind(source.as_str())
        .bind(reason)
        .bind(at)
        .fetch_one(&mut *self.tx)
        .await?;
        let applied = Applied {
            memberships,
            transitions,
        };
        self.account(bucket_id, -applied.memberships, applied);
        Ok(applied)
    }

    /// Writes the `dwell` transitions in `due`, each only while its membership is still active
    /// in that epoch; a mark written before is skipped by its key. Returns how many were new.
    pub async fn dwell(
        &mut self,
        bucket_id: &str,
        due: &[DwellDue],
        source: Source,
    ) -> Result<i64> {
        if due.is_empty() {
            return Ok(0);
        }
        let users: Vec<&str> = due.iter().map(|d| d.user_id.as_str()).collect();
        let epochs: Vec<i32> = due.iter().map(|d| d.epoch).collect();
        let labels: Vec<&str> = due.iter().map(|d| d.label.as_str()).collect();
        let instants: Vec<DateTime<Utc>> = due.iter().map(|d| d.at).collect();
        let written: i64 = sqlx::query_scalar(
            "WITH emitted AS ( \
                 INSERT INTO transitions (key, bucket_id, user_id, kind, epoch, label, source, reason, occurred_at) \
                 SELECT 'bucket:' || $1 || ':' || d.user_id || ':dwell:' || d.epoch || ':' || d.label, \
                        $1, d.user_id, 'dwell', d.epoch, d.label, $2, 'dwell', d.at \
                 FROM unnest($3::text[], $4::int[], $5::text[], $6::timestamptz[]) AS d(user_id, epoch, label, at) \
                 WHERE EXISTS (SELECT 1 FROM memberships m WHERE m.bucket_id = $1 \
                      AND m.user_id = d.user_id AND m.epoch = d.epoch AND m.status = 'active' \
                      OFFSET 0) \
                 ON CONFLICT (key) DO NOTHING \
                 RETURNING 1) \
             SELECT count(*) FROM emitted",
        )
        .bind(bucket_id)
        .bind(source.as_str())
        .bind(&users)
        .bind(&epochs)
        .bind(&labels)
        .bind(&instants)
        .fetch_one(&mut *self.tx)
        .await?;
        self.account(
            bucket_id,
            0,
            Applied {
                memberships: 0,
                transitions: written,
            },
        );
        Ok(written)
    }

    /// Keeps `buckets.member_count` exact in the same transaction (applied at commit), and
    /// wakes listeners on commit.
    fn account(&mut self, bucket_id: &str, delta: i64, applied: Applied) {
        if delta == 0 && applied.transitions == 0 {
            return;
        }
        let account = self.accounts.entry(bucket_id.to_owned()).or_default();
        account.member_delta += delta;
        account.transitions |= applied.transitions > 0;
    }
}
