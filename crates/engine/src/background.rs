//! The engine's long-running tasks. Each loops until the stop signal, and a failing round is
//! logged and retried rather than ending the task: Postgres rolls the round back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use membrane_abi::Fact;
use membrane_criteria::bucket::BucketBody;
use membrane_store::{
    BucketSwitch, BucketWork, CandidateClause, EntryRule, EventRequirement, HotTable, Round,
    Source, Store, StoreError, SweepPage, SweepRun, QUEUE_CHANNEL,
};
use tokio::sync::watch;

use crate::evaluate::{evaluate_batches, users_to_change, Batch, Outcome, Recording};
use crate::registry::LoadedBucket;
use crate::{EngineError, Shared, TransitionKind};

/// Waits up to `period` or until stopped; returns true when stopped.
async fn pause(stopped: &mut watch::Receiver<bool>, period: Duration) -> bool {
    tokio::select! {
        _ = stopped.changed() => true,
        _ = tokio::time::sleep(period) => *stopped.borrow(),
    }
}

fn count(shared: &Shared, outcome: &Outcome) {
    let stats = &shared.stats;
    stats.evaluations.inc_by(outcome.evaluated);
    stats.timers_armed.inc_by(outcome.timers_armed);
    if let Some(wasm) = outcome.wasm {
        stats.wasm_seconds.observe(wasm.as_secs_f64());
    }
    for (kind, written) in [
        ("entered", outcome.joined.transitions),
        ("left", outcome.left.transitions),
        ("dwell", outcome.dwell),
    ] {
        stats
            .transitions
            .get_or_create(&TransitionKind { kind })
            .inc_by(written as u64);
    }
}

pub(crate) fn report(shared: &Shared, task: &str, error: &EngineError) {
    shared.stats.errors.inc();
    tracing::error!(task, "{error}");
}

/// Relays the queue's notifications to the real-time workers (one connection however many
/// workers there are): each wakeup bumps the counter they watch.
pub(crate) async fn queue_wakeups(
    shared: Arc<Shared>,
    wakeups: watch::Sender<u64>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut notifications = match shared.store.listen(&[QUEUE_CHANNEL]).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!("queue notifications unavailable, polling only: {error}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            notified = notifications.recv() => match notified {
                Ok(_) => wakeups.send_modify(|count| *count = count.wrapping_add(1)),
                Err(error) => {
                    tracing::warn!("queue notifications lost, polling only: {error}");
                    return;
                }
            },
        }
    }
}

/// The real-time path: claims queued users in batches, evaluates each against the buckets
/// their changes could affect, and commits memberships, transitions and the claim together.
pub(crate) async fn realtime(
    shared: Arc<Shared>,
    mut wakeups: watch::Receiver<u64>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        // Marked seen before claiming, so a change notified during the rounds wakes us again.
        wakeups.borrow_and_update();
        loop {
            match realtime_round(&shared).await {
                // Claims skip users other rounds hold, so a short claim does not mean the
                // queue is drained: go on until one finds nothing.
                Ok(claimed) if claimed > 0 => continue,
                Ok(_) => break,
                Err(error) => {
                    report(&shared, "realtime", &error);
                    break;
                }
            }
        }
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(shared.config.poll_interval) => {}
            // An error means the relay stopped: polling goes on.
            Ok(()) = wakeups.changed() => {}
        }
        if *stopped.borrow() {
            return;
        }
    }
}

