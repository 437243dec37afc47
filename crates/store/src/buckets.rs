//! Per-bucket state shared by every engine: the definition serving now, its criteria hash, the
//! operator's enable switch, the last load error, backfill progress and the member count.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::Row;

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

    /// The next page of a sweep that also re-checks candidates: users after `after`, in user
    /// order, `limit` at most, that are active members of `bucket_id` or meet, for each of
    /// `clauses`, one of its requirements; and where the next page starts (`None`: this was
    /// the last). A page may be short, or even empty, with more to come. Windows of event
    /// requirements end at `now`, the earliest instant the page's users are evaluated at: an
    /// event count in a window only falls as time passes (events already dated ahead count
    /// now), so whoever is short of one now stays short without a new event.
    ///
    /// This is exact for candidates when the clauses are ones the criteria cannot be true
    /// without (`Plan::required_facts`, or one clause of every fact the criteria read: they
    /// are false for a blank user). Candidates come from one clause, preferably one of events
    /// alone, in sources read in user order, each `limit` users at most: per event
    /// requirement, its range of `events (name, user_id, occurred_at)` grouped by user, and
    /// for property keys a keyset walk of `contacts`. So a page reads only users with events
    /// of the clause's names (at 1M users, finding the 154k with a `checkout` took 0.9–1.1 s
    /// where walking every contact with a probe each took 6.6–7.0 s on the same host; with
    /// the least count of 2, 117k remain).
    /// A page ends where the first source that stopped at `limit` ends, as past there it
    /// does not know every user; the other clauses are index probes per candidate, reading
    /// up to each requirement's least count of events. A user whose last membership ended by
    /// `max_dwell` is left out unless an event or property change arrived after that leave:
    /// the clock alone never re-admits them.
    pub async fn sweep_page(
        &self,
        bucket_id: &str,
        clauses: &[CandidateClause],
        after: &str,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<SweepPage> {
        // Parameters: $1 bucket, $2 cursor, $3 limit, then each clause's event names, window
        // starts and least counts (one element per requirement), and its keys.
        let param = |i: usize, k: usize| 4 + 4 * i + k;
        let (events_of, since_of, least_of, keys_of) = (
            |i: usize| param(i, 0),
            |i: usize| param(i, 1),
            |i: usize| param(i, 2),
            |i: usize| param(i, 3),
        );
        let driving = clauses
            .iter()
            .position(|clause| clause.keys.is_empty())
            .or((!clauses.is_empty()).then_some(0));
        // Each source in user order, `LIMIT`ed so that it is read as an ordered index range.
        let sources: Vec<String> = match driving {
            Some(i) => {
                let mut sources: Vec<String> = (1..=clauses[i].events.len())
                    .map(|n| {
                        format!(
                            "SELECT user_id FROM events \
                             WHERE name = (${}::text[])[{n}] AND user_id > $2 \
                               AND occurred_at >= (${}::timestamptz[])[{n}] \
                             GROUP BY user_id HAVING count(*) >= (${}::int8[])[{n}] \
                             ORDER BY user_id LIMIT $3",
                            events_of(i),
                            since_of(i),
                            least_of(i)
                        )
                    })
                    .collect();
                if !clauses[i].keys.is_empty() {
                    sources.push(format!(
                        "SELECT user_id FROM contacts \
                         WHERE user_id > $2 AND properties ?| ${} ORDER BY user_id LIMIT $3",
                        keys_of(i)
                    ));
                }
                sources
            }
            None => vec![
                "SELECT user_id FROM contacts WHERE user_id > $2 ORDER BY user_id LIMIT $3"
                    .to_owned(),
            ],
        };
        let mut holds = Vec::new();
        for (i, clause) in clauses.iter().enumerate() {
            if Some(i) == driving {
                continue;
            }
            let mut either = Vec::new();
            if !clause.keys.is_empty() {
                either.push(format!(
                    "EXISTS (SELECT 1 FROM contacts c \
                             WHERE c.user_id = d.user_id AND c.properties ?| ${})",
                    keys_of(i)
                ));
            }
            if !clause.events.is_empty() {
                // Per requirement, at most its least count of events is read.
                either.push(format!(
                    "EXISTS (SELECT 1 FROM unnest(${}::text[], ${}::timestamptz[], ${}::int8[]) \
                                 AS r(name, since, least) \
                             WHERE (SELECT count(*) FROM (SELECT 1 FROM events e \
                                        WHERE e.name = r.name AND e.user_id = d.user_id \
                                          AND e.occurred_at >= r.since LIMIT r.least) AS x) \
                                   >= r.least)",
                    events_of(i),
                    since_of(i),
                    least_of(i)
                ));
            }
            if either.is_empty() {
                either.push("false".to_owned()); // a clause that names nothing holds for no one
            }
            holds.push(format!("({})", either.join(" OR ")));
        }
        if holds.is_empty() {
            holds.push("true".to_owned());
        }

        let source_ctes: String = sources
            .iter()
            .enumerate()
            .map(|(n, sql)| format!(", source_{n} AS ({sql})"))
            .collect();
        let read_sources: String = (0..sources.len())
            .map(|n| format!(", ARRAY(SELECT user_id FROM source_{n})"))
            .collect();
        let candidates = if sources.is_empty() {
            "SELECT NULL::text AS user_id WHERE false".to_owned()
        } else {
            (0..sources.len())
                .map(|n| format!("SELECT user_id FROM source_{n}"))
                .collect::<Vec<_>>()
                .join(" UNION ALL ")
        };
        // The members, each source, the candidates among the sources' users, and the users
        // among those the clock may not re-admit; Rust merges them into the page
        // (`page_of`): a union, a sort and two aggregates per source in Postgres were a fifth
        // of finding a page. Those max_dwell took out are one range of a partial index, not a
        // probe per candidate. Byte order on both sides: user ids are `COLLATE "C"`.
        let sql = format!(
            "WITH RECURSIVE {}, \
             members AS ( \
                 SELECT user_id FROM memberships \
                 WHERE bucket_id = $1 AND status = 'active' AND user_id > $2 \
                 ORDER BY user_id LIMIT $3){source_ctes}, \
             candidates AS (SELECT d.user_id FROM ({candidates}) AS d WHERE {}) \
             SELECT ARRAY(SELECT user_id FROM members){read_sources}, \
                    ARRAY(SELECT user_id FROM candidates), \
                    ARRAY(SELECT b.user_id FROM ( \
                        SELECT DISTINCT t.user_id FROM transitions t \
                        WHERE t.reason = 'max_dwell' AND t.bucket_id = $1 AND t.user_id > $2 \
                          AND t.user_id <= (SELECT max(user_id) FROM candidates)) AS b \
                          WHERE {})",
            crate::EVENT_NAMES,
            holds.join(" AND "),
            crate::timers::rejoin_blocked("b.user_id")
        );
        // Whole milliseconds, as fact gathering truncates `now`: no later evaluation's window
        // starts before this one.
        let now_ms = now.timestamp_millis();
        let mut query = sqlx::query(&sql).bind(bucket_id).bind(after).bind(limit);
        for clause in clauses {
            let names: Vec<&str> = clause.events.iter().map(|e| e.name.as_str()).collect();
            let since: Vec<DateTime<Utc>> = clause
                .events
                .iter()
                .map(|event| window_start(now_ms, event.within_secs))
                .collect();
            let least: Vec<i64> = clause.events.iter().map(|e| e.at_least).collect();
            query = query.bind(names).bind(since).bind(least).bind(&clause.keys);
        }
        let row = query.fetch_one(self.pool()).await?;
        // Column 0 the members, then one per source, then the candidates, then the blocked.
        let read = |column: usize| -> Result<Vec<String>> {
            let mut users: Vec<String> = row.try_get(column)?;
            users.sort_unstable();
            Ok(users)
        };
        let mut lists = Vec::with_capacity(sources.len() + 1);
        for column in 0..=sources.len() {
            lists.push(read(column)?);
        }
        let mut candidates = read(sources.len() + 1)?;
        let blocked = read(sources.len() + 2)?;
        candidates.retain(|user| blocked.binary_search(user).is_err());
        Ok(page_of(&lists, candidates, limit))
    }

    /// Whether `bucket_id` was swept in the last `within`: another engine has done this round
    /// of the backstop, so this one leaves it.
    pub async fn swept_within(&self, bucket_id: &str, within: std::time::Duration) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce((SELECT finished_at > now() - make_interval(secs => $2) \
                              FROM sweep_runs WHERE bucket_id = $1 ORDER BY id DESC LIMIT 1), false)",
        )
        .bind(bucket_id)
        .bind(within.as_secs_f64())
        .fetch_one(self.pool())
        .await?)
    }

    /// Takes the session-level advisory lock of `work` on `bucket_id` if no other session
    /// holds it. `None`: another engine is doing that work on that bucket now.
    pub async fn try_lock_bucket(
        &self,
        work: BucketWork,
        bucket_id: &str,
    ) -> Result<Option<BucketLock>> {
        let mut connection = self.pool().acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(work as i32)
            .bind(bucket_id)
            .fetch_one(&mut *connection)
            .await?;
        Ok(locked.then(|| BucketLock {
            connection: Some(connection),
            work,
            bucket_id: bucket_id.to_owned(),
        }))
    }

    /// Where the backfill of `criteria_hash` stands, starting it (with the number of known
    /// users as its total) if it has not started. The progress of every other version of the
    /// bucket is dropped: its cursor would be wrong once this version has evaluated anyone.
    pub async fn resume_backfill(
        &self,
        bucket_id: &str,
        criteria_hash: &str,
    ) -> Result<BackfillProgress> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("DELETE FROM backfill_progress WHERE bucket_id = $1 AND criteria_hash <> $2")
            .bind(bucket_id)
            .bind(criteria_hash)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO backfill_progress (bucket_id, criteria_hash, total_estimate) \
             SELECT $1, $2, count(*) FROM contacts \
             ON CONFLICT (bucket_id, criteria_hash) DO NOTHING",
        )
        .bind(bucket_id)
        .bind(criteria_hash)
        .execute(&mut *tx)
        .await?;
        let progress = sqlx::query_as(
            "SELECT bucket_id, criteria_hash, cursor, users_done, total_estimate, started_at, \
                    finished_at \
             FROM backfill_progress WHERE bucket_id = $1 AND criteria_hash = $2",
        )
        .bind(bucket_id)
        .bind(criteria_hash)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(progress)
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

