//! `next_change_at` must be exact: the criteria value is constant from `now` up to the instant
//! it returns and differs there, and when it returns `None` the value never changes. Checked by
//! hand on the typical time-based criteria, then against brute-force evaluation of the
//! reference evaluator on random plans, users and instants (including the `i64` extremes).

use membrane_abi::{parse_timestamp_ms, EventFilter, Fact, FactValue, PropertyTest};
use membrane_criteria::ast::{CmpOp, Literal};
use membrane_criteria::clock::{facts_at, next_change_at, timed_facts_from_raw, TimedFacts};
use membrane_criteria::eval::{evaluate, gather_from_raw, RawEvent};
use membrane_criteria::plan::{Node, Plan};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const NOW_MS: i64 = 1_700_000_000_000;
const SECOND_MS: i64 = 1000;
const DAY_SECS: i64 = 86_400;
const DAY_MS: i64 = DAY_SECS * SECOND_MS;

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

fn window(event: &str, within_secs: u64) -> Fact {
    Fact::EventCount {
        event: event.into(),
        within_secs: Some(within_secs),
        filter: None,
    }
}

fn all_time(event: &str) -> Fact {
    Fact::EventCount {
        event: event.into(),
        within_secs: None,
        filter: None,
    }
}

fn time_property(key: &str) -> Fact {
    Fact::PropertyTime { key: key.into() }
}

/// Only events whose property `ok` is `true`: `.where(prop("ok") == true)`.
fn ok_filter() -> EventFilter {
    EventFilter::Test {
        key: "ok".into(),
        test: PropertyTest::Compare {
            cmp: CmpOp::Eq,
            value: Literal::Bool(true),
        },
    }
}

fn count(fact: usize, op: CmpOp, value: i64) -> Node {
    Node::Count { fact, op, value }
}

fn exists(fact: usize) -> Node {
    count(fact, CmpOp::Gt, 0)
}

fn not_exists(fact: usize) -> Node {
    count(fact, CmpOp::Eq, 0)
}

fn prop_now(fact: usize, op: CmpOp, offset_secs: i64) -> Node {
    Node::PropNow {
        fact,
        op,
        offset_secs,
    }
}

fn plan(facts: Vec<Fact>, root: Node) -> Plan {
    Plan {
        facts,
        root,
        time_based: true,
    }
}

fn event(name: &str, occurred_at_ms: i64) -> RawEvent {
    RawEvent {
        name: name.into(),
        occurred_at_ms,
        properties: Map::new(),
    }
}

fn properties(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("test timestamps are within chrono's range")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A user's raw state: the oracle gathers facts from it at any instant.
struct User<'a> {
    plan: &'a Plan,
    events: &'a [RawEvent],
    properties: &'a Map<String, Value>,
}

