//! The pages of a sweep against an oracle: random contacts, events, memberships and max_dwell
//! leaves go into a real database, and walking `Store::sweep_page` page by page must yield
//! exactly, in user order, the bucket's active members and the users meeting every clause
//! (enough events of a name in it, in its window when it has one, or a property key in it),
//! less those the clock must not re-admit.
//!
//! The default run checks `DEFAULT_CASES` random worlds; run longer with e.g.
//! `PROPTEST_CASES=2000 cargo test -p membrane-store --test sweep_pages`.

mod common;

use std::collections::BTreeSet;

use chrono::Utc;
use membrane_store::{CandidateClause, EventRequirement, Store};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Value};

const DEFAULT_CASES: u32 = 150;
const BUCKET: &str = "b";
const NAMES: [&str; 3] = ["a", "b", "c"];
const KEYS: [&str; 2] = ["k", "it's"];
/// How long ago events occurred, in hours, and the window of windowed requirements: some
/// events fall inside it, some outside.
const AGES_HOURS: [i32; 3] = [1, 24, 72];
const WINDOW_SECS: u64 = 2 * 86_400;

#[derive(Debug, Clone)]
struct User {
    keys: Vec<&'static str>,
    /// Names, and how many hours ago each occurred.
    events: Vec<(&'static str, i32)>,
    member: bool,
    /// Left by max_dwell as their last membership; `true` when something arrived since (an
    /// event received or a property changed after the leave).
    max_dwell_left: Option<bool>,
}

#[derive(Debug, Clone)]
struct Case {
    users: Vec<User>,
    clauses: Vec<CandidateClause>,
    page_size: i64,
}

fn some_of<T: Clone + std::fmt::Debug>(items: &'static [T]) -> impl Strategy<Value = Vec<T>> {
    prop::sample::subsequence(items, 0..=items.len())
}

fn user() -> impl Strategy<Value = User> {
    (
        some_of(&KEYS),
        prop::collection::vec(
            (
                prop::sample::select(&NAMES[..]),
                prop::sample::select(&AGES_HOURS[..]),
            ),
            0..5,
        ),
        any::<bool>(),
        prop::option::weighted(0.2, any::<bool>()),
    )
        .prop_map(|(keys, events, member, max_dwell_left)| User {
            keys,
            events,
            // A max_dwell leave was their last membership: they are not a member now.
            member: member && max_dwell_left.is_none(),
            max_dwell_left,
        })
}

fn requirement() -> impl Strategy<Value = EventRequirement> {
    (
        prop::sample::select(&NAMES[..]),
        prop::option::of(Just(WINDOW_SECS)),
        1_i64..=2,
    )
        .prop_map(|(name, within_secs, at_least)| EventRequirement {
            name: name.to_owned(),
            within_secs,
            at_least,
        })
}

fn clause() -> impl Strategy<Value = CandidateClause> {
    (prop::collection::vec(requirement(), 0..3), some_of(&KEYS)).prop_map(|(events, keys)| {
        CandidateClause {
            events,
            keys: keys.into_iter().map(str::to_owned).collect(),
        }
    })
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(user(), 0..30),
        prop::collection::vec(clause(), 0..3),
        1_i64..8,
    )
        .prop_map(|(users, clauses, page_size)| Case {
            users,
            clauses,
            page_size,
        })
}

fn user_id(index: usize) -> String {
    format!("u{index:02}")
}

