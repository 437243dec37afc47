//! End-to-end tests: the real `membrane` binary, real Postgres, real WASM.

mod chaos;
mod check;
mod console;
mod hot_reload;
mod live;
mod plugins;
mod support;
mod webhooks;
