//! What can go wrong creating an engine, loading a module and evaluating a batch.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("configuring wasmtime failed: {0}")]
    Configure(String),
    #[error("starting the epoch thread failed: {0}")]
    EpochThread(#[source] std::io::Error),
}

/// Why a module was refused. Every message names the offending part of the module.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the module is {bytes} bytes, over the limit of {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    #[error("not a valid WebAssembly module: {0}")]
    Invalid(String),
    #[error(
        "the module imports `{module}::{name}`; predicate modules may not import anything \
         (ABI v1 has no host imports and no WASI)"
    )]
    Import { module: String, name: String },
    #[error("the module does not export `{name}`; expected {expected}")]
    MissingExport {
        name: &'static str,
        expected: String,
    },
    #[error("the export `{name}` is {found}; expected {expected}")]
    WrongExport {
        name: &'static str,
        expected: String,
        found: String,
    },
    #[error("the module has no `{section}` custom section declaring the facts it needs")]
    MissingFactsSection { section: &'static str },
    #[error("the module has more than one `{section}` custom section")]
    DuplicateFactsSection { section: &'static str },
    #[error("the `{section}` custom section is not a valid fact manifest: {reason}")]
    InvalidFactsSection {
        section: &'static str,
        reason: String,
    },
    #[error("{origin} says ABI version {found}; this host speaks version {expected}")]
    WrongAbiVersion {
        origin: &'static str,
        found: i64,
        expected: u32,
    },
    #[error(
        "the bucket has a non-empty [config] but the module does not export `{export}`, \
         so it cannot receive it"
    )]
    ConfigNotAccepted { export: &'static str },
    #[error("the module rejected its [config] (code {code}){}", detail(message))]
    ConfigRejected { code: i32, message: Option<String> },
    #[error("the module failed its trial run: {0}")]
    TrialRun(#[source] EvalError),
}

/// `: <message>` for a guest's explanation of a non-zero code, or nothing when it gave none.
fn detail(message: &Option<String>) -> String {
    match message {
        Some(message) => format!(": {message}"),
        None => String::new(),
    }
}

/// Why evaluating a batch failed. A module that fails here should be disabled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("row {row} has {found} fact values but the predicate declares {expected} facts")]
    RowWidth {
        row: usize,
        found: usize,
        expected: usize,
    },
    #[error("`{call}` trapped: {trap}")]
    Trap { call: &'static str, trap: String },
    #[error("`{call}` ran past its time budget of {budget:?}")]
    Timeout {
        call: &'static str,
        budget: Duration,
    },
    #[error(
        "`{call}` tried to grow guest memory to {requested} bytes, over the cap of {cap} bytes"
    )]
    MemoryLimit {
        call: &'static str,
        requested: usize,
        cap: usize,
    },
    #[error("`{call}` failed: {message}")]
    Host { call: &'static str, message: String },
    #[error("a batch chunk of {bytes} bytes does not fit the 32-bit guest address space")]
    BatchTooLarge { bytes: usize },
    #[error("membrane_alloc({requested}) returned {returned}: the guest could not provide the batch buffer")]
    AllocFailed { requested: usize, returned: i32 },
    #[error(
        "membrane_alloc({requested}) returned {base}, which does not fit in guest memory \
         ({memory_bytes} bytes)"
    )]
    BufferOutOfBounds {
        requested: usize,
        base: u32,
        memory_bytes: usize,
    },
    #[error("membrane_eval returned error code {code}{}", detail(message))]
    ErrorCode { code: i32, message: Option<String> },
    /// `membrane_configure` refused the config on a later instantiation than the load-time one
    /// (a module whose verdict on the same config changes is misbehaving).
    #[error("membrane_configure returned error code {code}{}", detail(message))]
    ConfigRejected { code: i32, message: Option<String> },
    #[error("membrane_eval wrote {byte} as the result of user {user}; results must be 0 or 1")]
    BadResultByte { user: usize, byte: u8 },
}
