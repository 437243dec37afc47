//! Per-store resource limits and the classification of guest failures.

use std::time::Duration;

use wasmtime::{ResourceLimiter, Trap};

use crate::error::EvalError;

/// Tables are not part of the ABI; a small bound keeps a hostile module from using them to
/// allocate host memory.
const MAX_TABLE_ELEMENTS: usize = 10_000;

/// The data of every store: enforces the memory cap. Growth past the cap traps (rather than
/// making `memory.grow` return -1) so the failure is reported as a memory error at once instead
/// of a guest spinning on failed growth until its time budget runs out.
pub(crate) struct GuestLimiter {
    pub(crate) max_memory_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("guest memory would grow to {requested} bytes, over the cap of {cap} bytes")]
pub(crate) struct MemoryCapExceeded {
    requested: usize,
    cap: usize,
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory_bytes {
            return Err(MemoryCapExceeded {
                requested: desired,
                cap: self.max_memory_bytes,
            }
            .into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }
}

/// Turns an error from instantiating or calling into the guest into a precise [`EvalError`].
pub(crate) fn classify(error: wasmtime::Error, call: &'static str, budget: Duration) -> EvalError {
    if let Some(cap) = error.downcast_ref::<MemoryCapExceeded>() {
        return EvalError::MemoryLimit {
            call,
            requested: cap.requested,
            cap: cap.cap,
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => EvalError::Timeout { call, budget },
        Some(trap) => EvalError::Trap {
            call,
            trap: trap.to_string(),
        },
        None => EvalError::Host {
            call,
            message: format!("{error:#}"),
        },
    }
}
