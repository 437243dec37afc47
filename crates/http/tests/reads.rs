//! The read API against a real database: bucket status, has, member pages that stay stable
//! while members change, a user's buckets, and transitions with long-poll.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use chrono::Utc;
use membrane_http::ApiConfig;
use membrane_store::testing::fresh_database;
use membrane_store::{BucketVersion, EntryRule, Source, Store};
use serde_json::{json, Value};

const WRITE_KEY: &str = "write-key-1";
const READ_TOKEN: &str = "read-token-1";

fn app(store: &Store) -> Router {
    membrane_http::router(
        store.clone(),
        ApiConfig {
            write_keys: vec![WRITE_KEY.to_owned()],
            read_tokens: vec![READ_TOKEN.to_owned()],
            ..ApiConfig::default()
        },
    )
}

async fn get_as(app: &Router, uri: &str, token: &str) -> (StatusCode, Value) {
    let request = Request::get(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .expect("a request");
    let (status, _, body) = support::send(app, request).await;
    (status, body)
}

async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    get_as(app, uri, READ_TOKEN).await
}

/// Asserts a 400 naming `parameter`, with `fragment` in its message.
async fn bad_parameter(app: &Router, uri: &str, parameter: &str, fragment: &str) {
    let (status, body) = get(app, uri).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
    assert_eq!(
        body["error"]["parameter"],
        json!(parameter),
        "{uri}: {body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(fragment), "{uri}: {message}");
}

async fn not_found(app: &Router, uri: &str, bucket: &str) {
    let (status, body) = get(app, uri).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{uri}: {body}");
    assert_eq!(
        body["error"]["message"],
        json!(format!("no bucket `{bucket}`")),
        "{uri}"
    );
}

async fn add_bucket(store: &Store, id: &str) {
    store
        .record_bucket_version(&BucketVersion {
            id: id.to_owned(),
            source_path: format!("buckets/{id}.toml"),
            description: format!("the {id} bucket"),
            definition: "criteria = 'event(\"x\").exists()'".to_owned(),
            criteria_hash: format!("hash-{id}"),
            time_based: false,
        })
        .await
        .expect("bucket recorded");
}

async fn join(store: &Store, bucket: &str, users: &[String]) {
    let mut round = store.begin_round().await.expect("a round");
    round
        .join(
            bucket,
            users,
            EntryRule::Unlimited,
            Source::Event,
            "criteria",
            Utc::now(),
        )
        .await
        .expect("joined");
    round.commit().await.expect("committed");
}

async fn leave(store: &Store, bucket: &str, user: &str) {
    let mut round = store.begin_round().await.expect("a round");
    let active = round
        .active_members(bucket, &[user.to_owned()])
        .await
        .expect("active members");
    let epoch = active.get(user).expect("an active member").epoch;
    round
        .leave(
            bucket,
            &[(user.to_owned(), epoch)],
            Source::Event,
            "criteria",
            Utc::now(),
        )
        .await
        .expect("left");
    round.commit().await.expect("committed");
}

fn users(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("u{n:03}")).collect()
}

