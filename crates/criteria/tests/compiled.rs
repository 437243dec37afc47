//! The compiled WASM predicate must agree with the reference evaluator for every plan and every
//! row, including the awkward values (NaN, ±0, huge counts, non-ASCII strings, wrong types,
//! arrays of mixed elements, timestamps on the exact millisecond of `now() ± offset`).

use std::sync::LazyLock;

use membrane_abi::{Fact, FactValue, PropertyTest};
use membrane_criteria::ast::{CmpOp, Literal};
use membrane_criteria::compile::compile;
use membrane_criteria::eval::{blank_facts, evaluate};
use membrane_criteria::plan::{Node, Plan};
use membrane_wasm::{Engine, Limits};
use proptest::prelude::*;
use serde_json::{json, Value};

/// One engine for the whole test binary, as in production.
static ENGINE: LazyLock<Engine> =
    LazyLock::new(|| Engine::new(Limits::default()).expect("the test engine starts"));

const NOW_MS: i64 = 1_700_000_000_000;

/// Compiles `plan`, evaluates `rows` in the sandbox at `now_ms` and checks every user against
/// the oracle.
fn assert_matches_oracle(
    plan: &Plan,
    rows: &[Vec<FactValue>],
    now_ms: i64,
) -> Result<(), TestCaseError> {
    let compiled = compile(plan);
    let predicate = ENGINE
        .load(&compiled.wasm)
        .map_err(|error| TestCaseError::fail(format!("load failed: {error}")))?;
    prop_assert_eq!(predicate.manifest(), &plan.manifest());
    let results = predicate
        .evaluate(rows, now_ms)
        .map_err(|error| TestCaseError::fail(format!("evaluate failed: {error}")))?;
    prop_assert_eq!(results.len(), rows.len());
    for (row, compiled_result) in rows.iter().zip(results) {
        prop_assert_eq!(
            compiled_result,
            evaluate(plan, row, now_ms),
            "plan {:?} at now_ms {} disagrees with the oracle on row {:?}",
            plan.root,
            now_ms,
            row
        );
    }
    Ok(())
}

fn check(plan: &Plan, rows: &[Vec<FactValue>]) {
    if let Err(error) = assert_matches_oracle(plan, rows, NOW_MS) {
        panic!("{error}");
    }
}

/// Checks a one-fact plan over rows of one value each.
fn check_single(fact: Fact, root: Node, values: Vec<FactValue>) {
    let rows: Vec<Vec<FactValue>> = values.into_iter().map(|v| vec![v]).collect();
    check(&plan(vec![fact], root), &rows);
}

fn property(key: &str) -> Fact {
    Fact::Property { key: key.into() }
}

fn event(name: &str, within_secs: Option<u64>) -> Fact {
    Fact::EventCount {
        event: name.into(),
        within_secs,
        filter: None,
    }
}

fn plan(facts: Vec<Fact>, root: Node) -> Plan {
    Plan {
        facts,
        root,
        time_based: false,
    }
}

fn prop_test(test: PropertyTest) -> Node {
    Node::Prop { fact: 0, test }
}

fn prop_cmp(cmp: CmpOp, value: Literal) -> Node {
    prop_test(PropertyTest::Compare { cmp, value })
}

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
        FactValue::String("professional plan, yearly".into()),
        FactValue::Array(vec![]),
        FactValue::Array(vec![json!("pro")]),
        FactValue::Array(vec![
            json!(1),
            json!(null),
            json!(["pro"]),
            json!({"pro": 1}),
        ]),
        FactValue::Array(vec![json!(""), json!(true), json!("é")]),
        FactValue::Object,
        FactValue::Count(0),
        FactValue::Count(7),
        FactValue::Timestamp(NOW_MS),
    ]
}

#[test]
fn every_literal_type_against_every_value_type_and_operator() {
    let literals = [
        Literal::Str("pro".into()),
        Literal::Str(String::new()),
        Literal::Str("é".into()),
        Literal::Str("professional plan, yearly".into()),
        Literal::Num(0.0),
        Literal::Num(-0.0),
        Literal::Num(f64::NAN),
        Literal::Num(f64::INFINITY),
        Literal::Bool(true),
        Literal::Bool(false),
        Literal::Null,
    ];
    for literal in &literals {
        for op in CmpOp::ALL {
            check_single(
                property("p"),
                prop_cmp(op, literal.clone()),
                one_of_each_type(),
            );
        }
    }
}

