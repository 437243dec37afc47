//! Deciding memberships for a batch of users in one bucket: facts gathered set-based, the
//! predicate run once over the whole batch in WASM, joins and leaves applied in the round.

use std::collections::HashSet;

use chrono::{DateTime, TimeDelta, Utc};
use membrane_criteria::bucket::{BucketBody, DwellMark, ReconcileJoins};
use membrane_criteria::clock::{next_change_at, TimedFacts};
use membrane_criteria::plan::Plan;
use membrane_store::{ActiveMember, Applied, ArmPolicy, DwellDue, EntryRule, Round, Source};

use crate::registry::LoadedBucket;
use crate::EngineError;

/// What one bucket's evaluation of a batch did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub evaluated: u64,
    pub joined: Applied,
    pub left: Applied,
    /// `dwell` transitions written.
    pub dwell: i64,
    /// Timers armed or moved.
    pub timers_armed: u64,
    /// Time inside the predicate call, when one was made.
    pub wasm: Option<std::time::Duration>,
}

/// How the joins and leaves of an evaluation are recorded.
#[derive(Debug, Clone, Copy)]
pub struct Recording {
    pub source: Source,
    pub join_rule: EntryRule,
    pub join_reason: &'static str,
    pub leave_reason: &'static str,
    /// Record users with an unprocessed change that touches the bucket as the real-time path
    /// would (`Recording::live`, source `event`): a backfill must not silently absorb a change
    /// the real-time path would announce. The queue is read after the facts, so every change
    /// the facts include is still there to be seen (its round cannot commit while this one
    /// holds the user).
    pub live_if_pending: bool,
}

impl Recording {
    pub fn live(bucket: &LoadedBucket, source: Source) -> Recording {
        Recording {
            source,
            join_rule: bucket.entry_rule(),
            join_reason: "criteria",
            leave_reason: "criteria",
            live_if_pending: false,
        }
    }
}