/// One real-time round; returns how many users it claimed.
async fn realtime_round(shared: &Arc<Shared>) -> Result<usize, EngineError> {
    let switches = shared.store.bucket_switches().await?;
    if !shared.registry.load().behind(&switches).is_empty() {
        // Another engine serves a newer bucket set: catch up before claiming anything, or the
        // claimed changes would never be evaluated with the buckets we lack.
        crate::reload::reload_now(shared).await?;
        crate::retire_unserved_buckets(shared).await?;
        let switches = shared.store.bucket_switches().await?;
        let behind = shared.registry.load().behind(&switches);
        if !behind.is_empty() {
            tracing::warn!(
                buckets = ?behind,
                "another live engine serves bucket versions this engine's files lack; \
                 leaving the queue to engines that serve them"
            );
            return Ok(0);
        }
    }
    let registry = shared.registry.load_full();
    let mut round = shared.store.begin_round().await?;
    let queued = round.claim_queue(shared.config.batch_size).await?;
    if queued.is_empty() {
        return Ok(0);
    }
    let mut users_by_bucket: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for user in &queued {
        for bucket in registry.candidates(user) {
            users_by_bucket
                .entry(bucket)
                .or_default()
                .push(user.user_id.clone());
        }
    }
    let now = Utc::now();
    let work: Vec<(Arc<LoadedBucket>, Vec<String>)> = users_by_bucket
        .into_iter()
        .filter_map(|(bucket_id, users)| {
            let bucket = registry
                .buckets
                .get(bucket_id)
                .filter(|b| b.enabled(&switches))?;
            Some((bucket.clone(), users))
        })
        .collect();
    evaluate_serving_all(shared, &mut round, work, now, |b| {
        Recording::live(b, Source::Event)
    })
    .await?;
    round.commit().await?;
    shared.stats.rounds.inc();
    Ok(queued.len())
}

/// Evaluates `users` with `bucket`; when that version faults at run time it is quarantined and
/// the version serving after that (its fallback, if any) evaluates them instead. Counts what
/// was done.
pub(crate) async fn evaluate_serving(
    shared: &Shared,
    round: &mut Round,
    bucket: Arc<LoadedBucket>,
    users: &[String],
    now: DateTime<Utc>,
    recording: impl Fn(&LoadedBucket) -> Recording,
) -> Result<Outcome, EngineError> {
    let work = vec![(bucket, users.to_vec())];
    let outcomes = evaluate_serving_all(shared, round, work, now, recording).await?;
    Ok(outcomes.into_iter().next().unwrap_or_default())
}

/// [`evaluate_serving`] for several buckets, evaluated together ([`evaluate_batches`]); returns
/// one outcome per bucket, in order (the default for a bucket left with no serving version).
pub(crate) async fn evaluate_serving_all(
    shared: &Shared,
    round: &mut Round,
    mut work: Vec<(Arc<LoadedBucket>, Vec<String>)>,
    now: DateTime<Utc>,
    recording: impl Fn(&LoadedBucket) -> Recording,
) -> Result<Vec<Outcome>, EngineError> {
    let mut outcomes = vec![Outcome::default(); work.len()];
    // The positions in `outcomes` of the buckets still to evaluate.
    let mut pending: Vec<usize> = (0..work.len()).collect();
    while !pending.is_empty() {
        let batches: Vec<Batch> = pending
            .iter()
            .map(|&index| {
                let (bucket, users) = &work[index];
                Batch {
                    bucket,
                    users,
                    recording: recording(bucket),
                }
            })
            .collect();
        let results = evaluate_batches(round, &batches, now).await?;
        let mut faulted = Vec::new();
        for (index, result) in pending.iter().copied().zip(results) {
            match result {
                Ok(outcome) => {
                    count(shared, &outcome);
                    outcomes[index] = outcome;
                }
                Err(EngineError::Predicate { source, .. }) => faulted.push((index, source)),
                Err(other) => return Err(other),
            }
        }
        pending.clear();
        for (index, fault) in faulted {
            if let Some(serving) = quarantine(shared, &work[index].0, &fault).await? {
                work[index].0 = serving;
                pending.push(index);
            }
        }
    }
    Ok(outcomes)
}

/// Takes a faulting version out of service (once, however many tasks hit the fault), records
/// the fault for the console and CLI, and returns the version now serving under its id.
async fn quarantine(
    shared: &Shared,
    bucket: &LoadedBucket,
    fault: &membrane_wasm::EvalError,
) -> Result<Option<Arc<LoadedBucket>>, EngineError> {
    let id = bucket.id();
    let current = shared.registry.load_full();
    let still_serving = current
        .buckets
        .get(id)
        .is_some_and(|serving| serving.hash == bucket.hash);
    if still_serving {
        let message = format!(
            "error: bucket `{id}` faulted at run time and this version was disabled: {fault}\n  --> {}\n  = note: {}",
            bucket.def.path.display(),
            if current.has_fallback(id) {
                "the previous version of this bucket serves until the file changes"
            } else {
                "no earlier version loaded; the bucket stops until its file changes"
            }
        );
        tracing::error!(bucket = %id, "{message}");
        shared.stats.errors.inc();
        let next = current.without_faulted(bucket, &message);
        if let Some(fallback) = next.buckets.get(id) {
            shared
                .store
                .record_bucket_version(&fallback.version())
                .await?;
        }
        shared.registry.store(Arc::new(next));
        shared
            .store
            .record_bucket_error(
                id,
                &bucket.def.path.display().to_string(),
                &bucket.def.source,
                &message,
            )
            .await?;
    }
    Ok(shared.registry.load().buckets.get(id).cloned())
}

