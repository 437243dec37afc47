//! Reading a batch the host laid out (see `docs/plugin-abi.md`): one row of 16-byte slots per
//! user, then a heap of array element slots and string bytes that slots point into by absolute
//! guest address. Every read is bounds-checked; a slot that does not decode (unknown tag, an
//! address outside the batch, invalid UTF-8) reads as [`Value::Missing`].

use membrane_abi::{tag, Slot, SLOT_BYTES};

/// The index of a declared fact in each row; made by [`crate::facts!`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FactId(usize);

impl FactId {
    #[doc(hidden)]
    pub const fn at(index: usize) -> FactId {
        FactId(index)
    }

    pub const fn index(self) -> usize {
        self.0
    }
}

/// The bytes of one batch (rows and heap) and the guest address they start at.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    bytes: &'a [u8],
    base: u64,
    facts: usize,
}

impl<'a> Batch<'a> {
    /// `bytes` is the batch from its first row to the end of its heap; `base` is the guest
    /// address of `bytes[0]`, which the slots' addresses are relative to.
    pub fn new(bytes: &'a [u8], base: u64, facts: usize) -> Batch<'a> {
        Batch { bytes, base, facts }
    }

    /// Row `user`, or `None` past the last row.
    pub fn row(&self, user: usize) -> Option<Row<'a>> {
        let width = self.facts * SLOT_BYTES;
        let start = user.checked_mul(width)?;
        let slots = self.bytes.get(start..start.checked_add(width)?)?;
        Some(Row {
            slots,
            batch: *self,
        })
    }

    /// `len` bytes at guest address `address`, if they lie inside the batch.
    fn bytes_at(&self, address: u64, len: usize) -> Option<&'a [u8]> {
        let start = usize::try_from(address.checked_sub(self.base)?).ok()?;
        self.bytes.get(start..start.checked_add(len)?)
    }

    fn value_at(&self, slot: Slot) -> Value<'a> {
        let decoded = match slot.tag {
            tag::MISSING => Some(Value::Missing),
            tag::NULL => Some(Value::Null),
            tag::BOOL => Some(Value::Bool(slot.payload != 0)),
            tag::NUMBER => Some(Value::Number(f64::from_bits(slot.payload))),
            tag::STRING => self
                .bytes_at(slot.payload, slot.len as usize)
                .and_then(|bytes| core::str::from_utf8(bytes).ok())
                .map(Value::Str),
            tag::ARRAY => Some(Value::Array(Array {
                batch: *self,
                address: slot.payload,
                len: slot.len as usize,
            })),
            tag::OBJECT => Some(Value::Object),
            tag::COUNT => Some(Value::Count(slot.payload as i64)),
            tag::TIMESTAMP => Some(Value::Timestamp(slot.payload as i64)),
            _ => None,
        };
        decoded.unwrap_or(Value::Missing)
    }

    fn slot_at(bytes: &[u8]) -> Option<Slot> {
        let bytes: &[u8; SLOT_BYTES] = bytes.get(..SLOT_BYTES)?.try_into().ok()?;
        Some(Slot::from_bytes(bytes))
    }
}

/// A gathered fact value.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    /// The property is absent (or a property-time fact did not parse).
    Missing,
    Null,
    Bool(bool),
    Number(f64),
    Str(&'a str),
    Array(Array<'a>),
    /// An object value; its contents are not laid out in ABI v1.
    Object,
    /// An event count.
    Count(i64),
    /// Unix milliseconds.
    Timestamp(i64),
}

/// An array property: its elements are scalars; nested arrays read as empty arrays and objects
/// as [`Value::Object`].
#[derive(Debug, Clone, Copy)]
pub struct Array<'a> {
    batch: Batch<'a>,
    address: u64,
    len: usize,
}

impl<'a> Array<'a> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, index: usize) -> Option<Value<'a>> {
        if index >= self.len {
            return None;
        }
        let offset = (index * SLOT_BYTES) as u64;
        let bytes = self.batch.bytes_at(self.address + offset, SLOT_BYTES)?;
        Some(self.batch.value_at(Batch::slot_at(bytes)?))
    }

    pub fn iter(&self) -> impl Iterator<Item = Value<'a>> + '_ {
        (0..self.len).filter_map(|index| self.get(index))
    }

    /// Whether an element is the string `text` (the criteria language's array `contains`).
    pub fn contains_str(&self, text: &str) -> bool {
        self.iter()
            .any(|value| matches!(value, Value::Str(s) if s == text))
    }
}

/// One user's facts, in declaration order.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    slots: &'a [u8],
    batch: Batch<'a>,
}

impl<'a> Row<'a> {
    pub fn value(&self, fact: FactId) -> Value<'a> {
        let start = fact.0 * SLOT_BYTES;
        self.slots
            .get(start..)
            .and_then(Batch::slot_at)
            .map_or(Value::Missing, |slot| self.batch.value_at(slot))
    }

    /// An event-count fact (0 for anything else).
    pub fn count(&self, fact: FactId) -> i64 {
        match self.value(fact) {
            Value::Count(count) => count,
            _ => 0,
        }
    }

    /// A numeric property.
    pub fn number(&self, fact: FactId) -> Option<f64> {
        match self.value(fact) {
            Value::Number(number) => Some(number),
            _ => None,
        }
    }

    /// A string property.
    pub fn str(&self, fact: FactId) -> Option<&'a str> {
        match self.value(fact) {
            Value::Str(text) => Some(text),
            _ => None,
        }
    }

    /// A boolean property.
    pub fn boolean(&self, fact: FactId) -> Option<bool> {
        match self.value(fact) {
            Value::Bool(flag) => Some(flag),
            _ => None,
        }
    }

    /// A property-time fact, in Unix milliseconds.
    pub fn timestamp(&self, fact: FactId) -> Option<i64> {
        match self.value(fact) {
            Value::Timestamp(ms) => Some(ms),
            _ => None,
        }
    }

    /// An array property.
    pub fn array(&self, fact: FactId) -> Option<Array<'a>> {
        match self.value(fact) {
            Value::Array(array) => Some(array),
            _ => None,
        }
    }
}