/// A page of a sweep ([`Store::sweep_page`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepPage {
    pub users: Vec<String>,
    /// Where the next page starts (after this user); `None` after the last page.
    pub next: Option<String>,
}

/// A sweep page from its sources read in user order (`lists`: the members, then each source of
/// candidates, each read `limit` users at most) and the candidates among them. A source that
/// stopped at `limit` does not know the users past its last, so the page ends at the first
/// such source's last user.
fn page_of(lists: &[Vec<String>], candidates: Vec<String>, limit: i64) -> SweepPage {
    let full = |list: &&Vec<String>| list.len() as i64 >= limit;
    let bound = lists
        .iter()
        .filter(full)
        .filter_map(|list| list.last())
        .min();
    let mut users: Vec<String> = lists[0].iter().cloned().chain(candidates).collect();
    users.sort_unstable();
    users.dedup();
    users.retain(|user| bound.is_none_or(|bound| user <= bound));
    users.truncate(usize::try_from(limit).unwrap_or(0));
    let next = match users.last() {
        Some(last) if users.len() as i64 >= limit => Some(last.clone()),
        _ => bound.cloned(),
    };
    SweepPage { users, next }
}

/// What a sweep candidate must meet at least one of: an event requirement, or a property of one
/// of these keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CandidateClause {
    pub events: Vec<EventRequirement>,
    pub keys: Vec<String>,
}

