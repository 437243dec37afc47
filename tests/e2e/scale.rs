//! `membrane bench scale` at a small population: the generator, the ten buckets' backfills,
//! the sweep against its floor and against per-member evaluation, and timer lag all run, and
//! every timer-lag user leaves at its window's end (the bench fails otherwise).

use membrane_store::testing::fresh_database;

use crate::support::run_bench;

#[tokio::test(flavor = "multi_thread")]
async fn the_scale_bench_runs_every_phase_on_a_small_population() {
    let db = fresh_database().await.expect("a fresh test database");
    let args = [
        "scale",
        "--database-url",
        &db.url,
        "--users",
        "3000",
        "--events-per-user",
        "6",
        "--lag-users",
        "200",
        "--lag-lead",
        "3",
        "--lag-spread",
        "2",
    ];
    let output = run_bench(args.map(str::to_owned).to_vec()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench failed:\n{stdout}\nstderr:\n{stderr}"
    );
    for expected in [
        "3000 users, 18000 events, 10 buckets",
        "backfilled every bucket",
        "pass 2: sweep",
        "per-member evaluation of its",
        "timer lag over 200 window leaves",
        "peak RSS",
    ] {
        assert!(stdout.contains(expected), "no `{expected}` in:\n{stdout}");
    }

    // What the bench measured is what the database holds: the generated population plus the
    // timer-lag users, a composite bucket with members, and every timer-lag user gone from
    // `visited-today`, by a timer, once.
    let store = &db.store;
    assert_eq!(store.users_page("", 10_000).await.unwrap().len(), 3_200);
    let composite = store.member_count("composite").await.unwrap().unwrap_or(0);
    assert!(composite > 100, "composite has {composite} members");
    let lag_leaves: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT bucket_id, user_id, source FROM transitions \
         WHERE kind = 'left' AND user_id LIKE 'lag-%' ORDER BY user_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(lag_leaves.len(), 200, "{lag_leaves:?}");
    assert!(
        lag_leaves
            .iter()
            .all(|(bucket, _, source)| bucket == "visited-today" && source == "timer"),
        "{lag_leaves:?}"
    );
}