/// The backstop of the clock: on an interval, every enabled bucket that moves with the clock
/// is re-checked set-based — its members, and for time-based criteria its candidates too (see
/// [`membrane_store::Store::sweep_page`]) — so anything a timer missed (a window edge, an
/// absence join, `min_dwell`, `max_dwell`, dwell marks) happens within one interval. Engines
/// split the buckets between them: each bucket is swept under an advisory lock by one engine
/// at a time, and a bucket another engine swept within the last half interval is left alone.
pub(crate) async fn sweeps(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    loop {
        if pause(&mut stopped, shared.config.sweep_interval).await {
            return;
        }
        let registry = shared.registry.load_full();
        let switches = match shared.store.bucket_switches().await {
            Ok(switches) => switches,
            Err(error) => {
                report(&shared, "sweep", &error.into());
                continue;
            }
        };
        for bucket in registry.buckets.values() {
            if *stopped.borrow() {
                return;
            }
            if !bucket.moves_with_the_clock() || !ready_for_the_clock(bucket, &switches) {
                continue;
            }
            if let Err(error) = sweep_bucket(&shared, bucket).await {
                report(&shared, "sweep", &error);
            }
        }
    }
}

/// Enabled, this engine's version is the recorded one, and its backfill is done: clock-driven
/// changes wait for the backfill (it materializes the members they would act on).
fn ready_for_the_clock(bucket: &LoadedBucket, switches: &HashMap<String, BucketSwitch>) -> bool {
    bucket.enabled(switches)
        && bucket.recorded(switches)
        && switches
            .get(bucket.id())
            .is_some_and(|switch| switch.backfilled_hash.as_deref() == Some(&bucket.hash))
}

async fn sweep_bucket(shared: &Shared, bucket: &Arc<LoadedBucket>) -> Result<(), EngineError> {
    let store = &shared.store;
    let Some(lock) = store
        .try_lock_bucket(BucketWork::Sweep, bucket.id())
        .await?
    else {
        return Ok(()); // another engine is sweeping it
    };
    if !store
        .swept_within(bucket.id(), shared.config.sweep_interval / 2)
        .await?
    {
        sweep_locked(shared, bucket).await?;
    }
    Ok(lock.release().await?)
}

/// Sweeps `bucket` once, whatever the interval says; returns `None` when another engine holds
/// its sweep lock.
pub(crate) async fn sweep_now(
    shared: &Shared,
    bucket: &Arc<LoadedBucket>,
) -> Result<Option<SweepRun>, EngineError> {
    let Some(lock) = shared
        .store
        .try_lock_bucket(BucketWork::Sweep, bucket.id())
        .await?
    else {
        return Ok(None);
    };
    let run = sweep_locked(shared, bucket).await?;
    lock.release().await?;
    Ok(Some(run))
}