async fn insert(store: &Store, users: &[User]) -> Result<(), sqlx::Error> {
    let pool = store.pool();
    sqlx::query("TRUNCATE contacts, events, memberships, transitions CASCADE")
        .execute(pool)
        .await?;
    for (index, user) in users.iter().enumerate() {
        let id = user_id(index);
        let properties: Map<String, Value> = user
            .keys
            .iter()
            .map(|key| ((*key).to_owned(), Value::from(1)))
            .collect();
        // Everything arrived a day ago (events occurred at their ages), unless it arrived
        // after a max_dwell leave.
        sqlx::query(
            "INSERT INTO contacts (user_id, properties, updated_at) \
             VALUES ($1, $2, now() - interval '1 day')",
        )
        .bind(&id)
        .bind(Value::Object(properties))
        .execute(pool)
        .await?;
        for (name, age_hours) in &user.events {
            sqlx::query(
                "INSERT INTO events (user_id, name, occurred_at, received_at) \
                 VALUES ($1, $2, now() - make_interval(hours => $3), now() - interval '1 day')",
            )
            .bind(&id)
            .bind(name)
            .bind(age_hours)
            .execute(pool)
            .await?;
        }
        if user.member {
            sqlx::query(
                "INSERT INTO memberships (bucket_id, user_id, epoch, status, entered_at) \
                 VALUES ($1, $2, 1, 'active', now())",
            )
            .bind(BUCKET)
            .bind(&id)
            .execute(pool)
            .await?;
        }
        if let Some(arrived_since) = user.max_dwell_left {
            sqlx::query(
                "INSERT INTO memberships (bucket_id, user_id, epoch, status, entered_at, left_at) \
                 VALUES ($1, $2, 1, 'left', now() - interval '3 hours', now() - interval '2 hours')",
            )
            .bind(BUCKET)
            .bind(&id)
            .execute(pool)
            .await?;
            sqlx::query(
                "INSERT INTO transitions \
                     (key, bucket_id, user_id, kind, epoch, source, reason, occurred_at, created_at) \
                 VALUES ('bucket:' || $1 || ':' || $2 || ':left:1', $1, $2, 'left', 1, 'timer', \
                         'max_dwell', now() - interval '2 hours', now() - interval '2 hours')",
            )
            .bind(BUCKET)
            .bind(&id)
            .execute(pool)
            .await?;
            if arrived_since {
                // An event received since, or else a property change.
                let arrival = if user.events.is_empty() || index % 2 == 0 {
                    "UPDATE contacts SET updated_at = now() WHERE user_id = $1"
                } else {
                    "UPDATE events SET received_at = now() WHERE user_id = $1"
                };
                sqlx::query(arrival).bind(&id).execute(pool).await?;
            }
        }
    }
    Ok(())
}

/// What the pages must hold, from the case alone.
fn expected(case: &Case) -> Vec<String> {
    let meets = |user: &User, requirement: &EventRequirement| {
        let counted = user.events.iter().filter(|(name, age_hours)| {
            *name == requirement.name
                && requirement
                    .within_secs
                    .is_none_or(|window| (*age_hours as u64) * 3600 <= window)
        });
        counted.count() as i64 >= requirement.at_least
    };
    let holds = |user: &User, clause: &CandidateClause| {
        clause
            .events
            .iter()
            .any(|requirement| meets(user, requirement))
            || user
                .keys
                .iter()
                .any(|key| clause.keys.iter().any(|k| k == key))
    };
    let mut users = BTreeSet::new();
    for (index, user) in case.users.iter().enumerate() {
        let candidate = case.clauses.iter().all(|clause| holds(user, clause))
            && user.max_dwell_left != Some(false);
        if user.member || candidate {
            users.insert(user_id(index));
        }
    }
    users.into_iter().collect()
}

async fn check(store: &Store, case: &Case) -> Result<(), TestCaseError> {
    let fail =
        |what: &str, error: &dyn std::fmt::Display| TestCaseError::fail(format!("{what}: {error}"));
    insert(store, &case.users)
        .await
        .map_err(|error| fail("insert", &error))?;
    let mut walked: Vec<String> = Vec::new();
    let mut after = Some(String::new());
    while let Some(cursor) = after {
        let page = store
            .sweep_page(BUCKET, &case.clauses, &cursor, case.page_size, Utc::now())
            .await
            .map_err(|error| fail("sweep_page", &error))?;
        prop_assert!(page.users.len() as i64 <= case.page_size);
        // Pages follow each other in user order, each after its cursor.
        prop_assert!(page.users.iter().all(|user| *user > cursor));
        if let Some(next) = &page.next {
            prop_assert!(
                next > &cursor,
                "the cursor must advance: {} then {}",
                cursor,
                next
            );
        }
        walked.extend(page.users);
        after = page.next;
    }
    prop_assert_eq!(walked, expected(case), "clauses {:?}", case.clauses);
    Ok(())
}

#[test]
fn sweep_pages_hold_members_and_exactly_the_candidates() {
    common::check_cases(DEFAULT_CASES, case(), |store, case| async move {
        check(&store, &case).await
    });
}
