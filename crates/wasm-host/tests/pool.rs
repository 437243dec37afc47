//! Pooled instances: an instance that failed is never reused, and concurrent callers of one
//! predicate each get correct results.
//!
//! The guest here remembers failures: a call that traps or times out first sets a `poisoned`
//! global, and every later `membrane_eval` on a poisoned instance returns error code
//! [`POISONED`]. So a correct result after a failure proves the failed instance was discarded.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use membrane_abi::{tag, Fact, FactManifest, FactValue, FACTS_SECTION};
use membrane_wasm::{Engine, EvalError, Limits, Predicate};
use wasm_encoder::{
    BlockType, CodeSection, ConstExpr, CustomSection, ExportKind, ExportSection, Function,
    FunctionSection, GlobalSection, GlobalType, InstructionSink, MemArg, MemArgTarget,
    MemorySection, MemoryType, Module, TypeSection, ValType,
};

const LIMITS: Limits = Limits {
    max_memory_bytes: 16 << 20,
    max_module_bytes: 256 << 10,
    time_budget: Duration::from_millis(100),
};

/// A count that makes the guest poison itself and trap.
const TRAP_COUNT: i64 = -1;
/// A count that makes the guest poison itself and loop forever.
const HANG_COUNT: i64 = -2;
/// What `membrane_eval` returns on an instance that failed before.
const POISONED: i32 = 99;

/// Parameters of `membrane_eval`, then its locals.
const INPUT: u32 = 0;
const USERS: u32 = 1;
const OUT: u32 = 2;
const USER: u32 = 4;
const COUNT: u32 = 5;
const POISONED_GLOBAL: u32 = 0;

fn memory_arg(offset: u64, align: u32) -> MemArg {
    MemArg {
        offset,
        align,
        target: MemArgTarget::Memory(0),
        ordering: None,
    }
}

