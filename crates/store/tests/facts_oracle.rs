//! Fact gathering in SQL against the oracle: random users with random events and contact
//! properties go into a real database, and `Round::gather_facts` must return exactly what
//! `membrane_criteria::eval::gather_from_raw` computes from the same raw data, for every user
//! and every fact (random windows, random nested `.where` filters, timestamps).
//!
//! The default run checks `DEFAULT_CASES` random batches; run longer with e.g.
//! `PROPTEST_CASES=5000 cargo test -p membrane-store --test facts_oracle`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use membrane_abi::{CmpOp, EventFilter, Fact, FactValue, Literal, PropertyTest};
use membrane_criteria::eval::{gather_from_raw, RawEvent};
use membrane_store::{FactRequest, Store};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Value};

const DEFAULT_CASES: u32 = 2_000;
const EVENT_NAMES: [&str; 3] = ["a", "b", "c"];
/// Few keys, so that filters and properties often meet (one with a quote: keys are parameters).
const KEYS: [&str; 5] = ["k", "plan", "tags", "when", "it's"];
const WINDOWS_SECS: [u64; 4] = [1, 60, 3_600, 86_400];
/// 2025-06-01T00:00:00Z; each case's `now` lies within about 11 days after it.
const BASE_NOW_US: i64 = 1_748_736_000_000_000;

/// One user of a case: its contact row (if any) and its events.
#[derive(Debug, Clone)]
struct User {
    properties: Option<Map<String, Value>>,
    events: Vec<RawEvent>,
}

#[derive(Debug, Clone)]
struct Case {
    /// Microsecond precision, to check that the store truncates to the oracle's milliseconds.
    now: DateTime<Utc>,
    users: Vec<User>,
    facts: Vec<Fact>,
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "", "a", "ab", "abc", "B", "b", "é", "e\u{301}", "日本", "😀", "\u{FF61}", "%", "_",
            "a%", "a_b", "\\", "'", "\"", "null", "1", " ",
        ])
        .prop_map(str::to_owned),
        "[ab%_]{1,3}",
        // Any printable text (Postgres text cannot hold NUL, so JSON ingest never stores it).
        "\\PC{0,4}",
    ]
}

/// JSON numbers as ingest stores them: integers (also beyond 2^53 and u64) and finite floats.
fn number() -> impl Strategy<Value = Value> {
    let finite_float = prop::num::f64::POSITIVE
        | prop::num::f64::NEGATIVE
        | prop::num::f64::NORMAL
        | prop::num::f64::SUBNORMAL
        | prop::num::f64::ZERO;
    prop_oneof![
        (-3i64..=3).prop_map(Value::from),
        prop::sample::select(vec![9_007_199_254_740_993i64, i64::MIN, i64::MAX])
            .prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![
            0.5,
            -0.5,
            1.0,
            -0.0,
            0.1 + 0.2,
            1e16,
            1e300,
            -1e-300,
            5e-324
        ])
        .prop_map(Value::from),
        finite_float.prop_map(Value::from),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let scalar = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        string().prop_map(Value::String),
    ];
    scalar.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..3)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// RFC 3339 text, valid or not, for `PropertyTime` facts.
fn timestamp_text() -> impl Strategy<Value = Value> {
    let valid = (
        -2_000_000_000i64..4_000_000_000,
        prop::sample::select(vec!["", ".5", ".123", ".123456789"]),
        prop::sample::select(vec!["Z", "+00:00", "+05:30", "-08:00"]),
    )
        .prop_map(|(secs, fraction, offset)| {
            let at = DateTime::from_timestamp(secs, 0).unwrap_or_default();
            format!("{}{fraction}{offset}", at.format("%Y-%m-%dT%H:%M:%S"))
        });
    let invalid = prop::sample::select(vec![
        "2024-13-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-01-01",
        "2024-01-01T00:00:00",
        "yesterday",
        "",
    ])
    .prop_map(str::to_owned);
    prop_oneof![valid, invalid].prop_map(Value::String)
}

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned)
}

fn properties(value: impl Strategy<Value = Value>) -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(key(), value, 0..4)
        .prop_map(|entries| entries.into_iter().collect())
}

