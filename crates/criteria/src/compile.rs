//! Compiles a [`Plan`] to a WebAssembly predicate module under the membrane ABI v1
//! (see `membrane_abi`). The generated code must agree exactly with [`crate::eval::evaluate`].
//!
//! Memory layout of a generated module:
//! `[string literals at 0..][bump area handed out by membrane_alloc ...]`. The bump area starts
//! at the first 16-byte boundary after the literals; every `membrane_alloc` call hands out that
//! same base (the ABI only promises a buffer valid until the next call).

use std::collections::HashMap;

use wasm_encoder::{
    BlockType, CodeSection, ConstExpr, CustomSection, DataSection, ExportKind, ExportSection,
    Function, FunctionSection, Instruction, MemArg, MemArgTarget, MemorySection, MemoryType,
    Module, TypeSection, ValType,
};

use crate::ast::{CmpOp, Literal};
use crate::plan::{Node, Plan};
use membrane_abi::{tag, FactManifest, ABI_VERSION, SLOT_BYTES};

/// The largest memory a generated module declares (1 GiB). The host enforces its own, usually
/// smaller, cap on top of this.
pub const MAX_MEMORY_PAGES: u64 = 16_384;
const PAGE_BYTES: u64 = 65_536;
/// Alignment of the bump area, so that slots written by the host are naturally aligned.
const HEAP_ALIGN: u32 = 16;

/// A compiled predicate: the module bytes and the manifest embedded in them.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledModule {
    pub wasm: Vec<u8>,
    pub manifest: FactManifest,
}

/// Function indices, in the order the functions are declared.
mod func {
    pub const ABI_VERSION: u32 = 0;
    pub const ALLOC: u32 = 1;
    pub const EVAL: u32 = 2;
    pub const COMPARE_BYTES: u32 = 3;
}

/// Type indices, in the order the types are declared.
mod ty {
    /// `() -> i32`
    pub const VERSION: u32 = 0;
    /// `(bytes: i32) -> i32`
    pub const ALLOC: u32 = 1;
    /// `(input: i32, users: i32, out: i32, now_ms: i64) -> i32`
    pub const EVAL: u32 = 2;
    /// `(a: i32, a_len: i32, b: i32, b_len: i32) -> i32`
    pub const COMPARE_BYTES: u32 = 3;
}

pub fn compile(plan: &Plan) -> CompiledModule {
    let manifest = plan.manifest();
    let mut literals = LiteralPool::default();
    let eval = eval_function(plan, &mut literals);
    let heap_base = literals.bytes.len().next_multiple_of(HEAP_ALIGN as usize) as u32;
    let initial_pages = (u64::from(heap_base).max(1)).div_ceil(PAGE_BYTES);

    let mut module = Module::new();
    module.section(&CustomSection {
        name: membrane_abi::FACTS_SECTION.into(),
        data: manifest.to_json().into_bytes().into(),
    });

    let mut types = TypeSection::new();
    types.ty().function([], [ValType::I32]);
    types.ty().function([ValType::I32], [ValType::I32]);
    types.ty().function(
        [ValType::I32, ValType::I32, ValType::I32, ValType::I64],
        [ValType::I32],
    );
    types.ty().function([ValType::I32; 4], [ValType::I32]);
    module.section(&types);

    let mut functions = FunctionSection::new();
    for type_index in [ty::VERSION, ty::ALLOC, ty::EVAL, ty::COMPARE_BYTES] {
        functions.function(type_index);
    }
    module.section(&functions);

    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: initial_pages,
        maximum: Some(MAX_MEMORY_PAGES),
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    module.section(&memories);

    let mut exports = ExportSection::new();
    exports.export(membrane_abi::EXPORT_MEMORY, ExportKind::Memory, 0);
    exports.export(
        membrane_abi::EXPORT_VERSION,
        ExportKind::Func,
        func::ABI_VERSION,
    );
    exports.export(membrane_abi::EXPORT_ALLOC, ExportKind::Func, func::ALLOC);
    exports.export(membrane_abi::EXPORT_EVAL, ExportKind::Func, func::EVAL);
    module.section(&exports);

    let mut code = CodeSection::new();
    code.function(&abi_version_function());
    code.function(&alloc_function(heap_base));
    code.function(&eval);
    code.function(&compare_bytes_function());
    module.section(&code);

    if !literals.bytes.is_empty() {
        let mut data = DataSection::new();
        data.active(0, &ConstExpr::i32_const(0), literals.bytes.iter().copied());
        module.section(&data);
    }

    CompiledModule {
        wasm: module.finish(),
        manifest,
    }
}