impl User<'_> {
    fn value_at(&self, t_ms: i64) -> bool {
        let facts = gather_from_raw(&self.plan.facts, self.events, self.properties, t_ms);
        evaluate(self.plan, &facts, t_ms)
    }

    fn timed(&self, now_ms: i64) -> TimedFacts {
        timed_facts_from_raw(&self.plan.facts, self.events, self.properties, now_ms)
    }

    fn next_change(&self, now_ms: i64) -> Option<i64> {
        next_change_at(self.plan, &self.timed(now_ms), now_ms)
    }

    /// `next_change` returns `expected`, and the oracle agrees on either side of it.
    fn assert_next_change(&self, now_ms: i64, expected: Option<i64>) {
        assert_eq!(self.next_change(now_ms), expected);
        let value_now = self.value_at(now_ms);
        match expected {
            Some(at_ms) => {
                assert_eq!(self.value_at(at_ms - 1), value_now, "unchanged just before");
                assert_ne!(self.value_at(at_ms), value_now, "changed at the instant");
            }
            None => {
                for later in [now_ms + 1, now_ms + 3650 * DAY_MS, i64::MAX] {
                    assert_eq!(self.value_at(later), value_now, "unchanged at {later}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-computed cases
// ---------------------------------------------------------------------------------------------

#[test]
fn an_event_leaves_its_window_one_millisecond_after_the_edge() {
    // event(a).within(10s).exists()
    let plan = plan(vec![window("a", 10)], exists(0));
    let props = Map::new();
    let cases = [
        (NOW_MS - 3 * SECOND_MS, NOW_MS + 7 * SECOND_MS + 1),
        // Exactly on the edge: still counted now, gone one millisecond later.
        (NOW_MS - 10 * SECOND_MS, NOW_MS + 1),
        // Dated in the future: counted now, leaves 10 s after it occurs.
        (NOW_MS + 5 * SECOND_MS, NOW_MS + 15 * SECOND_MS + 1),
    ];
    for (occurred, leaves) in cases {
        let events = [event("a", occurred)];
        let user = User {
            plan: &plan,
            events: &events,
            properties: &props,
        };
        user.assert_next_change(NOW_MS, Some(leaves));
    }
    // Already out of the window: nothing can change.
    let events = [event("a", NOW_MS - 10 * SECOND_MS - 1)];
    let user = User {
        plan: &plan,
        events: &events,
        properties: &props,
    };
    user.assert_next_change(NOW_MS, None);
}

#[test]
fn a_count_falls_below_its_threshold_when_the_third_oldest_leaves() {
    // event(a).within(10s).count() >= 3 with five events 1..=5 s old: the departures of the
    // two oldest keep the count at 4 and 3; the third oldest (3 s old) takes it to 2.
    let plan = plan(vec![window("a", 10)], count(0, CmpOp::Ge, 3));
    let events: Vec<RawEvent> = (1..=5)
        .map(|age_secs| event("a", NOW_MS - age_secs * SECOND_MS))
        .collect();
    let props = Map::new();
    let user = User {
        plan: &plan,
        events: &events,
        properties: &props,
    };
    user.assert_next_change(NOW_MS, Some(NOW_MS - 3 * SECOND_MS + 10 * SECOND_MS + 1));
}

#[test]
fn events_leaving_at_the_same_millisecond_leave_together() {
    // Two events at the same instant and one newer: both old ones leave at once, so the count
    // goes 3 -> 1 and never equals 2.
    let events = [
        event("a", NOW_MS - 5 * SECOND_MS),
        event("a", NOW_MS - 5 * SECOND_MS),
        event("a", NOW_MS - SECOND_MS),
    ];
    let props = Map::new();
    let cases = [
        (CmpOp::Ge, Some(NOW_MS + 5 * SECOND_MS + 1)),
        (CmpOp::Eq, None),
    ];
    for (op, expected) in cases {
        // event(a).within(10s).count() OP 2
        let plan = plan(vec![window("a", 10)], count(0, op, 2));
        let user = User {
            plan: &plan,
            events: &events,
            properties: &props,
        };
        user.assert_next_change(NOW_MS, expected);
    }
}

#[test]
fn absence_joins_when_the_last_event_leaves_the_window() {
    // event(a).exists() and event(a).within(14d).not_exists()
    let plan = plan(
        vec![all_time("a"), window("a", 14 * DAY_SECS as u64)],
        Node::And(vec![exists(0), not_exists(1)]),
    );
    let events = [
        event("a", NOW_MS - 5 * DAY_MS),
        event("a", NOW_MS - 2 * DAY_MS),
    ];
    let props = Map::new();
    let user = User {
        plan: &plan,
        events: &events,
        properties: &props,
    };
    assert!(!user.value_at(NOW_MS));
    user.assert_next_change(NOW_MS, Some(NOW_MS - 2 * DAY_MS + 14 * DAY_MS + 1));
    // Once joined, nothing but a new event can make them leave.
    user.assert_next_change(NOW_MS + 13 * DAY_MS, None);
}

#[test]
fn a_timestamp_property_comes_due_at_its_offset() {
    let trial_ends_at = NOW_MS + 10 * DAY_MS;
    let props = properties(json!({ "trial_ends_at": rfc3339(trial_ends_at) }));
    let facts = vec![time_property("trial_ends_at")];
    let cases = [
        // prop(trial_ends_at) <= now() + 3d: true from ts - 3d on.
        (CmpOp::Le, 3 * DAY_SECS, Some(trial_ends_at - 3 * DAY_MS)),
        // prop(trial_ends_at) < now() + 3d: true one millisecond later.
        (
            CmpOp::Lt,
            3 * DAY_SECS,
            Some(trial_ends_at - 3 * DAY_MS + 1),
        ),
        // prop(trial_ends_at) > now(): false from ts on.
        (CmpOp::Gt, 0, Some(trial_ends_at)),
        // prop(trial_ends_at) >= now() - 1d: false once now passes ts + 1d.
        (CmpOp::Ge, -DAY_SECS, Some(trial_ends_at + DAY_MS + 1)),
        // prop(trial_ends_at) == now(): true at exactly ts.
        (CmpOp::Eq, 0, Some(trial_ends_at)),
        // prop(trial_ends_at) != now() + 20d: already past, stays true.
        (CmpOp::Ne, 20 * DAY_SECS, None),
    ];
    for (op, offset_secs, expected) in cases {
        let plan = plan(facts.clone(), prop_now(0, op, offset_secs));
        let user = User {
            plan: &plan,
            events: &[],
            properties: &props,
        };
        user.assert_next_change(NOW_MS, expected);
    }
    // prop(trial_ends_at) == now() holds for one millisecond only.
    let plan = plan(facts, prop_now(0, CmpOp::Eq, 0));
    let user = User {
        plan: &plan,
        events: &[],
        properties: &props,
    };
    user.assert_next_change(trial_ends_at, Some(trial_ends_at + 1));
}

#[test]
fn candidates_that_do_not_flip_the_value_are_skipped() {
    // event(a).within(10s).exists() or event(b).within(60s).exists(): a's departure at +9 s
    // changes nothing while b is still counted.
    let facts = vec![window("a", 10), window("b", 60)];
    let either = plan(facts.clone(), Node::Or(vec![exists(0), exists(1)]));
    let events = [
        event("a", NOW_MS - SECOND_MS),
        event("b", NOW_MS - SECOND_MS),
    ];
    let props = Map::new();
    let user = User {
        plan: &either,
        events: &events,
        properties: &props,
    };
    user.assert_next_change(NOW_MS, Some(NOW_MS + 59 * SECOND_MS + 1));

    // not (a exists and b exists) and prop(due) <= now(): due in 5 s, but the negated
    // conjunction stays false until a leaves at +9 s, so `due` coming due changes nothing.
    let mut facts = facts;
    facts.push(time_property("due"));
    let guarded = plan(
        facts,
        Node::And(vec![
            Node::Not(Box::new(Node::And(vec![exists(0), exists(1)]))),
            prop_now(2, CmpOp::Le, 0),
        ]),
    );
    let props = properties(json!({ "due": rfc3339(NOW_MS + 5 * SECOND_MS) }));
    let user = User {
        plan: &guarded,
        events: &events,
        properties: &props,
    };
    user.assert_next_change(NOW_MS, Some(NOW_MS + 9 * SECOND_MS + 1));
}

#[test]
fn criteria_that_cannot_change_without_an_event_never_change() {
    let props = properties(json!({
        "plan": "pro",
        "renewed_at": rfc3339(NOW_MS - DAY_MS),
        "broken": "next tuesday",
        "number": 5,
    }));
    let events = [event("a", NOW_MS - SECOND_MS)];
    let facts = vec![
        all_time("a"),
        Fact::Property { key: "plan".into() },
        time_property("renewed_at"),
        time_property("broken"),
        time_property("number"),
        time_property("absent"),
    ];
    let roots = [
        // No window and no now(): constant.
        Node::And(vec![
            exists(0),
            Node::Prop {
                fact: 1,
                test: PropertyTest::Exists,
            },
        ]),
        // Already in the past and only getting further behind.
        prop_now(2, CmpOp::Le, 0),
        // Not a timestamp: false whatever the operator, at every instant.
        prop_now(3, CmpOp::Ne, 0),
        prop_now(4, CmpOp::Lt, 0),
        Node::Not(Box::new(prop_now(5, CmpOp::Gt, 0))),
    ];
    for root in roots {
        let plan = plan(facts.clone(), root);
        let user = User {
            plan: &plan,
            events: &events,
            properties: &props,
        };
        user.assert_next_change(NOW_MS, None);
    }
}

#[test]
fn instants_beyond_the_i64_range_never_come() {
    // An event that would leave its window after i64::MAX stays forever.
    let plan_window = plan(vec![window("a", 10)], exists(0));
    let events = [event("a", i64::MAX - 5 * SECOND_MS)];
    let props = Map::new();
    let user = User {
        plan: &plan_window,
        events: &events,
        properties: &props,
    };
    user.assert_next_change(NOW_MS, None);

    // An offset that saturates: now() + i64::MAX seconds is i64::MAX ms at every instant.
    let props = properties(json!({ "at": rfc3339(NOW_MS) }));
    let saturated = plan(vec![time_property("at")], prop_now(0, CmpOp::Le, i64::MAX));
    let user = User {
        plan: &saturated,
        events: &[],
        properties: &props,
    };
    user.assert_next_change(NOW_MS, None);

    // now() - i64::MAX seconds saturates to now + i64::MIN ms, which passes a timestamp just
    // before the epoch only at the far end of the range.
    let props = properties(json!({ "at": rfc3339(-SECOND_MS) }));
    let far = plan(vec![time_property("at")], prop_now(0, CmpOp::Ge, i64::MIN));
    let user = User {
        plan: &far,
        events: &[],
        properties: &props,
    };
    user.assert_next_change(NOW_MS, Some(-SECOND_MS - i64::MIN + 1));
}

#[test]
fn timed_facts_hold_the_counted_window_events_only() {
    let facts = vec![
        window("a", 10),
        Fact::EventCount {
            event: "a".into(),
            within_secs: Some(10),
            filter: Some(ok_filter()),
        },
        all_time("a"),
        time_property("at"),
    ];
    let with_ok = |occurred_at_ms: i64, ok: bool| RawEvent {
        properties: properties(json!({ "ok": ok })),
        ..event("a", occurred_at_ms)
    };
    let events = [
        with_ok(NOW_MS - 11 * SECOND_MS, true),
        with_ok(NOW_MS - 10 * SECOND_MS, false),
        with_ok(NOW_MS + SECOND_MS, true),
        event("b", NOW_MS),
    ];
    let props = properties(json!({ "at": rfc3339(NOW_MS) }));
    let timed = timed_facts_from_raw(&facts, &events, &props, NOW_MS);
    assert_eq!(
        timed.window_events,
        vec![
            vec![NOW_MS - 10 * SECOND_MS, NOW_MS + SECOND_MS],
            vec![NOW_MS + SECOND_MS],
            vec![],
            vec![],
        ]
    );
    assert_eq!(
        timed.values,
        gather_from_raw(&facts, &events, &props, NOW_MS)
    );
    let later = NOW_MS + SECOND_MS;
    assert_eq!(
        facts_at(&facts, &timed, NOW_MS, later),
        gather_from_raw(&facts, &events, &props, later)
    );
}

// ---------------------------------------------------------------------------------------------
// Random plans against brute force
// ---------------------------------------------------------------------------------------------

fn cmp_op() -> impl Strategy<Value = CmpOp> {
    prop_oneof![
        Just(CmpOp::Eq),
        Just(CmpOp::Ne),
        Just(CmpOp::Lt),
        Just(CmpOp::Le),
        Just(CmpOp::Gt),
        Just(CmpOp::Ge),
    ]
}

/// `now()` offsets: mostly typical durations and the smallest steps (so timestamps built from
/// the same offsets come due within the test's horizon), sometimes values that saturate.
fn offset_secs() -> impl Strategy<Value = i64> {
    let typical = prop_oneof![
        Just(0),
        Just(1),
        Just(-1),
        Just(3 * DAY_SECS),
        Just(-3 * DAY_SECS),
        -100_000i64..100_000,
    ];
    let saturating = prop_oneof![
        Just(i64::MAX),
        Just(i64::MIN),
        Just(i64::MAX / 1000 + 1),
        Just(i64::MIN / 1000 - 1),
        any::<i64>(),
    ];
    prop_oneof![4 => typical, 1 => saturating]
}

/// Which facts a random plan may read: count leaves read `count_facts`, `now()` comparisons
/// read `time_facts`, ordinary property tests read `property_fact`.
#[derive(Clone)]
struct FactLayout {
    count_facts: std::ops::Range<usize>,
    time_facts: std::ops::Range<usize>,
    property_fact: usize,
}

fn node(layout: FactLayout) -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        4 => (layout.count_facts, cmp_op(), prop_oneof![4 => 0i64..4, 1 => Just(-1)])
            .prop_map(|(fact, op, value)| count(fact, op, value)),
        3 => (layout.time_facts, cmp_op(), offset_secs())
            .prop_map(|(fact, op, offset_secs)| prop_now(fact, op, offset_secs)),
        1 => Just(Node::Prop {
            fact: layout.property_fact,
            test: PropertyTest::Compare {
                cmp: CmpOp::Eq,
                value: Literal::Str("pro".into()),
            },
        }),
    ];
    leaf.prop_recursive(3, 10, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..3).prop_map(Node::And),
            prop::collection::vec(inner.clone(), 1..3).prop_map(Node::Or),
            inner.prop_map(|item| Node::Not(Box::new(item))),
        ]
    })
}

