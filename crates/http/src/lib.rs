//! Segment-compatible HTTP ingest (`/v1/track`, `/v1/identify`, `/v1/batch`) and membership
//! reads. Requests are validated whole before anything is written: a bad field anywhere gets a
//! 400 naming it by JSON pointer, and nothing of the request is applied.

mod segment;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use membrane_store::Store;
use serde_json::{json, Value};

pub use segment::{parse_message, FieldError};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 512 * 1024;

#[derive(Clone)]
pub struct ApiConfig {
    /// Accepted write keys (HTTP Basic user or bearer token). Empty: ingest is open.
    pub write_keys: Vec<String>,
}

#[derive(Clone)]
struct AppState {
    store: Store,
    config: Arc<ApiConfig>,
}

pub fn router(store: Store, config: ApiConfig) -> Router {
    let state = AppState {
        store,
        config: Arc::new(config),
    };
    Router::new()
        .route("/v1/track", post(track))
        .route("/v1/identify", post(identify))
        .route("/v1/batch", post(batch))
        .route("/v1/buckets/{id}", get(bucket_count))
        .route("/v1/buckets/{id}/members/{user}", get(has_member))
        .route("/health", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// An error response: status plus `{"error": {...}}`.
struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: json!({ "error": { "message": message.into() } }),
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(error: FieldError) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "error": { "message": error.message, "pointer": error.pointer } }),
        }
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
        (self.status, Json(self.body)).into_response()
    }
}

fn authorize(config: &ApiConfig, headers: &HeaderMap) -> Result<(), ApiError> {
    if config.write_keys.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(segment::credential);
    match presented {
        Some(key) if config.write_keys.contains(&key) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unknown write key")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing credentials: send the write key as the HTTP Basic user or as a Bearer token",
        )),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::from(FieldError {
            pointer: String::new(),
            message: format!("the body is not valid JSON: {e}"),
        })
    })
}

async fn ingest(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
    shape: segment::Shape,
) -> Result<Json<Value>, ApiError> {
    authorize(&state.config, headers)?;
    let value = parse_body(body)?;
    let messages = segment::parse_request(&value, shape, chrono::Utc::now())?;
    state.store.ingest(&messages).await?;
    Ok(Json(json!({ "success": true })))
}

async fn track(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    ingest(&state, &headers, &body, segment::Shape::Single("track")).await
}

async fn identify(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    ingest(&state, &headers, &body, segment::Shape::Single("identify")).await
}

async fn batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    ingest(&state, &headers, &body, segment::Shape::Batch).await
}

async fn bucket_count(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.store.member_count(&id).await? {
        Some(count) => Ok(Json(json!({ "bucket": id, "count": count }))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no bucket `{id}`"),
        )),
    }
}

async fn has_member(
    State(state): State<AppState>,
    Path((id, user)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let member = state.store.is_member(&id, &user).await?;
    Ok(Json(
        json!({ "bucket": id, "user": user, "member": member }),
    ))
}
