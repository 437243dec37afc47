//! Webhook delivery end to end: receivers verify every request with an independent Standard
//! Webhooks implementation (the `standardwebhooks` crate) while injecting 500s, responses
//! slower than the timeout and a crash of the engine mid-stream; deduplicated by `webhook-id`,
//! each endpoint sees exactly the transitions, first in transition order; a delivery failed too
//! often becomes a dead letter, and replaying it delivers it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use membrane_engine::webhooks::{generate_secret, WebhookConfig};
use membrane_engine::{EngineConfig, EngineHandle};
use membrane_store::testing::fresh_database;
use membrane_store::webhooks::Replay;
use membrane_store::{Message, Store};

const GOLD: &str = r#"criteria = 'prop("tier") == "gold"'"#;
const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);
const MAX_ATTEMPTS: u32 = 4;

/// How a receiver answers.
enum Behaviour {
    /// Depending on the webhook id, fails its first attempts with 500s or answers its first
    /// attempt too late.
    Flaky,
    /// Answers 500 to one id until healed.
    Poisoned { id: String },
}

struct Receiver {
    verifier: standardwebhooks::Webhook,
    behaviour: Behaviour,
    healed: Mutex<bool>,
    attempts: Mutex<HashMap<String, u32>>,
    /// Ids of verified requests answered (or about to be answered) with 200, in arrival order.
    accepted: Mutex<Vec<String>>,
    rejected_signatures: Mutex<u32>,
}

impl Receiver {
    fn new(secret: &str, behaviour: Behaviour) -> Arc<Receiver> {
        Arc::new(Receiver {
            verifier: standardwebhooks::Webhook::new(secret).unwrap(),
            behaviour,
            healed: Mutex::new(false),
            attempts: Mutex::new(HashMap::new()),
            accepted: Mutex::new(Vec::new()),
            rejected_signatures: Mutex::new(0),
        })
    }