#[test]
fn exists_and_not_exists_read_only_the_tag() {
    for test in [PropertyTest::Exists, PropertyTest::NotExists] {
        check_single(property("p"), prop_test(test), one_of_each_type());
    }
}

#[test]
fn contains_searches_substrings_and_array_elements() {
    let needles = [
        "",
        "pro",
        "o",
        "é",
        "\u{1F600}",
        "plan, yearly",
        "yearly!",
        "\u{0}",
    ];
    for needle in needles {
        let test = PropertyTest::Contains {
            value: needle.into(),
        };
        check_single(property("tags"), prop_test(test), one_of_each_type());
    }
    // Overlapping partial matches, and needles longer than a word of the 8-byte compare loop.
    let haystacks = [
        "aaaab",
        "aaab",
        "abababcab",
        "0123456789abcdef",
        "0123456789abcdeX",
    ];
    for needle in ["aab", "ababc", "0123456789abcdef", "456789abcde"] {
        check_single(
            property("text"),
            prop_test(PropertyTest::Contains {
                value: needle.into(),
            }),
            haystacks
                .iter()
                .map(|h| FactValue::String((*h).into()))
                .collect(),
        );
    }
}

#[test]
fn starts_with_is_a_byte_prefix_of_strings_only() {
    for prefix in ["", "p", "pro", "pro\u{0}", "professional plan", "é", "x"] {
        check_single(
            property("p"),
            prop_test(PropertyTest::StartsWith {
                value: prefix.into(),
            }),
            one_of_each_type(),
        );
    }
}

#[test]
fn in_is_equality_with_any_literal() {
    let lists = [
        vec![],
        vec![Literal::Str("pro".into()), Literal::Str("team".into())],
        vec![Literal::Num(f64::NAN), Literal::Num(0.0)],
        vec![
            Literal::Null,
            Literal::Bool(false),
            Literal::Str(String::new()),
        ],
    ];
    for values in lists {
        check_single(
            property("p"),
            prop_test(PropertyTest::In { values }),
            one_of_each_type(),
        );
    }
}

#[test]
fn timestamps_compare_with_now_to_the_millisecond() {
    let offsets = [0, 1, -1, 14 * 86_400, -30 * 86_400];
    for offset_secs in offsets {
        let instant = NOW_MS + offset_secs * 1000;
        let values = [instant - 1, instant, instant + 1, i64::MIN, i64::MAX]
            .into_iter()
            .map(FactValue::Timestamp)
            .chain(one_of_each_type())
            .collect::<Vec<_>>();
        for op in CmpOp::ALL {
            let root = Node::PropNow {
                fact: 0,
                op,
                offset_secs,
            };
            check_single(
                Fact::PropertyTime {
                    key: "trial_ends_at".into(),
                },
                root,
                values.clone(),
            );
        }
    }
}

#[test]
fn now_plus_offset_saturates_like_the_oracle() {
    let huge_offsets = [i64::MAX, i64::MIN, i64::MAX / 1000, i64::MIN / 1000 - 1];
    let timestamps = [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX];
    for now_ms in [
        NOW_MS,
        i64::MAX - 1_000,
        i64::MIN + 1_000,
        i64::MAX,
        i64::MIN,
    ] {
        for offset_secs in huge_offsets.into_iter().chain([1, -1]) {
            for op in CmpOp::ALL {
                let rows: Vec<Vec<FactValue>> = timestamps
                    .iter()
                    .map(|ms| vec![FactValue::Timestamp(*ms)])
                    .collect();
                let root = Node::PropNow {
                    fact: 0,
                    op,
                    offset_secs,
                };
                let facts = vec![Fact::PropertyTime { key: "at".into() }];
                if let Err(error) = assert_matches_oracle(&plan(facts, root), &rows, now_ms) {
                    panic!("{error}");
                }
            }
        }
    }
}

