//! Hostile and broken predicate modules: each is refused at load or contained at evaluate with
//! a precise error, in bounded time, and the engine keeps serving good predicates afterwards.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use membrane_abi::{tag, Fact, FactManifest, FactValue, FACTS_SECTION};
use membrane_wasm::{Engine, EvalError, Limits, LoadError, Predicate};
use wasm_encoder::{
    BlockType, CodeSection, CustomSection, EntityType, ExportKind, ExportSection, Function,
    FunctionSection, ImportSection, InstructionSink, MemArg, MemArgTarget, MemorySection,
    MemoryType, Module, TypeSection, ValType,
};

const LIMITS: Limits = Limits {
    max_memory_bytes: 16 << 20,
    max_module_bytes: 256 << 10,
    time_budget: Duration::from_millis(100),
};

/// Every hostile case must be settled well within this, timeouts included.
const SETTLED_WITHIN: Duration = Duration::from_secs(10);

static ENGINE: LazyLock<Engine> = LazyLock::new(|| Engine::new(LIMITS).expect("engine starts"));

/// Emits a function body; receives the function's own index (for self-recursion).
type Body = fn(&mut InstructionSink<'_>, u32);

/// A predicate module under construction. The default is a well-behaved predicate over one
/// event-count fact: member iff the count is positive.
struct Guest {
    imports: Vec<(&'static str, &'static str)>,
    facts_section: Option<Vec<u8>>,
    version: Body,
    alloc: Body,
    eval: Body,
    eval_params: Vec<ValType>,
    memory: MemoryType,
    export_alloc: bool,
    /// More exports, as (name, which function: 0 version, 1 alloc, 2 eval).
    extra_exports: Vec<(&'static str, u32)>,
    padding_bytes: usize,
}

const EVAL_PARAMS: [ValType; 4] = [ValType::I32, ValType::I32, ValType::I32, ValType::I64];
/// Locals of `membrane_eval` after its parameters.
const USER: u32 = 4;
const ROW: u32 = 5;

fn memory_arg(offset: u64, align: u32) -> MemArg {
    MemArg {
        offset,
        align,
        target: MemArgTarget::Memory(0),
        ordering: None,
    }
}

fn good_manifest() -> Vec<u8> {
    FactManifest::new(vec![Fact::EventCount {
        event: "purchase".into(),
        within_secs: None,
        filter: None,
    }])
    .to_json()
    .into_bytes()
}

fn returns_abi_version(sink: &mut InstructionSink<'_>, _: u32) {
    sink.i32_const(1);
}

/// Hands out address 0 for up to 1 MiB (the memory's fixed size), -1 beyond.
fn fixed_buffer_alloc(sink: &mut InstructionSink<'_>, _: u32) {
    sink.local_get(0)
        .i32_const(1 << 20)
        .i32_gt_u()
        .if_(BlockType::Empty)
        .i32_const(-1)
        .return_()
        .end()
        .i32_const(0);
}

/// `out[user] = slot0.tag == COUNT && slot0.count > 0` for every user.
fn positive_count_eval(sink: &mut InstructionSink<'_>, _: u32) {
    each_user(sink, |sink| {
        sink.local_get(ROW)
            .i32_load(memory_arg(0, 2))
            .i32_const(tag::COUNT as i32)
            .i32_eq()
            .local_get(ROW)
            .i64_load(memory_arg(8, 3))
            .i64_const(0)
            .i64_gt_s()
            .i32_and();
    });
}

/// Loops over the users (one 16-byte fact per row), storing the i32 `result` pushes for each.
fn each_user(sink: &mut InstructionSink<'_>, result: impl Fn(&mut InstructionSink<'_>)) {
    sink.block(BlockType::Empty)
        .loop_(BlockType::Empty)
        .local_get(USER)
        .local_get(1)
        .i32_ge_s()
        .br_if(1)
        .local_get(2)
        .local_get(USER)
        .i32_add()
        .local_get(0)
        .local_get(USER)
        .i32_const(16)
        .i32_mul()
        .i32_add()
        .local_set(ROW);
    result(sink);
    sink.i32_store8(memory_arg(0, 0))
        .local_get(USER)
        .i32_const(1)
        .i32_add()
        .local_set(USER)
        .br(0)
        .end()
        .end()
        .i32_const(0);
}

impl Default for Guest {
    fn default() -> Self {
        Guest {
            imports: Vec::new(),
            facts_section: Some(good_manifest()),
            version: returns_abi_version,
            alloc: fixed_buffer_alloc,
            eval: positive_count_eval,
            eval_params: EVAL_PARAMS.to_vec(),
            memory: MemoryType {
                minimum: 16,
                maximum: Some(16),
                memory64: false,
                shared: false,
                page_size_log2: None,
            },
            export_alloc: true,
            extra_exports: Vec::new(),
            padding_bytes: 0,
        }
    }
}

impl Guest {
    fn with_eval(eval: Body) -> Self {
        Guest {
            eval,
            ..Guest::default()
        }
    }

    fn build(&self) -> Vec<u8> {
        let mut module = Module::new();
        if let Some(facts) = &self.facts_section {
            module.section(&CustomSection {
                name: FACTS_SECTION.into(),
                data: facts.as_slice().into(),
            });
        }
        let mut types = TypeSection::new();
        types.ty().function([], [ValType::I32]);
        types.ty().function([ValType::I32], [ValType::I32]);
        types
            .ty()
            .function(self.eval_params.iter().copied(), [ValType::I32]);
        types.ty().function([], []);
        module.section(&types);

        if !self.imports.is_empty() {
            let mut imports = ImportSection::new();
            for (module_name, name) in &self.imports {
                imports.import(module_name, name, EntityType::Function(3));
            }
            module.section(&imports);
        }
        let first = self.imports.len() as u32;
        let (version, alloc, eval) = (first, first + 1, first + 2);

        let mut functions = FunctionSection::new();
        functions.function(0).function(1).function(2);
        module.section(&functions);
        let mut memories = MemorySection::new();
        memories.memory(self.memory);
        module.section(&memories);

        let mut exports = ExportSection::new();
        exports.export("memory", ExportKind::Memory, 0);
        exports.export("membrane_abi_version", ExportKind::Func, version);
        if self.export_alloc {
            exports.export("membrane_alloc", ExportKind::Func, alloc);
        }
        exports.export("membrane_eval", ExportKind::Func, eval);
        for (name, function) in &self.extra_exports {
            exports.export(name, ExportKind::Func, version + function);
        }
        module.section(&exports);

        let mut code = CodeSection::new();
        for (body, index, locals) in [
            (self.version, version, 0),
            (self.alloc, alloc, 0),
            (self.eval, eval, 2),
        ] {
            let mut function = Function::new([(locals, ValType::I32)]);
            body(&mut function.instructions(), index);
            function.instructions().end();
            code.function(&function);
        }
        module.section(&code);

        if self.padding_bytes > 0 {
            module.section(&CustomSection {
                name: "padding".into(),
                data: vec![0u8; self.padding_bytes].into(),
            });
        }
        module.finish()
    }
}

fn load(guest: &Guest) -> Result<Predicate, LoadError> {
    ENGINE.load(&guest.build())
}

fn sample_rows() -> Vec<Vec<FactValue>> {
    [
        FactValue::Count(0),
        FactValue::Count(3),
        FactValue::Null,
        FactValue::Count(-1),
    ]
    .into_iter()
    .map(|value| vec![value])
    .collect()
}

/// Runs a hostile case, checks it settled in bounded time, then checks the engine still runs a
/// good predicate correctly.
fn contained<T>(case: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let outcome = case();
    assert!(
        started.elapsed() < SETTLED_WITHIN,
        "the hostile case took {:?}",
        started.elapsed()
    );
    let good = load(&Guest::default()).expect("the good predicate loads");
    assert_eq!(
        good.evaluate(&sample_rows(), 0)
            .expect("the good predicate runs"),
        vec![false, true, false, false]
    );
    outcome
}

fn load_error(guest: Guest) -> LoadError {
    contained(|| match load(&guest) {
        Ok(_) => panic!("the module should have been refused"),
        Err(error) => {
            eprintln!("refused at load: {error}");
            error
        }
    })
}

fn eval_error(guest: Guest) -> EvalError {
    let predicate = load(&guest).expect("the module passes the load checks");
    contained(|| match predicate.evaluate(&sample_rows(), 0) {
        Ok(results) => panic!("evaluation should have failed, got {results:?}"),
        Err(error) => {
            eprintln!("contained at evaluate: {error}");
            error
        }
    })
}

#[test]
fn the_good_predicate_works() {
    let predicate = load(&Guest::default()).expect("loads");
    assert_eq!(predicate.manifest().facts.len(), 1);
    assert_eq!(
        predicate.evaluate(&sample_rows(), 0).expect("runs"),
        vec![false, true, false, false]
    );
}

#[test]
fn predicates_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Predicate>();
    assert_send_sync::<Arc<Predicate>>();
    assert_send_sync::<Engine>();
}

