//! A 6-leaf composite predicate over 10k users per call: the compiled WASM predicate against the
//! reference evaluator and a hand-written native closure. Criterion reports throughput in users
//! (evaluations) per second.
//!
//! Each evaluator starts from facts as gathered, in its natural form: the store gathers straight
//! into a `FactBatch` (the ABI's slot layout), which is what the engine hands the predicate; the
//! reference evaluator and the native closure read `FactValue` rows.
//!
//! `compiled_wasm_batch` is end to end (`Predicate::evaluate_batch`: checking out a pooled
//! instance, copying each segment into guest memory and patching its string addresses, the
//! guest loop and reading the results back). To see where that time goes, `host_write_into`
//! times `Segment::write_into` alone into an already-touched buffer (as the host does into a
//! pooled instance's memory) and `compiled_wasm_one_user` the per-call fixed cost; the guest's
//! share is what remains.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use membrane_abi::{Fact, FactBatch, FactValue, PropertyTest};
use membrane_criteria::ast::{CmpOp, Literal};
use membrane_criteria::compile::compile;
use membrane_criteria::eval::evaluate;
use membrane_criteria::plan::{Node, Plan};
use membrane_wasm::{Engine, Limits};

const USERS: usize = 10_000;
const NOW_MS: i64 = 1_700_000_000_000;

/// `(purchases >= 3 or plan == "pro") and age >= 18 and not country == "FR"
///  and logins_7d > 0 and score < 50.5`
fn composite_plan() -> Plan {
    let property = |key: &str| Fact::Property { key: key.into() };
    let prop = |fact, cmp, value| Node::Prop {
        fact,
        test: PropertyTest::Compare { cmp, value },
    };
    let events = |event: &str, within_secs| Fact::EventCount {
        event: event.into(),
        within_secs,
        filter: None,
    };
    Plan {
        facts: vec![
            events("purchase", None),
            property("plan"),
            property("age"),
            property("country"),
            events("login", Some(7 * 86_400)),
            property("score"),
        ],
        root: Node::And(vec![
            Node::Or(vec![
                Node::Count {
                    fact: 0,
                    op: CmpOp::Ge,
                    value: 3,
                },
                prop(1, CmpOp::Eq, Literal::Str("pro".into())),
            ]),
            prop(2, CmpOp::Ge, Literal::Num(18.0)),
            Node::Not(Box::new(prop(3, CmpOp::Eq, Literal::Str("FR".into())))),
            Node::Count {
                fact: 4,
                op: CmpOp::Gt,
                value: 0,
            },
            prop(5, CmpOp::Lt, Literal::Num(50.5)),
        ]),
        time_based: true,
    }
}

/// The same predicate written by hand, the floor for any evaluator.
fn native(row: &[FactValue]) -> bool {
    let count = |value: &FactValue| match value {
        FactValue::Count(c) => *c,
        _ => 0,
    };
    let number = |value: &FactValue| match value {
        FactValue::Number(n) => Some(*n),
        _ => None,
    };
    (count(&row[0]) >= 3 || matches!(&row[1], FactValue::String(s) if s == "pro"))
        && number(&row[2]).is_some_and(|age| age >= 18.0)
        && !matches!(&row[3], FactValue::String(s) if s == "FR")
        && count(&row[4]) > 0
        && number(&row[5]).is_some_and(|score| score < 50.5)
}

/// Deterministic pseudo-random users (a small LCG; no need for a rand dependency).
fn users() -> Vec<Vec<FactValue>> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |modulus: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % modulus
    };
    (0..USERS)
        .map(|_| {
            let plans = ["free", "pro", "team"];
            let countries = ["FR", "DE", "US", "JP"];
            vec![
                FactValue::Count(next(6) as i64),
                FactValue::String(plans[next(3) as usize].into()),
                match next(10) {
                    0 => FactValue::Missing,
                    _ => FactValue::Number(next(80) as f64),
                },
                FactValue::String(countries[next(4) as usize].into()),
                FactValue::Count(next(3) as i64),
                FactValue::Number(next(1000) as f64 / 10.0),
            ]
        })
        .collect()
}

fn bench_composite(c: &mut Criterion) {
    let plan = composite_plan();
    let rows = users();
    let engine = Engine::new(Limits::default()).expect("engine starts");
    let predicate = engine.load(&compile(&plan).wasm).expect("predicate loads");
    let batch = FactBatch::from_rows(plan.facts.len(), &rows);

    let expected: Vec<bool> = rows
        .iter()
        .map(|row| evaluate(&plan, row, NOW_MS))
        .collect();
    assert_eq!(
        predicate.evaluate_batch(&batch, NOW_MS).expect("runs"),
        expected
    );
    assert_eq!(
        rows.iter().map(|row| native(row)).collect::<Vec<_>>(),
        expected
    );
    let members = expected.iter().filter(|m| **m).count();
    println!("6-leaf composite: {members} of {USERS} users are members");

    let mut group = c.benchmark_group("six_leaf_composite_10k_users");
    group.throughput(Throughput::Elements(USERS as u64));
    group.bench_function("compiled_wasm_batch", |b| {
        b.iter(|| {
            predicate
                .evaluate_batch(black_box(&batch), NOW_MS)
                .expect("runs")
        })
    });
    let segments = batch.segments();
    let mut buffer = vec![0u8; segments[0].layout().total_bytes()];
    group.bench_function("host_write_into", |b| {
        b.iter(|| {
            for segment in black_box(segments) {
                segment.write_into(&mut buffer, 1024);
            }
        })
    });
    group.bench_function("reference_evaluator", |b| {
        b.iter(|| {
            black_box(&rows)
                .iter()
                .map(|row| evaluate(&plan, row, NOW_MS))
                .collect::<Vec<_>>()
        })
    });
    group.bench_function("native_closure", |b| {
        b.iter(|| {
            black_box(&rows)
                .iter()
                .map(|row| native(row))
                .collect::<Vec<_>>()
        })
    });
    group.finish();

    // Per-call fixed cost, reported per call rather than per user.
    let one_user = FactBatch::from_rows(plan.facts.len(), &rows[..1]);
    c.bench_function("compiled_wasm_one_user", |b| {
        b.iter(|| {
            predicate
                .evaluate_batch(black_box(&one_user), NOW_MS)
                .expect("runs")
        })
    });
}

criterion_group!(benches, bench_composite);
criterion_main!(benches);
