//! Running a loaded predicate over batches of users.

use std::sync::{Arc, Mutex, PoisonError};

use membrane_abi::{FactBatch, FactManifest, FactValue, Segment};
use wasmtime::{InstancePre, Memory, Store, TypedFunc};

use crate::error::EvalError;
use crate::sandbox::{classify, GuestLimiter};
use crate::Shared;

/// Most batch bytes (rows, heap, results) per call, further bounded by a quarter of the memory
/// cap so the guest keeps room for its own data.
const MAX_CALL_BYTES: usize = 8 << 20;
/// Longest explanation read from `membrane_last_error`; the rest is cut.
const MAX_GUEST_MESSAGE_BYTES: usize = 1024;
/// Most idle instances a predicate keeps; enough for one per concurrent caller on a typical
/// host, while bounding the guest memory kept resident.
const MAX_IDLE_GUESTS: usize = 8;

/// A checked, compiled predicate module. `Send + Sync`; share it behind an `Arc`.
///
/// Instances are pooled: an [`Predicate::evaluate`] call takes an idle instance (or creates
/// one from the pre-linked [`InstancePre`], configured once with the predicate's fixed config)
/// and puts it back when the whole call succeeded. Reuse matters because a fresh instance has
/// fresh linear memory, and first-touching a megabyte of batch costs far more than the guest's
/// work on it. Reuse is safe because:
/// - each instance is used by one caller at a time (concurrent callers get their own);
/// - an instance that failed in any way (trap, timeout, memory cap, error code, bad result) is
///   dropped, never returned, so no half-finished state carries over;
/// - the ABI makes calls independent: every batch is written into a fresh `membrane_alloc`
///   buffer (compiled criteria reset their bump allocator there) and every result byte is
///   zeroed by the host before the guest writes it; a plugin that keeps state across calls
///   only ever sees its own predicate's data;
/// - the sandbox still applies per call: the epoch deadline is set before every guest call,
///   and the memory cap bounds the instance's memory over its whole life.
pub struct Predicate {
    shared: Arc<Shared>,
    manifest: FactManifest,
    instance_pre: InstancePre<GuestLimiter>,
    /// The config JSON handed to `membrane_configure` in every instance; `None` when the
    /// module does not export it.
    config: Option<Vec<u8>>,
    /// Configured instances waiting for the next call.
    idle: Mutex<Vec<Guest>>,
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
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The facts the host must gather for each user, in row order.
    pub fn manifest(&self) -> &FactManifest {
        &self.manifest
    }

    /// Evaluates every row (one value per manifest fact, in manifest order) at instant
    /// `now_ms` (Unix milliseconds). Returns one membership flag per row. Lays the rows out as
    /// a [`FactBatch`] first; hosts that gather facts straight into one call
    /// [`Predicate::evaluate_batch`].
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
        self.evaluate_batch(&FactBatch::from_rows(facts, rows), now_ms)
    }

    /// Evaluates a batch gathered in slot layout at instant `now_ms` (Unix milliseconds):
    /// one guest call per segment, each handed over with two copies. Returns one membership
    /// flag per user.
    pub fn evaluate_batch(&self, batch: &FactBatch, now_ms: i64) -> Result<Vec<bool>, EvalError> {
        let facts = self.manifest.facts.len();
        if batch.facts() != facts {
            return Err(EvalError::RowWidth {
                row: 0,
                found: batch.facts(),
                expected: facts,
            });
        }
        let mut results = Vec::with_capacity(batch.users());
        if batch.users() == 0 {
            return Ok(results);
        }
        // On any error the guest is dropped with this frame instead of going back to the pool.
        let mut guest = self.checkout()?;
        let byte_budget = MAX_CALL_BYTES.min(self.shared.limits.max_memory_bytes / 4);
        for segment in batch.segments() {
            guest.evaluate_segment(segment, now_ms, byte_budget, &mut results)?;
        }
        self.check_in(guest);
        Ok(results)
    }

    /// The load-time trial run: instantiates (and configures) the module, then returns what
    /// `membrane_abi_version` says. The instance then waits in the pool for the first call.
    pub(crate) fn trial_run(&self) -> Result<i32, EvalError> {
        let mut guest = self.instantiate()?;
        let version = guest.call_version()?;
        self.check_in(guest);
        Ok(version)
    }

    /// An idle instance, or a new one when all are busy.
    fn checkout(&self) -> Result<Guest, EvalError> {
        let idle = self
            .idle
            .lock()
            // The lock only guards pushes and pops, which leave the Vec consistent even if a
            // holder panicked.
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(guest) => Ok(guest),
            None => self.instantiate(),
        }
    }

    /// Returns an instance whose every call succeeded to the pool (or drops it if the pool is
    /// full).
    fn check_in(&self, guest: Guest) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_GUESTS {
            idle.push(guest);
        }
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

/// One live, configured instance of a predicate, used by one `evaluate` call at a time.
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

    /// Evaluates one segment, appending its results (`results` holds those of the users
    /// before it). A segment over `byte_budget` bytes (long strings or arrays) goes in halves.
    fn evaluate_segment(
        &mut self,
        segment: &Segment,
        now_ms: i64,
        byte_budget: usize,
        results: &mut Vec<bool>,
    ) -> Result<(), EvalError> {
        let layout = segment.layout();
        if layout.total_bytes() > byte_budget && layout.users > 1 {
            for half in segment.halves().segments() {
                self.evaluate_segment(half, now_ms, byte_budget, results)?;
            }
            return Ok(());
        }
        let first_user = results.len();
        let total = layout.total_bytes();
        let users =
            i32::try_from(layout.users).map_err(|_| EvalError::BatchTooLarge { bytes: total })?;
        let base = self.alloc_buffer(total)?;

        // `alloc_buffer` checked that `base` fits in 32 bits and the whole batch in memory.
        let buffer = &mut self.memory.data_mut(&mut self.store)[base..base + total];
        let (batch, out_bytes) = buffer.split_at_mut(layout.out_offset());
        segment.write_into(batch, base as u32);
        // A reused buffer holds the previous call's results; a guest that skips a user must
        // not pass them off as this call's.
        out_bytes.fill(0);
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
        let out_bytes = &self.memory.data(&self.store)[out..out + layout.users];
        if let Some((index, &byte)) = out_bytes.iter().enumerate().find(|(_, &byte)| byte > 1) {
            return Err(EvalError::BadResultByte {
                user: first_user + index,
                byte,
            });
        }
        results.extend(out_bytes.iter().map(|&byte| byte == 1));
        Ok(())
    }

    fn classify(&self, error: wasmtime::Error, call: &'static str) -> EvalError {
        classify(error, call, self.shared.limits.time_budget)
    }
}