/// Evaluates `users` against `bucket` at `now`, applies the difference to the round, and
/// re-arms each user's timer in the bucket for the next instant anything can change for them
/// with no new event (all in the round's transaction).
pub async fn evaluate_batch(
    round: &mut Round,
    bucket: &LoadedBucket,
    users: &[String],
    now: DateTime<Utc>,
    recording: Recording,
) -> Result<Outcome, EngineError> {
    if users.is_empty() {
        return Ok(Outcome::default());
    }
    let clock = clock_plan(bucket);
    let facts = round.gather_facts(users, &bucket.facts, now).await?;
    let window_events = match clock {
        Some(_) => {
            round
                .gather_window_events(users, &bucket.facts, now)
                .await?
        }
        None => Vec::new(),
    };
    let started = std::time::Instant::now();
    let verdicts = tokio::task::block_in_place(|| {
        bucket
            .predicate
            .evaluate_batch(&facts, now.timestamp_millis())
    })
    .map_err(|source| EngineError::Predicate {
        bucket: bucket.id().to_owned(),
        source,
    })?;
    let wasm = started.elapsed();
    let active = round.active_members(bucket.id(), users).await?;
    let rules = DwellRules::of(bucket);
    let mut joins = Vec::new();
    let mut leaves = Vec::new();
    let mut expired = Vec::new();
    let mut marks = Vec::new();
    // Each user's membership after this evaluation: `Some((entered_at, deferred))` while a
    // member, `deferred` when a criteria leave waits for min_dwell.
    let mut after: Vec<Option<(DateTime<Utc>, bool)>> = Vec::with_capacity(users.len());
    for (user, &member) in users.iter().zip(&verdicts) {
        let Some(current) = active.get(user) else {
            if member {
                joins.push(user.clone());
                after.push(Some((now, false)));
            } else {
                after.push(None);
            }
            continue;
        };
        let dwelt = now - current.entered_at;
        if rules.max.is_some_and(|max| dwelt >= max) {
            expired.push((user.clone(), current.epoch));
            after.push(None);
        } else if !member && rules.min.is_none_or(|min| dwelt >= min) {
            leaves.push((user.clone(), current.epoch));
            after.push(None);
        } else {
            rules.due_marks(current, now, &mut marks);
            after.push(Some((current.entered_at, !member)));
        }
    }
    if matches!(recording.source, Source::Timer | Source::Sweep) && !joins.is_empty() {
        // The clock alone never re-admits a user max_dwell took out, and never joins at all
        // when the bucket says `reconcile_joins = false`.
        let refused: HashSet<String> = if bucket.def.reconcile_joins == ReconcileJoins::Never {
            joins.iter().cloned().collect()
        } else {
            round.clock_rejoin_blocked(bucket.id(), &joins).await?
        };
        if !refused.is_empty() {
            joins.retain(|user| !refused.contains(user));
            for (user, state) in users.iter().zip(after.iter_mut()) {
                if refused.contains(user) {
                    *state = None;
                }
            }
        }
    }
    let pending: HashSet<String> = if recording.live_if_pending {
        let changed: Vec<String> = joins
            .iter()
            .chain(leaves.iter().map(|(user, _)| user))
            .chain(expired.iter().map(|(user, _)| user))
            .cloned()
            .collect();
        round
            .pending_changes(&changed)
            .await?
            .into_iter()
            .filter(|change| bucket.affected_by(change))
            .map(|change| change.user_id)
            .collect()
    } else {
        HashSet::new()
    };
    let live = Recording::live(bucket, Source::Event);
    let (live_joins, joins) = split_off(joins, |user| pending.contains(user));
    let (live_leaves, leaves) = split_off(leaves, |(user, _)| pending.contains(user));
    let (live_expired, expired) = split_off(expired, |(user, _)| pending.contains(user));
    let mut joined = Applied::default();
    let mut left = Applied::default();
    for (recording, joins, leaves, expired) in [
        (recording, joins, leaves, expired),
        (live, live_joins, live_leaves, live_expired),
    ] {
        let applied = round
            .join(
                bucket.id(),
                &joins,
                recording.join_rule,
                recording.source,
                recording.join_reason,
                now,
            )
            .await?;
        add(&mut joined, applied);
        let applied = round
            .leave(
                bucket.id(),
                &leaves,
                recording.source,
                recording.leave_reason,
                now,
            )
            .await?;
        add(&mut left, applied);
        let applied = round
            .leave(bucket.id(), &expired, recording.source, "max_dwell", now)
            .await?;
        add(&mut left, applied);
    }
    let dwell = round.dwell(bucket.id(), &marks, recording.source).await?;

    let now_ms = now.timestamp_millis();
    let mut window_events = window_events.into_iter();
    // The clock reads facts as values; only time-based criteria need them decoded.
    let values = match clock {
        Some(_) => facts.rows(),
        None => vec![Vec::new(); users.len()],
    };
    let due: Vec<Option<DateTime<Utc>>> = values
        .into_iter()
        .zip(after)
        .map(|(values, membership)| {
            let criteria = clock.and_then(|plan| {
                let timed = TimedFacts {
                    values,
                    window_events: window_events.next().unwrap_or_default(),
                };
                let criteria_can_act =
                    membership.is_some() || bucket.def.reconcile_joins != ReconcileJoins::Never;
                criteria_can_act
                    .then(|| next_change_at(plan, &timed, now_ms))
                    .flatten()
                    .and_then(DateTime::from_timestamp_millis)
            });
            let dwell = membership
                .and_then(|(entered_at, deferred)| rules.next_instant(entered_at, deferred, now));
            [criteria, dwell].into_iter().flatten().min()
        })
        .collect();
    let timers_armed = round
        .arm_timers(
            bucket.id(),
            users,
            &due,
            // The clock's own paths set timers exactly, so an early one is put right when it
            // fires; the others only bring timers forward.
            match recording.source {
                Source::Timer | Source::Sweep => ArmPolicy::Exact,
                Source::Event | Source::Backfill | Source::Operator => ArmPolicy::EarlierOnly,
            },
            now + crate::timers::LONGEST_SLEEP,
        )
        .await?;
    Ok(Outcome {
        evaluated: users.len() as u64,
        joined,
        left,
        dwell,
        timers_armed,
        wasm: Some(wasm),
    })
}

