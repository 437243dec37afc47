extern crate std;

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use membrane_abi::{encode_batch, CmpOp, EventFilter, Fact, FactManifest, FactValue, PropertyTest};

use serde_json::json;

use super::*;

static BIG_ORDER: Filter = Filter::All(&[
    Filter::Test("amount", Test::Compare(Cmp::Ge, Literal::Int(-100))),
    Filter::Not(&Filter::Test(
        "note",
        Test::In(&[
            Literal::Str("q\"uo\\te\n"),
            Literal::Null,
            Literal::Bool(true),
        ]),
    )),
]);

facts! {
    ORDERS = event_count("order").within(days(90)).filter(&BIG_ORDER);
    PLAN = property("plan");
    TRIAL_ENDS = property_time("trial_ends_at");
    TAGS = property("tags");
}

/// Member when the plan is "pro", or it has ordered at least `min_orders` times, or the tags
/// contain "vip", or the trial has ended.
struct Sample {
    min_orders: i64,
}

#[derive(serde::Deserialize)]
struct SampleConfig {
    min_orders: i64,
}

impl Plugin for Sample {
    const FACTS: &'static [FactSpec] = FACTS;
    type Config = SampleConfig;

    fn new(config: SampleConfig) -> Result<Self, String> {
        if config.min_orders < 1 {
            return Err("min_orders must be at least 1".into());
        }
        Ok(Sample {
            min_orders: config.min_orders,
        })
    }

    fn evaluate(&self, row: &Row<'_>, now_ms: i64) -> bool {
        row.str(PLAN) == Some("pro")
            || row.count(ORDERS) >= self.min_orders
            || row.array(TAGS).is_some_and(|tags| tags.contains_str("vip"))
            || row.timestamp(TRIAL_ENDS).is_some_and(|ends| ends <= now_ms)
    }
}

fn rendered_manifest(facts: &[FactSpec]) -> Vec<u8> {
    const CAPACITY: usize = 4096;
    let rendered = ManifestJson::<CAPACITY>::render(facts);
    assert!(rendered.len() <= CAPACITY);
    rendered.written().to_vec()
}

#[test]
fn the_const_manifest_is_what_the_host_parses() {
    let json = rendered_manifest(FACTS);
    let manifest = FactManifest::from_json(&json)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&json)));
    let expected_filter = EventFilter::All {
        of: vec![
            EventFilter::Test {
                key: "amount".into(),
                test: PropertyTest::Compare {
                    cmp: CmpOp::Ge,
                    value: membrane_abi::Literal::Num(-100.0),
                },
            },
            EventFilter::Not {
                filter: std::boxed::Box::new(EventFilter::Test {
                    key: "note".into(),
                    test: PropertyTest::In {
                        values: vec![
                            membrane_abi::Literal::Str("q\"uo\\te\n".into()),
                            membrane_abi::Literal::Null,
                            membrane_abi::Literal::Bool(true),
                        ],
                    },
                }),
            },
        ],
    };
    assert_eq!(
        manifest,
        FactManifest::new(vec![
            Fact::EventCount {
                event: "order".into(),
                within_secs: Some(90 * 86_400),
                filter: Some(expected_filter),
            },
            Fact::Property { key: "plan".into() },
            Fact::PropertyTime {
                key: "trial_ends_at".into()
            },
            Fact::Property { key: "tags".into() },
        ])
    );
}

#[test]
fn every_filter_test_renders_to_the_abi_form() {
    static TESTS: [Filter; 5] = [
        Filter::Test("a", Test::Exists),
        Filter::Test("b", Test::NotExists),
        Filter::Test("c", Test::Contains("x")),
        Filter::Test("d", Test::StartsWith("y")),
        Filter::Test("e", Test::Compare(Cmp::Ne, Literal::Int(i64::MIN))),
    ];
    static ANY: Filter = Filter::Any(&TESTS);
    let json = rendered_manifest(&[event_count("e").filter(&ANY)]);
    let manifest = FactManifest::from_json(&json).expect("parses");
    let Fact::EventCount {
        filter: Some(EventFilter::Any { of }),
        ..
    } = &manifest.facts[0]
    else {
        panic!("{manifest:?}");
    };
    let tests: Vec<&PropertyTest> = of
        .iter()
        .map(|filter| match filter {
            EventFilter::Test { test, .. } => test,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        tests,
        [
            &PropertyTest::Exists,
            &PropertyTest::NotExists,
            &PropertyTest::Contains { value: "x".into() },
            &PropertyTest::StartsWith { value: "y".into() },
            &PropertyTest::Compare {
                cmp: CmpOp::Ne,
                value: membrane_abi::Literal::Num(i64::MIN as f64)
            },
        ]
    );
}

fn run(plugin: &Sample, rows: &[Vec<FactValue>], now_ms: i64) -> Vec<bool> {
    // A non-zero base checks that addresses are read relative to it.
    let base = 4096;
    let (_, bytes) = encode_batch(base, FACTS.len(), rows);
    let mut out = vec![7u8; rows.len()];
    evaluate_batch(
        plugin,
        &Batch::new(&bytes, base.into(), FACTS.len()),
        &mut out,
        now_ms,
    )
    .expect("evaluates");
    out.into_iter().map(|byte| byte == 1).collect()
}

#[test]
fn rows_read_every_kind_of_value() {
    let plugin = configure::<Sample>(br#"{"min_orders": 2}"#).expect("configures");
    let blank = || {
        vec![
            FactValue::Count(0),
            FactValue::Missing,
            FactValue::Missing,
            FactValue::Missing,
        ]
    };
    let with = |index: usize, value: FactValue| {
        let mut row = blank();
        row[index] = value;
        row
    };
    let rows = vec![
        blank(),
        with(0, FactValue::Count(2)),
        with(0, FactValue::Count(1)),
        with(1, FactValue::String("pro".into())),
        with(1, FactValue::String("prö".into())),
        with(2, FactValue::Timestamp(1_000)),
        with(2, FactValue::Timestamp(1_001)),
        with(
            3,
            FactValue::Array(vec![
                json!("a"),
                json!(1),
                json!(null),
                json!(["vip"]),
                json!("vip"),
            ]),
        ),
        with(3, FactValue::Array(vec![json!(["vip"]), json!("v")])),
    ];
    assert_eq!(
        run(&plugin, &rows, 1_000),
        [false, true, false, true, false, true, false, true, false]
    );
}

#[test]
fn config_errors_are_explained() {
    let missing = configure::<Sample>(b"{}").err().expect("rejected");
    assert!(missing.contains("min_orders"), "{missing}");
    let invalid = configure::<Sample>(br#"{"min_orders": 0}"#)
        .err()
        .expect("rejected");
    assert_eq!(invalid, "min_orders must be at least 1");
    let not_json = configure::<Sample>(b"{").err().expect("rejected");
    assert!(not_json.starts_with("invalid [config]"), "{not_json}");
}