/// String literals laid out from address 0, each distinct literal once.
#[derive(Default)]
struct LiteralPool {
    bytes: Vec<u8>,
    addresses: HashMap<String, u32>,
}

impl LiteralPool {
    fn address_of(&mut self, literal: &str) -> u32 {
        if let Some(address) = self.addresses.get(literal) {
            return *address;
        }
        let address = self.bytes.len() as u32;
        self.bytes.extend_from_slice(literal.as_bytes());
        self.addresses.insert(literal.to_owned(), address);
        address
    }
}

fn abi_version_function() -> Function {
    let mut f = Function::new([]);
    f.instructions().i32_const(ABI_VERSION as i32).end();
    f
}

/// `membrane_alloc(bytes)`: hands out `[heap_base, heap_base + bytes)`, growing memory as
/// needed; returns -1 for a negative size or when memory cannot grow.
fn alloc_function(heap_base: u32) -> Function {
    const BYTES: u32 = 0;
    const END: u32 = 1; // i64: heap_base + bytes, computed in 64 bits so it cannot wrap
    let mut f = Function::new([(1, ValType::I64)]);
    let mut sink = f.instructions();
    sink.local_get(BYTES)
        .i32_const(0)
        .i32_lt_s()
        .if_(BlockType::Empty)
        .i32_const(-1)
        .return_()
        .end();
    sink.i64_const(i64::from(heap_base))
        .local_get(BYTES)
        .i64_extend_i32_u()
        .i64_add()
        .local_tee(END);
    // Compare with the current size in bytes; grow by the missing pages, rounded up.
    sink.memory_size(0)
        .i64_extend_i32_u()
        .i64_const(16)
        .i64_shl()
        .i64_gt_u()
        .if_(BlockType::Empty)
        .local_get(END)
        .memory_size(0)
        .i64_extend_i32_u()
        .i64_const(16)
        .i64_shl()
        .i64_sub()
        .i64_const(PAGE_BYTES as i64 - 1)
        .i64_add()
        .i64_const(16)
        .i64_shr_u()
        .i32_wrap_i64()
        .memory_grow(0)
        .i32_const(-1)
        .i32_eq()
        .if_(BlockType::Empty)
        .i32_const(-1)
        .return_()
        .end()
        .end();
    sink.i32_const(heap_base as i32).end();
    f
}

/// `compare_bytes(a, a_len, b, b_len)`: -1, 0 or 1 comparing the byte strings
/// lexicographically, then by length (Rust's `[u8]` ordering).
fn compare_bytes_function() -> Function {
    const A: u32 = 0;
    const A_LEN: u32 = 1;
    const B: u32 = 2;
    const B_LEN: u32 = 3;
    const INDEX: u32 = 4;
    const COMMON_LEN: u32 = 5;
    const A_BYTE: u32 = 6;
    const B_BYTE: u32 = 7;
    let byte = memory_arg(0, 0);
    let mut f = Function::new([(4, ValType::I32)]);
    let mut sink = f.instructions();
    // common_len = min(a_len, b_len), unsigned
    sink.local_get(A_LEN)
        .local_get(B_LEN)
        .local_get(A_LEN)
        .local_get(B_LEN)
        .i32_lt_u()
        .select()
        .local_set(COMMON_LEN);
    sink.block(BlockType::Empty)
        .loop_(BlockType::Empty)
        .local_get(INDEX)
        .local_get(COMMON_LEN)
        .i32_ge_u()
        .br_if(1);
    sink.local_get(A)
        .local_get(INDEX)
        .i32_add()
        .i32_load8_u(byte)
        .local_set(A_BYTE)
        .local_get(B)
        .local_get(INDEX)
        .i32_add()
        .i32_load8_u(byte)
        .local_tee(B_BYTE)
        .local_get(A_BYTE)
        .i32_ne()
        .if_(BlockType::Empty);
    push_three_way(&mut sink, A_BYTE, B_BYTE);
    sink.return_().end();
    sink.local_get(INDEX)
        .i32_const(1)
        .i32_add()
        .local_set(INDEX)
        .br(0)
        .end()
        .end();
    push_three_way(&mut sink, A_LEN, B_LEN);
    sink.end();
    f
}

/// Pushes `(a > b) - (a < b)` for unsigned i32 locals.
fn push_three_way(sink: &mut wasm_encoder::InstructionSink<'_>, a: u32, b: u32) {
    sink.local_get(a)
        .local_get(b)
        .i32_gt_u()
        .local_get(a)
        .local_get(b)
        .i32_lt_u()
        .i32_sub();
}

