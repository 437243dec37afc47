//! The compiled WASM predicate must agree with the reference evaluator for every plan and every
//! row, including the awkward values (NaN, ±0, huge counts, non-ASCII strings, wrong types).

use std::sync::LazyLock;

use membrane_abi::{Fact, FactValue};
use membrane_criteria::ast::{CmpOp, Literal};
use membrane_criteria::compile::compile;
use membrane_criteria::eval::evaluate;
use membrane_criteria::plan::{Node, Plan};
use membrane_wasm::{Engine, Limits};
use proptest::prelude::*;

/// One engine for the whole test binary, as in production.
static ENGINE: LazyLock<Engine> =
    LazyLock::new(|| Engine::new(Limits::default()).expect("the test engine starts"));

const NOW_MS: i64 = 1_700_000_000_000;

/// Compiles `plan`, evaluates `rows` in the sandbox and checks every user against the oracle.
fn assert_matches_oracle(plan: &Plan, rows: &[Vec<FactValue>]) -> Result<(), TestCaseError> {
    let compiled = compile(plan);
    let predicate = ENGINE
        .load(&compiled.wasm)
        .map_err(|error| TestCaseError::fail(format!("load failed: {error}")))?;
    prop_assert_eq!(predicate.manifest(), &plan.manifest());
    let results = predicate
        .evaluate(rows, NOW_MS)
        .map_err(|error| TestCaseError::fail(format!("evaluate failed: {error}")))?;
    prop_assert_eq!(results.len(), rows.len());
    for (row, compiled_result) in rows.iter().zip(results) {
        prop_assert_eq!(
            compiled_result,
            evaluate(plan, row, NOW_MS),
            "plan {:?} disagrees with the oracle on row {:?}",
            plan.root,
            row
        );
    }
    Ok(())
}

fn check(plan: &Plan, rows: &[Vec<FactValue>]) {
    if let Err(error) = assert_matches_oracle(plan, rows) {
        panic!("{error}");
    }
}

fn property(key: &str) -> Fact {
    Fact::Property { key: key.into() }
}

fn plan(facts: Vec<Fact>, root: Node) -> Plan {
    Plan {
        facts,
        root,
        time_based: false,
    }
}

fn prop_cmp(op: CmpOp, value: Literal) -> Node {
    Node::PropCmp { fact: 0, op, value }
}

const ALL_OPS: [CmpOp; 6] = [
    CmpOp::Eq,
    CmpOp::Ne,
    CmpOp::Lt,
    CmpOp::Le,
    CmpOp::Gt,
    CmpOp::Ge,
];

/// Values of every type, to be put in one property slot.
fn one_of_each_type() -> Vec<FactValue> {
    vec![
        FactValue::Missing,
        FactValue::Null,
        FactValue::Bool(false),
        FactValue::Bool(true),
        FactValue::Number(0.0),
        FactValue::Number(-0.0),
        FactValue::Number(f64::NAN),
        FactValue::Number(f64::INFINITY),
        FactValue::Number(f64::NEG_INFINITY),
        FactValue::Number(1e308),
        FactValue::String(String::new()),
        FactValue::String("pro".into()),
        FactValue::String("pr".into()),
        FactValue::String("pro\u{0}".into()),
        FactValue::String("é".into()),
        FactValue::String("\u{1F600}".into()),
        FactValue::Array(vec![serde_json::json!("pro")]),
        FactValue::Object,
        FactValue::Count(0),
        FactValue::Count(7),
    ]
}

#[test]
fn every_literal_type_against_every_value_type_and_operator() {
    let literals = [
        Literal::Str("pro".into()),
        Literal::Str(String::new()),
        Literal::Str("é".into()),
        Literal::Num(0.0),
        Literal::Num(-0.0),
        Literal::Num(f64::NAN),
        Literal::Num(f64::INFINITY),
        Literal::Bool(true),
        Literal::Bool(false),
        Literal::Null,
    ];
    let rows: Vec<Vec<FactValue>> = one_of_each_type().into_iter().map(|v| vec![v]).collect();
    for literal in &literals {
        for op in ALL_OPS {
            check(
                &plan(vec![property("p")], prop_cmp(op, literal.clone())),
                &rows,
            );
        }
    }
}

#[test]
fn counts_compare_signed_and_other_tags_count_as_zero() {
    let rows: Vec<Vec<FactValue>> = [0, 1, -1, i64::MAX, i64::MIN]
        .into_iter()
        .map(FactValue::Count)
        .chain(one_of_each_type())
        .map(|v| vec![v])
        .collect();
    let event = Fact::EventCount {
        event: "login".into(),
        within_secs: Some(86_400),
    };
    for value in [0, 1, -1, i64::MAX, i64::MIN] {
        for op in ALL_OPS {
            check(
                &plan(vec![event.clone()], Node::Count { fact: 0, op, value }),
                &rows,
            );
        }
    }
}

#[test]
fn empty_and_is_true_and_empty_or_is_false() {
    let rows = vec![vec![]];
    check(&plan(vec![], Node::And(vec![])), &rows);
    check(&plan(vec![], Node::Or(vec![])), &rows);
    check(&plan(vec![], Node::Not(Box::new(Node::Or(vec![])))), &rows);
}

