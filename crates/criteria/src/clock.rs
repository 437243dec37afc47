//! When a user's membership can next flip with no new event: the instant the engine arms a
//! durable timer for.
//!
//! Only two kinds of fact move with time. A windowed event count drops as each counted event
//! ages out of its window, and a `now()` comparison against a timestamp property flips as `now`
//! passes the timestamp. Every other fact is constant until a new event or property change
//! arrives, and those re-evaluate the user anyway. So the criteria value is piecewise constant
//! in time, with breakpoints only at finitely many *candidate* instants computed here;
//! [`next_change_at`] evaluates the reference evaluator at each candidate in order and returns
//! the first one where the value differs from the value now.

use crate::eval::{evaluate, filter_holds, gather_from_raw, RawEvent};
use crate::plan::{Node, Plan};
use membrane_abi::{Fact, FactValue};
use serde_json::{Map, Value};

/// A user's facts at an instant `now`, plus what is needed to know them at any later instant
/// without new events.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedFacts {
    /// The facts at `now`, in `plan.facts` order (what [`evaluate`] takes).
    pub values: Vec<FactValue>,
    /// Per fact, in `plan.facts` order: for a windowed [`Fact::EventCount`], the occurrence
    /// instants (Unix ms, any order) of the matching events counted in `values` at `now`, that
    /// is those with `occurred_at >= now - within`; empty for every other fact. Only these can
    /// age out, and each one is counted in `values`.
    pub window_events: Vec<Vec<i64>>,
}

/// Gathers [`TimedFacts`] from a user's raw events and merged properties at `now_ms`: the
/// oracle for what the store gathers for the clock. `values` are exactly
/// [`gather_from_raw`]'s.
pub fn timed_facts_from_raw(
    facts: &[Fact],
    events: &[RawEvent],
    properties: &Map<String, Value>,
    now_ms: i64,
) -> TimedFacts {
    let window_events = facts
        .iter()
        .map(|fact| match fact {
            Fact::EventCount {
                event,
                within_secs: Some(within_secs),
                filter,
            } => events
                .iter()
                .filter(|e| &e.name == event)
                .filter(|e| in_window(e.occurred_at_ms, *within_secs, now_ms))
                .filter(|e| {
                    filter
                        .as_ref()
                        .is_none_or(|f| filter_holds(f, &e.properties))
                })
                .map(|e| e.occurred_at_ms)
                .collect(),
            _ => Vec::new(),
        })
        .collect();
    TimedFacts {
        values: gather_from_raw(facts, events, properties, now_ms),
        window_events,
    }
}

/// The facts at `t_ms >= now_ms` of a user whose facts at `now_ms` are `timed`, if no event or
/// property change arrives in between: each window count drops by the events that have left
/// their window by `t_ms`; every other value is unchanged (a timestamp property's *value* is
/// constant; only its comparison with `now()` moves, inside [`evaluate`]).
pub fn facts_at(facts: &[Fact], timed: &TimedFacts, now_ms: i64, t_ms: i64) -> Vec<FactValue> {
    let mut values = timed.values.clone();
    for departure in departures(facts, timed, now_ms) {
        if departure.at_ms <= t_ms {
            count_one_departure(&mut values[departure.fact]);
        }
    }
    values
}

/// The earliest instant `t > now_ms` (Unix ms) at which the criteria value of a user whose facts
/// at `now_ms` are `timed` differs from its value at `now_ms`, assuming no new event or property
/// change; `None` when it never changes within the `i64` millisecond range.
///
/// Exact: the value is constant on `[now_ms, t)` and differs at `t`, where the value at an
/// instant `s` is `evaluate(plan, &facts_at(&plan.facts, timed, now_ms, s), s)`.
pub fn next_change_at(plan: &Plan, timed: &TimedFacts, now_ms: i64) -> Option<i64> {
    let value_now = evaluate(plan, &timed.values, now_ms);

    let mut departures = departures(&plan.facts, timed, now_ms);
    departures.sort_unstable_by_key(|departure| departure.at_ms);

    let mut candidates: Vec<i64> = departures.iter().map(|d| d.at_ms).collect();
    let mut timestamp_flips = Vec::new();
    collect_timestamp_flips(&plan.root, &timed.values, &mut timestamp_flips);
    candidates.extend(
        timestamp_flips
            .into_iter()
            .filter_map(|flip| i64::try_from(flip).ok())
            .filter(|&flip| flip > now_ms),
    );
    candidates.sort_unstable();
    candidates.dedup();

    // Sweep the candidates in time order, applying departures as they come due, so each
    // evaluation costs one plan walk rather than a recount of every window.
    let mut values = timed.values.clone();
    let mut departed = departures.iter().peekable();
    for candidate in candidates {
        while let Some(departure) = departed.next_if(|d| d.at_ms <= candidate) {
            count_one_departure(&mut values[departure.fact]);
        }
        if evaluate(plan, &values, candidate) != value_now {
            return Some(candidate);
        }
    }
    None
}

