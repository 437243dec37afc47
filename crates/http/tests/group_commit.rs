//! Group commit against a real database: concurrent ingest requests share transactions, each
//! request stays all-or-nothing, and one that fails fails alone.

mod support;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use membrane_http::ApiConfig;
use membrane_store::testing::fresh_database;
use membrane_store::Store;
use serde_json::{json, Value};

const REQUESTS: usize = 40;
const MESSAGES_PER_REQUEST: usize = 50;

fn app(store: &Store) -> Router {
    membrane_http::router(store.clone(), ApiConfig::default())
}

async fn post_batch(app: Router, batch: Vec<Value>) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/batch")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({ "batch": batch }).to_string()))
        .expect("a request");
    let (status, _, body) = support::send(&app, request).await;
    (status, body)
}

/// Message `message` of request `request`, sent by request `sender` (its properties say which).
fn track(request: usize, message: usize, sender: usize, event: &str) -> Value {
    json!({
        "type": "track",
        "userId": format!("user-{}", message % 7),
        "event": event,
        "messageId": format!("m-{request}-{message}"),
        "properties": { "request": sender },
    })
}

/// Sends every batch at once and returns the answers in batch order.
async fn send_all(app: &Router, batches: Vec<Vec<Value>>) -> Vec<(StatusCode, Value)> {
    let requests: Vec<_> = batches
        .into_iter()
        .map(|batch| tokio::spawn(post_batch(app.clone(), batch)))
        .collect();
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.expect("the request task"));
    }
    answers
}

async fn scalar(store: &Store, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_transactions_and_apply_each_message_once() {
    let database = fresh_database().await.expect("a database");
    let store = &database.store;
    let app = app(store);
    // Every request also repeats one message of the request before it.
    let batches: Vec<Vec<Value>> = (0..REQUESTS)
        .map(|request| {
            let mut batch: Vec<Value> = (0..MESSAGES_PER_REQUEST)
                .map(|message| track(request, message, request, "visit"))
                .collect();
            if request > 0 {
                batch.push(track(request - 1, 0, request, "visit"));
            }
            batch
        })
        .collect();
    for (status, body) in send_all(&app, batches).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let distinct = (REQUESTS * MESSAGES_PER_REQUEST) as i64;
    assert_eq!(scalar(store, "SELECT count(*) FROM events").await, distinct);
    assert_eq!(
        scalar(store, "SELECT count(*) FROM ingested_messages").await,
        distinct
    );
    // Rows a transaction inserts share its xmin: fewer transactions than requests means
    // requests were grouped.
    let transactions = scalar(store, "SELECT count(DISTINCT xmin::text) FROM events").await;
    assert!(
        transactions < REQUESTS as i64,
        "{transactions} transactions for {REQUESTS} requests"
    );
    // Each request's applied messages landed in one transaction.
    let split = scalar(
        store,
        "SELECT count(*) FROM (SELECT properties->'request' FROM events \
         GROUP BY properties->'request' HAVING count(DISTINCT xmin::text) > 1) AS s",
    )
    .await;
    assert_eq!(
        split, 0,
        "a request's events were written by two transactions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_the_database_refuses_fails_alone() {
    let database = fresh_database().await.expect("a database");
    let store = &database.store;
    // A stand-in for any write Postgres refuses: events named `poison` raise.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'poisoned event'; END $$; \
         CREATE TRIGGER refuse_poison BEFORE INSERT ON events FOR EACH ROW \
         WHEN (NEW.name = 'poison') EXECUTE FUNCTION refuse_poison();",
    )
    .execute(store.pool())
    .await
    .expect("the trigger");
    let app = app(store);
    let poisoned = REQUESTS / 2;
    let batches: Vec<Vec<Value>> = (0..REQUESTS)
        .map(|request| {
            (0..MESSAGES_PER_REQUEST)
                .map(|message| {
                    let last = message == MESSAGES_PER_REQUEST - 1;
                    let event = if request == poisoned && last {
                        "poison"
                    } else {
                        "visit"
                    };
                    track(request, message, request, event)
                })
                .collect()
        })
        .collect();
    let answers = send_all(&app, batches).await;
    for (request, (status, body)) in answers.iter().enumerate() {
        if request == poisoned {
            assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        } else {
            assert_eq!(*status, StatusCode::OK, "request {request}: {body}");
        }
    }
    let written = ((REQUESTS - 1) * MESSAGES_PER_REQUEST) as i64;
    assert_eq!(scalar(store, "SELECT count(*) FROM events").await, written);
    assert_eq!(
        scalar(
            store,
            &format!("SELECT count(*) FROM events WHERE properties->'request' = '{poisoned}'")
        )
        .await,
        0,
        "the refused request wrote part of itself"
    );
    assert_eq!(
        scalar(store, "SELECT count(*) FROM ingested_messages").await,
        written
    );
}
