//! The criteria language and bucket files: parsing, diagnostics, validation, the reference
//! evaluator (the oracle) and the compiler to WASM predicates under the membrane ABI.
//!
//! This crate knows nothing of Postgres, wasmtime or terminals.

pub mod ast;
pub mod bucket;
pub mod clock;
pub mod compile;
pub mod diag;
pub mod duration;
pub mod eval;
pub mod parser;
pub mod plan;
pub mod validate;