fn offsets_in(node: &Node, offsets: &mut Vec<i64>) {
    match node {
        Node::And(items) | Node::Or(items) => items.iter().for_each(|n| offsets_in(n, offsets)),
        Node::Not(inner) => offsets_in(inner, offsets),
        Node::PropNow { offset_secs, .. } => offsets.push(*offset_secs),
        Node::Count { .. } | Node::Prop { .. } => {}
    }
}

/// Instants on either side of every place the value could change (each occurrence leaving each
/// window, each timestamp passing each offset), the far future, and `random` points spread over
/// `(now, limit)`: all within `(now, i64::MAX]`.
fn probe_instants(
    plan: &Plan,
    occurrences: &[i64],
    timestamps: &[i64],
    now_ms: i64,
    limit_ms: i64,
    random: &[u64],
) -> Vec<i64> {
    let windows_ms = plan.facts.iter().filter_map(|fact| match fact {
        Fact::EventCount {
            within_secs: Some(w),
            ..
        } => Some(i128::from(*w) * 1000),
        _ => None,
    });
    let mut offsets = Vec::new();
    offsets_in(&plan.root, &mut offsets);
    let mut edges: Vec<i128> = Vec::new();
    for window_ms in windows_ms {
        edges.extend(occurrences.iter().map(|&e| i128::from(e) + window_ms + 1));
    }
    for &offset_secs in &offsets {
        let offset_ms = i128::from(offset_secs.saturating_mul(1000));
        edges.extend(timestamps.iter().map(|&ts| i128::from(ts) - offset_ms));
    }
    let span = i128::from(limit_ms) - i128::from(now_ms);
    let mut probes: Vec<i128> = edges
        .iter()
        .flat_map(|&edge| [edge - 1, edge, edge + 1, edge + 2])
        .chain(
            random
                .iter()
                .map(|&r| i128::from(now_ms) + i128::from(r) % span.max(1)),
        )
        .chain([
            i128::from(now_ms) + 1,
            i128::from(now_ms) + 2,
            i128::from(limit_ms) - 1,
            i128::from(limit_ms),
            i128::from(i64::MAX) - 1,
            i128::from(i64::MAX),
        ])
        .collect();
    probes.retain(|&p| p > i128::from(now_ms));
    probes.sort_unstable();
    probes.dedup();
    probes
        .into_iter()
        .filter_map(|p| i64::try_from(p).ok())
        .collect()
}

