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
//! This crate is the only place that layout is defined; the compiler, the host and plugin SDKs
//! all go through it.

use serde::{Deserialize, Serialize};

pub const ABI_VERSION: u32 = 1;
pub const FACTS_SECTION: &str = "membrane.facts";
pub const EXPORT_MEMORY: &str = "memory";
pub const EXPORT_VERSION: &str = "membrane_abi_version";
pub const EXPORT_ALLOC: &str = "membrane_alloc";
pub const EXPORT_EVAL: &str = "membrane_eval";

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
    /// An array value (its elements are not laid out in ABI v1).
    pub const ARRAY: u32 = 5;
    /// An object value (not laid out in ABI v1).
    pub const OBJECT: u32 = 6;
    /// Payload: i64 event count.
    pub const COUNT: u32 = 7;
}

/// One fact a predicate needs per user. The host gathers each fact set-based for a whole batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fact {
    /// Number of the user's events named `event` with `occurred_at >= now - within_secs`
    /// (all of history when `within_secs` is `None`).
    EventCount {
        event: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        within_secs: Option<u64>,
    },
    /// The top-level key `key` of the contact's merged properties.
    Property { key: String },
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

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a manifest always serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A gathered fact value for one user.
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
}

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
        let word = |range: std::ops::Range<usize>| {
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

/// Lays out `rows` (each `facts` values long) at guest address `base`; returns the layout and
/// the bytes to copy to `base` (rows and string heap; the result area is left to the guest).
pub fn encode_batch(base: u32, facts: usize, rows: &[Vec<FactValue>]) -> (BatchLayout, Vec<u8>) {
    let heap_bytes: usize = rows
        .iter()
        .flatten()
        .map(|value| match value {
            FactValue::String(s) => s.len(),
            _ => 0,
        })
        .sum();
    let layout = BatchLayout {
        users: rows.len(),
        facts,
        heap_bytes,
    };
    let mut bytes = Vec::with_capacity(layout.out_offset());
    let mut heap = Vec::with_capacity(heap_bytes);
    let heap_base = base as u64 + layout.rows_bytes() as u64;
    for row in rows {
        assert_eq!(
            row.len(),
            facts,
            "every row holds one value per declared fact"
        );
        for value in row {
            let slot = match value {
                FactValue::Missing => Slot {
                    tag: tag::MISSING,
                    len: 0,
                    payload: 0,
                },
                FactValue::Null => Slot {
                    tag: tag::NULL,
                    len: 0,
                    payload: 0,
                },
                FactValue::Bool(b) => Slot {
                    tag: tag::BOOL,
                    len: 0,
                    payload: *b as u64,
                },
                FactValue::Number(n) => Slot {
                    tag: tag::NUMBER,
                    len: 0,
                    payload: n.to_bits(),
                },
                FactValue::String(s) => {
                    let address = heap_base + heap.len() as u64;
                    heap.extend_from_slice(s.as_bytes());
                    Slot {
                        tag: tag::STRING,
                        len: s.len() as u32,
                        payload: address,
                    }
                }
                FactValue::Array(_) => Slot {
                    tag: tag::ARRAY,
                    len: 0,
                    payload: 0,
                },
                FactValue::Object => Slot {
                    tag: tag::OBJECT,
                    len: 0,
                    payload: 0,
                },
                FactValue::Count(c) => Slot {
                    tag: tag::COUNT,
                    len: 0,
                    payload: *c as u64,
                },
            };
            bytes.extend_from_slice(&slot.to_bytes());
        }
    }
    bytes.extend_from_slice(&heap);
    (layout, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_through_json() {
        let manifest = FactManifest::new(vec![
            Fact::EventCount {
                event: "session_start".into(),
                within_secs: Some(14 * 86_400),
            },
            Fact::Property { key: "plan".into() },
        ]);
        let json = manifest.to_json();
        assert_eq!(FactManifest::from_json(json.as_bytes()).unwrap(), manifest);
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
