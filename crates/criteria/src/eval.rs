//! The reference evaluator: the oracle that compiled WASM and every SQL fast path must agree
//! with. Deliberately plain: clarity over speed.

use std::cmp::Ordering;

use crate::ast::{CmpOp, Literal};
use crate::plan::{Node, Plan};
use membrane_abi::{Fact, FactValue};

/// Evaluates `plan` for one user whose facts (in `plan.facts` order) are `facts`.
/// `now_ms` is the evaluation instant in Unix milliseconds.
/// (No construct of the language reads `now_ms` directly yet: windows are resolved into counts
/// when facts are gathered.)
pub fn evaluate(plan: &Plan, facts: &[FactValue], _now_ms: i64) -> bool {
    eval_node(&plan.root, facts)
}

fn eval_node(node: &Node, facts: &[FactValue]) -> bool {
    match node {
        Node::And(items) => items.iter().all(|n| eval_node(n, facts)),
        Node::Or(items) => items.iter().any(|n| eval_node(n, facts)),
        Node::Not(inner) => !eval_node(inner, facts),
        Node::Count { fact, op, value } => {
            let count = match facts[*fact] {
                FactValue::Count(c) => c,
                _ => 0,
            };
            op.holds(count.cmp(value))
        }
        Node::PropCmp { fact, op, value } => compare_property(&facts[*fact], *op, value),
    }
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

/// One event of a user, as the oracle sees raw data.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    pub name: String,
    pub occurred_at_ms: i64,
}

/// Computes `facts` from a user's raw events and merged properties, exactly as the store's SQL
/// gathers them: the oracle for fact gathering.
pub fn gather_from_raw(
    facts: &[Fact],
    events: &[RawEvent],
    properties: &serde_json::Map<String, serde_json::Value>,
    now_ms: i64,
) -> Vec<FactValue> {
    facts
        .iter()
        .map(|fact| match fact {
            Fact::EventCount { event, within_secs } => {
                let since_ms = within_secs.map(|w| now_ms - (w as i64) * 1000);
                let count = events
                    .iter()
                    .filter(|e| &e.name == event)
                    .filter(|e| since_ms.is_none_or(|since| e.occurred_at_ms >= since))
                    .count();
                FactValue::Count(count as i64)
            }
            Fact::Property { key } => FactValue::from_json(properties.get(key)),
        })
        .collect()
}

/// The facts of a user with no events and no properties: criteria must be false for them.
pub fn blank_facts(facts: &[Fact]) -> Vec<FactValue> {
    facts
        .iter()
        .map(|fact| match fact {
            Fact::EventCount { .. } => FactValue::Count(0),
            Fact::Property { .. } => FactValue::Missing,
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
    fn window_counts_include_the_edge_instant() {
        let facts = vec![Fact::EventCount {
            event: "a".into(),
            within_secs: Some(10),
        }];
        let events = vec![RawEvent {
            name: "a".into(),
            occurred_at_ms: 90_000,
        }];
        let props = serde_json::Map::new();
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
