//! Running a loaded predicate over batches of users.

use std::sync::Arc;

use membrane_abi::{encode_batch, BatchLayout, FactManifest, FactValue, SLOT_BYTES};
use wasmtime::{InstancePre, Memory, Store, TypedFunc};

use crate::error::EvalError;
use crate::sandbox::{classify, GuestLimiter};
use crate::Shared;

/// Most users handed to one `membrane_eval` call; bounds the work done under one time budget.
const MAX_CHUNK_USERS: usize = 16 * 1024;
/// Most batch bytes (rows, strings, results) per call, further bounded by a quarter of the
/// memory cap so the guest keeps room for its own data.
const MAX_CHUNK_BYTES: usize = 8 << 20;

/// A checked, compiled predicate module. `Send + Sync`; share it behind an `Arc`.
///
/// Every [`Predicate::evaluate`] call instantiates the module afresh from the pre-linked
/// [`InstancePre`] in a new `Store`. Instantiating a module with no imports and one memory
/// costs microseconds, negligible next to a batch of thousands of users, and it means no state
/// (a corrupted heap, a half-finished call after a trap) ever carries from one call to the next
/// or between concurrent callers, so no pool or locking is needed.
pub struct Predicate {
    shared: Arc<Shared>,
    manifest: FactManifest,
    instance_pre: InstancePre<GuestLimiter>,
}

impl std::fmt::Debug for Predicate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predicate")
            .field("manifest", &self.manifest)
            .finish_non_exhaustive()
    }
}

impl Predicate {
    pub(crate) fn new(
        shared: Arc<Shared>,
        manifest: FactManifest,
        instance_pre: InstancePre<GuestLimiter>,
    ) -> Self {
        Predicate {
            shared,
            manifest,
            instance_pre,
        }
    }

    /// The facts the host must gather for each user, in row order.
    pub fn manifest(&self) -> &FactManifest {
        &self.manifest
    }

    /// Evaluates every row (one value per manifest fact, in manifest order) at instant
    /// `now_ms` (Unix milliseconds). Returns one membership flag per row.
    pub fn evaluate(&self, rows: &[Vec<FactValue>], now_ms: i64) -> Result<Vec<bool>, EvalError> {
        let facts = self.manifest.facts.len();
        if let Some((row, values)) = rows
            .iter()
            .enumerate()
            .find(|(_, values)| values.len() != facts)
        {
            return Err(EvalError::RowWidth {
                row,
                found: values.len(),
                expected: facts,
            });
        }
        let mut results = Vec::with_capacity(rows.len());
        if rows.is_empty() {
            return Ok(results);
        }
        let mut guest = self.instantiate()?;
        let byte_budget = MAX_CHUNK_BYTES.min(self.shared.limits.max_memory_bytes / 4);
        let mut rest = rows;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(chunk_len(rest, facts, byte_budget));
            guest.evaluate_chunk(chunk, facts, now_ms, results.len(), &mut results)?;
            rest = tail;
        }
        Ok(results)
    }

    /// Instantiates the module and calls `membrane_abi_version`: the load-time trial run.
    pub(crate) fn abi_version(&self) -> Result<i32, EvalError> {
        let mut guest = self.instantiate()?;
        guest.call_version()
    }

    fn instantiate(&self) -> Result<Guest, EvalError> {
        const CALL: &str = "instantiation";
        let limits = &self.shared.limits;
        let mut store = Store::new(
            &self.shared.wasmtime,
            GuestLimiter {
                max_memory_bytes: limits.max_memory_bytes,
            },
        );
        store.limiter(|limiter| limiter);
        store.set_epoch_deadline(self.shared.deadline_ticks);
        let instance = self
            .instance_pre
            .instantiate(&mut store)
            .map_err(|error| classify(error, CALL, limits.time_budget))?;
        // The exports' presence and types were checked at load; a failure here is a host bug,
        // reported rather than panicking.
        let missing = |error: wasmtime::Error| EvalError::Host {
            call: CALL,
            message: format!("{error:#}"),
        };
        let memory = instance
            .get_memory(&mut store, membrane_abi::EXPORT_MEMORY)
            .ok_or_else(|| EvalError::Host {
                call: CALL,
                message: "the `memory` export disappeared".into(),
            })?;
        Ok(Guest {
            version: instance
                .get_typed_func(&mut store, membrane_abi::EXPORT_VERSION)
                .map_err(missing)?,
            alloc: instance
                .get_typed_func(&mut store, membrane_abi::EXPORT_ALLOC)
                .map_err(missing)?,
            eval: instance
                .get_typed_func(&mut store, membrane_abi::EXPORT_EVAL)
                .map_err(missing)?,
            memory,
            store,
            shared: Arc::clone(&self.shared),
        })
    }
}

