//! The membrane predicate ABI, version 1.
//!
//! A predicate module (compiled criteria or a Rust plugin) is a core WebAssembly module that:
//! - carries a custom section named [`FACTS_SECTION`] holding a JSON [`FactManifest`]: the facts
//!   the host must gather for every user before calling it;
//! - exports its linear memory as [`EXPORT_MEMORY`];
//! - exports `membrane_abi_version() -> i32` returning [`ABI_VERSION`];
//! - exports `membrane_alloc(bytes: i32) -> i32` returning the address of a writable buffer of at
//!   least that many bytes (valid until the next call of `membrane_alloc`);
//! - exports `membrane_eval(input: i32, users: i32, out: i32, now_ms: i64) -> i32`, which reads
//!   `users` rows of facts at `input`, writes one result byte per user at `out` (0 = not a member,
//!   1 = member) and returns 0, or a non-zero error code.
//!
//! A row is one 16-byte [`Slot`] per declared fact, in manifest order. Strings live in a heap the
//! host writes after the rows; a string slot holds its absolute address and byte length. The host
//! lays a batch out as `[rows][string heap][out bytes]` inside one `membrane_alloc` buffer.
//!
//! Two optional exports (see `docs/plugin-abi.md`):
//! - `membrane_configure(config: i32, len: i32) -> i32`: the host writes the bucket's `[config]`
//!   table as JSON into a `membrane_alloc` buffer and calls this once per instance, before any
//!   `membrane_eval`; 0 accepts the config, anything else rejects it (the bucket does not load);
//! - `membrane_last_error() -> i64`: `address << 32 | length` of a UTF-8 message explaining the
//!   last non-zero code the module returned (0 when it has none), read by the host for its error.
//!
//! This crate is the only place that layout is defined; the compiler, the host and plugin SDKs
//! all go through it. Without its default `std` feature it is `no_std` + `alloc`, for guests.

#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

pub const ABI_VERSION: u32 = 1;

/// The ABI's names as string literals, so they can also appear where Rust wants a literal
/// (`#[link_section = ...]`, `#[export_name = ...]` in guest code). The constants below are the
/// same names for ordinary code.
#[macro_export]
macro_rules! abi_name {
    (facts_section) => {
        "membrane.facts"
    };
    (memory) => {
        "memory"
    };
    (version) => {
        "membrane_abi_version"
    };
    (alloc) => {
        "membrane_alloc"
    };
    (eval) => {
        "membrane_eval"
    };
    (configure) => {
        "membrane_configure"
    };
    (last_error) => {
        "membrane_last_error"
    };
}

pub const FACTS_SECTION: &str = abi_name!(facts_section);
pub const EXPORT_MEMORY: &str = abi_name!(memory);
pub const EXPORT_VERSION: &str = abi_name!(version);
pub const EXPORT_ALLOC: &str = abi_name!(alloc);
pub const EXPORT_EVAL: &str = abi_name!(eval);
/// Optional: receives the bucket's `[config]` as JSON before any evaluation.
pub const EXPORT_CONFIGURE: &str = abi_name!(configure);
/// Optional: explains the last non-zero code the module returned.
pub const EXPORT_LAST_ERROR: &str = abi_name!(last_error);

/// Return codes of `membrane_eval` and `membrane_configure`. Only 0 has a fixed meaning to the
/// host (success); the others are the conventions the Rust SDK follows, so messages can name them.
pub mod code {
    pub const OK: i32 = 0;
    /// `membrane_configure`: the config is not what the module accepts.
    pub const BAD_CONFIG: i32 = 1;
    /// `membrane_eval` before a successful `membrane_configure`.
    pub const NOT_CONFIGURED: i32 = 2;
    /// `membrane_eval`: the batch does not match the manifest (a slot of an unexpected shape).
    pub const BAD_INPUT: i32 = 3;
}

/// Bytes per fact slot.
pub const SLOT_BYTES: usize = 16;

