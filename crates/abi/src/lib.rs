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
//! A row is one 16-byte [`Slot`] per declared fact, in manifest order. Strings and array
//! elements live in a heap the host writes after the rows; a string slot holds its absolute
//! address and byte length. The host lays a batch out as `[rows][heap][out bytes]` inside one
//! `membrane_alloc` buffer, from a `FactBatch` it gathered in that layout.
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

#[cfg(feature = "std")]
mod batch;
#[cfg(feature = "std")]
pub use batch::{encode_batch, FactBatch, Segment, SlotValue, MAX_CALL_USERS};

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

impl Fact {
    /// The slot of a user with no events and no properties: a count of 0, or missing.
    pub fn blank_slot(&self) -> Slot {
        match self {
            Fact::EventCount { .. } => Slot {
                tag: tag::COUNT,
                len: 0,
                payload: 0,
            },
            Fact::Property { .. } | Fact::PropertyTime { .. } => Slot::MISSING,
        }
    }
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
    /// Every operator.
    pub const ALL: [CmpOp; 6] = [
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
    ];

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
    /// An absent property (all zero bytes).
    pub const MISSING: Slot = Slot {
        tag: tag::MISSING,
        len: 0,
        payload: 0,
    };

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
}
