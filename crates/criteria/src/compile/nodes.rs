//! `membrane_eval`: the row loop and one code generator per plan node kind. Each generator
//! mirrors the matching arm of the reference evaluator (`crate::eval`) and says where the wasm
//! form differs in shape.

use wasm_encoder::{BlockType, Function, Instruction, ValType};

use super::{func, memory_arg, LiteralPool, SlotFields};
use crate::ast::{CmpOp, Literal};
use crate::plan::{Node, Plan};
use membrane_abi::{tag, PropertyTest, SLOT_BYTES};

/// `membrane_eval` parameters and locals.
mod local {
    pub const INPUT: u32 = 0;
    pub const USERS: u32 = 1;
    pub const OUT: u32 = 2;
    /// i64: the evaluation instant, Unix milliseconds.
    pub const NOW_MS: u32 = 3;
    /// i32: index of the current user.
    pub const USER: u32 = 4;
    /// i32: address of the current user's row.
    pub const ROW: u32 = 5;
    /// i32 scratch for one leaf: whether a string slot may be read.
    pub const GUARD: u32 = 6;
    /// i32 scratch for one leaf: the address of a string's bytes.
    pub const ADDRESS: u32 = 7;
    /// i64 locals from here on: one per distinct `now() ± offset` instant of the plan.
    pub const FIRST_INSTANT: u32 = 8;
}

/// Longest string literal compared inline (without a call and a loop per row).
const INLINE_MAX_BYTES: usize = 8;

/// `membrane_eval(input, users, out, now_ms)`: computes the plan's `now() ± offset` instants
/// once, then evaluates the plan for each row and stores one result byte per user.
pub(super) fn eval_function(plan: &Plan, literals: &mut LiteralPool) -> Function {
    let mut offsets_ms = Vec::new();
    collect_now_offsets(&plan.root, &mut offsets_ms);
    let row_stride = (plan.facts.len() * SLOT_BYTES) as i32;

    let mut codegen = NodeCodegen {
        f: Function::new([(4, ValType::I32), (offsets_ms.len() as u32, ValType::I64)]),
        literals,
        offsets_ms,
    };
    codegen.compute_instants();
    codegen
        .f
        .instructions()
        .local_get(local::INPUT)
        .local_set(local::ROW)
        .block(BlockType::Empty)
        .loop_(BlockType::Empty)
        .local_get(local::USER)
        .local_get(local::USERS)
        .i32_ge_s()
        .br_if(1)
        // The result address, consumed by the store after the node's value.
        .local_get(local::OUT)
        .local_get(local::USER)
        .i32_add();
    codegen.node(&plan.root);
    codegen
        .f
        .instructions()
        .i32_store8(memory_arg(0, 0))
        .local_get(local::ROW)
        .i32_const(row_stride)
        .i32_add()
        .local_set(local::ROW)
        .local_get(local::USER)
        .i32_const(1)
        .i32_add()
        .local_set(local::USER)
        .br(0)
        .end()
        .end()
        .i32_const(0)
        .end();
    codegen.f
}

/// The distinct `offset_secs * 1000` (saturating, as in the oracle) of every `PropNow` node.
fn collect_now_offsets(node: &Node, offsets_ms: &mut Vec<i64>) {
    match node {
        Node::And(items) | Node::Or(items) => {
            for item in items {
                collect_now_offsets(item, offsets_ms);
            }
        }
        Node::Not(inner) => collect_now_offsets(inner, offsets_ms),
        Node::PropNow { offset_secs, .. } => {
            let offset_ms = offset_secs.saturating_mul(1000);
            if !offsets_ms.contains(&offset_ms) {
                offsets_ms.push(offset_ms);
            }
        }
        Node::Count { .. } | Node::Prop { .. } => {}
    }
}

/// Whether a node's code has no branch at all: it reads only its row's slots (or a string
/// through an address made safe by `select`), so it can run whether or not it is needed. Such
/// items of an `and`/`or` are combined with `i32.and`/`i32.or` instead of short-circuiting,
/// which costs a few instructions but no branch to mispredict on unpredictable data.
fn branch_free(node: &Node) -> bool {
    match node {
        Node::And(items) | Node::Or(items) => items.iter().all(branch_free),
        Node::Not(inner) => branch_free(inner),
        Node::Count { .. } | Node::PropNow { .. } => true,
        Node::Prop { test, .. } => match test {
            PropertyTest::Compare { cmp, value } => comparison_branch_free(*cmp, value),
            PropertyTest::Exists | PropertyTest::NotExists => true,
            PropertyTest::In { values } => values
                .iter()
                .all(|value| comparison_branch_free(CmpOp::Eq, value)),
            PropertyTest::Contains { .. } | PropertyTest::StartsWith { .. } => false,
        },
    }
}

