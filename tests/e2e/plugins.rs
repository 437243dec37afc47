//! Rust plugin buckets in the real engine: events over HTTP make users enter and leave
//! buckets whose predicate is a plugin module, with thresholds from the bucket file's
//! `[config]`. Uses the shipped bucket files, pointed at the repository's `plugins/`.

use std::time::Duration;

use crate::support::{repo_root, RunningEngine};

/// The shipped bucket file `buckets/<name>`, its `plugins/...` path made absolute (the test's
/// bucket directory lives elsewhere).
fn shipped_bucket(name: &str) -> String {
    let text = std::fs::read_to_string(repo_root().join("buckets").join(name))
        .unwrap_or_else(|e| panic!("buckets/{name}: {e}"));
    let plugins = repo_root().join("plugins");
    text.replace(
        "plugin = \"plugins/",
        &format!("plugin = \"{}/", plugins.display()),
    )
}

/// churn-risk (threshold 2 from `[config]`): an active user with an abandoned cart and no order
/// scores 2 and enters; completing an order drops the score to 0 and they leave (the shipped
/// `min_dwell` is taken out so the leave is immediate). A buying user never enters.
#[tokio::test(flavor = "multi_thread")]
async fn churn_risk_plugin_scores_users_in_real_time() {
    let bucket = shipped_bucket("churn-risk.toml").replace("min_dwell = \"1h\"\n", "");
    let engine = RunningEngine::start(&[("churn-risk.toml", &bucket)]).await;

    engine.track("cart-leaver", "session_start").await;
    engine.track("cart-leaver", "added_to_cart").await;
    // Active and buying: score 0. One batch, so that no round sees the cart without the order.
    let buyer_events: Vec<serde_json::Value> =
        ["session_start", "added_to_cart", "order_completed"]
            .iter()
            .map(|event| serde_json::json!({"type": "track", "userId": "buyer", "event": event}))
            .collect();
    let buyer_batch = engine
        .post("/v1/batch", serde_json::json!({ "batch": buyer_events }))
        .await;
    assert_eq!(buyer_batch.status(), 200);

    let entered = engine
        .wait_for_transition(Duration::from_secs(10), |t| {
            t.kind == "entered" && t.user_id == "cart-leaver"
        })
        .await;
    assert_eq!(entered.key, "bucket:churn-risk:cart-leaver:entered:1");
    assert_eq!(entered.source, "event");

    engine.track("cart-leaver", "order_completed").await;
    let left = engine
        .wait_for_transition(Duration::from_secs(10), |t| {
            t.kind == "left" && t.user_id == "cart-leaver"
        })
        .await;
    assert_eq!(left.key, "bucket:churn-risk:cart-leaver:left:1");

    let buyer_moved = engine
        .transitions()
        .await
        .into_iter()
        .any(|t| t.user_id == "buyer");
    assert!(!buyer_moved, "the buyer never scored 2");
}

/// refund-ratio (`max_ratio = 0.3`, `min_orders = 2` from `[config]`): one refund on two
/// orders is 50% and enters; two more orders bring it to 25% and the user leaves.
#[tokio::test(flavor = "multi_thread")]
async fn refund_ratio_plugin_follows_its_config() {
    let engine = RunningEngine::start(&[(
        "refund-abusers.toml",
        &shipped_bucket("refund-abusers.toml"),
    )])
    .await;

    engine.track("refunder", "order_completed").await;
    engine.track("refunder", "refund_issued").await;
    engine.track("refunder", "order_completed").await;
    let entered = engine
        .wait_for_transition(Duration::from_secs(10), |t| {
            t.kind == "entered" && t.user_id == "refunder"
        })
        .await;
    assert_eq!(entered.key, "bucket:refund-abusers:refunder:entered:1");

    engine.track("refunder", "order_completed").await;
    engine.track("refunder", "order_completed").await;
    engine
        .wait_for_transition(Duration::from_secs(10), |t| {
            t.key == "bucket:refund-abusers:refunder:left:1"
        })
        .await;
}
