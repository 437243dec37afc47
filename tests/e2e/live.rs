use std::collections::HashSet;
use std::time::Duration;

use crate::support::RunningEngine;

const PINGED: &str = r#"
description = "Pinged in the last 3 seconds"
criteria = 'event("ping").within(3s).exists()'
"#;

/// An event over HTTP makes a user enter a time-based bucket in real time, and the clock takes
/// them out once the window has passed: each transition key exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn http_event_enters_then_window_expiry_leaves() {
    let engine = RunningEngine::start(&[("pinged.toml", PINGED)]).await;
    // The event is stamped when the server receives it: after this, before the join.
    let sent = chrono::Utc::now();
    engine.track("alice", "ping").await;

    let entered = engine
        .wait_for_transition(Duration::from_secs(5), |t| {
            t.kind == "entered" && t.user_id == "alice"
        })
        .await;
    assert_eq!(entered.key, "bucket:pinged:alice:entered:1");
    assert_eq!(entered.source, "event");

    let left = engine
        .wait_for_transition(Duration::from_secs(8), |t| {
            t.kind == "left" && t.user_id == "alice"
        })
        .await;
    assert_eq!(left.key, "bucket:pinged:alice:left:1");
    // The timer armed at the window's end does it; the sweep (every 0.5 s here) may win the race.
    assert!(
        ["timer", "sweep"].contains(&left.source.as_str()),
        "left by {}",
        left.source
    );
    let window = chrono::Duration::seconds(3);
    assert!(
        left.occurred_at >= sent + window,
        "left before the window ended"
    );
    let latest_window_end = entered.occurred_at + window;
    assert!(
        left.occurred_at - latest_window_end < chrono::Duration::milliseconds(1500),
        "left {} after the window ended",
        left.occurred_at - latest_window_end
    );

    // Another ping starts epoch 2; nothing of epoch 1 is written again.
    engine.track("alice", "ping").await;
    engine
        .wait_for_transition(Duration::from_secs(5), |t| {
            t.key == "bucket:pinged:alice:entered:2"
        })
        .await;
    let keys: Vec<String> = engine
        .transitions()
        .await
        .into_iter()
        .map(|t| t.key)
        .collect();
    let unique: HashSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "a key appeared twice: {keys:?}");
    assert_eq!(
        engine.db.store.member_count("pinged").await.unwrap(),
        Some(1)
    );

    let metrics = engine.metrics().await;
    for series in [
        "membrane_transitions_total{kind=\"entered\"} 2",
        "membrane_transitions_total{kind=\"left\"} 1",
        "membrane_ingested_messages_total 2",
        "membrane_queue_depth 0",
        "membrane_wasm_call_seconds_count",
    ] {
        assert!(metrics.contains(series), "no `{series}` in:\n{metrics}");
    }
}

/// A batch with one bad message is refused whole, with the bad field named.
#[tokio::test(flavor = "multi_thread")]
async fn bad_batch_is_refused_whole() {
    let engine = RunningEngine::start(&[("pinged.toml", PINGED)]).await;
    let response = engine
        .post(
            "/v1/batch",
            serde_json::json!({"batch": [
                {"type": "track", "userId": "bob", "event": "ping"},
                {"type": "track", "userId": "bob", "event": "ping", "timestamp": "yesterday"}
            ]}),
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["pointer"], "/batch/1/timestamp");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(engine.transitions().await.is_empty());
}

/// `DELETE /v1/users/{id}` closes the user's memberships with `left` (reason `erased`).
#[tokio::test(flavor = "multi_thread")]
async fn erasing_a_user_over_http_closes_their_memberships() {
    let engine = RunningEngine::start(&[("pinged.toml", PINGED)]).await;
    engine.track("carol", "ping").await;
    engine
        .wait_for_transition(Duration::from_secs(5), |t| {
            t.key == "bucket:pinged:carol:entered:1"
        })
        .await;
    let response = reqwest::Client::new()
        .delete(format!("{}/v1/users/carol", engine.base_url))
        .bearer_auth(crate::support::WRITE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let left = engine
        .wait_for_transition(Duration::from_secs(5), |t| {
            t.key == "bucket:pinged:carol:left:1"
        })
        .await;
    assert_eq!(
        (left.source.as_str(), left.reason.as_str()),
        ("operator", "erased")
    );
    assert_eq!(
        engine.db.store.member_count("pinged").await.unwrap(),
        Some(0)
    );
}