/// Every comparison but string ordering and (in)equality with a long string is branch-free.
fn comparison_branch_free(op: CmpOp, literal: &Literal) -> bool {
    match literal {
        Literal::Str(text) => matches!(op, CmpOp::Eq | CmpOp::Ne) && text.len() <= INLINE_MAX_BYTES,
        Literal::Num(_) | Literal::Bool(_) | Literal::Null => true,
    }
}

/// Emits code for plan nodes inside `membrane_eval`. Every node leaves one i32 (0 or 1) on the
/// stack and reads its facts relative to the current row address in [`local::ROW`]. No node
/// reads memory that may be outside the batch (a string's bytes are read only behind a check
/// of its tag and length), so any node can run eagerly.
struct NodeCodegen<'a> {
    f: Function,
    literals: &'a mut LiteralPool,
    /// `offsets_ms[i]` is held (added to `now_ms`) in local `FIRST_INSTANT + i`.
    offsets_ms: Vec<i64>,
}

/// How the items of an `and`/`or` combine.
#[derive(Clone, Copy)]
enum Combine {
    All,
    Any,
}

/// How the operands of a comparison are typed on the wasm stack.
#[derive(Clone, Copy)]
enum Operands {
    /// Signed i32 (also used for `compare_bytes` results and booleans).
    I32,
    /// Signed i64 (event counts, timestamps).
    I64,
    /// f64 with IEEE semantics: every comparison with NaN is false except `!=`, matching
    /// `partial_cmp` returning `None` in the oracle.
    F64,
}

/// What [`NodeCodegen::call_with_string`] passes before the literal's address and length.
#[derive(Clone, Copy)]
enum SlotArgs {
    /// The slot's string address: `bytes_equal(slot, literal, literal_len)`.
    Address,
    /// The slot's address and length (bytes or elements): the search helpers.
    AddressAndLen,
}

