//! The host's side of a batch: gathered facts held in the ABI's slot layout from the start, so
//! handing a batch to a guest is two `memcpy`s and a patch of the string and array addresses,
//! with no per-value decoding or allocation on the way.

use alloc::vec;
use alloc::vec::Vec;

use crate::{tag, BatchLayout, FactValue, Slot, SLOT_BYTES};

/// Most users per segment: the host hands a guest one segment per `membrane_eval` call, so this
/// bounds the work done under one time budget and the buffer a guest must hold.
pub const MAX_CALL_USERS: usize = 4 * 1024;

/// One value to put in a slot: a fact's value, or an element of an array fact.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SlotValue<'a> {
    Missing,
    Null,
    Bool(bool),
    Number(f64),
    String(&'a str),
    /// An array whose elements are not laid out: an array nested in an array.
    NestedArray,
    Object,
    Count(i64),
    Timestamp(i64),
}

impl<'a> SlotValue<'a> {
    /// A JSON value as an array element (or a non-array property): numbers as f64, nested
    /// containers by their tag alone.
    pub fn of_json(value: &'a serde_json::Value) -> Self {
        use serde_json::Value;
        match value {
            Value::Null => SlotValue::Null,
            Value::Bool(b) => SlotValue::Bool(*b),
            Value::Number(n) => SlotValue::Number(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => SlotValue::String(s),
            Value::Array(_) => SlotValue::NestedArray,
            Value::Object(_) => SlotValue::Object,
        }
    }
}

/// The facts of a batch of users in slot layout, `facts` values per user, split into segments
/// of at most [`MAX_CALL_USERS`] users, each with its own heap, so every segment can be handed
/// to a guest on its own.
///
/// A string or array slot holds the offset of its bytes or element slots in its segment's heap
/// until [`Segment::write_into`] turns it into a guest address.
#[derive(Debug, Clone)]
pub struct FactBatch {
    facts: usize,
    users: usize,
    segments: Vec<Segment>,
}

/// Up to [`MAX_CALL_USERS`] consecutive users of a [`FactBatch`].
#[derive(Debug, Clone)]
pub struct Segment {
    users: usize,
    facts: usize,
    /// `users × facts` slots.
    rows: Vec<u8>,
    /// Array element slots (each array 16-byte aligned) and string bytes, in the order set.
    heap: Vec<u8>,
    /// Offsets, in `rows` followed by `heap`, of the slots whose payload is a heap offset.
    pointers: Vec<usize>,
}

impl FactBatch {
    /// `users` rows of `facts` slots, each starting as `blank[fact]` (which must not point into
    /// the heap: no string, no array with elements).
    ///
    /// # Panics
    /// When `blank` does not hold `facts` slots or one of them is a string or an array.
    pub fn new(users: usize, blank: &[Slot]) -> Self {
        Self::with_segment_users(users, blank, MAX_CALL_USERS)
    }

    fn with_segment_users(users: usize, blank: &[Slot], segment_users: usize) -> Self {
        assert!(
            blank.iter().all(|slot| !points_into_heap(*slot)),
            "blank slots never point into the heap"
        );
        let blank_row: Vec<u8> = blank.iter().flat_map(|slot| slot.to_bytes()).collect();
        let mut segments = Vec::with_capacity(users.div_ceil(segment_users.max(1)));
        let mut remaining = users;
        while remaining > 0 {
            let segment_users = remaining.min(segment_users);
            segments.push(Segment {
                users: segment_users,
                facts: blank.len(),
                rows: blank_row.repeat(segment_users),
                heap: Vec::new(),
                pointers: Vec::new(),
            });
            remaining -= segment_users;
        }
        FactBatch {
            facts: blank.len(),
            users,
            segments,
        }
    }

    /// The batch of `rows`, each holding one value per fact.
    ///
    /// # Panics
    /// When a row does not hold `facts` values.
    pub fn from_rows(facts: usize, rows: &[Vec<FactValue>]) -> Self {
        let mut batch = FactBatch::new(rows.len(), &vec![Slot::MISSING; facts]);
        batch.set_rows(rows);
        batch
    }

