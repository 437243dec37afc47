//! Memberships and the transitions outbox. A join inserts the next epoch's active row; a leave
//! flips the active row with a compare-and-swap; each emitted transition is inserted in the same
//! statement under its unique key, so retries and racing writers neither lose nor duplicate one.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::round::{request_index, Round};
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

/// Users to admit to one bucket, and how their `entered` transitions are recorded.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    pub bucket_id: &'a str,
    pub users: &'a [String],
    pub rule: EntryRule,
    pub source: Source,
    pub reason: &'a str,
}

/// Memberships of one bucket to close, each `(user, epoch)`, and how their `left` transitions
/// are recorded.
#[derive(Debug, Clone, Copy)]
pub struct Departure<'a> {
    pub bucket_id: &'a str,
    pub members: &'a [(String, i32)],
    pub source: Source,
    pub reason: &'a str,
}

/// The outbox key of a `dwell` transition, over bucket `$1` and a row `d` with `user_id`,
/// `epoch` and `label`: written by [`Round::dwell`], looked up by
/// [`Round::unwritten_dwell_marks`].
const DWELL_KEY: &str =
    "'bucket:' || $1 || ':' || d.user_id || ':dwell:' || d.epoch || ':' || d.label";

impl Round {
    /// The active memberships of `users` in `bucket_id`, keyed by user.
    pub async fn active_members(
        &mut self,
        bucket_id: &str,
        users: &[String],
    ) -> Result<HashMap<String, ActiveMember>> {
        let mut found = self.active_members_of(&[(bucket_id, users)]).await?;
        Ok(found.pop().expect("one map per bucket"))
    }

