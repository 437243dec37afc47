//! Membership reads (read token): bucket status and count, has(user), member pages, a user's
//! buckets, and transitions since a cursor with long-poll.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use membrane_store::{BucketStatus, MemberCursor, Store, TRANSITIONS_CHANNEL};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::{require, Access, ApiError, AppState};

/// Page sizes of `members` and `transitions`: the default and the largest accepted.
pub const DEFAULT_PAGE_LIMIT: i64 = 100;
pub const MAX_PAGE_LIMIT: i64 = 1_000;
/// The longest long-poll `wait`, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;
/// A waiting transitions request re-reads at least this often, in case a notification was
/// lost (the LISTEN connection dropped and reconnected).
const REREAD_INTERVAL: Duration = Duration::from_secs(1);

/// Wakes long-polling requests when transitions commit: one LISTEN connection per router,
/// opened by the first request that waits.
pub(crate) struct CommitSignal {
    sender: Arc<watch::Sender<u64>>,
    listening: OnceLock<()>,
}

impl Default for CommitSignal {
    fn default() -> CommitSignal {
        CommitSignal {
            sender: Arc::new(watch::channel(0).0),
            listening: OnceLock::new(),
        }
    }
}

impl CommitSignal {
    fn subscribe(&self, store: &Store) -> watch::Receiver<u64> {
        self.listening.get_or_init(|| {
            tokio::spawn(relay_commits(store.clone(), Arc::downgrade(&self.sender)));
        });
        self.sender.subscribe()
    }
}

/// Bumps the signal on every notification of the transitions channel, until the router that
/// owns the signal is dropped. A broken LISTEN connection is replaced.
async fn relay_commits(store: Store, signal: Weak<watch::Sender<u64>>) {
    while signal.strong_count() > 0 {
        let mut notifications = match store.listen(&[TRANSITIONS_CHANNEL]).await {
            Ok(notifications) => notifications,
            Err(error) => {
                tracing::warn!(
                    "cannot listen for transitions (long-polls re-read every second): {error}"
                );
                tokio::time::sleep(REREAD_INTERVAL).await;
                continue;
            }
        };
        loop {
            match notifications.recv().await {
                Ok(_) => match signal.upgrade() {
                    Some(sender) => sender.send_modify(|commits| *commits += 1),
                    None => return,
                },
                Err(error) => {
                    tracing::warn!("transitions notifications interrupted: {error}");
                    break;
                }
            }
        }
    }
}

/// Query parameters, each checked by name so that a typo is an error rather than ignored.
struct Params {
    values: HashMap<String, String>,
}

type QueryString = Result<Query<HashMap<String, String>>, QueryRejection>;