/// At least `at_least` events named `name`; with `within_secs`, of those that occurred in that
/// window before the sweep's `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRequirement {
    pub name: String,
    pub within_secs: Option<u64>,
    pub at_least: i64,
}

/// The start of a window of `within_secs` ending at `now_ms`; without a window, or one reaching
/// past every storable instant, Postgres's earliest instant.
fn window_start(now_ms: i64, within_secs: Option<u64>) -> DateTime<Utc> {
    within_secs
        .and_then(|secs| crate::facts::window_start(now_ms, secs))
        .unwrap_or_else(|| {
            DateTime::from_timestamp_millis(crate::facts::EARLIEST_POSTGRES_TIME_MS)
                .expect("Postgres's earliest instant is within chrono's range")
        })
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

/// Work on one bucket that at most one engine does at a time; the value is the first key of
/// its advisory lock (the second is the bucket id's hash; a collision only serializes two
/// buckets' work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketWork {
    Sweep = 0x6d62_0001,
    Backfill = 0x6d62_0002,
}

/// A held advisory lock on one bucket's [`BucketWork`]. Release it with
/// [`BucketLock::release`]; dropped unreleased (an error or a panic on the way), its
/// connection is closed rather than returned to the pool, which releases the lock too.
#[derive(Debug)]
pub struct BucketLock {
    connection: Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
    work: BucketWork,
    bucket_id: String,
}