/// `membrane_eval(input, users, out, now_ms)`: evaluates the plan for each row and stores one
/// result byte per user.
fn eval_function(plan: &Plan, literals: &mut LiteralPool) -> Function {
    const INPUT: u32 = 0;
    const USERS: u32 = 1;
    const OUT: u32 = 2;
    const USER: u32 = 4;
    let row_stride = (plan.facts.len() * SLOT_BYTES) as i32;

    let mut codegen = NodeCodegen {
        f: Function::new([(2, ValType::I32)]),
        literals,
    };
    codegen
        .f
        .instructions()
        .block(BlockType::Empty)
        .loop_(BlockType::Empty)
        .local_get(USER)
        .local_get(USERS)
        .i32_ge_s()
        .br_if(1)
        // result address, consumed by the store below
        .local_get(OUT)
        .local_get(USER)
        .i32_add()
        .local_get(INPUT)
        .local_get(USER)
        .i32_const(row_stride)
        .i32_mul()
        .i32_add()
        .local_set(NodeCodegen::ROW);
    codegen.node(&plan.root);
    codegen
        .f
        .instructions()
        .i32_store8(memory_arg(0, 0))
        .local_get(USER)
        .i32_const(1)
        .i32_add()
        .local_set(USER)
        .br(0)
        .end()
        .end()
        .i32_const(0)
        .end();
    codegen.f
}

/// Emits code for plan nodes inside `membrane_eval`. Every node leaves one i32 (0 or 1) on the
/// stack and reads its facts relative to the current row address in local [`Self::ROW`].
struct NodeCodegen<'a> {
    f: Function,
    literals: &'a mut LiteralPool,
}

/// How the operands of a comparison are typed on the wasm stack.
#[derive(Clone, Copy)]
enum Operands {
    /// Signed i32 (also used for `compare_bytes` results and booleans).
    I32,
    /// Signed i64 (event counts).
    I64,
    /// f64 with IEEE semantics: every comparison with NaN is false except `!=`, matching
    /// `partial_cmp` returning `None` in the oracle.
    F64,
}

