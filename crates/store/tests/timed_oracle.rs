//! What the store gathers for the clock against the oracle: random users with random events go
//! into a real database, and `Round::gather_window_events` must return, for every user and
//! every windowed count, exactly the event instants that
//! `membrane_criteria::clock::timed_facts_from_raw` lists (as multisets), and nothing for
//! other facts. Events sit on and beside window edges, at sub-millisecond precision (the
//! oracle reads instants rounded down to the millisecond), and `.where` filters apply.
//!
//! Run longer with e.g. `PROPTEST_CASES=5000 cargo test -p membrane-store --test timed_oracle`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use membrane_abi::{CmpOp, EventFilter, Fact, Literal, PropertyTest};
use membrane_criteria::clock::timed_facts_from_raw;
use membrane_criteria::eval::RawEvent;
use membrane_store::{FactRequest, Store};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Value};

const DEFAULT_CASES: u32 = 500;
const EVENT_NAMES: [&str; 2] = ["a", "b"];
const PLANS: [&str; 3] = ["pro", "basic", "probe"];
const WINDOWS_SECS: [u64; 3] = [1, 60, 86_400];
/// 2025-06-01T00:00:00Z; each case's `now` lies within about 11 days after it.
const BASE_NOW_US: i64 = 1_748_736_000_000_000;

/// One stored event: the oracle's view plus the microseconds below its millisecond.
#[derive(Debug, Clone)]
struct Event {
    raw: RawEvent,
    sub_ms_us: i64,
}

#[derive(Debug, Clone)]
struct Case {
    now: DateTime<Utc>,
    users: Vec<Vec<Event>>,
    facts: Vec<Fact>,
}

fn filter() -> impl Strategy<Value = EventFilter> {
    let test = prop_oneof![
        prop::sample::select(PLANS.to_vec()).prop_map(|plan| PropertyTest::Compare {
            cmp: CmpOp::Eq,
            value: Literal::Str(plan.to_owned()),
        }),
        Just(PropertyTest::StartsWith {
            value: "pro".to_owned()
        }),
        Just(PropertyTest::Exists),
    ]
    .prop_map(|test| EventFilter::Test {
        key: "plan".to_owned(),
        test,
    });
    prop_oneof![
        2 => test.clone(),
        1 => test.prop_map(|filter| EventFilter::Not { filter: Box::new(filter) }),
    ]
}

fn fact() -> impl Strategy<Value = Fact> {
    let count = (
        prop::sample::select(EVENT_NAMES.to_vec()),
        prop::option::weighted(0.8, prop::sample::select(WINDOWS_SECS.to_vec())),
        prop::option::weighted(0.5, filter()),
    )
        .prop_map(|(event, within_secs, filter)| Fact::EventCount {
            event: event.to_owned(),
            within_secs,
            filter,
        });
    prop_oneof![
        4 => count,
        1 => Just(Fact::Property { key: "plan".to_owned() }),
    ]
}

/// Offsets from `now` in ms: on a window's edge or 1 ms beside it, else anywhere from two days
/// back to an hour ahead (future events count in every window).
fn offset_ms() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => (
            prop::sample::select(WINDOWS_SECS.to_vec()),
            prop::sample::select(vec![-1i64, 0, 1]),
        )
            .prop_map(|(window, nudge)| -(window as i64) * 1000 + nudge),
        1 => -2 * 86_400_000i64..3_600_000,
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let event = (
        prop::sample::select(EVENT_NAMES.to_vec()),
        offset_ms(),
        0i64..1000,
        prop::option::of(prop::sample::select(PLANS.to_vec())),
    );
    (
        BASE_NOW_US..BASE_NOW_US + 1_000_000_000_000,
        prop::collection::vec(prop::collection::vec(event, 0..10), 1..5),
        prop::collection::vec(fact(), 1..5),
    )
        .prop_map(|(now_us, users, facts)| {
            let now = DateTime::from_timestamp_micros(now_us).unwrap_or_default();
            let now_ms = now.timestamp_millis();
            let users = users
                .into_iter()
                .map(|events| {
                    events
                        .into_iter()
                        .map(|(name, offset_ms, sub_ms_us, plan)| Event {
                            raw: RawEvent {
                                name: name.to_owned(),
                                occurred_at_ms: now_ms + offset_ms,
                                properties: plan
                                    .map(|plan| ("plan".to_owned(), Value::from(plan)))
                                    .into_iter()
                                    .collect(),
                            },
                            sub_ms_us,
                        })
                        .collect()
                })
                .collect();
            Case { now, users, facts }
        })
}

