//! The reference evaluator: the oracle that compiled WASM and every SQL fast path must agree
//! with. Deliberately plain: clarity over speed.

use std::cmp::Ordering;

use crate::ast::{CmpOp, Literal};
use crate::plan::{Node, Plan};
use membrane_abi::{EventFilter, Fact, FactValue, PropertyTest};
use serde_json::{Map, Value};

/// Evaluates `plan` for one user whose facts (in `plan.facts` order) are `facts`.
/// `now_ms` is the evaluation instant in Unix milliseconds.
pub fn evaluate(plan: &Plan, facts: &[FactValue], now_ms: i64) -> bool {
    evaluate_node(&plan.root, facts, now_ms)
}

/// Evaluates one node of a plan (see [`evaluate`]).
pub fn evaluate_node(node: &Node, facts: &[FactValue], now_ms: i64) -> bool {
    match node {
        Node::And(items) => items.iter().all(|n| evaluate_node(n, facts, now_ms)),
        Node::Or(items) => items.iter().any(|n| evaluate_node(n, facts, now_ms)),
        Node::Not(inner) => !evaluate_node(inner, facts, now_ms),
        Node::Count { fact, op, value } => {
            let count = match facts[*fact] {
                FactValue::Count(c) => c,
                _ => 0,
            };
            op.holds(count.cmp(value))
        }
        Node::Prop { fact, test } => property_holds(&facts[*fact], test),
        Node::PropNow {
            fact,
            op,
            offset_secs,
        } => match facts[*fact] {
            FactValue::Timestamp(at_ms) => {
                let instant = now_ms.saturating_add(offset_secs.saturating_mul(1000));
                op.holds(at_ms.cmp(&instant))
            }
            _ => false,
        },
    }
}

