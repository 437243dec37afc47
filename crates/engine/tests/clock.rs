//! The clock test suite (issue 5): with windows of seconds and a sweep interval of an hour, only
//! durable timers can move these memberships. Every case runs concurrently against one engine;
//! each clock-driven transition must be written by a timer (source `timer`), never before its
//! exact instant (computed from the event times and the entry instants) and committed within
//! 1.5 s of it, and every user's transitions must be exactly the expected keys, once each.
//! Timers due together beyond the claim batch all fire on time; a disabled bucket's do not.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use membrane_engine::EngineConfig;
use membrane_store::testing::fresh_database;
use membrane_store::{Message, Store};
use serde_json::{json, Map, Value};

/// How late a clock-driven transition may be committed after its exact instant.
const ON_TIME: TimeDelta = TimeDelta::milliseconds(1_500);

/// Users whose timers come due at one instant, several times the engine's claim batch.
const CROWD: usize = 60;
const BATCH: i64 = 10;

const BUCKETS: &[(&str, &str)] = &[
    ("window", r#"criteria = 'event("ping").within(3s).exists()'"#),
    (
        "fading",
        r#"criteria = 'event("click").within(4s).count() >= 2'"#,
    ),
    (
        "dormant",
        r#"criteria = 'event("session").exists() and event("session").within(3s).not_exists()'"#,
    ),
    ("trial-over", r#"criteria = 'prop("trial_ends_at") < now()'"#),
    (
        "trialing",
        r#"criteria = 'prop("trial_ends_at") > now() - 1s'"#,
    ),
    (
        "sticky",
        "criteria = 'event(\"tap\").within(1s).exists()'\nmin_dwell = \"3s\"",
    ),
    (
        "gold",
        "criteria = 'prop(\"tier\") == \"gold\"'\nmin_dwell = \"2s\"",
    ),
    (
        "capped",
        "criteria = '''\n  event(\"x\").within(2s).exists()\n  or (event(\"x\").exists() and event(\"x\").within(4s).not_exists())\n'''\nmax_dwell = \"1s\"",
    ),
    (
        "marks",
        "criteria = 'prop(\"plan\") == \"pro\"'\ndwell = [\"1s\", \"3s\"]\ndwell_every = \"2s\"",
    ),
    ("crowd", r#"criteria = 'event("beat").within(2s).exists()'"#),
    ("paused", r#"criteria = 'event("tick").within(1s).exists()'"#),
    (
        "period",
        "criteria = 'event(\"buy\").within(1s).exists()'\nentry_limit = \"once_per_period\"\nentry_period = \"3s\"",
    ),
];

/// A transition as committed.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Committed {
    source: String,
    reason: String,
    occurred_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
}

/// Now, at the millisecond precision of the clock's arithmetic.
fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now is representable")
}

async fn track(store: &Store, user: &str, event: &str, at: DateTime<Utc>) {
    let message = Message::Track {
        message_id: None,
        user_id: user.to_owned(),
        event: event.to_owned(),
        occurred_at: at,
        properties: Map::new(),
    };
    store.ingest(&[message]).await.expect("track is ingested");
}

async fn identify(store: &Store, user: &str, traits: Value) {
    let message = Message::Identify {
        message_id: None,
        user_id: user.to_owned(),
        traits: traits.as_object().cloned().expect("traits are an object"),
    };
    store
        .ingest(&[message])
        .await
        .expect("identify is ingested");
}

/// Waits (up to `within`) for the transition with `key` to commit.
async fn committed(store: &Store, key: &str, within: Duration) -> Committed {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let found: Option<Committed> = sqlx::query_as(
            "SELECT source, reason, occurred_at, created_at FROM transitions WHERE key = $1",
        )
        .bind(key)
        .fetch_optional(store.pool())
        .await
        .expect("transitions are readable");
        if let Some(found) = found {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} not committed within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a clock-driven transition and checks that a timer wrote it on time.
async fn on_time(store: &Store, key: &str, exact: DateTime<Utc>, reason: &str) -> Committed {
    let wait = (exact - Utc::now() + ON_TIME * 2)
        .to_std()
        .unwrap_or_default();
    let found = committed(store, key, wait).await;
    assert_eq!(found.source, "timer", "{key}: {found:?}");
    assert_eq!(found.reason, reason, "{key}: {found:?}");
    assert!(
        found.occurred_at >= exact,
        "{key} at {} before its instant {exact}",
        found.occurred_at
    );
    let late = found.created_at - exact;
    eprintln!(
        "{key}: committed {} ms after its instant",
        late.num_milliseconds()
    );
    assert!(
        late <= ON_TIME,
        "{key} committed {late} after its instant {exact}"
    );
    found
}

/// The user's transitions in `bucket` are exactly `keys` (each once: the outbox key is unique).
async fn exactly(store: &Store, bucket: &str, user: &str, keys: &[&str]) {
    let written: Vec<String> = sqlx::query_scalar(
        "SELECT key FROM transitions WHERE bucket_id = $1 AND user_id = $2 ORDER BY id",
    )
    .bind(bucket)
    .bind(user)
    .fetch_all(store.pool())
    .await
    .expect("transitions are readable");
    let expected: BTreeSet<String> = keys
        .iter()
        .map(|key| format!("bucket:{bucket}:{user}:{key}"))
        .collect();
    assert_eq!(
        written.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "{bucket}/{user}: {written:?}"
    );
    assert_eq!(
        written.len(),
        expected.len(),
        "{bucket}/{user}: {written:?}"
    );
}

fn key(bucket: &str, user: &str, rest: &str) -> String {
    format!("bucket:{bucket}:{user}:{rest}")
}

/// The window's last event ages out: leave at `occurred + 3 s + 1 ms`.
async fn window_leave(store: &Store) {
    let t0 = now_ms();
    track(store, "w1", "ping", t0).await;
    committed(store, &key("window", "w1", "entered:1"), secs(5)).await;
    let exact = t0 + TimeDelta::milliseconds(3_001);
    on_time(store, &key("window", "w1", "left:1"), exact, "criteria").await;
    exactly(store, "window", "w1", &["entered:1", "left:1"]).await;
}

/// Three clicks, at least two within 4 s: leave when the second-newest ages out.
async fn count_falls_below(store: &Store) {
    let t0 = now_ms();
    for offset in [-1_000, -500, 0] {
        track(store, "f1", "click", t0 + TimeDelta::milliseconds(offset)).await;
    }
    committed(store, &key("fading", "f1", "entered:1"), secs(5)).await;
    let exact = t0 + TimeDelta::milliseconds(-500 + 4_001);
    on_time(store, &key("fading", "f1", "left:1"), exact, "criteria").await;
    exactly(store, "fading", "f1", &["entered:1", "left:1"]).await;
}

/// Absence: the user joins when the last session ages out of the 3 s window; a new session
/// takes them out at once, and the clock brings them back 3 s later.
async fn absence_join(store: &Store) {
    let t0 = now_ms();
    track(store, "d1", "session", t0).await;
    let exact = t0 + TimeDelta::milliseconds(3_001);
    on_time(store, &key("dormant", "d1", "entered:1"), exact, "criteria").await;
    let t1 = now_ms();
    track(store, "d1", "session", t1).await;
    let left = committed(store, &key("dormant", "d1", "left:1"), secs(5)).await;
    assert_eq!(left.source, "event");
    let exact = t1 + TimeDelta::milliseconds(3_001);
    on_time(store, &key("dormant", "d1", "entered:2"), exact, "criteria").await;
    exactly(
        store,
        "dormant",
        "d1",
        &["entered:1", "left:1", "entered:2"],
    )
    .await;
}

/// A timestamp property comes due: one bucket joins just after it, another (with an offset)
/// leaves a second later.
async fn timestamp_property(store: &Store) {
    let ends = now_ms() + secs_delta(2);
    let text = ends.to_rfc3339_opts(SecondsFormat::Millis, true);
    identify(store, "t1", json!({ "trial_ends_at": text })).await;
    committed(store, &key("trialing", "t1", "entered:1"), secs(5)).await;
    let join = ends + TimeDelta::milliseconds(1);
    on_time(
        store,
        &key("trial-over", "t1", "entered:1"),
        join,
        "criteria",
    )
    .await;
    let leave = ends + secs_delta(1);
    on_time(store, &key("trialing", "t1", "left:1"), leave, "criteria").await;
    exactly(store, "trial-over", "t1", &["entered:1"]).await;
    exactly(store, "trialing", "t1", &["entered:1", "left:1"]).await;
}

/// min_dwell defers a window leave (and a property leave) until the member has been in 3 s.
async fn min_dwell_defers(store: &Store) {
    track(store, "s1", "tap", now_ms()).await;
    let entered = committed(store, &key("sticky", "s1", "entered:1"), secs(5)).await;
    let exact = entered.occurred_at + secs_delta(3);
    on_time(store, &key("sticky", "s1", "left:1"), exact, "criteria").await;
    exactly(store, "sticky", "s1", &["entered:1", "left:1"]).await;

    identify(store, "g1", json!({ "tier": "gold" })).await;
    let entered = committed(store, &key("gold", "g1", "entered:1"), secs(5)).await;
    identify(store, "g1", json!({ "tier": "silver" })).await;
    let exact = entered.occurred_at + secs_delta(2);
    on_time(store, &key("gold", "g1", "left:1"), exact, "criteria").await;
    exactly(store, "gold", "g1", &["entered:1", "left:1"]).await;
}

/// max_dwell takes the member out after 1 s; the criteria turn false and then true again by the
/// clock alone, which must not re-admit them. A new event does.
async fn max_dwell_without_rejoin(store: &Store) {
    let t0 = now_ms();
    track(store, "c1", "x", t0).await;
    let entered = committed(store, &key("capped", "c1", "entered:1"), secs(5)).await;
    let exact = entered.occurred_at + secs_delta(1);
    on_time(store, &key("capped", "c1", "left:1"), exact, "max_dwell").await;
    // True again from t0 + 4.001 s: give a timer every chance to (wrongly) act on it.
    let rejoin = t0 + TimeDelta::milliseconds(4_001);
    tokio::time::sleep((rejoin - Utc::now() + ON_TIME).to_std().unwrap_or_default()).await;
    assert!(!store.is_member("capped", "c1").await.expect("readable"));
    exactly(store, "capped", "c1", &["entered:1", "left:1"]).await;

    track(store, "c1", "x", now_ms()).await;
    let back = committed(store, &key("capped", "c1", "entered:2"), secs(5)).await;
    assert_eq!(back.source, "event");
    let exact = back.occurred_at + secs_delta(1);
    on_time(store, &key("capped", "c1", "left:2"), exact, "max_dwell").await;
    exactly(
        store,
        "capped",
        "c1",
        &["entered:1", "left:1", "entered:2", "left:2"],
    )
    .await;
}

/// `dwell` labels and `dwell_every` ticks, each at its exact instant.
async fn dwell_marks(store: &Store) {
    identify(store, "m1", json!({ "plan": "pro" })).await;
    let entered = committed(store, &key("marks", "m1", "entered:1"), secs(5)).await;
    let at = |secs: i64| entered.occurred_at + secs_delta(secs);
    for (label, instant) in [
        ("1s", at(1)),
        ("every:1", at(2)),
        ("3s", at(3)),
        ("every:2", at(4)),
    ] {
        let mark = on_time(
            store,
            &key("marks", "m1", &format!("dwell:1:{label}")),
            instant,
            "dwell",
        )
        .await;
        assert_eq!(
            mark.occurred_at, instant,
            "{label} is stamped with its exact instant"
        );
    }
    identify(store, "m1", json!({ "plan": "free" })).await;
    committed(store, &key("marks", "m1", "left:1"), secs(5)).await;
    exactly(
        store,
        "marks",
        "m1",
        &[
            "entered:1",
            "dwell:1:1s",
            "dwell:1:every:1",
            "dwell:1:3s",
            "dwell:1:every:2",
            "left:1",
        ],
    )
    .await;
}

/// once_per_period with timer leaves: a re-entry within 3 s of the last (clock-driven) leave
/// writes the membership but emits no `entered`; one after the period does.
async fn once_per_period(store: &Store) {
    let buy = |at| track(store, "p1", "buy", at);
    let t0 = now_ms();
    buy(t0).await;
    committed(store, &key("period", "p1", "entered:1"), secs(5)).await;
    let left1 = on_time(
        store,
        &key("period", "p1", "left:1"),
        t0 + TimeDelta::milliseconds(1_001),
        "criteria",
    )
    .await;
    let t1 = now_ms();
    buy(t1).await;
    let left2 = on_time(
        store,
        &key("period", "p1", "left:2"),
        t1 + TimeDelta::milliseconds(1_001),
        "criteria",
    )
    .await;
    assert!(left2.occurred_at - left1.occurred_at < secs_delta(3));
    let after_period = left2.occurred_at + secs_delta(3) + TimeDelta::milliseconds(100);
    tokio::time::sleep((after_period - Utc::now()).to_std().unwrap_or_default()).await;
    let t2 = now_ms();
    buy(t2).await;
    committed(store, &key("period", "p1", "entered:3"), secs(5)).await;
    on_time(
        store,
        &key("period", "p1", "left:3"),
        t2 + TimeDelta::milliseconds(1_001),
        "criteria",
    )
    .await;
    exactly(
        store,
        "period",
        "p1",
        &["entered:1", "left:1", "left:2", "entered:3", "left:3"],
    )
    .await;
    let epochs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM memberships WHERE bucket_id = 'period' AND user_id = 'p1'",
    )
    .fetch_one(store.pool())
    .await
    .expect("memberships are readable");
    assert_eq!(epochs, 3, "the silent re-entry still wrote its membership");
}

/// Many timers due at the same instant, several times the claim batch: none waits behind the
/// batch limit.
async fn crowd_beyond_the_batch(store: &Store) {
    let t0 = now_ms();
    let users: Vec<String> = (0..CROWD).map(|i| format!("crowd{i:03}")).collect();
    let beats: Vec<Message> = users
        .iter()
        .map(|user| Message::Track {
            message_id: None,
            user_id: user.clone(),
            event: "beat".to_owned(),
            occurred_at: t0,
            properties: Map::new(),
        })
        .collect();
    store.ingest(&beats).await.expect("beats are ingested");
    let exact = t0 + TimeDelta::milliseconds(2_001);
    for user in &users {
        on_time(store, &key("crowd", user, "left:1"), exact, "criteria").await;
    }
    for user in &users {
        exactly(store, "crowd", user, &["entered:1", "left:1"]).await;
    }
}

/// A disabled bucket's timers do not fire; once it is enabled again, they do.
async fn disabled_bucket_waits(store: &Store) {
    let t0 = now_ms();
    track(store, "q1", "tick", t0).await;
    committed(store, &key("paused", "q1", "entered:1"), secs(5)).await;
    assert!(
        membrane_store::console::set_bucket_enabled(store, "paused", false)
            .await
            .expect("the switch is writable")
    );
    let due = t0 + TimeDelta::milliseconds(1_001);
    tokio::time::sleep((due - Utc::now() + ON_TIME).to_std().unwrap_or_default()).await;
    assert!(store.is_member("paused", "q1").await.expect("readable"));
    exactly(store, "paused", "q1", &["entered:1"]).await;
    membrane_store::console::set_bucket_enabled(store, "paused", true)
        .await
        .expect("the switch is writable");
    // The timer task looks at least every 5 s; nothing wakes it when a bucket is enabled.
    let left = committed(store, &key("paused", "q1", "left:1"), secs(8)).await;
    assert_eq!(left.source, "timer");
    exactly(store, "paused", "q1", &["entered:1", "left:1"]).await;
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn secs_delta(n: i64) -> TimeDelta {
    TimeDelta::seconds(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timers_move_memberships_on_time() {
    let db = fresh_database().await.expect("a fresh test database");
    let store = db.store.clone();
    let dir = tempfile::tempdir().expect("a temporary buckets directory");
    for (id, body) in BUCKETS {
        std::fs::write(dir.path().join(format!("{id}.toml")), body).expect("bucket file");
    }
    let mut config = EngineConfig::new(dir.path().to_path_buf());
    // Only timers can do it: no sweep runs while the test does.
    config.sweep_interval = Duration::from_secs(3_600);
    config.batch_size = BATCH;
    let engine = membrane_engine::start(store.clone(), config)
        .await
        .expect("the engine starts");
    wait_backfilled(&store, BUCKETS.len()).await;

    tokio::join!(
        window_leave(&store),
        count_falls_below(&store),
        absence_join(&store),
        timestamp_property(&store),
        min_dwell_defers(&store),
        max_dwell_without_rejoin(&store),
        dwell_marks(&store),
        once_per_period(&store),
        crowd_beyond_the_batch(&store),
        disabled_bucket_waits(&store),
    );

    let stats = engine.stats();
    assert!(stats.timers_fired.get() > 0);
    assert!(stats.timers_armed.get() >= stats.timers_fired.get());
    // At least the deferred `sticky` leave's window edge and `capped`'s refused re-join.
    assert!(
        stats.timers_stale.get() >= 2,
        "{}",
        stats.timers_stale.get()
    );
    let sweeps: i64 = sqlx::query_scalar("SELECT count(*) FROM sweep_runs")
        .fetch_one(store.pool())
        .await
        .expect("sweep runs are readable");
    assert_eq!(sweeps, 0, "no sweep ran: timers did all of it");
    engine.shutdown().await;
}

/// Clock-driven joins wait for the backfill; these buckets start empty, so it is quick.
async fn wait_backfilled(store: &Store, buckets: usize) {
    let deadline = tokio::time::Instant::now() + secs(10);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM buckets WHERE backfilled_hash = criteria_hash",
        )
        .fetch_one(store.pool())
        .await
        .expect("buckets are readable");
        if done as usize == buckets {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} of {buckets} buckets backfilled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
