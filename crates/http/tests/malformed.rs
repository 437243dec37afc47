//! The HTTP API against a real database: every malformed request gets the right status and a
//! precise error and writes nothing; well-formed Segment messages land as Segment means them.

mod support;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use chrono::{DateTime, Duration, Utc};
use membrane_http::{ApiConfig, MAX_BATCH_MESSAGES, MAX_BODY_BYTES, MAX_NESTING_DEPTH};
use membrane_store::testing::fresh_database;
use membrane_store::Store;
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

/// One request to send.
struct Call {
    method: Method,
    uri: &'static str,
    authorization: Option<String>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

impl Call {
    fn post(uri: &'static str, body: Value) -> Call {
        Call::post_raw(uri, body.to_string().into_bytes())
    }

    fn post_raw(uri: &'static str, body: Vec<u8>) -> Call {
        Call {
            method: Method::POST,
            uri,
            authorization: Some(format!("Bearer {WRITE_KEY}")),
            content_type: Some("application/json"),
            body,
        }
    }

    fn get(uri: &'static str, token: &str) -> Call {
        Call {
            method: Method::GET,
            uri,
            authorization: Some(format!("Bearer {token}")),
            content_type: None,
            body: Vec::new(),
        }
    }

    fn authorization(mut self, value: Option<&str>) -> Call {
        self.authorization = value.map(str::to_owned);
        self
    }

    fn content_type(mut self, value: &'static str) -> Call {
        self.content_type = Some(value);
        self
    }

    async fn send(self, app: &Router) -> (StatusCode, Option<String>, Value) {
        let mut request = Request::builder().method(self.method).uri(self.uri);
        if let Some(authorization) = &self.authorization {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        if let Some(content_type) = self.content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let request = request.body(Body::from(self.body)).unwrap();
        let (status, headers, body) = support::send(app, request).await;
        let challenge = headers
            .get(header::WWW_AUTHENTICATE)
            .map(|value| value.to_str().unwrap().to_owned());
        (status, challenge, body)
    }
}

/// A malformed request and the answer it must get.
struct Case {
    name: &'static str,
    call: Call,
    status: StatusCode,
    /// The JSON pointer the error must name; `None`: the error has no pointer.
    pointer: Option<String>,
    /// A fragment the error message must contain.
    message: &'static str,
}

fn case(
    name: &'static str,
    call: Call,
    status: StatusCode,
    pointer: Option<&str>,
    message: &'static str,
) -> Case {
    Case {
        name,
        call,
        status,
        pointer: pointer.map(str::to_owned),
        message,
    }
}

fn bad(name: &'static str, call: Call, pointer: &str, message: &'static str) -> Case {
    case(name, call, StatusCode::BAD_REQUEST, Some(pointer), message)
}

fn track(extra: Value) -> Value {
    let mut message = json!({"userId": "u1", "event": "Signed Up"});
    for (key, value) in extra.as_object().unwrap() {
        message[key] = value.clone();
    }
    message
}

fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!({ "a": inner }))
}