    /// The active members of `bucket_id` from `first` to `last` (inclusive, in user order), by
    /// user: one range of the active-member index. For a page of users in user order this
    /// reads each index page once, where a probe per user descends the index for each.
    pub async fn active_members_between(
        &mut self,
        bucket_id: &str,
        first: &str,
        last: &str,
    ) -> Result<HashMap<String, ActiveMember>> {
        let rows: Vec<(String, i32, DateTime<Utc>)> = sqlx::query_as(
            "SELECT user_id, epoch, entered_at FROM memberships \
             WHERE bucket_id = $1 AND status = 'active' AND user_id BETWEEN $2 AND $3",
        )
        .bind(bucket_id)
        .bind(first)
        .bind(last)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user_id, epoch, entered_at)| {
                let member = ActiveMember {
                    user_id: user_id.clone(),
                    epoch,
                    entered_at,
                };
                (user_id, member)
            })
            .collect())
    }

    /// [`Round::active_members`] of several `(bucket, users)` pairs in one statement, one map
    /// per pair in order.
    pub async fn active_members_of(
        &mut self,
        requests: &[(&str, &[String])],
    ) -> Result<Vec<HashMap<String, ActiveMember>>> {
        let (mut indexes, mut buckets, mut users) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (bucket_id, members)) in requests.iter().enumerate() {
            for user in *members {
                indexes.push(request_index(i));
                buckets.push(*bucket_id);
                users.push(user.as_str());
            }
        }
        let mut found = vec![HashMap::new(); requests.len()];
        if users.is_empty() {
            return Ok(found);
        }
        let rows: Vec<(i32, String, i32, DateTime<Utc>)> = sqlx::query_as(
            // One index probe per user, whatever the statistics say: on a table that grew
            // since it was last analyzed, the planner scans the bucket's whole active set and
            // filters it by user. (`LIMIT` keeps the subquery from being flattened into a
            // join the planner could reorder; there is at most one active row anyway.)
            "SELECT u.request, m.user_id, m.epoch, m.entered_at \
             FROM unnest($1::int4[], $2::text[], $3::text[]) AS u(request, bucket_id, user_id) \
             CROSS JOIN LATERAL (SELECT user_id, epoch, entered_at FROM memberships \
                 WHERE bucket_id = u.bucket_id AND user_id = u.user_id AND status = 'active' \
                 LIMIT 1) AS m",
        )
        .bind(&indexes)
        .bind(&buckets)
        .bind(&users)
        .fetch_all(&mut *self.tx)
        .await?;
        for (request, user_id, epoch, entered_at) in rows {
            if let Some(members) = usize::try_from(request).ok().and_then(|i| found.get_mut(i)) {
                let member = ActiveMember {
                    user_id: user_id.clone(),
                    epoch,
                    entered_at,
                };
                members.insert(user_id, member);
            }
        }
        Ok(found)
    }

    /// Admits `users` to `bucket_id` at `at`. The caller holds the users' locks and has seen
    /// none of them active.
    pub async fn join(
        &mut self,
        bucket_id: &str,
        users: &[String],
        rule: EntryRule,
        source: Source,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<Applied> {
        let admission = Admission {
            bucket_id,
            users,
            rule,
            source,
            reason,
        };
        let mut applied = self.join_all(&[admission], at).await?;
        Ok(applied.pop().expect("one outcome per admission"))
    }

    /// Applies every admission at `at` in one statement; returns what each did, in order. The
    /// caller holds the users' locks and has seen none of them active in the bucket, and names
    /// each (bucket, user) pair at most once.
    ///
    /// The inserts have no `ON CONFLICT`: every writer of a user's memberships holds the
    /// user's lock, so no one else can write the next epoch meanwhile, and membership rows are
    /// never deleted, so the next epoch and its `entered` key are new. A conflict would be a
    /// broken invariant, and fails the round rather than passing unseen; skipping the
    /// speculative insertion spares two unique-index probes and a WAL record per join.
    pub async fn join_all(
        &mut self,
        admissions: &[Admission<'_>],
        at: DateTime<Utc>,
    ) -> Result<Vec<Applied>> {
        let mut outcomes = vec![Applied::default(); admissions.len()];
        let (mut indexes, mut buckets, mut users) = (Vec::new(), Vec::new(), Vec::new());
        let (mut rules, mut periods, mut sources, mut reasons) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, admission) in admissions.iter().enumerate() {
            for user in admission.users {
                indexes.push(request_index(i));
                buckets.push(admission.bucket_id);
                users.push(user.as_str());
            }
            let (rule_name, period_secs) = match admission.rule {
                EntryRule::Unlimited => ("unlimited", 0),
                EntryRule::Once => ("once", 0),
                EntryRule::OncePerPeriod(secs) => ("once_per_period", secs),
                EntryRule::Silent => ("silent", 0),
            };
            rules.push(rule_name);
            periods.push(period_secs as f64);
            sources.push(admission.source.as_str());
            reasons.push(admission.reason);
        }
        if users.is_empty() {
            return Ok(outcomes);
        }
        let counts: Vec<(i32, i64, i64)> = sqlx::query_as(
            "WITH joining AS ( \
                 SELECT j.request, j.bucket_id, j.user_id, earlier.epochs + 1 AS epoch, \
                        earlier.last_left \
                 FROM unnest($1::int4[], $2::text[], $3::text[]) AS j(request, bucket_id, user_id) \
                 CROSS JOIN LATERAL (SELECT count(*) AS epochs, max(m.left_at) AS last_left \
                     FROM memberships m \
                     WHERE m.bucket_id = j.bucket_id AND m.user_id = j.user_id) AS earlier), \
             rules AS ( \
                 SELECT (ordinality - 1)::int4 AS request, rule, period_secs, source, reason \
                 FROM unnest($4::text[], $5::float8[], $6::text[], $7::text[]) \
                     WITH ORDINALITY AS r(rule, period_secs, source, reason)), \
             inserted AS ( \
                 INSERT INTO memberships (bucket_id, user_id, epoch, status, entered_at) \
                 SELECT bucket_id, user_id, epoch, 'active', $8 FROM joining \
                 RETURNING bucket_id, user_id, epoch), \
             emitted AS ( \
                 INSERT INTO transitions (key, bucket_id, user_id, kind, epoch, source, reason, occurred_at) \
                 SELECT 'bucket:' || i.bucket_id || ':' || i.user_id || ':entered:' || i.epoch, \
                        i.bucket_id, i.user_id, 'entered', i.epoch, r.source, r.reason, $8 \
                 FROM inserted i JOIN joining j USING (bucket_id, user_id) \
                 JOIN rules r ON r.request = j.request \
                 WHERE CASE r.rule \
                     WHEN 'unlimited' THEN true \
                     WHEN 'once' THEN i.epoch = 1 \
                     WHEN 'once_per_period' THEN j.last_left IS NULL \
                          OR j.last_left <= $8 - make_interval(secs => r.period_secs) \
                     ELSE false END \
                 RETURNING bucket_id, user_id) \
             SELECT j.request, count(*), count(e.user_id) \
             FROM joining j LEFT JOIN emitted e USING (bucket_id, user_id) \
             GROUP BY j.request",
        )
        .bind(&indexes)
        .bind(&buckets)
        .bind(&users)
        .bind(&rules)
        .bind(&periods)
        .bind(&sources)
        .bind(&reasons)
        .bind(at)
        .fetch_all(&mut *self.tx)
        .await?;
        for (request, memberships, transitions) in counts {
            if let Some(i) = usize::try_from(request)
                .ok()
                .filter(|i| *i < admissions.len())
            {
                let applied = Applied {
                    memberships,
                    transitions,
                };
                self.account(admissions[i].bucket_id, applied.memberships, applied);
                outcomes[i] = applied;
            }
        }
        Ok(outcomes)
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
        let departure = Departure {
            bucket_id,
            members,
            source,
            reason,
        };
        let mut applied = self.leave_all(&[departure], at).await?;
        Ok(applied.pop().expect("one outcome per departure"))
    }

    /// Applies every departure at `at` in one statement, as [`Round::leave`] does each; returns
    /// what each did, in order. Each (bucket, user, epoch) is named at most once.
    pub async fn leave_all(
        &mut self,
        departures: &[Departure<'_>],
        at: DateTime<Utc>,
    ) -> Result<Vec<Applied>> {
        let mut outcomes = vec![Applied::default(); departures.len()];
        let (mut indexes, mut buckets, mut users, mut epochs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, departure) in departures.iter().enumerate() {
            for (user, epoch) in departure.members {
                indexes.push(request_index(i));
                buckets.push(departure.bucket_id);
                users.push(user.as_str());
                epochs.push(*epoch);
            }
        }
        if users.is_empty() {
            return Ok(outcomes);
        }
        let sources: Vec<&str> = departures.iter().map(|d| d.source.as_str()).collect();
        let reasons: Vec<&str> = departures.iter().map(|d| d.reason).collect();
        let counts: Vec<(i32, i64, i64)> = sqlx::query_as(
            // The rows are found by one primary-key probe each and updated by their tuple
            // ids: joined to the list, the planner may scan the bucket's whole active set
            // when its statistics are stale. A row changed meanwhile no longer matches its
            // tuple id and is left alone, as the compare-and-swap wants.
            "WITH leaving AS MATERIALIZED ( \
                 SELECT * FROM unnest($1::int4[], $2::text[], $3::text[], $4::int4[]) \
                     AS l(request, bucket_id, user_id, epoch)), \
             reasons AS ( \
                 SELECT (ordinality - 1)::int4 AS request, source, reason \
                 FROM unnest($5::text[], $6::text[]) WITH ORDINALITY AS r(source, reason)), \
             targets AS MATERIALIZED ( \
                 SELECT m.ctid AS tid FROM leaving l \
                 CROSS JOIN LATERAL (SELECT ctid FROM memberships \
                     WHERE bucket_id = l.bucket_id AND user_id = l.user_id AND epoch = l.epoch \
                       AND status = 'active' LIMIT 1) AS m), \
             closed AS ( \
                 UPDATE memberships SET status = 'left', left_at = $7 \
                 WHERE ctid = ANY(ARRAY(SELECT tid FROM targets)) AND status = 'active' \
                 RETURNING bucket_id, user_id, epoch), \
             described AS MATERIALIZED ( \
                 SELECT l.request, c.bucket_id, c.user_id, c.epoch \
                 FROM closed c JOIN leaving l USING (bucket_id, user_id, epoch)), \
             emitted AS ( \
                 INSERT INTO transitions (key, bucket_id, user_id, kind, epoch, source, reason, occurred_at) \
                 SELECT 'bucket:' || d.bucket_id || ':' || d.user_id || ':left:' || d.epoch, \
                        d.bucket_id, d.user_id, 'left', d.epoch, r.source, r.reason, $7 \
                 FROM described d JOIN reasons r USING (request) \
                 ON CONFLICT (key) DO NOTHING \
                 RETURNING bucket_id, user_id, epoch) \
             SELECT d.request, count(*), count(e.user_id) \
             FROM described d LEFT JOIN emitted e USING (bucket_id, user_id, epoch) \
             GROUP BY d.request",
        )
        .bind(&indexes)
        .bind(&buckets)
        .bind(&users)
        .bind(&epochs)
        .bind(&sources)
        .bind(&reasons)
        .bind(at)
        .fetch_all(&mut *self.tx)
        .await?;
        for (request, memberships, transitions) in counts {
            if let Some(i) = usize::try_from(request)
                .ok()
                .filter(|i| *i < departures.len())
            {
                let applied = Applied {
                    memberships,
                    transitions,
                };
                self.account(departures[i].bucket_id, -applied.memberships, applied);
                outcomes[i] = applied;
            }
        }
        Ok(outcomes)
    }

    /// The users of `due` with a mark not written yet: the marks of a member's past instants
    /// are due at every evaluation, and their keys make all but the first write nothing. One
    /// probe of the key index per mark.
    pub async fn unwritten_dwell_marks(
        &mut self,
        bucket_id: &str,
        due: &[DwellDue],
    ) -> Result<HashSet<String>> {
        if due.is_empty() {
            return Ok(HashSet::new());
        }
        let users: Vec<&str> = due.iter().map(|d| d.user_id.as_str()).collect();
        let epochs: Vec<i32> = due.iter().map(|d| d.epoch).collect();
        let labels: Vec<&str> = due.iter().map(|d| d.label.as_str()).collect();
        let sql = format!(
            "SELECT DISTINCT d.user_id \
             FROM unnest($2::text[], $3::int[], $4::text[]) AS d(user_id, epoch, label) \
             WHERE NOT EXISTS (SELECT 1 FROM transitions t WHERE t.key = {DWELL_KEY} OFFSET 0)"
        );
        let unwritten: Vec<String> = sqlx::query_scalar(&sql)
            .bind(bucket_id)
            .bind(&users)
            .bind(&epochs)
            .bind(&labels)
            .fetch_all(&mut *self.tx)
            .await?;
        Ok(unwritten.into_iter().collect())
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
        let sql = format!(
            "WITH emitted AS ( \
                 INSERT INTO transitions (key, bucket_id, user_id, kind, epoch, label, source, reason, occurred_at) \
                 SELECT {DWELL_KEY}, \
                        $1, d.user_id, 'dwell', d.epoch, d.label, $2, 'dwell', d.at \
                 FROM unnest($3::text[], $4::int[], $5::text[], $6::timestamptz[]) AS d(user_id, epoch, label, at) \
                 WHERE EXISTS (SELECT 1 FROM memberships m WHERE m.bucket_id = $1 \
                      AND m.user_id = d.user_id AND m.epoch = d.epoch AND m.status = 'active' \
                      OFFSET 0) \
                 ON CONFLICT (key) DO NOTHING \
                 RETURNING 1) \
             SELECT count(*) FROM emitted"
        );
        let written: i64 = sqlx::query_scalar(&sql)
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