#[test]
fn an_infinite_loop_times_out() {
    let error = eval_error(Guest::with_eval(|sink, _| {
        sink.loop_(BlockType::Empty).br(0).end().unreachable();
    }));
    assert_eq!(
        error,
        EvalError::Timeout {
            call: "membrane_eval",
            budget: LIMITS.time_budget
        }
    );
    assert!(error.to_string().contains("time budget"), "{error}");
}

#[test]
fn unbounded_memory_growth_hits_the_cap() {
    let guest = Guest {
        eval: |sink, _| {
            sink.loop_(BlockType::Empty)
                .i32_const(1)
                .memory_grow(0)
                .drop()
                .br(0)
                .end()
                .unreachable();
        },
        memory: MemoryType {
            maximum: None,
            ..Guest::default().memory
        },
        ..Guest::default()
    };
    match eval_error(guest) {
        EvalError::MemoryLimit {
            call: "membrane_eval",
            requested,
            cap,
        } => {
            assert_eq!(cap, LIMITS.max_memory_bytes);
            assert!(requested > cap);
        }
        other => panic!("expected a memory error, got {other}"),
    }
}

#[test]
fn initial_memory_over_the_cap_fails_the_trial_run() {
    let guest = Guest {
        memory: MemoryType {
            minimum: 1024,
            maximum: None,
            ..Guest::default().memory
        },
        ..Guest::default()
    };
    match load_error(guest) {
        LoadError::TrialRun(EvalError::MemoryLimit {
            call: "instantiation",
            ..
        }) => {}
        other => panic!("expected a memory error at instantiation, got {other}"),
    }
}