#[test]
fn counts_compare_signed_and_other_tags_count_as_zero() {
    let values: Vec<FactValue> = [0, 1, -1, i64::MAX, i64::MIN]
        .into_iter()
        .map(FactValue::Count)
        .chain(one_of_each_type())
        .collect();
    for value in [0, 1, -1, i64::MAX, i64::MIN] {
        for op in CmpOp::ALL {
            check_single(
                event("login", Some(86_400)),
                Node::Count { fact: 0, op, value },
                values.clone(),
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
    for op in CmpOp::ALL {
        check_single(
            property("name"),
            prop_cmp(op, Literal::Str("é".into())),
            ["z", "é", "éa", "e\u{301}"]
                .into_iter()
                .map(|s| FactValue::String(s.into()))
                .collect(),
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
    let facts = vec![property("name"), event("e", None)];
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
fn arrays_larger_than_a_page_are_searched_whole() {
    // 2,000 rows of 40 elements: 1.28 MB of element slots, far past the module's first page.
    let tags: Vec<Value> = (0..40).map(|i| json!(format!("tag-{i}"))).collect();
    let rows: Vec<Vec<FactValue>> = (0..2_000)
        .map(|i| vec![FactValue::Array(tags[..(i % 41)].to_vec())])
        .collect();
    let root = prop_test(PropertyTest::Contains {
        value: "tag-39".into(),
    });
    check(&plan(vec![property("tags")], root), &rows);
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

const MAX_FACTS: usize = 6;

/// Strings that are prefixes, substrings and reorderings of each other, so that tests hit.
const STRINGS: [&str; 12] = [
    "",
    "a",
    "ab",
    "b",
    "pro",
    "é",
    "\u{1F600}x",
    "a\u{0}",
    "abcdefghij",
    "cdefghi",
    "abcdefghijk",
    "ab\u{e9}ab\u{e9}ab",
];

/// Offsets of `now() ± offset` leaves; timestamps are generated around the same instants.
const OFFSETS_SECS: [i64; 8] = [
    0,
    1,
    -1,
    86_400,
    -14 * 86_400,
    i64::MAX,
    i64::MIN,
    i64::MAX / 1000,
];

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(&STRINGS[..]).prop_map(str::to_owned),
        1 => "[abé]{0,10}",
        1 => "\\PC{0,6}",
    ]
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => proptest::sample::select(&[
            0.0, -0.0, 1.0, -1.0, 2.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e300,
            -1e300, f64::MIN_POSITIVE, 9_007_199_254_740_993.0, f64::MAX, f64::MIN,
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
    proptest::sample::select(&CmpOp::ALL[..])
}

fn literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        string().prop_map(Literal::Str),
        number().prop_map(Literal::Num),
        any::<bool>().prop_map(Literal::Bool),
        Just(Literal::Null),
    ]
}

fn property_test() -> impl Strategy<Value = PropertyTest> {
    prop_oneof![
        3 => (op(), literal()).prop_map(|(cmp, value)| PropertyTest::Compare { cmp, value }),
        1 => Just(PropertyTest::Exists),
        1 => Just(PropertyTest::NotExists),
        2 => string().prop_map(|value| PropertyTest::Contains { value }),
        1 => string().prop_map(|value| PropertyTest::StartsWith { value }),
        1 => prop::collection::vec(literal(), 0..4).prop_map(|values| PropertyTest::In { values }),
    ]
}

/// An array element: every JSON type, nested containers included.
fn json_element() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => string().prop_map(Value::from),
        1 => number().prop_map(|n| serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)),
        1 => any::<bool>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(json!(["a", 1])),
        1 => Just(json!([])),
        1 => Just(json!({"a": "a"})),
    ]
}

/// A timestamp on, or one millisecond either side of, some `now_ms + offset` instant, or an
/// extreme of i64.
fn timestamp(now_ms: i64) -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => (proptest::sample::select(&OFFSETS_SECS[..]), -1i64..=1).prop_map(
            move |(offset_secs, delta)| now_ms
                .saturating_add(offset_secs.saturating_mul(1000))
                .saturating_add(delta)
        ),
        1 => proptest::sample::select(&[i64::MIN, i64::MAX, i64::MIN + 1, i64::MAX - 1, 0][..]),
        1 => any::<i64>(),
    ]
}

