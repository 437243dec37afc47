//! Segment-compatible HTTP ingest and membership reads.
//!
//! # Ingest
//! `POST /v1/track`, `/v1/identify`, `/v1/page`, `/v1/screen`, `/v1/alias`, `/v1/group` take one
//! message; `POST /v1/batch` (also `/v1/import`, Segment's name for it) takes
//! `{"batch": [...], "sentAt"?: ...}`. analytics.js's short paths `/v1/t`, `/v1/i`, `/v1/p`,
//! `/v1/s`, `/v1/a`, `/v1/g`, `/v1/b` work too. A success answers `200 {"success": true}`.
//!
//! - `page` and `screen` become events named as Segment names them for event destinations
//!   (Amplitude, Mixpanel): `Viewed {category} {name} Page` / `Viewed {name} Page`, or
//!   `Loaded a Page` without a name (likewise `Screen`); `name` and `category` are copied into
//!   the event's properties.
//! - `alias` and `group` are validated, accepted and ignored (membrane does not merge identities
//!   nor know accounts yet): rejecting them would fail every batch a real client mixes them into.
//! - `messageId` is the idempotency key: a message seen before is skipped.
//! - Clock skew, per Segment: with `sentAt` (on the message, or on the batch) the event time is
//!   `receivedAt - (sentAt - originalTimestamp)`, where `originalTimestamp` is the message's
//!   `originalTimestamp`, else its `timestamp`; without `sentAt`, `timestamp` is taken as is;
//!   without either, the time of receipt.
//! - Limits: body 512 KiB (413); at most 2,500 messages per batch, 32 KiB per message (compact
//!   JSON), nesting 32 levels, event names 200 characters, user ids 256 characters (400).
//! - Content type: none, `application/json`, `*+json` or `text/plain` (what `sendBeacon` sends);
//!   anything else is 415.
//! - Content encoding: none or `gzip` (analytics-python's `gzip=True`); the 512 KiB limit holds
//!   for the body both as sent and inflated. Any other encoding is 415.
//!
//! A request is validated whole before anything is written: a bad field anywhere gets
//! `{"error": {"message": ..., "pointer": ...}}` naming it by RFC 6901 JSON pointer (`""` for
//! the whole body), and nothing of the request is applied. A batch commits all-or-nothing;
//! requests that arrive while others are being written share the next transaction (group
//! commit), each still all-or-nothing.
//!
//! # Reads
//! - `GET /v1/buckets`: every bucket's status; `GET /v1/buckets/{id}`: one bucket's status
//!   (enabled, status, recorded criteria hash and whether it is backfilled, last error,
//!   time-based) with its member count as `count`.
//! - `GET /v1/buckets/{id}/members/{user}`: `{"member": bool}`.
//! - `GET /v1/buckets/{id}/members?after=&limit=`: active members by user id, keyset-paged
//!   with an opaque cursor (`next`), stable while members join and leave.
//! - `GET /v1/users/{id}/buckets`: the buckets a user is in, with epochs and `entered_at`.
//! - `GET /v1/transitions?after=&limit=&wait=&bucket=`: transitions after a cursor (their id),
//!   oldest first, never skipping one that commits late; with `wait` the request long-polls.
//!
//! An unknown bucket is 404 naming it; a bad query parameter is 400 with
//! `{"error": {"message", "parameter"}}`.
//!
//! # Credentials
//! Write keys ([`ApiConfig::write_keys`]) authorize ingest, read tokens
//! ([`ApiConfig::read_tokens`]) authorize reads; either is sent as the HTTP Basic user or as a
//! Bearer token (ingest also takes Segment's `writeKey` body field). When no key of a kind is
//! configured, that side is open. Missing or unknown credentials get 401 with
//! `WWW-Authenticate`; a read token used to write, or a write key used to read, gets 403.

mod group_commit;
mod reads;
mod segment;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use membrane_store::Store;
use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Value};

pub use reads::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, MAX_WAIT_SECS};
use segment::Shape;
pub use segment::{
    parse_message, FieldError, MessageType, MAX_BATCH_MESSAGES, MAX_EVENT_NAME_CHARS,
    MAX_MESSAGE_BYTES, MAX_NESTING_DEPTH, MAX_USER_ID_CHARS,
};

/// Largest accepted request body (Segment's batch limit is 500 KB).
pub const MAX_BODY_BYTES: usize = 512 * 1024;