#[test]
fn non_ascii_bytes_compare_unsigned() {
    // 'é' is 0xC3 0xA9: above every ASCII byte when compared unsigned.
    let rows = vec![
        vec![FactValue::String("z".into())],
        vec![FactValue::String("é".into())],
        vec![FactValue::String("éa".into())],
    ];
    for op in ALL_OPS {
        check(
            &plan(
                vec![property("name")],
                prop_cmp(op, Literal::Str("é".into())),
            ),
            &rows,
        );
    }
}

#[test]
fn large_batches_are_chunked_and_long_strings_grow_memory() {
    let root = Node::And(vec![
        prop_cmp(CmpOp::Ge, Literal::Str("m".into())),
        Node::Count {
            fact: 1,
            op: CmpOp::Gt,
            value: 2,
        },
    ]);
    let facts = vec![
        property("name"),
        Fact::EventCount {
            event: "e".into(),
            within_secs: None,
        },
    ];
    let many_rows: Vec<Vec<FactValue>> = (0..40_000)
        .map(|i| {
            vec![
                FactValue::String(format!("{}", i % 1000)),
                FactValue::Count(i % 5),
            ]
        })
        .collect();
    check(&plan(facts.clone(), root.clone()), &many_rows);

    let long = "n".repeat(300_000);
    let long_rows: Vec<Vec<FactValue>> = (0..64)
        .map(|i| vec![FactValue::String(long.clone()), FactValue::Count(i)])
        .collect();
    check(&plan(facts, root), &long_rows);
}

#[test]
fn compiled_predicate_is_shareable_across_threads() {
    let compiled = compile(&plan(
        vec![property("plan")],
        prop_cmp(CmpOp::Eq, Literal::Str("pro".into())),
    ));
    let predicate = std::sync::Arc::new(ENGINE.load(&compiled.wasm).expect("loads"));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let predicate = std::sync::Arc::clone(&predicate);
            std::thread::spawn(move || {
                let value = if i % 2 == 0 { "pro" } else { "free" };
                predicate
                    .evaluate(&[vec![FactValue::String(value.into())]], NOW_MS)
                    .expect("evaluates")
            })
        })
        .collect();
    for (i, handle) in handles.into_iter().enumerate() {
        assert_eq!(handle.join().expect("no panic"), vec![i % 2 == 0]);
    }
}

// ---- property test ----

const MAX_FACTS: usize = 5;

const STRINGS: [&str; 8] = ["", "a", "ab", "b", "pro", "é", "\u{1F600}x", "a\u{0}"];

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(&STRINGS[..]).prop_map(str::to_owned),
        1 => "\\PC{0,6}",
    ]
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => proptest::sample::select(&[
            0.0, -0.0, 1.0, -1.0, 2.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e300,
            -1e300, f64::MIN_POSITIVE, 9_007_199_254_740_993.0,
        ][..]),
        1 => any::<f64>(),
    ]
}

fn count() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => -2i64..5,
        1 => proptest::sample::select(&[i64::MAX, i64::MIN, i64::MAX - 1, i64::MIN + 1][..]),
        1 => any::<i64>(),
    ]
}

fn op() -> impl Strategy<Value = CmpOp> {
    proptest::sample::select(&ALL_OPS[..])
}

fn literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        string().prop_map(Literal::Str),
        number().prop_map(Literal::Num),
        any::<bool>().prop_map(Literal::Bool),
        Just(Literal::Null),
    ]
}

fn fact_value() -> impl Strategy<Value = FactValue> {
    prop_oneof![
        1 => Just(FactValue::Missing),
        1 => Just(FactValue::Null),
        1 => any::<bool>().prop_map(FactValue::Bool),
        2 => number().prop_map(FactValue::Number),
        2 => string().prop_map(FactValue::String),
        1 => Just(FactValue::Array(vec![serde_json::json!(1), serde_json::json!("a")])),
        1 => Just(FactValue::Object),
        2 => count().prop_map(FactValue::Count),
    ]
}

/// Leaves may read any slot: a count node over a property slot (or the reverse) must behave
/// like the oracle too.
fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (0..MAX_FACTS, op(), count()).prop_map(|(fact, op, value)| Node::Count { fact, op, value }),
        (0..MAX_FACTS, op(), literal()).prop_map(|(fact, op, value)| Node::PropCmp {
            fact,
            op,
            value
        }),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Node::And),
            prop::collection::vec(inner.clone(), 0..4).prop_map(Node::Or),
            inner.prop_map(|n| Node::Not(Box::new(n))),
        ]
    })
}

fn facts() -> impl Strategy<Value = Vec<Fact>> {
    prop::collection::vec(any::<bool>(), MAX_FACTS).prop_map(|is_event| {
        is_event
            .into_iter()
            .enumerate()
            .map(|(i, is_event)| match is_event {
                true => Fact::EventCount {
                    event: format!("event_{i}"),
                    within_secs: (i % 2 == 0).then_some(3_600),
                },
                false => property(&format!("key_{i}")),
            })
            .collect()
    })
}

fn rows() -> impl Strategy<Value = Vec<Vec<FactValue>>> {
    prop::collection::vec(prop::collection::vec(fact_value(), MAX_FACTS), 1..32)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(4_000)
    ))]

    #[test]
    fn compiled_predicates_agree_with_the_reference_evaluator(
        facts in facts(),
        root in node(),
        rows in rows(),
    ) {
        assert_matches_oracle(&plan(facts, root), &rows)?;
    }
}