impl NodeCodegen<'_> {
    const ROW: u32 = 5;

    fn node(&mut self, node: &Node) {
        match node {
            Node::And(items) => self.and(items),
            Node::Or(items) => self.or(items),
            Node::Not(inner) => self.not(inner),
            Node::Count { fact, op, value } => self.count(*fact, *op, *value),
            Node::PropCmp { fact, op, value } => self.prop_cmp(*fact, *op, value),
        }
    }

    /// `a and b and c` as `a ? (b ? c : 0) : 0`: later items run only if earlier ones hold.
    fn and(&mut self, items: &[Node]) {
        match items.split_first() {
            None => {
                self.f.instructions().i32_const(1);
            }
            Some((only, [])) => self.node(only),
            Some((first, rest)) => {
                self.node(first);
                self.f.instructions().if_(BlockType::Result(ValType::I32));
                self.and(rest);
                self.f.instructions().else_().i32_const(0).end();
            }
        }
    }

    /// `a or b or c` as `a ? 1 : (b ? 1 : c)`.
    fn or(&mut self, items: &[Node]) {
        match items.split_first() {
            None => {
                self.f.instructions().i32_const(0);
            }
            Some((only, [])) => self.node(only),
            Some((first, rest)) => {
                self.node(first);
                self.f
                    .instructions()
                    .if_(BlockType::Result(ValType::I32))
                    .i32_const(1)
                    .else_();
                self.or(rest);
                self.f.instructions().end();
            }
        }
    }

    fn not(&mut self, inner: &Node) {
        self.node(inner);
        self.f.instructions().i32_eqz();
    }

    /// A count slot; any other tag counts as 0, like the oracle.
    fn count(&mut self, fact: usize, op: CmpOp, value: i64) {
        self.f
            .instructions()
            .local_get(Self::ROW)
            .i64_load(slot_payload(fact, 3))
            .i64_const(0);
        self.push_tag_is(fact, tag::COUNT);
        self.f.instructions().select().i64_const(value);
        self.compare(op, Operands::I64);
    }

    /// A property against a literal: the typed comparison when the slot holds the literal's
    /// type, otherwise `op == !=`.
    fn prop_cmp(&mut self, fact: usize, op: CmpOp, literal: &Literal) {
        let is_equality = matches!(op, CmpOp::Eq | CmpOp::Ne);
        match literal {
            Literal::Num(number) => self.typed_cmp(fact, tag::NUMBER, op, |this| {
                this.f
                    .instructions()
                    .local_get(Self::ROW)
                    .f64_load(slot_payload(fact, 3))
                    .f64_const((*number).into());
                Operands::F64
            }),
            Literal::Str(text) => {
                let address = self.literals.address_of(text);
                self.typed_cmp(fact, tag::STRING, op, |this| {
                    this.f
                        .instructions()
                        .local_get(Self::ROW)
                        .i32_load(slot_payload(fact, 2))
                        .local_get(Self::ROW)
                        .i32_load(slot_len(fact))
                        .i32_const(address as i32)
                        .i32_const(text.len() as i32)
                        .call(func::COMPARE_BYTES)
                        .i32_const(0);
                    Operands::I32
                })
            }
            Literal::Bool(expected) if is_equality => self.typed_cmp(fact, tag::BOOL, op, |this| {
                this.f
                    .instructions()
                    .local_get(Self::ROW)
                    .i64_load(slot_payload(fact, 3))
                    .i64_const(0)
                    .i64_ne()
                    .i32_const(i32::from(*expected));
                Operands::I32
            }),
            Literal::Null if is_equality => self.typed_cmp(fact, tag::NULL, op, |this| {
                this.f.instructions().i32_const(0).i32_const(0);
                Operands::I32
            }),
            // Booleans and null have no order: `<` and friends never hold.
            Literal::Bool(_) | Literal::Null => {
                self.f.instructions().i32_const(0);
            }
        }
    }

    /// `tag == expected_tag ? <operands> <op> : (op == !=)`. `push_operands` pushes both
    /// operands and says how they are typed.
    fn typed_cmp(
        &mut self,
        fact: usize,
        expected_tag: u32,
        op: CmpOp,
        push_operands: impl FnOnce(&mut Self) -> Operands,
    ) {
        self.push_tag_is(fact, expected_tag);
        self.f.instructions().if_(BlockType::Result(ValType::I32));
        let operands = push_operands(self);
        self.compare(op, operands);
        self.f
            .instructions()
            .else_()
            .i32_const(i32::from(op == CmpOp::Ne))
            .end();
    }

    fn push_tag_is(&mut self, fact: usize, expected_tag: u32) {
        self.f
            .instructions()
            .local_get(Self::ROW)
            .i32_load(slot_tag(fact))
            .i32_const(expected_tag as i32)
            .i32_eq();
    }

    fn compare(&mut self, op: CmpOp, operands: Operands) {
        use Instruction as I;
        let instruction = match (operands, op) {
            (Operands::I32, CmpOp::Eq) => I::I32Eq,
            (Operands::I32, CmpOp::Ne) => I::I32Ne,
            (Operands::I32, CmpOp::Lt) => I::I32LtS,
            (Operands::I32, CmpOp::Le) => I::I32LeS,
            (Operands::I32, CmpOp::Gt) => I::I32GtS,
            (Operands::I32, CmpOp::Ge) => I::I32GeS,
            (Operands::I64, CmpOp::Eq) => I::I64Eq,
            (Operands::I64, CmpOp::Ne) => I::I64Ne,
            (Operands::I64, CmpOp::Lt) => I::I64LtS,
            (Operands::I64, CmpOp::Le) => I::I64LeS,
            (Operands::I64, CmpOp::Gt) => I::I64GtS,
            (Operands::I64, CmpOp::Ge) => I::I64GeS,
            (Operands::F64, CmpOp::Eq) => I::F64Eq,
            (Operands::F64, CmpOp::Ne) => I::F64Ne,
            (Operands::F64, CmpOp::Lt) => I::F64Lt,
            (Operands::F64, CmpOp::Le) => I::F64Le,
            (Operands::F64, CmpOp::Gt) => I::F64Gt,
            (Operands::F64, CmpOp::Ge) => I::F64Ge,
        };
        self.f.instruction(&instruction);
    }
}

/// An access to memory 0 at `offset` from the address operand; `align` is log2 bytes.
fn memory_arg(offset: u64, align: u32) -> MemArg {
    MemArg {
        offset,
        align,
        target: MemArgTarget::Memory(0),
        ordering: None,
    }
}

fn slot_offset(fact: usize) -> u64 {
    (fact * SLOT_BYTES) as u64
}

/// The slot's tag, at bytes 0..4.
fn slot_tag(fact: usize) -> MemArg {
    memory_arg(slot_offset(fact), 2)
}

/// The slot's byte length, at bytes 4..8.
fn slot_len(fact: usize) -> MemArg {
    memory_arg(slot_offset(fact) + 4, 2)
}

/// The slot's payload, at bytes 8..16, read with the given alignment (log2 bytes): 3 for the
/// whole 64-bit word, 2 for its low 32 bits (a string address).
fn slot_payload(fact: usize, align: u32) -> MemArg {
    memory_arg(slot_offset(fact) + 8, align)
}