/// One counted event leaving its window.
#[derive(Debug, Clone, Copy)]
struct Departure {
    /// The first instant at which the event is no longer counted.
    at_ms: i64,
    /// Index of its window fact.
    fact: usize,
}

/// The departures after `now_ms` of every event in `timed.window_events`. Occurrences already
/// outside their window at `now_ms` are not in the counts, so they are skipped rather than
/// subtracted again; departures beyond `i64::MAX` never happen.
fn departures(facts: &[Fact], timed: &TimedFacts, now_ms: i64) -> Vec<Departure> {
    facts
        .iter()
        .zip(&timed.window_events)
        .enumerate()
        .filter_map(|(fact, (declared, occurrences))| match declared {
            Fact::EventCount {
                within_secs: Some(within_secs),
                ..
            } => Some(occurrences.iter().filter_map(move |&occurred_ms| {
                let at_ms = i64::try_from(departure_ms(occurred_ms, *within_secs)).ok()?;
                (at_ms > now_ms).then_some(Departure { at_ms, fact })
            })),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Whether an event that occurred at `occurred_ms` is counted by a `within_secs` window at
/// `at_ms`: `occurred >= at - within` (no upper bound, so future-dated events count). Computed
/// in `i128` so no window or instant can overflow.
fn in_window(occurred_ms: i64, within_secs: u64, at_ms: i64) -> bool {
    i128::from(occurred_ms) >= i128::from(at_ms) - window_ms(within_secs)
}

/// The first instant at which [`in_window`] is false: `occurred + within + 1 ms`. May exceed
/// `i64::MAX`, in which case the event never leaves.
fn departure_ms(occurred_ms: i64, within_secs: u64) -> i128 {
    i128::from(occurred_ms) + window_ms(within_secs) + 1
}

fn window_ms(within_secs: u64) -> i128 {
    i128::from(within_secs) * 1000
}

fn count_one_departure(value: &mut FactValue) {
    if let FactValue::Count(count) = value {
        // `timed` promises each departing event is counted; saturate rather than trust it.
        *count = count.saturating_sub(1).max(0);
    }
}

/// For every `now()` comparison on a timestamp that parsed, the instants at which
/// `timestamp cmp (t + offset)` can change as `t` grows, in `i128` (they may lie outside the
/// `i64` range, and then never come).
///
/// The evaluator compares with `t.saturating_add(offset_ms)`, which is non-decreasing in `t`,
/// so the ordering moves Greater → Equal → Less exactly when that sum first reaches `timestamp`
/// and when it first exceeds it. For a target `x > i64::MIN`, saturation cannot make the
/// sum reach `x` early (it clamps to `i64::MIN` below and to `i64::MAX >= x` only above), so
/// the first such `t` is `x - offset_ms` exactly. The two targets are `timestamp` and
/// `timestamp + 1`; when a target is `i64::MIN` (already reached at every `t`) or
/// `i64::MAX + 1` (never reached), its candidate is merely a harmless extra evaluation.
fn collect_timestamp_flips(node: &Node, values: &[FactValue], flips: &mut Vec<i128>) {
    match node {
        Node::And(items) | Node::Or(items) => {
            for item in items {
                collect_timestamp_flips(item, values, flips);
            }
        }
        Node::Not(inner) => collect_timestamp_flips(inner, values, flips),
        Node::PropNow {
            fact, offset_secs, ..
        } => {
            if let FactValue::Timestamp(timestamp_ms) = values[*fact] {
                // Must mirror the evaluator's own offset arithmetic.
                let offset_ms = i128::from(offset_secs.saturating_mul(1000));
                let reaches = i128::from(timestamp_ms) - offset_ms;
                flips.extend([reaches, reaches + 1]);
            }
        }
        Node::Count { .. } | Node::Prop { .. } => {}
    }
}
