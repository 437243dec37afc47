//! Running a loaded predicate over batches of users.

use std::sync::Arc;

use membrane_abi::{encode_batch, heap_bytes, BatchLayout, FactManifest, FactValue, SLOT_BYTES};
use wasmtime::{InstancePre, Memory, Store, TypedFunc};

use crate::error::EvalError;
use crate::sandbox::{classify, GuestLimiter};
use crate::Shared;

/// Most users handed to one `membrane_eval` call; bounds the work done under one time budget.
const MAX_CHUNK_USERS: usize = 16 * 1024;
/// Longest explanation read from `membrane_last_error`; the rest is cut.
const MAX_GUEST_MESSAGE_BYTES: usize = 1024;
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
    /// The config JSON handed to `membrane_configure` in every instance; `None` when the
    /// module does not export it.
    config: Option<Vec<u8>>,
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
        config: Option<Vec<u8>>,
    ) -> Self {
        Predicate {
            shared,
            manifest,
            instance_pre,
            config,
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

    /// The load-time trial run: instantiates (and configures) the module, then returns what
    /// `membrane_abi_version` says.
    pub(crate) fn trial_run(&self) -> Result<i32, EvalError> {
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
        let configure = optional_func(&instance, &mut store, membrane_abi::EXPORT_CONFIGURE)
            .map_err(missing)?;
        let last_error = optional_func(&instance, &mut store, membrane_abi::EXPORT_LAST_ERROR)
            .map_err(missing)?;
        let mut guest = Guest {
            version: instance
                .get_typed_func(&mut store, membrane_abi::EXPORT_VERSION)
                .map_err(missing)?,
            alloc: instance
                .get_typed_func(&mut store, membrane_abi::EXPORT_ALLOC)
                .map_err(missing)?,
            eval: instance
                .get_typed_func(&mut store, membrane_abi::EXPORT_EVAL)
                .map_err(missing)?,
            last_error,
            memory,
            store,
            shared: Arc::clone(&self.shared),
        };
        if let (Some(configure), Some(config)) = (configure, &self.config) {
            guest.configure(configure, config)?;
        }
        Ok(guest)
    }
}

/// An optional export's typed function (its signature was checked at load), `None` if absent.
fn optional_func<Params: wasmtime::WasmParams, Results: wasmtime::WasmResults>(
    instance: &wasmtime::Instance,
    store: &mut Store<GuestLimiter>,
    name: &str,
) -> wasmtime::Result<Option<TypedFunc<Params, Results>>> {
    match instance.get_export(&mut *store, name) {
        None => Ok(None),
        Some(_) => instance.get_typed_func(&mut *store, name).map(Some),
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

/// A row's share of a batch buffer: its slots, its heap (array elements, strings) and its
/// result byte.
fn row_bytes(row: &[FactValue], facts: usize) -> usize {
    facts * SLOT_BYTES + heap_bytes(row) + 1
}

/// One live instance of a predicate, for the duration of one `evaluate` call.
struct Guest {
    store: Store<GuestLimiter>,
    memory: Memory,
    version: TypedFunc<(), i32>,
    alloc: TypedFunc<i32, i32>,
    eval: TypedFunc<(i32, i32, i32, i64), i32>,
    last_error: Option<TypedFunc<(), i64>>,
    shared: Arc<Shared>,
}

impl Guest {
    fn call_version(&mut self) -> Result<i32, EvalError> {
        self.store.set_epoch_deadline(self.shared.deadline_ticks);
        self.version
            .call(&mut self.store, ())
            .map_err(|error| self.classify(error, membrane_abi::EXPORT_VERSION))
    }

    /// Hands the config to `membrane_configure`; a non-zero answer is a rejection.
    fn configure(
        &mut self,
        configure: TypedFunc<(i32, i32), i32>,
        config: &[u8],
    ) -> Result<(), EvalError> {
        let base = self.alloc_buffer(config.len())?;
        self.memory.data_mut(&mut self.store)[base..base + config.len()].copy_from_slice(config);
        let len = i32::try_from(config.len()).map_err(|_| EvalError::BatchTooLarge {
            bytes: config.len(),
        })?;
        self.store.set_epoch_deadline(self.shared.deadline_ticks);
        let code = configure
            .call(&mut self.store, (base as u32 as i32, len))
            .map_err(|error| self.classify(error, membrane_abi::EXPORT_CONFIGURE))?;
        if code != membrane_abi::code::OK {
            return Err(EvalError::ConfigRejected {
                code,
                message: self.guest_message(),
            });
        }
        Ok(())
    }

    /// Asks the guest for a buffer of `bytes` bytes and checks it lies inside its memory;
    /// returns its address.
    fn alloc_buffer(&mut self, bytes: usize) -> Result<usize, EvalError> {
        let requested = i32::try_from(bytes).map_err(|_| EvalError::BatchTooLarge { bytes })?;
        self.store.set_epoch_deadline(self.shared.deadline_ticks);
        let returned = self
            .alloc
            .call(&mut self.store, requested)
            .map_err(|error| self.classify(error, membrane_abi::EXPORT_ALLOC))?;
        let base = u32::try_from(returned).map_err(|_| EvalError::AllocFailed {
            requested: bytes,
            returned,
        })?;
        let memory_bytes = self.memory.data_size(&self.store);
        if base as usize + bytes > memory_bytes {
            return Err(EvalError::BufferOutOfBounds {
                requested: bytes,
                base,
                memory_bytes,
            });
        }
        Ok(base as usize)
    }

    /// The guest's explanation of the code it just returned, if it exports
    /// `membrane_last_error` and points at a message inside its memory. Best effort: a guest
    /// that fails here only loses its explanation.
    fn guest_message(&mut self) -> Option<String> {
        let last_error = self.last_error.clone()?;
        self.store.set_epoch_deadline(self.shared.deadline_ticks);
        let packed = last_error.call(&mut self.store, ()).ok()? as u64;
        let (address, len) = ((packed >> 32) as usize, (packed as u32) as usize);
        if len == 0 {
            return None;
        }
        let bytes = self
            .memory
            .data(&self.store)
            .get(address..address.checked_add(len)?)?;
        let shown = &bytes[..len.min(MAX_GUEST_MESSAGE_BYTES)];
        Some(String::from_utf8_lossy(shown).into_owned())
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
        let total = BatchLayout {
            users: chunk.len(),
            facts,
            heap_bytes: chunk.iter().map(|row| heap_bytes(row)).sum(),
        }
        .total_bytes();
        let users =
            i32::try_from(chunk.len()).map_err(|_| EvalError::BatchTooLarge { bytes: total })?;
        let base = self.alloc_buffer(total)?;

        // `alloc_buffer` checked that `base` fits in 32 bits and the whole batch in memory.
        let (layout, bytes) = encode_batch(base as u32, facts, chunk);
        let memory = self.memory.data_mut(&mut self.store);
        memory[base..base + bytes.len()].copy_from_slice(&bytes);
        let out = base + layout.out_offset();

        self.store.set_epoch_deadline(self.shared.deadline_ticks);
        let code = self
            .eval
            // Guest addresses are i32 bit patterns of u32 offsets.
            .call(
                &mut self.store,
                (base as u32 as i32, users, out as u32 as i32, now_ms),
            )
            .map_err(|error| self.classify(error, membrane_abi::EXPORT_EVAL))?;
        if code != membrane_abi::code::OK {
            return Err(EvalError::ErrorCode {
                code,
                message: self.guest_message(),
            });
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
