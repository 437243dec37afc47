//! Durable timers: one row per (bucket, user) holding the next instant anything about that user
//! in that bucket can change with no new event. Rounds re-arm them for every user they evaluate;
//! the engine's timer task claims the due ones. A row is only written by a round that holds the
//! user's contact lock, so claiming a timer is locking its user.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::round::{request_index, Round};
use crate::{Result, Store};

/// Channel notified (on commit) when a round arms a timer due soon; the payload is its instant
/// in Unix milliseconds, so a sleeping timer task can wake earlier.
pub const TIMERS_CHANNEL: &str = "membrane_timers";

/// How [`Round::arm_timers`] treats a user's existing timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArmPolicy {
    /// The timer becomes exactly the wanted instant, or goes.
    Exact,
    /// The timer only moves earlier (or is created): one due earlier than needed fires,
    /// changes nothing, and is then re-armed exactly (the timer path arms `Exact`). Events
    /// usually push a window's edge later, so most real-time evaluations write nothing.
    EarlierOnly,
}

/// A timer that has come due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueTimer {
    pub bucket_id: String,
    pub user_id: String,
    pub due_at: DateTime<Utc>,
}

/// What one claim found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimerClaim {
    /// Due timers whose users this round now holds, earliest first.
    pub claimed: Vec<DueTimer>,
    /// Due timers seen (at most the claim's limit), including those whose user another round
    /// holds: when it reaches the limit, more may be due.
    pub seen: usize,
}

/// The wanted timers of one bucket: for each of `users`, the matching instant of `due` (`None`:
/// no timer).
#[derive(Debug, Clone, Copy)]
pub struct Arming<'a> {
    pub bucket_id: &'a str,
    pub users: &'a [String],
    pub due: &'a [Option<DateTime<Utc>>],
}

impl Round {
    /// The armed timers of `bucket_id` from user `first` to `last` (inclusive, in user order),
    /// by user: one range of the primary key, read once for a page of users in user order.
    pub async fn armed_timers_between(
        &mut self,
        bucket_id: &str,
        first: &str,
        last: &str,
    ) -> Result<HashMap<String, DateTime<Utc>>> {
        let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT user_id, due_at FROM timers \
             WHERE bucket_id = $1 AND user_id BETWEEN $2 AND $3",
        )
        .bind(bucket_id)
        .bind(first)
        .bind(last)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Sets the timer of each of `users` in `bucket_id` to the matching instant of `due`
    /// (`None`: no timer), in one statement, as `policy` says. When a timer is armed or moved
    /// to an instant before `notify_before`, the timer task is told on commit. Returns how
    /// many were armed or moved.
    pub async fn arm_timers(
        &mut self,
        bucket_id: &str,
        users: &[String],
        due: &[Option<DateTime<Utc>>],
        policy: ArmPolicy,
        notify_before: DateTime<Utc>,
    ) -> Result<u64> {
        let arming = Arming {
            bucket_id,
            users,
            due,
        };
        let mut armed = self
            .arm_timers_all(&[arming], policy, notify_before)
            .await?;
        Ok(armed.pop().expect("one count per arming"))
    }

