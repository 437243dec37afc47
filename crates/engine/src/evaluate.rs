//! Deciding memberships for a batch of users in one bucket: facts gathered set-based, the
//! predicate run once over the whole batch in WASM, joins and leaves applied in the round.

use chrono::{DateTime, Utc};
use membrane_store::{Applied, EntryRule, Round, Source};

use crate::registry::LoadedBucket;
use crate::EngineError;

/// What one bucket's evaluation of a batch did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub evaluated: u64,
    pub joined: Applied,
    pub left: Applied,
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
    let verdicts =
        tokio::task::block_in_place(|| bucket.predicate.evaluate(&facts, now.timestamp_millis()))
            .map_err(|source| EngineError::Predicate {
            bucket: bucket.id().to_owned(),
            source,
        })?;
    let active = round.active_members(bucket.id(), users).await?;
    let mut joins = Vec::new();
    let mut leaves = Vec::new();
    for (user, member) in users.iter().zip(verdicts) {
        match (member, active.get(user)) {
            (true, None) => joins.push(user.clone()),
            (false, Some(current)) => leaves.push((user.clone(), current.epoch)),
            _ => {}
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
    let left = round
        .leave(
            bucket.id(),
            &leaves,
            recording.source,
            recording.leave_reason,
            now,
        )
        .await?;
    Ok(Outcome {
        evaluated: users.len() as u64,
        joined,
        left,
    })
}