/// Slot tags (the first 4 bytes of a slot, little-endian u32).
pub mod tag {
    /// The property key is absent.
    pub const MISSING: u32 = 0;
    pub const NULL: u32 = 1;
    /// Payload: 0 or 1.
    pub const BOOL: u32 = 2;
    /// Payload: f64 bits.
    pub const NUMBER: u32 = 3;
    /// Payload: absolute address; `len`: byte length (UTF-8).
    pub const STRING: u32 = 4;
    /// Payload: absolute address of `len` element slots (16 bytes each) in the heap. Elements
    /// are scalars laid out like top-level values; nested arrays and objects carry only their tag.
    pub const ARRAY: u32 = 5;
    /// An object value (not laid out in ABI v1).
    pub const OBJECT: u32 = 6;
    /// Payload: i64 event count.
    pub const COUNT: u32 = 7;
    /// Payload: i64 Unix milliseconds (a [`crate::Fact::PropertyTime`] that parsed).
    pub const TIMESTAMP: u32 = 8;
}

/// One fact a predicate needs per user. The host gathers each fact set-based for a whole batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fact {
    /// Number of the user's events named `event` with `occurred_at >= now - within_secs`
    /// (all of history when `within_secs` is `None`) whose own properties satisfy `filter`.
    EventCount {
        event: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        within_secs: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filter: Option<EventFilter>,
    },
    /// The top-level key `key` of the contact's merged properties.
    Property { key: String },
    /// The same key read as an RFC 3339 timestamp: [`FactValue::Timestamp`] when it parses,
    /// [`FactValue::Missing`] otherwise (absent, another type, or not a valid timestamp).
    PropertyTime { key: String },
}

/// A condition on an event's own properties (`.where(...)`). Hosts translate it to their
/// query language; its meaning is [`PropertyTest`]'s on each key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum EventFilter {
    All { of: Vec<EventFilter> },
    Any { of: Vec<EventFilter> },
    Not { filter: Box<EventFilter> },
    Test { key: String, test: PropertyTest },
}

/// A test of one property value. Semantics (the reference evaluator implements them):
/// - `Compare`: numbers as f64, strings by bytes, booleans and null only by `==`/`!=`; a missing
///   key or a type mismatch is false, except `!=`, which is then true.
/// - `Exists`: the key is present with a non-null value; `NotExists` is its negation.
/// - `Contains`: substring of a string, or an element (equal string) of an array; else false.
/// - `StartsWith`: prefix of a string; else false.
/// - `In`: `==` to any of the literals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "test", rename_all = "snake_case")]
pub enum PropertyTest {
    Compare { cmp: CmpOp, value: Literal },
    Exists,
    NotExists,
    Contains { value: String },
    StartsWith { value: String },
    In { values: Vec<Literal> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    /// Applies the operator to an ordering.
    pub fn holds(self, ordering: core::cmp::Ordering) -> bool {
        use core::cmp::Ordering::*;
        match self {
            CmpOp::Eq => ordering == Equal,
            CmpOp::Ne => ordering != Equal,
            CmpOp::Lt => ordering == Less,
            CmpOp::Le => ordering != Greater,
            CmpOp::Gt => ordering == Greater,
            CmpOp::Ge => ordering != Less,
        }
    }
}

/// A literal of the criteria language.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Literal {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
}

#[cfg(feature = "std")]
/// Parses an RFC 3339 timestamp to Unix milliseconds (sub-millisecond digits are truncated
/// toward the past). The one definition every host and the reference evaluator share.
pub fn parse_timestamp_ms(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The JSON document stored in the [`FACTS_SECTION`] custom section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactManifest {
    pub abi: u32,
    pub facts: Vec<Fact>,
}

impl FactManifest {
    pub fn new(facts: Vec<Fact>) -> Self {
        FactManifest {
            abi: ABI_VERSION,
            facts,
        }
    }

    #[cfg(feature = "std")]
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a manifest always serializes")
    }

    #[cfg(feature = "std")]
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A gathered fact value for one user.
#[cfg(feature = "std")]
#[derive(Debug, Clone, PartialEq)]
pub enum FactValue {
    Missing,
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<serde_json::Value>),
    Object,
    Count(i64),
    Timestamp(i64),
}