/// The exactness property: constant before `next`, different at `next`; constant everywhere
/// probed when `next` is `None`.
fn assert_exact(
    next: Option<i64>,
    now_ms: i64,
    probes: &[i64],
    value_at: impl Fn(i64) -> bool,
) -> Result<(), TestCaseError> {
    let value_now = value_at(now_ms);
    if let Some(next) = next {
        prop_assert!(next > now_ms, "next {} is not after now {}", next, now_ms);
        prop_assert_ne!(value_at(next), value_now, "no change at next {}", next);
        prop_assert_eq!(
            value_at(next - 1),
            value_now,
            "changed before next {}",
            next
        );
    }
    for &probe in probes.iter().filter(|&&p| next.is_none_or(|next| p < next)) {
        prop_assert_eq!(
            value_at(probe),
            value_now,
            "changed at {} before next {:?}",
            probe,
            next
        );
    }
    Ok(())
}

/// A random event relative to the random windows: near a window's edge, anywhere within two
/// weeks either side of now, or at the end of time.
#[derive(Debug, Clone)]
enum EventAt {
    NearEdge { window: usize, jitter_ms: i64 },
    Around { delta_ms: i64 },
    EndOfTime { before_ms: i64 },
}

#[derive(Debug, Clone)]
enum TimeProperty {
    Absent,
    NotATimestamp,
    NotAString,
    /// `now + offset_secs s + delta_ms ms`, clamped into chrono's range, with sub-millisecond
    /// digits that parsing truncates.
    Near {
        offset_secs: i64,
        delta_ms: i64,
        sub_ms_nanos: u32,
    },
}