/// One full sweep of `bucket`, its sweep lock held, then recorded. Page by page: the whole
/// page is evaluated without locks ([`users_to_change`]), and only the users whose evaluation
/// would write anything are then locked and evaluated again, in a round of their own. Most of
/// a sweep finds nothing to do, and locking a row writes it: at 1M users, locking every page
/// and re-arming every timer was a quarter of a sweep's time. Up to `sweep_workers` pages are
/// checked at once, each on its own connection (pages hold disjoint users): while Postgres
/// reads one page's facts, the engine evaluates another's.
async fn sweep_locked(
    shared: &Shared,
    bucket: &Arc<LoadedBucket>,
) -> Result<SweepRun, EngineError> {
    let started_at = Utc::now();
    let (mut checked, mut joined, mut left) = (0, 0, 0);
    let pages = SweepPages::new(bucket, shared.config.page_size)
        .into_stream(&shared.store)
        .map(|page| async move { sweep_page(shared, bucket, page?).await })
        .buffer_unordered(shared.config.sweep_workers.max(1));
    let mut pages = std::pin::pin!(pages);
    while let Some(page) = pages.next().await {
        let Some(swept) = page? else {
            break; // disabled, removed or replaced since the sweep began
        };
        checked += swept.checked;
        joined += swept.joined;
        left += swept.left;
    }
    shared.stats.sweeps.inc();
    let run = SweepRun {
        bucket_id: bucket.id().to_owned(),
        engine_id: shared.config.engine_id.clone(),
        started_at,
        finished_at: Utc::now(),
        checked,
        joined,
        left_count: left,
    };
    shared.store.record_sweep(&run).await?;
    Ok(run)
}

/// What a sweep did on one page.
struct PageSwept {
    checked: i64,
    joined: i64,
    left: i64,
}

/// Checks one page of a sweep, and writes what its users need; `None` when the bucket no longer
/// serves this version.
async fn sweep_page(
    shared: &Shared,
    bucket: &Arc<LoadedBucket>,
    page: Vec<String>,
) -> Result<Option<PageSwept>, EngineError> {
    let store = &shared.store;
    let mut reading = store.begin_round().await?;
    if !reading.still_serving(bucket.id(), &bucket.hash).await? {
        return Ok(None);
    }
    let batch = Batch {
        bucket,
        users: &page,
        recording: Recording::live(bucket, Source::Sweep),
    };
    let changing = match users_to_change(&mut reading, &batch, Utc::now()).await {
        Ok(users) => users,
        // The locked evaluation meets the fault again and quarantines the version.
        Err(EngineError::Predicate { .. }) => page.clone(),
        Err(other) => return Err(other),
    };
    drop(reading);
    shared.stats.evaluations.inc_by(page.len() as u64);
    let mut swept = PageSwept {
        checked: page.len() as i64,
        joined: 0,
        left: 0,
    };
    if changing.is_empty() {
        return Ok(Some(swept));
    }
    let mut round = store.begin_round().await?;
    round.lock_users(&changing).await?;
    if !round.still_serving(bucket.id(), &bucket.hash).await? {
        return Ok(None);
    }
    let outcome = evaluate_serving(
        shared,
        &mut round,
        bucket.clone(),
        &changing,
        Utc::now(),
        |b| Recording::live(b, Source::Sweep),
    )
    .await?;
    round.commit().await?;
    count_found_work(shared, &outcome);
    swept.joined = outcome.joined.memberships;
    swept.left = outcome.left.memberships;
    Ok(Some(swept))
}

/// The users a sweep of one bucket re-checks, page by page in user order: its members, and for
/// time-based criteria its candidates too (only time-based criteria can admit someone with no
/// event; dwell rules act on members).
pub struct SweepPages<'a> {
    bucket: &'a LoadedBucket,
    /// What a candidate must hold, for time-based criteria.
    candidates: Option<Vec<CandidateClause>>,
    /// Where the next page starts; `None` once the last page was read.
    after: Option<String>,
    page_size: i64,
}

impl<'a> SweepPages<'a> {
    pub fn new(bucket: &'a LoadedBucket, page_size: i64) -> SweepPages<'a> {
        SweepPages {
            bucket,
            candidates: bucket.time_based.then(|| candidate_clauses(bucket)),
            after: Some(String::new()),
            page_size,
        }
    }

    /// The pages, one after another, as a stream.
    pub fn into_stream(
        self,
        store: &'a Store,
    ) -> impl Stream<Item = Result<Vec<String>, StoreError>> + 'a {
        futures::stream::try_unfold(self, move |mut pages| async move {
            Ok(pages.next(store).await?.map(|page| (page, pages)))
        })
    }

    /// The next page; `None` after the last.
    pub async fn next(&mut self, store: &Store) -> Result<Option<Vec<String>>, StoreError> {
        let id = self.bucket.id();
        while let Some(after) = self.after.take() {
            let page = match &self.candidates {
                Some(clauses) => {
                    store
                        .sweep_page(id, clauses, &after, self.page_size, Utc::now())
                        .await?
                }
                None => {
                    let users = store.members_page(id, &after, self.page_size).await?;
                    let next = users.last().cloned();
                    SweepPage { users, next }
                }
            };
            self.after = page.next;
            if !page.users.is_empty() {
                return Ok(Some(page.users));
            }
        }
        Ok(None)
    }
}