#[cfg(feature = "std")]
impl FactValue {
    /// A property value as stored in the contact's JSON properties (`None` = key absent).
    pub fn from_json(value: Option<&serde_json::Value>) -> Self {
        use serde_json::Value;
        match value {
            None => FactValue::Missing,
            Some(Value::Null) => FactValue::Null,
            Some(Value::Bool(b)) => FactValue::Bool(*b),
            Some(Value::Number(n)) => FactValue::Number(n.as_f64().unwrap_or(f64::NAN)),
            Some(Value::String(s)) => FactValue::String(s.clone()),
            Some(Value::Array(items)) => FactValue::Array(items.clone()),
            Some(Value::Object(_)) => FactValue::Object,
        }
    }
}

/// A decoded slot header, for hosts and guests that read rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub tag: u32,
    pub len: u32,
    pub payload: u64,
}

impl Slot {
    pub fn to_bytes(self) -> [u8; SLOT_BYTES] {
        let mut out = [0u8; SLOT_BYTES];
        out[0..4].copy_from_slice(&self.tag.to_le_bytes());
        out[4..8].copy_from_slice(&self.len.to_le_bytes());
        out[8..16].copy_from_slice(&self.payload.to_le_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8; SLOT_BYTES]) -> Self {
        let word = |range: core::ops::Range<usize>| {
            let mut buf = [0u8; 8];
            buf[..range.len()].copy_from_slice(&bytes[range]);
            u64::from_le_bytes(buf)
        };
        Slot {
            tag: word(0..4) as u32,
            len: word(4..8) as u32,
            payload: word(8..16),
        }
    }
}

/// Byte sizes of a batch laid out at some base address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLayout {
    pub users: usize,
    pub facts: usize,
    pub heap_bytes: usize,
}

impl BatchLayout {
    pub fn rows_bytes(&self) -> usize {
        self.users * self.facts * SLOT_BYTES
    }
    /// Offset of the result bytes from the batch base.
    pub fn out_offset(&self) -> usize {
        self.rows_bytes() + self.heap_bytes
    }
    pub fn total_bytes(&self) -> usize {
        self.out_offset() + self.users
    }
}

/// What a row of values adds to a batch's heap: array element slots and string bytes.
/// Hosts size their `membrane_alloc` request with it.
#[cfg(feature = "std")]
pub fn heap_bytes(row: &[FactValue]) -> usize {
    HeapSize::of_row(row).bytes()
}

/// What rows put on a batch's heap: array element slots first, then string bytes.
#[cfg(feature = "std")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapSize {
    pub element_slots: usize,
    pub string_bytes: usize,
}

#[cfg(feature = "std")]
impl HeapSize {
    pub fn of_row(row: &[FactValue]) -> Self {
        let mut size = HeapSize::default();
        for value in row {
            match value {
                FactValue::String(s) => size.string_bytes += s.len(),
                FactValue::Array(items) => {
                    size.element_slots += items.len();
                    size.string_bytes += items
                        .iter()
                        .filter_map(serde_json::Value::as_str)
                        .map(str::len)
                        .sum::<usize>();
                }
                _ => {}
            }
        }
        size
    }

    pub fn of_rows(rows: &[Vec<FactValue>]) -> Self {
        rows.iter().fold(HeapSize::default(), |total, row| {
            total.plus(HeapSize::of_row(row))
        })
    }

    pub fn plus(self, other: HeapSize) -> Self {
        HeapSize {
            element_slots: self.element_slots + other.element_slots,
            string_bytes: self.string_bytes + other.string_bytes,
        }
    }

    pub fn bytes(self) -> usize {
        self.element_slots * SLOT_BYTES + self.string_bytes
    }
}

/// Lays out `rows` (each `facts` values long) at guest address `base`; returns the layout and
/// the bytes to copy to `base` (rows and heap; the result area is left to the guest). The heap
/// holds array element slots first (16-byte aligned when `base` is), then string bytes.
/// Hosts that can write straight into guest memory use [`encode_into`] and skip this copy.
#[cfg(feature = "std")]
pub fn encode_batch(base: u32, facts: usize, rows: &[Vec<FactValue>]) -> (BatchLayout, Vec<u8>) {
    let heap = HeapSize::of_rows(rows);
    let mut bytes = vec![0u8; facts * rows.len() * SLOT_BYTES + heap.bytes()];
    let layout = encode_into(&mut bytes, base, facts, rows, heap);
    (layout, bytes)
}

