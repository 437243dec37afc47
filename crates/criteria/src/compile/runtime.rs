//! The functions every generated module carries besides `membrane_eval`: the ABI's version and
//! allocator exports, and the byte-string helpers the node code calls. Each builder documents
//! its signature; indices are in [`super::func`].

use wasm_encoder::{BlockType, Function, InstructionSink, ValType};

use super::{func, memory_arg, SlotFields, PAGE_BYTES};
use membrane_abi::{tag, ABI_VERSION, SLOT_BYTES};

pub(super) fn abi_version_function() -> Function {
    let mut f = Function::new([]);
    f.instructions().i32_const(ABI_VERSION as i32).end();
    f
}

/// `membrane_alloc(bytes)`: hands out `[heap_base, heap_base + bytes)`, growing memory as
/// needed; returns -1 for a negative size or when memory cannot grow.
pub(super) fn alloc_function(heap_base: u32) -> Function {
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
pub(super) fn compare_bytes_function() -> Function {
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
    increment(&mut sink, INDEX, 1);
    sink.br(0).end().end();
    push_three_way(&mut sink, A_LEN, B_LEN);
    sink.end();
    f
}

/// Pushes `(a > b) - (a < b)` for unsigned i32 locals.
fn push_three_way(sink: &mut InstructionSink<'_>, a: u32, b: u32) {
    sink.local_get(a)
        .local_get(b)
        .i32_gt_u()
        .local_get(a)
        .local_get(b)
        .i32_lt_u()
        .i32_sub();
}

/// `local += amount` (wrapping; callers keep it in range).
fn increment(sink: &mut InstructionSink<'_>, local: u32, amount: i32) {
    sink.local_get(local)
        .i32_const(amount)
        .i32_add()
        .local_set(local);
}

/// `bytes_equal(a, b, len)`: 1 when the `len` bytes at `a` and at `b` are equal. Compares
/// eight bytes at a time (wasm loads may be unaligned), then the tail byte by byte.
pub(super) fn bytes_equal_function() -> Function {
    const A: u32 = 0;
    const B: u32 = 1;
    const LEN: u32 = 2;
    const WORD: u32 = 8;
    let mut f = Function::new([]);
    let mut sink = f.instructions();
    sink.block(BlockType::Empty)
        .loop_(BlockType::Empty)
        .local_get(LEN)
        .i32_const(WORD as i32)
        .i32_lt_u()
        .br_if(1)
        .local_get(A)
        .i64_load(memory_arg(0, 0))
        .local_get(B)
        .i64_load(memory_arg(0, 0))
        .i64_ne()
        .if_(BlockType::Empty)
        .i32_const(0)
        .return_()
        .end();
    increment(&mut sink, A, WORD as i32);
    increment(&mut sink, B, WORD as i32);
    increment(&mut sink, LEN, -(WORD as i32));
    sink.br(0).end().end();
    sink.block(BlockType::Empty)
        .loop_(BlockType::Empty)
        .local_get(LEN)
        .i32_eqz()
        .br_if(1)
        .local_get(A)
        .i32_load8_u(memory_arg(0, 0))
        .local_get(B)
        .i32_load8_u(memory_arg(0, 0))
        .i32_ne()
        .if_(BlockType::Empty)
        .i32_const(0)
        .return_()
        .end();
    increment(&mut sink, A, 1);
    increment(&mut sink, B, 1);
    increment(&mut sink, LEN, -1);
    sink.br(0).end().end();
    sink.i32_const(1).end();
    f
}

/// `contains_bytes(haystack, haystack_len, needle, needle_len)`: 1 when the needle occurs at
/// some byte offset of the haystack; the empty needle occurs everywhere.
pub(super) fn contains_bytes_function() -> Function {
    const HAYSTACK: u32 = 0;
    const HAYSTACK_LEN: u32 = 1;
    const NEEDLE: u32 = 2;
    const NEEDLE_LEN: u32 = 3;
    const START: u32 = 4;
    const LAST_START: u32 = 5;
    let mut f = Function::new([(2, ValType::I32)]);
    let mut sink = f.instructions();
    sink.local_get(NEEDLE_LEN)
        .local_get(HAYSTACK_LEN)
        .i32_gt_u()
        .if_(BlockType::Empty)
        .i32_const(0)
        .return_()
        .end();
    sink.local_get(HAYSTACK_LEN)
        .local_get(NEEDLE_LEN)
        .i32_sub()
        .local_set(LAST_START);
    // Try every start in 0..=last_start.
    sink.block(BlockType::Empty)
        .loop_(BlockType::Empty)
        .local_get(HAYSTACK)
        .local_get(START)
        .i32_add()
        .local_get(NEEDLE)
        .local_get(NEEDLE_LEN)
        .call(func::BYTES_EQUAL)
        .if_(BlockType::Empty)
        .i32_const(1)
        .return_()
        .end()
        .local_get(START)
        .local_get(LAST_START)
        .i32_ge_u()
        .br_if(1);
    increment(&mut sink, START, 1);
    sink.br(0).end().end();
    sink.i32_const(0).end();
    f
}

/// `array_has_string(elements, count, needle, needle_len)`: 1 when one of the `count` element
/// slots at `elements` is a string equal to the needle (elements of other types never match).
pub(super) fn array_has_string_function() -> Function {
    const ELEMENT: u32 = 0;
    const REMAINING: u32 = 1;
    const NEEDLE: u32 = 2;
    const NEEDLE_LEN: u32 = 3;
    let element = SlotFields::AT_ADDRESS;
    let mut f = Function::new([]);
    let mut sink = f.instructions();
    sink.block(BlockType::Empty)
        .loop_(BlockType::Empty)
        .local_get(REMAINING)
        .i32_eqz()
        .br_if(1);
    sink.local_get(ELEMENT)
        .i32_load(element.tag())
        .i32_const(tag::STRING as i32)
        .i32_eq()
        .local_get(ELEMENT)
        .i32_load(element.len())
        .local_get(NEEDLE_LEN)
        .i32_eq()
        .i32_and()
        .if_(BlockType::Empty)
        .local_get(ELEMENT)
        .i32_load(element.address())
        .local_get(NEEDLE)
        .local_get(NEEDLE_LEN)
        .call(func::BYTES_EQUAL)
        .if_(BlockType::Empty)
        .i32_const(1)
        .return_()
        .end()
        .end();
    increment(&mut sink, ELEMENT, SLOT_BYTES as i32);
    increment(&mut sink, REMAINING, -1);
    sink.br(0).end().end();
    sink.i32_const(0).end();
    f
}