    fn set_rows(&mut self, rows: &[Vec<FactValue>]) {
        for (user, row) in rows.iter().enumerate() {
            assert_eq!(
                row.len(),
                self.facts,
                "every row holds one value per declared fact"
            );
            for (fact, value) in row.iter().enumerate() {
                self.set_fact_value(user, fact, value);
            }
        }
    }

    pub fn users(&self) -> usize {
        self.users
    }

    pub fn facts(&self) -> usize {
        self.facts
    }

    /// The segments, in user order: one per guest call.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Sets fact `fact` of user `user` to a value that is not an array with elements (see
    /// [`FactBatch::set_array`]).
    ///
    /// # Panics
    /// When `user` or `fact` is out of range.
    pub fn set(&mut self, user: usize, fact: usize, value: SlotValue<'_>) {
        let (segment, at) = self.locate(user, fact);
        segment.release(at);
        let slot = segment.slot_of(value, at);
        segment.rows[at..at + SLOT_BYTES].copy_from_slice(&slot.to_bytes());
    }

    /// Sets fact `fact` of user `user` to an array of `elements` (which lay out like
    /// [`FactBatch::set`] values; an element that is itself an array is
    /// [`SlotValue::NestedArray`]).
    ///
    /// # Panics
    /// When `user` or `fact` is out of range.
    pub fn set_array<'v>(
        &mut self,
        user: usize,
        fact: usize,
        elements: impl ExactSizeIterator<Item = SlotValue<'v>>,
    ) {
        let (segment, at) = self.locate(user, fact);
        segment.release(at);
        let slot = segment.array(elements, at);
        segment.rows[at..at + SLOT_BYTES].copy_from_slice(&slot.to_bytes());
    }

    /// Sets a property's value as stored in the contact's JSON properties.
    pub fn set_json(&mut self, user: usize, fact: usize, value: &serde_json::Value) {
        match value {
            serde_json::Value::Array(items) => {
                self.set_array(user, fact, items.iter().map(SlotValue::of_json))
            }
            scalar => self.set(user, fact, SlotValue::of_json(scalar)),
        }
    }

    pub fn set_fact_value(&mut self, user: usize, fact: usize, value: &FactValue) {
        let slot_value = match value {
            FactValue::Missing => SlotValue::Missing,
            FactValue::Null => SlotValue::Null,
            FactValue::Bool(b) => SlotValue::Bool(*b),
            FactValue::Number(n) => SlotValue::Number(*n),
            FactValue::String(s) => SlotValue::String(s),
            FactValue::Array(items) => {
                return self.set_array(user, fact, items.iter().map(SlotValue::of_json))
            }
            FactValue::Object => SlotValue::Object,
            FactValue::Count(c) => SlotValue::Count(*c),
            FactValue::Timestamp(ms) => SlotValue::Timestamp(*ms),
        };
        self.set(user, fact, slot_value);
    }

    /// Every row read back as fact values, as the ABI conveys them: array elements as JSON
    /// scalars (numbers as f64), nested arrays and objects empty.
    pub fn rows(&self) -> Vec<Vec<FactValue>> {
        self.segments
            .iter()
            .flat_map(|segment| {
                (0..segment.users).map(move |user| {
                    (0..segment.facts)
                        .map(|fact| segment.value((user * segment.facts + fact) * SLOT_BYTES))
                        .collect()
                })
            })
            .collect()
    }

    /// The segment holding user `user` and the offset of the slot of `fact` in its rows.
    fn locate(&mut self, user: usize, fact: usize) -> (&mut Segment, usize) {
        assert!(
            user < self.users && fact < self.facts,
            "user {user} fact {fact} is outside a batch of {} users × {} facts",
            self.users,
            self.facts
        );
        let segment_users = self.segments[0].users;
        let segment = &mut self.segments[user / segment_users];
        let at = ((user % segment_users) * segment.facts + fact) * SLOT_BYTES;
        (segment, at)
    }
}

impl Segment {
    pub fn users(&self) -> usize {
        self.users
    }

    /// The sizes of this segment laid out for one call.
    pub fn layout(&self) -> BatchLayout {
        BatchLayout {
            users: self.users,
            facts: self.facts,
            heap_bytes: self.heap.len(),
        }
    }

