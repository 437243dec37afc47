//! HTTPS webhook endpoints and endpoint management against the real binary: a receiver with a
//! self-signed certificate (rcgen) gets signed deliveries once its certificate is given with
//! `--ca-file`, is refused without it, and `disable`, `enable` and `remove` do what they say.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio_rustls::rustls;

use crate::support::{eventually, RunningEngine, BINARY};

const GOLD: &str = r#"criteria = 'prop("tier") == "gold"'"#;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Accepts TLS connections for `axum::serve`.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, address)) = self.tcp.accept().await else {
                continue;
            };
            // A client that does not trust the certificate fails its handshake; wait for the next.
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, address);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Ids of the verified webhooks received, in order.
type Received = Arc<Mutex<Vec<String>>>;

async fn receive(State(received): State<Received>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let verifier = standardwebhooks::Webhook::new(SECRET).expect("a valid secret");
    if verifier.verify(&body, &headers).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    let id = headers["webhook-id"].to_str().expect("an ASCII id");
    received.lock().expect("not poisoned").push(id.to_owned());
    StatusCode::OK
}

/// An HTTPS receiver with a fresh self-signed certificate for 127.0.0.1: its URL and the
/// certificate's PEM.
async fn serve_https(received: Received) -> (String, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
        .expect("a self-signed certificate");
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key.into())
        .expect("a server certificate");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let url = format!("https://{}/hook", tcp.local_addr().expect("an address"));
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    };
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(received);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, certified.cert.pem())
}

/// Runs `membrane webhooks ARGS`; its stdout on success, else its stderr as the error.
fn cli(database_url: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(BINARY)
        .arg("webhooks")
        .args(args)
        .env("DATABASE_URL", database_url)
        .output()
        .expect("membrane webhooks runs");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("UTF-8 output");
    if output.status.success() {
        Ok(text(output.stdout))
    } else {
        Err(text(output.stderr))
    }
}

fn listed(database_url: &str) -> serde_json::Value {
    let json = cli(database_url, &["list", "--format", "json"]).expect("list runs");
    serde_json::from_str(&json).expect("JSON endpoints")
}

fn entered(user: &str) -> String {
    format!("bucket:gold:{user}:entered:1")
}

#[tokio::test(flavor = "multi_thread")]
async fn https_endpoint_with_its_ca_then_disabled_enabled_removed() {
    let engine = RunningEngine::start(&[("gold.toml", GOLD)]).await;
    let db = engine.db.url.as_str();
    let received = Received::default();
    let (url, ca_pem) = serve_https(received.clone()).await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let ca_file = dir.path().join("receiver.pem");
    std::fs::write(&ca_file, &ca_pem).expect("CA file written");
    let ca_path = ca_file.to_str().expect("a UTF-8 path");

    let trusted = cli(db, &["add", &url, "--secret", SECRET, "--ca-file", ca_path]).unwrap();
    assert!(trusted.starts_with("endpoint 1: https://"), "{trusted}");
    // The same receiver without its certificate: the public roots do not vouch for it.
    let untrusted = cli(db, &["add", &url, "--secret", SECRET]).unwrap();
    assert!(untrusted.starts_with("endpoint 2: "), "{untrusted}");

    engine
        .identify("alice", serde_json::json!({"tier": "gold"}))
        .await;
    eventually(Duration::from_secs(15), "alice over HTTPS", || {
        let done = !received.lock().unwrap().is_empty();
        async move { done.then_some(()) }
    })
    .await;
    let refused = eventually(Duration::from_secs(15), "endpoint 2's failure", || {
        let endpoints = listed(db);
        async move {
            let error = endpoints[1]["last_error"].as_str()?.to_owned();
            Some(error)
        }
    })
    .await;
    assert!(refused.contains("certificate"), "{refused}");
    let endpoints = listed(db);
    assert_eq!(endpoints[0]["custom_ca"], true, "{endpoints}");
    assert_eq!(endpoints[0]["delivered"], 1, "{endpoints}");
    assert_eq!(endpoints[1]["delivered"], 0, "{endpoints}");

    // Disabled: bob's transition is not queued for endpoint 1.
    assert_eq!(
        cli(db, &["disable", "1"]).unwrap().trim(),
        "endpoint 1 disabled"
    );
    engine
        .identify("bob", serde_json::json!({"tier": "gold"}))
        .await;
    engine
        .wait_for_transition(Duration::from_secs(10), |t| t.key == entered("bob"))
        .await;
    let endpoints = listed(db);
    assert_eq!(endpoints[0]["enabled"], false, "{endpoints}");
    assert_eq!(endpoints[0]["pending"], 0, "{endpoints}");
    assert_eq!(endpoints[1]["pending"], 2, "{endpoints}");

    // Enabled again: carol's arrives, bob's never does.
    assert_eq!(
        cli(db, &["enable", "1"]).unwrap().trim(),
        "endpoint 1 enabled"
    );
    engine
        .identify("carol", serde_json::json!({"tier": "gold"}))
        .await;
    eventually(Duration::from_secs(15), "carol over HTTPS", || {
        let done = received.lock().unwrap().len() >= 2;
        async move { done.then_some(()) }
    })
    .await;
    assert_eq!(
        *received.lock().unwrap(),
        [entered("alice"), entered("carol")]
    );

    // Removing endpoint 2 drops its undeliverable queue.
    let removed = cli(db, &["remove", "2"]).unwrap();
    assert_eq!(
        removed.trim(),
        "endpoint 2 removed, with 3 pending deliveries and 0 dead letter(s)"
    );
    let endpoints = listed(db);
    assert_eq!(endpoints.as_array().map(Vec::len), Some(1), "{endpoints}");
    let missing = cli(db, &["remove", "2"]).unwrap_err();
    assert!(missing.contains("no webhook endpoint 2"), "{missing}");
    let plain = cli(
        db,
        &["add", "http://127.0.0.1:9/hook", "--ca-file", ca_path],
    )
    .unwrap_err();
    assert!(
        plain.contains("--ca-file") && plain.contains("plain HTTP"),
        "{plain}"
    );
}