impl NodeCodegen<'_> {
    fn node(&mut self, node: &Node) {
        match node {
            Node::And(items) => self.combine(items, Combine::All),
            Node::Or(items) => self.combine(items, Combine::Any),
            Node::Not(inner) => {
                self.node(inner);
                self.f.instructions().i32_eqz();
            }
            Node::Count { fact, op, value } => self.count(*fact, *op, *value),
            Node::Prop { fact, test } => self.property(*fact, test),
            Node::PropNow {
                fact,
                op,
                offset_secs,
            } => self.prop_now(*fact, *op, *offset_secs),
        }
    }

    /// `all`/`any` of `items`: the branch-free items first, computed together with
    /// `i32.and`/`i32.or`, then the others, each run only when the outcome is still open.
    fn combine(&mut self, items: &[Node], combine: Combine) {
        let (eager, guarded): (Vec<&Node>, Vec<&Node>) =
            items.iter().partition(|item| branch_free(item));
        let eager_parts = usize::from(!eager.is_empty());
        let part = |this: &mut Self, index: usize| match index.checked_sub(eager_parts) {
            None => this.eagerly(eager.len(), combine, |this, i| this.node(eager[i])),
            Some(index) => this.node(guarded[index]),
        };
        match combine {
            Combine::All => self.all_of(eager_parts + guarded.len(), part),
            Combine::Any => self.any_of(eager_parts + guarded.len(), part),
        }
    }

    /// `count` (at least one) items combined without branches.
    fn eagerly(&mut self, count: usize, combine: Combine, mut item: impl FnMut(&mut Self, usize)) {
        for index in 0..count {
            item(self, index);
            if index > 0 {
                match combine {
                    Combine::All => self.f.instructions().i32_and(),
                    Combine::Any => self.f.instructions().i32_or(),
                };
            }
        }
    }

    /// `a and b and c` as `a ? (b ? c : 0) : 0`: later items run only if earlier ones hold.
    fn all_of(&mut self, count: usize, mut item: impl FnMut(&mut Self, usize)) {
        if count == 0 {
            self.f.instructions().i32_const(1);
            return;
        }
        item(self, 0);
        for index in 1..count {
            self.f.instructions().if_(BlockType::Result(ValType::I32));
            item(self, index);
        }
        for _ in 1..count {
            self.f.instructions().else_().i32_const(0).end();
        }
    }

    /// `a or b or c` as `a ? 1 : (b ? 1 : c)`.
    fn any_of(&mut self, count: usize, mut item: impl FnMut(&mut Self, usize)) {
        if count == 0 {
            self.f.instructions().i32_const(0);
            return;
        }
        item(self, 0);
        for index in 1..count {
            self.f
                .instructions()
                .if_(BlockType::Result(ValType::I32))
                .i32_const(1)
                .else_();
            item(self, index);
        }
        for _ in 1..count {
            self.f.instructions().end();
        }
    }

    /// With a condition on the stack: `condition ? then : 0`.
    fn and_then(&mut self, then: impl FnOnce(&mut Self)) {
        self.f.instructions().if_(BlockType::Result(ValType::I32));
        then(self);
        self.f.instructions().else_().i32_const(0).end();
    }

    /// A count slot; any other tag counts as 0, like the oracle.
    fn count(&mut self, fact: usize, op: CmpOp, value: i64) {
        let slot = SlotFields::of_fact(fact);
        self.f
            .instructions()
            .local_get(local::ROW)
            .i64_load(slot.payload())
            .i64_const(0);
        self.push_tag_is(fact, tag::COUNT);
        self.f.instructions().select().i64_const(value);
        self.push_op(op, Operands::I64);
    }

    fn property(&mut self, fact: usize, test: &PropertyTest) {
        match test {
            PropertyTest::Compare { cmp, value } => self.compare(fact, *cmp, value),
            PropertyTest::Exists => self.exists(fact),
            PropertyTest::NotExists => {
                self.exists(fact);
                self.f.instructions().i32_eqz();
            }
            PropertyTest::Contains { value } => self.contains(fact, value),
            PropertyTest::StartsWith { value } => self.starts_with(fact, value),
            PropertyTest::In { values } => {
                let compare = |this: &mut Self, i: usize| this.compare(fact, CmpOp::Eq, &values[i]);
                let branch_free = values
                    .iter()
                    .all(|value| comparison_branch_free(CmpOp::Eq, value));
                if !values.is_empty() && branch_free {
                    self.eagerly(values.len(), Combine::Any, compare)
                } else {
                    self.any_of(values.len(), compare)
                }
            }
        }
    }

    /// A property against a literal: the typed comparison when the slot holds the literal's
    /// type, otherwise `op == !=`.
    fn compare(&mut self, fact: usize, op: CmpOp, literal: &Literal) {
        let slot = SlotFields::of_fact(fact);
        let is_equality = matches!(op, CmpOp::Eq | CmpOp::Ne);
        match literal {
            Literal::Num(number) => self.typed_compare(fact, tag::NUMBER, op, |this| {
                this.f
                    .instructions()
                    .local_get(local::ROW)
                    .f64_load(slot.payload())
                    .f64_const((*number).into());
                this.push_op(op, Operands::F64);
            }),
            Literal::Str(text) if is_equality && text.len() <= INLINE_MAX_BYTES => {
                self.short_string_equals(fact, text);
                if op == CmpOp::Ne {
                    self.f.instructions().i32_eqz();
                }
            }
            Literal::Str(text) => self.guarded_compare(fact, tag::STRING, op, |this| {
                this.string_compare(fact, op, text)
            }),
            Literal::Bool(expected) if is_equality => {
                self.typed_compare(fact, tag::BOOL, op, |this| {
                    this.f
                        .instructions()
                        .local_get(local::ROW)
                        .i64_load(slot.payload())
                        .i64_const(0)
                        .i64_ne()
                        .i32_const(i32::from(*expected));
                    this.push_op(op, Operands::I32);
                })
            }
            // null == null: the ordering is `Equal`.
            Literal::Null if is_equality => self.typed_compare(fact, tag::NULL, op, |this| {
                this.f.instructions().i32_const(i32::from(op == CmpOp::Eq));
            }),
            // Booleans and null have no order: `<` and friends never hold.
            Literal::Bool(_) | Literal::Null => {
                self.f.instructions().i32_const(0);
            }
        }
    }

    /// `tag == expected_tag ? <comparison> : (op == !=)` as a `select`: `push_comparison`
    /// pushes the 0/1 outcome of the typed comparison, reading only the slot, so it may run on
    /// a slot of another type.
    fn typed_compare(
        &mut self,
        fact: usize,
        expected_tag: u32,
        op: CmpOp,
        push_comparison: impl FnOnce(&mut Self),
    ) {
        push_comparison(self);
        self.f.instructions().i32_const(i32::from(op == CmpOp::Ne));
        self.push_tag_is(fact, expected_tag);
        self.f.instructions().select();
    }

    /// [`Self::typed_compare`] for a comparison that reads through the slot's address: it runs
    /// only when the tag matches.
    fn guarded_compare(
        &mut self,
        fact: usize,
        expected_tag: u32,
        op: CmpOp,
        push_comparison: impl FnOnce(&mut Self),
    ) {
        self.push_tag_is(fact, expected_tag);
        self.f.instructions().if_(BlockType::Result(ValType::I32));
        push_comparison(self);
        self.f
            .instructions()
            .else_()
            .i32_const(i32::from(op == CmpOp::Ne))
            .end();
    }

    /// A string slot against a string literal. (In)equality needs no ordering, so it checks
    /// the length first and the bytes only when the lengths match.
    fn string_compare(&mut self, fact: usize, op: CmpOp, text: &str) {
        if matches!(op, CmpOp::Eq | CmpOp::Ne) {
            self.string_equals(fact, text);
            if op == CmpOp::Ne {
                self.f.instructions().i32_eqz();
            }
            return;
        }
        let slot = SlotFields::of_fact(fact);
        let address = self.literals.address_of(text);
        self.f
            .instructions()
            .local_get(local::ROW)
            .i32_load(slot.address())
            .local_get(local::ROW)
            .i32_load(slot.len())
            .i32_const(address as i32)
            .i32_const(text.len() as i32)
            .call(func::COMPARE_BYTES)
            .i32_const(0);
        self.push_op(op, Operands::I32);
    }

    /// Whether a slot already known to hold a string equals `text` (longer than
    /// [`INLINE_MAX_BYTES`]; shorter ones go through [`Self::short_string_equals`]).
    fn string_equals(&mut self, fact: usize, text: &str) {
        let slot = SlotFields::of_fact(fact);
        self.f
            .instructions()
            .local_get(local::ROW)
            .i32_load(slot.len())
            .i32_const(text.len() as i32)
            .i32_eq();
        self.and_then(|this| this.leading_bytes_equal(fact, text));
    }

    /// Whether a slot is a string equal to `text` (at most [`INLINE_MAX_BYTES`] long), without
    /// a branch: when the slot is not a string of that length, the bytes compared are the
    /// literal's own (always in memory) and the outcome is masked to 0.
    fn short_string_equals(&mut self, fact: usize, text: &str) {
        let slot = SlotFields::of_fact(fact);
        let literal_address = self.literals.address_of(text);
        self.push_tag_is(fact, tag::STRING);
        let mut sink = self.f.instructions();
        sink.local_get(local::ROW)
            .i32_load(slot.len())
            .i32_const(text.len() as i32)
            .i32_eq()
            .i32_and()
            .local_set(local::GUARD)
            .local_get(local::ROW)
            .i32_load(slot.address())
            .i32_const(literal_address as i32)
            .local_get(local::GUARD)
            .select()
            .local_set(local::ADDRESS)
            .local_get(local::GUARD);
        self.bytes_at_address_equal(text);
        self.f.instructions().i32_and();
    }

    /// Whether the first `literal.len()` bytes of a string slot (known to be at least that
    /// long) are the literal's.
    fn leading_bytes_equal(&mut self, fact: usize, literal: &str) {
        if literal.len() > INLINE_MAX_BYTES {
            self.call_with_string(fact, literal, SlotArgs::Address, func::BYTES_EQUAL);
            return;
        }
        self.f
            .instructions()
            .local_get(local::ROW)
            .i32_load(SlotFields::of_fact(fact).address())
            .local_set(local::ADDRESS);
        self.bytes_at_address_equal(literal);
    }

    /// Whether the bytes at the address in [`local::ADDRESS`] start with `literal` (at most
    /// [`INLINE_MAX_BYTES`] long), compared inline with the widest loads first (8, 4, 2, 1
    /// bytes), each reading only bytes of the literal's length: a 3-byte literal is one 16-bit
    /// and one 8-bit comparison.
    fn bytes_at_address_equal(&mut self, literal: &str) {
        let bytes = literal.as_bytes();
        let mut sink = self.f.instructions();
        sink.i32_const(1);
        let mut offset = 0;
        for width in [8, 4, 2, 1] {
            while bytes.len() - offset >= width {
                let mut word = [0u8; 8];
                word[..width].copy_from_slice(&bytes[offset..offset + width]);
                let word = u64::from_le_bytes(word);
                let at = memory_arg(offset as u64, 0);
                sink.local_get(local::ADDRESS);
                match width {
                    8 => sink.i64_load(at).i64_const(word as i64).i64_eq(),
                    4 => sink.i32_load(at).i32_const(word as u32 as i32).i32_eq(),
                    2 => sink.i32_load16_u(at).i32_const(word as i32).i32_eq(),
                    _ => sink.i32_load8_u(at).i32_const(word as i32).i32_eq(),
                };
                sink.i32_and();
                offset += width;
            }
        }
    }

    /// `exists`: present and not null.
    fn exists(&mut self, fact: usize) {
        let slot = SlotFields::of_fact(fact);
        self.f
            .instructions()
            .local_get(local::ROW)
            .i32_load(slot.tag())
            .i32_const(tag::MISSING as i32)
            .i32_ne()
            .local_get(local::ROW)
            .i32_load(slot.tag())
            .i32_const(tag::NULL as i32)
            .i32_ne()
            .i32_and();
    }

    /// `contains`: a byte substring of a string, or an element of an array that is an equal
    /// string; false for every other tag.
    fn contains(&mut self, fact: usize, needle: &str) {
        self.push_tag_is(fact, tag::STRING);
        self.f.instructions().if_(BlockType::Result(ValType::I32));
        self.call_with_string(fact, needle, SlotArgs::AddressAndLen, func::CONTAINS_BYTES);
        self.f.instructions().else_();
        self.push_tag_is(fact, tag::ARRAY);
        self.and_then(|this| {
            this.call_with_string(
                fact,
                needle,
                SlotArgs::AddressAndLen,
                func::ARRAY_HAS_STRING,
            )
        });
        self.f.instructions().end();
    }

    /// `starts_with`: a string at least as long as the prefix whose first bytes are it.
    fn starts_with(&mut self, fact: usize, prefix: &str) {
        let slot = SlotFields::of_fact(fact);
        self.push_tag_is(fact, tag::STRING);
        self.and_then(|this| {
            this.f
                .instructions()
                .local_get(local::ROW)
                .i32_load(slot.len())
                .i32_const(prefix.len() as i32)
                .i32_ge_u();
            this.and_then(|this| this.leading_bytes_equal(fact, prefix));
        });
    }

    /// Calls a byte helper on the slot's string (or array) and a string literal.
    fn call_with_string(&mut self, fact: usize, literal: &str, args: SlotArgs, helper: u32) {
        let slot = SlotFields::of_fact(fact);
        let address = self.literals.address_of(literal);
        let mut sink = self.f.instructions();
        sink.local_get(local::ROW).i32_load(slot.address());
        if let SlotArgs::AddressAndLen = args {
            sink.local_get(local::ROW).i32_load(slot.len());
        }
        sink.i32_const(address as i32)
            .i32_const(literal.len() as i32)
            .call(helper);
    }

    /// A timestamp property against `now + offset`; false for any other tag, whatever `op`.
    fn prop_now(&mut self, fact: usize, op: CmpOp, offset_secs: i64) {
        let slot = SlotFields::of_fact(fact);
        let instant = self.instant_local(offset_secs.saturating_mul(1000));
        self.push_tag_is(fact, tag::TIMESTAMP);
        self.f
            .instructions()
            .local_get(local::ROW)
            .i64_load(slot.payload())
            .local_get(instant);
        self.push_op(op, Operands::I64);
        self.f.instructions().i32_and();
    }

    fn instant_local(&self, offset_ms: i64) -> u32 {
        let position = self
            .offsets_ms
            .iter()
            .position(|known| *known == offset_ms)
            .expect("collect_now_offsets saw every PropNow node");
        local::FIRST_INSTANT + position as u32
    }

    /// Sets each instant local to `now_ms + offset_ms`, saturating like the oracle: the offset
    /// is a constant, so its sign says which way the sum can overflow (a positive offset
    /// overflowed when the sum is below `now_ms`, a negative one when it is above).
    fn compute_instants(&mut self) {
        for (position, offset_ms) in self.offsets_ms.iter().enumerate() {
            let instant = local::FIRST_INSTANT + position as u32;
            let positive = *offset_ms >= 0;
            let mut sink = self.f.instructions();
            sink.i64_const(if positive { i64::MAX } else { i64::MIN })
                .local_get(local::NOW_MS)
                .i64_const(*offset_ms)
                .i64_add()
                .local_tee(instant)
                .local_get(instant)
                .local_get(local::NOW_MS);
            if positive {
                sink.i64_lt_s();
            } else {
                sink.i64_gt_s();
            }
            sink.select().local_set(instant);
        }
    }

    fn push_tag_is(&mut self, fact: usize, expected_tag: u32) {
        self.f
            .instructions()
            .local_get(local::ROW)
            .i32_load(SlotFields::of_fact(fact).tag())
            .i32_const(expected_tag as i32)
            .i32_eq();
    }

    /// Applies `op` to the two operands on the stack.
    fn push_op(&mut self, op: CmpOp, operands: Operands) {
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
