//! `membrane webhooks` against the real binary: an endpoint added by the CLI receives the
//! engine's transitions signed per Standard Webhooks (checked with the `standardwebhooks`
//! crate), retried after a 500, and resent after the engine is killed mid-request.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use membrane_store::Message;
use tokio::sync::Notify;

use crate::support::{eventually, RunningEngine, BINARY};

const GOLD: &str = r#"criteria = 'prop("tier") == "gold"'"#;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the receiver does to the first request it gets for one id.
enum FirstAttempt {
    Fails,
    /// Announces it on `in_flight`, then answers only after the engine has been killed.
    Stalls {
        in_flight: Arc<Notify>,
    },
}

struct Receiver {
    special: Option<(String, FirstAttempt)>,
    /// Ids of the verified requests answered with 200, in arrival order (repeats included).
    accepted: Mutex<Vec<String>>,
    special_requests: Mutex<u32>,
}

impl Receiver {
    fn accepted(&self) -> Vec<String> {
        self.accepted.lock().unwrap().clone()
    }

    /// Accepted ids without repeats, in order of first acceptance.
    fn first_receipts(&self) -> Vec<String> {
        let mut first = self.accepted();
        let mut seen = std::collections::HashSet::new();
        first.retain(|id| seen.insert(id.clone()));
        first
    }
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let verifier = standardwebhooks::Webhook::new(SECRET).expect("a valid secret");
    if verifier.verify(&body, &headers).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    let id = headers["webhook-id"]
        .to_str()
        .expect("an ASCII id")
        .to_owned();
    if let Some((special_id, first_attempt)) = &receiver.special {
        let first = special_id == &id && {
            let mut requests = receiver.special_requests.lock().unwrap();
            *requests += 1;
            *requests == 1
        };
        match first_attempt {
            FirstAttempt::Fails if first => return StatusCode::INTERNAL_SERVER_ERROR,
            FirstAttempt::Stalls { in_flight } if first => {
                // Processed, but the sender dies before it hears back.
                receiver.accepted.lock().unwrap().push(id);
                in_flight.notify_one();
                tokio::time::sleep(Duration::from_secs(3)).await;
                return StatusCode::OK;
            }
            _ => {}
        }
    }
    receiver.accepted.lock().unwrap().push(id);
    StatusCode::OK
}

async fn serve(special: Option<(String, FirstAttempt)>) -> (Arc<Receiver>, String) {
    let receiver = Arc::new(Receiver {
        special,
        accepted: Mutex::new(Vec::new()),
        special_requests: Mutex::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (receiver, url)
}

fn cli(database_url: &str, args: &[&str]) -> String {
    let output = Command::new(BINARY)
        .arg("webhooks")
        .args(args)
        .env("DATABASE_URL", database_url)
        .output()
        .expect("membrane webhooks runs");
    assert!(
        output.status.success(),
        "membrane webhooks {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

fn entered(user: &str) -> String {
    format!("bucket:gold:{user}:entered:1")
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_endpoint_receives_signed_transitions() {
    let engine = RunningEngine::start(&[("gold.toml", GOLD)]).await;
    let (receiver, url) = serve(Some((entered("alice"), FirstAttempt::Fails))).await;
    let added = cli(&engine.db.url, &["add", &url, "--secret", SECRET]);
    assert!(added.starts_with("endpoint 1: "), "{added}");

    // Concurrent rounds may commit two users' transitions out of id order, so bob is identified
    // once alice's transition is committed: then he follows her, and her failure holds him back.
    for user in ["alice", "bob"] {
        engine
            .identify(user, serde_json::json!({"tier": "gold"}))
            .await;
        engine
            .wait_for_transition(Duration::from_secs(10), |t| t.user_id == user)
            .await;
    }
    // The default backoff waits up to 5 s after the injected 500.
    eventually(Duration::from_secs(20), "both deliveries", || {
        let done = receiver.accepted().len() >= 2;
        async move { done.then_some(()) }
    })
    .await;
    assert_eq!(receiver.accepted(), [entered("alice"), entered("bob")]);

    let listed: serde_json::Value =
        serde_json::from_str(&cli(&engine.db.url, &["list", "--format", "json"])).unwrap();
    assert_eq!(listed[0]["delivered"], 2, "{listed}");
    assert_eq!(listed[0]["pending"], 0, "{listed}");
    assert_eq!(cli(&engine.db.url, &["dead"]), "");
    assert_eq!(
        cli(&engine.db.url, &["replay", "--all"]).trim(),
        "0 dead letter(s) queued again"
    );
}

/// Kills the process it holds on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGKILL between a request and the commit of its outcome: the next engine on the database
/// sends it again (the receiver dedupes by `webhook-id`), then carries on in order.
#[tokio::test(flavor = "multi_thread")]
async fn engine_killed_mid_request_resends_it() {
    let engine = RunningEngine::start(&[("gold.toml", GOLD)]).await;
    let store = engine.db.store.clone();
    let database_url = engine.db.url.clone();
    let in_flight = Arc::new(Notify::new());
    let stalls = FirstAttempt::Stalls {
        in_flight: in_flight.clone(),
    };
    let (receiver, url) = serve(Some((entered("carol"), stalls))).await;
    cli(&database_url, &["add", &url, "--secret", SECRET]);

    let gold = |user: &str| Message::Identify {
        message_id: None,
        user_id: user.to_owned(),
        traits: serde_json::json!({"tier": "gold"})
            .as_object()
            .cloned()
            .unwrap(),
    };
    store.ingest(&[gold("alice")]).await.unwrap();
    eventually(Duration::from_secs(10), "alice delivered", || {
        let done = !receiver.accepted().is_empty();
        async move { done.then_some(()) }
    })
    .await;
    store.ingest(&[gold("carol")]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), in_flight.notified())
        .await
        .expect("carol's delivery reaches the receiver");
    drop(engine);

    store.ingest(&[gold("dave")]).await.unwrap();
    let buckets = tempfile::tempdir().unwrap();
    std::fs::write(buckets.path().join("gold.toml"), GOLD).unwrap();
    let _restarted = KillOnDrop(
        Command::new(BINARY)
            .args(["run", "--listen", "127.0.0.1:0", "--buckets"])
            .arg(buckets.path())
            .env("DATABASE_URL", &database_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("membrane run starts again"),
    );
    let expected = [entered("alice"), entered("carol"), entered("dave")];
    eventually(
        Duration::from_secs(20),
        "every delivery after the restart",
        || {
            let done = receiver.first_receipts() == expected;
            async move { done.then_some(()) }
        },
    )
    .await;
    let carol_receipts = receiver
        .accepted()
        .iter()
        .filter(|id| **id == entered("carol"))
        .count();
    assert_eq!(carol_receipts, 2, "{:?}", receiver.accepted());
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&database_url, &["list", "--format", "json"])).unwrap();
    assert_eq!(listed[0]["delivered"], 3, "{listed}");
}