    /// Writes the rows and the heap into `buffer`, which the guest sees at address `base`,
    /// turning heap offsets into guest addresses. The result area after `out_offset()` is not
    /// touched.
    ///
    /// # Panics
    /// When `buffer` is shorter than `layout().out_offset()`.
    pub fn write_into(&self, buffer: &mut [u8], base: u32) {
        let rows_bytes = self.rows.len();
        let batch = &mut buffer[..rows_bytes + self.heap.len()];
        batch[..rows_bytes].copy_from_slice(&self.rows);
        batch[rows_bytes..].copy_from_slice(&self.heap);
        let heap_base = u64::from(base) + rows_bytes as u64;
        for &at in &self.pointers {
            let payload: &mut [u8; 8] = (&mut batch[at + 8..at + SLOT_BYTES])
                .try_into()
                .expect("a slot's payload is 8 bytes");
            *payload = (u64::from_le_bytes(*payload) + heap_base).to_le_bytes();
        }
    }

    /// Forgets that the row slot at `at` points into the heap, before it is overwritten. Only
    /// a value set twice pays the search; its old heap bytes stay, unreferenced.
    fn release(&mut self, at: usize) {
        if points_into_heap(self.slot(at)) {
            self.pointers.retain(|&pointer| pointer != at);
        }
    }

    /// The slot for `value`, appending its string bytes to the heap; `at` is where the slot
    /// goes (in rows followed by heap), recorded when the slot points into the heap.
    fn slot_of(&mut self, value: SlotValue<'_>, at: usize) -> Slot {
        let bare = |tag, payload| Slot {
            tag,
            len: 0,
            payload,
        };
        match value {
            SlotValue::Missing => Slot::MISSING,
            SlotValue::Null => bare(tag::NULL, 0),
            SlotValue::Bool(b) => bare(tag::BOOL, u64::from(b)),
            SlotValue::Number(n) => bare(tag::NUMBER, n.to_bits()),
            SlotValue::String(s) => {
                self.pointers.push(at);
                let offset = self.heap.len() as u64;
                self.heap.extend_from_slice(s.as_bytes());
                Slot {
                    tag: tag::STRING,
                    len: slot_len(s.len()),
                    payload: offset,
                }
            }
            SlotValue::NestedArray => bare(tag::ARRAY, 0),
            SlotValue::Object => bare(tag::OBJECT, 0),
            SlotValue::Count(c) => bare(tag::COUNT, c as u64),
            SlotValue::Timestamp(ms) => bare(tag::TIMESTAMP, ms as u64),
        }
    }