const WINDOWS: usize = 3;

#[derive(Debug, Clone)]
struct RawCase {
    now_ms: i64,
    windows_secs: [u64; WINDOWS],
    root: Node,
    events: Vec<(bool, EventAt, bool)>,
    time_properties: [TimeProperty; 2],
    is_pro: bool,
    random: Vec<u64>,
}

fn window_secs() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(10),
        Just(86_400),
        Just(14 * 86_400),
        1u64..100_000,
        Just(1_000_000_000),
    ]
}

fn event_at() -> impl Strategy<Value = EventAt> {
    prop_oneof![
        6 => (0..WINDOWS, -2_000i64..2_000)
            .prop_map(|(window, jitter_ms)| EventAt::NearEdge { window, jitter_ms }),
        3 => (-14 * DAY_MS..14 * DAY_MS).prop_map(|delta_ms| EventAt::Around { delta_ms }),
        1 => (0i64..20_000).prop_map(|before_ms| EventAt::EndOfTime { before_ms }),
    ]
}

fn time_property_value() -> impl Strategy<Value = TimeProperty> {
    prop_oneof![
        1 => Just(TimeProperty::Absent),
        1 => Just(TimeProperty::NotATimestamp),
        1 => Just(TimeProperty::NotAString),
        6 => (offset_secs(), -3_000i64..3_000, prop_oneof![Just(0u32), 0u32..1_000_000])
            .prop_map(|(offset_secs, delta_ms, sub_ms_nanos)| TimeProperty::Near {
                offset_secs,
                delta_ms,
                sub_ms_nanos,
            }),
    ]
}