/// The meaning of every [`PropertyTest`] (documented there) on one value.
pub fn property_holds(value: &FactValue, test: &PropertyTest) -> bool {
    match test {
        PropertyTest::Compare {
            cmp,
            value: literal,
        } => compare_property(value, *cmp, literal),
        PropertyTest::Exists => !matches!(value, FactValue::Missing | FactValue::Null),
        PropertyTest::NotExists => matches!(value, FactValue::Missing | FactValue::Null),
        PropertyTest::Contains { value: needle } => match value {
            FactValue::String(s) => contains_bytes(s.as_bytes(), needle.as_bytes()),
            FactValue::Array(items) => items.iter().any(|item| item.as_str() == Some(needle)),
            _ => false,
        },
        PropertyTest::StartsWith { value: prefix } => match value {
            FactValue::String(s) => s.as_bytes().starts_with(prefix.as_bytes()),
            _ => false,
        },
        PropertyTest::In { values } => values
            .iter()
            .any(|literal| compare_property(value, CmpOp::Eq, literal)),
    }
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// The brief's typing rules: a missing key or a type mismatch makes every comparison false
/// except `!=`, which is then true. Numbers compare as f64, strings by bytes; booleans and null
/// only by (in)equality.
pub fn compare_property(actual: &FactValue, op: CmpOp, literal: &Literal) -> bool {
    let ordering: Option<Ordering> = match (actual, literal) {
        (FactValue::Number(a), Literal::Num(b)) => a.partial_cmp(b),
        (FactValue::String(a), Literal::Str(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
        (FactValue::Bool(a), Literal::Bool(b)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => {
            Some(a.cmp(b))
        }
        (FactValue::Null, Literal::Null) if matches!(op, CmpOp::Eq | CmpOp::Ne) => {
            Some(Ordering::Equal)
        }
        _ => None,
    };
    match ordering {
        Some(ordering) => op.holds(ordering),
        None => op == CmpOp::Ne,
    }
}

/// Whether an event's own properties satisfy a `.where(...)` filter.
pub fn filter_holds(filter: &EventFilter, properties: &Map<String, Value>) -> bool {
    match filter {
        EventFilter::All { of } => of.iter().all(|f| filter_holds(f, properties)),
        EventFilter::Any { of } => of.iter().any(|f| filter_holds(f, properties)),
        EventFilter::Not { filter } => !filter_holds(filter, properties),
        EventFilter::Test { key, test } => {
            property_holds(&FactValue::from_json(properties.get(key)), test)
        }
    }
}

/// One event of a user, as the oracle sees raw data.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    pub name: String,
    pub occurred_at_ms: i64,
    pub properties: Map<String, Value>,
}

/// Computes `facts` from a user's raw events and merged properties, exactly as the store's SQL
/// gathers them: the oracle for fact gathering.
pub fn gather_from_raw(
    facts: &[Fact],
    events: &[RawEvent],
    properties: &Map<String, Value>,
    now_ms: i64,
) -> Vec<FactValue> {
    facts
        .iter()
        .map(|fact| match fact {
            Fact::EventCount {
                event,
                within_secs,
                filter,
            } => {
                let since_ms = within_secs.map(|w| window_start_ms(now_ms, w));
                let count = events
                    .iter()
                    .filter(|e| &e.name == event)
                    .filter(|e| since_ms.is_none_or(|since| e.occurred_at_ms >= since))
                    .filter(|e| {
                        filter
                            .as_ref()
                            .is_none_or(|f| filter_holds(f, &e.properties))
                    })
                    .count();
                FactValue::Count(count as i64)
            }
            Fact::Property { key } => FactValue::from_json(properties.get(key)),
            Fact::PropertyTime { key } => properties
                .get(key)
                .and_then(Value::as_str)
                .and_then(membrane_abi::parse_timestamp_ms)
                .map_or(FactValue::Missing, FactValue::Timestamp),
        })
        .collect()
}

/// The first instant inside a window of `within_secs` ending at `now_ms`, saturating at the
/// i64 limits (a window longer than all representable time includes everything).
pub fn window_start_ms(now_ms: i64, within_secs: u64) -> i64 {
    let start = i128::from(now_ms) - i128::from(within_secs) * 1000;
    start.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// The facts of a user with no events and no properties: criteria must be false for them.
pub fn blank_facts(facts: &[Fact]) -> Vec<FactValue> {
    facts
        .iter()
        .map(|fact| match fact {
            Fact::EventCount { .. } => FactValue::Count(0),
            Fact::Property { .. } | Fact::PropertyTime { .. } => FactValue::Missing,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_mismatched_properties_are_false_except_not_equal() {
        let lit = Literal::Str("pro".into());
        assert!(!compare_property(&FactValue::Missing, CmpOp::Eq, &lit));
        assert!(compare_property(&FactValue::Missing, CmpOp::Ne, &lit));
        assert!(!compare_property(&FactValue::Number(1.0), CmpOp::Lt, &lit));
        assert!(compare_property(&FactValue::Number(1.0), CmpOp::Ne, &lit));
        assert!(compare_property(
            &FactValue::String("pro".into()),
            CmpOp::Eq,
            &lit
        ));
        assert!(compare_property(
            &FactValue::String("basic".into()),
            CmpOp::Lt,
            &lit
        ));
    }

    #[test]
    fn contains_is_substring_for_strings_and_membership_for_arrays() {
        let test = PropertyTest::Contains { value: "ab".into() };
        assert!(property_holds(&FactValue::String("xaby".into()), &test));
        assert!(!property_holds(&FactValue::String("a".into()), &test));
        let array = FactValue::Array(vec![Value::from("ab"), Value::from(1)]);
        assert!(property_holds(&array, &test));
        let other = FactValue::Array(vec![Value::from("abc")]);
        assert!(!property_holds(&other, &test));
        assert!(!property_holds(&FactValue::Missing, &test));
    }

    #[test]
    fn exists_means_present_and_not_null() {
        assert!(property_holds(
            &FactValue::Bool(false),
            &PropertyTest::Exists
        ));
        assert!(!property_holds(&FactValue::Null, &PropertyTest::Exists));
        assert!(property_holds(
            &FactValue::Missing,
            &PropertyTest::NotExists
        ));
    }

    #[test]
    fn window_counts_include_the_edge_instant_and_apply_the_filter() {
        let facts = vec![Fact::EventCount {
            event: "a".into(),
            within_secs: Some(10),
            filter: Some(EventFilter::Test {
                key: "ok".into(),
                test: PropertyTest::Compare {
                    cmp: CmpOp::Eq,
                    value: Literal::Bool(true),
                },
            }),
        }];
        let event = |ok: bool| RawEvent {
            name: "a".into(),
            occurred_at_ms: 90_000,
            properties: serde_json::json!({ "ok": ok })
                .as_object()
                .cloned()
                .unwrap(),
        };
        let events = vec![event(true), event(false)];
        let props = Map::new();
        assert_eq!(
            gather_from_raw(&facts, &events, &props, 100_000),
            vec![FactValue::Count(1)]
        );
        assert_eq!(
            gather_from_raw(&facts, &events, &props, 100_001),
            vec![FactValue::Count(0)]
        );
    }
}
