//! The timer task: fires durable timers at their instants. Every engine runs one; they share the
//! work through the users' row locks, so each due timer is evaluated by one of them, and a timer
//! made stale by a round that evaluated its user meanwhile is a no-op that re-arms.
//!
//! The task sleeps until the earliest timer of the buckets it may fire (at most
//! [`LONGEST_SLEEP`]), woken earlier by `NOTIFY membrane_timers` when a round arms a nearer
//! one, so a timer fires within milliseconds of its instant rather than on a polling tick.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use membrane_store::{BucketSwitch, Source, TIMERS_CHANNEL};
use tokio::sync::watch;

use crate::background::{evaluate_serving, report};
use crate::evaluate::Recording;
use crate::registry::Registry;
use crate::{EngineError, Shared};

/// The longest the task sleeps without looking at the timers table: rounds only notify it of
/// timers due sooner than this, and it also bounds how stale the due-timer gauge gets.
pub(crate) const LONGEST_SLEEP: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// Pause before retrying when every due timer's user is held by another round.
const CONTENDED_RETRY: Duration = Duration::from_millis(20);

/// Pause after a failed round before trying again.
const FAILURE_RETRY: Duration = Duration::from_secs(1);

pub(crate) async fn fire(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let mut notifications = match shared.store.listen(&[TIMERS_CHANNEL]).await {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::warn!(
                "timer notifications unavailable, waking every {LONGEST_SLEEP}: {error}"
            );
            None
        }
    };
    loop {
        let mut wake_at = match drain(&shared, &mut stopped).await {
            Ok(wake_at) => wake_at,
            Err(error) => {
                report(&shared, "timers", &error);
                Utc::now() + FAILURE_RETRY
            }
        };
        // Sleep until `wake_at`, moving it earlier for each nearer timer armed meanwhile.
        loop {
            let sleep = (wake_at - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep(sleep) => break,
                notified = async {
                    match notifications.as_mut() {
                        Some(listener) => listener.recv().await,
                        None => std::future::pending().await,
                    }
                } => match notified {
                    Ok(payload) => {
                        let armed = payload.parse().ok().and_then(DateTime::from_timestamp_millis);
                        if let Some(armed) = armed.filter(|at| *at < wake_at) {
                            wake_at = armed;
                        }
                    }
                    Err(error) => {
                        tracing::warn!("timer notifications lost, waking every {LONGEST_SLEEP}: {error}");
                        notifications = None;
                    }
                },
            }
        }
        if *stopped.borrow() {
            return;
        }
    }
}

/// Fires every due timer, batch after batch in due order until none is left, then returns
/// when the task should look again.
async fn drain(
    shared: &Arc<Shared>,
    stopped: &mut watch::Receiver<bool>,
) -> Result<DateTime<Utc>, EngineError> {
    loop {
        let registry = shared.registry.load_full();
        let switches = shared.store.bucket_switches().await?;
        let firing = fireable(&registry, &switches);
        let claim = fire_round(shared, &registry, &firing).await?;
        let limit = shared.config.batch_size as usize;
        if claim.seen == 0 || (claim.seen < limit && claim.claimed == claim.seen) {
            let now = Utc::now();
            let due = shared.store.due_timer_count(&firing, now).await?;
            shared.stats.timers_due.set(due);
            let earliest = shared.store.earliest_timer(&firing).await?;
            let latest = now + LONGEST_SLEEP;
            return Ok(earliest.map_or(latest, |at| at.min(latest)));
        }
        if claim.claimed == 0 {
            // Every due timer's user is in another round, which will re-arm or release it.
            tokio::time::sleep(CONTENDED_RETRY).await;
        }
        if *stopped.borrow() {
            return Ok(Utc::now());
        }
    }
}

/// Buckets whose timers this engine may fire now: serving here in the version the engines
/// recorded, enabled, and backfilled (clock-driven joins wait for the backfill).
fn fireable(registry: &Registry, switches: &HashMap<String, BucketSwitch>) -> Vec<String> {
    registry
        .buckets
        .values()
        .filter(|bucket| bucket.enabled(switches) && bucket.recorded(switches))
        .filter(|bucket| {
            switches
                .get(bucket.id())
                .is_some_and(|switch| switch.backfilled_hash.as_deref() == Some(&bucket.hash))
        })
        .map(|bucket| bucket.id().to_owned())
        .collect()
}

/// How many due timers one round saw and claimed.
struct Fired {
    seen: usize,
    claimed: usize,
}

/// One round: claims a batch of due timers, evaluates their users per bucket with source
/// `timer`, and commits (each evaluation re-arms or removes the timers it consumed).
async fn fire_round(
    shared: &Arc<Shared>,
    registry: &Registry,
    firing: &[String],
) -> Result<Fired, EngineError> {
    if firing.is_empty() {
        return Ok(Fired {
            seen: 0,
            claimed: 0,
        });
    }
    let mut round = shared.store.begin_round().await?;
    let now = Utc::now();
    let claim = round
        .claim_due_timers(firing, now, shared.config.batch_size)
        .await?;
    if claim.claimed.is_empty() {
        return Ok(Fired {
            seen: claim.seen,
            claimed: 0,
        });
    }
    // The users are locked now: evaluate at an instant no earlier than any claimed timer.
    let now = Utc::now();
    let mut users_by_bucket: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for timer in &claim.claimed {
        let lag = (now - timer.due_at).num_microseconds().unwrap_or(i64::MAX);
        shared.stats.timer_lag_seconds.observe(lag as f64 / 1e6);
        users_by_bucket
            .entry(&timer.bucket_id)
            .or_default()
            .push(timer.user_id.clone());
    }
    let mut changed = 0;
    for (bucket_id, users) in users_by_bucket {
        let Some(bucket) = registry.buckets.get(bucket_id) else {
            continue;
        };
        let outcome = evaluate_serving(shared, &mut round, bucket.clone(), &users, now, |b| {
            Recording::live(b, Source::Timer)
        })
        .await?;
        let wrote = outcome.joined.memberships + outcome.left.memberships + outcome.dwell;
        changed += u64::try_from(wrote)
            .unwrap_or_default()
            .min(users.len() as u64);
    }
    round.commit().await?;
    let fired = claim.claimed.len() as u64;
    shared.stats.timers_fired.inc_by(fired);
    shared.stats.timers_stale.inc_by(fired - changed);
    Ok(Fired {
        seen: claim.seen,
        claimed: claim.claimed.len(),
    })
}
