//! Running a plugin natively, as the wasm exports would, for plugin crates' unit tests.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use membrane_abi::{encode_batch, FactValue};

use crate::{evaluate_batch, Batch, Plugin};

/// Lays `rows` out exactly as the host does (`membrane_abi::encode_batch`) and evaluates them.
pub fn evaluate<P: Plugin>(
    plugin: &P,
    rows: &[Vec<FactValue>],
    now_ms: i64,
) -> Result<Vec<bool>, String> {
    let (_, bytes) = encode_batch(0, P::FACTS.len(), rows);
    let mut out = vec![0u8; rows.len()];
    evaluate_batch(
        plugin,
        &Batch::new(&bytes, 0, P::FACTS.len()),
        &mut out,
        now_ms,
    )?;
    Ok(out.into_iter().map(|byte| byte == 1).collect())
}