impl Params {
    fn new(query: QueryString, known: &[&str]) -> Result<Params, ApiError> {
        let Query(values) = query.map_err(|rejection| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the query string is malformed: {}", rejection.body_text()),
            )
        })?;
        if let Some(unknown) = values.keys().find(|name| !known.contains(&name.as_str())) {
            return Err(ApiError::parameter(
                unknown,
                format!(
                    "unknown query parameter `{unknown}`; this endpoint takes {}",
                    known
                        .iter()
                        .map(|name| format!("`{name}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok(Params { values })
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    fn integer(&self, name: &str, min: i64, max: i64, default: i64) -> Result<i64, ApiError> {
        let Some(text) = self.text(name) else {
            return Ok(default);
        };
        match text.parse::<i64>() {
            Ok(value) if (min..=max).contains(&value) => Ok(value),
            _ => Err(ApiError::parameter(
                name,
                format!("`{name}` must be a whole number from {min} to {max}, got `{text}`"),
            )),
        }
    }

    fn limit(&self) -> Result<i64, ApiError> {
        self.integer("limit", 1, MAX_PAGE_LIMIT, DEFAULT_PAGE_LIMIT)
    }
}

fn unknown_bucket(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no bucket `{id}`"))
}

/// `GET /v1/buckets`: every bucket's status.
pub(crate) async fn list_buckets(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Access::Read)?;
    let buckets = state.store.bucket_statuses().await?;
    Ok(Json(json!({ "buckets": buckets })))
}

/// One bucket's status, with `bucket` and `count` as the count read has always answered.
#[derive(Serialize)]
pub(crate) struct BucketStatusBody {
    bucket: String,
    count: i64,
    #[serde(flatten)]
    status: BucketStatus,
}

/// `GET /v1/buckets/{id}`: the bucket's status, with its member count as `count`.
pub(crate) async fn bucket_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<BucketStatusBody>, ApiError> {
    require(&state, &headers, Access::Read)?;
    let status = state
        .store
        .bucket_status(&id)
        .await?
        .ok_or_else(|| unknown_bucket(&id))?;
    Ok(Json(BucketStatusBody {
        bucket: id,
        count: status.member_count,
        status,
    }))
}

/// `GET /v1/buckets/{id}/members/{user}`: whether the user is a member now.
pub(crate) async fn has_member(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((id, user)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Access::Read)?;
    let member = state.store.is_member(&id, &user).await?;
    if !member && state.store.member_count(&id).await?.is_none() {
        return Err(unknown_bucket(&id));
    }
    Ok(Json(
        json!({ "bucket": id, "user": user, "member": member }),
    ))
}

/// `GET /v1/buckets/{id}/members?after=&limit=`: active members by user id, keyset-paged.
pub(crate) async fn members(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: QueryString,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Access::Read)?;
    let params = Params::new(query, &["after", "limit"])?;
    let limit = params.limit()?;
    let after = params
        .text("after")
        .map(MemberCursor::parse)
        .transpose()
        .map_err(|error| ApiError::parameter("after", error.to_string()))?;
    let page = state
        .store
        .bucket_members(&id, after.as_ref(), limit)
        .await?
        .ok_or_else(|| unknown_bucket(&id))?;
    let members: Vec<Value> = page
        .members
        .iter()
        .map(|m| json!({ "user_id": m.user_id, "epoch": m.epoch, "entered_at": m.entered_at }))
        .collect();
    Ok(Json(json!({
        "bucket": id,
        "members": members,
        "next": page.next.as_ref().map(MemberCursor::token),
    })))
}

/// `GET /v1/users/{id}/buckets`: the buckets the user is in now, with epochs.
pub(crate) async fn user_buckets(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Access::Read)?;
    let buckets = state.store.user_memberships(&user).await?;
    Ok(Json(json!({ "user": user, "buckets": buckets })))
}

/// `GET /v1/transitions?after=&limit=&wait=&bucket=`: transitions with id greater than `after`,
/// oldest first. With `wait` (seconds) and nothing to return, the request waits for a commit
/// up to that long, and answers at once when one lands.
pub(crate) async fn transitions(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: QueryString,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Access::Read)?;
    let params = Params::new(query, &["after", "limit", "wait", "bucket"])?;
    let after = params.integer("after", 0, i64::MAX, 0)?;
    let limit = params.limit()?;
    let wait = params.integer("wait", 0, MAX_WAIT_SECS as i64, 0)?;
    let bucket = params.text("bucket");
    if let Some(bucket) = bucket {
        if state.store.member_count(bucket).await?.is_none() {
            return Err(unknown_bucket(bucket));
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.unsigned_abs());
    let mut commits = (wait > 0).then(|| state.commits.subscribe(&state.store));
    loop {
        // Marks what has been seen before reading, so a commit after the read wakes the wait.
        if let Some(commits) = commits.as_mut() {
            commits.mark_unchanged();
        }
        let page = state.store.transitions_since(after, limit, bucket).await?;
        let now = tokio::time::Instant::now();
        match commits.as_mut() {
            Some(commits) if page.transitions.is_empty() && now < deadline => {
                let nap = (deadline - now).min(REREAD_INTERVAL);
                // A timeout re-reads; a closed signal (router dropped) cannot happen while
                // this request holds the state.
                let _ = tokio::time::timeout(nap, commits.changed()).await;
            }
            _ => {
                return Ok(Json(json!({
                    "transitions": page.transitions,
                    "next": page.next,
                })))
            }
        }
    }
}