/// `(matching, rest)`.
fn split_off<T>(items: Vec<T>, matching: impl Fn(&T) -> bool) -> (Vec<T>, Vec<T>) {
    items.into_iter().partition(|item| matching(item))
}

fn add(total: &mut Applied, applied: Applied) {
    total.memberships += applied.memberships;
    total.transitions += applied.transitions;
}

/// The criteria of a bucket whose membership can flip with no event, for [`next_change_at`].
/// Plugins declare no criteria the host can see: sweeps cover them.
fn clock_plan(bucket: &LoadedBucket) -> Option<&Plan> {
    match &bucket.def.body {
        BucketBody::Criteria { plan, .. } if plan.time_based => Some(plan),
        _ => None,
    }
}

/// A bucket's time-in-bucket rules, as durations.
struct DwellRules<'a> {
    /// A leave waits until the member has been in this long.
    min: Option<TimeDelta>,
    /// The member leaves after this long whatever the criteria say.
    max: Option<TimeDelta>,
    marks: &'a [DwellMark],
    every: Option<TimeDelta>,
}

/// At most this many `dwell_every` ticks are emitted for one member in one evaluation; the
/// rest follow in later ones (each tick's key makes it exactly once either way).
const MAX_TICKS_PER_EVALUATION: i64 = 1_000;

impl<'a> DwellRules<'a> {
    fn of(bucket: &'a LoadedBucket) -> DwellRules<'a> {
        let duration = |secs: u64| TimeDelta::seconds(secs as i64);
        DwellRules {
            min: bucket.def.min_dwell_secs.map(duration),
            max: bucket.def.max_dwell_secs.map(duration),
            marks: &bucket.def.dwell,
            every: bucket.def.dwell_every_secs.map(duration),
        }
    }

    /// The next instant after `now` at which time in the bucket alone changes something for a
    /// member who entered at `entered_at`: the max_dwell deadline, the next `dwell` or
    /// `dwell_every` mark, and the end of min_dwell when a leave is `deferred` until then.
    fn next_instant(
        &self,
        entered_at: DateTime<Utc>,
        deferred: bool,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let after = |delta: TimeDelta| entered_at.checked_add_signed(delta);
        let deadline = self.max.and_then(after);
        let deferral_ends = self.min.filter(|_| deferred).and_then(after);
        let mark = self
            .marks
            .iter()
            .filter_map(|dwell| after(TimeDelta::seconds(dwell.secs as i64)))
            .find(|at| *at > now);
        let tick = self
            .every
            .filter(|every| *every > TimeDelta::zero())
            .and_then(|every| {
                let ticks = (now - entered_at).num_milliseconds() / every.num_milliseconds();
                every
                    .checked_mul(i32::try_from(ticks + 1).ok()?)
                    .and_then(after)
            });
        [deadline, deferral_ends, mark, tick]
            .into_iter()
            .flatten()
            .filter(|at| *at > now)
            .min()
    }

    /// The `dwell` transitions whose instant has come for `member`, each at its exact instant.
    fn due_marks(&self, member: &ActiveMember, now: DateTime<Utc>, due: &mut Vec<DwellDue>) {
        let mark = |label: String, at: DateTime<Utc>| DwellDue {
            user_id: member.user_id.clone(),
            epoch: member.epoch,
            label,
            at,
        };
        for dwell in self.marks {
            let at = member.entered_at + TimeDelta::seconds(dwell.secs as i64);
            if at <= now {
                due.push(mark(dwell.label.clone(), at));
            }
        }
        if let Some(every) = self.every.filter(|every| *every > TimeDelta::zero()) {
            let ticks = (now - member.entered_at).num_milliseconds() / every.num_milliseconds();
            for tick in (ticks - MAX_TICKS_PER_EVALUATION + 1).max(1)..=ticks {
                let at = member.entered_at + every * tick as i32;
                due.push(mark(format!("every:{tick}"), at));
            }
        }
    }
}