fn fact_value(now_ms: i64) -> impl Strategy<Value = FactValue> {
    prop_oneof![
        1 => Just(FactValue::Missing),
        1 => Just(FactValue::Null),
        1 => any::<bool>().prop_map(FactValue::Bool),
        2 => number().prop_map(FactValue::Number),
        3 => string().prop_map(FactValue::String),
        2 => prop::collection::vec(json_element(), 0..5).prop_map(FactValue::Array),
        1 => Just(FactValue::Object),
        2 => count().prop_map(FactValue::Count),
        2 => timestamp(now_ms).prop_map(FactValue::Timestamp),
    ]
}

/// Leaves may read any slot: a count node over a property slot (or the reverse) must behave
/// like the oracle too.
fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        2 => (0..MAX_FACTS, op(), count()).prop_map(|(fact, op, value)| Node::Count { fact, op, value }),
        5 => (0..MAX_FACTS, property_test()).prop_map(|(fact, test)| Node::Prop { fact, test }),
        2 => (0..MAX_FACTS, op(), proptest::sample::select(&OFFSETS_SECS[..])).prop_map(
            |(fact, op, offset_secs)| Node::PropNow { fact, op, offset_secs }
        ),
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
    prop::collection::vec(0..3u8, MAX_FACTS).prop_map(|kinds| {
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| match kind {
                0 => event(&format!("event_{i}"), (i % 2 == 0).then_some(3_600)),
                1 => property(&format!("key_{i}")),
                _ => Fact::PropertyTime {
                    key: format!("time_{i}"),
                },
            })
            .collect()
    })
}

fn now_ms() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => Just(NOW_MS),
        1 => proptest::sample::select(&[0, i64::MAX - 1_000, i64::MIN + 1_000, i64::MAX, i64::MIN][..]),
    ]
}

/// An evaluation instant and rows of facts generated around it.
fn rows_at_now() -> impl Strategy<Value = (i64, Vec<Vec<FactValue>>)> {
    now_ms().prop_flat_map(|now_ms| {
        (
            Just(now_ms),
            prop::collection::vec(prop::collection::vec(fact_value(now_ms), MAX_FACTS), 1..32),
        )
    })
}

/// 10,000 random criteria by default (issue 3's acceptance); `PROPTEST_CASES` overrides.
const DEFAULT_CASES: u32 = 10_000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_CASES)
    ))]

    #[test]
    fn compiled_predicates_agree_with_the_reference_evaluator(
        facts in facts(),
        root in node(),
        (now_ms, rows) in rows_at_now(),
    ) {
        assert_matches_oracle(&plan(facts, root), &rows, now_ms)?;
    }

    /// The sweep's candidate rule: a user who satisfies the plan meets a requirement of every
    /// clause `required_facts` names (a count of at least so many, or a present property). Rows blank about half their facts, so clauses are often empty.
    #[test]
    fn users_lacking_a_required_fact_never_satisfy_the_plan(
        facts in facts(),
        root in node(),
        (now_ms, rows) in rows_at_now(),
        masks in prop::collection::vec(prop::collection::vec(any::<bool>(), MAX_FACTS), 32),
    ) {
        let plan = plan(facts, root);
        let blank = blank_facts(&plan.facts);
        let clauses = plan.required_facts();
        for (row, mask) in rows.iter().zip(&masks) {
            let row: Vec<FactValue> = row
                .iter()
                .zip(mask)
                .zip(&blank)
                .map(|((value, &blanked), blank)| if blanked { blank.clone() } else { value.clone() })
                .collect();
            // Counts of events are never negative; the generated rows hold any integer.
            let negative = row.iter().any(|value| matches!(value, FactValue::Count(c) if *c < 0));
            if negative || !evaluate(&plan, &row, now_ms) {
                continue;
            }
            for clause in &clauses {
                prop_assert!(
                    clause.iter().any(|requirement| {
                        let value = &row[requirement.fact];
                        match (&plan.facts[requirement.fact], value) {
                            (Fact::EventCount { .. }, FactValue::Count(count)) => {
                                *count >= requirement.at_least
                            }
                            _ => *value != blank[requirement.fact],
                        }
                    }),
                    "{:?} satisfies {:?} with every fact of clause {:?} blank", row, plan.root, clause
                );
            }
        }
    }
}