    /// Reserves 16-byte-aligned element slots on the heap and fills them; string elements'
    /// bytes go after them.
    fn array<'v>(
        &mut self,
        elements: impl ExactSizeIterator<Item = SlotValue<'v>>,
        at: usize,
    ) -> Slot {
        let count = elements.len();
        let first = self.heap.len().next_multiple_of(SLOT_BYTES);
        self.heap.resize(first + count * SLOT_BYTES, 0);
        for (index, element) in elements.take(count).enumerate() {
            let heap_at = first + index * SLOT_BYTES;
            let slot = self.slot_of(element, self.rows.len() + heap_at);
            self.heap[heap_at..heap_at + SLOT_BYTES].copy_from_slice(&slot.to_bytes());
        }
        if count > 0 {
            self.pointers.push(at);
        }
        Slot {
            tag: tag::ARRAY,
            len: slot_len(count),
            payload: if count > 0 { first as u64 } else { 0 },
        }
    }

    /// The slot at `at` in rows followed by heap.
    fn slot(&self, at: usize) -> Slot {
        let bytes = match at.checked_sub(self.rows.len()) {
            None => &self.rows[at..at + SLOT_BYTES],
            Some(heap_at) => &self.heap[heap_at..heap_at + SLOT_BYTES],
        };
        Slot::from_bytes(bytes.try_into().expect("a slot is 16 bytes"))
    }

    /// The same users in two segments (the first holding half of them, rounded up), for a host
    /// whose guest cannot take this segment's bytes in one call.
    pub fn halves(&self) -> FactBatch {
        let mut halves = FactBatch::with_segment_users(
            self.users,
            &vec![Slot::MISSING; self.facts],
            self.users.div_ceil(2).max(1),
        );
        for user in 0..self.users {
            for fact in 0..self.facts {
                let at = (user * self.facts + fact) * SLOT_BYTES;
                match self.array_elements(at) {
                    Some(elements) => halves.set_array(user, fact, elements),
                    None => halves.set(user, fact, self.slot_value(at)),
                }
            }
        }
        halves
    }

    /// The value of the slot at `at` (in rows followed by heap); an array as
    /// [`SlotValue::NestedArray`] (see [`Segment::array_elements`]).
    fn slot_value(&self, at: usize) -> SlotValue<'_> {
        let slot = self.slot(at);
        match slot.tag {
            tag::NULL => SlotValue::Null,
            tag::BOOL => SlotValue::Bool(slot.payload != 0),
            tag::NUMBER => SlotValue::Number(f64::from_bits(slot.payload)),
            tag::STRING => {
                let start = slot.payload as usize;
                let bytes = &self.heap[start..start + slot.len as usize];
                // Only ever written from a `&str`.
                SlotValue::String(core::str::from_utf8(bytes).unwrap_or_default())
            }
            tag::ARRAY => SlotValue::NestedArray,
            tag::OBJECT => SlotValue::Object,
            tag::COUNT => SlotValue::Count(slot.payload as i64),
            tag::TIMESTAMP => SlotValue::Timestamp(slot.payload as i64),
            _ => SlotValue::Missing,
        }
    }

    /// The elements of the array slot at `at`, `None` when it is not an array with elements.
    fn array_elements(
        &self,
        at: usize,
    ) -> Option<impl ExactSizeIterator<Item = SlotValue<'_>> + '_> {
        let slot = self.slot(at);
        if !(slot.tag == tag::ARRAY && slot.len > 0) {
            return None;
        }
        let first = self.rows.len() + slot.payload as usize;
        Some((0..slot.len as usize).map(move |index| self.slot_value(first + index * SLOT_BYTES)))
    }

    /// The slot at `at` as a fact value: array elements as JSON scalars, nested containers
    /// empty.
    fn value(&self, at: usize) -> FactValue {
        if let Some(elements) = self.array_elements(at) {
            let element = |value| match value {
                SlotValue::Bool(b) => serde_json::Value::Bool(b),
                SlotValue::Number(n) => serde_json::Value::from(n),
                SlotValue::String(s) => serde_json::Value::String(s.into()),
                SlotValue::NestedArray => serde_json::Value::Array(Vec::new()),
                SlotValue::Object => serde_json::Value::Object(Default::default()),
                _ => serde_json::Value::Null,
            };
            return FactValue::Array(elements.map(element).collect());
        }
        match self.slot_value(at) {
            SlotValue::Missing => FactValue::Missing,
            SlotValue::Null => FactValue::Null,
            SlotValue::Bool(b) => FactValue::Bool(b),
            SlotValue::Number(n) => FactValue::Number(n),
            SlotValue::String(s) => FactValue::String(s.into()),
            // An array without elements.
            SlotValue::NestedArray => FactValue::Array(Vec::new()),
            SlotValue::Object => FactValue::Object,
            SlotValue::Count(c) => FactValue::Count(c),
            SlotValue::Timestamp(ms) => FactValue::Timestamp(ms),
        }
    }
}

/// Whether a slot's payload is a heap offset: a string, or an array with elements.
fn points_into_heap(slot: Slot) -> bool {
    slot.tag == tag::STRING || (slot.tag == tag::ARRAY && slot.len > 0)
}