/// What a user must hold to satisfy the bucket: the criteria's required facts, or else (a
/// plugin, or criteria whose structure proves nothing) any fact it reads, since criteria are
/// false for a blank user.
fn candidate_clauses(bucket: &LoadedBucket) -> Vec<CandidateClause> {
    let required: Vec<Vec<(&Fact, i64)>> = match &bucket.def.body {
        BucketBody::Criteria { plan, .. } => plan
            .required_facts()
            .into_iter()
            .map(|clause| {
                clause
                    .into_iter()
                    .map(|requirement| (&plan.facts[requirement.fact], requirement.at_least))
                    .collect()
            })
            .collect(),
        BucketBody::Plugin { .. } => Vec::new(),
    };
    if required.is_empty() {
        let any_fact: Vec<(&Fact, i64)> = bucket.facts.iter().map(|fact| (fact, 1)).collect();
        return vec![clause_of(&any_fact)];
    }
    required.iter().map(|facts| clause_of(facts)).collect()
}

/// The event requirements and property keys of `facts`, each with the least count it needs.
fn clause_of(facts: &[(&Fact, i64)]) -> CandidateClause {
    let mut clause = CandidateClause::default();
    for &(fact, at_least) in facts {
        match fact {
            Fact::EventCount {
                event, within_secs, ..
            } => {
                let requirement = EventRequirement {
                    name: event.clone(),
                    within_secs: *within_secs,
                    at_least,
                };
                if !clause.events.contains(&requirement) {
                    clause.events.push(requirement);
                }
            }
            Fact::Property { key } | Fact::PropertyTime { key } => {
                if !clause.keys.contains(key) {
                    clause.keys.push(key.clone());
                }
            }
        }
    }
    clause
}

/// Every change a sweep makes is one a timer should have made at its instant.
fn count_found_work(shared: &Shared, outcome: &Outcome) {
    for (kind, found) in [
        ("joined", outcome.joined.memberships),
        ("left", outcome.left.memberships),
        ("dwell", outcome.dwell),
    ] {
        if found > 0 {
            shared
                .stats
                .sweep_found_work
                .get_or_create(&TransitionKind { kind })
                .inc_by(found as u64);
        }
    }
}