fn literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        string().prop_map(Literal::Str),
        number().prop_map(|n| Literal::Num(n.as_f64().unwrap_or(f64::NAN))),
        prop::sample::select(vec![f64::INFINITY, f64::NEG_INFINITY, f64::NAN])
            .prop_map(Literal::Num),
        any::<bool>().prop_map(Literal::Bool),
        Just(Literal::Null),
    ]
}

fn cmp() -> impl Strategy<Value = CmpOp> {
    prop::sample::select(CmpOp::ALL.to_vec())
}

fn property_test() -> impl Strategy<Value = PropertyTest> {
    prop_oneof![
        3 => (cmp(), literal()).prop_map(|(cmp, value)| PropertyTest::Compare { cmp, value }),
        1 => Just(PropertyTest::Exists),
        1 => Just(PropertyTest::NotExists),
        2 => string().prop_map(|value| PropertyTest::Contains { value }),
        2 => string().prop_map(|value| PropertyTest::StartsWith { value }),
        1 => prop::collection::vec(literal(), 0..4).prop_map(|values| PropertyTest::In { values }),
    ]
}

fn event_filter() -> impl Strategy<Value = EventFilter> {
    let test = (key(), property_test()).prop_map(|(key, test)| EventFilter::Test { key, test });
    test.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(|of| EventFilter::All { of }),
            prop::collection::vec(inner.clone(), 0..3).prop_map(|of| EventFilter::Any { of }),
            inner.prop_map(|filter| EventFilter::Not {
                filter: Box::new(filter)
            }),
        ]
    })
}

fn fact() -> impl Strategy<Value = Fact> {
    let event_count = (
        prop::sample::select(EVENT_NAMES.to_vec()),
        prop::option::of(prop::sample::select(WINDOWS_SECS.to_vec())),
        prop::option::weighted(0.7, event_filter()),
    )
        .prop_map(|(event, within_secs, filter)| Fact::EventCount {
            event: event.to_owned(),
            within_secs,
            filter,
        });
    prop_oneof![
        3 => event_count,
        1 => key().prop_map(|key| Fact::Property { key }),
        1 => key().prop_map(|key| Fact::PropertyTime { key }),
    ]
}

/// An event's offset from `now` in milliseconds: often exactly on (or 1 ms beside) a window's
/// edge, else anywhere from ten days back to a day ahead.
fn event_offset_ms() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => (
            prop::sample::select(WINDOWS_SECS.to_vec()),
            prop::sample::select(vec![-1i64, 0, 0, 1]),
        )
            .prop_map(|(window, nudge)| -(window as i64) * 1000 + nudge),
        1 => -10 * 86_400_000i64..86_400_000,
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let now_us = BASE_NOW_US..BASE_NOW_US + 1_000_000_000_000;
    let raw_event = (
        prop::sample::select(EVENT_NAMES.to_vec()),
        event_offset_ms(),
        properties(json()),
    );
    let user = (
        prop::option::weighted(0.8, properties(prop_oneof![json(), timestamp_text()])),
        prop::collection::vec(raw_event, 0..8),
    );
    (
        now_us,
        prop::collection::vec(user, 1..6),
        prop::collection::vec(fact(), 1..6),
    )
        .prop_map(|(now_us, users, facts)| {
            let now = DateTime::from_timestamp_micros(now_us).unwrap_or_default();
            let now_ms = now.timestamp_millis();
            let users = users
                .into_iter()
                .map(|(properties, events)| User {
                    properties,
                    events: events
                        .into_iter()
                        .map(|(name, offset_ms, properties)| RawEvent {
                            name: name.to_owned(),
                            occurred_at_ms: now_ms + offset_ms,
                            properties,
                        })
                        .collect(),
                })
                .collect();
            Case { now, users, facts }
        })
}