fn raw_case() -> impl Strategy<Value = RawCase> {
    let now_ms = prop_oneof![
        3 => (-100_000i64..100_000).prop_map(|jitter| NOW_MS + jitter),
        1 => -100_000_000_000_000i64..100_000_000_000_000,
    ];
    let layout = FactLayout {
        count_facts: 0..4,
        time_facts: 4..6,
        property_fact: 6,
    };
    (
        now_ms,
        [window_secs(), window_secs(), window_secs()],
        node(layout),
        prop::collection::vec((any::<bool>(), event_at(), any::<bool>()), 0..8),
        [time_property_value(), time_property_value()],
        any::<bool>(),
        prop::collection::vec(any::<u64>(), 8),
    )
        .prop_map(
            |(now_ms, windows_secs, root, events, time_properties, is_pro, random)| RawCase {
                now_ms,
                windows_secs,
                root,
                events,
                time_properties,
                is_pro,
                random,
            },
        )
}

/// chrono formats and parses RFC 3339 for years 0000 to 9999 only.
const RFC3339_MIN_MS: i64 = -62_167_219_200_000;
const RFC3339_MAX_MS: i64 = 253_402_300_799_999;

impl RawCase {
    /// Facts 0..3 are windows (a, a with `.where(ok == true)`, b), 3 is a's whole history,
    /// 4 and 5 are timestamp properties, 6 is `plan`.
    fn plan(&self) -> Plan {
        let [a, a_ok, b] = self.windows_secs;
        let facts = vec![
            window("a", a),
            Fact::EventCount {
                event: "a".into(),
                within_secs: Some(a_ok),
                filter: Some(ok_filter()),
            },
            window("b", b),
            all_time("a"),
            time_property("t0"),
            time_property("t1"),
            Fact::Property { key: "plan".into() },
        ];
        plan(facts, self.root.clone())
    }

    fn events(&self) -> Vec<RawEvent> {
        self.events
            .iter()
            .map(|(is_a, at, ok)| {
                let occurred_at_ms = match *at {
                    EventAt::NearEdge { window, jitter_ms } => {
                        let window_ms = self.windows_secs[window] as i64 * SECOND_MS;
                        self.now_ms - window_ms + jitter_ms
                    }
                    EventAt::Around { delta_ms } => self.now_ms + delta_ms,
                    EventAt::EndOfTime { before_ms } => i64::MAX - before_ms,
                };
                RawEvent {
                    properties: properties(json!({ "ok": ok })),
                    ..event(if *is_a { "a" } else { "b" }, occurred_at_ms)
                }
            })
            .collect()
    }

    fn properties(&self) -> Map<String, Value> {
        let mut properties = Map::new();
        properties.insert(
            "plan".into(),
            json!(if self.is_pro { "pro" } else { "free" }),
        );
        for (key, value) in ["t0", "t1"].into_iter().zip(&self.time_properties) {
            let json = match *value {
                TimeProperty::Absent => continue,
                TimeProperty::NotATimestamp => json!("tomorrow"),
                TimeProperty::NotAString => json!(12),
                TimeProperty::Near {
                    offset_secs,
                    delta_ms,
                    sub_ms_nanos,
                } => {
                    let ms = self
                        .now_ms
                        .saturating_add(offset_secs.saturating_mul(1000))
                        .saturating_add(delta_ms)
                        .clamp(RFC3339_MIN_MS, RFC3339_MAX_MS);
                    let at = chrono::DateTime::from_timestamp_millis(ms)
                        .expect("clamped into chrono's range")
                        + chrono::Duration::nanoseconds(i64::from(sub_ms_nanos));
                    json!(at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
                }
            };
            properties.insert(key.into(), json);
        }
        properties
    }
}

/// Properties for the exactness proptest; `PROPTEST_CASES` overrides the case count.
fn cases(default: u32) -> ProptestConfig {
    ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(default),
    )
}