/// How many leading rows of `rows` go into the next chunk (at least one).
fn chunk_len(rows: &[Vec<FactValue>], facts: usize, byte_budget: usize) -> usize {
    let mut bytes = 0usize;
    let mut users = 0usize;
    for row in rows.iter().take(MAX_CHUNK_USERS) {
        bytes += row_bytes(row, facts);
        if users > 0 && bytes > byte_budget {
            break;
        }
        users += 1;
    }
    users
}

/// A row's share of a batch buffer: its slots, its strings and its result byte.
fn row_bytes(row: &[FactValue], facts: usize) -> usize {
    facts * SLOT_BYTES + string_bytes(row) + 1
}

/// What a row adds to the batch's string heap.
fn string_bytes(row: &[FactValue]) -> usize {
    row.iter()
        .map(|value| match value {
            FactValue::String(s) => s.len(),
            _ => 0,
        })
        .sum()
}

/// One live instance of a predicate, for the duration of one `evaluate` call.
struct Guest {
    store: Store<GuestLimiter>,
    memory: Memory,
    version: TypedFunc<(), i32>,
    alloc: TypedFunc<i32, i32>,
    eval: TypedFunc<(i32, i32, i32, i64), i32>,
    shared: Arc<Shared>,
}

impl Guest {
    fn call_version(&mut self) -> Result<i32, EvalError> {
        self.store.set_epoch_deadline(self.shared.deadline_ticks);
        self.version
            .call(&mut self.store, ())
            .map_err(|error| self.classify(error, membrane_abi::EXPORT_VERSION))
    }

    /// Evaluates one chunk, appending its results; `first_user` is the chunk's offset in the
    /// whole batch, for error messages.
    fn evaluate_chunk(
        &mut self,
        chunk: &[Vec<FactValue>],
        facts: usize,
        now_ms: i64,
        first_user: usize,
        results: &mut Vec<bool>,
    ) -> Result<(), EvalError> {
        let heap_bytes = chunk.iter().map(|row| string_bytes(row)).sum();
        let total = BatchLayout {
            users: chunk.len(),
            facts,
            heap_bytes,
        }
        .total_bytes();
        let requested =
            i32::try_from(total).map_err(|_| EvalError::BatchTooLarge { bytes: total })?;
        let users =
            i32::try_from(chunk.len()).map_err(|_| EvalError::BatchTooLarge { bytes: total })?;

        self.store.set_epoch_deadline(self.shared.deadline_ticks);
        let returned = self
            .alloc
            .call(&mut self.store, requested)
            .map_err(|error| self.classify(error, membrane_abi::EXPORT_ALLOC))?;
        let base = u32::try_from(returned).map_err(|_| EvalError::AllocFailed {
            requested: total,
            returned,
        })?;
        let memory_bytes = self.memory.data_size(&self.store);
        let buffer = base as usize..base as usize + total;
        if buffer.end > memory_bytes {
            return Err(EvalError::BufferOutOfBounds {
                requested: total,
                base,
                memory_bytes,
            });
        }

        let (layout, bytes) = encode_batch(base, facts, chunk);
        let memory = self.memory.data_mut(&mut self.store);
        memory[buffer.start..buffer.start + bytes.len()].copy_from_slice(&bytes);
        let out = buffer.start + layout.out_offset();

        self.store.set_epoch_deadline(self.shared.deadline_ticks);
        let code = self
            .eval
            // Guest addresses are i32 bit patterns of u32 offsets.
            .call(
                &mut self.store,
                (returned, users, out as u32 as i32, now_ms),
            )
            .map_err(|error| self.classify(error, membrane_abi::EXPORT_EVAL))?;
        if code != 0 {
            return Err(EvalError::ErrorCode { code });
        }

        // The guest may have grown (never shrunk) memory, so the result range is still in bounds.
        let memory = self.memory.data(&self.store);
        for (index, byte) in memory[out..out + chunk.len()].iter().enumerate() {
            match byte {
                0 => results.push(false),
                1 => results.push(true),
                &byte => {
                    return Err(EvalError::BadResultByte {
                        user: first_user + index,
                        byte,
                    })
                }
            }
        }
        Ok(())
    }

    fn classify(&self, error: wasmtime::Error, call: &'static str) -> EvalError {
        classify(error, call, self.shared.limits.time_budget)
    }
}