/// Writes a case's users under fresh ids (cases share one database) and returns the ids.
async fn insert(store: &Store, users: &[User]) -> Result<Vec<String>, sqlx::Error> {
    static NEXT_CASE: AtomicU64 = AtomicU64::new(0);
    let case = NEXT_CASE.fetch_add(1, Ordering::Relaxed);
    let ids: Vec<String> = (0..users.len())
        .map(|i| format!("case{case}-user{i}"))
        .collect();

    let (mut contact_ids, mut contact_properties) = (Vec::new(), Vec::new());
    let (mut event_users, mut names, mut times, mut event_properties) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, user) in ids.iter().zip(users) {
        if let Some(properties) = &user.properties {
            contact_ids.push(id.clone());
            contact_properties.push(Value::Object(properties.clone()));
        }
        for event in &user.events {
            event_users.push(id.clone());
            names.push(event.name.clone());
            times.push(
                DateTime::from_timestamp_millis(event.occurred_at_ms)
                    .expect("generated times are near now"),
            );
            event_properties.push(Value::Object(event.properties.clone()));
        }
    }
    sqlx::query(
        "INSERT INTO contacts (user_id, properties) SELECT * FROM unnest($1::text[], $2::jsonb[])",
    )
    .bind(&contact_ids)
    .bind(&contact_properties)
    .execute(store.pool())
    .await?;
    sqlx::query(
        "INSERT INTO events (user_id, name, occurred_at, properties) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::jsonb[])",
    )
    .bind(&event_users)
    .bind(&names)
    .bind(&times)
    .bind(&event_properties)
    .execute(store.pool())
    .await?;
    Ok(ids)
}

/// ABI-level equality: array elements are laid out as f64 like top-level numbers (so JSON
/// `1e16` and `10000000000000000`, how Postgres prints it back, are the same value), and nested
/// arrays and objects as their tag alone.
fn abi_view(value: &FactValue) -> FactValue {
    fn element(item: &Value) -> Value {
        match item {
            Value::Number(n) => n.as_f64().map_or(Value::Null, Value::from),
            Value::Array(_) => Value::Array(Vec::new()),
            Value::Object(_) => Value::Object(Map::new()),
            scalar => scalar.clone(),
        }
    }
    match value {
        FactValue::Array(items) => FactValue::Array(items.iter().map(element).collect()),
        other => other.clone(),
    }
}

async fn check(store: &Store, case: &Case) -> Result<(), TestCaseError> {
    let ids = insert(store, &case.users)
        .await
        .map_err(|error| TestCaseError::fail(format!("insert: {error}")))?;
    let mut round = store
        .begin_round()
        .await
        .map_err(|error| TestCaseError::fail(format!("begin: {error}")))?;
    // Two batches in one call, as a round gathers for several buckets: the even users with
    // the case's facts, probed, and the odd ones with the same facts in reverse order, read as
    // a page (their span holds the even users' events too).
    let (even, odd) = common::alternate(&ids);
    let half = even.len();
    let reversed: Vec<Fact> = case.facts.iter().rev().cloned().collect();
    let requests = [
        FactRequest {
            users: &even,
            facts: &case.facts,
            page: false,
        },
        FactRequest {
            users: &odd,
            facts: &reversed,
            page: true,
        },
    ];
    let batches = round
        .gather_facts_for(&requests, case.now)
        .await
        .map_err(|error| TestCaseError::fail(format!("gather_facts_for: {error}")))?;
    prop_assert_eq!(batches.len(), 2);
    prop_assert_eq!(batches[0].users(), half);
    prop_assert_eq!(batches[1].users(), case.users.len() - half);
    let gathered: Vec<Vec<FactValue>> = common::interleave(
        batches[0].rows(),
        batches[1]
            .rows()
            .into_iter()
            .map(|mut row| {
                row.reverse();
                row
            })
            .collect(),
    );

    let now_ms = case.now.timestamp_millis();
    let no_properties = Map::new();
    for ((user, id), row) in case.users.iter().zip(&ids).zip(&gathered) {
        let properties = user.properties.as_ref().unwrap_or(&no_properties);
        let expected = gather_from_raw(&case.facts, &user.events, properties, now_ms);
        for ((fact, want), got) in case.facts.iter().zip(&expected).zip(row) {
            prop_assert_eq!(
                abi_view(got),
                abi_view(want),
                "user {} fact {:?}\nproperties {:?}\nevents {:#?}",
                id,
                fact,
                properties,
                user.events
            );
        }
    }
    Ok(())
}

#[test]
fn gathered_facts_equal_the_oracle() {
    common::check_cases(DEFAULT_CASES, case(), |store, case| async move {
        check(&store, &case).await
    });
}

