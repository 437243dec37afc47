//! Write membrane predicate plugins in Rust (ABI v1, `docs/plugin-abi.md`).
//!
//! ```ignore
//! use membrane_plugin::{days, event_count, facts, export_plugin, FactSpec, Plugin, Row};
//!
//! facts! {
//!     ORDERS_90D = event_count("order_completed").within(days(90));
//!     REFUNDS_90D = event_count("refund_issued").within(days(90));
//! }
//!
//! #[derive(serde::Deserialize)]
//! struct Config { max_ratio: f64 }
//!
//! struct RefundRatio { max_ratio: f64 }
//!
//! impl Plugin for RefundRatio {
//!     const FACTS: &'static [FactSpec] = FACTS;
//!     type Config = Config;
//!     fn new(config: Config) -> Result<Self, String> { Ok(RefundRatio { max_ratio: config.max_ratio }) }
//!     fn evaluate(&self, row: &Row<'_>, _now_ms: i64) -> bool {
//!         let orders = row.count(ORDERS_90D);
//!         orders > 0 && row.count(REFUNDS_90D) as f64 / orders as f64 > self.max_ratio
//!     }
//! }
//!
//! export_plugin!(RefundRatio);
//! ```
//!
//! On `wasm32` the crate also provides the global allocator (`dlmalloc`, the one Rust's std
//! uses there) and a panic handler that traps, so a plugin crate needs nothing else.

#![no_std]

extern crate alloc;
#[cfg(feature = "testing")]
extern crate std;

mod facts;
mod row;
#[cfg(feature = "testing")]
pub mod testing;

#[doc(hidden)]
pub mod __private;

use alloc::string::String;

pub use facts::{
    days, event_count, hours, minutes, property, property_time, seconds, weeks, Cmp, FactSpec,
    Filter, Literal, ManifestJson, Test, Window,
};
pub use row::{Array, Batch, FactId, Row, Value};

/// Re-exported so the macros can name the ABI from a plugin crate.
#[doc(hidden)]
pub use membrane_abi as __abi;

/// A predicate plugin: its facts, its config and its decision for one user.
pub trait Plugin: Sized {
    /// The facts every row holds, in order; declare them with [`facts!`].
    const FACTS: &'static [FactSpec];
    /// The bucket's `[config]` table, deserialized from JSON. Use `#[serde(default)]` for
    /// optional keys and `#[serde(deny_unknown_fields)]` to catch typos.
    type Config: serde::de::DeserializeOwned;

    /// Validates the config; the error becomes the bucket's load error.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// Whether the user whose facts are `row` is a member at `now_ms` (Unix milliseconds).
    fn evaluate(&self, row: &Row<'_>, now_ms: i64) -> bool;
}

/// Parses a `[config]` JSON document and builds the plugin from it: what `membrane_configure`
/// does, exposed for host-side tests.
pub fn configure<P: Plugin>(config_json: &[u8]) -> Result<P, String> {
    let config = serde_json::from_slice::<P::Config>(config_json)
        .map_err(|error| alloc::format!("invalid [config]: {error}"))?;
    P::new(config)
}

/// Evaluates every row of `batch` into `out` (one 0/1 byte per user): what `membrane_eval`
/// does once configured.
pub fn evaluate_batch<P: Plugin>(
    plugin: &P,
    batch: &Batch<'_>,
    out: &mut [u8],
    now_ms: i64,
) -> Result<(), String> {
    for (user, result) in out.iter_mut().enumerate() {
        let row = batch
            .row(user)
            .ok_or_else(|| alloc::format!("the batch has no row {user}"))?;
        *result = u8::from(plugin.evaluate(&row, now_ms));
    }
    Ok(())
}

/// Declares a plugin's facts: one `const NAME: FactId` per fact (its index in every row) and
/// `const FACTS: &[FactSpec]` listing them in order, for [`Plugin::FACTS`].
///
/// ```ignore
/// facts! {
///     SESSIONS_7D = event_count("session_start").within(days(7));
///     PLAN = property("plan");
/// }
/// ```
#[macro_export]
macro_rules! facts {
    ($($vis:vis $name:ident = $spec:expr;)+) => {
        // Enum discriminants count the facts, so each name's index follows its position.
        #[allow(non_camel_case_types, dead_code, clippy::upper_case_acronyms)]
        #[repr(usize)]
        enum __MembraneFactIndex {
            $($name,)+
        }
        $(
            $vis const $name: $crate::FactId = $crate::FactId::at(__MembraneFactIndex::$name as usize);
        )+
        /// The declared facts, in row order.
        pub const FACTS: &[$crate::FactSpec] = &[$($spec),+];
    };
}

/// Exports a [`Plugin`] under the ABI: the `membrane.facts` section rendered at compile time
/// from [`Plugin::FACTS`], and the `membrane_*` functions (on `wasm32` only, so the crate's
/// unit tests still build natively).
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            const MANIFEST_LEN: usize =
                $crate::ManifestJson::<0>::render(<$plugin as $crate::Plugin>::FACTS).len();

            #[used]
            #[link_section = $crate::__abi::abi_name!(facts_section)]
            static MANIFEST: [u8; MANIFEST_LEN] =
                $crate::ManifestJson::<MANIFEST_LEN>::render(<$plugin as $crate::Plugin>::FACTS)
                    .into_bytes();

            static STATE: $crate::__private::State<$plugin> = $crate::__private::State::new();

            #[export_name = $crate::__abi::abi_name!(version)]
            extern "C" fn membrane_abi_version() -> i32 {
                $crate::__abi::ABI_VERSION as i32
            }

            #[export_name = $crate::__abi::abi_name!(alloc)]
            extern "C" fn membrane_alloc(bytes: i32) -> i32 {
                $crate::__private::alloc(bytes)
            }

            #[export_name = $crate::__abi::abi_name!(configure)]
            extern "C" fn membrane_configure(config: i32, len: i32) -> i32 {
                $crate::__private::configure(&STATE, config, len)
            }

            #[export_name = $crate::__abi::abi_name!(eval)]
            extern "C" fn membrane_eval(input: i32, users: i32, out: i32, now_ms: i64) -> i32 {
                $crate::__private::eval(&STATE, input, users, out, now_ms)
            }

            #[export_name = $crate::__abi::abi_name!(last_error)]
            extern "C" fn membrane_last_error() -> i64 {
                $crate::__private::last_error()
            }
        };
    };
}

#[cfg(test)]
mod tests;