#[test]
fn deep_recursion_is_a_stack_overflow_trap() {
    let error = eval_error(Guest::with_eval(|sink, own_index| {
        sink.local_get(0)
            .local_get(1)
            .local_get(2)
            .local_get(3)
            .call(own_index);
    }));
    match &error {
        EvalError::Trap {
            call: "membrane_eval",
            trap,
        } => assert!(trap.contains("stack"), "{trap}"),
        other => panic!("expected a trap, got {other}"),
    }
}

#[test]
fn unreachable_is_a_trap() {
    let error = eval_error(Guest::with_eval(|sink, _| {
        sink.unreachable();
    }));
    match &error {
        EvalError::Trap {
            call: "membrane_eval",
            trap,
        } => assert!(trap.contains("unreachable"), "{trap}"),
        other => panic!("expected a trap, got {other}"),
    }
}

#[test]
fn a_non_zero_return_is_an_error_code() {
    let error = eval_error(Guest::with_eval(|sink, _| {
        sink.i32_const(42);
    }));
    assert_eq!(
        error,
        EvalError::ErrorCode {
            code: 42,
            message: None
        }
    );
}

#[test]
fn a_result_byte_other_than_0_or_1_is_refused() {
    let error = eval_error(Guest::with_eval(|sink, _| {
        each_user(sink, |sink| {
            sink.i32_const(7);
        });
    }));
    assert_eq!(error, EvalError::BadResultByte { user: 0, byte: 7 });
}

#[test]
fn a_failed_or_out_of_bounds_alloc_is_refused() {
    let failing = Guest {
        alloc: |sink, _| {
            sink.i32_const(-1);
        },
        ..Guest::default()
    };
    assert!(matches!(
        eval_error(failing),
        EvalError::AllocFailed { returned: -1, .. }
    ));
    let out_of_bounds = Guest {
        alloc: |sink, _| {
            sink.i32_const((16 << 16) - 8);
        },
        ..Guest::default()
    };
    assert!(matches!(
        eval_error(out_of_bounds),
        EvalError::BufferOutOfBounds { .. }
    ));
}

#[test]
fn invalid_bytes_are_refused() {
    let error = contained(|| ENGINE.load(b"\0asm\x01\0\0\0garbage").unwrap_err());
    assert!(matches!(error, LoadError::Invalid(_)), "{error}");
    let error = contained(|| ENGINE.load(b"(module)").unwrap_err());
    assert!(matches!(error, LoadError::Invalid(_)), "{error}");
}

#[test]
fn any_import_is_refused() {
    let error = load_error(Guest {
        imports: vec![("wasi_snapshot_preview1", "fd_write")],
        ..Guest::default()
    });
    let message = error.to_string();
    assert!(
        message.contains("`wasi_snapshot_preview1::fd_write`"),
        "{message}"
    );
    assert!(message.contains("may not import anything"), "{message}");
}