/// The filter of the hand-checked tests: events on a plan starting with "p" (the "pro" ones).
fn plan_starts_with_p() -> EventFilter {
    EventFilter::Test {
        key: "plan".into(),
        test: PropertyTest::StartsWith { value: "p".into() },
    }
}

/// A hand-checked batch: window edges at millisecond precision with a sub-millisecond `now`,
/// a filter and its negation, and a user without events who must get zeros.
#[test]
fn counts_are_per_user_and_per_fact() {
    common::in_fresh_database(|store| async move {
        let now = DateTime::from_timestamp_micros(BASE_NOW_US + 999).expect("valid instant");
        let event = |offset_ms: i64, plan: &str| RawEvent {
            name: "a".into(),
            occurred_at_ms: now.timestamp_millis() + offset_ms,
            properties: [("plan".to_owned(), Value::from(plan))]
                .into_iter()
                .collect(),
        };
        let users = vec![
            User {
                properties: None,
                events: vec![event(-1000, "pro"), event(-1001, "pro"), event(0, "basic")],
            },
            User {
                properties: Some(Map::new()),
                events: vec![],
            },
        ];
        let facts = vec![
            Fact::EventCount {
                event: "a".into(),
                within_secs: Some(1),
                filter: Some(plan_starts_with_p()),
            },
            Fact::EventCount {
                event: "a".into(),
                within_secs: None,
                filter: Some(EventFilter::Not {
                    filter: Box::new(plan_starts_with_p()),
                }),
            },
            Fact::EventCount {
                event: "a".into(),
                within_secs: None,
                filter: None,
            },
        ];
        let case = Case { now, users, facts };
        check(&store, &case).await.expect("oracle agrees");

        let ids = insert(&store, &case.users).await.expect("insert");
        let mut round = store.begin_round().await.expect("round");
        let gathered = round
            .gather_facts(&ids, &case.facts, now)
            .await
            .expect("gather");
        assert_eq!(
            gathered.rows(),
            vec![
                vec![
                    FactValue::Count(1),
                    FactValue::Count(1),
                    FactValue::Count(3)
                ],
                vec![
                    FactValue::Count(0),
                    FactValue::Count(0),
                    FactValue::Count(0)
                ],
            ]
        );
    });
}

/// Span reads that stop at their cap (8 entries per user of the page): the odd users (a page
/// of three, so 24 entries) sit among even users with many events, so one read stops inside a
/// page user's events and another inside a user outside the page, and a filtered count is
/// read from the span too. Users before the stop come from the span, the rest from probes.
#[test]
fn span_reads_that_stop_at_their_cap_fall_back_to_probes() {
    common::in_fresh_database(|store| async move {
        let now = DateTime::from_timestamp_micros(BASE_NOW_US).expect("valid instant");
        let now_ms = now.timestamp_millis();
        // `count` events named `name`, one a minute back from now, every other one on "pro".
        let events = |name: &str, count: i64| -> Vec<RawEvent> {
            (0..count)
                .map(|n| RawEvent {
                    name: name.into(),
                    occurred_at_ms: now_ms - n * 60_000,
                    properties: [(
                        "plan".to_owned(),
                        Value::from(["pro", "free"][n as usize % 2]),
                    )]
                    .into_iter()
                    .collect(),
                })
                .collect()
        };
        let user = |events: Vec<RawEvent>| User {
            properties: None,
            events,
        };
        let users = vec![
            user(events("a", 1)),
            user(events("a", 3)),
            user([events("a", 20), events("b", 30)].concat()),
            user([events("a", 30), events("b", 2)].concat()),
            user(events("b", 1)),
            user(events("a", 2)),
        ];
        let facts = vec![
            Fact::EventCount {
                event: "a".into(),
                within_secs: Some(3600),
                filter: None,
            },
            Fact::EventCount {
                event: "b".into(),
                within_secs: None,
                filter: Some(plan_starts_with_p()),
            },
            Fact::EventCount {
                event: "a".into(),
                within_secs: Some(600),
                filter: None,
            },
        ];
        let case = Case { now, users, facts };
        check(&store, &case).await.expect("oracle agrees");
    });
}
