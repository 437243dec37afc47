//! `membrane webhooks` against the real binary: an endpoint added by the CLI receives the
//! engine's transitions, signed per Standard Webhooks (checked with the `standardwebhooks`
//! crate), retried after a 500, and the CLI lists what was delivered.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

use crate::support::{eventually, RunningEngine, BINARY};

const GOLD: &str = r#"criteria = 'prop("tier") == "gold"'"#;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Default)]
struct Received {
    requests: usize,
    verified_ids: Vec<String>,
}

/// Verifies every request; answers the very first with a 500 so the engine has to retry.
async fn receive(
    State(received): State<Arc<Mutex<Received>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let verifier = standardwebhooks::Webhook::new(SECRET).expect("a valid secret");
    if verifier.verify(&body, &headers).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    let mut received = received.lock().unwrap();
    received.requests += 1;
    if received.requests == 1 {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let id = headers["webhook-id"].to_str().expect("an ASCII id");
    received.verified_ids.push(id.to_owned());
    StatusCode::OK
}

fn cli(engine: &RunningEngine, args: &[&str]) -> String {
    let output = Command::new(BINARY)
        .arg("webhooks")
        .args(args)
        .env("DATABASE_URL", &engine.db.url)
        .output()
        .expect("membrane webhooks runs");
    assert!(
        output.status.success(),
        "membrane webhooks {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_endpoint_receives_signed_transitions() {
    let engine = RunningEngine::start(&[("gold.toml", GOLD)]).await;
    let received = Arc::new(Mutex::new(Received::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let added = cli(&engine, &["add", &url, "--secret", SECRET]);
    assert!(added.starts_with("endpoint 1: "), "{added}");

    let users = ["alice", "bob"];
    for user in users {
        engine
            .identify(user, serde_json::json!({"tier": "gold"}))
            .await;
    }
    let mut expected: Vec<String> = users
        .iter()
        .map(|user| format!("bucket:gold:{user}:entered:1"))
        .collect();
    // The default backoff waits up to 5 s after the injected 500.
    let mut delivered = eventually(Duration::from_secs(20), "both deliveries", || {
        let ids = received.lock().unwrap().verified_ids.clone();
        async move { (ids.len() >= 2).then_some(ids) }
    })
    .await;
    delivered.sort();
    delivered.dedup();
    expected.sort();
    assert_eq!(delivered, expected);

    let listed: serde_json::Value =
        serde_json::from_str(&cli(&engine, &["list", "--format", "json"])).unwrap();
    assert_eq!(listed[0]["delivered"], 2, "{listed}");
    assert_eq!(listed[0]["pending"], 0, "{listed}");
    assert_eq!(cli(&engine, &["dead"]), "");
    assert_eq!(
        cli(&engine, &["replay", "--all"]).trim(),
        "0 dead letter(s) queued again"
    );
}