proptest! {
    #![proptest_config(cases(8_000))]

    /// From raw events and properties, as the store will gather them: `next_change_at` against
    /// the reference evaluator on facts the oracle gathers afresh at every probed instant.
    #[test]
    fn next_change_matches_brute_force_on_raw_users(case in raw_case()) {
        let plan = case.plan();
        let events = case.events();
        let properties = case.properties();
        let user = User { plan: &plan, events: &events, properties: &properties };
        let now_ms = case.now_ms;
        let timed = user.timed(now_ms);
        prop_assert_eq!(&timed.values, &gather_from_raw(&plan.facts, &events, &properties, now_ms));
        // Every window count is made of exactly the occurrences that can age out.
        for ((fact, occurrences), value) in plan.facts.iter().zip(&timed.window_events).zip(&timed.values) {
            if let Fact::EventCount { within_secs: Some(_), .. } = fact {
                prop_assert_eq!(value, &FactValue::Count(occurrences.len() as i64));
            } else {
                prop_assert!(occurrences.is_empty());
            }
        }

        let next = next_change_at(&plan, &timed, now_ms);
        let occurrences: Vec<i64> = events.iter().map(|e| e.occurred_at_ms).collect();
        let timestamps: Vec<i64> = ["t0", "t1"]
            .iter()
            .filter_map(|key| properties.get(*key)?.as_str().and_then(parse_timestamp_ms))
            .collect();
        let limit_ms = next.unwrap_or(now_ms.saturating_add(60 * DAY_MS));
        let probes = probe_instants(&plan, &occurrences, &timestamps, now_ms, limit_ms, &case.random);
        assert_exact(next, now_ms, &probes, |t| user.value_at(t))?;
        for &probe in &probes {
            prop_assert_eq!(
                facts_at(&plan.facts, &timed, now_ms, probe),
                gather_from_raw(&plan.facts, &events, &properties, probe),
                "facts at {}", probe
            );
        }
    }
}

/// An instant anywhere in the `i64` range, with extra weight at both ends and around zero.
fn any_instant() -> impl Strategy<Value = i64> {
    prop_oneof![
        2 => any::<i64>(),
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => i64::MIN..i64::MIN + 1_000_000,
        1 => i64::MAX - 1_000_000..=i64::MAX,
        1 => -1_000_000i64..1_000_000,
    ]
}

/// An instant relative to `now` (or to a window's edge at `now`), or anywhere at all.
#[derive(Debug, Clone)]
enum Instant {
    NearNow { jitter_ms: i64 },
    NearEdge { window: usize, jitter_ms: i64 },
    AtOffset { offset_secs: i64, jitter_ms: i64 },
    Anywhere(i64),
}

fn instant() -> impl Strategy<Value = Instant> {
    let jitter = || -3_000i64..3_000;
    prop_oneof![
        jitter().prop_map(|jitter_ms| Instant::NearNow { jitter_ms }),
        (0..2usize, jitter())
            .prop_map(|(window, jitter_ms)| Instant::NearEdge { window, jitter_ms }),
        (offset_secs(), jitter()).prop_map(|(offset_secs, jitter_ms)| Instant::AtOffset {
            offset_secs,
            jitter_ms
        }),
        any_instant().prop_map(Instant::Anywhere),
    ]
}

/// A user given directly as [`TimedFacts`], so instants, windows and timestamps can reach the
/// ends of the `i64` range (raw timestamps cannot: RFC 3339 stops at year 9999).
#[derive(Debug, Clone)]
struct ExtremeCase {
    now_ms: i64,
    windows_secs: [u64; 2],
    root: Node,
    occurrences: [Vec<Instant>; 2],
    all_time_count: i64,
    timestamps: [Option<Instant>; 2],
    random: Vec<u64>,
}