#[derive(Clone, Debug, Default)]
pub struct ApiConfig {
    /// Accepted write keys (HTTP Basic user or bearer token). Empty: ingest is open.
    pub write_keys: Vec<String>,
    /// Accepted read tokens (HTTP Basic user or bearer token). Empty: reads are open.
    pub read_tokens: Vec<String>,
    /// Counts what ingest applied; register it to expose it.
    pub metrics: IngestMetrics,
}

/// Ingest counters (Prometheus). Cloning shares the values.
#[derive(Clone, Default, Debug)]
pub struct IngestMetrics {
    pub applied: Counter,
    pub duplicates: Counter,
}

impl IngestMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "membrane_ingested_messages",
            "Messages applied by ingest",
            self.applied.clone(),
        );
        registry.register(
            "membrane_duplicate_messages",
            "Messages skipped because their messageId was applied before",
            self.duplicates.clone(),
        );
    }
}

/// Transactions writing ingest requests at once; the requests that arrive meanwhile wait and
/// share the next one. With one writer, ingest alone set the pace of `membrane bench ingest`
/// (all requests were accepted only as the queue drained) with a tenth of the CPU idle.
const INGEST_WRITERS: usize = 2;

#[derive(Clone)]
struct AppState {
    store: Store,
    config: Arc<ApiConfig>,
    commits: Arc<reads::CommitSignal>,
    ingest: Arc<group_commit::GroupCommit>,
}

/// The API's routes. Must be called within a Tokio runtime: it starts the ingest writers,
/// which stop when the router and its clones are dropped.
pub fn router(store: Store, config: ApiConfig) -> Router {
    let ingest =
        group_commit::GroupCommit::start(store.clone(), config.metrics.clone(), INGEST_WRITERS);
    let state = AppState {
        store,
        config: Arc::new(config),
        commits: Arc::default(),
        ingest: Arc::new(ingest),
    };
    let mut routes = Router::new();
    for kind in [
        MessageType::Track,
        MessageType::Identify,
        MessageType::Page,
        MessageType::Screen,
        MessageType::Alias,
        MessageType::Group,
    ] {
        // analytics.js posts to the type's initial (`/v1/t`, `/v1/p`, ...).
        let short = &kind.name()[..1];
        routes = routes
            .route(
                &format!("/v1/{}", kind.name()),
                ingest_route(Shape::Single(kind)),
            )
            .route(&format!("/v1/{short}"), ingest_route(Shape::Single(kind)));
    }
    for path in ["/v1/batch", "/v1/import", "/v1/b"] {
        routes = routes.route(path, ingest_route(Shape::Batch));
    }
    routes
        .route("/v1/buckets", get(reads::list_buckets))
        .route("/v1/buckets/{id}", get(reads::bucket_status))
        .route("/v1/buckets/{id}/members", get(reads::members))
        .route("/v1/buckets/{id}/members/{user}", get(reads::has_member))
        .route("/v1/users/{id}", axum::routing::delete(erase_user))
        .route("/v1/users/{id}/buckets", get(reads::user_buckets))
        .route("/v1/transitions", get(reads::transitions))
        .route("/health", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// An error response: status plus `{"error": {...}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: Value,
    /// The `WWW-Authenticate` challenge of a 401.
    challenge: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: json!({ "error": { "message": message.into() } }),
            challenge: None,
        }
    }

    /// A 400 about one query parameter, named in `parameter`.
    fn parameter(name: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "error": { "message": message.into(), "parameter": name } }),
            challenge: None,
        }
    }

    fn with_pointer(status: StatusCode, error: FieldError) -> ApiError {
        ApiError {
            status,
            body: json!({ "error": { "message": error.message, "pointer": error.pointer } }),
            challenge: None,
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(error: FieldError) -> ApiError {
        ApiError::with_pointer(StatusCode::BAD_REQUEST, error)
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> ApiError {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the body is larger than {MAX_BODY_BYTES} bytes")
        } else {
            format!("cannot read the body: {}", rejection.body_text())
        };
        ApiError::with_pointer(
            status,
            FieldError {
                pointer: String::new(),
                message,
            },
        )
    }
}

impl From<segment::BodyError> for ApiError {
    fn from(error: segment::BodyError) -> ApiError {
        let status = match error {
            segment::BodyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            segment::BodyError::CorruptGzip(_) => StatusCode::BAD_REQUEST,
            segment::BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        };
        ApiError::with_pointer(
            status,
            FieldError {
                pointer: String::new(),
                message: error.to_string(),
            },
        )
    }
}

impl From<membrane_store::StoreError> for ApiError {
    fn from(error: membrane_store::StoreError) -> ApiError {
        tracing::error!("request failed in the store: {error}");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is unavailable; retry",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

/// What a request wants to do, and so which credentials it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Write,
    Read,
}

impl Access {
    fn credential_name(self) -> &'static str {
        match self {
            Access::Write => "write key",
            Access::Read => "read token",
        }
    }

    fn challenge(self) -> &'static str {
        match self {
            Access::Write => "Basic realm=\"membrane ingest\"",
            Access::Read => "Bearer realm=\"membrane reads\"",
        }
    }
}

