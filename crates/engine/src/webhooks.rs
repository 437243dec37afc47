//! Webhook delivery of transitions per the Standard Webhooks specification
//! (<https://www.standardwebhooks.com>): `webhook-id` is the transition key,
//! `webhook-timestamp` the send time in seconds, `webhook-signature` is `v1,` and the base64
//! HMAC-SHA256 of `id.timestamp.body` under the endpoint's key.
//!
//! Delivery is at least once and ordered per endpoint: a deliverer holds the endpoint's row lock
//! while it sends the endpoint's oldest pending transition (see `membrane_store::webhooks`),
//! and a failure blocks the line, with exponential backoff, until the delivery succeeds or
//! exhausts its attempts and becomes a dead letter, after which the line moves on. A dead
//! letter stays visible (`membrane webhooks dead`) until replayed. "Oldest" is transition id
//! order among committed transitions: one user's transitions always arrive in order, while two
//! users evaluated at once by different rounds may commit, and so arrive, out of id order.
//!
//! Endpoints may be `http://` or `https://`. HTTPS uses rustls and trusts the bundled public
//! (Mozilla) roots, plus, for an endpoint registered with its own CA certificates
//! (`--ca-file`), those.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use membrane_store::webhooks::{ClaimedDelivery, Retry};
use membrane_store::{TransitionRow, TRANSITIONS_CHANNEL};
use sha2::Sha256;
use tokio::sync::{watch, Notify};

use crate::Shared;

const SECRET_PREFIX: &str = "whsec_";
/// The specification asks for keys of 24 to 64 random bytes.
const GENERATED_KEY_BYTES: usize = 32;

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// How often endpoints are checked when no transition is announced (retries become due
    /// without one).
    pub poll_interval: Duration,
    /// A request not answered within this counts as a failed attempt.
    pub request_timeout: Duration,
    /// Attempts, the first included, before a delivery becomes a dead letter.
    pub max_attempts: u32,
    /// The wait after the first failure; it doubles with every further one, up to
    /// `backoff_max`, and is jittered down by up to half.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Endpoints this engine delivers to at once (each endpoint has one request in flight at
    /// most, across all engines).
    pub concurrency: usize,
}

impl Default for WebhookConfig {
    fn default() -> WebhookConfig {
        WebhookConfig {
            poll_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            max_attempts: 10,
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(3_600),
            concurrency: 4,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("a webhook secret starts with `{SECRET_PREFIX}`")]
    MissingPrefix,
    #[error("a webhook secret is `{SECRET_PREFIX}` followed by base64: {0}")]
    NotBase64(#[from] base64::DecodeError),
    #[error("a webhook secret's key must not be empty")]
    Empty,
}

/// Signs messages with one endpoint's key.
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    /// Parses a `whsec_<base64>` secret.
    pub fn new(secret: &str) -> Result<Signer, SecretError> {
        let encoded = secret
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = BASE64.decode(encoded)?;
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Signer { key })
    }

    /// The `webhook-signature` header value for one message.
    pub fn sign(&self, message_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC accepts keys of any length");
        mac.update(message_id.as_bytes());
        mac.update(format!(".{timestamp}.").as_bytes());
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("not PEM certificates: {0}")]
    Unreadable(String),
    #[error("no `-----BEGIN CERTIFICATE-----` block in it")]
    NoCertificate,
}

/// Parses an endpoint's CA certificates (one or more PEM blocks).
pub fn parse_ca_pem(pem: &str) -> Result<Vec<reqwest::Certificate>, CaError> {
    let certificates = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
        .map_err(|e| CaError::Unreadable(e.to_string()))?;
    if certificates.is_empty() {
        return Err(CaError::NoCertificate);
    }
    Ok(certificates)
}

/// HTTP clients for deliveries: one trusting the public roots, and one per distinct set of
/// endpoint CA certificates (built on first use, then reused for its connection pool).
struct Clients {
    timeout: Duration,
    public: reqwest::Client,
    by_ca: Mutex<HashMap<String, reqwest::Client>>,
}

impl Clients {
    fn new(timeout: Duration) -> reqwest::Result<Clients> {
        Ok(Clients {
            timeout,
            public: reqwest::Client::builder().timeout(timeout).build()?,
            by_ca: Mutex::new(HashMap::new()),
        })
    }

    /// The client for an endpoint; an error says why its CA certificates are unusable.
    fn for_endpoint(&self, ca_pem: Option<&str>) -> Result<reqwest::Client, String> {
        let Some(pem) = ca_pem else {
            return Ok(self.public.clone());
        };
        let mut by_ca = self
            .by_ca
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = by_ca.get(pem) {
            return Ok(client.clone());
        }
        let invalid = |e: &dyn std::fmt::Display| format!("the endpoint's CA certificates: {e}");
        let mut builder = reqwest::Client::builder().timeout(self.timeout);
        for certificate in parse_ca_pem(pem).map_err(|e| invalid(&e))? {
            builder = builder.add_root_certificate(certificate);
        }
        let client = builder.build().map_err(|e| invalid(&e))?;
        by_ca.insert(pem.to_owned(), client.clone());
        Ok(client)
    }
}

/// A fresh random secret in the specification's format.
pub fn generate_secret() -> String {
    let key: [u8; GENERATED_KEY_BYTES] = rand::random();
    format!("{SECRET_PREFIX}{}", BASE64.encode(key))
}

/// The JSON body of a transition's webhook.
pub fn payload(transition: &TransitionRow) -> serde_json::Value {
    serde_json::json!({
        "type": format!("bucket.{}", transition.kind),
        "timestamp": transition.occurred_at,
        "data": {
            "key": transition.key,
            "bucket": transition.bucket_id,
            "user": transition.user_id,
            "kind": transition.kind,
            "epoch": transition.epoch,
            "label": transition.label,
            "source": transition.source,
            "reason": transition.reason,
            "occurred_at": transition.occurred_at,
        },
    })
}

