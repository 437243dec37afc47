//! The overview read from a real, migrated database (`DATABASE_URL`, else a private cluster)
//! through the store, then rendered.

use membrane_console::{render, App};
use membrane_store::console::{
    bucket_detail, seed_demo_rows_for_tests, set_bucket_enabled, snapshot, DatabaseInfo,
};
use membrane_store::testing::fresh_database;
use ratatui::backend::TestBackend;
use ratatui::Terminal;

#[tokio::test]
async fn overview_of_a_seeded_database() {
    let database = fresh_database().await.expect("a test database");
    let store = &database.store;
    let seeded_at = seed_demo_rows_for_tests(store).await.expect("seeding");

    let mut overview = snapshot(store, 50).await.expect("snapshot");
    assert_eq!(overview.database.name, database.name);
    let rates: Vec<(&str, i64, i64, i64)> = overview
        .buckets
        .iter()
        .map(|b| (b.id.as_str(), b.member_count, b.entered_1m, b.left_1m))
        .collect();
    assert_eq!(
        rates,
        [
            ("active-users", 2, 2, 1),
            ("big-spenders", 1, 1, 0),
            ("newsletter", 0, 0, 0),
        ]
    );
    let kinds: Vec<&str> = overview
        .transitions
        .iter()
        .map(|t| t.kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        ["dwell", "left", "entered", "entered", "entered"],
        "newest first"
    );
    assert_eq!(overview.queue.depth, 2);
    assert_eq!(overview.engines.len(), 1);
    let last_sweep = overview.buckets[0].last_sweep.as_ref().expect("a sweep");
    assert_eq!((last_sweep.checked, last_sweep.left_count), (3, 1));

    // The database's name and address differ per run; ages are rendered as of the seeding.
    overview.database = DatabaseInfo {
        name: "membrane_test".to_owned(),
        server: "test-server:5432".to_owned(),
    };
    overview.taken_at = seeded_at;
    let mut app = App::default();
    app.apply_snapshot(overview);
    let mut terminal = Terminal::new(TestBackend::new(120, 36)).expect("test backend");
    terminal
        .draw(|frame| render(frame, &app))
        .expect("drawing on a test backend");
    insta::assert_snapshot!(terminal.backend());
}

#[tokio::test]
async fn bucket_detail_and_the_enable_switch() {
    let database = fresh_database().await.expect("a test database");
    let store = &database.store;
    seed_demo_rows_for_tests(store).await.expect("seeding");

    let detail = bucket_detail(store, "active-users", 10)
        .await
        .expect("detail")
        .expect("the bucket exists");
    let members: Vec<(&str, i32)> = detail
        .members
        .iter()
        .map(|m| (m.user_id.as_str(), m.epoch))
        .collect();
    assert_eq!(members, [("alice", 1), ("bob", 2)], "active members only");
    assert_eq!(detail.transitions.len(), 4);
    assert!(detail
        .transitions
        .iter()
        .all(|t| t.bucket_id == "active-users"));
    assert_eq!(detail.sweeps.len(), 1);
    assert!(detail.definition.contains("session_start"));
    assert_eq!(
        bucket_detail(store, "nope", 10).await.expect("detail"),
        None
    );

    assert!(set_bucket_enabled(store, "active-users", false)
        .await
        .expect("disable"));
    assert!(!set_bucket_enabled(store, "nope", false)
        .await
        .expect("no such bucket"));
    let after = snapshot(store, 0).await.expect("snapshot");
    let enabled: Vec<bool> = after.buckets.iter().map(|b| b.enabled).collect();
    assert_eq!(enabled, [false, true, false]);
    assert!(
        after.transitions.is_empty(),
        "a feed limit of 0 reads no transitions"
    );
}