/// A byte length or element count as a slot's `len`. Postgres caps a JSON value at 255 MiB, so
/// the saturation is never reached by gathered facts.
fn slot_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Lays `rows` (each `facts` values long) out at guest address `base` as one call's batch;
/// returns the layout and the bytes to copy to `base` (rows and heap; the result area is left
/// to the guest). For guest SDK tests that run a batch natively; hosts use [`FactBatch`].
pub fn encode_batch(base: u32, facts: usize, rows: &[Vec<FactValue>]) -> (BatchLayout, Vec<u8>) {
    let mut batch =
        FactBatch::with_segment_users(rows.len(), &vec![Slot::MISSING; facts], usize::MAX);
    batch.set_rows(rows);
    match batch.segments.first() {
        Some(segment) => {
            let layout = segment.layout();
            let mut bytes = vec![0u8; layout.out_offset()];
            segment.write_into(&mut bytes, base);
            (layout, bytes)
        }
        None => (
            BatchLayout {
                users: 0,
                facts,
                heap_bytes: 0,
            },
            Vec::new(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_lay_out_element_slots_before_their_strings() {
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

    #[test]
    fn write_into_leaves_the_results_alone_and_can_be_repeated_at_another_base() {
        let rows = vec![
            vec![
                FactValue::Array(vec![serde_json::json!("é"), serde_json::json!(null)]),
                FactValue::String("pro".into()),
            ],
            vec![FactValue::Missing, FactValue::String(String::new())],
        ];
        let batch = FactBatch::from_rows(2, &rows);
        let segment = &batch.segments()[0];
        for base in [4096, 64] {
            let (layout, expected) = encode_batch(base, 2, &rows);
            assert_eq!(segment.layout(), layout);
            let mut buffer = vec![0xAA; layout.total_bytes()];
            segment.write_into(&mut buffer, base);
            assert_eq!(&buffer[..layout.out_offset()], &expected[..]);
            assert!(buffer[layout.out_offset()..]
                .iter()
                .all(|&byte| byte == 0xAA));
        }
    }

    #[test]
    fn values_read_back_as_the_abi_conveys_them_across_segments() {
        let rows: Vec<Vec<FactValue>> = (0..5)
            .map(|user| {
                vec![
                    FactValue::String(format!("user {user}")),
                    FactValue::Array(vec![
                        serde_json::json!(user),
                        serde_json::json!("é"),
                        serde_json::json!({"nested": true}),
                        serde_json::json!([1, 2]),
                    ]),
                    FactValue::Count(user),
                ]
            })
            .collect();
        let mut batch = FactBatch::with_segment_users(5, &[Slot::MISSING; 3], 2);
        batch.set_rows(&rows);
        assert_eq!(batch.segments().len(), 3);
        let expected: Vec<Vec<FactValue>> = (0..5)
            .map(|user| {
                vec![
                    FactValue::String(format!("user {user}")),
                    FactValue::Array(vec![
                        serde_json::json!(user as f64),
                        serde_json::json!("é"),
                        serde_json::json!({}),
                        serde_json::json!([]),
                    ]),
                    FactValue::Count(user),
                ]
            })
            .collect();
        assert_eq!(batch.rows(), expected);
    }

    #[test]
    fn halves_hold_the_same_values() {
        let rows: Vec<Vec<FactValue>> = (0..5)
            .map(|user| {
                vec![
                    FactValue::Array(vec![
                        serde_json::json!(format!("{user}")),
                        serde_json::json!(true),
                    ]),
                    FactValue::String("é".repeat(user)),
                    FactValue::Timestamp(user as i64),
                ]
            })
            .collect();
        let batch = FactBatch::from_rows(3, &rows);
        let halves = batch.segments()[0].halves();
        assert_eq!(
            halves
                .segments()
                .iter()
                .map(Segment::users)
                .collect::<Vec<_>>(),
            [3, 2]
        );
        assert_eq!(halves.rows(), rows);
    }

    #[test]
    fn a_value_set_twice_is_relocated_once() {
        let mut batch = FactBatch::new(1, &[Slot::MISSING]);
        batch.set(0, 0, SlotValue::String("old"));
        batch.set_json(0, 0, &serde_json::json!(["new"]));
        batch.set(0, 0, SlotValue::String("newest"));
        let segment = &batch.segments()[0];
        let mut buffer = vec![0u8; segment.layout().total_bytes()];
        segment.write_into(&mut buffer, 100);
        let slot = Slot::from_bytes(buffer[..16].try_into().unwrap());
        let start = slot.payload as usize - 100;
        assert_eq!(&buffer[start..start + slot.len as usize], b"newest");
        assert_eq!(batch.rows(), vec![vec![FactValue::String("newest".into())]]);
    }
}