/// Materializes the members of new and changed bucket versions: every known user evaluated
/// set-based, page by page. A new bucket's joins are silent; after a criteria change, joins
/// follow `on_change` and leaves are emitted.
pub(crate) async fn backfills(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    loop {
        let registry = shared.registry.load_full();
        match shared.store.bucket_switches().await {
            Ok(switches) => {
                for bucket in registry.buckets.values() {
                    let Some(switch) = switches.get(bucket.id()) else {
                        continue;
                    };
                    if !bucket.enabled(&switches)
                        || !bucket.recorded(&switches)
                        || switch.backfilled_hash.as_deref() == Some(&bucket.hash)
                    {
                        continue;
                    }
                    let first_version = switch.backfilled_hash.is_none();
                    if let Err(error) = backfill_bucket(&shared, bucket, first_version).await {
                        report(&shared, "backfill", &error);
                    }
                }
            }
            Err(error) => report(&shared, "backfill", &error.into()),
        }
        tokio::select! {
            _ = stopped.changed() => return,
            _ = shared.backfill_due.notified() => {}
            // A failed or interrupted backfill is retried, and another engine's reload or a
            // backfill another engine left unfinished (it died) is noticed.
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Backfills one bucket version under its advisory lock, resuming where the last engine to
/// work on it stopped: each page commits its memberships together with the cursor, so after a
/// crash no page is lost and none is applied twice.
async fn backfill_bucket(
    shared: &Shared,
    bucket: &Arc<LoadedBucket>,
    first_version: bool,
) -> Result<(), EngineError> {
    let store = &shared.store;
    let Some(lock) = store
        .try_lock_bucket(BucketWork::Backfill, bucket.id())
        .await?
    else {
        return Ok(()); // another engine is backfilling it
    };
    let started = std::time::Instant::now();
    let recording = Recording {
        source: Source::Backfill,
        join_rule: if first_version {
            EntryRule::Silent
        } else {
            bucket.rule_after_change()
        },
        join_reason: "backfill",
        leave_reason: "criteria_changed",
        // A user whose unprocessed change touches this bucket is recorded as the real-time
        // path would have it, announced; the rest as the backfill records them.
        live_if_pending: true,
    };
    let progress = store.resume_backfill(bucket.id(), &bucket.hash).await?;
    if progress.finished_at.is_some() {
        // Finished by another engine since this one read the switches.
        return Ok(lock.release().await?);
    }
    let mut after = progress.cursor;
    let mut total = Outcome::default();
    let finished = loop {
        let page = store.users_page(&after, shared.config.page_size).await?;
        let Some(last) = page.last().cloned() else {
            break true;
        };
        let mut round = store.begin_round().await?;
        round.lock_users(&page).await?;
        if !round.still_serving(bucket.id(), &bucket.hash).await? {
            break false; // disabled or replaced: the cursor keeps the place
        }
        let outcome = evaluate_serving(
            shared,
            &mut round,
            bucket.clone(),
            &page,
            Utc::now(),
            |_| recording,
        )
        .await?;
        total.evaluated += outcome.evaluated;
        total.joined.memberships += outcome.joined.memberships;
        round
            .advance_backfill(bucket.id(), &bucket.hash, &last, page.len() as i64)
            .await?;
        round.commit().await?;
        after = last;
    };
    if finished {
        let mut round = store.begin_round().await?;
        round.mark_backfilled(bucket.id(), &bucket.hash).await?;
        round.commit().await?;
    }
    tracing::info!(
        bucket = %bucket.id(),
        users = total.evaluated,
        members = total.joined.memberships,
        resumed_after = progress.users_done,
        finished,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "backfill pass"
    );
    Ok(lock.release().await?)
}

/// How often an engine vacuums the queue and the timer table when the server does not.
const QUEUE_VACUUM_INTERVAL: Duration = Duration::from_secs(5);
const TIMERS_VACUUM_INTERVAL: Duration = Duration::from_secs(60);

/// When the server runs no autovacuum, vacuums the tables the hot path churns (see
/// `membrane_store::maintenance`) itself; with autovacuum on, migration 0007's per-table
/// settings keep them clean and this task ends at once.
pub(crate) async fn vacuums(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    match shared.store.autovacuum_enabled().await {
        Ok(true) => return,
        Ok(false) => tracing::warn!(
            "the server runs no autovacuum: this engine vacuums the queue every \
             {QUEUE_VACUUM_INTERVAL:?} and the timers every {TIMERS_VACUUM_INTERVAL:?}; \
             analyze the other tables regularly"
        ),
        Err(error) => return report(&shared, "vacuum", &error.into()),
    }
    let mut timers_vacuumed = std::time::Instant::now();
    while !pause(&mut stopped, QUEUE_VACUUM_INTERVAL).await {
        let mut due = vec![HotTable::Queue];
        if timers_vacuumed.elapsed() >= TIMERS_VACUUM_INTERVAL {
            timers_vacuumed = std::time::Instant::now();
            due.push(HotTable::Timers);
        }
        for table in due {
            if let Err(error) = shared.store.vacuum(table).await {
                report(&shared, "vacuum", &error.into());
            }
        }
    }
}

/// Publishes this engine's liveness and counters for the console.
pub(crate) async fn heartbeats(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let started_at = Utc::now();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    loop {
        let stats = shared.stats.to_json();
        if let Err(error) = shared
            .store
            .heartbeat(
                &shared.config.engine_id,
                &hostname,
                std::process::id() as i32,
                started_at,
                &stats,
            )
            .await
        {
            report(&shared, "heartbeat", &error.into());
        }
        if pause(&mut stopped, Duration::from_secs(2)).await {
            // A clean stop says so at once, rather than looking alive for a while.
            if let Err(error) = shared.store.forget_engine(&shared.config.engine_id).await {
                report(&shared, "heartbeat", &error.into());
            }
            return;
        }
    }
}