/// The wait before attempt `failures + 1`: exponential, capped, with jitter so endpoints that
/// failed together do not retry together.
fn backoff(config: &WebhookConfig, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    let exponential = config
        .backoff_base
        .saturating_mul(1 << doublings)
        .min(config.backoff_max);
    exponential.mul_f64(rand::random_range(0.5..=1.0))
}

/// The delivery task: `concurrency` deliverers, woken by committed transitions and by a poll.
/// A notification wakes one deliverer (so a busy ingest without endpoints costs one cheap
/// query per round, not one per deliverer), and each deliverer that finds work wakes the next,
/// so several endpoints are still served at once.
pub(crate) async fn deliver(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let config = shared.config.webhooks.clone();
    let clients = match Clients::new(config.request_timeout) {
        Ok(clients) => Arc::new(clients),
        Err(error) => {
            tracing::error!("webhook delivery disabled: cannot build an HTTP client: {error}");
            return;
        }
    };
    let wake = Arc::new(Notify::new());
    let mut deliverers = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.max(1) {
        deliverers.spawn(deliverer(
            shared.clone(),
            clients.clone(),
            wake.clone(),
            stopped.clone(),
        ));
    }
    let mut notifications = match shared.store.listen(&[TRANSITIONS_CHANNEL]).await {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::warn!("transition notifications unavailable, webhooks poll only: {error}");
            None
        }
    };
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            notified = async {
                match notifications.as_mut() {
                    Some(listener) => listener.recv().await.map(drop),
                    None => std::future::pending().await,
                }
            } => match notified {
                Ok(()) => wake.notify_one(),
                Err(error) => {
                    tracing::warn!("transition notifications lost, webhooks poll only: {error}");
                    notifications = None;
                }
            },
        }
    }
    // Each deliverer finishes its current attempt and sees the stop signal itself.
    while deliverers.join_next().await.is_some() {}
}

async fn deliverer(
    shared: Arc<Shared>,
    clients: Arc<Clients>,
    wake: Arc<Notify>,
    mut stopped: watch::Receiver<bool>,
) {
    let poll = shared.config.webhooks.poll_interval;
    loop {
        loop {
            if *stopped.borrow() {
                return;
            }
            match shared.store.claim_webhook_delivery().await {
                Ok(Some(claimed)) => {
                    // Another endpoint may be due too. (A wake-up nobody waits for is kept
                    // as a permit, so none is lost while every deliverer is busy.)
                    wake.notify_one();
                    if let Err(error) = attempt(&shared, &clients, claimed).await {
                        report(&error);
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    report(&error);
                    break;
                }
            }
        }
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(poll) => {}
            _ = wake.notified() => {}
        }
    }
}

fn report(error: &membrane_store::StoreError) {
    tracing::error!(task = "webhooks", "{error}");
}

/// Sends one delivery and records its outcome in the claim's transaction.
async fn attempt(
    shared: &Shared,
    clients: &Clients,
    claimed: ClaimedDelivery,
) -> Result<(), membrane_store::StoreError> {
    let config = &shared.config.webhooks;
    let failures = claimed.attempts.unsigned_abs() + 1;
    let retry = if failures >= config.max_attempts {
        Retry::GiveUp
    } else {
        Retry::After(backoff(config, failures))
    };
    let signer = match Signer::new(&claimed.secret) {
        Ok(signer) => signer,
        Err(error) => return claimed.failed(&error.to_string(), None, retry).await,
    };
    let client = match clients.for_endpoint(claimed.ca_pem.as_deref()) {
        Ok(client) => client,
        Err(error) => return claimed.failed(&error, None, retry).await,
    };
    let message_id = claimed.transition.key.clone();
    let body = payload(&claimed.transition).to_string();
    let timestamp = chrono::Utc::now().timestamp();
    let signature = signer.sign(&message_id, timestamp, body.as_bytes());
    let sent = client
        .post(&claimed.url)
        .header("content-type", "application/json")
        .header("webhook-id", &message_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    let (error, status) = match sent {
        Ok(response) if response.status().is_success() => return claimed.delivered().await,
        Ok(response) => (
            format!("HTTP {}", response.status()),
            Some(response.status().as_u16()),
        ),
        Err(error) if error.is_timeout() => (
            format!("no response within {:?}", config.request_timeout),
            None,
        ),
        Err(error) => (error_chain(&error), None),
    };
    tracing::warn!(
        endpoint = claimed.endpoint_id,
        webhook_id = %message_id,
        attempt = failures,
        "webhook delivery failed: {error}"
    );
    claimed.failed(&error, status, retry).await
}

/// An error with its causes: reqwest's own message hides why a TLS handshake failed.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference implementations.
    #[test]
    fn signs_like_the_specification() {
        let signer = Signer::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = signer.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn rejects_malformed_secrets() {
        assert!(matches!(
            Signer::new("abc"),
            Err(SecretError::MissingPrefix)
        ));
        assert!(matches!(
            Signer::new("whsec_!!!"),
            Err(SecretError::NotBase64(_))
        ));
        assert!(matches!(Signer::new("whsec_"), Err(SecretError::Empty)));
        assert!(Signer::new(&generate_secret()).is_ok());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = WebhookConfig {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
            ..WebhookConfig::default()
        };
        for (failures, full) in [(1, 100), (2, 200), (3, 400), (4, 500), (40, 500)] {
            let wait = backoff(&config, failures);
            let full = Duration::from_millis(full);
            assert!(wait <= full && wait >= full / 2, "{failures}: {wait:?}");
        }
    }
}
