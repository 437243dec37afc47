//! Deciding memberships for batches of users, one batch per bucket: facts gathered set-based
//! for every batch at once, each predicate run once over its whole batch in WASM, and the joins,
//! leaves and timers of every batch applied in the round together.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};
use membrane_abi::FactBatch;
use membrane_criteria::bucket::{BucketBody, DwellMark, ReconcileJoins};
use membrane_criteria::clock::{next_change_at, TimedFacts};
use membrane_criteria::plan::Plan;
use membrane_store::{
    ActiveMember, Admission, Applied, ArmPolicy, Arming, Departure, DwellDue, EntryRule,
    FactRequest, Round, Source, WindowEvents,
};

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

/// One bucket's share of an evaluation: the users to evaluate and how changes are recorded.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    pub bucket: &'a LoadedBucket,
    pub users: &'a [String],
    pub recording: Recording,
}

/// What one batch's predicate decided, before anything is written.
#[derive(Default)]
struct Decision {
    joins: Vec<String>,
    leaves: Vec<(String, i32)>,
    expired: Vec<(String, i32)>,
    /// The same three, for users recorded as the real-time path would (`live_if_pending`).
    live_joins: Vec<String>,
    live_leaves: Vec<(String, i32)>,
    live_expired: Vec<(String, i32)>,
    marks: Vec<DwellDue>,
    /// Each user's membership after this evaluation: `Some((entered_at, deferred))` while a
    /// member, `deferred` when a criteria leave waits for min_dwell.
    after: Vec<Option<(DateTime<Utc>, bool)>>,
    wasm: std::time::Duration,
}