    /// [`Round::arm_timers`] for several buckets in one statement; returns how many timers each
    /// arming armed or moved, in order. Each (bucket, user) pair is named at most once.
    pub async fn arm_timers_all(
        &mut self,
        armings: &[Arming<'_>],
        policy: ArmPolicy,
        notify_before: DateTime<Utc>,
    ) -> Result<Vec<u64>> {
        let mut counts = vec![0; armings.len()];
        let (mut indexes, mut buckets, mut users, mut due) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, arming) in armings.iter().enumerate() {
            // Only `Exact` removes timers: with nothing due there is nothing to write (the
            // common case of a bucket that does not move with the clock).
            if policy == ArmPolicy::EarlierOnly && arming.due.iter().all(Option::is_none) {
                continue;
            }
            for (user, at) in arming.users.iter().zip(arming.due) {
                indexes.push(request_index(i));
                buckets.push(arming.bucket_id);
                users.push(user.as_str());
                due.push(*at);
            }
        }
        if users.is_empty() {
            return Ok(counts);
        }
        // Lookups are a probe per user (a lateral subquery with `LIMIT`, or `EXISTS` with
        // `OFFSET 0`, which the planner does not turn into a join): on a table that grew
        // since it was last analyzed, a join may be planned as a scan of the whole bucket.
        // Timers already where they should be are not offered to the upsert at all: its
        // conflict path locks the row (a WAL record and a dirtied page) before its `WHERE`
        // decides to leave it, and most real-time evaluations leave every timer as it is.
        let armed: Vec<(i32, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
            "WITH wanted AS MATERIALIZED ( \
                 SELECT DISTINCT ON (bucket_id, user_id) request, bucket_id, user_id, due_at \
                 FROM unnest($1::int4[], $2::text[], $3::text[], $4::timestamptz[]) \
                     AS w(request, bucket_id, user_id, due_at)), \
             removed AS ( \
                 DELETE FROM timers WHERE $5 AND ctid = ANY(ARRAY( \
                     SELECT t.ctid FROM wanted w CROSS JOIN LATERAL ( \
                         SELECT ctid FROM timers \
                         WHERE bucket_id = w.bucket_id AND user_id = w.user_id LIMIT 1) AS t \
                     WHERE w.due_at IS NULL))), \
             armed AS ( \
                 INSERT INTO timers (bucket_id, user_id, due_at) \
                 SELECT w.bucket_id, w.user_id, w.due_at FROM wanted w \
                 WHERE w.due_at IS NOT NULL AND NOT EXISTS ( \
                     SELECT 1 FROM timers t \
                     WHERE t.bucket_id = w.bucket_id AND t.user_id = w.user_id \
                       AND CASE WHEN $5 THEN t.due_at = w.due_at ELSE t.due_at <= w.due_at END \
                     OFFSET 0) \
                 ON CONFLICT (bucket_id, user_id) DO UPDATE SET due_at = EXCLUDED.due_at \
                 WHERE CASE WHEN $5 THEN timers.due_at IS DISTINCT FROM EXCLUDED.due_at \
                            ELSE EXCLUDED.due_at < timers.due_at END \
                 RETURNING bucket_id, user_id, due_at) \
             SELECT w.request, count(*), min(a.due_at) \
             FROM armed a JOIN wanted w USING (bucket_id, user_id) GROUP BY w.request",
        )
        .bind(&indexes)
        .bind(&buckets)
        .bind(&users)
        .bind(&due)
        .bind(policy == ArmPolicy::Exact)
        .fetch_all(&mut *self.tx)
        .await?;
        let mut earliest: Option<DateTime<Utc>> = None;
        for (request, count, first) in armed {
            if let Some(slot) = usize::try_from(request)
                .ok()
                .and_then(|i| counts.get_mut(i))
            {
                *slot = count as u64;
            }
            earliest = earliest.into_iter().chain(first).min();
        }
        if let Some(earliest) = earliest.filter(|at| *at < notify_before) {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(TIMERS_CHANNEL)
                .bind(earliest.timestamp_millis().to_string())
                .execute(&mut *self.tx)
                .await?;
        }
        Ok(counts)
    }

    /// Claims up to `limit` timers of `buckets` due at `now`, earliest first, by locking their
    /// users' contact rows (in user order, skipping users another round holds: it is
    /// evaluating them and will re-arm or leave the timer for the next claim).
    pub async fn claim_due_timers(
        &mut self,
        buckets: &[String],
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<TimerClaim> {
        let rows: Vec<(String, String, DateTime<Utc>, i64)> = sqlx::query_as(
            "WITH due AS MATERIALIZED ( \
                 SELECT t.bucket_id, t.user_id, t.due_at \
                 FROM unnest($1::text[]) AS b(id) \
                 CROSS JOIN LATERAL ( \
                     SELECT bucket_id, user_id, due_at FROM timers \
                     WHERE bucket_id = b.id AND due_at <= $2 \
                     ORDER BY due_at LIMIT $3) AS t \
                 ORDER BY t.due_at LIMIT $3), \
             locked AS MATERIALIZED ( \
                 SELECT c.user_id FROM (SELECT DISTINCT user_id FROM due) AS u \
                 CROSS JOIN LATERAL ( \
                     SELECT user_id FROM contacts WHERE user_id = u.user_id \
                     FOR UPDATE SKIP LOCKED) AS c) \
             SELECT d.bucket_id, d.user_id, d.due_at, (SELECT count(*) FROM due) \
             FROM due d JOIN locked l USING (user_id) \
             ORDER BY d.due_at",
        )
        .bind(buckets)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?;
        let seen = match rows.first() {
            Some(&(_, _, _, seen)) => seen as usize,
            // Nothing locked: tell "nothing due" from "all held by others".
            None => {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM (SELECT 1 FROM timers \
                     WHERE bucket_id = ANY($1) AND due_at <= $2 LIMIT $3) AS due",
                )
                .bind(buckets)
                .bind(now)
                .bind(limit)
                .fetch_one(&mut *self.tx)
                .await? as usize
            }
        };
        Ok(TimerClaim {
            claimed: rows
                .into_iter()
                .map(|(bucket_id, user_id, due_at, _)| DueTimer {
                    bucket_id,
                    user_id,
                    due_at,
                })
                .collect(),
            seen,
        })
    }