/// Writes the batch of [`encode_batch`] (rows, then heap) into `buffer`, which the guest sees
/// at address `base`, without allocating; returns its layout. `heap` must be
/// `HeapSize::of_rows(rows)`, which hosts already computed to size the buffer. The result area
/// after `out_offset()` is not touched.
///
/// # Panics
/// When a row does not hold `facts` values or `buffer` is shorter than the layout's
/// `out_offset()`.
#[cfg(feature = "std")]
pub fn encode_into(
    buffer: &mut [u8],
    base: u32,
    facts: usize,
    rows: &[Vec<FactValue>],
    heap: HeapSize,
) -> BatchLayout {
    let layout = BatchLayout {
        users: rows.len(),
        facts,
        heap_bytes: heap.bytes(),
    };
    assert!(
        buffer.len() >= layout.out_offset(),
        "the buffer holds {} bytes; the batch needs {}",
        buffer.len(),
        layout.out_offset()
    );
    let rows_bytes = layout.rows_bytes();
    let (slots, heap_area) = buffer[..layout.out_offset()].split_at_mut(rows_bytes);
    let mut writer = HeapWriter {
        heap: heap_area,
        heap_base: u64::from(base) + rows_bytes as u64,
        next_element: 0,
        next_string: heap.element_slots * SLOT_BYTES,
    };
    // `chunks_exact_mut` (rather than indexing) lets the slot writes go without bounds checks.
    let mut slots = slots.chunks_exact_mut(SLOT_BYTES);
    for row in rows {
        assert_eq!(
            row.len(),
            facts,
            "every row holds one value per declared fact"
        );
        for (value, slot) in row.iter().zip(&mut slots) {
            slot.copy_from_slice(&writer.slot_of(value).to_bytes());
        }
    }
    layout
}

/// Appends array element slots and string bytes to a batch's heap, which lives at guest
/// address `heap_base`; `next_element` and `next_string` are offsets into `heap`.
#[cfg(feature = "std")]
struct HeapWriter<'a> {
    heap: &'a mut [u8],
    heap_base: u64,
    next_element: usize,
    next_string: usize,
}

#[cfg(feature = "std")]
impl HeapWriter<'_> {
    fn string(&mut self, s: &str) -> Slot {
        let at = self.next_string;
        self.heap[at..at + s.len()].copy_from_slice(s.as_bytes());
        self.next_string += s.len();
        Slot {
            tag: tag::STRING,
            len: s.len() as u32,
            payload: self.heap_base + at as u64,
        }
    }

    fn slot_of(&mut self, value: &FactValue) -> Slot {
        match value {
            FactValue::Missing => bare_slot(tag::MISSING, 0),
            FactValue::Null => bare_slot(tag::NULL, 0),
            FactValue::Bool(b) => bare_slot(tag::BOOL, *b as u64),
            FactValue::Number(n) => bare_slot(tag::NUMBER, n.to_bits()),
            FactValue::String(s) => self.string(s),
            FactValue::Array(items) => {
                // Reserve the element slots first: string elements go to the string region.
                let first = self.next_element;
                self.next_element += items.len() * SLOT_BYTES;
                for (index, item) in items.iter().enumerate() {
                    let element = self.element_slot(item).to_bytes();
                    let at = first + index * SLOT_BYTES;
                    self.heap[at..at + SLOT_BYTES].copy_from_slice(&element);
                }
                Slot {
                    tag: tag::ARRAY,
                    len: items.len() as u32,
                    payload: self.heap_base + first as u64,
                }
            }
            FactValue::Object => bare_slot(tag::OBJECT, 0),
            FactValue::Count(c) => bare_slot(tag::COUNT, *c as u64),
            FactValue::Timestamp(ms) => bare_slot(tag::TIMESTAMP, *ms as u64),
        }
    }

    /// An array element: scalars as at top level (read like [`FactValue::from_json`], without
    /// cloning); nested containers keep only their tag.
    fn element_slot(&mut self, item: &serde_json::Value) -> Slot {
        use serde_json::Value;
        match item {
            Value::Null => bare_slot(tag::NULL, 0),
            Value::Bool(b) => bare_slot(tag::BOOL, *b as u64),
            Value::Number(n) => bare_slot(tag::NUMBER, n.as_f64().unwrap_or(f64::NAN).to_bits()),
            Value::String(s) => self.string(s),
            Value::Array(_) => bare_slot(tag::ARRAY, 0),
            Value::Object(_) => bare_slot(tag::OBJECT, 0),
        }
    }
}

