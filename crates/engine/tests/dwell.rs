//! Time in the bucket: `min_dwell` defers a leave, `max_dwell` forces one that the clock never
//! undoes, and `dwell` / `dwell_every` marks are emitted once each at their exact instants.

use std::time::{Duration, Instant};

use chrono::TimeDelta;
use membrane_engine::EngineConfig;
use membrane_store::testing::fresh_database;
use membrane_store::{Message, Store, TransitionRow};

const GOLD: &str = r#"
criteria = 'prop("tier") == "gold"'
min_dwell = "2s"
max_dwell = "5s"
dwell = ["1s"]
dwell_every = "2s"
"#;

async fn set_tier(store: &Store, user: &str, tier: &str) {
    let traits = serde_json::json!({ "tier": tier })
        .as_object()
        .cloned()
        .unwrap();
    let message = Message::Identify {
        message_id: None,
        user_id: user.to_owned(),
        traits,
    };
    store.ingest(&[message]).await.unwrap();
}

async fn wait_for(store: &Store, key: &str, within: Duration) -> TransitionRow {
    let deadline = Instant::now() + within;
    loop {
        let all = store.transitions_after(0, 1_000).await.unwrap();
        if let Some(found) = all.iter().find(|t| t.key == key) {
            return found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {key} within {within:?}: {all:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dwell_rules_follow_the_clock() {
    let db = fresh_database().await.unwrap();
    let store = db.store.clone();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gold.toml"), GOLD).unwrap();
    let mut config = EngineConfig::new(dir.path().to_path_buf());
    config.sweep_interval = Duration::from_millis(200);
    let engine = membrane_engine::start(store.clone(), config).await.unwrap();

    set_tier(&store, "brief", "gold").await;
    set_tier(&store, "loyal", "gold").await;
    let entered = wait_for(
        &store,
        "bucket:gold:brief:entered:1",
        Duration::from_secs(5),
    )
    .await;
    let loyal_entered = wait_for(
        &store,
        "bucket:gold:loyal:entered:1",
        Duration::from_secs(5),
    )
    .await;

    // `brief` stops qualifying at once, but stays until min_dwell has passed.
    set_tier(&store, "brief", "silver").await;
    let left = wait_for(&store, "bucket:gold:brief:left:1", Duration::from_secs(5)).await;
    assert_eq!(left.reason, "criteria");
    assert!(
        left.occurred_at >= entered.occurred_at + TimeDelta::seconds(2),
        "left at {} before min_dwell from {}",
        left.occurred_at,
        entered.occurred_at
    );

    // `loyal` gets its marks at their exact instants, then max_dwell takes it out.
    let one_day = wait_for(
        &store,
        "bucket:gold:loyal:dwell:1:1s",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        one_day.occurred_at,
        loyal_entered.occurred_at + TimeDelta::seconds(1)
    );
    let tick = wait_for(
        &store,
        "bucket:gold:loyal:dwell:1:every:2",
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(
        tick.occurred_at,
        loyal_entered.occurred_at + TimeDelta::seconds(4)
    );
    let expired = wait_for(&store, "bucket:gold:loyal:left:1", Duration::from_secs(6)).await;
    assert_eq!(expired.reason, "max_dwell");

    // Still gold, but the clock alone never re-admits after max_dwell.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!store.is_member("gold", "loyal").await.unwrap());
    // A new profile change does.
    set_tier(&store, "loyal", "gold").await;
    wait_for(
        &store,
        "bucket:gold:loyal:entered:2",
        Duration::from_secs(5),
    )
    .await;

    let keys: Vec<String> = store
        .transitions_after(0, 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.key)
        .collect();
    let dwell_marks = keys
        .iter()
        .filter(|k| k.contains(":loyal:dwell:1:"))
        .count();
    assert_eq!(dwell_marks, 3, "1s, every:1, every:2 once each: {keys:?}");
    engine.shutdown().await;
}
