//! Compiles a [`Plan`] to a WebAssembly predicate module under the membrane ABI v1
//! (see `membrane_abi`). The generated code must agree exactly with [`crate::eval::evaluate`].
//!
//! - [`runtime`] builds the functions every module carries: the ABI exports other than
//!   `membrane_eval`, and the byte-string helpers (compare, equality, substring, array search).
//! - [`nodes`] builds `membrane_eval`: a loop over the batch's rows with one code generator per
//!   plan node kind.
//!
//! Memory layout of a generated module:
//! `[string literals at 0..][bump area handed out by membrane_alloc ...]`. The bump area starts
//! at the first 16-byte boundary after the literals; every `membrane_alloc` call hands out that
//! same base (the ABI only promises a buffer valid until the next call).

mod nodes;
mod runtime;

use std::collections::HashMap;

use wasm_encoder::{
    CodeSection, ConstExpr, CustomSection, DataSection, ExportKind, ExportSection, FunctionSection,
    MemArg, MemArgTarget, MemorySection, MemoryType, Module, TypeSection, ValType,
};

use crate::plan::Plan;
use membrane_abi::{FactManifest, SLOT_BYTES};

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
    /// `(a, a_len, b, b_len) -> -1 | 0 | 1`: Rust's `[u8]` ordering.
    pub const COMPARE_BYTES: u32 = 3;
    /// `(a, b, len) -> 0 | 1`: the `len` bytes at `a` and `b` are equal.
    pub const BYTES_EQUAL: u32 = 4;
    /// `(haystack, haystack_len, needle, needle_len) -> 0 | 1`: byte substring search.
    pub const CONTAINS_BYTES: u32 = 5;
    /// `(elements, count, needle, needle_len) -> 0 | 1`: some element slot is that string.
    pub const ARRAY_HAS_STRING: u32 = 6;
}

/// Type indices, in the order the types are declared.
mod ty {
    /// `() -> i32`
    pub const VERSION: u32 = 0;
    /// `(bytes: i32) -> i32`
    pub const ALLOC: u32 = 1;
    /// `(input: i32, users: i32, out: i32, now_ms: i64) -> i32`
    pub const EVAL: u32 = 2;
    /// `(i32, i32, i32) -> i32`
    pub const THREE_I32: u32 = 3;
    /// `(i32, i32, i32, i32) -> i32`
    pub const FOUR_I32: u32 = 4;
}

pub fn compile(plan: &Plan) -> CompiledModule {
    let manifest = plan.manifest();
    let mut literals = LiteralPool::default();
    let eval = nodes::eval_function(plan, &mut literals);
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
    types.ty().function([ValType::I32; 3], [ValType::I32]);
    types.ty().function([ValType::I32; 4], [ValType::I32]);
    module.section(&types);

    // (type, body) in function index order; see `func`.
    let bodies = [
        (ty::VERSION, runtime::abi_version_function()),
        (ty::ALLOC, runtime::alloc_function(heap_base)),
        (ty::EVAL, eval),
        (ty::FOUR_I32, runtime::compare_bytes_function()),
        (ty::THREE_I32, runtime::bytes_equal_function()),
        (ty::FOUR_I32, runtime::contains_bytes_function()),
        (ty::FOUR_I32, runtime::array_has_string_function()),
    ];
    let mut functions = FunctionSection::new();
    for (type_index, _) in &bodies {
        functions.function(*type_index);
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
    for (_, body) in &bodies {
        code.function(body);
    }
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

/// An access to memory 0 at `offset` from the address operand; `align` is log2 bytes.
fn memory_arg(offset: u64, align: u32) -> MemArg {
    MemArg {
        offset,
        align,
        target: MemArgTarget::Memory(0),
        ordering: None,
    }
}

/// Where a slot's fields sit relative to the address of the slot (or of its row, for a fact
/// slot at `base = fact * SLOT_BYTES`).
#[derive(Clone, Copy)]
struct SlotFields {
    base: u64,
}

impl SlotFields {
    /// The slot of fact `fact` inside a row.
    fn of_fact(fact: usize) -> Self {
        SlotFields {
            base: (fact * SLOT_BYTES) as u64,
        }
    }

    /// A slot addressed directly (an array element).
    const AT_ADDRESS: SlotFields = SlotFields { base: 0 };

    /// The tag, at bytes 0..4.
    fn tag(self) -> MemArg {
        memory_arg(self.base, 2)
    }

    /// The byte length (strings) or element count (arrays), at bytes 4..8.
    fn len(self) -> MemArg {
        memory_arg(self.base + 4, 2)
    }

    /// The whole 64-bit payload, at bytes 8..16.
    fn payload(self) -> MemArg {
        memory_arg(self.base + 8, 3)
    }

    /// The low 32 bits of the payload: a guest address (strings, array elements).
    fn address(self) -> MemArg {
        memory_arg(self.base + 8, 2)
    }
}