    /// Accepted ids without repeats, in order of first acceptance.
    fn first_receipts(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        let accepted = self.accepted.lock().unwrap();
        accepted
            .iter()
            .filter(|id| seen.insert(id.as_str()))
            .cloned()
            .collect()
    }
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if receiver.verifier.verify(&body, &headers).is_err() {
        *receiver.rejected_signatures.lock().unwrap() += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let id = headers["webhook-id"].to_str().unwrap().to_owned();
    let payload: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(payload["data"]["key"], id.as_str());
    let attempt = {
        let mut attempts = receiver.attempts.lock().unwrap();
        let count = attempts.entry(id.clone()).or_default();
        *count += 1;
        *count
    };
    let mut too_late = false;
    match &receiver.behaviour {
        Behaviour::Flaky => match id.bytes().map(u32::from).sum::<u32>() % 4 {
            0 if attempt == 1 => return StatusCode::INTERNAL_SERVER_ERROR,
            1 if attempt == 1 => too_late = true,
            2 if attempt <= 2 => return StatusCode::SERVICE_UNAVAILABLE,
            _ => {}
        },
        Behaviour::Poisoned { id: poisoned } => {
            if *poisoned == id && !*receiver.healed.lock().unwrap() {
                return StatusCode::INTERNAL_SERVER_ERROR;
            }
        }
    }
    receiver.accepted.lock().unwrap().push(id);
    if too_late {
        // Processed, but answered after the sender gave up: it must send this one again.
        tokio::time::sleep(REQUEST_TIMEOUT * 2).await;
    }
    StatusCode::OK
}

async fn serve(receiver: Arc<Receiver>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(receiver);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{address}/hook")
}

async fn set_tier(store: &Store, users: impl Iterator<Item = usize>, tier: &str) {
    let messages: Vec<Message> = users
        .map(|user| Message::Identify {
            message_id: None,
            user_id: format!("u{user:02}"),
            traits: serde_json::json!({ "tier": tier })
                .as_object()
                .cloned()
                .unwrap(),
        })
        .collect();
    store.ingest(&messages).await.unwrap();
}

async fn start_engine(store: &Store, buckets: &std::path::Path) -> EngineHandle {
    let mut config = EngineConfig::new(buckets.to_path_buf());
    config.webhooks = WebhookConfig {
        poll_interval: Duration::from_millis(100),
        request_timeout: REQUEST_TIMEOUT,
        max_attempts: MAX_ATTEMPTS,
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        concurrency: 2,
    };
    membrane_engine::start(store.clone(), config).await.unwrap()
}

async fn wait_until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_transition_arrives_verified_in_order_despite_failures_and_a_crash() {
    let db = fresh_database().await.unwrap();
    let store = db.store.clone();
    let buckets = tempfile::tempdir().unwrap();
    std::fs::write(buckets.path().join("gold.toml"), GOLD).unwrap();

    let flaky_secret = generate_secret();
    let flaky = Receiver::new(&flaky_secret, Behaviour::Flaky);
    let poisoned_id = "bucket:gold:u02:entered:1".to_owned();
    let poisoned_secret = generate_secret();
    let poisoned = Receiver::new(
        &poisoned_secret,
        Behaviour::Poisoned {
            id: poisoned_id.clone(),
        },
    );
    let flaky_endpoint = store
        .add_webhook_endpoint(&serve(flaky.clone()).await, &flaky_secret, None)
        .await
        .unwrap();
    let poisoned_endpoint = store
        .add_webhook_endpoint(&serve(poisoned.clone()).await, &poisoned_secret, None)
        .await
        .unwrap();

    let engine = start_engine(&store, buckets.path()).await;
    set_tier(&store, 0..6, "gold").await;
    wait_until(
        "some deliveries before the crash",
        Duration::from_secs(20),
        async || flaky.first_receipts().len() >= 3,
    )
    .await;
    // A crash: the tasks are aborted wherever they are, possibly between a request and the
    // commit of its outcome.
    drop(engine);
    set_tier(&store, 6..12, "gold").await;
    set_tier(&store, 0..4, "silver").await;
    let engine = start_engine(&store, buckets.path()).await;

    let transitions = async || -> Vec<String> {
        let all = store.transitions_after(0, 1_000).await.unwrap();
        all.into_iter().map(|t| t.key).collect()
    };
    wait_until(
        "all 16 transitions written",
        Duration::from_secs(20),
        async || transitions().await.len() == 16,
    )
    .await;
    let expected = transitions().await;
    let without_poisoned: Vec<String> = expected
        .iter()
        .filter(|key| **key != poisoned_id)
        .cloned()
        .collect();
    wait_until(
        "every delivery settled",
        Duration::from_secs(30),
        async || {
            flaky.first_receipts() == expected
                && poisoned.first_receipts() == without_poisoned
                && store.dead_webhook_deliveries(None).await.unwrap().len() == 1
        },
    )
    .await;

    let dead = store.dead_webhook_deliveries(None).await.unwrap();
    assert_eq!(dead[0].endpoint_id, poisoned_endpoint);
    assert_eq!(dead[0].transition_key, poisoned_id);
    assert_eq!(dead[0].attempts, MAX_ATTEMPTS as i32);
    assert_eq!(dead[0].last_status, Some(500));
    let flaky_attempts = flaky.attempts.lock().unwrap().values().sum::<u32>();
    assert!(
        flaky_attempts as usize > expected.len(),
        "no failure was injected"
    );

    *poisoned.healed.lock().unwrap() = true;
    let replayed = store
        .replay_webhook_deliveries(Replay::One {
            delivery_id: dead[0].id,
        })
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    wait_until(
        "the replayed dead letter delivered",
        Duration::from_secs(10),
        async || poisoned.first_receipts().contains(&poisoned_id),
    )
    .await;
    assert!(store
        .dead_webhook_deliveries(None)
        .await
        .unwrap()
        .is_empty());
    let mut received = poisoned.first_receipts();
    received.sort();
    let mut all = expected.clone();
    all.sort();
    assert_eq!(received, all);

    // The receiver records a delivery before the engine has its response and marks it done.
    wait_until(
        "the replayed delivery marked delivered",
        Duration::from_secs(10),
        async || {
            store
                .webhook_endpoints()
                .await
                .unwrap()
                .iter()
                .all(|endpoint| endpoint.pending == 0)
        },
    )
    .await;
    let endpoints = store.webhook_endpoints().await.unwrap();
    for endpoint in &endpoints {
        assert_eq!((endpoint.pending, endpoint.dead), (0, 0), "{endpoint:?}");
        assert_eq!(endpoint.delivered, 16, "{endpoint:?}");
    }
    assert_eq!(endpoints[0].id, flaky_endpoint);
    assert_eq!(*flaky.rejected_signatures.lock().unwrap(), 0);
    assert_eq!(*poisoned.rejected_signatures.lock().unwrap(), 0);
    engine.shutdown().await;
}
