//! Sweeps and backfills (issue 5): sweeps re-check candidates as well as members, under a
//! per-bucket advisory lock, without re-admitting a `max_dwell` leaver by the clock; backfills
//! persist their progress, resume after a crash without doing a page twice, and stop while
//! their bucket is disabled. Real Postgres, real WASM, engines in process.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use membrane_engine::{EngineConfig, EngineHandle};
use membrane_store::console::{set_bucket_enabled, snapshot};
use membrane_store::testing::fresh_database;
use membrane_store::{BackfillProgress, Message, Store, TransitionRow};

async fn track(store: &Store, user: &str, event: &str) {
    let message = Message::Track {
        message_id: None,
        user_id: user.to_owned(),
        event: event.to_owned(),
        occurred_at: chrono::Utc::now(),
        properties: Default::default(),
    };
    store.ingest(&[message]).await.expect("ingest");
}

async fn start(store: &Store, dir: &Path, configure: impl Fn(&mut EngineConfig)) -> EngineHandle {
    let mut config = EngineConfig::new(dir.to_path_buf());
    configure(&mut config);
    membrane_engine::start(store.clone(), config)
        .await
        .expect("the engine starts")
}

async fn transitions(store: &Store) -> Vec<TransitionRow> {
    store
        .transitions_after(0, 10_000)
        .await
        .expect("transitions")
}

