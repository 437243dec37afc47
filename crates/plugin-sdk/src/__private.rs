//! The guest runtime behind [`crate::export_plugin!`]: the exports' bodies, the module's state,
//! and (on wasm32) the global allocator and panic handler. Not a public API.

use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;

use membrane_abi::code;

use crate::{configure as build_plugin, evaluate_batch, Batch, Plugin};

/// A global the exports share. wasm32-unknown-unknown (without the atomics feature) runs one
/// thread, and an export is never re-entered (the module imports nothing, so nothing calls
/// back into it), so at most one `with` borrow is alive at any time.
pub struct GuestCell<T>(UnsafeCell<T>);

// SAFETY: see the type's documentation: one thread, no re-entry.
unsafe impl<T> Sync for GuestCell<T> {}

impl<T> GuestCell<T> {
    pub const fn new(value: T) -> Self {
        GuestCell(UnsafeCell::new(value))
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: see the type's documentation; `f` cannot reach this cell again.
        f(unsafe { &mut *self.0.get() })
    }
}

/// The configured plugin of this instance (`None` until `membrane_configure` succeeds).
pub struct State<P>(GuestCell<Option<P>>);

impl<P> State<P> {
    pub const fn new() -> Self {
        State(GuestCell::new(None))
    }
}

impl<P> Default for State<P> {
    fn default() -> Self {
        State::new()
    }
}

/// The buffer `membrane_alloc` hands out; replaced by the next call, as the ABI allows.
static BUFFER: GuestCell<Vec<u8>> = GuestCell::new(Vec::new());
/// The explanation of the last non-zero code, for `membrane_last_error`.
static LAST_ERROR: GuestCell<String> = GuestCell::new(String::new());

pub fn alloc(bytes: i32) -> i32 {
    let Ok(bytes) = usize::try_from(bytes) else {
        return -1;
    };
    BUFFER.with(|buffer| {
        // Free the previous batch before allocating the next, keeping peak memory at one batch.
        *buffer = Vec::new();
        *buffer = alloc::vec![0; bytes];
        buffer.as_mut_ptr() as usize as i32
    })
}

fn fail(code: i32, message: String) -> i32 {
    LAST_ERROR.with(|last| *last = message);
    code
}

/// # Safety contract
/// The host passes `config..config + len` inside the buffer of the last `membrane_alloc`.
pub fn configure<P: Plugin>(state: &State<P>, config: i32, len: i32) -> i32 {
    let range = u32::try_from(config).ok().zip(usize::try_from(len).ok());
    let Some(config_json) = range.and_then(|(config, len)| guest_bytes(config, len)) else {
        return fail(code::BAD_CONFIG, "the config buffer is out of range".into());
    };
    match build_plugin::<P>(config_json) {
        Ok(plugin) => {
            state.0.with(|slot| *slot = Some(plugin));
            code::OK
        }
        Err(message) => fail(code::BAD_CONFIG, message),
    }
}

pub fn eval<P: Plugin>(state: &State<P>, input: i32, users: i32, out: i32, now_ms: i64) -> i32 {
    let (Ok(input), Ok(users), Ok(out)) = (
        u32::try_from(input),
        usize::try_from(users),
        u32::try_from(out),
    ) else {
        return fail(code::BAD_INPUT, "negative address or user count".into());
    };
    // The ABI puts the results right after the rows and heap: the batch is `input..out`.
    let Some(batch_len) = out.checked_sub(input) else {
        return fail(code::BAD_INPUT, "the result area precedes the input".into());
    };
    let (Some(bytes), Some(results)) = (
        guest_bytes(input, batch_len as usize),
        guest_bytes_mut(out, users),
    ) else {
        return fail(code::BAD_INPUT, "the batch is out of range".into());
    };
    let batch = Batch::new(bytes, u64::from(input), P::FACTS.len());
    state.0.with(|plugin| match plugin {
        None => fail(
            code::NOT_CONFIGURED,
            "membrane_eval before membrane_configure".into(),
        ),
        Some(plugin) => match evaluate_batch(plugin, &batch, results, now_ms) {
            Ok(()) => code::OK,
            Err(message) => fail(code::BAD_INPUT, message),
        },
    })
}

pub fn last_error() -> i64 {
    LAST_ERROR.with(|message| ((message.as_ptr() as usize as i64) << 32) | message.len() as i64)
}

/// The guest memory `address..address + len` as a slice; `None` unless it lies inside the
/// `membrane_alloc` buffer, the only memory the host writes.
fn guest_bytes(address: u32, len: usize) -> Option<&'static [u8]> {
    let range = buffer_range(address, len)?;
    // SAFETY: the range lies inside BUFFER, which stays allocated until the next
    // `membrane_alloc`, after this export returns; nothing mutates it meanwhile.
    Some(unsafe { core::slice::from_raw_parts(range.start as *const u8, range.len()) })
}

fn guest_bytes_mut(address: u32, len: usize) -> Option<&'static mut [u8]> {
    let range = buffer_range(address, len)?;
    // SAFETY: as for `guest_bytes`; the result area does not overlap the rows and heap, which
    // end where it begins.
    Some(unsafe { core::slice::from_raw_parts_mut(range.start as *mut u8, range.len()) })
}

fn buffer_range(address: u32, len: usize) -> Option<core::ops::Range<usize>> {
    let start = address as usize;
    let end = start.checked_add(len)?;
    BUFFER.with(|buffer| {
        let base = buffer.as_ptr() as usize;
        (start >= base && end <= base + buffer.len()).then_some(start..end)
    })
}

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// A panic traps: the host reports the trap and disables the bucket version.
#[cfg(all(target_arch = "wasm32", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}