/// A slot with no heap part.
#[cfg(feature = "std")]
fn bare_slot(tag: u32, payload: u64) -> Slot {
    Slot {
        tag,
        len: 0,
        payload,
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_through_json() {
        let manifest = FactManifest::new(vec![
            Fact::EventCount {
                event: "session_start".into(),
                within_secs: Some(14 * 86_400),
                filter: None,
            },
            Fact::EventCount {
                event: "order".into(),
                within_secs: None,
                filter: Some(EventFilter::Test {
                    key: "amount".into(),
                    test: PropertyTest::Compare {
                        cmp: CmpOp::Ge,
                        value: Literal::Num(100.0),
                    },
                }),
            },
            Fact::Property { key: "plan".into() },
            Fact::PropertyTime {
                key: "trial_ends_at".into(),
            },
        ]);
        let json = manifest.to_json();
        assert_eq!(FactManifest::from_json(json.as_bytes()).unwrap(), manifest);
    }

    #[test]
    fn arrays_lay_out_element_slots_before_strings() {
        let rows = vec![vec![FactValue::Array(vec![
            serde_json::json!("x"),
            serde_json::json!(2),
            serde_json::json!([1]),
        ])]];
        let (layout, bytes) = encode_batch(0, 1, &rows);
        assert_eq!(layout.heap_bytes, 3 * 16 + 1);
        let slot = |at: usize| Slot::from_bytes(&bytes[at..at + 16].try_into().unwrap());
        assert_eq!(slot(0).tag, tag::ARRAY);
        assert_eq!((slot(0).len, slot(0).payload), (3, 16));
        assert_eq!(slot(16).tag, tag::STRING);
        assert_eq!(slot(16).payload, 64);
        assert_eq!(slot(32).tag, tag::NUMBER);
        assert_eq!(slot(48).tag, tag::ARRAY);
        assert_eq!(&bytes[64..65], b"x");
    }

    #[test]
    fn encode_into_writes_the_same_bytes_in_place_and_leaves_the_results_alone() {
        let rows = vec![
            vec![
                FactValue::Array(vec![serde_json::json!("é"), serde_json::json!(null)]),
                FactValue::String("pro".into()),
            ],
            vec![FactValue::Missing, FactValue::String(String::new())],
        ];
        let (layout, expected) = encode_batch(4096, 2, &rows);
        let mut buffer = vec![0xAA; layout.total_bytes()];
        let heap = HeapSize::of_rows(&rows);
        assert_eq!(encode_into(&mut buffer, 4096, 2, &rows, heap), layout);
        assert_eq!(&buffer[..layout.out_offset()], &expected[..]);
        assert!(buffer[layout.out_offset()..]
            .iter()
            .all(|&byte| byte == 0xAA));
    }

    #[test]
    fn strings_point_into_the_heap_after_the_rows() {
        let rows = vec![vec![FactValue::String("ab".into()), FactValue::Count(3)]];
        let (layout, bytes) = encode_batch(1000, 2, &rows);
        assert_eq!(layout.rows_bytes(), 32);
        assert_eq!(layout.out_offset(), 34);
        let first: [u8; 16] = bytes[0..16].try_into().unwrap();
        let slot = Slot::from_bytes(&first);
        assert_eq!(slot.tag, tag::STRING);
        assert_eq!(slot.payload, 1032);
        assert_eq!(&bytes[32..34], b"ab");
        let second: [u8; 16] = bytes[16..32].try_into().unwrap();
        assert_eq!(Slot::from_bytes(&second).payload, 3);
    }
}