fn extreme_case() -> impl Strategy<Value = ExtremeCase> {
    let window = prop_oneof![window_secs(), any::<u64>(), Just(u64::MAX)];
    let occurrences = || prop::collection::vec(instant(), 0..6);
    let layout = FactLayout {
        count_facts: 0..3,
        time_facts: 3..5,
        property_fact: 5,
    };
    (
        any_instant(),
        [window.clone(), window],
        node(layout),
        [occurrences(), occurrences()],
        0i64..4,
        [prop::option::of(instant()), prop::option::of(instant())],
        prop::collection::vec(any::<u64>(), 8),
    )
        .prop_map(
            |(now_ms, windows_secs, root, occurrences, all_time_count, timestamps, random)| {
                ExtremeCase {
                    now_ms,
                    windows_secs,
                    root,
                    occurrences,
                    all_time_count,
                    timestamps,
                    random,
                }
            },
        )
}

/// The definition of a window, independently of the clock: `occurred >= at - within`.
fn counted(occurred_ms: i64, within_secs: u64, at_ms: i64) -> bool {
    i128::from(occurred_ms) >= i128::from(at_ms) - i128::from(within_secs) * 1000
}

impl ExtremeCase {
    /// Facts 0 and 1 are windows of event a, 2 is its whole history, 3 and 4 are timestamp
    /// properties, 5 is `plan`.
    fn plan(&self) -> Plan {
        let [first, second] = self.windows_secs;
        let facts = vec![
            window("a", first),
            window("a", second),
            all_time("a"),
            time_property("t0"),
            time_property("t1"),
            Fact::Property { key: "plan".into() },
        ];
        plan(facts, self.root.clone())
    }

    fn resolve(&self, instant: &Instant) -> i64 {
        let now = i128::from(self.now_ms);
        let at = match *instant {
            Instant::NearNow { jitter_ms } => now + i128::from(jitter_ms),
            Instant::NearEdge { window, jitter_ms } => {
                now - i128::from(self.windows_secs[window]) * 1000 + i128::from(jitter_ms)
            }
            Instant::AtOffset {
                offset_secs,
                jitter_ms,
            } => now + i128::from(offset_secs) * 1000 + i128::from(jitter_ms),
            Instant::Anywhere(at) => i128::from(at),
        };
        at.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }

    /// Each window's occurrences that are counted at `now`.
    fn window_events(&self) -> [Vec<i64>; 2] {
        [0, 1].map(|window| {
            self.occurrences[window]
                .iter()
                .map(|instant| self.resolve(instant))
                .filter(|&at| counted(at, self.windows_secs[window], self.now_ms))
                .collect()
        })
    }

    fn timestamps(&self) -> Vec<Option<i64>> {
        self.timestamps
            .iter()
            .map(|instant| instant.as_ref().map(|instant| self.resolve(instant)))
            .collect()
    }

    /// The oracle's facts at `t_ms`, counting each window from its definition.
    fn facts_at(&self, t_ms: i64) -> Vec<FactValue> {
        let windows = self.window_events();
        let mut facts: Vec<FactValue> = windows
            .iter()
            .zip(self.windows_secs)
            .map(|(occurrences, within_secs)| {
                let still = occurrences
                    .iter()
                    .filter(|&&at| counted(at, within_secs, t_ms))
                    .count();
                FactValue::Count(still as i64)
            })
            .collect();
        facts.push(FactValue::Count(self.all_time_count));
        facts.extend(
            self.timestamps()
                .into_iter()
                .map(|ts| ts.map_or(FactValue::Missing, FactValue::Timestamp)),
        );
        facts.push(FactValue::String("pro".into()));
        facts
    }

    fn timed(&self) -> TimedFacts {
        let [first, second] = self.window_events();
        TimedFacts {
            values: self.facts_at(self.now_ms),
            window_events: vec![first, second, vec![], vec![], vec![], vec![]],
        }
    }
}

proptest! {
    #![proptest_config(cases(4_000))]

    /// Instants, windows, offsets and timestamps across the whole `i64` range: no overflow, and
    /// still exact.
    #[test]
    fn next_change_matches_brute_force_at_the_extremes(case in extreme_case()) {
        let plan = case.plan();
        let timed = case.timed();
        let now_ms = case.now_ms;
        let next = next_change_at(&plan, &timed, now_ms);
        let occurrences: Vec<i64> = case.window_events().concat();
        let timestamps: Vec<i64> = case.timestamps().into_iter().flatten().collect();
        let limit_ms = next.unwrap_or(i64::MAX);
        let probes = probe_instants(&plan, &occurrences, &timestamps, now_ms, limit_ms, &case.random);
        assert_exact(next, now_ms, &probes, |t| evaluate(&plan, &case.facts_at(t), t))?;
        for &probe in &probes {
            prop_assert_eq!(facts_at(&plan.facts, &timed, now_ms, probe), case.facts_at(probe));
        }
    }
}
