use std::time::Duration;

use crate::support::{eventually, RunningEngine};

const GOLD: &str = r#"
description = "Gold tier"
criteria = 'prop("tier") == "gold"'
"#;

const PLATINUM: &str = r#"
description = "Platinum tier"
criteria = 'prop("tier") == "platinum"'
"#;

const BROKEN: &str = r#"
description = "Platinum tier"
criteria = 'prop("tier") == "platinum" and'
"#;

/// Saving a bucket file under a running engine swaps its criteria in; saving a broken one keeps
/// the working version serving and records the error with file:line:col.
#[tokio::test(flavor = "multi_thread")]
async fn edited_bucket_takes_effect_and_broken_edit_keeps_old_version() {
    let engine = RunningEngine::start(&[("vip.toml", GOLD)]).await;
    let store = engine.db.store.clone();

    engine
        .identify("gold-user", serde_json::json!({"tier": "gold"}))
        .await;
    engine
        .wait_for_transition(Duration::from_secs(5), |t| {
            t.key == "bucket:vip:gold-user:entered:1"
        })
        .await;
    // A first-version backfill may announce the join while the change is still queued; the
    // real-time round that then takes it must run before the edit, or it would apply the new
    // criteria to that change and record the leave as its own (reason `criteria`).
    eventually(Duration::from_secs(5), "the queue to drain", || {
        let store = store.clone();
        async move { store.queue_is_empty().await.ok()?.then_some(()) }
    })
    .await;

    std::fs::write(engine.bucket_path("vip.toml"), PLATINUM).unwrap();
    // The changed criteria re-evaluate everyone: the gold member leaves, emitted.
    let left = engine
        .wait_for_transition(Duration::from_secs(5), |t| {
            t.key == "bucket:vip:gold-user:left:1"
        })
        .await;
    assert_eq!(left.reason, "criteria_changed");

    engine
        .identify("platinum-user", serde_json::json!({"tier": "platinum"}))
        .await;
    engine
        .wait_for_transition(Duration::from_secs(5), |t| {
            t.key == "bucket:vip:platinum-user:entered:1"
        })
        .await;
    engine
        .identify("late-gold-user", serde_json::json!({"tier": "gold"}))
        .await;

    std::fs::write(engine.bucket_path("vip.toml"), BROKEN).unwrap();
    let error = eventually(
        Duration::from_secs(5),
        "the load error to be recorded",
        || {
            let store = store.clone();
            async move {
                let snapshot = membrane_store::console::snapshot(&store, 0).await.ok()?;
                let vip = snapshot.buckets.into_iter().find(|b| b.id == "vip")?;
                (vip.status == "error").then_some(vip.last_error.unwrap_or_default())
            }
        },
    )
    .await;
    assert!(
        error.contains("vip.toml:3:43"),
        "error lacks file:line:col: {error}"
    );
    assert!(error.contains('^'), "error lacks a caret: {error}");

    // The CLI shows the same error, and exits 1 while a bucket is failing.
    let status = std::process::Command::new(crate::support::BINARY)
        .arg("status")
        .env("DATABASE_URL", &engine.db.url)
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1));
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(printed.contains("vip.toml:3:43"), "{printed}");

    // The platinum version still serves.
    engine
        .identify("second-platinum", serde_json::json!({"tier": "platinum"}))
        .await;
    engine
        .wait_for_transition(Duration::from_secs(5), |t| {
            t.key == "bucket:vip:second-platinum:entered:1"
        })
        .await;
    let transitions = engine.transitions().await;
    assert!(
        !transitions.iter().any(|t| t.user_id == "late-gold-user"),
        "the gold criteria came back: {transitions:#?}"
    );
}