#[tokio::test]
async fn bucket_status_count_and_has() {
    let db = fresh_database().await.expect("a fresh database");
    let app = app(&db.store);
    add_bucket(&db.store, "vip").await;
    add_bucket(&db.store, "new").await;
    join(&db.store, "vip", &users(0..3)).await;

    let (status, body) = get(&app, "/v1/buckets").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<&str> = body["buckets"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert_eq!(ids, ["new", "vip"]);

    let (status, body) = get(&app, "/v1/buckets/vip").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["bucket"], json!("vip"));
    assert_eq!(body["count"], json!(3));
    assert_eq!(body["member_count"], json!(3));
    assert_eq!(body["enabled"], json!(true));
    assert_eq!(body["status"], json!("ok"));
    assert_eq!(body["criteria_hash"], json!("hash-vip"));
    assert_eq!(body["backfilled"], json!(false));
    assert_eq!(body["time_based"], json!(false));
    assert_eq!(body["last_error"], Value::Null);

    let (_, body) = get(&app, "/v1/buckets/vip/members/u001").await;
    assert_eq!(body["member"], json!(true));
    let (_, body) = get(&app, "/v1/buckets/vip/members/zed").await;
    assert_eq!(body["member"], json!(false));
    not_found(&app, "/v1/buckets/nope", "nope").await;
    not_found(&app, "/v1/buckets/nope/members/u001", "nope").await;

    let (status, body) = get_as(&app, "/v1/buckets", WRITE_KEY).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

#[tokio::test]
async fn member_pages_are_stable_while_members_join_and_leave() {
    let db = fresh_database().await.expect("a fresh database");
    let app = app(&db.store);
    add_bucket(&db.store, "vip").await;
    let initial = users(0..40);
    join(&db.store, "vip", &initial).await;

    let mut seen: Vec<String> = Vec::new();
    let mut uri = "/v1/buckets/vip/members?limit=6".to_owned();
    let mut pages = 0;
    loop {
        let (status, body) = get(&app, &uri).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let page = body["members"].as_array().expect("members");
        assert!(page.len() <= 6);
        for member in page {
            assert_eq!(member["epoch"], json!(1), "{member}");
            assert!(member["entered_at"].is_string(), "{member}");
            seen.push(member["user_id"].as_str().expect("a user id").to_owned());
        }
        // Between pages: one seen member and one not yet seen leave, a user joins behind the
        // cursor and one ahead of it.
        pages += 1;
        if pages == 2 {
            leave(&db.store, "vip", "u002").await;
            leave(&db.store, "vip", "u030").await;
            join(&db.store, "vip", &["u000a".to_owned(), "u035a".to_owned()]).await;
        }
        match body["next"].as_str() {
            Some(next) => uri = format!("/v1/buckets/vip/members?limit=6&after={next}"),
            None => break,
        }
    }
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "a member repeated: {seen:?}");
    for member in initial.iter().filter(|u| *u != "u030") {
        assert!(seen.contains(member), "{member} was skipped");
    }
    assert!(!seen.contains(&"u030".to_owned()), "left before its page");
    assert!(
        seen.contains(&"u035a".to_owned()),
        "joined ahead of the cursor"
    );
    assert!(
        !seen.contains(&"u000a".to_owned()),
        "joined behind the cursor"
    );
    assert!(pages >= 7, "{pages} pages");
}

#[tokio::test]
async fn bad_read_parameters_are_400_naming_the_parameter() {
    let db = fresh_database().await.expect("a fresh database");
    let app = app(&db.store);
    add_bucket(&db.store, "vip").await;
    let members = "/v1/buckets/vip/members";
    bad_parameter(
        &app,
        &format!("{members}?after=xyz"),
        "after",
        "not a member cursor",
    )
    .await;
    bad_parameter(
        &app,
        &format!("{members}?limit=0"),
        "limit",
        "from 1 to 1000",
    )
    .await;
    bad_parameter(
        &app,
        &format!("{members}?limit=1001"),
        "limit",
        "got `1001`",
    )
    .await;
    bad_parameter(
        &app,
        &format!("{members}?limit=ten"),
        "limit",
        "whole number",
    )
    .await;
    bad_parameter(
        &app,
        &format!("{members}?cursor=abc"),
        "cursor",
        "`after`, `limit`",
    )
    .await;
    bad_parameter(&app, "/v1/transitions?after=-1", "after", "whole number").await;
    bad_parameter(&app, "/v1/transitions?after=abc", "after", "got `abc`").await;
    bad_parameter(&app, "/v1/transitions?wait=61", "wait", "from 0 to 60").await;
    bad_parameter(&app, "/v1/transitions?limit=-5", "limit", "from 1").await;
    not_found(&app, "/v1/buckets/nope/members", "nope").await;
    not_found(&app, "/v1/transitions?bucket=nope", "nope").await;
}