async fn wait_for(store: &Store, key: &str, within: Duration) -> TransitionRow {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = transitions(store).await.into_iter().find(|t| t.key == key) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {key} within {within:?}: {:#?}",
            transitions(store).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One event for each of `users` users (`buy` where `buys` says so, else `look`), processed by
/// an engine with no buckets; then a `buyers` bucket (`event("buy").exists()`) is written to
/// the returned directory, for the next engine to backfill.
async fn history_then_buyers_bucket(
    store: &Store,
    users: usize,
    buys: impl Fn(usize) -> bool,
) -> tempfile::TempDir {
    let messages: Vec<Message> = (0..users)
        .map(|user| Message::Track {
            message_id: None,
            user_id: format!("user-{user:05}"),
            event: if buys(user) { "buy" } else { "look" }.to_owned(),
            occurred_at: chrono::Utc::now(),
            properties: Default::default(),
        })
        .collect();
    store.ingest(&messages).await.expect("ingest");
    let dir = tempfile::tempdir().expect("a temp dir");
    let drain = start(store, dir.path(), |_| {}).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.queued_changes().await.expect("queue") > 0 {
        assert!(Instant::now() < deadline, "the queue did not drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drain.shutdown().await;
    std::fs::write(
        dir.path().join("buyers.toml"),
        "criteria = 'event(\"buy\").exists()'\n",
    )
    .expect("bucket written");
    dir
}

async fn backfill_of(store: &Store, bucket: &str) -> Option<BackfillProgress> {
    snapshot(store, 0)
        .await
        .expect("snapshot")
        .buckets
        .into_iter()
        .find(|b| b.id == bucket)
        .and_then(|b| b.backfill)
}

/// An absence criterion joins with no event: with no engine firing timers, the sweep is the
/// backstop; the user is a candidate (they have the event), and the sweep admits them once it
/// ages out of the window. After `max_dwell` the sweep does
/// not re-admit them, though the criteria still hold; a new event makes them a candidate again.
#[tokio::test(flavor = "multi_thread")]
async fn sweeps_join_candidates_but_never_readmit_after_max_dwell() {
    let db = fresh_database().await.expect("a database");
    let store = db.store.clone();
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(
        dir.path().join("quiet.toml"),
        r#"criteria = 'event("ping").exists() and event("ping").within(1s).not_exists()'
max_dwell = "1s"
"#,
    )
    .expect("bucket written");
    let engine = start(&store, dir.path(), |c| {
        c.sweep_interval = Duration::from_millis(200);
        c.fire_timers = false;
    })
    .await;

    track(&store, "ann", "ping").await;
    let entered = wait_for(&store, "bucket:quiet:ann:entered:1", Duration::from_secs(5)).await;
    assert_eq!(entered.source, "sweep");
    let left = wait_for(&store, "bucket:quiet:ann:left:1", Duration::from_secs(5)).await;
    assert_eq!(left.reason, "max_dwell");

    // Many sweeps later: still out, though the criteria hold.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!store.is_member("quiet", "ann").await.expect("is_member"));

    // A new event: once it ages out, the clock may admit them again.
    track(&store, "ann", "ping").await;
    let again = wait_for(&store, "bucket:quiet:ann:entered:2", Duration::from_secs(5)).await;
    assert_eq!(again.source, "sweep");

    let found = engine
        .stats()
        .sweep_found_work
        .get_or_create(&membrane_engine::TransitionKind { kind: "joined" })
        .get();
    assert!(found >= 2, "sweep_found_work{{kind=joined}} is {found}");
    engine.shutdown().await;
}

/// Each user's timer in `bucket` and the row's physical address (which an update changes).
async fn timer_rows(store: &Store, bucket: &str) -> HashMap<String, (DateTime<Utc>, String)> {
    let rows: Vec<(String, DateTime<Utc>, String)> =
        sqlx::query_as("SELECT user_id, due_at, ctid::text FROM timers WHERE bucket_id = $1")
            .bind(bucket)
            .fetch_all(store.pool())
            .await
            .expect("timers");
    rows.into_iter()
        .map(|(user, due, ctid)| (user, (due, ctid)))
        .collect()
}

/// Each contact row's `xmax`: a row lock (`FOR UPDATE`) sets it.
async fn contact_locks(store: &Store) -> HashMap<String, String> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT user_id, xmax::text FROM contacts")
        .fetch_all(store.pool())
        .await
        .expect("contacts");
    rows.into_iter().collect()
}

/// A sweep checks every member and candidate, but locks and writes only the users whose state
/// is wrong: here a timer that went missing and one moved a day out are put back exactly, and
/// no other user's contact row is locked or timer rewritten.
#[tokio::test(flavor = "multi_thread")]
async fn sweeps_write_only_what_is_wrong() {
    let db = fresh_database().await.expect("a database");
    let store = db.store.clone();
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(
        dir.path().join("recent.toml"),
        "criteria = 'event(\"visit\").within(1h).exists()'\n",
    )
    .expect("bucket written");
    let engine = start(&store, dir.path(), |c| {
        c.sweep_interval = Duration::from_secs(3_600);
        c.fire_timers = false;
    })
    .await;
    let users: Vec<String> = (0..30).map(|n| format!("user-{n:02}")).collect();
    for user in &users {
        track(&store, user, "visit").await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let armed = loop {
        let armed = timer_rows(&store, "recent").await;
        if armed.len() == users.len() && store.queued_changes().await.expect("queue") == 0 {
            break armed;
        }
        assert!(Instant::now() < deadline, "timers armed: {}", armed.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    sqlx::query("DELETE FROM timers WHERE bucket_id = 'recent' AND user_id = 'user-00'")
        .execute(store.pool())
        .await
        .expect("timer removed");
    sqlx::query(
        "UPDATE timers SET due_at = due_at + interval '1 day' \
         WHERE bucket_id = 'recent' AND user_id = 'user-01'",
    )
    .execute(store.pool())
    .await
    .expect("timer moved");
    let tampered = timer_rows(&store, "recent").await;
    let locks = contact_locks(&store).await;

    let run = engine
        .sweep_now("recent")
        .await
        .expect("the sweep runs")
        .expect("no other engine sweeps");
    assert_eq!(run.checked, users.len() as i64);
    assert_eq!((run.joined, run.left_count), (0, 0));

    let swept = timer_rows(&store, "recent").await;
    let swept_locks = contact_locks(&store).await;
    for user in &users {
        assert_eq!(swept[user].0, armed[user].0, "{user}'s timer");
        let repaired = user == "user-00" || user == "user-01";
        assert_eq!(
            swept_locks[user] != locks[user],
            repaired,
            "{user}'s contact row locked: {} then {}",
            locks[user],
            swept_locks[user]
        );
        if !repaired {
            assert_eq!(
                swept[user].1, tampered[user].1,
                "{user}'s timer row rewritten"
            );
        }
    }
    engine.shutdown().await;
}

/// A member's past `dwell` marks are due at every evaluation, their keys making the second
/// write a no-op: a sweep writes each mark once, and the next sweep, finding them written,
/// locks no one.
#[tokio::test(flavor = "multi_thread")]
async fn sweeps_leave_written_dwell_marks_alone() {
    let db = fresh_database().await.expect("a database");
    let store = db.store.clone();
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(
        dir.path().join("visitors.toml"),
        "criteria = 'event(\"visit\").exists()'\ndwell = [\"1s\"]\n",
    )
    .expect("bucket written");
    let engine = start(&store, dir.path(), |c| {
        c.sweep_interval = Duration::from_secs(3_600);
        c.fire_timers = false;
    })
    .await;
    let users: Vec<String> = (0..5).map(|n| format!("user-{n}")).collect();
    for user in &users {
        track(&store, user, "visit").await;
    }
    for user in &users {
        let key = format!("bucket:visitors:{user}:entered:1");
        wait_for(&store, &key, Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let sweep = || async {
        engine
            .sweep_now("visitors")
            .await
            .expect("the sweep runs")
            .expect("no other engine sweeps")
    };
    let dwell_marks = || async {
        transitions(&store)
            .await
            .into_iter()
            .filter(|t| t.kind == "dwell")
            .count()
    };
    let first = sweep().await;
    assert_eq!(first.checked, users.len() as i64);
    assert_eq!(dwell_marks().await, users.len());
    let locks = contact_locks(&store).await;
    let second = sweep().await;
    assert_eq!(second.checked, users.len() as i64);
    assert_eq!(dwell_marks().await, users.len());
    assert_eq!(
        contact_locks(&store).await,
        locks,
        "the second sweep locked users"
    );
    engine.shutdown().await;
}

/// Two engines sweep the same buckets every 100 ms: the advisory lock lets only one sweep a
/// bucket at a time, so no two recorded sweeps of one bucket overlap.
#[tokio::test(flavor = "multi_thread")]
async fn one_engine_at_a_time_sweeps_a_bucket() {
    let db = fresh_database().await.expect("a database");
    let store = db.store.clone();
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(
        dir.path().join("recent.toml"),
        "criteria = 'event(\"ping\").within(1d).exists()'\n",
    )
    .expect("bucket written");
    for user in 0..300 {
        track(&store, &format!("user-{user:03}"), "ping").await;
    }
    let mut engines = Vec::new();
    for index in 0..2 {
        engines.push(
            start(&store, dir.path(), |c| {
                c.engine_id = format!("sweeper-{index}");
                c.sweep_interval = Duration::from_millis(100);
                c.page_size = 20;
            })
            .await,
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for engine in engines {
        engine.shutdown().await;
    }
    let detail = membrane_store::console::bucket_detail(&store, "recent", 1_000)
        .await
        .expect("detail")
        .expect("the bucket exists");
    let mut sweeps = detail.sweeps;
    assert!(sweeps.len() >= 5, "too few sweeps to tell: {sweeps:?}");
    sweeps.sort_by_key(|s| s.started_at);
    for pair in sweeps.windows(2) {
        assert!(
            pair[1].started_at >= pair[0].finished_at,
            "overlapping sweeps: {pair:?}"
        );
    }
    assert!(sweeps.iter().all(|s| s.checked == 300), "{sweeps:?}");
}

/// A backfill killed part-way (its engine's tasks aborted, its round rolled back) is resumed
/// by the next engine from its cursor: the same progress row, every user counted once, the
/// joins silent. Disabling the bucket stops the backfill at the next page; enabling it lets it
/// finish.
#[tokio::test(flavor = "multi_thread")]
async fn backfills_resume_after_a_crash_and_stop_while_disabled() {
    const USERS: usize = 6_000;
    let db = fresh_database().await.expect("a database");
    let store = db.store.clone();
    // The changes are processed before the bucket exists, so its backfill joins everyone
    // silently (a user with a pending change would join announced, as in real time).
    let dir = history_then_buyers_bucket(&store, USERS, |user| user % 3 == 0).await;
    let small_pages = |c: &mut EngineConfig| {
        c.page_size = 25;
        c.sweep_interval = Duration::from_secs(3_600);
    };

    let first = start(&store, dir.path(), small_pages).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let interrupted = loop {
        if let Some(progress) = backfill_of(&store, "buyers").await {
            if progress.users_done >= 500 {
                break progress;
            }
        }
        assert!(Instant::now() < deadline, "the backfill did not get going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    drop(first); // aborts every task mid-whatever, like a crash
    assert_eq!(interrupted.total_estimate, USERS as i64);
    assert!(
        interrupted.finished_at.is_none(),
        "finished too fast to interrupt"
    );

    let second = start(&store, dir.path(), small_pages).await;
    // Disabled part-way: the cursor stops moving.
    let deadline = Instant::now() + Duration::from_secs(20);
    let resumed = loop {
        let progress = backfill_of(&store, "buyers").await.expect("progress");
        if progress.users_done > interrupted.users_done {
            break progress;
        }
        assert!(Instant::now() < deadline, "the backfill was not resumed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(
        resumed.started_at, interrupted.started_at,
        "not the same backfill"
    );
    set_bucket_enabled(&store, "buyers", false)
        .await
        .expect("disabled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused = backfill_of(&store, "buyers").await.expect("progress");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        backfill_of(&store, "buyers").await.expect("progress"),
        paused,
        "the backfill went on while its bucket was disabled"
    );
    assert!(
        paused.finished_at.is_none(),
        "finished before the disable took effect"
    );

    set_bucket_enabled(&store, "buyers", true)
        .await
        .expect("enabled");
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let progress = backfill_of(&store, "buyers").await.expect("progress");
        if progress.finished_at.is_some() {
            break progress;
        }
        assert!(
            Instant::now() < deadline,
            "the backfill did not finish: {progress:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    second.shutdown().await;
    assert_eq!(
        done.users_done, USERS as i64,
        "a page was counted twice or skipped"
    );
    assert_eq!(done.percent(), 100);
    assert_eq!(
        store.member_count("buyers").await.expect("count"),
        Some(USERS.div_ceil(3) as i64)
    );
    assert!(
        transitions(&store).await.is_empty(),
        "a new bucket's backfill joins silently"
    );
}

/// Ingest takes no lock a backfill waits on, so changes commit while backfill pages are being
/// evaluated. Users who bought before the bucket existed join silently; every user whose
/// purchase arrives during the backfill is announced with exactly one `entered`, whichever of
/// the backfill and the real-time path admits them.
#[tokio::test(flavor = "multi_thread")]
async fn changes_arriving_during_a_backfill_are_announced() {
    const USERS: usize = 3_000;
    let db = fresh_database().await.expect("a database");
    let store = db.store.clone();
    let dir = history_then_buyers_bucket(&store, USERS, |user| user < 100).await;
    let engine = start(&store, dir.path(), |c| {
        c.page_size = 20;
        c.sweep_interval = Duration::from_secs(3_600);
    })
    .await;
    // Late buyers, one at a time, spread over the user range while the backfill pages on.
    let late: Vec<String> = (100..USERS)
        .step_by(9)
        .map(|user| format!("user-{user:05}"))
        .collect();
    for user in &late {
        track(&store, user, "buy").await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = backfill_of(&store, "buyers")
            .await
            .is_some_and(|progress| progress.finished_at.is_some());
        if done && store.queued_changes().await.expect("queue") == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the backfill did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    engine.shutdown().await;

    let entered: Vec<String> = transitions(&store)
        .await
        .into_iter()
        .filter(|t| t.bucket_id == "buyers" && t.kind == "entered")
        .map(|t| t.user_id)
        .collect();
    let mut announced = entered.clone();
    announced.sort();
    announced.dedup();
    assert_eq!(announced.len(), entered.len(), "an entry announced twice");
    assert_eq!(
        announced, late,
        "exactly the users who bought during the backfill are announced"
    );
    let members = store
        .members_page("buyers", "", 10_000)
        .await
        .expect("members");
    assert_eq!(members.len(), 100 + late.len());
}
