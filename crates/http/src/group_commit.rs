//! Group commit: ingest requests that arrive while another is being written share the next
//! transaction, so a busy server pays for one transaction's statements and commit per group
//! instead of per request. An idle server writes each request as it comes: nothing waits to
//! fill a group.
//!
//! Each request stays all-or-nothing: when a group's transaction fails, every request of it is
//! written again on its own, so a request only ever fails for its own sake (or the database's).
//! Messages keep their arrival order across the group, so a `messageId` sent twice applies
//! once, from the request that came first. A request handed to a writer is written even if its
//! client goes away meanwhile; its `messageId`s make the client's retry harmless.

use std::sync::Arc;

use axum::http::StatusCode;
use membrane_store::{IngestOutcome, Message, Store, StoreError};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::{ApiError, IngestMetrics};

/// A group takes no more requests once it holds this many messages (one full batch request).
const GROUP_MESSAGES: usize = crate::segment::MAX_BATCH_MESSAGES;

/// Requests waiting for a writer; beyond this, handlers wait to hand theirs over.
const WAITING_REQUESTS: usize = 256;

/// Writes ingest requests in groups. Dropping every handle stops the writers once the
/// requests already handed over are written.
pub(crate) struct GroupCommit {
    requests: mpsc::Sender<Request>,
}

struct Request {
    messages: Vec<Message>,
    written: oneshot::Sender<Result<(), StoreError>>,
}

impl GroupCommit {
    /// Starts `writers` tasks, each writing one group at a time.
    pub(crate) fn start(store: Store, metrics: IngestMetrics, writers: usize) -> GroupCommit {
        let (requests, waiting) = mpsc::channel(WAITING_REQUESTS);
        let waiting = Arc::new(Mutex::new(waiting));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_groups(
                store.clone(),
                metrics.clone(),
                waiting.clone(),
            ));
        }
        GroupCommit { requests }
    }

    /// Writes `messages` all-or-nothing, alone or with requests that arrived meanwhile.
    pub(crate) async fn ingest(&self, messages: Vec<Message>) -> Result<(), ApiError> {
        let (written, outcome) = oneshot::channel();
        self.requests
            .send(Request { messages, written })
            .await
            .map_err(|_| writers_gone())?;
        Ok(outcome.await.map_err(|_| writers_gone())??)
    }
}

/// Only a panicking writer drops a request unanswered.
fn writers_gone() -> ApiError {
    tracing::error!("an ingest writer stopped");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "ingest is unavailable; retry",
    )
}

async fn write_groups(
    store: Store,
    metrics: IngestMetrics,
    waiting: Arc<Mutex<mpsc::Receiver<Request>>>,
) {
    while let Some(group) = next_group(&waiting).await {
        write_group(&store, &metrics, group).await;
    }
}

/// The oldest waiting request and those behind it, taken while the group holds fewer than
/// [`GROUP_MESSAGES`] messages.
async fn next_group(waiting: &Mutex<mpsc::Receiver<Request>>) -> Option<Vec<Request>> {
    let mut waiting = waiting.lock().await;
    let first = waiting.recv().await?;
    let mut messages = first.messages.len();
    let mut group = vec![first];
    while messages < GROUP_MESSAGES {
        let Ok(next) = waiting.try_recv() else { break };
        messages += next.messages.len();
        group.push(next);
    }
    Some(group)
}

async fn write_group(store: &Store, metrics: &IngestMetrics, mut group: Vec<Request>) {
    if group.len() == 1 {
        if let Some(request) = group.pop() {
            let outcome = store.ingest(&request.messages).await;
            answer(metrics, request.written, outcome);
        }
        return;
    }
    let sizes: Vec<usize> = group.iter().map(|r| r.messages.len()).collect();
    let (all, answers): (Vec<Vec<Message>>, Vec<_>) =
        group.into_iter().map(|r| (r.messages, r.written)).unzip();
    let joined: Vec<Message> = all.into_iter().flatten().collect();
    match store.ingest(&joined).await {
        Ok(outcome) => {
            count(metrics, outcome);
            for written in answers {
                // A handler that went away needs no answer.
                let _ = written.send(Ok(()));
            }
        }
        Err(error) => {
            tracing::warn!(
                requests = answers.len(),
                "a grouped ingest failed ({error}); writing its requests one by one"
            );
            let mut rest = joined;
            for (size, written) in sizes.into_iter().zip(answers) {
                let tail = rest.split_off(size.min(rest.len()));
                let outcome = store.ingest(&rest).await;
                answer(metrics, written, outcome);
                rest = tail;
            }
        }
    }
}

fn answer(
    metrics: &IngestMetrics,
    written: oneshot::Sender<Result<(), StoreError>>,
    outcome: Result<IngestOutcome, StoreError>,
) {
    let _ = written.send(outcome.map(|outcome| count(metrics, outcome)));
}

fn count(metrics: &IngestMetrics, outcome: IngestOutcome) {
    metrics.applied.inc_by(outcome.applied as u64);
    metrics.duplicates.inc_by(outcome.duplicates as u64);
}