#[tokio::test]
async fn a_users_buckets_with_epochs() {
    let db = fresh_database().await.expect("a fresh database");
    let app = app(&db.store);
    add_bucket(&db.store, "alpha").await;
    add_bucket(&db.store, "beta").await;
    let ana = vec!["ana".to_owned()];
    join(&db.store, "alpha", &ana).await;
    join(&db.store, "beta", &ana).await;
    leave(&db.store, "beta", "ana").await;
    join(&db.store, "beta", &ana).await;

    let (status, body) = get(&app, "/v1/users/ana/buckets").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"], json!("ana"));
    let buckets = body["buckets"].as_array().expect("buckets");
    let summary: Vec<(&str, i64)> = buckets
        .iter()
        .map(|b| {
            (
                b["bucket_id"].as_str().unwrap_or_default(),
                b["epoch"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(summary, [("alpha", 1), ("beta", 2)]);
    assert!(buckets.iter().all(|b| b["entered_at"].is_string()));
    let (_, body) = get(&app, "/v1/users/nobody/buckets").await;
    assert_eq!(body["buckets"], json!([]));
}

#[tokio::test]
async fn transitions_page_by_cursor_and_filter_by_bucket() {
    let db = fresh_database().await.expect("a fresh database");
    let app = app(&db.store);
    add_bucket(&db.store, "one").await;
    add_bucket(&db.store, "two").await;
    join(&db.store, "one", &users(0..3)).await;
    join(&db.store, "two", &users(0..2)).await;

    let (status, first) = get(&app, "/v1/transitions?limit=4").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["transitions"].as_array().map(Vec::len), Some(4));
    let next = first["next"].as_i64().expect("a cursor");
    assert_eq!(json!(next), first["transitions"][3]["id"]);
    let (_, rest) = get(&app, &format!("/v1/transitions?after={next}")).await;
    let rest = rest["transitions"].as_array().expect("transitions").clone();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["bucket_id"], json!("two"));
    assert_eq!(rest[0]["kind"], json!("entered"));
    assert_eq!(rest[0]["source"], json!("event"));

    let (_, two) = get(&app, "/v1/transitions?bucket=two").await;
    let two = two["transitions"].as_array().expect("transitions");
    assert_eq!(two.len(), 2);
    assert!(two.iter().all(|t| t["bucket_id"] == json!("two")));
}

#[tokio::test]
async fn a_long_poll_returns_when_a_transition_commits_and_empty_after_wait() {
    let db = fresh_database().await.expect("a fresh database");
    let app = app(&db.store);
    add_bucket(&db.store, "vip").await;
    join(&db.store, "vip", &users(0..1)).await;
    let (_, body) = get(&app, "/v1/transitions").await;
    let cursor = body["next"].as_i64().expect("a cursor");

    // Nothing commits: the request waits the whole `wait`, then answers empty.
    let started = Instant::now();
    let (status, body) = get(&app, &format!("/v1/transitions?after={cursor}&wait=1")).await;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["transitions"], json!([]));
    assert_eq!(
        body["next"],
        json!(cursor),
        "an empty answer keeps the cursor"
    );
    assert!(
        waited >= Duration::from_millis(950),
        "answered after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");

    // A transition commits while the request waits: it answers at once with it.
    let waiting = {
        let app = app.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let answer = get(&app, &format!("/v1/transitions?after={cursor}&wait=30")).await;
            (answer, started.elapsed())
        })
    };
    // Between two of its backstop re-reads (every second), so only the notification can
    // answer it quickly.
    tokio::time::sleep(Duration::from_millis(1_400)).await;
    assert!(!waiting.is_finished(), "answered before anything committed");
    let committed = Instant::now();
    join(&db.store, "vip", &["late".to_owned()]).await;
    let ((status, body), total) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the long-poll answers")
        .expect("the request ran");
    let after_commit = committed.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    let transitions = body["transitions"].as_array().expect("transitions");
    assert_eq!(transitions.len(), 1, "{body}");
    assert_eq!(transitions[0]["user_id"], json!("late"));
    assert!(total < Duration::from_secs(30));
    // Woken by the notification, not by a re-read timer or the end of `wait`.
    assert!(
        after_commit < Duration::from_millis(450),
        "answered {after_commit:?} after the commit"
    );

    // A bucket filter waits through other buckets' transitions.
    add_bucket(&db.store, "other").await;
    let next = body["next"].as_i64().expect("a cursor");
    let waiting = {
        let app = app.clone();
        tokio::spawn(async move {
            get(
                &app,
                &format!("/v1/transitions?after={next}&wait=2&bucket=vip"),
            )
            .await
        })
    };
    join(&db.store, "other", &["elsewhere".to_owned()]).await;
    let (status, body) = waiting.await.expect("the request ran");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["transitions"], json!([]));
}
