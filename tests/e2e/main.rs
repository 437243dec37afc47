//! End-to-end tests: the real `membrane` binary, real Postgres, real WASM.

mod check;
mod console;
mod hot_reload;
mod live;
mod plugins;
mod reads;
mod support;
mod webhooks;
