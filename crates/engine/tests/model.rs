//! Model test of exact memberships (issue 4): a seeded random workload of events and property
//! updates for many users, sent by concurrent ingest tasks (with duplicate message ids), is
//! processed by three engines sharing one database. Afterwards the memberships must equal a
//! from-scratch recomputation with the reference evaluator, and the outbox must hold every
//! transition key exactly once, consistent with the epochs and the entry limits.
//!
//! Size and seed come from the environment: `MODEL_USERS`, `MODEL_MESSAGES`, `MODEL_SEED`
//! (printed on every run, so a failure can be replayed); `MODEL_LATE_AT` (fraction of the
//! events in when the late bucket is added) and `MODEL_RELOAD_SKEW_MS` tune the reload.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use membrane_criteria::bucket::{parse_bucket, BucketBody, BucketDef, EntryLimit};
use membrane_criteria::eval::{evaluate, gather_from_raw, RawEvent};
use membrane_engine::{EngineConfig, EngineHandle};
use membrane_store::testing::fresh_database;
use membrane_store::{Message, Store};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use sqlx::PgPool;

/// The buckets under test: windows of a day or more (so the clock cannot move membership
/// while the test runs), `.where` filters, property comparisons with type mismatches,
/// `and`/`or`/`not`/`any`, and every entry limit. Every one of them can be left and re-entered
/// through property updates or events, so epochs advance many times.
const BUCKET_FILES: &[(&str, &str)] = &[
    (
        "shoppers",
        r#"criteria = '''
  (event("added_to_cart").within(1d).count() >= 2
   or event("order_completed").where(prop("amount") >= 100).exists())
  and prop("plan") != "churned"
'''
"#,
    ),
    (
        "big-spenders",
        r#"criteria = '''
  prop("ltv") >= 500 and prop("tier").in(["gold", "platinum"])
'''
entry_limit = "once"
"#,
    ),
    (
        "pricing-curious",
        r#"criteria = '''
  prop("plan").in(["free", "trial"])
  and event("page_viewed").where(prop("path").starts_with("/pricing")).within(1d).count() >= 2
'''
entry_limit = "once_per_period"
entry_period = "1s"
"#,
    ),
    (
        "engaged",
        r#"criteria = '''
  event("session_start").count() >= 3
  and prop("email").exists()
  and not event("unsubscribed").within(1d).exists()
'''
"#,
    ),
    (
        "bargain-hunters",
        r#"criteria = '''
  any(event("order_completed").where(prop("amount") < 20 or prop("coupon") == true).exists(),
      prop("tier") == "silver")
  and not (prop("plan") == "pro")
'''
entry_limit = "once_per_period"
entry_period = "2s"
"#,
    ),
];

/// A bucket written into `buckets/` while ingest is under way: every engine hot-reloads it
/// and its backfill (silent joins) races the real-time rounds of the same users.
const LATE_BUCKET: (&str, &str) = (
    "late-carts",
    r#"criteria = '''
  event("added_to_cart").within(1d).exists() and prop("tier") != "bronze"
'''
"#,
);

/// Concurrent evaluators, as the issue asks.
const ENGINES: usize = 3;
/// Concurrent ingest clients.
const INGEST_TASKS: usize = 4;
/// Small rounds, so the engines interleave many times over the same users.
const ROUND_BATCH: i64 = 20;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The workload and the model of what it does.

/// Everything the ingest tasks will send: per task, its batches in order.
struct Workload {
    streams: Vec<Vec<Vec<Message>>>,
    /// Messages sent, counting resent duplicates.
    sent: usize,
    duplicates: usize,
}

/// What the database must hold once every batch is in, computed from the workload alone.
#[derive(Debug, Default, PartialEq)]
struct Model {
    events: BTreeMap<String, Vec<RawEvent>>,
    properties: BTreeMap<String, Map<String, Value>>,
}

fn user_name(index: usize) -> String {
    format!("user-{index:05}")
}

/// A timestamp in whole milliseconds (what the oracle sees), either well inside the 1-day
/// windows or well outside them, so the clock moving during the test changes nothing.
fn event_time(rng: &mut StdRng, now: DateTime<Utc>) -> DateTime<Utc> {
    let age_ms: i64 = if rng.random_bool(0.8) {
        rng.random_range(0..12 * 3_600_000)
    } else {
        rng.random_range(3 * 86_400_000..10 * 86_400_000)
    };
    DateTime::from_timestamp_millis(now.timestamp_millis() - age_ms).expect("in range")
}

/// An event with properties the buckets' filters look at, including type mismatches.
fn random_event(rng: &mut StdRng) -> (&'static str, Map<String, Value>) {
    let name = *[
        "added_to_cart",
        "order_completed",
        "page_viewed",
        "session_start",
        "unsubscribed",
    ]
    .choose(rng)
    .expect("not empty");
    let mut properties = Map::new();
    match name {
        "order_completed" => {
            match rng.random_range(0..10) {
                0 => {} // no amount: the filter is false
                1 => {
                    properties.insert("amount".into(), json!("150"));
                }
                2..=4 => {
                    // Fractions with short decimal forms: serde_json (without its
                    // `float_roundtrip` feature) may read long ones back 1 ulp off.
                    let quarters = rng.random_range(0..160);
                    properties.insert("amount".into(), json!(f64::from(quarters) / 4.0));
                }
                _ => {
                    properties.insert("amount".into(), json!(rng.random_range(1..300)));
                }
            }
            if rng.random_bool(0.2) {
                properties.insert("coupon".into(), json!(rng.random_bool(0.5)));
            }
        }
        "page_viewed" => {
            let path = ["/pricing", "/pricing/team", "/docs", "/", "/Pricing"]
                .choose(rng)
                .expect("not empty");
            properties.insert("path".into(), json!(path));
        }
        _ => {}
    }
    (name, properties)
}

/// One to three trait updates; a null removes the key.
fn random_traits(rng: &mut StdRng) -> Map<String, Value> {
    let mut traits = Map::new();
    for _ in 0..rng.random_range(1..=3) {
        let key = *["plan", "ltv", "tier", "email"]
            .choose(rng)
            .expect("not empty");
        let value = if rng.random_bool(0.15) {
            Value::Null
        } else {
            match key {
                "plan" => json!(["free", "trial", "pro", "churned"].choose(rng)),
                "ltv" if rng.random_bool(0.1) => json!("900"),
                "ltv" => json!(rng.random_range(0..1000)),
                "tier" => json!(["gold", "silver", "platinum", "bronze"].choose(rng)),
                _ => json!(format!("{}@example.com", rng.random_range(0..100))),
            }
        };
        traits.insert(key.to_owned(), value);
    }
    traits
}

/// Generates the workload. Identifies of a user are all sent by that user's home task, so
/// their order (which decides the final properties) is fixed; events commute and go to any
/// task. A duplicate resends an earlier message: an identify only from its home task after
/// the original (so it can never be applied out of order), a track from any task, possibly
/// before the original commits.
fn generate(seed: u64, users: usize, messages: usize, now: DateTime<Utc>) -> Workload {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut streams: Vec<Vec<Message>> = vec![Vec::new(); INGEST_TASKS];
    let mut tracks_with_ids: Vec<Message> = Vec::new();
    let mut duplicates = 0;
    for serial in 0..messages {
        // A tenth of the users get a third of the traffic: the same users are then changed
        // by several clients and evaluated by several engines at once, and leave and re-enter.
        let user = if rng.random_bool(0.33) {
            rng.random_range(0..users.div_ceil(10))
        } else {
            rng.random_range(0..users)
        };
        let home = user % INGEST_TASKS;
        let message_id = Some(format!("m-{serial}"));
        if rng.random_bool(0.06) && !tracks_with_ids.is_empty() {
            let task = rng.random_range(0..INGEST_TASKS);
            let earlier = tracks_with_ids.choose(&mut rng).expect("not empty").clone();
            streams[task].push(earlier);
            duplicates += 1;
        } else if rng.random_bool(0.03) {
            let earlier_identify = streams[home]
                .iter()
                .rev()
                .find(|m| matches!(m, Message::Identify { .. }))
                .cloned();
            if let Some(earlier) = earlier_identify {
                streams[home].push(earlier);
                duplicates += 1;
            }
        } else if rng.random_bool(0.55) {
            let (event, properties) = random_event(&mut rng);
            let track = Message::Track {
                // Some clients send no messageId: always applied.
                message_id: message_id.filter(|_| rng.random_bool(0.9)),
                user_id: user_name(user),
                event: event.to_owned(),
                occurred_at: event_time(&mut rng, now),
                properties,
            };
            if matches!(
                &track,
                Message::Track {
                    message_id: Some(_),
                    ..
                }
            ) {
                tracks_with_ids.push(track.clone());
            }
            streams[rng.random_range(0..INGEST_TASKS)].push(track);
        } else {
            streams[home].push(Message::Identify {
                message_id,
                user_id: user_name(user),
                traits: random_traits(&mut rng),
            });
        }
    }
    let sent = streams.iter().map(Vec::len).sum();
    let streams = streams
        .into_iter()
        .map(|stream| into_batches(&mut rng, stream))
        .collect();
    Workload {
        streams,
        sent,
        duplicates,
    }
}

fn into_batches(rng: &mut StdRng, stream: Vec<Message>) -> Vec<Vec<Message>> {
    let mut batches = Vec::new();
    let mut rest = stream.into_iter().peekable();
    while rest.peek().is_some() {
        let size = rng.random_range(1..=40);
        batches.push(rest.by_ref().take(size).collect());
    }
    batches
}

impl Model {
    /// What ingesting the workload must produce: each message id applied once, identifies
    /// folded in their (home task) order.
    fn of(workload: &Workload) -> Model {
        let mut model = Model::default();
        let mut applied_ids = HashSet::new();
        for message in workload.streams.iter().flatten().flatten() {
            let (Message::Track { message_id, .. } | Message::Identify { message_id, .. }) =
                message;
            if let Some(id) = message_id {
                if !applied_ids.insert(id.clone()) {
                    continue;
                }
            }
            match message {
                Message::Track {
                    user_id,
                    event,
                    occurred_at,
                    properties,
                    ..
                } => {
                    model.properties.entry(user_id.clone()).or_default();
                    model
                        .events
                        .entry(user_id.clone())
                        .or_default()
                        .push(RawEvent {
                            name: event.clone(),
                            occurred_at_ms: occurred_at.timestamp_millis(),
                            properties: properties.clone(),
                        });
                }
                Message::Identify {
                    user_id, traits, ..
                } => {
                    let properties = model.properties.entry(user_id.clone()).or_default();
                    for (key, value) in traits {
                        if value.is_null() {
                            properties.remove(key);
                        } else {
                            properties.insert(key.clone(), value.clone());
                        }
                    }
                }
            }
        }
        model.sort_events();
        model
    }

    /// What the database holds, read back.
    async fn read(pool: &PgPool) -> Model {
        let mut model = Model::default();
        let contacts: Vec<(String, Value)> =
            sqlx::query_as("SELECT user_id, properties FROM contacts")
                .fetch_all(pool)
                .await
                .unwrap();
        for (user, properties) in contacts {
            let Value::Object(properties) = properties else {
                panic!("properties of {user} are not an object: {properties}");
            };
            model.properties.insert(user, properties);
        }
        let events: Vec<(String, String, DateTime<Utc>, Value)> =
            sqlx::query_as("SELECT user_id, name, occurred_at, properties FROM events")
                .fetch_all(pool)
                .await
                .unwrap();
        for (user, name, occurred_at, properties) in events {
            let Value::Object(properties) = properties else {
                panic!("event properties of {user} are not an object: {properties}");
            };
            model.events.entry(user).or_default().push(RawEvent {
                name,
                occurred_at_ms: occurred_at.timestamp_millis(),
                properties,
            });
        }
        model.sort_events();
        model
    }

    /// Events as a multiset: a canonical order to compare by.
    fn sort_events(&mut self) {
        for events in self.events.values_mut() {
            events.sort_by_cached_key(|e| {
                (
                    e.name.clone(),
                    e.occurred_at_ms,
                    Value::Object(e.properties.clone()).to_string(),
                )
            });
        }
    }

    /// The oracle: (bucket, user) pairs whose criteria hold now, computed from scratch.
    fn expected_members(&self, buckets: &[BucketDef], now_ms: i64) -> BTreeSet<(String, String)> {
        let no_events = Vec::new();
        let mut members = BTreeSet::new();
        for bucket in buckets {
            let BucketBody::Criteria { plan, .. } = &bucket.body else {
                unreachable!("the model buckets are criteria");
            };
            for (user, properties) in &self.properties {
                let events = self.events.get(user).unwrap_or(&no_events);
                let facts = gather_from_raw(&plan.facts, events, properties, now_ms);
                if evaluate(plan, &facts, now_ms) {
                    members.insert((bucket.id.clone(), user.clone()));
                }
            }
        }
        members
    }
}

// ---------------------------------------------------------------------------------------------
// Running the engines and the ingest clients.

/// One engine per buckets directory (each engine has its own copy, like separate machines).
async fn start_engines(url: &str, buckets_dirs: &[PathBuf]) -> Vec<EngineHandle> {
    let mut engines = Vec::new();
    for (index, buckets_dir) in buckets_dirs.iter().enumerate() {
        let store = Store::connect(url).await.unwrap();
        let mut config = EngineConfig::new(buckets_dir.clone());
        config.engine_id = format!("model-engine-{index}");
        config.batch_size = ROUND_BATCH;
        config.page_size = 50;
        config.poll_interval = Duration::from_millis(20);
        // Sweeps re-check members concurrently with the real-time rounds; with day-long
        // windows they must change nothing, but they take the same locks.
        config.sweep_interval = Duration::from_millis(700);
        engines.push(membrane_engine::start(store, config).await.unwrap());
    }
    engines
}

async fn eventually(what: &str, limit: Duration, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Sends one task's batches in order. A failed batch is retried as a client would: ingest is
/// all-or-nothing and message ids make the retry safe. Returns the number of retries.
async fn ingest_stream(store: Store, batches: Vec<Vec<Message>>) -> usize {
    let mut retries = 0;
    for batch in batches {
        let mut attempts = 0;
        while let Err(error) = store.ingest(&batch).await {
            attempts += 1;
            retries += 1;
            eprintln!("ingest failed (attempt {attempts}), retrying: {error}");
            assert!(attempts < 5, "ingest keeps failing: {error}");
        }
        // Let the evaluators in between batches now and then.
        tokio::task::yield_now().await;
    }
    retries
}

// ---------------------------------------------------------------------------------------------
// Reading back memberships and the outbox, and checking them.

#[derive(Debug, Clone)]
struct MembershipRow {
    epoch: i32,
    active: bool,
    entered_at: DateTime<Utc>,
    left_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
struct TransitionRow {
    key: String,
    kind: String,
    epoch: i32,
    source: String,
    reason: String,
    occurred_at: DateTime<Utc>,
}

type Pair = (String, String);

async fn read_memberships(pool: &PgPool) -> BTreeMap<Pair, Vec<MembershipRow>> {
    type Row = (
        String,
        String,
        i32,
        String,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT bucket_id, user_id, epoch, status, entered_at, left_at FROM memberships \
         ORDER BY bucket_id, user_id, epoch",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut by_pair: BTreeMap<Pair, Vec<MembershipRow>> = BTreeMap::new();
    for (bucket, user, epoch, status, entered_at, left_at) in rows {
        by_pair
            .entry((bucket, user))
            .or_default()
            .push(MembershipRow {
                epoch,
                active: status == "active",
                entered_at,
                left_at,
            });
    }
    by_pair
}

async fn read_transitions(pool: &PgPool) -> BTreeMap<Pair, Vec<TransitionRow>> {
    type Row = (
        String,
        String,
        String,
        String,
        i32,
        String,
        String,
        DateTime<Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT bucket_id, user_id, key, kind, epoch, source, reason, occurred_at \
         FROM transitions ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut by_pair: BTreeMap<Pair, Vec<TransitionRow>> = BTreeMap::new();
    for (bucket, user, key, kind, epoch, source, reason, occurred_at) in rows {
        by_pair
            .entry((bucket, user))
            .or_default()
            .push(TransitionRow {
                key,
                kind,
                epoch,
                source,
                reason,
                occurred_at,
            });
    }
    by_pair
}

/// Whether the entry limit lets epoch `index` (0-based in `epochs`) emit `entered`.
fn entry_allowed(limit: EntryLimit, epochs: &[MembershipRow], index: usize) -> bool {
    match limit {
        EntryLimit::Unlimited => true,
        EntryLimit::Once => epochs[index].epoch == 1,
        EntryLimit::OncePerPeriod { period_secs } => {
            let last_left = epochs[..index].iter().filter_map(|row| row.left_at).max();
            last_left.is_none_or(|left_at| {
                epochs[index].entered_at - left_at >= TimeDelta::seconds(period_secs as i64)
            })
        }
    }
}

/// Checks one (bucket, user) pair's epochs and transitions; pushes what is wrong.
fn check_pair(
    (bucket, user): &Pair,
    limit: EntryLimit,
    backfilled_during_run: bool,
    epochs: &[MembershipRow],
    transitions: &[TransitionRow],
    expected_member: bool,
    problems: &mut Vec<String>,
) {
    let mut problem = |what: String| problems.push(format!("{bucket}/{user}: {what}"));
    for (index, row) in epochs.iter().enumerate() {
        if row.epoch != index as i32 + 1 {
            problem(format!("epochs are not 1..n: {:?}", epochs_of(epochs)));
            return;
        }
        let is_last = index + 1 == epochs.len();
        // Only the last epoch may still be active, and `left_at` is set exactly when left.
        if (row.active && !is_last) || row.active == row.left_at.is_some() {
            problem(format!(
                "epoch {} is in the wrong state: {row:?}",
                row.epoch
            ));
        }
    }
    let final_active = epochs.last().is_some_and(|row| row.active);
    if final_active != expected_member {
        problem(format!(
            "member is {final_active}, the oracle says {expected_member}; epochs {:?}, transitions {:?}",
            epochs_of(epochs),
            transitions
                .iter()
                .map(|t| format!("{}:{}", t.kind, t.epoch))
                .collect::<Vec<_>>()
        ));
    }
    for transition in transitions {
        let expected_key = format!(
            "bucket:{bucket}:{user}:{}:{}",
            transition.kind, transition.epoch
        );
        if transition.key != expected_key {
            problem(format!("key {} should be {expected_key}", transition.key));
        }
        let recorded_by = (transition.source.as_str(), transition.reason.as_str());
        let expected_origin = matches!(recorded_by, ("event" | "sweep", "criteria"))
            // A backfill closes memberships the real-time path opened before it got there.
            || (backfilled_during_run && recorded_by == ("backfill", "criteria_changed"));
        if !expected_origin {
            problem(format!("unexpected source or reason: {transition:?}"));
        }
        let Some(row) = epochs.get(transition.epoch as usize - 1) else {
            problem(format!("transition for a missing epoch: {transition:?}"));
            continue;
        };
        let recorded_at = match transition.kind.as_str() {
            "entered" => Some(row.entered_at),
            "left" => row.left_at,
            _ => None,
        };
        if recorded_at != Some(transition.occurred_at) {
            problem(format!(
                "transition {transition:?} does not match its membership {row:?}"
            ));
        }
    }
    for (index, row) in epochs.iter().enumerate() {
        let count_kind = |kind: &str| {
            transitions
                .iter()
                .filter(|t| t.epoch == row.epoch && t.kind == kind)
                .count()
        };
        let (entered, left) = (count_kind("entered"), count_kind("left"));
        let entered_expected = usize::from(entry_allowed(limit, epochs, index));
        // A backfill's joins are silent, so there a join may have no `entered`.
        let entered_ok =
            entered == entered_expected || (backfilled_during_run && entered < entered_expected);
        if !entered_ok {
            problem(format!(
                "epoch {} has {entered} `entered`, the entry limit {limit:?} wants {entered_expected}; epochs {:?}",
                row.epoch,
                epochs_of(epochs)
            ));
        }
        let left_expected = usize::from(!row.active);
        if left != left_expected {
            problem(format!(
                "epoch {} has {left} `left` transitions, expected {left_expected}",
                row.epoch
            ));
        }
    }
}

/// What a run exercised in one bucket, to show the checks were not vacuous.
#[derive(Debug, Default)]
#[allow(dead_code)] // read through Debug
struct Coverage {
    members: usize,
    epochs: usize,
    /// Epochs after the first: the user left and came back.
    reentries: usize,
    entered: usize,
    left: usize,
    /// Transitions written by a sweep rather than the real-time path.
    by_sweep: usize,
}

impl Coverage {
    fn of(
        memberships: &BTreeMap<Pair, Vec<MembershipRow>>,
        transitions: &BTreeMap<Pair, Vec<TransitionRow>>,
    ) -> BTreeMap<String, Coverage> {
        let mut by_bucket: BTreeMap<String, Coverage> = BTreeMap::new();
        for ((bucket, _), epochs) in memberships {
            let coverage = by_bucket.entry(bucket.clone()).or_default();
            coverage.members += usize::from(epochs.last().is_some_and(|row| row.active));
            coverage.epochs += epochs.len();
            coverage.reentries += epochs.len() - 1;
        }
        for ((bucket, _), rows) in transitions {
            let coverage = by_bucket.entry(bucket.clone()).or_default();
            for transition in rows {
                match transition.kind.as_str() {
                    "entered" => coverage.entered += 1,
                    _ => coverage.left += 1,
                }
                coverage.by_sweep += usize::from(transition.source == "sweep");
            }
        }
        by_bucket
    }
}

fn epochs_of(epochs: &[MembershipRow]) -> Vec<String> {
    epochs
        .iter()
        .map(|row| {
            format!(
                "{}:{}@{}..{}",
                row.epoch,
                if row.active { "active" } else { "left" },
                row.entered_at.format("%H:%M:%S%.6f"),
                row.left_at
                    .map(|at| at.format("%H:%M:%S%.6f").to_string())
                    .unwrap_or_default()
            )
        })
        .collect()
}

/// Compares per-user data, reporting the first users that differ rather than everything.
fn assert_same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    stored: &BTreeMap<String, T>,
    model: &BTreeMap<String, T>,
) {
    let users: BTreeSet<&String> = stored.keys().chain(model.keys()).collect();
    let differing: Vec<String> = users
        .into_iter()
        .filter(|user| stored.get(*user) != model.get(*user))
        .take(3)
        .map(|user| {
            format!(
                "{user}:\n  stored {:?}\n  model  {:?}",
                stored.get(user),
                model.get(user)
            )
        })
        .collect();
    assert!(
        differing.is_empty(),
        "{what} differ:\n{}",
        differing.join("\n")
    );
}

/// Writes a bucket file and parses it as the engines will.
fn write_bucket(dir: &Path, (id, text): (&str, &str)) -> BucketDef {
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, text).unwrap();
    parse_bucket(&path, text).unwrap_or_else(|d| panic!("bucket {id}: {d:?}"))
}

/// Adds the late bucket once some of the events are in, to one engine's directory after the
/// other, `skew` apart: a rolling deploy, during which the engines serve different registries.
async fn add_late_bucket(
    pool: PgPool,
    dirs: Vec<PathBuf>,
    events_before: i64,
    skew: Duration,
) -> BucketDef {
    // A plain loop: `eventually`'s async closure is not `Send`, and this runs spawned.
    while count(&pool, "SELECT count(*) FROM events").await < events_before {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut def = None;
    for dir in &dirs {
        if def.is_some() {
            tokio::time::sleep(skew).await;
        }
        def = Some(write_bucket(dir, LATE_BUCKET));
    }
    def.expect("at least one engine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_evaluators_keep_memberships_exact() {
    // Every engine gets the late bucket at once (as with one shared `buckets/`).
    run_model(LateBucket {
        after_fraction: env_or("MODEL_LATE_AT", 0.33),
        reload_skew: Duration::ZERO,
    })
    .await;
}

/// The same run during a rolling deploy of the late bucket near the end of ingest: the
/// engines pick it up 300 ms apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bucket_rolled_out_to_engines_one_by_one_stays_exact() {
    run_model(LateBucket {
        after_fraction: env_or("MODEL_LATE_AT", 0.9),
        reload_skew: Duration::from_millis(env_or("MODEL_RELOAD_SKEW_MS", 300)),
    })
    .await;
}

/// When the late bucket appears.
struct LateBucket {
    /// Fraction of the events ingested before it is written.
    after_fraction: f64,
    /// Delay between writing it to one engine's directory and the next.
    reload_skew: Duration,
}

/// One model run at a time: each runs 3 engines with connection pools of their own, and two
/// at once came near a server's default `max_connections` (100); past it, connecting fails.
static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run_model(late: LateBucket) {
    let _only_run = ONE_RUN_AT_A_TIME.lock().await;
    let users = env_or("MODEL_USERS", 200usize);
    let messages = env_or("MODEL_MESSAGES", 4_000usize);
    let seed = env_or("MODEL_SEED", rand::random::<u64>());
    eprintln!("model: MODEL_SEED={seed} MODEL_USERS={users} MODEL_MESSAGES={messages}");
    let started = Instant::now();

    let db = fresh_database().await.unwrap();
    let pool = db.store.pool().clone();
    let root = tempfile::tempdir().unwrap();
    let buckets_dirs: Vec<PathBuf> = (0..ENGINES)
        .map(|index| root.path().join(format!("engine-{index}")).join("buckets"))
        .collect();
    let mut buckets: Vec<BucketDef> = Vec::new();
    for dir in &buckets_dirs {
        std::fs::create_dir_all(dir).unwrap();
        buckets = BUCKET_FILES
            .iter()
            .map(|file| write_bucket(dir, *file))
            .collect();
    }

    let workload = generate(seed, users, messages, Utc::now());
    let model = Model::of(&workload);

    let engines = start_engines(&db.url, &buckets_dirs).await;
    // Ingest only after the (empty) backfill: otherwise joins could be silent.
    eventually("the backfills", Duration::from_secs(30), async || {
        count(
            &pool,
            "SELECT count(*) FROM buckets WHERE backfilled_hash = criteria_hash",
        )
        .await
            == buckets.len() as i64
    })
    .await;

    let ingest_started = Instant::now();
    let late_bucket = tokio::spawn(add_late_bucket(
        pool.clone(),
        buckets_dirs.clone(),
        // About half the messages are events: by default a third of the way through.
        (messages as f64 * 0.5 * late.after_fraction) as i64,
        late.reload_skew,
    ));
    let clients: Vec<_> = workload
        .streams
        .iter()
        .map(|batches| tokio::spawn(ingest_stream(db.store.clone(), batches.clone())))
        .collect();
    let mut retries = 0;
    for client in clients {
        retries += client.await.unwrap();
    }
    buckets.push(late_bucket.await.unwrap());
    let ingest_time = ingest_started.elapsed();
    // A round deletes its queue entries in its own transaction, so an empty queue (seen from
    // outside) means every round that claimed work has committed.
    eventually("the queue to drain", Duration::from_secs(300), async || {
        count(&pool, "SELECT count(*) FROM eval_queue").await == 0
    })
    .await;
    eventually(
        "the late bucket's backfill",
        Duration::from_secs(60),
        async || {
            count(
                &pool,
                "SELECT count(*) FROM buckets WHERE backfilled_hash = criteria_hash",
            )
            .await
                == buckets.len() as i64
        },
    )
    .await;
    let drain_time = ingest_started.elapsed();
    let rounds: Vec<u64> = engines.iter().map(|e| e.stats().rounds.get()).collect();
    let errors: u64 = engines.iter().map(|e| e.stats().errors.get()).sum();
    for engine in engines {
        engine.shutdown().await;
    }

    let now_ms = Utc::now().timestamp_millis();
    let stored = Model::read(&pool).await;
    assert_same("contact properties", &stored.properties, &model.properties);
    assert_same(
        "events (each message id once)",
        &stored.events,
        &model.events,
    );
    let expected = model.expected_members(&buckets, now_ms);

    let memberships = read_memberships(&pool).await;
    let transitions = read_transitions(&pool).await;
    let mut problems = Vec::new();
    for pair in transitions.keys() {
        if !memberships.contains_key(pair) {
            problems.push(format!("{pair:?}: transitions without any membership"));
        }
    }
    let limits: HashMap<&str, EntryLimit> = buckets
        .iter()
        .map(|b| (b.id.as_str(), b.entry_limit))
        .collect();
    for pair in expected.iter().chain(memberships.keys()) {
        let no_epochs = Vec::new();
        let no_transitions = Vec::new();
        check_pair(
            pair,
            limits[pair.0.as_str()],
            pair.0 == LATE_BUCKET.0,
            memberships.get(pair).unwrap_or(&no_epochs),
            transitions.get(pair).unwrap_or(&no_transitions),
            expected.contains(pair),
            &mut problems,
        );
    }
    problems.dedup();

    let member_counts: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT b.id, b.member_count, \
                (SELECT count(*) FROM memberships m WHERE m.bucket_id = b.id AND m.status = 'active') \
         FROM buckets b ORDER BY b.id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for (bucket, member_count, active) in &member_counts {
        if member_count != active {
            problems.push(format!(
                "{bucket}: member_count {member_count} but {active} active rows"
            ));
        }
    }

    let epochs: usize = memberships.values().map(Vec::len).sum();
    let transition_count: usize = transitions.values().map(Vec::len).sum();
    eprintln!(
        "model: {} messages sent ({} duplicates, {retries} ingest retries), ingest {ingest_time:?}, \
         drained after {drain_time:?}, rounds per engine {rounds:?}, engine errors {errors}; \
         {} members expected, {epochs} epochs, {transition_count} transitions; total {:?}",
        workload.sent,
        workload.duplicates,
        expected.len(),
        started.elapsed()
    );
    let coverage = Coverage::of(&memberships, &transitions);
    for (bucket, counts) in &coverage {
        eprintln!("model:   {bucket}: {counts:?}");
    }
    assert!(
        problems.is_empty(),
        "{} problems (seed {seed}), first ones:\n{}",
        problems.len(),
        problems
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The workload must reach the interesting paths, or the checks above prove little.
    let reentries: usize = coverage.values().map(|c| c.reentries).sum();
    let suppressed: usize = coverage.values().map(|c| c.epochs - c.entered).sum();
    assert!(
        reentries > 0 && suppressed > 0,
        "no re-entries or no entry-limited joins: {coverage:?}"
    );
    assert!(
        rounds.iter().filter(|r| **r > 0).count() >= 2,
        "the evaluators did not share the work: {rounds:?}"
    );
}