fn basic(user: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

fn malformed_cases() -> Vec<Case> {
    use StatusCode as S;
    let long_name = "x".repeat(membrane_http::MAX_EVENT_NAME_CHARS + 1);
    let long_user = "u".repeat(membrane_http::MAX_USER_ID_CHARS + 1);
    let big_property = "p".repeat(membrane_http::MAX_MESSAGE_BYTES);
    let too_many: Vec<Value> = (0..=MAX_BATCH_MESSAGES)
        .map(|i| json!({"type": "track", "userId": format!("u{i}"), "event": "e"}))
        .collect();
    let oversize_body = json!({"batch": [], "padding": "z".repeat(MAX_BODY_BYTES)});
    // The body is level 1, the properties level 2: this goes one level too deep inside them.
    let too_deep = track(json!({"properties": nested(MAX_NESTING_DEPTH)}));
    let deep_pointer = format!("/properties{}", "/a".repeat(MAX_NESTING_DEPTH - 1));
    vec![
        bad(
            "invalid JSON",
            Call::post_raw("/v1/track", b"{\"userId\": ".to_vec()),
            "",
            "not valid JSON",
        ),
        bad(
            "body is an array",
            Call::post("/v1/track", json!([1])),
            "",
            "expected a message object, got an array",
        ),
        bad(
            "neither userId nor anonymousId",
            Call::post("/v1/track", json!({"event": "e"})),
            "/userId",
            "needs a `userId` or an `anonymousId`",
        ),
        bad(
            "userId is an object",
            Call::post("/v1/track", track(json!({"userId": {"id": 1}}))),
            "/userId",
            "got an object",
        ),
        bad(
            "userId is empty",
            Call::post("/v1/track", track(json!({"userId": ""}))),
            "/userId",
            "got an empty string",
        ),
        bad(
            "anonymousId is a boolean",
            Call::post("/v1/track", json!({"anonymousId": true, "event": "e"})),
            "/anonymousId",
            "got a boolean",
        ),
        bad(
            "userId too long",
            Call::post("/v1/track", track(json!({"userId": long_user}))),
            "/userId",
            "at most",
        ),
        bad(
            "event missing",
            Call::post("/v1/track", json!({"userId": "u1"})),
            "/event",
            "missing `event`",
        ),
        bad(
            "event empty",
            Call::post("/v1/track", track(json!({"event": ""}))),
            "/event",
            "empty",
        ),
        bad(
            "event is a number",
            Call::post("/v1/track", track(json!({"event": 7}))),
            "/event",
            "got a number",
        ),
        bad(
            "event too long",
            Call::post("/v1/track", track(json!({"event": long_name}))),
            "/event",
            "at most",
        ),
        bad(
            "bucket: event",
            Call::post("/v1/track", track(json!({"event": "bucket:vip:entered"}))),
            "/event",
            "reserved",
        ),
        bad(
            "messageId is a number",
            Call::post("/v1/track", track(json!({"messageId": 5}))),
            "/messageId",
            "expected a string",
        ),
        bad(
            "properties is an array",
            Call::post("/v1/track", track(json!({"properties": [1]}))),
            "/properties",
            "expected an object, got an array",
        ),
        bad(
            "properties is a string",
            Call::post("/v1/page", json!({"userId": "u1", "properties": "x"})),
            "/properties",
            "expected an object",
        ),
        bad(
            "traits is a number",
            Call::post("/v1/identify", json!({"userId": "u1", "traits": 3})),
            "/traits",
            "expected an object",
        ),
        bad(
            "page name is a number",
            Call::post("/v1/page", json!({"userId": "u1", "name": 3})),
            "/name",
            "expected a string",
        ),
        bad(
            "screen category is an array",
            Call::post("/v1/screen", json!({"userId": "u1", "category": []})),
            "/category",
            "expected a string",
        ),
        bad(
            "type differs from the endpoint",
            Call::post("/v1/track", track(json!({"type": "identify"}))),
            "/type",
            "this endpoint takes \"track\"",
        ),
        bad(
            "type is a number",
            Call::post("/v1/track", track(json!({"type": 1}))),
            "/type",
            "expected a string",
        ),
        bad(
            "unknown type in a batch",
            Call::post(
                "/v1/batch",
                json!({"batch": [track(json!({"type": "purchase"}))]}),
            ),
            "/batch/0/type",
            "unsupported type \"purchase\"",
        ),
        bad(
            "batch item without type",
            Call::post("/v1/batch", json!({"batch": [track(json!({}))]})),
            "/batch/0/type",
            "missing `type`",
        ),
        bad(
            "timestamp not RFC 3339",
            Call::post("/v1/track", track(json!({"timestamp": "yesterday"}))),
            "/timestamp",
            "not an RFC 3339 timestamp",
        ),
        bad(
            "timestamp is a number",
            Call::post("/v1/track", track(json!({"timestamp": 1_700_000_000}))),
            "/timestamp",
            "got a number",
        ),
        bad(
            "timestamp without zone",
            Call::post(
                "/v1/track",
                track(json!({"timestamp": "2026-01-01T10:00:00"})),
            ),
            "/timestamp",
            "not an RFC 3339",
        ),
        bad(
            "sentAt not a date",
            Call::post(
                "/v1/track",
                track(json!({"sentAt": "2026-13-01T00:00:00Z"})),
            ),
            "/sentAt",
            "not an RFC 3339",
        ),
        bad(
            "originalTimestamp is an object",
            Call::post("/v1/track", track(json!({"originalTimestamp": {}}))),
            "/originalTimestamp",
            "got an object",
        ),
        bad(
            "batch-level sentAt bad",
            Call::post("/v1/batch", json!({"sentAt": "soon", "batch": []})),
            "/sentAt",
            "not an RFC 3339",
        ),
        bad(
            "bad timestamp on identify",
            Call::post("/v1/identify", json!({"userId": "u1", "timestamp": "x"})),
            "/timestamp",
            "not an RFC 3339",
        ),
        bad(
            "batch is null",
            Call::post("/v1/batch", json!({"batch": null})),
            "/batch",
            "got null",
        ),
        bad(
            "batch missing",
            Call::post("/v1/batch", json!({})),
            "/batch",
            "missing `batch`",
        ),
        bad(
            "batch item not an object",
            Call::post(
                "/v1/batch",
                json!({"batch": [track(json!({"type": "track"})), "hello"]}),
            ),
            "/batch/1",
            "got a string",
        ),
        bad(
            "second batch item bad: all-or-nothing",
            Call::post(
                "/v1/batch",
                json!({"batch": [track(json!({"type": "track"})), {"type": "track", "event": "e"}]}),
            ),
            "/batch/1/userId",
            "needs a `userId`",
        ),
        bad(
            "batch too long",
            Call::post("/v1/batch", json!({"batch": too_many})),
            "/batch",
            "at most 2500",
        ),
        bad(
            "message too large",
            Call::post(
                "/v1/batch",
                json!({"batch": [track(json!({"type": "track", "properties": {"p": big_property}}))]}),
            ),
            "/batch/0",
            "bytes; at most",
        ),
        bad(
            "nested too deep",
            Call::post("/v1/track", too_deep),
            &deep_pointer,
            "nested deeper than 32",
        ),
        // Postgres text and jsonb cannot hold U+0000: without this check the request failed
        // in the database as a 503, and clients retried it for ever.
        bad(
            "a NUL character in a property value",
            Call::post(
                "/v1/batch",
                json!({"batch": [track(json!({"type": "track", "properties": {"tags": ["ok", "x\u{0}y"]}}))]}),
            ),
            "/batch/0/properties/tags/1",
            "NUL character",
        ),
        bad(
            "a NUL character in a property name",
            Call::post("/v1/track", track(json!({"properties": {"a\u{0}": 1}}))),
            "/properties/a\u{0}",
            "NUL character",
        ),
        bad(
            "a NUL character in the user id",
            Call::post("/v1/track", track(json!({"userId": "u\u{0}"}))),
            "/userId",
            "NUL character",
        ),
        case(
            "body too large",
            Call::post("/v1/batch", oversize_body),
            S::PAYLOAD_TOO_LARGE,
            Some(""),
            "larger than",
        ),
        case(
            "form content type",
            Call::post("/v1/track", track(json!({})))
                .content_type("application/x-www-form-urlencoded"),
            S::UNSUPPORTED_MEDIA_TYPE,
            None,
            "unsupported content type",
        ),
        case(
            "missing credentials",
            Call::post("/v1/track", track(json!({}))).authorization(None),
            S::UNAUTHORIZED,
            None,
            "missing credentials",
        ),
        case(
            "unknown write key (Basic)",
            Call::post("/v1/track", track(json!({}))).authorization(Some(&basic("nope"))),
            S::UNAUTHORIZED,
            None,
            "unknown write key",
        ),
        case(
            "unknown writeKey in the body",
            Call::post("/v1/track", track(json!({"writeKey": "nope"}))).authorization(None),
            S::UNAUTHORIZED,
            None,
            "unknown write key",
        ),
        case(
            "unsupported scheme",
            Call::post("/v1/track", track(json!({}))).authorization(Some("Digest abc")),
            S::UNAUTHORIZED,
            None,
            "missing credentials",
        ),
        case(
            "read token used to write",
            Call::post("/v1/track", track(json!({}))).authorization(Some(&basic(READ_TOKEN))),
            S::FORBIDDEN,
            None,
            "this credential is a read token",
        ),
        case(
            "write key used to read",
            Call::get("/v1/buckets/vip", WRITE_KEY),
            S::FORBIDDEN,
            None,
            "this credential is a write key",
        ),
        case(
            "read without a token",
            Call::get("/v1/buckets/vip/members/u1", READ_TOKEN).authorization(None),
            S::UNAUTHORIZED,
            None,
            "missing credentials",
        ),
        case(
            "read with an unknown token",
            Call::get("/v1/buckets/vip", "nope"),
            S::UNAUTHORIZED,
            None,
            "unknown read token",
        ),
    ]
}

async fn rows_written(store: &Store) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM contacts) \
         + (SELECT count(*) FROM eval_queue) + (SELECT count(*) FROM ingested_messages)",
    )
    .fetch_one(store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn malformed_requests_get_precise_errors_and_write_nothing() {
    let database = fresh_database().await.unwrap();
    let app = app(&database.store);
    let cases = malformed_cases();
    assert!(cases.len() >= 30, "only {} cases", cases.len());
    for Case {
        name,
        call,
        status,
        pointer,
        message,
    } in cases
    {
        let (actual, challenge, body) = call.send(&app).await;
        assert_eq!(actual, status, "{name}: {body}");
        let error = &body["error"];
        let text = error["message"].as_str().unwrap_or_default();
        assert!(text.contains(message), "{name}: `{text}` lacks `{message}`");
        assert_eq!(
            error["pointer"].as_str(),
            pointer.as_deref(),
            "{name}: {body}"
        );
        assert_eq!(
            challenge.is_some(),
            status == StatusCode::UNAUTHORIZED,
            "{name}: WWW-Authenticate on 401 only"
        );
        assert_eq!(rows_written(&database.store).await, 0, "{name} wrote rows");
    }
}

async fn events(store: &Store) -> Vec<(String, DateTime<Utc>, Value)> {
    sqlx::query_as("SELECT name, occurred_at, properties FROM events ORDER BY id")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

async fn send_ok(app: &Router, call: Call) {
    let (status, _, body) = call.send(app).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"success": true}));
}

