//! Deciding memberships for a batch of users in one bucket: facts gathered set-based, the
//! predicate run once over the whole batch in WASM, joins and leaves applied in the round.

use chrono::{DateTime, TimeDelta, Utc};
use membrane_criteria::bucket::DwellMark;
use membrane_store::{ActiveMember, Applied, DwellDue, EntryRule, Round, Source};

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
}

impl Recording {
    pub fn live(bucket: &LoadedBucket, source: Source) -> Recording {
        Recording {
            source,
            join_rule: bucket.entry_rule(),
            join_reason: "criteria",
            leave_reason: "criteria",
        }
    }
}

/// Evaluates `users` against `bucket` at `now` and applies the difference to the round.
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
    let facts = round.gather_facts(users, &bucket.facts, now).await?;
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
    for (user, member) in users.iter().zip(verdicts) {
        let Some(current) = active.get(user) else {
            if member {
                joins.push(user.clone());
            }
            continue;
        };
        let dwelt = now - current.entered_at;
        if rules.max.is_some_and(|max| dwelt >= max) {
            expired.push((user.clone(), current.epoch));
        } else if !member && rules.min.is_none_or(|min| dwelt >= min) {
            leaves.push((user.clone(), current.epoch));
        } else {
            rules.due_marks(current, now, &mut marks);
        }
    }
    let joined = round
        .join(
            bucket.id(),
            &joins,
            recording.join_rule,
            recording.source,
            recording.join_reason,
            now,
        )
        .await?;
    let mut left = round
        .leave(
            bucket.id(),
            &leaves,
            recording.source,
            recording.leave_reason,
            now,
        )
        .await?;
    let forced = round
        .leave(bucket.id(), &expired, recording.source, "max_dwell", now)
        .await?;
    left.memberships += forced.memberships;
    left.transitions += forced.transitions;
    let dwell = round.dwell(bucket.id(), &marks, recording.source).await?;
    Ok(Outcome {
        evaluated: users.len() as u64,
        joined,
        left,
        dwell,
        wasm: Some(wasm),
    })
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