fn header_credential(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(segment::credential)
}

fn authorize(config: &ApiConfig, access: Access, presented: Option<&str>) -> Result<(), ApiError> {
    let (accepted, other_kind) = match access {
        Access::Write => (&config.write_keys, &config.read_tokens),
        Access::Read => (&config.read_tokens, &config.write_keys),
    };
    let is_accepted = |key: &str| accepted.iter().any(|k| k == key);
    // Checked even when this side is open: using the wrong kind of secret is always a mistake.
    if let Some(key) = presented.filter(|key| !is_accepted(key)) {
        if other_kind.iter().any(|k| k == key) {
            let (given, needed) = match access {
                Access::Write => (Access::Read, Access::Write),
                Access::Read => (Access::Write, Access::Read),
            };
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "this credential is a {}; this endpoint needs a {}",
                    given.credential_name(),
                    needed.credential_name()
                ),
            ));
        }
    }
    if accepted.is_empty() {
        return Ok(());
    }
    let message = match presented {
        Some(key) if is_accepted(key) => return Ok(()),
        Some(_) => format!("unknown {}", access.credential_name()),
        None => format!(
            "missing credentials: send the {} as the HTTP Basic user or as a Bearer token",
            access.credential_name()
        ),
    };
    Err(ApiError {
        challenge: Some(access.challenge()),
        ..ApiError::new(StatusCode::UNAUTHORIZED, message)
    })
}

/// JSON, or `text/plain` (what `sendBeacon` and analytics.js send to avoid CORS preflights).
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or_default();
    let essence = text
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence == "text/plain" || essence.ends_with("+json") {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!("unsupported content type `{text}`: send application/json"),
    ))
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::from(FieldError {
            pointer: String::new(),
            message: format!("the body is not valid JSON: {e}"),
        })
    })
}

fn ingest_route(shape: Shape) -> MethodRouter<AppState> {
    post(
        move |State(state): State<AppState>,
              headers: HeaderMap,
              body: Result<Bytes, BytesRejection>| async move {
            ingest(&state, &headers, body, shape).await
        },
    )
}

async fn ingest(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    shape: Shape,
) -> Result<Json<Value>, ApiError> {
    let value = body.map_err(ApiError::from).and_then(|bytes| {
        let encoding = headers
            .get(header::CONTENT_ENCODING)
            .map(|value| String::from_utf8_lossy(value.as_bytes()));
        parse_body(&segment::decode_body(
            encoding.as_deref(),
            &bytes,
            MAX_BODY_BYTES,
        )?)
    });
    // Segment also takes the write key in the body, as browsers sending `text/plain` do.
    let presented = header_credential(headers).or_else(|| {
        let body = value.as_ref().ok()?;
        Some(body.get("writeKey")?.as_str()?.to_owned())
    });
    // Credentials first, so an unauthenticated caller learns nothing about its body.
    authorize(&state.config, Access::Write, presented.as_deref())?;
    check_content_type(headers)?;
    let messages = segment::parse_request(&value?, shape, chrono::Utc::now())?;
    if !messages.is_empty() {
        state.ingest.ingest(messages).await?;
    }
    Ok(Json(json!({ "success": true })))
}

/// Checks the header credential of a request that has no body to carry one.
fn require(state: &AppState, headers: &HeaderMap, access: Access) -> Result<(), ApiError> {
    authorize(&state.config, access, header_credential(headers).as_deref())
}

/// `DELETE /v1/users/{id}` (write key): closes the user's memberships with `left` (reason
/// `erased`) and deletes their events, properties and pending changes.
async fn erase_user(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Access::Write)?;
    let closed = state.store.erase_user(&user).await?;
    Ok(Json(json!({ "user": user, "memberships_closed": closed })))
}