/// Evaluates each batch's users against its bucket at `now`, applies the differences to the
/// round, and re-arms each user's timer in each bucket for the next instant anything can
/// change for them with no new event (all in the round's transaction). Facts, window events
/// and active memberships are read for every batch in one statement each, and joins, leaves
/// and timers written in one statement each, so a round's round trips do not grow with the
/// number of buckets it touches. Returns one result per batch, in order: a batch whose
/// predicate faults changes nothing and returns [`EngineError::Predicate`]; the others apply.
pub async fn evaluate_batches(
    round: &mut Round,
    batches: &[Batch<'_>],
    now: DateTime<Utc>,
) -> Result<Vec<Result<Outcome, EngineError>>, EngineError> {
    let requests: Vec<FactRequest> = batches
        .iter()
        .map(|batch| FactRequest {
            users: batch.users,
            facts: &batch.bucket.facts,
            // A backfill's page is every known user in a range.
            page: batch.recording.source == Source::Backfill,
        })
        .collect();
    // Only time-based criteria need the instants of their windows' events.
    let timed: Vec<bool> = batches
        .iter()
        .map(|batch| clock_plan(batch.bucket).is_some())
        .collect();
    let (facts, window_events) = round
        .gather_facts_and_window_events_for(&requests, &timed, now)
        .await?;
    let pairs: Vec<(&str, &[String])> = batches
        .iter()
        .map(|batch| (batch.bucket.id(), batch.users))
        .collect();
    let active = round.active_members_of(&pairs).await?;

    let mut decisions: Vec<Result<Decision, EngineError>> = Vec::with_capacity(batches.len());
    for ((batch, facts), active) in batches.iter().zip(&facts).zip(&active) {
        let started = std::time::Instant::now();
        let verdicts = tokio::task::block_in_place(|| {
            batch
                .bucket
                .predicate
                .evaluate_batch(facts, now.timestamp_millis())
        });
        let wasm = started.elapsed();
        let verdicts = match verdicts {
            Ok(verdicts) => verdicts,
            Err(source) => {
                decisions.push(Err(EngineError::Predicate {
                    bucket: batch.bucket.id().to_owned(),
                    source,
                }));
                continue;
            }
        };
        let mut decision = decide(batch, &verdicts, active, now);
        decision.wasm = wasm;
        refuse_clock_joins(round, batch, &mut decision).await?;
        record_pending_as_live(round, batch, &mut decision).await?;
        decisions.push(Ok(decision));
    }

    let applied = apply(round, batches, &decisions, now).await?;
    let timers_armed =
        arm_next_changes(round, batches, &decisions, &facts, window_events, now).await?;
    Ok(decisions
        .into_iter()
        .zip(applied)
        .zip(timers_armed)
        .zip(batches)
        .map(
            |(((decision, (joined, left, dwell)), timers_armed), batch)| {
                decision.map(|decision| Outcome {
                    evaluated: batch.users.len() as u64,
                    joined,
                    left,
                    dwell,
                    timers_armed,
                    wasm: Some(decision.wasm),
                })
            },
        )
        .collect())
}

/// The joins, leaves and due `dwell` marks the verdicts call for.
fn decide(
    batch: &Batch<'_>,
    verdicts: &[bool],
    active: &HashMap<String, ActiveMember>,
    now: DateTime<Utc>,
) -> Decision {
    let rules = DwellRules::of(batch.bucket);
    let mut decision = Decision {
        after: Vec::with_capacity(batch.users.len()),
        ..Decision::default()
    };
    for (user, &member) in batch.users.iter().zip(verdicts) {
        let Some(current) = active.get(user) else {
            if member {
                decision.joins.push(user.clone());
                decision.after.push(Some((now, false)));
            } else {
                decision.after.push(None);
            }
            continue;
        };
        let dwelt = now - current.entered_at;
        if rules.max.is_some_and(|max| dwelt >= max) {
            decision.expired.push((user.clone(), current.epoch));
            decision.after.push(None);
        } else if !member && rules.min.is_none_or(|min| dwelt >= min) {
            decision.leaves.push((user.clone(), current.epoch));
            decision.after.push(None);
        } else {
            rules.due_marks(current, now, &mut decision.marks);
            decision.after.push(Some((current.entered_at, !member)));
        }
    }
    decision
}

/// The clock alone never re-admits a user max_dwell took out, and never joins at all when the
/// bucket says `reconcile_joins = false`.
async fn refuse_clock_joins(
    round: &mut Round,
    batch: &Batch<'_>,
    decision: &mut Decision,
) -> Result<(), EngineError> {
    let bucket = batch.bucket;
    if !matches!(batch.recording.source, Source::Timer | Source::Sweep) || decision.joins.is_empty()
    {
        return Ok(());
    }
    let refused: HashSet<String> = if bucket.def.reconcile_joins == ReconcileJoins::Never {
        decision.joins.iter().cloned().collect()
    } else {
        round
            .clock_rejoin_blocked(bucket.id(), &decision.joins)
            .await?
    };
    refuse(batch, decision, &refused);
    Ok(())
}

/// Takes the `refused` joins out of `decision`: those users stay out.
fn refuse(batch: &Batch<'_>, decision: &mut Decision, refused: &HashSet<String>) {
    if refused.is_empty() {
        return;
    }
    decision.joins.retain(|user| !refused.contains(user));
    for (user, state) in batch.users.iter().zip(decision.after.iter_mut()) {
        if refused.contains(user) {
            *state = None;
        }
    }
}

/// Moves the changes of users with an unprocessed change touching the bucket to the `live_*`
/// lists, when the batch's recording asks for it.
async fn record_pending_as_live(
    round: &mut Round,
    batch: &Batch<'_>,
    decision: &mut Decision,
) -> Result<(), EngineError> {
    if !batch.recording.live_if_pending {
        return Ok(());
    }
    let changed: Vec<String> = decision
        .joins
        .iter()
        .chain(decision.leaves.iter().map(|(user, _)| user))
        .chain(decision.expired.iter().map(|(user, _)| user))
        .cloned()
        .collect();
    let pending: HashSet<String> = round
        .pending_changes(&changed)
        .await?
        .into_iter()
        .filter(|change| batch.bucket.affected_by(change))
        .map(|change| change.user_id)
        .collect();
    (decision.live_joins, decision.joins) =
        split_off(std::mem::take(&mut decision.joins), |user| {
            pending.contains(user)
        });
    (decision.live_leaves, decision.leaves) =
        split_off(std::mem::take(&mut decision.leaves), |(user, _)| {
            pending.contains(user)
        });
    (decision.live_expired, decision.expired) =
        split_off(std::mem::take(&mut decision.expired), |(user, _)| {
            pending.contains(user)
        });
    Ok(())
}

/// Writes every decided join and leave (one statement each for all batches) and the due
/// `dwell` marks; returns, per batch, what was joined, what was left and the marks written.
async fn apply(
    round: &mut Round,
    batches: &[Batch<'_>],
    decisions: &[Result<Decision, EngineError>],
    now: DateTime<Utc>,
) -> Result<Vec<(Applied, Applied, i64)>, EngineError> {
    let mut admissions = Vec::new();
    let mut departures = Vec::new();
    for (index, (batch, decision)) in batches.iter().zip(decisions).enumerate() {
        let Ok(decision) = decision else { continue };
        let live = Recording::live(batch.bucket, Source::Event);
        for (recording, joins, leaves, expired) in [
            (
                batch.recording,
                &decision.joins,
                &decision.leaves,
                &decision.expired,
            ),
            (
                live,
                &decision.live_joins,
                &decision.live_leaves,
                &decision.live_expired,
            ),
        ] {
            let bucket_id = batch.bucket.id();
            admissions.push((
                index,
                Admission {
                    bucket_id,
                    users: joins,
                    rule: recording.join_rule,
                    source: recording.source,
                    reason: recording.join_reason,
                },
            ));
            for (members, reason) in [(leaves, recording.leave_reason), (expired, "max_dwell")] {
                departures.push((
                    index,
                    Departure {
                        bucket_id,
                        members,
                        source: recording.source,
                        reason,
                    },
                ));
            }
        }
    }
    let mut applied = vec![(Applied::default(), Applied::default(), 0); batches.len()];
    let (owners, admissions): (Vec<usize>, Vec<Admission>) = admissions.into_iter().unzip();
    for (index, joined) in owners
        .into_iter()
        .zip(round.join_all(&admissions, now).await?)
    {
        add(&mut applied[index].0, joined);
    }
    let (owners, departures): (Vec<usize>, Vec<Departure>) = departures.into_iter().unzip();
    for (index, left) in owners
        .into_iter()
        .zip(round.leave_all(&departures, now).await?)
    {
        add(&mut applied[index].1, left);
    }
    for (index, (batch, decision)) in batches.iter().zip(decisions).enumerate() {
        if let Ok(decision) = decision {
            applied[index].2 = round
                .dwell(batch.bucket.id(), &decision.marks, batch.recording.source)
                .await?;
        }
    }
    Ok(applied)
}

/// Each user's next instant in a bucket (`None`: none, so no timer).
type NextInstants = Vec<Option<DateTime<Utc>>>;

/// Re-arms each evaluated user's timer in each bucket for the next instant anything can change
/// for them with no new event; returns, per batch, how many timers were armed or moved.
async fn arm_next_changes(
    round: &mut Round,
    batches: &[Batch<'_>],
    decisions: &[Result<Decision, EngineError>],
    facts: &[FactBatch],
    window_events: Vec<WindowEvents>,
    now: DateTime<Utc>,
) -> Result<Vec<u64>, EngineError> {
    // Per batch: its position, how its timers are set, and each user's next instant.
    let mut wanted: Vec<(usize, ArmPolicy, NextInstants)> = Vec::new();
    for (index, (((batch, decision), facts), window_events)) in batches
        .iter()
        .zip(decisions)
        .zip(facts)
        .zip(window_events)
        .enumerate()
    {
        let Ok(decision) = decision else { continue };
        let due = next_instants(batch, decision, facts, window_events, now);
        // The clock's own paths set timers exactly, so an early one is put right when it
        // fires; the others only bring timers forward.
        let policy = match batch.recording.source {
            Source::Timer | Source::Sweep => ArmPolicy::Exact,
            Source::Event | Source::Backfill | Source::Operator => ArmPolicy::EarlierOnly,
        };
        wanted.push((index, policy, due));
    }
    let mut armed = vec![0; batches.len()];
    for policy in [ArmPolicy::Exact, ArmPolicy::EarlierOnly] {
        let (owners, armings): (Vec<usize>, Vec<Arming>) = wanted
            .iter()
            .filter(|(_, wanted_policy, _)| *wanted_policy == policy)
            .map(|(index, _, due)| {
                let batch = &batches[*index];
                let arming = Arming {
                    bucket_id: batch.bucket.id(),
                    users: batch.users,
                    due,
                };
                (*index, arming)
            })
            .unzip();
        if armings.is_empty() {
            continue;
        }
        let counts = round
            .arm_timers_all(&armings, policy, now + crate::timers::LONGEST_SLEEP)
            .await?;
        for (index, count) in owners.into_iter().zip(counts) {
            armed[index] = count;
        }
    }
    Ok(armed)
}

/// Each user's next instant in `batch`'s bucket once `decision` applies: when its criteria can
/// next change with no event (time-based criteria, while they can act for the user) or its
/// dwell rules next act on the member, whichever comes first.
fn next_instants(
    batch: &Batch<'_>,
    decision: &Decision,
    facts: &FactBatch,
    window_events: WindowEvents,
    now: DateTime<Utc>,
) -> NextInstants {
    let now_ms = now.timestamp_millis();
    let bucket = batch.bucket;
    let clock = clock_plan(bucket);
    let rules = DwellRules::of(bucket);
    let mut window_events = window_events.into_iter();
    // The clock reads facts as values; only time-based criteria need them decoded.
    let values = match clock {
        Some(_) => facts.rows(),
        None => vec![Vec::new(); batch.users.len()],
    };
    values
        .into_iter()
        .zip(&decision.after)
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
        .collect()
}

/// The users of `batch` whose evaluation at `now` would write anything: a join (unless the
/// bucket never joins by the clock), a leave, a due `dwell` mark not written yet, or a timer
/// to arm, move or remove. It reads the event counts, memberships and timers of the whole span
/// from the first user to the last, so it suits a page of users in user order, as a sweep's
/// pages are. It only reads, and locks nothing: a sweep asks it of each page, then evaluates
/// just these users, locked, with [`evaluate_batches`], which decides again on what it reads
/// then. A fault of the predicate
/// is returned as [`EngineError::Predicate`].
pub async fn users_to_change(
    round: &mut Round,
    batch: &Batch<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<String>, EngineError> {
    let bucket = batch.bucket;
    let requests = [FactRequest {
        users: batch.users,
        facts: &bucket.facts,
        page: true,
    }];
    let timed = [clock_plan(bucket).is_some()];
    let (facts, window_events) = round
        .gather_facts_and_window_events_for(&requests, &timed, now)
        .await?;
    let (Some(facts), Some(window_events)) = (facts.first(), window_events.into_iter().next())
    else {
        return Ok(Vec::new());
    };
    // Memberships and timers of the users' whole span, each one index range: a sweep's page
    // is in user order, and the rows of users outside it are never looked up.
    let (Some(first), Some(last)) = (batch.users.iter().min(), batch.users.iter().max()) else {
        return Ok(Vec::new());
    };
    let active = round
        .active_members_between(bucket.id(), first, last)
        .await?;
    let armed = round.armed_timers_between(bucket.id(), first, last).await?;
    let verdicts = tokio::task::block_in_place(|| {
        bucket
            .predicate
            .evaluate_batch(facts, now.timestamp_millis())
    })
    .map_err(|source| EngineError::Predicate {
        bucket: bucket.id().to_owned(),
        source,
    })?;
    let mut decision = decide(batch, &verdicts, &active, now);
    if bucket.def.reconcile_joins == ReconcileJoins::Never {
        let refused: HashSet<String> = decision.joins.iter().cloned().collect();
        refuse(batch, &mut decision, &refused);
    }
    let due = next_instants(batch, &decision, facts, window_events, now);
    let unwritten_marks = round
        .unwritten_dwell_marks(bucket.id(), &decision.marks)
        .await?;
    let mut changing: HashSet<&str> = decision
        .joins
        .iter()
        .chain(decision.leaves.iter().map(|(user, _)| user))
        .chain(decision.expired.iter().map(|(user, _)| user))
        .chain(&unwritten_marks)
        .map(String::as_str)
        .collect();
    // Compared in whole microseconds, as timestamptz stores them.
    let micros = |at: Option<&DateTime<Utc>>| at.map(DateTime::timestamp_micros);
    for (user, due) in batch.users.iter().zip(&due) {
        if micros(armed.get(user)) != micros(due.as_ref()) {
            changing.insert(user);
        }
    }
    Ok(batch
        .users
        .iter()
        .filter(|user| changing.contains(user.as_str()))
        .cloned()
        .collect())
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