#[test]
fn a_wrong_export_signature_is_refused() {
    let error = load_error(Guest {
        eval_params: vec![ValType::I32, ValType::I32, ValType::I32],
        eval: |sink, _| {
            sink.i32_const(0);
        },
        ..Guest::default()
    });
    let message = error.to_string();
    assert!(
        matches!(
            error,
            LoadError::WrongExport {
                name: "membrane_eval",
                ..
            }
        ),
        "{message}"
    );
    assert!(
        message.contains("(param i32 i32 i32 i64) (result i32)"),
        "{message}"
    );
}

#[test]
fn a_missing_export_is_refused() {
    let error = load_error(Guest {
        export_alloc: false,
        ..Guest::default()
    });
    assert!(
        matches!(
            error,
            LoadError::MissingExport {
                name: "membrane_alloc",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn an_oversized_module_is_refused() {
    let error = load_error(Guest {
        padding_bytes: LIMITS.max_module_bytes,
        ..Guest::default()
    });
    assert!(matches!(error, LoadError::TooLarge { .. }), "{error}");
}

#[test]
fn a_wrong_abi_version_is_refused() {
    let error = load_error(Guest {
        version: |sink, _| {
            sink.i32_const(2);
        },
        ..Guest::default()
    });
    assert!(
        matches!(
            error,
            LoadError::WrongAbiVersion {
                origin: "membrane_abi_version()",
                found: 2,
                ..
            }
        ),
        "{error}"
    );

    let mut manifest = FactManifest::new(Vec::new());
    manifest.abi = 2;
    let error = load_error(Guest {
        facts_section: Some(manifest.to_json().into_bytes()),
        ..Guest::default()
    });
    assert!(
        matches!(
            error,
            LoadError::WrongAbiVersion {
                origin: "the fact manifest",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn a_missing_or_invalid_facts_section_is_refused() {
    let error = load_error(Guest {
        facts_section: None,
        ..Guest::default()
    });
    assert!(
        matches!(error, LoadError::MissingFactsSection { .. }),
        "{error}"
    );
    let error = load_error(Guest {
        facts_section: Some(b"{\"abi\": 1, \"facts\": [{\"kind\": \"telepathy\"}]}".to_vec()),
        ..Guest::default()
    });
    assert!(
        matches!(error, LoadError::InvalidFactsSection { .. }),
        "{error}"
    );
}

#[test]
fn a_version_export_that_never_returns_fails_the_trial_run() {
    let error = load_error(Guest {
        version: |sink, _| {
            sink.loop_(BlockType::Empty).br(0).end().unreachable();
        },
        ..Guest::default()
    });
    assert!(
        matches!(
            error,
            LoadError::TrialRun(EvalError::Timeout {
                call: "membrane_abi_version",
                ..
            })
        ),
        "{error}"
    );
}

#[test]
fn rows_of_the_wrong_width_are_refused_before_running() {
    let predicate = load(&Guest::default()).expect("loads");
    let error = predicate
        .evaluate(&[vec![FactValue::Count(1), FactValue::Null]], 0)
        .unwrap_err();
    assert_eq!(
        error,
        EvalError::RowWidth {
            row: 0,
            found: 2,
            expected: 1
        }
    );
}

#[test]
fn a_predicate_outliving_its_engine_is_still_interrupted() {
    let engine = Engine::new(LIMITS).expect("engine starts");
    let predicate = engine
        .load(
            &Guest::with_eval(|sink, _| {
                sink.loop_(BlockType::Empty).br(0).end().unreachable();
            })
            .build(),
        )
        .expect("loads");
    drop(engine);
    let started = Instant::now();
    assert!(matches!(
        predicate.evaluate(&sample_rows(), 0),
        Err(EvalError::Timeout { .. })
    ));
    assert!(started.elapsed() < SETTLED_WITHIN);
}

/// A `[config]` can only go to a module that exports `membrane_configure`, with its exact
/// signature; an empty config needs no export.
#[test]
fn config_needs_a_well_typed_configure_export() {
    let config = serde_json::json!({"threshold": 2});
    let plain = Guest::default().build();
    let error = ENGINE.load_with_config(&plain, &config).unwrap_err();
    assert!(
        matches!(
            error,
            LoadError::ConfigNotAccepted {
                export: "membrane_configure"
            }
        ),
        "{error}"
    );
    ENGINE
        .load_with_config(&plain, &serde_json::json!({}))
        .expect("an empty config needs no export");

    let mistyped = Guest {
        extra_exports: vec![("membrane_configure", 1)],
        ..Guest::default()
    };
    let error = ENGINE
        .load_with_config(&mistyped.build(), &config)
        .unwrap_err();
    assert!(
        matches!(
            error,
            LoadError::WrongExport {
                name: "membrane_configure",
                ..
            }
        ),
        "{error}"
    );
}
