//! The sandboxed wasmtime host for predicate modules (membrane ABI v1, see `membrane_abi`).
//!
//! [`Engine::load`] checks a module against the ABI before anything runs it: no imports at all,
//! the four exports with their exact signatures, a valid `membrane.facts` manifest and the ABI
//! version. [`Predicate::evaluate`] then runs batches of users under a memory cap and a time
//! budget; a trap, a timeout or a misbehaving guest becomes an [`EvalError`], never a panic.

mod epoch;
mod error;
mod load;
mod predicate;
mod sandbox;

use std::sync::Arc;
use std::time::Duration;

pub use error::{EngineError, EvalError, LoadError};
pub use predicate::Predicate;

use epoch::EpochTicker;

/// How often the epoch advances; the granularity of time budgets.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Resource bounds applied to every predicate an [`Engine`] loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Cap on a guest's linear memory; growing past it traps with [`EvalError::MemoryLimit`].
    pub max_memory_bytes: usize,
    /// Modules larger than this are rejected before compilation.
    pub max_module_bytes: usize,
    /// Wall-clock budget for each call into the guest (one batch chunk); exceeding it yields
    /// [`EvalError::Timeout`]. Enforced with epoch interruption at [`EPOCH_TICK`] granularity.
    pub time_budget: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory_bytes: 64 << 20,
            max_module_bytes: 4 << 20,
            time_budget: Duration::from_secs(1),
        }
    }
}

/// One wasmtime engine configured for sandboxed predicates. Cheap to clone; predicates keep
/// what they need alive, including the epoch thread, so they may outlive the `Engine` value.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

/// State shared by an engine and every predicate it loaded.
pub(crate) struct Shared {
    pub(crate) wasmtime: wasmtime::Engine,
    pub(crate) limits: Limits,
    /// Epoch ticks a guest call may run before it is interrupted.
    pub(crate) deadline_ticks: u64,
    /// Stops (and joins) the epoch thread when the last engine or predicate is dropped.
    _ticker: EpochTicker,
}

impl Engine {
    pub fn new(limits: Limits) -> Result<Engine, EngineError> {
        let mut config = wasmtime::Config::new();
        config
            .epoch_interruption(true)
            // Traps are reported by kind; capturing wasm backtraces would only cost time.
            .wasm_backtrace_max_frames(None)
            // The ABI has exactly one memory; refusing more shrinks what a module can ask for.
            .wasm_multi_memory(false);
        let wasmtime = wasmtime::Engine::new(&config)
            .map_err(|error| EngineError::Configure(format!("{error:#}")))?;
        let ticker =
            EpochTicker::start(wasmtime.clone(), EPOCH_TICK).map_err(EngineError::EpochThread)?;
        // One extra tick: the first tick may come almost immediately after the deadline is set.
        let deadline_ticks = limits
            .time_budget
            .as_nanos()
            .div_ceil(EPOCH_TICK.as_nanos())
            .saturating_add(1)
            .try_into()
            .unwrap_or(u64::MAX);
        Ok(Engine {
            shared: Arc::new(Shared {
                wasmtime,
                limits,
                deadline_ticks,
                _ticker: ticker,
            }),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("limits", &self.shared.limits)
            .finish_non_exhaustive()
    }
}