/// Member iff the user's event count is positive; see the module docs for the failure counts.
fn poisonable_eval(sink: &mut InstructionSink<'_>) {
    sink.global_get(POISONED_GLOBAL)
        .if_(BlockType::Empty)
        .i32_const(POISONED)
        .return_()
        .end();
    sink.block(BlockType::Empty)
        .loop_(BlockType::Empty)
        .local_get(USER)
        .local_get(USERS)
        .i32_ge_s()
        .br_if(1);
    // COUNT = the row's payload, or 0 when the slot is not a count.
    sink.local_get(INPUT)
        .local_get(USER)
        .i32_const(16)
        .i32_mul()
        .i32_add()
        .i64_load(memory_arg(8, 3))
        .i64_const(0)
        .local_get(INPUT)
        .local_get(USER)
        .i32_const(16)
        .i32_mul()
        .i32_add()
        .i32_load(memory_arg(0, 2))
        .i32_const(tag::COUNT as i32)
        .i32_eq()
        .select()
        .local_set(COUNT);
    for (trigger, fail) in [
        (TRAP_COUNT, trap as fn(&mut InstructionSink<'_>)),
        (HANG_COUNT, hang),
    ] {
        sink.local_get(COUNT)
            .i64_const(trigger)
            .i64_eq()
            .if_(BlockType::Empty)
            .i32_const(1)
            .global_set(POISONED_GLOBAL);
        fail(sink);
        sink.end();
    }
    sink.local_get(OUT)
        .local_get(USER)
        .i32_add()
        .local_get(COUNT)
        .i64_const(0)
        .i64_gt_s()
        .i32_store8(memory_arg(0, 0))
        .local_get(USER)
        .i32_const(1)
        .i32_add()
        .local_set(USER)
        .br(0)
        .end()
        .end()
        .i32_const(0);
}

fn trap(sink: &mut InstructionSink<'_>) {
    sink.unreachable();
}

fn hang(sink: &mut InstructionSink<'_>) {
    sink.loop_(BlockType::Empty).br(0).end();
}

fn poisonable_module() -> Vec<u8> {
    let mut module = Module::new();
    let manifest = FactManifest::new(vec![Fact::EventCount {
        event: "purchase".into(),
        within_secs: None,
        filter: None,
    }])
    .to_json();
    module.section(&CustomSection {
        name: FACTS_SECTION.into(),
        data: manifest.as_bytes().into(),
    });
    let mut types = TypeSection::new();
    types.ty().function([], [ValType::I32]);
    types.ty().function([ValType::I32], [ValType::I32]);
    types.ty().function(
        [ValType::I32, ValType::I32, ValType::I32, ValType::I64],
        [ValType::I32],
    );
    module.section(&types);
    let mut functions = FunctionSection::new();
    functions.function(0).function(1).function(2);
    module.section(&functions);
    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: 16,
        maximum: Some(16),
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    module.section(&memories);
    let mut globals = GlobalSection::new();
    globals.global(
        GlobalType {
            val_type: ValType::I32,
            mutable: true,
            shared: false,
        },
        &ConstExpr::i32_const(0),
    );
    module.section(&globals);
    let mut exports = ExportSection::new();
    exports
        .export("memory", ExportKind::Memory, 0)
        .export("membrane_abi_version", ExportKind::Func, 0)
        .export("membrane_alloc", ExportKind::Func, 1)
        .export("membrane_eval", ExportKind::Func, 2);
    module.section(&exports);

    let mut code = CodeSection::new();
    let mut version = Function::new([]);
    version.instructions().i32_const(1).end();
    code.function(&version);
    // The whole 1 MiB memory is the one buffer; larger requests fail.
    let mut alloc = Function::new([]);
    alloc
        .instructions()
        .local_get(0)
        .i32_const(1 << 20)
        .i32_gt_u()
        .if_(BlockType::Empty)
        .i32_const(-1)
        .return_()
        .end()
        .i32_const(0)
        .end();
    code.function(&alloc);
    let mut eval = Function::new([(1, ValType::I32), (1, ValType::I64)]);
    poisonable_eval(&mut eval.instructions());
    eval.instructions().end();
    code.function(&eval);
    module.section(&code);
    module.finish()
}

fn load() -> Predicate {
    Engine::new(LIMITS)
        .expect("engine starts")
        .load(&poisonable_module())
        .expect("the poisonable module loads")
}

fn count_rows(counts: impl IntoIterator<Item = i64>) -> Vec<Vec<FactValue>> {
    counts
        .into_iter()
        .map(|count| vec![FactValue::Count(count)])
        .collect()
}

fn good_rows() -> Vec<Vec<FactValue>> {
    let mut rows = count_rows([0, 3, 1, 0]);
    rows.push(vec![FactValue::Null]);
    rows
}

const GOOD_RESULTS: [bool; 5] = [false, true, true, false, false];

#[test]
fn a_trap_discards_the_pooled_instance() {
    let predicate = load();
    assert_eq!(
        predicate.evaluate(&good_rows(), 0),
        Ok(GOOD_RESULTS.to_vec())
    );
    let error = predicate
        .evaluate(&count_rows([1, TRAP_COUNT]), 0)
        .expect_err("the guest traps");
    assert!(matches!(error, EvalError::Trap { .. }), "{error}");
    assert_eq!(
        predicate.evaluate(&good_rows(), 0),
        Ok(GOOD_RESULTS.to_vec())
    );
}

#[test]
fn a_timeout_discards_the_pooled_instance() {
    let predicate = load();
    assert_eq!(
        predicate.evaluate(&good_rows(), 0),
        Ok(GOOD_RESULTS.to_vec())
    );
    let error = predicate
        .evaluate(&count_rows([HANG_COUNT]), 0)
        .expect_err("the guest hangs");
    assert!(matches!(error, EvalError::Timeout { .. }), "{error}");
    assert_eq!(
        predicate.evaluate(&good_rows(), 0),
        Ok(GOOD_RESULTS.to_vec())
    );
}

#[test]
fn concurrent_callers_get_their_own_results_while_another_keeps_trapping() {
    let predicate = Arc::new(load());
    let evaluators: Vec<_> = (0..4_i64)
        .map(|thread| {
            let predicate = Arc::clone(&predicate);
            thread::spawn(move || {
                for round in 0..200_i64 {
                    // Each thread and round has its own pattern, so a mixed-up result shows.
                    let counts: Vec<i64> =
                        (0..64).map(|user| (user + thread + round) % 3).collect();
                    let expected: Vec<bool> = counts.iter().map(|&count| count > 0).collect();
                    assert_eq!(predicate.evaluate(&count_rows(counts), 0), Ok(expected));
                }
            })
        })
        .collect();
    let trapper = {
        let predicate = Arc::clone(&predicate);
        thread::spawn(move || {
            for _ in 0..50 {
                let error = predicate
                    .evaluate(&count_rows([2, TRAP_COUNT]), 0)
                    .expect_err("the guest traps");
                assert!(matches!(error, EvalError::Trap { .. }), "{error}");
            }
        })
    };
    for evaluator in evaluators {
        evaluator.join().expect("no evaluator failed");
    }
    trapper.join().expect("every trap was reported");
}

#[test]
fn a_batch_of_several_chunks_keeps_its_order() {
    let predicate = load();
    // More users than one chunk holds, with a pattern that does not align with chunk edges.
    let counts: Vec<i64> = (0..10_007).map(|user| user % 7 % 2).collect();
    let expected: Vec<bool> = counts.iter().map(|&count| count > 0).collect();
    assert_eq!(predicate.evaluate(&count_rows(counts), 0), Ok(expected));
}