/// Writes a case's users under fresh ids (cases share one database) and returns the ids.
async fn insert(store: &Store, users: &[Vec<Event>]) -> Result<Vec<String>, sqlx::Error> {
    static NEXT_CASE: AtomicU64 = AtomicU64::new(0);
    let case = NEXT_CASE.fetch_add(1, Ordering::Relaxed);
    let ids: Vec<String> = (0..users.len())
        .map(|i| format!("case{case}-user{i}"))
        .collect();
    let (mut event_users, mut names, mut times, mut properties) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, events) in ids.iter().zip(users) {
        for event in events {
            event_users.push(id.clone());
            names.push(event.raw.name.clone());
            times.push(
                DateTime::from_timestamp_micros(event.raw.occurred_at_ms * 1000 + event.sub_ms_us)
                    .expect("generated times are near now"),
            );
            properties.push(Value::Object(event.raw.properties.clone()));
        }
    }
    sqlx::query(
        "INSERT INTO events (user_id, name, occurred_at, properties) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::jsonb[])",
    )
    .bind(&event_users)
    .bind(&names)
    .bind(&times)
    .bind(&properties)
    .execute(store.pool())
    .await?;
    Ok(ids)
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
    let mut batches = round
        .gather_window_events_for(&requests, case.now)
        .await
        .map_err(|error| TestCaseError::fail(format!("gather_window_events_for: {error}")))?;
    prop_assert_eq!(batches.len(), 2);
    let second = batches.pop().unwrap_or_default();
    let first = batches.pop().unwrap_or_default();
    prop_assert_eq!(first.len(), half);
    let gathered: Vec<Vec<Vec<i64>>> = common::interleave(
        first,
        second
            .into_iter()
            .map(|mut row| {
                row.reverse();
                row
            })
            .collect(),
    );
    prop_assert_eq!(gathered.len(), case.users.len());
    let now_ms = case.now.timestamp_millis();
    for ((events, id), row) in case.users.iter().zip(&ids).zip(gathered) {
        let raw: Vec<RawEvent> = events.iter().map(|event| event.raw.clone()).collect();
        let expected = timed_facts_from_raw(&case.facts, &raw, &Map::new(), now_ms).window_events;
        prop_assert_eq!(row.len(), case.facts.len());
        for ((fact, mut want), mut got) in case.facts.iter().zip(expected).zip(row) {
            want.sort_unstable();
            got.sort_unstable();
            prop_assert_eq!(
                got,
                want,
                "user {} fact {:?}\nevents {:#?}",
                id,
                fact,
                events
            );
        }
    }
    Ok(())
}

#[test]
fn window_events_equal_the_oracle() {
    common::check_cases(DEFAULT_CASES, case(), |store, case| async move {
        check(&store, &case).await
    });
}

/// A hand-checked batch: the edge of a 1 s window at sub-millisecond `now`, a filter, an
/// unwindowed count (never listed) and a user without events.
#[test]
fn window_edges_are_exact() {
    common::in_fresh_database(|store| async move {
        let now = DateTime::from_timestamp_micros(BASE_NOW_US + 999).expect("valid instant");
        let now_ms = now.timestamp_millis();
        let event = |offset_ms: i64, plan: &str| Event {
            raw: RawEvent {
                name: "a".into(),
                occurred_at_ms: now_ms + offset_ms,
                properties: [("plan".to_owned(), Value::from(plan))]
                    .into_iter()
                    .collect(),
            },
            sub_ms_us: 999,
        };
        let users = vec![
            vec![event(-1000, "pro"), event(-1001, "pro"), event(0, "basic")],
            vec![],
        ];
        let facts = vec![
            Fact::EventCount {
                event: "a".into(),
                within_secs: Some(1),
                filter: None,
            },
            Fact::EventCount {
                event: "a".into(),
                within_secs: Some(1),
                filter: Some(EventFilter::Test {
                    key: "plan".into(),
                    test: PropertyTest::StartsWith { value: "p".into() },
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
        let mut gathered = round
            .gather_window_events(&ids, &case.facts, now)
            .await
            .expect("gather");
        gathered[0][0].sort_unstable();
        assert_eq!(
            gathered,
            vec![
                vec![vec![now_ms - 1000, now_ms], vec![now_ms - 1000], vec![]],
                vec![vec![], vec![], vec![]],
            ]
        );
    });
}

/// Span reads that stop at their cap (8 entries per user of the page): the odd users (a page
/// of three, so 24 entries) sit among even users with many events, so one read stops inside a
/// page user's events and another inside a user outside the page. Users before the stop come
/// from the span, the rest from probes, and all agree with the oracle.
#[test]
fn span_reads_that_stop_at_their_cap_fall_back_to_probes() {
    common::in_fresh_database(|store| async move {
        let now = DateTime::from_timestamp_micros(BASE_NOW_US + 999).expect("valid instant");
        let now_ms = now.timestamp_millis();
        // `count` events named `name`, one a minute back from now.
        let events = |name: &str, count: i64| -> Vec<Event> {
            (0..count)
                .map(|n| Event {
                    raw: RawEvent {
                        name: name.into(),
                        occurred_at_ms: now_ms - n * 60_000,
                        properties: Map::new(),
                    },
                    sub_ms_us: 0,
                })
                .collect()
        };
        let users = vec![
            events("a", 1),
            events("a", 3),                              // page: counted from the span
            [events("a", 20), events("b", 30)].concat(), // outside the page
            [events("a", 30), events("b", 2)].concat(),  // page: "a" stops inside it
            events("b", 1),
            events("a", 2), // page: probed for "a"
        ];
        let facts = vec![
            Fact::EventCount {
                event: "a".into(),
                within_secs: Some(3600),
                filter: None,
            },
            // Stops at the third user's 24th "b" (the page's span starts at the second).
            Fact::EventCount {
                event: "b".into(),
                within_secs: Some(600),
                filter: None,
            },
        ];
        let case = Case { now, users, facts };
        check(&store, &case).await.expect("oracle agrees");
    });
}