    /// Those of `users` whose last membership of `bucket_id` ended by `max_dwell` with no event
    /// received and no property changed since: the clock alone must not bring them back.
    pub async fn clock_rejoin_blocked(
        &mut self,
        bucket_id: &str,
        users: &[String],
    ) -> Result<HashSet<String>> {
        if users.is_empty() {
            return Ok(HashSet::new());
        }
        let sql = format!(
            "WITH RECURSIVE {} SELECT u.user_id FROM unnest($2::text[]) AS u(user_id) WHERE {}",
            crate::EVENT_NAMES,
            rejoin_blocked("u.user_id")
        );
        let blocked: Vec<String> = sqlx::query_scalar(&sql)
            .bind(bucket_id)
            .bind(users)
            .fetch_all(&mut *self.tx)
            .await?;
        Ok(blocked.into_iter().collect())
    }
}

/// A condition on `user` (an SQL expression) and bucket `$1`, for a statement that has
/// [`crate::EVENT_NAMES`]: their last membership ended by `max_dwell`, and no event was received
/// and no property changed since, so the clock alone must not bring them back. Compared with
/// the leave's own commit-side clock (`created_at`), as ingest stamps `received_at` and
/// `updated_at` with the database's clock too. The first probe is of `transitions_max_dwell`,
/// which holds only max_dwell leaves: for anyone else the condition costs one index descent.
/// (`OFFSET 0` keeps it a probe per user: as a `NOT EXISTS`, the planner made it an anti-join
/// that sorted every candidate of the sweep for each page.)
pub(crate) fn rejoin_blocked(user: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM transitions t \
                 WHERE t.reason = 'max_dwell' AND t.bucket_id = $1 AND t.user_id = {user} \
                   AND t.kind = 'left' \
                   AND t.epoch = (SELECT max(l.epoch) FROM memberships l \
                                  WHERE l.bucket_id = $1 AND l.user_id = {user}) \
                   AND NOT EXISTS (SELECT 1 FROM events e \
                                   WHERE e.name = ANY({}) AND e.user_id = {user} \
                                     AND e.received_at > t.created_at) \
                   AND NOT EXISTS (SELECT 1 FROM contacts c \
                                   WHERE c.user_id = {user} AND c.updated_at > t.created_at) \
                 OFFSET 0)",
        crate::ALL_EVENT_NAMES
    )
}

impl Store {
    /// The earliest timer of `buckets`, due or not.
    pub async fn earliest_timer(&self, buckets: &[String]) -> Result<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar(
            "SELECT min(t.due_at) FROM unnest($1::text[]) AS b(id) \
             CROSS JOIN LATERAL (SELECT due_at FROM timers WHERE bucket_id = b.id \
                                 ORDER BY due_at LIMIT 1) AS t",
        )
        .bind(buckets)
        .fetch_one(self.pool())
        .await?)
    }

    /// How many timers of `buckets` are due at `now`.
    pub async fn due_timer_count(&self, buckets: &[String], now: DateTime<Utc>) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM timers WHERE bucket_id = ANY($1) AND due_at <= $2",
        )
        .bind(buckets)
        .bind(now)
        .fetch_one(self.pool())
        .await?)
    }

    /// The timer of `user_id` in `bucket_id`, if armed.
    pub async fn timer_of(&self, bucket_id: &str, user_id: &str) -> Result<Option<DateTime<Utc>>> {
        Ok(
            sqlx::query_scalar("SELECT due_at FROM timers WHERE bucket_id = $1 AND user_id = $2")
                .bind(bucket_id)
                .bind(user_id)
                .fetch_optional(self.pool())
                .await?,
        )
    }
}