#[tokio::test]
async fn pages_and_screens_become_events_and_alias_and_group_are_ignored() {
    let database = fresh_database().await.unwrap();
    let app = app(&database.store);
    send_ok(
        &app,
        Call::post(
            "/v1/page",
            json!({"userId": "u1", "name": "Pricing", "category": "Docs", "properties": {"url": "/p"}}),
        ),
    )
    .await;
    send_ok(
        &app,
        Call::post(
            "/v1/batch",
            json!({"batch": [
                {"type": "screen", "anonymousId": "a1"},
                {"type": "alias", "userId": "u1", "previousId": "a1"},
                {"type": "group", "userId": "u1", "groupId": "g1"},
            ]}),
        ),
    )
    .await;
    let names: Vec<(String, Value)> = events(&database.store)
        .await
        .into_iter()
        .map(|(name, _, properties)| (name, properties))
        .collect();
    assert_eq!(
        names,
        vec![
            (
                "Viewed Docs Pricing Page".to_owned(),
                json!({"url": "/p", "name": "Pricing", "category": "Docs"})
            ),
            ("Loaded a Screen".to_owned(), json!({})),
        ]
    );
}

#[tokio::test]
async fn sent_at_corrects_the_device_clock() {
    let database = fresh_database().await.unwrap();
    let app = app(&database.store);
    // The device clock runs two hours fast; the event happened 30 s before it was sent.
    let skew = Duration::hours(2);
    let device_now = Utc::now() + skew;
    let device_event = device_now - Duration::seconds(30);
    let before = Utc::now();
    send_ok(
        &app,
        Call::post(
            "/v1/batch",
            json!({"sentAt": device_now.to_rfc3339(), "batch": [
                track(json!({"type": "track", "timestamp": device_event.to_rfc3339()})),
            ]}),
        ),
    )
    .await;
    // Without sentAt, a timestamp is taken as is (server-side libraries, imports).
    let historical: DateTime<Utc> = "2020-05-01T12:00:00Z".parse().unwrap();
    send_ok(
        &app,
        Call::post(
            "/v1/track",
            track(json!({"timestamp": historical.to_rfc3339()})),
        ),
    )
    .await;
    let after = Utc::now();
    let times: Vec<DateTime<Utc>> = events(&database.store)
        .await
        .into_iter()
        .map(|(_, time, _)| time)
        .collect();
    let expected_earliest = before - Duration::seconds(30);
    let expected_latest = after - Duration::seconds(30);
    assert!(
        times[0] >= expected_earliest - Duration::milliseconds(1)
            && times[0] <= expected_latest + Duration::milliseconds(1),
        "corrected time {} not within [{expected_earliest}, {expected_latest}]",
        times[0]
    );
    assert_eq!(times[1], historical);
}

#[tokio::test]
async fn a_duplicate_message_id_is_skipped_and_credentials_of_the_right_kind_pass() {
    let database = fresh_database().await.unwrap();
    let app = app(&database.store);
    let message = track(json!({"messageId": "m-1"}));
    send_ok(&app, Call::post("/v1/track", message.clone())).await;
    send_ok(
        &app,
        Call::post("/v1/t", message.clone()).authorization(Some(&basic(WRITE_KEY))),
    )
    .await;
    // analytics.js style: the write key in the body, sent as text/plain.
    let mut in_body = message;
    in_body["writeKey"] = json!(WRITE_KEY);
    send_ok(
        &app,
        Call::post("/v1/track", in_body)
            .authorization(None)
            .content_type("text/plain"),
    )
    .await;
    assert_eq!(events(&database.store).await.len(), 1);

    // The read token is accepted (not 401/403); the bucket does not exist.
    let (status, _, body) = Call::get("/v1/buckets/nope/members/u1", READ_TOKEN)
        .send(&app)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["message"], json!("no bucket `nope`"));
}