impl BucketLock {
    pub async fn release(mut self) -> Result<()> {
        if let Some(mut connection) = self.connection.take() {
            sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
                .bind(self.work as i32)
                .bind(&self.bucket_id)
                .execute(&mut *connection)
                .await?;
        }
        Ok(())
    }
}

impl Drop for BucketLock {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            drop(connection.detach());
        }
    }
}

/// How far the backfill of one bucket version has come.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct BackfillProgress {
    pub bucket_id: String,
    pub criteria_hash: String,
    /// The last user id done, in user order ("" before the first page).
    pub cursor: String,
    pub users_done: i64,
    /// Known users when the backfill started.
    pub total_estimate: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl BackfillProgress {
    /// Whole percent done, 100 only when finished (users that arrived after the start can push
    /// `users_done` past the estimate).
    pub fn percent(&self) -> i64 {
        if self.finished_at.is_some() {
            return 100;
        }
        let total = self.total_estimate.max(self.users_done).max(1);
        (self.users_done * 100 / total).min(99)
    }
}

impl Round {
    /// Whether `bucket_id` is still enabled by the operator, not removed, and recorded at
    /// `criteria_hash`: read by every page of a sweep or backfill, so a disable or a newer
    /// version stops it at the next page.
    pub async fn still_serving(&mut self, bucket_id: &str, criteria_hash: &str) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce((SELECT enabled AND status <> 'removed' AND criteria_hash = $2 \
                              FROM buckets WHERE id = $1), false)",
        )
        .bind(bucket_id)
        .bind(criteria_hash)
        .fetch_one(&mut *self.tx)
        .await?)
    }

    /// Advances the backfill of `criteria_hash` past `users`, a page ending at `cursor`, in the
    /// page's own transaction: the page's memberships and its progress commit together.
    pub async fn advance_backfill(
        &mut self,
        bucket_id: &str,
        criteria_hash: &str,
        cursor: &str,
        users: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE backfill_progress SET cursor = $3, users_done = users_done + $4, \
                    updated_at = now() \
             WHERE bucket_id = $1 AND criteria_hash = $2",
        )
        .bind(bucket_id)
        .bind(criteria_hash)
        .bind(cursor)
        .bind(users)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

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
        sqlx::query(
            "UPDATE backfill_progress SET finished_at = now(), updated_at = now() \
             WHERE bucket_id = $1 AND criteria_hash = $2 AND finished_at IS NULL",
        )
        .bind(bucket_id)
        .bind(criteria_hash)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}
